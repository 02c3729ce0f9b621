//! What the shards run on: an immutable snapshot of listeners, pools and servers, with stable
//! identities.
//!
//! Owns the snapshot types and the registry of stable ids. The control thread builds a new
//! snapshot whenever the config, a server's state or an operator's override changes, and hands
//! it to every shard; a shard adopts it between connections. Nothing here refers to a position
//! in a config file: a listener is known by its name, a pool by its name, a server by its pool
//! and address, and each gets an id that stays the same across reloads for as long as the
//! thing exists. Pure data, no I/O.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use crate::balance::Algorithm;
use crate::config::{Config, PoolConfig, TcpOptions};

/// A listener's identity (by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ListenerId(pub u32);

/// A pool's identity (by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PoolId(pub u32);

/// A split's identity (by name).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SplitId(pub u32);

/// Where a listener's or a route's clients go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Destination {
    Pool(PoolId),
    Split(SplitId),
}

/// A split as the shards run it: its pools and their weights now (the file's, or an
/// operator's through the admin API).
#[derive(Debug, Clone, PartialEq)]
pub struct SplitSnapshot {
    pub id: SplitId,
    pub name: String,
    pub sticky: crate::config::Sticky,
    /// In the file's order; at least one weight is above zero.
    pub backends: Vec<(PoolId, u32)>,
}

/// A server's identity (by pool and address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServerId(pub u32);

/// Where a server stands for new sessions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ServerState {
    /// Takes sessions.
    Up,
    /// Failed its health checks: used only when no server of its pool is up (as NGINX does).
    Down,
    /// An operator asked it to drain: no new sessions, live ones finish.
    Draining,
    /// An operator put it in maintenance: no new sessions.
    Maint,
    /// Deleted through the admin API: no new sessions; gone once its last session ends.
    Removing,
}

impl ServerState {
    pub const ALL: [ServerState; 5] = [
        ServerState::Up,
        ServerState::Down,
        ServerState::Draining,
        ServerState::Maint,
        ServerState::Removing,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ServerState::Up => "up",
            ServerState::Down => "down",
            ServerState::Draining => "draining",
            ServerState::Maint => "maint",
            ServerState::Removing => "removing",
        }
    }

    /// Whether a new session may be sent to a server in this state at all.
    pub fn takes_new_sessions(self) -> bool {
        matches!(self, ServerState::Up | ServerState::Down)
    }
}

/// Full weight of a server that is not ramping up (slow start), in thousandths.
pub const FULL_RAMP: u32 = 1000;

#[derive(Debug, Clone, PartialEq)]
pub struct ServerSnapshot {
    pub id: ServerId,
    pub name: String,
    pub addr: SocketAddr,
    /// The configured weight, or the operator's override.
    pub weight: u32,
    /// Slow start: the share of `weight` in effect now, in thousandths (1..=1000).
    pub ramp: u32,
    pub backup: bool,
    /// Per shard.
    pub max_connections: Option<NonZeroU32>,
    pub state: ServerState,
}

