//! Accepting the PROXY protocol (`proxy_protocol`, `trusted_proxies`): headers from trusted
//! peers carry the client's address to admission, routes and the servers' own headers;
//! headers from anyone else, missing required ones and broken ones are refused and counted.
//! Real HAProxy (`send-proxy-v2` in front, `accept-proxy` behind) and nginx (`listen ...
//! proxy_protocol`) check that what we read and write is what they write and read.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use ringproxy::sniff::proxy::{ProxyVerdict, parse};

/// A server that reads an optional PROXY header, answers "FROM <client address>\n" (the
/// header's client, or its own peer without one), then echoes; it records every
/// connection's bytes (header included) once the client leaves.
struct AddressServer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl AddressServer {
    fn start() -> AddressServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let record = Arc::clone(&seen);
        thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let record = Arc::clone(&record);
                thread::spawn(move || serve_with_address(stream, &record));
            }
        });
        AddressServer { addr, seen }
    }

    fn recorded(&self) -> Vec<Vec<u8>> {
        self.seen.lock().expect("lock").clone()
    }

    fn wait_recorded(&self, count: usize) -> Vec<Vec<u8>> {
        wait_for(Duration::from_secs(5), || self.recorded().len() >= count);
        self.recorded()
    }
}

fn serve_with_address(mut stream: TcpStream, record: &Mutex<Vec<Vec<u8>>>) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
    let peer = stream
        .peer_addr()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut answered = false;
    loop {
        if !answered {
            let from = match parse(&bytes) {
                ProxyVerdict::NeedMore => None,
                ProxyVerdict::Header(header) => Some(
                    header
                        .addresses
                        .map_or(peer.clone(), |(client, _)| client.to_string()),
                ),
                ProxyVerdict::Absent | ProxyVerdict::Invalid(_) => Some(peer.clone()),
            };
            if let Some(from) = from {
                answered = true;
                if stream
                    .write_all(format!("FROM {from}\n").as_bytes())
                    .is_err()
                {
                    break;
                }
                let start = match parse(&bytes) {
                    ProxyVerdict::Header(header) => header.length,
                    _ => 0,
                };
                if stream.write_all(&bytes[start..]).is_err() {
                    break;
                }
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(count) => {
                bytes.extend_from_slice(&chunk[..count]);
                if answered && stream.write_all(&chunk[..count]).is_err() {
                    break;
                }
            }
        }
    }
    record.lock().expect("lock").push(bytes);
}

fn accepting_config(server: SocketAddr, listener_keys: &str, pool_keys: &str) -> String {
    format!(
        "[runtime]\nshards = 2\ndrain_timeout = \"1s\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n{listener_keys}\n\n\
         [[pool]]\nname = \"app\"\n{pool_keys}\nservers = [ {{ addr = \"{server}\" }} ]\n"
    )
}

/// Connects from `source`, sends `first`, and returns the server's "FROM ..." line (None when
/// the proxy closed the connection instead).
fn exchange(proxy: SocketAddr, source: Ipv4Addr, first: &[u8]) -> Option<String> {
    let mut client = connect_from(proxy, source, None).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(4)))
        .expect("timeout");
    if !first.is_empty() {
        let _ = client.write_all(first);
    }
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match client.read(&mut byte) {
            Ok(1) if byte[0] == b'\n' => break,
            Ok(1) => line.push(byte[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&line).into_owned())
}

fn metric(proxy: &Proxy, name: &str, labels: &str) -> f64 {
    let text = admin::get(proxy.admin(), "/metrics").body;
    let prefix = format!("{name}{{{labels}}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {prefix:?} in /metrics"))
}

/// The sample once it reaches `expected` (shards hand their counters over every few hundred
/// milliseconds), or its value after 5 s.
fn settled_metric(proxy: &Proxy, name: &str, labels: &str, expected: f64) -> f64 {
    wait_for(Duration::from_secs(5), || {
        metric(proxy, name, labels) == expected
    });
    metric(proxy, name, labels)
}

fn v2_header(client: SocketAddr, destination: SocketAddr, tlvs: &[(u8, &[u8])]) -> Vec<u8> {
    let owned: Vec<(u8, Vec<u8>)> = tlvs.iter().map(|(k, v)| (*k, v.to_vec())).collect();
    ringproxy::sniff::proxy::header_passing_on(
        ringproxy::sniff::proxy::ProxyVersion::V2,
        client,
        destination,
        &owned,
    )
}

