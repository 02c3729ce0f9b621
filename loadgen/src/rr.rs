//! `ringload rr`: request/response load on io_uring, every byte checked.
//!
//! Owns the client side: one pinned thread per core, each with its own ring, buffer ring and
//! share of the connections. Echo requests carry a payload that differs per request and must
//! come back byte for byte; `--http` sends `GET` and checks the status and `Content-Length` body.
//! Closed loop by default (each connection sends its next request when the last one is answered);
//! `--rate` is open loop: requests are due at fixed intervals and latency is measured from the
//! time each was due, so a stalled target shows up in the percentiles (no coordinated omission).

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::target::{UsageError, check_addresses};
use ringproxy::config::parse_duration;
use ringproxy::uring::{Completion, Ring, socket};

const MAX_DURATION: Duration = Duration::from_secs(3600);
const TICK: Duration = Duration::from_millis(100);
const RECONNECT_BACKOFF: Duration = Duration::from_millis(100);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

#[derive(Args)]
pub struct RrArgs {
    /// Where to send requests (a proxy, or a server directly).
    #[arg(long)]
    target: SocketAddr,
    #[arg(long, default_value_t = 64)]
    connections: usize,
    /// Run this long ("10s"; at most 1h). Either this or --requests.
    #[arg(long, value_parser = parse_duration, required_unless_present = "requests", conflicts_with = "requests")]
    duration: Option<Duration>,
    /// Stop after this many answered requests (still at most 1h).
    #[arg(long)]
    requests: Option<u64>,
    /// Echo payload bytes per request.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Speak HTTP/1.1: GET --path, keep-alive unless --new-connection-per-request.
    #[arg(long)]
    http: bool,
    #[arg(long, default_value = "/")]
    path: String,
    /// Open a new connection for every request.
    #[arg(long)]
    new_connection_per_request: bool,
    /// Open loop: this many requests per second in total, latency from the intended send time.
    #[arg(long)]
    rate: Option<f64>,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    /// A request unanswered this long counts as a timeout and its connection is replaced.
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    timeout: Duration,
    /// Also write the summary as JSON to this file.
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    allow_remote: bool,
    /// Speak TLS (rustls) to the target: a handshake per new connection.
    #[arg(long)]
    tls: bool,
    /// With --tls: PEM CA bundle the target's certificate must chain to.
    #[arg(long, requires = "tls")]
    ca: Option<PathBuf>,
    /// With --tls and no --ca: accept any certificate (measuring, not verifying).
    #[arg(long, requires = "tls", conflicts_with = "ca")]
    insecure: bool,
    /// With --tls: the SNI sent and the name verified (default: the target's address).
    #[arg(long, requires = "tls")]
    server_name: Option<String>,
    /// With --tls: resume sessions (tickets) on new connections instead of full handshakes.
    #[arg(long, requires = "tls")]
    resume: bool,
    /// With --tls: ALPN protocols to offer, comma-separated ("h2,http/1.1").
    #[arg(long, requires = "tls", value_delimiter = ',')]
    alpn: Vec<String>,
    /// With --tls: a client certificate chain (PEM) for mTLS, with --client-key.
    #[arg(long, requires_all = ["tls", "client_key"])]
    client_cert: Option<PathBuf>,
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
}

#[derive(Debug, Default, Clone, Serialize)]
pub struct Errors {
    pub refused: u64,
    pub reset: u64,
    pub timeout: u64,
    pub mismatch: u64,
    pub status: u64,
    /// A TLS handshake or record the target broke (or refused).
    pub tls: u64,
    pub other: u64,
}

impl Errors {
    pub(crate) fn total(&self) -> u64 {
        self.refused
            + self.reset
            + self.timeout
            + self.mismatch
            + self.status
            + self.tls
            + self.other
    }

    pub(crate) fn add(&mut self, other: &Errors) {
        self.refused += other.refused;
        self.reset += other.reset;
        self.timeout += other.timeout;
        self.mismatch += other.mismatch;
        self.status += other.status;
        self.tls += other.tls;
        self.other += other.other;
    }
}

/// Counters a worker publishes for the progress line (single writer each).
#[derive(Default)]
struct Progress {
    requests: AtomicU64,
    errors: AtomicU64,
    open: AtomicU64,
}

struct WorkerResult {
    requests: u64,
    connections_opened: u64,
    bytes_sent: u64,
    bytes_received: u64,
    errors: Errors,
    latency: Histogram<u64>,
}

