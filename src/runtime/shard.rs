//! One shard: a pinned thread's io_uring loop and everything it owns.
//!
//! Owns its listeners' sockets, its sessions, its buffer ring, its balancer state per pool and
//! its counters; shares nothing with other shards on the data path. Each loop turn: publish
//! recycled buffers, one `io_uring_enter` (submit + wait), then handle every completion, expire
//! timers and re-arm what needs re-arming. The only cross-thread input is the control command,
//! read when the shard's eventfd fires.

use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, IntoRawFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use slab::Slab;
use tracing::{debug, info, warn};

use super::{ShardCommand, ShardControl, ShardReport, ShardStats};
use crate::admission::{self, Admission, RejectReason};
use crate::balance::{PoolBalancer, client_key};
use crate::config::Config;
use crate::relay::{CloseMode, Pending, Session, SessionState, Side};
use crate::uring::timer::{TimerEntry, TimerWheel};
use crate::uring::{BufRing, Completion, Ring, socket};

/// Timer resolution: idle timeouts and drain deadlines are checked this often.
const TICK: Duration = Duration::from_millis(100);
/// How long accepting pauses after the process ran out of descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// After a drain deadline cut every session, how long to wait for their cancellations.
const CUT_GRACE: Duration = Duration::from_secs(5);

/// What a completion belongs to: the low byte of `user_data`; the rest is a slot index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum Op {
    /// Close, cancel and linked-timeout completions carry nothing to act on.
    Ignored = 0,
    Accept = 1,
    ClientRecv = 2,
    ServerRecv = 3,
    SendToServer = 4,
    SendToClient = 5,
    Connect = 6,
    Shutdown = 7,
    Wake = 8,
}

impl Op {
    fn from_tag(tag: u8) -> Op {
        match tag {
            1 => Op::Accept,
            2 => Op::ClientRecv,
            3 => Op::ServerRecv,
            4 => Op::SendToServer,
            5 => Op::SendToClient,
            6 => Op::Connect,
            7 => Op::Shutdown,
            8 => Op::Wake,
            _ => Op::Ignored,
        }
    }

    fn recv_from(side: Side) -> Op {
        match side {
            Side::Client => Op::ClientRecv,
            Side::Server => Op::ServerRecv,
        }
    }

    fn send_to(side: Side) -> Op {
        match side {
            Side::Client => Op::SendToClient,
            Side::Server => Op::SendToServer,
        }
    }
}

fn user_data(op: Op, index: usize) -> u64 {
    ((index as u64) << 8) | op as u64
}

const IGNORED: u64 = Op::Ignored as u64;

struct ShardListener {
    fd: Option<OwnedFd>,
    config_index: usize,
    /// This shard's share of the listener's max_connections.
    share: u32,
    active: u32,
    accepting: bool,
    /// When accepting paused for lack of descriptors, when to try again.
    retry_at: Option<Instant>,
}

pub struct ShardSetup {
    pub index: usize,
    pub config: Arc<Config>,
    /// Per listener (in config order), this shard's socket and connection share.
    pub listeners: Vec<(OwnedFd, u32)>,
    pub control: Arc<ShardControl>,
}

pub struct Shard {
    // Field order is drop order: the ring goes before the buffers it has registered.
    ring: Ring,
    buffers: BufRing,
    index: usize,
    config: Arc<Config>,
    listeners: Vec<ShardListener>,
    sessions: Slab<Session>,
    balancers: Vec<PoolBalancer>,
    /// Server addresses per pool, resolved once.
    server_addrs: Vec<Vec<SocketAddr>>,
    timers: TimerWheel,
    expired: Vec<TimerEntry>,
    completions: Vec<Completion>,
    /// Sessions (index, serial, source side) waiting for receive buffers.
    starved: VecDeque<(usize, u32, Side)>,
    control: Arc<ShardControl>,
    started: Instant,
    now: Instant,
    /// `now` as timer ticks and as milliseconds since start, computed once per loop turn.
    now_tick: u64,
    now_ms: u64,
    next_serial: u32,
    draining_until: Option<Instant>,
    /// Set once the drain deadline has cut the remaining sessions.
    cut_at: Option<Instant>,
    stats: ShardStats,
}