#[test]
fn a_trusted_header_carries_the_client_to_the_server_with_its_tlvs() {
    let server = AddressServer::start();
    let proxy = Proxy::start(&accepting_config(
        server.addr,
        "proxy_protocol = \"required\"\ntrusted_proxies = [\"127.0.0.0/8\"]",
        "send_proxy = \"v2\"",
    ));
    // v1 from the load balancer: the server's header names 192.0.2.7:5555.
    let mut first = b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 443\r\nhello".to_vec();
    assert_eq!(
        exchange(proxy.addr(), source_ip(1), &first).as_deref(),
        Some("FROM 192.0.2.7:5555")
    );
    // v2 with TLVs (ALPN, authority, a vendor's own) and IPv6: passed on, in order.
    let tlvs: [(u8, &[u8]); 3] = [(0x01, b"h2"), (0x02, b"api.example.com"), (0xE0, b"vpc-1")];
    first = v2_header(
        "[2001:db8::7]:6000".parse().expect("addr"),
        "[2001:db8::1]:443".parse().expect("addr"),
        &tlvs,
    );
    first.extend_from_slice(b"world");
    assert_eq!(
        exchange(proxy.addr(), source_ip(2), &first).as_deref(),
        Some("FROM [2001:db8::7]:6000")
    );
    let recorded = server.wait_recorded(2);
    let v2 = recorded
        .iter()
        .find(|bytes| bytes.ends_with(b"world"))
        .expect("the v2 connection");
    let ProxyVerdict::Header(header) = parse(v2) else {
        panic!("the server got no header: {v2:?}");
    };
    let kept: Vec<(u8, &[u8])> = header
        .tlvs
        .iter()
        .map(|(kind, value)| (*kind, value.as_slice()))
        .collect();
    assert_eq!(kept, tlvs.to_vec());
    assert_eq!(
        &v2[header.length..],
        b"world",
        "the client's bytes follow at once"
    );
    let v1 = recorded
        .iter()
        .find(|bytes| bytes.ends_with(b"hello"))
        .expect("the v1 connection");
    let ProxyVerdict::Header(header) = parse(v1) else {
        panic!("no header");
    };
    assert_eq!(&v1[header.length..], b"hello");
    assert_eq!(
        settled_metric(
            &proxy,
            "ringproxy_listener_proxy_headers_total",
            "listener=\"front\"",
            2.0
        ),
        2.0
    );
}

#[test]
fn untrusted_missing_and_broken_headers_are_refused_and_counted() {
    let server = AddressServer::start();
    let proxy = Proxy::start(&accepting_config(
        server.addr,
        "proxy_protocol = \"required\"\ntrusted_proxies = [\"127.0.0.9\"]\n\
         sniff_timeout = \"1s\"",
        "send_proxy = \"v1\"",
    ));
    let header = b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 443\r\nhello";
    // A header from a peer that is not trusted: refused, the server never hears of it.
    assert_eq!(exchange(proxy.addr(), source_ip(1), header), None);
    // The same peer without a header is a client in its own right.
    let answer = exchange(proxy.addr(), Ipv4Addr::new(127, 0, 0, 3), b"hello");
    assert!(
        answer
            .as_deref()
            .is_some_and(|line| line.starts_with("FROM 127.0.0.3:")),
        "an untrusted peer without a header is served as itself: {answer:?}"
    );
    // The trusted peer: with a header it is believed ...
    let trusted = Ipv4Addr::new(127, 0, 0, 9);
    assert_eq!(
        exchange(proxy.addr(), trusted, header).as_deref(),
        Some("FROM 192.0.2.7:5555")
    );
    // ... without one (required), refused, whether it talks or stays silent.
    assert_eq!(exchange(proxy.addr(), trusted, b"hello"), None);
    let started = Instant::now();
    assert_eq!(exchange(proxy.addr(), trusted, b""), None);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(800) && waited < Duration::from_secs(3),
        "a silent trusted peer is refused at sniff_timeout (1s), not after {waited:?}"
    );
    // Broken: a v1 line with a bad address, and a header cut short.
    assert_eq!(
        exchange(
            proxy.addr(),
            trusted,
            b"PROXY TCP4 300.1.1.1 1.1.1.1 1 2\r\n"
        ),
        None
    );
    assert_eq!(exchange(proxy.addr(), trusted, b"PROXY TCP4 192.0"), None);
    let status = admin::status(proxy.admin());
    let listener = &status["listeners"][0]["proxy_protocol"];
    assert_eq!(listener["mode"], "required", "{listener}");
    assert_eq!(listener["trusted_proxies"][0], "127.0.0.9/32", "{listener}");
    let label = |reason: &str| format!("listener=\"front\",reason=\"{reason}\"");
    let errors = "ringproxy_listener_proxy_header_errors_total";
    assert_eq!(
        settled_metric(&proxy, errors, &label("untrusted"), 1.0),
        1.0
    );
    assert_eq!(settled_metric(&proxy, errors, &label("missing"), 2.0), 2.0);
    assert_eq!(settled_metric(&proxy, errors, &label("invalid"), 1.0), 1.0);
    assert_eq!(settled_metric(&proxy, errors, &label("timeout"), 1.0), 1.0);
    // The server saw the two good sessions only, never a header or a refused client's bytes.
    thread::sleep(Duration::from_millis(300));
    let recorded = server.recorded();
    assert_eq!(recorded.len(), 2, "{recorded:?}");
    assert!(
        recorded.iter().all(|bytes| match parse(bytes) {
            ProxyVerdict::Header(header) => &bytes[header.length..] == b"hello",
            _ => false,
        }),
        "{recorded:?}"
    );
}

