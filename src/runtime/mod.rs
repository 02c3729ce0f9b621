//! Runtime: starting the shards, talking to them, and collecting what they did.
//!
//! Owns thread startup and pinning, and the path to each shard: an inbox (a lock-free channel)
//! plus an eventfd its ring watches, so a sleeping shard wakes; and the slot each shard
//! publishes its counters into. Nothing here runs per connection, and nothing a shard does
//! waits on the sender.

mod log_limit;
pub mod session;
pub mod shard;

use std::io;
use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::sync::mpsc;
use std::thread::JoinHandle;

use tracing::{debug, error, warn};

use crate::config::{Config, Pinning, Shards, Tuning};
use crate::metrics::ShardSlot;
use crate::snapshot::{ListenerId, ServerId, Snapshot};
use crate::uring::{self, socket};
use shard::{Shard, ShardSetup};

/// The oldest kernel the data plane supports (multishot receive with provided buffer rings).
pub const MIN_KERNEL: (u32, u32) = (6, 1);

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("{0}")]
    Kernel(String),
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

/// What the control side tells a shard.
pub enum ShardMessage {
    /// Run on this snapshot from now on.
    Snapshot(Arc<Snapshot>),
    /// Accept on this socket for listener `id` (replacing the socket it had for it, if any).
    AddListener { id: ListenerId, fd: OwnedFd },
    /// Stop accepting for listener `id` and close its socket; its sessions carry on.
    RemoveListener(ListenerId),
    /// Cut every session on this server now.
    CutServer(ServerId),
    /// This shard's fractions of listener-wide connection rates (they add up to 1 across
    /// shards).
    RateShares(Vec<(ListenerId, f64)>),
    /// Stop accepting, let sessions finish until the drain timeout, then cut them and stop.
    Drain,
    /// Stop accepting and cut every session now.
    Stop,
}

/// The control side's handle on one shard.
pub struct ShardHandle {
    inbox: mpsc::Sender<ShardMessage>,
    eventfd: Arc<OwnedFd>,
    pub slot: Arc<ShardSlot>,
}

