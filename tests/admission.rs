//! Admission control against the real binary on loopback: connection rates (listener-wide,
//! split across 2 shards), per-source limits made exact by `steer = "source"`, ACLs for IPv4
//! and IPv6, refusals by RST, the process-wide cap, bandwidth caps, the first-byte timeout,
//! reloads that keep buckets, and a flood that cannot hurt the sessions already admitted.
//!
//! The heavy tests (floods, thousands of sockets) run one at a time (`serial()`).

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::admin;
use common::*;

const MIB: u64 = 1024 * 1024;

/// One listener "front" (with `listener_extra` keys and sub-tables) in front of `server`,
/// and the admin API.
fn admission_config(
    shards: u32,
    runtime_extra: &str,
    listener_extra: &str,
    server: SocketAddr,
) -> String {
    format!(
        "[runtime]\nshards = {shards}\ndrain_timeout = \"2s\"\n{runtime_extra}\n\n\
         [admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[pool]]\nname = \"app\"\nservers = [ {{ addr = \"{server}\" }} ]\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n{listener_extra}\n"
    )
}

const TOKEN: &str = "admission-token";

/// A proxy whose admin API takes `TOKEN` for changes.
fn launch_with_token(config: &str) -> Proxy {
    Proxy::launch(
        config,
        Launch {
            env: vec![("RINGPROXY_ADMIN_TOKEN".into(), TOKEN.into())],
            ..Launch::default()
        },
    )
}

/// Reloads the proxy's (rewritten) config through the admin API.
fn reload(proxy: &Proxy) {
    let answer = admin::http(proxy.admin(), "POST", "/reload", Some(TOKEN), None);
    assert_eq!(answer.status, 200, "{}", answer.body);
}

fn front(status: &serde_json::Value) -> serde_json::Value {
    status["listeners"]
        .as_array()
        .and_then(|listeners| listeners.iter().find(|l| l["name"] == "front"))
        .cloned()
        .expect("listener front in /status")
}

fn rejected(status: &serde_json::Value, reason: &str) -> u64 {
    front(status)["rejected_by_reason"][reason]
        .as_u64()
        .unwrap_or_else(|| panic!("no rejected_by_reason.{reason}"))
}

/// Whether the proxy admitted a connection: it relays a byte to the echo server and back.
/// A refused one is closed at once (EOF, or a reset with `reject = "reset"`).
fn admitted(mut stream: &TcpStream) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    if stream.write_all(b"?").is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    matches!(stream.read(&mut byte), Ok(1))
}

fn try_connect(addr: SocketAddr, source: Ipv4Addr) -> Option<TcpStream> {
    connect_from(addr, source, None).ok()
}

/// Waits until the shards published counters that satisfy `condition` (they publish every
/// second).
fn status_when(
    admin_addr: SocketAddr,
    condition: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let mut last = admin::status(admin_addr);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !condition(&last) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(100));
        last = admin::status(admin_addr);
    }
    last
}

/// Threads opening connections to `addr` as fast as they can (or, with `per_second`, at most
/// that many per second in total), each reset at once by the client (no TIME_WAIT), until
/// `stop()` of the returned flood; it counts the attempts.
struct Flood {
    stop: Arc<AtomicBool>,
    attempts: Arc<AtomicU64>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Flood {
    fn start(addr: SocketAddr, threads: u64, per_second: Option<u64>) -> Flood {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(AtomicU64::new(0));
        let threads = (0..threads)
            .map(|thread_index| {
                let (stop, attempts) = (Arc::clone(&stop), Arc::clone(&attempts));
                thread::spawn(move || {
                    let begun = Instant::now();
                    let mut n = thread_index;
                    let mut sent = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        if let Some(rate) = per_second {
                            let due = Duration::from_micros(sent * 1_000_000 * threads / rate);
                            if let Some(wait) = due.checked_sub(begun.elapsed()) {
                                thread::sleep(wait);
                            }
                        }
                        sent += 1;
                        n += threads;
                        let Ok(socket) = client_socket(source_ip(n), None) else {
                            continue;
                        };
                        if socket.connect(&addr.into()).is_ok() {
                            let _ = socket.set_linger(Some(Duration::ZERO));
                        }
                        attempts.fetch_add(1, Ordering::SeqCst);
                    }
                })
            })
            .collect();
        Flood {
            stop,
            attempts,
            threads,
        }
    }