#[derive(Serialize)]
struct Summary {
    mode: &'static str,
    target: String,
    connections: usize,
    threads: usize,
    loop_kind: &'static str,
    rate: Option<f64>,
    elapsed_s: f64,
    requests: u64,
    requests_per_s: f64,
    connections_opened: u64,
    bytes_sent: u64,
    bytes_received: u64,
    errors: Errors,
    errors_total: u64,
    latency_us: Percentiles,
}

#[derive(Serialize)]
struct Percentiles {
    p50: f64,
    p90: f64,
    p99: f64,
    p99_9: f64,
    p99_99: f64,
    max: f64,
    mean: f64,
}

fn percentiles(histogram: &Histogram<u64>) -> Percentiles {
    let us = |nanos: u64| nanos as f64 / 1000.0;
    Percentiles {
        p50: us(histogram.value_at_quantile(0.5)),
        p90: us(histogram.value_at_quantile(0.9)),
        p99: us(histogram.value_at_quantile(0.99)),
        p99_9: us(histogram.value_at_quantile(0.999)),
        p99_99: us(histogram.value_at_quantile(0.9999)),
        max: us(histogram.max()),
        mean: histogram.mean() / 1000.0,
    }
}

pub fn run(args: RrArgs) -> anyhow::Result<()> {
    check_addresses(&[args.target], args.allow_remote)?;
    let duration = args.duration.unwrap_or(MAX_DURATION);
    if duration.is_zero() || duration > MAX_DURATION {
        return Err(UsageError("--duration must be more than 0 and at most 1h".into()).into());
    }
    if args.connections == 0 || args.connections > 100_000 {
        return Err(UsageError("--connections must be from 1 to 100000".into()).into());
    }
    if !args.http && (args.size == 0 || args.size > 1 << 20) {
        return Err(UsageError("--size must be from 1 to 1048576".into()).into());
    }
    if args.requests == Some(0) {
        return Err(UsageError("--requests must be at least 1".into()).into());
    }
    if let Some(rate) = args.rate
        && !(rate > 0.0 && rate <= 10_000_000.0)
    {
        return Err(UsageError("--rate must be more than 0 and at most 10000000".into()).into());
    }
    if args.http && !args.path.starts_with('/') {
        return Err(UsageError("--path must start with /".into()).into());
    }
    ringproxy::uring::check_kernel(6, 1).map_err(anyhow::Error::msg)?;
    let files = crate::target::report_limits();
    let budget = files.saturating_sub(100);
    if args.connections as u64 > budget {
        return Err(UsageError(format!(
            "--connections {} exceeds what RLIMIT_NOFILE {files} allows one process ({budget}); use `ringload hold`, which spreads over processes, or raise the limit",
            args.connections
        ))
        .into());
    }
    let threads = crate::process::thread_count(args.threads).clamp(1, args.connections.min(256));
    let tls = if args.tls {
        Some(crate::tls::client_setup(
            &args.target,
            args.ca.as_deref(),
            args.insecure,
            args.server_name.as_deref(),
            args.resume,
            &args.alpn,
            args.client_cert.as_deref().zip(args.client_key.as_deref()),
        )?)
    } else {
        None
    };

    let stop = crate::process::stop_flag()?;
    let request: &'static [u8] = if args.http {
        let close = if args.new_connection_per_request {
            "Connection: close\r\n"
        } else {
            ""
        };
        Box::leak(
            format!(
                "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: ringload\r\n{close}\r\n",
                args.path, args.target
            )
            .into_bytes()
            .into_boxed_slice(),
        )
    } else {
        &[]
    };
    let started = Instant::now();
    let deadline = started + duration;
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let progress: Vec<Arc<Progress>> = (0..threads)
        .map(|_| Arc::new(Progress::default()))
        .collect();
    let mut workers = Vec::with_capacity(threads);
    for index in 0..threads {
        let share = |total: u64| {
            total / threads as u64 + u64::from((index as u64) < total % threads as u64)
        };
        let setup = WorkerSetup {
            target: args.target,
            connections: share(args.connections as u64) as usize,
            requests: args.requests.map(share),
            size: args.size,
            http: args.http.then_some(request),
            new_connection_per_request: args.new_connection_per_request,
            interval: args
                .rate
                .map(|rate| Duration::from_secs_f64(threads as f64 / rate)),
            timeout: args.timeout,
            deadline,
            seed: index as u64,
            tls: tls.clone(),
        };
        let stop = Arc::clone(&stop);
        let progress = Arc::clone(&progress[index]);
        let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
        workers.push(
            std::thread::Builder::new()
                .name(format!("rr-{index}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    Worker::new(setup, progress)?.run(&stop)
                })?,
        );
    }

    let mut requests_before = 0;
    crate::process::progress_until_finished(&workers, |seconds| {
        let sum = |field: fn(&Progress) -> &AtomicU64| -> u64 {
            progress
                .iter()
                .map(|p| field(p).load(Ordering::Relaxed))
                .sum()
        };
        let requests = sum(|p| &p.requests);
        let rate = (requests - requests_before) as f64 / seconds;
        requests_before = requests;
        format!(
            "{rate:>10.0} req/s  errors {}  open {}",
            sum(|p| &p.errors),
            sum(|p| &p.open)
        )
    });
    let mut latency = Histogram::<u64>::new_with_bounds(1, 3_600_000_000_000, 3)?;
    let (mut requests, mut opened, mut sent, mut received) = (0, 0, 0, 0);
    let mut errors = Errors::default();
    for worker in workers {
        let result = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a worker thread panicked"))??;
        requests += result.requests;
        opened += result.connections_opened;
        sent += result.bytes_sent;
        received += result.bytes_received;
        errors.add(&result.errors);
        latency.add(&result.latency)?;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let summary = Summary {
        mode: if args.http { "http" } else { "echo" },
        target: args.target.to_string(),
        connections: args.connections,
        threads,
        loop_kind: if args.rate.is_some() {
            "open"
        } else {
            "closed"
        },
        rate: args.rate,
        elapsed_s: elapsed,
        requests,
        requests_per_s: requests as f64 / elapsed.max(1e-9),
        connections_opened: opened,
        bytes_sent: sent,
        bytes_received: received,
        errors_total: errors.total(),
        errors,
        latency_us: percentiles(&latency),
    };
    print_summary(&summary);
    crate::process::write_json(args.json.as_deref(), &summary)?;
    Ok(())
}

