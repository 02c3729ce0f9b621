//! A hashed timer wheel for per-session deadlines (idle and write timeouts) on one shard.
//!
//! Pure: no clock. Time is counted in ticks the caller advances. Each armed timer is a node in
//! a slab, linked into its slot's list, so arming and cancelling are O(1) and the wheel's memory
//! is proportional to the timers armed now (a closed session cancels its timer; nothing of it
//! stays behind until its deadline). A `TimerId` carries a stamp, so cancelling a timer that
//! already fired (its node reused by another) does nothing.

use slab::Slab;

/// An expired timer: the key and serial it was armed with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerEntry {
    pub key: u32,
    pub serial: u32,
}

/// Names one armed timer, for `cancel`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerId {
    node: u32,
    stamp: u64,
}

const NIL: u32 = u32::MAX;

#[derive(Debug)]
struct Node {
    key: u32,
    serial: u32,
    deadline: u64,
    stamp: u64,
    previous: u32,
    next: u32,
}

pub struct TimerWheel {
    nodes: Slab<Node>,
    heads: Vec<u32>,
    /// The tick up to which entries have been expired.
    current: u64,
    next_stamp: u64,
}

impl TimerWheel {
    /// `slots` is rounded up to a power of two.
    pub fn new(slots: usize) -> TimerWheel {
        let slots = slots.max(2).next_power_of_two();
        TimerWheel {
            nodes: Slab::new(),
            heads: vec![NIL; slots],
            current: 0,
            next_stamp: 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Timers armed now.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Nodes allocated (armed or free for reuse): what the wheel's memory is proportional to.
    pub fn capacity(&self) -> usize {
        self.nodes.capacity()
    }

    fn slot(&self, deadline: u64) -> usize {
        (deadline & (self.heads.len() as u64 - 1)) as usize
    }

    /// Arms a timer that fires once `advance` reaches `deadline` (never earlier than the next
    /// tick).
    pub fn arm(&mut self, key: u32, serial: u32, deadline: u64) -> TimerId {
        let deadline = deadline.max(self.current + 1);
        let slot = self.slot(deadline);
        let head = self.heads[slot];
        let stamp = self.next_stamp;
        self.next_stamp += 1;
        let node = self.nodes.insert(Node {
            key,
            serial,
            deadline,
            stamp,
            previous: NIL,
            next: head,
        }) as u32;
        if head != NIL {
            self.nodes[head as usize].previous = node;
        }
        self.heads[slot] = node;
        TimerId { node, stamp }
    }

    /// Cancels a timer; a timer that already fired or was cancelled is left alone.
    pub fn cancel(&mut self, id: TimerId) -> bool {
        match self.nodes.get(id.node as usize) {
            Some(node) if node.stamp == id.stamp => {
                self.unlink(id.node);
                true
            }
            _ => false,
        }
    }

    fn unlink(&mut self, index: u32) -> Node {
        let node = self.nodes.remove(index as usize);
        if node.previous == NIL {
            let slot = self.slot(node.deadline);
            self.heads[slot] = node.next;
        } else {
            self.nodes[node.previous as usize].next = node.next;
        }
        if node.next != NIL {
            self.nodes[node.next as usize].previous = node.previous;
        }
        node
    }

    /// Moves time forward to `now`, appending every expired entry to `expired`.
    pub fn advance(&mut self, now: u64, expired: &mut Vec<TimerEntry>) {
        // Past a full turn every slot is visited once; entries further out stay.
        let end = now.min(self.current + self.heads.len() as u64);
        while self.current < end {
            self.current += 1;
            let slot = self.slot(self.current);
            let mut index = self.heads[slot];
            while index != NIL {
                let node = &self.nodes[index as usize];
                let next = node.next;
                if node.deadline <= now {
                    let node = self.unlink(index);
                    expired.push(TimerEntry {
                        key: node.key,
                        serial: node.serial,
                    });
                }
                index = next;
            }
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

    #[test]
    fn a_cancelled_timer_never_fires_and_a_stale_cancel_is_harmless() {
        let mut wheel = TimerWheel::new(8);
        let first = wheel.arm(1, 0, 3);
        let second = wheel.arm(2, 0, 3);
        let third = wheel.arm(3, 0, 3);
        assert!(wheel.cancel(second));
        assert!(!wheel.cancel(second), "cancelled twice");
        assert_eq!(fired(&mut wheel, 3), vec![3, 1]);
        // Both fired; their nodes are reused by the next timer, which a stale id must not hit.
        let reused = wheel.arm(4, 0, 9);
        assert!(!wheel.cancel(first));
        assert!(!wheel.cancel(third));
        assert_eq!(wheel.len(), 1);
        assert!(wheel.cancel(reused));
        assert!(wheel.is_empty());
    }

    #[test]
    fn memory_follows_live_timers_over_millions_of_arm_cancel_pairs() {
        let mut wheel = TimerWheel::new(1024);
        let mut live = std::collections::VecDeque::new();
        let mut expired = Vec::new();
        // 3 million sessions, 1,000 alive at a time, each with a 10-minute (6,000-tick) idle
        // timer that is cancelled when the session closes long before it fires.
        for session in 0..3_000_000u32 {
            let now = u64::from(session / 1_000);
            wheel.advance(now, &mut expired);
            live.push_back(wheel.arm(session, session, now + 6_000));
            if live.len() > 1_000
                && let Some(oldest) = live.pop_front()
            {
                assert!(wheel.cancel(oldest));
            }
        }
        assert!(expired.is_empty(), "no cancelled timer fired");
        assert_eq!(wheel.len(), 1_000);
        assert!(
            wheel.capacity() <= 2_048,
            "the wheel kept {} nodes for 1,000 live timers",
            wheel.capacity()
        );
    }
}
