//! `ringload rr` against `ringload serve` and small hostile servers, over loopback.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::thread;
use std::time::Duration;

mod common;

use common::{BIN, Server};

fn rr(args: &[&str]) -> (Output, serde_json::Value) {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    let run = RUNS.fetch_add(1, Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!("ringload-rr-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let json = dir.join("summary.json");
    let output = Command::new(BIN)
        .arg("rr")
        .args(args)
        .arg("--json")
        .arg(&json)
        .output()
        .expect("run rr");
    let summary = std::fs::read_to_string(&json)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or(serde_json::Value::Null);
    let _ = std::fs::remove_dir_all(&dir);
    (output, summary)
}

#[test]
fn echo_closed_loop_counts_exactly_and_reports_every_field() {
    let server = Server::start("echo", &["--threads", "1"]);
    let target = server.addr.to_string();
    let (output, summary) = rr(&[
        "--target",
        &target,
        "--connections",
        "16",
        "--requests",
        "20000",
        "--size",
        "300",
        "--threads",
        "2",
    ]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(summary["requests"], 20000, "{summary}");
    assert_eq!(summary["errors_total"], 0, "{summary}");
    assert_eq!(summary["bytes_sent"], 20000 * 300);
    assert_eq!(summary["bytes_received"], 20000 * 300);
    assert_eq!(summary["connections_opened"], 16);
    assert_eq!(summary["loop_kind"], "closed");
    for field in ["p50", "p90", "p99", "p99_9", "p99_99", "max", "mean"] {
        assert!(
            summary["latency_us"][field]
                .as_f64()
                .is_some_and(|v| v > 0.0),
            "{field}: {summary}"
        );
    }
    for kind in ["refused", "reset", "timeout", "mismatch", "status", "other"] {
        assert_eq!(summary["errors"][kind], 0, "{kind}");
    }
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("requests     20000 in"), "{stdout}");
}

#[test]
fn http_keep_alive_and_new_connection_per_request() {
    let server = Server::start("http", &["--threads", "1"]);
    let target = server.addr.to_string();
    let (_, keep_alive) = rr(&[
        "--target",
        &target,
        "--http",
        "--connections",
        "8",
        "--requests",
        "3000",
    ]);
    assert_eq!(keep_alive["requests"], 3000, "{keep_alive}");
    assert_eq!(keep_alive["connections_opened"], 8);
    assert_eq!(keep_alive["errors_total"], 0);
    let (_, per_request) = rr(&[
        "--target",
        &target,
        "--http",
        "--connections",
        "8",
        "--requests",
        "500",
        "--new-connection-per-request",
    ]);
    assert_eq!(per_request["requests"], 500, "{per_request}");
    assert!(
        per_request["connections_opened"]
            .as_u64()
            .is_some_and(|n| n >= 500),
        "{per_request}"
    );
    assert_eq!(per_request["errors_total"], 0);
}

#[test]
fn open_loop_holds_the_rate() {
    let server = Server::start("echo", &["--threads", "1"]);
    let target = server.addr.to_string();
    let (_, summary) = rr(&[
        "--target",
        &target,
        "--connections",
        "8",
        "--duration",
        "2s",
        "--rate",
        "2000",
    ]);
    let requests = summary["requests"].as_u64().expect("requests");
    assert!(
        (3_600..=4_100).contains(&requests),
        "{requests} requests at 2000/s for 2 s"
    );
    assert_eq!(summary["loop_kind"], "open");
}

/// A server that echoes, but flips one byte of the 10th request it answers.
fn corrupting_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        let Ok((mut stream, _)) = listener.accept() else {
            return;
        };
        let mut buffer = [0u8; 64];
        for round in 0..20 {
            if stream.read_exact(&mut buffer).is_err() {
                return;
            }
            if round == 9 {
                buffer[17] ^= 0x01;
            }
            if stream.write_all(&buffer).is_err() {
                return;
            }
        }
    });
    addr
}

