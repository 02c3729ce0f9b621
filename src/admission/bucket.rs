//! A token bucket in integer arithmetic: connections per second for admission, bytes per second
//! for bandwidth caps.
//!
//! Levels are kept in micro-tokens so a per-shard share of a small rate (0.5 connections per
//! second) still refills exactly. A byte bucket may go into debt: a receive is only known to be
//! over budget once it returned, and the debt is what the direction then waits for.

/// Micro-tokens per token.
const UNIT: u128 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenBucket {
    /// Micro-tokens added per second.
    rate: u128,
    /// Most micro-tokens the bucket holds.
    capacity: u128,
    /// Micro-tokens now; negative is debt.
    level: i128,
    /// When `level` was last brought up to date (microseconds on the caller's clock).
    updated_us: u64,
    /// The part of a micro-token the last refill earned but could not add (in millionths), so
    /// frequent refills of a small rate lose nothing.
    carry: u128,
}

impl TokenBucket {
    /// A full bucket refilling `rate` tokens per second and holding at most `burst`.
    pub fn new(rate: u64, burst: u64, now_us: u64) -> TokenBucket {
        Self::with_micro_rate(u128::from(rate) * UNIT, burst, now_us)
    }

    /// As `new`, with the rate in micro-tokens per second (a fractional per-shard share).
    pub fn with_micro_rate(micro_rate: u128, burst: u64, now_us: u64) -> TokenBucket {
        let capacity = u128::from(burst.max(1)) * UNIT;
        TokenBucket {
            rate: micro_rate,
            capacity,
            level: capacity as i128,
            updated_us: now_us,
            carry: 0,
        }
    }

    /// Changes rate and burst, keeping the tokens it holds (at most the new burst).
    pub fn reconfigure(&mut self, micro_rate: u128, burst: u64, now_us: u64) {
        self.refill(now_us);
        self.rate = micro_rate;
        self.capacity = u128::from(burst.max(1)) * UNIT;
        self.level = self.level.min(self.capacity as i128);
    }

    fn refill(&mut self, now_us: u64) {
        let elapsed = now_us.saturating_sub(self.updated_us);
        self.updated_us = self.updated_us.max(now_us);
        if self.level >= self.capacity as i128 {
            self.carry = 0;
            return;
        }
        if elapsed == 0 {
            return;
        }
        // Cannot overflow: elapsed < 2^64 us and rate < 2^64 tokens/s in micro-tokens.
        let earned = u128::from(elapsed) * self.rate + self.carry;
        self.carry = earned % 1_000_000;
        let added = i128::try_from(earned / 1_000_000).unwrap_or(i128::MAX / 2);
        self.level = self.level.saturating_add(added).min(self.capacity as i128);
    }

    /// Whether `count` tokens are there now (without taking them).
    pub fn has(&mut self, count: u64, now_us: u64) -> bool {
        self.refill(now_us);
        self.level >= (u128::from(count) * UNIT) as i128
    }

    /// Takes `count` tokens if the bucket has them.
    pub fn try_take(&mut self, count: u64, now_us: u64) -> bool {
        if !self.has(count, now_us) {
            return false;
        }
        self.level -= (u128::from(count) * UNIT) as i128;
        true
    }

    /// Takes `count` tokens whether or not they are there (what was already received must be
    /// paid for); the bucket may go into debt.
    pub fn charge(&mut self, count: u64, now_us: u64) {
        self.refill(now_us);
        self.level -= (u128::from(count) * UNIT) as i128;
    }

    /// Microseconds until the bucket is out of debt (0: it is not in debt now).
    pub fn wait_us(&mut self, now_us: u64) -> u64 {
        self.refill(now_us);
        if self.level >= 0 {
            return 0;
        }
        if self.rate == 0 {
            return u64::MAX;
        }
        let missing = self.level.unsigned_abs();
        u64::try_from((missing * 1_000_000).div_ceil(self.rate)).unwrap_or(u64::MAX)
    }

