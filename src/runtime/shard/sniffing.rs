//! The sniff step of the connection path, on listeners with routes or PROXY protocol: read
//! the client's PROXY header (from a trusted peer; admission then runs on the address it
//! carries), then its first bytes (or wait for its silence), choose a route, then connect to
//! that pool and replay the bytes to the server before relaying. The decisions are `sniff` and `route`'s (pure); this
//! only does the I/O, the limits and the timers.

use std::net::IpAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::rc::Rc;

use tracing::debug;

use super::accept::NO_SOURCE_SLOT;
use super::{Op, Shard, ticks, user_data};
use crate::admission::RejectMode;
use crate::config::{ProxyAccept, Unmatched};
use crate::metrics::{CloseKind, Detection, ListenerCounters, ProxyError};
use crate::relay::{CloseMode, Side};
use crate::route::{self, Detected};
use crate::runtime::session::{Carried, HeaderWait, NEVER, SniffPhase, Sniffing};
use crate::snapshot::{Routing, Snapshot};
use crate::sniff::proxy::{self, ProxyVerdict};
use crate::sniff::{self, Verdict};

/// A PROXY header longer than this is refused (HAProxy's default buffer is 16 KiB too).
const MAX_PROXY_HEADER: usize = 16 * 1024;
use crate::uring::{Completion, socket};

