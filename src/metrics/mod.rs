//! Counters and histograms: shard-local plain integers, published once a second, summed by the
//! control thread for `/status` and `/metrics`.
//!
//! Owns the counter types a shard keeps per listener, pool and server, the fixed-bucket
//! histograms, the per-shard slot a shard publishes into (single writer) and the merge of all
//! slots. Nothing here is touched per byte by more than one thread: a shard adds to its own
//! plain integers and, once a second, stores a fresh copy into its own slot; the control thread
//! only reads slots. No `metrics` macro, no shared atomic counter per request.

pub mod names;
pub mod render;

use std::collections::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;

use crate::runtime::ShardStats;
use crate::snapshot::{ListenerId, PoolId, ServerId, SplitId};

/// Upper bounds (seconds) of the connect-time histogram's buckets.
pub const CONNECT_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0,
];
/// Upper bounds (seconds) of the session-duration histogram's buckets.
pub const SESSION_BUCKETS: [f64; 14] = [
    0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0,
];

/// A fixed-bucket histogram of durations (Prometheus style: cumulative at export).
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket (not cumulative); the last one is +Inf.
    counts: Vec<u64>,
    sum_micros: u64,
    count: u64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum_micros: 0,
            count: 0,
        }
    }

    pub fn record(&mut self, duration: Duration) {
        let seconds = duration.as_secs_f64();
        let bucket = self
            .bounds
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(self.bounds.len());
        self.counts[bucket] += 1;
        self.sum_micros = self
            .sum_micros
            .saturating_add(duration.as_micros().min(u128::from(u64::MAX)) as u64);
        self.count += 1;
    }

    pub fn merge(&mut self, other: &Histogram) {
        if self.bounds.len() != other.bounds.len() {
            return;
        }
        for (mine, theirs) in self.counts.iter_mut().zip(&other.counts) {
            *mine += theirs;
        }
        self.sum_micros = self.sum_micros.saturating_add(other.sum_micros);
        self.count += other.count;
    }

    pub fn bounds(&self) -> &'static [f64] {
        self.bounds
    }

    /// (upper bound, cumulative count) per bucket, +Inf last (as `f64::INFINITY`).
    pub fn cumulative(&self) -> impl Iterator<Item = (f64, u64)> + '_ {
        let mut running = 0;
        self.counts.iter().enumerate().map(move |(index, &count)| {
            running += count;
            let bound = self.bounds.get(index).copied().unwrap_or(f64::INFINITY);
            (bound, running)
        })
    }

    pub fn sum_seconds(&self) -> f64 {
        self.sum_micros as f64 / 1e6
    }

    pub fn count(&self) -> u64 {
        self.count
    }
}

/// Why a connection was turned away before it became a session: admission's reasons, which
/// label `ringproxy_connections_rejected_total`.
pub use crate::admission::RejectReason as RejectKind;

/// How a session ended, and on whose side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseKind {
    /// Both sides finished with FINs.
    Done,
    /// Nothing moved either way for `idle_timeout`.
    Idle,
    /// A destination took nothing for `write_timeout`.
    WriteTimeout,
    /// The client reset (or failed).
    ClientReset,
    /// The server reset (or failed).
    ServerReset,
    /// No server could be connected.
    ConnectFailed,
    /// Cut by the drain deadline at shutdown.
    DrainCut,
    /// Cut by an operator (`shutdown-sessions`).
    AdminCut,
    /// The proxy itself failed (a submission it could not make).
    LocalError,
    /// The client sent nothing within `first_byte_timeout`.
    FirstByteTimeout,
    /// No route matched and the listener has `unmatched = "reject"`.
    Unmatched,
    /// A PROXY protocol header was refused (untrusted, missing, malformed or late).
    ProxyHeader,
    /// Refused by admission on the address a PROXY header carried.
    Rejected,
    /// The TLS handshake failed or timed out.
    TlsHandshake,
}

