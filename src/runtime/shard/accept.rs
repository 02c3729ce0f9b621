//! The shard's listeners: their sockets (added and removed as the config changes), multishot
//! accepts, admission of each accepted connection, and the drain at shutdown.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::Instant;

use tracing::{debug, info, warn};

use super::super::log_limit::{self, Verdict};
use super::{ACCEPT_BACKOFF, CUT_GRACE, IGNORED, Op, Shard, user_data};
use crate::admission::{self, Admission, Gate, RejectMode, RejectReason, TokenBucket, shard_share};
use crate::balance::client_key;
use crate::metrics::CloseKind;
use crate::relay::{CloseMode, Limits, Relay};
use crate::runtime::session::{GENERATION_MASK, HeaderWait, Session};
use crate::snapshot::ListenerId;
use crate::uring::{Completion, socket};

/// Accept errors in a row (each re-armed at once) before accepting backs off anyway.
const ACCEPT_ERRORS_BEFORE_BACKOFF: u32 = 64;
/// Log-limiter kind of accept failures.
const LOG_ACCEPT_FAILED: u8 = 2;
/// Multishot accepts are used while more sessions fit than the listen backlog plus this could
/// deliver at once.
const ACCEPT_MARGIN: usize = 64;
/// Single accepts in flight per listener, near the descriptor room.
const ACCEPT_BATCH: usize = 16;

pub(super) struct ShardListener {
    pub id: ListenerId,
    /// Tells this listener's sessions from those of an earlier one with the same id (32 bits:
    /// sessions give their per-source slots back by it).
    pub epoch: u32,
    /// Tells this listener's accept completions from those of an earlier one in the same slot.
    pub generation: u32,
    pub fd: Option<OwnedFd>,
    /// Its counters' slot (`Counters::listeners`).
    pub counters: usize,
    /// This shard's share of the listener's max_connections.
    pub share: u32,
    /// A multishot accept is armed.
    pub multishot: bool,
    /// Single accepts armed (near the descriptor room).
    pub singles: u32,
    /// When accepting paused (accept errors), when to try again.
    pub retry_at: Option<Instant>,
    /// Accept errors since the last accepted connection.
    pub errors_in_a_row: u32,
    /// ACL, connection rates and per-source limits of this listener on this shard.
    pub gate: Gate,
    /// This shard's share of the listener's `bandwidth` (bytes per second, both directions).
    pub bandwidth: Option<TokenBucket>,
}

/// A session's per-source slot when it has none.
pub(super) const NO_SOURCE_SLOT: u32 = u32::MAX;

impl Shard {
    /// Takes this shard's socket of listener `id` (replacing the socket it had for it, if any:
    /// a reload moved the listener to another address). Returns its slot.
    pub(super) fn add_listener(&mut self, id: ListenerId, fd: OwnedFd) -> usize {
        self.remove_listener(id);
        let counters = self.counters.listeners.slot(id);
        if let Some(listener) = self.counters.listeners.get_mut(counters) {
            listener.bound = true;
        }
        self.next_generation = (self.next_generation + 1) & GENERATION_MASK;
        let settings = self
            .snapshot
            .listener(id)
            .map(|config| (*config.admission).clone())
            .unwrap_or_default();
        let gate = Gate::new(settings, 1.0 / self.shards as f64, self.now_us);
        self.next_listener_epoch = self.next_listener_epoch.wrapping_add(1);
        let key = self.listeners.insert(ShardListener {
            id,
            epoch: self.next_listener_epoch,
            generation: self.next_generation,
            fd: Some(fd),
            counters,
            share: 0,
            multishot: false,
            singles: 0,
            retry_at: None,
            errors_in_a_row: 0,
            gate,
            bandwidth: None,
        });
        self.update_listener_shares();
        key
    }

    /// Closes this shard's socket of listener `id`; its sessions carry on.
    pub(super) fn remove_listener(&mut self, id: ListenerId) {
        let Some(key) = self
            .listeners
            .iter()
            .find(|(_, listener)| listener.id == id)
            .map(|(key, _)| key)
        else {
            return;
        };
        let listener = self.listeners.remove(key);
        if let Some(counters) = self.counters.listeners.get_mut(listener.counters) {
            counters.bound = false;
        }
        if let Some(fd) = listener.fd {
            let _ = self.ring.cancel_fd(fd.as_raw_fd(), IGNORED);
            let _ = self.ring.close(fd, IGNORED, true);
        }
    }

