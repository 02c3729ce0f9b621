//! `ringload hold`: open N connections at a capped rate, hold them, report, close.
//!
//! Owns the orchestration: a process may hold only as many sockets as RLIMIT_NOFILE allows
//! (20,000 on the development machines, and root cannot raise it), so `hold` spawns worker
//! processes of itself (`hold-worker`), each within that budget, and merges what they report
//! (JSON lines on their stdout). A worker is one io_uring thread: sockets are bound to a source
//! address from `--sources` before connecting (IP_BIND_ADDRESS_NO_PORT), so one target port can
//! take far more than one source address's ~55,000 ports.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::{Deserialize, Serialize};

use crate::target::{UsageError, check_addresses};
use ringproxy::config::parse_duration;
use ringproxy::uring::{Completion, Ring, socket};

const MAX_CONNECTIONS: u64 = 2_000_000;
const MAX_HOLD: Duration = Duration::from_secs(3600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Descriptors a worker keeps for itself (ring, stdio, ...) below its RLIMIT_NOFILE.
const RESERVED_FDS: u64 = 200;

#[derive(Args)]
pub struct HoldArgs {
    /// Where to connect; connections are spread round robin over the addresses.
    #[arg(long, value_delimiter = ',', required = true)]
    target: Vec<SocketAddr>,
    #[arg(long)]
    connections: u64,
    /// Connections opened per second at most, in total.
    #[arg(long, default_value_t = 20_000.0)]
    rate: f64,
    /// How long to hold them once opened ("30s"; at most 1h).
    #[arg(long, value_parser = parse_duration)]
    hold: Duration,
    /// IPv4 source addresses to spread over, "127.0.0.2-127.0.0.40" (default: the kernel's).
    #[arg(long)]
    sources: Option<String>,
    /// While holding, send one byte on every connection this often.
    #[arg(long, value_parser = parse_duration)]
    ping: Option<Duration>,
    /// Connections per worker process (default: what RLIMIT_NOFILE allows).
    #[arg(long)]
    per_process: Option<u64>,
    /// Also report the resident memory of these processes (and their children): the server's.
    #[arg(long, value_delimiter = ',')]
    server_pid: Vec<u32>,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    allow_remote: bool,
}

/// One worker's share (internal; `hold` starts these).
#[derive(Args)]
pub struct WorkerArgs {
    #[arg(long, value_delimiter = ',', required = true)]
    target: Vec<SocketAddr>,
    #[arg(long)]
    connections: u64,
    #[arg(long)]
    rate: f64,
    #[arg(long, value_parser = parse_duration)]
    hold: Duration,
    #[arg(long, value_delimiter = ',')]
    sources: Vec<Ipv4Addr>,
    #[arg(long, default_value_t = 0)]
    first_source: usize,
    #[arg(long, value_parser = parse_duration)]
    ping: Option<Duration>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
struct WorkerReport {
    established: u64,
    failed_refused: u64,
    failed_timeout: u64,
    failed_other: u64,
    /// Connections lost while holding (reset, or a failed ping).
    lost: u64,
    /// Seconds from the worker's first connect to its last connect outcome.
    open_seconds: f64,
    rss_before: u64,
    rss_held: u64,
    finished: bool,
}

impl WorkerReport {
    fn failed(&self) -> u64 {
        self.failed_refused + self.failed_timeout + self.failed_other
    }
}

#[derive(Serialize)]
struct Summary {
    mode: &'static str,
    targets: Vec<String>,
    requested: u64,
    established: u64,
    failed_refused: u64,
    failed_timeout: u64,
    failed_other: u64,
    lost_while_holding: u64,
    processes: usize,
    per_process: u64,
    scaling: String,
    rate_cap: f64,
    time_to_open_s: f64,
    client_rss_bytes_per_connection: f64,
    server_rss_before_bytes: Option<u64>,
    server_rss_held_bytes: Option<u64>,
    server_rss_bytes_per_connection: Option<f64>,
}

/// Parses "127.0.0.2-127.0.0.40" (or a single address) into the addresses it spans.
fn parse_sources(text: &str) -> Result<Vec<Ipv4Addr>, UsageError> {
    let bad = || {
        UsageError(format!(
            "--sources {text:?}: expected A.B.C.D or A.B.C.D-A.B.C.D"
        ))
    };
    let (first, last) = match text.split_once('-') {
        Some((first, last)) => (first, last),
        None => (text, text),
    };
    let first: Ipv4Addr = first.trim().parse().map_err(|_| bad())?;
    let last: Ipv4Addr = last.trim().parse().map_err(|_| bad())?;
    let (start, end) = (u32::from(first), u32::from(last));
    if end < start || end - start >= 65_536 {
        return Err(bad());
    }
    Ok((start..=end).map(Ipv4Addr::from).collect())
}

/// Resident memory of a process and all its descendants, in bytes.
fn tree_rss(pid: u32) -> u64 {
    let own = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|rest| {
                    rest.trim()
                        .trim_end_matches("kB")
                        .trim()
                        .parse::<u64>()
                        .ok()
                })
        })
        .unwrap_or(0)
        * 1024;
    let children: u64 = std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|tasks| {
            tasks
                .filter_map(Result::ok)
                .filter_map(|task| std::fs::read_to_string(task.path().join("children")).ok())
                .flat_map(|list| {
                    list.split_whitespace()
                        .filter_map(|child| child.parse::<u32>().ok())
                        .collect::<Vec<_>>()
                })
                .map(tree_rss)
                .sum()
        })
        .unwrap_or(0);
    own + children
}

