//! TLS sessions on the shard: the shard's own rustls configs, the start of a handshake, and
//! what follows it (metrics, the route by SNI and ALPN, the connect).

use std::rc::Rc;
use std::sync::Arc;

use tracing::{debug, warn};

use super::Shard;
use crate::metrics::{CloseKind, RejectKind, TlsFailure};
use crate::relay::CloseMode;
use crate::route::Detected;
use crate::runtime::session::SniffPhase;
use crate::snapshot::{ListenerId, Snapshot};
use crate::tls::{ShardTls, TlsStream};

/// A TLS pool's rustls config on this shard, and one copy per server with the server's own
/// session store (with `session_reuse`; made at the first connect to the server).
pub(super) struct OriginTls {
    settings: Arc<crate::tls::OriginSettings>,
    config: Arc<rustls::ClientConfig>,
    per_server: std::collections::HashMap<std::net::SocketAddr, Arc<rustls::ClientConfig>>,
}

impl Shard {
    /// Builds the shard's rustls config for each TLS listener of `snapshot` whose settings or
    /// ticket keys changed; drops those of listeners that left or stopped TLS.
    pub(super) fn adopt_tls(&mut self, snapshot: &Snapshot) {
        let mut built = std::collections::HashMap::new();
        for listener in &snapshot.listeners {
            let Some(wanted) = &listener.tls else {
                continue;
            };
            if let Some((had, config)) = self.tls.remove(&listener.id)
                && Arc::ptr_eq(&had.settings, &wanted.settings)
                && had.tickets == wanted.tickets
            {
                built.insert(listener.id, (had, config));
                continue;
            }
            match ShardTls::build(&wanted.settings, wanted.tickets.as_ref()) {
                Ok(tls) => {
                    built.insert(listener.id, (Arc::clone(wanted), tls.config));
                }
                // The control thread built the same config when it loaded the file; this
                // happens only if the system refuses the keys now.
                Err(error) => warn!(
                    shard = self.index,
                    listener = %listener.name,
                    %error,
                    "cannot build the TLS config; the listener's clients are refused"
                ),
            }
        }
        self.tls = built;
        let mut routes = std::collections::HashMap::new();
        for listener in &snapshot.listeners {
            let Some(routing) = listener.routing.as_deref() else {
                continue;
            };
            for (position, route) in routing.routes.iter().enumerate() {
                let crate::route::RouteTls::Terminate(settings) = &route.tls else {
                    continue;
                };
                let key = (listener.id, position);
                if let Some(had) = self.route_tls.remove(&key)
                    && Arc::ptr_eq(&had.0, settings)
                    && had.1 == routing.tickets
                {
                    routes.insert(key, had);
                    continue;
                }
                match ShardTls::build(settings, routing.tickets.as_ref()) {
                    Ok(tls) => {
                        routes.insert(
                            key,
                            (Arc::clone(settings), routing.tickets.clone(), tls.config),
                        );
                    }
                    Err(error) => warn!(
                        shard = self.index,
                        listener = %listener.name,
                        route = position + 1,
                        %error,
                        "cannot build the route's TLS config; its clients are refused"
                    ),
                }
            }
        }
        self.route_tls = routes;
        let mut origins = std::collections::HashMap::new();
        for pool in &snapshot.pools {
            let Some(wanted) = &pool.tls else {
                continue;
            };
            // Unchanged settings keep their config, and with it the tickets this shard holds
            // toward the pool's servers (those still in it).
            if let Some(mut origin) = self.origin_tls.remove(&pool.id)
                && (Arc::ptr_eq(&origin.settings, wanted) || origin.settings == *wanted)
            {
                origin.settings = Arc::clone(wanted);
                origin
                    .per_server
                    .retain(|addr, _| pool.servers.iter().any(|server| server.addr == *addr));
                origins.insert(pool.id, origin);
                continue;
            }
            match wanted.client_config() {
                Ok(config) => {
                    origins.insert(
                        pool.id,
                        OriginTls {
                            settings: Arc::clone(wanted),
                            config,
                            per_server: std::collections::HashMap::new(),
                        },
                    );
                }
                Err(error) => warn!(
                    shard = self.index,
                    pool = %pool.name,
                    %error,
                    "cannot build the TLS config toward the pool's servers; its connects fail"
                ),
            }
        }
        self.origin_tls = origins;
    }

