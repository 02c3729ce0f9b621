//! One shard: a pinned thread's io_uring loop and everything it owns.
//!
//! Owns its listeners' sockets, its sessions, its ring (and the ring's buffers), its balancer
//! state per pool and its counters; shares nothing with other shards on the data path. Each
//! loop turn: publish recycled buffers, one `io_uring_enter` (submit + wait), then turn every
//! completion into an event for the session it belongs to, carry out the actions the relay
//! machine (`crate::relay`) returns, expire timers and re-arm what needs re-arming.
//!
//! The only cross-thread input is the shard's inbox (snapshots, listener sockets, drain and
//! cut commands), read when the shard's eventfd fires; the only output is the counter slot it
//! publishes into once a second. Neither ever blocks: a shard never waits on another thread.
//!
//! Nothing a peer or the kernel does ends the shard: a completion error closes its session, a
//! full submission queue waits in the ring's backlog, accept errors back off. Only a failure of
//! the ring itself (`io_uring_enter` failing for another reason than "come back") is returned.
//!
//! The loop is split by phase: `accept` (listeners, admission), `connect` (choosing and
//! connecting a server), `relay_io` (receives, sends and the relay machine's actions) and
//! `close` (ending sessions, timers, buffer pressure).

mod accept;
mod close;
mod connect;
mod relay_io;
mod sniffing;
mod target;
mod throttle;
mod tls;

pub(super) use throttle::Throttle;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use slab::Slab;
use tracing::{info, warn};

use super::log_limit::LogLimiter;
use super::session::{Session, user_data};
use super::{ShardMessage, ShardReport, ShardStats};
use crate::balance::PoolBalancer;
use crate::balance::split::SplitPicker;
use crate::config::Tuning;
use crate::metrics::{
    CounterTable, ListenerCounters, PoolCounters, ServerCounters, ShardPublished, ShardSlot,
    SplitSideCounters,
};
use crate::relay::{Actions, BufferPool, Measured, Side};
use crate::snapshot::{ListenerId, PoolId, ServerId, Snapshot, SplitId, SplitSnapshot};
use crate::uring::timer::{TimerEntry, TimerWheel};
use crate::uring::{BufRing, BufToken, Completion, Ring};

pub(super) use super::session::Op;
use accept::ShardListener;

/// Timer resolution: idle and write timeouts and drain deadlines are checked this often.
pub const TICK: Duration = Duration::from_millis(100);

/// Debug builds only: names the file `Shard::injected_fault` reads.
#[cfg(debug_assertions)]
const FAULT_FILE_VARIABLE: &str = "RINGPROXY_DEBUG_FAULT_FILE";
/// How long accepting pauses after an accept error that is not a client's own doing.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// After a session was closed, how long its operations may take to finish before they are
/// cancelled explicitly; after a drain deadline, how long the shard waits for the last ones.
const CUT_GRACE: Duration = Duration::from_secs(2);
/// Repetitive warnings are logged at most once per this many ticks (10 s).
const LOG_INTERVAL_TICKS: u64 = 100;
/// How often the shard publishes its counters (and so its heartbeat, idle or not).
const PUBLISH_INTERVAL_MS: u64 = 1000;
/// The longest an idle shard sleeps: it wakes to publish its heartbeat.
const IDLE_WAIT: Duration = Duration::from_millis(500);

const IGNORED: u64 = Op::Ignored as u64;

/// A route's TLS settings, the ticket keys, and the rustls config the shard built from them.
type RouteTlsConfig = (
    Arc<crate::tls::TlsSettings>,
    Option<crate::tls::TicketKeys>,
    Arc<rustls::ServerConfig>,
);

impl Measured for BufToken {
    fn byte_len(&self) -> u32 {
        self.len()
    }
}

impl BufferPool<BufToken> for BufRing {
    fn bytes<'a>(&'a self, buffer: &'a BufToken) -> &'a [u8] {
        BufRing::bytes(self, buffer)
    }

    fn recycle(&mut self, buffer: BufToken) {
        BufRing::recycle(self, buffer);
    }

