//! `ringload serve`: deterministic test servers on io_uring.
//!
//! Owns one pinned thread per core, each with its own ring, provided buffer ring and
//! SO_REUSEPORT listeners (the project's `uring` and `listener` modules). Modes:
//! - echo: every byte back in order; FIN after the client's FIN and the last byte;
//! - http: a fixed `200 OK` with `--body-size` bytes for every request head, keep-alive unless
//!   the request carries `Connection: close`;
//! - sink: accept and hold, never read (the client's sends back up);
//! - discard: read and drop; close after the client's FIN.
//!
//! A connection's memory is bounded: echo pauses reads after 8 unsent buffers, the others keep
//! none. Runs until SIGTERM/SIGINT or `--duration`, whichever comes first.

use std::collections::VecDeque;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use slab::Slab;

use crate::target::{UsageError, check_addresses};
use ringproxy::config::parse_duration;
use ringproxy::listener::bind_reuseport;
use ringproxy::uring::{BufToken, Completion, Ring};

const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);
const ECHO_QUEUE_LIMIT: usize = 8;
const MAX_REQUEST_HEAD: usize = 64 * 1024;
const TICK: Duration = Duration::from_millis(100);

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    Echo,
    Http,
    Sink,
    Discard,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Echo => "echo",
            Mode::Http => "http",
            Mode::Sink => "sink",
            Mode::Discard => "discard",
        }
    }
}

#[derive(Args)]
pub struct ServeArgs {
    #[arg(long, value_enum)]
    mode: Mode,
    /// Addresses to listen on, comma separated; port 0 picks a free port. Each bound address is
    /// printed as `listening ADDR` before serving starts.
    #[arg(long, value_delimiter = ',', required = true)]
    listen: Vec<SocketAddr>,
    /// Worker threads, one ring each (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// http: bytes in the body of each response.
    #[arg(long, default_value_t = 3)]
    body_size: usize,
    /// Stop after this long ("30s", "10m"; at most 24h).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 4096)]
    backlog: u32,
    /// Processes sharing the listeners (SO_REUSEPORT), for more connections than one process's
    /// RLIMIT_NOFILE allows; the summary adds them up.
    #[arg(long, default_value_t = 1)]
    processes: usize,
    /// Allow listening on addresses outside loopback.
    #[arg(long)]
    allow_remote: bool,
    /// Set on the extra processes `--processes` starts: stop when stdin closes.
    #[arg(long, hide = true)]
    child: bool,
}

#[derive(Debug, Default, Clone)]
struct Stats {
    accepted: u64,
    bytes_received: u64,
    bytes_sent: u64,
    responses: u64,
}

impl Stats {
    fn add(&mut self, other: &Stats) {
        self.accepted += other.accepted;
        self.bytes_received += other.bytes_received;
        self.bytes_sent += other.bytes_sent;
        self.responses += other.responses;
    }
}

/// The fixed HTTP responses, built once and kept for the life of the process.
#[derive(Clone, Copy)]
struct Responses {
    keep_alive: &'static [u8],
    /// Answers a request that asked for `Connection: close`, and says so.
    closing: &'static [u8],
}

fn http_responses(body_size: usize) -> Responses {
    let body: Vec<u8> = if body_size == 3 {
        b"ok\n".to_vec()
    } else {
        vec![b'x'; body_size]
    };
    let build = |extra_header: &str| -> &'static [u8] {
        let mut response = format!(
            "HTTP/1.1 200 OK\r\nServer: ringload\r\nContent-Type: text/plain\r\nContent-Length: {body_size}\r\n{extra_header}\r\n"
        )
        .into_bytes();
        response.extend_from_slice(&body);
        Box::leak(response.into_boxed_slice())
    };
    Responses {
        keep_alive: build(""),
        closing: build("Connection: close\r\n"),
    }
}

pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    check_addresses(&args.listen, args.allow_remote)?;
    if args.duration > MAX_DURATION || args.duration.is_zero() {
        return Err(UsageError("--duration must be more than 0 and at most 24h".into()).into());
    }
    if args.body_size > 16 << 20 {
        return Err(UsageError("--body-size must be at most 16777216".into()).into());
    }
    if args.processes == 0 || args.processes > 1024 {
        return Err(UsageError("--processes must be from 1 to 1024".into()).into());
    }
    ringproxy::uring::check_kernel(6, 1).map_err(anyhow::Error::msg)?;
    let threads = crate::process::thread_count(args.threads).clamp(1, 256);
    let mut per_thread: Vec<Vec<OwnedFd>> = (0..threads).map(|_| Vec::new()).collect();
    let mut stdout = io::stdout().lock();
    let mut bound_addrs = Vec::with_capacity(args.listen.len());
    for addr in &args.listen {
        let bound = bind_reuseport(*addr, args.backlog, threads)
            .map_err(|(addr, error)| anyhow::anyhow!("cannot listen on {addr}: {error}"))?;
        bound_addrs.push(bound.addr.to_string());
        writeln!(stdout, "listening {}", bound.addr)?;
        for (thread, socket) in bound.sockets.into_iter().enumerate() {
            per_thread[thread].push(socket);
        }
    }
    stdout.flush()?;
    drop(stdout);

    let stop = crate::process::stop_flag()?;
    if args.child {
        crate::process::stop_when_stdin_closes(&stop);
    }
    let mut children = Vec::new();
    for _ in 1..args.processes {
        let exe = std::env::current_exe().context("cannot find the ringload executable")?;
        let mut command = std::process::Command::new(exe);
        command
            .args(["serve", "--child", "--processes", "1"])
            .args(["--mode", args.mode.name()])
            .args(["--listen", &bound_addrs.join(",")])
            .args(["--threads", &threads.to_string()])
            .args(["--body-size", &args.body_size.to_string()])
            .args(["--duration", &format!("{}ms", args.duration.as_millis())])
            .args(["--backlog", &args.backlog.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped());
        if args.allow_remote {
            command.arg("--allow-remote");
        }
        children.push(command.spawn().context("cannot start a serve process")?);
    }
    let responses = http_responses(args.body_size);
    let deadline = Instant::now() + args.duration;
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let workers: Vec<_> = per_thread
        .into_iter()
        .enumerate()
        .map(|(index, listeners)| {
            let stop = Arc::clone(&stop);
            let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
            let mode = args.mode;
            std::thread::Builder::new()
                .name(format!("serve-{index}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    Worker::new(mode, responses, listeners)?.run(&stop, deadline)
                })
        })
        .collect::<Result<_, _>>()?;
    let mut total = Stats::default();
    for worker in workers {
        let stats = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a worker thread panicked"))??;
        total.add(&stats);
    }
    for mut child in children {
        drop(child.stdin.take());
        let mut output = String::new();
        if let Some(mut stdout) = child.stdout.take() {
            let _ = io::Read::read_to_string(&mut stdout, &mut output);
        }
        let _ = child.wait();
        if let Some(stats) = output.lines().find_map(parse_summary) {
            total.add(&stats);
        }
    }
    println!(
        "served: accepted {} connections, received {} bytes, sent {} bytes, {} responses",
        total.accepted, total.bytes_received, total.bytes_sent, total.responses
    );
    Ok(())
}

/// Reads back a `served: ...` summary line (from a child process).
fn parse_summary(line: &str) -> Option<Stats> {
    let numbers: Vec<u64> = line
        .strip_prefix("served: ")?
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|part| part.parse().ok())
        .collect();
    match numbers[..] {
        [accepted, bytes_received, bytes_sent, responses] => Some(Stats {
            accepted,
            bytes_received,
            bytes_sent,
            responses,
        }),
        _ => None,
    }
}

/// Case-insensitive streaming match of a byte pattern whose first byte does not recur in it
/// except at positions where restarting on that byte is still correct (`\r` here).
#[derive(Debug, Default, Clone, Copy)]
struct Matcher {
    progress: usize,
}

