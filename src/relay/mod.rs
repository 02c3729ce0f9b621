//! The relay state machine of one session: sans-IO.
//!
//! Owns both directions of a session once its server is connected: which receives and sends
//! are in flight, backpressure, half-close, resets, copy-out under buffer pressure, and the
//! idle and write deadlines. It does no I/O and reads no clock: the shard loop turns
//! completions into events (`on_received`, `on_sent`, ...) and carries out the `Action`s they
//! return; time comes in as loop ticks. Connecting (choosing a server, retrying) stays with the
//! loop and the balancer.
//!
//! Invariants:
//! - at most one receive per side and one send per direction are in flight;
//! - a direction holds at most `queued_buffers` ring buffers, so a session holds at most
//!   `2 x queued_buffers` ring buffers whatever its peers do; copied-out bytes are bounded by
//!   `queued_buffers x buffer_size` per direction. Two kinds of receive keep that bound:
//!   single-shot receives (one buffer each), armed only while fewer buffers are queued; and,
//!   while at least 4 fewer are queued, one multishot receive capped by bytes (it ends by
//!   itself after that many, overshooting by less than one buffer). A received buffer that
//!   fits after the last queued one is copied there and returned at once, so any two
//!   neighbouring buffers filled by one capped receive hold more than `buffer_size` bytes
//!   together, and a cap of `(room - 2) x buffer_size / 2` can never fill more than the
//!   `room` buffers left (see `multishot_cap`);
//! - bytes reach the destination in the order the source sent them, and a FIN is passed on
//!   only after everything before it was accepted;
//! - when one side fails or resets, what is already held for the other side is still
//!   delivered, then the other side is reset once its socket has handed those bytes to the
//!   peer;
//! - the session may be freed only when `is_idle()` (no operation refers to it).

mod flow;
mod tls;

pub use flow::{BufferPool, Flow, Measured, Pending, SendFrom, Spill};
pub use tls::ServerTlsFailure;

/// Which side of a session an event concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Downstream: the connection the proxy accepted.
    Client,
    /// Upstream: the connection the proxy opened.
    Server,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

/// How a session ends, seen by its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseMode {
    /// Plain close (FIN) of both sockets.
    Graceful,
    /// The given side gets a RST (used to pass a reset from the other side through).
    Reset(Side),
    /// Both sides get a RST (a drain deadline or a timeout cut the session).
    ResetBoth,
}

/// Why a session ended, for counters and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions finished with FINs.
    Completed,
    /// A peer reset or failed; the side that did.
    PeerFailed(Side),
    IdleTimeout,
    /// The destination `Side` accepted no byte for `write_timeout`.
    WriteTimeout(Side),
    /// The loop asked (drain deadline, shutdown, local error).
    Cut,
    /// The client sent nothing within `first_byte_timeout`.
    FirstByteTimeout,
    /// The TLS handshake failed (or the client left during it).
    TlsFailed,
    /// The TLS handshake was not done within `handshake_timeout`.
    HandshakeTimeout,
}

/// What the loop must do next for a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Arm one receive on this side's socket.
    Receive(Side),
    /// Arm a multishot receive on this side's socket that ends after this many bytes; it stays
    /// in flight until a completion without `more`.
    ReceiveMany(Side, u32),
    /// Send toward this side, from where `Flow::sending` says.
    Send(Side),
    /// Cancel the send in flight toward this side (its bytes are being copied out).
    CancelSend(Side),
    /// Pass a FIN to this side (shutdown of its write half).
    ShutdownWrite(Side),
    /// End the session: stop every operation, then close both sockets this way.
    Close(CloseMode, CloseReason),
    /// Poll this side's unacknowledged bytes each tick, then reset it (see `on_unacknowledged`).
    ResetWhenDrained(Side),
    /// The client's TLS handshake is done: choose the server and connect (`server_connected`).
    TlsEstablished,
    /// The proxy's TLS handshake with the server is done (the server counts as reached).
    ServerTlsEstablished,
    /// The handshake with the server failed and no operation on its socket is in flight: close
    /// it, then `drop_server_tls` and try another server (or give up).
    ServerTlsFailed,
    /// The handshake with the server failed while an operation on its socket is in flight:
    /// shut the socket down so that operation ends (then `ServerTlsFailed` follows).
    AbortServer,
    /// Decrypted bytes of the client (or its end) arrived while they are peeked at for a
    /// route (`peeked`).
    TlsPlaintext,
}

