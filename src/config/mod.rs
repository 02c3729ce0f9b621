//! Configuration: TOML file -> raw `File*` structs -> resolved, validated, immutable `Config`.
//!
//! Owns parsing, defaults, validation and the printed form of the resolved config. It does no
//! I/O besides reading the files it is pointed at, and it never panics on input: every mistake
//! becomes a `ConfigError` carrying `file:line:col`.
//!
//! Invariants of a resolved `Config`: names are unique per kind, every listener's pool exists,
//! every pool has at least one non-backup server, weights and limits are non-zero.

mod admission;
mod connection;
mod duration;
mod file;
mod health;
mod print;
mod routing;
mod split;
mod tls;

pub use routing::{
    DEFAULT_SERVER_FIRST_AFTER, DEFAULT_SNIFF_MAX_BYTES, DEFAULT_SNIFF_TIMEOUT, ProxyAccept,
    RoutingConfig, Unmatched,
};
pub use split::{MAX_SPLIT_WEIGHT, SplitConfig, SplitIndex, Sticky, Target};

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::ops::{Range, RangeInclusive};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use admission::DEFAULT_IPV6_PREFIX;
pub use connection::{Keepalive, MAX_SOURCE_ADDRESSES, TcpOptions, format_source_addresses};
pub use duration::{format_duration, parse_duration};
use file::{FileConfig, FilePin, FileProfile, FileShards, FileTuning};
pub use health::{HealthCheck, HealthKind, StartState, escape as escape_bytes, unescape};
pub use tls::DEFAULT_HANDSHAKE_TIMEOUT;
use toml::Spanned;

use crate::balance::Algorithm;

/// The embedded default config, used by `ringproxy run` without `--config`.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");
/// The name under which errors in the embedded default are reported.
pub const DEFAULT_CONFIG_NAME: &str = "<default config>";

/// Position of a pool in `Config::pools` (one config's, not stable across reloads: the
/// running proxy refers to pools by the stable ids of `crate::snapshot`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PoolIndex(pub u16);

/// How many shards to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shards {
    /// One per core this process may run on.
    Auto,
    Count(NonZeroU32),
}

/// Which core each shard's thread is pinned to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pinning {
    /// Shard i on core i mod cores.
    Auto,
    /// No pinning: the kernel schedules the shards.
    None,
    /// Shard i on `cores[i mod len]`.
    Cores(Vec<usize>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeSettings {
    pub shards: Shards,
    pub drain_timeout: Duration,
    pub pin: Pinning,
    /// Sessions the whole process holds at most (split evenly across shards); None: no cap
    /// but the descriptor limit.
    pub max_connections: Option<NonZeroU32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminSettings {
    pub bind: SocketAddr,
    /// File holding the bearer token that mutating calls need (mode 0600 or stricter).
    pub token_file: Option<PathBuf>,
    /// Read-only endpoints need the token too (all but `/healthz` and `/ready`).
    pub auth_reads: bool,
    /// Runtime overrides (drain, maint, weights, added and deleted servers) are kept here
    /// across restarts.
    pub state_file: Option<PathBuf>,
    /// Admin connections open at once; more are closed at accept.
    pub max_connections: u32,
}

pub const DEFAULT_ADMIN_MAX_CONNECTIONS: u32 = 64;

/// Knobs of the per-shard io_uring loop; overlaid by a tuning profile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tuning {
    /// Submission queue entries per shard ring (power of two).
    pub ring_entries: u32,
    /// Bytes per provided receive buffer.
    pub buffer_size: u32,
    /// Provided receive buffers per shard (power of two, at most 32768).
    pub buffer_count: u32,
    /// Buffers a direction may hold unsent before the proxy stops reading its source.
    pub queued_buffers: u32,
    /// Which receives the relay arms.
    pub receives: ReceiveMode,
}

/// `auto`: capped multishot receives where the kernel has them (6.17+), else single-shot;
/// `single_shot`: one single-shot receive per buffer everywhere (what older kernels get; for
/// comparison and troubleshooting).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiveMode {
    Auto,
    SingleShot,
}