impl CloseKind {
    pub const ALL: [CloseKind; 14] = [
        CloseKind::Done,
        CloseKind::Idle,
        CloseKind::WriteTimeout,
        CloseKind::ClientReset,
        CloseKind::ServerReset,
        CloseKind::ConnectFailed,
        CloseKind::DrainCut,
        CloseKind::AdminCut,
        CloseKind::LocalError,
        CloseKind::FirstByteTimeout,
        CloseKind::Unmatched,
        CloseKind::ProxyHeader,
        CloseKind::Rejected,
        CloseKind::TlsHandshake,
    ];

    pub fn name(self) -> &'static str {
        match self {
            CloseKind::Done => "done",
            CloseKind::Idle => "idle",
            CloseKind::WriteTimeout => "write_timeout",
            CloseKind::ClientReset => "client_reset",
            CloseKind::ServerReset => "server_reset",
            CloseKind::ConnectFailed => "connect_failed",
            CloseKind::DrainCut => "drain_cut",
            CloseKind::AdminCut => "admin_cut",
            CloseKind::LocalError => "local_error",
            CloseKind::FirstByteTimeout => "first_byte_timeout",
            CloseKind::Unmatched => "unmatched",
            CloseKind::ProxyHeader => "proxy_header",
            CloseKind::Rejected => "rejected",
            CloseKind::TlsHandshake => "tls_handshake",
        }
    }

    /// The side whose doing it was, for the connection log.
    pub fn side(self) -> &'static str {
        match self {
            CloseKind::ClientReset
            | CloseKind::FirstByteTimeout
            | CloseKind::Unmatched
            | CloseKind::ProxyHeader
            | CloseKind::Rejected
            | CloseKind::TlsHandshake => "client",
            CloseKind::ServerReset | CloseKind::ConnectFailed => "server",
            CloseKind::Done | CloseKind::Idle | CloseKind::WriteTimeout => "-",
            CloseKind::DrainCut | CloseKind::AdminCut | CloseKind::LocalError => "proxy",
        }
    }

    fn index(self) -> usize {
        CloseKind::ALL
            .iter()
            .position(|&kind| kind == self)
            .unwrap_or(0)
    }
}

/// A connect that failed, by what happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectErrorKind {
    Refused,
    Timeout,
    /// The TLS handshake with the server failed (its certificate, an alert, a close).
    Tls,
    Other,
}