/// Why a receive ended without data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveError {
    /// The buffer ring was empty (ENOBUFS): wait for buffers.
    NoBuffers,
    /// Cancelled by the loop.
    Cancelled,
    /// The peer reset, or another error: that side is gone.
    Failed,
}

/// Why a send failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendError {
    Cancelled,
    /// The destination reset or failed.
    Failed,
}

/// Limits a session runs under, from the tuning and listener config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub queued_buffers: usize,
    pub buffer_size: usize,
    /// In loop ticks.
    pub idle_ticks: u64,
    pub write_ticks: u64,
    /// A client that sends no byte for this long is closed (None: it may wait for the server).
    pub first_byte_ticks: Option<u64>,
    /// Capped multishot receives may be used (the kernel caps them, and no bandwidth cap
    /// holds the session's receives one at a time).
    pub multishot: bool,
}

/// The byte cap of a multishot receive that may fill at most `room` more ring buffers (None
/// when fewer than 4: then single-shot receives). Buffers filled by one capped receive hold
/// less than `cap + buffer_size` bytes, and any two neighbours more than `buffer_size`, so `n`
/// of them need `n / 2 x buffer_size < cap + buffer_size`: `n <= room`.
pub fn multishot_cap(room: usize, buffer_size: usize) -> Option<u32> {
    if room < 4 {
        return None;
    }
    u32::try_from(room.saturating_sub(2) * buffer_size / 2).ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Relaying,
    /// Everything for `Side` was handed over; waiting for its socket to pass it on before the
    /// reset (tick of the last progress, bytes then).
    Lingering {
        side: Side,
        since: u64,
        unacknowledged: u32,
    },
    Closing,
}

fn held_bit(side: Side) -> u8 {
    match side {
        Side::Client => 1,
        Side::Server => 2,
    }
}

/// The actions of one event (at most a handful).
pub type Actions = Vec<Action>;

#[derive(Debug)]
pub struct Relay<B> {
    /// Client to server.
    pub upstream: Flow<B>,
    /// Server to client.
    pub downstream: Flow<B>,
    phase: Phase,
    limits: Limits,
    /// Loop tick of the last byte moved either way (idle timeout).
    last_active: u64,
    /// Tick by which the client must have sent its first byte (u64::MAX: no such deadline, or
    /// it did). It runs from `start`: before the server is connected the proxy does not read.
    first_byte_deadline: u64,
    /// Sides (bit 0 client, bit 1 server) whose next receive a bandwidth cap holds: the session
    /// is busy, not idle, and a held client has not been given the chance to send.
    held: u8,
    /// TLS toward the client, when its listener terminates it (boxed: plain sessions pay
    /// one word).
    tls: Option<Box<tls::TlsSide>>,
}

impl<B> Relay<B> {
    pub fn new(limits: Limits, now: u64) -> Relay<B> {
        Relay {
            upstream: Flow::default(),
            downstream: Flow::default(),
            phase: Phase::Relaying,
            limits,
            last_active: now,
            first_byte_deadline: u64::MAX,
            held: 0,
            tls: None,
        }
    }

    /// The flow whose bytes are read from `source`.
    pub fn flow_from(&mut self, source: Side) -> &mut Flow<B> {
        match source {
            Side::Client => &mut self.upstream,
            Side::Server => &mut self.downstream,
        }
    }

    /// The flow whose bytes are written to `destination`.
    pub fn flow_to(&mut self, destination: Side) -> &mut Flow<B> {
        self.flow_from(destination.other())
    }

    fn flow_ref(&self, source: Side) -> &Flow<B> {
        match source {
            Side::Client => &self.upstream,
            Side::Server => &self.downstream,
        }
    }

    pub fn is_closing(&self) -> bool {
        self.phase == Phase::Closing
    }

    /// No operation of this session is in flight: it may be freed once closing.
    pub fn is_idle(&self) -> bool {
        [&self.upstream, &self.downstream]
            .iter()
            .all(|flow| flow.receiving == 0 && flow.sending.is_none())
    }

    /// Ring buffers held by both directions.
    pub fn ring_buffers(&self) -> usize {
        self.upstream.ring_buffers() + self.downstream.ring_buffers()
    }

    /// The server is connected (at tick `now`): start reading both sides.
    pub fn start(&mut self, now: u64, out: &mut Actions) {
        self.last_active = self.last_active.max(now);
        if let Some(ticks) = self.limits.first_byte_ticks {
            self.first_byte_deadline = now.saturating_add(ticks);
        }
        for side in [Side::Client, Side::Server] {
            self.arm_receive(side, out);
        }
    }

