//! The control thread's state: the running config, stable ids, operators' overrides, health
//! trackers and slow-start ramps, and the snapshot built from all of them.
//!
//! Owns the rules that turn those into each server's state and weight, and the operations the
//! admin API offers on servers. It runs on the control thread only; a shard sees none of it but
//! the snapshots it is handed.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use tracing::{error, info, warn};

use super::overrides::{AddedServer, AdminState, Overrides};
use crate::config::{
    Config, MAX_SPLIT_WEIGHT, MAX_WEIGHT, PoolConfig, SplitConfig, StartState, Target, TcpOptions,
};
use crate::health::{CheckResult, HealthTracker, Transition};
use crate::metrics::{Merged, ShardSlot};
use crate::runtime::RuntimeControl;
use crate::snapshot::{
    Destination, FULL_RAMP, Identities, ListenerId, ListenerSnapshot, PoolSnapshot, ServerId,
    ServerSnapshot, ServerState, Snapshot, SplitId, SplitSnapshot,
};

/// An admin API error: the HTTP status and what to tell the caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }
}

/// Where the config came from, so a reload reads the same files again.
#[derive(Debug, Clone, Default)]
pub struct ConfigPaths {
    /// `None`: the embedded default.
    pub config: Option<PathBuf>,
    pub profile: Option<PathBuf>,
}

/// One listener's sockets (one per shard) as bound, kept by the control thread as duplicates
/// so a reload can change their backlog and options in place instead of rebinding.
pub struct BoundSockets {
    /// The address the config asked for (port 0 stays 0 here).
    pub configured: SocketAddr,
    /// The address actually bound.
    pub addr: SocketAddr,
    pub backlog: u32,
    pub tcp: TcpOptions,
    /// `listener::steering` of the config it was bound for.
    pub steering: Option<u8>,
    pub duplicates: Vec<OwnedFd>,
}

/// A server under active health checks.
pub struct ServerHealth {
    pub tracker: HealthTracker,
    pub check: crate::config::HealthCheck,
    pub addr: SocketAddr,
    pub pool: String,
    /// The probing task; aborted when the server or its check goes away.
    pub task: Option<tokio::task::AbortHandle>,
}

/// What a reload did, for `/status`, the log and the API's answer.
#[derive(Debug, Clone)]
pub struct ReloadRecord {
    pub at: SystemTime,
    pub ok: bool,
    pub error: Option<String>,
    pub pending_restart: Vec<String>,
    pub generation: u64,
    pub duration_ms: f64,
}

#[derive(Debug, Clone, Default)]
pub struct ReloadLog {
    pub succeeded: u64,
    pub failed: u64,
    pub last: Option<ReloadRecord>,
    pub last_success: Option<SystemTime>,
}

pub struct Control {
    pub config: Arc<Config>,
    pub paths: ConfigPaths,
    pub ids: Identities,
    pub overrides: Overrides,
    pub health: HashMap<ServerId, ServerHealth>,
    /// Servers ramping up (slow start): when the ramp began.
    pub ramps: HashMap<ServerId, Instant>,
    pub snapshot: Arc<Snapshot>,
    pub runtime: RuntimeControl,
    pub slots: Vec<Arc<ShardSlot>>,
    pub shards: usize,
    pub listeners: HashMap<ListenerId, BoundSockets>,
    pub reloads: ReloadLog,
    /// Keys changed in the file that only a restart applies.
    pub pending_restart: Vec<String>,
    pub started: SystemTime,
    pub draining: bool,
    /// Servers being removed: the generation that first showed them `removing`.
    pub removing: HashMap<ServerId, u64>,
    /// Operators' state changes per server (health changes are counted by the trackers).
    pub admin_changes: HashMap<ServerId, u64>,
    /// Weight changes per split (admin API or reload).
    pub split_changes: HashMap<SplitId, u64>,
    /// Counts of log lines the non-blocking writer dropped.
    pub dropped_logs: Arc<dyn Fn() -> u64 + Send + Sync>,
    pub notifier: super::Notifier,
    /// Session ticket keys every shard seals with (None: the system gave no randomness: no
    /// tickets).
    pub ticket_keys: Option<crate::tls::TicketKeys>,
    /// When the ticket keys were last made.
    pub tickets_made: std::time::Instant,
}