impl ConnectErrorKind {
    pub const ALL: [ConnectErrorKind; 4] = [
        ConnectErrorKind::Refused,
        ConnectErrorKind::Timeout,
        ConnectErrorKind::Tls,
        ConnectErrorKind::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ConnectErrorKind::Refused => "refused",
            ConnectErrorKind::Timeout => "timeout",
            ConnectErrorKind::Tls => "tls",
            ConnectErrorKind::Other => "other",
        }
    }

    pub fn from_errno(errno: i32) -> ConnectErrorKind {
        match errno {
            libc::ECONNREFUSED => ConnectErrorKind::Refused,
            libc::ETIMEDOUT | libc::ECANCELED => ConnectErrorKind::Timeout,
            _ => ConnectErrorKind::Other,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ListenerCounters {
    /// This shard's socket for the listener is bound and accepting.
    pub bound: bool,
    pub active: u32,
    pub accepted: u64,
    pub rejected: [u64; RejectKind::ALL.len()],
    pub closed: [u64; CloseKind::ALL.len()],
    pub bytes_client_to_server: u64,
    pub bytes_server_to_client: u64,
    pub session_duration: Histogram,
    /// Admission gauges: tokens in the listener-wide rate bucket and this shard's fraction of
    /// the rate (summed across shards: all tokens, 1.0), addresses in the per-source table and
    /// addresses evicted from it.
    pub rate_tokens: u64,
    pub rate_share: f64,
    pub sources: u64,
    pub source_evictions: u64,
    /// Routing: clients by what sniffing found (`Detection::ALL` order), sniffs that ran out
    /// of time, and clients no route matched.
    pub detected: [u64; Detection::ALL.len()],
    pub sniff_timeouts: u64,
    pub unmatched: u64,
    /// PROXY protocol headers taken from trusted peers, and headers refused by why
    /// (`ProxyError::ALL` order).
    pub proxy_headers: u64,
    pub proxy_errors: [u64; ProxyError::ALL.len()],
    /// Clients sent by each route, in the listener's order, then those sent to its default
    /// (empty on listeners without routes).
    pub routed: Vec<u64>,
    /// TLS handshakes done, full and resumed; by version (1.2, 1.3); failed by reason
    /// (`TlsFailure::ALL` order); how long the completed ones took.
    pub tls_full: u64,
    pub tls_resumed: u64,
    pub tls_versions: [u64; 2],
    pub tls_failures: [u64; TlsFailure::ALL.len()],
    pub tls_handshake_time: Histogram,
    /// Handshakes by the ALPN protocol chosen: by position in the listener's `alpn`, then
    /// none (empty on listeners without TLS).
    pub tls_alpn: Vec<u64>,
}

/// Why a TLS handshake failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// Not done within `handshake_timeout`.
    Timeout,
    /// The client left before it was done.
    ClientClosed,
    /// Bytes that are no TLS (a plain HTTP request, garbage) or break its rules.
    Protocol,
    /// No version, cipher suite, group or ALPN protocol in common.
    Incompatible,
    /// No certificate for the name asked (`default_certificate = "reject"`).
    NoCertificate,
    /// The client's certificate was missing or not trusted (mTLS).
    ClientCertificate,
    /// Any other failure.
    Other,
}

impl TlsFailure {
    pub const ALL: [TlsFailure; 7] = [
        TlsFailure::Timeout,
        TlsFailure::ClientClosed,
        TlsFailure::Protocol,
        TlsFailure::Incompatible,
        TlsFailure::NoCertificate,
        TlsFailure::ClientCertificate,
        TlsFailure::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            TlsFailure::Timeout => "timeout",
            TlsFailure::ClientClosed => "client_closed",
            TlsFailure::Protocol => "protocol",
            TlsFailure::Incompatible => "incompatible",
            TlsFailure::NoCertificate => "no_certificate",
            TlsFailure::ClientCertificate => "client_certificate",
            TlsFailure::Other => "other",
        }
    }

    /// The kind of a rustls error (None: no error, the client left).
    pub fn of(error: Option<&rustls::Error>) -> TlsFailure {
        use rustls::Error;
        match error {
            None => TlsFailure::ClientClosed,
            Some(Error::InvalidMessage(_) | Error::InappropriateMessage { .. })
            | Some(Error::InappropriateHandshakeMessage { .. })
            | Some(Error::DecryptError) => TlsFailure::Protocol,
            Some(Error::PeerIncompatible(_)) | Some(Error::NoApplicationProtocol) => {
                TlsFailure::Incompatible
            }
            Some(Error::NoCertificatesPresented | Error::InvalidCertificate(_)) => {
                TlsFailure::ClientCertificate
            }
            Some(Error::General(message)) if message.contains("no server certificate") => {
                TlsFailure::NoCertificate
            }
            Some(_) => TlsFailure::Other,
        }
    }
}

/// Why a PROXY protocol header was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyError {
    /// A header from a peer not in `trusted_proxies`.
    Untrusted,
    /// `proxy_protocol = "required"` and a trusted peer sent none.
    Missing,
    /// The bytes start like a header but break its rules (or pass its size).
    Invalid,
    /// The header was not complete within `sniff_timeout`.
    Timeout,
}

impl ProxyError {
    pub const ALL: [ProxyError; 4] = [
        ProxyError::Untrusted,
        ProxyError::Missing,
        ProxyError::Invalid,
        ProxyError::Timeout,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ProxyError::Untrusted => "untrusted",
            ProxyError::Missing => "missing",
            ProxyError::Invalid => "invalid",
            ProxyError::Timeout => "timeout",
        }
    }
}