fn print_summary(summary: &Summary) {
    let errors = &summary.errors;
    println!(
        "{} {} to {}: {} connections, {} threads",
        summary.loop_kind, summary.mode, summary.target, summary.connections, summary.threads
    );
    println!(
        "requests     {} in {:.2} s = {:.0} req/s ({} connections opened)",
        summary.requests, summary.elapsed_s, summary.requests_per_s, summary.connections_opened
    );
    println!(
        "bytes        {} sent, {} received ({:.1} MiB/s received)",
        summary.bytes_sent,
        summary.bytes_received,
        summary.bytes_received as f64 / summary.elapsed_s.max(1e-9) / (1 << 20) as f64
    );
    println!(
        "errors       {} (refused {}, reset {}, timeout {}, mismatch {}, status {}, tls {}, other {})",
        summary.errors_total,
        errors.refused,
        errors.reset,
        errors.timeout,
        errors.mismatch,
        errors.status,
        errors.tls,
        errors.other
    );
    let latency = &summary.latency_us;
    println!(
        "latency us   p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  p99.99 {:.1}  max {:.1}",
        latency.p50, latency.p90, latency.p99, latency.p99_9, latency.p99_99, latency.max
    );
}

struct WorkerSetup {
    target: SocketAddr,
    connections: usize,
    requests: Option<u64>,
    size: usize,
    http: Option<&'static [u8]>,
    new_connection_per_request: bool,
    interval: Option<Duration>,
    timeout: Duration,
    deadline: Instant,
    seed: u64,
    /// With --tls: the client config and the server name.
    tls: Option<crate::tls::ClientSetup>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting to reconnect (after an error, or to open the first time).
    Down(Instant),
    Connecting,
    /// TLS: connected, the handshake runs.
    Handshaking,
    /// Connected, no request outstanding.
    Ready,
    /// A request is out: sent (or being sent) and its answer is being read.
    Busy,
    /// Operations are being cancelled; the slot is reusable when `inflight` is zero.
    Closing,
}

#[derive(Debug, Default)]
struct ResponseParser {
    head: Vec<u8>,
    body_left: Option<usize>,
}

