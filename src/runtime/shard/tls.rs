//! TLS sessions on the shard: the shard's own rustls configs, the start of a handshake, and
//! what follows it (metrics, the route by SNI and ALPN, the connect).

use std::rc::Rc;
use std::sync::Arc;

use tracing::{debug, warn};

use super::Shard;
use crate::metrics::{CloseKind, RejectKind, TlsFailure};
use crate::relay::CloseMode;
use crate::route::Detected;
use crate::snapshot::{ListenerId, Snapshot};
use crate::tls::{ShardTls, TlsStream};

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
        let mut origins = std::collections::HashMap::new();
        for pool in &snapshot.pools {
            let Some(wanted) = &pool.tls else {
                continue;
            };
            if let Some((had, config)) = self.origin_tls.remove(&pool.id)
                && Arc::ptr_eq(&had, wanted)
            {
                origins.insert(pool.id, (had, config));
                continue;
            }
            match wanted.client_config() {
                Ok(config) => {
                    origins.insert(pool.id, (Arc::clone(wanted), config));
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
        &self,
        pool: crate::snapshot::PoolId,
        addr: std::net::SocketAddr,
    ) -> Option<Result<TlsStream, rustls::Error>> {
        let wanted = self.snapshot.pool(pool)?.tls.as_ref()?;
        let Some((settings, config)) = self.origin_tls.get(&pool) else {
            return Some(Err(rustls::Error::General(
                "no TLS config toward this pool".to_string(),
            )));
        };
        debug_assert!(Arc::ptr_eq(settings, wanted));
        Some(TlsStream::connect(
            Arc::clone(config),
            settings.server_name_for(addr),
        ))
    }

    /// The rustls config a new client of `listener` gets (None: not a TLS listener).
    pub(super) fn tls_config(&self, listener: ListenerId) -> Option<&Arc<rustls::ServerConfig>> {
        self.tls.get(&listener).map(|(_, config)| config)
    }

    /// A client of a TLS listener: its handshake starts; the server is chosen after it.
    /// `received`: bytes already read from it (what followed its PROXY header).
    pub(super) fn start_tls_session(
        &mut self,
        index: usize,
        config: Arc<rustls::ServerConfig>,
        received: &[u8],
    ) {
        let handshake = self
            .snapshot
            .listener(self.sessions[index].listener)
            .and_then(|listener| listener.tls.as_ref())
            .map_or(std::time::Duration::from_secs(10), |tls| {
                tls.settings.handshake_timeout
            });
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
        match self.tls_config(listener).cloned() {
            Some(config) => self.start_tls_session(index, config, &received),
            None => self.close_session(index, CloseMode::ResetBoth, CloseKind::LocalError),
        }
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
        let offered = self
            .snapshot
            .listener(listener)
            .and_then(|l| l.tls.as_ref())
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
        let snapshot = Rc::clone(&self.snapshot);
        let Some(config) = snapshot.listener(listener) else {
            self.close_session(index, CloseMode::Graceful, CloseKind::ConnectFailed);
            return;
        };
        match config.routing.as_deref() {
            Some(routing) => {
                let detected = Detected::Protocol(
                    crate::sniff::Protocol::Tls,
                    crate::sniff::Facts {
                        server_name: facts.server_name.clone(),
                        alpn: facts.alpn.iter().cloned().collect(),
                        tls_version: Some(facts.version),
                        ..Default::default()
                    },
                );
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
