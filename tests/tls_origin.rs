//! TLS toward servers (`[pool.tls]`) end to end: certificates made here with rcgen, real
//! clients (curl, and plain or rustls clients in the test) and real TLS servers (nginx, and
//! rustls servers in the test) on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::admin;
use common::pki::Pki;
use common::{Behaviour, Proxy, TestServer, tool, wait_for};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// What a TLS test server does once its handshake is done.
#[derive(Clone, Copy)]
enum Mode {
    /// Writes `sni=<name> alpn=<protocol> client=<CN or ->\n`, then echoes.
    GreetThenEcho,
    /// Reads until the peer ends; answers the byte count if it ended with close_notify, else
    /// `no close_notify`.
    CountUntilCloseNotify,
}

/// A rustls server on loopback, one thread per connection; stops on drop.
struct TlsServer {
    addr: SocketAddr,
    handshakes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect(self.addr);
    }
}

fn server_config(pki: &Pki, stem: &str, client_ca: bool) -> Arc<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(pki.path(&format!("{stem}.pem")))
            .expect("cert")
            .map(|c| c.expect("cert"))
            .collect();
    let key = PrivateKeyDer::from_pem_file(pki.path(&format!("{stem}.key"))).expect("key");
    let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .expect("versions");
    let builder = if client_ca {
        let mut roots = rustls::RootCertStore::empty();
        for ca in CertificateDer::pem_file_iter(pki.path("ca.pem")).expect("ca") {
            roots.add(ca.expect("ca")).expect("root");
        }
        builder.with_client_cert_verifier(
            rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .expect("verifier"),
        )
    } else {
        builder.with_no_client_auth()
    };
    let mut config = builder.with_single_cert(chain, key).expect("server config");
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Arc::new(config)
}

fn tls_server(config: Arc<rustls::ServerConfig>, mode: Mode) -> TlsServer {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = Arc::new(AtomicBool::new(false));
    let handshakes = Arc::new(AtomicU64::new(0));
    let (stop_flag, count) = (Arc::clone(&stop), Arc::clone(&handshakes));
    thread::spawn(move || {
        for stream in listener.incoming() {
            if stop_flag.load(Ordering::SeqCst) {
                break;
            }
            let Ok(stream) = stream else { continue };
            let (config, count) = (Arc::clone(&config), Arc::clone(&count));
            thread::spawn(move || serve(stream, config, mode, &count));
        }
    });
    TlsServer {
        addr,
        handshakes,
        stop,
    }
}

