//! Moves each listener's connection-rate budget toward the shards that see the demand.
//!
//! Every shard refills its own token bucket with its fraction of `connections_per_second`; the
//! fractions always add up to 1, so the shards together never admit more than the configured
//! rate (plus the burst). Once a second the control thread measures each shard's demand from
//! its published counters (connections admitted plus those refused for rate, per second between
//! two publications, smoothed over a few seconds) and hands out new fractions
//! (`admission::rate_shares`).

use std::collections::HashMap;
use std::time::Instant;

use crate::admission::rate_shares;
use crate::metrics::{Merged, RejectKind};
use crate::snapshot::{ListenerId, Snapshot};

/// Weight of the last second's demand in the smoothed demand (a half-life of about 1.5 s).
const SMOOTHING: f64 = 0.4;

#[derive(Default)]
pub struct RateBalancer {
    /// Per listener and shard: the count and time of the last publication seen, and the
    /// smoothed demand (per second).
    seen: HashMap<(ListenerId, usize), (u64, Instant, Option<f64>)>,
}

impl RateBalancer {
    /// New fractions per shard (`result[shard]`) for every listener with a connection rate.
    pub fn update(
        &mut self,
        merged: &Merged,
        snapshot: &Snapshot,
        shards: usize,
    ) -> Vec<Vec<(ListenerId, f64)>> {
        let mut result = vec![Vec::new(); shards];
        if shards < 2 {
            return result;
        }
        let rate_index = RejectKind::ALL
            .iter()
            .position(|kind| *kind == RejectKind::Rate)
            .unwrap_or(0);
        let limited = snapshot
            .listeners
            .iter()
            .filter(|listener| listener.admission.limits.is_some());
        for listener in limited {
            let mut demand: Vec<Option<f64>> = vec![None; shards];
            for published in &merged.shards {
                let Some((_, counters)) = published
                    .listeners
                    .iter()
                    .find(|(id, _)| *id == listener.id)
                else {
                    continue;
                };
                let count = counters.accepted + counters.rejected[rate_index];
                let key = (listener.id, published.shard);
                let smoothed = match self.seen.get(&key) {
                    Some(&(last_count, last_at, smoothed)) if published.at > last_at => {
                        let seconds = published.at.duration_since(last_at).as_secs_f64();
                        let now = count.saturating_sub(last_count) as f64 / seconds.max(1e-3);
                        // Smoothed over a few seconds: bursty clients do not swing the shares
                        // from one second to the next.
                        Some(smoothed.map_or(now, |old| SMOOTHING * now + (1.0 - SMOOTHING) * old))
                    }
                    Some(&(_, _, smoothed)) => smoothed,
                    None => None,
                };
                self.seen.insert(key, (count, published.at, smoothed));
                if let Some(slot) = demand.get_mut(published.shard) {
                    *slot = smoothed;
                }
            }
            // Until every shard has a measured demand, the shares stay as they are.
            let Some(demand) = demand.into_iter().collect::<Option<Vec<f64>>>() else {
                continue;
            };
            let rate = listener
                .admission
                .limits
                .map_or(0.0, |limits| limits.per_second as f64);
            for (shard, share) in rate_shares(&demand, rate).into_iter().enumerate() {
                result[shard].push((listener.id, share));
            }
        }
        let live: std::collections::HashSet<ListenerId> = snapshot
            .listeners
            .iter()
            .map(|listener| listener.id)
            .collect();
        self.seen.retain(|(id, _), _| live.contains(id));
        result
    }
}
