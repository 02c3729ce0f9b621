//! The relay's TLS: termination toward the client, origination toward the server, or both.
//!
//! Termination: the client's handshake runs before a server is chosen (only the client is
//! read; `Action::TlsEstablished` asks the loop to route and connect).
//!
//! Origination: once the server's socket is connected, the proxy's handshake with it runs with
//! at most one operation on that socket in flight (a send of handshake bytes, or one receive)
//! and nothing of the client's sent, so a server whose certificate is refused (or that closes,
//! or does not answer within the pool's `connect_timeout`) can be closed and another one tried
//! with every byte of the client still at hand: `Action::ServerTlsFailed` asks the loop to do
//! that (after `Action::AbortServer` when an operation must end first), and
//! `Action::ServerTlsEstablished` tells it the server took the handshake.
//!
//! Received ring buffers go through rustls at once and back to the ring, so a TLS session holds
//! no ring buffer; what rustls gives out goes through the flows' spill buffers, `2 x
//! buffer_size` bytes each while bytes are in flight and freed once they drain. A direction's
//! source is read again only when rustls holds nothing for it, so a session holds about two
//! buffers per direction, plus rustls's own state. A peer's end (close_notify or FIN) becomes
//! close_notify (toward a TLS peer) then FIN on the other side, once what came before is
//! delivered.

use super::{Action, Actions, BufferPool, CloseMode, CloseReason, Relay, Side, Spill};
use crate::tls::{Plain, TlsFacts, TlsStream};

/// Why the proxy's handshake with a server failed.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerTlsFailure {
    /// Not done within the pool's `connect_timeout`.
    Timeout,
    /// The server closed or reset its connection during the handshake.
    Closed,
    /// rustls refused it (the certificate, an alert from the server, a protocol error).
    Refused(rustls::Error),
}

/// A TLS session's state beside its streams.
#[derive(Debug)]
pub(super) struct TlsSide {
    /// Toward the client (termination; None: a plain client).
    client: Option<Box<TlsStream>>,
    /// Toward the server (origination; None: a plain server, or between two servers).
    server: Option<Box<TlsStream>>,
    /// The server's socket is connected (its handshake may still run).
    server_connected: bool,
    /// The server takes plaintext: connected, and its handshake (if any) done.
    server_ready: bool,
    /// Tick by which the client's handshake must be done (u64::MAX: done, or none).
    handshake_deadline: u64,
    /// Tick by which the server's handshake must be done (u64::MAX: done, or none).
    server_handshake_deadline: u64,
    /// Plaintext for the server, held until its handshake is done (what sniffing read); kept
    /// when another server is tried.
    server_replay: Vec<u8>,
    /// The client's own bytes are in `server_replay` (else the first-byte deadline starts
    /// when the server is ready).
    client_spoke: bool,
    /// The server's handshake failed: the loop tries another server once no operation on
    /// its socket is in flight.
    server_failure: Option<ServerTlsFailure>,
    /// `Action::ServerTlsFailed` was given for it.
    server_failure_reported: bool,
    /// While routes look at the decrypted bytes (before a server is chosen): how many bytes
    /// of the client's plaintext to read at most (0: not peeking).
    peek_limit: usize,
    /// The client's plaintext read so far for the routes; it goes to the server first.
    peeked: Vec<u8>,
    /// The client ended (close_notify or FIN) while peeked at.
    peek_ended: bool,
}

impl TlsSide {
    fn new() -> TlsSide {
        TlsSide {
            client: None,
            server: None,
            server_connected: false,
            server_ready: false,
            handshake_deadline: u64::MAX,
            server_handshake_deadline: u64::MAX,
            server_replay: Vec::new(),
            client_spoke: false,
            server_failure: None,
            server_failure_reported: false,
            peek_limit: 0,
            peeked: Vec::new(),
            peek_ended: false,
        }
    }
}