/// A server as the control thread resolves it: where it comes from and how it stands.
struct Resolved {
    addr: SocketAddr,
    name: String,
    weight: u32,
    backup: bool,
    max_connections: Option<NonZeroU32>,
    admin: Option<AdminState>,
}

impl Control {
    /// The servers of `pool`: the file's, then those added through the API, with overrides.
    fn resolve_servers(&self, pool: &PoolConfig) -> Vec<Resolved> {
        let mut servers: Vec<Resolved> = pool
            .servers
            .iter()
            .map(|server| Resolved {
                addr: server.addr,
                name: server.name.clone(),
                weight: server.weight.get(),
                backup: server.backup,
                max_connections: server.max_connections,
                admin: None,
            })
            .collect();
        for added in self.overrides.added(&pool.name) {
            if servers.iter().any(|server| server.addr == added.addr) {
                continue;
            }
            servers.push(Resolved {
                addr: added.addr,
                name: added.name(),
                weight: added.weight.clamp(1, MAX_WEIGHT),
                backup: added.backup,
                max_connections: added.max_connections.and_then(NonZeroU32::new),
                admin: None,
            });
        }
        for server in &mut servers {
            if let Some(overrides) = self.overrides.server(&pool.name, server.addr) {
                server.admin = overrides.admin;
                if let Some(weight) = overrides.weight {
                    server.weight = weight.clamp(1, MAX_WEIGHT);
                }
            }
        }
        servers.retain(|server| server.admin != Some(AdminState::Removed));
        servers
    }

    fn state_of(&self, pool: &PoolConfig, id: ServerId, admin: Option<AdminState>) -> ServerState {
        match admin {
            Some(AdminState::Drain) => return ServerState::Draining,
            Some(AdminState::Maint) => return ServerState::Maint,
            Some(AdminState::Remove) | Some(AdminState::Removed) => return ServerState::Removing,
            None => {}
        }
        let Some(check) = &pool.health else {
            return ServerState::Up;
        };
        let up = match self.health.get(&id) {
            Some(health) => health.tracker.is_up(),
            None => check.start == StartState::Up,
        };
        if up {
            ServerState::Up
        } else {
            ServerState::Down
        }
    }

    fn ramp_of(&self, pool: &PoolConfig, id: ServerId, now: Instant) -> u32 {
        let (Some(slow_start), Some(began)) = (pool.slow_start, self.ramps.get(&id)) else {
            return FULL_RAMP;
        };
        let elapsed = now.saturating_duration_since(*began);
        if elapsed >= slow_start {
            return FULL_RAMP;
        }
        let share = elapsed.as_secs_f64() / slow_start.as_secs_f64();
        ((share * f64::from(FULL_RAMP)) as u32).clamp(1, FULL_RAMP)
    }

