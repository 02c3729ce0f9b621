//! One session: a client connection, its server connection, and the bytes between them.
//!
//! Owns the per-session state the shard loop drives: which server, which attempt, and for each
//! direction the received buffers waiting to be sent, whether reads are armed or paused, and
//! the half-close progress. Does no I/O itself; the loop (`runtime::shard`) reads these fields
//! to decide the next submission. Invariant: a session is freed only when `inflight` is zero,
//! so no completion ever refers to a reused slot.

use std::collections::VecDeque;
use std::os::fd::RawFd;

use crate::balance::{ServerIndex, TriedServers};
use crate::config::PoolId;
use crate::uring::BufToken;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionState {
    /// Waiting for a connect to a server (the client's bytes wait in its socket).
    Connecting,
    Relaying,
    /// Every operation is being cancelled; the slot is freed when `inflight` reaches zero.
    Closing,
}

/// Which side of a session an event concerns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Downstream: the connection the proxy accepted.
    Client,
    /// Upstream: the connection the proxy opened.
    Server,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Server,
            Side::Server => Side::Client,
        }
    }
}

/// How a session ends, seen by its peers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseMode {
    /// Plain close (FIN) of both sockets.
    Graceful,
    /// The given side gets a RST (used to pass a reset from the other side through).
    Reset(Side),
    /// Both sides get a RST (a drain deadline cut the session).
    ResetBoth,
}

/// A received buffer not yet fully sent on.
#[derive(Debug)]
pub struct Pending {
    pub token: BufToken,
    pub sent: u32,
}

/// One direction of a session: bytes read from `source`, written to the other side.
#[derive(Debug, Default)]
pub struct Flow {
    pub queue: VecDeque<Pending>,
    /// A send of `queue.front()` is in flight.
    pub sending: bool,
    /// A multishot receive on the source is armed.
    pub receiving: bool,
    /// Reads were stopped because `queue` reached its limit (backpressure).
    pub paused: bool,
    /// Reads stopped because the buffer ring was empty; the loop re-arms when buffers return.
    pub starved: bool,
    /// The source sent FIN.
    pub eof: bool,
    /// The FIN was passed on (shutdown of the destination's write side).
    pub shut: bool,
    pub bytes: u64,
}

impl Flow {
    /// Everything received has been delivered and the FIN passed on.
    pub fn finished(&self) -> bool {
        self.eof && self.shut
    }

    /// Nothing is waiting to be sent.
    pub fn is_flushed(&self) -> bool {
        self.queue.is_empty() && !self.sending
    }

    /// Lifts a backpressure pause once the old receive has ended and the queue is down to half
    /// of `limit`. Both the send completions (queue shrinks) and the receive's final completion
    /// (cancel done) must check this: whichever comes last resumes.
    pub fn resume_if_drained(&mut self, limit: usize) -> bool {
        let resume = self.paused && !self.receiving && self.queue.len() < limit.div_ceil(2).max(1);
        if resume {
            self.paused = false;
        }
        resume
    }

    /// Whether the source's reads should be (re)armed now.
    pub fn wants_receive(&self) -> bool {
        !self.receiving && !self.paused && !self.starved && !self.eof
    }
}

#[derive(Debug)]
pub struct Session {
    /// Distinguishes this session from earlier ones in the same slot (timers, starved list).
    pub serial: u32,
    pub listener: usize,
    pub pool: PoolId,
    pub state: SessionState,
    pub client_fd: RawFd,
    /// -1 while no server socket exists.
    pub server_fd: RawFd,
    pub server: Option<ServerIndex>,
    pub tried: TriedServers,
    pub attempts: u32,
    pub client_key: u64,
    /// Client to server.
    pub upstream: Flow,
    /// Server to client.
    pub downstream: Flow,
    /// Operations submitted whose last completion has not arrived.
    pub inflight: u32,
    /// Loop tick of the last byte moved (idle timeout).
    pub last_active: u64,
}

impl Session {
    pub fn new(
        serial: u32,
        listener: usize,
        pool: PoolId,
        client_fd: RawFd,
        client_key: u64,
        now: u64,
    ) -> Session {
        Session {
            serial,
            listener,
            pool,
            state: SessionState::Connecting,
            client_fd,
            server_fd: -1,
            server: None,
            tried: TriedServers::default(),
            attempts: 0,
            client_key,
            upstream: Flow::default(),
            downstream: Flow::default(),
            inflight: 0,
            last_active: now,
        }
    }

    /// The flow whose bytes are read from `source`.
    pub fn flow_from(&mut self, source: Side) -> &mut Flow {
        match source {
            Side::Client => &mut self.upstream,
            Side::Server => &mut self.downstream,
        }
    }

    pub fn fd(&self, side: Side) -> RawFd {
        match side {
            Side::Client => self.client_fd,
            Side::Server => self.server_fd,
        }
    }

    /// Both directions have delivered everything and passed their FIN on.
    pub fn is_complete(&self) -> bool {
        self.upstream.finished() && self.downstream.finished()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_lifts_only_after_the_cancelled_receive_has_ended() {
        let mut flow = Flow {
            paused: true,
            receiving: true,
            ..Flow::default()
        };
        // Queue drained while the cancel is still on its way: not yet.
        assert!(!flow.resume_if_drained(8));
        assert!(!flow.wants_receive());
        // The receive's final completion arrives last: that is when reads resume.
        flow.receiving = false;
        assert!(flow.resume_if_drained(8));
        assert!(flow.wants_receive());
        // Not paused: nothing to lift.
        assert!(!flow.resume_if_drained(8));
    }

    #[test]
    fn a_flow_finishes_after_eof_and_fin_passed_on() {
        let mut flow = Flow::default();
        assert!(!flow.finished());
        flow.eof = true;
        assert!(flow.is_flushed() && !flow.finished());
        flow.shut = true;
        assert!(flow.finished());
        assert!(!flow.wants_receive(), "no reads after EOF");
    }
}
