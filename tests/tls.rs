//! TLS termination end to end: certificates made here with rcgen, real clients (openssl
//! s_client, curl, and a rustls client in the test) and real servers (nginx, the echo and
//! counting test servers) on loopback.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::admin;
use common::pki::Pki;
use common::{Behaviour, Proxy, TestServer, tool, wait_for};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// A rustls client config trusting `ca`, offering `alpn`, with an optional client certificate.
fn client_config(
    ca: &Path,
    alpn: &[&str],
    client: Option<(&Path, &Path)>,
) -> Arc<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_file_iter(ca).expect("CA file") {
        roots
            .add(certificate.expect("CA certificate"))
            .expect("root");
    }
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match client {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                CertificateDer::pem_file_iter(cert)
                    .expect("client cert")
                    .map(|c| c.expect("client cert"))
                    .collect(),
                PrivateKeyDer::from_pem_file(key).expect("client key"),
            )
            .expect("client auth"),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    // Every connection a full handshake: a resumed one shows the certificate of its first.
    config.resumption = rustls::client::Resumption::disabled();
    Arc::new(config)
}

type TlsClient = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// Connects and completes the handshake (an error if the proxy refuses it).
fn tls_connect(
    addr: SocketAddr,
    name: &str,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsClient> {
    tls_over(TcpStream::connect(addr)?, name, config)
}

/// Completes a handshake over `tcp`.
fn tls_over(
    tcp: TcpStream,
    name: &str,
    config: &Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsClient> {
    tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
    tcp.set_write_timeout(Some(Duration::from_secs(10)))?;
    let connection = rustls::ClientConnection::new(
        Arc::clone(config),
        ServerName::try_from(name.to_string()).expect("server name"),
    )
    .map_err(std::io::Error::other)?;
    let mut stream = rustls::StreamOwned::new(connection, tcp);
    while stream.conn.is_handshaking() {
        stream
            .conn
            .complete_io(&mut stream.sock)
            .map_err(std::io::Error::other)?;
    }
    Ok(stream)
}

fn tls_block(pki: &Pki, extra: &str) -> String {
    format!(
        "[listener.tls]\ncertificates = [\n  {{ cert = \"{}\", key = \"{}\" }},\n  {{ cert = \"{}\", key = \"{}\" }},\n]\n{extra}\n",
        pki.path("api.pem").display(),
        pki.path("api.key").display(),
        pki.path("wild.pem").display(),
        pki.path("wild.key").display(),
    )
}

fn tls_proxy(pki: &Pki, shards: u32, server: SocketAddr, extra: &str) -> Proxy {
    let config = format!(
        "[runtime]\nshards = {shards}\n[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n{}\n[[pool]]\nname = \"app\"\nservers = [ {{ addr = \"{server}\" }} ]\n",
        tls_block(pki, extra)
    );
    Proxy::start(&config)
}

fn standard_pki() -> Pki {
    let pki = Pki::new("ringproxy test CA");
    pki.issue("api", &["api.example.com"], false);
    pki.issue("wild", &["*.example.com"], true);
    pki
}

fn metric(proxy: &Proxy, name: &str, labels: &str) -> f64 {
    let text = admin::get(proxy.admin(), "/metrics").body;
    text.lines()
        .filter(|line| line.starts_with(name) && line.contains(labels))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `openssl s_client -brief` against the proxy: its summary lines (stderr and stdout).
fn s_client(openssl: &Path, addr: SocketAddr, args: &[&str]) -> String {
    s_client_with(openssl, addr, &[&["-brief"][..], args].concat())
}

/// `openssl s_client` with `args`; its input ends after 300 ms (so TLS 1.3 session tickets,
/// sent after the handshake, arrive first).
fn s_client_with(openssl: &Path, addr: SocketAddr, args: &[&str]) -> String {
    let mut child = Command::new(openssl)
        .arg("s_client")
        .arg("-connect")
        .arg(addr.to_string())
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl s_client");
    std::thread::sleep(Duration::from_millis(300));
    drop(child.stdin.take());
    let output = child.wait_with_output().expect("openssl s_client");
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[test]
fn certificates_by_sni_default_alpn_and_versions_with_openssl() {
    let Some(openssl) = tool("openssl", "openssl") else {
        return;
    };
    let pki = standard_pki();
    let server = TestServer::start(Behaviour::Echo);
    let proxy = tls_proxy(&pki, 1, server.addr, "alpn = [\"h2\", \"http/1.1\"]");
    let addr = proxy.addr();
    let ca = pki.path("ca.pem");
    let ca = ca.to_str().expect("path");
    let exact = s_client(
        &openssl,
        addr,
        &["-servername", "api.example.com", "-CAfile", ca],
    );
    assert!(
        exact.contains("Peer certificate: CN = api.example.com"),
        "{exact}"
    );
    assert!(exact.contains("Verification: OK"), "{exact}");
    let wildcard = s_client(
        &openssl,
        addr,
        &["-servername", "db.example.com", "-CAfile", ca],
    );
    assert!(
        wildcard.contains("Peer certificate: CN = *.example.com"),
        "{wildcard}"
    );
    // A name no certificate has, and no name at all: the first certificate.
    let unknown = s_client(&openssl, addr, &["-servername", "other.test"]);
    assert!(
        unknown.contains("Peer certificate: CN = api.example.com"),
        "{unknown}"
    );
    let nameless = s_client(&openssl, addr, &["-noservername"]);
    assert!(
        nameless.contains("Peer certificate: CN = api.example.com"),
        "{nameless}"
    );
    let h2 = s_client_with(
        &openssl,
        addr,
        &["-servername", "api.example.com", "-alpn", "h2"],
    );
    assert!(h2.contains("ALPN protocol: h2"), "{h2}");
    assert!(wait_for(Duration::from_secs(3), || {
        metric(&proxy, "ringproxy_tls_alpn_total", "protocol=\"h2\"") == 1.0
    }));
    let tls12 = s_client(
        &openssl,
        addr,
        &["-servername", "api.example.com", "-tls1_2"],
    );
    assert!(tls12.contains("Protocol version: TLSv1.2"), "{tls12}");
    let tls13 = s_client(
        &openssl,
        addr,
        &["-servername", "api.example.com", "-tls1_3"],
    );
    assert!(tls13.contains("Protocol version: TLSv1.3"), "{tls13}");
    assert!(wait_for(Duration::from_secs(3), || {
        metric(&proxy, "ringproxy_tls_versions_total", "version=\"1.2\"") >= 1.0
            && metric(&proxy, "ringproxy_tls_handshakes_total", "result=\"full\"") >= 7.0
    }));
    assert!(
        metric(
            &proxy,
            "ringproxy_tls_certificate_expiry_timestamp_seconds",
            "certificate=\"*.example.com\""
        ) > 1.7e9
    );
    if let Some(promtool) = tool("promtool", "prometheus") {
        common::promtool_check(&promtool, &admin::get(proxy.admin(), "/metrics").body);
    }
    let status = admin::status(proxy.admin());
    let certificates = &status["listeners"][0]["tls"]["certificates"];
    assert_eq!(certificates[1]["names"][0], "*.example.com", "{status}");
}

#[test]
fn default_certificate_by_name_or_reject() {
    let Some(openssl) = tool("openssl", "openssl") else {
        return;
    };
    let pki = standard_pki();
    let server = TestServer::start(Behaviour::Echo);
    let proxy = tls_proxy(
        &pki,
        1,
        server.addr,
        "default_certificate = \"*.example.com\"",
    );
    let unknown = s_client(&openssl, proxy.addr(), &["-servername", "other.test"]);
    assert!(
        unknown.contains("Peer certificate: CN = *.example.com"),
        "{unknown}"
    );
    drop(proxy);
    let proxy = tls_proxy(&pki, 1, server.addr, "default_certificate = \"reject\"");
    let refused = s_client(&openssl, proxy.addr(), &["-servername", "other.test"]);
    assert!(!refused.contains("CONNECTION ESTABLISHED"), "{refused}");
    let known = s_client(&openssl, proxy.addr(), &["-servername", "api.example.com"]);
    assert!(known.contains("CONNECTION ESTABLISHED"), "{known}");
    assert!(wait_for(Duration::from_secs(3), || {
        metric(
            &proxy,
            "ringproxy_tls_handshake_failures_total",
            "reason=\"no_certificate\"",
        ) == 1.0
    }));
    // One from the first proxy's client, one from the known name: the refused never arrived.
    assert_eq!(
        server.accepted(),
        2,
        "the refused handshake never reached the server"
    );
}

#[test]
fn min_version_13_refuses_12() {
    let Some(openssl) = tool("openssl", "openssl") else {
        return;
    };
    let pki = standard_pki();
    let server = TestServer::start(Behaviour::Echo);
    let proxy = tls_proxy(&pki, 1, server.addr, "min_version = \"1.3\"");
    let old = s_client(
        &openssl,
        proxy.addr(),
        &["-servername", "api.example.com", "-tls1_2"],
    );
    assert!(!old.contains("CONNECTION ESTABLISHED"), "{old}");
    let new = s_client(
        &openssl,
        proxy.addr(),
        &["-servername", "api.example.com", "-tls1_3"],
    );
    assert!(new.contains("Protocol version: TLSv1.3"), "{new}");
    assert!(wait_for(Duration::from_secs(3), || {
        metric(
            &proxy,
            "ringproxy_tls_handshake_failures_total",
            "reason=\"incompatible\"",
        ) == 1.0
            && metric(
                &proxy,
                "ringproxy_connections_rejected_total",
                "reason=\"tls_handshake\"",
            ) == 1.0
    }));
}

/// curl through termination to nginx, then every byte of large transfers both ways, in order,
/// and the half-closes passed on as close_notify and FIN.
#[test]
fn curl_to_nginx_and_bulk_both_ways_through_termination() {
    let pki = standard_pki();
    if let (Some(curl), Some(nginx)) = (tool("curl", "curl"), tool("nginx", "nginx")) {
        let dir = tempfile::tempdir().expect("nginx dir");
        let port = common::free_port();
        let page = vec![b'x'; 3 * 1024 * 1024 + 17];
        std::fs::write(dir.path().join("big"), &page).expect("page");
        let d = dir.path().display();
        std::fs::write(
            dir.path().join("nginx.conf"),
            format!(
                "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/error.log;\n\
                 events {{ worker_connections 64; }}\nhttp {{ access_log off;\n\
                 server {{ listen 127.0.0.1:{port}; root {d};\n\
                 location = / {{ return 200 \"nginx page\\n\"; }} }} }}\n"
            ),
        )
        .expect("nginx.conf");
        let _nginx = common::start_nginx(&nginx, dir.path(), &[port]);
        let proxy = tls_proxy(
            &pki,
            1,
            SocketAddr::from(([127, 0, 0, 1], port)),
            "alpn = [\"http/1.1\"]",
        );
        let resolve = format!("api.example.com:{}:127.0.0.1", proxy.addr().port());
        let base = format!("https://api.example.com:{}", proxy.addr().port());
        let fetch = |path: &str| {
            Command::new(&curl)
                .args(["-sS", "--fail", "--cacert"])
                .arg(pki.path("ca.pem"))
                .args(["--resolve", &resolve])
                .arg(format!("{base}{path}"))
                .output()
                .expect("curl")
        };
        let answer = fetch("/");
        assert!(answer.status.success(), "{answer:?}");
        assert_eq!(answer.stdout, b"nginx page\n");
        let big = fetch("/big");
        assert!(
            big.status.success(),
            "curl: {}",
            String::from_utf8_lossy(&big.stderr)
        );
        assert!(
            big.stdout == page,
            "the 3 MiB file arrived changed ({} bytes)",
            big.stdout.len()
        );
    }

    // Both directions at once through an echo server: every byte back, in order.
    let echo = TestServer::start(Behaviour::Echo);
    let proxy = tls_proxy(&pki, 1, echo.addr, "");
    let config = client_config(&pki.path("ca.pem"), &[], None);
    let mut client = tls_connect(proxy.addr(), "api.example.com", &config).expect("handshake");
    let sent: Vec<u8> = (0..8 * 1024 * 1024u32)
        .map(|i| (i * 7 + i / 251) as u8)
        .collect();
    let mut received = Vec::with_capacity(sent.len());
    let mut chunk = vec![0u8; 64 * 1024];
    let mut offset = 0;
    // Alternate writes and reads so neither side's buffers fill.
    while received.len() < sent.len() {
        if offset < sent.len() {
            let end = (offset + 256 * 1024).min(sent.len());
            client.write_all(&sent[offset..end]).expect("write");
            client.flush().expect("flush");
            offset = end;
        }
        while received.len() < offset {
            let count = client.read(&mut chunk).expect("read echo");
            assert!(count > 0, "early end after {} bytes", received.len());
            received.extend_from_slice(&chunk[..count]);
        }
    }
    assert!(received == sent, "the echo differs");
    drop(client);

    // close_notify from the client reaches the server as a FIN; its answer comes back, then
    // close_notify and FIN.
    let counter = TestServer::start(Behaviour::CountUntilFin);
    let proxy = tls_proxy(&pki, 1, counter.addr, "");
    let mut client = tls_connect(proxy.addr(), "api.example.com", &config).expect("handshake");
    client.write_all(&vec![b'z'; 1_000_000]).expect("write");
    client.conn.send_close_notify();
    client.flush().expect("flush close_notify");
    let mut answer = String::new();
    client
        .read_to_string(&mut answer)
        .expect("the answer, then a clean close_notify");
    assert_eq!(answer, "1000000\n");
}

#[test]
fn mutual_tls_admits_the_ca_clients_and_refuses_others_with_an_alert() {
    let pki = standard_pki();
    let (client_cert, client_key) = pki.issue("client", &["client.example.com"], false);
    let stranger = Pki::new("another CA");
    let (other_cert, other_key) = stranger.issue("client", &["client.example.com"], false);
    let server = TestServer::start(Behaviour::Echo);
    let extra = format!(
        "client_ca = \"{}\"\nclient_auth = \"required\"",
        pki.path("ca.pem").display()
    );
    let proxy = tls_proxy(&pki, 1, server.addr, &extra);
    let ca = pki.path("ca.pem");

    let trusted = client_config(&ca, &[], Some((&client_cert, &client_key)));
    let mut client = tls_connect(proxy.addr(), "api.example.com", &trusted).expect("admitted");
    client.write_all(b"hello\n").expect("write");
    let mut echo = [0u8; 6];
    client.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"hello\n");
    drop(client);

    // TLS 1.3: the client finishes before the server checks its certificate, so the refusal
    // (an alert) arrives on the first read.
    for config in [
        client_config(&ca, &[], None),
        client_config(&ca, &[], Some((&other_cert, &other_key))),
    ] {
        let refused = tls_connect(proxy.addr(), "api.example.com", &config).and_then(|mut c| {
            c.write_all(b"hello\n")?;
            let mut byte = [0u8; 1];
            c.read(&mut byte)
        });
        let error = refused.expect_err("refused");
        assert!(
            error.to_string().contains("alert") || error.to_string().contains("Alert"),
            "not refused with an alert: {error}"
        );
    }
    assert!(wait_for(Duration::from_secs(3), || {
        metric(
            &proxy,
            "ringproxy_tls_handshake_failures_total",
            "reason=\"client_certificate\"",
        ) == 2.0
            && metric(
                &proxy,
                "ringproxy_connections_rejected_total",
                "reason=\"tls_handshake\"",
            ) == 2.0
    }));
    assert_eq!(
        server.accepted(),
        1,
        "refused clients never reach the server"
    );
}

/// Plain HTTP, garbage, truncated and mutated ClientHellos and silence: each is closed and
/// counted, none reaches the server, the proxy keeps serving and its sessions go back to zero.
#[test]
fn garbage_truncated_hellos_and_silence_are_closed_and_counted() {
    let pki = standard_pki();
    let server = TestServer::start(Behaviour::Echo);
    let proxy = tls_proxy(&pki, 1, server.addr, "handshake_timeout = \"1s\"");
    let addr = proxy.addr();

    let mut http = TcpStream::connect(addr).expect("connect");
    http.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    http.write_all(b"GET / HTTP/1.1\r\nHost: api.example.com\r\n\r\n")
        .expect("write");
    let mut answer = Vec::new();
    let _ = http.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"HTTP"),
        "a plain request got an HTTP answer"
    );

    // A real ClientHello, captured from a rustls client, then cut and mutated.
    let config = client_config(&pki.path("ca.pem"), &["h2"], None);
    let mut connection = rustls::ClientConnection::new(
        Arc::clone(&config),
        ServerName::try_from("api.example.com").expect("name"),
    )
    .expect("client");
    let mut hello = Vec::new();
    connection.write_tls(&mut hello).expect("hello");
    // 100,000 of them from two threads, each with its own generator.
    let rounds = 100_000;
    let workers: Vec<_> = (0..2u64)
        .map(|worker| {
            let hello = hello.clone();
            std::thread::spawn(move || {
                let mut seed = 0x2545_f491_4f6c_dd1du64 ^ (worker + 1).wrapping_mul(0x9e37_79b9);
                let mut random = move || {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed
                };
                for round in 0..rounds / 2 {
                    let mut bytes = hello.clone();
                    match round % 4 {
                        0 => bytes.truncate((random() as usize) % hello.len()),
                        1 => {
                            for _ in 0..1 + random() % 8 {
                                let at = (random() as usize) % bytes.len();
                                bytes[at] = random() as u8;
                            }
                        }
                        2 => bytes = (0..1 + random() % 600).map(|_| random() as u8).collect(),
                        _ => {
                            let at = (random() as usize) % bytes.len();
                            bytes.insert(at, random() as u8);
                        }
                    }
                    let Ok(mut stream) = TcpStream::connect(addr) else {
                        continue;
                    };
                    let _ = stream.write_all(&bytes);
                    let _ = stream.shutdown(std::net::Shutdown::Write);
                    // Most get an alert and a close; some (truncated) wait for the timeout.
                    if round % 997 == 0 {
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(3)));
                        let mut sink = Vec::new();
                        let _ = stream.read_to_end(&mut sink);
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("fuzzing client");
    }
    // Silence: cut by the handshake timeout.
    let started = Instant::now();
    let mut silent = TcpStream::connect(addr).expect("connect");
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    let closed = silent.read(&mut byte);
    assert!(
        matches!(closed, Ok(0)) || closed.is_err(),
        "the silent client was answered: {closed:?}"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(900) && waited < Duration::from_secs(3),
        "cut after {waited:?}, not the 1 s handshake timeout"
    );

    // Still serving, and every failed session is gone.
    let mut client = tls_connect(addr, "api.example.com", &config).expect("still serving");
    client.write_all(b"ping\n").expect("write");
    let mut echo = [0u8; 5];
    client.read_exact(&mut echo).expect("echo");
    drop(client);
    assert!(wait_for(Duration::from_secs(5), || {
        metric(&proxy, "ringproxy_connections_active", "listener=\"front\"") == 0.0
    }));
    let failures = metric(
        &proxy,
        "ringproxy_tls_handshake_failures_total",
        "listener=\"front\"",
    );
    assert!(
        failures >= rounds as f64 * 0.9,
        "{failures} failures counted of {rounds}"
    );
    assert!(
        metric(
            &proxy,
            "ringproxy_tls_handshake_failures_total",
            "reason=\"timeout\""
        ) >= 1.0
    );
    assert!(
        metric(
            &proxy,
            "ringproxy_tls_handshake_failures_total",
            "reason=\"protocol\""
        ) >= 1.0
    );
    assert_eq!(
        server.accepted(),
        1,
        "only the real client reached the server"
    );
    assert!(
        !proxy
            .logs()
            .iter()
            .any(|line| line.to_string().contains("panicked"))
    );
}

/// A ticket from one shard resumes on the other: openssl saves the session, then resumes it
/// over several new connections that the kernel spreads over both shards.
#[test]
fn resumption_by_ticket_across_shards() {
    let Some(openssl) = tool("openssl", "openssl") else {
        return;
    };
    let pki = standard_pki();
    let server = TestServer::start(Behaviour::Echo);
    let proxy = tls_proxy(&pki, 2, server.addr, "");
    let session = pki.path("session.pem");
    let session = session.to_str().expect("path");
    let first = s_client_with(
        &openssl,
        proxy.addr(),
        &["-servername", "api.example.com", "-sess_out", session],
    );
    assert!(first.contains("New, TLSv1.3"), "{first}");
    let mut resumed = 0;
    for _ in 0..8 {
        let again = s_client_with(
            &openssl,
            proxy.addr(),
            &["-servername", "api.example.com", "-sess_in", session],
        );
        if again.contains("Reused, TLSv1.3") {
            resumed += 1;
        }
    }
    assert_eq!(resumed, 8, "every resumption must work on either shard");
    assert!(wait_for(Duration::from_secs(3), || {
        metric(
            &proxy,
            "ringproxy_tls_handshakes_total",
            "result=\"resumed\"",
        ) == 8.0
    }));
}

/// A reload with a new certificate file serves it to new handshakes; a broken replacement is
/// refused and the running certificate stays.
#[test]
fn reload_rotates_the_certificate_and_refuses_a_broken_one() {
    let pki = standard_pki();
    let server = TestServer::start(Behaviour::Echo);
    let proxy = tls_proxy(&pki, 1, server.addr, "");
    let config = client_config(&pki.path("ca.pem"), &[], None);
    let leaf = |proxy: &Proxy| {
        let client = tls_connect(proxy.addr(), "api.example.com", &config).expect("handshake");
        client.conn.peer_certificates().expect("certificates")[0].to_vec()
    };
    let before = leaf(&proxy);
    let open = tls_connect(proxy.addr(), "api.example.com", &config).expect("open session");
    pki.issue("api", &["api.example.com"], true);
    proxy.signal(libc::SIGHUP);
    assert!(wait_for(Duration::from_secs(5), || {
        admin::status(proxy.admin())["reloads"]["success"] == 1
    }));
    let after = leaf(&proxy);
    assert_ne!(
        before, after,
        "the new certificate is served after the reload"
    );
    // The session opened before the reload still works.
    let mut open = open;
    open.write_all(b"still\n").expect("write");
    let mut echo = [0u8; 6];
    open.read_exact(&mut echo).expect("echo");

    std::fs::write(pki.path("api.key"), "-----BEGIN PRIVATE KEY-----\nbroken\n").expect("break");
    proxy.signal(libc::SIGHUP);
    assert!(wait_for(Duration::from_secs(5), || {
        admin::status(proxy.admin())["reloads"]["failure"] == 1
    }));
    let status = admin::status(proxy.admin());
    let error = status["last_reload"]["error"].to_string();
    assert!(
        error.contains("api.key"),
        "the error names the file: {error}"
    );
    assert_eq!(leaf(&proxy), after, "the running certificate stays");
}

/// At start, a key that does not match its certificate exits 2 naming both files.
#[test]
fn a_mismatched_key_stops_the_start() {
    let pki = standard_pki();
    let config = format!(
        "[[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n[listener.tls]\ncertificates = [ {{ cert = \"{}\", key = \"{}\" }} ]\n[[pool]]\nname = \"app\"\nservers = [ {{ addr = \"127.0.0.1:9\" }} ]\n",
        pki.path("api.pem").display(),
        pki.path("wild.key").display(),
    );
    let file = pki.path("bad.toml");
    std::fs::write(&file, config).expect("config");
    let output = Command::new(common::BIN)
        .args(["run", "--config"])
        .arg(&file)
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2), "{output:?}");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(
        text.contains("wild.key") && text.contains("api.pem"),
        "{text}"
    );
}

/// With `watch = true`, replacing the files is enough: new handshakes get the new certificate
/// within seconds, and a broken replacement keeps the running one.
#[test]
fn watched_files_rotate_without_a_reload_command() {
    let pki = standard_pki();
    let server = TestServer::start(Behaviour::Echo);
    let proxy = tls_proxy(&pki, 1, server.addr, "watch = true");
    let config = client_config(&pki.path("ca.pem"), &[], None);
    let leaf = |proxy: &Proxy| {
        let client = tls_connect(proxy.addr(), "api.example.com", &config).expect("handshake");
        client.conn.peer_certificates().expect("certificates")[0].to_vec()
    };
    let before = leaf(&proxy);
    let changed_at = Instant::now();
    pki.issue("api", &["api.example.com"], true);
    assert!(
        wait_for(Duration::from_secs(5), || leaf(&proxy) != before),
        "the new certificate was not served within 5 s"
    );
    eprintln!("new certificate served after {:?}", changed_at.elapsed());
    let after = leaf(&proxy);
    let failures = admin::status(proxy.admin())["reloads"]["failure"]
        .as_u64()
        .unwrap_or(0);
    std::fs::write(pki.path("api.key"), "-----BEGIN PRIVATE KEY-----\nbroken\n").expect("break");
    assert!(wait_for(Duration::from_secs(5), || {
        admin::status(proxy.admin())["reloads"]["failure"].as_u64() > Some(failures)
    }));
    assert_eq!(leaf(&proxy), after, "the running certificate stays");
}

const GRPC_SERVER: &str = r#"
import sys
from concurrent import futures
import grpc

def say(request, context):
    return b"echo:" + request

handler = grpc.method_handlers_generic_handler(
    "test.Echo", {"Say": grpc.unary_unary_rpc_method_handler(say)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
server.add_generic_rpc_handlers((handler,))
if len(sys.argv) > 2:
    # TLS: certificate chain and key files.
    credentials = grpc.ssl_server_credentials(
        [(open(sys.argv[2], "rb").read(), open(sys.argv[1], "rb").read())])
    port = server.add_secure_port("127.0.0.1:0", credentials)
else:
    port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
server.wait_for_termination()
"#;

const GRPC_CLIENT: &str = r#"
import sys
import grpc

port, ca = sys.argv[1], sys.argv[2]
credentials = grpc.ssl_channel_credentials(root_certificates=open(ca, "rb").read())
channel = grpc.secure_channel(
    "127.0.0.1:" + port, credentials,
    options=(("grpc.ssl_target_name_override", "api.example.com"),))
say = channel.unary_unary("/test.Echo/Say")
for i in range(3):
    print(say(b"hello %d" % i, timeout=10).decode())
"#;

/// A real gRPC call (Debian's python3-grpcio, generic handlers): the client speaks TLS with
/// ALPN h2 to the proxy, which relays the HTTP/2 bytes to an h2c grpcio server, then to a
/// grpcio server over TLS (re-encrypted, ALPN h2 toward it, its certificate verified).
#[test]
fn grpc_over_tls_to_an_h2c_server() {
    let python = Path::new("/usr/bin/python3");
    let has_grpc = python.is_file()
        && Command::new(python)
            .args(["-c", "import grpc"])
            .status()
            .is_ok_and(|status| status.success());
    if !has_grpc {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "python3-grpcio is missing; CI must install it"
        );
        eprintln!("SKIPPED: python3-grpcio is not installed (apt-get install python3-grpcio)");
        return;
    }
    let pki = standard_pki();
    let (grpc_cert, grpc_key) = pki.issue("grpc", &["grpc.internal"], false);
    std::fs::write(pki.path("server.py"), GRPC_SERVER).expect("server.py");
    std::fs::write(pki.path("client.py"), GRPC_CLIENT).expect("client.py");
    let start_server = |args: &[&Path]| {
        let mut child = Command::new(python)
            .arg(pki.path("server.py"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("grpc server");
        let stdout = child.stdout.take().expect("stdout");
        let server = common::Started {
            child,
            name: "grpc server",
        };
        let mut line = String::new();
        std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).expect("port");
        let port: u16 = line.trim().parse().expect("the server's port");
        (server, SocketAddr::from(([127, 0, 0, 1], port)))
    };
    let call = |proxy: &Proxy| {
        let output = Command::new(python)
            .arg(pki.path("client.py"))
            .arg(proxy.addr().port().to_string())
            .arg(pki.path("ca.pem"))
            .output()
            .expect("grpc client");
        assert!(
            output.status.success(),
            "the call failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout),
            "echo:hello 0\necho:hello 1\necho:hello 2\n"
        );
    };
    let (h2c, addr) = start_server(&[]);
    call(&tls_proxy(&pki, 1, addr, "alpn = [\"h2\"]"));
    drop(h2c);
    let (secure, addr) = start_server(&[&grpc_cert, &grpc_key]);
    let proxy = Proxy::start(&format!(
        "[runtime]\nshards = 1\n[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"front\"\n\
         bind = \"127.0.0.1:0\"\npool = \"grpc\"\n{}\n[[pool]]\nname = \"grpc\"\n\
         servers = [ {{ addr = \"{addr}\" }} ]\n[pool.tls]\nca = \"{}\"\n\
         server_name = \"grpc.internal\"\nalpn = [\"h2\"]\n",
        tls_block(&pki, "alpn = [\"h2\"]"),
        pki.path("ca.pem").display(),
    ));
    call(&proxy);
    drop(secure);
}

/// A server for one connection: records what arrives until `ping`, answers `pong`, and hands
/// the bytes back.
fn record_until_ping() -> (SocketAddr, std::thread::JoinHandle<Vec<u8>>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("server");
    let addr = listener.local_addr().expect("addr");
    let recorder = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().expect("accept");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 4096];
        while !bytes.ends_with(b"ping") {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(count) => bytes.extend_from_slice(&chunk[..count]),
            }
        }
        let _ = stream.write_all(b"pong");
        bytes
    });
    (addr, recorder)
}