    /// Whole tokens now (0 when in debt).
    pub fn tokens(&mut self, now_us: u64) -> u64 {
        self.refill(now_us);
        u64::try_from(self.level.max(0) as u128 / UNIT).unwrap_or(u64::MAX)
    }

    pub fn burst(&self) -> u64 {
        u64::try_from(self.capacity / UNIT).unwrap_or(u64::MAX)
    }

    /// Tokens per second (rounded down).
    pub fn rate(&self) -> f64 {
        self.rate as f64 / UNIT as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000;

    #[test]
    fn a_full_bucket_gives_its_burst_then_the_rate() {
        let mut bucket = TokenBucket::new(10, 5, 0);
        let taken = (0..100).filter(|_| bucket.try_take(1, 0)).count();
        assert_eq!(taken, 5);
        // One second refills 10 tokens, but the bucket holds at most 5.
        let taken = (0..100).filter(|_| bucket.try_take(1, SECOND)).count();
        assert_eq!(taken, 5);
        // A tenth of a second gives one token.
        assert!(bucket.try_take(1, SECOND + SECOND / 10));
        assert!(!bucket.try_take(1, SECOND + SECOND / 10));
    }

    #[test]
    fn over_ten_seconds_it_admits_rate_times_time_plus_burst() {
        let mut bucket = TokenBucket::new(1000, 200, 0);
        let mut admitted = 0u64;
        // Ask every 100 µs for 10 s: 100,000 attempts.
        for step in 0..100_000u64 {
            if bucket.try_take(1, step * 100) {
                admitted += 1;
            }
        }
        assert!((10_000..=10_200).contains(&admitted), "admitted {admitted}");
    }

    #[test]
    fn a_fractional_share_refills_exactly() {
        // Half a token per second.
        let mut bucket = TokenBucket::with_micro_rate(500_000, 1, 0);
        assert!(bucket.try_take(1, 0));
        assert!(!bucket.try_take(1, SECOND));
        assert!(bucket.try_take(1, 2 * SECOND));
    }

    #[test]
    fn frequent_refills_of_a_small_share_lose_nothing() {
        // A quarter of a token per second, refilled every 7 us for 8.1 s: 2 tokens (dropping
        // each refill's fraction would lose 43% and give 1).
        let mut bucket = TokenBucket::with_micro_rate(250_000, 1, 0);
        assert!(bucket.try_take(1, 0));
        let mut admitted = 0;
        for step in 1..=(81 * SECOND / 70) {
            if bucket.try_take(1, step * 7) {
                admitted += 1;
            }
        }
        assert_eq!(admitted, 2);
    }

    #[test]
    fn debt_is_waited_for() {
        let mut bucket = TokenBucket::new(1_000_000, 16_384, 0);
        bucket.charge(16_384 + 500_000, 0);
        assert_eq!(bucket.wait_us(0), SECOND / 2);
        assert_eq!(bucket.wait_us(SECOND / 4), SECOND / 4);
        assert_eq!(bucket.wait_us(SECOND), 0);
        assert_eq!(bucket.tokens(SECOND), 16_384);
    }

    #[test]
    fn reconfiguring_keeps_tokens_up_to_the_new_burst() {
        let mut bucket = TokenBucket::new(10, 100, 0);
        assert!(bucket.try_take(40, 0));
        bucket.reconfigure(20 * 1_000_000, 100, 0);
        assert_eq!(bucket.tokens(0), 60);
        bucket.reconfigure(20 * 1_000_000, 10, 0);
        assert_eq!(bucket.tokens(0), 10);
        assert_eq!(bucket.rate(), 20.0);
    }

    #[test]
    fn a_clock_that_goes_back_adds_nothing() {
        let mut bucket = TokenBucket::new(10, 1, 5 * SECOND);
        assert!(bucket.try_take(1, 5 * SECOND));
        assert!(!bucket.try_take(1, SECOND));
        assert!(bucket.try_take(1, 5 * SECOND + SECOND / 10));
    }
}
