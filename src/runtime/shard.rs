//! One shard: a pinned thread's io_uring loop and everything it owns.
//!
//! Owns its listeners' sockets, its sessions, its ring (and the ring's buffers), its balancer
//! state per pool and its counters; shares nothing with other shards on the data path. Each
//! loop turn: publish recycled buffers, one `io_uring_enter` (submit + wait), then turn every
//! completion into an event for the session it belongs to, carry out the actions the relay
//! machine (`crate::relay`) returns, expire timers and re-arm what needs re-arming. The only
//! cross-thread input is the control command, read when the shard's eventfd fires.
//!
//! Nothing a peer or the kernel does ends the shard: a completion error closes its session, a
//! full submission queue waits in the ring's backlog, accept errors back off. Only a failure of
//! the ring itself (`io_uring_enter` failing for another reason than "come back") is returned.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;
use tracing::{debug, info, warn};

use super::log_limit::{self, LogLimiter, Verdict};
use super::session::{Session, user_data};
use super::{ShardCommand, ShardControl, ShardReport, ShardStats};
use crate::admission::{self, Admission, RejectReason};
use crate::balance::{PoolBalancer, client_key};
use crate::config::Config;
use crate::relay::{
    Action, Actions, BufferPool, CloseMode, CloseReason, Limits, Measured, ReceiveError, Relay,
    SendError, SendFrom, Side,
};
use crate::uring::timer::{TimerEntry, TimerWheel};
use crate::uring::{BufRing, BufToken, Completion, Ring, socket};

pub(super) use super::session::{GENERATION_MASK, Op};

/// Timer resolution: idle and write timeouts and drain deadlines are checked this often.
pub const TICK: Duration = Duration::from_millis(100);
/// How long accepting pauses after an accept error that is not a client's own doing.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often a session retries creating its server socket when descriptors ran out (every
/// `ACCEPT_BACKOFF`, so for about 2 s) before its client is closed.
const SOCKET_RETRIES: u8 = 20;
/// Queued buffers one sendmsg covers at most.
const MAX_SEND_BUFFERS: usize = 64;
/// Accept errors in a row (each re-armed at once) before accepting backs off anyway.
const ACCEPT_ERRORS_BEFORE_BACKOFF: u32 = 64;
/// After a session was closed, how long its operations may take to finish before they are
/// cancelled explicitly; after a drain deadline, how long the shard waits for the last ones.
const CUT_GRACE: Duration = Duration::from_secs(2);
/// Below this share of free receive buffers (1/N of the ring), stalled directions are copied
/// out of their ring buffers.
const PRESSURE_DIVISOR: u32 = 4;
/// Repetitive warnings are logged at most once per this many ticks (10 s).
const LOG_INTERVAL_TICKS: u64 = 100;

const IGNORED: u64 = Op::Ignored as u64;

/// Log-limiter kinds.
const LOG_CONNECT_FAILED: u8 = 1;
const LOG_ACCEPT_FAILED: u8 = 2;
const LOG_SOCKET_FAILED: u8 = 3;

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
}

struct ShardListener {
    fd: Option<OwnedFd>,
    config_index: usize,
    /// This shard's share of the listener's max_connections.
    share: u32,
    active: u32,
    accepting: bool,
    /// When accepting paused (accept errors), when to try again.
    retry_at: Option<Instant>,
    /// Accept errors since the last accepted connection.
    errors_in_a_row: u32,
}

pub struct ShardSetup {
    pub index: usize,
    pub config: Arc<Config>,
    /// Per listener (in config order), this shard's socket and connection share.
    pub listeners: Vec<(OwnedFd, u32)>,
    pub control: Arc<ShardControl>,
}

pub struct Shard {
    ring: Ring,
    index: usize,
    config: Arc<Config>,
    listeners: Vec<ShardListener>,
    sessions: Slab<Session>,
    balancers: Vec<PoolBalancer>,
    /// Server addresses per pool, resolved once.
    server_addrs: Vec<Vec<SocketAddr>>,
    /// Per pool, the next source address to bind (round robin).
    source_cursor: Vec<usize>,
    timers: TimerWheel,
    expired: Vec<TimerEntry>,
    completions: Vec<Completion>,
    actions: Actions,
    /// The buffers of one receive completion (reused).
    received: Vec<BufToken>,
    /// Sessions (index, generation, source side) whose receive found no buffer.
    starved: VecDeque<(usize, u32, Side)>,
    /// Sessions (index, generation) waiting for a side's socket to drain before a reset.
    lingering: Vec<(usize, u32)>,
    /// A session started lingering this turn: check the lingering ones before waiting.
    linger_check_now: bool,
    /// A receive found the buffer ring empty this turn.
    starved_this_turn: bool,
    /// The tick of the last pass over stalled directions.
    pressure_relieved_tick: u64,
    /// Sessions (index, generation, when) waiting to retry a server socket that could not be
    /// created for lack of descriptors.
    connect_retry: VecDeque<(usize, u32, Instant)>,
    control: Arc<ShardControl>,
    /// The eventfd read must be re-armed (it failed; retried at the next tick, not in a spin).
    wake_pending: bool,
    logs: LogLimiter,
    started: Instant,
    now: Instant,
    /// `now` as timer ticks, computed once per loop turn.
    now_tick: u64,
    now_ms: u64,
    last_maintenance_tick: u64,
    next_generation: u32,
    draining_until: Option<Instant>,
    /// Set once the drain deadline has cut the remaining sessions.
    cut_at: Option<Instant>,
    stats: ShardStats,
}