/// With `send_proxy = "v2"`, the server learns what the handshake settled: ALPN, SNI and the
/// PP2_TYPE_SSL TLV with the version, the client certificate's CN and the cipher (read here
/// with the `ppp` crate, not the proxy's own parser).
#[test]
fn proxy_v2_tells_the_server_about_the_tls_session() {
    let pki = standard_pki();
    let (client_cert, client_key) = pki.issue("client", &["billing-client"], false);
    let (server_addr, recorder) = record_until_ping();
    let extra = format!(
        "client_ca = \"{}\"\nalpn = [\"h2\", \"http/1.1\"]",
        pki.path("ca.pem").display()
    );
    let config = format!(
        "[runtime]\nshards = 1\n[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n{}\n[[pool]]\nname = \"app\"\nsend_proxy = \"v2\"\nservers = [ {{ addr = \"{server_addr}\" }} ]\n",
        tls_block(&pki, &extra)
    );
    let proxy = Proxy::start(&config);
    let client_config = client_config(
        &pki.path("ca.pem"),
        &["http/1.1"],
        Some((&client_cert, &client_key)),
    );
    let mut client =
        tls_connect(proxy.addr(), "api.example.com", &client_config).expect("handshake");
    client.write_all(b"ping").expect("write");
    let mut pong = [0u8; 4];
    client.read_exact(&mut pong).expect("pong");
    let bytes = recorder.join().expect("recorder");
    let header = ppp::v2::Header::try_from(&bytes[..]).expect("a PROXY v2 header");
    let tlvs: Vec<(u8, Vec<u8>)> = header
        .tlvs()
        .map(|tlv| tlv.expect("a TLV"))
        .map(|tlv| (tlv.kind, tlv.value.to_vec()))
        .collect();
    let find = |kind: u8| {
        tlvs.iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("no TLV {kind:#x} in {tlvs:?}"))
    };
    assert_eq!(find(0x01), b"http/1.1");
    assert_eq!(find(0x02), b"api.example.com");
    let ssl = find(0x20);
    assert_eq!(
        ssl[0] & 0x03,
        0x03,
        "client used SSL and sent a certificate"
    );
    assert_eq!(&ssl[1..5], &[0, 0, 0, 0], "verified");
    let mut subs = Vec::new();
    let mut at = 5;
    while at + 3 <= ssl.len() {
        let length = usize::from(u16::from_be_bytes([ssl[at + 1], ssl[at + 2]]));
        subs.push((
            ssl[at],
            String::from_utf8_lossy(&ssl[at + 3..at + 3 + length]).into_owned(),
        ));
        at += 3 + length;
    }
    assert!(subs.contains(&(0x21, "TLSv1.3".to_string())), "{subs:?}");
    assert!(
        subs.contains(&(0x22, "billing-client".to_string())),
        "{subs:?}"
    );
    assert!(
        subs.iter()
            .any(|(kind, value)| *kind == 0x23 && value.starts_with("TLS_AES_")),
        "{subs:?}"
    );
    assert!(bytes.ends_with(b"ping"));
}

