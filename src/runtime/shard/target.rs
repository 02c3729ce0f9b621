//! Where a session goes: a pool, or a split's side for it (blue/green and canary releases).
//! The choice itself is `balance::split`'s (pure); this keeps each split's round-robin state
//! per shard and the sessions-per-side counters.

use std::sync::Arc;

use super::Shard;
use crate::balance::client_key;
use crate::balance::split::{SplitPicker, sticky_side};
use crate::config::Sticky;
use crate::snapshot::{Destination, PoolId, SplitSnapshot};

/// A session's split-side counters slot when it came through no split.
pub(super) const NO_SPLIT: u32 = u32::MAX;

impl Shard {
    /// A provisional pool for a session whose destination is settled later (after its PROXY
    /// header or its route): the pool itself, or a split's first side.
    pub(super) fn provisional_pool(&self, destination: Destination) -> Option<PoolId> {
        match destination {
            Destination::Pool(pool) => Some(pool),
            Destination::Split(id) => self
                .snapshot
                .split(id)
                .and_then(|split| split.backends.first().map(|(pool, _)| *pool)),
        }
    }

    /// Sends session `index` to `destination`: its pool, or the side its split picks for it
    /// now (sticky splits by the client's address: the one a PROXY header carried, if any).
    /// False when the split is gone (a reload removed it meanwhile).
    pub(super) fn settle(&mut self, index: usize, destination: Destination) -> bool {
        let (pool, split) = match destination {
            Destination::Pool(pool) => (pool, None),
            Destination::Split(id) => {
                let snapshot = std::rc::Rc::clone(&self.snapshot);
                let Some(split) = snapshot.split(id) else {
                    return false;
                };
                let Some(side) = self.pick_side(index, split) else {
                    return false;
                };
                (split.backends[side].0, Some(id))
            }
        };
        self.release_split(index);
        let session = &mut self.sessions[index];
        if pool != session.pool {
            self.counters.pools.unhold(session.pool_counters);
            session.pool = pool;
            session.pool_counters = self.counters.pools.slot(pool);
            self.counters.pools.hold(session.pool_counters);
        }
        if let Some(id) = split {
            let slot = self.counters.splits.slot((id, pool));
            self.counters.splits.hold(slot);
            if let Some(counters) = self.counters.splits.get_mut(slot) {
                counters.active += 1;
                counters.sessions += 1;
            }
            self.sessions[index].split_counters = u32::try_from(slot).unwrap_or(NO_SPLIT);
        }
        true
    }

    fn pick_side(&mut self, index: usize, split: &Arc<SplitSnapshot>) -> Option<usize> {
        let weights: Vec<u32> = split.backends.iter().map(|(_, weight)| *weight).collect();
        match split.sticky {
            Sticky::Source => {
                let address = self.client_ip(index)?;
                sticky_side(&weights, client_key(address))
            }
            Sticky::None => {
                let entry = self
                    .split_pickers
                    .entry(split.id)
                    .or_insert_with(|| (Arc::clone(split), SplitPicker::new(&weights)));
                if !Arc::ptr_eq(&entry.0, split) {
                    *entry = (Arc::clone(split), SplitPicker::new(&weights));
                }
                entry.1.pick()
            }
        }
    }

    /// The client's hash key, when its (settled) pool balances by client address.
    pub(super) fn refresh_client_key(&mut self, index: usize) {
        let Some(session) = self.sessions.get(index) else {
            return;
        };
        if self
            .snapshot
            .pool(session.pool)
            .is_some_and(|pool| pool.balance.needs_client_address())
        {
            let key = self.client_ip(index).map(client_key).unwrap_or(0);
            self.sessions[index].client_key = key;
        }
    }

    /// The session leaves its split side (it ends, or is sent elsewhere).
    pub(super) fn release_split(&mut self, index: usize) {
        let Some(session) = self.sessions.get_mut(index) else {
            return;
        };
        let slot = std::mem::replace(&mut session.split_counters, NO_SPLIT);
        if slot == NO_SPLIT {
            return;
        }
        let slot = slot as usize;
        if let Some(counters) = self.counters.splits.get_mut(slot) {
            counters.active = counters.active.saturating_sub(1);
        }
        self.counters.splits.unhold(slot);
    }
}