struct Conn {
    fd: Option<OwnedFd>,
    phase: Phase,
    inflight: u32,
    receiving: bool,
    /// When the outstanding request was due (open loop) or sent (closed loop).
    started: Instant,
    /// When to reconnect after the connection is closed.
    retry_at: Instant,
    sent: usize,
    send_done: bool,
    received: usize,
    sequence: u64,
    /// Where this request's payload starts in the worker's payload pool.
    payload_offset: usize,
    response: ResponseParser,
    /// With --tls: the session, and its ciphertext buffer (None while a send has it).
    tls: Option<Box<rustls::ClientConnection>>,
    tls_out: Option<Vec<u8>>,
    tls_sending: bool,
    /// Bytes of the ciphertext in flight the socket has taken so far.
    tls_offset: usize,
}

#[derive(Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    Ignored = 0,
    Connect = 1,
    Send = 2,
    Recv = 3,
    TlsSend = 4,
}

fn user_data(op: Op, index: usize) -> u64 {
    ((index as u64) << 8) | op as u64
}

struct Worker {
    ring: Ring,
    setup: WorkerSetup,
    /// Echo payloads (windows of it), or empty with --http.
    pool: &'static [u8],
    conns: Vec<Conn>,
    /// Open loop: the time the next request is due.
    next_due: Option<Instant>,
    /// Requests started; with --requests, no more than the limit are ever started.
    issued: u64,
    answered: u64,
    now: Instant,
    progress: Arc<Progress>,
    result: WorkerResult,
    completions: Vec<Completion>,
}

/// Pseudo-random bytes that every echo payload is a window of. Immutable and kept for the
/// whole run, so sends can point into it; each request uses another offset, so an answer that
/// belongs to another request (or another connection) does not match.
const POOL_WINDOWS: usize = 4093;

fn payload_pool(size: usize, seed: u64) -> &'static [u8] {
    let mut pool = vec![0u8; size + POOL_WINDOWS];
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    for chunk in pool.chunks_mut(8) {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        let bytes = state.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    Box::leak(pool.into_boxed_slice())
}

fn payload_offset(connection: usize, sequence: u64) -> usize {
    ((connection as u64).wrapping_mul(7919) ^ sequence.wrapping_mul(104_729)) as usize
        % POOL_WINDOWS
}

impl Worker {
    fn new(setup: WorkerSetup, progress: Arc<Progress>) -> anyhow::Result<Worker> {
        let ring = Ring::with_buffers(4096, 4096, 16 * 1024)?;
        let pool = match setup.http {
            Some(_) => &[][..],
            None => payload_pool(setup.size, setup.seed),
        };
        let now = Instant::now();
        let conns = (0..setup.connections)
            .map(|_| Conn {
                fd: None,
                phase: Phase::Down(now),
                inflight: 0,
                receiving: false,
                started: now,
                retry_at: now,
                sent: 0,
                send_done: false,
                received: 0,
                sequence: 0,
                payload_offset: 0,
                response: ResponseParser::default(),
                tls: None,
                tls_out: Some(Vec::new()),
                tls_sending: false,
                tls_offset: 0,
            })
            .collect();
        Ok(Worker {
            ring,
            next_due: setup.interval.map(|_| now),
            setup,
            pool,
            conns,
            issued: 0,
            answered: 0,
            now,
            progress,
            result: WorkerResult {
                requests: 0,
                connections_opened: 0,
                bytes_sent: 0,
                bytes_received: 0,
                errors: Errors::default(),
                latency: Histogram::new_with_bounds(1, 3_600_000_000_000, 3)?,
            },
            completions: Vec::with_capacity(1024),
        })
    }

    fn done(&self) -> bool {
        self.now >= self.setup.deadline
            || self
                .setup
                .requests
                .is_some_and(|limit| self.answered >= limit)
    }