    /// As `start`, with bytes for the server first (a PROXY header, what sniffing read): the
    /// client is read again once they are delivered. `client_spoke`: they include the client's
    /// own bytes (else the first-byte deadline still runs).
    pub fn start_with_replay(
        &mut self,
        now: u64,
        replay: Box<[u8]>,
        client_spoke: bool,
        out: &mut Actions,
    ) {
        if replay.is_empty() {
            return self.start(now, out);
        }
        if !client_spoke && let Some(ticks) = self.limits.first_byte_ticks {
            self.first_byte_deadline = now.saturating_add(ticks);
        }
        self.upstream.spill = Some(Box::new(Spill::filled(replay)));
        self.last_active = self.last_active.max(now);
        for side in [Side::Client, Side::Server] {
            self.arm_receive(side, out);
        }
        self.start_send(Side::Server, out);
    }

    fn arm_receive(&mut self, source: Side, out: &mut Actions) {
        if self.phase != Phase::Relaying {
            return;
        }
        if !self.tls_may_receive(source) {
            return;
        }
        let Limits {
            queued_buffers,
            buffer_size,
            multishot,
            ..
        } = self.limits;
        let multishot = multishot && self.tls.is_none();
        let one_at_a_time = source == Side::Server && self.server_handshaking();
        let flow = self.flow_from(source);
        let mut wanted = flow.receives_wanted(queued_buffers, buffer_size);
        if one_at_a_time {
            wanted = wanted.min(1);
        }
        if wanted > 0 && multishot && flow.receiving == 0 && flow.spill.is_none() {
            let room = queued_buffers.saturating_sub(flow.queue.len());
            if let Some(cap) = multishot_cap(room, buffer_size) {
                flow.receiving = 1;
                flow.multishot = true;
                out.push(Action::ReceiveMany(source, cap));
                return;
            }
        }
        for _ in 0..wanted {
            flow.receiving += 1;
            out.push(Action::Receive(source));
        }
    }

    fn start_send(&mut self, destination: Side, out: &mut Actions) {
        if self.phase == Phase::Closing
            || (destination == Side::Server && !self.server_connected_now())
        {
            return;
        }
        let flow = self.flow_to(destination);
        if let Some(from) = flow.next_send() {
            flow.sending = Some(from);
            out.push(Action::Send(destination));
        }
    }

    /// A receive from `source` brought `len` bytes in `buffer`; `more`: it is a multishot
    /// receive that stays armed.
    #[allow(clippy::too_many_arguments)]
    pub fn on_received(
        &mut self,
        source: Side,
        buffer: B,
        len: u32,
        more: bool,
        now: u64,
        pool: &mut impl BufferPool<B>,
        out: &mut Actions,
    ) {
        let mut batch = vec![buffer];
        self.receive_into(source, &mut batch, |_| len, more, now, pool, out);
    }