/// Certificates rotated five times under a continuous load of new TLS connections: not one
/// handshake fails, and the last certificate is the one served.
#[test]
fn rotation_under_handshake_load_fails_no_handshake() {
    let pki = standard_pki();
    let server = TestServer::start(Behaviour::Echo);
    let proxy = tls_proxy(&pki, 2, server.addr, "");
    let config = client_config(&pki.path("ca.pem"), &[], None);
    let addr = proxy.addr();
    // ringload: a new connection (a full handshake) per request, every answer checked.
    let summary = pki.path("load.json");
    let mut load = Command::new(common::ringload())
        .args(["rr", "--target", &addr.to_string(), "--tls", "--ca"])
        .arg(pki.path("ca.pem"))
        .args(["--server-name", "api.example.com", "--connections", "4"])
        .args([
            "--threads",
            "1",
            "--new-connection-per-request",
            "--duration",
            "4s",
        ])
        .arg("--json")
        .arg(&summary)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ringload rr");
    std::thread::sleep(Duration::from_millis(300));
    for generation in 1..=5u64 {
        pki.issue("api", &["api.example.com"], generation % 2 == 1);
        proxy.signal(libc::SIGHUP);
        assert!(wait_for(Duration::from_secs(5), || {
            admin::status(proxy.admin())["reloads"]["success"] == generation
        }));
        std::thread::sleep(Duration::from_millis(300));
    }
    let status = load.wait().expect("ringload rr");
    assert!(status.success(), "ringload rr: {status:?}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).expect("summary")).expect("json");
    assert_eq!(summary["errors_total"], 0, "no handshake failed: {summary}");
    let done = summary["requests"].as_u64().unwrap_or(0);
    assert!(done > 100, "only {done} handshakes under load: {summary}");
    let served = tls_connect(addr, "api.example.com", &config).expect("handshake");
    let leaf = served.conn.peer_certificates().expect("certificates")[0].to_vec();
    let last = CertificateDer::pem_file_iter(pki.path("api.pem"))
        .expect("api.pem")
        .next()
        .expect("a certificate")
        .expect("pem");
    assert_eq!(leaf, last.to_vec(), "the last certificate is served");
}

/// `ringload rr --tls` through termination: full handshakes per request, then resumed ones,
/// then with a client certificate; every answer checked by ringload, every handshake counted by
/// the proxy.
#[test]
fn ringload_rr_tls_full_resumed_and_mutual() {
    let pki = standard_pki();
    let (client_cert, client_key) = pki.issue("client", &["loadgen"], false);
    let server = TestServer::start(Behaviour::Echo);
    let extra = format!(
        "client_ca = \"{}\"\nclient_auth = \"optional\"",
        pki.path("ca.pem").display()
    );
    let proxy = tls_proxy(&pki, 2, server.addr, &extra);
    let target = proxy.addr().to_string();
    let ca = pki.path("ca.pem");
    let ca = ca.to_str().expect("path");
    let run = |extra: &[&str]| {
        let json = pki.path("rr.json");
        let output = Command::new(common::ringload())
            .args(["rr", "--target", &target, "--tls", "--ca", ca])
            .args(["--server-name", "api.example.com", "--connections", "4"])
            .args(["--threads", "1", "--requests", "500", "--json"])
            .arg(&json)
            .args(extra)
            .output()
            .expect("ringload rr");
        assert!(output.status.success(), "{output:?}");
        let summary: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&json).expect("summary")).expect("json");
        assert_eq!(summary["requests"], 500, "{summary}");
        assert_eq!(summary["errors_total"], 0, "{summary}");
        summary
    };
    let full = run(&["--new-connection-per-request"]);
    // One per request, plus at most one per connection opened as the last requests ended.
    let opened = full["connections_opened"].as_u64().expect("opened");
    assert!((500..=504).contains(&opened), "{full}");
    assert!(wait_for(Duration::from_secs(3), || {
        metric(&proxy, "ringproxy_tls_handshakes_total", "result=\"full\"") >= 500.0
    }));
    run(&["--new-connection-per-request", "--resume"]);
    assert!(wait_for(Duration::from_secs(3), || {
        metric(
            &proxy,
            "ringproxy_tls_handshakes_total",
            "result=\"resumed\"",
        ) >= 400.0
    }));
    let client_cert = client_cert.to_str().expect("path");
    let client_key = client_key.to_str().expect("path");
    run(&["--client-cert", client_cert, "--client-key", client_key]);
    // Requests larger than rustls's default send buffer (64 KiB), every byte echoed back.
    run(&["--size", "200000"]);
    // A wrong CA on the client side: every handshake fails, and says so.
    let stranger = Pki::new("another CA");
    let output = Command::new(common::ringload())
        .args(["rr", "--target", &target, "--tls", "--ca"])
        .arg(stranger.path("ca.pem"))
        .args(["--server-name", "api.example.com", "--connections", "1"])
        .args(["--threads", "1", "--duration", "1s"])
        .output()
        .expect("ringload rr");
    let text = String::from_utf8_lossy(&output.stdout);
    assert!(text.contains("requests     0 "), "{text}");
    assert!(!text.contains("tls 0,"), "TLS failures are counted: {text}");
}