/// What the sniff step found, for the per-listener counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Detection {
    Protocol(crate::sniff::Protocol),
    /// No byte before `server_first_after`: a server-speaks-first protocol.
    Silence,
    /// Bytes no sniffer recognised, or none decided within the limits.
    Unknown,
}

impl Detection {
    pub const ALL: [Detection; 10] = [
        Detection::Protocol(crate::sniff::Protocol::Tls),
        Detection::Protocol(crate::sniff::Protocol::Http),
        Detection::Protocol(crate::sniff::Protocol::H2),
        Detection::Protocol(crate::sniff::Protocol::Postgres),
        Detection::Protocol(crate::sniff::Protocol::MongoDb),
        Detection::Protocol(crate::sniff::Protocol::Redis),
        Detection::Protocol(crate::sniff::Protocol::Rtmp),
        Detection::Protocol(crate::sniff::Protocol::Ssh),
        Detection::Silence,
        Detection::Unknown,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Detection::Protocol(protocol) => protocol.name(),
            Detection::Silence => "silence",
            Detection::Unknown => "unknown",
        }
    }
}

impl Default for ListenerCounters {
    fn default() -> Self {
        ListenerCounters {
            bound: false,
            active: 0,
            accepted: 0,
            rejected: [0; RejectKind::ALL.len()],
            closed: [0; CloseKind::ALL.len()],
            bytes_client_to_server: 0,
            bytes_server_to_client: 0,
            session_duration: Histogram::new(&SESSION_BUCKETS),
            rate_tokens: 0,
            rate_share: 0.0,
            sources: 0,
            source_evictions: 0,
            detected: [0; Detection::ALL.len()],
            sniff_timeouts: 0,
            unmatched: 0,
            proxy_headers: 0,
            proxy_errors: [0; ProxyError::ALL.len()],
            routed: Vec::new(),
            tls_full: 0,
            tls_resumed: 0,
            tls_versions: [0; 2],
            tls_failures: [0; TlsFailure::ALL.len()],
            tls_handshake_time: Histogram::new(&CONNECT_BUCKETS),
            tls_alpn: Vec::new(),
        }
    }
}

impl ListenerCounters {
    pub fn reject(&mut self, kind: RejectKind) {
        let index = RejectKind::ALL.iter().position(|&k| k == kind).unwrap_or(0);
        self.rejected[index] += 1;
    }

    pub fn close(&mut self, kind: CloseKind) {
        self.closed[kind.index()] += 1;
    }

    pub fn detect(&mut self, detection: Detection) {
        if let Some(index) = Detection::ALL.iter().position(|&d| d == detection) {
            self.detected[index] += 1;
        }
    }

    /// A client went by route `position` (None: to the listener's default), of `routes`.
    pub fn routed(&mut self, position: Option<usize>, routes: usize) {
        let slot = position.unwrap_or(routes);
        if self.routed.len() <= slot {
            self.routed.resize(slot + 1, 0);
        }
        self.routed[slot] += 1;
    }

    pub fn proxy_error(&mut self, error: ProxyError) {
        let index = ProxyError::ALL
            .iter()
            .position(|&e| e == error)
            .unwrap_or(0);
        self.proxy_errors[index] += 1;
    }

    pub fn rejected_total(&self) -> u64 {
        self.rejected.iter().sum()
    }