fn serve(tcp: TcpStream, config: Arc<rustls::ServerConfig>, mode: Mode, count: &AtomicU64) {
    let _ = tcp.set_read_timeout(Some(Duration::from_secs(20)));
    let Ok(connection) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(connection, tcp);
    while tls.conn.is_handshaking() {
        if tls.conn.complete_io(&mut tls.sock).is_err() {
            return;
        }
    }
    count.fetch_add(1, Ordering::SeqCst);
    let mut chunk = vec![0u8; 64 * 1024];
    match mode {
        Mode::GreetThenEcho => {
            let client = tls
                .conn
                .peer_certificates()
                .and_then(|chain| chain.first().cloned())
                .map_or("-".to_string(), |_| "yes".to_string());
            let greeting = format!(
                "sni={} alpn={} client={client}\n",
                tls.conn.server_name().unwrap_or("-"),
                tls.conn
                    .alpn_protocol()
                    .map_or("-".to_string(), |p| String::from_utf8_lossy(p).into_owned()),
            );
            if tls.write_all(greeting.as_bytes()).is_err() {
                return;
            }
            loop {
                match tls.read(&mut chunk) {
                    Ok(0) | Err(_) => break,
                    Ok(count) => {
                        if tls.write_all(&chunk[..count]).is_err() {
                            return;
                        }
                    }
                }
            }
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
        Mode::CountUntilCloseNotify => {
            let mut total = 0u64;
            let answer = loop {
                match tls.read(&mut chunk) {
                    Ok(0) => break format!("{total}\n"),
                    Ok(count) => total += count as u64,
                    Err(_) => break "no close_notify\n".to_string(),
                }
            };
            let _ = tls.write_all(answer.as_bytes());
            tls.conn.send_close_notify();
            let _ = tls.flush();
        }
    }
}

/// The test PKI: `app` (app.internal), `other` (other.internal, same CA), `proxy-client`.
fn origin_pki() -> Pki {
    let pki = Pki::new("internal CA");
    pki.issue("app", &["app.internal", "127.0.0.1"], false);
    pki.issue("other", &["other.internal"], false);
    pki.issue("proxy-client", &["proxy-client"], false);
    pki
}

fn pool_tls(pki: &Pki, extra: &str) -> String {
    format!(
        "[pool.tls]\nca = \"{}\"\nserver_name = \"app.internal\"\n{extra}\n",
        pki.path("ca.pem").display()
    )
}

fn proxy_to(servers: &[SocketAddr], pool_keys: &str, tables: &str) -> Proxy {
    let list: Vec<String> = servers
        .iter()
        .map(|addr| format!("{{ addr = \"{addr}\" }}"))
        .collect();
    Proxy::start(&format!(
        "[runtime]\nshards = 1\n[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"front\"\n\
         bind = \"127.0.0.1:0\"\npool = \"app\"\n\n[[pool]]\nname = \"app\"\n{pool_keys}\n\
         servers = [ {} ]\n{tables}",
        list.join(", ")
    ))
}

fn metric(proxy: &Proxy, name: &str, labels: &str) -> f64 {
    let text = admin::get(proxy.admin(), "/metrics").body;
    text.lines()
        .filter(|line| line.starts_with(name) && line.contains(labels))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
}

fn read_line(stream: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while stream.read(&mut byte).map(|n| n == 1).unwrap_or(false) {
        if byte[0] == b'\n' {
            break;
        }
        line.push(byte[0]);
    }
    String::from_utf8_lossy(&line).into_owned()
}

#[test]
fn plain_clients_to_a_verified_tls_server_every_byte_and_close_notify() {
    let pki = origin_pki();
    let echo = tls_server(server_config(&pki, "app", false), Mode::GreetThenEcho);
    let proxy = proxy_to(&[echo.addr], "", &pool_tls(&pki, "alpn = [\"h2\"]"));
    let mut client = connect(proxy.addr());
    assert_eq!(
        read_line(&mut client),
        "sni=app.internal alpn=h2 client=-",
        "the server_name as SNI, the pool's ALPN, no client certificate"
    );
    // 8 MiB both ways, in order.
    let sent: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i * 13 + i / 509) as u8)
        .collect();
    let mut writer = client.try_clone().expect("clone");
    let to_send = sent.clone();
    let writing = thread::spawn(move || {
        for chunk in to_send.chunks(100_000) {
            writer.write_all(chunk).expect("write");
        }
    });
    let mut received = vec![0u8; sent.len()];
    client.read_exact(&mut received).expect("the echo");
    writing.join().expect("writer");
    assert!(received == sent, "the echo differs");
    drop(client);

    // The client's FIN reaches the server as close_notify (then FIN), its answer comes back.
    let counter = tls_server(
        server_config(&pki, "app", false),
        Mode::CountUntilCloseNotify,
    );
    let proxy = proxy_to(&[counter.addr], "", &pool_tls(&pki, ""));
    let mut client = connect(proxy.addr());
    client.write_all(&vec![b'z'; 1_000_000]).expect("write");
    client.shutdown(std::net::Shutdown::Write).expect("FIN");
    let mut answer = String::new();
    client.read_to_string(&mut answer).expect("answer then FIN");
    assert_eq!(answer, "1000000\n");
    assert!(wait_for(Duration::from_secs(3), || {
        metric(&proxy, "ringproxy_connections_active", "listener=\"front\"") == 0.0
    }));
}