/// Behind a load balancer that sends PROXY headers (HAProxy `send-proxy-v2`, as an AWS NLB
/// does), a TLS listener reads the header, then terminates TLS: the client's address (here
/// 127.0.0.5) reaches the server in the proxy's own PROXY header.
#[test]
fn proxy_header_then_tls_behind_haproxy() {
    let Some(haproxy) = tool("haproxy", "haproxy") else {
        return;
    };
    let pki = standard_pki();
    let (server_addr, recorder) = record_until_ping();
    let config = format!(
        "[runtime]\nshards = 1\n[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\nproxy_protocol = \"required\"\ntrusted_proxies = [\"127.0.0.1\"]\n{}\n[[pool]]\nname = \"app\"\nsend_proxy = \"v2\"\nservers = [ {{ addr = \"{server_addr}\" }} ]\n",
        tls_block(&pki, "")
    );
    let proxy = Proxy::start(&config);
    let front = common::free_port();
    let haproxy_config = pki.path("haproxy.cfg");
    std::fs::write(
        &haproxy_config,
        format!(
            "global\n  maxconn 100\ndefaults\n  mode tcp\n  timeout connect 2s\n  \
             timeout client 5s\n  timeout server 5s\n\
             listen front\n  bind 127.0.0.1:{front}\n  \
             server rp {} send-proxy-v2 source 127.0.0.1\n",
            proxy.addr()
        ),
    )
    .expect("haproxy.cfg");
    let _haproxy = common::start_server(
        "haproxy",
        Command::new(haproxy)
            .arg("-db")
            .arg("-f")
            .arg(&haproxy_config),
        &[front],
        Duration::from_secs(10),
    );
    let client_config = client_config(&pki.path("ca.pem"), &[], None);
    let tcp = common::connect_from(
        SocketAddr::from(([127, 0, 0, 1], front)),
        std::net::Ipv4Addr::new(127, 0, 0, 5),
        None,
    )
    .expect("connect from 127.0.0.5");
    let mut client = tls_over(tcp, "api.example.com", &client_config).expect("handshake");
    client.write_all(b"ping").expect("write");
    let mut pong = [0u8; 4];
    client.read_exact(&mut pong).expect("pong");
    let bytes = recorder.join().expect("recorder");
    let header = ppp::v2::Header::try_from(&bytes[..]).expect("a PROXY v2 header");
    match header.addresses {
        ppp::v2::Addresses::IPv4(addresses) => {
            assert_eq!(
                addresses.source_address,
                std::net::Ipv4Addr::new(127, 0, 0, 5)
            );
        }
        other => panic!("not IPv4 addresses: {other:?}"),
    }
    assert!(bytes.ends_with(b"ping"), "the plaintext follows the header");
    // HAProxy's header brought no TLVs; ours carries what the handshake settled.
    let kinds: Vec<u8> = header.tlvs().map(|tlv| tlv.expect("a TLV").kind).collect();
    assert!(
        kinds.contains(&0x02) && kinds.contains(&0x20),
        "TLVs {kinds:?}"
    );
    // (start_server's readiness probe through HAProxy brought a header too, and no TLS.)
    let counted = wait_for(Duration::from_secs(3), || {
        metric(
            &proxy,
            "ringproxy_listener_proxy_headers_total",
            "listener=\"front\"",
        ) >= 1.0
            && metric(&proxy, "ringproxy_tls_handshakes_total", "result=\"full\"") == 1.0
    });
    assert!(
        counted,
        "headers {}, handshakes {}",
        metric(
            &proxy,
            "ringproxy_listener_proxy_headers_total",
            "listener=\"front\""
        ),
        metric(&proxy, "ringproxy_tls_handshakes_total", "result=\"full\"")
    );
}

