//! A session as the shard loop holds it: the sockets, the server it is connected to, its
//! place in the timer wheel, and the sans-IO relay machine that decides what happens next.
//!
//! Also owns the encoding of `user_data`: the operation, the session's slot and the slot's
//! generation, so a completion that arrives after its session is gone is recognised instead
//! of reaching the slot's next session.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};

use crate::balance::{ServerIndex, TriedServers};
use crate::metrics::CloseKind;
use crate::relay::{CloseMode, Relay, Side};
use crate::snapshot::{ListenerId, PoolId, ServerId};
use crate::uring::BufToken;
use crate::uring::timer::TimerId;

/// Generations wrap within 22 bits (bits 40-61 of `user_data`; the ring keeps 62 and 63).
pub const GENERATION_MASK: u32 = (1 << 22) - 1;

/// What a completion belongs to: the low byte of `user_data`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Close, cancel and linked-timeout completions carry nothing to act on.
    Ignored = 0,
    Accept = 1,
    ClientRecv = 2,
    ServerRecv = 3,
    SendToServer = 4,
    SendToClient = 5,
    Connect = 6,
    Wake = 7,
    /// A single (not multishot) accept.
    AcceptOnce = 8,
}

impl Op {
    fn from_tag(tag: u8) -> Op {
        match tag {
            1 => Op::Accept,
            2 => Op::ClientRecv,
            3 => Op::ServerRecv,
            4 => Op::SendToServer,
            5 => Op::SendToClient,
            6 => Op::Connect,
            7 => Op::Wake,
            8 => Op::AcceptOnce,
            _ => Op::Ignored,
        }
    }

    pub fn recv_from(side: Side) -> Op {
        match side {
            Side::Client => Op::ClientRecv,
            Side::Server => Op::ServerRecv,
        }
    }

    pub fn send_to(side: Side) -> Op {
        match side {
            Side::Client => Op::SendToClient,
            Side::Server => Op::SendToServer,
        }
    }
}

/// `user_data` for an operation of slot `index` in its `generation`.
pub fn user_data(op: Op, index: usize, generation: u32) -> u64 {
    (u64::from(generation & GENERATION_MASK) << 40)
        | ((index as u64 & 0xffff_ffff) << 8)
        | op as u64
}

/// The server a session occupies (from its connect attempt on).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerRef {
    pub id: ServerId,
    /// Its position in the pool's balancer when picked (checked against `id` before use: a
    /// newer snapshot may have moved it).
    pub index: ServerIndex,
    /// Its counters' slot in the shard.
    pub counters: usize,
}

pub struct Session {
    /// Distinguishes this session from earlier ones in the same slot.
    pub generation: u32,
    pub listener: ListenerId,
    /// The listener's counters' slot in the shard.
    pub listener_counters: usize,
    pub pool: PoolId,
    /// The pool's counters' slot in the shard.
    pub pool_counters: usize,
    pub client: OwnedFd,
    pub server: Option<OwnedFd>,
    pub server_ref: Option<ServerRef>,
    pub tried: TriedServers,
    pub attempts: u16,
    pub client_key: u64,
    /// A connect is in flight.
    pub connecting: bool,
    /// Its listener writes a connection-log line when it ends: the client's address, read at
    /// accept (boxed: sessions of listeners that do not log pay one word).
    pub log: Option<Box<std::net::SocketAddr>>,
    /// Shard clock (microseconds) when it was accepted, and when its current connect began.
    pub started_us: u64,
    pub connect_started_us: u64,
    /// How long the successful connect took.
    pub connect_us: Option<u32>,
    /// Server sockets that could not be created for lack of memory, retried.
    pub socket_retries: u8,
    /// The session is ending; freed once no operation is in flight.
    pub closing: bool,
    pub close_mode: CloseMode,
    /// Why it ended (set once, by the first close).
    pub close_kind: Option<CloseKind>,
    pub relay: Relay<BufToken>,
    /// Reading the client's first bytes to choose a route, then holding them for the server
    /// (None on listeners without routes, and once replayed).
    pub sniffing: Option<Box<Sniffing>>,
    pub timer: Option<TimerId>,
    /// Its listener's epoch on the shard when it was accepted, and its client address's
    /// per-source slot (`NO_SOURCE_SLOT`: none), given back when it ends.
    pub listener_epoch: u32,
    pub source_slot: u32,
    /// Its split side's counters slot (`NO_SPLIT`: it came through no split).
    pub split_counters: u32,
    /// Bandwidth caps, when its listener has any (boxed: uncapped sessions pay one word).
    pub throttle: Option<Box<super::shard::Throttle>>,
}

impl Session {
    /// (operation, slot, generation) of a completion's `user_data`.
    pub fn decode(user_data: u64) -> (Op, usize, u32) {
        (
            Op::from_tag(user_data as u8),
            ((user_data >> 8) & 0xffff_ffff) as usize,
            ((user_data >> 40) as u32) & GENERATION_MASK,
        )
    }

