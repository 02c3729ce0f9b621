//! Connection options on real sockets: keepalive and user timeouts on both sides, outgoing
//! source addresses, and repeated warnings logged once per interval.

mod common;

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::{
    Behaviour, Proxy, RefusedPort, TestServer, config, config_with, connect, connect_from, server,
    source_ip, wait_for,
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

/// Waits for the proxy's only shard to hold a session, then until it holds none; how long the
/// session lasted from then (None: it did not start within 5 s or end within `limit`).
fn sessions_end_within(admin: std::net::SocketAddr, limit: Duration) -> Option<Duration> {
    let sessions = || common::admin::status(admin)["shards"][0]["sessions"].as_u64();
    if !wait_for(Duration::from_secs(5), || sessions() == Some(1)) {
        return None;
    }
    let begun = Instant::now();
    while begun.elapsed() < limit {
        if sessions() == Some(0) {
            return Some(begun.elapsed());
        }
        thread::sleep(Duration::from_millis(50));
    }
    None
}

/// `tcp_user_timeout` on a listener and on a pool: a peer that takes no byte while the proxy
/// has bytes for it (its window stays shut) is given up by the kernel after that long, and the
/// session ends, long before `write_timeout` (60 s here) would end it. First a client that
/// never reads a server that streams; then a server that never reads a client that streams.
#[test]
fn tcp_user_timeout_gives_up_on_a_peer_that_takes_nothing() {
    let streamer = TcpListener::bind("127.0.0.1:0").expect("bind");
    let streamer_addr = streamer.local_addr().expect("addr");
    thread::spawn(move || {
        for stream in streamer.incoming() {
            let Ok(mut stream) = stream else { continue };
            thread::spawn(move || {
                let chunk = vec![0u8; 64 * 1024];
                while stream.write_all(&chunk).is_ok() {}
            });
        }
    });
    let silent = TestServer::start(Behaviour::Silent);
    let text = format!(
        "[runtime]\nshards = 1\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"streamer\"\n\
         write_timeout = \"60s\"\ntcp_user_timeout = \"2s\"\n\n\
         [[listener]]\nname = \"to-silent\"\nbind = \"127.0.0.1:0\"\npool = \"silent\"\n\
         write_timeout = \"60s\"\n\n\
         [[pool]]\nname = \"streamer\"\nservers = [\n{}\n]\n\n\
         [[pool]]\nname = \"silent\"\ntcp_user_timeout = \"2s\"\nservers = [\n{}\n]\n",
        server(streamer_addr),
        server(silent.addr)
    );
    let proxy = Proxy::start(&text);
    let admin = proxy.admin();

    // The client never reads: the proxy's socket toward it stalls at a shut window.
    let client = connect_from(proxy.addr(), source_ip(1), Some(4096)).expect("connect");
    let ended = sessions_end_within(admin, Duration::from_secs(15));
    eprintln!("client that never reads: session ended after {ended:?}");
    let ended = ended.expect("the session toward a client that never reads did not end");
    assert!(
        ended >= Duration::from_millis(1500),
        "ended after {ended:?}, before tcp_user_timeout could"
    );
    drop(client);

    // The server never reads: the proxy's socket toward it stalls the same way.
    let mut client =
        connect_from(proxy.listeners["to-silent"], source_ip(2), None).expect("connect");
    let writer = thread::spawn(move || {
        let chunk = vec![0u8; 64 * 1024];
        let begun = Instant::now();
        while begun.elapsed() < Duration::from_secs(15) {
            match client.write(&chunk) {
                Ok(_) => {}
                Err(error)
                    if matches!(
                        error.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(error) => return Some(error.kind()),
            }
        }
        None
    });
    let ended = sessions_end_within(admin, Duration::from_secs(15));
    eprintln!("server that never reads: session ended after {ended:?}");
    let ended = ended.expect("the session toward a server that never reads did not end");
    assert!(
        ended >= Duration::from_millis(1500),
        "ended after {ended:?}, before tcp_user_timeout could"
    );
    let error = writer.join().expect("writer");
    assert!(
        error.is_some(),
        "the client's writes went on failing nowhere after its session ended"
    );
}