    /// A TLS session toward the server at `addr` of `pool` (None: the pool speaks plain TCP).
    pub(super) fn origin_stream(
        &mut self,
        pool: crate::snapshot::PoolId,
        addr: std::net::SocketAddr,
    ) -> Option<Result<TlsStream, rustls::Error>> {
        let wanted = self.snapshot.pool(pool)?.tls.as_ref()?;
        let Some(origin) = self.origin_tls.get_mut(&pool) else {
            return Some(Err(rustls::Error::General(
                "no TLS config toward this pool".to_string(),
            )));
        };
        debug_assert!(Arc::ptr_eq(&origin.settings, wanted));
        let settings = Arc::clone(&origin.settings);
        let config = if settings.session_reuse {
            // Tickets are the server's: each server gets its own store (servers sharing a
            // `server_name` do not share ticket keys), as NGINX and HAProxy keep a session per
            // server.
            let base = &origin.config;
            Arc::clone(
                origin
                    .per_server
                    .entry(addr)
                    .or_insert_with(|| crate::tls::with_own_session_store(base)),
            )
        } else {
            Arc::clone(&origin.config)
        };
        Some(TlsStream::connect(config, settings.server_name_for(addr)))
    }

    /// The rustls config a new client of `listener` gets (None: not a TLS listener).
    pub(super) fn tls_config(&self, listener: ListenerId) -> Option<&Arc<rustls::ServerConfig>> {
        self.tls.get(&listener).map(|(_, config)| config)
    }

    /// The handshake bound of a TLS listener's clients.
    pub(super) fn listener_handshake_timeout(&self, listener: ListenerId) -> std::time::Duration {
        self.snapshot
            .listener(listener)
            .and_then(|listener| listener.tls.as_ref())
            .map_or(crate::config::DEFAULT_HANDSHAKE_TIMEOUT, |tls| {
                tls.settings.handshake_timeout
            })
    }

    /// A TLS client: its handshake starts (bounded by `handshake`); the server is chosen
    /// after it. `received`: bytes already read from it (what followed its PROXY header, or
    /// the ClientHello a route was chosen by).
    pub(super) fn start_tls_session(
        &mut self,
        index: usize,
        config: Arc<rustls::ServerConfig>,
        received: &[u8],
        handshake: std::time::Duration,
    ) {
        let stream = match TlsStream::new(config) {
            Ok(stream) => stream,
            Err(error) => {
                warn!(shard = self.index, %error, "cannot start a TLS session");
                self.close_session(index, CloseMode::ResetBoth, CloseKind::LocalError);
                return;
            }
        };
        let mut actions = std::mem::take(&mut self.actions);
        let tick = self.now_tick;
        self.sessions[index].relay.start_tls(
            Box::new(stream),
            super::ticks(handshake),
            tick,
            received,
            &mut actions,
        );
        self.execute(index, &mut actions);
        self.actions = actions;
        if self.sessions.get(index).is_some_and(|s| !s.closing) {
            self.arm_timer(index);
        }
    }

    /// After a PROXY header on a TLS listener: the handshake starts with what followed it.
    pub(super) fn start_tls_after_header(&mut self, index: usize) {
        let Some(session) = self.sessions.get_mut(index) else {
            return;
        };
        let listener = session.listener;
        let received = match session.sniffing.as_deref_mut() {
            Some(sniffing) => {
                // The sniff step is over; what it read is TLS, and the header's facts stay.
                sniffing.phase = crate::runtime::session::SniffPhase::Replay;
                std::mem::take(&mut sniffing.bytes)
            }
            None => Vec::new(),
        };
        let handshake = self.listener_handshake_timeout(listener);
        match self.tls_config(listener).cloned() {
            Some(config) => self.start_tls_session(index, config, &received, handshake),
            None => self.close_session(index, CloseMode::ResetBoth, CloseKind::LocalError),
        }
    }

    /// A route with its own certificates was chosen by the ClientHello (its pool settled):
    /// the proxy terminates with them, from the bytes sniffed, and connects after the
    /// handshake.
    pub(super) fn start_route_tls(
        &mut self,
        index: usize,
        position: usize,
        handshake: std::time::Duration,
    ) {
        let Some(session) = self.sessions.get_mut(index) else {
            return;
        };
        let config = self
            .route_tls
            .get(&(session.listener, position))
            .map(|(_, _, config)| Arc::clone(config));
        let Some(config) = config else {
            self.close_session(index, CloseMode::ResetBoth, CloseKind::LocalError);
            return;
        };
        let received = match session.sniffing.as_deref_mut() {
            Some(sniffing) => {
                sniffing.phase = crate::runtime::session::SniffPhase::Replay;
                sniffing.terminated_by_route = u16::try_from(position).ok();
                std::mem::take(&mut sniffing.bytes)
            }
            None => Vec::new(),
        };
        self.start_tls_session(index, config, &received, handshake);
    }

