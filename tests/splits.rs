//! Traffic splits for blue/green and canary releases: a listener (or a route) names a
//! `[[split]]` of pools with weights; `PUT /splits/{name}` and reloads change the weights for
//! new connections on every shard at once, established sessions stay where they are.

mod common;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use common::admin::{self, http};
use common::*;

const TOKEN: &str = "split-token-0123456789";

fn with_token() -> Launch {
    Launch {
        env: vec![("RINGPROXY_ADMIN_TOKEN".into(), TOKEN.into())],
        ..Launch::default()
    }
}

fn split_config(blue: SocketAddr, green: SocketAddr, weights: (u32, u32), sticky: &str) -> String {
    format!(
        "[runtime]\nshards = 2\ndrain_timeout = \"1s\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\nsplit = \"app\"\nbacklog = 4096\n\n\
         [[pool]]\nname = \"blue\"\nservers = [ {{ addr = \"{blue}\" }} ]\n\n\
         [[pool]]\nname = \"green\"\nservers = [ {{ addr = \"{green}\" }} ]\n\n\
         [[split]]\nname = \"app\"\nsticky = \"{sticky}\"\n\
         backends = [ {{ pool = \"blue\", weight = {} }}, {{ pool = \"green\", weight = {} }} ]\n",
        weights.0, weights.1
    )
}

/// Tagged blue ('b') and green ('g') servers behind a proxy whose listener splits between them.
fn blue_green(weights: (u32, u32), sticky: &str) -> (TestServer, TestServer, Proxy) {
    let blue = TestServer::start(Behaviour::Tagged(b'b'));
    let green = TestServer::start(Behaviour::Tagged(b'g'));
    let proxy = Proxy::launch(
        &split_config(blue.addr, green.addr, weights, sticky),
        with_token(),
    );
    (blue, green, proxy)
}

fn set_weights(proxy: &Proxy, body: &str) -> admin::Response {
    http(proxy.admin(), "PUT", "/splits/app", Some(TOKEN), Some(body))
}

/// One connection through the proxy from `source`: the tag of the server it reached.
fn tag_from(addr: SocketAddr, source: Ipv4Addr) -> Option<u8> {
    let mut stream = connect_from(addr, source, None).ok()?;
    read_tag(&mut stream)
}

/// When a connection was opened, and the tag it got (None: it failed).
type Opened = (Instant, Option<u8>);

/// A client that opens one connection after another until stopped, recording each.
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Opened>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(addr: SocketAddr, clients: u64) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|client| {
                let (stop, seen) = (Arc::clone(&stop), Arc::clone(&seen));
                thread::spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(30);
                    let mut count = 0u64;
                    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                        let opened = Instant::now();
                        let tag = tag_from(addr, source_ip(client * 1000 + count));
                        seen.lock().expect("lock").push((opened, tag));
                        count += 1;
                    }
                })
            })
            .collect();
        Load {
            stop,
            seen,
            threads,
        }
    }

    fn finish(self) -> Vec<Opened> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads {
            let _ = thread.join();
        }
        let mut seen = self.seen.lock().expect("lock").clone();
        seen.sort_by_key(|(at, _)| *at);
        seen
    }
}

fn still_echoes(stream: &mut TcpStream) -> bool {
    stream.write_all(b"ping").is_ok() && {
        let mut answer = [0u8; 4];
        stream.read_exact(&mut answer).is_ok() && &answer == b"ping"
    }
}