#[test]
fn optional_lets_clients_without_a_header_through_even_silent_ones() {
    // A server that speaks first (as MySQL does): a silent client must still reach it.
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let server = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = stream.write_all(b"GREETING\n");
            thread::sleep(Duration::from_millis(500));
        }
    });
    let proxy = Proxy::start(&accepting_config(
        server,
        "proxy_protocol = \"optional\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n\
         server_first_after = \"200ms\"",
        "",
    ));
    let mut client = connect(proxy.addr());
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let started = Instant::now();
    let mut greeting = [0u8; 9];
    client
        .read_exact(&mut greeting)
        .expect("the silent client hears the server");
    assert_eq!(&greeting, b"GREETING\n");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(150) && waited < Duration::from_secs(2),
        "connected after server_first_after (200ms), not {waited:?}"
    );
}

#[test]
fn admission_and_routes_use_the_carried_address() {
    let app = AddressServer::start();
    let internal = AddressServer::start();
    let text = format!(
        "[runtime]\nshards = 1\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\
         proxy_protocol = \"optional\"\ntrusted_proxies = [\"127.0.0.9\"]\n\
         routes = [ {{ source = \"10.0.0.0/8\", pool = \"internal\" }} ]\n\
         [listener.acl]\ndeny = [\"192.0.2.0/24\"]\n\n\
         [[pool]]\nname = \"app\"\nservers = [ {{ addr = \"{}\" }} ]\n\n\
         [[pool]]\nname = \"internal\"\nservers = [ {{ addr = \"{}\" }} ]\n",
        app.addr, internal.addr
    );
    let proxy = Proxy::start(&text);
    let trusted = Ipv4Addr::new(127, 0, 0, 9);
    // Denied by the ACL on the carried address, though the peer itself is allowed.
    assert_eq!(
        exchange(
            proxy.addr(),
            trusted,
            b"PROXY TCP4 192.0.2.7 198.51.100.1 5555 443\r\nhi"
        ),
        None
    );
    assert_eq!(
        settled_metric(
            &proxy,
            "ringproxy_connections_rejected_total",
            "listener=\"front\",reason=\"acl\"",
            1.0
        ),
        1.0
    );
    // Routed by the carried address.
    assert!(
        exchange(
            proxy.addr(),
            trusted,
            b"PROXY TCP4 10.1.2.3 198.51.100.1 5555 443\r\nhi"
        )
        .is_some()
    );
    assert_eq!(
        internal.wait_recorded(1).len(),
        1,
        "10.1.2.3 went to the internal pool"
    );
    assert!(
        exchange(
            proxy.addr(),
            trusted,
            b"PROXY TCP4 198.51.100.9 198.51.100.1 5555 443\r\nhi"
        )
        .is_some()
    );
    assert_eq!(
        app.wait_recorded(1).len(),
        1,
        "198.51.100.9 went to the default pool"
    );
    assert_eq!(internal.recorded().len(), 1);
}

// ---- real HAProxy and nginx ------------------------------------------------------------------

/// nginx answering each request with `$proxy_protocol_addr` read from a PROXY header its
/// listener requires (and logging it).
fn nginx_reporting_proxy_address(nginx: &Path, dir: &Path, port: u16) -> Started {
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "daemon off;\nmaster_process off;\nworker_processes 1;\npid {dir}/nginx.pid;\n\
             error_log {dir}/error.log;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log {dir}/access.log;\n  client_body_temp_path {dir};\n\
               proxy_temp_path {dir};\n  fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n\
               scgi_temp_path {dir};\n\
               log_format pp '$proxy_protocol_addr $request';\n\
               server {{\n    listen 127.0.0.1:{port} proxy_protocol;\n\
                 access_log {dir}/pp.log pp;\n\
                 location / {{ return 200 \"client=$proxy_protocol_addr:$proxy_protocol_port\\n\"; }}\n  }}\n}}\n",
            dir = dir.display()
        ),
    )
    .expect("nginx.conf");
    start_server(
        "nginx",
        Command::new(nginx).args([
            "-p",
            &dir.display().to_string(),
            "-c",
            &conf.display().to_string(),
        ]),
        &[port],
        Duration::from_secs(10),
    )
}