#[test]
fn a_corrupted_byte_is_a_mismatch() {
    let addr = corrupting_server().to_string();
    let (output, summary) = rr(&[
        "--target",
        &addr,
        "--connections",
        "1",
        "--threads",
        "1",
        "--duration",
        "1s",
        "--size",
        "64",
    ]);
    assert!(output.status.success(), "{output:?}");
    assert_eq!(summary["errors"]["mismatch"], 1, "{summary}");
    assert_eq!(summary["requests"], 9, "{summary}");
}

/// A server that resets every connection after reading its first request.
fn resetting_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    thread::spawn(move || {
        for stream in listener.incoming().take(5) {
            let Ok(mut stream) = stream else { continue };
            let mut first = [0u8; 8];
            let _ = stream.read(&mut first);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
        }
    });
    addr
}

#[test]
fn resets_and_refusals_are_counted() {
    let addr = resetting_server().to_string();
    let (_, summary) = rr(&[
        "--target",
        &addr,
        "--connections",
        "1",
        "--threads",
        "1",
        "--duration",
        "1s",
        "--size",
        "8",
    ]);
    let resets = summary["errors"]["reset"].as_u64().expect("reset count");
    assert!(resets >= 3, "{summary}");
    assert_eq!(summary["requests"], 0);

    // Bound but never listening: connects are refused and no other test can take the port.
    let holder =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    holder.bind(&any.into()).expect("bind");
    let refused_addr = holder
        .local_addr()
        .expect("addr")
        .as_socket()
        .expect("inet")
        .to_string();
    let (_, summary) = rr(&[
        "--target",
        &refused_addr,
        "--connections",
        "2",
        "--threads",
        "1",
        "--duration",
        "1s",
    ]);
    assert!(
        summary["errors"]["refused"]
            .as_u64()
            .is_some_and(|n| n >= 2),
        "{summary}"
    );
}

#[test]
fn bad_flags_exit_2() {
    for args in [
        vec!["rr", "--target", "127.0.0.1:1"],
        vec![
            "rr",
            "--target",
            "127.0.0.1:1",
            "--duration",
            "1s",
            "--requests",
            "5",
        ],
        vec!["rr", "--target", "127.0.0.1:1", "--duration", "2h"],
        vec![
            "rr",
            "--target",
            "127.0.0.1:1",
            "--duration",
            "1s",
            "--connections",
            "0",
        ],
        vec![
            "rr",
            "--target",
            "127.0.0.1:1",
            "--duration",
            "1s",
            "--rate",
            "-5",
        ],
        vec!["rr", "--target", "192.168.1.1:80", "--duration", "1s"],
        vec!["rr", "--target", "nowhere", "--duration", "1s"],
        vec![
            "rr",
            "--target",
            "127.0.0.1:1",
            "--duration",
            "1s",
            "--connections",
            "50000",
        ],
    ] {
        let output = Command::new(BIN).args(&args).output().expect("run");
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
    }
}