    /// A receive from `source` filled `buffers` (in order); drains the vector. `more`: it is a
    /// multishot receive that stays armed.
    pub fn on_received_batch(
        &mut self,
        source: Side,
        buffers: &mut Vec<B>,
        more: bool,
        now: u64,
        pool: &mut impl BufferPool<B>,
        out: &mut Actions,
    ) where
        B: Measured,
    {
        self.receive_into(
            source,
            buffers,
            |buffer| buffer.byte_len(),
            more,
            now,
            pool,
            out,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn receive_into(
        &mut self,
        source: Side,
        buffers: &mut Vec<B>,
        len_of: impl Fn(&B) -> u32,
        more: bool,
        now: u64,
        pool: &mut impl BufferPool<B>,
        out: &mut Actions,
    ) {
        let closing = self.phase == Phase::Closing;
        let buffer_size = self.limits.buffer_size;
        if source == Side::Client && !buffers.is_empty() {
            self.first_byte_deadline = u64::MAX;
        }
        let flow = self.flow_from(source);
        if !more {
            flow.receiving = flow.receiving.saturating_sub(1);
            flow.multishot = false;
        }
        if closing {
            for buffer in buffers.drain(..) {
                pool.recycle(buffer);
            }
            return;
        }
        if self.has_tls() {
            return self.tls_receive(source, buffers, now, pool, out);
        }
        let flow = self.flow_from(source);
        for buffer in buffers.drain(..) {
            let len = len_of(&buffer);
            flow.last_receive_full = len as usize >= buffer_size;
            flow.push(buffer, len, now, pool);
        }
        self.last_active = now;
        self.start_send(source.other(), out);
        self.arm_receive(source, out);
    }

    /// `source` sent FIN.
    pub fn on_eof(&mut self, source: Side, out: &mut Actions) {
        let flow = self.flow_from(source);
        flow.receiving = flow.receiving.saturating_sub(1);
        flow.multishot = false;
        if self.phase == Phase::Closing {
            return;
        }
        if self.tls_eof(source, out) {
            return;
        }
        let flow = self.flow_from(source);
        flow.eof = true;
        self.pass_fin_if_flushed(source.other(), out);
    }

    pub fn on_receive_failed(
        &mut self,
        source: Side,
        error: ReceiveError,
        pool: &mut impl BufferPool<B>,
        out: &mut Actions,
    ) {
        let flow = self.flow_from(source);
        flow.receiving = flow.receiving.saturating_sub(1);
        flow.multishot = false;
        if self.phase == Phase::Closing {
            return;
        }
        if source == Side::Server
            && self.server_handshaking()
            && (error == ReceiveError::Failed || self.server_tls_failure().is_some())
        {
            return self.server_operation_ended(error == ReceiveError::Failed, out);
        }
        match error {
            ReceiveError::NoBuffers => self.flow_from(source).starved = true,
            ReceiveError::Cancelled => {}
            // Several receives may report the same failure: the first one counts.
            ReceiveError::Failed if self.flow_from(source).source_failed => {}
            ReceiveError::Failed => self.side_failed(source, pool, out),
        }
    }

    /// The loop did not submit a receive it was asked for (a bandwidth cap holds it): it no
    /// longer counts as in flight.
    pub fn take_back_receive(&mut self, source: Side) {
        let flow = self.flow_from(source);
        flow.receiving = flow.receiving.saturating_sub(1);
        self.held |= held_bit(source);
    }

    /// The cap's wait is over (at tick `now`): arm the receives the direction wants. The wait
    /// counts as activity, not idleness.
    pub fn resume_receive(&mut self, source: Side, now: u64, out: &mut Actions) {
        self.held &= !held_bit(source);
        self.last_active = self.last_active.max(now);
        self.arm_receive(source, out);
    }

    /// Buffers are back: re-arm a receive that found none. Returns whether one was armed.
    pub fn on_buffers_available(&mut self, source: Side, out: &mut Actions) -> bool {
        let flow = self.flow_from(source);
        if !flow.starved {
            return false;
        }
        flow.starved = false;
        let before = out.len();
        self.arm_receive(source, out);
        out.len() > before
    }

    /// The send toward `destination` completed.
    pub fn on_sent(
        &mut self,
        destination: Side,
        result: Result<u32, SendError>,
        now: u64,
        pool: &mut impl BufferPool<B>,
        out: &mut Actions,
    ) {
        let Limits {
            queued_buffers,
            buffer_size,
            ..
        } = self.limits;
        let closing = self.phase == Phase::Closing;
        let flow = self.flow_to(destination);
        let Some(from) = flow.sending.take() else {
            return;
        };
        flow.sending_buffers = 0;
        if !closing
            && destination == Side::Server
            && self.server_handshaking()
            && (result == Err(SendError::Failed) || self.server_tls_failure().is_some())
        {
            if let Ok(count) = result {
                self.upstream.sent(from, count, now, pool);
            }
            return self.server_operation_ended(result == Err(SendError::Failed), out);
        }
        let flow = self.flow_to(destination);
        let count = match result {
            Ok(count) => count,
            Err(SendError::Cancelled) => 0,
            Err(SendError::Failed) => {
                if !closing {
                    self.side_failed(destination, pool, out);
                }
                return;
            }
        };
        if count == 0 && result.is_ok() && !closing {
            // A stream socket accepting nothing from a non-empty send has failed.
            self.side_failed(destination, pool, out);
            return;
        }
        flow.sent(from, count, now, pool);
        if count > 0 {
            self.last_active = now;
        }
        let flow = self.flow_to(destination);
        if flow.cancelling {
            flow.cancelling = false;
            flow.spill_queue(queued_buffers * buffer_size, pool);
        }
        if closing {
            return;
        }
        if self.has_tls() {
            self.last_active = self.last_active.max(now);
            self.tls_pump(out);
        }
        self.start_send(destination, out);
        self.arm_receive(destination.other(), out);
        self.pass_fin_if_flushed(destination, out);
    }

    /// Once the flow toward `destination` has delivered everything after its source's FIN,
    /// passes the FIN on; ends the session when both directions are done.
    fn pass_fin_if_flushed(&mut self, destination: Side, out: &mut Actions) {
        if self.close_notify_first(destination, out) {
            return;
        }
        let flow = self.flow_to(destination);
        if flow.eof && !flow.shut && !flow.abandoned && flow.is_flushed() {
            flow.shut = true;
            flow.waiting_since = None;
            out.push(Action::ShutdownWrite(destination));
        }
        if let Phase::Relaying = self.phase {
            let failed = [Side::Client, Side::Server]
                .into_iter()
                .find(|&side| self.flow_to(side).abandoned);
            match failed {
                // One side is gone: once what is held for the survivor has been handed over,
                // reset the survivor after its socket passed those bytes on.
                Some(dead) => {
                    let survivor = dead.other();
                    if self.flow_to(survivor).is_flushed() || self.flow_to(survivor).shut {
                        self.phase = Phase::Lingering {
                            side: survivor,
                            since: self.last_active,
                            unacknowledged: u32::MAX,
                        };
                        out.push(Action::ResetWhenDrained(survivor));
                    }
                }
                None => {
                    if self.upstream.finished() && self.downstream.finished() {
                        self.close(CloseMode::Graceful, CloseReason::Completed, out);
                    }
                }
            }
        }
    }

    /// `side` reset or failed: nothing more goes to it or comes from it; what is held for the
    /// other side is still delivered.
    fn side_failed(&mut self, side: Side, pool: &mut impl BufferPool<B>, out: &mut Actions) {
        if self.flow_to(side).abandoned {
            // Both sides are gone.
            self.close(CloseMode::ResetBoth, CloseReason::PeerFailed(side), out);
            return;
        }
        if self.flow_to(side.other()).abandoned {
            self.close(CloseMode::ResetBoth, CloseReason::PeerFailed(side), out);
            return;
        }
        self.flow_to(side).abandon(pool);
        // No more reading from the failed side: it has nothing more to say. (Not a FIN: the
        // survivor gets a reset once it has what was held for it.)
        self.flow_from(side).source_failed = true;
        self.pass_fin_if_flushed(side.other(), out);
    }

    /// While lingering: `side`'s socket still holds `unacknowledged` bytes for its peer.
    pub fn on_unacknowledged(&mut self, unacknowledged: u32, now: u64, out: &mut Actions) {
        let Phase::Lingering {
            side,
            since,
            unacknowledged: before,
        } = self.phase
        else {
            return;
        };
        if unacknowledged == 0 {
            self.close(
                CloseMode::Reset(side),
                CloseReason::PeerFailed(side.other()),
                out,
            );
        } else if unacknowledged < before {
            self.phase = Phase::Lingering {
                side,
                since: now,
                unacknowledged,
            };
        } else if now >= since + self.limits.write_ticks {
            self.close(CloseMode::Reset(side), CloseReason::WriteTimeout(side), out);
        }
    }

    /// Buffers are scarce: copy out the bytes of a direction whose destination has taken
    /// nothing since `stalled_before`, so its ring buffers go back to the ring.
    pub fn spill_if_stalled(
        &mut self,
        stalled_before: u64,
        pool: &mut impl BufferPool<B>,
        out: &mut Actions,
    ) {
        if self.phase == Phase::Closing {
            return;
        }
        let capacity = self.limits.queued_buffers * self.limits.buffer_size;
        for destination in [Side::Client, Side::Server] {
            let flow = self.flow_to(destination);
            if flow.queue.is_empty()
                || flow.cancelling
                || flow
                    .waiting_since
                    .is_none_or(|since| since > stalled_before)
            {
                continue;
            }
            match flow.sending {
                Some(SendFrom::Queue) => {
                    flow.cancelling = true;
                    out.push(Action::CancelSend(destination));
                }
                Some(SendFrom::Spill) => {}
                None => {
                    flow.spill_queue(capacity, pool);
                    self.start_send(destination, out);
                }
            }
        }
    }

    /// The next tick at which `on_tick` has something to check.
    pub fn next_deadline(&self) -> u64 {
        let idle = self.last_active + self.limits.idle_ticks;
        let write = [&self.upstream, &self.downstream]
            .iter()
            .filter_map(|flow| flow.waiting_since)
            .map(|since| since + self.limits.write_ticks)
            .min()
            .unwrap_or(u64::MAX);
        idle.min(write)
            .min(self.first_byte_deadline)
            .min(self.handshake_deadline())
            .min(self.server_handshake_deadline())
    }

    /// Whether bytes wait for `destination` (the loop then reads its socket's unacknowledged
    /// bytes for `on_tick`).
    pub fn waiting_toward(&self, destination: Side) -> bool {
        self.flow_ref(destination.other()).waiting_since.is_some()
    }

    /// How often the loop should call `on_tick` at least: four times per write timeout, so a
    /// destination that takes bytes between completions is seen to.
    pub fn check_period(&self) -> u64 {
        self.limits
            .idle_ticks
            .min(self.limits.write_ticks / 4)
            .max(1)
    }

    /// Checks the idle and write deadlines at tick `now`. `unacknowledged` tells, for a
    /// destination bytes wait for, how many bytes its socket still holds unacknowledged: when
    /// that shrank since the last check, the destination is making progress.
    pub fn on_tick(
        &mut self,
        now: u64,
        mut unacknowledged: impl FnMut(Side) -> Option<u32>,
        out: &mut Actions,
    ) {
        if self.phase == Phase::Closing {
            return;
        }
        let write_ticks = self.limits.write_ticks;
        for destination in [Side::Client, Side::Server] {
            if !self.waiting_toward(destination) {
                continue;
            }
            let held = unacknowledged(destination);
            let flow = self.flow_to(destination);
            let mut progress = false;
            if let Some(held) = held {
                if flow.last_unacknowledged.is_some_and(|last| held < last) {
                    flow.waiting_since = Some(now);
                    progress = true;
                }
                flow.last_unacknowledged = Some(held);
            }
            if progress {
                // Bytes are moving: not idle either.
                self.last_active = now;
            }
            let flow = self.flow_to(destination);
            if let Some(since) = flow.waiting_since
                && now >= since + write_ticks
            {
                self.close(
                    CloseMode::ResetBoth,
                    CloseReason::WriteTimeout(destination),
                    out,
                );
                return;
            }
        }
        if self.phase == Phase::Relaying && self.server_handshake_expired(now, out) {
            return;
        }
        if self.phase == Phase::Relaying && now >= self.handshake_deadline() {
            self.close(CloseMode::Graceful, CloseReason::HandshakeTimeout, out);
            return;
        }
        if self.phase == Phase::Relaying
            && now >= self.first_byte_deadline
            && self.held & held_bit(Side::Client) == 0
        {
            self.close(CloseMode::Graceful, CloseReason::FirstByteTimeout, out);
            return;
        }
        if self.phase == Phase::Relaying
            && self.held == 0
            && now >= self.last_active + self.limits.idle_ticks
        {
            self.close(CloseMode::Graceful, CloseReason::IdleTimeout, out);
        }
    }

    /// Ends the session (once): the loop stops its operations and closes both sockets.
    pub fn close(&mut self, mode: CloseMode, reason: CloseReason, out: &mut Actions) {
        if self.phase == Phase::Closing {
            return;
        }
        self.phase = Phase::Closing;
        out.push(Action::Close(mode, reason));
    }

    /// Ends the session without asking the loop (the loop itself decided to close it).
    pub fn set_closing(&mut self) {
        self.phase = Phase::Closing;
    }

    /// Whether the session waits for a side's socket to drain before resetting it.
    pub fn lingering(&self) -> Option<Side> {
        match self.phase {
            Phase::Lingering { side, .. } => Some(side),
            _ => None,
        }
    }

    /// Returns every held buffer (the session is being freed).
    pub fn release(&mut self, pool: &mut impl BufferPool<B>) {
        self.upstream.release(pool);
        self.downstream.release(pool);
    }

    /// Bytes received from each side: (client, server).
    pub fn received(&self) -> (u64, u64) {
        (self.upstream.received, self.downstream.received)
    }

    /// Bytes delivered toward each side: (to server, to client).
    pub fn delivered(&self) -> (u64, u64) {
        (self.upstream.delivered, self.downstream.delivered)
    }

    pub fn limits(&self) -> Limits {
        self.limits
    }

    pub fn is_relaying(&self) -> bool {
        self.phase == Phase::Relaying
    }
}

#[cfg(test)]
mod tests;