impl ServerSnapshot {
    /// The weight in effect (slow start applied).
    pub fn effective_weight(&self) -> f64 {
        f64::from(self.weight) * f64::from(self.ramp) / f64::from(FULL_RAMP)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolSnapshot {
    pub id: PoolId,
    pub name: String,
    pub balance: Algorithm,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub tcp: TcpOptions,
    pub source_addresses: Vec<IpAddr>,
    pub send_proxy: Option<crate::sniff::proxy::ProxyVersion>,
    /// TLS toward the servers.
    pub tls: Option<Arc<crate::tls::OriginSettings>>,
    pub servers: Vec<ServerSnapshot>,
}

impl PoolSnapshot {
    /// A pool's settings from the config, with its servers as the control thread resolved them.
    pub fn new(id: PoolId, pool: &PoolConfig, servers: Vec<ServerSnapshot>) -> PoolSnapshot {
        PoolSnapshot {
            id,
            name: pool.name.clone(),
            balance: pool.balance,
            connect_timeout: pool.connect_timeout,
            retries: pool.retries,
            max_fails: pool.max_fails,
            fail_timeout: pool.fail_timeout,
            tcp: pool.tcp,
            source_addresses: pool.source_addresses.clone(),
            send_proxy: pool.send_proxy,
            tls: pool.tls.clone(),
            servers,
        }
    }

    pub fn server(&self, id: ServerId) -> Option<&ServerSnapshot> {
        self.servers.iter().find(|server| server.id == id)
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerSnapshot {
    pub id: ListenerId,
    pub name: String,
    pub bind: SocketAddr,
    /// Where its clients go (the default of its routes).
    pub target: Destination,
    pub max_connections: NonZeroU32,
    pub backlog: u32,
    pub idle_timeout: Duration,
    pub write_timeout: Duration,
    pub tcp: TcpOptions,
    pub log: bool,
    pub admission: Arc<crate::admission::AdmissionSettings>,
    /// Routes by what the client speaks; None: every client goes to `pool` at once.
    pub routing: Option<Arc<Routing>>,
    /// PROXY protocol headers taken from trusted peers (None: `proxy_protocol = "off"`).
    pub proxy: Option<Arc<crate::config::ProxyAccept>>,
    /// TLS termination (None: plain TCP).
    pub tls: Option<Arc<ListenerTls>>,
}

/// What a shard builds its TLS config for a listener from.
#[derive(Debug, PartialEq, Eq)]
pub struct ListenerTls {
    pub settings: Arc<crate::tls::TlsSettings>,
    /// Session ticket keys (the same on every shard, so tickets resume anywhere; None: no
    /// tickets).
    pub tickets: Option<crate::tls::TicketKeys>,
}

/// A listener's routes with pools by id, and what deciding needs.
#[derive(Debug, Clone, PartialEq)]
pub struct Routing {
    pub routes: Vec<crate::route::Route<Destination>>,
    /// The sniffers the routes need (empty: no route looks at the client's bytes).
    pub wanted: Vec<crate::sniff::Protocol>,
    /// On a TLS listener: the sniffers its routes decided after the handshake need on the
    /// decrypted bytes (empty: those routes decide on the handshake alone).
    pub decrypted: Vec<crate::sniff::Protocol>,
    /// A route chooses a server-speaks-first protocol by the client's silence.
    pub server_first: bool,
    /// Session ticket keys for routes that terminate TLS (None: none does, or no tickets).
    pub tickets: Option<crate::tls::TicketKeys>,
    pub unmatched: crate::config::Unmatched,
    pub sniff_max_bytes: u32,
    pub sniff_timeout: Duration,
    pub server_first_after: Duration,
}

impl Routing {
    /// Whether a client must be read (or waited for) before a route can be chosen.
    pub fn reads_first(&self) -> bool {
        !self.wanted.is_empty() || self.server_first
    }

    /// Some route is decided on the ClientHello (`tls = ...`): a TLS listener reads it before
    /// its handshake.
    pub fn decides_before_handshake(&self) -> bool {
        self.routes.iter().any(|route| route.tls.before_handshake())
    }
}

/// One generation of the running config, as every shard sees it.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Increases with every snapshot the control thread publishes.
    pub generation: u64,
    /// The file config this generation was built from (for `/config` and drain timing).
    pub config: Arc<Config>,
    pub listeners: Vec<ListenerSnapshot>,
    /// Pools that did not change since the previous generation are the same `Arc`, so a shard
    /// keeps their balancing state without looking inside.
    pub pools: Vec<Arc<PoolSnapshot>>,
    /// Splits that did not change since the previous generation are the same `Arc`.
    pub splits: Vec<Arc<SplitSnapshot>>,
    positions: HashMap<PoolId, usize>,
}

impl Snapshot {
    pub fn new(
        generation: u64,
        config: Arc<Config>,
        listeners: Vec<ListenerSnapshot>,
        pools: Vec<Arc<PoolSnapshot>>,
        splits: Vec<Arc<SplitSnapshot>>,
    ) -> Snapshot {
        let positions = pools
            .iter()
            .enumerate()
            .map(|(position, pool)| (pool.id, position))
            .collect();
        Snapshot {
            generation,
            config,
            listeners,
            pools,
            splits,
            positions,
        }
    }

    pub fn split(&self, id: SplitId) -> Option<&Arc<SplitSnapshot>> {
        self.splits.iter().find(|split| split.id == id)
    }

    pub fn pool(&self, id: PoolId) -> Option<&Arc<PoolSnapshot>> {
        self.positions
            .get(&id)
            .map(|&position| &self.pools[position])
    }

    /// Position of a pool in `pools`.
    pub fn pool_position(&self, id: PoolId) -> Option<usize> {
        self.positions.get(&id).copied()
    }

    pub fn listener(&self, id: ListenerId) -> Option<&ListenerSnapshot> {
        self.listeners.iter().find(|listener| listener.id == id)
    }
}

/// Hands out stable ids: the same name (or pool and address) gets the same id for as long as
/// it is in use; ids are never reused for something else.
#[derive(Debug, Default)]
pub struct Identities {
    next: u32,
    listeners: HashMap<String, ListenerId>,
    pools: HashMap<String, PoolId>,
    splits: HashMap<String, SplitId>,
    servers: HashMap<(PoolId, SocketAddr), ServerId>,
}

impl Identities {
    fn fresh(&mut self) -> u32 {
        self.next = self.next.wrapping_add(1);
        self.next
    }

    pub fn listener(&mut self, name: &str) -> ListenerId {
        if let Some(&id) = self.listeners.get(name) {
            return id;
        }
        let id = ListenerId(self.fresh());
        self.listeners.insert(name.to_string(), id);
        id
    }

    pub fn pool(&mut self, name: &str) -> PoolId {
        if let Some(&id) = self.pools.get(name) {
            return id;
        }
        let id = PoolId(self.fresh());
        self.pools.insert(name.to_string(), id);
        id
    }

    /// The id a pool name has now, without handing out a new one.
    pub fn known_pool(&self, name: &str) -> Option<PoolId> {
        self.pools.get(name).copied()
    }

    pub fn split(&mut self, name: &str) -> SplitId {
        if let Some(&id) = self.splits.get(name) {
            return id;
        }
        let id = SplitId(self.fresh());
        self.splits.insert(name.to_string(), id);
        id
    }

    pub fn server(&mut self, pool: PoolId, addr: SocketAddr) -> ServerId {
        if let Some(&id) = self.servers.get(&(pool, addr)) {
            return id;
        }
        let id = ServerId(self.fresh());
        self.servers.insert((pool, addr), id);
        id
    }

    /// Forgets everything `snapshot` does not name, so the registry does not grow with every
    /// server ever added; a name that comes back later gets a new id.
    pub fn retain_used(&mut self, snapshot: &Snapshot) {
        self.listeners
            .retain(|_, id| snapshot.listeners.iter().any(|l| l.id == *id));
        self.pools.retain(|_, id| snapshot.pool(*id).is_some());
        self.splits.retain(|_, id| snapshot.split(*id).is_some());
        self.servers.retain(|(pool, _), id| {
            snapshot
                .pool(*pool)
                .is_some_and(|pool| pool.server(*id).is_some())
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_stable_and_never_reused() {
        let mut ids = Identities::default();
        let web = ids.pool("web");
        let db = ids.pool("db");
        assert_ne!(web, db);
        assert_eq!(ids.pool("web"), web);
        let addr: SocketAddr = "127.0.0.1:9001".parse().expect("addr");
        let a = ids.server(web, addr);
        assert_eq!(ids.server(web, addr), a);
        let b = ids.server(db, addr);
        assert_ne!(a, b, "the same address in two pools is two servers");
        let front = ids.listener("front");
        assert_eq!(ids.listener("front"), front);
        assert_ne!(front.0, web.0);

        let config = Arc::new(Config::default_config().expect("default config"));
        let snapshot = Snapshot::new(1, config, Vec::new(), Vec::new(), Vec::new());
        ids.retain_used(&snapshot);
        let web_again = ids.pool("web");
        assert_ne!(web_again, web, "a forgotten name gets a fresh id");
    }
}
