//! Admission of accepted connections: the listener's connection cap, its ACL, its connection
//! rate, per-source rates and connection counts; and the settings of the bandwidth caps and the
//! first-byte timeout the session then carries.
//!
//! Pure and sans-IO: the shard hands in an address and its clock, a `Gate` answers. One `Gate`
//! per listener per shard; nothing is shared between shards. A listener-wide budget (the
//! connection cap, the connection rate) is split into per-shard shares: the cap in fixed shares
//! that add up to it exactly, the rate in shares the control thread moves toward the shards that
//! see the demand (`rate_shares`). Checks run right after accept, before any per-session state.
//! A second check of the same connection (the address a PROXY protocol header carries) is the
//! same call: `release` the first slot, `check` the new address.

pub mod acl;
pub mod bucket;
pub mod source;
pub mod steer;

use std::net::IpAddr;
use std::time::Duration;

pub use acl::Acl;
pub use bucket::TokenBucket;
pub use source::{SourceRefusal, SourceSettings, SourceTable, source_key};

/// How accepts are spread across shards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Steer {
    /// The kernel's SO_REUSEPORT hash of the 4-tuple.
    #[default]
    Kernel,
    /// A hash of the client address (BPF): one shard per address.
    Source,
}

impl Steer {
    pub fn name(self) -> &'static str {
        match self {
            Steer::Kernel => "kernel",
            Steer::Source => "source",
        }
    }
}

/// How a refused connection is closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RejectMode {
    /// FIN.
    #[default]
    Close,
    /// RST (SO_LINGER 0).
    Reset,
}

impl RejectMode {
    pub fn name(self) -> &'static str {
        match self {
            RejectMode::Close => "close",
            RejectMode::Reset => "reset",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_second: u64,
    pub burst: u64,
}

/// A listener's admission keys, resolved.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AdmissionSettings {
    pub acl: Acl,
    /// `[listener.limits]`: new connections per second, listener-wide.
    pub limits: Option<RateLimit>,
    pub per_source: Option<SourceSettings>,
    pub steer: Steer,
    pub reject: RejectMode,
    /// A client that sends nothing for this long after connecting is closed.
    pub first_byte_timeout: Option<Duration>,
    /// Bytes per second per session, client to server.
    pub upload_rate: Option<u64>,
    /// Bytes per second per session, server to client.
    pub download_rate: Option<u64>,
    /// Bytes per second, both directions of every session of the listener together.
    pub bandwidth: Option<u64>,
}

impl AdmissionSettings {
    /// Whether the checks need the client's address.
    pub fn needs_address(&self) -> bool {
        !self.acl.is_empty() || self.per_source.is_some()
    }
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// Denied by the ACL.
    Acl,
    /// The listener's connections per second.
    Rate,
    /// The client address's connections per second.
    SourceRate,
    /// The client address's open connections.
    SourceConnections,
    /// The per-source table is full of addresses with open connections.
    SourceTableFull,
    /// The listener's (shard share of) max_connections is reached.
    ListenerFull,
    /// The process's (shard share of) `runtime.max_connections` is reached.
    ProcessFull,
    /// The proxy is draining for shutdown.
    Draining,
    /// The client's TLS handshake failed or did not finish in time.
    TlsHandshake,
}

impl RejectReason {
    pub const ALL: [RejectReason; 9] = [
        RejectReason::Acl,
        RejectReason::Rate,
        RejectReason::SourceRate,
        RejectReason::SourceConnections,
        RejectReason::SourceTableFull,
        RejectReason::ListenerFull,
        RejectReason::ProcessFull,
        RejectReason::Draining,
        RejectReason::TlsHandshake,
    ];