impl ReceiveMode {
    pub fn name(self) -> &'static str {
        match self {
            ReceiveMode::Auto => "auto",
            ReceiveMode::SingleShot => "single_shot",
        }
    }
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            ring_entries: 4096,
            buffer_size: 16 * 1024,
            buffer_count: 1024,
            queued_buffers: 8,
            receives: ReceiveMode::Auto,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    pub name: String,
    pub bind: SocketAddr,
    /// The pool or split its clients go to (the default of its routes).
    pub target: Target,
    pub max_connections: NonZeroU32,
    pub backlog: u32,
    pub idle_timeout: Duration,
    /// A direction whose destination (client or server) accepts no byte for this long ends
    /// the session.
    pub write_timeout: Duration,
    /// Options of accepted client connections.
    pub tcp: TcpOptions,
    /// One connection-log line per session.
    pub log: bool,
    /// ACL, connection rates, per-source limits, bandwidth caps, first-byte timeout.
    pub admission: std::sync::Arc<crate::admission::AdmissionSettings>,
    /// Routes by what the client speaks (None: every client goes to `pool`).
    pub routing: Option<std::sync::Arc<RoutingConfig>>,
    /// PROXY protocol headers accepted from trusted peers (None: `proxy_protocol = "off"`).
    pub proxy: Option<std::sync::Arc<ProxyAccept>>,
    /// TLS termination (None: clients speak to the pool directly).
    pub tls: Option<std::sync::Arc<crate::tls::TlsSettings>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    pub name: String,
    pub balance: Algorithm,
    pub connect_timeout: Duration,
    pub retries: u32,
    pub max_fails: u32,
    pub fail_timeout: Duration,
    /// Options of connections to the servers.
    pub tcp: TcpOptions,
    /// Addresses outgoing connections bind to, in turn (empty: the kernel chooses).
    pub source_addresses: Vec<IpAddr>,
    /// A server coming back up ramps its weight from zero to full over this long.
    pub slow_start: Option<Duration>,
    /// A PROXY protocol header before the client's bytes (and before health checks' own).
    pub send_proxy: Option<crate::sniff::proxy::ProxyVersion>,
    pub health: Option<HealthCheck>,
    /// TLS toward the servers (`[pool.tls]`).
    pub tls: Option<std::sync::Arc<crate::tls::OriginSettings>>,
    pub servers: Vec<ServerConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// How the admin API and metrics name it (default: the address).
    pub name: String,
    pub weight: NonZeroU32,
    pub backup: bool,
    /// Per shard; `None` is unlimited.
    pub max_connections: Option<NonZeroU32>,
}

/// A resolved, validated configuration. Immutable once built; shards share it through an `Arc`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub runtime: RuntimeSettings,
    pub admin: Option<AdminSettings>,
    pub tuning: Tuning,
    pub listeners: Vec<ListenerConfig>,
    pub pools: Vec<PoolConfig>,
    pub splits: Vec<SplitConfig>,
}

pub const DEFAULT_DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_MAX_CONNECTIONS: u32 = 100_000;
pub const DEFAULT_BACKLOG: u32 = 4096;
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RETRIES: u32 = 2;
pub const DEFAULT_MAX_FAILS: u32 = 1;
pub const DEFAULT_FAIL_TIMEOUT: Duration = Duration::from_secs(10);
/// Retries are bounded so a session's tried-server set fits in a `u64` and a dead pool cannot
/// hold a client for long.
pub const MAX_RETRIES: u32 = 16;
pub const MAX_SERVERS_PER_POOL: usize = 4096;
pub const MAX_WEIGHT: u32 = 10_000;

/// A config mistake, located in its file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{line}:{column}: {message}")]
pub struct ConfigError {
    pub file: String,
    pub line: usize,
    pub column: usize,
    pub message: String,
}

/// Collects the file name and text so spans can become line:column.
struct Source<'a> {
    name: &'a str,
    text: &'a str,
}

