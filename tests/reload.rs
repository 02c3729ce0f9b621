//! Hot reload on real sockets: 50 reloads under new-connection load lose no connection on the
//! unchanged listener; a bad config is rejected with its location while traffic goes on; a
//! moved listener opens its new address first; restart-only keys are listed as pending.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::admin::{self, http};
use common::*;

const TOKEN: &str = "reload-token";

fn launch(dir: &std::path::Path) -> Launch {
    Launch {
        env: vec![("RINGPROXY_ADMIN_TOKEN".into(), TOKEN.into())],
        config_path: Some(dir.join("ringproxy.toml")),
        ..Launch::default()
    }
}

fn reload(admin: SocketAddr) -> admin::Response {
    http(admin, "POST", "/reload", Some(TOKEN), None)
}

/// `ringload serve --mode echo` on an ephemeral loopback port.
struct EchoBackend {
    child: Child,
    addr: SocketAddr,
}

impl EchoBackend {
    fn start() -> EchoBackend {
        let mut child = Command::new(ringload())
            .args([
                "serve",
                "--mode",
                "echo",
                "--listen",
                "127.0.0.1:0",
                "--threads",
                "1",
                "--duration",
                "5m",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("ringload serve");
        let stdout = child.stdout.take().expect("stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("listening line");
        let addr = line
            .trim()
            .strip_prefix("listening ")
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        EchoBackend { child, addr }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A config with the unchanged `front` listener and, per step, more listeners and pools, and
/// other weights.
fn step_config(backend: SocketAddr, other: SocketAddr, step: usize) -> String {
    let mut text = format!(
        "[runtime]\nshards = 2\ndrain_timeout = \"2s\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\n\
         [[pool]]\nname = \"app\"\nbalance = \"weighted\"\nservers = [\n\
           {{ addr = \"{backend}\", weight = {} }},\n]\n",
        1 + step % 7
    );
    // Extra listeners and pools come and go.
    for extra in 0..(step % 4) {
        text.push_str(&format!(
            "\n[[listener]]\nname = \"extra{extra}\"\nbind = \"127.0.0.1:0\"\npool = \"pool{extra}\"\n\
             \n[[pool]]\nname = \"pool{extra}\"\nservers = [ {{ addr = \"{other}\", weight = {} }} ]\n",
            1 + (step + extra) % 5
        ));
    }
    text
}

#[test]
fn fifty_reloads_under_new_connection_load_lose_no_connection_on_an_unchanged_listener() {
    let backend = EchoBackend::start();
    let other = EchoBackend::start();
    let dir = tempfile::tempdir().expect("tempdir");
    let proxy = Proxy::launch(
        &step_config(backend.addr, other.addr, 0),
        launch(dir.path()),
    );
    let admin = proxy.admin();
    let front = proxy.addr();
    let report = dir.path().join("load.json");
    let mut load = Command::new(ringload())
        .args([
            "rr",
            "--target",
            &front.to_string(),
            "--new-connection-per-request",
        ])
        .args([
            "--connections",
            "8",
            "--threads",
            "1",
            "--duration",
            "30s",
            "--json",
        ])
        .arg(&report)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("ringload rr");
    thread::sleep(Duration::from_millis(500));
    let begun = Instant::now();
    let mut durations = Vec::new();
    for step in 1..=50 {
        proxy.rewrite_config(&step_config(backend.addr, other.addr, step));
        let answer = reload(admin);
        assert_eq!(answer.status, 200, "reload {step}: {}", answer.body);
        let body = answer.json();
        assert_eq!(body["result"], "success");
        durations.push(body["duration_ms"].as_f64().unwrap_or(0.0));
        // The extra listeners of this step accept connections.
        let status = admin::status(admin);
        for listener in status["listeners"].as_array().expect("listeners") {
            let addr: SocketAddr = listener["bind"]
                .as_str()
                .expect("bind")
                .parse()
                .expect("addr");
            if listener["name"] != "front" {
                let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
                    .unwrap_or_else(|error| panic!("reload {step}: {addr}: {error}"));
                stream.write_all(b"hi").expect("write");
                let mut echo = [0u8; 2];
                stream
                    .set_read_timeout(Some(Duration::from_secs(2)))
                    .expect("timeout");
                stream
                    .read_exact(&mut echo)
                    .expect("echo through an added listener");
            }
        }
        thread::sleep(Duration::from_millis(100));
    }
    let reload_time = begun.elapsed();
    // Stop the load (SIGINT: it prints and writes its summary).
    // SAFETY: kill(2) on the PID of our own child process.
    unsafe {
        libc::kill(load.id() as i32, libc::SIGINT);
    }
    let _ = load.wait();
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("load report"))
            .expect("json");
    durations.sort_by(f64::total_cmp);
    eprintln!(
        "50 reloads in {reload_time:?} (apply median {:.2} ms, max {:.2} ms); load: {} requests, errors {}",
        durations[durations.len() / 2],
        durations[durations.len() - 1],
        summary["requests"],
        summary["errors"]
    );
    assert!(
        summary["requests"].as_u64().unwrap_or(0) > 1000,
        "{summary}"
    );
    assert_eq!(
        summary["errors_total"], 0,
        "no failed or reset connection on the unchanged listener: {summary}"
    );
    let status = admin::status(admin);
    assert_eq!(status["reloads"]["success"], 50);
    assert_eq!(status["last_reload"]["result"], "success");
}

#[test]
fn a_bad_reload_is_rejected_with_its_location_and_traffic_goes_on() {
    let echo = TestServer::start(Behaviour::Echo);
    let dir = tempfile::tempdir().expect("tempdir");
    let good = format!(
        "[runtime]\nshards = 1\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\n\
         [[pool]]\nname = \"app\"\nservers = [ {{ addr = \"{}\" }} ]\n",
        echo.addr
    );
    let proxy = Proxy::launch(&good, launch(dir.path()));
    let admin = proxy.admin();
    let mut live = connect(proxy.addr());
    let generation = admin::status(admin)["generation"].clone();
    // Line 10 refers to a pool that does not exist.
    let bad = good.replace("pool = \"app\"\n\n[[pool]]", "pool = \"nope\"\n\n[[pool]]");
    proxy.rewrite_config(&bad);
    let answer = reload(admin);
    assert_eq!(answer.status, 400, "{}", answer.body);
    let error = answer.json()["error"].as_str().unwrap_or("").to_string();
    let path = proxy.config_path().display().to_string();
    assert!(
        error.starts_with(&format!("{path}:10:8:")) && error.contains("\"nope\""),
        "the error carries FILE:LINE:COL: {error}"
    );
    let status = admin::status(admin);
    assert_eq!(status["generation"], generation, "the running config stays");
    assert_eq!(status["last_reload"]["result"], "failure");
    assert_eq!(status["reloads"]["failure"], 1);
    // The log writer is non-blocking: the line may reach stderr a moment later.
    assert!(
        wait_for(Duration::from_secs(3), || {
            proxy
                .logs_with("reload failed; the running config stays")
                .iter()
                .any(|line| line["fields"]["error"].as_str() == Some(&error))
        }),
        "the error is logged"
    );
    // Traffic is unaffected: the live session and new ones.
    live.write_all(b"still").expect("write");
    let mut answer = [0u8; 5];
    live.read_exact(&mut answer).expect("live session");
    let mut fresh = connect(proxy.addr());
    fresh.write_all(b"new").expect("write");
    let mut answer = [0u8; 3];
    fresh.read_exact(&mut answer).expect("new session");
    // SIGHUP reloads too: fix the file, signal, and the generation moves on.
    proxy.rewrite_config(&good);
    proxy.signal(libc::SIGHUP);
    assert!(wait_for(Duration::from_secs(5), || {
        admin::status(admin)["last_reload"]["result"] == "success"
    }));
}

#[test]
fn a_moved_listener_opens_its_new_address_and_restart_only_keys_wait() {
    let echo = TestServer::start(Behaviour::Echo);
    let dir = tempfile::tempdir().expect("tempdir");
    let free = |_: ()| {
        TcpListener::bind("127.0.0.1:0")
            .expect("probe")
            .local_addr()
            .expect("addr")
    };
    let first = free(());
    let config = |bind: SocketAddr, shards: u32, buffer: u32| {
        format!(
            "[runtime]\nshards = {shards}\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
             [tuning]\nbuffer_size = {buffer}\n\n\
             [[listener]]\nname = \"front\"\nbind = \"{bind}\"\npool = \"app\"\n\n\
             [[pool]]\nname = \"app\"\nservers = [ {{ addr = \"{}\" }} ]\n",
            echo.addr
        )
    };
    let proxy = Proxy::launch(&config(first, 1, 16384), launch(dir.path()));
    let admin = proxy.admin();
    let mut established = connect(first);
    let second = free(());
    proxy.rewrite_config(&config(second, 2, 65536));
    let answer = reload(admin);
    assert_eq!(answer.status, 200, "{}", answer.body);
    let pending = answer.json()["pending_restart"].clone();
    assert_eq!(
        pending,
        serde_json::json!(["runtime.shards", "tuning.buffer_size"]),
        "restart-only keys are listed, not applied"
    );
    assert_eq!(admin::status(admin)["pending_restart"], pending);
    // The new address serves; the old one is closed; the established session carries on.
    let mut moved = connect(second);
    moved.write_all(b"x").expect("write");
    let mut byte = [0u8; 1];
    moved
        .read_exact(&mut byte)
        .expect("echo on the new address");
    assert!(
        wait_for(Duration::from_secs(2), || TcpStream::connect(first)
            .is_err()),
        "the old address is closed"
    );
    established.write_all(b"y").expect("write");
    established
        .read_exact(&mut byte)
        .expect("the established session carries on");
    assert_eq!(&byte, b"y");
    // The running config keeps the running values of restart-only keys.
    let running = admin::get(admin, "/config").body;
    assert!(
        running.contains("shards = 1") && running.contains("buffer_size = 16384"),
        "{running}"
    );
    assert!(running.contains(&second.to_string()), "{running}");
}
