//! Active health checks against real servers on loopback: a killed server is taken out within
//! its fall budget while clients see no failure, comes back after `rise` checks and ramps up
//! (slow start); send_expect and http checks judge what the server answers; `/ready` follows
//! the last server of a pool.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use common::admin::{self, server_in, server_state};
use common::*;

fn health_config(servers: &[(SocketAddr, &str)], health: &str, pool_extra: &str) -> String {
    let servers: Vec<String> = servers
        .iter()
        .map(|(addr, name)| format!("  {{ addr = \"{addr}\", name = \"{name}\" }}"))
        .collect();
    format!(
        "[runtime]\nshards = 2\ndrain_timeout = \"2s\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\n\
         [[pool]]\nname = \"app\"\n{pool_extra}\nservers = [\n{}\n]\n\n[pool.health]\n{health}\n",
        servers.join(",\n")
    )
}

/// Waits until `server`'s state is `state`; returns how long that took.
fn wait_state(admin: SocketAddr, server: &str, state: &str, within: Duration) -> Option<Duration> {
    let begun = Instant::now();
    while begun.elapsed() < within {
        if server_state(admin, "app", server) == state {
            return Some(begun.elapsed());
        }
        thread::sleep(Duration::from_millis(20));
    }
    None
}

/// New connections through the proxy, one after another, each reading the server's tag.
struct Load {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    per_tag: Arc<[AtomicU64; 2]>,
    /// The first few failures: when, and what.
    thread: Option<thread::JoinHandle<Vec<(Instant, String)>>>,
}

impl Load {
    fn start(addr: SocketAddr) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failed = Arc::new(AtomicU64::new(0));
        let per_tag: Arc<[AtomicU64; 2]> = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let (stopping, oks, fails, tags) = (
            Arc::clone(&stop),
            Arc::clone(&ok),
            Arc::clone(&failed),
            Arc::clone(&per_tag),
        );
        let thread = thread::spawn(move || {
            let mut errors = Vec::new();
            while !stopping.load(Ordering::SeqCst) {
                let outcome = (|| -> std::io::Result<u8> {
                    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(3))?;
                    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut tag = [0u8; 2];
                    stream.read_exact(&mut tag)?;
                    stream.write_all(b"x")?;
                    let mut echo = [0u8; 1];
                    stream.read_exact(&mut echo)?;
                    Ok(tag[0])
                })();
                match outcome {
                    Ok(tag) => {
                        oks.fetch_add(1, Ordering::SeqCst);
                        if let Some(counter) = tags.get(usize::from(tag.wrapping_sub(b'a'))) {
                            counter.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Err(error) => {
                        fails.fetch_add(1, Ordering::SeqCst);
                        if errors.len() < 5 {
                            errors.push((Instant::now(), error.to_string()));
                        }
                    }
                }
                thread::sleep(Duration::from_millis(2));
            }
            errors
        });
        Load {
            stop,
            ok,
            failed,
            per_tag,
            thread: Some(thread),
        }
    }

    fn tag(&self, tag: u8) -> u64 {
        self.per_tag[usize::from(tag - b'a')].load(Ordering::SeqCst)
    }

    fn finish(mut self) -> (u64, u64, Vec<(Instant, String)>) {
        self.stop.store(true, Ordering::SeqCst);
        let errors = self
            .thread
            .take()
            .map(|thread| thread.join().expect("load thread"))
            .unwrap_or_default();
        (
            self.ok.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
            errors,
        )
    }
}