impl Source<'_> {
    fn error(&self, span: Range<usize>, message: impl Into<String>) -> ConfigError {
        let start = span.start.min(self.text.len());
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let column = before
            .rfind('\n')
            .map_or(before.chars().count(), |newline| {
                before[newline + 1..].chars().count()
            })
            + 1;
        ConfigError {
            file: self.name.to_string(),
            line,
            column,
            message: message.into(),
        }
    }

    fn at<T>(&self, value: &Spanned<T>, message: impl Into<String>) -> ConfigError {
        self.error(value.span(), message)
    }

    fn parse<T: serde::de::DeserializeOwned>(&self) -> Result<T, ConfigError> {
        toml::from_str(self.text).map_err(|error| {
            self.error(
                error.span().unwrap_or(0..0),
                error.message().trim_end().to_string(),
            )
        })
    }
}

impl Config {
    /// Reads and resolves a config file, then overlays an optional tuning profile.
    pub fn load(path: &Path, profile: Option<&Path>) -> Result<Config, ConfigError> {
        let name = path.display().to_string();
        let text = read_file(path)?;
        let mut config = Config::parse(&name, &text)?;
        if let Some(profile) = profile {
            config.apply_profile(profile)?;
        }
        Ok(config)
    }

    /// The embedded default config, resolved.
    pub fn default_config() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT_CONFIG_NAME, DEFAULT_CONFIG)
    }

    /// Resolves config text; `name` is used in error locations.
    pub fn parse(name: &str, text: &str) -> Result<Config, ConfigError> {
        let source = Source { name, text };
        let file: FileConfig = source.parse()?;
        resolve(&source, file)
    }

    /// Overlays the `[tuning]` table of a profile file on this config.
    pub fn apply_profile(&mut self, path: &Path) -> Result<(), ConfigError> {
        let name = path.display().to_string();
        let text = read_file(path)?;
        self.apply_profile_text(&name, &text)
    }

    pub fn apply_profile_text(&mut self, name: &str, text: &str) -> Result<(), ConfigError> {
        let source = Source { name, text };
        let profile: FileProfile = source.parse()?;
        self.tuning = resolve_tuning(&source, &profile.tuning, self.tuning.clone())?;
        Ok(())
    }

    pub fn pool(&self, id: PoolIndex) -> &PoolConfig {
        &self.pools[usize::from(id.0)]
    }

    pub fn split(&self, id: SplitIndex) -> &SplitConfig {
        &self.splits[usize::from(id.0)]
    }

    /// A target as a config names it: `pool = "web"` or `split = "app"`.
    pub fn target_key(&self, target: Target) -> String {
        match target {
            Target::Pool(pool) => format!("pool = {:?}", self.pool(pool).name),
            Target::Split(split) => format!("split = {:?}", self.split(split).name),
        }
    }

    /// The resolved config as TOML, every default spelled out (what `ringproxy check` prints).
    pub fn to_toml(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_toml(&mut out);
        out
    }
}

fn read_file(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|error| ConfigError {
        file: path.display().to_string(),
        line: 1,
        column: 1,
        message: format!("cannot read file: {error}"),
    })
}