    /// Stops the threads; returns the attempts made.
    fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads {
            thread.join().expect("flood thread");
        }
        self.attempts.load(Ordering::SeqCst)
    }
}

#[test]
fn the_listener_rate_holds_at_1000_per_second_over_10_seconds_on_2_shards() {
    let _serial = serial();
    let echo = EventServer::start(EventMode::Echo);
    let proxy = Proxy::start(&admission_config(
        2,
        "",
        "reject = \"reset\"\n[listener.limits]\nconnections_per_second = 1000\nburst = 200",
        echo.addr,
    ));
    let addr = proxy.addr();
    let begun = Instant::now();
    let flood = Flood::start(addr, 3, None);
    thread::sleep(Duration::from_secs(10));
    let attempts = flood.stop();
    let elapsed = begun.elapsed().as_secs_f64();
    let status = status_when(proxy.admin(), |status| {
        let listener = front(status);
        listener["accepted"].as_u64().unwrap_or(0) + listener["rejected"].as_u64().unwrap_or(0)
            >= attempts * 95 / 100
    });
    let listener = front(&status);
    let accepted = listener["accepted"].as_u64().expect("accepted");
    let refused = rejected(&status, "rate");
    let expected = 1000.0 * elapsed + 200.0;
    eprintln!(
        "{attempts} attempts in {elapsed:.2} s: {accepted} admitted (expected {expected:.0}), {refused} refused for rate; per shard {}; shares {}",
        listener["per_shard_accepted"], listener["admission"]["limits"]["per_shard_share"]
    );
    assert!(
        attempts as f64 > 3.0 * expected,
        "the flood was too slow to test the limit ({attempts} attempts)"
    );
    let error = (accepted as f64 - expected).abs() / expected;
    assert!(
        error <= 0.10,
        "{accepted} admitted, expected {expected:.0} +-10%"
    );
    assert!(refused > 0);
}

#[test]
fn the_burst_admits_that_many_at_once_then_the_rate() {
    let echo = TestServer::start(Behaviour::Echo);
    let proxy = Proxy::start(&admission_config(
        1,
        "",
        "[listener.limits]\nconnections_per_second = 2\nburst = 5",
        echo.addr,
    ));
    let mut streams: Vec<TcpStream> = (0..8).map(|_| connect(proxy.addr())).collect();
    let admitted_now = streams.iter_mut().filter(|s| admitted(s)).count();
    assert_eq!(admitted_now, 5, "the burst");
    thread::sleep(Duration::from_millis(1100));
    let mut later: Vec<TcpStream> = (0..4).map(|_| connect(proxy.addr())).collect();
    let admitted_later = later.iter_mut().filter(|s| admitted(s)).count();
    assert_eq!(admitted_later, 2, "2 per second after the burst");
    let status = status_when(proxy.admin(), |status| rejected(status, "rate") >= 5);
    assert_eq!(rejected(&status, "rate"), 5);
    assert_eq!(front(&status)["admission"]["limits"]["burst"], 5);
}

#[test]
fn per_source_connections_are_exact_on_2_shards_with_source_steering() {
    let _serial = serial();
    let echo = EventServer::start(EventMode::Echo);
    let proxy = Proxy::start(&admission_config(
        2,
        "",
        "steer = \"source\"\n[listener.per_source]\nmax_connections = 50",
        echo.addr,
    ));
    let addr = proxy.addr();
    let five = Ipv4Addr::new(127, 0, 0, 5);
    let mut held = Vec::new();
    for _ in 0..50 {
        let stream = try_connect(addr, five).expect("connect");
        assert!(admitted(&stream), "one of the first 50 was refused");
        held.push(stream);
    }
    let fifty_first = try_connect(addr, five).expect("connect");
    assert!(
        !admitted(&fifty_first),
        "the 51st from 127.0.0.5 was admitted"
    );
    let other = try_connect(addr, Ipv4Addr::new(127, 0, 0, 6)).expect("connect");
    assert!(admitted(&other), "127.0.0.6 was refused");
    // One closes: 127.0.0.5 may open one more.
    drop(held.pop());
    thread::sleep(Duration::from_millis(200));
    let again = try_connect(addr, five).expect("connect");
    assert!(admitted(&again));
    let status = status_when(proxy.admin(), |status| {
        rejected(status, "source_connections") >= 1
    });
    assert_eq!(rejected(&status, "source_connections"), 1);
}

