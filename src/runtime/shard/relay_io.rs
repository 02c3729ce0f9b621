//! The relay's I/O: turns receive and send completions into the relay machine's events, and
//! carries out the actions it returns (receives, sends, cancels, half-closes, closes).

use std::io;

use tracing::{debug, warn};

use super::{IGNORED, Op, Shard, user_data};
use crate::metrics::CloseKind;
use crate::relay::{
    Action, Actions, CloseMode, CloseReason, ReceiveError, SendError, SendFrom, Side,
};
use crate::uring::{BufToken, Completion, socket};

/// Queued buffers one sendmsg covers at most.
const MAX_SEND_BUFFERS: usize = 64;

impl Shard {
    pub(super) fn on_receive(&mut self, index: usize, source: Side, mut completion: Completion) {
        if source == Side::Client
            && self.sessions[index]
                .sniffing
                .as_deref()
                .is_some_and(|sniffing| sniffing.reading())
        {
            return self.on_sniff_receive(index, completion);
        }
        let tick = self.now_tick;
        let mut tokens = std::mem::take(&mut self.received);
        if let Some(token) = self.ring.buffers_mut().take(&mut completion) {
            tokens.push(token);
        }
        let result = completion.result();
        let more = completion.more();
        if more && tokens.is_empty() {
            // A completion that keeps its receive armed must bring a buffer; without one the
            // kernel broke its side of the contract. End the session: its shutdown ends the
            // receive with a final completion, so `receiving` stays right.
            self.received = tokens;
            warn!(
                shard = self.index,
                result, "multishot receive completion without a buffer"
            );
            self.stats.local_errors += 1;
            self.close_session(index, CloseMode::ResetBoth, CloseKind::LocalError);
            return;
        }
        let mut actions = std::mem::take(&mut self.actions);
        let session = &mut self.sessions[index];
        let throttled = session.throttle.is_some();
        let buffers = self.ring.buffers_mut();
        match result {
            1.. if !tokens.is_empty() => {
                session.relay.on_received_batch(
                    source,
                    &mut tokens,
                    more,
                    tick,
                    buffers,
                    &mut actions,
                );
            }
            _ => {
                for token in tokens.drain(..) {
                    buffers.recycle(token);
                }
                match result {
                    0 => session.relay.on_eof(source, &mut actions),
                    error if error == -libc::ENOBUFS => {
                        session.relay.on_receive_failed(
                            source,
                            ReceiveError::NoBuffers,
                            buffers,
                            &mut actions,
                        );
                        self.stats.buffer_starvation += 1;
                        self.starved_this_turn = true;
                        self.starved.push_back((index, session.generation, source));
                    }
                    error if error == -libc::ECANCELED => session.relay.on_receive_failed(
                        source,
                        ReceiveError::Cancelled,
                        buffers,
                        &mut actions,
                    ),
                    error => {
                        if !session.closing {
                            self.stats.resets += 1;
                            debug!(shard = self.index, side = ?source, error = %io::Error::from_raw_os_error(-error.min(-1)), "receive failed");
                        }
                        session.relay.on_receive_failed(
                            source,
                            ReceiveError::Failed,
                            buffers,
                            &mut actions,
                        );
                    }
                }
            }
        }
        self.received = tokens;
        if result > 0 && throttled {
            self.charge_receive(index, source, result as u64);
        }
        self.execute(index, &mut actions);
        self.actions = actions;
    }

    pub(super) fn on_sent(&mut self, index: usize, destination: Side, mut completion: Completion) {
        let tick = self.now_tick;
        let result = completion.result();
        let mut actions = std::mem::take(&mut self.actions);
        let session = &mut self.sessions[index];
        let flow = session.relay.flow_to(destination);
        if let Some(data) = completion.take_owned() {
            flow.restore_spill(data);
        } else if flow.sending == Some(SendFrom::Queue) {
            let count = usize::from(flow.sending_buffers.max(1));
            for pending in flow.queue.iter().take(count) {
                self.ring.buffers_mut().send_completed(&pending.buffer);
            }
        }
        let outcome = match result {
            count if count >= 0 => {
                let count = count as u32;
                let bytes = u64::from(count);
                let listener = self.counters.listeners.get_mut(session.listener_counters);
                let pool = self.counters.pools.get_mut(session.pool_counters);
                match destination {
                    Side::Server => {
                        self.stats.bytes_to_server += bytes;
                        if let Some(listener) = listener {
                            listener.bytes_client_to_server += bytes;
                        }
                        if let Some(pool) = pool {
                            pool.bytes_to_server += bytes;
                        }
                    }
                    Side::Client => {
                        self.stats.bytes_to_client += bytes;
                        if let Some(listener) = listener {
                            listener.bytes_server_to_client += bytes;
                        }
                        if let Some(pool) = pool {
                            pool.bytes_to_client += bytes;
                        }
                    }
                }
                Ok(count)
            }
            error if error == -libc::ECANCELED => Err(SendError::Cancelled),
            error => {
                if !session.closing {
                    self.stats.resets += 1;
                    debug!(shard = self.index, side = ?destination, error = %io::Error::from_raw_os_error(-error), "send failed");
                }
                Err(SendError::Failed)
            }
        };
        session.relay.on_sent(
            destination,
            outcome,
            tick,
            self.ring.buffers_mut(),
            &mut actions,
        );
        self.execute(index, &mut actions);
        self.actions = actions;
    }