    pub fn fd(&self, side: Side) -> Option<RawFd> {
        match side {
            Side::Client => Some(self.client.as_raw_fd()),
            Side::Server => self.server.as_ref().map(AsRawFd::as_raw_fd),
        }
    }

    pub fn borrow_fd(&self, side: Side) -> Option<BorrowedFd<'_>> {
        match side {
            Side::Client => Some(self.client.as_fd()),
            Side::Server => self.server.as_ref().map(AsFd::as_fd),
        }
    }

    /// No operation refers to this session.
    pub fn is_idle(&self) -> bool {
        !self.connecting && self.relay.is_idle()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_round_trips_and_leaves_the_ring_bits_alone() {
        for (op, index, generation) in [
            (Op::ClientRecv, 0, 0),
            (Op::SendToClient, 123_456, 77),
            (Op::Connect, u32::MAX as usize, GENERATION_MASK),
        ] {
            let data = user_data(op, index, generation);
            assert_eq!(data & !crate::uring::USER_DATA_BITS, 0, "{data:#x}");
            assert_eq!(Session::decode(data), (op, index, generation));
        }
        // The generation wraps inside its bits instead of spilling into the ring's.
        assert_eq!(
            Session::decode(user_data(Op::Wake, 5, GENERATION_MASK + 2)),
            (Op::Wake, 5, 1)
        );
    }
}

/// A session's route choice in progress (boxed, and freed once its bytes reached the server:
/// kept small, as every session of a sniffing listener holds one while it is read).
#[derive(Debug)]
pub struct Sniffing {
    /// What the client sent so far: replayed to the server byte for byte, first.
    pub bytes: Vec<u8>,
    pub phase: SniffPhase,
    /// Tick after which a client that sent nothing counts as silent (server-first routes, or
    /// no PROXY header); `NEVER` when silence decides nothing.
    pub silence_deadline: u64,
    /// Tick after which sniffing gives up (`sniff_timeout`).
    pub deadline: u64,
    /// A PROXY protocol header may still come first (listeners with `proxy_protocol` on).
    pub header: Option<HeaderWait>,
    /// What a trusted PROXY header carried (boxed: most sessions have none).
    pub carried: Option<Box<Carried>>,
    /// The route (its position) that terminates this client's TLS with its own certificates:
    /// its pool is settled, and the connect follows the handshake.
    pub terminated_by_route: Option<u16>,
}

/// Silence decides nothing for this session.
pub const NEVER: u64 = u64::MAX;

/// What a trusted PROXY header said: the original client and the address it connected to
/// (None for v2 LOCAL and v1 UNKNOWN), and its v2 TLVs, which the server's own header repeats.
#[derive(Debug)]
pub struct Carried {
    pub addresses: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
    pub tlvs: Vec<(u8, Vec<u8>)>,
}

/// What is expected of a client's PROXY protocol header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeaderWait {
    /// The peer is in `trusted_proxies`: its header is believed, and admission waits for the
    /// address it carries.
    pub trusted: bool,
    /// `proxy_protocol = "required"`.
    pub required: bool,
}

impl HeaderWait {
    /// The connection cannot go on without a header.
    pub fn must_have(self) -> bool {
        self.trusted && self.required
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SniffPhase {
    /// Receiving the client's bytes; no route chosen yet.
    Reading,
    /// A route is chosen (by time); the receive still armed is being cancelled, and whatever
    /// it brings is kept for the server.
    Cancelling,
    /// Connecting to the chosen pool; the bytes wait for the relay.
    Replay,
    /// A TLS listener's client is past its handshake: its decrypted bytes are read (through
    /// the relay, which holds them) until the routes can decide.
    Decrypted,
}

impl Sniffing {
    pub fn next_deadline(&self) -> u64 {
        if self.bytes.is_empty() {
            self.silence_deadline.min(self.deadline)
        } else {
            self.deadline
        }
    }

    /// The client has said nothing and its silence deadline has passed.
    pub fn silent_at(&self, now: u64) -> bool {
        self.bytes.is_empty() && now >= self.silence_deadline
    }

    /// The client's address as its PROXY header gave it.
    pub fn carried_client(&self) -> Option<std::net::SocketAddr> {
        self.carried
            .as_ref()
            .and_then(|carried| carried.addresses)
            .map(|(client, _)| client)
    }

    /// The client's raw bytes are being read by the sniff step.
    pub fn reading(&self) -> bool {
        matches!(self.phase, SniffPhase::Reading | SniffPhase::Cancelling)
    }
}

#[cfg(test)]
mod size {
    /// Idle memory per proxied connection is mostly this struct (README: about 500 bytes of
    /// user space per idle connection): growing it should be a decision, not an accident.
    #[test]
    fn a_session_stays_small() {
        let bytes = std::mem::size_of::<super::Session>();
        // 472: the relay's one word for TLS state (boxed, so plain sessions pay no more).
        assert!(bytes <= 472, "Session is {bytes} bytes");
        let sniffing = std::mem::size_of::<super::Sniffing>();
        assert!(sniffing <= 56, "Sniffing is {sniffing} bytes");
    }
}
