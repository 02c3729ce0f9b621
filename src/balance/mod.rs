//! Server selection over one pool, per shard.
//!
//! Owns the balancing algorithms and the shard-local view of each server: active session count,
//! passive failure state, smooth-weighted-round-robin credit. Knows nothing of sockets or clocks:
//! callers pass `now` (milliseconds on any monotonic scale) and the client's hash key.
//!
//! Selection order, for every algorithm: primaries that are up, then backups that are up, then
//! (last resort, as NGINX does) servers marked down by health checks or passive failures. A
//! server that takes no new sessions (draining, maint, removing), one already tried by this
//! session, or one at its `max_connections`, is never picked. A server ramping up after a
//! return (slow start) weighs only its ramp's share of its weight.

pub mod split;

use std::collections::HashMap;
use std::net::IpAddr;

use crate::snapshot::{FULL_RAMP, PoolSnapshot, ServerId, ServerSnapshot, ServerState};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    RoundRobin,
    Weighted,
    LeastConn,
    SourceHash,
    TwoChoices,
}

impl Algorithm {
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Some(match name {
            "round_robin" => Algorithm::RoundRobin,
            "weighted" => Algorithm::Weighted,
            "least_conn" => Algorithm::LeastConn,
            "source_hash" => Algorithm::SourceHash,
            "two_choices" => Algorithm::TwoChoices,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Algorithm::RoundRobin => "round_robin",
            Algorithm::Weighted => "weighted",
            Algorithm::LeastConn => "least_conn",
            Algorithm::SourceHash => "source_hash",
            Algorithm::TwoChoices => "two_choices",
        }
    }

    /// Whether picking needs the client's address (a `getpeername` per accept).
    pub fn needs_client_address(self) -> bool {
        self == Algorithm::SourceHash
    }
}

/// Index of a server within its pool.
pub type ServerIndex = usize;

/// The set of servers a session has already tried (bit i = server i; servers past 63 are not
/// remembered, so a pool that large may retry one server twice).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TriedServers(u64);

impl TriedServers {
    pub fn insert(&mut self, server: ServerIndex) {
        if server < 64 {
            self.0 |= 1 << server;
        }
    }

    pub fn contains(self, server: ServerIndex) -> bool {
        server < 64 && self.0 & (1 << server) != 0
    }
}