    /// Carries out what the relay machine asked for.
    pub(super) fn execute(&mut self, index: usize, actions: &mut Actions) {
        for action in actions.drain(..) {
            let Some(session) = self.sessions.get_mut(index) else {
                return;
            };
            let generation = session.generation;
            match action {
                Action::Receive(side) => {
                    let session = if session.throttle.is_some() {
                        if self.hold_receive(index, side) {
                            continue;
                        }
                        &mut self.sessions[index]
                    } else {
                        session
                    };
                    let Some(fd) = session.fd(side) else { continue };
                    // Right after a full buffer more is likely waiting: try at once; otherwise
                    // wait for readiness first (no wasted attempt per request).
                    let poll_first = !session.relay.flow_from(side).last_receive_full;
                    self.stats.receives += 1;
                    let _ = self.ring.recv(
                        fd,
                        user_data(Op::recv_from(side), index, generation),
                        poll_first,
                    );
                }
                Action::ReceiveMany(side, cap) => {
                    let Some(fd) = session.fd(side) else { continue };
                    let poll_first = !session.relay.flow_from(side).last_receive_full;
                    self.stats.multishot_receives += 1;
                    let _ = self.ring.recv_multishot_capped(
                        fd,
                        user_data(Op::recv_from(side), index, generation),
                        cap,
                        poll_first,
                    );
                }
                Action::Send(side) => self.submit_send(index, side),
                Action::CancelSend(side) => {
                    let several = session.relay.flow_to(side).sending_buffers > 1;
                    let target = user_data(Op::send_to(side), index, generation);
                    let _ = if several {
                        self.ring.cancel_owned(target, IGNORED)
                    } else {
                        self.ring.cancel(target, IGNORED)
                    };
                    self.stats.spills += 1;
                }
                Action::ShutdownWrite(side) => {
                    if let Some(fd) = session.borrow_fd(side) {
                        // A peer that is already gone fails the next operation instead.
                        let _ = socket::shutdown(fd, std::net::Shutdown::Write);
                    }
                }
                Action::Close(mode, reason) => {
                    let kind = match reason {
                        CloseReason::IdleTimeout => {
                            self.stats.idle_timeouts += 1;
                            debug!(shard = self.index, "idle timeout");
                            CloseKind::Idle
                        }
                        CloseReason::WriteTimeout(side) => {
                            self.stats.write_timeouts += 1;
                            debug!(
                                shard = self.index,
                                ?side,
                                "write timeout: the destination took no byte"
                            );
                            CloseKind::WriteTimeout
                        }
                        CloseReason::Completed => CloseKind::Done,
                        CloseReason::PeerFailed(Side::Client) => CloseKind::ClientReset,
                        CloseReason::PeerFailed(Side::Server) => CloseKind::ServerReset,
                        CloseReason::Cut => CloseKind::LocalError,
                        CloseReason::FirstByteTimeout => CloseKind::FirstByteTimeout,
                        // After the handshake, broken TLS from the client ends it like a reset.
                        CloseReason::TlsFailed if session.relay.tls_established() => {
                            CloseKind::ClientReset
                        }
                        CloseReason::TlsFailed | CloseReason::HandshakeTimeout => {
                            self.tls_failed(index, reason == CloseReason::HandshakeTimeout);
                            CloseKind::TlsHandshake
                        }
                    };
                    self.close_session(index, mode, kind);
                }
                Action::TlsEstablished => self.tls_established(index),
                Action::ServerTlsEstablished => self.server_tls_established(index),
                Action::TlsPlaintext => self.on_tls_plaintext(index),
                Action::ServerTlsFailed => self.server_tls_failed(index),
                Action::AbortServer => {
                    if let Some(fd) = session.borrow_fd(Side::Server) {
                        // Ends the operation in flight on the failed server's socket.
                        let _ = socket::shutdown(fd, std::net::Shutdown::Both);
                    }
                }
                Action::ResetWhenDrained(_) => {
                    // Often already drained (a reset with nothing held): check now, then per tick.
                    self.lingering.push((index, generation));
                    self.linger_check_now = true;
                }
            }
        }
    }

    fn submit_send(&mut self, index: usize, destination: Side) {
        let session = &mut self.sessions[index];
        let Some(fd) = session.fd(destination) else {
            return;
        };
        let send_data = user_data(Op::send_to(destination), index, session.generation);
        let flow = session.relay.flow_to(destination);
        let submitted = match flow.sending {
            Some(SendFrom::Queue) => match flow.queue.len() {
                0 => Err(io::Error::other("nothing queued to send")),
                1 => {
                    flow.sending_buffers = 1;
                    let head = &flow.queue[0];
                    self.ring.send(fd, &head.buffer, head.sent, send_data)
                }
                queued => {
                    // Everything queued goes in one sendmsg: fewer sends and completions per
                    // byte when the source streams.
                    let count = queued.min(MAX_SEND_BUFFERS);
                    flow.sending_buffers = u16::try_from(count).unwrap_or(u16::MAX);
                    let tokens: Vec<&BufToken> =
                        flow.queue.iter().take(count).map(|p| &p.buffer).collect();
                    let offset = flow.queue[0].sent;
                    self.ring.send_buffers(fd, &tokens, offset, send_data)
                }
            },
            Some(SendFrom::Spill) => match flow.lend_spill() {
                Some((data, start, end)) => self.ring.send_owned(fd, data, start, end, send_data),
                None => Err(io::Error::other("spill buffer not at hand")),
            },
            None => return,
        };
        if let Err(error) = submitted {
            warn!(shard = self.index, %error, "cannot submit a send; closing the session");
            self.stats.local_errors += 1;
            session.relay.flow_to(destination).sending = None;
            self.close_session(index, CloseMode::ResetBoth, CloseKind::LocalError);
        }
    }
}