impl<B> Relay<B> {
    /// A TLS client (at tick `now`): its handshake runs first, with only the client read.
    /// `received`: its first bytes, already read (after a PROXY header).
    pub fn start_tls(
        &mut self,
        mut tls: Box<TlsStream>,
        handshake_ticks: u64,
        now: u64,
        received: &[u8],
        out: &mut Actions,
    ) {
        if !received.is_empty() {
            tls.receive(received);
            self.upstream.received += received.len() as u64;
        }
        let side = self.tls.get_or_insert_with(|| Box::new(TlsSide::new()));
        side.client = Some(tls);
        side.handshake_deadline = now.saturating_add(handshake_ticks);
        self.last_active = self.last_active.max(now);
        self.tls_pump(out);
    }

    /// The plain server of a TLS client is connected: `replay` (a PROXY header) goes first,
    /// then what the client has sent since its handshake.
    pub fn server_connected(&mut self, now: u64, replay: Box<[u8]>, out: &mut Actions) {
        let side = self.tls.get_or_insert_with(|| Box::new(TlsSide::new()));
        side.server_connected = true;
        side.server_ready = true;
        self.last_active = self.last_active.max(now);
        if !replay.is_empty() {
            self.upstream.spill = Some(Box::new(Spill::filled(replay)));
            self.upstream.waiting_since = Some(now);
        }
        self.tls_pump(out);
        self.start_send(Side::Server, out);
        self.arm_receive(Side::Server, out);
        self.arm_receive(Side::Client, out);
    }

    /// A connect to a server of a TLS pool starts: `stream` is the proxy's TLS session with
    /// it, decided now so that the connect's end cannot find a changed pool.
    pub fn prepare_server_tls(&mut self, stream: TlsStream) {
        let side = self.tls.get_or_insert_with(|| Box::new(TlsSide::new()));
        side.server = Some(Box::new(stream));
        side.server_connected = false;
        side.server_ready = false;
        side.server_failure = None;
        side.server_failure_reported = false;
    }

    /// A TLS session with the server waits for its socket's connect.
    pub fn server_tls_prepared(&self) -> bool {
        self.tls
            .as_deref()
            .is_some_and(|side| side.server.is_some() && !side.server_connected)
    }

    /// The pool speaks plain TCP now (a reload between two attempts): what was held for a
    /// TLS server is given back as plain bytes (and a plain client's TLS state goes).
    pub fn take_plain_replay(&mut self) -> Vec<u8> {
        if self.is_tls() {
            return self
                .tls
                .as_deref_mut()
                .map(|side| std::mem::take(&mut side.server_replay))
                .unwrap_or_default();
        }
        self.tls
            .take()
            .map(|side| side.server_replay)
            .unwrap_or_default()
    }

    /// The server's socket is connected and the pool speaks TLS to it (`prepare_server_tls`):
    /// `header` (a PROXY header) goes first in the clear, then the handshake; `plaintext`
    /// (what sniffing read) waits for the handshake to be done. `client_spoke`: it holds the
    /// client's own bytes.
    pub fn connect_tls_server(
        &mut self,
        now: u64,
        handshake_ticks: u64,
        header: Box<[u8]>,
        plaintext: Vec<u8>,
        client_spoke: bool,
        out: &mut Actions,
    ) {
        let side = self.tls.get_or_insert_with(|| Box::new(TlsSide::new()));
        side.server_connected = true;
        side.server_ready = false;
        side.server_failure = None;
        side.server_failure_reported = false;
        side.server_handshake_deadline = now.saturating_add(handshake_ticks);
        side.client_spoke |= client_spoke;
        if side.server_replay.is_empty() {
            side.server_replay = plaintext;
        } else {
            side.server_replay.extend_from_slice(&plaintext);
        }
        self.last_active = self.last_active.max(now);
        if !header.is_empty() {
            self.upstream.spill = Some(Box::new(Spill::filled(header)));
            self.upstream.waiting_since = Some(now);
        }
        self.tls_pump(out);
        self.start_send(Side::Server, out);
        self.arm_receive(Side::Server, out);
    }