impl Matcher {
    fn feed(&mut self, pattern: &[u8], byte: u8) -> bool {
        let byte = byte.to_ascii_lowercase();
        if byte == pattern[self.progress] {
            self.progress += 1;
            if self.progress == pattern.len() {
                self.progress = 0;
                return true;
            }
        } else {
            self.progress = usize::from(byte == pattern[0]);
        }
        false
    }
}

const HEAD_END: &[u8] = b"\r\n\r\n";
const CONNECTION_CLOSE: &[u8] = b"\r\nconnection: close";

#[derive(Debug, Default)]
struct HttpState {
    head_end: Matcher,
    close_header: Matcher,
    head_bytes: usize,
    /// Complete request heads not yet answered.
    due: u32,
    /// Bytes of the current response already sent.
    sent: usize,
    sending: bool,
    /// The response being sent is the last one, announcing the close.
    sending_closing: bool,
    /// The head being read carries `Connection: close`.
    close_requested: bool,
    /// Close once the answered requests are sent (Connection: close, or the client's FIN).
    close_after: bool,
}

/// A received buffer not yet fully echoed.
#[derive(Debug)]
struct Pending {
    token: BufToken,
    sent: u32,
}

/// The bytes of one connection on their way back (echo) or to be dropped. Its own small state,
/// not the proxy's relay machine: a bug in one must not hide in the other's tests.
#[derive(Debug, Default)]
struct Flow {
    queue: VecDeque<Pending>,
    /// A send of `queue.front()` is in flight.
    sending: bool,
    /// A multishot receive is armed.
    receiving: bool,
    /// Reads stopped because `queue` reached its limit.
    paused: bool,
    /// Reads stopped because the buffer ring was empty.
    starved: bool,
    /// The client sent FIN.
    eof: bool,
}

impl Flow {
    fn is_flushed(&self) -> bool {
        self.queue.is_empty() && !self.sending
    }

    /// Lifts a pause once the old receive has ended and the queue is down to half of `limit`.
    fn resume_if_drained(&mut self, limit: usize) -> bool {
        let resume = self.paused && !self.receiving && self.queue.len() < limit.div_ceil(2).max(1);
        if resume {
            self.paused = false;
        }
        resume
    }

    fn wants_receive(&self) -> bool {
        !self.receiving && !self.paused && !self.starved && !self.eof
    }
}

#[derive(Debug)]
struct Conn {
    fd: OwnedFd,
    flow: Flow,
    http: HttpState,
    inflight: u32,
    closing: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Ignored = 0,
    Accept = 1,
    Recv = 2,
    SendEcho = 3,
    SendResponse = 4,
}

fn user_data(op: Op, index: usize) -> u64 {
    ((index as u64) << 8) | op as u64
}

struct Worker {
    ring: Ring,
    mode: Mode,
    responses: Responses,
    listeners: Vec<OwnedFd>,
    accept_retry_at: Vec<Option<Instant>>,
    conns: Slab<Conn>,
    starved: Vec<usize>,
    completions: Vec<Completion>,
    now: Instant,
    stats: Stats,
}

impl Worker {
    fn new(mode: Mode, responses: Responses, listeners: Vec<OwnedFd>) -> io::Result<Worker> {
        let ring = Ring::with_buffers(4096, 2048, 16 * 1024)?;
        let count = listeners.len();
        Ok(Worker {
            ring,
            mode,
            responses,
            listeners,
            accept_retry_at: vec![None; count],
            conns: Slab::new(),
            starved: Vec::new(),
            completions: Vec::with_capacity(1024),
            now: Instant::now(),
            stats: Stats::default(),
        })
    }