    fn merge(&mut self, other: &ListenerCounters) {
        self.bound &= other.bound;
        self.active += other.active;
        self.accepted += other.accepted;
        for (mine, theirs) in self.rejected.iter_mut().zip(&other.rejected) {
            *mine += theirs;
        }
        for (mine, theirs) in self.closed.iter_mut().zip(&other.closed) {
            *mine += theirs;
        }
        self.bytes_client_to_server += other.bytes_client_to_server;
        self.bytes_server_to_client += other.bytes_server_to_client;
        self.session_duration.merge(&other.session_duration);
        self.rate_tokens += other.rate_tokens;
        self.rate_share += other.rate_share;
        self.sources += other.sources;
        self.source_evictions += other.source_evictions;
        for (mine, theirs) in self.detected.iter_mut().zip(&other.detected) {
            *mine += theirs;
        }
        self.sniff_timeouts += other.sniff_timeouts;
        self.unmatched += other.unmatched;
        self.proxy_headers += other.proxy_headers;
        for (mine, theirs) in self.proxy_errors.iter_mut().zip(&other.proxy_errors) {
            *mine += theirs;
        }
        if self.routed.len() < other.routed.len() {
            self.routed.resize(other.routed.len(), 0);
        }
        for (mine, theirs) in self.routed.iter_mut().zip(&other.routed) {
            *mine += theirs;
        }
        self.tls_full += other.tls_full;
        self.tls_resumed += other.tls_resumed;
        for (mine, theirs) in self.tls_versions.iter_mut().zip(&other.tls_versions) {
            *mine += theirs;
        }
        for (mine, theirs) in self.tls_failures.iter_mut().zip(&other.tls_failures) {
            *mine += theirs;
        }
        self.tls_handshake_time.merge(&other.tls_handshake_time);
        if self.tls_alpn.len() < other.tls_alpn.len() {
            self.tls_alpn.resize(other.tls_alpn.len(), 0);
        }
        for (mine, theirs) in self.tls_alpn.iter_mut().zip(&other.tls_alpn) {
            *mine += theirs;
        }
    }

    /// A handshake chose ALPN protocol `position` of `offered` (None: no ALPN).
    pub fn tls_alpn_chosen(&mut self, position: Option<usize>, offered: usize) {
        let slot = position.unwrap_or(offered);
        if self.tls_alpn.len() <= slot {
            self.tls_alpn.resize(slot + 1, 0);
        }
        self.tls_alpn[slot] += 1;
    }