    /// Each listener's share of its connection limit and its admission settings, from the
    /// current snapshot (buckets of unchanged keys keep their tokens).
    pub(super) fn update_listener_shares(&mut self) {
        for (_, listener) in &mut self.listeners {
            if let Some(config) = self.snapshot.listener(listener.id) {
                listener.share = shard_share(config.max_connections.get(), self.index, self.shards);
                if *config.admission != *listener.gate.settings() {
                    listener
                        .gate
                        .reconfigure((*config.admission).clone(), self.now_us);
                }
                let share = config
                    .admission
                    .bandwidth
                    .map(|rate| (rate / self.shards as u64).max(1));
                listener.bandwidth = match (share, listener.bandwidth.take()) {
                    (Some(rate), Some(mut bucket)) => {
                        bucket.reconfigure(
                            u128::from(rate) * 1_000_000,
                            (rate / 10).max(1),
                            self.now_us,
                        );
                        Some(bucket)
                    }
                    (Some(rate), None) => Some(super::throttle::rate_bucket(rate, self.now_us)),
                    (None, _) => None,
                };
            }
        }
        self.process_share = self
            .snapshot
            .config
            .runtime
            .max_connections
            .map_or(u32::MAX, |limit| {
                shard_share(limit.get(), self.index, self.shards)
            });
    }

    /// The control thread's new shares of listener-wide rates for this shard.
    pub(super) fn set_rate_shares(&mut self, shares: &[(ListenerId, f64)]) {
        for (_, listener) in &mut self.listeners {
            if let Some((_, share)) = shares.iter().find(|(id, _)| *id == listener.id) {
                listener.gate.set_share(*share, self.now_us);
            }
        }
    }

    /// A session admitted with a per-source slot ended: its address has one connection less.
    pub(super) fn release_source(&mut self, listener: ListenerId, epoch: u32, slot: u32) {
        if slot == NO_SOURCE_SLOT {
            return;
        }
        let now_us = self.now_us;
        if let Some((_, shard_listener)) = self
            .listeners
            .iter_mut()
            .find(|(_, l)| l.id == listener && l.epoch == epoch)
        {
            shard_listener.gate.release(slot, now_us);
        }
    }

    /// Forgets expired per-source entries (a few hundred per listener per tick).
    pub(super) fn sweep_sources(&mut self) {
        let now_us = self.now_us;
        for (_, listener) in &mut self.listeners {
            listener.gate.sweep(now_us);
        }
    }

    /// Arms accepts on a listener, as many as the shard has room for. With plenty of room (more
    /// than the listen backlog could deliver at once), one multishot accept; close to the
    /// room, single accepts, at most as many in flight as sessions still fit. A multishot
    /// accept takes every queued connection in one go, and each takes a descriptor: near the
    /// descriptor limit that would leave none for the server sides.
    pub(super) fn arm_accept(&mut self, key: usize) {
        if self.paused_for_room || self.draining_until.is_some() {
            return;
        }
        let free = self.descriptor_room.saturating_sub(self.sessions.len());
        if free == 0 {
            self.pause_for_room();
            return;
        }
        let singles_in_flight: usize = self
            .listeners
            .iter()
            .map(|(_, listener)| listener.singles as usize)
            .sum();
        let Some(listener) = self.listeners.get_mut(key) else {
            return;
        };
        let Some(fd) = &listener.fd else {
            return;
        };
        if listener.retry_at.is_some() {
            return;
        }
        let raw = fd.as_raw_fd();
        let backlog = self
            .snapshot
            .listener(listener.id)
            .map_or(4096, |config| config.backlog as usize);
        if free > backlog + ACCEPT_MARGIN {
            if !listener.multishot && listener.singles == 0 {
                listener.multishot = true;
                let data = user_data(Op::Accept, key, listener.generation);
                let _ = self.ring.accept_multishot(raw, data);
            }
            return;
        }
        if listener.multishot {
            // Room is getting short: switch to single accepts once the multishot one ends.
            let target = user_data(Op::Accept, key, listener.generation);
            let _ = self.ring.cancel(target, IGNORED);
            return;
        }
        let budget = free
            .saturating_sub(singles_in_flight)
            .min(ACCEPT_BATCH.saturating_sub(listener.singles as usize));
        for _ in 0..budget {
            listener.singles += 1;
            let data = user_data(Op::AcceptOnce, key, listener.generation);
            let _ = self.ring.accept(raw, data);
        }
    }

    /// Cancels every accept in flight on a listener (their completions report ECANCELED).
    fn cancel_accepts(&mut self, key: usize) {
        if let Some(fd) = self.listeners.get(key).and_then(|l| l.fd.as_ref()) {
            let _ = self.ring.cancel_fd(fd.as_raw_fd(), IGNORED);
        }
    }