    fn run(mut self, stop: &AtomicBool, deadline: Instant) -> io::Result<Stats> {
        for index in 0..self.listeners.len() {
            let fd = self.listeners[index].as_raw_fd();
            self.ring
                .accept_multishot(fd, user_data(Op::Accept, index))?;
        }
        while !stop.load(Ordering::Relaxed) && self.now < deadline {
            self.ring.buffers_mut().publish();
            self.ring.submit_and_wait(Some(TICK))?;
            self.now = Instant::now();
            let mut completions = std::mem::take(&mut self.completions);
            self.ring.drain_completions(&mut completions);
            for completion in completions.drain(..) {
                self.handle(completion)?;
            }
            self.completions = completions;
            self.retry_accepts()?;
            self.rearm_starved()?;
        }
        // Closing the ring cancels what is in flight; the sockets close with the process.
        for index in self
            .conns
            .iter()
            .map(|(index, _)| index)
            .collect::<Vec<_>>()
        {
            let conn = self.conns.remove(index);
            self.ring
                .cancel_fd(conn.fd.as_raw_fd(), Op::Ignored as u64)?;
            self.ring.close(conn.fd, Op::Ignored as u64, true)?;
        }
        for listener in std::mem::take(&mut self.listeners) {
            self.ring
                .cancel_fd(listener.as_raw_fd(), Op::Ignored as u64)?;
            self.ring.close(listener, Op::Ignored as u64, true)?;
        }
        self.ring.flush()?;
        Ok(self.stats)
    }

    fn handle(&mut self, completion: Completion) -> io::Result<()> {
        let index = (completion.user_data() >> 8) as usize;
        let op = match completion.user_data() as u8 {
            1 => Op::Accept,
            2 => Op::Recv,
            3 => Op::SendEcho,
            4 => Op::SendResponse,
            _ => Op::Ignored,
        };
        if op == Op::Ignored {
            return Ok(());
        }
        if op == Op::Accept {
            return self.on_accept(index, completion);
        }
        if !self.conns.contains(index) {
            return Ok(());
        }
        match op {
            Op::Recv => self.on_receive(index, completion),
            Op::SendEcho => self.on_echo_sent(index, completion.result()),
            Op::SendResponse => self.on_response_sent(index, completion.result()),
            Op::Accept | Op::Ignored => Ok(()),
        }
    }

    fn on_accept(&mut self, listener: usize, mut completion: Completion) -> io::Result<()> {
        if !completion.more() {
            self.accept_retry_at[listener] = Some(if completion.result() < 0 {
                self.now + TICK
            } else {
                self.now
            });
        }
        let Some(fd) = completion.accepted_fd() else {
            return Ok(());
        };
        self.stats.accepted += 1;
        let index = self.conns.insert(Conn {
            fd,
            flow: Flow::default(),
            http: HttpState::default(),
            inflight: 0,
            closing: false,
        });
        if self.mode != Mode::Sink {
            self.arm_receive(index)?;
        }
        Ok(())
    }

    fn retry_accepts(&mut self) -> io::Result<()> {
        for listener in 0..self.listeners.len() {
            if let Some(at) = self.accept_retry_at[listener]
                && self.now >= at
            {
                self.accept_retry_at[listener] = None;
                let fd = self.listeners[listener].as_raw_fd();
                self.ring
                    .accept_multishot(fd, user_data(Op::Accept, listener))?;
            }
        }
        Ok(())
    }

    fn arm_receive(&mut self, index: usize) -> io::Result<()> {
        let conn = &mut self.conns[index];
        if conn.closing || !conn.flow.wants_receive() {
            return Ok(());
        }
        conn.flow.receiving = true;
        conn.inflight += 1;
        // A test server reads what its clients send as fast as it comes: multishot is fine.
        self.ring
            .recv_multishot(conn.fd.as_raw_fd(), user_data(Op::Recv, index))
    }

    fn rearm_starved(&mut self) -> io::Result<()> {
        while self.ring.buffers().available() > 0 {
            let Some(index) = self.starved.pop() else {
                break;
            };
            if let Some(conn) = self.conns.get_mut(index) {
                conn.flow.starved = false;
                self.arm_receive(index)?;
            }
        }
        Ok(())
    }