    /// After the client's handshake, before a server is chosen: its decrypted bytes are read
    /// (up to `limit`) for routes that look at them; `Action::TlsPlaintext` tells of each
    /// arrival.
    pub fn start_peek(&mut self, limit: usize, out: &mut Actions) {
        let Some(side) = self.tls.as_deref_mut() else {
            return;
        };
        side.peek_limit = limit.max(1);
        self.tls_pump(out);
    }

    /// What the client's decrypted bytes are so far, and whether it ended.
    pub fn peeked(&self) -> (&[u8], bool) {
        self.tls
            .as_deref()
            .map_or((&[][..], false), |side| (&side.peeked[..], side.peek_ended))
    }

    /// A route is chosen: the bytes peeked at are handed over (for the server, first).
    pub fn end_peek(&mut self) -> Vec<u8> {
        let Some(side) = self.tls.as_deref_mut() else {
            return Vec::new();
        };
        side.peek_limit = 0;
        std::mem::take(&mut side.peeked)
    }

    /// Why the handshake with the current server failed, if it did.
    pub fn server_tls_failure(&self) -> Option<&ServerTlsFailure> {
        self.tls
            .as_deref()
            .and_then(|side| side.server_failure.as_ref())
    }

    /// After `Action::ServerTlsFailed`: forgets the failed server (its socket is closed by
    /// the loop), keeping everything of the client's, so another server can be connected.
    pub fn drop_server_tls(&mut self) {
        let Some(side) = self.tls.as_deref_mut() else {
            return;
        };
        side.server = None;
        side.server_connected = false;
        side.server_ready = false;
        side.server_handshake_deadline = u64::MAX;
        side.server_failure = None;
        side.server_failure_reported = false;
        let flow = &mut self.upstream;
        flow.spill = None;
        flow.sending = None;
        flow.waiting_since = None;
        flow.last_unacknowledged = None;
        let flow = &mut self.downstream;
        flow.receiving = 0;
        flow.multishot = false;
        flow.starved = false;
        flow.last_receive_full = false;
    }

    /// What the client's TLS handshake settled (None: no TLS toward the client, or not yet).
    pub fn tls_facts(&self) -> Option<TlsFacts> {
        self.stream()
            .filter(|tls| !tls.is_handshaking())
            .map(TlsStream::facts)
    }

    /// What the handshake with the server settled (None: no TLS toward it, or not yet).
    pub fn server_tls_facts(&self) -> Option<TlsFacts> {
        self.tls
            .as_deref()
            .and_then(|side| side.server.as_deref())
            .filter(|tls| !tls.is_handshaking())
            .map(TlsStream::facts)
    }

    /// Why the client's TLS failed, if it did.
    pub fn tls_failure(&self) -> Option<String> {
        self.stream()
            .and_then(TlsStream::failure)
            .map(ToString::to_string)
    }

    /// The TLS client certificate's subject CN, if it sent one.
    pub fn tls_client_cn(&self) -> Option<String> {
        self.stream().and_then(TlsStream::client_cn)
    }

    pub fn tls_error(&self) -> Option<&rustls::Error> {
        self.stream().and_then(TlsStream::failure)
    }

    /// The client's TLS handshake is done (false without TLS toward the client).
    pub fn tls_established(&self) -> bool {
        self.stream().is_some_and(|tls| !tls.is_handshaking())
    }

    /// The server's socket is connected (always, without TLS).
    pub(super) fn server_connected_now(&self) -> bool {
        self.tls.as_deref().is_none_or(|side| side.server_connected)
    }

    /// The proxy's handshake with the server runs: one operation on its socket at a time.
    pub(super) fn server_handshaking(&self) -> bool {
        self.tls
            .as_deref()
            .is_some_and(|side| side.server.is_some() && !side.server_ready)
    }