    /// Builds the next generation from the config, overrides and health. Pools that did not
    /// change keep their `Arc`, so shards skip them.
    pub fn build_snapshot(&mut self, now: Instant) -> Arc<Snapshot> {
        let generation = self.snapshot.generation + 1;
        let config = Arc::clone(&self.config);
        let mut pools = Vec::with_capacity(config.pools.len());
        for pool in &config.pools {
            let pool_id = self.ids.pool(&pool.name);
            let resolved = self.resolve_servers(pool);
            let mut servers = Vec::with_capacity(resolved.len());
            for server in resolved {
                let id = self.ids.server(pool_id, server.addr);
                servers.push(ServerSnapshot {
                    id,
                    name: server.name,
                    addr: server.addr,
                    weight: server.weight,
                    ramp: self.ramp_of(pool, id, now),
                    backup: server.backup,
                    max_connections: server.max_connections,
                    state: self.state_of(pool, id, server.admin),
                });
            }
            let built = PoolSnapshot::new(pool_id, pool, servers);
            let previous = self.snapshot.pool(pool_id).filter(|old| ***old == built);
            pools.push(match previous {
                Some(old) => Arc::clone(old),
                None => Arc::new(built),
            });
        }
        let listeners = config
            .listeners
            .iter()
            .map(|listener| ListenerSnapshot {
                id: self.ids.listener(&listener.name),
                name: listener.name.clone(),
                bind: listener.bind,
                target: self.destination(&config, listener.target),
                max_connections: listener.max_connections,
                backlog: listener.backlog,
                idle_timeout: listener.idle_timeout,
                write_timeout: listener.write_timeout,
                tcp: listener.tcp,
                log: listener.log,
                admission: Arc::clone(&listener.admission),
                tls: listener.tls.as_ref().map(|settings| {
                    Arc::new(crate::snapshot::ListenerTls {
                        settings: Arc::clone(settings),
                        tickets: self.ticket_keys.clone(),
                    })
                }),
                routing: listener.routing.as_ref().map(|routing| {
                    let routes: Vec<crate::route::Route<Destination>> = routing
                        .routes
                        .iter()
                        .map(|route| crate::route::Route {
                            conditions: route.conditions.clone(),
                            target: self.destination(&config, route.target),
                            tls: route.tls.clone(),
                        })
                        .collect();
                    let terminates = routes
                        .iter()
                        .any(|route| matches!(route.tls, crate::route::RouteTls::Terminate(_)));
                    let after_handshake: Vec<_> = routes
                        .iter()
                        .filter(|route| !route.tls.before_handshake())
                        .cloned()
                        .collect();
                    let decrypted = if listener.tls.is_some() {
                        crate::route::sniffers_needed(&after_handshake)
                            .into_iter()
                            .filter(|protocol| *protocol != crate::sniff::Protocol::Tls)
                            .collect()
                    } else {
                        Vec::new()
                    };
                    Arc::new(crate::snapshot::Routing {
                        tickets: terminates.then(|| self.ticket_keys.clone()).flatten(),
                        wanted: crate::route::sniffers_needed(&routes),
                        decrypted,
                        server_first: routes.iter().any(|route| {
                            matches!(
                                route.conditions.protocol,
                                Some(crate::route::RouteProtocol::ServerFirst(_))
                            )
                        }),
                        routes,
                        unmatched: routing.unmatched,
                        sniff_max_bytes: routing.sniff_max_bytes,
                        sniff_timeout: routing.sniff_timeout,
                        server_first_after: routing.server_first_after,
                    })
                }),
                proxy: listener.proxy.clone(),
            })
            .collect();
        let splits = config
            .splits
            .iter()
            .map(|split| {
                let built = self.build_split(&config, split);
                let previous = self.snapshot.split(built.id).cloned();
                match previous {
                    Some(old) if *old == built => old,
                    Some(old) => {
                        if old.backends != built.backends {
                            self.split_weights_changed(&config, &old, &built);
                        }
                        Arc::new(built)
                    }
                    None => Arc::new(built),
                }
            })
            .collect();
        let snapshot = Arc::new(Snapshot::new(generation, config, listeners, pools, splits));
        self.ids.retain_used(&snapshot);
        snapshot
    }

    /// Logs and counts a change of a split's weights (by the admin API or a reload).
    fn split_weights_changed(&mut self, config: &Config, old: &SplitSnapshot, new: &SplitSnapshot) {
        let describe = |split: &SplitSnapshot| -> String {
            let sides: Vec<String> = split
                .backends
                .iter()
                .map(|(pool, weight)| {
                    let name = config
                        .pools
                        .iter()
                        .find(|candidate| self.ids.known_pool(&candidate.name) == Some(*pool))
                        .map_or("?", |candidate| candidate.name.as_str());
                    format!("{name}={weight}")
                })
                .collect();
            sides.join(",")
        };
        info!(split = %new.name, before = %describe(old), after = %describe(new), "split weights changed");
        *self.split_changes.entry(new.id).or_default() += 1;
    }

    fn destination(&mut self, config: &Config, target: Target) -> Destination {
        match target {
            Target::Pool(pool) => Destination::Pool(self.ids.pool(&config.pool(pool).name)),
            Target::Split(split) => Destination::Split(self.ids.split(&config.split(split).name)),
        }
    }