    fn on_receive(&mut self, index: usize, mut completion: Completion) -> io::Result<()> {
        let token = if completion.result() > 0 {
            self.ring.buffers_mut().take(&mut completion)
        } else {
            None
        };
        let conn = &mut self.conns[index];
        if !completion.more() {
            conn.flow.receiving = false;
            conn.inflight -= 1;
            conn.flow.resume_if_drained(ECHO_QUEUE_LIMIT);
        }
        if conn.closing {
            if let Some(token) = token {
                self.ring.buffers_mut().recycle(token);
            }
            return self.finish_if_done(index);
        }
        match completion.result() {
            1.. => {
                let Some(token) = token else {
                    return self.close(index);
                };
                self.stats.bytes_received += u64::from(token.len());
                match self.mode {
                    Mode::Echo => {
                        conn.flow.queue.push_back(Pending { token, sent: 0 });
                        if conn.flow.queue.len() >= ECHO_QUEUE_LIMIT && !conn.flow.paused {
                            conn.flow.paused = true;
                            if conn.flow.receiving {
                                self.ring
                                    .cancel(user_data(Op::Recv, index), Op::Ignored as u64)?;
                            }
                        }
                        self.send_echo(index)?;
                    }
                    Mode::Http => {
                        let too_long =
                            scan_requests(&mut conn.http, self.ring.buffers().bytes(&token));
                        self.ring.buffers_mut().recycle(token);
                        if too_long {
                            return self.close(index);
                        }
                        if conn.http.close_after {
                            // Nothing after `Connection: close` is answered: stop reading.
                            conn.flow.eof = true;
                        }
                        self.send_response(index)?;
                    }
                    Mode::Discard | Mode::Sink => self.ring.buffers_mut().recycle(token),
                }
            }
            0 => {
                conn.flow.eof = true;
                conn.http.close_after = true;
                return self.close_if_done(index);
            }
            error if error == -libc::ENOBUFS => {
                if !conn.flow.starved {
                    conn.flow.starved = true;
                    self.starved.push(index);
                }
            }
            error if error == -libc::ECANCELED => {}
            _ => return self.close(index),
        }
        if self.conns.contains(index) {
            self.arm_receive(index)?;
        }
        Ok(())
    }

    fn send_echo(&mut self, index: usize) -> io::Result<()> {
        let conn = &mut self.conns[index];
        if conn.flow.sending {
            return Ok(());
        }
        let Some(head) = conn.flow.queue.front() else {
            return Ok(());
        };
        conn.flow.sending = true;
        conn.inflight += 1;
        self.ring.send(
            conn.fd.as_raw_fd(),
            &head.token,
            head.sent,
            user_data(Op::SendEcho, index),
        )
    }

    fn on_echo_sent(&mut self, index: usize, result: i32) -> io::Result<()> {
        let conn = &mut self.conns[index];
        conn.inflight -= 1;
        conn.flow.sending = false;
        let Some(head) = conn.flow.queue.front_mut() else {
            return self.finish_if_done(index);
        };
        self.ring.buffers_mut().send_completed(&head.token);
        if conn.closing {
            return self.finish_if_done(index);
        }
        if result <= 0 {
            return self.close(index);
        }
        self.stats.bytes_sent += result as u64;
        head.sent += result as u32;
        if head.sent >= head.token.len()
            && let Some(done) = conn.flow.queue.pop_front()
        {
            self.ring.buffers_mut().recycle(done.token);
        }
        let resume = conn.flow.resume_if_drained(ECHO_QUEUE_LIMIT);
        self.send_echo(index)?;
        if resume {
            self.arm_receive(index)?;
        }
        self.close_if_done(index)
    }

    fn send_response(&mut self, index: usize) -> io::Result<()> {
        let conn = &mut self.conns[index];
        if conn.http.sending || conn.http.due == 0 {
            return Ok(());
        }
        conn.http.sending = true;
        conn.inflight += 1;
        // The answer to the request that asked to close is the last one; it says so.
        conn.http.sending_closing = conn.http.close_requested && conn.http.due == 1;
        let response = if conn.http.sending_closing {
            self.responses.closing
        } else {
            self.responses.keep_alive
        };
        let rest = &response[conn.http.sent..];
        self.ring.send_static(
            conn.fd.as_raw_fd(),
            rest,
            user_data(Op::SendResponse, index),
        )
    }