impl Shard {
    pub fn new(setup: ShardSetup) -> io::Result<Shard> {
        let config = setup.config;
        let tuning = &config.tuning;
        let buffer_count = u16::try_from(tuning.buffer_count).unwrap_or(32_768);
        let ring = Ring::with_buffers(tuning.ring_entries, buffer_count, tuning.buffer_size)?;
        let listeners = setup
            .listeners
            .into_iter()
            .enumerate()
            .map(|(config_index, (fd, share))| ShardListener {
                fd: Some(fd),
                config_index,
                share,
                active: 0,
                accepting: false,
                retry_at: None,
                errors_in_a_row: 0,
            })
            .collect();
        let balancers = config
            .pools
            .iter()
            .map(|pool| PoolBalancer::new(pool, setup.index as u64))
            .collect();
        let server_addrs = config
            .pools
            .iter()
            .map(|pool| pool.servers.iter().map(|server| server.addr).collect())
            .collect();
        let source_cursor = vec![setup.index; config.pools.len()];
        let now = Instant::now();
        Ok(Shard {
            ring,
            index: setup.index,
            config,
            listeners,
            sessions: Slab::new(),
            balancers,
            server_addrs,
            source_cursor,
            timers: TimerWheel::new(1024),
            expired: Vec::new(),
            completions: Vec::with_capacity(1024),
            actions: Vec::with_capacity(8),
            received: Vec::with_capacity(64),
            starved: VecDeque::new(),
            lingering: Vec::new(),
            linger_check_now: false,
            starved_this_turn: false,
            pressure_relieved_tick: 0,
            connect_retry: VecDeque::new(),
            control: setup.control,
            wake_pending: false,
            logs: LogLimiter::new(LOG_INTERVAL_TICKS),
            started: now,
            now,
            now_tick: 0,
            now_ms: 0,
            last_maintenance_tick: 0,
            next_generation: 0,
            draining_until: None,
            cut_at: None,
            stats: ShardStats::default(),
        })
    }

    /// Reads the clock once per loop turn; every completion of the turn uses this time.
    fn update_clock(&mut self) {
        self.now = Instant::now();
        let elapsed_ms = self.now.duration_since(self.started).as_millis() as u64;
        self.now_ms = elapsed_ms;
        self.now_tick = elapsed_ms / TICK.as_millis() as u64;
    }

