//! Start, drain, stop and resource exhaustion of the real binary.

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::*;

#[test]
fn sigterm_drains_live_transfer_refuses_new_connects_and_exits_zero() {
    let counter = TestServer::start(Behaviour::CountUntilFin);
    let mut proxy = Proxy::start(&config(2, "", &[server(counter.addr)]));
    let addr = proxy.addr();
    let mut live = connect(addr);
    live.write_all(&[1u8; 100_000]).expect("first part");
    assert!(wait_for(Duration::from_secs(5), || counter.accepted() == 1));

    let signalled = Instant::now();
    proxy.signal(libc::SIGTERM);
    assert!(
        wait_for(Duration::from_secs(5), || TcpStream::connect(addr).is_err()),
        "new connections are still accepted after SIGTERM"
    );
    // The live session keeps relaying both ways during the drain.
    for _ in 0..10 {
        live.write_all(&[2u8; 100_000]).expect("write during drain");
        thread::sleep(Duration::from_millis(20));
    }
    live.shutdown(Shutdown::Write).expect("half-close");
    let mut answer = String::new();
    live.read_to_string(&mut answer)
        .expect("answer during drain");
    assert_eq!(answer, "1100000\n");
    let status = proxy.wait_exit(Duration::from_secs(5)).expect("exited");
    assert!(status.success(), "{status:?}");
    assert!(
        signalled.elapsed() < Duration::from_secs(5),
        "drain_timeout is 5s"
    );
}

#[test]
fn drain_timeout_cuts_sessions_that_do_not_finish() {
    let silent = TestServer::start(Behaviour::Silent);
    let text = config(1, "", &[server(silent.addr)])
        .replace("drain_timeout = \"5s\"", "drain_timeout = \"500ms\"");
    let mut proxy = Proxy::start(&text);
    let mut stuck = connect(proxy.addr());
    assert!(wait_for(Duration::from_secs(5), || silent.accepted() == 1));
    // A blocked read on the stuck session must end with the cut itself (EOF or reset), not
    // with a read timeout.
    stuck
        .set_read_timeout(Some(Duration::from_secs(4)))
        .expect("timeout");
    let signalled = Instant::now();
    let reader = thread::spawn(move || {
        let mut buffer = [0u8; 1];
        let result = stuck.read(&mut buffer);
        (result, signalled.elapsed())
    });
    proxy.signal(libc::SIGTERM);
    let status = proxy.wait_exit(Duration::from_secs(5)).expect("exited");
    let elapsed = signalled.elapsed();
    assert!(status.success(), "{status:?}");
    assert!(
        elapsed >= Duration::from_millis(450),
        "exited before the drain timeout: {elapsed:?}"
    );
    assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
    let (result, cut_after) = reader.join().expect("reader");
    match &result {
        Ok(0) => {}
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!("the stuck session was not closed by the cut: {other:?}"),
    }
    assert!(
        cut_after >= Duration::from_millis(450) && cut_after < Duration::from_secs(2),
        "the client saw the cut {cut_after:?} after SIGTERM (drain_timeout 500ms)"
    );
}

#[test]
fn second_signal_exits_at_once() {
    let silent = TestServer::start(Behaviour::Silent);
    let text = config(1, "", &[server(silent.addr)])
        .replace("drain_timeout = \"5s\"", "drain_timeout = \"60s\"");
    let mut proxy = Proxy::start(&text);
    let _stuck = connect(proxy.addr());
    assert!(wait_for(Duration::from_secs(5), || silent.accepted() == 1));
    proxy.signal(libc::SIGTERM);
    thread::sleep(Duration::from_millis(200));
    assert!(!proxy.has_exited(), "still draining");
    let started = Instant::now();
    proxy.signal(libc::SIGINT);
    let status = proxy.wait_exit(Duration::from_secs(5)).expect("exited");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(status.code(), Some(1));
}