    /// Tick by which the client's TLS handshake must be done (u64::MAX: none, or done).
    pub(super) fn handshake_deadline(&self) -> u64 {
        self.tls
            .as_deref()
            .map_or(u64::MAX, |side| side.handshake_deadline)
    }

    /// Tick by which the server's TLS handshake must be done (u64::MAX: none, or done).
    pub(super) fn server_handshake_deadline(&self) -> u64 {
        self.tls
            .as_deref()
            .map_or(u64::MAX, |side| side.server_handshake_deadline)
    }

    /// The client's stream.
    fn stream(&self) -> Option<&TlsStream> {
        self.tls.as_deref().and_then(|side| side.client.as_deref())
    }

    /// TLS toward the client.
    pub fn is_tls(&self) -> bool {
        self.stream().is_some()
    }

    /// TLS on either side: received bytes go through `tls_receive`.
    pub(super) fn has_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether `source` may be read now (always, without TLS).
    pub(super) fn tls_may_receive(&self, source: Side) -> bool {
        let Some(side) = self.tls.as_deref() else {
            return true;
        };
        let client_holds_nothing = |side: &TlsSide| {
            side.client
                .as_ref()
                .is_none_or(|tls| tls.failure().is_none() && !tls.wants_write())
        };
        match source {
            Side::Client => match &side.client {
                // Not past what rustls can hold, and not past the handshake until a server
                // takes the plaintext.
                Some(tls) => {
                    tls.failure().is_none()
                        && !tls.peer_done()
                        && !tls.tcp_ended()
                        && !tls.has_unread()
                        && (side.server_ready
                            || tls.is_handshaking()
                            || side.peeked.len() < side.peek_limit)
                }
                None => {
                    side.server_ready
                        && side
                            .server
                            .as_ref()
                            .is_none_or(|tls| tls.failure().is_none() && !tls.wants_write())
                }
            },
            Side::Server => {
                if !side.server_connected || side.server_failure.is_some() {
                    return false;
                }
                match &side.server {
                    // One operation at a time: read only once the handshake's bytes are out.
                    Some(tls) if !side.server_ready => {
                        tls.failure().is_none()
                            && !tls.wants_write()
                            && !tls.tcp_ended()
                            && self.upstream.is_flushed()
                            && self.downstream.receiving == 0
                    }
                    Some(tls) => {
                        tls.failure().is_none()
                            && !tls.peer_done()
                            && !tls.tcp_ended()
                            && !tls.has_unread()
                            && client_holds_nothing(side)
                    }
                    None => client_holds_nothing(side),
                }
            }
        }
    }

    fn tls_spill_capacity(&self) -> usize {
        2 * self.limits.buffer_size
    }

    /// Received buffers of a TLS session: through rustls (or straight into the other side's
    /// rustls), and back to the ring at once.
    pub(super) fn tls_receive(
        &mut self,
        source: Side,
        buffers: &mut Vec<B>,
        now: u64,
        pool: &mut impl BufferPool<B>,
        out: &mut Actions,
    ) {
        let buffer_size = self.limits.buffer_size;
        if source == Side::Client && !buffers.is_empty() {
            self.first_byte_deadline = u64::MAX;
        }
        let Some(side) = self.tls.as_deref_mut() else {
            return;
        };
        let failing = source == Side::Server && side.server_failure.is_some();
        let flow = match source {
            Side::Client => &mut self.upstream,
            Side::Server => &mut self.downstream,
        };
        let (mut own, mut across) = match source {
            Side::Client => (side.client.as_mut(), side.server.as_mut()),
            Side::Server => (side.server.as_mut(), side.client.as_mut()),
        };
        for buffer in buffers.drain(..) {
            let bytes = pool.bytes(&buffer);
            flow.received += bytes.len() as u64;
            flow.last_receive_full = bytes.len() >= buffer_size;
            if !failing {
                match (own.as_deref_mut(), across.as_deref_mut()) {
                    (Some(own), _) => own.receive(bytes),
                    // Unless the destination is gone.
                    (None, Some(across)) if !flow.abandoned => across.write_plaintext(bytes),
                    _ => {}
                }
            }
            pool.recycle(buffer);
        }
        self.last_active = now;
        if failing {
            self.report_server_failure_if_idle(out);
            return;
        }
        self.tls_pump(out);
    }

