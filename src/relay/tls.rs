//! The relay's TLS termination: the client side speaks TLS through a `TlsStream`.
//!
//! The handshake runs before a server is chosen (only the client is read; `Action::
//! TlsEstablished` asks the loop to route and connect). Received ring buffers go through
//! rustls at once and back to the ring, so a TLS session holds no ring buffer; what rustls
//! gives out (plaintext for the server, ciphertext for the client) goes through the flows'
//! spill buffers, `2 x buffer_size` bytes each while bytes are in flight and freed once they
//! drain. A direction's source is read again only when rustls holds nothing for it, so a
//! session never holds more than about two buffers per direction, plus rustls's own state.
//! The server's FIN becomes close_notify then FIN toward the client; the client's
//! close_notify or FIN becomes a FIN toward the server once its plaintext is delivered.

use super::{Action, Actions, BufferPool, CloseMode, CloseReason, Relay, Side, Spill};
use crate::tls::{Plain, TlsFacts, TlsStream};

/// A TLS session's state beside its stream.
#[derive(Debug)]
pub(super) struct TlsSide {
    pub(super) stream: TlsStream,
    /// The server is connected (false while the handshake runs, before the connect).
    server_ready: bool,
    /// Tick by which the handshake must be done (u64::MAX: done).
    handshake_deadline: u64,
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
        self.tls = Some(Box::new(TlsSide {
            stream: *tls,
            server_ready: false,
            handshake_deadline: now.saturating_add(handshake_ticks),
        }));
        self.last_active = self.last_active.max(now);
        self.tls_pump(out);
    }

    /// The server of a TLS session is connected: `replay` (a PROXY header) goes first, then
    /// what the client has sent since its handshake.
    pub fn server_connected(&mut self, now: u64, replay: Box<[u8]>, out: &mut Actions) {
        if let Some(side) = self.tls.as_deref_mut() {
            side.server_ready = true;
        }
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

    /// What the TLS handshake settled (None: no TLS, or not yet).
    pub fn tls_facts(&self) -> Option<TlsFacts> {
        self.stream()
            .filter(|tls| !tls.is_handshaking())
            .map(TlsStream::facts)
    }

    /// Why TLS failed, if it did.
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

    /// The TLS handshake is done (false without TLS).
    pub fn tls_established(&self) -> bool {
        self.stream().is_some_and(|tls| !tls.is_handshaking())
    }

    /// The server is connected (always, without TLS).
    pub(super) fn server_ready(&self) -> bool {
        self.tls.as_deref().is_none_or(|side| side.server_ready)
    }

    /// Tick by which the TLS handshake must be done (u64::MAX: none, or done).
    pub(super) fn handshake_deadline(&self) -> u64 {
        self.tls
            .as_deref()
            .map_or(u64::MAX, |side| side.handshake_deadline)
    }

    fn stream(&self) -> Option<&TlsStream> {
        self.tls.as_deref().map(|side| &side.stream)
    }

    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Whether `source` may be read now (always, without TLS).
    pub(super) fn tls_may_receive(&self, source: Side) -> bool {
        let server_ready = self.server_ready();
        let Some(tls) = self.stream() else {
            return true;
        };
        if tls.failure().is_some() {
            return false;
        }
        match source {
            // Not past what rustls can hold, and not past the handshake until a server takes
            // the plaintext.
            Side::Client => {
                !tls.client_done()
                    && !tls.tcp_ended()
                    && !tls.has_unread()
                    && (server_ready || tls.is_handshaking())
            }
            Side::Server => server_ready && !tls.wants_write(),
        }
    }

    fn tls_spill_capacity(&self) -> usize {
        2 * self.limits.buffer_size
    }

    /// Received buffers of a TLS session: through rustls, and back to the ring at once.
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
        let Some(tls) = self.tls.as_deref_mut().map(|side| &mut side.stream) else {
            return;
        };
        let flow = match source {
            Side::Client => &mut self.upstream,
            Side::Server => &mut self.downstream,
        };
        for buffer in buffers.drain(..) {
            let bytes = pool.bytes(&buffer);
            flow.received += bytes.len() as u64;
            flow.last_receive_full = bytes.len() >= buffer_size;
            match source {
                Side::Client => tls.receive(bytes),
                Side::Server if !flow.abandoned => tls.write_plaintext(bytes),
                Side::Server => {}
            }
            pool.recycle(buffer);
        }
        self.last_active = now;
        self.tls_pump(out);
    }

    /// Moves what rustls has to give into the flows, and follows the session's TLS state:
    /// handshake done, failure, the client's end.
    pub(super) fn tls_pump(&mut self, out: &mut Actions) {
        if self.phase == super::Phase::Closing {
            return;
        }
        let capacity = self.tls_spill_capacity();
        let now = self.last_active;
        let server_ready = self.server_ready();
        let Some(side) = self.tls.as_deref_mut() else {
            return;
        };
        let tls = &mut side.stream;
        if !self.downstream.abandoned {
            while tls.wants_write() {
                let written = self
                    .downstream
                    .fill_spill(capacity, now, |writer| tls.write_ciphertext(writer));
                if written == 0 {
                    break;
                }
            }
        }
        let mut client_ended = false;
        if server_ready && !self.upstream.eof && !self.upstream.abandoned {
            loop {
                let mut ended = false;
                let written = self.upstream.fill_spill(capacity, now, |writer| {
                    match tls.read_plaintext(|chunk| writer.append(chunk)) {
                        Plain::Data(count) => count,
                        Plain::Empty => 0,
                        Plain::Closed => {
                            ended = true;
                            0
                        }
                    }
                });
                if ended {
                    client_ended = true;
                    break;
                }
                if written == 0 {
                    break;
                }
            }
        }
        let established = tls.newly_established();
        if !tls.is_handshaking() {
            // Done (even if it failed right after): the handshake deadline no longer applies.
            side.handshake_deadline = u64::MAX;
        }
        let failed = tls.failure().is_some();
        let handshake_abandoned = tls.is_handshaking() && (tls.tcp_ended() || tls.client_done());
        if established {
            out.push(Action::TlsEstablished);
        }
        self.start_send(Side::Client, out);
        if failed || handshake_abandoned {
            // What rustls said (its alert) goes out first, then the session ends.
            self.upstream.source_failed = true;
            if self.downstream.is_flushed() {
                self.close(CloseMode::Graceful, CloseReason::TlsFailed, out);
            }
            return;
        }
        if client_ended {
            self.upstream.eof = true;
            self.pass_fin_if_flushed(Side::Server, out);
        }
        self.start_send(Side::Server, out);
        self.arm_receive(Side::Client, out);
        self.arm_receive(Side::Server, out);
    }

    /// Before the FIN toward a TLS client: close_notify, once everything before it is out.
    /// Returns true while that holds the FIN back.
    pub(super) fn close_notify_first(&mut self, out: &mut Actions) -> bool {
        let Some(tls) = self.tls.as_deref_mut().map(|side| &mut side.stream) else {
            return false;
        };
        let flow = &self.downstream;
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
        tls.wants_write() || !self.downstream.is_flushed()
    }
}