    fn run(mut self, stop: &AtomicBool) -> anyhow::Result<WorkerResult> {
        let mut last_tick = self.now;
        while !stop.load(Ordering::Relaxed) && !self.done() {
            self.maintain(last_tick)?;
            if self.now.duration_since(last_tick) >= TICK {
                last_tick = self.now;
            }
            self.ring.buffers_mut().publish();
            let wait = match self.next_due {
                Some(due) => due.saturating_duration_since(self.now).min(TICK),
                None => TICK,
            };
            self.ring
                .submit_and_wait(Some(wait.max(Duration::from_micros(50))))?;
            self.now = Instant::now();
            let mut completions = std::mem::take(&mut self.completions);
            self.ring.drain_completions(&mut completions);
            for completion in completions.drain(..) {
                self.handle(completion)?;
            }
            self.completions = completions;
            self.progress
                .requests
                .store(self.result.requests, Ordering::Relaxed);
            self.progress
                .errors
                .store(self.result.errors.total(), Ordering::Relaxed);
        }
        for index in 0..self.conns.len() {
            if let Some(fd) = self.conns[index].fd.take() {
                self.ring.cancel_fd(fd.as_raw_fd(), Op::Ignored as u64)?;
                self.ring.close(fd, Op::Ignored as u64, true)?;
            }
        }
        self.ring.flush()?;
        self.progress.open.store(0, Ordering::Relaxed);
        Ok(self.result)
    }

    /// Reconnects, starts due requests and expires stuck ones.
    fn maintain(&mut self, last_tick: Instant) -> anyhow::Result<()> {
        let check_timeouts = self.now.duration_since(last_tick) >= TICK;
        let mut open = 0;
        for index in 0..self.conns.len() {
            match self.conns[index].phase {
                Phase::Down(at) if self.now >= at => self.connect(index)?,
                Phase::Ready if self.setup.interval.is_none() => {
                    let now = self.now;
                    self.start_request(index, now)?;
                }
                Phase::Busy | Phase::Handshaking
                    if check_timeouts
                        && self.now.duration_since(self.conns[index].started)
                            >= self.setup.timeout =>
                {
                    self.result.errors.timeout += 1;
                    self.fail(index)?;
                }
                _ => {}
            }
            if matches!(self.conns[index].phase, Phase::Ready | Phase::Busy) {
                open += 1;
            }
        }
        self.progress.open.store(open, Ordering::Relaxed);
        // Open loop: hand every request that is due to a ready connection, oldest first. A due
        // request with no ready connection waits, and its wait counts in its latency.
        if let (Some(interval), Some(mut due)) = (self.setup.interval, self.next_due) {
            while due <= self.now && self.may_issue() {
                let Some(index) = self.conns.iter().position(|c| c.phase == Phase::Ready) else {
                    break;
                };
                self.start_request(index, due)?;
                due += interval;
            }
            self.next_due = Some(due);
        }
        Ok(())
    }

    fn connect(&mut self, index: usize) -> anyhow::Result<()> {
        let fd = match socket::tcp_socket_for(&self.setup.target) {
            Ok(fd) => fd,
            Err(_) => {
                self.result.errors.other += 1;
                self.conns[index].phase = Phase::Down(self.now + RECONNECT_BACKOFF);
                return Ok(());
            }
        };
        let conn = &mut self.conns[index];
        let raw_fd = fd.as_raw_fd();
        conn.fd = Some(fd);
        conn.phase = Phase::Connecting;
        conn.tls = None;
        conn.tls_sending = false;
        conn.tls_offset = 0;
        conn.tls_out.get_or_insert_with(Vec::new);
        conn.inflight += 1;
        self.ring.connect(
            raw_fd,
            self.setup.target,
            CONNECT_TIMEOUT,
            user_data(Op::Connect, index),
            Op::Ignored as u64,
        )?;
        Ok(())
    }

    fn may_issue(&self) -> bool {
        self.setup.requests.is_none_or(|limit| self.issued < limit)
    }

    fn start_request(&mut self, index: usize, due: Instant) -> anyhow::Result<()> {
        if !self.may_issue() {
            return Ok(());
        }
        self.issued += 1;
        let conn = &mut self.conns[index];
        conn.phase = Phase::Busy;
        conn.started = due;
        conn.sent = 0;
        conn.send_done = false;
        conn.received = 0;
        conn.response = ResponseParser {
            head: std::mem::take(&mut conn.response.head),
            body_left: None,
        };
        conn.response.head.clear();
        conn.sequence += 1;
        conn.payload_offset = payload_offset(index, conn.sequence);
        self.send_rest(index)
    }

