//! Shared harness for ringload's integration tests: `ringload serve` on an ephemeral loopback
//! port, stopped by PID (its own child) at the end.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::Duration;

pub const BIN: &str = env!("CARGO_BIN_EXE_ringload");

pub struct Server {
    pub child: Child,
    pub addr: SocketAddr,
    lines: mpsc::Receiver<String>,
}

impl Server {
    /// `ringload serve --mode MODE` with one thread unless `extra` says otherwise.
    pub fn start(mode: &str, extra: &[&str]) -> Server {
        let mut child = Command::new(BIN)
            .args([
                "serve",
                "--mode",
                mode,
                "--listen",
                "127.0.0.1:0",
                "--duration",
                "60s",
            ])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ringload");
        let stdout = child.stdout.take().expect("stdout");
        let (sender, lines) = mpsc::channel();
        thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let _ = sender.send(line);
            }
        });
        let first = lines
            .recv_timeout(Duration::from_secs(10))
            .expect("a `listening` line");
        let addr = first
            .strip_prefix("listening ")
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line {first:?}"));
        Server { child, addr, lines }
    }

    pub fn connect(&self) -> TcpStream {
        let stream = TcpStream::connect(self.addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream
    }

    /// SIGTERM, then the summary line; the process must exit 0.
    pub fn stop(mut self) -> String {
        // SAFETY: kill(2) on our own child's PID.
        assert_eq!(
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) },
            0
        );
        let summary = self
            .lines
            .recv_timeout(Duration::from_secs(5))
            .expect("a summary line");
        let status = self.child.wait().expect("wait");
        assert!(status.success(), "{status:?}");
        summary
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
