//! Runtime: starting the shards, talking to them, and collecting what they did.
//!
//! Owns thread startup and pinning, listener binding before the shards start (so a bad address
//! fails the start, not a shard later), and the control path: a command word per shard plus an
//! eventfd its ring watches. Nothing here runs per connection.

mod log_limit;
pub mod session;
pub mod shard;

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;

use tracing::{debug, error, info, warn};

use crate::admission::shard_share;
use crate::config::{Config, Pinning, Shards};
use crate::listener;
use crate::uring::{self, socket};
use shard::{Shard, ShardSetup};

/// The oldest kernel the data plane supports (multishot receive with provided buffer rings).
pub const MIN_KERNEL: (u32, u32) = (6, 1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Kernel(String),
    #[error(transparent)]
    Bind(#[from] listener::BindError),
    #[error("shard {shard}: cannot set up io_uring: {source}")]
    Ring {
        shard: usize,
        #[source]
        source: io::Error,
    },
    #[error(
        "runtime.pin names core {core}, which this process may not run on (cores: {available:?})"
    )]
    Pin { core: usize, available: Vec<usize> },
    #[error("cannot start a shard thread: {0}")]
    Thread(#[source] io::Error),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShardCommand {
    Run = 0,
    Drain = 1,
    Stop = 2,
}

/// The control thread's handle on one shard: a command word read only when the eventfd fires.
pub struct ShardControl {
    command: AtomicU8,
    eventfd: OwnedFd,
}

impl ShardControl {
    fn new() -> io::Result<ShardControl> {
        Ok(ShardControl {
            command: AtomicU8::new(ShardCommand::Run as u8),
            eventfd: socket::eventfd()?,
        })
    }

    pub fn command(&self) -> ShardCommand {
        match self.command.load(Ordering::Acquire) {
            1 => ShardCommand::Drain,
            2 => ShardCommand::Stop,
            _ => ShardCommand::Run,
        }
    }

    fn send(&self, command: ShardCommand) {
        // A stop must not be downgraded to a drain by a later signal.
        self.command.fetch_max(command as u8, Ordering::AcqRel);
        if let Err(error) = socket::eventfd_signal(&self.eventfd) {
            error!(%error, "cannot wake a shard");
        }
    }
}

/// Counters one shard kept (plain integers, owned by the shard, handed back when it stops).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ShardStats {
    pub accepted: u64,
    pub rejected: u64,
    pub rejected_full: u64,
    pub accept_errors: u64,
    pub connect_failures: u64,
    pub retries: u64,
    pub no_server: u64,
    pub local_errors: u64,
    pub resets: u64,
    pub idle_timeouts: u64,
    pub write_timeouts: u64,
    /// Receives that found the buffer ring empty.
    pub buffer_starvation: u64,
    /// Directions copied out of their ring buffers because their destination stalled while
    /// buffers were scarce.
    pub spills: u64,
    /// Completions that arrived for a session already gone (recognised by generation).
    pub stale_completions: u64,
    pub closed: u64,
    /// Loop turns (one io_uring_enter each) and completions handled: their ratio is the batching.
    pub loop_turns: u64,
    pub completions: u64,
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
}

#[derive(Debug, Clone)]
pub struct ShardReport {
    pub shard: usize,
    pub stats: ShardStats,
}

/// Sends commands to every shard; cheap to clone into a signal handler thread.
#[derive(Clone)]
pub struct RuntimeControl {
    shards: Vec<Arc<ShardControl>>,
}

impl RuntimeControl {
    /// Stop accepting and let live sessions finish, up to `drain_timeout`.
    pub fn drain(&self) {
        for shard in &self.shards {
            shard.send(ShardCommand::Drain);
        }
    }

    /// Stop accepting and cut every session now.
    pub fn stop(&self) {
        for shard in &self.shards {
            shard.send(ShardCommand::Stop);
        }
    }
}

pub struct Runtime {
    threads: Vec<JoinHandle<io::Result<ShardReport>>>,
    control: RuntimeControl,
    listener_addrs: Vec<(String, SocketAddr)>,
    /// Each shard thread sends its index here when it ends, for whatever reason.
    done: mpsc::Receiver<usize>,
}