    /// Runs the loop until a drain completes or a stop command arrives.
    pub fn run(mut self) -> io::Result<ShardReport> {
        self.arm_wake();
        for index in 0..self.listeners.len() {
            self.arm_accept(index);
        }
        loop {
            self.ring.buffers_mut().publish();
            let idle = self.sessions.is_empty()
                && self.draining_until.is_none()
                && !self.wake_pending
                && self.listeners.iter().all(|l| l.retry_at.is_none());
            let wait = if idle { None } else { Some(TICK) };
            self.ring.submit_and_wait(wait)?;
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
                self.poll_lingering();
                self.relieve_buffer_pressure();
                self.pressure_relieved_tick = self.now_tick;
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
            self.retry_connects();
            self.retry_accepts();
            if self.drain_progress() {
                break;
            }
        }
        // The last turn may have queued closes (sessions, listeners); hand them to the kernel.
        self.ring.flush()?;
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
            Op::Accept => return self.on_accept(index, &mut completion),
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
            debug!(
                shard = self.index,
                ?op,
                index,
                "completion of a closed session"
            );
            return;
        }
        match op {
            Op::Connect => self.on_connect(index, completion.result()),
            Op::ClientRecv => self.on_receive(index, Side::Client, completion),
            Op::ServerRecv => self.on_receive(index, Side::Server, completion),
            Op::SendToServer => self.on_sent(index, Side::Server, completion),
            Op::SendToClient => self.on_sent(index, Side::Client, completion),
            Op::Ignored | Op::Wake | Op::Accept => {}
        }
        self.finish_if_done(index);
    }

    // ---- control ---------------------------------------------------------------------------

    fn arm_wake(&mut self) {
        self.wake_pending = false;
        let fd = self.control.eventfd.as_raw_fd();
        if let Err(error) = self.ring.read_eventfd(fd, user_data(Op::Wake, 0, 0)) {
            warn!(shard = self.index, %error, "cannot arm the control wake-up; retrying");
            self.wake_pending = true;
        }
    }

    fn on_wake(&mut self, completion: &Completion) {
        match self.control.command() {
            ShardCommand::Run => {}
            ShardCommand::Drain => self.begin_drain(),
            ShardCommand::Stop => {
                self.begin_drain();
                self.draining_until = Some(self.now);
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

    fn begin_drain(&mut self) {
        if self.draining_until.is_some() {
            return;
        }
        self.draining_until = Some(self.now + self.config.runtime.drain_timeout);
        info!(
            shard = self.index,
            sessions = self.sessions.len(),
            "draining: listeners closed"
        );
        for listener in &mut self.listeners {
            listener.retry_at = None;
            if let Some(fd) = listener.fd.take() {
                let _ = self.ring.cancel_fd(fd.as_raw_fd(), IGNORED);
                let _ = self.ring.close(fd, IGNORED, true);
            }
        }
    }

    /// Returns true when the shard may exit.
    fn drain_progress(&mut self) -> bool {
        let Some(deadline) = self.draining_until else {
            return false;
        };
        let accepts_done = self.listeners.iter().all(|l| !l.accepting);
        if self.sessions.is_empty() && accepts_done {
            return true;
        }
        if self.now >= deadline && self.cut_at.is_none() {
            self.cut_at = Some(self.now);
            let remaining: Vec<usize> = self.sessions.iter().map(|(index, _)| index).collect();
            if !remaining.is_empty() {
                warn!(
                    shard = self.index,
                    sessions = remaining.len(),
                    "drain timeout: cutting remaining sessions"
                );
            }
            for index in remaining {
                self.close_session(index, CloseMode::ResetBoth, CloseReason::Cut);
                self.finish_if_done(index);
            }
        }
        if let Some(cut_at) = self.cut_at
            && self.now >= cut_at + CUT_GRACE
        {
            warn!(
                shard = self.index,
                sessions = self.sessions.len(),
                "sessions did not finish closing; exiting anyway"
            );
            return true;
        }
        false
    }

    // ---- accept ----------------------------------------------------------------------------

    fn arm_accept(&mut self, index: usize) {
        let listener = &mut self.listeners[index];
        let Some(fd) = &listener.fd else {
            return;
        };
        let raw = fd.as_raw_fd();
        listener.accepting = true;
        let _ = self
            .ring
            .accept_multishot(raw, user_data(Op::Accept, index, 0));
    }

    fn retry_accepts(&mut self) {
        for index in 0..self.listeners.len() {
            let listener = &mut self.listeners[index];
            if let Some(retry_at) = listener.retry_at
                && self.now >= retry_at
            {
                listener.retry_at = None;
                if !listener.accepting {
                    self.arm_accept(index);
                }
            }
        }
    }

    fn on_accept(&mut self, index: usize, completion: &mut Completion) {
        let tick = self.now_tick;
        let Some(listener) = self.listeners.get_mut(index) else {
            return;
        };
        if !completion.more() {
            listener.accepting = false;
        }
        let Some(client) = completion.accepted_fd() else {
            let errno = -completion.result();
            if errno == libc::ECANCELED {
                return;
            }
            self.stats.accept_errors += 1;
            listener.errors_in_a_row += 1;
            let error = io::Error::from_raw_os_error(errno);
            // A client that reset before it was accepted is its own problem; anything else
            // (no descriptors, no memory, a broken listener) backs off instead of spinning.
            let transient = matches!(errno, libc::ECONNABORTED | libc::EINTR | libc::EAGAIN)
                && listener.errors_in_a_row < ACCEPT_ERRORS_BEFORE_BACKOFF;
            let name = &self.config.listeners[listener.config_index].name;
            if transient {
                debug!(shard = self.index, listener = %name, %error, "accept error");
                if !listener.accepting && listener.fd.is_some() && listener.retry_at.is_none() {
                    self.arm_accept(index);
                }
            } else {
                if let Verdict::Log { suppressed } = self
                    .logs
                    .check(log_limit::key(LOG_ACCEPT_FAILED, index, 0), tick)
                {
                    warn!(shard = self.index, listener = %name, %error, suppressed, "accept failed; pausing accepts for 100ms");
                }
                listener.retry_at = Some(self.now + ACCEPT_BACKOFF);
            }
            return;
        };
        listener.errors_in_a_row = 0;
        let decision = admission::admit(
            listener.active,
            listener.share,
            self.draining_until.is_some(),
        );
        let config_index = listener.config_index;
        // Re-arm a multishot accept the kernel ended (e.g. CQ pressure), unless draining.
        if !listener.accepting && listener.fd.is_some() && listener.retry_at.is_none() {
            self.arm_accept(index);
        }
        match decision {
            Admission::Reject(reason) => {
                self.stats.rejected += 1;
                debug!(shard = self.index, listener = %self.config.listeners[config_index].name, ?reason, "connection rejected");
                if reason == RejectReason::ListenerFull {
                    self.stats.rejected_full += 1;
                }
                // Never seen by the ring: closed here, at once.
                drop(client);
            }
            Admission::Accept => self.start_session(index, client),
        }
    }

    fn start_session(&mut self, listener_index: usize, client: OwnedFd) {
        let listener_config = &self.config.listeners[self.listeners[listener_index].config_index];
        let pool = listener_config.pool;
        let tuning = &self.config.tuning;
        let limits = Limits {
            queued_buffers: tuning.queued_buffers as usize,
            buffer_size: tuning.buffer_size as usize,
            idle_ticks: ticks(listener_config.idle_timeout),
            write_ticks: ticks(listener_config.write_timeout),
        };
        // TCP_NODELAY and keepalive are inherited from the listening socket (`listener::bind`).
        let key = if self.config.pool(pool).balance.needs_client_address() {
            socket::peer_ip(client.as_fd()).map(client_key).unwrap_or(0)
        } else {
            0
        };
        self.next_generation = (self.next_generation + 1) & GENERATION_MASK;
        let tick = self.now_tick;
        let session = Session {
            generation: self.next_generation,
            listener: listener_index,
            pool,
            client,
            server: None,
            server_index: None,
            tried: Default::default(),
            attempts: 0,
            client_key: key,
            connecting: false,
            socket_retries: 0,
            closing: false,
            close_mode: CloseMode::Graceful,
            relay: Relay::new(limits, tick),
            timer: None,
        };
        let index = self.sessions.insert(session);
        self.listeners[listener_index].active += 1;
        self.stats.accepted += 1;
        self.arm_timer(index);
        self.connect_next(index);
        self.finish_if_done(index);
    }

    // ---- connect ---------------------------------------------------------------------------

    fn next_source(&mut self, pool: usize, target: &SocketAddr) -> Option<IpAddr> {
        let sources = &self.config.pools[pool].source_addresses;
        if sources.is_empty() {
            return None;
        }
        let cursor = &mut self.source_cursor[pool];
        for _ in 0..sources.len() {
            let source = sources[*cursor % sources.len()];
            *cursor = cursor.wrapping_add(1);
            if source.is_ipv4() == target.is_ipv4() {
                return Some(source);
            }
        }
        None
    }

    fn connect_next(&mut self, index: usize) {
        let now_ms = self.now_ms;
        let tick = self.now_tick;
        let session = &mut self.sessions[index];
        let pool_id = session.pool;
        let pool_index = usize::from(pool_id.0);
        let balancer = &mut self.balancers[pool_index];
        let Some(server) = balancer.pick(session.client_key, session.tried, now_ms) else {
            self.stats.no_server += 1;
            let pool = self.config.pool(pool_id);
            debug!(shard = self.index, pool = %pool.name, attempts = session.attempts, "no server available");
            self.close_session(index, CloseMode::Graceful, CloseReason::Cut);
            return;
        };
        let addr = self.server_addrs[pool_index][server];
        let source = self.next_source(pool_index, &addr);
        let pool = self.config.pool(pool_id);
        let server_fd = match socket::tcp_socket(&addr, source, &pool.tcp) {
            Ok(fd) => fd,
            Err(error) => {
                self.stats.local_errors += 1;
                if let Verdict::Log { suppressed } = self
                    .logs
                    .check(log_limit::key(LOG_SOCKET_FAILED, pool_index, server), tick)
                {
                    warn!(shard = self.index, pool = %pool.name, server = %addr, ?source, %error, suppressed, "cannot create a server socket");
                }
                let session = &mut self.sessions[index];
                // Waiting for a descriptor deadlocks when every descriptor is held by clients
                // waiting the same way, so only memory shortage (ENOBUFS/ENOMEM) is waited
                // out (accepting pauses meanwhile); out of descriptors, the client is closed.
                let transient = matches!(error.raw_os_error(), Some(libc::ENOBUFS | libc::ENOMEM));
                if transient && session.socket_retries < SOCKET_RETRIES {
                    // Out of descriptors: this client waits for one (and new clients wait in
                    // the backlog) rather than being accepted only to be dropped.
                    session.socket_retries += 1;
                    let generation = session.generation;
                    self.connect_retry
                        .push_back((index, generation, self.now + ACCEPT_BACKOFF));
                    self.pause_accepts();
                } else {
                    self.close_session(index, CloseMode::Graceful, CloseReason::Cut);
                }
                return;
            }
        };
        let raw = server_fd.as_raw_fd();
        let session = &mut self.sessions[index];
        self.balancers[pool_index].acquire(server);
        session.server_index = Some(server);
        session.server = Some(server_fd);
        session.tried.insert(server);
        session.attempts += 1;
        session.connecting = true;
        let connect_data = user_data(Op::Connect, index, session.generation);
        let _ = self
            .ring
            .connect(raw, addr, pool.connect_timeout, connect_data, IGNORED);
    }

    /// Stops accepting for `ACCEPT_BACKOFF` (the multishot accepts are cancelled; their final
    /// completion and `retry_accepts` re-arm them).
    fn pause_accepts(&mut self) {
        let resume = self.now + ACCEPT_BACKOFF;
        for index in 0..self.listeners.len() {
            let listener = &mut self.listeners[index];
            if listener.fd.is_none() {
                continue;
            }
            if listener.retry_at.is_none() && listener.accepting {
                let _ = self.ring.cancel(user_data(Op::Accept, index, 0), IGNORED);
            }
            listener.retry_at = Some(resume);
        }
    }

    /// Sessions that waited for a descriptor try their connect again.
    fn retry_connects(&mut self) {
        while let Some(&(index, generation, at)) = self.connect_retry.front() {
            if self.now < at {
                break;
            }
            self.connect_retry.pop_front();
            let current = self
                .sessions
                .get(index)
                .is_some_and(|session| session.generation == generation && !session.closing);
            if current {
                self.connect_next(index);
                self.finish_if_done(index);
            }
        }
    }

    fn on_connect(&mut self, index: usize, result: i32) {
        let now_ms = self.now_ms;
        let tick = self.now_tick;
        let session = &mut self.sessions[index];
        session.connecting = false;
        if session.closing {
            return;
        }
        let pool_id = session.pool;
        let pool_index = usize::from(pool_id.0);
        let Some(server) = session.server_index else {
            return;
        };
        let balancer = &mut self.balancers[pool_index];
        if result == 0 {
            balancer.record_success(server);
            let mut actions = std::mem::take(&mut self.actions);
            session.relay.start(&mut actions);
            self.execute(index, &mut actions);
            self.actions = actions;
            return;
        }
        let error = if result == -libc::ECANCELED {
            io::Error::from_raw_os_error(libc::ETIMEDOUT)
        } else {
            io::Error::from_raw_os_error(-result)
        };
        self.stats.connect_failures += 1;
        balancer.record_failure(server, now_ms);
        balancer.release(server);
        let was_down = balancer.is_down(server, now_ms);
        session.server_index = None;
        if let Some(fd) = session.server.take() {
            let _ = self.ring.close(fd, IGNORED, true);
        }
        let attempts = session.attempts;
        let pool = self.config.pool(pool_id);
        let addr = self.server_addrs[pool_index][server];
        if was_down {
            if let Verdict::Log { suppressed } = self
                .logs
                .check(log_limit::key(LOG_CONNECT_FAILED, pool_index, server), tick)
            {
                warn!(shard = self.index, pool = %pool.name, server = %addr, %error, suppressed, "server marked down after connect failures");
            }
        } else {
            debug!(shard = self.index, pool = %pool.name, server = %addr, %error, "connect failed");
        }
        if attempts <= pool.retries {
            self.stats.retries += 1;
            self.connect_next(index);
        } else {
            self.stats.no_server += 1;
            debug!(shard = self.index, pool = %pool.name, attempts, "giving up on this session");
            self.close_session(index, CloseMode::Graceful, CloseReason::Cut);
        }
    }

    // ---- relay -----------------------------------------------------------------------------

    fn on_receive(&mut self, index: usize, source: Side, mut completion: Completion) {
        let tick = self.now_tick;
        let mut tokens = std::mem::take(&mut self.received);
        if let Some(token) = self.ring.buffers_mut().take(&mut completion) {
            tokens.push(token);
        }
        let result = completion.result();
        let mut actions = std::mem::take(&mut self.actions);
        let session = &mut self.sessions[index];
        let buffers = self.ring.buffers_mut();
        match result {
            1.. if !tokens.is_empty() => {
                session
                    .relay
                    .on_received_batch(source, &mut tokens, tick, buffers, &mut actions);
            }
            _ => {
                for token in tokens.drain(..) {
                    buffers.recycle(token);
                }
                match result {
                    0 => session.relay.on_eof(source, &mut actions),
                    error if error == -libc::ENOBUFS => {
                        session.relay.on_receive_failed(
                            source,
                            ReceiveError::NoBuffers,
                            buffers,
                            &mut actions,
                        );
                        self.stats.buffer_starvation += 1;
                        self.starved_this_turn = true;
                        self.starved.push_back((index, session.generation, source));
                    }
                    error if error == -libc::ECANCELED => session.relay.on_receive_failed(
                        source,
                        ReceiveError::Cancelled,
                        buffers,
                        &mut actions,
                    ),
                    error => {
                        if !session.closing {
                            self.stats.resets += 1;
                            debug!(shard = self.index, side = ?source, error = %io::Error::from_raw_os_error(-error.min(-1)), "receive failed");
                        }
                        session.relay.on_receive_failed(
                            source,
                            ReceiveError::Failed,
                            buffers,
                            &mut actions,
                        );
                    }
                }
            }
        }
        self.received = tokens;
        self.execute(index, &mut actions);
        self.actions = actions;
    }

    fn on_sent(&mut self, index: usize, destination: Side, mut completion: Completion) {
        let tick = self.now_tick;
        let result = completion.result();
        let mut actions = std::mem::take(&mut self.actions);
        let session = &mut self.sessions[index];
        let flow = session.relay.flow_to(destination);
        if let Some(data) = completion.take_owned() {
            flow.restore_spill(data);
        } else if flow.sending == Some(SendFrom::Queue) {
            let count = flow.sending_buffers.max(1);
            for pending in flow.queue.iter().take(count) {
                self.ring.buffers_mut().send_completed(&pending.buffer);
            }
        }
        let outcome = match result {
            count if count >= 0 => {
                let count = count as u32;
                match destination {
                    Side::Server => self.stats.bytes_to_server += u64::from(count),
                    Side::Client => self.stats.bytes_to_client += u64::from(count),
                }
                Ok(count)
            }
            error if error == -libc::ECANCELED => Err(SendError::Cancelled),
            error => {
                if !session.closing {
                    self.stats.resets += 1;
                    debug!(shard = self.index, side = ?destination, error = %io::Error::from_raw_os_error(-error), "send failed");
                }
                Err(SendError::Failed)
            }
        };
        session.relay.on_sent(
            destination,
            outcome,
            tick,
            self.ring.buffers_mut(),
            &mut actions,
        );
        self.execute(index, &mut actions);
        self.actions = actions;
    }

    /// Carries out what the relay machine asked for.
    fn execute(&mut self, index: usize, actions: &mut Actions) {
        for action in actions.drain(..) {
            let Some(session) = self.sessions.get_mut(index) else {
                return;
            };
            let generation = session.generation;
            match action {
                Action::Receive(side) => {
                    let Some(fd) = session.fd(side) else { continue };
                    // Right after a full buffer more is likely waiting: try at once; otherwise
                    // wait for readiness first (no wasted attempt per request).
                    let poll_first = !session.relay.flow_from(side).last_receive_full;
                    let _ = self.ring.recv(
                        fd,
                        user_data(Op::recv_from(side), index, generation),
                        poll_first,
                    );
                }
                Action::Send(side) => self.submit_send(index, side),
                Action::CancelSend(side) => {
                    let several = session.relay.flow_to(side).sending_buffers > 1;
                    let target = user_data(Op::send_to(side), index, generation);
                    let _ = if several {
                        self.ring.cancel_owned(target, IGNORED)
                    } else {
                        self.ring.cancel(target, IGNORED)
                    };
                    self.stats.spills += 1;
                }
                Action::ShutdownWrite(side) => {
                    if let Some(fd) = session.borrow_fd(side) {
                        // A peer that is already gone fails the next operation instead.
                        let _ = socket::shutdown(fd, std::net::Shutdown::Write);
                    }
                }
                Action::Close(mode, reason) => {
                    match reason {
                        CloseReason::IdleTimeout => {
                            self.stats.idle_timeouts += 1;
                            debug!(shard = self.index, "idle timeout");
                        }
                        CloseReason::WriteTimeout(side) => {
                            self.stats.write_timeouts += 1;
                            debug!(
                                shard = self.index,
                                ?side,
                                "write timeout: the destination took no byte"
                            );
                        }
                        CloseReason::Completed | CloseReason::PeerFailed(_) | CloseReason::Cut => {}
                    }
                    self.close_session(index, mode, reason);
                }
                Action::ResetWhenDrained(_) => {
                    // Often already drained (a reset with nothing held): check now, then per tick.
                    self.lingering.push((index, generation));
                    self.linger_check_now = true;
                }
            }
        }
    }

    fn submit_send(&mut self, index: usize, destination: Side) {
        let session = &mut self.sessions[index];
        let Some(fd) = session.fd(destination) else {
            return;
        };
        let send_data = user_data(Op::send_to(destination), index, session.generation);
        let flow = session.relay.flow_to(destination);
        let submitted = match flow.sending {
            Some(SendFrom::Queue) => match flow.queue.len() {
                0 => Err(io::Error::other("nothing queued to send")),
                1 => {
                    flow.sending_buffers = 1;
                    let head = &flow.queue[0];
                    self.ring.send(fd, &head.buffer, head.sent, send_data)
                }
                queued => {
                    // Everything queued goes in one sendmsg: fewer sends and completions per
                    // byte when the source streams.
                    let count = queued.min(MAX_SEND_BUFFERS);
                    flow.sending_buffers = count;
                    let tokens: Vec<&BufToken> =
                        flow.queue.iter().take(count).map(|p| &p.buffer).collect();
                    let offset = flow.queue[0].sent;
                    self.ring.send_buffers(fd, &tokens, offset, send_data)
                }
            },
            Some(SendFrom::Spill) => match flow.lend_spill() {
                Some((data, start, end)) => self.ring.send_owned(fd, data, start, end, send_data),
                None => Err(io::Error::other("spill buffer not at hand")),
            },
            None => return,
        };
        if let Err(error) = submitted {
            warn!(shard = self.index, %error, "cannot submit a send; closing the session");
            self.stats.local_errors += 1;
            session.relay.flow_to(destination).sending = None;
            self.close_session(index, CloseMode::ResetBoth, CloseReason::Cut);
        }
    }

    // ---- close -----------------------------------------------------------------------------

    /// Ends a session: every operation still in flight is woken by a shutdown of its socket
    /// (a receive sees EOF, a send fails, a connect aborts) rather than cancelled one by one,
    /// then `finish_if_done` closes the sockets once the last completion is in.
    fn close_session(&mut self, index: usize, mode: CloseMode, reason: CloseReason) {
        let Some(session) = self.sessions.get_mut(index) else {
            return;
        };
        if session.closing {
            return;
        }
        session.closing = true;
        session.close_mode = mode;
        session.relay.set_closing();
        let _ = reason;
        let idle = session.is_idle();
        let generation = session.generation;
        for side in [Side::Client, Side::Server] {
            let reset = match mode {
                CloseMode::Graceful => false,
                CloseMode::Reset(reset_side) => reset_side == side,
                CloseMode::ResetBoth => true,
            };
            let flow = session.relay.flow_to(side);
            let sending = flow.sending.is_some();
            let owned_send = flow.sending == Some(SendFrom::Spill) || flow.sending_buffers > 1;
            let Some(fd) = session.borrow_fd(side) else {
                continue;
            };
            if reset {
                let _ = socket::set_linger_zero(fd);
            }
            if idle {
                continue;
            }
            if reset {
                // Wakes a pending receive (EOF) and aborts a connect without sending a FIN:
                // the peer's first sign is the RST of the close.
                let _ = socket::shutdown(fd, std::net::Shutdown::Read);
                if sending {
                    let target = user_data(Op::send_to(side), index, generation);
                    let _ = if owned_send {
                        self.ring.cancel_owned(target, IGNORED)
                    } else {
                        self.ring.cancel(target, IGNORED)
                    };
                }
            } else {
                // FIN now; a pending receive sees EOF and a pending send fails.
                let _ = socket::shutdown(fd, std::net::Shutdown::Both);
            }
        }
        if !idle {
            // Its timer now guards the cut: operations still pending when it fires are
            // cancelled explicitly (`expire_timers`).
            let deadline = self.now_tick + ticks(CUT_GRACE);
            if let Some(old) = session.timer.take() {
                self.timers.cancel(old);
            }
            session.timer = Some(self.timers.arm(index as u32, generation, deadline));
        }
    }

    /// Frees a closing session once no operation refers to it any more.
    fn finish_if_done(&mut self, index: usize) {
        let Some(session) = self.sessions.get(index) else {
            return;
        };
        if !session.closing || !session.is_idle() {
            return;
        }
        let mut session = self.sessions.remove(index);
        session.relay.release(self.ring.buffers_mut());
        if let Some(timer) = session.timer.take() {
            self.timers.cancel(timer);
        }
        let _ = self.ring.close(session.client, IGNORED, true);
        if let Some(server) = session.server.take() {
            let _ = self.ring.close(server, IGNORED, true);
        }
        if let Some(server) = session.server_index {
            self.balancers[usize::from(session.pool.0)].release(server);
        }
        let listener = &mut self.listeners[session.listener];
        listener.active = listener.active.saturating_sub(1);
        self.stats.closed += 1;
    }

    /// A closed session's operations have not finished a while after its sockets were shut
    /// down (a socket shut down before its connect even started, say): cancel them explicitly,
    /// and look again after another grace period.
    fn cancel_stuck_operations(&mut self, index: usize) {
        let Some(session) = self.sessions.get_mut(index) else {
            return;
        };
        for fd in [
            Some(session.client.as_raw_fd()),
            session.server.as_ref().map(AsRawFd::as_raw_fd),
        ]
        .into_iter()
        .flatten()
        {
            let _ = self.ring.cancel_fd(fd, IGNORED);
        }
        let deadline = self.now_tick + ticks(CUT_GRACE);
        session.timer = Some(self.timers.arm(index as u32, session.generation, deadline));
    }

    // ---- timers and pressure ---------------------------------------------------------------

    fn arm_timer(&mut self, index: usize) {
        let now = self.now_tick;
        let session = &mut self.sessions[index];
        let period = session.relay.check_period();
        let deadline = session.relay.next_deadline().min(now + period);
        if let Some(old) = session.timer.take() {
            self.timers.cancel(old);
        }
        session.timer = Some(self.timers.arm(index as u32, session.generation, deadline));
    }

    fn expire_timers(&mut self) {
        let tick = self.now_tick;
        let mut expired = std::mem::take(&mut self.expired);
        self.timers.advance(tick, &mut expired);
        let mut actions = std::mem::take(&mut self.actions);
        for entry in expired.drain(..) {
            let index = entry.key as usize;
            let Some(session) = self.sessions.get_mut(index) else {
                continue;
            };
            if session.generation != entry.serial {
                continue;
            }
            session.timer = None;
            if session.closing {
                self.cancel_stuck_operations(index);
                continue;
            }
            let (client, server) = (&session.client, &session.server);
            session.relay.on_tick(
                tick,
                |side| {
                    let fd = match side {
                        Side::Client => Some(client.as_fd()),
                        Side::Server => server.as_ref().map(AsFd::as_fd),
                    };
                    fd.and_then(|fd| socket::unacknowledged_bytes(fd).ok())
                },
                &mut actions,
            );
            self.execute(index, &mut actions);
            if self.sessions.get(index).is_some_and(|s| !s.closing) {
                self.arm_timer(index);
            }
            self.finish_if_done(index);
        }
        self.actions = actions;
        self.expired = expired;
    }

    fn poll_lingering(&mut self) {
        let tick = self.now_tick;
        let mut lingering = std::mem::take(&mut self.lingering);
        let mut actions = std::mem::take(&mut self.actions);
        lingering.retain(|&(index, generation)| {
            let Some(session) = self.sessions.get_mut(index) else {
                return false;
            };
            if session.generation != generation || session.closing {
                return false;
            }
            let Some(side) = session.relay.lingering() else {
                return false;
            };
            let unacknowledged = session
                .borrow_fd(side)
                .and_then(|fd| socket::unacknowledged_bytes(fd).ok())
                .unwrap_or(0);
            session
                .relay
                .on_unacknowledged(unacknowledged, tick, &mut actions);
            let done = !actions.is_empty();
            self.execute(index, &mut actions);
            self.finish_if_done(index);
            !done
        });
        self.actions = actions;
        lingering.append(&mut self.lingering);
        self.lingering = lingering;
    }

    /// When the ring runs low, directions whose destination has taken nothing for a tick have
    /// their bytes copied into memory of their own, so their ring buffers go back to the
    /// sessions that are moving.
    fn relieve_buffer_pressure(&mut self) {
        let buffers = self.ring.buffers();
        if buffers.available() >= buffers.count() / PRESSURE_DIVISOR {
            return;
        }
        let stalled_before = self.now_tick.saturating_sub(1);
        let indexes: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, session)| !session.closing && session.relay.ring_buffers() > 0)
            .map(|(index, _)| index)
            .collect();
        let mut actions = std::mem::take(&mut self.actions);
        for index in indexes {
            let session = &mut self.sessions[index];
            session
                .relay
                .spill_if_stalled(stalled_before, self.ring.buffers_mut(), &mut actions);
            self.execute(index, &mut actions);
        }
        self.actions = actions;
    }

    /// Re-arms as many starved receives as there are free buffers, oldest first.
    fn rearm_starved(&mut self) {
        let mut budget = self.ring.buffers().available();
        let mut actions = std::mem::take(&mut self.actions);
        while budget > 0 {
            let Some((index, generation, side)) = self.starved.pop_front() else {
                break;
            };
            let Some(session) = self.sessions.get_mut(index) else {
                continue;
            };
            if session.generation != generation {
                continue;
            }
            if session.relay.on_buffers_available(side, &mut actions) {
                budget -= 1;
            }
            self.execute(index, &mut actions);
        }
        self.actions = actions;
    }
}

/// A duration in loop ticks, at least one.
pub fn ticks(duration: Duration) -> u64 {
    (duration.as_millis().div_ceil(TICK.as_millis()) as u64).max(1)
}