    pub fn tls_failed(&mut self, failure: TlsFailure) {
        if let Some(index) = TlsFailure::ALL.iter().position(|&f| f == failure) {
            self.tls_failures[index] += 1;
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolCounters {
    pub connect_time: Histogram,
    pub bytes_to_server: u64,
    pub bytes_to_client: u64,
}

impl Default for PoolCounters {
    fn default() -> Self {
        PoolCounters {
            connect_time: Histogram::new(&CONNECT_BUCKETS),
            bytes_to_server: 0,
            bytes_to_client: 0,
        }
    }
}

impl PoolCounters {
    fn merge(&mut self, other: &PoolCounters) {
        self.connect_time.merge(&other.connect_time);
        self.bytes_to_server += other.bytes_to_server;
        self.bytes_to_client += other.bytes_to_client;
    }
}

/// One side (pool) of a split on one shard.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SplitSideCounters {
    /// Sessions the split sent to this pool that are open now.
    pub active: u32,
    /// Sessions the split sent to this pool.
    pub sessions: u64,
}

impl SplitSideCounters {
    fn merge(&mut self, other: &SplitSideCounters) {
        self.active += other.active;
        self.sessions += other.sessions;
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ServerCounters {
    /// Sessions on the server now (this shard's; summed at export).
    pub active: u32,
    /// Sessions that were connected to it.
    pub sessions: u64,
    pub connect_errors: [u64; ConnectErrorKind::ALL.len()],
    /// Shards on which passive health skips it now (one per shard before merging).
    pub passive_down: u32,
}

impl ServerCounters {
    pub fn connect_error(&mut self, kind: ConnectErrorKind) {
        let index = ConnectErrorKind::ALL
            .iter()
            .position(|&k| k == kind)
            .unwrap_or(0);
        self.connect_errors[index] += 1;
    }

    pub fn connect_errors_total(&self) -> u64 {
        self.connect_errors.iter().sum()
    }

    fn merge(&mut self, other: &ServerCounters) {
        self.active += other.active;
        self.sessions += other.sessions;
        for (mine, theirs) in self.connect_errors.iter_mut().zip(&other.connect_errors) {
            *mine += theirs;
        }
        self.passive_down += other.passive_down;
    }
}

/// Counters keyed by id, each slot also counting the sessions that still refer to it, so a
/// listener, pool or server that left the config disappears once nothing uses it.
#[derive(Debug, Clone)]
pub struct CounterTable<K, V> {
    slots: slab::Slab<(K, V, u32)>,
    index: HashMap<K, usize>,
}

impl<K: Copy + Eq + Hash, V: Default> Default for CounterTable<K, V> {
    fn default() -> Self {
        CounterTable {
            slots: slab::Slab::new(),
            index: HashMap::new(),
        }
    }
}

impl<K: Copy + Eq + Hash, V: Default> CounterTable<K, V> {
    /// The slot of `key`, created when absent.
    pub fn slot(&mut self, key: K) -> usize {
        if let Some(&slot) = self.index.get(&key) {
            return slot;
        }
        let slot = self.slots.insert((key, V::default(), 0));
        self.index.insert(key, slot);
        slot
    }

    /// A session starts referring to `slot`.
    pub fn hold(&mut self, slot: usize) {
        if let Some(entry) = self.slots.get_mut(slot) {
            entry.2 += 1;
        }
    }

    /// A session stops referring to `slot`.
    pub fn unhold(&mut self, slot: usize) {
        if let Some(entry) = self.slots.get_mut(slot) {
            entry.2 = entry.2.saturating_sub(1);
        }
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut V> {
        self.slots.get_mut(slot).map(|entry| &mut entry.1)
    }

    pub fn get(&self, slot: usize) -> Option<&V> {
        self.slots.get(slot).map(|entry| &entry.1)
    }

    pub fn by_key_mut(&mut self, key: K) -> Option<&mut V> {
        let slot = *self.index.get(&key)?;
        self.get_mut(slot)
    }

    /// Drops the slots of keys `keep` rejects that no session refers to any more.
    pub fn collect(&mut self, mut keep: impl FnMut(K) -> bool) {
        let unused: Vec<usize> = self
            .slots
            .iter()
            .filter(|(_, (key, _, holders))| *holders == 0 && !keep(*key))
            .map(|(slot, _)| slot)
            .collect();
        for slot in unused {
            let (key, _, _) = self.slots.remove(slot);
            self.index.remove(&key);
        }
    }

    pub fn iter(&self) -> impl Iterator<Item = (K, &V)> {
        self.slots.iter().map(|(_, (key, value, _))| (*key, value))
    }

    pub fn len(&self) -> usize {
        self.slots.len()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// What a shard publishes about itself (a fresh copy each time; never changed after).
#[derive(Debug, Clone)]
pub struct ShardPublished {
    pub shard: usize,
    /// When this copy was made: a heartbeat (an idle shard still publishes every second).
    pub at: Instant,
    /// The snapshot generation the shard runs on.
    pub generation: u64,
    pub sessions: usize,
    pub buffers_free: u32,
    /// Timer wheel entries allocated: a high-water mark bounded by the most sessions live at
    /// once, not by the connections made.
    pub timer_nodes: usize,
    pub stats: ShardStats,
    pub listeners: Vec<(ListenerId, ListenerCounters)>,
    pub pools: Vec<(PoolId, PoolCounters)>,
    pub servers: Vec<(ServerId, ServerCounters)>,
    pub splits: Vec<((SplitId, PoolId), SplitSideCounters)>,
}

/// One shard's slot: written by that shard only, read by the control thread. Padded to its own
/// cache lines so two shards' slots never share one.
#[repr(align(128))]
#[derive(Default)]
pub struct ShardSlot {
    published: ArcSwapOption<ShardPublished>,
}

impl ShardSlot {
    pub fn publish(&self, published: ShardPublished) {
        self.published.store(Some(std::sync::Arc::new(published)));
    }

    pub fn load(&self) -> Option<std::sync::Arc<ShardPublished>> {
        self.published.load_full()
    }
}

/// Every shard's counters summed (histograms merged), with the per-shard copies kept for the
/// per-shard figures of `/status`.
#[derive(Debug, Clone, Default)]
pub struct Merged {
    pub shards: Vec<std::sync::Arc<ShardPublished>>,
    pub listeners: HashMap<ListenerId, ListenerCounters>,
    pub pools: HashMap<PoolId, PoolCounters>,
    pub servers: HashMap<ServerId, ServerCounters>,
    pub splits: HashMap<(SplitId, PoolId), SplitSideCounters>,
}

impl Merged {
    pub fn from_slots(slots: &[std::sync::Arc<ShardSlot>]) -> Merged {
        let mut merged = Merged::default();
        for slot in slots {
            let Some(published) = slot.load() else {
                continue;
            };
            for (id, counters) in &published.listeners {
                match merged.listeners.get_mut(id) {
                    Some(total) => total.merge(counters),
                    None => {
                        merged.listeners.insert(*id, counters.clone());
                    }
                }
            }
            for (id, counters) in &published.pools {
                merged.pools.entry(*id).or_default().merge(counters);
            }
            for (id, counters) in &published.servers {
                merged.servers.entry(*id).or_default().merge(counters);
            }
            for (side, counters) in &published.splits {
                merged.splits.entry(*side).or_default().merge(counters);
            }
            merged.shards.push(published);
        }
        merged
    }

    /// Per shard, this listener's accepted count (0 for a shard that has none).
    pub fn per_shard_accepted(&self, id: ListenerId) -> Vec<u64> {
        self.per_shard(id, |counters| counters.accepted)
    }

    /// One value of listener `id`'s counters per shard, in shard order (0 where a shard has
    /// none).
    pub fn per_shard<T: Default>(
        &self,
        id: ListenerId,
        value: impl Fn(&ListenerCounters) -> T,
    ) -> Vec<T> {
        self.shards
            .iter()
            .map(|shard| {
                shard
                    .listeners
                    .iter()
                    .find(|(listener, _)| *listener == id)
                    .map(|(_, counters)| value(counters))
                    .unwrap_or_default()
            })
            .collect()
    }

    /// Whether every shard has published and runs a listener socket for `id`.
    pub fn bound_everywhere(&self, id: ListenerId, shards: usize) -> bool {
        self.shards.len() == shards
            && self.shards.iter().all(|shard| {
                shard
                    .listeners
                    .iter()
                    .any(|(listener, counters)| *listener == id && counters.bound)
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_merge() {
        let mut a = Histogram::new(&CONNECT_BUCKETS);
        a.record(Duration::from_micros(50));
        a.record(Duration::from_millis(3));
        a.record(Duration::from_secs(10));
        let mut b = Histogram::new(&CONNECT_BUCKETS);
        b.record(Duration::from_millis(3));
        a.merge(&b);
        let cumulative: Vec<(f64, u64)> = a.cumulative().collect();
        assert_eq!(cumulative.first(), Some(&(0.0001, 1)));
        assert_eq!(cumulative.last(), Some(&(f64::INFINITY, 4)));
        let at_5ms = cumulative.iter().find(|(bound, _)| *bound == 0.005);
        assert_eq!(at_5ms, Some(&(0.005, 3)));
        assert_eq!(a.count(), 4);
        assert!((a.sum_seconds() - 10.00605).abs() < 1e-9);
    }

    #[test]
    fn counter_tables_forget_only_unused_slots() {
        let mut table: CounterTable<ServerId, ServerCounters> = CounterTable::default();
        let a = table.slot(ServerId(1));
        let b = table.slot(ServerId(2));
        assert_eq!(table.slot(ServerId(1)), a);
        table.hold(a);
        table.collect(|_| false);
        assert_eq!(table.len(), 1, "a held slot stays");
        assert!(table.get(b).is_none());
        table.unhold(a);
        table.collect(|id| id == ServerId(1));
        assert_eq!(table.len(), 1, "a kept key stays");
        table.collect(|_| false);
        assert!(table.is_empty());
    }
}
