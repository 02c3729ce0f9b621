//! Choosing a server for a session and connecting to it: the balancer's pick, source address
//! binding, the connect with its timeout, and retries on other servers.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};

use tracing::{debug, warn};

use super::super::log_limit::{self, Verdict};
use super::{ACCEPT_BACKOFF, IGNORED, Op, Shard, user_data};
use crate::metrics::{CloseKind, ConnectErrorKind};
use crate::relay::{CloseMode, ServerTlsFailure};
use crate::runtime::session::ServerRef;
use crate::uring::socket;

/// How often a session retries creating its server socket when memory ran short (every
/// `ACCEPT_BACKOFF`, so for about 2 s) before its client is closed.
const SOCKET_RETRIES: u8 = 20;
/// Log-limiter kinds.
const LOG_CONNECT_FAILED: u8 = 1;
const LOG_SOCKET_FAILED: u8 = 3;

impl Shard {
    fn next_source(&mut self, position: usize, target: &SocketAddr) -> Option<IpAddr> {
        let sources = &self.snapshot.pools[position].source_addresses;
        if sources.is_empty() {
            return None;
        }
        let cursor = &mut self.source_cursor[position];
        for _ in 0..sources.len() {
            let source = sources[*cursor % sources.len()];
            *cursor = cursor.wrapping_add(1);
            if source.is_ipv4() == target.is_ipv4() {
                return Some(source);
            }
        }
        None
    }

    /// Picks a server the session has not tried and starts connecting to it; closes the session
    /// when there is none.
    pub(super) fn connect_next(&mut self, index: usize) {
        let now_ms = self.now_ms;
        let tick = self.now_tick;
        let session = &mut self.sessions[index];
        let Some(position) = self.snapshot.pool_position(session.pool) else {
            // The pool left the config (a reload) before this session was connected.
            self.stats.no_server += 1;
            debug!(shard = self.index, "pool removed while connecting");
            self.close_session(index, CloseMode::Graceful, CloseKind::ConnectFailed);
            return;
        };
        let balancer = &mut self.balancers[position];
        let Some(server) = balancer.pick(session.client_key, session.tried, now_ms) else {
            self.stats.no_server += 1;
            let pool = &self.snapshot.pools[position];
            debug!(shard = self.index, pool = %pool.name, attempts = session.attempts, "no server available");
            self.close_session(index, CloseMode::Graceful, CloseKind::ConnectFailed);
            return;
        };
        let snapshot = std::rc::Rc::clone(&self.snapshot);
        let pool = &snapshot.pools[position];
        let target = &pool.servers[server];
        let addr = target.addr;
        let server_id = target.id;
        // A TLS pool's session with this server is made now: the connect's end must not see a
        // reload's pool (a server gone from it must not be spoken to in the clear).
        match self.origin_stream(pool.id, addr) {
            None => {}
            Some(Ok(stream)) => self.sessions[index].relay.prepare_server_tls(stream),
            Some(Err(error)) => {
                // The shard's own fault, not the server's: the session ends, no server is
                // blamed.
                self.stats.local_errors += 1;
                warn!(shard = self.index, pool = %pool.name, %error, "cannot start a TLS session toward the server");
                self.close_session(index, CloseMode::Graceful, CloseKind::LocalError);
                return;
            }
        }
        let source = self.next_source(position, &addr);
        let server_fd = match socket::tcp_socket(&addr, source, &pool.tcp) {
            Ok(fd) => fd,
            Err(error) => {
                self.stats.local_errors += 1;
                if let Verdict::Log { suppressed } = self.logs.check(
                    log_limit::key(LOG_SOCKET_FAILED, pool.id.0 as usize, server_id.0 as usize),
                    tick,
                ) {
                    warn!(shard = self.index, pool = %pool.name, server = %addr, ?source, %error, suppressed, "cannot create a server socket");
                }
                let session = &mut self.sessions[index];
                // Waiting for a descriptor deadlocks when every descriptor is held by clients
                // waiting the same way, so only memory shortage (ENOBUFS/ENOMEM) is waited
                // out (accepting pauses meanwhile); out of descriptors, the client is closed.
                let transient = matches!(error.raw_os_error(), Some(libc::ENOBUFS | libc::ENOMEM));
                if transient && session.socket_retries < SOCKET_RETRIES {
                    session.socket_retries += 1;
                    let generation = session.generation;
                    self.connect_retry
                        .push_back((index, generation, self.now + ACCEPT_BACKOFF));
                    self.pause_accepts();
                } else {
                    self.close_session(index, CloseMode::Graceful, CloseKind::LocalError);
                }
                return;
            }
        };
        let raw = server_fd.as_raw_fd();
        let counters = self.counters.servers.slot(server_id);
        self.counters.servers.hold(counters);
        let session = &mut self.sessions[index];
        self.balancers[position].acquire(server);
        session.server_ref = Some(ServerRef {
            id: server_id,
            index: server,
            counters,
        });
        session.server = Some(server_fd);
        session.tried.insert(server);
        session.attempts = session.attempts.saturating_add(1);
        session.connecting = true;
        session.connect_started_us = self.now_us;
        let connect_data = user_data(Op::Connect, index, session.generation);
        let _ = self
            .ring
            .connect(raw, addr, pool.connect_timeout, connect_data, IGNORED);
    }

