//! `/metrics` against the real tools: `promtool check metrics` accepts it, and a real
//! Prometheus server scraping every second reads accepted connections and bytes equal to what
//! the clients counted. Also the connection log.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::admin;
use common::*;

fn config(echo: SocketAddr, listener_extra: &str) -> String {
    format!(
        "[runtime]\nshards = 2\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n{listener_extra}\n\n\
         [[pool]]\nname = \"app\"\nservers = [ {{ addr = \"{echo}\", name = \"echo\" }} ]\n\
         [pool.health]\nkind = \"tcp\"\ninterval = \"1s\"\n"
    )
}

/// `count` connections through the proxy, each sending `size` bytes and reading the echo.
fn drive(addr: SocketAddr, count: usize, size: usize) {
    let payload = vec![7u8; size];
    for _ in 0..count {
        let mut stream = connect(addr);
        stream.write_all(&payload).expect("write");
        let mut echo = vec![0u8; size];
        stream.read_exact(&mut echo).expect("echo");
        stream
            .shutdown(std::net::Shutdown::Write)
            .expect("half-close");
        let mut rest = Vec::new();
        stream.read_to_end(&mut rest).expect("EOF");
    }
}

#[test]
fn promtool_accepts_the_exposition() {
    let Some(promtool) = tool("promtool", "prometheus") else {
        return;
    };
    let echo = TestServer::start(Behaviour::Echo);
    // Every family present: routes, PROXY protocol and a split as well.
    let text = config(
        echo.addr,
        "routes = [ { protocol = \"redis\", split = \"both\" } ]\n\
         proxy_protocol = \"optional\"\ntrusted_proxies = [\"127.0.0.9\"]",
    ) + "\n[[split]]\nname = \"both\"\nbackends = [ { pool = \"app\", weight = 1 } ]\n";
    let proxy = Proxy::start(&text);
    drive(proxy.addr(), 5, 100);
    let text = admin::get(proxy.admin(), "/metrics").body;
    for name in [
        "ringproxy_listener_routed_total{listener=\"front\",route=\"1\",to=\"split:both\"}",
        "ringproxy_listener_proxy_header_errors_total{listener=\"front\",reason=\"untrusted\"}",
        "ringproxy_split_weight{split=\"both\",pool=\"app\"} 1",
        "ringproxy_connections_accepted_total{listener=\"front\"}",
        "ringproxy_server_state{pool=\"app\",server=\"echo\",state=\"up\"}",
        "ringproxy_pool_connect_duration_seconds_bucket{pool=\"app\",le=\"+Inf\"}",
        "ringproxy_session_duration_seconds_count{listener=\"front\"}",
        "ringproxy_health_checks_total{pool=\"app\",server=\"echo\",result=\"success\"}",
        "ringproxy_config_last_reload_success_timestamp_seconds",
        "ringproxy_build_info{version=",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(text.contains(name), "{name} missing from:\n{text}");
    }
    common::promtool_check(&promtool, &text);
}

struct Prometheus {
    child: Child,
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(binary: PathBuf, target: SocketAddr) -> Prometheus {
        let dir = tempfile::tempdir().expect("tempdir");
        let addr = TcpListener::bind("127.0.0.1:0")
            .expect("probe")
            .local_addr()
            .expect("addr");
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  scrape_timeout: 900ms\n\
                 scrape_configs:\n  - job_name: ringproxy\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .expect("prometheus.yml");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .arg("--log.level=warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus");
        let prometheus = Prometheus {
            child,
            addr,
            _dir: dir,
        };
        assert!(
            wait_for(Duration::from_secs(30), || {
                std::net::TcpStream::connect(addr).is_ok()
                    && admin::get(addr, "/-/ready").status == 200
            }),
            "prometheus did not become ready"
        );
        prometheus
    }

