//! Admission of accepted connections: the listener's connection limit, split across shards.
//!
//! Pure arithmetic, no sockets. A shard never asks another shard anything, so a listener's
//! `max_connections` is divided into fixed per-shard shares that add up to exactly the limit:
//! the total is never exceeded, but a shard whose share is used up turns a connection away even
//! if another shard still has room (the kernel's SO_REUSEPORT spread is even on average).

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The listener's (shard share of) max_connections is reached.
    ListenerFull,
    /// The proxy is draining for shutdown.
    Draining,
}

pub fn admit(active: u32, share: u32, draining: bool) -> Admission {
    if draining {
        Admission::Reject(RejectReason::Draining)
    } else if active >= share {
        Admission::Reject(RejectReason::ListenerFull)
    } else {
        Admission::Accept
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