#[test]
fn per_source_rate_refuses_the_address_that_used_it_and_no_other() {
    let echo = TestServer::start(Behaviour::Echo);
    let proxy = Proxy::start(&admission_config(
        2,
        "",
        "steer = \"source\"\n[listener.per_source]\nconnections_per_second = 1\nburst = 4",
        echo.addr,
    ));
    let addr = proxy.addr();
    let seven = Ipv4Addr::new(127, 0, 0, 7);
    let mut streams: Vec<TcpStream> = (0..6)
        .map(|_| try_connect(addr, seven).expect("connect"))
        .collect();
    let admitted_count = streams.iter_mut().filter(|s| admitted(s)).count();
    assert_eq!(admitted_count, 4);
    let eight = try_connect(addr, Ipv4Addr::new(127, 0, 0, 8)).expect("connect");
    assert!(admitted(&eight));
    let status = status_when(proxy.admin(), |status| rejected(status, "source_rate") >= 2);
    assert_eq!(rejected(&status, "source_rate"), 2);
    assert_eq!(rejected(&status, "rate"), 0);
}

/// Every address's connections land on one shard: the per-source tables of the two shards
/// together hold each of the 100 addresses once (the kernel's 4-tuple hash would put most of
/// them in both).
#[test]
fn ten_thousand_connections_from_100_addresses_each_stay_on_one_shard() {
    let _serial = serial();
    let echo = EventServer::start(EventMode::Echo);
    let proxy = Proxy::start(&admission_config(
        2,
        "",
        "steer = \"source\"\n[listener.per_source]\nmax_connections = 1000",
        echo.addr,
    ));
    let addr = proxy.addr();
    let workers: Vec<_> = (0..4u64)
        .map(|worker| {
            thread::spawn(move || {
                for n in 0..2500u64 {
                    let source = Ipv4Addr::new(127, 0, 1, 1 + ((worker * 2500 + n) % 100) as u8);
                    let stream = connect_from(addr, source, None).expect("connect");
                    // Relayed, so the proxy took it; then a reset (no TIME_WAIT).
                    assert!(admitted(&stream));
                    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker");
    }
    let status = status_when(proxy.admin(), |status| {
        front(status)["accepted"].as_u64() == Some(10_000)
    });
    let listener = front(&status);
    let per_shard_accepted: Vec<u64> = listener["per_shard_accepted"]
        .as_array()
        .expect("per shard")
        .iter()
        .map(|v| v.as_u64().unwrap_or(0))
        .collect();
    let per_shard_addresses: Vec<u64> = listener["admission"]["per_source"]["per_shard_addresses"]
        .as_array()
        .expect("per shard addresses")
        .iter()
        .map(|v| v.as_u64().unwrap_or(0))
        .collect();
    eprintln!(
        "accepted per shard {per_shard_accepted:?}, addresses per shard {per_shard_addresses:?}"
    );
    assert_eq!(per_shard_accepted.iter().sum::<u64>(), 10_000);
    assert!(
        per_shard_accepted.iter().all(|&n| n >= 2_000),
        "one shard took nearly all"
    );
    assert_eq!(per_shard_addresses.iter().sum::<u64>(), 100);
}

/// `steer` changed by a reload applies to the running sockets: after switching from the kernel's
/// spread to source steering, each address's connections land on one shard.
#[test]
fn a_reload_turns_source_steering_on_for_the_running_sockets() {
    let _serial = serial();
    let echo = EventServer::start(EventMode::Echo);
    let config = |steer: &str| {
        admission_config(
            2,
            "",
            &format!("steer = \"{steer}\"\n[listener.per_source]\nmax_connections = 1000"),
            echo.addr,
        )
    };
    let proxy = launch_with_token(&config("kernel"));
    proxy.rewrite_config(&config("source"));
    reload(&proxy);
    for n in 0..1000u64 {
        let source = Ipv4Addr::new(127, 0, 5, 1 + (n % 20) as u8);
        let stream = connect_from(proxy.addr(), source, None).expect("connect");
        assert!(admitted(&stream));
        let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    }
    let status = status_when(proxy.admin(), |status| {
        front(status)["accepted"].as_u64() == Some(1000)
    });
    let listener = front(&status);
    assert_eq!(listener["admission"]["steer"], "source");
    let addresses: u64 = listener["admission"]["per_source"]["per_shard_addresses"]
        .as_array()
        .expect("per shard addresses")
        .iter()
        .map(|v| v.as_u64().unwrap_or(0))
        .sum();
    assert_eq!(addresses, 20, "{listener}");
}

#[test]
fn acl_allows_and_denies_ipv4_sources() {
    let echo = TestServer::start(Behaviour::Echo);
    let proxy = Proxy::start(&admission_config(
        2,
        "",
        "[listener.acl]\nallow = [\"127.0.0.0/8\", \"::1/128\"]\ndeny = [\"127.0.0.66/32\"]",
        echo.addr,
    ));
    let addr = proxy.addr();
    let denied = try_connect(addr, Ipv4Addr::new(127, 0, 0, 66)).expect("connect");
    assert!(!admitted(&denied));
    for last in [1, 65, 67] {
        let stream = try_connect(addr, Ipv4Addr::new(127, 0, 0, last)).expect("connect");
        assert!(admitted(&stream), "127.0.0.{last} was refused");
    }
    let status = status_when(proxy.admin(), |status| rejected(status, "acl") >= 1);
    assert_eq!(rejected(&status, "acl"), 1);
    let metrics = admin::get(proxy.admin(), "/metrics").body;
    assert!(
        metrics
            .contains("ringproxy_connections_rejected_total{listener=\"front\",reason=\"acl\"} 1"),
        "{metrics}"
    );
}

#[test]
fn acl_on_an_ipv6_listener() {
    let echo = TestServer::start(Behaviour::Echo);
    let config = |acl: &str| {
        format!(
            "[runtime]\nshards = 1\n\n[[pool]]\nname = \"app\"\nservers = [ {{ addr = \"{}\" }} ]\n\n\
             [[listener]]\nname = \"front\"\nbind = \"[::1]:0\"\npool = \"app\"\n[listener.acl]\n{acl}\n",
            echo.addr
        )
    };
    let allowed = Proxy::start(&config("allow = [\"::1/128\"]"));
    assert!(admitted(&connect(allowed.addr())));
    let denied = Proxy::start(&config("deny = [\"::/96\"]"));
    assert!(!admitted(&connect(denied.addr())));
    let elsewhere = Proxy::start(&config("allow = [\"2001:db8::/32\"]"));
    assert!(!admitted(&connect(elsewhere.addr())));
}

#[test]
fn reject_reset_sends_a_reset_and_close_a_fin() {
    let echo = TestServer::start(Behaviour::Echo);
    for (mode, expect_reset) in [("reset", true), ("close", false)] {
        let proxy = Proxy::start(&admission_config(
            1,
            "",
            &format!("reject = \"{mode}\"\n[listener.acl]\ndeny = [\"127.0.0.0/8\"]"),
            echo.addr,
        ));
        // The reset can beat the end of connect() itself: then connect reports it.
        let result = TcpStream::connect_timeout(&proxy.addr(), Duration::from_secs(5)).and_then(
            |mut stream| {
                stream.set_read_timeout(Some(Duration::from_secs(3)))?;
                thread::sleep(Duration::from_millis(100));
                let mut buffer = [0u8; 16];
                stream.read(&mut buffer)
            },
        );
        match (expect_reset, result) {
            (true, Err(error)) => assert_eq!(error.kind(), ErrorKind::ConnectionReset),
            (false, Ok(0)) => {}
            (_, other) => panic!("reject = {mode}: read gave {other:?}"),
        }
    }
}

#[test]
fn runtime_max_connections_caps_the_process() {
    let echo = TestServer::start(Behaviour::Echo);
    let proxy = Proxy::start(&admission_config(1, "max_connections = 3", "", echo.addr));
    let mut held: Vec<TcpStream> = (0..3).map(|_| connect(proxy.addr())).collect();
    assert!(held.iter_mut().all(|s| admitted(s)));
    let fourth = connect(proxy.addr());
    assert!(!admitted(&fourth));
    let status = status_when(proxy.admin(), |status| {
        rejected(status, "process_full") >= 1
    });
    assert_eq!(rejected(&status, "process_full"), 1);
    held.pop();
    thread::sleep(Duration::from_millis(200));
    assert!(admitted(&connect(proxy.addr())));
}

#[test]
fn a_client_silent_past_first_byte_timeout_is_closed() {
    let echo = TestServer::start(Behaviour::Echo);
    let proxy = Proxy::start(&admission_config(
        1,
        "",
        "first_byte_timeout = \"500ms\"",
        echo.addr,
    ));
    let begun = Instant::now();
    let mut silent = connect(proxy.addr());
    silent
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    // A client that speaks in time is not subject to it.
    let talker = connect(proxy.addr());
    assert!(admitted(&talker));
    let mut buffer = [0u8; 8];
    let read = silent.read(&mut buffer);
    let waited = begun.elapsed();
    assert!(matches!(read, Ok(0)), "{read:?}");
    assert!(
        waited >= Duration::from_millis(350) && waited < Duration::from_millis(1500),
        "closed after {waited:?}"
    );
    thread::sleep(Duration::from_millis(500));
    assert!(admitted(&talker), "the client that spoke was closed");
    let status = status_when(proxy.admin(), |status| {
        front(status)["closed_by_reason"]["first_byte_timeout"].as_u64() >= Some(1)
    });
    assert_eq!(front(&status)["closed_by_reason"]["first_byte_timeout"], 1);
}

/// Uploads `bytes` through the proxy to a counting server; returns how long until the server
/// confirmed it all.
fn timed_upload(addr: SocketAddr, bytes: u64) -> Duration {
    let mut stream = connect(addr);
    stream
        .set_write_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("timeout");
    let begun = Instant::now();
    let chunk = vec![1u8; 256 * 1024];
    let mut sent = 0;
    while sent < bytes {
        let n = chunk.len().min((bytes - sent) as usize);
        stream.write_all(&chunk[..n]).expect("upload");
        sent += n as u64;
    }
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("count");
    assert_eq!(answer.trim(), bytes.to_string());
    begun.elapsed()
}

#[test]
fn upload_rate_paces_a_bulk_upload_without_buffering_it() {
    let _serial = serial();
    let counter = TestServer::start(Behaviour::CountUntilFin);
    let proxy = Proxy::start(&admission_config(
        1,
        "",
        &format!("upload_rate = {MIB}"),
        counter.addr,
    ));
    let rss_before = rss_bytes(proxy.pid());
    let peak = Arc::new(AtomicU64::new(rss_before));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, done, pid) = (Arc::clone(&peak), Arc::clone(&done), proxy.pid());
        thread::spawn(move || {
            while !done.load(Ordering::SeqCst) {
                peak.fetch_max(rss_bytes(pid), Ordering::SeqCst);
                thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let took = timed_upload(proxy.addr(), 10 * MIB);
    done.store(true, Ordering::SeqCst);
    sampler.join().expect("sampler");
    let growth = peak.load(Ordering::SeqCst).saturating_sub(rss_before);
    eprintln!(
        "10 MiB at 1 MiB/s took {took:?}; proxy RSS grew {} KiB at most",
        growth / 1024
    );
    assert!(
        took >= Duration::from_secs(9) && took <= Duration::from_secs(11),
        "took {took:?}"
    );
    assert!(growth < 4 * MIB, "the proxy's memory grew {growth} bytes");
}

#[test]
fn download_rate_and_listener_bandwidth_pace_the_other_way_and_all_sessions() {
    let _serial = serial();
    let echo = TestServer::start(Behaviour::Echo);
    // 512 KiB/s download: 1 MiB echoed back takes about 2 s.
    let proxy = Proxy::start(&admission_config(
        1,
        "",
        &format!("download_rate = {}", MIB / 2),
        echo.addr,
    ));
    let mut stream = connect(proxy.addr());
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let payload = vec![3u8; MIB as usize];
    let begun = Instant::now();
    let writer = {
        let mut stream = stream.try_clone().expect("clone");
        thread::spawn(move || stream.write_all(&payload).expect("write"))
    };
    let mut back = vec![0u8; MIB as usize];
    stream.read_exact(&mut back).expect("echo");
    let took = begun.elapsed();
    writer.join().expect("writer");
    assert!(
        took >= Duration::from_millis(1700) && took <= Duration::from_millis(2500),
        "1 MiB at 512 KiB/s took {took:?}"
    );

    // `bandwidth` is shared: two uploads of 1 MiB at 1 MiB/s together take about 2 s.
    let counter = TestServer::start(Behaviour::CountUntilFin);
    let shared = Proxy::start(&admission_config(
        1,
        "",
        &format!("bandwidth = {MIB}"),
        counter.addr,
    ));
    let addr = shared.addr();
    let begun = Instant::now();
    let uploads: Vec<_> = (0..2)
        .map(|_| thread::spawn(move || timed_upload(addr, MIB)))
        .collect();
    for upload in uploads {
        upload.join().expect("upload");
    }
    let took = begun.elapsed();
    assert!(
        took >= Duration::from_millis(1700) && took <= Duration::from_millis(2600),
        "2 MiB through a 1 MiB/s listener took {took:?}"
    );
}

#[test]
fn a_reload_changes_the_acl_at_once_and_keeps_the_rate_bucket() {
    let echo = TestServer::start(Behaviour::Echo);
    let config = |deny: &str| {
        admission_config(
            1,
            "",
            &format!(
                "[listener.limits]\nconnections_per_second = 1\nburst = 3\n[listener.acl]\ndeny = [\"{deny}\"]"
            ),
            echo.addr,
        )
    };
    let proxy = launch_with_token(&config("127.0.0.66/32"));
    let addr = proxy.addr();
    let mut used: Vec<TcpStream> = (0..3)
        .map(|n| try_connect(addr, Ipv4Addr::new(127, 0, 0, 10 + n)).expect("connect"))
        .collect();
    assert!(used.iter_mut().all(|s| admitted(s)));
    proxy.rewrite_config(&config("127.0.0.67/32"));
    reload(&proxy);
    // The bucket kept its state: no token yet (1 per second; the reload took well under one).
    let after = try_connect(addr, Ipv4Addr::new(127, 0, 0, 20)).expect("connect");
    assert!(!admitted(&after), "the reload refilled the bucket");
    thread::sleep(Duration::from_millis(1100));
    let was_denied = try_connect(addr, Ipv4Addr::new(127, 0, 0, 66)).expect("connect");
    assert!(admitted(&was_denied), "127.0.0.66 is no longer denied");
    let now_denied = try_connect(addr, Ipv4Addr::new(127, 0, 0, 67)).expect("connect");
    assert!(!admitted(&now_denied), "127.0.0.67 is denied now");
    let status = status_when(proxy.admin(), |status| rejected(status, "acl") >= 1);
    assert_eq!(rejected(&status, "acl"), 1);
}

/// 5,000 idle sessions and a flood at 10x the connection rate: a client already admitted keeps
/// its answers within 1 s, and its p99 is reported beside its unloaded p99.
#[test]
fn a_flood_at_ten_times_the_rate_beside_5000_idle_clients_leaves_a_normal_client_served() {
    let _serial = serial();
    raise_nofile_limit();
    const IDLE: u64 = 5_000;
    let echo = EventServer::start(EventMode::Echo);
    let proxy = Proxy::start(&admission_config(
        2,
        "",
        "reject = \"reset\"\n[listener.limits]\nconnections_per_second = 2000\nburst = 2000",
        echo.addr,
    ));
    let addr = proxy.addr();
    let mut normal = connect_from(addr, Ipv4Addr::new(127, 0, 2, 1), None).expect("connect");
    let mut measure = |count: usize| -> Vec<Duration> {
        let mut samples = Vec::with_capacity(count);
        for _ in 0..count {
            let begun = Instant::now();
            normal.write_all(b"ping").expect("write");
            let mut answer = [0u8; 4];
            normal.read_exact(&mut answer).expect("answer");
            samples.push(begun.elapsed());
            thread::sleep(Duration::from_millis(10));
        }
        samples.sort();
        samples
    };
    let unloaded = measure(200);

    let mut idle = Vec::with_capacity(IDLE as usize);
    let opening = Instant::now();
    while (idle.len() as u64) < IDLE && opening.elapsed() < Duration::from_secs(60) {
        let n = idle.len() as u64;
        let source = Ipv4Addr::new(127, 0, 3, 1 + (n % 200) as u8);
        if let Ok(stream) = connect_from(addr, source, None) {
            idle.push(stream);
        }
        if n % 200 == 199 {
            // Stay well under the connection rate while opening the idle clients.
            thread::sleep(Duration::from_millis(250));
        }
    }
    assert_eq!(idle.len() as u64, IDLE);
    let status = status_when(proxy.admin(), |status| {
        front(status)["active"].as_u64() == Some(IDLE + 1)
    });
    assert_eq!(
        front(&status)["active"].as_u64(),
        Some(IDLE + 1),
        "not every idle client was admitted: {}",
        front(&status)
    );

    // 10x the connection rate.
    let flood = Flood::start(addr, 2, Some(20_000));
    thread::sleep(Duration::from_millis(500));
    let loaded = measure(300);
    let attempts = flood.stop();
    let p99 = |samples: &[Duration]| samples[(samples.len() * 99).div_ceil(100) - 1];
    eprintln!(
        "normal client p99: unloaded {:?}, under the flood {:?} (max {:?}); {} flood attempts",
        p99(&unloaded),
        p99(&loaded),
        loaded.last().expect("samples"),
        attempts
    );
    assert!(
        *loaded.last().expect("samples") < Duration::from_secs(1),
        "a request took {:?}",
        loaded.last()
    );
    let status = status_when(proxy.admin(), |status| rejected(status, "rate") > 0);
    assert!(
        rejected(&status, "rate") > 0,
        "the flood was never over the rate"
    );
    // The idle ones are all still there.
    let mut idle_alive = 0;
    for stream in idle.iter_mut().step_by(250) {
        if admitted(stream) {
            idle_alive += 1;
        }
    }
    assert_eq!(idle_alive, IDLE as usize / 250);
}

/// With few descriptors, a flood fills the shard's room: the proxy waits (clients queue in the
/// backlog) instead of spinning, refuses over the rate, and serves again once the flood ends.
#[test]
fn under_a_low_descriptor_limit_a_flood_neither_spins_nor_wedges_the_proxy() {
    let _serial = serial();
    let echo = EventServer::start(EventMode::Echo);
    let proxy = Proxy::start_with_nofile(
        &admission_config(
            1,
            "",
            "[listener.limits]\nconnections_per_second = 500\nburst = 100",
            echo.addr,
        ),
        128,
    );
    let addr = proxy.addr();
    // Hold more sessions than fit: the rest wait in the backlog.
    let mut held = Vec::new();
    for n in 0..150u64 {
        if let Ok(stream) = connect_from(addr, source_ip(n), None) {
            held.push(stream);
        }
        if n % 50 == 49 {
            thread::sleep(Duration::from_millis(300));
        }
    }
    thread::sleep(Duration::from_millis(500));
    let cpu_before = cpu_seconds(proxy.pid());
    thread::sleep(Duration::from_secs(2));
    let cpu = cpu_seconds(proxy.pid()) - cpu_before;
    eprintln!(
        "proxy CPU while out of descriptors: {:.0}% of a core",
        cpu * 50.0
    );
    assert!(cpu < 0.4, "the proxy spun: {cpu:.2} CPU seconds in 2 s");
    drop(held);
    thread::sleep(Duration::from_millis(1500));
    let fresh = connect_from(addr, Ipv4Addr::new(127, 0, 4, 1), None).expect("connect");
    assert!(admitted(&fresh), "the proxy did not recover");
}
