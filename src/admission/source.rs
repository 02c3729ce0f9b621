//! The per-source table (`[listener.per_source]`): for each client address (IPv6 clients by
//! prefix), its connection token bucket and its open connections, in a table of fixed size.
//!
//! The table never holds more than `table_size` addresses: a new address when it is full takes
//! the place of one not seen recently (CLOCK: one reference bit per entry, a hand that clears
//! it), and that eviction is counted. An address with open connections is never evicted (its
//! count must stay right); when every entry has open connections the new address is refused
//! (`TableFull`), so rotating source addresses can neither grow memory nor escape the limits.
//! Entries idle for `expire` are forgotten by a sweep the shard runs a few hundred entries at a
//! time. Slots stay where they are for the life of the table, so a session keeps its slot number
//! to give its connection back.

use std::collections::HashMap;
use std::net::IpAddr;

/// Micro-tokens per token.
const UNIT: u64 = 1_000_000;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceSettings {
    /// Connections per second per address, and the burst.
    pub rate: Option<(u64, u64)>,
    /// Open connections per address.
    pub max_connections: Option<u32>,
    /// IPv6 addresses sharing this many leading bits are one source.
    pub ipv6_prefix: u8,
    pub table_size: u32,
    pub expire_us: u64,
}

/// The key of a client address: IPv4 as its IPv4-mapped IPv6 form, IPv6 cut to the prefix.
pub fn source_key(address: IpAddr, ipv6_prefix: u8) -> u128 {
    match address.to_canonical() {
        IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            match ipv6_prefix {
                0 => 0,
                128.. => bits,
                prefix => bits & !(u128::MAX >> prefix),
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceRefusal {
    /// The address used its connections per second.
    Rate,
    /// The address has `max_connections` open.
    Connections,
    /// Every entry of a full table has open connections.
    TableFull,
}

#[derive(Debug, Clone)]
struct Entry {
    key: u128,
    /// Micro-tokens of the address's bucket.
    level: u64,
    refilled_us: u64,
    seen_us: u64,
    active: u32,
    referenced: bool,
    used: bool,
}

#[derive(Debug)]
pub struct SourceTable {
    settings: SourceSettings,
    index: HashMap<u128, u32>,
    entries: Vec<Entry>,
    free: Vec<u32>,
    hand: usize,
    sweep_hand: usize,
    evictions: u64,
}

impl SourceTable {
    pub fn new(settings: SourceSettings) -> SourceTable {
        SourceTable {
            settings,
            index: HashMap::new(),
            entries: Vec::new(),
            free: Vec::new(),
            hand: 0,
            sweep_hand: 0,
            evictions: 0,
        }
    }

    pub fn settings(&self) -> &SourceSettings {
        &self.settings
    }

    /// New limits for new connections; the addresses, their open connections and their tokens
    /// (up to the new burst) stay.
    pub fn reconfigure(&mut self, settings: SourceSettings) {
        if let Some((_, burst)) = settings.rate {
            let capacity = burst.saturating_mul(UNIT);
            for entry in &mut self.entries {
                entry.level = entry.level.min(capacity);
            }
        }
        self.settings = settings;
    }

    /// Addresses in the table.
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn evictions(&self) -> u64 {
        self.evictions
    }

    /// Bytes the table holds (its entries and its index), for the memory bound's test.
    pub fn memory_bytes(&self) -> usize {
        self.entries.capacity() * std::mem::size_of::<Entry>()
            + self.index.capacity() * (std::mem::size_of::<(u128, u32)>() + 1)
            + self.free.capacity() * std::mem::size_of::<u32>()
    }

    fn capacity_micro(&self) -> u64 {
        self.settings
            .rate
            .map_or(UNIT, |(_, burst)| burst.max(1).saturating_mul(UNIT))
    }

    fn expired(&self, entry: &Entry, now_us: u64) -> bool {
        entry.active == 0 && now_us.saturating_sub(entry.seen_us) >= self.settings.expire_us
    }

    /// Whether address `key` may open a connection now; on yes, the slot to `commit` it to.
    /// Takes nothing yet: a later check (the listener's rate) may still refuse the connection.
    pub fn check(&mut self, key: u128, now_us: u64) -> Result<u32, SourceRefusal> {
        let slot = match self.index.get(&key) {
            Some(&slot) => {
                let fresh = self.capacity_micro();
                let expired = self.expired(&self.entries[slot as usize], now_us);
                let entry = &mut self.entries[slot as usize];
                if expired {
                    entry.level = fresh;
                    entry.refilled_us = now_us;
                }
                slot
            }
            None => self.insert(key, now_us)?,
        };
        let settings = &self.settings;
        let entry = &mut self.entries[slot as usize];
        entry.referenced = true;
        entry.seen_us = now_us;
        if let Some(limit) = settings.max_connections
            && entry.active >= limit
        {
            return Err(SourceRefusal::Connections);
        }
        if let Some((rate, burst)) = settings.rate {
            let elapsed = now_us.saturating_sub(entry.refilled_us);
            entry.refilled_us = entry.refilled_us.max(now_us);
            let capacity = burst.max(1).saturating_mul(UNIT);
            let added = u128::from(elapsed) * u128::from(rate);
            entry.level = (u128::from(entry.level) + added)
                .min(u128::from(capacity))
                .try_into()
                .unwrap_or(capacity);
            if entry.level < UNIT {
                return Err(SourceRefusal::Rate);
            }
        }
        Ok(slot)
    }

    /// The connection checked into `slot` is admitted: it takes a token and counts as open.
    pub fn commit(&mut self, slot: u32) {
        let rated = self.settings.rate.is_some();
        if let Some(entry) = self.entries.get_mut(slot as usize) {
            if rated {
                entry.level = entry.level.saturating_sub(UNIT);
            }
            entry.active += 1;
        }
    }

    /// A connection of `slot` closed.
    pub fn release(&mut self, slot: u32, now_us: u64) {
        if let Some(entry) = self.entries.get_mut(slot as usize) {
            entry.active = entry.active.saturating_sub(1);
            entry.seen_us = now_us;
        }
    }

    /// Open connections of address `key` (for tests and `/status`).
    pub fn active(&self, key: u128) -> u32 {
        self.index
            .get(&key)
            .map_or(0, |&slot| self.entries[slot as usize].active)
    }

    fn insert(&mut self, key: u128, now_us: u64) -> Result<u32, SourceRefusal> {
        let limit = self.settings.table_size.max(1) as usize;
        let slot = if self.index.len() >= limit {
            self.evict(now_us).ok_or(SourceRefusal::TableFull)?
        } else if let Some(slot) = self.free.pop() {
            slot
        } else {
            if self.entries.len() == self.entries.capacity() {
                // Grow by doubling, but never past the table size.
                let extra = self.entries.len().max(16).min(limit - self.entries.len());
                self.entries.reserve_exact(extra);
            }
            self.entries.push(Entry {
                key: 0,
                level: 0,
                refilled_us: 0,
                seen_us: 0,
                active: 0,
                referenced: false,
                used: false,
            });
            (self.entries.len() - 1) as u32
        };
        let level = self.capacity_micro();
        self.entries[slot as usize] = Entry {
            key,
            level,
            refilled_us: now_us,
            seen_us: now_us,
            active: 0,
            referenced: false,
            used: true,
        };
        self.index.insert(key, slot);
        Ok(slot)
    }

    /// Frees the slot of an address not seen recently (expired ones first come free without
    /// counting as evictions). None when every entry has open connections.
    fn evict(&mut self, now_us: u64) -> Option<u32> {
        let len = self.entries.len();
        for _ in 0..2 * len {
            let slot = self.hand;
            self.hand = (self.hand + 1) % len;
            let expired = self.expired(&self.entries[slot], now_us);
            let entry = &mut self.entries[slot];
            if !entry.used || entry.active > 0 {
                continue;
            }
            if entry.referenced && !expired {
                entry.referenced = false;
                continue;
            }
            if !expired {
                self.evictions += 1;
            }
            entry.used = false;
            let key = entry.key;
            self.index.remove(&key);
            return Some(slot as u32);
        }
        None
    }

    /// Forgets idle addresses whose `expire` passed, looking at up to `steps` entries.
    pub fn sweep(&mut self, now_us: u64, steps: usize) {
        let len = self.entries.len();
        for _ in 0..steps.min(len) {
            let slot = self.sweep_hand % len;
            self.sweep_hand = (slot + 1) % len;
            if self.entries[slot].used && self.expired(&self.entries[slot], now_us) {
                let entry = &mut self.entries[slot];
                entry.used = false;
                let key = entry.key;
                self.index.remove(&key);
                self.free.push(slot as u32);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, Ipv6Addr};

    const SECOND: u64 = 1_000_000;

    fn settings() -> SourceSettings {
        SourceSettings {
            rate: Some((20, 40)),
            max_connections: Some(50),
            ipv6_prefix: 64,
            table_size: 1000,
            expire_us: 60 * SECOND,
        }
    }

    fn key(text: &str) -> u128 {
        source_key(text.parse().unwrap(), 64)
    }

    fn admit(table: &mut SourceTable, key: u128, now_us: u64) -> Result<u32, SourceRefusal> {
        let slot = table.check(key, now_us)?;
        table.commit(slot);
        Ok(slot)
    }

    #[test]
    fn ipv6_clients_group_by_prefix_and_ipv4_stays_whole() {
        assert_eq!(key("2001:db8:1:2::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_ne!(key("127.0.0.5"), key("127.0.0.6"));
        assert_eq!(key("::ffff:127.0.0.5"), key("127.0.0.5"));
        let address: IpAddr = "2001:db8:1:2:3:4:5:6".parse().unwrap();
        assert_eq!(
            source_key(address, 128),
            u128::from_be_bytes(match address {
                IpAddr::V6(v6) => v6.octets(),
                IpAddr::V4(_) => unreachable!(),
            })
        );
        assert_eq!(source_key(address, 0), 0);
        assert_eq!(
            source_key(address, 48),
            u128::from("2001:db8:1::".parse::<Ipv6Addr>().unwrap())
        );
    }

    #[test]
    fn the_51st_open_connection_of_an_address_is_refused() {
        let mut table = SourceTable::new(SourceSettings {
            rate: None,
            ..settings()
        });
        let five = key("127.0.0.5");
        let slots: Vec<u32> = (0..50)
            .map(|_| admit(&mut table, five, 0).unwrap())
            .collect();
        assert_eq!(admit(&mut table, five, 0), Err(SourceRefusal::Connections));
        assert!(admit(&mut table, key("127.0.0.6"), 0).is_ok());
        table.release(slots[0], 1);
        assert!(admit(&mut table, five, 1).is_ok());
        assert_eq!(table.active(five), 50);
    }

    #[test]
    fn an_address_gets_its_burst_then_its_rate() {
        let mut table = SourceTable::new(SourceSettings {
            max_connections: None,
            ..settings()
        });
        let five = key("127.0.0.5");
        let burst = (0..100)
            .filter(|_| admit(&mut table, five, 0).is_ok())
            .count();
        assert_eq!(burst, 40);
        assert_eq!(admit(&mut table, five, 0), Err(SourceRefusal::Rate));
        // 20 per second: one every 50 ms.
        assert!(admit(&mut table, five, SECOND / 20).is_ok());
        assert_eq!(
            admit(&mut table, five, SECOND / 20),
            Err(SourceRefusal::Rate)
        );
        // A refused check takes nothing from another address.
        assert!(admit(&mut table, key("127.0.0.6"), SECOND / 20).is_ok());
    }

    #[test]
    fn a_check_without_commit_takes_no_token() {
        let mut table = SourceTable::new(SourceSettings {
            rate: Some((1, 1)),
            ..settings()
        });
        let five = key("127.0.0.5");
        for _ in 0..10 {
            assert!(table.check(five, 0).is_ok());
        }
        assert!(admit(&mut table, five, 0).is_ok());
        assert_eq!(table.check(five, 0), Err(SourceRefusal::Rate));
    }

    #[test]
    fn a_million_addresses_stay_within_the_table_size() {
        let size = 10_000;
        let mut table = SourceTable::new(SourceSettings {
            table_size: size,
            ..settings()
        });
        let mut peak_memory = 0;
        for n in 0..1_000_000u32 {
            let address = IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n));
            let slot = table.check(source_key(address, 64), u64::from(n)).unwrap();
            table.commit(slot);
            table.release(slot, u64::from(n));
            assert!(table.len() <= size as usize);
            peak_memory = peak_memory.max(table.memory_bytes());
        }
        assert_eq!(table.len(), size as usize);
        assert_eq!(table.evictions(), 1_000_000 - u64::from(size));
        // Entries and index for `size` addresses; the index rounds up to a power of two.
        let bound = size as usize * std::mem::size_of::<Entry>() * 2 + (size as usize * 2) * 33;
        assert!(peak_memory <= bound, "{peak_memory} > {bound}");
    }

    #[test]
    fn addresses_with_open_connections_are_never_evicted() {
        let mut table = SourceTable::new(SourceSettings {
            table_size: 3,
            rate: None,
            ..settings()
        });
        for address in ["10.0.0.1", "10.0.0.2", "10.0.0.3"] {
            admit(&mut table, key(address), 0).unwrap();
        }
        assert_eq!(
            table.check(key("10.0.0.4"), 0),
            Err(SourceRefusal::TableFull)
        );
        assert_eq!(table.evictions(), 0);
        let slot = table.check(key("10.0.0.2"), 0).unwrap();
        table.release(slot, 0);
        // 10.0.0.2 has none open now: it makes room.
        admit(&mut table, key("10.0.0.4"), 0).unwrap();
        assert_eq!(table.evictions(), 1);
        assert_eq!(table.active(key("10.0.0.1")), 1);
        assert_eq!(table.active(key("10.0.0.2")), 0);
    }

    #[test]
    fn recently_seen_addresses_outlive_one_time_visitors() {
        let mut table = SourceTable::new(SourceSettings {
            table_size: 4,
            rate: None,
            max_connections: None,
            ..settings()
        });
        let regular = key("10.0.0.1");
        for round in 0..1000u64 {
            let slot = table.check(regular, round).unwrap();
            table.commit(slot);
            table.release(slot, round);
            let visitor = IpAddr::V4(Ipv4Addr::from(0x0b00_0000 + round as u32));
            table.check(source_key(visitor, 64), round).unwrap();
        }
        assert!(table.index.contains_key(&regular));
    }

    #[test]
    fn idle_entries_expire_and_the_sweep_forgets_them() {
        let mut table = SourceTable::new(settings());
        let five = key("127.0.0.5");
        let burst = (0..100)
            .filter(|_| admit(&mut table, five, 0).is_ok())
            .count();
        assert_eq!(burst, 40);
        // Still open connections: the entry stays whatever the time.
        table.sweep(120 * SECOND, 100);
        assert_eq!(table.len(), 1);
        let slot = table.check(five, 120 * SECOND).unwrap_or(0);
        for _ in 0..40 {
            table.release(slot, 120 * SECOND);
        }
        table.sweep(170 * SECOND, 100);
        assert_eq!(table.len(), 1);
        table.sweep(181 * SECOND, 100);
        assert!(table.is_empty());
        assert_eq!(table.evictions(), 0);
    }

    #[test]
    fn reconfiguring_keeps_open_connections() {
        let mut table = SourceTable::new(settings());
        let five = key("127.0.0.5");
        for _ in 0..10 {
            admit(&mut table, five, 0).unwrap();
        }
        table.reconfigure(SourceSettings {
            max_connections: Some(10),
            ..settings()
        });
        assert_eq!(admit(&mut table, five, 0), Err(SourceRefusal::Connections));
        assert_eq!(table.active(five), 10);
    }
}