    /// An operation on the server's socket failed (`failed`: it reset or closed) while its
    /// handshake runs, or ended after the handshake had failed.
    pub(super) fn server_operation_ended(&mut self, failed: bool, out: &mut Actions) {
        if self.server_tls_failure().is_some() {
            self.report_server_failure_if_idle(out);
        } else if failed {
            self.server_handshake_failed(ServerTlsFailure::Closed, out);
        }
    }

    /// A TLS peer's TCP stream ended: rustls learns of it (returns false for a plain peer).
    pub(super) fn tls_eof(&mut self, source: Side, out: &mut Actions) -> bool {
        let Some(side) = self.tls.as_deref_mut() else {
            return false;
        };
        if source == Side::Server && side.server_failure.is_some() {
            self.report_server_failure_if_idle(out);
            return true;
        }
        let stream = match source {
            Side::Client => side.client.as_mut(),
            Side::Server => side.server.as_mut(),
        };
        let Some(tls) = stream else {
            return false;
        };
        // The end reaches the other side once what came before it is decrypted.
        tls.receive_eof();
        self.tls_pump(out);
        true
    }

    fn server_handshake_failed(&mut self, failure: ServerTlsFailure, out: &mut Actions) {
        let Some(side) = self.tls.as_deref_mut() else {
            return;
        };
        if side.server_failure.is_some() {
            return;
        }
        side.server_failure = Some(failure);
        side.server_handshake_deadline = u64::MAX;
        if !self.report_server_failure_if_idle(out) {
            // A receive (or send) on the old socket must end before it can be closed.
            out.push(Action::AbortServer);
        }
    }

    /// Gives `Action::ServerTlsFailed` once no operation on the server's socket is in flight.
    fn report_server_failure_if_idle(&mut self, out: &mut Actions) -> bool {
        if self.phase == super::Phase::Closing {
            // The session ends: no other server is tried.
            return true;
        }
        let idle = self.upstream.sending.is_none() && self.downstream.receiving == 0;
        let Some(side) = self.tls.as_deref_mut() else {
            return false;
        };
        if side.server_failure.is_none() || !idle {
            return false;
        }
        if !side.server_failure_reported {
            side.server_failure_reported = true;
            out.push(Action::ServerTlsFailed);
        }
        true
    }

    /// The server's handshake deadline passed (at tick `now`).
    pub(super) fn server_handshake_expired(&mut self, now: u64, out: &mut Actions) -> bool {
        if now < self.server_handshake_deadline() || !self.server_handshaking() {
            return false;
        }
        self.server_handshake_failed(ServerTlsFailure::Timeout, out);
        true
    }

