//! Routing by what the client speaks, with real clients (psql, redis-cli, curl, openssl
//! s_client) through the proxy to recording servers on loopback: each client reaches the pool
//! of its route, and the server receives the client's bytes exactly, first.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// A server that records what each connection sends (until 300 ms of quiet), optionally
/// greets first and echoes, then closes.
struct Recorder {
    addr: SocketAddr,
    connections: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
}

impl Recorder {
    fn start(greeting: &'static [u8], echo: bool) -> Recorder {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("addr");
        let connections = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (seen, stopping) = (Arc::clone(&connections), Arc::clone(&stop));
        thread::spawn(move || {
            while !stopping.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let seen = Arc::clone(&seen);
                        thread::spawn(move || record(stream, greeting, echo, &seen));
                    }
                    Err(_) => thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Recorder {
            addr,
            connections,
            stop,
        }
    }

    fn received(&self) -> Vec<Vec<u8>> {
        self.connections.lock().expect("lock").clone()
    }

    /// Waits until `count` connections have been recorded (or 5 s).
    fn wait_for(&self, count: usize) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.received().len() < count && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(20));
        }
        self.received()
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

fn record(mut stream: TcpStream, greeting: &[u8], echo: bool, seen: &Mutex<Vec<Vec<u8>>>) {
    let _ = stream.write_all(greeting);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
    let mut bytes = Vec::new();
    let mut chunk = [0u8; 16384];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(count) => {
                bytes.extend_from_slice(&chunk[..count]);
                if echo && stream.write_all(&chunk[..count]).is_err() {
                    break;
                }
            }
        }
    }
    seen.lock().expect("lock").push(bytes);
}

fn routed_config(pools: &[(&str, SocketAddr)], listener_extra: &str) -> String {
    let mut text = format!(
        "[runtime]\nshards = 2\ndrain_timeout = \"1s\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"front\"\n\
         bind = \"127.0.0.1:0\"\npool = \"{}\"\n{listener_extra}\n",
        pools[0].0
    );
    for (name, addr) in pools {
        text.push_str(&format!(
            "\n[[pool]]\nname = \"{name}\"\nservers = [ {{ addr = \"{addr}\" }} ]\n"
        ));
    }
    text
}

/// Runs a client command to completion (it gives up by itself within a few seconds).
fn run(program: &PathBuf, args: &[&str]) {
    let status = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .env("PGCONNECT_TIMEOUT", "3")
        .status();
    assert!(status.is_ok(), "{program:?} did not run");
}

#[test]
fn real_clients_reach_the_pool_of_their_protocol() {
    let (Some(psql), Some(redis), Some(curl), Some(openssl)) = (
        tool("psql", "postgresql-client"),
        tool("redis-cli", "redis-tools"),
        tool("curl", "curl"),
        tool("openssl", "openssl"),
    ) else {
        return;
    };
    let web = Recorder::start(b"", false);
    let pg = Recorder::start(b"", false);
    let cache = Recorder::start(b"", false);
    let api = Recorder::start(b"", false);
    let admin = Recorder::start(b"", false);
    let routes = "routes = [\n\
        { protocol = \"postgres\", pool = \"pg\" },\n\
        { protocol = \"redis\", pool = \"cache\" },\n\
        { sni = \"*.api.example.com\", pool = \"api\" },\n\
        { host = \"admin.example.com\", path_prefix = \"/v1/\", pool = \"admin\" },\n\
        ]\n";
    let proxy = Proxy::start(&routed_config(
        &[
            ("web", web.addr),
            ("pg", pg.addr),
            ("cache", cache.addr),
            ("api", api.addr),
            ("admin", admin.addr),
        ],
        routes,
    ));
    let port = proxy.addr().port().to_string();
    let url = |path: &str| format!("http://127.0.0.1:{port}{path}");

    run(
        &psql,
        &[
            &format!(
                "host=127.0.0.1 port={port} user=alice dbname=shop sslmode=disable gssencmode=disable"
            ),
            "-c",
            "select 1",
        ],
    );
    let startup = pg.wait_for(1);
    assert_eq!(startup.len(), 1, "psql reached the postgres pool");
    assert_eq!(
        &startup[0][4..8],
        &[0, 3, 0, 0],
        "a protocol 3.0 startup message, first"
    );
    assert!(
        startup[0].windows(11).any(|w| w == b"user\0alice\0"),
        "{:?}",
        startup[0]
    );

    run(&redis, &["-h", "127.0.0.1", "-p", &port, "PING"]);
    assert_eq!(cache.wait_for(1), [b"*1\r\n$4\r\nPING\r\n".to_vec()]);

    run(
        &curl,
        &[
            "-s",
            "-m",
            "3",
            "-H",
            "Host: admin.example.com",
            &url("/v1/users"),
        ],
    );
    let request = admin.wait_for(1);
    assert_eq!(request.len(), 1, "curl reached the admin pool");
    assert!(request[0].starts_with(b"GET /v1/users HTTP/1.1\r\n"));

    // The same host outside the path prefix, and another host: the default pool.
    run(
        &curl,
        &[
            "-s",
            "-m",
            "3",
            "-H",
            "Host: admin.example.com",
            &url("/v2/"),
        ],
    );
    run(&curl, &["-s", "-m", "3", &url("/")]);
    let defaults = web.wait_for(2);
    assert_eq!(defaults.len(), 2, "two requests to the default pool");

    run(
        &openssl,
        &[
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-servername",
            "eu.api.example.com",
        ],
    );
    let hello = api.wait_for(1);
    assert_eq!(hello.len(), 1, "openssl reached the api pool by SNI");
    assert_eq!(
        &hello[0][..2],
        &[0x16, 0x03],
        "a TLS handshake record, first"
    );
    assert!(hello[0].windows(18).any(|w| w == b"eu.api.example.com"));

    assert_eq!(pg.received().len(), 1);
    assert_eq!(cache.received().len(), 1);
    assert_eq!(web.received().len(), 2);
}