/// A peer that may come without a PROXY header (`optional`) and says nothing until the header
/// times out still owes its handshake: nothing it sends afterwards in plaintext reaches a
/// server.
#[test]
fn a_silent_client_behind_an_optional_header_still_needs_tls() {
    let pki = standard_pki();
    let server = TestServer::start(Behaviour::Echo);
    let config = format!(
        "[runtime]\nshards = 1\n[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\nproxy_protocol = \"optional\"\ntrusted_proxies = [\"127.0.0.1\"]\nsniff_timeout = \"500ms\"\n{}\n[[pool]]\nname = \"app\"\nservers = [ {{ addr = \"{}\" }} ]\n",
        tls_block(&pki, "handshake_timeout = \"2s\""),
        server.addr
    );
    let proxy = Proxy::start(&config);
    let mut client = TcpStream::connect(proxy.addr()).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    std::thread::sleep(Duration::from_millis(900));
    let _ = client.write_all(b"GET / HTTP/1.0\r\n\r\n");
    let mut answer = Vec::new();
    let _ = client.read_to_end(&mut answer);
    assert!(
        !answer.starts_with(b"GET"),
        "plaintext was relayed: {answer:?}"
    );
    assert_eq!(
        server.accepted(),
        0,
        "no server may see a client that did not handshake"
    );
    assert!(wait_for(Duration::from_secs(3), || {
        metric(
            &proxy,
            "ringproxy_tls_handshake_failures_total",
            "listener=\"front\"",
        ) == 1.0
    }));
}