#[test]
fn a_server_with_the_wrong_name_fails_over_with_no_client_failure() {
    let pki = origin_pki();
    let wrong = tls_server(server_config(&pki, "other", false), Mode::GreetThenEcho);
    let good = tls_server(server_config(&pki, "app", false), Mode::GreetThenEcho);
    // Passive health off (max_fails = 0): every connection that lands on the wrong server first
    // has to fail over.
    let proxy = proxy_to(
        &[wrong.addr, good.addr],
        "balance = \"round_robin\"\nretries = 1\nmax_fails = 0",
        &pool_tls(&pki, ""),
    );
    for round in 0..20 {
        let mut client = connect(proxy.addr());
        client.write_all(b"early bytes\n").expect("write");
        assert_eq!(
            read_line(&mut client),
            "sni=app.internal alpn=- client=-",
            "round {round}"
        );
        assert_eq!(
            read_line(&mut client),
            "early bytes",
            "the bytes sent during the failed handshake, once"
        );
    }
    assert_eq!(wrong.handshakes.load(Ordering::SeqCst), 0);
    assert_eq!(good.handshakes.load(Ordering::SeqCst), 20);
    let wrong_name = wrong.addr.to_string();
    assert!(wait_for(Duration::from_secs(3), || {
        metric(
            &proxy,
            "ringproxy_server_connect_errors_total",
            &format!("server=\"{wrong_name}\",kind=\"tls\""),
        ) >= 10.0
    }));
    if let Some(promtool) = tool("promtool", "prometheus") {
        common::promtool_check(&promtool, &admin::get(proxy.admin(), "/metrics").body);
    }
}

