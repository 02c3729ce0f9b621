//! A hashed timer wheel for per-session deadlines (idle timeouts) on one shard.
//!
//! Pure: no clock. Time is counted in ticks the caller advances. Entries are (key, serial)
//! pairs; a stale entry (its session gone or re-armed) is filtered by the caller, so cancelling
//! is free and arming is O(1).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerEntry {
    pub key: u32,
    pub serial: u32,
    deadline: u64,
}

pub struct TimerWheel {
    slots: Vec<Vec<TimerEntry>>,
    /// The tick up to which entries have been expired.
    current: u64,
    len: usize,
}

impl TimerWheel {
    /// `slots` is rounded up to a power of two.
    pub fn new(slots: usize) -> TimerWheel {
        let slots = slots.max(2).next_power_of_two();
        TimerWheel {
            slots: (0..slots).map(|_| Vec::new()).collect(),
            current: 0,
            len: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len
    }

    /// Arms a timer that fires once `advance` reaches `deadline` (never earlier than the next
    /// tick).
    pub fn arm(&mut self, key: u32, serial: u32, deadline: u64) {
        let deadline = deadline.max(self.current + 1);
        let mask = self.slots.len() as u64 - 1;
        self.slots[(deadline & mask) as usize].push(TimerEntry {
            key,
            serial,
            deadline,
        });
        self.len += 1;
    }

    /// Moves time forward to `now`, appending every expired entry to `expired`.
    pub fn advance(&mut self, now: u64, expired: &mut Vec<TimerEntry>) {
        let mask = self.slots.len() as u64 - 1;
        // Past a full turn every slot is visited once; entries further out stay.
        let end = now.min(self.current + self.slots.len() as u64);
        while self.current < end {
            self.current += 1;
            let slot = &mut self.slots[(self.current & mask) as usize];
            let before = slot.len();
            slot.retain(|entry| {
                if entry.deadline <= now {
                    expired.push(*entry);
                    false
                } else {
                    true
                }
            });
            self.len -= before - slot.len();
        }
        self.current = self.current.max(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fired(wheel: &mut TimerWheel, now: u64) -> Vec<u32> {
        let mut expired = Vec::new();
        wheel.advance(now, &mut expired);
        expired.iter().map(|entry| entry.key).collect()
    }

    #[test]
    fn fires_at_the_deadline_not_before() {
        let mut wheel = TimerWheel::new(8);
        wheel.arm(1, 0, 3);
        wheel.arm(2, 0, 5);
        assert_eq!(fired(&mut wheel, 2), Vec::<u32>::new());
        assert_eq!(fired(&mut wheel, 3), vec![1]);
        assert_eq!(fired(&mut wheel, 10), vec![2]);
        assert!(wheel.is_empty());
    }

    #[test]
    fn deadlines_beyond_one_turn_wait_their_round() {
        let mut wheel = TimerWheel::new(4);
        wheel.arm(7, 0, 21);
        assert_eq!(fired(&mut wheel, 5), Vec::<u32>::new());
        assert_eq!(fired(&mut wheel, 20), Vec::<u32>::new());
        assert_eq!(fired(&mut wheel, 21), vec![7]);
    }

    #[test]
    fn a_big_jump_expires_everything_due() {
        let mut wheel = TimerWheel::new(4);
        for key in 0..10 {
            wheel.arm(key, 0, u64::from(key) + 1);
        }
        let mut keys = fired(&mut wheel, 1_000);
        keys.sort_unstable();
        assert_eq!(keys, (0..10).collect::<Vec<_>>());
        assert_eq!(wheel.len(), 0);
    }
}