    fn append(&mut self, into: &mut BufToken, from: &BufToken) -> bool {
        BufRing::append(self, into, from)
    }
}

/// What a shard needs to start: the first snapshot, its listener sockets, its inbox and slot.
pub struct ShardSetup {
    pub index: usize,
    /// How many shards the process runs (a listener's connection limit is split among them).
    pub shards: usize,
    /// Sessions this shard may hold with its share of the process's descriptors.
    pub descriptor_room: usize,
    pub tuning: Tuning,
    pub snapshot: Arc<Snapshot>,
    /// This shard's socket of each listener.
    pub listeners: Vec<(ListenerId, OwnedFd)>,
    pub eventfd: Arc<OwnedFd>,
    pub inbox: Receiver<ShardMessage>,
    pub slot: Arc<ShardSlot>,
}

/// The shard's counters, by listener, pool and server.
#[derive(Default)]
pub(super) struct Counters {
    pub listeners: CounterTable<ListenerId, ListenerCounters>,
    pub pools: CounterTable<PoolId, PoolCounters>,
    pub servers: CounterTable<ServerId, ServerCounters>,
    /// By split and the pool it sent sessions to.
    pub splits: CounterTable<(SplitId, PoolId), SplitSideCounters>,
}

pub struct Shard {
    /// Debug builds only: a file through which a test makes this shard fail (`injected_fault`).
    #[cfg(debug_assertions)]
    fault_file: Option<std::path::PathBuf>,
    ring: Ring,
    index: usize,
    shards: usize,
    descriptor_room: usize,
    /// Accepting stopped because the shard is at its descriptor room; it resumes as sessions
    /// end.
    paused_for_room: bool,
    /// This shard's share of `runtime.max_connections` (u32::MAX: none).
    process_share: u32,
    tuning: Tuning,
    /// This kernel caps multishot receives by bytes (else receives are single-shot).
    capped_multishot: bool,
    /// The snapshot the shard runs on, behind an `Rc` of its own: the loop borrows from it
    /// while it changes its own state by cloning the `Rc` (no atomic shared with other shards).
    /// The extra allocation is one per snapshot, on purpose.
    #[allow(clippy::redundant_allocation)]
    snapshot: Rc<Arc<Snapshot>>,
    listeners: Slab<ShardListener>,
    sessions: Slab<Session>,
    /// Balancing state per pool, in the order of `snapshot.pools`.
    balancers: Vec<PoolBalancer>,
    /// Per pool (in the order of `snapshot.pools`), the next source address to bind.
    source_cursor: Vec<usize>,
    /// Each split's round-robin state, with the split it was built for (rebuilt when the
    /// weights change).
    split_pickers: HashMap<SplitId, (Arc<SplitSnapshot>, SplitPicker)>,
    /// The shard's own rustls configs of its TLS listeners, with what each was built from.
    tls: HashMap<ListenerId, (Arc<crate::snapshot::ListenerTls>, Arc<rustls::ServerConfig>)>,
    /// The shard's own rustls configs toward the servers of its TLS pools, with what each was
    /// built from.
    origin_tls: HashMap<PoolId, tls::OriginTls>,
    /// The shard's own rustls configs of routes that terminate TLS (by listener and route
    /// position), with what each was built from.
    route_tls: HashMap<(ListenerId, usize), RouteTlsConfig>,
    counters: Counters,
    timers: TimerWheel,
    expired: Vec<TimerEntry>,
    completions: Vec<Completion>,
    actions: Actions,
    /// The buffers of one receive completion (reused).
    received: Vec<BufToken>,
    /// Sessions (index, generation, source side) whose receive found no buffer.
    starved: VecDeque<(usize, u32, Side)>,
    /// Receives held by bandwidth caps: (when due in shard microseconds, session index,
    /// generation, side 0 client / 1 server), soonest first.
    throttled: BinaryHeap<Reverse<(u64, usize, u32, u8)>>,
    /// Sessions (index, generation) waiting for a side's socket to drain before a reset.
    lingering: Vec<(usize, u32)>,
    /// A session started lingering this turn: check the lingering ones before waiting.
    linger_check_now: bool,
    /// A receive found the buffer ring empty this turn.
    starved_this_turn: bool,
    /// The tick of the last pass over stalled directions.
    pressure_relieved_tick: u64,
    /// Sessions (index, generation, when) waiting to retry a server socket that could not be
    /// created for lack of memory.
    connect_retry: VecDeque<(usize, u32, Instant)>,
    eventfd: Arc<OwnedFd>,
    inbox: Receiver<ShardMessage>,
    slot: Arc<ShardSlot>,
    /// The eventfd read must be re-armed (it failed; retried at the next tick, not in a spin).
    wake_pending: bool,
    logs: LogLimiter,
    started: Instant,
    now: Instant,
    /// `now` as timer ticks, milliseconds and microseconds since the shard started, computed
    /// once per loop turn.
    now_tick: u64,
    now_ms: u64,
    now_us: u64,
    last_maintenance_tick: u64,
    last_publish_ms: u64,
    next_generation: u32,
    /// Epochs of the shard's listeners (`ShardListener::epoch`).
    next_listener_epoch: u32,
    draining_until: Option<Instant>,
    /// Set once the drain deadline has cut the remaining sessions.
    cut_at: Option<Instant>,
    stats: ShardStats,
}