    /// The `reason` label of metrics and `/status`.
    pub fn name(self) -> &'static str {
        match self {
            RejectReason::Acl => "acl",
            RejectReason::Rate => "rate",
            RejectReason::SourceRate => "source_rate",
            RejectReason::SourceConnections => "source_connections",
            RejectReason::SourceTableFull => "source_table_full",
            RejectReason::ListenerFull => "listener_full",
            RejectReason::ProcessFull => "process_full",
            RejectReason::Draining => "draining",
            RejectReason::TlsHandshake => "tls_handshake",
        }
    }
}

/// The share of `limit` that shard `shard` of `shards` enforces.
pub fn shard_share(limit: u32, shard: usize, shards: usize) -> u32 {
    let shards = shards.max(1) as u64;
    let limit = u64::from(limit);
    let base = limit / shards;
    let extra = u64::from((shard as u64) < limit % shards);
    (base + extra) as u32
}

/// The decision for one accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Accept,
    Reject(RejectReason),
}

/// The checks that need no address: shutdown and the connection caps.
pub fn admit(active: u32, share: u32, draining: bool) -> Admission {
    if draining {
        Admission::Reject(RejectReason::Draining)
    } else if active >= share {
        Admission::Reject(RejectReason::ListenerFull)
    } else {
        Admission::Accept
    }
}

/// Splits a listener-wide rate of `rate` connections per second among shards by the demand
/// each saw (connections per second admitted plus refused for rate, recently). Each shard's
/// weight is its demand plus a tenth of an even share of the rate: while demand is well below
/// the rate the split stays near even (a shard that sees its first clients is not shut out),
/// and as demand passes the rate the split follows it. The fractions add up to 1, so the shards
/// together never get more than the configured rate.
pub fn rate_shares(demand: &[f64], rate: f64) -> Vec<f64> {
    let shards = demand.len().max(1) as f64;
    let floor = (rate / shards / 10.0).max(1e-9);
    let weights: Vec<f64> = demand.iter().map(|&d| d.max(0.0) + floor).collect();
    let sum: f64 = weights.iter().sum();
    weights.iter().map(|weight| weight / sum).collect()
}

/// One listener's admission state on one shard.
#[derive(Debug)]
pub struct Gate {
    settings: AdmissionSettings,
    /// This shard's fraction of the listener-wide rate.
    share: f64,
    rate: Option<TokenBucket>,
    sources: Option<SourceTable>,
}

fn share_of(limit: RateLimit, share: f64) -> (u128, u64) {
    let micro_rate = (limit.per_second as f64 * 1e6 * share) as u128;
    let burst = ((limit.burst as f64 * share).round() as u64).max(1);
    (micro_rate, burst)
}

impl Gate {
    pub fn new(settings: AdmissionSettings, share: f64, now_us: u64) -> Gate {
        let rate = settings.limits.map(|limit| {
            let (micro_rate, burst) = share_of(limit, share);
            TokenBucket::with_micro_rate(micro_rate, burst, now_us)
        });
        let sources = settings.per_source.clone().map(SourceTable::new);
        Gate {
            settings,
            share,
            rate,
            sources,
        }
    }

    pub fn settings(&self) -> &AdmissionSettings {
        &self.settings
    }

    /// New settings from a reload: buckets and per-source entries of keys that did not change
    /// keep their state; changed keys apply to the next connection.
    pub fn reconfigure(&mut self, settings: AdmissionSettings, now_us: u64) {
        if settings == self.settings {
            return;
        }
        match (settings.limits, self.rate.as_mut()) {
            (Some(limit), Some(bucket)) => {
                if Some(limit) != self.settings.limits {
                    let (micro_rate, burst) = share_of(limit, self.share);
                    bucket.reconfigure(micro_rate, burst, now_us);
                }
            }
            (Some(limit), None) => {
                let (micro_rate, burst) = share_of(limit, self.share);
                self.rate = Some(TokenBucket::with_micro_rate(micro_rate, burst, now_us));
            }
            (None, _) => self.rate = None,
        }
        match (&settings.per_source, self.sources.as_mut()) {
            (Some(per_source), Some(table)) => {
                if table.settings() != per_source {
                    table.reconfigure(per_source.clone());
                }
            }
            // A table that goes keeps counting the connections it admitted until they close
            // (`release`), so it is kept but no longer consulted.
            (Some(per_source), None) => self.sources = Some(SourceTable::new(per_source.clone())),
            (None, _) => {}
        }
        self.settings = settings;
    }

