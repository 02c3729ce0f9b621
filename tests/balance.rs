//! Server selection, failover and limits, observed through the real binary on loopback.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use common::*;

fn tagged_servers(count: u8) -> Vec<TestServer> {
    (0..count)
        .map(|tag| TestServer::start(Behaviour::Tagged(b'a' + tag)))
        .collect()
}

/// Connects, reads the server's tag, closes. `None` when the proxy closed without a server.
fn which_server(proxy: SocketAddr) -> Option<u8> {
    let mut stream = connect(proxy);
    read_tag(&mut stream)
}

fn which_server_from(proxy: SocketAddr, source: IpAddr) -> Option<u8> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).ok()?;
    socket.bind(&SocketAddr::new(source, 0).into()).ok()?;
    socket
        .connect_timeout(&proxy.into(), Duration::from_secs(5))
        .ok()?;
    socket.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let mut stream: TcpStream = socket.into();
    read_tag(&mut stream)
}

#[test]
fn refused_server_is_skipped_with_no_client_visible_failure() {
    let refused = RefusedPort::new();
    let echo = TestServer::start(Behaviour::Echo);
    let proxy = Proxy::start(&config(
        2,
        "balance = \"round_robin\"",
        &[server(refused.addr), server(echo.addr)],
    ));
    for round in 0..200u32 {
        let mut stream = connect(proxy.addr());
        let message = round.to_le_bytes();
        stream.write_all(&message).expect("write");
        let mut echoed = [0u8; 4];
        stream
            .read_exact(&mut echoed)
            .unwrap_or_else(|error| panic!("round {round}: {error}"));
        assert_eq!(echoed, message);
    }
    assert_eq!(echo.accepted(), 200);
}

#[test]
fn all_servers_down_closes_the_client_within_connect_timeout_times_attempts() {
    let holes = [BlackHole::new(), BlackHole::new()];
    let proxy = Proxy::start(&config(
        1,
        "connect_timeout = \"300ms\"\nretries = 1",
        &[server(holes[0].addr), server(holes[1].addr)],
    ));
    let mut stream = connect(proxy.addr());
    let started = Instant::now();
    let mut buffer = [0u8; 1];
    let read = stream.read(&mut buffer);
    let elapsed = started.elapsed();
    assert!(matches!(read, Ok(0)) || read.is_err(), "{read:?}");
    // Two attempts of 300 ms each, plus scheduling slack.
    assert!(
        elapsed >= Duration::from_millis(550),
        "closed too early: {elapsed:?}"
    );
    assert!(
        elapsed < Duration::from_millis(1_200),
        "closed too late: {elapsed:?}"
    );

    let refused = [RefusedPort::new(), RefusedPort::new()];
    let proxy = Proxy::start(&config(
        1,
        "connect_timeout = \"300ms\"\nretries = 1",
        &[server(refused[0].addr), server(refused[1].addr)],
    ));
    let mut stream = connect(proxy.addr());
    let started = Instant::now();
    let read = stream.read(&mut buffer);
    assert!(matches!(read, Ok(0)) || read.is_err(), "{read:?}");
    assert!(
        started.elapsed() < Duration::from_millis(600),
        "refusals are immediate"
    );
}

#[test]
fn weighted_shares_are_within_5_percent_over_10000_connections() {
    let servers = tagged_servers(3);
    let entries: Vec<String> = servers
        .iter()
        .zip([1, 2, 5])
        .map(|(server, weight)| format!("  {{ addr = \"{}\", weight = {weight} }}", server.addr))
        .collect();
    let proxy = Proxy::start(&config(2, "balance = \"weighted\"", &entries));
    let mut counts = HashMap::new();
    for _ in 0..10_000 {
        let tag = which_server(proxy.addr()).expect("a server answered");
        *counts.entry(tag).or_insert(0u32) += 1;
    }
    for (tag, weight) in [(b'a', 1.0), (b'b', 2.0), (b'c', 5.0)] {
        let expected = 10_000.0 * weight / 8.0;
        let got = f64::from(counts.get(&tag).copied().unwrap_or(0));
        assert!(
            (got - expected).abs() <= expected * 0.05,
            "server {} got {got}, expected {expected} ({counts:?})",
            tag as char
        );
    }
}

fn source_hash_map(servers: &[TestServer], clients: &[IpAddr]) -> Vec<u8> {
    let entries: Vec<String> = servers
        .iter()
        .map(|server| common::server(server.addr))
        .collect();
    let proxy = Proxy::start(&config(2, "balance = \"source_hash\"", &entries));
    clients
        .iter()
        .map(|&ip| which_server_from(proxy.addr(), ip).expect("a server answered"))
        .collect()
}

#[test]
fn source_hash_is_sticky_and_a_fifth_server_moves_about_a_fifth_of_clients() {
    let clients: Vec<IpAddr> = (0..10_000u32)
        .map(|i| IpAddr::V4(Ipv4Addr::from(0x7f01_0000 + i * 3 + 1)))
        .collect();
    let servers = tagged_servers(5);
    let four = source_hash_map(&servers[..4], &clients);
    let again = source_hash_map(&servers[..4], &clients[..1000]);
    assert_eq!(
        &four[..1000],
        &again[..],
        "same client, same server across restarts"
    );
    let five = source_hash_map(&servers, &clients);
    let moved = four.iter().zip(&five).filter(|(a, b)| a != b).count();
    assert!(
        (1_500..=2_500).contains(&moved),
        "{moved} of 10000 clients moved"
    );
    assert!(
        four.iter().zip(&five).all(|(a, b)| a == b || *b == b'e'),
        "clients move only to the new server"
    );
}