impl Shard {
    pub fn new(setup: ShardSetup) -> io::Result<Shard> {
        let config = setup.config;
        let tuning = &config.tuning;
        let ring = Ring::new(tuning.ring_entries)?;
        let buffer_count = u16::try_from(tuning.buffer_count).unwrap_or(32_768);
        let buffers = BufRing::new(&ring, 0, buffer_count, tuning.buffer_size)?;
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
        let now = Instant::now();
        Ok(Shard {
            ring,
            buffers,
            index: setup.index,
            config,
            listeners,
            sessions: Slab::new(),
            balancers,
            server_addrs,
            timers: TimerWheel::new(1024),
            expired: Vec::new(),
            completions: Vec::with_capacity(1024),
            starved: VecDeque::new(),
            control: setup.control,
            started: now,
            now,
            now_tick: 0,
            now_ms: 0,
            next_serial: 0,
            draining_until: None,
            cut_at: None,
            stats: ShardStats::default(),
        })
    }

    fn tick(&self) -> u64 {
        self.now_tick
    }

    fn now_ms(&self) -> u64 {
        self.now_ms
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
        self.ring
            .read_eventfd(self.control.eventfd.as_raw_fd(), user_data(Op::Wake, 0))?;
        for index in 0..self.listeners.len() {
            self.arm_accept(index)?;
        }
        loop {
            self.buffers.publish();
            let wait = if self.sessions.is_empty()
                && self.draining_until.is_none()
                && self.listeners.iter().all(|l| l.retry_at.is_none())
            {
                None
            } else {
                Some(TICK)
            };
            self.ring.submit_and_wait(wait)?;
            self.update_clock();
            let mut completions = std::mem::take(&mut self.completions);
            self.ring.drain_completions(&mut completions);
            self.stats.loop_turns += 1;
            self.stats.completions += completions.len() as u64;
            for completion in completions.drain(..) {
                self.handle(completion)?;
            }
            self.completions = completions;
            self.expire_timers()?;
            self.rearm_starved()?;
            self.retry_accepts()?;
            if self.drain_progress()? {
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

    fn handle(&mut self, completion: Completion) -> io::Result<()> {
        let index = (completion.user_data >> 8) as usize;
        let op = Op::from_tag(completion.user_data as u8);
        let session_op = !matches!(op, Op::Ignored | Op::Wake | Op::Accept);
        if session_op && !self.sessions.contains(index) {
            // Cannot happen while `inflight` is kept right; never let it take the shard down.
            warn!(
                shard = self.index,
                ?op,
                index,
                "completion for a session that no longer exists"
            );
            debug_assert!(false, "stray completion {op:?} for slot {index}");
            return Ok(());
        }
        match op {
            Op::Ignored => Ok(()),
            Op::Wake => self.on_wake(completion),
            Op::Accept => self.on_accept(index, completion),
            Op::Connect => self.on_connect(index, completion.result),
            Op::ClientRecv => self.on_receive(index, Side::Client, completion),
            Op::ServerRecv => self.on_receive(index, Side::Server, completion),
            Op::SendToServer => self.on_sent(index, Side::Server, completion.result),
            Op::SendToClient => self.on_sent(index, Side::Client, completion.result),
            Op::Shutdown => {
                if let Some(session) = self.sessions.get_mut(index) {
                    session.inflight -= 1;
                }
                self.finish_if_done(index)
            }
        }
    }

    // ---- control ---------------------------------------------------------------------------

    fn on_wake(&mut self, completion: Completion) -> io::Result<()> {
        match self.control.command() {
            ShardCommand::Run => {}
            ShardCommand::Drain => self.begin_drain()?,
            ShardCommand::Stop => {
                self.begin_drain()?;
                self.draining_until = Some(self.now);
            }
        }
        if completion.result >= 0 || completion.result == -libc::EAGAIN {
            self.ring
                .read_eventfd(self.control.eventfd.as_raw_fd(), user_data(Op::Wake, 0))?;
        }
        Ok(())
    }

    fn begin_drain(&mut self) -> io::Result<()> {
        if self.draining_until.is_some() {
            return Ok(());
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
                let raw = fd.into_raw_fd();
                self.ring.cancel_fd(raw, IGNORED)?;
                self.ring.close(raw, IGNORED)?;
            }
        }
        Ok(())
    }

    /// Returns true when the shard may exit.
    fn drain_progress(&mut self) -> io::Result<bool> {
        let Some(deadline) = self.draining_until else {
            return Ok(false);
        };
        let accepts_done = self.listeners.iter().all(|l| !l.accepting);
        if self.sessions.is_empty() && accepts_done {
            return Ok(true);
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
                self.close_session(index, CloseMode::ResetBoth)?;
            }
        }
        if let Some(cut_at) = self.cut_at
            && self.now >= cut_at + CUT_GRACE
        {
            warn!(
                shard = self.index,
                sessions = self.sessions.len(),
                "sessions did not finish cancelling; exiting anyway"
            );
            return Ok(true);
        }
        Ok(false)
    }

    // ---- accept ----------------------------------------------------------------------------

    fn arm_accept(&mut self, index: usize) -> io::Result<()> {
        let listener = &mut self.listeners[index];
        let Some(fd) = &listener.fd else {
            return Ok(());
        };
        self.ring
            .accept_multishot(fd.as_raw_fd(), user_data(Op::Accept, index))?;
        listener.accepting = true;
        Ok(())
    }

    fn retry_accepts(&mut self) -> io::Result<()> {
        for index in 0..self.listeners.len() {
            let listener = &mut self.listeners[index];
            if let Some(retry_at) = listener.retry_at
                && self.now >= retry_at
            {
                listener.retry_at = None;
                if !listener.accepting {
                    self.arm_accept(index)?;
                }
            }
        }
        Ok(())
    }

    fn on_accept(&mut self, index: usize, completion: Completion) -> io::Result<()> {
        let Some(listener) = self.listeners.get_mut(index) else {
            return Ok(());
        };
        if !completion.more() {
            listener.accepting = false;
        }
        if completion.result < 0 {
            let errno = -completion.result;
            match errno {
                libc::ECANCELED => {}
                libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM => {
                    self.stats.accept_errors += 1;
                    warn!(
                        shard = self.index,
                        listener = %self.config.listeners[listener.config_index].name,
                        error = %io::Error::from_raw_os_error(errno),
                        "accept failed for lack of resources; pausing accepts"
                    );
                    listener.retry_at = Some(self.now + ACCEPT_BACKOFF);
                }
                _ => {
                    self.stats.accept_errors += 1;
                    debug!(shard = self.index, error = %io::Error::from_raw_os_error(errno), "accept error");
                    if !listener.accepting && listener.fd.is_some() {
                        listener.retry_at = Some(self.now);
                    }
                }
            }
            return Ok(());
        }
        let client_fd = completion.result;
        let listener_accepting = listener.accepting;
        let decision = admission::admit(
            listener.active,
            listener.share,
            self.draining_until.is_some(),
        );
        let config_index = listener.config_index;
        // Re-arm a multishot accept the kernel ended (e.g. CQ pressure), unless draining.
        if !listener_accepting && listener.fd.is_some() && listener.retry_at.is_none() {
            self.arm_accept(index)?;
        }
        match decision {
            Admission::Reject(reason) => {
                self.stats.rejected += 1;
                debug!(shard = self.index, listener = %self.config.listeners[config_index].name, ?reason, "connection rejected");
                if reason == RejectReason::ListenerFull {
                    self.stats.rejected_full += 1;
                }
                socket::close_unused(client_fd);
                Ok(())
            }
            Admission::Accept => self.start_session(index, client_fd),
        }
    }

    fn start_session(&mut self, listener_index: usize, client_fd: i32) -> io::Result<()> {
        let listener_config = &self.config.listeners[self.listeners[listener_index].config_index];
        let pool = listener_config.pool;
        let idle_ticks = ticks(listener_config.idle_timeout);
        // TCP_NODELAY is inherited from the listening socket (set in `listener::bind`).
        let key = if self.config.pool(pool).balance.needs_client_address() {
            socket::peer_ip(client_fd).map(client_key).unwrap_or(0)
        } else {
            0
        };
        self.next_serial = self.next_serial.wrapping_add(1);
        let tick = self.tick();
        let session = Session::new(self.next_serial, listener_index, pool, client_fd, key, tick);
        let serial = session.serial;
        let index = self.sessions.insert(session);
        self.listeners[listener_index].active += 1;
        self.stats.accepted += 1;
        self.timers.arm(index as u32, serial, tick + idle_ticks);
        self.connect_next(index)
    }

    // ---- connect ---------------------------------------------------------------------------

    fn connect_next(&mut self, index: usize) -> io::Result<()> {
        let now_ms = self.now_ms();
        let session = &mut self.sessions[index];
        let pool_id = session.pool;
        let pool = self.config.pool(pool_id);
        let balancer = &mut self.balancers[usize::from(pool_id.0)];
        let Some(server) = balancer.pick(session.client_key, session.tried, now_ms) else {
            self.stats.no_server += 1;
            debug!(shard = self.index, pool = %pool.name, attempts = session.attempts, "no server available");
            return self.close_session(index, CloseMode::Graceful);
        };
        let addr = self.server_addrs[usize::from(pool_id.0)][server];
        let server_fd = match socket::tcp_socket_for(&addr) {
            Ok(fd) => fd,
            Err(error) => {
                self.stats.local_errors += 1;
                warn!(shard = self.index, pool = %pool.name, %error, "cannot create a server socket");
                return self.close_session(index, CloseMode::Graceful);
            }
        };
        balancer.acquire(server);
        session.server = Some(server);
        session.server_fd = server_fd;
        session.tried.insert(server);
        session.attempts += 1;
        session.inflight += 1;
        self.ring.connect(
            server_fd,
            addr,
            pool.connect_timeout,
            user_data(Op::Connect, index),
            IGNORED,
        )
    }

    fn on_connect(&mut self, index: usize, result: i32) -> io::Result<()> {
        let now_ms = self.now_ms();
        let tick = self.tick();
        let session = &mut self.sessions[index];
        session.inflight -= 1;
        if session.state == SessionState::Closing {
            return self.finish_if_done(index);
        }
        let pool_id = session.pool;
        let pool = self.config.pool(pool_id);
        let balancer = &mut self.balancers[usize::from(pool_id.0)];
        let Some(server) = session.server else {
            return self.finish_if_done(index);
        };
        if result == 0 {
            balancer.record_success(server);
            session.state = SessionState::Relaying;
            session.last_active = tick;
            return self.arm_receives(index);
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
        session.server = None;
        let server_fd = std::mem::replace(&mut session.server_fd, -1);
        self.ring.close(server_fd, IGNORED)?;
        let addr = self.server_addrs[usize::from(pool_id.0)][server];
        if was_down {
            warn!(shard = self.index, pool = %pool.name, server = %addr, %error, "server marked down after connect failures");
        } else {
            debug!(shard = self.index, pool = %pool.name, server = %addr, %error, "connect failed");
        }
        if session.attempts <= pool.retries {
            self.stats.retries += 1;
            self.connect_next(index)
        } else {
            self.stats.no_server += 1;
            debug!(shard = self.index, pool = %pool.name, attempts = session.attempts, "giving up on this session");
            self.close_session(index, CloseMode::Graceful)
        }
    }

    // ---- relay -----------------------------------------------------------------------------

    fn arm_receives(&mut self, index: usize) -> io::Result<()> {
        for side in [Side::Client, Side::Server] {
            self.arm_receive(index, side)?;
        }
        Ok(())
    }

    fn arm_receive(&mut self, index: usize, source: Side) -> io::Result<()> {
        let session = &mut self.sessions[index];
        if session.state != SessionState::Relaying || !session.flow_from(source).wants_receive() {
            return Ok(());
        }
        let fd = session.fd(source);
        session.flow_from(source).receiving = true;
        session.inflight += 1;
        self.ring
            .recv_multishot(fd, &self.buffers, user_data(Op::recv_from(source), index))
    }

    fn on_receive(&mut self, index: usize, source: Side, completion: Completion) -> io::Result<()> {
        let tick = self.tick();
        let queue_limit = self.config.tuning.queued_buffers as usize;
        let token = if completion.result > 0 {
            self.buffers
                .take(completion.flags, completion.result as u32)
        } else {
            None
        };
        let session = &mut self.sessions[index];
        let serial = session.serial;
        let closing = session.state == SessionState::Closing;
        if !completion.more() {
            session.inflight -= 1;
            let flow = session.flow_from(source);
            flow.receiving = false;
            // The cancel of a paused receive may land after the queue already drained.
            flow.resume_if_drained(queue_limit);
        }
        if closing {
            if let Some(token) = token {
                self.buffers.recycle(token);
            }
            return self.finish_if_done(index);
        }
        let flow = session.flow_from(source);
        match completion.result {
            1.. => {
                let Some(token) = token else {
                    warn!(
                        shard = self.index,
                        "receive completion without a valid buffer"
                    );
                    return self.close_session(index, CloseMode::ResetBoth);
                };
                flow.bytes += u64::from(token.len());
                flow.queue.push_back(Pending { token, sent: 0 });
                // Backpressure: stop reading this source until the queue drains. Only an armed
                // receive needs cancelling; an ended one is simply not re-armed.
                let pause = flow.queue.len() >= queue_limit && !flow.paused;
                if pause {
                    flow.paused = true;
                }
                let cancel = pause && flow.receiving;
                session.last_active = tick;
                if cancel {
                    self.ring
                        .cancel(user_data(Op::recv_from(source), index), IGNORED)?;
                }
                self.send_next(index, source.other())?;
            }
            0 => {
                flow.eof = true;
                self.pass_fin_if_flushed(index, source.other())?;
            }
            error if error == -libc::ENOBUFS => {
                if !flow.starved {
                    flow.starved = true;
                    self.stats.buffer_starvation += 1;
                    self.starved.push_back((index, serial, source));
                }
            }
            error if error == -libc::ECANCELED => {}
            error => {
                let error = io::Error::from_raw_os_error(-error);
                debug!(shard = self.index, side = ?source, %error, "receive failed; resetting the other side");
                self.stats.resets += 1;
                return self.close_session(index, CloseMode::Reset(source.other()));
            }
        }
        if self.sessions.contains(index) {
            self.arm_receive(index, source)?;
        }
        Ok(())
    }

    /// Sends the head of the queue toward `destination` if no send is in flight.
    fn send_next(&mut self, index: usize, destination: Side) -> io::Result<()> {
        let session = &mut self.sessions[index];
        let fd = session.fd(destination);
        let flow = match destination {
            Side::Server => &mut session.upstream,
            Side::Client => &mut session.downstream,
        };
        if flow.sending {
            return Ok(());
        }
        let Some(head) = flow.queue.front() else {
            return Ok(());
        };
        flow.sending = true;
        session.inflight += 1;
        self.ring.send(
            fd,
            &mut self.buffers,
            &head.token,
            head.sent,
            user_data(Op::send_to(destination), index),
        )
    }

    fn on_sent(&mut self, index: usize, destination: Side, result: i32) -> io::Result<()> {
        let tick = self.tick();
        let queue_limit = self.config.tuning.queued_buffers as usize;
        let session = &mut self.sessions[index];
        session.inflight -= 1;
        session.last_active = tick;
        let closing = session.state == SessionState::Closing;
        let flow = session.flow_from(destination.other());
        flow.sending = false;
        let Some(head) = flow.queue.front_mut() else {
            return self.finish_if_done(index);
        };
        self.buffers.send_completed(&head.token);
        if closing {
            return self.finish_if_done(index);
        }
        if result <= 0 {
            let error = if result == 0 {
                io::Error::from(io::ErrorKind::WriteZero)
            } else {
                io::Error::from_raw_os_error(-result)
            };
            debug!(shard = self.index, side = ?destination, %error, "send failed; resetting the other side");
            self.stats.resets += 1;
            return self.close_session(index, CloseMode::Reset(destination.other()));
        }
        head.sent += result as u32;
        if head.sent >= head.token.len()
            && let Some(done) = flow.queue.pop_front()
        {
            self.buffers.recycle(done.token);
        }
        match destination {
            Side::Server => self.stats.bytes_to_server += result as u64,
            Side::Client => self.stats.bytes_to_client += result as u64,
        }
        let resume = flow.resume_if_drained(queue_limit);
        self.send_next(index, destination)?;
        if resume {
            self.arm_receive(index, destination.other())?;
        }
        self.pass_fin_if_flushed(index, destination)
    }

    /// Once the flow toward `destination` has delivered everything after its source's FIN,
    /// passes the FIN on; closes the session when both directions are done.
    fn pass_fin_if_flushed(&mut self, index: usize, destination: Side) -> io::Result<()> {
        let session = &mut self.sessions[index];
        let fd = session.fd(destination);
        let flow = session.flow_from(destination.other());
        if flow.eof && !flow.shut && flow.is_flushed() {
            flow.shut = true;
            session.inflight += 1;
            self.ring
                .shutdown_write(fd, user_data(Op::Shutdown, index))?;
        }
        if session.is_complete() {
            return self.close_session(index, CloseMode::Graceful);
        }
        Ok(())
    }

    // ---- close -----------------------------------------------------------------------------

    fn close_session(&mut self, index: usize, mode: CloseMode) -> io::Result<()> {
        let Some(session) = self.sessions.get_mut(index) else {
            return Ok(());
        };
        if session.state == SessionState::Closing {
            return Ok(());
        }
        session.state = SessionState::Closing;
        let reset_client = matches!(mode, CloseMode::Reset(Side::Client) | CloseMode::ResetBoth);
        let reset_server = matches!(mode, CloseMode::Reset(Side::Server) | CloseMode::ResetBoth);
        if reset_client {
            let _ = socket::set_linger_zero(session.client_fd);
        }
        if reset_server && session.server_fd >= 0 {
            let _ = socket::set_linger_zero(session.server_fd);
        }
        if session.inflight > 0 {
            for fd in [session.client_fd, session.server_fd] {
                if fd >= 0 {
                    self.ring.cancel_fd(fd, IGNORED)?;
                }
            }
        }
        self.finish_if_done(index)
    }

    /// Frees a closing session once no operation refers to it any more.
    fn finish_if_done(&mut self, index: usize) -> io::Result<()> {
        let Some(session) = self.sessions.get(index) else {
            return Ok(());
        };
        if session.state != SessionState::Closing || session.inflight > 0 {
            return Ok(());
        }
        let session = self.sessions.remove(index);
        for flow in [session.upstream, session.downstream] {
            for pending in flow.queue {
                self.buffers.recycle(pending.token);
            }
        }
        self.ring.close(session.client_fd, IGNORED)?;
        if session.server_fd >= 0 {
            self.ring.close(session.server_fd, IGNORED)?;
        }
        if let Some(server) = session.server {
            self.balancers[usize::from(session.pool.0)].release(server);
        }
        let listener = &mut self.listeners[session.listener];
        listener.active = listener.active.saturating_sub(1);
        self.stats.closed += 1;
        Ok(())
    }

    // ---- timers ----------------------------------------------------------------------------

    fn expire_timers(&mut self) -> io::Result<()> {
        let tick = self.tick();
        let mut expired = std::mem::take(&mut self.expired);
        self.timers.advance(tick, &mut expired);
        for entry in expired.drain(..) {
            let index = entry.key as usize;
            let Some(session) = self.sessions.get(index) else {
                continue;
            };
            if session.serial != entry.serial || session.state == SessionState::Closing {
                continue;
            }
            let idle_ticks = ticks(
                self.config.listeners[self.listeners[session.listener].config_index].idle_timeout,
            );
            let deadline = session.last_active + idle_ticks;
            if tick >= deadline {
                self.stats.idle_timeouts += 1;
                debug!(shard = self.index, "idle timeout");
                self.close_session(index, CloseMode::Graceful)?;
            } else {
                self.timers.arm(entry.key, entry.serial, deadline);
            }
        }
        self.expired = expired;
        Ok(())
    }

    fn rearm_starved(&mut self) -> io::Result<()> {
        while self.buffers.available() > 0 {
            let Some((index, serial, side)) = self.starved.pop_front() else {
                break;
            };
            let Some(session) = self.sessions.get_mut(index) else {
                continue;
            };
            if session.serial != serial {
                continue;
            }
            session.flow_from(side).starved = false;
            self.arm_receive(index, side)?;
        }
        Ok(())
    }
}

fn ticks(duration: Duration) -> u64 {
    (duration.as_millis().div_ceil(TICK.as_millis()) as u64).max(1)
}