    /// Sessions that waited for memory try their connect again.
    pub(super) fn retry_connects(&mut self) {
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

    /// Releases the server a session occupies in its pool's balancer (and its counters).
    pub(super) fn release_server(&mut self, index: usize) {
        let Some(session) = self.sessions.get_mut(index) else {
            return;
        };
        let Some(server) = session.server_ref.take() else {
            return;
        };
        self.counters.servers.unhold(server.counters);
        if let Some(position) = self.snapshot.pool_position(session.pool) {
            let balancer = &mut self.balancers[position];
            if let Some(at) = balancer.position(server.id, server.index) {
                balancer.release(at);
            }
        }
    }

    /// Where the server a session occupies sits in its pool's balancer now: (pool position,
    /// balancer position).
    fn server_position(
        &self,
        pool: crate::snapshot::PoolId,
        server: ServerRef,
    ) -> Option<(usize, usize)> {
        let position = self.snapshot.pool_position(pool)?;
        let at = self.balancers[position].position(server.id, server.index)?;
        Some((position, at))
    }

    /// The server took the session: its balancer and counters learn it.
    fn server_reached(&mut self, index: usize) {
        let session = &self.sessions[index];
        let Some(server) = session.server_ref else {
            return;
        };
        if let Some((position, at)) = self.server_position(session.pool, server) {
            self.balancers[position].record_success(at);
        }
        if let Some(counters) = self.counters.servers.get_mut(server.counters) {
            counters.sessions += 1;
        }
    }

    pub(super) fn on_connect(&mut self, index: usize, result: i32) {
        let session = &mut self.sessions[index];
        session.connecting = false;
        if session.closing {
            return;
        }
        let Some(server) = session.server_ref else {
            return;
        };
        if result != 0 {
            let errno = if result == -libc::ECANCELED {
                libc::ETIMEDOUT
            } else {
                -result
            };
            let error = io::Error::from_raw_os_error(errno);
            return self.server_attempt_failed(
                index,
                server,
                ConnectErrorKind::from_errno(errno),
                &error.to_string(),
            );
        }
        let took = self.now_us.saturating_sub(session.connect_started_us);
        session.connect_us = Some(u32::try_from(took).unwrap_or(u32::MAX));
        if let Some(counters) = self.counters.pools.get_mut(session.pool_counters) {
            counters
                .connect_time
                .record(std::time::Duration::from_micros(took));
        }
        let origin = session.relay.server_tls_prepared();
        if !origin {
            self.server_reached(index);
        }
        let session = &mut self.sessions[index];
        let mut actions = std::mem::take(&mut self.actions);
        // The server hears first the PROXY header its pool asks for, then what sniffing
        // read, then the relay.
        let mut replay = Vec::new();
        if let Some(version) = self
            .snapshot
            .pool(session.pool)
            .and_then(|pool| pool.send_proxy)
        {
            let client = session.client.as_fd();
            let carried = session
                .sniffing
                .as_deref()
                .and_then(|sniffing| sniffing.carried.as_deref());
            // A terminated TLS session tells its server what the handshake settled.
            let tls_tlvs = match version {
                crate::sniff::proxy::ProxyVersion::V2 => session.relay.tls_facts().map(|facts| {
                    let cn = session.relay.tls_client_cn();
                    crate::tls::proxy_tlvs(&facts, cn.as_deref())
                }),
                _ => None,
            };
            // The load balancer's TLVs, with what the handshake settled in place of its own
            // ALPN, authority and SSL ones.
            let merged;
            let tlvs = match (carried, tls_tlvs) {
                (Some(carried), Some(tls)) => {
                    let mut all: Vec<(u8, Vec<u8>)> = carried
                        .tlvs
                        .iter()
                        .filter(|(kind, _)| !tls.iter().any(|(mine, _)| mine == kind))
                        .cloned()
                        .collect();
                    all.extend(tls);
                    merged = all;
                    merged.as_slice()
                }
                (Some(carried), None) => carried.tlvs.as_slice(),
                (None, Some(tls)) => {
                    merged = tls;
                    merged.as_slice()
                }
                (None, None) => &[],
            };
            let carried = carried.and_then(|carried| carried.addresses);
            let addresses = match carried {
                // What the client's own load balancer said, passed on with its TLVs.
                Some(addresses) => Ok(addresses),
                None => socket::peer_addr(client)
                    .and_then(|peer| Ok((peer, socket::local_addr(client)?))),
            };
            match addresses {
                Ok((peer, local)) => {
                    replay = crate::sniff::proxy::header_passing_on(version, peer, local, tlvs);
                }
                _ => {
                    // The client is gone (a reset ends getpeername): never relay its bytes
                    // without the header the server trusts for its address.
                    self.actions = actions;
                    self.close_session(index, CloseMode::ResetBoth, CloseKind::ClientReset);
                    return;
                }
            }
        }
        if origin {
            // TLS toward the server: the header in the clear, then the handshake; what
            // sniffing read (or the decrypted bytes routes looked at) waits for the handshake
            // (and for another server if it fails). The sniffing state stays: a retry's header
            // needs what a PROXY header carried.
            let plaintext = session
                .sniffing
                .as_deref_mut()
                .map(|sniffed| std::mem::take(&mut sniffed.bytes))
                .unwrap_or_default();
            let client_spoke = !plaintext.is_empty();
            let handshake = self
                .snapshot
                .pool(session.pool)
                .map_or(std::time::Duration::from_secs(5), |pool| {
                    pool.connect_timeout
                });
            session.relay.connect_tls_server(
                self.now_tick,
                super::ticks(handshake),
                replay.into_boxed_slice(),
                plaintext,
                client_spoke,
                &mut actions,
            );
            self.execute(index, &mut actions);
            self.actions = actions;
            if self.sessions.get(index).is_some_and(|s| !s.closing) {
                self.arm_timer(index);
            }
            return;
        }
        if session.relay.is_tls() {
            // The decrypted bytes the routes looked at follow the header (held by the relay
            // when an earlier attempt went to a TLS server).
            replay.append(&mut session.relay.take_plain_replay());
            if let Some(sniffed) = session.sniffing.as_deref_mut() {
                replay.append(&mut sniffed.bytes);
            }
            session
                .relay
                .server_connected(self.now_tick, replay.into_boxed_slice(), &mut actions);
            self.execute(index, &mut actions);
            self.actions = actions;
            return;
        }
        // What an earlier attempt held for a TLS server (the pool speaks plain TCP since a
        // reload), then what sniffing read.
        let held = session.relay.take_plain_replay();
        replay.extend_from_slice(&held);
        let sniffed = session.sniffing.take().map(|sniffed| sniffed.bytes);
        let client_spoke =
            !held.is_empty() || sniffed.as_ref().is_some_and(|bytes| !bytes.is_empty());
        match sniffed {
            // Nothing goes before the sniffed bytes: they are the replay, uncopied.
            Some(bytes) if replay.is_empty() => replay = bytes,
            Some(bytes) => replay.extend_from_slice(&bytes),
            None => {}
        }
        session.relay.start_with_replay(
            self.now_tick,
            replay.into_boxed_slice(),
            client_spoke,
            &mut actions,
        );
        let first_byte_deadline = session.relay.limits().first_byte_ticks.is_some();
        self.execute(index, &mut actions);
        self.actions = actions;
        if first_byte_deadline && self.sessions.get(index).is_some_and(|s| !s.closing) {
            // The client's first-byte deadline starts now: the timer must not wait longer.
            self.arm_timer(index);
        }
    }

    /// The proxy's TLS handshake with the server is done: the server counts as reached.
    pub(super) fn server_tls_established(&mut self, index: usize) {
        let Some(session) = self.sessions.get_mut(index) else {
            return;
        };
        if session.closing {
            return;
        }
        if !session.relay.is_tls() {
            // No retry any more: what a PROXY header carried is no longer needed.
            session.sniffing = None;
        }
        self.server_reached(index);
    }

    /// The proxy's TLS handshake with the server failed (no operation on its socket is in
    /// flight): a failed connect, retried on another server with the client's bytes intact.
    pub(super) fn server_tls_failed(&mut self, index: usize) {
        let Some(session) = self.sessions.get_mut(index) else {
            return;
        };
        if session.closing {
            return;
        }
        let failure = session.relay.server_tls_failure().cloned();
        session.relay.drop_server_tls();
        let Some(server) = session.server_ref else {
            return;
        };
        let (kind, why) = match failure {
            Some(ServerTlsFailure::Timeout) => (
                ConnectErrorKind::Timeout,
                "TLS handshake not done within connect_timeout".to_string(),
            ),
            Some(ServerTlsFailure::Closed) => (
                ConnectErrorKind::Tls,
                "the server closed during the TLS handshake".to_string(),
            ),
            Some(ServerTlsFailure::Refused(error)) => {
                (ConnectErrorKind::Tls, format!("TLS handshake: {error}"))
            }
            None => (ConnectErrorKind::Tls, "TLS handshake failed".to_string()),
        };
        self.server_attempt_failed(index, server, kind, &why);
    }

    /// A connect (or the TLS handshake after it) to `server` failed: counted against the
    /// server, its socket closed, and another server tried while retries are left.
    fn server_attempt_failed(
        &mut self,
        index: usize,
        server: ServerRef,
        kind: ConnectErrorKind,
        error: &str,
    ) {
        let now_ms = self.now_ms;
        let tick = self.now_tick;
        self.stats.connect_failures += 1;
        if let Some(counters) = self.counters.servers.get_mut(server.counters) {
            counters.connect_error(kind);
        }
        let session = &self.sessions[index];
        let position = self.snapshot.pool_position(session.pool);
        let mut was_down = false;
        if let Some((position, at)) = self.server_position(session.pool, server) {
            let balancer = &mut self.balancers[position];
            balancer.record_failure(at, now_ms);
            was_down = balancer.is_down(at, now_ms);
        }
        self.release_server(index);
        let session = &mut self.sessions[index];
        if let Some(fd) = session.server.take() {
            let _ = self.ring.close(fd, IGNORED, true);
        }
        let attempts = u32::from(session.attempts);
        let snapshot = std::rc::Rc::clone(&self.snapshot);
        let Some(pool) = position.map(|position| &snapshot.pools[position]) else {
            self.close_session(index, CloseMode::Graceful, CloseKind::ConnectFailed);
            return;
        };
        let addr = pool.server(server.id).map(|server| server.addr);
        if was_down {
            if let Verdict::Log { suppressed } = self.logs.check(
                log_limit::key(LOG_CONNECT_FAILED, pool.id.0 as usize, server.id.0 as usize),
                tick,
            ) {
                warn!(shard = self.index, pool = %pool.name, server = ?addr, %error, suppressed, "server marked down after connect failures");
            }
        } else {
            debug!(shard = self.index, pool = %pool.name, server = ?addr, %error, kind = kind.name(), "connect failed");
        }
        if attempts <= pool.retries {
            self.stats.retries += 1;
            self.connect_next(index);
        } else {
            self.stats.no_server += 1;
            debug!(shard = self.index, pool = %pool.name, attempts, "giving up on this session");
            self.close_session(index, CloseMode::Graceful, CloseKind::ConnectFailed);
        }
    }
}