    /// The handshake is done: count it, then route by its SNI and ALPN and connect.
    pub(super) fn tls_established(&mut self, index: usize) {
        let Some(session) = self.sessions.get(index) else {
            return;
        };
        let Some(facts) = session.relay.tls_facts() else {
            return;
        };
        let took = self.now_us.saturating_sub(session.started_us);
        let slot = session.listener_counters;
        let listener = session.listener;
        let by_route = session
            .sniffing
            .as_deref()
            .and_then(|sniffing| sniffing.terminated_by_route);
        // ALPN is counted against the listener's own list (a route's has its own positions).
        let offered = self
            .snapshot
            .listener(listener)
            .and_then(|l| l.tls.as_ref())
            .filter(|_| by_route.is_none())
            .map(|tls| &tls.settings.alpn);
        let alpn = offered.map(|offered| {
            let position = facts
                .alpn
                .as_ref()
                .and_then(|chosen| offered.iter().position(|p| p == chosen.as_bytes()));
            (position, offered.len())
        });
        if let Some(counters) = self.counters.listeners.get_mut(slot) {
            if facts.resumed {
                counters.tls_resumed += 1;
            } else {
                counters.tls_full += 1;
            }
            match facts.version {
                0x0303 => counters.tls_versions[0] += 1,
                0x0304 => counters.tls_versions[1] += 1,
                _ => {}
            }
            counters
                .tls_handshake_time
                .record(std::time::Duration::from_micros(took));
            if let Some((position, offered)) = alpn {
                counters.tls_alpn_chosen(position, offered);
            }
        }
        debug!(shard = self.index, ?facts, "TLS handshake done");
        if by_route.is_some() {
            // The route that terminated it chose the pool already.
            self.refresh_client_key(index);
            self.arm_timer(index);
            self.connect_next(index);
            return;
        }
        let snapshot = Rc::clone(&self.snapshot);
        let Some(config) = snapshot.listener(listener) else {
            self.close_session(index, CloseMode::Graceful, CloseKind::ConnectFailed);
            return;
        };
        match config.routing.as_deref() {
            // Routes on what the client says inside TLS: read it first, unless a route before
            // any of those already holds on the handshake alone.
            Some(routing) if !routing.decrypted.is_empty() => {
                let detected = Detected::Protocol(crate::sniff::Protocol::Tls, tls_facts(&facts));
                let client = self
                    .client_ip(index)
                    .unwrap_or(std::net::IpAddr::from([0, 0, 0, 0]));
                let decided = routing
                    .routes
                    .iter()
                    .filter(|route| !route.tls.before_handshake())
                    .take_while(|route| !route.conditions.reads_decrypted())
                    .any(|route| route.conditions.hold(&detected, client));
                if decided {
                    self.choose(index, routing, &detected);
                } else {
                    self.start_decrypted_sniff(index, routing);
                }
            }
            Some(routing) => {
                let detected = Detected::Protocol(crate::sniff::Protocol::Tls, tls_facts(&facts));
                self.choose(index, routing, &detected);
            }
            None => {
                if self.settle(index, config.target) {
                    self.refresh_client_key(index);
                    self.arm_timer(index);
                    self.connect_next(index);
                } else {
                    self.close_session(index, CloseMode::Graceful, CloseKind::ConnectFailed);
                }
            }
        }
    }

    /// After the handshake of a TLS listener whose routes look at the decrypted bytes: they
    /// are read (through the relay) until the routes can decide, or `sniff_timeout`.
    fn start_decrypted_sniff(&mut self, index: usize, routing: &crate::snapshot::Routing) {
        let deadline = self.now_tick + super::ticks(routing.sniff_timeout);
        let Some(session) = self.sessions.get_mut(index) else {
            return;
        };
        let sniffing = session.sniffing.get_or_insert_with(|| {
            Box::new(crate::runtime::session::Sniffing {
                bytes: Vec::new(),
                phase: SniffPhase::Decrypted,
                silence_deadline: crate::runtime::session::NEVER,
                deadline,
                header: None,
                carried: None,
                terminated_by_route: None,
            })
        });
        sniffing.phase = SniffPhase::Decrypted;
        sniffing.deadline = deadline;
        let mut actions = std::mem::take(&mut self.actions);
        session
            .relay
            .start_peek(routing.sniff_max_bytes as usize, &mut actions);
        self.execute(index, &mut actions);
        self.actions = actions;
        if self.sessions.get(index).is_some_and(|s| !s.closing) {
            self.arm_timer(index);
        }
    }

