//! Rate limits for repetitive warnings: a server refusing every connect, or a listener out of
//! descriptors, logs once per interval with the count of what was not logged.
//!
//! Pure: time comes in as loop ticks. Keys come from bounded sets (servers, listeners, kinds
//! of event), never from clients, so the table stays small.

use std::collections::HashMap;

/// What to log about one event kind under a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Log it, with how many were suppressed since the last one logged.
    Log {
        suppressed: u64,
    },
    Suppress,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    last: u64,
    suppressed: u64,
}

pub struct LogLimiter {
    interval: u64,
    entries: HashMap<u64, Entry>,
}

impl LogLimiter {
    /// At most one log per key per `interval` ticks.
    pub fn new(interval: u64) -> LogLimiter {
        LogLimiter {
            interval: interval.max(1),
            entries: HashMap::new(),
        }
    }

    pub fn check(&mut self, key: u64, now: u64) -> Verdict {
        match self.entries.get_mut(&key) {
            Some(entry) if now < entry.last + self.interval => {
                entry.suppressed += 1;
                Verdict::Suppress
            }
            Some(entry) => {
                let suppressed = entry.suppressed;
                *entry = Entry {
                    last: now,
                    suppressed: 0,
                };
                Verdict::Log { suppressed }
            }
            None => {
                self.entries.insert(
                    key,
                    Entry {
                        last: now,
                        suppressed: 0,
                    },
                );
                Verdict::Log { suppressed: 0 }
            }
        }
    }
}

/// A key from an event kind and two small numbers (pool and server, listener, ...).
pub fn key(kind: u8, first: usize, second: usize) -> u64 {
    (u64::from(kind) << 56) ^ ((first as u64) << 28) ^ second as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_once_per_interval_with_the_count_suppressed() {
        let mut limiter = LogLimiter::new(10);
        let server = key(1, 0, 3);
        assert_eq!(limiter.check(server, 0), Verdict::Log { suppressed: 0 });
        for now in 1..10 {
            assert_eq!(limiter.check(server, now), Verdict::Suppress);
        }
        assert_eq!(limiter.check(server, 10), Verdict::Log { suppressed: 9 });
        // Another key has its own budget.
        assert_eq!(
            limiter.check(key(1, 0, 4), 11),
            Verdict::Log { suppressed: 0 }
        );
        assert_eq!(limiter.check(server, 25), Verdict::Log { suppressed: 0 });
    }
}