impl ShardHandle {
    /// Queues a message and wakes the shard. Never blocks; a shard that has stopped just
    /// does not read it.
    pub fn send(&self, message: ShardMessage) {
        if self.inbox.send(message).is_err() {
            return;
        }
        if let Err(error) = socket::eventfd_signal(&*self.eventfd) {
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
    /// Sniffing: clients whose bytes reached sniff_max_bytes or sniff_timeout undecided, and
    /// clients no route matched.
    pub sniff_limits: u64,
    pub sniff_timeouts: u64,
    pub unmatched: u64,
    /// Directions copied out of their ring buffers because their destination stalled while
    /// buffers were scarce.
    pub spills: u64,
    /// Completions that arrived for a session already gone (recognised by generation).
    pub stale_completions: u64,
    pub closed: u64,
    /// Loop turns (one io_uring_enter each) and completions handled: their ratio is the batching.
    /// Receives submitted: single-shot, and capped multishot.
    pub receives: u64,
    pub multishot_receives: u64,
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

/// Sends commands to every shard; cheap to clone into a signal handler or the control thread.
#[derive(Clone)]
pub struct RuntimeControl {
    shards: Arc<Vec<ShardHandle>>,
}

impl RuntimeControl {
    /// A control with no shards behind it (before the shards start).
    pub fn detached() -> RuntimeControl {
        RuntimeControl {
            shards: Arc::new(Vec::new()),
        }
    }

    /// Stop accepting and let live sessions finish, up to `drain_timeout`.
    pub fn drain(&self) {
        self.broadcast(|| ShardMessage::Drain);
    }

    /// Stop accepting and cut every session now.
    pub fn stop(&self) {
        self.broadcast(|| ShardMessage::Stop);
    }

    /// Every shard runs on `snapshot` from its next wake-up on.
    pub fn publish(&self, snapshot: &Arc<Snapshot>) {
        self.broadcast(|| ShardMessage::Snapshot(Arc::clone(snapshot)));
    }

    /// Cuts the live sessions of a server on every shard.
    pub fn cut_server(&self, server: ServerId) {
        self.broadcast(|| ShardMessage::CutServer(server));
    }

    /// Hands each shard its socket of a listener (one per shard, in shard order).
    pub fn add_listener(&self, id: ListenerId, sockets: Vec<OwnedFd>) {
        for (shard, fd) in self.shards.iter().zip(sockets) {
            shard.send(ShardMessage::AddListener { id, fd });
        }
    }

    /// Hands each shard its fractions of listener-wide rates (`shares[shard]`).
    pub fn set_rate_shares(&self, shares: Vec<Vec<(ListenerId, f64)>>) {
        for (shard, shares) in self.shards.iter().zip(shares) {
            if !shares.is_empty() {
                shard.send(ShardMessage::RateShares(shares));
            }
        }
    }

    pub fn remove_listener(&self, id: ListenerId) {
        self.broadcast(|| ShardMessage::RemoveListener(id));
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Each shard's counter slot, in shard order.
    pub fn slots(&self) -> Vec<Arc<ShardSlot>> {
        self.shards
            .iter()
            .map(|shard| Arc::clone(&shard.slot))
            .collect()
    }

    fn broadcast(&self, message: impl Fn() -> ShardMessage) {
        for shard in self.shards.iter() {
            shard.send(message());
        }
    }
}

pub struct Runtime {
    threads: Vec<JoinHandle<io::Result<ShardReport>>>,
    control: RuntimeControl,
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
pub fn reserve_descriptors(config: &Config, shards: usize) {
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

/// How many sessions each shard may hold with the descriptors this process has left: two per
/// session, after those open now and a reserve for the control thread (admin connections,
/// health probes), split evenly across the shards. A shard at its room stops accepting (new
/// clients wait in the listen backlog) rather than accept clients it cannot connect.
pub fn descriptor_room(shards: usize) -> usize {
    let limit = socket::open_file_limit();
    let open = socket::open_descriptors() as u64;
    let reserve = (limit / 16).clamp(4, 256);
    let free = limit.saturating_sub(open + reserve);
    ((free / 2) as usize / shards.max(1)).max(1)
}

impl Runtime {
    /// Starts one pinned shard per entry of `listeners`' socket lists (every listener has one
    /// socket per shard) on `snapshot`, and returns once all are running.
    pub fn start(
        shards: usize,
        tuning: &Tuning,
        pin: &Pinning,
        snapshot: Arc<Snapshot>,
        listeners: Vec<(ListenerId, Vec<OwnedFd>)>,
    ) -> Result<Runtime, StartError> {
        uring::check_kernel(MIN_KERNEL.0, MIN_KERNEL.1).map_err(StartError::Kernel)?;
        let mut per_shard: Vec<Vec<(ListenerId, OwnedFd)>> =
            (0..shards).map(|_| Vec::new()).collect();
        for (id, sockets) in listeners {
            for (shard, socket) in sockets.into_iter().enumerate() {
                if let Some(list) = per_shard.get_mut(shard) {
                    list.push((id, socket));
                }
            }
        }
        let cores = core_affinity::get_core_ids().unwrap_or_default();
        if let Pinning::Cores(list) = pin {
            let available: Vec<usize> = cores.iter().map(|core| core.id).collect();
            if let Some(&core) = list.iter().find(|core| !available.contains(core)) {
                return Err(StartError::Pin { core, available });
            }
        }
        let room = descriptor_room(shards);
        debug!(sessions_per_shard = room, "descriptor room");
        let (ready_tx, ready_rx) = mpsc::channel::<(usize, io::Result<()>)>();
        let (done_tx, done_rx) = mpsc::channel::<usize>();
        let mut threads = Vec::with_capacity(shards);
        let mut handles = Vec::with_capacity(shards);
        for (index, listeners) in per_shard.into_iter().enumerate() {
            let eventfd = Arc::new(socket::eventfd().map_err(StartError::Thread)?);
            let slot = Arc::new(ShardSlot::default());
            let (inbox_tx, inbox_rx) = mpsc::channel();
            handles.push(ShardHandle {
                inbox: inbox_tx,
                eventfd: Arc::clone(&eventfd),
                slot: Arc::clone(&slot),
            });
            let setup = ShardSetup {
                index,
                shards,
                descriptor_room: room,
                tuning: tuning.clone(),
                snapshot: Arc::clone(&snapshot),
                listeners,
                eventfd,
                inbox: inbox_rx,
                slot,
            };
            let core = match pin {
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
        let control = RuntimeControl {
            shards: Arc::new(handles),
        };
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
        Ok(Runtime {
            threads,
            control,
            done: done_rx,
        })
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