    fn send_rest(&mut self, index: usize) -> anyhow::Result<()> {
        let conn = &mut self.conns[index];
        let bytes: &'static [u8] = match self.setup.http {
            Some(request) => request,
            None => &self.pool[conn.payload_offset..conn.payload_offset + self.setup.size],
        };
        if let Some(tls) = conn.tls.as_deref_mut() {
            // rustls takes the whole request; its ciphertext goes out by flush_tls.
            use std::io::Write;
            if tls.writer().write_all(&bytes[conn.sent..]).is_err() {
                self.result.errors.tls += 1;
                return self.fail(index);
            }
            conn.sent = bytes.len();
            conn.send_done = true;
            return self.flush_tls(index);
        }
        conn.inflight += 1;
        self.ring.send_static(
            raw(&conn.fd),
            &bytes[conn.sent..],
            user_data(Op::Send, index),
        )?;
        Ok(())
    }

    fn handle(&mut self, completion: Completion) -> anyhow::Result<()> {
        let index = (completion.user_data() >> 8) as usize;
        let op = match completion.user_data() as u8 {
            1 => Op::Connect,
            2 => Op::Send,
            3 => Op::Recv,
            4 => Op::TlsSend,
            _ => return Ok(()),
        };
        if index >= self.conns.len() {
            return Ok(());
        }
        match op {
            Op::Connect => self.on_connect(index, completion.result()),
            Op::Send => self.on_sent(index, completion.result()),
            Op::Recv => self.on_receive(index, completion),
            Op::TlsSend => self.on_tls_sent(index, completion),
            Op::Ignored => Ok(()),
        }
    }

    fn on_connect(&mut self, index: usize, result: i32) -> anyhow::Result<()> {
        let conn = &mut self.conns[index];
        conn.inflight -= 1;
        if conn.phase != Phase::Connecting {
            return self.finish_if_closed(index);
        }
        if result < 0 {
            match -result {
                libc::ECONNREFUSED => self.result.errors.refused += 1,
                libc::ECANCELED | libc::ETIMEDOUT => self.result.errors.timeout += 1,
                _ => self.result.errors.other += 1,
            }
            return self.fail(index);
        }
        self.result.connections_opened += 1;
        conn.phase = Phase::Ready;
        conn.receiving = true;
        conn.inflight += 1;
        self.ring
            .recv_multishot(raw(&conn.fd), user_data(Op::Recv, index))?;
        if let Some(setup) = &self.setup.tls {
            match setup.connect() {
                Ok(tls) => {
                    let conn = &mut self.conns[index];
                    conn.tls = Some(Box::new(tls));
                    conn.phase = Phase::Handshaking;
                    conn.started = self.now;
                    return self.flush_tls(index);
                }
                Err(_) => {
                    self.result.errors.tls += 1;
                    return self.fail(index);
                }
            }
        }
        if self.setup.interval.is_none() {
            let now = self.now;
            self.start_request(index, now)?;
        }
        Ok(())
    }

    fn on_sent(&mut self, index: usize, result: i32) -> anyhow::Result<()> {
        let length = match self.setup.http {
            Some(request) => request.len(),
            None => self.setup.size,
        };
        let conn = &mut self.conns[index];
        conn.inflight -= 1;
        if conn.phase != Phase::Busy {
            return self.finish_if_closed(index);
        }
        if result <= 0 {
            self.result.errors.reset += 1;
            return self.fail(index);
        }
        self.result.bytes_sent += result as u64;
        conn.sent += result as usize;
        if conn.sent < length {
            return self.send_rest(index);
        }
        conn.send_done = true;
        self.complete_if_answered(index)
    }

    fn on_receive(&mut self, index: usize, mut completion: Completion) -> anyhow::Result<()> {
        let token = if completion.result() > 0 {
            self.ring.buffers_mut().take(&mut completion)
        } else {
            None
        };
        let conn = &mut self.conns[index];
        if !completion.more() {
            conn.receiving = false;
            conn.inflight -= 1;
        }
        if matches!(conn.phase, Phase::Closing | Phase::Down(_)) {
            if let Some(token) = token {
                self.ring.buffers_mut().recycle(token);
            }
            return self.finish_if_closed(index);
        }
        let Some(token) = token else {
            if completion.result() == -libc::ENOBUFS {
                // Out of receive buffers for a moment: count it and replace the connection.
                self.result.errors.other += 1;
            } else {
                self.result.errors.reset += 1;
            }
            return self.fail(index);
        };
        let bytes = self.ring.buffers().bytes(&token);
        self.result.bytes_received += bytes.len() as u64;
        let size = self.setup.size;
        let http = self.setup.http.is_some();
        let verdict = match conn.tls.as_deref_mut() {
            Some(tls) => {
                let mut plain = Vec::new();
                let received = crate::tls::receive(tls, bytes, &mut plain);
                self.ring.buffers_mut().recycle(token);
                if received.is_err() {
                    self.result.errors.tls += 1;
                    return self.fail(index);
                }
                if conn.phase == Phase::Handshaking && !tls.is_handshaking() {
                    conn.phase = Phase::Ready;
                }
                self.flush_tls(index)?;
                let conn = &mut self.conns[index];
                if conn.phase == Phase::Ready && plain.is_empty() {
                    if self.setup.interval.is_none() && !self.done() {
                        let now = self.now;
                        self.start_request(index, now)?;
                    }
                    return self.keep_receiving(index);
                }
                if plain.is_empty() {
                    return self.keep_receiving(index);
                }
                judge(conn, self.pool, size, http, &plain)
            }
            None => {
                let verdict = judge(conn, self.pool, size, http, bytes);
                self.ring.buffers_mut().recycle(token);
                verdict
            }
        };
        match verdict {
            Verdict::Partial => self.keep_receiving(index),
            Verdict::Complete => {
                self.conns[index].received = usize::MAX;
                self.keep_receiving(index)?;
                self.complete_if_answered(index)
            }
            Verdict::Mismatch => {
                self.result.errors.mismatch += 1;
                self.fail(index)
            }
            Verdict::BadStatus => {
                self.result.errors.status += 1;
                self.fail(index)
            }
        }
    }

    /// Re-arms a multishot receive that ended without an error.
    fn keep_receiving(&mut self, index: usize) -> anyhow::Result<()> {
        if self.conns[index].receiving || self.conns[index].phase == Phase::Closing {
            return Ok(());
        }
        self.rearm_receive(index)
    }

    /// Sends what rustls has for the target (one send in flight per connection).
    fn flush_tls(&mut self, index: usize) -> anyhow::Result<()> {
        let conn = &mut self.conns[index];
        let Some(tls) = conn.tls.as_deref_mut() else {
            return Ok(());
        };
        if conn.tls_sending || !tls.wants_write() {
            return Ok(());
        }
        let mut out = conn.tls_out.take().unwrap_or_default();
        out.clear();
        while tls.wants_write() {
            if tls.write_tls(&mut out).is_err() {
                break;
            }
        }
        let len = out.len();
        conn.tls_sending = true;
        conn.inflight += 1;
        self.ring
            .send_owned(raw(&conn.fd), out, 0, len, user_data(Op::TlsSend, index))?;
        Ok(())
    }

    fn on_tls_sent(&mut self, index: usize, mut completion: Completion) -> anyhow::Result<()> {
        let result = completion.result();
        let data = completion.take_owned();
        let conn = &mut self.conns[index];
        conn.inflight -= 1;
        conn.tls_sending = false;
        if matches!(conn.phase, Phase::Closing | Phase::Down(_)) {
            return self.finish_if_closed(index);
        }
        let Some(data) = data else {
            self.result.errors.other += 1;
            return self.fail(index);
        };
        if result <= 0 {
            self.result.errors.reset += 1;
            return self.fail(index);
        }
        self.result.bytes_sent += result as u64;
        // The send started at tls_offset; the rest of this ciphertext goes first.
        conn.tls_offset += result as usize;
        if conn.tls_offset < data.len() {
            let (start, len) = (conn.tls_offset, data.len());
            conn.tls_sending = true;
            conn.inflight += 1;
            self.ring.send_owned(
                raw(&conn.fd),
                data,
                start,
                len,
                user_data(Op::TlsSend, index),
            )?;
            return Ok(());
        }
        conn.tls_offset = 0;
        conn.tls_out = Some(data);
        self.flush_tls(index)?;
        self.complete_if_answered(index)
    }

    fn rearm_receive(&mut self, index: usize) -> anyhow::Result<()> {
        let conn = &mut self.conns[index];
        conn.receiving = true;
        conn.inflight += 1;
        self.ring
            .recv_multishot(raw(&conn.fd), user_data(Op::Recv, index))?;
        Ok(())
    }

    /// A request is done once it was fully sent and fully answered.
    fn complete_if_answered(&mut self, index: usize) -> anyhow::Result<()> {
        let conn = &mut self.conns[index];
        if conn.phase != Phase::Busy || !(conn.send_done && conn.received == usize::MAX) {
            return Ok(());
        }
        let latency = self.now.duration_since(conn.started).as_nanos() as u64;
        self.result.latency.saturating_record(latency.max(1));
        self.result.requests += 1;
        self.answered += 1;
        conn.phase = Phase::Ready;
        if self.setup.new_connection_per_request {
            self.close(index, self.now)?;
        } else if self.setup.interval.is_none() && !self.done() {
            let now = self.now;
            self.start_request(index, now)?;
        }
        Ok(())
    }

    /// Replaces a connection after an error.
    fn fail(&mut self, index: usize) -> anyhow::Result<()> {
        if self.conns[index].phase == Phase::Busy {
            // The failed request is not answered: let another take its place.
            self.issued -= 1;
        }
        self.close(index, self.now + RECONNECT_BACKOFF)
    }

    /// Closes the connection; it reconnects at `retry_at`.
    fn close(&mut self, index: usize, retry_at: Instant) -> anyhow::Result<()> {
        let conn = &mut self.conns[index];
        conn.phase = Phase::Closing;
        conn.retry_at = retry_at;
        if conn.inflight > 0
            && let Some(fd) = &conn.fd
        {
            self.ring.cancel_fd(fd.as_raw_fd(), Op::Ignored as u64)?;
        }
        self.finish_if_closed(index)
    }

    fn finish_if_closed(&mut self, index: usize) -> anyhow::Result<()> {
        let conn = &mut self.conns[index];
        if conn.phase != Phase::Closing || conn.inflight > 0 {
            return Ok(());
        }
        if let Some(fd) = conn.fd.take() {
            self.ring.close(fd, Op::Ignored as u64, true)?;
        }
        conn.phase = Phase::Down(conn.retry_at);
        Ok(())
    }
}