    /// This shard's fraction of the listener-wide rate (from the control thread).
    pub fn set_share(&mut self, share: f64, now_us: u64) {
        self.share = share.clamp(0.0, 1.0);
        if let (Some(limit), Some(bucket)) = (self.settings.limits, self.rate.as_mut()) {
            let (micro_rate, burst) = share_of(limit, self.share);
            bucket.reconfigure(micro_rate, burst, now_us);
        }
    }

    pub fn share(&self) -> f64 {
        self.share
    }

    /// Checks a connection from `address` (None when the checks need no address) and, when it
    /// is admitted, takes its tokens. `Ok(Some(slot))`: the per-source slot to `release` when
    /// the connection closes.
    pub fn check(
        &mut self,
        address: Option<IpAddr>,
        now_us: u64,
    ) -> Result<Option<u32>, RejectReason> {
        let source = match address {
            Some(address) => {
                if !self.settings.acl.permits(address) {
                    return Err(RejectReason::Acl);
                }
                match (&self.settings.per_source, self.sources.as_mut()) {
                    (Some(settings), Some(table)) => {
                        let key = source_key(address, settings.ipv6_prefix);
                        let slot = table.check(key, now_us).map_err(|refusal| match refusal {
                            SourceRefusal::Rate => RejectReason::SourceRate,
                            SourceRefusal::Connections => RejectReason::SourceConnections,
                            SourceRefusal::TableFull => RejectReason::SourceTableFull,
                        })?;
                        Some(slot)
                    }
                    _ => None,
                }
            }
            None => None,
        };
        if let Some(bucket) = self.rate.as_mut()
            && !bucket.try_take(1, now_us)
        {
            return Err(RejectReason::Rate);
        }
        if let (Some(slot), Some(table)) = (source, self.sources.as_mut()) {
            table.commit(slot);
        }
        Ok(source)
    }

    /// A connection admitted with per-source `slot` closed.
    pub fn release(&mut self, slot: u32, now_us: u64) {
        if let Some(table) = self.sources.as_mut() {
            table.release(slot, now_us);
        }
    }

    /// Forgets expired per-source entries, a few at a time.
    pub fn sweep(&mut self, now_us: u64) {
        if let Some(table) = self.sources.as_mut() {
            table.sweep(now_us, 512);
        }
    }

    /// Whole tokens of the listener-wide bucket now (its shard share).
    pub fn tokens(&mut self, now_us: u64) -> Option<u64> {
        self.rate.as_mut().map(|bucket| bucket.tokens(now_us))
    }

