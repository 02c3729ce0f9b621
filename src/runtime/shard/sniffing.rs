//! The sniff step of the connection path, on listeners with routes: read the client's first
//! bytes (or wait for its silence), choose a route, then connect to that pool and replay the
//! bytes to the server before relaying. The decisions are `sniff` and `route`'s (pure); this
//! only does the I/O, the limits and the timers.

use std::os::fd::AsRawFd;
use std::sync::Arc;

use tracing::debug;

use super::{Op, Shard, ticks, user_data};
use crate::config::Unmatched;
use crate::metrics::{CloseKind, Detection, ListenerCounters};
use crate::relay::{CloseMode, Side};
use crate::route::{self, Detected};
use crate::runtime::session::{SniffPhase, Sniffing};
use crate::snapshot::Routing;
use crate::sniff::{self, Verdict};
use crate::uring::{Completion, socket};

impl Shard {
    /// Starts reading a new session's client to choose its route.
    pub(super) fn start_sniffing(&mut self, index: usize, routing: &Routing) {
        let now = self.now_tick;
        let session = &mut self.sessions[index];
        session.sniffing = Some(Box::new(Sniffing {
            bytes: Vec::new(),
            phase: SniffPhase::Reading,
            silence_deadline: routing
                .server_first
                .then(|| now + ticks(routing.server_first_after)),
            deadline: now + ticks(routing.sniff_timeout),
        }));
        self.arm_sniff_receive(index);
        self.arm_timer(index);
    }

    fn arm_sniff_receive(&mut self, index: usize) {
        let session = &mut self.sessions[index];
        let flow = session.relay.flow_from(Side::Client);
        if flow.receiving > 0 {
            return;
        }
        flow.receiving = 1;
        let data = user_data(Op::ClientRecv, index, session.generation);
        let _ = self.ring.recv(session.client.as_raw_fd(), data, true);
    }

    /// A receive of the sniff step completed.
    pub(super) fn on_sniff_receive(&mut self, index: usize, mut completion: Completion) {
        let token = self.ring.buffers_mut().take(&mut completion);
        let result = completion.result();
        let buffers = self.ring.buffers_mut();
        let session = &mut self.sessions[index];
        let flow = session.relay.flow_from(Side::Client);
        flow.receiving = flow.receiving.saturating_sub(1);
        let Some(sniffing) = session.sniffing.as_deref_mut() else {
            if let Some(token) = token {
                buffers.recycle(token);
            }
            return;
        };
        if let Some(token) = token {
            // Everything received is kept (the last read may pass sniff_max_bytes by less
            // than a buffer): it all goes to the server.
            if !session.closing {
                sniffing.bytes.extend_from_slice(buffers.bytes(&token));
            }
            buffers.recycle(token);
        }
        if session.closing {
            return;
        }
        match result {
            1.. => {}
            0 => {
                // The client left before a route was chosen: nothing to relay.
                self.close_session(index, CloseMode::Graceful, CloseKind::Done);
                return;
            }
            error if error == -libc::ENOBUFS && sniffing.phase == SniffPhase::Reading => {
                // No buffer now: the timer tick re-arms (no retry every loop turn).
                self.stats.buffer_starvation += 1;
                return;
            }
            error if error == -libc::ENOBUFS || error == -libc::ECANCELED => {
                // Cancelled (or starved while cancelling): a route was chosen.
            }
            error => {
                debug!(shard = self.index, error, "client failed while sniffing");
                self.stats.resets += 1;
                self.close_session(index, CloseMode::ResetBoth, CloseKind::ClientReset);
                return;
            }
        }
        let phase = sniffing.phase;
        if phase == SniffPhase::Cancelling {
            self.connect_routed(index);
            return;
        }
        self.try_route(index);
    }

    /// Sniffs what has arrived: a verdict chooses the route; undecided, reads on.
    fn try_route(&mut self, index: usize) {
        let Some(routing) = self.routing_of(index) else {
            self.route_to_default(index);
            return;
        };
        let session = &self.sessions[index];
        let Some(sniffing) = session.sniffing.as_deref() else {
            return;
        };
        if sniffing.bytes.is_empty() {
            self.arm_sniff_receive(index);
            return;
        }
        let limit = routing.sniff_max_bytes as usize;
        let bytes = &sniffing.bytes[..sniffing.bytes.len().min(limit)];
        let detected = match sniff::sniff(bytes, &routing.wanted) {
            Verdict::Match(protocol, facts) => Detected::Protocol(protocol, facts),
            Verdict::NoMatch => Detected::Unknown,
            Verdict::NeedMore if sniffing.bytes.len() >= limit => {
                self.stats.sniff_limits += 1;
                self.count(index, |counters| counters.sniff_timeouts += 1);
                Detected::Unknown
            }
            Verdict::NeedMore => {
                self.arm_sniff_receive(index);
                return;
            }
        };
        self.choose(index, &routing, &detected);
    }