/// A process's descriptor table grows by doubling, and in a threaded process each growth waits
/// for an RCU grace period: a shard that opened the 2,049th descriptor froze for 4-20 ms here
/// (a second on a loaded host) while 1,000 sessions were open. The proxy sizes the table for
/// its configured connections before the shards start, so it never grows while serving.
#[test]
fn descriptor_table_is_sized_before_shards_run_so_it_never_grows_under_load() {
    let echo = TestServer::start(Behaviour::Echo);
    let limit = 6_000;
    let proxy = Proxy::start_with_nofile(
        &config_with(1, "max_connections = 2000", "", &[server(echo.addr)]),
        limit,
    );
    let table = proc_status_number(proxy.pid(), "FDSize").expect("FDSize in /proc/PID/status");
    // Two descriptors per session plus slack, capped at the descriptor limit.
    assert!(
        table >= 4_000,
        "descriptor table of {table} slots for max_connections = 2000"
    );
    assert!(
        table <= 2 * limit,
        "table of {table} slots beyond RLIMIT_NOFILE {limit}"
    );
    let mut client = connect(proxy.addr());
    client.write_all(b"ping").expect("write");
    let mut answer = [0u8; 4];
    client
        .read_exact(&mut answer)
        .expect("echo through the proxy");
    assert_eq!(&answer, b"ping");
}

#[test]
fn bind_conflict_fails_the_start_with_a_clear_message() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("c.toml");
    let text = config(1, "", &[server(addr)]).replace("127.0.0.1:0", &addr.to_string());
    std::fs::write(&path, text).expect("write");
    let output = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("listener \"front\": cannot bind {addr}")),
        "{stderr}"
    );
}

#[test]
fn out_of_descriptors_backs_off_without_spinning_and_recovers() {
    let echo = TestServer::start(Behaviour::Echo);
    let proxy = Proxy::start_with_nofile(&config(1, "", &[server(echo.addr)]), 40);
    let addr = proxy.addr();
    let pid = proxy.pid();
    // Far more connections than 40 descriptors allow: the kernel queues them in the backlog.
    // (`fd_exhausted_shard_keeps_serving_what_fits_and_recovers` in hardening.rs checks which
    // of them are served.)
    let flood: Vec<TcpStream> = (0..60)
        .filter_map(|_| TcpStream::connect(addr).ok())
        .collect();
    thread::sleep(Duration::from_millis(300));
    let cpu_before = cpu_seconds(pid);
    thread::sleep(Duration::from_secs(1));
    let cpu_used = cpu_seconds(pid) - cpu_before;
    drop(flood);
    assert!(cpu_used < 0.3, "spun on EMFILE: {cpu_used} s of CPU in 1 s");
    // Once descriptors are free again, new sessions work.
    let recovered = wait_for(Duration::from_secs(10), || {
        let Ok(mut stream) = TcpStream::connect(addr) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut echoed = [0u8; 2];
        stream.write_all(b"ok").is_ok()
            && stream.read_exact(&mut echoed).is_ok()
            && &echoed == b"ok"
    });
    assert!(
        recovered,
        "the proxy did not recover after descriptors were freed"
    );
}

#[test]
fn sighup_is_ignored_not_fatal() {
    let echo = TestServer::start(Behaviour::Echo);
    let mut proxy = Proxy::start(&config(1, "", &[server(echo.addr)]));
    proxy.signal(libc::SIGHUP);
    assert!(wait_for(Duration::from_secs(5), || {
        proxy.logs().iter().any(|line| {
            line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("SIGHUP"))
        })
    }));
    assert!(!proxy.has_exited(), "SIGHUP killed the proxy");
    let mut stream = connect(proxy.addr());
    stream.write_all(b"still here").expect("write");
    let mut echoed = [0u8; 10];
    stream.read_exact(&mut echoed).expect("echo after SIGHUP");
    assert_eq!(&echoed, b"still here");
}