#[test]
fn a_killed_server_goes_down_within_its_fall_budget_and_comes_back_with_slow_start() {
    const INTERVAL_MS: u64 = 500;
    const TIMEOUT_MS: u64 = 250;
    const FALL: u64 = 2;
    const RISE: u64 = 2;
    let a = TestServer::start(Behaviour::Tagged(b'a'));
    let b = TestServer::start(Behaviour::Tagged(b'b'));
    let a_addr = a.addr;
    let proxy = Proxy::start(&health_config(
        &[(a.addr, "a"), (b.addr, "b")],
        &format!(
            "kind = \"tcp\"\ninterval = \"{INTERVAL_MS}ms\"\ntimeout = \"{TIMEOUT_MS}ms\"\n\
             rise = {RISE}\nfall = {FALL}"
        ),
        "slow_start = \"3s\"",
    ));
    let admin = proxy.admin();
    for server in ["a", "b"] {
        assert!(
            wait_state(admin, server, "up", Duration::from_secs(5)).is_some(),
            "{server} never came up: {}",
            admin::status(admin)
        );
    }
    // A server coming up for the first time does not slow-start.
    let a_status = server_in(&admin::status(admin), "app", "a").expect("a");
    assert_eq!(a_status["effective_weight"], 1.0, "{a_status}");

    let load = Load::start(proxy.addr());
    thread::sleep(Duration::from_millis(500));
    assert!(load.tag(b'a') > 0, "a takes traffic before it is killed");

    let killed_at = Instant::now();
    drop(a);
    let budget = Duration::from_millis((FALL * INTERVAL_MS) * 11 / 10 + TIMEOUT_MS);
    let took = wait_state(admin, "a", "down", Duration::from_secs(5));
    eprintln!("killed server marked down after {took:?} (budget {budget:?})");
    let took = took.expect("the killed server is marked down");
    // The poll of /status adds up to 20 ms to what is measured.
    assert!(
        took <= budget + Duration::from_millis(50),
        "marked down after {took:?}, budget {budget:?}"
    );
    let reason = server_in(&admin::status(admin), "app", "a").expect("a")["reason"].clone();
    assert!(
        reason.as_str().is_some_and(|r| r.contains("refused")),
        "the reason says why: {reason}"
    );
    let a_before_return = load.tag(b'a');

    let a = TestServer::start_at(a_addr, Behaviour::Tagged(b'a'));
    let came_back = wait_state(
        admin,
        "a",
        "up",
        Duration::from_millis(RISE * INTERVAL_MS * 2 + 2000),
    );
    eprintln!("restarted server up after {came_back:?}");
    assert!(came_back.is_some(), "the restarted server came back up");
    // Slow start: the returning server's weight ramps from near zero to full over 3 s.
    let ramp = server_in(&admin::status(admin), "app", "a").expect("a")["effective_weight"]
        .as_f64()
        .expect("weight");
    assert!(ramp < 0.5, "a returning server starts its ramp low: {ramp}");
    assert!(
        wait_for(Duration::from_secs(6), || {
            server_in(&admin::status(admin), "app", "a").expect("a")["effective_weight"] == 1.0
        }),
        "the ramp reaches full weight"
    );
    assert!(
        wait_for(Duration::from_secs(5), || load.tag(b'a')
            > a_before_return + 20),
        "traffic returns to the restarted server"
    );
    let (ok, failed, errors) = load.finish();
    eprintln!("load: {ok} connections, {failed} failed {errors:?}");
    // The load is one connection at a time: at most the one session already on the server
    // when it was killed may be lost (as with any proxy); every other connection succeeds.
    let lost_at_the_kill = errors
        .iter()
        .filter(|(at, _)| {
            *at >= killed_at && at.duration_since(killed_at) < Duration::from_millis(200)
        })
        .count() as u64;
    assert!(
        failed <= 1 && failed == lost_at_the_kill,
        "every new connection succeeds while a server dies and returns: {errors:?}"
    );
    drop(a);
    drop(b);
}

