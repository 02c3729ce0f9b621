//! `ringload bulk`: throughput of M streams that send as fast as the target takes it.
//!
//! Owns one pinned thread per core, each with its own ring and share of the streams. Every
//! stream keeps one send in flight from an immutable pool of pseudo-random bytes (it lives for
//! the run, so sends may point into it) and counts what the kernel accepted. Use it against
//! `ringload serve --mode discard`, directly or through a proxy.

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use clap::Args;
use serde::Serialize;

use crate::rr::Errors;
use crate::target::{UsageError, check_addresses};
use ringproxy::config::parse_duration;
use ringproxy::uring::{Completion, Ring, socket};

const MAX_DURATION: Duration = Duration::from_secs(3600);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Args)]
pub struct BulkArgs {
    #[arg(long)]
    target: SocketAddr,
    /// Concurrent streams (1-10000).
    #[arg(long, default_value_t = 1)]
    streams: usize,
    /// How long to send ("10s"; at most 1h).
    #[arg(long, value_parser = parse_duration)]
    duration: Duration,
    /// Bytes per send.
    #[arg(long, default_value_t = 128 * 1024)]
    chunk: usize,
    /// Worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
    #[arg(long)]
    json: Option<PathBuf>,
    #[arg(long)]
    allow_remote: bool,
}

#[derive(Serialize)]
struct Summary {
    mode: &'static str,
    target: String,
    streams: usize,
    threads: usize,
    elapsed_s: f64,
    bytes_sent: u64,
    gbit_per_s: f64,
    streams_connected: u64,
    errors: Errors,
}

#[derive(Default)]
struct WorkerResult {
    bytes_sent: u64,
    connected: u64,
    errors: Errors,
}

pub fn run(args: BulkArgs) -> anyhow::Result<()> {
    check_addresses(&[args.target], args.allow_remote)?;
    if args.duration.is_zero() || args.duration > MAX_DURATION {
        return Err(UsageError("--duration must be more than 0 and at most 1h".into()).into());
    }
    if args.streams == 0 || args.streams > 10_000 {
        return Err(UsageError("--streams must be from 1 to 10000".into()).into());
    }
    if args.chunk == 0 || args.chunk > 16 << 20 {
        return Err(UsageError("--chunk must be from 1 to 16777216".into()).into());
    }
    ringproxy::uring::check_kernel(6, 1).map_err(anyhow::Error::msg)?;
    crate::target::report_limits();
    let threads = crate::process::thread_count(args.threads).clamp(1, args.streams.min(256));
    let stop = crate::process::stop_flag()?;
    let pool: &'static [u8] = {
        let mut bytes = vec![0u8; args.chunk];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for byte in &mut bytes {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            *byte = state as u8;
        }
        Box::leak(bytes.into_boxed_slice())
    };
    let started = Instant::now();
    let deadline = started + args.duration;
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let sent_counters: Vec<Arc<AtomicU64>> =
        (0..threads).map(|_| Arc::new(AtomicU64::new(0))).collect();
    let mut workers = Vec::with_capacity(threads);
    for index in 0..threads {
        let streams = args.streams / threads + usize::from(index < args.streams % threads);
        let stop = Arc::clone(&stop);
        let counter = Arc::clone(&sent_counters[index]);
        let core = (!cores.is_empty()).then(|| cores[index % cores.len()]);
        let target = args.target;
        workers.push(
            std::thread::Builder::new()
                .name(format!("bulk-{index}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    send_streams(target, streams, pool, deadline, &stop, &counter)
                })?,
        );
    }
    let mut sent_before = 0;
    crate::process::progress_until_finished(&workers, |seconds| {
        let sent: u64 = sent_counters
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        let rate = (sent - sent_before) as f64 * 8.0 / seconds / 1e9;
        sent_before = sent;
        format!("{rate:>8.2} Gbit/s")
    });
    let mut total = WorkerResult::default();
    for worker in workers {
        let result = worker
            .join()
            .map_err(|_| anyhow::anyhow!("a worker thread panicked"))??;
        total.bytes_sent += result.bytes_sent;
        total.connected += result.connected;
        total.errors.add(&result.errors);
    }
    let elapsed = started.elapsed().as_secs_f64();
    let summary = Summary {
        mode: "bulk",
        target: args.target.to_string(),
        streams: args.streams,
        threads,
        elapsed_s: elapsed,
        bytes_sent: total.bytes_sent,
        gbit_per_s: total.bytes_sent as f64 * 8.0 / elapsed.max(1e-9) / 1e9,
        streams_connected: total.connected,
        errors: total.errors,
    };
    println!(
        "bulk to {}: {} streams, {} threads, {} connected",
        summary.target, summary.streams, summary.threads, summary.streams_connected
    );
    println!(
        "sent         {} bytes in {:.2} s = {:.2} Gbit/s",
        summary.bytes_sent, summary.elapsed_s, summary.gbit_per_s
    );
    let errors = &summary.errors;
    println!(
        "errors       refused {}, reset {}, timeout {}, other {}",
        errors.refused, errors.reset, errors.timeout, errors.other
    );
    crate::process::write_json(args.json.as_deref(), &summary)?;
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum StreamState {
    Connecting,
    Sending,
    Done,
}