fn resolve(source: &Source, file: FileConfig) -> Result<Config, ConfigError> {
    let runtime = resolve_runtime(source, &file.runtime)?;
    let admin = match &file.admin {
        Some(admin) => Some(resolve_admin(source, admin)?),
        None => None,
    };
    let tuning = resolve_tuning(source, &file.tuning, Tuning::default())?;

    let mut pools = Vec::with_capacity(file.pools.len());
    let mut pool_names = HashSet::new();
    for pool in &file.pools {
        let name = check_name(source, &pool.get_ref().name, "pool")?;
        if !pool_names.insert(name.clone()) {
            return Err(source.at(
                &pool.get_ref().name,
                format!("duplicate pool name {name:?}"),
            ));
        }
        pools.push(resolve_pool(source, pool)?);
    }
    if pools.len() > usize::from(u16::MAX) {
        return Err(source.error(0..0, "too many pools (at most 65535)"));
    }

    let splits = split::resolve_splits(source, &file.splits, &pools)?;

    if file.listeners.is_empty() {
        return Err(source.error(0..0, "no [[listener]]: at least one listener is required"));
    }
    let mut listeners = Vec::with_capacity(file.listeners.len());
    let mut listener_names = HashSet::new();
    let mut binds = HashSet::new();
    for spanned in &file.listeners {
        let listener = spanned.get_ref();
        let name = check_name(source, &listener.name, "listener")?;
        if !listener_names.insert(name.clone()) {
            return Err(source.at(&listener.name, format!("duplicate listener name {name:?}")));
        }
        let bind = parse_addr(source, &listener.bind)?;
        if bind.port() != 0 && !binds.insert(bind) {
            return Err(source.at(
                &listener.bind,
                format!("listener {name:?} binds {bind}, which another listener binds already"),
            ));
        }
        let target = split::resolve_target(
            source,
            listener.pool.as_ref(),
            listener.split.as_ref(),
            listener.name.span(),
            &format!("listener {name:?}"),
            &pools,
            &splits,
        )?;
        listeners.push(ListenerConfig {
            name,
            bind,
            target,
            max_connections: positive(
                source,
                listener.max_connections.as_ref(),
                "max_connections",
                DEFAULT_MAX_CONNECTIONS,
                u32::MAX,
            )?,
            backlog: positive(
                source,
                listener.backlog.as_ref(),
                "backlog",
                DEFAULT_BACKLOG,
                65_535,
            )?
            .get(),
            idle_timeout: nonzero_duration(
                source,
                listener.idle_timeout.as_ref(),
                "idle_timeout",
                DEFAULT_IDLE_TIMEOUT,
            )?,
            write_timeout: nonzero_duration(
                source,
                listener.write_timeout.as_ref(),
                "write_timeout",
                DEFAULT_WRITE_TIMEOUT,
            )?,
            tcp: connection::resolve_tcp_options(
                source,
                listener.tcp_keepalive.as_ref(),
                listener.tcp_user_timeout.as_ref(),
            )?,
            log: listener.log,
            admission: std::sync::Arc::new(admission::resolve(source, listener)?),
            routing: routing::resolve(source, listener, &pools, &splits)?.map(std::sync::Arc::new),
            proxy: routing::resolve_proxy_accept(source, listener)?.map(std::sync::Arc::new),
            tls: tls::resolve(source, listener)?.map(std::sync::Arc::new),
        });
    }

    Ok(Config {
        runtime,
        admin,
        tuning,
        listeners,
        pools,
        splits,
    })
}

fn resolve_admin(source: &Source, admin: &file::FileAdmin) -> Result<AdminSettings, ConfigError> {
    let path =
        |text: &Option<Spanned<String>>, key: &str| -> Result<Option<PathBuf>, ConfigError> {
            match text {
                None => Ok(None),
                Some(text) if text.get_ref().is_empty() => {
                    Err(source.at(text, format!("admin.{key} must not be empty")))
                }
                Some(text) => Ok(Some(PathBuf::from(text.get_ref()))),
            }
        };
    Ok(AdminSettings {
        bind: parse_addr(source, &admin.bind)?,
        token_file: path(&admin.token_file, "token_file")?,
        auth_reads: admin.auth_reads,
        state_file: path(&admin.state_file, "state_file")?,
        max_connections: integer(
            source,
            admin.max_connections.as_ref(),
            "admin.max_connections",
            DEFAULT_ADMIN_MAX_CONNECTIONS,
            1..=10_000,
        )?,
    })
}