impl Shard {
    pub fn new(setup: ShardSetup) -> io::Result<Shard> {
        let tuning = setup.tuning;
        let buffer_count = u16::try_from(tuning.buffer_count).unwrap_or(32_768);
        let ring = Ring::with_buffers(tuning.ring_entries, buffer_count, tuning.buffer_size)?;
        let snapshot = setup.snapshot;
        let balancers = snapshot
            .pools
            .iter()
            .map(|pool| PoolBalancer::new(pool, setup.index as u64))
            .collect();
        let source_cursor = vec![setup.index; snapshot.pools.len()];
        let now = Instant::now();
        let capped_multishot = tuning.receives == crate::config::ReceiveMode::Auto
            && Ring::supports_capped_multishot();
        if setup.index == 0 {
            info!(
                receives = if capped_multishot {
                    "capped multishot"
                } else {
                    "single-shot"
                },
                "receive mode"
            );
        }
        let mut shard = Shard {
            ring,
            index: setup.index,
            shards: setup.shards.max(1),
            descriptor_room: setup.descriptor_room.max(1),
            paused_for_room: false,
            process_share: u32::MAX,
            tuning,
            capped_multishot,
            snapshot: Rc::new(snapshot),
            listeners: Slab::new(),
            sessions: Slab::new(),
            balancers,
            source_cursor,
            split_pickers: HashMap::new(),
            tls: HashMap::new(),
            origin_tls: HashMap::new(),
            route_tls: HashMap::new(),
            counters: Counters::default(),
            timers: TimerWheel::new(1024),
            expired: Vec::new(),
            completions: Vec::with_capacity(1024),
            actions: Vec::with_capacity(8),
            received: Vec::with_capacity(64),
            starved: VecDeque::new(),
            throttled: BinaryHeap::new(),
            lingering: Vec::new(),
            linger_check_now: false,
            starved_this_turn: false,
            pressure_relieved_tick: 0,
            connect_retry: VecDeque::new(),
            eventfd: setup.eventfd,
            inbox: setup.inbox,
            slot: setup.slot,
            wake_pending: false,
            logs: LogLimiter::new(LOG_INTERVAL_TICKS),
            started: now,
            now,
            now_tick: 0,
            now_ms: 0,
            now_us: 0,
            last_maintenance_tick: 0,
            last_publish_ms: 0,
            next_generation: 0,
            next_listener_epoch: 0,
            draining_until: None,
            cut_at: None,
            stats: ShardStats::default(),
            #[cfg(debug_assertions)]
            fault_file: std::env::var_os(FAULT_FILE_VARIABLE).map(std::path::PathBuf::from),
        };
        let snapshot = Arc::clone(&shard.snapshot);
        shard.adopt_tls(&snapshot);
        for (id, fd) in setup.listeners {
            shard.add_listener(id, fd);
        }
        Ok(shard)
    }

