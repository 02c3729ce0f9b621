//! Bandwidth caps (`upload_rate`, `download_rate` per session, `bandwidth` per listener):
//! enforced by not arming a direction's next receive until its buckets are out of debt, so a
//! capped direction never holds more than the one receive it already took. Nothing is
//! buffered beyond what an uncapped session holds.
//!
//! A receive is paid for when it returns (its size is only known then), so a bucket may go into
//! debt by up to one receive; the direction then waits until the debt is refilled. The
//! listener-wide `bandwidth` is split evenly across shards.

use std::cmp::Reverse;

use super::Shard;
use crate::admission::TokenBucket;
use crate::relay::Side;

/// A session's caps: its own buckets and its listener's shared one.
#[derive(Debug)]
pub struct Throttle {
    pub upload: Option<TokenBucket>,
    pub download: Option<TokenBucket>,
    /// The listener's slab key on this shard (checked against the session's listener epoch
    /// before use).
    pub listener_key: usize,
    /// A resume of this side's receives is queued.
    pub queued: [bool; 2],
}

/// A session bucket for `rate` bytes per second: it holds a tenth of a second's worth (at least
/// one byte), so an idle direction cannot save up a long burst.
pub(super) fn rate_bucket(rate: u64, now_us: u64) -> TokenBucket {
    TokenBucket::new(rate, (rate / 10).max(1), now_us)
}

fn side_index(side: Side) -> usize {
    match side {
        Side::Client => 0,
        Side::Server => 1,
    }
}

impl Shard {
    /// The session's caps, when its listener has any.
    pub(super) fn new_throttle(&self, listener_key: usize) -> Option<Box<Throttle>> {
        let listener = self.listeners.get(listener_key)?;
        let settings = listener.gate.settings();
        if settings.upload_rate.is_none()
            && settings.download_rate.is_none()
            && listener.bandwidth.is_none()
        {
            return None;
        }
        Some(Box::new(Throttle {
            upload: settings
                .upload_rate
                .map(|rate| rate_bucket(rate, self.now_us)),
            download: settings
                .download_rate
                .map(|rate| rate_bucket(rate, self.now_us)),
            listener_key,
            queued: [false; 2],
        }))
    }

    /// Charges a receive of `bytes` from `source` to the session's and its listener's buckets.
    pub(super) fn charge_receive(&mut self, index: usize, source: Side, bytes: u64) {
        let now_us = self.now_us;
        let Some(session) = self.sessions.get_mut(index) else {
            return;
        };
        let epoch = session.listener_epoch;
        let Some(throttle) = session.throttle.as_deref_mut() else {
            return;
        };
        let own = match source {
            Side::Client => throttle.upload.as_mut(),
            Side::Server => throttle.download.as_mut(),
        };
        if let Some(bucket) = own {
            bucket.charge(bytes, now_us);
        }
        if let Some(listener) = self.listeners.get_mut(throttle.listener_key)
            && listener.epoch == epoch
            && let Some(bucket) = listener.bandwidth.as_mut()
        {
            bucket.charge(bytes, now_us);
        }
    }

    /// Microseconds the next receive from `source` must wait (0: go ahead).
    fn receive_wait(&mut self, index: usize, source: Side) -> u64 {
        let now_us = self.now_us;
        let Some(session) = self.sessions.get_mut(index) else {
            return 0;
        };
        let epoch = session.listener_epoch;
        let Some(throttle) = session.throttle.as_deref_mut() else {
            return 0;
        };
        let own = match source {
            Side::Client => throttle.upload.as_mut(),
            Side::Server => throttle.download.as_mut(),
        };
        let mut wait = own.map_or(0, |bucket| bucket.wait_us(now_us));
        if let Some(listener) = self.listeners.get_mut(throttle.listener_key)
            && listener.epoch == epoch
            && let Some(bucket) = listener.bandwidth.as_mut()
        {
            wait = wait.max(bucket.wait_us(now_us));
        }
        wait
    }

    /// Whether a receive the relay asked for must wait for the caps. If so it is taken back
    /// from the relay (as if cancelled) and a resume is queued for when the debt is paid.
    pub(super) fn hold_receive(&mut self, index: usize, source: Side) -> bool {
        let wait = self.receive_wait(index, source);
        if wait == 0 {
            return false;
        }
        let due = self.now_us.saturating_add(wait.min(10_000_000));
        let Some(session) = self.sessions.get_mut(index) else {
            return false;
        };
        session.relay.take_back_receive(source);
        let generation = session.generation;
        if let Some(throttle) = session.throttle.as_deref_mut()
            && !throttle.queued[side_index(source)]
        {
            throttle.queued[side_index(source)] = true;
            self.throttled
                .push(Reverse((due, index, generation, side_index(source) as u8)));
        }
        true
    }

    /// Arms the receives whose wait is over.
    pub(super) fn resume_throttled(&mut self) {
        let mut actions = std::mem::take(&mut self.actions);
        while let Some(Reverse((due, index, generation, side))) = self.throttled.peek().copied() {
            if due > self.now_us {
                break;
            }
            self.throttled.pop();
            let source = if side == 0 {
                Side::Client
            } else {
                Side::Server
            };
            let Some(session) = self.sessions.get_mut(index) else {
                continue;
            };
            if session.generation != generation {
                continue;
            }
            if let Some(throttle) = session.throttle.as_deref_mut() {
                throttle.queued[usize::from(side)] = false;
            }
            if session.closing {
                continue;
            }
            session
                .relay
                .resume_receive(source, self.now_tick, &mut actions);
            self.execute(index, &mut actions);
        }
        self.actions = actions;
    }

    /// How long the loop may sleep before a held receive is due (None: none is held).
    pub(super) fn next_resume_us(&self) -> Option<u64> {
        self.throttled
            .peek()
            .map(|Reverse((due, ..))| due.saturating_sub(self.now_us))
    }
}