#[test]
fn send_expect_checks_judge_the_answer_on_a_separate_check_port() {
    let traffic_good = TestServer::start(Behaviour::Echo);
    let traffic_bad = TestServer::start(Behaviour::Echo);
    let pong = TestServer::start(Behaviour::Reply(b"+PONG\r\n"));
    let nope = TestServer::start(Behaviour::Reply(b"-ERR nope\r\n"));
    // Both servers are checked on the check port; the servers differ by address (loopback
    // 127.0.0.1 and 127.0.0.2 reach the same check servers only through their ports), so
    // each pool gets its own check port.
    let config = format!(
        "[runtime]\nshards = 1\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"good\"\n\n\
         [[pool]]\nname = \"good\"\nservers = [ {{ addr = \"{}\", name = \"g\" }} ]\n\
         [pool.health]\nkind = \"send_expect\"\ninterval = \"300ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1\n\
         port = {}\nsend = 'PING\\r\\n'\nexpect = \"PONG\"\n\n\
         [[pool]]\nname = \"bad\"\nservers = [ {{ addr = \"{}\", name = \"n\" }} ]\n\
         [pool.health]\nkind = \"send_expect\"\ninterval = \"300ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1\n\
         start = \"up\"\nport = {}\nsend = \"PING\\r\\n\"\nexpect = \"PONG\"\n",
        traffic_good.addr,
        pong.addr.port(),
        traffic_bad.addr,
        nope.addr.port(),
    );
    let proxy = Proxy::start(&config);
    let admin = proxy.admin();
    let state = |pool: &str, server: &str| {
        admin::server_in(&admin::status(admin), pool, server).expect("server")
    };
    assert!(
        wait_for(Duration::from_secs(5), || state("good", "g")["state"]
            == "up"),
        "{}",
        state("good", "g")
    );
    assert!(
        wait_for(Duration::from_secs(5), || state("bad", "n")["state"]
            == "down"),
        "{}",
        state("bad", "n")
    );
    let reason = state("bad", "n")["reason"]
        .as_str()
        .unwrap_or("")
        .to_string();
    assert!(
        reason.contains("unexpected answer") && reason.contains("-ERR nope"),
        "the reason quotes the answer: {reason}"
    );
    assert!(pong.accepted() >= 1, "the check went to the check port");
    assert_eq!(traffic_good.accepted(), 0, "not to the traffic port");
}

#[test]
fn http_checks_take_200_as_up_and_503_or_silence_as_down() {
    let ok = TestServer::start(Behaviour::Reply(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    ));
    let unavailable = TestServer::start(Behaviour::Reply(
        b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n",
    ));
    let silent = TestServer::start(Behaviour::Silent);
    let proxy = Proxy::start(&health_config(
        &[
            (ok.addr, "ok"),
            (unavailable.addr, "busy"),
            (silent.addr, "mute"),
        ],
        "kind = \"http\"\ninterval = \"300ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1\n\
         start = \"up\"\npath = \"/ready\"\nhost = \"app.local\"\nexpect_status = \"200-299\"",
        "",
    ));
    let admin = proxy.admin();
    assert!(wait_state(admin, "busy", "down", Duration::from_secs(5)).is_some());
    assert!(wait_state(admin, "mute", "down", Duration::from_secs(5)).is_some());
    let status = admin::status(admin);
    assert_eq!(server_in(&status, "app", "ok").expect("ok")["state"], "up");
    let busy = server_in(&status, "app", "busy").expect("busy");
    assert_eq!(busy["reason"], "status 503", "{busy}");
    let mute = server_in(&status, "app", "mute").expect("mute");
    assert!(
        mute["reason"]
            .as_str()
            .is_some_and(|r| r.contains("timeout")),
        "{mute}"
    );
    assert_eq!(mute["last_check"]["result"], "failure");
    // Traffic goes to the one server that is up.
    for _ in 0..6 {
        let mut stream = connect(proxy.addr());
        stream.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
        let mut answer = [0u8; 12];
        stream.read_exact(&mut answer).expect("answer");
        assert_eq!(&answer, b"HTTP/1.1 200");
    }
}

#[test]
fn ready_turns_503_when_the_last_server_of_a_pool_dies_and_200_when_it_returns() {
    let server = TestServer::start(Behaviour::Echo);
    let addr = server.addr;
    let proxy = Proxy::start(&health_config(
        &[(server.addr, "only")],
        "kind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1",
        "",
    ));
    let admin = proxy.admin();
    assert!(wait_for(Duration::from_secs(5), || admin::get(
        admin, "/ready"
    )
    .status
        == 200));
    drop(server);
    assert!(
        wait_for(Duration::from_secs(5), || admin::get(admin, "/ready")
            .status
            == 503),
        "ready while the only server is down"
    );
    let not_ready = admin::get(admin, "/ready").json();
    assert!(
        not_ready["reasons"]
            .to_string()
            .contains("pool \\\"app\\\" has no server up"),
        "{not_ready}"
    );
    let status = admin::status(admin);
    assert_eq!(status["pools"][0]["all_servers_down"], true, "{status}");
    let _server = TestServer::start_at(addr, Behaviour::Echo);
    assert!(
        wait_for(Duration::from_secs(5), || admin::get(admin, "/ready")
            .status
            == 200),
        "ready again once the server returns"
    );
    assert_eq!(admin::get(admin, "/healthz").status, 200);
}