    /// Debug builds only (release builds have no such hook): fails this shard the way the file
    /// named by `RINGPROXY_DEBUG_FAULT_FILE` says, "<shard> panic" or "<shard> error", so tests
    /// can prove that a dying shard stops the whole proxy with its cause logged.
    #[cfg(debug_assertions)]
    fn injected_fault(&self) -> io::Result<()> {
        let Some(path) = &self.fault_file else {
            return Ok(());
        };
        let Ok(text) = std::fs::read_to_string(path) else {
            return Ok(());
        };
        let mut words = text.split_whitespace();
        if words.next().and_then(|word| word.parse::<usize>().ok()) != Some(self.index) {
            return Ok(());
        }
        match words.next() {
            Some("panic") => panic!("injected fault ({FAULT_FILE_VARIABLE})"),
            Some("error") => Err(io::Error::other(format!(
                "injected fault ({FAULT_FILE_VARIABLE})"
            ))),
            _ => Ok(()),
        }
    }

    /// Reads the clock once per loop turn; every completion of the turn uses this time.
    fn update_clock(&mut self) {
        self.now = Instant::now();
        let elapsed = self.now.duration_since(self.started);
        self.now_us = elapsed.as_micros() as u64;
        self.now_ms = self.now_us / 1000;
        self.now_tick = self.now_ms / TICK.as_millis() as u64;
    }

