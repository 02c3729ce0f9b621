//! Active health checks: the per-server state machine (pure) and the probes (`probe`, run by
//! the control thread, never by a shard).
//!
//! Owns rise/fall counting and what a result means for a server's up/down state. The state
//! machine takes results and `now` as arguments and does no I/O, so every transition is unit
//! tested; the probes do the I/O and report results here.

pub mod probe;

use std::time::{Duration, Instant};

use crate::config::{HealthCheck, StartState};

/// The outcome of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub ok: bool,
    /// Why it failed (timeout, refused, the first bytes of an unexpected answer, a status), or
    /// what succeeded ("connected", "status 200").
    pub reason: String,
    pub duration: Duration,
}

/// A state change the tracker decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    WentUp,
    WentDown,
}

/// One server's health as the checks see it.
#[derive(Debug, Clone)]
pub struct HealthTracker {
    up: bool,
    successes_in_a_row: u32,
    failures_in_a_row: u32,
    rise: u32,
    fall: u32,
    /// Why the server is in its state now (the result that changed it, or "starting").
    pub reason: String,
    pub last: Option<(Instant, CheckResult)>,
    pub changed_at: Instant,
    pub checks_ok: u64,
    pub checks_failed: u64,
    pub changes: u64,
    /// It was up before (a server rising for the first time does not slow-start, as in
    /// HAProxy: only a return after a failure does).
    pub was_up_before: bool,
}

impl HealthTracker {
    pub fn new(check: &HealthCheck, now: Instant) -> HealthTracker {
        let up = check.start == StartState::Up;
        HealthTracker {
            up,
            successes_in_a_row: 0,
            failures_in_a_row: 0,
            rise: check.rise.max(1),
            fall: check.fall.max(1),
            reason: if up {
                "starting (health.start = up)".to_string()
            } else {
                format!("starting: waiting for {} successful checks", check.rise)
            },
            last: None,
            changed_at: now,
            checks_ok: 0,
            checks_failed: 0,
            changes: 0,
            was_up_before: up,
        }
    }

    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Takes new rise/fall settings (a reload); the current state and counts stay.
    pub fn reconfigure(&mut self, check: &HealthCheck) {
        self.rise = check.rise.max(1);
        self.fall = check.fall.max(1);
    }

    /// Records a probe's result; returns the state change it causes, if any.
    pub fn record(&mut self, result: CheckResult, now: Instant) -> Option<Transition> {
        let transition = if result.ok {
            self.checks_ok += 1;
            self.failures_in_a_row = 0;
            self.successes_in_a_row = self.successes_in_a_row.saturating_add(1);
            (!self.up && self.successes_in_a_row >= self.rise).then_some(Transition::WentUp)
        } else {
            self.checks_failed += 1;
            self.successes_in_a_row = 0;
            self.failures_in_a_row = self.failures_in_a_row.saturating_add(1);
            (self.up && self.failures_in_a_row >= self.fall).then_some(Transition::WentDown)
        };
        if let Some(transition) = transition {
            if self.up {
                self.was_up_before = true;
            }
            self.up = transition == Transition::WentUp;
            self.changed_at = now;
            self.changes += 1;
            self.reason = result.reason.clone();
        } else if !self.up && !result.ok {
            // Down and still failing: the latest failure is the reason shown.
            self.reason = result.reason.clone();
        }
        self.last = Some((now, result));
        transition
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::HealthKind;

    fn check(rise: u32, fall: u32, start: StartState) -> HealthCheck {
        HealthCheck {
            kind: HealthKind::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_millis(500),
            rise,
            fall,
            port: None,
            start,
            send_proxy: None,
            tls: None,
        }
    }

    fn result(ok: bool, reason: &str) -> CheckResult {
        CheckResult {
            ok,
            reason: reason.to_string(),
            duration: Duration::from_millis(1),
        }
    }

    #[test]
    fn rise_successes_bring_a_starting_server_up() {
        let now = Instant::now();
        let mut tracker = HealthTracker::new(&check(2, 3, StartState::Down), now);
        assert!(!tracker.is_up());
        assert_eq!(tracker.record(result(true, "connected"), now), None);
        assert_eq!(
            tracker.record(result(true, "connected"), now),
            Some(Transition::WentUp)
        );
        assert!(tracker.is_up());
        assert_eq!(tracker.record(result(true, "connected"), now), None);
    }

    #[test]
    fn fall_failures_in_a_row_take_it_down_and_a_success_resets_the_count() {
        let now = Instant::now();
        let mut tracker = HealthTracker::new(&check(2, 3, StartState::Up), now);
        assert!(tracker.is_up());
        tracker.record(result(false, "refused"), now);
        tracker.record(result(false, "refused"), now);
        tracker.record(result(true, "connected"), now);
        tracker.record(result(false, "refused"), now);
        assert_eq!(tracker.record(result(false, "timeout"), now), None);
        assert_eq!(
            tracker.record(result(false, "timeout"), now),
            Some(Transition::WentDown)
        );
        assert_eq!(tracker.reason, "timeout");
        assert_eq!(tracker.changes, 1);
        // While down, the newest failure is the reason.
        tracker.record(result(false, "unexpected answer \"nope\""), now);
        assert_eq!(tracker.reason, "unexpected answer \"nope\"");
        // One success is not enough to come back with rise = 2.
        assert_eq!(tracker.record(result(true, "connected"), now), None);
        assert_eq!(
            tracker.record(result(true, "connected"), now),
            Some(Transition::WentUp)
        );
        assert_eq!((tracker.checks_ok, tracker.checks_failed), (3, 6));
    }

    #[test]
    fn rise_and_fall_of_one_flip_on_every_change() {
        let now = Instant::now();
        let mut tracker = HealthTracker::new(&check(1, 1, StartState::Down), now);
        assert_eq!(
            tracker.record(result(true, "ok"), now),
            Some(Transition::WentUp)
        );
        assert_eq!(
            tracker.record(result(false, "refused"), now),
            Some(Transition::WentDown)
        );
    }
}