/// Hash key of a client for `source_hash`: its IP address only (not the port), so every
/// connection of one client lands on the same server.
pub fn client_key(ip: IpAddr) -> u64 {
    let mut hash = 0xcbf2_9ce4_8422_2325u64;
    let mut feed = |bytes: &[u8]| {
        for &byte in bytes {
            hash = (hash ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
    };
    match ip {
        IpAddr::V4(v4) => feed(&v4.octets()),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => feed(&v4.octets()),
            None => feed(&v6.octets()),
        },
    }
    mix64(hash)
}

/// A stable 64-bit mixer (splitmix64's finaliser).
fn mix64(mut value: u64) -> u64 {
    value = (value ^ (value >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    value = (value ^ (value >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    value ^ (value >> 31)
}

#[derive(Debug, Clone)]
struct ServerSlot {
    id: ServerId,
    /// Weight in effect, in thousandths of a weight unit (slow start ramps it).
    weight: i64,
    backup: bool,
    state: ServerState,
    /// 0 = unlimited.
    max_connections: u32,
    /// Stable identity for rendezvous hashing: derived from the address, not the position, so
    /// reordering or adding servers moves only the clients that must move.
    identity: u64,
    active: u32,
    /// Smooth weighted round robin credit.
    current: i64,
    recent_failures: u32,
    down_until_ms: u64,
}

impl ServerSlot {
    fn new(server: &ServerSnapshot) -> ServerSlot {
        let mut identity = 0xcbf2_9ce4_8422_2325u64;
        for byte in server.addr.to_string().bytes() {
            identity = (identity ^ u64::from(byte)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        let mut slot = ServerSlot {
            id: server.id,
            weight: 0,
            backup: false,
            state: ServerState::Up,
            max_connections: 0,
            identity: mix64(identity),
            active: 0,
            current: 0,
            recent_failures: 0,
            down_until_ms: 0,
        };
        slot.update(server);
        slot
    }

    /// Takes the server's new settings; keeps what this shard learned (load, failures), except
    /// that a server the health checks just brought back up is no longer skipped for the
    /// connect failures this shard saw while it was down: the checks know better.
    fn update(&mut self, server: &ServerSnapshot) {
        self.weight = i64::from(server.weight) * i64::from(server.ramp.clamp(1, FULL_RAMP));
        self.backup = server.backup;
        if self.state != ServerState::Up && server.state == ServerState::Up {
            self.recent_failures = 0;
            self.down_until_ms = 0;
        }
        self.state = server.state;
        self.max_connections = server.max_connections.map_or(0, |limit| limit.get());
    }

    /// Slow start: still ramping up.
    fn ramping(&self, full: i64) -> bool {
        self.weight < full
    }
}

/// The per-shard balancing state of one pool.
#[derive(Debug, Clone)]
pub struct PoolBalancer {
    algorithm: Algorithm,
    servers: Vec<ServerSlot>,
    /// Each server's full weight (thousandths), to tell a ramping server.
    full_weights: Vec<i64>,
    next: usize,
    rng: u64,
    max_fails: u32,
    fail_timeout_ms: u64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tier {
    PrimaryUp,
    BackupUp,
    PrimaryAny,
    BackupAny,
}

impl PoolBalancer {
    /// `seed` varies the starting point per shard so shards do not pick in lockstep.
    pub fn new(pool: &PoolSnapshot, seed: u64) -> PoolBalancer {
        let mut balancer = PoolBalancer {
            algorithm: pool.balance,
            servers: Vec::new(),
            full_weights: Vec::new(),
            next: 0,
            rng: mix64(seed ^ 0x9e37_79b9_7f4a_7c15) | 1,
            max_fails: pool.max_fails,
            fail_timeout_ms: 0,
        };
        balancer.adopt(pool);
        balancer.next = (seed as usize) % balancer.servers.len().max(1);
        balancer
    }

    /// Takes a new generation of the pool: settings, servers added, removed or changed. What
    /// this shard knows of a server that stays (its sessions, failures, round-robin credit) is
    /// kept, matched by id.
    pub fn adopt(&mut self, pool: &PoolSnapshot) {
        let mut previous: HashMap<ServerId, ServerSlot> =
            self.servers.drain(..).map(|slot| (slot.id, slot)).collect();
        self.algorithm = pool.balance;
        self.max_fails = pool.max_fails;
        self.fail_timeout_ms = pool.fail_timeout.as_millis().min(u128::from(u64::MAX)) as u64;
        self.servers = pool
            .servers
            .iter()
            .map(|server| match previous.remove(&server.id) {
                Some(mut slot) => {
                    slot.update(server);
                    slot
                }
                None => ServerSlot::new(server),
            })
            .collect();
        self.full_weights = pool
            .servers
            .iter()
            .map(|server| i64::from(server.weight) * i64::from(FULL_RAMP))
            .collect();
        if self.next >= self.servers.len() {
            self.next = 0;
        }
    }

    pub fn server_count(&self) -> usize {
        self.servers.len()
    }

    /// The id of the server at `server`.
    pub fn server_id(&self, server: ServerIndex) -> ServerId {
        self.servers[server].id
    }

    /// Where server `id` is now (`hint` is where it was when the session picked it).
    pub fn position(&self, id: ServerId, hint: ServerIndex) -> Option<ServerIndex> {
        if self.servers.get(hint).is_some_and(|slot| slot.id == id) {
            return Some(hint);
        }
        self.servers.iter().position(|slot| slot.id == id)
    }

    /// Active sessions this shard has on `server`.
    pub fn active(&self, server: ServerIndex) -> u32 {
        self.servers[server].active
    }

    /// Picks a server for a new connection attempt, or `None` when every server has been tried,
    /// is full or takes no new sessions. `client` is the `client_key` (0 when the algorithm does
    /// not need it).
    pub fn pick(&mut self, client: u64, tried: TriedServers, now_ms: u64) -> Option<ServerIndex> {
        [
            Tier::PrimaryUp,
            Tier::BackupUp,
            Tier::PrimaryAny,
            Tier::BackupAny,
        ]
        .into_iter()
        .find_map(|tier| self.pick_in_tier(tier, client, tried, now_ms))
    }

    fn eligible(&self, server: ServerIndex, tier: Tier, tried: TriedServers, now_ms: u64) -> bool {
        let state = &self.servers[server];
        let wanted_backup = matches!(tier, Tier::BackupUp | Tier::BackupAny);
        let needs_up = matches!(tier, Tier::PrimaryUp | Tier::BackupUp);
        state.state.takes_new_sessions()
            && state.backup == wanted_backup
            && !tried.contains(server)
            && (state.max_connections == 0 || state.active < state.max_connections)
            && (!needs_up || (state.state == ServerState::Up && state.down_until_ms <= now_ms))
    }

    fn pick_in_tier(
        &mut self,
        tier: Tier,
        client: u64,
        tried: TriedServers,
        now_ms: u64,
    ) -> Option<ServerIndex> {
        let count = self.servers.len();
        let eligible = |balancer: &Self, server| balancer.eligible(server, tier, tried, now_ms);
        match self.algorithm {
            Algorithm::RoundRobin => {
                // A server ramping up (slow start) takes its turn only with the probability of
                // its ramp; when every eligible server passes, the first eligible one is used.
                let mut first = None;
                let mut found = None;
                for step in 0..count {
                    let server = (self.next + step) % count;
                    if !eligible(self, server) {
                        continue;
                    }
                    first.get_or_insert(server);
                    let slot = &self.servers[server];
                    let full = self.full_weights[server];
                    if slot.ramping(full) {
                        let weight = slot.weight;
                        if (self.random() % full.max(1) as u64) as i64 >= weight {
                            continue;
                        }
                    }
                    found = Some(server);
                    break;
                }
                let found = found.or(first)?;
                self.next = (found + 1) % count;
                Some(found)
            }
            Algorithm::Weighted => {
                // Smooth weighted round robin (NGINX): every eligible server gains its weight,
                // the richest is picked and pays the total back.
                let mut total = 0;
                let mut best: Option<ServerIndex> = None;
                for server in 0..count {
                    if !eligible(self, server) {
                        continue;
                    }
                    let state = &mut self.servers[server];
                    state.current += state.weight;
                    total += state.weight;
                    let current = state.current;
                    if best.is_none_or(|b| current > self.servers[b].current) {
                        best = Some(server);
                    }
                }
                let best = best?;
                self.servers[best].current -= total;
                Some(best)
            }
            Algorithm::LeastConn => {
                let mut best: Option<ServerIndex> = None;
                for step in 0..count {
                    let server = (self.next + step) % count;
                    if eligible(self, server) && best.is_none_or(|b| self.less_loaded(server, b)) {
                        best = Some(server);
                    }
                }
                let best = best?;
                self.next = (best + 1) % count;
                Some(best)
            }
            Algorithm::SourceHash => {
                // Weighted rendezvous hashing: each server scores weight / -ln(u) with u a
                // uniform hash of (client, server); the best score wins. Adding one of N servers
                // moves about 1/N of the clients, and only to the new server.
                let mut best: Option<(ServerIndex, f64)> = None;
                for server in 0..count {
                    if !eligible(self, server) {
                        continue;
                    }
                    let state = &self.servers[server];
                    let hash = mix64(client ^ state.identity);
                    let uniform = ((hash >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
                    let score = state.weight as f64 / -uniform.ln();
                    if best.is_none_or(|(_, best_score)| score > best_score) {
                        best = Some((server, score));
                    }
                }
                best.map(|(server, _)| server)
            }
            Algorithm::TwoChoices => {
                let candidates = (0..count).filter(|&s| eligible(self, s)).count();
                if candidates == 0 {
                    return None;
                }
                let first_rank = (self.random() % candidates as u64) as usize;
                let nth = |rank: usize| {
                    (0..count)
                        .filter(|&s| eligible(self, s))
                        .nth(rank)
                        .unwrap_or(0)
                };
                let first = nth(first_rank);
                if candidates == 1 {
                    return Some(first);
                }
                let mut second_rank = (self.random() % (candidates as u64 - 1)) as usize;
                if second_rank >= first_rank {
                    second_rank += 1;
                }
                let second = (0..count)
                    .filter(|&s| eligible(self, s))
                    .nth(second_rank)
                    .unwrap_or(first);
                Some(if self.less_loaded(second, first) {
                    second
                } else {
                    first
                })
            }
        }
    }

    /// Whether `a` carries less load per unit of weight than `b`.
    fn less_loaded(&self, a: ServerIndex, b: ServerIndex) -> bool {
        let (a, b) = (&self.servers[a], &self.servers[b]);
        i64::from(a.active) * b.weight.max(1) < i64::from(b.active) * a.weight.max(1)
    }

    fn random(&mut self) -> u64 {
        // xorshift64*: plenty for spreading load, no shared state.
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A session now occupies `server` (from the connect attempt on).
    pub fn acquire(&mut self, server: ServerIndex) {
        self.servers[server].active += 1;
    }

    /// The session that occupied `server` has ended or moved on.
    pub fn release(&mut self, server: ServerIndex) {
        let state = &mut self.servers[server];
        state.active = state.active.saturating_sub(1);
    }

    /// A connect to `server` failed; after `max_fails` failures in a row it is skipped for
    /// `fail_timeout` (passive health, like NGINX's max_fails/fail_timeout).
    pub fn record_failure(&mut self, server: ServerIndex, now_ms: u64) {
        if self.max_fails == 0 {
            return;
        }
        let state = &mut self.servers[server];
        state.recent_failures += 1;
        if state.recent_failures >= self.max_fails {
            state.recent_failures = 0;
            state.down_until_ms = now_ms.saturating_add(self.fail_timeout_ms);
        }
    }

    pub fn record_success(&mut self, server: ServerIndex) {
        let state = &mut self.servers[server];
        state.recent_failures = 0;
        state.down_until_ms = 0;
    }

    /// Whether passive health currently skips `server`.
    pub fn is_down(&self, server: ServerIndex, now_ms: u64) -> bool {
        self.servers[server].down_until_ms > now_ms
    }

    /// Every server's id, this shard's active sessions on it and whether passive health skips
    /// it now (what the shard publishes for `/status`).
    pub fn servers(&self, now_ms: u64) -> impl Iterator<Item = (ServerId, u32, bool)> + '_ {
        self.servers
            .iter()
            .map(move |slot| (slot.id, slot.active, slot.down_until_ms > now_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::snapshot::PoolId;
    use std::net::Ipv4Addr;

    fn pool(balance: &str, servers: &str) -> PoolSnapshot {
        let text = format!(
            "[[listener]]\nname = \"l\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n\
             [[pool]]\nname = \"p\"\nbalance = \"{balance}\"\nservers = [{servers}]\n"
        );
        let config = Config::parse("test", &text).expect("test config is valid");
        let pool = &config.pools[0];
        let servers = pool
            .servers
            .iter()
            .enumerate()
            .map(|(index, server)| ServerSnapshot {
                id: ServerId(100 + index as u32),
                name: server.name.clone(),
                addr: server.addr,
                weight: server.weight.get(),
                ramp: FULL_RAMP,
                backup: server.backup,
                max_connections: server.max_connections,
                state: ServerState::Up,
            })
            .collect();
        PoolSnapshot::new(PoolId(1), pool, servers)
    }

    fn addrs(count: usize) -> String {
        (0..count)
            .map(|i| format!("{{ addr = \"127.0.0.1:{}\" }}", 9000 + i))
            .collect::<Vec<_>>()
            .join(",")
    }

    fn tally(balancer: &mut PoolBalancer, picks: usize) -> Vec<usize> {
        let mut counts = vec![0; balancer.server_count()];
        for _ in 0..picks {
            let server = balancer
                .pick(0, TriedServers::default(), 0)
                .expect("a server");
            counts[server] += 1;
        }
        counts
    }

    #[test]
    fn round_robin_cycles_evenly() {
        let mut balancer = PoolBalancer::new(&pool("round_robin", &addrs(3)), 0);
        assert_eq!(tally(&mut balancer, 300), vec![100, 100, 100]);
    }

    #[test]
    fn weighted_is_smooth_and_exact() {
        let servers = r#"{ addr = "127.0.0.1:1", weight = 5 }, { addr = "127.0.0.1:2" }, { addr = "127.0.0.1:3" }"#;
        let mut balancer = PoolBalancer::new(&pool("weighted", servers), 0);
        let sequence: Vec<_> = (0..7)
            .map(|_| balancer.pick(0, TriedServers::default(), 0).unwrap_or(99))
            .collect();
        // NGINX's documented smooth sequence for weights 5,1,1.
        assert_eq!(sequence, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(tally(&mut balancer, 7000), vec![5000, 1000, 1000]);
    }

    #[test]
    fn least_conn_prefers_the_idle_server() {
        let mut balancer = PoolBalancer::new(&pool("least_conn", &addrs(3)), 0);
        balancer.acquire(0);
        balancer.acquire(0);
        balancer.acquire(1);
        assert_eq!(balancer.pick(0, TriedServers::default(), 0), Some(2));
        balancer.acquire(2);
        balancer.acquire(2);
        assert_eq!(balancer.pick(0, TriedServers::default(), 0), Some(1));
    }

    #[test]
    fn two_choices_never_picks_the_busier_of_two() {
        let mut balancer = PoolBalancer::new(&pool("two_choices", &addrs(2)), 7);
        for _ in 0..10 {
            balancer.acquire(0);
        }
        for _ in 0..100 {
            assert_eq!(balancer.pick(0, TriedServers::default(), 0), Some(1));
        }
        let mut spread = PoolBalancer::new(&pool("two_choices", &addrs(4)), 7);
        let counts = tally(&mut spread, 4000);
        assert!(counts.iter().all(|&c| c > 500), "{counts:?}");
    }

    fn source_hash_mapping(servers: usize, clients: u32) -> Vec<ServerIndex> {
        let mut balancer = PoolBalancer::new(&pool("source_hash", &addrs(servers)), 0);
        (0..clients)
            .map(|i| {
                let ip = IpAddr::V4(Ipv4Addr::from(0x7f01_0000 + i));
                balancer
                    .pick(client_key(ip), TriedServers::default(), 0)
                    .unwrap_or(usize::MAX)
            })
            .collect()
    }

    #[test]
    fn source_hash_is_sticky_balanced_and_consistent() {
        let four = source_hash_mapping(4, 10_000);
        assert_eq!(four, source_hash_mapping(4, 10_000), "sticky");
        for server in 0..4 {
            let share = four.iter().filter(|&&s| s == server).count();
            assert!((2_000..3_000).contains(&share), "server {server}: {share}");
        }
        let five = source_hash_mapping(5, 10_000);
        let moved = four.iter().zip(&five).filter(|(a, b)| a != b).count();
        assert!((1_500..=2_500).contains(&moved), "moved {moved}");
        assert!(
            four.iter()
                .zip(&five)
                .all(|(old, new)| old == new || *new == 4),
            "clients move only to the new server"
        );
    }

    #[test]
    fn backup_only_when_primaries_are_unavailable() {
        let servers = r#"{ addr = "127.0.0.1:1" }, { addr = "127.0.0.1:2", backup = true }"#;
        for algorithm in [
            "round_robin",
            "weighted",
            "least_conn",
            "source_hash",
            "two_choices",
        ] {
            let mut balancer = PoolBalancer::new(&pool(algorithm, servers), 3);
            for _ in 0..20 {
                assert_eq!(
                    balancer.pick(1, TriedServers::default(), 0),
                    Some(0),
                    "{algorithm}"
                );
            }
            let mut tried = TriedServers::default();
            tried.insert(0);
            assert_eq!(balancer.pick(1, tried, 0), Some(1), "{algorithm}");
            balancer.record_failure(0, 1_000);
            assert_eq!(
                balancer.pick(1, TriedServers::default(), 2_000),
                Some(1),
                "{algorithm}"
            );
            assert_eq!(
                balancer.pick(1, TriedServers::default(), 11_000),
                Some(0),
                "{algorithm}: primary back after fail_timeout"
            );
        }
    }

    #[test]
    fn last_resort_is_a_down_server_not_nothing() {
        let mut balancer = PoolBalancer::new(&pool("round_robin", &addrs(2)), 0);
        balancer.record_failure(0, 0);
        balancer.record_failure(1, 0);
        assert!(balancer.pick(0, TriedServers::default(), 1).is_some());
        let mut tried = TriedServers::default();
        tried.insert(0);
        tried.insert(1);
        assert_eq!(balancer.pick(0, tried, 1), None);
    }

    #[test]
    fn max_connections_is_respected() {
        let servers = r#"{ addr = "127.0.0.1:1", max_connections = 2 }, { addr = "127.0.0.1:2", max_connections = 1 }"#;
        let mut balancer = PoolBalancer::new(&pool("round_robin", servers), 0);
        for _ in 0..3 {
            let server = balancer.pick(0, TriedServers::default(), 0).expect("room");
            balancer.acquire(server);
        }
        assert_eq!(balancer.pick(0, TriedServers::default(), 0), None);
        balancer.release(1);
        assert_eq!(balancer.pick(0, TriedServers::default(), 0), Some(1));
    }

    #[test]
    fn states_decide_who_takes_new_sessions() {
        let mut snapshot = pool("round_robin", &addrs(3));
        snapshot.servers[0].state = ServerState::Draining;
        snapshot.servers[1].state = ServerState::Maint;
        let mut balancer = PoolBalancer::new(&snapshot, 0);
        assert_eq!(tally(&mut balancer, 30), vec![0, 0, 30]);
        snapshot.servers[2].state = ServerState::Removing;
        balancer.adopt(&snapshot);
        assert_eq!(balancer.pick(0, TriedServers::default(), 0), None);
        // Down by health checks: used only when nothing is up, as a last resort.
        snapshot.servers[0].state = ServerState::Down;
        snapshot.servers[1].state = ServerState::Up;
        snapshot.servers[2].state = ServerState::Up;
        balancer.adopt(&snapshot);
        assert_eq!(tally(&mut balancer, 20), vec![0, 10, 10]);
        snapshot.servers[1].state = ServerState::Down;
        snapshot.servers[2].state = ServerState::Maint;
        balancer.adopt(&snapshot);
        let counts = tally(&mut balancer, 20);
        assert_eq!(counts[2], 0, "maint is never a last resort: {counts:?}");
        assert_eq!(counts[0] + counts[1], 20);
    }

    #[test]
    fn adopting_a_new_generation_keeps_what_the_shard_knows_by_id() {
        let snapshot = pool("least_conn", &addrs(3));
        let mut balancer = PoolBalancer::new(&snapshot, 0);
        balancer.acquire(1);
        balancer.acquire(1);
        balancer.record_failure(2, 0);
        // The server at position 0 is removed: the others move up and keep their state.
        let mut next = snapshot.clone();
        next.servers.remove(0);
        balancer.adopt(&next);
        assert_eq!(balancer.server_count(), 2);
        let first = balancer.position(ServerId(101), 1).expect("still there");
        assert_eq!(first, 0);
        assert_eq!(balancer.active(first), 2);
        assert!(balancer.is_down(1, 1));
        assert_eq!(balancer.position(ServerId(100), 0), None, "gone");
    }

    #[test]
    fn slow_start_gives_a_ramping_server_its_share() {
        for algorithm in ["round_robin", "weighted"] {
            let mut snapshot = pool(algorithm, &addrs(2));
            snapshot.servers[1].ramp = FULL_RAMP / 4;
            let mut balancer = PoolBalancer::new(&snapshot, 9);
            let counts = tally(&mut balancer, 10_000);
            let share = counts[1] as f64 / 10_000.0;
            // Full weights 1:1 would give 0.5; a quarter ramp gives 0.25 / 1.25 = 0.2 with
            // weighted, and about a quarter of its turns with round robin.
            assert!(
                (0.15..0.3).contains(&share),
                "{algorithm}: ramping server took {share}"
            );
            snapshot.servers[1].ramp = FULL_RAMP;
            balancer.adopt(&snapshot);
            let counts = tally(&mut balancer, 10_000);
            assert!(counts[1] >= 4_900, "{algorithm}: {counts:?}");
        }
    }
}