    /// Runs the loop until a drain completes or a stop command arrives.
    pub fn run(mut self) -> io::Result<ShardReport> {
        self.arm_wake();
        let keys: Vec<usize> = self.listeners.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.arm_accept(key);
        }
        self.publish();
        loop {
            self.ring.buffers_mut().publish();
            let mut wait = if self.sessions.is_empty() && self.draining_until.is_none() {
                IDLE_WAIT
            } else {
                TICK
            };
            if let Some(resume_us) = self.next_resume_us() {
                wait = wait.min(Duration::from_micros(resume_us.max(200)));
            }
            self.ring.submit_and_wait(Some(wait))?;
            self.update_clock();
            let mut completions = std::mem::take(&mut self.completions);
            self.ring.drain_completions(&mut completions);
            self.stats.loop_turns += 1;
            self.stats.completions += completions.len() as u64;
            for completion in completions.drain(..) {
                self.handle(completion);
            }
            self.completions = completions;
            if self.now_tick != self.last_maintenance_tick {
                self.last_maintenance_tick = self.now_tick;
                self.expire_timers();
                self.sweep_sources();
                self.poll_lingering();
                self.relieve_buffer_pressure();
                self.pressure_relieved_tick = self.now_tick;
                #[cfg(debug_assertions)]
                self.injected_fault()?;
                if self.wake_pending {
                    self.arm_wake();
                }
            }
            if std::mem::take(&mut self.starved_this_turn)
                && self.pressure_relieved_tick != self.now_tick
            {
                // A receive found no buffer: free stalled directions' buffers now rather than at
                // the next tick (at most once per tick: the pass walks every session).
                self.relieve_buffer_pressure();
                self.pressure_relieved_tick = self.now_tick;
            }
            if std::mem::take(&mut self.linger_check_now) {
                self.poll_lingering();
            }
            self.rearm_starved();
            self.resume_throttled();
            self.retry_connects();
            self.retry_accepts();
            if self.now_ms >= self.last_publish_ms + PUBLISH_INTERVAL_MS {
                self.publish();
            }
            if self.drain_progress() {
                break;
            }
        }
        // The last turn may have queued closes (sessions, listeners); hand them to the kernel.
        self.ring.flush()?;
        self.publish();
        let stats = self.stats.clone();
        info!(
            shard = self.index,
            accepted = stats.accepted,
            rejected = stats.rejected,
            connect_failures = stats.connect_failures,
            no_server = stats.no_server,
            resets = stats.resets,
            idle_timeouts = stats.idle_timeouts,
            write_timeouts = stats.write_timeouts,
            buffer_starvation = stats.buffer_starvation,
            spills = stats.spills,
            stale_completions = stats.stale_completions,
            buffers_free = self.ring.buffers().available(),
            buffer_window = self.ring.buffers().window(),
            starved_waiting = self.starved.len(),
            timers_armed = self.timers.len(),
            timer_nodes = self.timers.capacity(),
            bytes_to_server = stats.bytes_to_server,
            bytes_to_client = stats.bytes_to_client,
            receives = stats.receives,
            multishot_receives = stats.multishot_receives,
            loop_turns = stats.loop_turns,
            completions = stats.completions,
            "shard stopped"
        );
        Ok(ShardReport {
            shard: self.index,
            stats,
        })
    }

    fn handle(&mut self, mut completion: Completion) {
        let (op, index, generation) = Session::decode(completion.user_data());
        match op {
            Op::Ignored => return,
            Op::Wake => return self.on_wake(&completion),
            Op::Accept => return self.on_accept(index, generation, false, &mut completion),
            Op::AcceptOnce => return self.on_accept(index, generation, true, &mut completion),
            _ => {}
        }
        let current = self
            .sessions
            .get(index)
            .is_some_and(|session| session.generation == generation);
        if !current {
            // A late completion of a session that is gone (or of an earlier session in the same
            // slot): never delivered to the slot's new owner, and its buffer goes back.
            self.stats.stale_completions += 1;
            if let Some(token) = self.ring.buffers_mut().take(&mut completion) {
                self.ring.buffers_mut().recycle(token);
            }
            return;
        }
        match op {
            Op::Connect => self.on_connect(index, completion.result()),
            Op::ClientRecv => self.on_receive(index, Side::Client, completion),
            Op::ServerRecv => self.on_receive(index, Side::Server, completion),
            Op::SendToServer => self.on_sent(index, Side::Server, completion),
            Op::SendToClient => self.on_sent(index, Side::Client, completion),
            Op::Ignored | Op::Wake | Op::Accept | Op::AcceptOnce => {}
        }
        self.finish_if_done(index);
    }

    // ---- control ---------------------------------------------------------------------------

    fn arm_wake(&mut self) {
        self.wake_pending = false;
        let fd = self.eventfd.as_raw_fd();
        if let Err(error) = self.ring.read_eventfd(fd, user_data(Op::Wake, 0, 0)) {
            warn!(shard = self.index, %error, "cannot arm the control wake-up; retrying");
            self.wake_pending = true;
        }
    }

    fn on_wake(&mut self, completion: &Completion) {
        loop {
            match self.inbox.try_recv() {
                Ok(message) => self.on_message(message),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    // The control side is gone: nobody can ask us to stop any more, so stop.
                    self.begin_drain();
                    self.draining_until = Some(self.now);
                    break;
                }
            }
        }
        let result = completion.result();
        if result >= 0 || result == -libc::EAGAIN || result == -libc::EINTR {
            self.arm_wake();
        } else {
            // Always re-armed, but not in a loop: a failing read waits for the next tick.
            warn!(shard = self.index, error = %io::Error::from_raw_os_error(-result), "control wake-up read failed");
            self.wake_pending = true;
        }
    }

    fn on_message(&mut self, message: ShardMessage) {
        match message {
            ShardMessage::Snapshot(snapshot) => self.adopt(snapshot),
            ShardMessage::AddListener { id, fd } => {
                let key = self.add_listener(id, fd);
                if self.draining_until.is_none() {
                    self.arm_accept(key);
                }
                self.publish();
            }
            ShardMessage::RemoveListener(id) => {
                self.remove_listener(id);
                self.publish();
            }
            ShardMessage::CutServer(server) => self.cut_server_sessions(server),
            ShardMessage::RateShares(shares) => self.set_rate_shares(&shares),
            ShardMessage::Drain => self.begin_drain(),
            ShardMessage::Stop => {
                self.begin_drain();
                self.draining_until = Some(self.now);
            }
        }
    }

    /// Runs on a new snapshot from now on. Each pool's balancing state carries over by id (a
    /// pool whose snapshot did not change is not even looked at); sessions keep going whatever
    /// the snapshot says about their listener, pool or server.
    fn adopt(&mut self, snapshot: Arc<Snapshot>) {
        if snapshot.generation <= self.snapshot.generation {
            return;
        }
        let mut old_balancers: Vec<Option<PoolBalancer>> = std::mem::take(&mut self.balancers)
            .into_iter()
            .map(Some)
            .collect();
        let old_cursor = std::mem::take(&mut self.source_cursor);
        let mut balancers = Vec::with_capacity(snapshot.pools.len());
        let mut cursors = Vec::with_capacity(snapshot.pools.len());
        for pool in &snapshot.pools {
            let previous = self.snapshot.pool_position(pool.id);
            let carried = previous.and_then(|position| {
                let balancer = old_balancers.get_mut(position)?.take()?;
                Some((
                    balancer,
                    old_cursor.get(position).copied().unwrap_or(0),
                    position,
                ))
            });
            match carried {
                Some((mut balancer, cursor, position)) => {
                    if !Arc::ptr_eq(&self.snapshot.pools[position], pool) {
                        balancer.adopt(pool);
                    }
                    balancers.push(balancer);
                    cursors.push(cursor);
                }
                None => {
                    balancers.push(PoolBalancer::new(pool, self.index as u64));
                    cursors.push(self.index);
                }
            }
        }
        self.balancers = balancers;
        self.source_cursor = cursors;
        self.adopt_tls(&snapshot);
        self.snapshot = Rc::new(snapshot);
        self.update_listener_shares();
        self.publish();
    }

    /// Copies the shard's counters into its slot for the control thread (a heartbeat, too).
    fn publish(&mut self) {
        self.last_publish_ms = self.now_ms;
        let snapshot = Rc::clone(&self.snapshot);
        self.counters
            .listeners
            .collect(|id| snapshot.listener(id).is_some());
        self.counters
            .pools
            .collect(|id| snapshot.pool(id).is_some());
        let live_servers: std::collections::HashSet<ServerId> = snapshot
            .pools
            .iter()
            .flat_map(|pool| pool.servers.iter().map(|server| server.id))
            .collect();
        self.counters
            .servers
            .collect(|id| live_servers.contains(&id));
        self.counters
            .splits
            .collect(|(split, _)| snapshot.split(split).is_some());
        let mut servers: std::collections::HashMap<ServerId, ServerCounters> = self
            .counters
            .servers
            .iter()
            .map(|(id, counters)| (id, counters.clone()))
            .collect();
        for balancer in &self.balancers {
            for (id, active, passive_down) in balancer.servers(self.now_ms) {
                let counters = servers.entry(id).or_default();
                counters.active = active;
                counters.passive_down = u32::from(passive_down);
            }
        }
        let now_us = self.now_us;
        for (_, listener) in &mut self.listeners {
            let tokens = listener.gate.tokens(now_us);
            let share = listener.gate.share();
            let table = listener.gate.source_table();
            if let Some(counters) = self.counters.listeners.get_mut(listener.counters) {
                counters.rate_tokens = tokens.unwrap_or(0);
                counters.rate_share = if tokens.is_some() { share } else { 0.0 };
                (counters.sources, counters.source_evictions) =
                    table.map_or((0, 0), |(len, evictions)| (len as u64, evictions));
            }
        }
        let published = ShardPublished {
            shard: self.index,
            at: Instant::now(),
            generation: self.snapshot.generation,
            sessions: self.sessions.len(),
            buffers_free: self.ring.buffers().available(),
            timer_nodes: self.timers.capacity(),
            stats: self.stats.clone(),
            listeners: self
                .counters
                .listeners
                .iter()
                .map(|(id, counters)| (id, counters.clone()))
                .collect(),
            pools: self
                .counters
                .pools
                .iter()
                .map(|(id, counters)| (id, counters.clone()))
                .collect(),
            servers: servers.into_iter().collect(),
            splits: self
                .counters
                .splits
                .iter()
                .map(|(side, counters)| (side, counters.clone()))
                .collect(),
        };
        self.slot.publish(published);
    }
}

/// A duration in loop ticks, at least one.
pub fn ticks(duration: Duration) -> u64 {
    (duration.as_millis().div_ceil(TICK.as_millis()) as u64).max(1)
}