    /// A split with the operator's weights over the file's.
    fn build_split(&mut self, config: &Config, split: &SplitConfig) -> SplitSnapshot {
        let weights = self.overrides.splits.get(&split.name);
        let backends = split
            .backends
            .iter()
            .map(|(pool, weight)| {
                let name = &config.pool(*pool).name;
                let weight = weights
                    .and_then(|split| split.weights.get(name))
                    .copied()
                    .unwrap_or(*weight);
                (self.ids.pool(name), weight)
            })
            .collect();
        SplitSnapshot {
            id: self.ids.split(&split.name),
            name: split.name.clone(),
            sticky: split.sticky,
            backends,
        }
    }

    /// `PUT /splits/{name}`: new weights for some of a split's pools (the others keep theirs).
    /// All zero, an unknown pool or a weight out of range is refused and changes nothing.
    pub fn set_split_weights(
        &mut self,
        name: &str,
        weights: &BTreeMap<String, u32>,
    ) -> Result<(), ApiError> {
        let config = Arc::clone(&self.config);
        let Some(split) = config.splits.iter().find(|split| split.name == name) else {
            return Err(ApiError::new(404, format!("no split named {name:?}")));
        };
        if weights.is_empty() {
            return Err(ApiError::new(
                400,
                "expected {\"weights\": {\"pool\": N, ...}} naming at least one pool",
            ));
        }
        let pools: Vec<&str> = split
            .backends
            .iter()
            .map(|(pool, _)| config.pool(*pool).name.as_str())
            .collect();
        for (pool, weight) in weights {
            if !pools.contains(&pool.as_str()) {
                return Err(ApiError::new(
                    400,
                    format!(
                        "split {name:?} has no pool {pool:?} (its pools: {})",
                        pools.join(", ")
                    ),
                ));
            }
            if *weight > MAX_SPLIT_WEIGHT {
                return Err(ApiError::new(
                    400,
                    format!("weight must be from 0 to {MAX_SPLIT_WEIGHT}, not {weight}"),
                ));
            }
        }
        let current = self.build_split(&config, split);
        let mut merged: BTreeMap<String, u32> = split
            .backends
            .iter()
            .zip(&current.backends)
            .map(|((pool, _), (_, weight))| (config.pool(*pool).name.clone(), *weight))
            .collect();
        merged.extend(weights.iter().map(|(pool, weight)| (pool.clone(), *weight)));
        if merged.values().all(|weight| *weight == 0) {
            return Err(ApiError::new(
                400,
                format!("every weight of split {name:?} would be 0: no client could go anywhere"),
            ));
        }
        let file = super::overrides::file_weights(&config, split);
        let entry = self.overrides.splits.entry(name.to_string()).or_default();
        entry.file = file;
        entry.weights = merged;
        info!(split = name, "split weights set by an operator");
        self.after_override();
        Ok(())
    }

    /// Builds and hands a new snapshot to every shard.
    pub fn publish(&mut self) {
        let snapshot = self.build_snapshot(Instant::now());
        for pool in &snapshot.pools {
            for server in &pool.servers {
                if server.state == ServerState::Removing {
                    self.removing
                        .entry(server.id)
                        .or_insert(snapshot.generation);
                }
            }
        }
        self.removing.retain(|id, _| {
            snapshot.pools.iter().any(|pool| {
                pool.server(*id)
                    .is_some_and(|s| s.state == ServerState::Removing)
            })
        });
        self.runtime.publish(&snapshot);
        self.snapshot = snapshot;
    }

    pub fn merged(&self) -> Merged {
        Merged::from_slots(&self.slots)
    }