    /// Moves what rustls has to give into the flows (and from one side's rustls into the
    /// other's), and follows the session's TLS state: handshakes done, failures, ends.
    pub(super) fn tls_pump(&mut self, out: &mut Actions) {
        if self.phase == super::Phase::Closing {
            return;
        }
        let capacity = self.tls_spill_capacity();
        let now = self.last_active;
        let Some(side) = self.tls.as_deref_mut() else {
            return;
        };
        if side.server_failure.is_some() {
            return;
        }
        let server_ready = side.server_ready;
        let server_connected = side.server_connected;
        let TlsSide {
            client,
            server,
            peek_limit,
            peeked,
            peek_ended,
            ..
        } = side;
        let peeked_before = (peeked.len(), *peek_ended);
        let (upstream, downstream) = (&mut self.upstream, &mut self.downstream);
        let mut client_ended = false;
        let mut server_ended = false;
        loop {
            let mut moved = false;
            if let Some(tls) = client.as_mut()
                && !downstream.abandoned
            {
                moved |= flush_ciphertext(downstream, capacity, now, tls);
            }
            if let Some(tls) = server.as_mut()
                && server_connected
                && !upstream.abandoned
            {
                moved |= flush_ciphertext(upstream, capacity, now, tls);
            }
            if !server_ready {
                // Peeking for the routes: the client's plaintext, up to the limit.
                if let Some(tls) = client.as_mut()
                    && !*peek_ended
                    && peeked.len() < *peek_limit
                    && !tls.is_handshaking()
                {
                    let room = *peek_limit - peeked.len();
                    match tls.read_plaintext(|chunk| {
                        let count = chunk.len().min(room);
                        peeked.extend_from_slice(&chunk[..count]);
                        count
                    }) {
                        Plain::Data(_) => moved = true,
                        Plain::Closed => *peek_ended = true,
                        Plain::Empty => {}
                    }
                }
                if !moved {
                    break;
                }
                continue;
            }
            // The server's plaintext toward the client.
            if let Some(tls) = server.as_mut()
                && !downstream.eof
                && !downstream.abandoned
                && !server_ended
            {
                let (forwarded, ended) =
                    forward_plaintext(tls, client.as_deref_mut(), downstream, capacity, now);
                moved |= forwarded;
                server_ended |= ended;
            }
            // The client's plaintext toward the server.
            if let Some(tls) = client.as_mut()
                && !upstream.eof
                && !upstream.abandoned
                && !client_ended
            {
                let (forwarded, ended) =
                    forward_plaintext(tls, server.as_deref_mut(), upstream, capacity, now);
                moved |= forwarded;
                client_ended |= ended;
            }
            if !moved {
                break;
            }
        }
        let peeked_now = (peeked.len(), *peek_ended);
        if let Some(tls) = client.as_mut() {
            let established = tls.newly_established();
            if !tls.is_handshaking() {
                // Done (even if it failed right after): the handshake deadline no longer applies.
                side.handshake_deadline = u64::MAX;
            }
            let failed = tls.failure().is_some();
            let handshake_abandoned = tls.is_handshaking() && (tls.tcp_ended() || tls.peer_done());
            if established {
                out.push(Action::TlsEstablished);
            }
            if peeked_now != peeked_before && !failed {
                out.push(Action::TlsPlaintext);
            }
            if failed || handshake_abandoned {
                // What rustls said (its alert) goes out first, then the session ends.
                self.start_send(Side::Client, out);
                self.upstream.source_failed = true;
                if self.downstream.is_flushed() {
                    self.close(CloseMode::Graceful, CloseReason::TlsFailed, out);
                }
                return;
            }
        }
        let Some(side) = self.tls.as_deref_mut() else {
            return;
        };
        if let Some(tls) = side.server.as_mut() {
            if !side.server_ready {
                if let Some(error) = tls.failure() {
                    let error = error.clone();
                    // Nothing of the client's was given to it: another server can be tried.
                    return self.server_handshake_failed(ServerTlsFailure::Refused(error), out);
                }
                if tls.is_handshaking() && tls.tcp_ended() {
                    return self.server_handshake_failed(ServerTlsFailure::Closed, out);
                }
                if tls.newly_established() {
                    side.server_ready = true;
                    side.server_handshake_deadline = u64::MAX;
                    let replay = std::mem::take(&mut side.server_replay);
                    if !replay.is_empty() {
                        tls.write_plaintext(&replay);
                    }
                    let plain_client = side.client.is_none();
                    if plain_client
                        && !side.client_spoke
                        && let Some(ticks) = self.limits.first_byte_ticks
                    {
                        self.first_byte_deadline = now.saturating_add(ticks);
                    }
                    out.push(Action::ServerTlsEstablished);
                    // The client may be read now, and the replay goes out.
                    return self.tls_pump(out);
                }
            } else if tls.failure().is_some() {
                // Broken TLS from the server ends the session like a reset, once what is held
                // for the client is out.
                self.downstream.source_failed = true;
                self.start_send(Side::Client, out);
                if self.downstream.is_flushed()
                    && self.stream().is_none_or(|tls| !tls.wants_write())
                {
                    self.close(
                        CloseMode::ResetBoth,
                        CloseReason::PeerFailed(Side::Server),
                        out,
                    );
                }
                return;
            }
        }
        if client_ended {
            self.upstream.eof = true;
            self.pass_fin_if_flushed(Side::Server, out);
        }
        if server_ended {
            self.downstream.eof = true;
            self.pass_fin_if_flushed(Side::Client, out);
        }
        self.start_send(Side::Client, out);
        self.start_send(Side::Server, out);
        self.arm_receive(Side::Client, out);
        self.arm_receive(Side::Server, out);
    }