/// The ClientHello a rustls client sends for `name` (to check that passthrough relays it
/// untouched).
fn client_hello(pki: &Pki, name: &str) -> Vec<u8> {
    let config = client_config(&pki.path("ca.pem"), &[], None);
    let mut client = rustls::ClientConnection::new(
        config,
        ServerName::try_from(name.to_string()).expect("name"),
    )
    .expect("client");
    let mut hello = Vec::new();
    client.write_tls(&mut hello).expect("hello");
    hello
}

/// Sends `hello` and reads as many bytes back (an echo server behind passthrough).
fn echoed(addr: SocketAddr, hello: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    stream.write_all(hello).expect("hello");
    let mut back = vec![0u8; hello.len()];
    stream.read_exact(&mut back).expect("echo");
    back
}

fn leaf_name(client: &TlsClient) -> String {
    let leaf = client
        .conn
        .peer_certificates()
        .and_then(|chain| chain.first().cloned())
        .expect("a certificate");
    let (_, parsed) = x509_parser::parse_x509_certificate(leaf.as_ref()).expect("x509");
    parsed
        .subject()
        .iter_common_name()
        .next()
        .and_then(|cn| cn.as_str().ok())
        .unwrap_or_default()
        .to_string()
}

#[test]
fn routes_terminate_their_own_names_and_pass_the_others_through() {
    let pki = standard_pki();
    let (own_cert, own_key) = pki.issue("own", &["own.example.com"], false);
    let plain = TestServer::start(Behaviour::Tagged(b'P'));
    let raw = TestServer::start(Behaviour::Echo);
    let tagged = TestServer::start(Behaviour::Tagged(b'H'));
    let own = format!(
        "tls = {{ certificates = [ {{ cert = \"{}\", key = \"{}\" }} ], alpn = [\"h2\"] }}",
        own_cert.display(),
        own_key.display()
    );
    let pools = format!(
        "[[pool]]\nname = \"plain\"\nservers = [ {{ addr = \"{}\" }} ]\n\
         [[pool]]\nname = \"raw\"\nservers = [ {{ addr = \"{}\" }} ]\n\
         [[pool]]\nname = \"h2\"\nservers = [ {{ addr = \"{}\" }} ]\n",
        plain.addr, raw.addr, tagged.addr
    );
    // A plain listener: its `own.example.com` route terminates, the others relay TLS as is.
    let proxy = Proxy::start(&format!(
        "[runtime]\nshards = 1\n[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"front\"\n\
         bind = \"127.0.0.1:0\"\npool = \"raw\"\nroutes = [\n\
           {{ sni = \"own.example.com\", pool = \"plain\", {own} }},\n\
           {{ sni = \"pass.example.com\", pool = \"raw\", tls = \"passthrough\" }},\n]\n\n{pools}"
    ));
    let config = client_config(&pki.path("ca.pem"), &["h2"], None);
    let mut client = tls_connect(proxy.addr(), "own.example.com", &config).expect("handshake");
    assert_eq!(leaf_name(&client), "own.example.com");
    assert_eq!(client.conn.alpn_protocol(), Some(&b"h2"[..]));
    let mut tag = [0u8; 2];
    client.read_exact(&mut tag).expect("tag");
    assert_eq!(&tag, b"P\n", "the route's pool, in plaintext");
    client.write_all(b"inside").expect("write");
    let mut back = [0u8; 6];
    client.read_exact(&mut back).expect("echo");
    assert_eq!(&back, b"inside");
    let hello = client_hello(&pki, "pass.example.com");
    assert_eq!(
        echoed(proxy.addr(), &hello),
        hello,
        "passed through untouched"
    );
    assert!(wait_for(Duration::from_secs(3), || {
        metric(&proxy, "ringproxy_tls_handshakes_total", "result=\"full\"") == 1.0
            && metric(
                &proxy,
                "ringproxy_tls_certificate_expiry_timestamp_seconds",
                "certificate=\"own.example.com\"",
            ) > 1.7e9
    }));
    drop(client);
    drop(proxy);

    // A TLS listener: `pass.example.com` passes through, `own.example.com` gets its own
    // certificate, the rest the listener's, then routes by the handshake (ALPN h2).
    let proxy = Proxy::start(&format!(
        "[runtime]\nshards = 1\n[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"front\"\n\
         bind = \"127.0.0.1:0\"\npool = \"plain\"\nroutes = [\n\
           {{ sni = \"pass.example.com\", pool = \"raw\", tls = \"passthrough\" }},\n\
           {{ sni = \"own.example.com\", pool = \"plain\", {own} }},\n\
           {{ alpn = \"h2\", pool = \"h2\" }},\n]\n{}\n{pools}",
        tls_block(&pki, "alpn = [\"h2\", \"http/1.1\"]")
    ));
    let hello = client_hello(&pki, "pass.example.com");
    assert_eq!(
        echoed(proxy.addr(), &hello),
        hello,
        "passed through untouched"
    );
    let client = tls_connect(proxy.addr(), "own.example.com", &config).expect("own");
    assert_eq!(leaf_name(&client), "own.example.com");
    let mut client = tls_connect(proxy.addr(), "api.example.com", &config).expect("listener");
    assert_eq!(leaf_name(&client), "api.example.com");
    client.read_exact(&mut tag).expect("tag");
    assert_eq!(
        &tag, b"H\n",
        "routed by the negotiated ALPN after the handshake"
    );
    let plain_config = client_config(&pki.path("ca.pem"), &["http/1.1"], None);
    let mut client = tls_connect(proxy.addr(), "db.example.com", &plain_config).expect("wild");
    assert_eq!(leaf_name(&client), "*.example.com");
    client.read_exact(&mut tag).expect("tag");
    assert_eq!(&tag, b"P\n", "the listener's pool");
    // Garbage on the TLS port still gets nothing but a close.
    let mut junk = TcpStream::connect(proxy.addr()).expect("connect");
    junk.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    junk.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .expect("junk");
    let mut answer = Vec::new();
    let _ = junk.read_to_end(&mut answer);
    assert!(!answer.starts_with(b"HTTP"), "never relayed");
    assert_eq!(
        raw.accepted(),
        2,
        "only the passthrough clients reached the raw pool"
    );
    // Each routed client counted once (before or after its handshake), the garbage not at all.
    assert!(wait_for(Duration::from_secs(3), || {
        metric(
            &proxy,
            "ringproxy_listener_detected_total",
            "listener=\"front\"",
        ) == 4.0
    }));
    let status = admin::status(proxy.admin());
    assert_eq!(
        status["listeners"][0]["routing"]["routes"][0]["tls"], "passthrough",
        "{status}"
    );

    // `ringproxy check` prints the routes' tls back, and that parses to the same config.
    let printed = Command::new(env!("CARGO_BIN_EXE_ringproxy"))
        .args(["check", "--config"])
        .arg(proxy.config_path())
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&printed.stdout).into_owned();
    assert!(printed.status.success(), "{text}");
    assert!(text.contains("tls = \"passthrough\""), "{text}");
    assert!(text.contains("tls = { certificates = ["), "{text}");
    let again = pki.path("printed.toml");
    std::fs::write(&again, &text).expect("printed");
    let reparsed = Command::new(env!("CARGO_BIN_EXE_ringproxy"))
        .args(["check", "--config"])
        .arg(&again)
        .output()
        .expect("check again");
    assert_eq!(String::from_utf8_lossy(&reparsed.stdout), text);
}