    /// Decrypted bytes arrived while the routes look at them: decide if they can.
    pub(super) fn on_tls_plaintext(&mut self, index: usize) {
        let snapshot = Rc::clone(&self.snapshot);
        let Some(session) = self.sessions.get(index) else {
            return;
        };
        if session.closing
            || session
                .sniffing
                .as_deref()
                .is_none_or(|sniffing| sniffing.phase != SniffPhase::Decrypted)
        {
            return;
        }
        let Some(routing) = snapshot
            .listener(session.listener)
            .and_then(|listener| listener.routing.as_deref())
        else {
            return self.decrypted_decided(index, None);
        };
        let (bytes, ended) = session.relay.peeked();
        let limit = routing.sniff_max_bytes as usize;
        let detected =
            match crate::sniff::sniff(&bytes[..bytes.len().min(limit)], &routing.decrypted) {
                crate::sniff::Verdict::Match(protocol, facts) => Some((protocol, facts)),
                crate::sniff::Verdict::NoMatch => None,
                crate::sniff::Verdict::NeedMore if bytes.len() >= limit || ended => {
                    self.stats.sniff_limits += 1;
                    let slot = session.listener_counters;
                    if let Some(counters) = self.counters.listeners.get_mut(slot) {
                        counters.sniff_timeouts += 1;
                    }
                    None
                }
                crate::sniff::Verdict::NeedMore => return,
            };
        self.decrypted_decided(index, detected);
    }

    /// The decrypted bytes' sniff timed out: the routes decide on the handshake alone.
    pub(super) fn decrypted_timeout(&mut self, index: usize) {
        self.stats.sniff_timeouts += 1;
        let slot = self.sessions[index].listener_counters;
        if let Some(counters) = self.counters.listeners.get_mut(slot) {
            counters.sniff_timeouts += 1;
        }
        self.decrypted_decided(index, None);
    }

    /// Routes by what the decrypted bytes carry (`detected`), with the handshake's facts; the
    /// bytes read go to the server first.
    fn decrypted_decided(
        &mut self,
        index: usize,
        detected: Option<(crate::sniff::Protocol, crate::sniff::Facts)>,
    ) {
        let Some(session) = self.sessions.get_mut(index) else {
            return;
        };
        let Some(facts) = session.relay.tls_facts() else {
            return;
        };
        let bytes = session.relay.end_peek();
        if let Some(sniffing) = session.sniffing.as_deref_mut() {
            sniffing.phase = SniffPhase::Replay;
            sniffing.bytes = bytes;
        }
        let handshake = tls_facts(&facts);
        let detected = match detected {
            Some((protocol, inside)) => Detected::Protocol(
                protocol,
                crate::sniff::Facts {
                    server_name: handshake.server_name,
                    alpn: handshake.alpn,
                    tls_version: handshake.tls_version,
                    ..inside
                },
            ),
            None => Detected::Protocol(crate::sniff::Protocol::Tls, handshake),
        };
        let snapshot = Rc::clone(&self.snapshot);
        let listener = self.sessions[index].listener;
        match snapshot
            .listener(listener)
            .and_then(|listener| listener.routing.as_deref())
        {
            Some(routing) => self.choose(index, routing, &detected),
            None => {
                let target = snapshot.listener(listener).map(|l| l.target);
                if target.is_some_and(|target| self.settle(index, target)) {
                    self.refresh_client_key(index);
                    self.arm_timer(index);
                    self.connect_next(index);
                } else {
                    self.close_session(index, CloseMode::Graceful, CloseKind::ConnectFailed);
                }
            }
        }
    }

    /// A TLS handshake failed (or timed out): counted as a refused connection.
    pub(super) fn tls_failed(&mut self, index: usize, timeout: bool) {
        let Some(session) = self.sessions.get(index) else {
            return;
        };
        let failure = if timeout {
            TlsFailure::Timeout
        } else {
            session
                .relay
                .tls_error()
                .map_or(TlsFailure::ClientClosed, |error| {
                    TlsFailure::of(Some(error))
                })
        };
        let why = session.relay.tls_failure();
        debug!(
            shard = self.index,
            reason = failure.name(),
            why,
            "TLS handshake failed"
        );
        let slot = session.listener_counters;
        if let Some(counters) = self.counters.listeners.get_mut(slot) {
            counters.tls_failed(failure);
            counters.reject(RejectKind::TlsHandshake);
        }
    }
}

/// What a completed handshake tells the routes: its server name and the negotiated ALPN.
fn tls_facts(facts: &crate::tls::TlsFacts) -> crate::sniff::Facts {
    crate::sniff::Facts {
        server_name: facts.server_name.clone(),
        alpn: facts.alpn.iter().cloned().collect(),
        tls_version: Some(facts.version),
        ..Default::default()
    }
}