#[test]
fn silent_and_closing_servers_fail_over_within_connect_timeout() {
    let pki = origin_pki();
    let silent = TestServer::start(Behaviour::Silent);
    let closing = TestServer::start(Behaviour::ResetAfterRead);
    let good = tls_server(server_config(&pki, "app", false), Mode::GreetThenEcho);
    let proxy = proxy_to(
        &[silent.addr, closing.addr, good.addr],
        "balance = \"round_robin\"\nretries = 2\nmax_fails = 0\nconnect_timeout = \"500ms\"",
        &pool_tls(&pki, ""),
    );
    for _ in 0..6 {
        let started = Instant::now();
        let mut client = connect(proxy.addr());
        assert_eq!(read_line(&mut client), "sni=app.internal alpn=- client=-");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    assert!(wait_for(Duration::from_secs(3), || {
        metric(
            &proxy,
            "ringproxy_server_connect_errors_total",
            &format!("server=\"{}\",kind=\"timeout\"", silent.addr),
        ) >= 1.0
            && metric(
                &proxy,
                "ringproxy_server_connect_errors_total",
                &format!("server=\"{}\",kind=\"tls\"", closing.addr),
            ) >= 1.0
    }));
    assert!(wait_for(Duration::from_secs(3), || {
        metric(&proxy, "ringproxy_connections_active", "listener=\"front\"") == 0.0
    }));
}

#[test]
fn untrusted_servers_refuse_every_client_and_verify_false_accepts_them() {
    let pki = origin_pki();
    let stranger = Pki::new("another CA");
    let server = tls_server(server_config(&pki, "app", false), Mode::GreetThenEcho);
    let untrusting = format!(
        "[pool.tls]\nca = \"{}\"\nserver_name = \"app.internal\"\n",
        stranger.path("ca.pem").display()
    );
    let proxy = proxy_to(&[server.addr], "retries = 0", &untrusting);
    let mut client = connect(proxy.addr());
    let mut answer = Vec::new();
    let _ = client.read_to_end(&mut answer);
    assert!(answer.is_empty(), "no byte from an untrusted server");
    assert!(wait_for(Duration::from_secs(3), || {
        metric(
            &proxy,
            "ringproxy_server_connect_errors_total",
            "kind=\"tls\"",
        ) == 1.0
            && metric(
                &proxy,
                "ringproxy_sessions_closed_total",
                "reason=\"connect_failed\"",
            ) == 1.0
    }));
    drop(proxy);
    // verify = false: any certificate (the handshake's signatures still checked).
    let proxy = proxy_to(&[server.addr], "", "[pool.tls]\nverify = false\n");
    let mut client = connect(proxy.addr());
    // No server_name: the address is used (no SNI is sent for an address).
    assert_eq!(read_line(&mut client), "sni=- alpn=- client=-");
    drop(proxy);
    // No server_name, verified: the certificate must name the address (this one does).
    let by_address = format!("[pool.tls]\nca = \"{}\"\n", pki.path("ca.pem").display());
    let proxy = proxy_to(&[server.addr], "", &by_address);
    let mut client = connect(proxy.addr());
    assert_eq!(read_line(&mut client), "sni=- alpn=- client=-");
}

#[test]
fn mutual_tls_to_servers_that_require_a_client_certificate() {
    let pki = origin_pki();
    let strict = tls_server(server_config(&pki, "app", true), Mode::GreetThenEcho);
    let with_certificate = pool_tls(
        &pki,
        &format!(
            "client_cert = \"{}\"\nclient_key = \"{}\"",
            pki.path("proxy-client.pem").display(),
            pki.path("proxy-client.key").display()
        ),
    );
    let proxy = proxy_to(&[strict.addr], "", &with_certificate);
    let mut client = connect(proxy.addr());
    assert_eq!(read_line(&mut client), "sni=app.internal alpn=- client=yes");
    let status = admin::status(proxy.admin());
    let tls = &status["pools"][0]["tls"];
    assert_eq!(tls["server_name"], "app.internal", "{status}");
    assert_eq!(tls["verify"], true);
    assert!(tls["client_certificate"]["not_after"].as_i64() > Some(1_700_000_000));
    client.write_all(b"ping\n").expect("write");
    assert_eq!(read_line(&mut client), "ping");
}

#[test]
fn terminated_then_reencrypted_with_sniffed_bytes_inside() {
    let pki = origin_pki();
    pki.issue("front", &["front.example.com"], false);
    let echo = tls_server(server_config(&pki, "app", false), Mode::GreetThenEcho);
    let list = format!("{{ addr = \"{}\" }}", echo.addr);
    let proxy = Proxy::start(&format!(
        "[runtime]\nshards = 1\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\
         [listener.tls]\ncertificates = [ {{ cert = \"{}\", key = \"{}\" }} ]\nalpn = [\"h2\"]\n\n\
         [[listener]]\nname = \"sniffing\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\
         routes = [ {{ protocol = \"http\", pool = \"app\" }} ]\n\n\
         [[pool]]\nname = \"app\"\nservers = [ {list} ]\n{}",
        pki.path("front.pem").display(),
        pki.path("front.key").display(),
        pool_tls(&pki, "alpn = [\"h2\"]"),
    ));
    let address = |name: &str| proxy.listeners[name];
    // TLS in, TLS out: a rustls client, ALPN h2 both ways, 2 MiB echoed.
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(pki.path("ca.pem")).expect("ca") {
        roots.add(ca.expect("ca")).expect("root");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let tcp = connect(address("tls"));
    let connection = rustls::ClientConnection::new(
        Arc::new(config),
        "front.example.com".try_into().expect("name"),
    )
    .expect("client");
    let mut client = rustls::StreamOwned::new(connection, tcp);
    let mut greeting = [0u8; 34];
    client.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting, b"sni=app.internal alpn=h2 client=-\n");
    let payload: Vec<u8> = (0..2 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let mut echoed = Vec::with_capacity(payload.len());
    let mut chunk = vec![0u8; 64 * 1024];
    let mut offset = 0;
    while echoed.len() < payload.len() {
        if offset < payload.len() {
            let end = (offset + 128 * 1024).min(payload.len());
            client.write_all(&payload[offset..end]).expect("write");
            client.flush().expect("flush");
            offset = end;
        }
        while echoed.len() < offset {
            let count = client.read(&mut chunk).expect("echo");
            assert!(count > 0, "early end after {} bytes", echoed.len());
            echoed.extend_from_slice(&chunk[..count]);
        }
    }
    let all = echoed;
    assert!(all == payload, "the echo through both TLS sessions differs");
    drop(client);

    // Plain HTTP sniffed on the other listener: the sniffed bytes go inside TLS, first.
    let mut client = connect(address("sniffing"));
    client
        .write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("request");
    assert_eq!(read_line(&mut client), "sni=app.internal alpn=h2 client=-");
    assert_eq!(read_line(&mut client), "GET / HTTP/1.1\r");
}

/// nginx as the TLS backend: mTLS (`ssl_verify_client on`), a wrong-name server failed over,
/// TLS health checks, and the PROXY header in the clear before the handshake.
#[test]
fn nginx_backends_with_mutual_tls_failover_health_checks_and_proxy_protocol() {
    let (Some(curl), Some(nginx)) = (tool("curl", "curl"), tool("nginx", "nginx")) else {
        return;
    };
    let pki = origin_pki();
    let dir = tempfile::tempdir().expect("nginx dir");
    let (good, wrong, proxied) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let d = dir.path().display();
    let p = |file: &str| pki.path(file).display().to_string();
    std::fs::write(
        dir.path().join("nginx.conf"),
        format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\nhttp {{ access_log off;\n\
             server {{ listen 127.0.0.1:{good} ssl; ssl_certificate {app}; ssl_certificate_key {app_key};\n\
               ssl_client_certificate {ca}; ssl_verify_client on;\n\
               location / {{ return 200 \"good $ssl_client_s_dn\\n\"; }} }}\n\
             server {{ listen 127.0.0.1:{wrong} ssl; ssl_certificate {other}; ssl_certificate_key {other_key};\n\
               location / {{ return 200 \"wrong\\n\"; }} }}\n\
             server {{ listen 127.0.0.1:{proxied} ssl proxy_protocol; ssl_certificate {app}; ssl_certificate_key {app_key};\n\
               ssl_client_certificate {ca}; ssl_verify_client on;\n\
               location / {{ return 200 \"from $proxy_protocol_addr\\n\"; }} }} }}\n",
            app = p("app.pem"),
            app_key = p("app.key"),
            other = p("other.pem"),
            other_key = p("other.key"),
            ca = p("ca.pem"),
        ),
    )
    .expect("nginx.conf");
    let _nginx = common::start_nginx(&nginx, dir.path(), &[good, wrong, proxied]);
    let client_keys = format!(
        "client_cert = \"{}\"\nclient_key = \"{}\"",
        p("proxy-client.pem"),
        p("proxy-client.key")
    );
    let tls = pool_tls(&pki, &client_keys);
    let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
    let proxy = Proxy::start(&format!(
        "[runtime]\nshards = 1\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"web\"\nbind = \"127.0.0.1:0\"\npool = \"web\"\n\n\
         [[listener]]\nname = \"proxied\"\nbind = \"127.0.0.1:0\"\npool = \"proxied\"\n\n\
         [[listener]]\nname = \"behind\"\nbind = \"127.0.0.1:0\"\npool = \"failover\"\n\
         proxy_protocol = \"required\"\ntrusted_proxies = [\"127.0.0.1\"]\n\n\
         [[pool]]\nname = \"web\"\nbalance = \"round_robin\"\nretries = 1\nmax_fails = 0\n\
         servers = [ {{ addr = \"{}\", name = \"wrong\" }}, {{ addr = \"{}\", name = \"good\" }} ]\n\
         [pool.health]\nkind = \"http\"\npath = \"/\"\ninterval = \"300ms\"\ntimeout = \"300ms\"\nstart = \"up\"\n{tls}\n\
         [[pool]]\nname = \"proxied\"\nsend_proxy = \"v1\"\nservers = [ {{ addr = \"{}\" }} ]\n{tls}\n\
         [[pool]]\nname = \"failover\"\nsend_proxy = \"v1\"\nbalance = \"round_robin\"\nmax_fails = 0\n\
         servers = [ {{ addr = \"{}\" }}, {{ addr = \"{}\" }} ]\n{tls}",
        addr(wrong),
        addr(good),
        addr(proxied),
        addr(wrong),
        addr(proxied),
    ));
    let listener = |name: &str| proxy.listeners[name].port();
    let fetch = |port: u16| {
        let output = Command::new(&curl)
            .args(["-sS", "--fail", "--max-time", "10"])
            .arg(format!("http://127.0.0.1:{port}/"))
            .output()
            .expect("curl");
        assert!(
            output.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    // Before the checks mark it down, connections that pick the wrong server fail over.
    for _ in 0..10 {
        assert_eq!(fetch(listener("web")), "good CN=proxy-client\n");
    }
    // The TLS health check finds the wrong name, and the mTLS server healthy.
    assert!(wait_for(Duration::from_secs(10), || {
        admin::server_state(proxy.admin(), "web", "wrong") == "down"
            && admin::server_state(proxy.admin(), "web", "good") == "up"
    }));
    let checked = admin::server_in(&admin::status(proxy.admin()), "web", "wrong")
        .map(|server| server.to_string())
        .unwrap_or_default();
    assert!(checked.contains("TLS handshake"), "{checked}");
    assert!(
        metric(
            &proxy,
            "ringproxy_server_connect_errors_total",
            "server=\"wrong\",kind=\"tls\""
        ) >= 1.0
    );
    // The PROXY header goes in the clear, before the handshake nginx expects after it.
    assert_eq!(fetch(listener("proxied")), "from 127.0.0.1\n");
    // Behind a load balancer: after a failed handshake with the first server, the next one
    // still hears the client's address the balancer's header carried.
    for _ in 0..4 {
        let mut client = connect(proxy.listeners["behind"]);
        client
            .write_all(
                b"PROXY TCP4 10.9.8.7 127.0.0.1 5555 80\r\n\
                  GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .expect("request");
        let mut answer = String::new();
        client.read_to_string(&mut answer).expect("answer");
        assert!(answer.ends_with("from 10.9.8.7\n"), "{answer}");
    }
    // Counted by kind in /status too (published within a second).
    assert!(wait_for(Duration::from_secs(3), || {
        let status = admin::status(proxy.admin());
        admin::server_in(&status, "failover", &addr(wrong).to_string())
            .and_then(|server| server["connect_errors"]["tls"].as_u64())
            >= Some(2)
    }));
}

#[test]
fn sessions_toward_an_nginx_server_are_resumed_unless_session_reuse_is_off() {
    let (Some(curl), Some(nginx)) = (tool("curl", "curl"), tool("nginx", "nginx")) else {
        return;
    };
    let pki = origin_pki();
    let dir = tempfile::tempdir().expect("nginx dir");
    let (tls12, tls13, other13) = (
        common::free_port(),
        common::free_port(),
        common::free_port(),
    );
    let d = dir.path().display();
    let server = |port: u16, protocol: &str| {
        format!(
            "server {{ listen 127.0.0.1:{port} ssl; ssl_protocols {protocol};\n\
               ssl_certificate {cert}; ssl_certificate_key {key};\n\
               location / {{ return 200 \"reused=$ssl_session_reused $ssl_protocol $ssl_cipher\\n\"; }} }}\n",
            cert = pki.path("app.pem").display(),
            key = pki.path("app.key").display(),
        )
    };
    std::fs::write(
        dir.path().join("nginx.conf"),
        format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
             events {{ worker_connections 64; }}\nhttp {{ access_log off;\n{}{}}}\n",
            server(tls12, "TLSv1.2"),
            server(tls13, "TLSv1.3") + &server(other13, "TLSv1.3"),
        ),
    )
    .expect("nginx.conf");
    let _nginx = common::start_nginx(&nginx, dir.path(), &[tls12, tls13, other13]);
    let pool = |name: &str, ports: &[u16], extra: &str| {
        let servers: Vec<String> = ports
            .iter()
            .map(|port| format!("{{ addr = \"127.0.0.1:{port}\" }}"))
            .collect();
        format!(
            "[[listener]]\nname = \"{name}\"\nbind = \"127.0.0.1:0\"\npool = \"{name}\"\n\
             [[pool]]\nname = \"{name}\"\nbalance = \"round_robin\"\nservers = [ {} ]\n{}\n",
            servers.join(", "),
            pool_tls(&pki, extra)
        )
    };
    let proxy = Proxy::start(&format!(
        "[runtime]\nshards = 1\n[admin]\nbind = \"127.0.0.1:0\"\n\n{}{}{}{}",
        pool("reuse12", &[tls12], ""),
        pool("reuse13", &[tls13], ""),
        // Two servers with one server_name and their own ticket keys (one SSL context each).
        pool("pair", &[tls13, other13], ""),
        pool(
            "fresh",
            &[tls13],
            "session_reuse = false\ncipher_suites = [\"TLS13_AES_256_GCM_SHA384\"]"
        ),
    ));
    let fetch = |listener: &str| {
        let output = Command::new(&curl)
            .args(["-sS", "--fail", "--max-time", "10"])
            .arg(format!(
                "http://127.0.0.1:{}/",
                proxy.listeners[listener].port()
            ))
            .output()
            .expect("curl");
        assert!(
            output.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8_lossy(&output.stdout).into_owned()
    };
    // A new server connection per client: the first handshake is full, the next ones resume
    // (TLS 1.3: each ticket is used once and the server sends a new one each time). nginx
    // takes the client's order of suites: AES-128-GCM first by default.
    for (listener, session) in [
        ("reuse12", "TLSv1.2 ECDHE-ECDSA-AES128-GCM-SHA256"),
        ("reuse13", "TLSv1.3 TLS_AES_128_GCM_SHA256"),
    ] {
        assert_eq!(fetch(listener), format!("reused=. {session}\n"));
        for _ in 0..6 {
            assert_eq!(fetch(listener), format!("reused=r {session}\n"));
        }
    }
    // Round robin over two servers: each resumes with its own tickets, never the other's.
    let pair: Vec<String> = (0..8).map(|_| fetch("pair")).collect();
    let resumed = pair
        .iter()
        .filter(|answer| answer.starts_with("reused=r"))
        .count();
    assert!(resumed >= 6, "{pair:?}");
    for _ in 0..3 {
        assert_eq!(fetch("fresh"), "reused=. TLSv1.3 TLS_AES_256_GCM_SHA384\n");
    }
    let status = admin::status(proxy.admin());
    let pools = status["pools"].as_array().cloned().unwrap_or_default();
    let reuse_of = |name: &str| {
        pools
            .iter()
            .find(|pool| pool["name"] == name)
            .and_then(|pool| pool["tls"]["session_reuse"].as_bool())
    };
    assert_eq!(reuse_of("reuse13"), Some(true), "{status}");
    assert_eq!(reuse_of("fresh"), Some(false), "{status}");
}

#[test]
fn bad_pool_tls_settings_are_refused_with_the_reason() {
    let pki = origin_pki();
    let cases = [
        (
            format!("[pool.tls]\nca = \"{}\"", pki.path("missing.pem").display()),
            "missing.pem",
        ),
        (
            format!(
                "[pool.tls]\nca = \"{}\"\nclient_cert = \"{}\"",
                pki.path("ca.pem").display(),
                pki.path("proxy-client.pem").display()
            ),
            "client_cert and client_key go together",
        ),
        (
            format!(
                "[pool.tls]\nca = \"{}\"\nclient_cert = \"{}\"\nclient_key = \"{}\"",
                pki.path("ca.pem").display(),
                pki.path("proxy-client.pem").display(),
                pki.path("app.key").display()
            ),
            "does not match",
        ),
        (
            format!(
                "[pool.tls]\nca = \"{}\"\nserver_name = \"not a name\"",
                pki.path("ca.pem").display()
            ),
            "not a DNS name",
        ),
        (
            "[pool.tls]\nverify = \"no\"".to_string(),
            "expected a boolean",
        ),
    ];
    for (table, reason) in cases {
        let config = format!(
            "[[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\n\
             [[pool]]\nname = \"app\"\nservers = [ {{ addr = \"127.0.0.1:9\" }} ]\n{table}\n"
        );
        let path = pki.path("bad.toml");
        std::fs::write(&path, &config).expect("config");
        let output = Command::new(env!("CARGO_BIN_EXE_ringproxy"))
            .arg("check")
            .arg("--config")
            .arg(&path)
            .output()
            .expect("ringproxy check");
        let text = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{table}: {text}");
        assert!(text.contains(reason), "{table}: {text}");
    }
    // A good table prints back and parses again.
    let good = format!(
        "[[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\n\
         [[pool]]\nname = \"app\"\nservers = [ {{ addr = \"127.0.0.1:9\" }} ]\n{}",
        pool_tls(&pki, "alpn = [\"h2\"]\ncheck_tls = false")
    );
    let path = pki.path("good.toml");
    std::fs::write(&path, &good).expect("config");
    let output = Command::new(env!("CARGO_BIN_EXE_ringproxy"))
        .arg("check")
        .arg("--config")
        .arg(&path)
        .output()
        .expect("ringproxy check");
    let printed = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(output.status.success(), "{printed}");
    assert!(
        printed.contains("server_name = \"app.internal\""),
        "{printed}"
    );
    assert!(printed.contains("check_tls = false"), "{printed}");
    let again = pki.path("again.toml");
    std::fs::write(&again, &printed).expect("printed");
    let reparsed = Command::new(env!("CARGO_BIN_EXE_ringproxy"))
        .arg("check")
        .arg("--config")
        .arg(&again)
        .output()
        .expect("check again");
    assert!(reparsed.status.success());
    assert_eq!(String::from_utf8_lossy(&reparsed.stdout), printed);
}