    /// Before the FIN toward a TLS peer: close_notify, once everything before it is out.
    /// Returns true while that holds the FIN back.
    pub(super) fn close_notify_first(&mut self, destination: Side, out: &mut Actions) -> bool {
        let Some(side) = self.tls.as_deref_mut() else {
            return false;
        };
        let (tls, flow) = match destination {
            Side::Client => (side.client.as_mut(), &self.downstream),
            Side::Server => (side.server.as_mut(), &self.upstream),
        };
        let Some(tls) = tls else {
            return false;
        };
        if !flow.eof || flow.shut || flow.abandoned {
            return false;
        }
        if !tls.close_notify_sent() {
            if !flow.is_flushed() || tls.wants_write() {
                return true;
            }
            tls.close_notify();
            self.tls_pump(out);
            return true;
        }
        tls.wants_write() || !flow.is_flushed()
    }
}

/// Decrypted bytes of `tls` into `flow`'s spill until it is full or nothing is left; returns
/// (bytes moved, the peer ended).
/// Moves what `tls` has to send into `flow`'s spill; true if a byte moved.
fn flush_ciphertext<B>(
    flow: &mut super::Flow<B>,
    capacity: usize,
    now: u64,
    tls: &mut TlsStream,
) -> bool {
    let mut moved = false;
    while tls.wants_write() {
        if flow.fill_spill(capacity, now, |writer| tls.write_ciphertext(writer)) == 0 {
            break;
        }
        moved = true;
    }
    moved
}

/// Moves `source`'s plaintext on: into `toward`, the other side's TLS session, once that one
/// has handed out what it holds; or, toward a plain peer, into `flow`'s spill. Returns whether
/// a byte moved and whether `source` ended.
fn forward_plaintext<B>(
    source: &mut TlsStream,
    toward: Option<&mut TlsStream>,
    flow: &mut super::Flow<B>,
    capacity: usize,
    now: u64,
) -> (bool, bool) {
    match toward {
        Some(toward) if !toward.wants_write() => match source.read_plaintext(|chunk| {
            toward.write_plaintext(chunk);
            chunk.len()
        }) {
            Plain::Data(_) => (true, false),
            Plain::Closed => (false, true),
            Plain::Empty => (false, false),
        },
        Some(_) => (false, false),
        None => {
            let (written, ended) = fill_plain(flow, capacity, now, source);
            (written > 0, ended)
        }
    }
}

fn fill_plain<B>(
    flow: &mut super::Flow<B>,
    capacity: usize,
    now: u64,
    tls: &mut TlsStream,
) -> (usize, bool) {
    let mut moved = 0;
    loop {
        let mut ended = false;
        let written = flow.fill_spill(capacity, now, |writer| {
            match tls.read_plaintext(|chunk| writer.append(chunk)) {
                Plain::Data(count) => count,
                Plain::Empty => 0,
                Plain::Closed => {
                    ended = true;
                    0
                }
            }
        });
        moved += written;
        if ended {
            return (moved, true);
        }
        if written == 0 {
            return (moved, false);
        }
    }
}