    /// Addresses in the per-source table and how many were evicted.
    pub fn source_table(&self) -> Option<(usize, u64)> {
        self.sources
            .as_ref()
            .filter(|_| self.settings.per_source.is_some())
            .map(|table| (table.len(), table.evictions()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000;

    #[test]
    fn shares_add_up_to_the_limit() {
        for limit in [0u32, 1, 2, 3, 7, 100, 100_001] {
            for shards in 1..=5 {
                let total: u64 = (0..shards)
                    .map(|shard| u64::from(shard_share(limit, shard, shards)))
                    .sum();
                assert_eq!(total, u64::from(limit), "limit {limit} shards {shards}");
            }
        }
    }

    #[test]
    fn admits_until_the_share_is_used() {
        assert_eq!(admit(0, 1, false), Admission::Accept);
        assert_eq!(
            admit(1, 1, false),
            Admission::Reject(RejectReason::ListenerFull)
        );
        assert_eq!(admit(0, 5, true), Admission::Reject(RejectReason::Draining));
    }

    fn settings() -> AdmissionSettings {
        AdmissionSettings {
            acl: Acl {
                allow: Some(vec!["127.0.0.0/8".parse().unwrap()]),
                deny: vec!["127.0.0.66/32".parse().unwrap()],
            },
            limits: Some(RateLimit {
                per_second: 1000,
                burst: 200,
            }),
            per_source: Some(SourceSettings {
                rate: Some((20, 40)),
                max_connections: Some(50),
                ipv6_prefix: 64,
                table_size: 100,
                expire_us: 60 * SECOND,
            }),
            ..AdmissionSettings::default()
        }
    }

    fn ip(text: &str) -> Option<IpAddr> {
        Some(text.parse().unwrap())
    }

    #[test]
    fn checks_run_acl_then_source_then_rate() {
        let mut gate = Gate::new(settings(), 1.0, 0);
        assert_eq!(gate.check(ip("127.0.0.66"), 0), Err(RejectReason::Acl));
        assert_eq!(gate.check(ip("10.0.0.1"), 0), Err(RejectReason::Acl));
        let admitted = (0..100)
            .filter(|_| gate.check(ip("127.0.0.5"), 0).is_ok())
            .count();
        assert_eq!(admitted, 40);
        assert_eq!(
            gate.check(ip("127.0.0.5"), 0),
            Err(RejectReason::SourceRate)
        );
        // 127.0.0.5 holds one of the table's 100 places with open connections; 99 more
        // addresses fit, then the table is full of addresses with open connections.
        let admitted = (0..200u32)
            .filter(|n| {
                let address = IpAddr::from([127, 1, (n >> 8) as u8, *n as u8]);
                gate.check(Some(address), 0).is_ok()
            })
            .count();
        assert_eq!(admitted, 99);
        assert_eq!(
            gate.check(ip("127.2.0.1"), 0),
            Err(RejectReason::SourceTableFull)
        );
        assert_eq!(gate.source_table(), Some((100, 0)));
    }

    #[test]
    fn the_listener_rate_refuses_without_taking_the_sources_token() {
        let mut gate = Gate::new(
            AdmissionSettings {
                limits: Some(RateLimit {
                    per_second: 1,
                    burst: 1,
                }),
                ..settings()
            },
            1.0,
            0,
        );
        assert!(gate.check(ip("127.0.0.5"), 0).is_ok());
        assert_eq!(gate.check(ip("127.0.0.5"), 0), Err(RejectReason::Rate));
        assert_eq!(gate.check(ip("127.0.0.6"), 0), Err(RejectReason::Rate));
        assert!(gate.check(ip("127.0.0.5"), SECOND).is_ok());
    }

    #[test]
    fn a_released_connection_frees_its_sources_place() {
        let mut gate = Gate::new(
            AdmissionSettings {
                per_source: Some(SourceSettings {
                    rate: None,
                    max_connections: Some(2),
                    ipv6_prefix: 64,
                    table_size: 100,
                    expire_us: SECOND,
                }),
                ..AdmissionSettings::default()
            },
            1.0,
            0,
        );
        let first = gate.check(ip("::1"), 0).unwrap().unwrap();
        gate.check(ip("::1"), 0).unwrap();
        assert_eq!(
            gate.check(ip("::1"), 0),
            Err(RejectReason::SourceConnections)
        );
        // Another address of the same /64 is the same source.
        assert_eq!(
            gate.check(ip("::2"), 0),
            Err(RejectReason::SourceConnections)
        );
        gate.release(first, 0);
        assert!(gate.check(ip("::1"), 0).is_ok());
        let mut settings = gate.settings().clone();
        settings.acl.deny = vec!["::1/128".parse().unwrap()];
        gate.reconfigure(settings, 0);
        assert_eq!(gate.check(ip("::1"), 0), Err(RejectReason::Acl));
    }

    #[test]
    fn a_reload_keeps_the_buckets_of_unchanged_keys() {
        let mut gate = Gate::new(settings(), 1.0, 0);
        for _ in 0..40 {
            gate.check(ip("127.0.0.5"), 0).unwrap();
        }
        let mut changed = settings();
        changed.acl.deny.push("127.0.0.7/32".parse().unwrap());
        gate.reconfigure(changed.clone(), 0);
        assert_eq!(gate.tokens(0), Some(160));
        assert_eq!(
            gate.check(ip("127.0.0.5"), 0),
            Err(RejectReason::SourceRate)
        );
        assert_eq!(gate.check(ip("127.0.0.7"), 0), Err(RejectReason::Acl));
        // A new listener rate keeps the tokens (up to the new burst).
        changed.limits = Some(RateLimit {
            per_second: 10,
            burst: 100,
        });
        gate.reconfigure(changed, 0);
        assert_eq!(gate.tokens(0), Some(100));
    }

    #[test]
    fn no_keys_admit_everything_without_an_address() {
        let mut gate = Gate::new(AdmissionSettings::default(), 0.5, 0);
        assert!(!gate.settings().needs_address());
        for _ in 0..1000 {
            assert_eq!(gate.check(None, 0), Ok(None));
        }
    }

    #[test]
    fn rate_shares_follow_demand_and_add_up_to_one() {
        let even = rate_shares(&[0.0, 0.0], 1000.0);
        assert_eq!(even, vec![0.5, 0.5]);
        // Demand far below the rate: no reason to move much.
        let light = rate_shares(&[5.0, 0.0], 1000.0);
        assert!((light[0] - 0.52).abs() < 0.01, "{light:?}");
        // Demand over the rate follows it.
        let skewed = rate_shares(&[9000.0, 1000.0], 1000.0);
        assert!((skewed[0] - 0.896).abs() < 0.001, "{skewed:?}");
        // Fully skewed at the rate: the idle shard keeps under 5%.
        let idle = rate_shares(&[1000.0, 0.0], 1000.0);
        assert!(idle[1] > 0.04 && idle[1] < 0.05, "{idle:?}");
        for demand in [vec![1.0, 2.0, 3.0], vec![0.0, 0.0, 7.0], vec![5.0]] {
            let sum: f64 = rate_shares(&demand, 10.0).iter().sum();
            assert!((sum - 1.0).abs() < 1e-9);
        }
    }

    #[test]
    fn two_shards_with_rebalanced_shares_admit_the_configured_total() {
        // All demand lands on shard 0 (a skewed kernel spread): after one rebalance, the two
        // together still admit about 1,000 per second.
        let limit = RateLimit {
            per_second: 1000,
            burst: 200,
        };
        let settings = AdmissionSettings {
            limits: Some(limit),
            ..AdmissionSettings::default()
        };
        let mut gates = [
            Gate::new(settings.clone(), 0.5, 0),
            Gate::new(settings, 0.5, 0),
        ];
        let mut admitted = 0u64;
        let mut demand = [0u64, 0];
        for step in 0..100_000u64 {
            let now = step * 100;
            if step % 10_000 == 0 && step > 0 {
                let shares = rate_shares(&demand.map(|d| d as f64), 1000.0);
                for (gate, share) in gates.iter_mut().zip(shares) {
                    gate.set_share(share, now);
                }
                demand = [0, 0];
            }
            // 9 of 10 attempts reach shard 0.
            let shard = usize::from(step % 10 == 9);
            demand[shard] += 1;
            if gates[shard].check(None, now).is_ok() {
                admitted += 1;
            }
        }
        // 10 s at 1,000/s plus the burst; the first second runs on even shares (shard 0 gets
        // 500/s of its 9,000/s demand, shard 1 all of its 1,000/s up to its 500/s).
        assert!((9_000..=10_200).contains(&admitted), "admitted {admitted}");
    }
}