fn resolve_runtime(
    source: &Source,
    runtime: &file::FileRuntime,
) -> Result<RuntimeSettings, ConfigError> {
    let shards = match &runtime.shards {
        None => Shards::Auto,
        Some(spanned) => match spanned.get_ref() {
            FileShards::Word(word) if word == "auto" => Shards::Auto,
            FileShards::Word(word) => {
                return Err(source.at(
                    spanned,
                    format!("shards must be \"auto\" or a number from 1 to 1024, not {word:?}"),
                ));
            }
            FileShards::Count(count) => match u32::try_from(*count) {
                Ok(count @ 1..=1024) => Shards::Count(NonZeroU32::MIN.saturating_add(count - 1)),
                _ => {
                    return Err(source.at(
                        spanned,
                        format!("shards must be \"auto\" or a number from 1 to 1024, not {count}"),
                    ));
                }
            },
        },
    };
    let drain_timeout = match &runtime.drain_timeout {
        None => DEFAULT_DRAIN_TIMEOUT,
        Some(text) => duration_at(source, text, "drain_timeout")?,
    };
    let pin = match &runtime.pin {
        None => Pinning::Auto,
        Some(spanned) => match spanned.get_ref() {
            FilePin::Word(word) if word == "auto" => Pinning::Auto,
            FilePin::Word(word) if word == "none" => Pinning::None,
            FilePin::Word(word) => {
                return Err(source.at(
                    spanned,
                    format!(
                        "pin must be \"auto\", \"none\" or a list of core numbers, not {word:?}"
                    ),
                ));
            }
            FilePin::Cores(cores) => {
                if cores.is_empty() || cores.len() > 1024 {
                    return Err(source.at(spanned, "pin lists 1 to 1024 core numbers"));
                }
                let mut list = Vec::with_capacity(cores.len());
                for &core in cores {
                    match usize::try_from(core) {
                        Ok(core) if core < 4096 => list.push(core),
                        _ => {
                            return Err(source.at(
                                spanned,
                                format!("pin: core numbers run from 0 to 4095, not {core}"),
                            ));
                        }
                    }
                }
                Pinning::Cores(list)
            }
        },
    };
    let max_connections = match &runtime.max_connections {
        None => None,
        Some(value) => Some(positive(
            source,
            Some(value),
            "runtime.max_connections",
            1,
            u32::MAX,
        )?),
    };
    Ok(RuntimeSettings {
        shards,
        drain_timeout,
        pin,
        max_connections,
    })
}

fn resolve_tuning(source: &Source, file: &FileTuning, base: Tuning) -> Result<Tuning, ConfigError> {
    let power_of_two = |value: Option<&Spanned<i64>>,
                        key: &str,
                        default: u32,
                        min: i64,
                        max: i64|
     -> Result<u32, ConfigError> {
        let Some(value) = value else {
            return Ok(default);
        };
        let number = *value.get_ref();
        if number < min || number > max || (number as u64).count_ones() != 1 {
            return Err(source.at(
                value,
                format!("{key} must be a power of two from {min} to {max}, not {number}"),
            ));
        }
        Ok(number as u32)
    };
    let ring_entries = power_of_two(
        file.ring_entries.as_ref(),
        "ring_entries",
        base.ring_entries,
        64,
        32_768,
    )?;
    let buffer_count = power_of_two(
        file.buffer_count.as_ref(),
        "buffer_count",
        base.buffer_count,
        64,
        32_768,
    )?;
    let buffer_size = integer(
        source,
        file.buffer_size.as_ref(),
        "buffer_size",
        base.buffer_size,
        1024..=1 << 20,
    )?;
    let queued_buffers = integer(
        source,
        file.queued_buffers.as_ref(),
        "queued_buffers",
        base.queued_buffers,
        1..=64,
    )?;
    let receives = match &file.receives {
        None => base.receives,
        Some(text) => match text.get_ref().as_str() {
            "auto" => ReceiveMode::Auto,
            "single_shot" => ReceiveMode::SingleShot,
            other => {
                return Err(source.at(
                    text,
                    format!("unknown receives {other:?}: use auto or single_shot"),
                ));
            }
        },
    };
    Ok(Tuning {
        ring_entries,
        buffer_size,
        buffer_count,
        queued_buffers,
        receives,
    })
}