const OP_CONNECT: u64 = 1;
const OP_SEND: u64 = 2;

fn send_streams(
    target: SocketAddr,
    count: usize,
    pool: &'static [u8],
    deadline: Instant,
    stop: &AtomicBool,
    counter: &AtomicU64,
) -> anyhow::Result<WorkerResult> {
    let mut ring = Ring::new(1024)?;
    let mut result = WorkerResult::default();
    // Per stream: socket, state, offset in the pool where the next send starts.
    let mut streams: Vec<(Option<OwnedFd>, StreamState, usize)> = Vec::with_capacity(count);
    for index in 0..count {
        match socket::tcp_socket_for(&target) {
            Ok(fd) => {
                ring.connect(
                    fd.as_raw_fd(),
                    target,
                    CONNECT_TIMEOUT,
                    (index as u64) << 8 | OP_CONNECT,
                    0,
                )?;
                streams.push((Some(fd), StreamState::Connecting, 0));
            }
            Err(_) => {
                result.errors.other += 1;
                streams.push((None, StreamState::Done, 0));
            }
        }
    }
    let mut completions: Vec<Completion> = Vec::with_capacity(1024);
    while !stop.load(Ordering::Relaxed)
        && Instant::now() < deadline
        && streams
            .iter()
            .any(|(_, state, _)| *state != StreamState::Done)
    {
        ring.submit_and_wait(Some(Duration::from_millis(100)))?;
        ring.drain_completions(&mut completions);
        for completion in completions.drain(..) {
            let index = (completion.user_data() >> 8) as usize;
            let Some((Some(fd), state, offset)) = streams.get_mut(index) else {
                continue;
            };
            let fd = fd.as_raw_fd();
            match completion.user_data() & 0xff {
                OP_CONNECT if completion.result() == 0 => {
                    result.connected += 1;
                    *state = StreamState::Sending;
                    ring.send_static(fd, pool, (index as u64) << 8 | OP_SEND)?;
                }
                OP_CONNECT => {
                    match -completion.result() {
                        libc::ECONNREFUSED => result.errors.refused += 1,
                        libc::ECANCELED | libc::ETIMEDOUT => result.errors.timeout += 1,
                        _ => result.errors.other += 1,
                    }
                    *state = StreamState::Done;
                }
                OP_SEND if completion.result() > 0 => {
                    result.bytes_sent += completion.result() as u64;
                    counter.store(result.bytes_sent, Ordering::Relaxed);
                    // A short send continues where it stopped, so the stream stays in order.
                    *offset = (*offset + completion.result() as usize) % pool.len();
                    ring.send_static(fd, &pool[*offset..], (index as u64) << 8 | OP_SEND)?;
                }
                OP_SEND => {
                    result.errors.reset += 1;
                    *state = StreamState::Done;
                }
                _ => {}
            }
        }
    }
    for (fd, _, _) in streams {
        if let Some(fd) = fd {
            ring.cancel_fd(fd.as_raw_fd(), 0)?;
            ring.close(fd, 0, true)?;
        }
    }
    ring.flush()?;
    Ok(result)
}