    fn on_response_sent(&mut self, index: usize, result: i32) -> io::Result<()> {
        let conn = &mut self.conns[index];
        let response_len = if conn.http.sending_closing {
            self.responses.closing.len()
        } else {
            self.responses.keep_alive.len()
        };
        conn.inflight -= 1;
        conn.http.sending = false;
        if conn.closing {
            return self.finish_if_done(index);
        }
        if result <= 0 {
            return self.close(index);
        }
        self.stats.bytes_sent += result as u64;
        conn.http.sent += result as usize;
        if conn.http.sent >= response_len {
            conn.http.sent = 0;
            conn.http.due -= 1;
            self.stats.responses += 1;
        }
        self.send_response(index)?;
        self.close_if_done(index)
    }

    /// Closes once the client is done and everything owed has been sent.
    fn close_if_done(&mut self, index: usize) -> io::Result<()> {
        let Some(conn) = self.conns.get(index) else {
            return Ok(());
        };
        let done = match self.mode {
            Mode::Echo | Mode::Discard | Mode::Sink => conn.flow.eof && conn.flow.is_flushed(),
            Mode::Http => conn.http.close_after && conn.http.due == 0 && !conn.http.sending,
        };
        if done { self.close(index) } else { Ok(()) }
    }

    fn close(&mut self, index: usize) -> io::Result<()> {
        let conn = &mut self.conns[index];
        if conn.closing {
            return Ok(());
        }
        conn.closing = true;
        if conn.inflight > 0 {
            self.ring
                .cancel_fd(conn.fd.as_raw_fd(), Op::Ignored as u64)?;
        }
        self.finish_if_done(index)
    }

    fn finish_if_done(&mut self, index: usize) -> io::Result<()> {
        let Some(conn) = self.conns.get(index) else {
            return Ok(());
        };
        if !conn.closing || conn.inflight > 0 {
            return Ok(());
        }
        let conn = self.conns.remove(index);
        for pending in conn.flow.queue {
            self.ring.buffers_mut().recycle(pending.token);
        }
        self.ring.close(conn.fd, Op::Ignored as u64, true)
    }
}

/// Counts complete request heads in `bytes`; returns true when a head grows past the limit.
/// After a head carrying `Connection: close`, nothing more is counted.
fn scan_requests(http: &mut HttpState, bytes: &[u8]) -> bool {
    for &byte in bytes {
        if http.close_after {
            break;
        }
        http.head_bytes += 1;
        if http.close_header.feed(CONNECTION_CLOSE, byte) {
            http.close_requested = true;
        }
        if http.head_end.feed(HEAD_END, byte) {
            http.due += 1;
            http.head_bytes = 0;
            http.close_header = Matcher::default();
            if http.close_requested {
                http.close_after = true;
            }
        } else if http.head_bytes > MAX_REQUEST_HEAD {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_pipelined_heads_split_anywhere() {
        let requests = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /2 HTTP/1.1\r\n\r\nGET /3 HTTP/1.1\r\nX: y\r\n\r\n";
        for split in 0..requests.len() {
            let mut http = HttpState::default();
            assert!(!scan_requests(&mut http, &requests[..split]));
            assert!(!scan_requests(&mut http, &requests[split..]));
            assert_eq!(http.due, 3, "split at {split}");
            assert!(!http.close_after);
        }
    }

    #[test]
    fn connection_close_ends_after_its_own_head() {
        let requests =
            b"GET / HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\nConnection: Close\r\nHost: a\r\n\r\nGET /late HTTP/1.1\r\n\r\n";
        let mut http = HttpState::default();
        assert!(!scan_requests(&mut http, requests));
        assert_eq!(http.due, 2);
        assert!(http.close_after);
    }

    #[test]
    fn oversized_head_is_refused() {
        let mut http = HttpState::default();
        assert!(scan_requests(&mut http, &vec![b'a'; MAX_REQUEST_HEAD + 1]));
    }
}