/// What `bytes` (more of the answer to the outstanding request) make of it.
fn judge(conn: &mut Conn, pool: &'static [u8], size: usize, http: bool, bytes: &[u8]) -> Verdict {
    if conn.phase != Phase::Busy {
        Verdict::Mismatch
    } else if http {
        parse_response(&mut conn.response, bytes)
    } else {
        let payload = &pool[conn.payload_offset..conn.payload_offset + size];
        let expected = &payload[conn.received.min(payload.len())..];
        if bytes.len() <= expected.len() && expected[..bytes.len()] == *bytes {
            conn.received += bytes.len();
            if conn.received == payload.len() {
                Verdict::Complete
            } else {
                Verdict::Partial
            }
        } else {
            Verdict::Mismatch
        }
    }
}

enum Verdict {
    Partial,
    Complete,
    Mismatch,
    BadStatus,
}

/// Feeds response bytes; complete when the head and `Content-Length` body bytes have arrived.
fn parse_response(response: &mut ResponseParser, mut bytes: &[u8]) -> Verdict {
    if response.body_left.is_none() {
        let before = response.head.len();
        response.head.extend_from_slice(bytes);
        let Some(end) = find(&response.head, b"\r\n\r\n") else {
            return if response.head.len() > MAX_RESPONSE_HEAD {
                Verdict::Mismatch
            } else {
                Verdict::Partial
            };
        };
        let head_len = end + 4;
        let head = String::from_utf8_lossy(&response.head[..head_len]).to_ascii_lowercase();
        let status_ok = head
            .split_ascii_whitespace()
            .nth(1)
            .is_some_and(|code| code.starts_with('2'));
        if !head.starts_with("http/1.") || !status_ok {
            return Verdict::BadStatus;
        }
        let length = head
            .lines()
            .find_map(|line| line.strip_prefix("content-length:"))
            .and_then(|value| value.trim().parse::<usize>().ok());
        let Some(length) = length else {
            return Verdict::Mismatch;
        };
        response.body_left = Some(length);
        bytes = &bytes[(head_len - before)..];
    }
    let left = response.body_left.unwrap_or(0);
    if bytes.len() > left {
        return Verdict::Mismatch;
    }
    response.body_left = Some(left - bytes.len());
    if left == bytes.len() {
        Verdict::Complete
    } else {
        Verdict::Partial
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack
        .windows(needle.len())
        .position(|window| window == needle)
}

/// The raw descriptor of a connection's socket, -1 when it has none (the ring then fails the
/// operation with EBADF).
fn raw(fd: &Option<OwnedFd>) -> RawFd {
    fd.as_ref().map_or(-1, AsRawFd::as_raw_fd)
}