    /// The shard is at its descriptor room: stop accepting (clients wait in the backlog) until
    /// sessions end.
    fn pause_for_room(&mut self) {
        if self.paused_for_room {
            return;
        }
        self.paused_for_room = true;
        warn!(
            shard = self.index,
            sessions = self.sessions.len(),
            "out of descriptors for more sessions: accepting pauses until sessions end"
        );
        let keys: Vec<usize> = self.listeners.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.cancel_accepts(key);
        }
    }

    /// Sessions ended: accept again if accepting paused for lack of descriptors.
    pub(super) fn resume_if_room(&mut self) {
        if !self.paused_for_room || self.sessions.len() >= self.descriptor_room {
            return;
        }
        self.paused_for_room = false;
        let keys: Vec<usize> = self.listeners.iter().map(|(key, _)| key).collect();
        for key in keys {
            self.arm_accept(key);
        }
    }

    pub(super) fn retry_accepts(&mut self) {
        let due: Vec<usize> = self
            .listeners
            .iter()
            .filter(|(_, listener)| listener.retry_at.is_some_and(|at| self.now >= at))
            .map(|(key, _)| key)
            .collect();
        for key in due {
            self.listeners[key].retry_at = None;
            self.arm_accept(key);
        }
    }

    /// Stops accepting for `ACCEPT_BACKOFF` (the accepts are cancelled; `retry_accepts`
    /// re-arms them).
    pub(super) fn pause_accepts(&mut self) {
        let resume = self.now + ACCEPT_BACKOFF;
        let keys: Vec<usize> = self.listeners.iter().map(|(key, _)| key).collect();
        for key in keys {
            if self.listeners[key].retry_at.is_none() {
                self.cancel_accepts(key);
            }
            self.listeners[key].retry_at = Some(resume);
        }
    }

    pub(super) fn on_accept(
        &mut self,
        key: usize,
        generation: u32,
        single: bool,
        completion: &mut Completion,
    ) {
        let tick = self.now_tick;
        let current = self
            .listeners
            .get(key)
            .is_some_and(|listener| listener.generation == generation);
        if !current {
            // The listener was removed (a reload) while an accept was in flight: a connection
            // it still took is closed at once.
            drop(completion.accepted_fd());
            return;
        }
        let listener = &mut self.listeners[key];
        if single {
            listener.singles = listener.singles.saturating_sub(1);
        } else if !completion.more() {
            listener.multishot = false;
        }
        let Some(client) = completion.accepted_fd() else {
            let errno = -completion.result();
            if errno == libc::ECANCELED {
                // Cancelled to switch modes or to pause: arm again if that is due.
                self.arm_accept(key);
                return;
            }
            self.stats.accept_errors += 1;
            listener.errors_in_a_row += 1;
            let error = io::Error::from_raw_os_error(errno);
            // A client that reset before it was accepted is its own problem; anything else
            // (no descriptors, no memory, a broken listener) backs off instead of spinning.
            let transient = matches!(errno, libc::ECONNABORTED | libc::EINTR | libc::EAGAIN)
                && listener.errors_in_a_row < ACCEPT_ERRORS_BEFORE_BACKOFF;
            let name = self
                .snapshot
                .listener(listener.id)
                .map_or("?", |config| config.name.as_str());
            if transient {
                debug!(shard = self.index, listener = %name, %error, "accept error");
                self.arm_accept(key);
            } else {
                if let Verdict::Log { suppressed } = self
                    .logs
                    .check(log_limit::key(LOG_ACCEPT_FAILED, key, 0), tick)
                {
                    warn!(shard = self.index, listener = %name, %error, suppressed, "accept failed; pausing accepts for 100ms");
                }
                listener.retry_at = Some(self.now + ACCEPT_BACKOFF);
                self.cancel_accepts(key);
            }
            return;
        };
        listener.errors_in_a_row = 0;
        let counters_slot = listener.counters;
        let share = listener.share;
        let id = listener.id;
        let listener_epoch = listener.epoch;
        let active = self
            .counters
            .listeners
            .get(counters_slot)
            .map_or(0, |counters| counters.active);
        if self.sessions.len() >= self.descriptor_room {
            // Accepted in the same batch as the one that filled the room: there is no
            // descriptor for its server side, so it is closed now rather than later.
            self.pause_for_room();
            self.refuse(key, counters_slot, client, RejectReason::ProcessFull);
            return;
        }
        let mut verdict = match admission::admit(active, share, self.draining_until.is_some()) {
            Admission::Reject(reason) => Err(reason),
            Admission::Accept if self.sessions.len() >= self.process_share as usize => {
                Err(RejectReason::ProcessFull)
            }
            Admission::Accept => Ok(None),
        };
        // A listener taking PROXY headers reads one first; a trusted peer's connection is
        // admitted on the address its header carries, once it has arrived.
        let mut header = None;
        if verdict.is_ok()
            && let Some(proxy) = self.snapshot.listener(id).and_then(|l| l.proxy.as_ref())
        {
            match socket::peer_ip(client.as_fd()) {
                Ok(peer) => {
                    header = Some(HeaderWait {
                        trusted: proxy.trusts(peer),
                        required: proxy.required,
                    });
                }
                Err(error) => {
                    debug!(shard = self.index, %error, "accepted connection already gone");
                    drop(client);
                    self.arm_accept(key);
                    return;
                }
            }
        }
        if verdict.is_ok() && !header.is_some_and(|wait| wait.trusted) {
            let now_us = self.now_us;
            let listener = &mut self.listeners[key];
            let address = if listener.gate.settings().needs_address() {
                match socket::peer_ip(client.as_fd()) {
                    Ok(address) => Some(address),
                    Err(error) => {
                        // The client reset before it was accepted: nothing to admit or count.
                        debug!(shard = self.index, %error, "accepted connection already gone");
                        drop(client);
                        self.arm_accept(key);
                        return;
                    }
                }
            } else {
                None
            };
            verdict = listener.gate.check(address, now_us);
        }
        match verdict {
            Err(reason) => self.refuse(key, counters_slot, client, reason),
            Ok(slot) => self.start_session(
                (key, id),
                counters_slot,
                client,
                (listener_epoch, slot.unwrap_or(NO_SOURCE_SLOT)),
                header,
            ),
        }
        // Top up single accepts, re-arm a multishot one the kernel ended, or pause.
        self.arm_accept(key);
    }

    /// Turns an accepted connection away at once (RST with `reject = "reset"`, FIN otherwise)
    /// and counts why.
    fn refuse(&mut self, key: usize, counters_slot: usize, client: OwnedFd, reason: RejectReason) {
        self.stats.rejected += 1;
        if reason == RejectReason::ListenerFull {
            self.stats.rejected_full += 1;
        }
        if let Some(counters) = self.counters.listeners.get_mut(counters_slot) {
            counters.reject(reason);
        }
        let reset = self
            .listeners
            .get(key)
            .is_some_and(|listener| listener.gate.settings().reject == RejectMode::Reset);
        if reset {
            // Best effort: a client that is already gone needs no reset.
            let _ = socket::set_linger_zero(client.as_fd());
        }
        debug!(shard = self.index, ?reason, "connection rejected");
        // Closed by the ring with the turn's other submissions: one system call less per
        // refused connection in a flood.
        let _ = self.ring.close(client, IGNORED, true);
    }

    /// `source`: the listener's epoch on this shard and the client's per-source slot;
    /// `header`: the PROXY header expected first.
    fn start_session(
        &mut self,
        (listener_key, listener): (usize, ListenerId),
        counters_slot: usize,
        client: OwnedFd,
        source: (u32, u32),
        header: Option<HeaderWait>,
    ) {
        let snapshot = std::rc::Rc::clone(&self.snapshot);
        let Some(config) = snapshot.listener(listener) else {
            self.release_source(listener, source.0, source.1);
            drop(client);
            return;
        };
        let target = config.target;
        let Some(pool) = self.provisional_pool(target) else {
            self.release_source(listener, source.0, source.1);
            drop(client);
            return;
        };
        let throttle = self.new_throttle(listener_key);
        let limits = Limits {
            queued_buffers: self.tuning.queued_buffers as usize,
            buffer_size: self.tuning.buffer_size as usize,
            idle_ticks: super::ticks(config.idle_timeout),
            write_ticks: super::ticks(config.write_timeout),
            first_byte_ticks: config.admission.first_byte_timeout.map(super::ticks),
            // A bandwidth cap holds receives one at a time.
            multishot: self.capped_multishot && throttle.is_none(),
        };
        let log = if config.log {
            let peer = socket::peer_addr(client.as_fd())
                .unwrap_or_else(|_| std::net::SocketAddr::from(([0, 0, 0, 0], 0)));
            Some(Box::new(peer))
        } else {
            None
        };
        // TCP_NODELAY and keepalive are inherited from the listening socket (`listener::bind`).
        let needs_address = self
            .snapshot
            .pool(pool)
            .is_some_and(|pool| pool.balance.needs_client_address());
        let key = if needs_address {
            socket::peer_ip(client.as_fd()).map(client_key).unwrap_or(0)
        } else {
            0
        };
        self.next_generation = (self.next_generation + 1) & GENERATION_MASK;
        let tick = self.now_tick;
        let pool_counters = self.counters.pools.slot(pool);
        self.counters.pools.hold(pool_counters);
        self.counters.listeners.hold(counters_slot);
        if let Some(counters) = self.counters.listeners.get_mut(counters_slot) {
            counters.accepted += 1;
            counters.active += 1;
        }
        let session = Session {
            generation: self.next_generation,
            listener,
            listener_counters: counters_slot,
            pool,
            pool_counters,
            client,
            server: None,
            server_ref: None,
            tried: Default::default(),
            attempts: 0,
            client_key: key,
            connecting: false,
            log,
            started_us: self.now_us,
            connect_started_us: 0,
            connect_us: None,
            socket_retries: 0,
            closing: false,
            close_mode: CloseMode::Graceful,
            close_kind: None,
            relay: Relay::new(limits, tick),
            sniffing: None,
            timer: None,
            listener_epoch: source.0,
            source_slot: source.1,
            split_counters: super::target::NO_SPLIT,
            throttle,
        };
        let index = self.sessions.insert(session);
        self.stats.accepted += 1;
        let decides_before_handshake = config
            .routing
            .as_deref()
            .filter(|routing| routing.decides_before_handshake());
        if let (Some(_), Some(routing)) = (&config.tls, decides_before_handshake) {
            // Routes with `tls = ...` read the ClientHello first: passthrough, their own
            // certificates, or the listener's handshake.
            self.start_reading(index, Some(routing), header.zip(config.proxy.as_deref()));
            if let Some(sniffing) = self.sessions[index].sniffing.as_deref_mut() {
                sniffing.silence_deadline = super::super::session::NEVER;
            }
            self.finish_if_done(index);
            return;
        }
        if config.tls.is_some() {
            // The PROXY header (if any) and the handshake come first; routes and the connect
            // follow them.
            match (
                header.zip(config.proxy.as_deref()),
                self.tls_config(listener).cloned(),
            ) {
                (Some(header), Some(_)) => {
                    self.start_reading(index, None, Some(header));
                    // A TLS client speaks first: no waiting for silence.
                    if let Some(sniffing) = self.sessions[index].sniffing.as_deref_mut() {
                        sniffing.silence_deadline = super::super::session::NEVER;
                    }
                }
                (None, Some(tls)) => {
                    let handshake = self.listener_handshake_timeout(listener);
                    self.start_tls_session(index, tls, &[], handshake);
                }
                (_, None) => {
                    self.close_session(index, CloseMode::ResetBoth, CloseKind::LocalError);
                }
            }
            self.finish_if_done(index);
            return;
        }
        match (
            config.routing.as_deref(),
            header.zip(config.proxy.as_deref()),
        ) {
            (routing, Some(header)) => self.start_reading(index, routing, Some(header)),
            (Some(routing), None) if routing.reads_first() => {
                self.start_reading(index, Some(routing), None);
            }
            (Some(routing), None) => {
                // Routes on the client's address alone: chosen at once, nothing read.
                self.choose(index, routing, &crate::route::Detected::Unknown);
            }
            (None, None) => {
                self.arm_timer(index);
                if self.settle(index, target) {
                    self.refresh_client_key(index);
                    self.connect_next(index);
                } else {
                    self.close_session(index, CloseMode::Graceful, CloseKind::ConnectFailed);
                }
            }
        }
        self.finish_if_done(index);
    }

    pub(super) fn begin_drain(&mut self) {
        if self.draining_until.is_some() {
            return;
        }
        self.draining_until = Some(self.now + self.snapshot.config.runtime.drain_timeout);
        info!(
            shard = self.index,
            sessions = self.sessions.len(),
            "draining: listeners closed"
        );
        let ids: Vec<ListenerId> = self.listeners.iter().map(|(_, l)| l.id).collect();
        for id in ids {
            self.remove_listener(id);
        }
    }

    /// Returns true when the shard may exit.
    pub(super) fn drain_progress(&mut self) -> bool {
        let Some(deadline) = self.draining_until else {
            return false;
        };
        if self.sessions.is_empty() {
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
                self.close_session(index, CloseMode::ResetBoth, CloseKind::DrainCut);
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
}