fn resolve_pool(
    source: &Source,
    spanned: &Spanned<file::FilePool>,
) -> Result<PoolConfig, ConfigError> {
    let pool = spanned.get_ref();
    let name = pool.name.get_ref().clone();
    let balance = match &pool.balance {
        None => Algorithm::RoundRobin,
        Some(text) => Algorithm::from_name(text.get_ref()).ok_or_else(|| {
            source.at(
                text,
                format!(
                    "unknown balance {:?}: use round_robin, weighted, least_conn, source_hash or two_choices",
                    text.get_ref()
                ),
            )
        })?,
    };
    let connect_timeout = nonzero_duration(
        source,
        pool.connect_timeout.as_ref(),
        "connect_timeout",
        DEFAULT_CONNECT_TIMEOUT,
    )?;
    let retries = integer(
        source,
        pool.retries.as_ref(),
        "retries",
        DEFAULT_RETRIES,
        0..=MAX_RETRIES,
    )?;
    let max_fails = integer(
        source,
        pool.max_fails.as_ref(),
        "max_fails",
        DEFAULT_MAX_FAILS,
        0..=1000,
    )?;
    let fail_timeout = match &pool.fail_timeout {
        None => DEFAULT_FAIL_TIMEOUT,
        Some(text) => duration_at(source, text, "fail_timeout")?,
    };

    let server_list = pool.servers.get_ref();
    if server_list.is_empty() {
        return Err(source.at(&pool.servers, format!("pool {name:?} has no servers")));
    }
    if server_list.len() > MAX_SERVERS_PER_POOL {
        return Err(source.at(
            &pool.servers,
            format!("pool {name:?} has more than {MAX_SERVERS_PER_POOL} servers"),
        ));
    }
    let mut servers = Vec::with_capacity(server_list.len());
    let mut addrs = HashSet::new();
    let mut names = HashSet::new();
    for server in server_list {
        let server = server.get_ref();
        let addr = parse_addr(source, &server.addr)?;
        let server_name = match &server.name {
            Some(text) => check_name(source, text, "server")?,
            None => addr.to_string(),
        };
        if !names.insert(server_name.clone()) {
            let at = server.name.as_ref().unwrap_or(&server.addr);
            return Err(source.at(
                at,
                format!("server name {server_name:?} appears twice in pool {name:?}"),
            ));
        }
        if addr.port() == 0 {
            return Err(source.at(&server.addr, format!("server {addr} has port 0")));
        }
        if !addrs.insert(addr) {
            return Err(source.at(
                &server.addr,
                format!("server {addr} appears twice in pool {name:?}"),
            ));
        }
        let weight = positive(source, server.weight.as_ref(), "weight", 1, MAX_WEIGHT)?;
        let max_connections = match &server.max_connections {
            None => None,
            Some(value) => Some(positive(
                source,
                Some(value),
                "max_connections",
                1,
                u32::MAX,
            )?),
        };
        servers.push(ServerConfig {
            addr,
            name: server_name,
            weight,
            backup: server.backup,
            max_connections,
        });
    }
    if servers.iter().all(|server| server.backup) {
        return Err(source.at(
            &pool.servers,
            format!("pool {name:?} has only backup servers: at least one must be a primary"),
        ));
    }
    let tcp = connection::resolve_tcp_options(
        source,
        pool.tcp_keepalive.as_ref(),
        pool.tcp_user_timeout.as_ref(),
    )?;
    let server_addrs: Vec<SocketAddr> = servers.iter().map(|server| server.addr).collect();
    let source_addresses = connection::resolve_source_addresses(
        source,
        pool.source_addresses.as_ref(),
        &server_addrs,
    )?;
    let slow_start = match &pool.slow_start {
        None => None,
        Some(text) => {
            let duration = duration_at(source, text, "slow_start")?;
            (!duration.is_zero()).then_some(duration)
        }
    };
    let mut health = match &pool.health {
        None => None,
        Some(spanned) => Some(health::resolve_health(source, spanned)?),
    };
    let send_proxy = match &pool.send_proxy {
        None => None,
        Some(text) => match text.get_ref().as_str() {
            "v1" => Some(crate::sniff::proxy::ProxyVersion::V1),
            "v2" => Some(crate::sniff::proxy::ProxyVersion::V2),
            other => {
                return Err(source.at(
                    text,
                    format!("send_proxy must be \"v1\" or \"v2\", not {other:?}"),
                ));
            }
        },
    };
    let tls = match &pool.tls {
        None => None,
        Some(spanned) => Some(std::sync::Arc::new(tls::resolve_origin(source, spanned)?)),
    };
    if let Some(health) = health.as_mut() {
        health.send_proxy = send_proxy;
        health.tls = tls.clone().filter(|tls| tls.check_tls);
    }
    Ok(PoolConfig {
        name,
        balance,
        connect_timeout,
        retries,
        max_fails,
        fail_timeout,
        tcp,
        source_addresses,
        slow_start,
        send_proxy,
        health,
        tls,
        servers,
    })
}

