//! Connection options on real sockets: keepalive on both sides, outgoing source addresses, and
//! repeated warnings logged once per interval.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::{
    Behaviour, Proxy, RefusedPort, TestServer, config, config_with, connect, server, wait_for,
};

/// `ss -tno` lines of established TCP sockets matching `filter` (an ss filter expression).
fn ss_lines(filter: &str) -> Vec<String> {
    let output = Command::new("ss")
        .args(["-tnoH", "state", "established"])
        .arg(filter)
        .output()
        .expect("ss (iproute2) must be installed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn tcp_keepalive_is_set_on_client_and_server_connections() {
    let echo = TestServer::start(Behaviour::Echo);
    let text = config_with(
        1,
        "tcp_keepalive = { idle = \"7s\", interval = \"2s\", count = 3 }\ntcp_user_timeout = \"20s\"",
        "tcp_keepalive = { idle = \"9s\", interval = \"2s\", count = 3 }\ntcp_user_timeout = \"20s\"",
        &[server(echo.addr)],
    );
    let proxy = Proxy::start(&text);
    let mut stream = connect(proxy.addr());
    stream.write_all(b"ping").expect("write");
    let mut echoed = [0u8; 4];
    stream.read_exact(&mut echoed).expect("echo");
    let proxy_port = proxy.addr().port();
    let server_port = echo.addr.port();
    // The proxy's accepted socket (source port = the listener's) and its server connection
    // (destination port = the server's) both run a keepalive timer of about the idle time.
    let client_side = ss_lines(&format!("( sport = :{proxy_port} )"));
    let server_side = ss_lines(&format!("( dport = :{server_port} )"));
    eprintln!("client side: {client_side:?}\nserver side: {server_side:?}");
    let keepalive_within = |lines: &[String], max_seconds: f64| {
        lines.iter().any(|line| {
            line.split("timer:(keepalive,")
                .nth(1)
                .and_then(|rest| rest.split(',').next())
                .and_then(|time| {
                    let seconds = if let Some(ms) = time.strip_suffix("ms") {
                        ms.parse::<f64>().ok()? / 1000.0
                    } else if let Some((s, ms)) = time.split_once("sec") {
                        let _ = ms;
                        s.parse::<f64>().ok()?
                    } else {
                        return None;
                    };
                    Some(seconds > 0.0 && seconds <= max_seconds)
                })
                .unwrap_or(false)
        })
    };
    assert!(
        keepalive_within(&client_side, 7.0),
        "no 7 s keepalive timer on the client connection: {client_side:?}"
    );
    assert!(
        keepalive_within(&server_side, 9.0),
        "no 9 s keepalive timer on the server connection: {server_side:?}"
    );
    // Without the keys there is no keepalive timer.
    let plain = Proxy::start(&config(1, "", &[server(echo.addr)]));
    let mut stream = connect(plain.addr());
    stream.write_all(b"ping").expect("write");
    stream.read_exact(&mut echoed).expect("echo");
    let lines = ss_lines(&format!("( sport = :{} )", plain.addr().port()));
    assert!(
        lines.iter().all(|line| !line.contains("keepalive")),
        "{lines:?}"
    );
}

#[test]
fn outgoing_connections_take_the_source_addresses_in_turn() {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let peers: Arc<Mutex<BTreeMap<IpAddr, u32>>> = Arc::default();
    let seen = Arc::clone(&peers);
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            if let Ok(peer) = stream.peer_addr() {
                *seen.lock().expect("lock").entry(peer.ip()).or_default() += 1;
            }
            let _ = stream.write_all(b"k");
        }
    });
    let text = config(
        1,
        "source_addresses = [\"127.0.0.2-127.0.0.4\"]",
        &[server(addr)],
    );
    let proxy = Proxy::start(&text);
    for _ in 0..9 {
        let mut stream = connect(proxy.addr());
        let mut byte = [0u8; 1];
        stream
            .read_exact(&mut byte)
            .expect("answer through the proxy");
    }
    assert!(wait_for(Duration::from_secs(5), || {
        peers.lock().expect("lock").values().sum::<u32>() == 9
    }));
    let peers = peers.lock().expect("lock").clone();
    let expected: BTreeMap<IpAddr, u32> = ["127.0.0.2", "127.0.0.3", "127.0.0.4"]
        .iter()
        .map(|ip| (ip.parse().expect("ip"), 3))
        .collect();
    assert_eq!(peers, expected, "each source address used in turn");
}

#[test]
fn a_server_refusing_every_connect_is_logged_once_per_interval() {
    let refused = RefusedPort::new();
    let proxy = Proxy::start(&config(
        1,
        "retries = 0\nmax_fails = 1\nfail_timeout = \"1m\"",
        &[server(refused.addr)],
    ));
    for _ in 0..50 {
        let mut stream = connect(proxy.addr());
        let mut byte = [0u8; 1];
        // The proxy closes each client at once: no server can be reached.
        let _ = stream.read(&mut byte);
    }
    let warnings = |proxy: &Proxy| {
        proxy
            .logs()
            .iter()
            .filter(|line| line["fields"]["message"] == "server marked down after connect failures")
            .count()
    };
    wait_for(Duration::from_secs(2), || warnings(&proxy) >= 1);
    // Give any further warnings time to arrive before counting.
    thread::sleep(Duration::from_millis(300));
    assert_eq!(
        warnings(&proxy),
        1,
        "50 refused connects must log one warning (with a count of the rest), not one each"
    );
}