#[test]
fn cipher_suites_in_our_order_or_as_listed() {
    let Some(openssl) = tool("openssl", "openssl") else {
        return;
    };
    let pki = standard_pki();
    let server = TestServer::start(Behaviour::Echo);
    // OpenSSL lists AES-256-GCM first; the proxy chooses by its own order: AES-128-GCM.
    let proxy = tls_proxy(&pki, 1, server.addr, "");
    let hello = |proxy: &Proxy, args: &[&str]| {
        s_client(
            &openssl,
            proxy.addr(),
            &[&["-servername", "api.example.com"][..], args].concat(),
        )
    };
    let chacha_only = ["-tls1_3", "-ciphersuites", "TLS_CHACHA20_POLY1305_SHA256"];
    let tls13 = hello(&proxy, &["-tls1_3"]);
    assert!(
        tls13.contains("Ciphersuite: TLS_AES_128_GCM_SHA256"),
        "{tls13}"
    );
    let tls12 = hello(&proxy, &["-tls1_2"]);
    assert!(
        tls12.contains("Ciphersuite: ECDHE-ECDSA-AES128-GCM-SHA256"),
        "{tls12}"
    );
    // A client without it still gets one it offers.
    let chacha = hello(&proxy, &chacha_only);
    assert!(
        chacha.contains("Ciphersuite: TLS_CHACHA20_POLY1305_SHA256"),
        "{chacha}"
    );
    let status = admin::status(proxy.admin());
    assert_eq!(
        status["listeners"][0]["tls"]["cipher_suites"][0], "TLS13_AES_128_GCM_SHA256",
        "{status}"
    );
    drop(proxy);
    // Only the listed suites, in their order.
    let proxy = tls_proxy(
        &pki,
        1,
        server.addr,
        "cipher_suites = [\"TLS_AES_256_GCM_SHA384\", \"TLS13_AES_128_GCM_SHA256\"]",
    );
    let tls13 = hello(&proxy, &["-tls1_3"]);
    assert!(
        tls13.contains("Ciphersuite: TLS_AES_256_GCM_SHA384"),
        "{tls13}"
    );
    for refused in [&chacha_only[..], &["-tls1_2"]] {
        let answer = hello(&proxy, refused);
        assert!(!answer.contains("CONNECTION ESTABLISHED"), "{answer}");
    }
    // Names are checked.
    let cases = [
        (
            "cipher_suites = [\"TLS_RSA_WITH_AES_128_CBC_SHA\"]",
            "unknown cipher suite",
        ),
        ("cipher_suites = []", "cipher_suites is empty"),
        (
            "min_version = \"1.3\"\ncipher_suites = [\"TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256\"]",
            "is a TLS 1.2 suite",
        ),
        (
            "cipher_suites = [\"TLS13_AES_128_GCM_SHA256\", \"tls_aes_128_gcm_sha256\"]",
            "listed twice",
        ),
        // ECDSA certificates, RSA suites only: no handshake could succeed.
        (
            "cipher_suites = [\"TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256\"]",
            "no TLS 1.3 suite and no ECDSA suite",
        ),
    ];
    for (keys, reason) in cases {
        let path = pki.path("suites.toml");
        std::fs::write(
            &path,
            format!(
                "[[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n{}\n\
                 [[pool]]\nname = \"app\"\nservers = [ {{ addr = \"127.0.0.1:9\" }} ]\n",
                tls_block(&pki, keys)
            ),
        )
        .expect("config");
        let output = Command::new(env!("CARGO_BIN_EXE_ringproxy"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("check");
        let text = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{keys}: {text}");
        assert!(text.contains(reason), "{keys}: {text}");
    }
}

#[test]
fn route_tls_settings_are_checked() {
    let pki = standard_pki();
    let cases = [
        ("tls = \"terminate\"", "tls must be \"passthrough\""),
        ("tls = { certificates = [] }", "certificates is empty"),
        (
            "tls = { certificates = [ { cert = \"/nonexistent.pem\", key = \"/nonexistent.key\" } ] }",
            "/nonexistent.pem",
        ),
    ];
    // An alpn condition after a handshake that could never negotiate it.
    let own = pki.path("api.pem").display().to_string();
    let own_key = pki.path("api.key").display().to_string();
    let config = format!(
        "[[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\
         routes = [ {{ alpn = \"h2\", pool = \"app\", tls = {{ certificates = [ {{ cert = \"{own}\", key = \"{own_key}\" }} ] }} }} ]\n\n\
         [[pool]]\nname = \"app\"\nservers = [ {{ addr = \"127.0.0.1:9\" }} ]\n"
    );
    let path = pki.path("alpn.toml");
    std::fs::write(&path, &config).expect("config");
    let output = Command::new(env!("CARGO_BIN_EXE_ringproxy"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("not in the route's tls alpn list"), "{text}");
    for (tls, reason) in cases {
        let config = format!(
            "[[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\
             routes = [ {{ sni = \"a.example.com\", pool = \"app\", {tls} }} ]\n\n\
             [[pool]]\nname = \"app\"\nservers = [ {{ addr = \"127.0.0.1:9\" }} ]\n"
        );
        let path = pki.path("route.toml");
        std::fs::write(&path, &config).expect("config");
        let output = Command::new(env!("CARGO_BIN_EXE_ringproxy"))
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .expect("check");
        let text = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{tls}: {text}");
        assert!(text.contains(reason), "{tls}: {text}");
    }
    // A route that cannot see a ClientHello cannot choose TLS.
    let config = "[[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\
         routes = [ { protocol = \"http\", pool = \"app\", tls = \"passthrough\" } ]\n\n\
         [[pool]]\nname = \"app\"\nservers = [ { addr = \"127.0.0.1:9\" } ]\n";
    let path = pki.path("route.toml");
    std::fs::write(&path, config).expect("config");
    let output = Command::new(env!("CARGO_BIN_EXE_ringproxy"))
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(text.contains("chosen by the ClientHello"), "{text}");
}

#[test]
fn routes_on_the_decrypted_bytes_of_a_tls_listener() {
    let pki = standard_pki();
    let servers: Vec<TestServer> = [b'A', b'M', b'R', b'W', b'S']
        .into_iter()
        .map(|tag| TestServer::start(Behaviour::Tagged(tag)))
        .collect();
    let pool = |name: &str, server: &TestServer| {
        format!(
            "[[pool]]\nname = \"{name}\"\nservers = [ {{ addr = \"{}\" }} ]\n",
            server.addr
        )
    };
    let proxy = Proxy::start(&format!(
        "[runtime]\nshards = 1\n[admin]\nbind = \"127.0.0.1:0\"\n\n[[listener]]\nname = \"front\"\n\
         bind = \"127.0.0.1:0\"\npool = \"web\"\nsniff_timeout = \"500ms\"\nroutes = [\n\
           {{ sni = \"db.example.com\", pool = \"sni\" }},\n\
           {{ path_prefix = \"/api/\", pool = \"api\" }},\n\
           {{ host = \"admin.example.com\", pool = \"admin\" }},\n\
           {{ protocol = \"redis\", pool = \"redis\" }},\n]\n{}\n{}{}{}{}{}",
        tls_block(&pki, ""),
        pool("api", &servers[0]),
        pool("admin", &servers[1]),
        pool("redis", &servers[2]),
        pool("web", &servers[3]),
        pool("sni", &servers[4]),
    ));
    let config = client_config(&pki.path("ca.pem"), &[], None);
    // Each request: the pool's tag, then the request itself echoed (it went to the server
    // first, byte for byte, after the routes read it).
    let ask = |name: &str, request: &[u8]| -> (u8, Vec<u8>) {
        let mut client = tls_connect(proxy.addr(), name, &config).expect("handshake");
        client.write_all(request).expect("request");
        client.flush().expect("flush");
        let mut tag = [0u8; 2];
        client.read_exact(&mut tag).expect("tag");
        let mut back = vec![0u8; request.len()];
        client.read_exact(&mut back).expect("echo");
        (tag[0], back)
    };
    let api = b"GET /api/v1/users HTTP/1.1\r\nHost: www.example.com\r\n\r\n";
    assert_eq!(ask("www.example.com", api), (b'A', api.to_vec()));
    let admin = b"GET / HTTP/1.1\r\nHost: admin.example.com\r\n\r\n";
    assert_eq!(ask("www.example.com", admin), (b'M', admin.to_vec()));
    let ping = b"*1\r\n$4\r\nPING\r\n";
    assert_eq!(ask("www.example.com", ping), (b'R', ping.to_vec()));
    let other = b"\x00\x01\x02\x03 binary";
    assert_eq!(ask("www.example.com", other), (b'W', other.to_vec()));
    // A route on the handshake alone, listed before the ones that read, decides at once: a
    // client that waits for its server is not kept waiting.
    let started = Instant::now();
    let mut waiting = tls_connect(proxy.addr(), "db.example.com", &config).expect("handshake");
    let mut tag = [0u8; 2];
    waiting.read_exact(&mut tag).expect("tag");
    assert_eq!(tag[0], b'S');
    assert!(started.elapsed() < Duration::from_millis(400));
    // A client that says nothing inside TLS: the listener's pool after sniff_timeout.
    let started = Instant::now();
    let mut quiet = tls_connect(proxy.addr(), "www.example.com", &config).expect("handshake");
    quiet.read_exact(&mut tag).expect("tag");
    assert_eq!(tag[0], b'W');
    assert!(started.elapsed() >= Duration::from_millis(400));
    assert!(wait_for(Duration::from_secs(3), || {
        metric(
            &proxy,
            "ringproxy_listener_detected_total",
            "protocol=\"http\"",
        ) == 2.0
            && metric(
                &proxy,
                "ringproxy_listener_detected_total",
                "protocol=\"redis\"",
            ) == 1.0
            && metric(&proxy, "ringproxy_listener_sniff_timeouts_total", "") == 1.0
    }));
}