#[test]
fn bulk_sends_to_discard_and_reports() {
    let server = Server::start("discard", &["--threads", "1"]);
    let target = server.addr.to_string();
    let dir = std::env::temp_dir().join(format!("ringload-bulk-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let json = dir.join("bulk.json");
    let output = Command::new(BIN)
        .args([
            "bulk",
            "--target",
            &target,
            "--streams",
            "3",
            "--duration",
            "1s",
            "--threads",
            "1",
            "--json",
        ])
        .arg(&json)
        .output()
        .expect("run bulk");
    assert!(output.status.success(), "{output:?}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parses");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(summary["streams_connected"], 3, "{summary}");
    let sent = summary["bytes_sent"].as_u64().expect("bytes_sent");
    assert!(sent > 10 << 20, "{summary}");
    assert!(summary["gbit_per_s"].as_f64().is_some_and(|g| g > 0.0));
    // Sent means accepted by the kernel: wait until the server has read every byte and closed
    // (it closes each connection after the client's FIN), then ask it what it got.
    let port = server.addr.port();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while server_side_connections(port) > 0 && std::time::Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(server_side_connections(port), 0, "the server did not drain");
    let rest = server.stop();
    let received: u64 = rest
        .split("received ")
        .nth(1)
        .and_then(|tail| tail.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("received count");
    assert!(
        received >= sent,
        "server received {received}, client counted {sent}"
    );

    for args in [
        vec!["bulk", "--target", &target],
        vec![
            "bulk",
            "--target",
            &target,
            "--duration",
            "1s",
            "--streams",
            "0",
        ],
        vec!["bulk", "--target", "10.9.9.9:5201", "--duration", "1s"],
    ] {
        let output = Command::new(BIN).args(&args).output().expect("run");
        assert_eq!(output.status.code(), Some(2), "{args:?}");
    }
}

#[test]
fn hold_spreads_over_worker_processes_and_a_multi_process_sink() {
    let mut child = Command::new(BIN)
        .args([
            "serve",
            "--mode",
            "sink",
            "--listen",
            "127.0.0.1:0",
            "--processes",
            "2",
            "--threads",
            "1",
            "--duration",
            "60s",
        ])
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn sink");
    let mut reader = BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    reader.read_line(&mut line).expect("listening line");
    let target = line
        .trim()
        .strip_prefix("listening ")
        .expect("listening")
        .to_string();
    let sink_pid = child.id().to_string();
    let dir = std::env::temp_dir().join(format!("ringload-hold-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let json = dir.join("hold.json");
    let output = Command::new(BIN)
        .args([
            "hold",
            "--target",
            &target,
            "--connections",
            "3000",
            "--rate",
            "20000",
            "--hold",
            "500ms",
        ])
        .args([
            "--sources",
            "127.0.0.2-127.0.0.5",
            "--per-process",
            "1000",
            "--server-pid",
            &sink_pid,
            "--json",
        ])
        .arg(&json)
        .output()
        .expect("run hold");
    assert!(output.status.success(), "{output:?}");
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("parses");
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(summary["established"], 3000, "{summary}");
    assert_eq!(summary["processes"], 3, "{summary}");
    for field in [
        "failed_refused",
        "failed_timeout",
        "failed_other",
        "lost_while_holding",
    ] {
        assert_eq!(summary[field], 0, "{field}: {summary}");
    }
    assert!(summary["time_to_open_s"].as_f64().is_some_and(|t| t > 0.0));
    assert!(
        summary["server_rss_bytes_per_connection"].is_number(),
        "{summary}"
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("scaling: 3 worker process(es)"));

    // Both sink processes accepted, and their summary adds up to every connection.
    // SAFETY: kill(2) on our own child's PID.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let mut rest = String::new();
    reader.read_to_string(&mut rest).expect("summary");
    let _ = child.wait();
    assert!(rest.contains("served: accepted 3000 connections"), "{rest}");

    let refused = Command::new(BIN)
        .args([
            "hold",
            "--target",
            "127.0.0.1:9",
            "--connections",
            "0",
            "--hold",
            "1s",
        ])
        .output()
        .expect("run");
    assert_eq!(refused.status.code(), Some(2));
    let remote = Command::new(BIN)
        .args([
            "hold",
            "--target",
            "127.0.0.1:9",
            "--connections",
            "5",
            "--hold",
            "1s",
            "--sources",
            "10.0.0.1-10.0.0.3",
        ])
        .output()
        .expect("run");
    assert_eq!(
        remote.status.code(),
        Some(2),
        "non-loopback sources are refused"
    );
}

/// Connections (not the listener) whose local address is 127.0.0.1:`port`, from /proc/net/tcp.
/// The address matters: other tests' clients on 127.0.0.2-5 may hold the same port number.
fn server_side_connections(port: u16) -> usize {
    let local = format!("0100007F:{port:04X}");
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap_or_default();
    table
        .lines()
        .skip(1)
        .filter(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            fields.len() > 3 && fields[1] == local && fields[3] != "0A"
        })
        .count()
}