    /// The sniff timer fired: silence means a server-first protocol, the sniff timeout means
    /// unknown; otherwise re-arm a receive that found no buffer and wait on.
    pub(super) fn sniff_tick(&mut self, index: usize) {
        let now = self.now_tick;
        let Some(routing) = self.routing_of(index) else {
            self.route_to_default(index);
            return;
        };
        let session = &self.sessions[index];
        let Some(sniffing) = session.sniffing.as_deref() else {
            return;
        };
        if sniffing.phase != SniffPhase::Reading {
            return;
        }
        let silent = sniffing.bytes.is_empty()
            && sniffing
                .silence_deadline
                .is_some_and(|deadline| now >= deadline);
        if silent {
            self.choose(index, &routing, &Detected::Silence);
        } else if now >= sniffing.deadline {
            self.stats.sniff_timeouts += 1;
            self.count(index, |counters| counters.sniff_timeouts += 1);
            self.choose(index, &routing, &Detected::Unknown);
        } else {
            self.arm_sniff_receive(index);
            self.arm_timer(index);
        }
    }

    /// The listener lost its routes (a reload): the listener's pool.
    fn route_to_default(&mut self, index: usize) {
        if self.sessions.contains(index) {
            self.connect_when_quiet(index);
        }
    }

    /// Connects once no receive of the sniff step is armed: an armed one (a route chosen by
    /// time, or lost to a reload) is cancelled first, and what it brings is kept for the server.
    fn connect_when_quiet(&mut self, index: usize) {
        let session = &mut self.sessions[index];
        if session.relay.flow_from(Side::Client).receiving > 0 {
            if let Some(sniffing) = session.sniffing.as_deref_mut()
                && sniffing.phase == SniffPhase::Reading
            {
                sniffing.phase = SniffPhase::Cancelling;
                let target = user_data(Op::ClientRecv, index, session.generation);
                let _ = self.ring.cancel(target, super::IGNORED);
            }
            return;
        }
        self.connect_routed(index);
    }

    /// Counts on the session's listener.
    fn count(&mut self, index: usize, what: impl FnOnce(&mut ListenerCounters)) {
        let slot = self.sessions[index].listener_counters;
        if let Some(counters) = self.counters.listeners.get_mut(slot) {
            what(counters);
        }
    }

    fn routing_of(&self, index: usize) -> Option<Arc<Routing>> {
        let listener = self.sessions.get(index)?.listener;
        self.snapshot.listener(listener)?.routing.clone()
    }

    /// Applies the route for what was detected: its pool, the listener's, or a refusal.
    pub(super) fn choose(&mut self, index: usize, routing: &Routing, detected: &Detected) {
        let needs_address = routing
            .routes
            .iter()
            .any(|route| route.conditions.source.is_some());
        let detection = match detected {
            Detected::Protocol(protocol, _) => Detection::Protocol(*protocol),
            Detected::Silence => Detection::Silence,
            Detected::Unknown => Detection::Unknown,
        };
        self.count(index, |counters| counters.detect(detection));
        let session = &mut self.sessions[index];
        let client = if needs_address {
            socket::peer_ip(std::os::fd::AsFd::as_fd(&session.client))
                .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]))
        } else {
            std::net::IpAddr::from([0, 0, 0, 0])
        };
        let chosen = route::decide(&routing.routes, detected, client).copied();
        if chosen.is_none() {
            self.stats.unmatched += 1;
            self.count(index, |counters| counters.unmatched += 1);
            if routing.unmatched == Unmatched::Reject {
                self.close_session(index, CloseMode::ResetBoth, CloseKind::Unmatched);
                return;
            }
        }
        let session = &mut self.sessions[index];
        let pool = chosen.unwrap_or(session.pool);
        if pool != session.pool {
            self.counters.pools.unhold(session.pool_counters);
            session.pool = pool;
            session.pool_counters = self.counters.pools.slot(pool);
            self.counters.pools.hold(session.pool_counters);
        }
        debug!(shard = self.index, detected = ?detected, "route chosen");
        self.connect_when_quiet(index);
    }

    /// Connects to the chosen pool; the sniffed bytes wait in the session for the relay.
    fn connect_routed(&mut self, index: usize) {
        let Some(session) = self.sessions.get_mut(index) else {
            return;
        };
        if session.closing {
            return;
        }
        if let Some(sniffing) = session.sniffing.as_deref_mut() {
            sniffing.phase = SniffPhase::Replay;
        }
        if self
            .snapshot
            .pool(session.pool)
            .is_some_and(|pool| pool.balance.needs_client_address())
        {
            session.client_key = socket::peer_ip(std::os::fd::AsFd::as_fd(&session.client))
                .map(crate::balance::client_key)
                .unwrap_or(0);
        }
        self.arm_timer(index);
        self.connect_next(index);
    }
}