impl Shard {
    /// Starts reading a new session's client: its PROXY protocol header first when the
    /// listener takes them (`header`), then what its routes look at.
    pub(super) fn start_reading(
        &mut self,
        index: usize,
        routing: Option<&Routing>,
        header: Option<(HeaderWait, &ProxyAccept)>,
    ) {
        let now = self.now_tick;
        let mut silence_deadline = routing
            .filter(|routing| routing.server_first)
            .map_or(NEVER, |routing| now + ticks(routing.server_first_after));
        let mut deadline = routing.map_or(0, |routing| now + ticks(routing.sniff_timeout));
        if let Some((wait, proxy)) = header {
            if !wait.must_have() {
                // A client that may come without a header and says nothing has none.
                silence_deadline = silence_deadline.min(now + ticks(proxy.silence_after));
            }
            deadline = deadline.max(now + ticks(proxy.header_timeout));
        }
        let session = &mut self.sessions[index];
        session.sniffing = Some(Box::new(Sniffing {
            bytes: Vec::new(),
            phase: SniffPhase::Reading,
            silence_deadline,
            deadline,
            header: header.map(|(wait, _)| wait),
            carried: None,
            terminated_by_route: None,
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
        let session = &self.sessions[index];
        let Some(sniffing) = session.sniffing.as_deref() else {
            return;
        };
        if sniffing.bytes.is_empty() {
            self.arm_sniff_receive(index);
            return;
        }
        if sniffing.header.is_some() {
            if self.read_header(index) {
                self.after_header(index);
            }
            return;
        }
        let snapshot = Rc::clone(&self.snapshot);
        let Some(routing) = self.routing_in(&snapshot, index) else {
            self.route_to_default(index);
            return;
        };
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
        self.choose(index, routing, &detected);
    }

    /// Reads the PROXY protocol header from what has arrived. True when the step is over and
    /// the session goes on; false when it waits for more bytes or was refused.
    fn read_header(&mut self, index: usize) -> bool {
        let session = &mut self.sessions[index];
        let Some(sniffing) = session.sniffing.as_deref_mut() else {
            return false;
        };
        let Some(wait) = sniffing.header else {
            return true;
        };
        match proxy::parse(&sniffing.bytes) {
            ProxyVerdict::NeedMore if sniffing.bytes.len() >= MAX_PROXY_HEADER => {
                self.refuse_header(index, ProxyError::Invalid, "longer than 16 KiB");
                false
            }
            ProxyVerdict::NeedMore => {
                self.arm_sniff_receive(index);
                false
            }
            ProxyVerdict::Invalid(why) => {
                self.refuse_header(index, ProxyError::Invalid, why);
                false
            }
            ProxyVerdict::Header(_) if !wait.trusted => {
                self.refuse_header(
                    index,
                    ProxyError::Untrusted,
                    "from a peer not in trusted_proxies",
                );
                false
            }
            ProxyVerdict::Absent if wait.must_have() => {
                self.refuse_header(index, ProxyError::Missing, "required but absent");
                false
            }
            ProxyVerdict::Absent => self.header_done(index, None),
            ProxyVerdict::Header(header) => {
                sniffing
                    .bytes
                    .drain(..header.length.min(sniffing.bytes.len()));
                if header.addresses.is_some() || !header.tlvs.is_empty() {
                    sniffing.carried = Some(Box::new(Carried {
                        addresses: header.addresses,
                        tlvs: header.tlvs,
                    }));
                }
                if let (Some(log), Some((client, _))) = (session.log.as_mut(), header.addresses) {
                    **log = client;
                }
                self.count(index, |counters| counters.proxy_headers += 1);
                self.header_done(index, header.addresses.map(|(client, _)| client.ip()))
            }
        }
    }

    /// The header step is over (a header was taken, or the client has none): sniffing goes on
    /// for the routes alone, and admission that waited for the client's address runs on
    /// `carried` (or the peer's own). False when admission refused the client.
    fn header_done(&mut self, index: usize, carried: Option<IpAddr>) -> bool {
        let snapshot = Rc::clone(&self.snapshot);
        let server_first = self
            .routing_in(&snapshot, index)
            .is_some_and(|routing| routing.server_first);
        let session = &mut self.sessions[index];
        let Some(sniffing) = session.sniffing.as_deref_mut() else {
            return false;
        };
        let Some(wait) = sniffing.header.take() else {
            return true;
        };
        if !server_first {
            // The silence waited for was the header's; the routes read on.
            sniffing.silence_deadline = NEVER;
        }
        if !wait.trusted {
            // Admitted at accept on its own address.
            return true;
        }
        let address = carried.or_else(|| socket::peer_ip(session.client.as_fd()).ok());
        self.admit_late(index, address)
    }

    /// Admission (ACL, rates, per-source limits) of a trusted peer's connection, on the client
    /// address its PROXY header carried.
    fn admit_late(&mut self, index: usize, address: Option<IpAddr>) -> bool {
        let now_us = self.now_us;
        let session = &mut self.sessions[index];
        // The listener's socket on this shard now: a reload that moved it gave it a new epoch,
        // and its gate is the one to ask (and to give the per-source slot back to).
        let Some(listener) = self
            .listeners
            .iter_mut()
            .map(|(_, listener)| listener)
            .find(|listener| listener.id == session.listener)
        else {
            // The listener left (a reload, or the drain): nothing may be admitted on it.
            self.close_session(index, CloseMode::ResetBoth, CloseKind::Rejected);
            return false;
        };
        match listener.gate.check(address, now_us) {
            Ok(slot) => {
                session.listener_epoch = listener.epoch;
                session.source_slot = slot.unwrap_or(NO_SOURCE_SLOT);
                true
            }
            Err(reason) => {
                let mode = if listener.gate.settings().reject == RejectMode::Reset {
                    CloseMode::ResetBoth
                } else {
                    CloseMode::Graceful
                };
                self.stats.rejected += 1;
                self.count(index, |counters| counters.reject(reason));
                debug!(
                    shard = self.index,
                    ?reason,
                    ?address,
                    "connection rejected after its PROXY header"
                );
                self.close_session(index, mode, CloseKind::Rejected);
                false
            }
        }
    }

    /// Ends a session for its PROXY header, counted by why.
    fn refuse_header(&mut self, index: usize, error: ProxyError, why: &str) {
        self.count(index, |counters| counters.proxy_error(error));
        debug!(
            shard = self.index,
            reason = error.name(),
            why,
            "PROXY header refused"
        );
        self.close_session(index, CloseMode::ResetBoth, CloseKind::ProxyHeader);
    }

    /// After the header step: straight to the pool without routes that read, else on to
    /// sniffing what follows.
    fn after_header(&mut self, index: usize) {
        let snapshot = Rc::clone(&self.snapshot);
        let listener = self.sessions[index].listener;
        if snapshot.listener(listener).is_some_and(|l| {
            l.tls.is_some()
                && !l
                    .routing
                    .as_deref()
                    .is_some_and(Routing::decides_before_handshake)
        }) {
            return self.start_tls_after_header(index);
        }
        match self.routing_in(&snapshot, index) {
            None => self.route_to_default(index),
            Some(routing) if !routing.reads_first() => {
                self.choose(index, routing, &Detected::Unknown);
            }
            Some(_) => self.try_route(index),
        }
    }

    /// The sniff timer fired: silence means a server-first protocol (or no PROXY header),
    /// the sniff timeout means unknown; otherwise re-arm a receive that found no buffer and
    /// wait on.
    pub(super) fn sniff_tick(&mut self, index: usize) {
        let now = self.now_tick;
        let session = &self.sessions[index];
        let Some(sniffing) = session.sniffing.as_deref() else {
            return;
        };
        if sniffing.phase != SniffPhase::Reading {
            return;
        }
        let silent = sniffing.silent_at(now);
        if let Some(wait) = sniffing.header {
            if now >= sniffing.deadline {
                let partial = !sniffing.bytes.is_empty()
                    && proxy::parse(&sniffing.bytes) == ProxyVerdict::NeedMore;
                if partial {
                    self.refuse_header(index, ProxyError::Timeout, "incomplete at sniff_timeout");
                    return;
                }
                if wait.must_have() {
                    self.refuse_header(index, ProxyError::Missing, "none within sniff_timeout");
                    return;
                }
            } else if !silent || wait.must_have() {
                self.arm_sniff_receive(index);
                self.arm_timer(index);
                return;
            }
            if !self.header_done(index, None) {
                return;
            }
            let snapshot = Rc::clone(&self.snapshot);
            let listener = self.sessions[index].listener;
            if snapshot.listener(listener).is_some_and(|l| l.tls.is_some()) {
                // No header came: the client still owes its handshake (its armed receive is
                // the relay's now).
                return self.start_tls_after_header(index);
            }
            let Some(routing) = self.routing_in(&snapshot, index) else {
                self.route_to_default(index);
                return;
            };
            if !routing.reads_first() {
                self.choose(index, routing, &Detected::Unknown);
                return;
            }
        }
        let snapshot = Rc::clone(&self.snapshot);
        let Some(routing) = self.routing_in(&snapshot, index) else {
            self.route_to_default(index);
            return;
        };
        let Some(sniffing) = self.sessions[index].sniffing.as_deref() else {
            return;
        };
        let silent = sniffing.silent_at(now);
        if silent {
            self.choose(index, routing, &Detected::Silence);
        } else if now >= sniffing.deadline {
            self.stats.sniff_timeouts += 1;
            self.count(index, |counters| counters.sniff_timeouts += 1);
            self.choose(index, routing, &Detected::Unknown);
        } else {
            self.arm_sniff_receive(index);
            self.arm_timer(index);
        }
    }

    /// No routes (none configured, or a reload took them): the listener's pool or split.
    fn route_to_default(&mut self, index: usize) {
        let Some(session) = self.sessions.get(index) else {
            return;
        };
        let listener = session.listener;
        if !session.relay.is_tls()
            && self
                .snapshot
                .listener(listener)
                .is_some_and(|l| l.tls.is_some())
        {
            // A TLS listener's client still owes its handshake: never relayed raw.
            return self.start_tls_after_header(index);
        }
        let target = self.snapshot.listener(listener).map(|l| l.target);
        if !target.is_some_and(|target| self.settle(index, target)) {
            // The listener (or its split) left with a reload: no destination to honour.
            self.close_session(index, CloseMode::Graceful, CloseKind::ConnectFailed);
            return;
        }
        self.connect_when_quiet(index);
    }

    /// Connects once no receive of the sniff step is armed: an armed one (a route chosen by
    /// time, or lost to a reload) is cancelled first, and what it brings is kept for the server.
    fn connect_when_quiet(&mut self, index: usize) {
        let session = &mut self.sessions[index];
        // (A TLS session reads no more once its handshake is done: nothing to cancel.)
        if !session.relay.is_tls() && session.relay.flow_from(Side::Client).receiving > 0 {
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

    /// The client's address: the one a trusted PROXY header carried, else the peer's.
    pub(super) fn client_ip(&self, index: usize) -> Option<IpAddr> {
        let session = self.sessions.get(index)?;
        match session
            .sniffing
            .as_deref()
            .and_then(Sniffing::carried_client)
        {
            Some(client) => Some(client.ip()),
            None => socket::peer_ip(session.client.as_fd()).ok(),
        }
    }

    /// The routes of the session's listener in `snapshot` (the shard's own, held through an
    /// `Rc` clone: no atomic shared with other shards per connection).
    fn routing_in<'a>(&self, snapshot: &'a Snapshot, index: usize) -> Option<&'a Routing> {
        let listener = self.sessions.get(index)?.listener;
        snapshot.listener(listener)?.routing.as_deref()
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
        let client = if needs_address {
            self.client_ip(index).unwrap_or(IpAddr::from([0, 0, 0, 0]))
        } else {
            IpAddr::from([0, 0, 0, 0])
        };
        let listener = self.sessions[index].listener;
        let listener_terminates = self
            .snapshot
            .listener(listener)
            .is_some_and(|l| l.tls.is_some());
        // A TLS listener decides its `tls = ...` routes on the ClientHello and the others on
        // its handshake; a client whose TLS is terminated already never gets a `tls = ...`
        // route (whatever a reload made of its listener).
        let terminated = self.sessions[index].relay.is_tls();
        let before_handshake = listener_terminates && !terminated;
        let position = route::decide_among(&routing.routes, detected, client, |route| {
            if terminated {
                !route.tls.before_handshake()
            } else if before_handshake {
                route.tls.before_handshake()
            } else {
                true
            }
        });
        if before_handshake && position.is_none() {
            // No route takes it before the handshake: the listener terminates it, and its
            // other routes choose after the handshake (counted then).
            return self.start_tls_after_header(index);
        }
        self.count(index, |counters| counters.detect(detection));
        let chosen = position.map(|position| routing.routes[position].target);
        if chosen.is_some() || routing.unmatched == Unmatched::Default {
            let routes = routing.routes.len();
            self.count(index, |counters| counters.routed(position, routes));
        }
        if chosen.is_none() {
            self.stats.unmatched += 1;
            self.count(index, |counters| counters.unmatched += 1);
            if routing.unmatched == Unmatched::Reject {
                self.close_session(index, CloseMode::ResetBoth, CloseKind::Unmatched);
                return;
            }
        }
        let Some(destination) = chosen.or_else(|| {
            self.snapshot
                .listener(listener)
                .map(|listener| listener.target)
        }) else {
            self.close_session(index, CloseMode::Graceful, CloseKind::ConnectFailed);
            return;
        };
        if !self.settle(index, destination) {
            self.close_session(index, CloseMode::Graceful, CloseKind::ConnectFailed);
            return;
        }
        debug!(shard = self.index, detected = ?detected, "route chosen");
        if let Some(position) = position
            && let crate::route::RouteTls::Terminate(settings) = &routing.routes[position].tls
        {
            return self.start_route_tls(index, position, settings.handshake_timeout);
        }
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
        self.refresh_client_key(index);
        self.arm_timer(index);
        self.connect_next(index);
    }
}
