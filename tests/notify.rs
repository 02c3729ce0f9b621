//! systemd notification against a fake `NOTIFY_SOCKET` (a unix datagram socket the test owns):
//! READY, RELOADING (with MONOTONIC_USEC), READY, STOPPING, and watchdog pings that stop while
//! a shard is stalled (the test stops one shard thread with ptrace, which no signal can do to a
//! single thread) and resume when it runs again.

mod common;

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use common::admin::http;
use common::*;

const TOKEN: &str = "notify-token";

struct Notifications {
    socket: UnixDatagram,
    seen: Vec<(Instant, String)>,
}

impl Notifications {
    /// Reads whatever arrived until `until` holds or `timeout` passes.
    fn collect_until(
        &mut self,
        timeout: Duration,
        until: impl Fn(&[(Instant, String)]) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut buffer = [0u8; 4096];
        while Instant::now() < deadline {
            if until(&self.seen) {
                return true;
            }
            if let Ok(count) = self.socket.recv(&mut buffer) {
                let text = String::from_utf8_lossy(&buffer[..count]).into_owned();
                self.seen.push((Instant::now(), text));
            }
        }
        until(&self.seen)
    }

    fn contains(&self, needle: &str) -> bool {
        self.seen.iter().any(|(_, text)| text.contains(needle))
    }

    fn pings_between(&self, from: Instant, to: Instant) -> usize {
        self.seen
            .iter()
            .filter(|(at, text)| *at >= from && *at <= to && text.contains("WATCHDOG=1"))
            .count()
    }
}

/// The thread id of the proxy's shard thread `name`.
fn thread_id(pid: i32, name: &str) -> i32 {
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks");
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim() == name {
            return task.file_name().to_string_lossy().parse().expect("tid");
        }
    }
    panic!("no thread {name} in {pid}");
}

/// Stops one thread of another process (and only it) until `resume`.
struct Stalled(i32);

impl Stalled {
    fn stall(tid: i32) -> Stalled {
        // SAFETY: ptrace requests on a thread of our own child process; no memory is passed.
        unsafe {
            assert_eq!(
                libc::ptrace(libc::PTRACE_SEIZE, tid, 0, 0),
                0,
                "PTRACE_SEIZE: {}",
                std::io::Error::last_os_error()
            );
            assert_eq!(
                libc::ptrace(libc::PTRACE_INTERRUPT, tid, 0, 0),
                0,
                "PTRACE_INTERRUPT"
            );
            let mut status = 0;
            libc::waitpid(tid, &mut status, libc::__WALL);
        }
        Stalled(tid)
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        // SAFETY: detaching from the thread this value attached to; it runs on.
        unsafe {
            libc::ptrace(libc::PTRACE_DETACH, self.0, 0, 0);
        }
    }
}

#[test]
fn notify_socket_sees_ready_reloading_stopping_and_watchdog_pings_only_while_shards_turn() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).expect("notify socket");
    socket
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("timeout");
    let mut notes = Notifications {
        socket,
        seen: Vec::new(),
    };
    let echo = TestServer::start(Behaviour::Echo);
    let config = format!(
        "[runtime]\nshards = 2\ndrain_timeout = \"1s\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\n\
         [[pool]]\nname = \"app\"\nservers = [ {{ addr = \"{}\" }} ]\n",
        echo.addr
    );
    let mut proxy = Proxy::launch(
        &config,
        Launch {
            env: vec![
                ("NOTIFY_SOCKET".into(), path.display().to_string()),
                ("WATCHDOG_USEC".into(), "1000000".into()),
                ("RINGPROXY_ADMIN_TOKEN".into(), TOKEN.into()),
            ],
            ..Launch::default()
        },
    );
    assert!(
        notes.collect_until(Duration::from_secs(5), |seen| {
            seen.iter().any(|(_, text)| text.contains("READY=1"))
        }),
        "READY=1: {:?}",
        notes.seen
    );
    let reload = http(proxy.admin(), "POST", "/reload", Some(TOKEN), None);
    assert_eq!(reload.status, 200, "{}", reload.body);
    assert!(notes.collect_until(Duration::from_secs(3), |seen| {
        let reloading = seen.iter().position(|(_, t)| t.contains("RELOADING=1"));
        reloading.is_some_and(|at| seen[at + 1..].iter().any(|(_, t)| t.contains("READY=1")))
    }));
    assert!(notes.contains("MONOTONIC_USEC="), "{:?}", notes.seen);

    // Pings every half interval while every shard turns.
    let begun = Instant::now();
    notes.collect_until(Duration::from_secs(3), |_| false);
    let healthy = notes.pings_between(begun, Instant::now());
    assert!(healthy >= 4, "{healthy} pings in 3 s with a 1 s watchdog");

    // Stall shard 0: the pings stop (within the staleness window), then resume.
    let tid = thread_id(proxy.pid(), "shard-0");
    let stalled = Stalled::stall(tid);
    let stalled_at = Instant::now();
    notes.collect_until(Duration::from_secs(8), |_| false);
    let quiet_from = stalled_at + Duration::from_secs(4);
    let during = notes.pings_between(quiet_from, Instant::now());
    assert_eq!(
        during, 0,
        "no watchdog ping while a shard is stuck: {:?}",
        notes.seen
    );
    drop(stalled);
    let resumed_at = Instant::now();
    assert!(
        notes.collect_until(Duration::from_secs(5), |seen| {
            seen.iter()
                .any(|(at, text)| *at > resumed_at && text.contains("WATCHDOG=1"))
        }),
        "pings resume once the shard runs"
    );

    proxy.signal(libc::SIGTERM);
    assert!(notes.collect_until(Duration::from_secs(5), |seen| {
        seen.iter().any(|(_, text)| text.contains("STOPPING=1"))
    }));
    assert!(
        proxy
            .wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
}