#[test]
fn a_silent_client_goes_to_the_server_first_pool_and_hears_its_greeting() {
    const GREETING: &[u8] = b"\x0a5.5.5-10.11.6-MariaDB\0";
    let web = Recorder::start(b"", false);
    let mysql = Recorder::start(GREETING, true);
    let proxy = Proxy::start(&routed_config(
        &[("web", web.addr), ("mysql", mysql.addr)],
        "routes = [ { protocol = \"mysql\", pool = \"mysql\" } ]\nserver_first_after = \"300ms\"\n",
    ));
    let started = Instant::now();
    let mut client = TcpStream::connect(proxy.addr()).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut greeting = vec![0u8; GREETING.len()];
    client
        .read_exact(&mut greeting)
        .expect("the server's greeting");
    let waited = started.elapsed();
    assert_eq!(greeting, GREETING);
    assert!(
        waited >= Duration::from_millis(250),
        "routed by silence only after server_first_after: {waited:?}"
    );
    // The client then speaks, and is relayed as usual.
    client.write_all(b"login").expect("write");
    let mut echo = [0u8; 5];
    client.read_exact(&mut echo).expect("echo");
    assert_eq!(&echo, b"login");
    assert!(web.received().is_empty());
}

#[test]
fn unmatched_clients_are_refused_when_the_listener_says_reject() {
    let web = Recorder::start(b"", false);
    let pg = Recorder::start(b"", false);
    let proxy = Proxy::start(&routed_config(
        &[("web", web.addr), ("pg", pg.addr)],
        "routes = [ { protocol = \"postgres\", pool = \"pg\" } ]\nunmatched = \"reject\"\n",
    ));
    let mut client = TcpStream::connect(proxy.addr()).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    client.write_all(b"hello there\r\n").expect("write");
    let mut byte = [0u8; 1];
    let outcome = client.read(&mut byte);
    assert!(
        matches!(outcome, Ok(0) | Err(_)),
        "the connection is closed: {outcome:?}"
    );
    thread::sleep(Duration::from_millis(400));
    assert!(
        web.received().is_empty() && pg.received().is_empty(),
        "no server was contacted"
    );
    // Counted: one unknown client, unmatched, closed as such (shards publish once a second).
    let expected = [
        "ringproxy_listener_detected_total{listener=\"front\",protocol=\"unknown\"} 1",
        "ringproxy_listener_unmatched_total{listener=\"front\"} 1",
        "reason=\"unmatched\"} 1",
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut text = String::new();
    while Instant::now() < deadline {
        text = admin::get(proxy.admin(), "/metrics").body;
        if expected.iter().all(|line| text.contains(line)) {
            break;
        }
        thread::sleep(Duration::from_millis(200));
    }
    for line in expected {
        assert!(text.contains(line), "missing {line}");
    }
    let status = admin::status(proxy.admin());
    let routing = &status["listeners"][0]["routing"];
    assert_eq!(routing["routes"][0]["protocol"], "postgres");
    assert_eq!(routing["routes"][0]["pool"], "pg");
    assert_eq!(routing["unmatched"], "reject");
    assert_eq!(routing["detected"]["unknown"], 1);
    assert_eq!(routing["unmatched_clients"], 1);
}

#[test]
fn a_client_stalled_mid_sniff_goes_to_the_default_pool_with_its_bytes() {
    let web = Recorder::start(b"", true);
    let admin = Recorder::start(b"", true);
    let proxy = Proxy::start(&routed_config(
        &[("web", web.addr), ("admin", admin.addr)],
        "routes = [ { host = \"admin.example.com\", pool = \"admin\" } ]\nsniff_timeout = \"500ms\"\n",
    ));
    let started = Instant::now();
    let mut client = TcpStream::connect(proxy.addr()).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    // A prefix of an HTTP request: undecided until the sniff timeout.
    client.write_all(b"GE").expect("write");
    let mut echo = [0u8; 2];
    client
        .read_exact(&mut echo)
        .expect("echo of the sniffed bytes");
    assert_eq!(&echo, b"GE");
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "{:?}",
        started.elapsed()
    );
    client.write_all(b"T / HTTP/1.0\r\n\r\n").expect("write");
    let mut rest = [0u8; 16];
    client.read_exact(&mut rest).expect("echo");
    assert_eq!(&rest, b"T / HTTP/1.0\r\n\r\n");
    assert!(admin.received().is_empty());
}