    /// Servers being removed whose last session ended (on every shard that runs a generation
    /// in which they were already `removing`) leave their pool.
    pub fn collect_removed(&mut self) -> bool {
        if self.removing.is_empty() {
            return false;
        }
        let merged = self.merged();
        let every_shard_reported = merged.shards.len() == self.shards;
        let mut finished = Vec::new();
        for (&id, &since) in &self.removing {
            let caught_up =
                every_shard_reported && merged.shards.iter().all(|shard| shard.generation >= since);
            let active = merged.servers.get(&id).map_or(0, |server| server.active);
            if caught_up && active == 0 {
                finished.push(id);
            }
        }
        if finished.is_empty() {
            return false;
        }
        for id in &finished {
            let Some((pool, server)) = self.snapshot.pools.iter().find_map(|pool| {
                pool.server(*id)
                    .map(|server| (pool.name.clone(), server.addr))
            }) else {
                continue;
            };
            let added = self
                .overrides
                .added(&pool)
                .iter()
                .any(|added| added.addr == server);
            if added {
                self.overrides.forget_added(&pool, server);
            } else {
                self.overrides.server_mut(&pool, server).admin = Some(AdminState::Removed);
            }
            info!(pool = %pool, server = %server, "server removed: its last session ended");
        }
        self.save_state();
        self.publish();
        true
    }

    /// Slow start: whether a ramp is in progress or just ended (the caller republishes then,
    /// so the final full weight reaches the shards), after dropping finished ramps.
    pub fn ramping(&mut self, now: Instant) -> bool {
        let before = self.ramps.len();
        let config = Arc::clone(&self.config);
        let snapshot = Arc::clone(&self.snapshot);
        self.ramps.retain(|id, began| {
            let slow_start = snapshot.pools.iter().find_map(|pool| {
                pool.server(*id)?;
                config
                    .pools
                    .iter()
                    .find(|p| p.name == pool.name)?
                    .slow_start
            });
            slow_start.is_some_and(|slow_start| now.saturating_duration_since(*began) < slow_start)
        });
        !self.ramps.is_empty() || self.ramps.len() != before
    }

    /// Starts a server's slow-start ramp if its pool has one.
    fn start_ramp(&mut self, pool: &str, id: ServerId) {
        let has_slow_start = self
            .config
            .pools
            .iter()
            .any(|p| p.name == pool && p.slow_start.is_some());
        if has_slow_start {
            self.ramps.insert(id, Instant::now());
        }
    }

    /// A health check's result; returns whether the server's state changed (the caller then
    /// republishes).
    pub fn record_health(&mut self, id: ServerId, result: CheckResult) -> bool {
        let Some(health) = self.health.get_mut(&id) else {
            return false;
        };
        let reason = result.reason.clone();
        let returning = health.tracker.was_up_before;
        let transition = health.tracker.record(result, Instant::now());
        let Some(transition) = transition else {
            return false;
        };
        let pool = health.pool.clone();
        let addr = health.addr;
        match transition {
            Transition::WentUp => {
                warn!(pool = %pool, server = %addr, %reason, "server is up (health checks)");
                if returning {
                    self.start_ramp(&pool, id);
                }
            }
            Transition::WentDown => {
                self.ramps.remove(&id);
                warn!(pool = %pool, server = %addr, %reason, "server is down (health checks)");
            }
        }
        true
    }

    /// Finds a server of a pool by its name or its (percent-decoded) address.
    pub fn find_server(
        &self,
        pool: &str,
        key: &str,
    ) -> Result<(Arc<PoolSnapshot>, ServerSnapshot), ApiError> {
        let Some(pool) = self.snapshot.pools.iter().find(|p| p.name == pool) else {
            return Err(ApiError::new(404, format!("no pool named {pool:?}")));
        };
        let by_addr: Option<SocketAddr> = key.parse().ok();
        let server = pool
            .servers
            .iter()
            .find(|server| server.name == key || Some(server.addr) == by_addr)
            .cloned()
            .ok_or_else(|| {
                ApiError::new(
                    404,
                    format!("pool {:?} has no server named or at {key:?}", pool.name),
                )
            })?;
        Ok((Arc::clone(pool), server))
    }