/// Blue/green: all new connections move to green right after the API call (within 100 ms on
/// both shards), none fails, and a session opened on blue before the switch stays there.
/// Then the rollback, the same way.
#[test]
fn a_blue_green_switch_and_its_rollback_under_continuous_load() {
    let _serial = serial();
    let (_blue, _green, proxy) = blue_green((100, 0), "none");
    let addr = proxy.addr();
    let mut established = connect(addr);
    assert_eq!(read_tag(&mut established), Some(b'b'));

    let load = Load::start(addr, 4);
    thread::sleep(Duration::from_millis(500));
    // A phase ends when its change is asked for and the next begins once the answer is in
    // (plus the 100 ms allowed): connections in between may go either way.
    let switch_asked = Instant::now();
    let switched = set_weights(&proxy, r#"{"weights": {"blue": 0, "green": 100}}"#);
    let switched_at = Instant::now();
    assert_eq!(switched.status, 200, "{}", switched.body);
    assert_eq!(switched.json()["backends"][1]["weight"], 100);
    thread::sleep(Duration::from_millis(700));
    let rollback_asked = Instant::now();
    let rollback = set_weights(&proxy, r#"{"weights": {"blue": 100, "green": 0}}"#);
    let rolled_back_at = Instant::now();
    assert_eq!(rollback.status, 200, "{}", rollback.body);
    thread::sleep(Duration::from_millis(700));
    let seen = load.finish();

    let failed = seen.iter().filter(|(_, tag)| tag.is_none()).count();
    assert_eq!(failed, 0, "{failed} of {} connections failed", seen.len());
    let settle = Duration::from_millis(100);
    let before: Vec<u8> = seen
        .iter()
        .filter(|(at, _)| *at < switch_asked)
        .filter_map(|(_, tag)| *tag)
        .collect();
    let green_phase: Vec<u8> = seen
        .iter()
        .filter(|(at, _)| *at > switched_at + settle && *at < rollback_asked)
        .filter_map(|(_, tag)| *tag)
        .collect();
    let strays: Vec<String> = seen
        .iter()
        .filter(|(at, tag)| {
            (*at > switched_at + settle && *at < rollback_asked && *tag == Some(b'b'))
                || (*at > rolled_back_at + settle && *tag == Some(b'g'))
        })
        .map(|(at, tag)| {
            format!(
                "{:?} at switch{:+?}ms rollback{:+?}ms",
                tag.map(char::from),
                at.saturating_duration_since(switched_at).as_millis(),
                at.saturating_duration_since(rolled_back_at).as_millis()
            )
        })
        .collect();
    eprintln!("strays: {strays:?}");
    let blue_again: Vec<u8> = seen
        .iter()
        .filter(|(at, _)| *at > rolled_back_at + settle)
        .filter_map(|(_, tag)| *tag)
        .collect();
    for (phase, tags, expected) in [
        ("before the switch", &before, b'b'),
        ("after the switch", &green_phase, b'g'),
        ("after the rollback", &blue_again, b'b'),
    ] {
        assert!(
            tags.len() > 20,
            "too few connections {phase}: {}",
            tags.len()
        );
        let stray = tags.iter().filter(|&&tag| tag != expected).count();
        assert_eq!(
            stray,
            0,
            "{stray} of {} connections {phase} went astray",
            tags.len()
        );
    }
    assert!(
        still_echoes(&mut established),
        "the session opened on blue before the switch is still there"
    );
    let status = admin::status(proxy.admin());
    let split = &status["splits"][0];
    assert_eq!(split["name"], "app");
    assert_eq!(split["weight_changes"], 2, "{split}");
    assert_eq!(split["backends"][0]["pool"], "blue");
    let changes = proxy.logs_with("split weights changed");
    assert_eq!(changes.len(), 2, "each change is logged");
}

/// A 10 % canary gets 10 % (+-2) of 10,000 new connections; `/status` and the metrics count
/// them per side.
#[test]
fn a_ten_percent_canary_gets_ten_percent_of_new_connections() {
    let _serial = serial();
    let (_blue, _green, proxy) = blue_green((90, 10), "none");
    let addr = proxy.addr();
    let greens = Arc::new(Mutex::new((0u32, 0u32, 0u32)));
    let workers: Vec<_> = (0..4u64)
        .map(|worker| {
            let greens = Arc::clone(&greens);
            thread::spawn(move || {
                for n in 0..2500u64 {
                    let tag = tag_from(addr, source_ip(worker * 2500 + n));
                    let mut counts = greens.lock().expect("lock");
                    match tag {
                        Some(b'g') => counts.0 += 1,
                        Some(_) => counts.1 += 1,
                        None => counts.2 += 1,
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.join().expect("worker");
    }
    let (green_count, blue_count, failed) = *greens.lock().expect("lock");
    assert_eq!(failed, 0);
    assert_eq!(green_count + blue_count, 10_000);
    assert!(
        (800..=1200).contains(&green_count),
        "the 10 % canary got {green_count} of 10,000"
    );
    assert!(wait_for(Duration::from_secs(5), || {
        let status = admin::status(proxy.admin());
        status["splits"][0]["backends"][1]["sessions"] == u64::from(green_count)
    }));
    let metrics = admin::get(proxy.admin(), "/metrics").body;
    assert!(
        metrics.contains(&format!(
            "ringproxy_split_sessions_total{{split=\"app\",pool=\"green\"}} {green_count}"
        )),
        "{metrics}"
    );
    assert!(metrics.contains("ringproxy_split_weight{split=\"app\",pool=\"green\"} 10"));
}

/// `sticky = "source"`: each client address keeps its side; when the canary grows, the
/// clients already on it stay.
#[test]
fn sticky_clients_keep_their_side() {
    let _serial = serial();
    let (_blue, _green, proxy) = blue_green((70, 30), "source");
    let addr = proxy.addr();
    let clients: Vec<Ipv4Addr> = (0..60).map(source_ip).collect();
    let sides: Vec<u8> = clients
        .iter()
        .map(|&client| tag_from(addr, client).expect("tag"))
        .collect();
    assert!(sides.contains(&b'g') && sides.contains(&b'b'), "{sides:?}");
    for _ in 0..3 {
        for (client, side) in clients.iter().zip(&sides) {
            assert_eq!(
                tag_from(addr, *client),
                Some(*side),
                "{client} changed sides"
            );
        }
    }
    let grown = set_weights(&proxy, r#"{"weights": {"green": 60}}"#);
    assert_eq!(grown.status, 200, "{}", grown.body);
    assert_eq!(
        grown.json()["backends"][0]["weight"],
        70,
        "blue keeps its weight"
    );
    thread::sleep(Duration::from_millis(200));
    let mut moved = 0;
    for (client, side) in clients.iter().zip(&sides) {
        let now = tag_from(addr, *client).expect("tag");
        if *side == b'g' {
            assert_eq!(now, b'g', "{client} was on the canary and left it");
        } else if now == b'g' {
            moved += 1;
        }
    }
    assert!(moved > 0, "growing the canary moved nobody");
}

/// A reload with new weights in the file switches too, and ends an operator's override; the
/// API refuses what it cannot apply.
#[test]
fn reloads_change_weights_and_bad_requests_change_nothing() {
    let _serial = serial();
    let (blue, green, proxy) = blue_green((100, 0), "none");
    let addr = proxy.addr();
    let only = |tag: u8| (0..20).all(|n| tag_from(addr, source_ip(n)) == Some(tag));

    for (body, status, message) in [
        (r#"{"weights": {"blue": 0}}"#, 400, "would be 0"),
        (r#"{"weights": {"red": 5}}"#, 400, "has no pool"),
        (r#"{"weights": {"blue": 10001}}"#, 400, "from 0 to 10000"),
        (r#"{"weights": {"blue": -1}}"#, 400, "not a whole number"),
        (r#"{"weights": {}}"#, 400, "at least one pool"),
        (r#"{"weight": 5}"#, 400, "unknown key"),
        ("not json", 400, "invalid JSON"),
    ] {
        let answer = set_weights(&proxy, body);
        assert_eq!(answer.status, status, "{body}: {}", answer.body);
        assert!(answer.body.contains(message), "{body}: {}", answer.body);
    }
    let missing = http(
        proxy.admin(),
        "PUT",
        "/splits/nope",
        Some(TOKEN),
        Some(r#"{"weights": {"blue": 1}}"#),
    );
    assert_eq!(missing.status, 404);
    let unauthorised = http(
        proxy.admin(),
        "PUT",
        "/splits/app",
        None,
        Some(r#"{"weights": {"blue": 0, "green": 1}}"#),
    );
    assert_eq!(unauthorised.status, 401);
    assert!(only(b'b'), "refused changes changed nothing");

    // An override, kept across a reload that leaves the split's weights alone ...
    assert_eq!(
        set_weights(&proxy, r#"{"weights": {"blue": 0, "green": 1}}"#).status,
        200
    );
    thread::sleep(Duration::from_millis(150));
    assert!(only(b'g'));
    let reload = http(proxy.admin(), "POST", "/reload", Some(TOKEN), None);
    assert_eq!(reload.status, 200, "{}", reload.body);
    thread::sleep(Duration::from_millis(150));
    assert!(
        only(b'g'),
        "the operator's weights outlive an unrelated reload"
    );
    // ... and ended by one that changes them in the file.
    proxy.rewrite_config(
        &split_config(blue.addr, green.addr, (100, 0), "none").replace(
            "weight = 100 }, { pool = \"green\", weight = 0",
            "weight = 1 }, { pool = \"green\", weight = 0",
        ),
    );
    let reload = http(proxy.admin(), "POST", "/reload", Some(TOKEN), None);
    assert_eq!(reload.status, 200, "{}", reload.body);
    thread::sleep(Duration::from_millis(150));
    assert!(only(b'b'), "the file's new weights win");
}

/// A route may name a split: redis clients go to the split, others to the listener's pool.
#[test]
fn a_route_can_send_to_a_split() {
    let _serial = serial();
    let web = TestServer::start(Behaviour::Tagged(b'w'));
    let blue = TestServer::start(Behaviour::Tagged(b'b'));
    let green = TestServer::start(Behaviour::Tagged(b'g'));
    let text = format!(
        "[runtime]\nshards = 1\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"web\"\n\
         routes = [ {{ protocol = \"redis\", split = \"cache\" }} ]\n\n\
         [[pool]]\nname = \"web\"\nservers = [ {{ addr = \"{}\" }} ]\n\n\
         [[pool]]\nname = \"blue\"\nservers = [ {{ addr = \"{}\" }} ]\n\n\
         [[pool]]\nname = \"green\"\nservers = [ {{ addr = \"{}\" }} ]\n\n\
         [[split]]\nname = \"cache\"\n\
         backends = [ {{ pool = \"blue\", weight = 1 }}, {{ pool = \"green\", weight = 1 }} ]\n",
        web.addr, blue.addr, green.addr
    );
    let proxy = Proxy::start(&text);
    let mut tags = Vec::new();
    for _ in 0..4 {
        let mut stream = connect(proxy.addr());
        stream.write_all(b"*1\r\n$4\r\nPING\r\n").expect("write");
        tags.push(read_tag(&mut stream).expect("tag"));
    }
    tags.sort_unstable();
    assert_eq!(
        tags, b"bbgg",
        "redis clients alternate between the split's pools"
    );
    let mut stream = connect(proxy.addr());
    stream.write_all(b"GET / HTTP/1.1\r\n\r\n").expect("write");
    assert_eq!(read_tag(&mut stream), Some(b'w'));
    // Counted by route: the first sent four clients to the split, the default one to web.
    let expected = [
        "ringproxy_listener_routed_total{listener=\"front\",route=\"1\",to=\"split:cache\"} 4",
        "ringproxy_listener_routed_total{listener=\"front\",route=\"default\",to=\"pool:web\"} 1",
    ];
    let counted = wait_for(Duration::from_secs(5), || {
        let metrics = admin::get(proxy.admin(), "/metrics").body;
        expected.iter().all(|line| metrics.contains(line))
    });
    assert!(counted, "{}", admin::get(proxy.admin(), "/metrics").body);
}