/// A slowloris that trickles a TLS ClientHello one byte per second never completes it: it is
/// cut at `sniff_timeout` (here with `unmatched = "reject"`), however steadily it sends, and no
/// server hears of it.
#[test]
fn a_slowloris_is_cut_at_the_sniff_timeout() {
    let web = Recorder::start(b"", true);
    let api = Recorder::start(b"", true);
    let proxy = Proxy::start(&routed_config(
        &[("web", web.addr), ("api", api.addr)],
        "routes = [ { sni = \"api.example.com\", pool = \"api\" } ]\n\
         unmatched = \"reject\"\nsniff_timeout = \"2s\"\n",
    ));
    let mut client = TcpStream::connect(proxy.addr()).expect("connect");
    let started = Instant::now();
    // A ClientHello's record header announcing 512 bytes, then its body, one byte a second.
    let hello: Vec<u8> = [0x16, 0x03, 0x01, 0x02, 0x00, 0x01]
        .into_iter()
        .chain(std::iter::repeat(0u8))
        .take(64)
        .collect();
    let mut cut_at = None;
    for byte in hello {
        if client.write_all(&[byte]).is_err() || peer_closed(&client) == Some(true) {
            cut_at = Some(started.elapsed());
            break;
        }
        if started.elapsed() > Duration::from_secs(6) {
            break;
        }
        thread::sleep(Duration::from_millis(1000));
    }
    let cut_at = cut_at.expect("the slowloris was never cut");
    assert!(
        (Duration::from_millis(1900)..=Duration::from_millis(4100)).contains(&cut_at),
        "cut after {cut_at:?}; sniff_timeout is 2s (seen at the next byte, a second apart)"
    );
    assert!(web.received().is_empty() && api.received().is_empty());
}

#[test]
fn sniffed_bytes_are_replayed_byte_for_byte_before_the_rest() {
    let web = Recorder::start(b"", true);
    let tls = Recorder::start(b"", true);
    let proxy = Proxy::start(&routed_config(
        &[("web", web.addr), ("tls", tls.addr)],
        "routes = [ { protocol = \"tls\", pool = \"tls\" } ]\n",
    ));
    // A real ClientHello (captured from openssl s_client), then more bytes in the same write
    // and a later one: the server sees all of them in order.
    let hello: &[u8] = include_bytes!("../src/sniff/captures/tls13_sni_alpn.bin");
    let mut first = hello.to_vec();
    first.extend_from_slice(&[7u8; 20_000]);
    let mut client = TcpStream::connect(proxy.addr()).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    client.write_all(&first).expect("write");
    client.write_all(b"and then").expect("write");
    let mut echoed = vec![0u8; first.len() + 8];
    client.read_exact(&mut echoed).expect("echo");
    let mut expected = first.clone();
    expected.extend_from_slice(b"and then");
    assert!(echoed == expected, "bytes differ");
    drop(client);
    let seen = tls.wait_for(1);
    assert_eq!(seen, [expected]);
    assert!(web.received().is_empty());
}