/// Whether `text` is a valid name of a listener, pool or server: 1 to 64 characters of
/// `A-Z a-z 0-9 _ - .`.
pub fn valid_name(text: &str) -> bool {
    !text.is_empty()
        && text.len() <= 64
        && text
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

fn check_name(source: &Source, name: &Spanned<String>, kind: &str) -> Result<String, ConfigError> {
    let text = name.get_ref();
    if !valid_name(text) {
        return Err(source.at(
            name,
            format!("{kind} name {text:?} must be 1 to 64 characters of A-Z a-z 0-9 _ - ."),
        ));
    }
    Ok(text.clone())
}

fn parse_addr(source: &Source, text: &Spanned<String>) -> Result<SocketAddr, ConfigError> {
    text.get_ref().parse().map_err(|_| {
        source.at(
            text,
            format!(
                "invalid address {:?}: expected IP:PORT such as \"127.0.0.1:8080\" or \"[::1]:8080\" (host names are not resolved)",
                text.get_ref()
            ),
        )
    })
}

fn duration_at(
    source: &Source,
    text: &Spanned<String>,
    key: &str,
) -> Result<Duration, ConfigError> {
    parse_duration(text.get_ref()).map_err(|message| source.at(text, format!("{key}: {message}")))
}

fn nonzero_duration(
    source: &Source,
    text: Option<&Spanned<String>>,
    key: &str,
    default: Duration,
) -> Result<Duration, ConfigError> {
    let Some(text) = text else {
        return Ok(default);
    };
    let duration = duration_at(source, text, key)?;
    if duration.is_zero() {
        return Err(source.at(text, format!("{key} must be greater than zero")));
    }
    Ok(duration)
}

/// An integer key within `range`, or `default` when absent.
fn integer(
    source: &Source,
    value: Option<&Spanned<i64>>,
    key: &str,
    default: u32,
    range: RangeInclusive<u32>,
) -> Result<u32, ConfigError> {
    value.map_or(Ok(default), |value| in_range(source, value, key, range))
}

/// An integer value within `range`, in whatever unsigned width the key has.
fn in_range<T>(
    source: &Source,
    value: &Spanned<i64>,
    key: &str,
    range: RangeInclusive<T>,
) -> Result<T, ConfigError>
where
    T: TryFrom<i64> + PartialOrd + std::fmt::Display,
{
    let number = *value.get_ref();
    match T::try_from(number) {
        Ok(n) if range.contains(&n) => Ok(n),
        _ => Err(source.at(
            value,
            format!(
                "{key} must be from {} to {}, not {number}",
                range.start(),
                range.end()
            ),
        )),
    }
}

/// An integer key from 1 to `max`, or `default` when absent.
fn positive(
    source: &Source,
    value: Option<&Spanned<i64>>,
    key: &str,
    default: u32,
    max: u32,
) -> Result<NonZeroU32, ConfigError> {
    let number = integer(source, value, key, default, 1..=max)?;
    Ok(NonZeroU32::MIN.saturating_add(number.saturating_sub(1)))
}

#[cfg(test)]
mod tests;