/// The number of shards `config` asks for on this machine.
pub fn shard_count(config: &Config) -> usize {
    match config.runtime.shards {
        Shards::Count(count) => count.get() as usize,
        Shards::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

/// Sizes the descriptor table once for what the config can hold (two descriptors per session,
/// plus listeners, rings and slack), before any shard thread runs.
fn reserve_descriptors(config: &Config, shards: usize) {
    let sessions: u64 = config
        .listeners
        .iter()
        .map(|listener| u64::from(listener.max_connections.get()))
        .sum();
    let wanted = sessions
        .saturating_mul(2)
        .saturating_add(64 * shards as u64 + 256);
    match socket::reserve_descriptor_table(wanted) {
        Ok(reserved) => debug!(reserved, wanted, "descriptor table reserved"),
        Err(error) => warn!(%error, "cannot reserve the descriptor table; it grows on demand"),
    }
}

impl Runtime {
    /// Binds every listener, starts one pinned shard per core and returns once all are running.
    pub fn start(config: Arc<Config>) -> Result<Runtime, StartError> {
        uring::check_kernel(MIN_KERNEL.0, MIN_KERNEL.1).map_err(StartError::Kernel)?;
        let shards = shard_count(&config);
        reserve_descriptors(&config, shards);
        let mut bound = Vec::with_capacity(config.listeners.len());
        for listener in &config.listeners {
            bound.push(listener::bind(listener, shards)?);
        }
        let listener_addrs: Vec<(String, SocketAddr)> = config
            .listeners
            .iter()
            .zip(&bound)
            .map(|(listener, bound)| (listener.name.clone(), bound.addr))
            .collect();
        let mut per_shard: Vec<Vec<(OwnedFd, u32)>> = (0..shards).map(|_| Vec::new()).collect();
        for (listener, bound) in config.listeners.iter().zip(bound) {
            for (shard, socket) in bound.sockets.into_iter().enumerate() {
                let share = shard_share(listener.max_connections.get(), shard, shards);
                per_shard[shard].push((socket, share));
            }
        }
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        if let Pinning::Cores(list) = &config.runtime.pin {
            let available: Vec<usize> = cores.iter().map(|core| core.id).collect();
            if let Some(&core) = list.iter().find(|core| !available.contains(core)) {
                return Err(StartError::Pin { core, available });
            }
        }
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, io::Result<()>)>();
        let (done_tx, done_rx) = mpsc::channel::<usize>();
        let mut threads = Vec::with_capacity(shards);
        let mut controls = Vec::with_capacity(shards);
        for (index, listeners) in per_shard.into_iter().enumerate() {
            let control = Arc::new(ShardControl::new().map_err(StartError::Thread)?);
            controls.push(Arc::clone(&control));
            let setup = ShardSetup {
                index,
                config: Arc::clone(&config),
                listeners,
                control,
            };
            let core = match &config.runtime.pin {
                Pinning::Auto => (!cores.is_empty()).then(|| cores[index % cores.len()]),
                Pinning::None => None,
                Pinning::Cores(list) => {
                    let wanted = list[index % list.len()];
                    cores.iter().copied().find(|core| core.id == wanted)
                }
            };
            let ready = ready_tx.clone();
            let done = done_tx.clone();
            let thread = std::thread::Builder::new()
                .name(format!("shard-{index}"))
                .spawn(move || {
                    if let Some(core) = core {
                        core_affinity::set_for_current(core);
                    }
                    // The ring is created on the thread that uses it (SINGLE_ISSUER).
                    let shard = match Shard::new(setup) {
                        Ok(shard) => {
                            let _ = ready.send((index, Ok(())));
                            shard
                        }
                        Err(error) => {
                            let kind = error.kind();
                            let message = error.to_string();
                            let _ = ready.send((index, Err(error)));
                            let _ = done.send(index);
                            return Err(io::Error::new(kind, message));
                        }
                    };
                    let outcome =
                        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| shard.run()))
                            .unwrap_or_else(|_| Err(io::Error::other("the shard panicked")));
                    // The shard is gone: its sessions' and listeners' descriptors were closed
                    // as it was dropped. Tell the process, which must not run on without it.
                    if let Err(error) = &outcome {
                        error!(shard = index, %error, "shard failed; stopping the proxy");
                    }
                    let _ = done.send(index);
                    outcome
                })
                .map_err(StartError::Thread)?;
            threads.push(thread);
        }
        drop(ready_tx);
        let control = RuntimeControl { shards: controls };
        for _ in 0..shards {
            match ready_rx.recv() {
                Ok((_, Ok(()))) => {}
                Ok((shard, Err(source))) => {
                    control.stop();
                    for thread in threads {
                        let _ = thread.join();
                    }
                    return Err(StartError::Ring { shard, source });
                }
                Err(_) => break,
            }
        }
        for (name, addr) in &listener_addrs {
            info!(listener = %name, %addr, shards, "listener ready");
        }
        Ok(Runtime {
            threads,
            control,
            listener_addrs,
            done: done_rx,
        })
    }

    /// Each listener's name and the address it is bound to (the real port when 0 was asked).
    pub fn listener_addrs(&self) -> &[(String, SocketAddr)] {
        &self.listener_addrs
    }

    pub fn control(&self) -> RuntimeControl {
        self.control.clone()
    }

    /// Waits for every shard to stop; the reports come in shard order. When one shard fails,
    /// the others are stopped at once (no proxy runs on with a core's listeners dead) and the
    /// failure is returned.
    pub fn join(self) -> io::Result<Vec<ShardReport>> {
        let mut threads: Vec<Option<JoinHandle<io::Result<ShardReport>>>> =
            self.threads.into_iter().map(Some).collect();
        let mut reports = Vec::with_capacity(threads.len());
        let mut failure = None;
        let mut remaining = threads.len();
        while remaining > 0 {
            let Ok(index) = self.done.recv() else {
                break;
            };
            let Some(thread) = threads.get_mut(index).and_then(Option::take) else {
                continue;
            };
            remaining -= 1;
            match thread.join() {
                Ok(Ok(report)) => reports.push(report),
                Ok(Err(error)) => {
                    if failure.is_none() {
                        self.control.stop();
                    }
                    failure = Some(error);
                }
                Err(_) => {
                    self.control.stop();
                    failure = Some(io::Error::other("a shard thread panicked"));
                }
            }
        }
        for thread in threads.into_iter().flatten() {
            match thread.join() {
                Ok(Ok(report)) => reports.push(report),
                Ok(Err(error)) => failure = Some(error),
                Err(_) => failure = Some(io::Error::other("a shard thread panicked")),
            }
        }
        reports.sort_by_key(|report| report.shard);
        match failure {
            Some(error) => Err(error),
            None => Ok(reports),
        }
    }
}