#[test]
fn backup_is_used_only_when_the_primaries_are_down() {
    let primary = TestServer::start(Behaviour::Tagged(b'p'));
    let backup = TestServer::start(Behaviour::Tagged(b'b'));
    let entries = vec![
        server(primary.addr),
        format!("  {{ addr = \"{}\", backup = true }}", backup.addr),
    ];
    let proxy = Proxy::start(&config(2, "", &entries));
    for _ in 0..100 {
        assert_eq!(which_server(proxy.addr()), Some(b'p'));
    }
    assert_eq!(backup.accepted(), 0);
    drop(primary);
    for _ in 0..100 {
        assert_eq!(which_server(proxy.addr()), Some(b'b'));
    }
}

#[test]
fn server_max_connections_is_enforced() {
    let first = TestServer::start(Behaviour::Tagged(b'1'));
    let second = TestServer::start(Behaviour::Tagged(b'2'));
    let entries = vec![
        format!("  {{ addr = \"{}\", max_connections = 2 }}", first.addr),
        format!("  {{ addr = \"{}\", max_connections = 1 }}", second.addr),
    ];
    let proxy = Proxy::start(&config(1, "", &entries));
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut stream = connect(proxy.addr());
        assert!(read_tag(&mut stream).is_some());
        held.push(stream);
    }
    assert_eq!(which_server(proxy.addr()), None, "every server is full");
    held.pop();
    assert!(wait_for(Duration::from_secs(5), || which_server(
        proxy.addr()
    )
    .is_some()));
}

#[test]
fn listener_max_connections_is_enforced_and_frees_up() {
    let echo = TestServer::start(Behaviour::Tagged(b'e'));
    let text = config(1, "", &[server(echo.addr)]).replace(
        "pool = \"app\"\n\n[[pool]]",
        "pool = \"app\"\nmax_connections = 3\n\n[[pool]]",
    );
    let proxy = Proxy::start(&text);
    let mut held: Vec<_> = (0..3)
        .map(|_| {
            let mut stream = connect(proxy.addr());
            assert_eq!(read_tag(&mut stream), Some(b'e'));
            stream
        })
        .collect();
    assert_eq!(
        which_server(proxy.addr()),
        None,
        "the fourth is turned away"
    );
    held.pop();
    assert!(wait_for(Duration::from_secs(5), || which_server(
        proxy.addr()
    ) == Some(b'e')));
}

#[test]
fn both_shards_accept() {
    let echo = TestServer::start(Behaviour::Tagged(b'e'));
    let mut proxy = Proxy::start(&config(2, "", &[server(echo.addr)]));
    for _ in 0..400 {
        assert_eq!(which_server(proxy.addr()), Some(b'e'));
    }
    let accepted = proxy.stop_and_count_accepts();
    assert_eq!(accepted.len(), 2, "{accepted:?}");
    assert_eq!(accepted.iter().sum::<u64>(), 400);
    assert!(accepted.iter().all(|&count| count >= 40), "{accepted:?}");
}

#[test]
fn least_conn_and_two_choices_avoid_the_busy_server() {
    for algorithm in ["least_conn", "two_choices"] {
        let servers = tagged_servers(2);
        let entries: Vec<String> = servers.iter().map(|s| server(s.addr)).collect();
        let proxy = Proxy::start(&config(1, &format!("balance = \"{algorithm}\""), &entries));
        // Hold twenty sessions: the shard spreads them evenly.
        let mut held = Vec::new();
        for _ in 0..20 {
            let mut stream = connect(proxy.addr());
            let tag = read_tag(&mut stream).expect("tag");
            held.push((tag, stream));
        }
        let on_a = held.iter().filter(|(tag, _)| *tag == b'a').count();
        let on_b = held.len() - on_a;
        assert!(on_a.abs_diff(on_b) <= 2, "{algorithm}: a {on_a}, b {on_b}");
        // Make `a` the busy server: end every session on `b` (with a reset, so the proxy frees
        // it at once) and wait until `b` holds no connection.
        let (busy, idle): (Vec<_>, Vec<_>) = held.into_iter().partition(|(tag, _)| *tag == b'a');
        for (_, stream) in idle {
            socket2::SockRef::from(&stream)
                .set_linger(Some(Duration::ZERO))
                .expect("linger");
        }
        assert!(
            wait_for(Duration::from_secs(5), || servers[1].active() == 0),
            "{algorithm}: b still holds {} connections",
            servers[1].active()
        );
        assert_eq!(servers[0].active(), busy.len() as u64, "{algorithm}");
        // Every new session now goes to the idle server, until the two are even again.
        let mut fresh = Vec::new();
        let mut tags = Vec::new();
        for _ in 0..busy.len() {
            let mut stream = connect(proxy.addr());
            tags.push(read_tag(&mut stream).expect("tag"));
            fresh.push(stream);
        }
        assert!(
            tags.iter().all(|&tag| tag == b'b'),
            "{algorithm}: with {} sessions on a and none on b, new sessions went to {:?}",
            busy.len(),
            String::from_utf8_lossy(&tags)
        );
    }
}