pub fn run(args: HoldArgs) -> anyhow::Result<()> {
    check_addresses(&args.target, args.allow_remote)?;
    if args.connections == 0 || args.connections > MAX_CONNECTIONS {
        return Err(
            UsageError(format!("--connections must be from 1 to {MAX_CONNECTIONS}")).into(),
        );
    }
    if args.hold > MAX_HOLD {
        return Err(UsageError("--hold must be at most 1h".into()).into());
    }
    if !(args.rate >= 1.0 && args.rate <= 1_000_000.0) {
        return Err(UsageError("--rate must be from 1 to 1000000".into()).into());
    }
    let sources = match &args.sources {
        Some(text) => parse_sources(text)?,
        None => Vec::new(),
    };
    let source_addrs: Vec<SocketAddr> = sources
        .iter()
        .map(|ip| SocketAddr::new(IpAddr::V4(*ip), 0))
        .collect();
    check_addresses(&source_addrs, args.allow_remote)?;
    let fd_budget = socket::open_file_limit()
        .saturating_sub(RESERVED_FDS)
        .max(100);
    let per_process = args.per_process.unwrap_or(fd_budget).clamp(1, fd_budget);
    let processes = args.connections.div_ceil(per_process) as usize;
    let scaling = format!(
        "{processes} worker process(es) of at most {per_process} connections (RLIMIT_NOFILE {})",
        socket::open_file_limit()
    );
    eprintln!(
        "hold: {} connections to {} target(s), {scaling}",
        args.connections,
        args.target.len()
    );
    let server_before: Option<u64> = (!args.server_pid.is_empty())
        .then(|| args.server_pid.iter().map(|&pid| tree_rss(pid)).sum());

    let stop = crate::process::stop_flag()?;
    let exe = std::env::current_exe().context("cannot find the ringload executable")?;
    let targets = args
        .target
        .iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let source_list = sources
        .iter()
        .map(|s| s.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let (sender, reports) = mpsc::channel::<(usize, WorkerReport)>();
    let mut children = Vec::with_capacity(processes);
    let started = Instant::now();
    for index in 0..processes {
        let share = (args.connections - per_process * index as u64).min(per_process);
        let mut command = Command::new(&exe);
        command
            .arg("hold-worker")
            .args(["--target", &targets])
            .args(["--connections", &share.to_string()])
            .args(["--rate", &(args.rate / processes as f64).to_string()])
            .args(["--hold", &format!("{}ms", args.hold.as_millis())])
            .args(["--first-source", &(index * 7).to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if !source_list.is_empty() {
            command.args(["--sources", &source_list]);
        }
        if let Some(ping) = args.ping {
            command.args(["--ping", &format!("{}ms", ping.as_millis())]);
        }
        let mut child = command.spawn().context("cannot start a worker process")?;
        let stdout = child.stdout.take().context("worker stdout")?;
        // A worker stops early when this pipe closes: on our signal, or if we die.
        let stop_pipe = child.stdin.take();
        let sender = sender.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(report) = serde_json::from_str::<WorkerReport>(&line) {
                    let _ = sender.send((index, report));
                }
            }
        });
        children.push((child, stop_pipe));
    }
    drop(sender);

    let mut latest = vec![WorkerReport::default(); processes];
    let mut server_held = None;
    let mut last_print = Instant::now();
    let mut signalled = false;
    loop {
        match reports.recv_timeout(Duration::from_millis(200)) {
            Ok((index, report)) => latest[index] = report,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
        if stop.load(Ordering::Relaxed) && !signalled {
            signalled = true;
            for (_, stop_pipe) in &mut children {
                drop(stop_pipe.take());
            }
        }
        let established: u64 = latest.iter().map(|r| r.established).sum();
        let failed: u64 = latest.iter().map(|r| r.failed()).sum();
        if server_held.is_none()
            && established + failed >= args.connections
            && !args.server_pid.is_empty()
        {
            server_held = Some(
                args.server_pid
                    .iter()
                    .map(|&pid| tree_rss(pid))
                    .sum::<u64>(),
            );
        }
        if last_print.elapsed() >= Duration::from_secs(1) {
            last_print = Instant::now();
            eprintln!(
                "{:>5.0}s  established {established}  failed {failed}  lost {}",
                started.elapsed().as_secs_f64(),
                latest.iter().map(|r| r.lost).sum::<u64>()
            );
        }
    }
    for (mut child, _) in children {
        let _ = child.wait();
    }
    let total = |field: fn(&WorkerReport) -> u64| latest.iter().map(field).sum::<u64>();
    let established = total(|r| r.established);
    let client_growth = total(|r| r.rss_held.saturating_sub(r.rss_before));
    let summary = Summary {
        mode: "hold",
        targets: args.target.iter().map(|t| t.to_string()).collect(),
        requested: args.connections,
        established,
        failed_refused: total(|r| r.failed_refused),
        failed_timeout: total(|r| r.failed_timeout),
        failed_other: total(|r| r.failed_other),
        lost_while_holding: total(|r| r.lost),
        processes,
        per_process,
        scaling,
        rate_cap: args.rate,
        time_to_open_s: latest.iter().map(|r| r.open_seconds).fold(0.0, f64::max),
        client_rss_bytes_per_connection: client_growth as f64 / established.max(1) as f64,
        server_rss_before_bytes: server_before,
        server_rss_held_bytes: server_held,
        server_rss_bytes_per_connection: server_before
            .zip(server_held)
            .map(|(before, held)| held.saturating_sub(before) as f64 / established.max(1) as f64),
    };
    println!(
        "hold: {} of {} established, failed {} (refused {}, timeout {}, other {}), lost while holding {}",
        summary.established,
        summary.requested,
        summary.failed_refused + summary.failed_timeout + summary.failed_other,
        summary.failed_refused,
        summary.failed_timeout,
        summary.failed_other,
        summary.lost_while_holding
    );
    println!("scaling: {}", summary.scaling);
    println!(
        "time to open {:.2} s (rate cap {} conn/s); client memory {:.0} B per connection",
        summary.time_to_open_s, summary.rate_cap, summary.client_rss_bytes_per_connection
    );
    if let Some(per_connection) = summary.server_rss_bytes_per_connection {
        println!(
            "server memory {per_connection:.0} B per connection (RSS of the given PIDs and their children)"
        );
    }
    crate::process::write_json(args.json.as_deref(), &summary)?;
    Ok(())
}

const OP_CONNECT: u64 = 1;
const OP_PING: u64 = 2;
const PING: &[u8] = b"\0";

fn emit(report: &WorkerReport) {
    if let Ok(line) = serde_json::to_string(report) {
        let mut stdout = std::io::stdout().lock();
        let _ = writeln!(stdout, "{line}");
        let _ = stdout.flush();
    }
}

/// The worker: one ring, its share of the connections, JSON report lines on stdout.
pub fn run_worker(args: WorkerArgs) -> anyhow::Result<()> {
    let stop = crate::process::stop_flag()?;
    // The orchestrator holds our stdin open; when it closes (stop requested, or it died), stop.
    crate::process::stop_when_stdin_closes(&stop);
    let mut ring = Ring::new(4096)?;
    let mut report = WorkerReport {
        rss_before: tree_rss(std::process::id()),
        ..WorkerReport::default()
    };
    let count = args.connections as usize;
    // Per connection: the socket (-1 once gone) and whether it is established.
    let mut fds: Vec<Option<OwnedFd>> = Vec::with_capacity(count);
    let mut established = vec![false; count];
    let interval = Duration::from_secs_f64(1.0 / args.rate.max(1e-3));
    let started = Instant::now();
    let mut outcomes = 0usize;
    let mut hold_until: Option<Instant> = None;
    let mut next_ping = None;
    let mut last_emit = Instant::now();
    let mut completions: Vec<Completion> = Vec::with_capacity(4096);
    while !stop.load(Ordering::Relaxed) {
        let now = Instant::now();
        // Open what the rate allows by now.
        let due = ((now.duration_since(started).as_secs_f64() / interval.as_secs_f64()) as usize
            + 1)
        .min(count);
        while fds.len() < due {
            let index = fds.len();
            let target = args.target[index % args.target.len()];
            let opened = if args.sources.is_empty() {
                socket::tcp_socket_for(&target)
            } else {
                let source = args.sources[(args.first_source + index) % args.sources.len()];
                socket::tcp_socket_from(IpAddr::V4(source), &target)
            };
            match opened {
                Ok(fd) => {
                    ring.connect(
                        fd.as_raw_fd(),
                        target,
                        CONNECT_TIMEOUT,
                        (index as u64) << 8 | OP_CONNECT,
                        0,
                    )?;
                    fds.push(Some(fd));
                }
                Err(_) => {
                    report.failed_other += 1;
                    outcomes += 1;
                    fds.push(None);
                }
            }
        }
        if hold_until.is_none() && outcomes == count {
            report.open_seconds = started.elapsed().as_secs_f64();
            report.rss_held = tree_rss(std::process::id());
            hold_until = Some(Instant::now() + args.hold);
            next_ping = args.ping.map(|ping| Instant::now() + ping);
            emit(&report);
        }
        if hold_until.is_some_and(|until| now >= until) {
            break;
        }
        if let (Some(ping), Some(at)) = (args.ping, next_ping)
            && now >= at
        {
            for (index, fd) in fds.iter().enumerate() {
                if let Some(fd) = fd
                    && established[index]
                {
                    ring.send_static(fd.as_raw_fd(), PING, (index as u64) << 8 | OP_PING)?;
                }
            }
            next_ping = Some(at + ping);
        }
        let wait = if fds.len() < count {
            interval.min(Duration::from_millis(100))
        } else {
            Duration::from_millis(100)
        };
        ring.submit_and_wait(Some(wait.max(Duration::from_micros(100))))?;
        ring.drain_completions(&mut completions);
        for completion in completions.drain(..) {
            let index = (completion.user_data() >> 8) as usize;
            if fds.get(index).is_none_or(Option::is_none) {
                continue;
            }
            match completion.user_data() & 0xff {
                OP_CONNECT => {
                    outcomes += 1;
                    if completion.result() == 0 {
                        established[index] = true;
                        report.established += 1;
                    } else {
                        match -completion.result() {
                            libc::ECONNREFUSED => report.failed_refused += 1,
                            libc::ECANCELED | libc::ETIMEDOUT => report.failed_timeout += 1,
                            _ => report.failed_other += 1,
                        }
                        if let Some(fd) = fds[index].take() {
                            ring.close(fd, 0, true)?;
                        }
                    }
                }
                OP_PING if completion.result() < 0 => {
                    report.lost += 1;
                    report.established = report.established.saturating_sub(1);
                    established[index] = false;
                    if let Some(fd) = fds[index].take() {
                        ring.close(fd, 0, true)?;
                    }
                }
                _ => {}
            }
        }
        if last_emit.elapsed() >= Duration::from_millis(500) {
            last_emit = Instant::now();
            emit(&report);
        }
    }
    for fd in fds.into_iter().flatten() {
        ring.cancel_fd(fd.as_raw_fd(), 0)?;
        ring.close(fd, 0, true)?;
    }
    ring.flush()?;
    if report.rss_held == 0 {
        report.rss_held = tree_rss(std::process::id());
        report.open_seconds = started.elapsed().as_secs_f64();
    }
    report.finished = true;
    emit(&report);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ranges_parse() {
        let sources = parse_sources("127.0.0.2-127.0.0.40").unwrap_or_default();
        assert_eq!(sources.len(), 39);
        assert_eq!(sources[0], Ipv4Addr::new(127, 0, 0, 2));
        assert_eq!(parse_sources("127.0.0.9").unwrap_or_default().len(), 1);
        assert!(parse_sources("127.0.0.9-127.0.0.1").is_err());
        assert!(parse_sources("nonsense").is_err());
    }
}
