//! Choosing a split's side for a new connection: sans-IO.
//!
//! Without stickiness, smooth weighted round robin (NGINX's): over any run of connections each
//! side gets its share to within one connection, interleaved rather than in bursts, so a 10 %
//! canary sees 10 % of new connections at once. With `sticky = "source"`, the client's address
//! hash is a point on the line of cumulative weights, in the file's order: a client keeps its
//! side while the weights hold, and when they move, only clients in the moved stretch change
//! sides (90/10 -> 80/20 moves one client in nine from the first pool to the second, nobody
//! the other way).

/// Smooth weighted round robin over a split's weights, for one shard.
#[derive(Debug, Clone)]
pub struct SplitPicker {
    weights: Vec<i64>,
    current: Vec<i64>,
    total: i64,
}

impl SplitPicker {
    pub fn new(weights: &[u32]) -> SplitPicker {
        let weights: Vec<i64> = weights.iter().map(|&weight| i64::from(weight)).collect();
        SplitPicker {
            current: vec![0; weights.len()],
            total: weights.iter().sum(),
            weights,
        }
    }

    /// The side of the next connection; None when every weight is zero.
    pub fn pick(&mut self) -> Option<usize> {
        if self.total <= 0 {
            return None;
        }
        let mut best = 0;
        for (side, weight) in self.weights.iter().enumerate() {
            self.current[side] += weight;
            if self.current[side] > self.current[best] {
                best = side;
            }
        }
        self.current[best] -= self.total;
        Some(best)
    }
}

/// The side of a client whose address hashes to `key` (`balance::client_key`); None when
/// every weight is zero.
pub fn sticky_side(weights: &[u32], key: u64) -> Option<usize> {
    let total: u64 = weights.iter().map(|&weight| u64::from(weight)).sum();
    if total == 0 {
        return None;
    }
    // The FNV key's high bits are poorly mixed for short inputs: spread them first.
    let point = ((u128::from(mix(key)) * u128::from(total)) >> 64) as u64;
    let mut end = 0u64;
    for (side, &weight) in weights.iter().enumerate() {
        end += u64::from(weight);
        if point < end {
            return Some(side);
        }
    }
    None
}

/// splitmix64's finaliser.
fn mix(mut value: u64) -> u64 {
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::client_key;
    use std::net::{IpAddr, Ipv4Addr};

    #[test]
    fn round_robin_gives_each_side_its_share_interleaved() {
        let mut picker = SplitPicker::new(&[90, 10]);
        let picks: Vec<usize> = (0..100).filter_map(|_| picker.pick()).collect();
        assert_eq!(picks.iter().filter(|&&side| side == 1).count(), 10);
        // Interleaved: never two canary connections in a row, none in a burst of 10 at once.
        assert!(picks.windows(2).all(|pair| pair != [1, 1]));
        let mut picker = SplitPicker::new(&[0, 100]);
        assert!(
            (0..50).all(|_| picker.pick() == Some(1)),
            "an instant switch"
        );
        let mut picker = SplitPicker::new(&[3, 0, 1]);
        let picks: Vec<usize> = (0..8).filter_map(|_| picker.pick()).collect();
        assert_eq!(picks.iter().filter(|&&side| side == 2).count(), 2);
        assert!(!picks.contains(&1));
        assert_eq!(SplitPicker::new(&[0, 0]).pick(), None);
    }

    fn clients() -> impl Iterator<Item = u64> {
        (0..10_000u32).map(|n| client_key(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))))
    }

    #[test]
    fn sticky_sides_follow_the_weights_and_move_only_the_moved_stretch() {
        let canary = clients()
            .filter(|&key| sticky_side(&[90, 10], key) == Some(1))
            .count();
        assert!(
            (800..=1200).contains(&canary),
            "{canary} of 10,000 in a 10 % canary"
        );
        for key in clients() {
            let before = sticky_side(&[90, 10], key);
            assert_eq!(
                before,
                sticky_side(&[90, 10], key),
                "stable while weights hold"
            );
            let after = sticky_side(&[80, 20], key);
            if before == Some(1) {
                assert_eq!(after, Some(1), "canary clients stay when the canary grows");
            }
            assert_eq!(sticky_side(&[0, 100], key), Some(1));
            assert_eq!(sticky_side(&[100, 0], key), Some(0));
        }
        assert_eq!(sticky_side(&[0, 0], 7), None);
    }
}