/// A server that requires a PROXY header first (as HAProxy's `accept-proxy` does): it answers
/// "HEALTHY <client address>\n" after a valid one and closes the connection otherwise.
fn proxy_requiring_server() -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let record = Arc::clone(&record);
            thread::spawn(move || {
                let mut stream = stream;
                let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                let mut bytes = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    match ringproxy::sniff::proxy::parse(&bytes) {
                        ringproxy::sniff::proxy::ProxyVerdict::Header(header) => {
                            let client = header.addresses.map(|(source, _)| source.to_string());
                            let answer = format!("HEALTHY {}\n", client.unwrap_or_default());
                            let _ = stream.write_all(answer.as_bytes());
                            // Keep reading what follows the header, for the record.
                            let _ = stream.set_read_timeout(Some(Duration::from_millis(300)));
                            while let Ok(count) = stream.read(&mut chunk) {
                                if count == 0 {
                                    break;
                                }
                                bytes.extend_from_slice(&chunk[..count]);
                            }
                            break;
                        }
                        ringproxy::sniff::proxy::ProxyVerdict::NeedMore => {}
                        _ => break,
                    }
                    match stream.read(&mut chunk) {
                        Ok(0) | Err(_) => break,
                        Ok(count) => bytes.extend_from_slice(&chunk[..count]),
                    }
                }
                record.lock().expect("lock").push(bytes);
            });
        }
    });
    (addr, seen)
}

#[test]
fn pools_send_the_proxy_header_before_the_clients_bytes_and_their_checks() {
    let (server, seen) = proxy_requiring_server();
    let text = format!(
        "[runtime]\nshards = 1\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"v1\"\n\n\
         [[listener]]\nname = \"routed\"\nbind = \"127.0.0.1:0\"\npool = \"plain\"\n\
         routes = [ {{ protocol = \"redis\", pool = \"v2\" }} ]\n\n\
         [[pool]]\nname = \"v1\"\nsend_proxy = \"v1\"\nservers = [ {{ addr = \"{server}\" }} ]\n\
         [pool.health]\nkind = \"send_expect\"\nsend = \"ping\\n\"\nexpect = \"HEALTHY\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\n\n\
         [[pool]]\nname = \"v2\"\nsend_proxy = \"v2\"\nservers = [ {{ addr = \"{server}\" }} ]\n\n\
         [[pool]]\nname = \"plain\"\nservers = [ {{ addr = \"{server}\" }} ]\n\
         [pool.health]\nkind = \"send_expect\"\nsend = \"ping\\n\"\nexpect = \"HEALTHY\"\ninterval = \"200ms\"\ntimeout = \"150ms\"\n"
    );
    let proxy = Proxy::start(&text);
    // Checks with the header pass; without it the same server fails them.
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline
        && (admin::server_state(proxy.admin(), "v1", &server.to_string()) != "up"
            || admin::server_state(proxy.admin(), "plain", &server.to_string()) != "down")
    {
        thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        admin::server_state(proxy.admin(), "v1", &server.to_string()),
        "up"
    );
    assert_eq!(
        admin::server_state(proxy.admin(), "plain", &server.to_string()),
        "down"
    );

    // A client through the v1 pool: the server sees the client's own address and port.
    let mut client = TcpStream::connect(proxy.addr()).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    client.write_all(b"hello").expect("write");
    let mut answer = String::new();
    let mut byte = [0u8; 1];
    while client.read(&mut byte).expect("answer") == 1 && byte[0] != b'\n' {
        answer.push(byte[0] as char);
    }
    let local = client.local_addr().expect("local");
    assert_eq!(answer, format!("HEALTHY {local}"));

    // A redis client routed to the v2 pool: header, then the sniffed command, then the rest.
    let routed = proxy.listeners["routed"];
    let mut client = TcpStream::connect(routed).expect("connect");
    client
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    client.write_all(b"*1\r\n$4\r\nPING\r\n").expect("write");
    let mut answer = [0u8; 8];
    client.read_exact(&mut answer).expect("answer");
    assert_eq!(&answer, b"HEALTHY ");
    client.write_all(b"more").expect("write");
    drop(client);
    thread::sleep(Duration::from_millis(600));
    let recorded = seen.lock().expect("lock").clone();
    let v2 = recorded
        .iter()
        .find(|bytes| bytes.starts_with(b"\r\n\r\n\0\r\nQUIT\n"))
        .expect("a v2 header");
    let ringproxy::sniff::proxy::ProxyVerdict::Header(header) = ringproxy::sniff::proxy::parse(v2)
    else {
        panic!("not a header");
    };
    assert_eq!(&v2[header.length..], b"*1\r\n$4\r\nPING\r\nmore");
}
