//! Ending sessions (shutdown of their sockets, then freeing once the last operation is in),
//! the connection log, per-session timers, resets that wait for a socket to drain, and buffer
//! pressure (copy-out of stalled directions, re-arming starved receives).

use std::os::fd::{AsFd, AsRawFd};
use std::time::Duration;

use tracing::info;

use super::{CUT_GRACE, IGNORED, Op, Shard, ticks, user_data};
use crate::metrics::CloseKind;
use crate::relay::{CloseMode, SendFrom, Side};
use crate::runtime::session::{Session, SniffPhase};
use crate::snapshot::ServerId;
use crate::uring::socket;

/// Below this share of free receive buffers (1/N of the ring), stalled directions are copied
/// out of their ring buffers.
const PRESSURE_DIVISOR: u32 = 4;

impl Shard {
    /// Ends a session: every operation still in flight is woken by a shutdown of its socket
    /// (a receive sees EOF, a send fails, a connect aborts) rather than cancelled one by one,
    /// then `finish_if_done` closes the sockets once the last completion is in.
    pub(super) fn close_session(&mut self, index: usize, mode: CloseMode, kind: CloseKind) {
        let Some(session) = self.sessions.get_mut(index) else {
            return;
        };
        if session.closing {
            return;
        }
        session.closing = true;
        session.close_mode = mode;
        session.close_kind = Some(kind);
        session.relay.set_closing();
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
    pub(super) fn finish_if_done(&mut self, index: usize) {
        let Some(session) = self.sessions.get(index) else {
            return;
        };
        if !session.closing || !session.is_idle() {
            return;
        }
        let kind = self.sessions[index]
            .close_kind
            .unwrap_or(CloseKind::LocalError);
        if let Some(client) = &self.sessions[index].log {
            self.log_session(&self.sessions[index], **client, kind);
        }
        self.release_server(index);
        self.release_split(index);
        let mut session = self.sessions.remove(index);
        session.relay.release(self.ring.buffers_mut());
        if let Some(timer) = session.timer.take() {
            self.timers.cancel(timer);
        }
        let duration = Duration::from_micros(self.now_us.saturating_sub(session.started_us));
        if let Some(counters) = self.counters.listeners.get_mut(session.listener_counters) {
            counters.active = counters.active.saturating_sub(1);
            counters.close(kind);
            counters.session_duration.record(duration);
        }
        self.counters.listeners.unhold(session.listener_counters);
        self.release_source(
            session.listener,
            session.listener_epoch,
            session.source_slot,
        );
        self.counters.pools.unhold(session.pool_counters);
        let _ = self.ring.close(session.client, IGNORED, true);
        if let Some(server) = session.server.take() {
            let _ = self.ring.close(server, IGNORED, true);
        }
        self.stats.closed += 1;
        self.resume_if_room();
    }

    /// The connection log's line for a session that ended (HAProxy's `tcplog`): off the shard
    /// through the non-blocking log writer, which drops (and counts) rather than wait.
    fn log_session(&self, session: &Session, client: std::net::SocketAddr, kind: CloseKind) {
        let listener = self
            .snapshot
            .listener(session.listener)
            .map_or("-", |listener| listener.name.as_str());
        let pool = self.snapshot.pool(session.pool);
        let pool_name = pool.map_or("-", |pool| pool.name.as_str());
        let server = session
            .server_ref
            .and_then(|server| pool?.server(server.id))
            .map_or_else(|| "-".to_string(), |server| server.addr.to_string());
        let (to_server, to_client) = session.relay.delivered();
        let total_ms = self.now_us.saturating_sub(session.started_us) as f64 / 1000.0;
        let connect_ms = session.connect_us.map_or(-1.0, |us| f64::from(us) / 1000.0);
        info!(
            target: "ringproxy::access",
            client = %client,
            listener,
            pool = pool_name,
            server = %server,
            connect_ms,
            total_ms,
            bytes_to_server = to_server,
            bytes_to_client = to_client,
            reason = kind.name(),
            side = kind.side(),
            "session"
        );
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

    /// An operator asked to cut the sessions of `server` (`shutdown-sessions`).
    pub(super) fn cut_server_sessions(&mut self, server: ServerId) {
        let targets: Vec<usize> = self
            .sessions
            .iter()
            .filter(|(_, session)| {
                !session.closing && session.server_ref.is_some_and(|s| s.id == server)
            })
            .map(|(index, _)| index)
            .collect();
        for index in targets {
            self.close_session(index, CloseMode::ResetBoth, CloseKind::AdminCut);
            self.finish_if_done(index);
        }
    }

    // ---- timers and pressure ---------------------------------------------------------------

    pub(super) fn arm_timer(&mut self, index: usize) {
        let now = self.now_tick;
        let session = &mut self.sessions[index];
        let period = session.relay.check_period();
        let deadline = match session.sniffing.as_deref() {
            Some(sniffing) if sniffing.reading() => sniffing.next_deadline().min(now + period),
            Some(sniffing) if sniffing.phase == SniffPhase::Decrypted => sniffing
                .deadline
                .min(session.relay.next_deadline())
                .min(now + period),
            _ => session.relay.next_deadline().min(now + period),
        };
        if let Some(old) = session.timer.take() {
            self.timers.cancel(old);
        }
        session.timer = Some(self.timers.arm(index as u32, session.generation, deadline));
    }

    pub(super) fn expire_timers(&mut self) {
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
            if session
                .sniffing
                .as_deref()
                .is_some_and(|sniffing| sniffing.reading())
            {
                self.sniff_tick(index);
                self.finish_if_done(index);
                continue;
            }
            if session.sniffing.as_deref().is_some_and(|sniffing| {
                sniffing.phase == SniffPhase::Decrypted && tick >= sniffing.deadline
            }) {
                self.decrypted_timeout(index);
                self.finish_if_done(index);
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

    pub(super) fn poll_lingering(&mut self) {
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
    pub(super) fn relieve_buffer_pressure(&mut self) {
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
    pub(super) fn rearm_starved(&mut self) {
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