    /// Sets (or clears) an operator's state on a server.
    pub fn set_admin(
        &mut self,
        pool: &str,
        key: &str,
        admin: Option<AdminState>,
    ) -> Result<ServerId, ApiError> {
        let (pool, server) = self.find_server(pool, key)?;
        if server.state == ServerState::Removing && admin != Some(AdminState::Remove) {
            return Err(ApiError::new(
                409,
                format!("server {} is being removed", server.name),
            ));
        }
        let entry = self.overrides.server_mut(&pool.name, server.addr);
        let before = entry.admin;
        entry.admin = admin;
        if before != admin {
            *self.admin_changes.entry(server.id).or_default() += 1;
            let state = admin.map_or("enabled", |state| match state {
                AdminState::Drain => "draining",
                AdminState::Maint => "maint",
                AdminState::Remove | AdminState::Removed => "removing",
            });
            warn!(pool = %pool.name, server = %server.addr, state, "server state set by an operator");
            if admin.is_none() && matches!(before, Some(AdminState::Drain | AdminState::Maint)) {
                self.start_ramp(&pool.name, server.id);
            }
        }
        self.after_override();
        Ok(server.id)
    }

    pub fn set_weight(&mut self, pool: &str, key: &str, weight: u32) -> Result<ServerId, ApiError> {
        if !(1..=MAX_WEIGHT).contains(&weight) {
            return Err(ApiError::new(
                400,
                format!("weight must be from 1 to {MAX_WEIGHT}, not {weight}"),
            ));
        }
        let (pool, server) = self.find_server(pool, key)?;
        self.overrides.server_mut(&pool.name, server.addr).weight = Some(weight);
        info!(pool = %pool.name, server = %server.addr, weight, "server weight set by an operator");
        self.after_override();
        Ok(server.id)
    }

    pub fn add_server(&mut self, pool: &str, server: AddedServer) -> Result<ServerId, ApiError> {
        let Some(pool_config) = self.config.pools.iter().find(|p| p.name == pool) else {
            return Err(ApiError::new(404, format!("no pool named {pool:?}")));
        };
        if server.addr.port() == 0 {
            return Err(ApiError::new(400, "the server address has port 0"));
        }
        if !(1..=MAX_WEIGHT).contains(&server.weight) {
            return Err(ApiError::new(
                400,
                format!(
                    "weight must be from 1 to {MAX_WEIGHT}, not {}",
                    server.weight
                ),
            ));
        }
        if let Some(name) = server
            .name
            .as_ref()
            .filter(|name| !crate::config::valid_name(name))
        {
            return Err(ApiError::new(
                400,
                format!("server name {name:?} must be 1 to 64 characters of A-Z a-z 0-9 _ - ."),
            ));
        }
        let pool_snapshot = self.snapshot.pools.iter().find(|p| p.name == pool);
        let taken = pool_snapshot.is_some_and(|p| {
            p.servers
                .iter()
                .any(|s| s.addr == server.addr || Some(&s.name) == server.name.as_ref())
        }) || pool_config.servers.iter().any(|s| s.addr == server.addr);
        if taken {
            return Err(ApiError::new(
                409,
                format!(
                    "pool {pool:?} already has a server at {} or named so",
                    server.addr
                ),
            ));
        }
        if pool_config.servers.len() + self.overrides.added(pool).len()
            >= crate::config::MAX_SERVERS_PER_POOL
        {
            return Err(ApiError::new(409, format!("pool {pool:?} is full")));
        }
        let addr = server.addr;
        info!(pool = %pool, server = %addr, "server added by an operator");
        self.overrides.add_server(pool, server);
        self.after_override();
        let id = self
            .snapshot
            .pools
            .iter()
            .find(|p| p.name == pool)
            .and_then(|p| p.servers.iter().find(|s| s.addr == addr))
            .map(|s| s.id)
            .ok_or_else(|| ApiError::new(500, "the added server is missing from the snapshot"))?;
        Ok(id)
    }

    /// Overrides changed: save them and hand the shards a new snapshot.
    fn after_override(&mut self) {
        self.save_state();
        self.publish();
    }

    pub fn save_state(&self) {
        let Some(path) = self
            .config
            .admin
            .as_ref()
            .and_then(|admin| admin.state_file.as_ref())
        else {
            return;
        };
        if let Err(error) = self.overrides.save(path) {
            error!(path = %path.display(), %error, "cannot write the state file; overrides live on in memory");
        }
    }
}