    /// The value of an instant query with one result.
    fn query(&self, query: &str) -> Option<f64> {
        let encoded: String = query
            .bytes()
            .map(|byte| match byte {
                b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'_' => (byte as char).to_string(),
                _ => format!("%{byte:02X}"),
            })
            .collect();
        let response = admin::get(self.addr, &format!("/api/v1/query?query={encoded}"));
        if response.status != 200 {
            return None;
        }
        let body = response.json();
        body["data"]["result"][0]["value"][1]
            .as_str()
            .and_then(|value| value.parse().ok())
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_prometheus_scrape_reads_exactly_what_the_clients_counted() {
    let Some(binary) = tool("prometheus", "prometheus") else {
        return;
    };
    const CONNECTIONS: usize = 137;
    const SIZE: usize = 1000;
    let echo = TestServer::start(Behaviour::Echo);
    let proxy = Proxy::start(&config(echo.addr, ""));
    let prometheus = Prometheus::start(binary, proxy.admin());
    drive(proxy.addr(), CONNECTIONS, SIZE);
    let bytes = (CONNECTIONS * SIZE) as f64;
    let queries = [
        (
            "ringproxy_connections_accepted_total{listener=\"front\"}".to_string(),
            CONNECTIONS as f64,
        ),
        (
            "ringproxy_listener_bytes_total{listener=\"front\",direction=\"client_to_server\"}"
                .to_string(),
            bytes,
        ),
        (
            "ringproxy_listener_bytes_total{listener=\"front\",direction=\"server_to_client\"}"
                .to_string(),
            bytes,
        ),
        (
            "ringproxy_server_sessions_total{pool=\"app\",server=\"echo\"}".to_string(),
            CONNECTIONS as f64,
        ),
        (
            "ringproxy_sessions_closed_total{listener=\"front\",reason=\"done\"}".to_string(),
            CONNECTIONS as f64,
        ),
    ];
    let settled = wait_for(Duration::from_secs(20), || {
        queries
            .iter()
            .all(|(query, expected)| prometheus.query(query) == Some(*expected))
    });
    for (query, expected) in &queries {
        eprintln!(
            "{query} = {:?} (clients counted {expected})",
            prometheus.query(query)
        );
    }
    assert!(settled, "Prometheus's figures equal the clients' counts");
    assert_eq!(
        prometheus.query("up{job=\"ringproxy\"}"),
        Some(1.0),
        "the scrape itself succeeds"
    );
}

#[test]
fn the_connection_log_writes_one_line_per_session() {
    let echo = TestServer::start(Behaviour::Echo);
    let proxy = Proxy::start(&config(echo.addr, "log = true"));
    drive(proxy.addr(), 3, 321);
    assert!(wait_for(Duration::from_secs(3), || proxy
        .logs_with("session")
        .len()
        == 3));
    let line = &proxy.logs_with("session")[0];
    assert_eq!(line["target"], "ringproxy::access", "{line}");
    let fields = &line["fields"];
    assert_eq!(fields["listener"], "front");
    assert_eq!(fields["pool"], "app");
    assert_eq!(fields["server"], echo.addr.to_string());
    assert_eq!(fields["bytes_to_server"], 321);
    assert_eq!(fields["bytes_to_client"], 321);
    assert_eq!(fields["reason"], "done");
    assert!(
        fields["client"]
            .as_str()
            .is_some_and(|c| c.starts_with("127.0.0.1:")),
        "{fields}"
    );
    assert!(
        fields["connect_ms"].as_f64().is_some_and(|ms| ms >= 0.0),
        "{fields}"
    );
    assert!(fields["total_ms"].as_f64().is_some(), "{fields}");
    assert!(line["timestamp"].is_string());
    // Without `log = true`, no line.
    let quiet = Proxy::start(&config(echo.addr, ""));
    drive(quiet.addr(), 2, 10);
    std::thread::sleep(Duration::from_millis(300));
    assert!(quiet.logs_with("session").is_empty());
}