fn haproxy(haproxy: &Path, dir: &Path, config: &str, port: u16) -> Started {
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, config).expect("haproxy.cfg");
    start_server(
        "haproxy",
        Command::new(haproxy).args(["-db", "-f", &path.display().to_string()]),
        &[port],
        Duration::from_secs(10),
    )
}

fn curl_from(curl: &Path, source: &str, url: &str) -> String {
    let output = Command::new(curl)
        .args(["-s", "--max-time", "5", "--interface", source, url])
        .output()
        .expect("curl");
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringproxy-pp-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// curl (from 127.0.0.5) -> HAProxy `send-proxy-v2` -> ringproxy (`proxy_protocol =
/// "required"`, v1 to its pool) -> nginx `listen ... proxy_protocol`: nginx sees curl's
/// address, which only the two headers carried.
#[test]
fn haproxy_in_front_and_nginx_behind_see_the_client_address() {
    let (Some(curl), Some(nginx), Some(haproxy_bin)) = (
        tool("curl", "curl"),
        tool("nginx", "nginx"),
        tool("haproxy", "haproxy"),
    ) else {
        return;
    };
    let dir = scratch("front");
    let nginx_port = free_port();
    let _nginx = nginx_reporting_proxy_address(&nginx, &dir, nginx_port);
    for version in ["v1", "v2"] {
        let proxy = Proxy::start(&accepting_config(
            format!("127.0.0.1:{nginx_port}").parse().expect("addr"),
            "proxy_protocol = \"required\"\ntrusted_proxies = [\"127.0.0.1\"]",
            &format!("send_proxy = \"{version}\""),
        ));
        let front = free_port();
        let _haproxy = haproxy(
            &haproxy_bin,
            &dir,
            &format!(
                "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 2s\n  \
                 timeout client 5s\n  timeout server 5s\n\
                 listen front\n  bind 127.0.0.1:{front}\n  \
                 server rp {} send-proxy-v2 source 127.0.0.1\n",
                proxy.addr()
            ),
            front,
        );
        let body = curl_from(&curl, "127.0.0.5", &format!("http://127.0.0.1:{front}/"));
        assert!(
            body.starts_with("client=127.0.0.5:"),
            "nginx behind ringproxy ({version}) saw {body:?}, not curl's 127.0.0.5"
        );
        // Direct from 127.0.0.6 (not trusted, no header): served with its own address.
        let body = curl_from(&curl, "127.0.0.6", &format!("http://{}/", proxy.addr()));
        assert!(
            body.starts_with("client=127.0.0.6:"),
            "a direct client ({version}) reached nginx as {body:?}"
        );
    }
    let logged = std::fs::read_to_string(dir.join("pp.log")).unwrap_or_default();
    assert!(
        logged.contains("127.0.0.5 GET / HTTP/1.1"),
        "nginx log: {logged}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// ringproxy's own headers (v1 and v2) toward HAProxy `accept-proxy`, which answers with the
/// source address it parsed.
#[test]
fn haproxy_behind_accepts_our_headers() {
    let (Some(curl), Some(haproxy_bin)) = (tool("curl", "curl"), tool("haproxy", "haproxy")) else {
        return;
    };
    let dir = scratch("behind");
    let port = free_port();
    let _haproxy = haproxy(
        &haproxy_bin,
        &dir,
        &format!(
            "global\n  maxconn 100\ndefaults\n  mode http\n  timeout connect 2s\n  \
             timeout client 5s\n  timeout server 5s\n\
             frontend web\n  bind 127.0.0.1:{port} accept-proxy\n  \
             http-request return status 200 content-type text/plain lf-string \"src=%[src]\\n\"\n"
        ),
        port,
    );
    for version in ["v1", "v2"] {
        let proxy = Proxy::start(&accepting_config(
            format!("127.0.0.1:{port}").parse().expect("addr"),
            "",
            &format!("send_proxy = \"{version}\""),
        ));
        let body = curl_from(&curl, "127.0.0.7", &format!("http://{}/", proxy.addr()));
        assert_eq!(
            body.trim(),
            "src=127.0.0.7",
            "HAProxy accept-proxy parsed our {version} header"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}
