//! Every transition of the relay machine, without a ring: buffers are plain vectors from a
//! pool that counts what it lent and got back.

use super::*;

#[derive(Debug)]
struct TestBuffer {
    bytes: Vec<u8>,
}

impl Measured for TestBuffer {
    fn byte_len(&self) -> u32 {
        self.bytes.len() as u32
    }
}

struct TestPool {
    lent: usize,
    recycled: usize,
    /// Bytes a buffer holds (appends past it are refused).
    capacity: usize,
}

impl Default for TestPool {
    fn default() -> Self {
        TestPool {
            lent: 0,
            recycled: 0,
            capacity: LIMITS.buffer_size,
        }
    }
}

impl TestPool {
    fn buffer(&mut self, bytes: &[u8]) -> (TestBuffer, u32) {
        self.lent += 1;
        (
            TestBuffer {
                bytes: bytes.to_vec(),
            },
            bytes.len() as u32,
        )
    }

    fn outstanding(&self) -> usize {
        self.lent - self.recycled
    }
}

impl BufferPool<TestBuffer> for TestPool {
    fn bytes<'a>(&'a self, buffer: &'a TestBuffer) -> &'a [u8] {
        &buffer.bytes
    }

    fn recycle(&mut self, _buffer: TestBuffer) {
        self.recycled += 1;
    }

    fn append(&mut self, into: &mut TestBuffer, from: &TestBuffer) -> bool {
        if into.bytes.len() + from.bytes.len() > self.capacity {
            return false;
        }
        into.bytes.extend_from_slice(&from.bytes);
        true
    }
}

const LIMITS: Limits = Limits {
    queued_buffers: 4,
    buffer_size: 8,
    idle_ticks: 100,
    first_byte_ticks: None,
    write_ticks: 20,
    multishot: false,
};

/// LIMITS with a first-byte timeout of 30 ticks.
const FIRST_BYTE_LIMITS: Limits = Limits {
    first_byte_ticks: Some(30),
    ..LIMITS
};

fn started() -> (Relay<TestBuffer>, TestPool) {
    let mut relay = Relay::new(LIMITS, 0);
    let mut out = Vec::new();
    relay.start(0, &mut out);
    assert_eq!(
        out,
        [Action::Receive(Side::Client), Action::Receive(Side::Server)]
    );
    (relay, TestPool::default())
}

fn receive(
    relay: &mut Relay<TestBuffer>,
    pool: &mut TestPool,
    source: Side,
    bytes: &[u8],
    now: u64,
) -> Actions {
    let (buffer, len) = pool.buffer(bytes);
    let mut out = Vec::new();
    relay.on_received(source, buffer, len, false, now, pool, &mut out);
    out
}

fn sent(
    relay: &mut Relay<TestBuffer>,
    pool: &mut TestPool,
    destination: Side,
    result: Result<u32, SendError>,
    now: u64,
) -> Actions {
    let mut out = Vec::new();
    relay.on_sent(destination, result, now, pool, &mut out);
    out
}

#[test]
fn received_bytes_are_sent_on_and_the_receive_rearmed() {
    let (mut relay, mut pool) = started();
    let out = receive(&mut relay, &mut pool, Side::Client, b"hello", 1);
    assert_eq!(
        out,
        [Action::Send(Side::Server), Action::Receive(Side::Client)]
    );
    assert_eq!(relay.upstream.sending, Some(SendFrom::Queue));
    let out = sent(&mut relay, &mut pool, Side::Server, Ok(5), 1);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(pool.outstanding(), 0, "the sent buffer went back");
    assert_eq!(relay.delivered(), (5, 0));
    assert!(relay.upstream.is_flushed());
}

#[test]
fn a_direction_never_holds_more_than_queued_buffers() {
    let (mut relay, mut pool) = started();
    // The server takes nothing: the client keeps sending full buffers, so several receives
    // are armed at once; every armed receive completes with a full buffer.
    for round in 0..20 {
        if relay.upstream.receiving == 0 {
            break;
        }
        receive(&mut relay, &mut pool, Side::Client, b"12345678", round);
        assert!(
            relay.upstream.ring_buffers() + usize::from(relay.upstream.receiving)
                <= LIMITS.queued_buffers,
            "held plus armed past the bound"
        );
    }
    assert_eq!(relay.upstream.ring_buffers(), LIMITS.queued_buffers);
    assert_eq!(pool.outstanding(), LIMITS.queued_buffers);
    assert_eq!(
        relay.upstream.receiving, 0,
        "no receive armed past the bound"
    );
    // One buffer sent: room again, so the receive comes back (exactly one).
    let out = sent(&mut relay, &mut pool, Side::Server, Ok(8), 10);
    assert_eq!(
        out,
        [Action::Send(Side::Server), Action::Receive(Side::Client)]
    );
}

#[test]
fn a_send_of_several_buffers_advances_across_them() {
    let (mut relay, mut pool) = started();
    // The server stalls, so three buffers queue while the first send is in flight.
    receive(&mut relay, &mut pool, Side::Client, b"aaaaaaaa", 1);
    receive(&mut relay, &mut pool, Side::Client, b"bbbbbbbb", 1);
    receive(&mut relay, &mut pool, Side::Client, b"cccc", 1);
    // That send (one buffer) completes; the next covers both remaining buffers at once, and
    // the socket takes 10 of their 12 bytes.
    sent(&mut relay, &mut pool, Side::Server, Ok(8), 2);
    relay.upstream.sending_buffers = 2;
    sent(&mut relay, &mut pool, Side::Server, Ok(10), 3);
    assert_eq!(relay.upstream.ring_buffers(), 1);
    let head = relay.upstream.queue.front().expect("the last buffer");
    assert_eq!((head.sent, head.len), (2, 4));
    assert_eq!(pool.outstanding(), 1);
    assert_eq!(relay.delivered(), (18, 0));
}

#[test]
fn a_partial_send_continues_from_where_it_stopped() {
    let (mut relay, mut pool) = started();
    receive(&mut relay, &mut pool, Side::Server, b"abcdefgh", 1);
    let out = sent(&mut relay, &mut pool, Side::Client, Ok(3), 2);
    assert_eq!(out, [Action::Send(Side::Client)]);
    let head = relay.downstream.queue.front().expect("still queued");
    assert_eq!(head.sent, 3);
    assert_eq!(pool.outstanding(), 1);
    sent(&mut relay, &mut pool, Side::Client, Ok(5), 3);
    assert_eq!(pool.outstanding(), 0);
}

#[test]
fn a_fin_is_passed_on_only_after_everything_before_it() {
    let (mut relay, mut pool) = started();
    receive(&mut relay, &mut pool, Side::Client, b"last", 1);
    let mut out = Vec::new();
    relay.on_eof(Side::Client, &mut out);
    assert!(
        out.is_empty(),
        "FIN must wait for the queued bytes: {out:?}"
    );
    let out = sent(&mut relay, &mut pool, Side::Server, Ok(4), 2);
    assert_eq!(out, [Action::ShutdownWrite(Side::Server)]);
    // The other direction keeps flowing after the half-close.
    let out = receive(&mut relay, &mut pool, Side::Server, b"reply", 3);
    assert_eq!(
        out,
        [Action::Send(Side::Client), Action::Receive(Side::Server)]
    );
    sent(&mut relay, &mut pool, Side::Client, Ok(5), 4);
    let mut out = Vec::new();
    relay.on_eof(Side::Server, &mut out);
    assert_eq!(
        out,
        [
            Action::ShutdownWrite(Side::Client),
            Action::Close(CloseMode::Graceful, CloseReason::Completed)
        ]
    );
    assert!(relay.is_closing());
}

#[test]
fn a_starved_receive_is_rearmed_when_buffers_return() {
    let (mut relay, mut pool) = started();
    let mut out = Vec::new();
    relay.on_receive_failed(Side::Client, ReceiveError::NoBuffers, &mut pool, &mut out);
    assert!(out.is_empty());
    assert!(relay.upstream.starved);
    assert!(relay.on_buffers_available(Side::Client, &mut out));
    assert_eq!(out, [Action::Receive(Side::Client)]);
    out.clear();
    assert!(
        !relay.on_buffers_available(Side::Client, &mut out),
        "only a starved receive is re-armed"
    );
}

#[test]
fn a_server_reset_still_delivers_what_was_held_then_resets_the_client() {
    let (mut relay, mut pool) = started();
    receive(&mut relay, &mut pool, Side::Server, b"abcdefgh", 1);
    receive(&mut relay, &mut pool, Side::Server, b"ijkl", 1);
    let mut out = Vec::new();
    relay.on_receive_failed(Side::Server, ReceiveError::Failed, &mut pool, &mut out);
    assert!(out.is_empty(), "held bytes go first: {out:?}");
    let out = sent(&mut relay, &mut pool, Side::Client, Ok(8), 2);
    assert_eq!(out, [Action::Send(Side::Client)]);
    let out = sent(&mut relay, &mut pool, Side::Client, Ok(4), 3);
    assert_eq!(out, [Action::ResetWhenDrained(Side::Client)]);
    assert_eq!(relay.lingering(), Some(Side::Client));
    assert_eq!(relay.delivered(), (0, 12));
    // The client's socket still holds bytes for its peer: wait; then reset.
    let mut out = Vec::new();
    relay.on_unacknowledged(5_000, 4, &mut out);
    relay.on_unacknowledged(100, 5, &mut out);
    assert!(out.is_empty());
    relay.on_unacknowledged(0, 6, &mut out);
    assert_eq!(
        out,
        [Action::Close(
            CloseMode::Reset(Side::Client),
            CloseReason::PeerFailed(Side::Server)
        )]
    );
    assert_eq!(pool.outstanding(), 0);
}

#[test]
fn a_peer_that_never_drains_after_a_reset_is_cut_at_the_write_timeout() {
    let (mut relay, mut pool) = started();
    let mut out = Vec::new();
    relay.on_receive_failed(Side::Server, ReceiveError::Failed, &mut pool, &mut out);
    assert_eq!(out, [Action::ResetWhenDrained(Side::Client)]);
    out.clear();
    relay.on_unacknowledged(700, 1, &mut out);
    relay.on_unacknowledged(700, 1 + LIMITS.write_ticks - 1, &mut out);
    assert!(out.is_empty());
    relay.on_unacknowledged(700, 1 + LIMITS.write_ticks, &mut out);
    assert_eq!(
        out,
        [Action::Close(
            CloseMode::Reset(Side::Client),
            CloseReason::WriteTimeout(Side::Client)
        )]
    );
}

#[test]
fn a_failed_send_to_the_client_drops_its_bytes_but_delivers_the_servers() {
    let (mut relay, mut pool) = started();
    receive(&mut relay, &mut pool, Side::Client, b"to-srv", 1);
    receive(&mut relay, &mut pool, Side::Server, b"to-cli", 1);
    // The client is gone: what was for it is dropped (its buffer goes back at once).
    let out = sent(
        &mut relay,
        &mut pool,
        Side::Client,
        Err(SendError::Failed),
        2,
    );
    assert!(out.is_empty(), "{out:?}");
    assert!(relay.downstream.abandoned);
    assert_eq!(pool.outstanding(), 1);
    // A late receive from the server is dropped too.
    let out = receive(&mut relay, &mut pool, Side::Server, b"more", 2);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(pool.outstanding(), 1);
    // The client's bytes still reach the server, then the server is reset.
    let out = sent(&mut relay, &mut pool, Side::Server, Ok(6), 3);
    assert_eq!(out, [Action::ResetWhenDrained(Side::Server)]);
    assert_eq!(pool.outstanding(), 0);
}

#[test]
fn a_zero_byte_send_completion_is_a_failure() {
    let (mut relay, mut pool) = started();
    receive(&mut relay, &mut pool, Side::Server, b"x", 1);
    let out = sent(&mut relay, &mut pool, Side::Client, Ok(0), 2);
    assert_eq!(out, [Action::ResetWhenDrained(Side::Server)]);
}

#[test]
fn both_sides_failing_resets_both() {
    let (mut relay, mut pool) = started();
    receive(&mut relay, &mut pool, Side::Client, b"x", 1);
    let mut out = Vec::new();
    relay.on_receive_failed(Side::Server, ReceiveError::Failed, &mut pool, &mut out);
    let out = sent(
        &mut relay,
        &mut pool,
        Side::Server,
        Err(SendError::Failed),
        2,
    );
    assert_eq!(
        out,
        [Action::Close(
            CloseMode::ResetBoth,
            CloseReason::PeerFailed(Side::Server)
        )]
    );
}

#[test]
fn the_write_timeout_counts_from_the_last_byte_the_destination_took() {
    let (mut relay, mut pool) = started();
    receive(&mut relay, &mut pool, Side::Server, b"abcdefgh", 10);
    let mut out = Vec::new();
    relay.on_tick(10 + LIMITS.write_ticks - 1, |_| None, &mut out);
    assert!(out.is_empty());
    // Progress: the clock starts again.
    sent(&mut relay, &mut pool, Side::Client, Ok(2), 25);
    relay.on_tick(25 + LIMITS.write_ticks - 1, |_| None, &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(relay.next_deadline(), 25 + LIMITS.write_ticks);
    relay.on_tick(25 + LIMITS.write_ticks, |_| None, &mut out);
    assert_eq!(
        out,
        [Action::Close(
            CloseMode::ResetBoth,
            CloseReason::WriteTimeout(Side::Client)
        )]
    );
}

#[test]
fn a_destination_whose_socket_keeps_draining_is_not_cut() {
    let (mut relay, mut pool) = started();
    receive(&mut relay, &mut pool, Side::Server, b"abcdefgh", 0);
    let mut out = Vec::new();
    // No send completes, but the client's socket hands bytes on between the checks.
    let mut held = 1_000_000;
    for now in (5..=100).step_by(5) {
        held -= 1_000;
        relay.on_tick(now, |side| (side == Side::Client).then_some(held), &mut out);
    }
    assert!(out.is_empty(), "{out:?}");
    // Then it stops taking bytes: cut one write timeout after the last progress.
    relay.on_tick(100 + LIMITS.write_ticks - 1, |_| Some(held), &mut out);
    assert!(out.is_empty());
    relay.on_tick(100 + LIMITS.write_ticks, |_| Some(held), &mut out);
    assert_eq!(
        out,
        [Action::Close(
            CloseMode::ResetBoth,
            CloseReason::WriteTimeout(Side::Client)
        )]
    );
}

#[test]
fn the_idle_timeout_counts_from_the_last_byte_moved() {
    let (mut relay, mut pool) = started();
    let mut out = Vec::new();
    relay.on_tick(LIMITS.idle_ticks - 1, |_| None, &mut out);
    assert!(out.is_empty());
    receive(&mut relay, &mut pool, Side::Client, b"a", 50);
    sent(&mut relay, &mut pool, Side::Server, Ok(1), 50);
    assert_eq!(relay.next_deadline(), 50 + LIMITS.idle_ticks);
    relay.on_tick(LIMITS.idle_ticks, |_| None, &mut out);
    assert!(out.is_empty());
    relay.on_tick(50 + LIMITS.idle_ticks, |_| None, &mut out);
    assert_eq!(
        out,
        [Action::Close(CloseMode::Graceful, CloseReason::IdleTimeout)]
    );
}

#[test]
fn a_client_silent_past_the_first_byte_timeout_is_closed() {
    // Accepted at tick 0, the server connected at tick 10: the deadline runs from there.
    let mut relay: Relay<TestBuffer> = Relay::new(FIRST_BYTE_LIMITS, 0);
    let mut pool = TestPool::default();
    let mut out = Vec::new();
    relay.on_tick(35, |_| None, &mut out);
    assert!(
        out.is_empty(),
        "no deadline before the server is connected: {out:?}"
    );
    relay.start(10, &mut out);
    out.clear();
    assert_eq!(relay.next_deadline(), 40);
    // The server speaking first does not count: the client has to send.
    receive(&mut relay, &mut pool, Side::Server, b"hello", 20);
    sent(&mut relay, &mut pool, Side::Client, Ok(5), 20);
    relay.on_tick(39, |_| None, &mut out);
    assert!(!out.contains(&Action::Close(
        CloseMode::Graceful,
        CloseReason::FirstByteTimeout
    )));
    out.clear();
    relay.on_tick(40, |_| None, &mut out);
    assert_eq!(
        out,
        [Action::Close(
            CloseMode::Graceful,
            CloseReason::FirstByteTimeout
        )]
    );
}

#[test]
fn a_client_that_sends_in_time_has_no_first_byte_deadline() {
    let mut relay: Relay<TestBuffer> = Relay::new(FIRST_BYTE_LIMITS, 0);
    let mut pool = TestPool::default();
    let mut out = Vec::new();
    relay.start(0, &mut out);
    receive(&mut relay, &mut pool, Side::Client, b"a", 29);
    sent(&mut relay, &mut pool, Side::Server, Ok(1), 29);
    out.clear();
    relay.on_tick(31, |_| None, &mut out);
    assert!(out.is_empty(), "{out:?}");
    assert_eq!(relay.next_deadline(), 29 + LIMITS.idle_ticks);
}

#[test]
fn a_receive_held_by_a_cap_is_neither_idle_nor_a_silent_client() {
    let mut relay: Relay<TestBuffer> = Relay::new(FIRST_BYTE_LIMITS, 0);
    let mut out = Vec::new();
    relay.start(0, &mut out);
    out.clear();
    relay.take_back_receive(Side::Client);
    relay.take_back_receive(Side::Server);
    relay.on_tick(LIMITS.idle_ticks + 40, |_| None, &mut out);
    assert!(out.is_empty(), "{out:?}");
    relay.resume_receive(Side::Client, LIMITS.idle_ticks + 40, &mut out);
    relay.resume_receive(Side::Server, LIMITS.idle_ticks + 40, &mut out);
    assert_eq!(
        out,
        [Action::Receive(Side::Client), Action::Receive(Side::Server)]
    );
    out.clear();
    // Released, the silent client meets its deadline.
    relay.on_tick(LIMITS.idle_ticks + 41, |_| None, &mut out);
    assert_eq!(
        out,
        [Action::Close(
            CloseMode::Graceful,
            CloseReason::FirstByteTimeout
        )]
    );
}

#[test]
fn a_stalled_direction_is_copied_out_and_its_ring_buffers_return() {
    let (mut relay, mut pool) = started();
    for _ in 0..LIMITS.queued_buffers {
        receive(&mut relay, &mut pool, Side::Server, b"12345678", 1);
    }
    assert_eq!(pool.outstanding(), LIMITS.queued_buffers);
    let mut out = Vec::new();
    // Not stalled long enough yet.
    relay.spill_if_stalled(0, &mut pool, &mut out);
    assert!(out.is_empty());
    relay.spill_if_stalled(1, &mut pool, &mut out);
    assert_eq!(out, [Action::CancelSend(Side::Client)]);
    // The cancelled send completes; every byte is copied out, every ring buffer returned.
    let out = sent(
        &mut relay,
        &mut pool,
        Side::Client,
        Err(SendError::Cancelled),
        3,
    );
    // The spill is full (queued_buffers x buffer_size): no receive until it drains.
    assert_eq!(out, [Action::Send(Side::Client)]);
    assert_eq!(pool.outstanding(), 0);
    assert_eq!(relay.ring_buffers(), 0);
    assert_eq!(relay.downstream.sending, Some(SendFrom::Spill));
    let (data, start, end) = relay.downstream.lend_spill().expect("spill to send");
    assert_eq!(&data[start..end], b"12345678123456781234567812345678");
    // While the spill is out with the send, nothing more is read into ring buffers.
    relay.downstream.restore_spill(data);
    let out = sent(&mut relay, &mut pool, Side::Client, Ok(32), 4);
    assert!(
        relay.downstream.spill.is_none(),
        "drained: back to zero copy"
    );
    assert!(
        out.iter()
            .all(|action| *action == Action::Receive(Side::Server)),
        "{out:?}"
    );
    assert_eq!(relay.delivered(), (0, 32));
}

#[test]
fn while_spilled_received_buffers_are_copied_at_once() {
    let (mut relay, mut pool) = started();
    receive(&mut relay, &mut pool, Side::Server, b"abcdefgh", 1);
    let mut out = Vec::new();
    relay.spill_if_stalled(5, &mut pool, &mut out);
    sent(&mut relay, &mut pool, Side::Client, Ok(3), 6);
    // The partial send left "defgh" queued; it was copied out.
    assert_eq!(pool.outstanding(), 0);
    let (data, start, end) = relay.downstream.lend_spill().expect("spill");
    assert_eq!(&data[start..end], b"defgh");
    relay.downstream.restore_spill(data);
    relay.downstream.sending = None;
    let out = receive(&mut relay, &mut pool, Side::Server, b"ijkl", 7);
    assert_eq!(pool.outstanding(), 0, "copied and returned on arrival");
    assert!(out.contains(&Action::Send(Side::Client)), "{out:?}");
    let (data, start, end) = relay.downstream.lend_spill().expect("spill");
    assert_eq!(&data[start..end], b"defghijkl");
    assert!(end - start <= LIMITS.queued_buffers * LIMITS.buffer_size);
}

#[test]
fn a_closing_session_ignores_events_and_returns_buffers() {
    let (mut relay, mut pool) = started();
    receive(&mut relay, &mut pool, Side::Client, b"abc", 1);
    relay.set_closing();
    let out = receive(&mut relay, &mut pool, Side::Server, b"late", 2);
    assert!(out.is_empty());
    let out = sent(
        &mut relay,
        &mut pool,
        Side::Server,
        Err(SendError::Cancelled),
        2,
    );
    assert!(out.is_empty());
    let mut out = Vec::new();
    relay.on_eof(Side::Client, &mut out);
    relay.on_receive_failed(Side::Server, ReceiveError::Cancelled, &mut pool, &mut out);
    assert!(out.is_empty());
    assert!(relay.is_idle(), "no operation left in flight");
    relay.release(&mut pool);
    assert_eq!(pool.outstanding(), 0);
}

#[test]
fn idle_means_no_receive_and_no_send_in_flight() {
    let (mut relay, mut pool) = started();
    assert!(!relay.is_idle());
    let mut out = Vec::new();
    relay.on_eof(Side::Client, &mut out);
    relay.on_eof(Side::Server, &mut out);
    assert!(relay.is_idle());
    assert!(relay.is_closing());
    let _ = &mut pool;
}

/// Eight buffers of 8 bytes, capped multishot receives allowed.
const MULTISHOT_LIMITS: Limits = Limits {
    queued_buffers: 8,
    multishot: true,
    ..LIMITS
};

fn receive_more(
    relay: &mut Relay<TestBuffer>,
    pool: &mut TestPool,
    source: Side,
    bytes: &[u8],
    more: bool,
    now: u64,
) -> Actions {
    let (buffer, len) = pool.buffer(bytes);
    let mut out = Vec::new();
    relay.on_received(source, buffer, len, more, now, pool, &mut out);
    out
}

#[test]
fn a_multishot_receive_stays_armed_until_its_last_completion() {
    let mut relay = Relay::new(MULTISHOT_LIMITS, 0);
    let mut pool = TestPool::default();
    let mut out = Vec::new();
    relay.start(0, &mut out);
    // Nothing queued: room for 8 buffers, a cap of (8 - 2) x 8 / 2 bytes.
    assert_eq!(
        out,
        [
            Action::ReceiveMany(Side::Client, 24),
            Action::ReceiveMany(Side::Server, 24)
        ]
    );
    let out = receive_more(&mut relay, &mut pool, Side::Client, b"hello", true, 1);
    assert_eq!(out, [Action::Send(Side::Server)], "no second receive");
    assert_eq!(relay.upstream.receiving, 1);
    let out = sent(&mut relay, &mut pool, Side::Server, Ok(5), 1);
    assert!(
        out.is_empty(),
        "the multishot receive is still armed: {out:?}"
    );
    // Its last completion (the cap reached): one buffer queued, 7 of room, a smaller cap.
    let out = receive_more(&mut relay, &mut pool, Side::Client, b"world", false, 2);
    assert_eq!(
        out,
        [
            Action::Send(Side::Server),
            Action::ReceiveMany(Side::Client, 20)
        ]
    );
}

#[test]
fn without_room_for_four_buffers_receives_are_single_shot() {
    let mut relay = Relay::new(MULTISHOT_LIMITS, 0);
    let mut pool = TestPool::default();
    let mut out = Vec::new();
    relay.start(0, &mut out);
    // The server takes nothing; full buffers pile up.
    for (round, more) in [(1, true), (2, true), (3, false)] {
        receive_more(
            &mut relay,
            &mut pool,
            Side::Client,
            b"12345678",
            more,
            round,
        );
    }
    // 3 queued, 5 of room: still a (smaller) multishot receive.
    assert_eq!(relay.upstream.receiving, 1);
    for (round, more) in [(4, true), (5, false)] {
        let out = receive_more(
            &mut relay,
            &mut pool,
            Side::Client,
            b"12345678",
            more,
            round,
        );
        if !more {
            assert_eq!(
                out,
                [Action::Receive(Side::Client)],
                "3 of room: single-shot"
            );
        }
    }
}

#[test]
fn small_reads_behind_a_slow_destination_share_a_buffer() {
    let (mut relay, mut pool) = started();
    receive(&mut relay, &mut pool, Side::Client, b"ab", 1);
    // The send of "ab" is in flight; more small reads land after it in the same buffer.
    receive(&mut relay, &mut pool, Side::Client, b"cd", 2);
    receive(&mut relay, &mut pool, Side::Client, b"efg", 3);
    assert_eq!(relay.upstream.ring_buffers(), 1);
    assert_eq!(pool.outstanding(), 1, "the copied buffers went back");
    // The send in flight covered "ab" only; the rest follows in order.
    let out = sent(&mut relay, &mut pool, Side::Server, Ok(2), 4);
    assert_eq!(out.first(), Some(&Action::Send(Side::Server)));
    let head = relay.upstream.queue.front().expect("queued");
    assert_eq!(&head.buffer.bytes[head.sent as usize..], b"cdefg");
    // "hi" does not fit after 7 bytes: a buffer of its own.
    receive(&mut relay, &mut pool, Side::Client, b"hi", 5);
    assert_eq!(relay.upstream.ring_buffers(), 2);
}

/// A tiny deterministic generator (xorshift64).
struct Random(u64);

impl Random {
    fn below(&mut self, bound: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % bound
    }
}

/// Capped multishot receives of random sizes, with a destination that takes random parts of
/// each send or nothing for a while: a direction never holds more than `queued_buffers` ring
/// buffers, and every byte arrives once and in order. The kernel is modelled as it behaves: a
/// capped receive ends with the completion that brings its total to the cap or past it.
#[test]
fn capped_multishot_receives_never_hold_more_than_queued_buffers() {
    let buffer_size = MULTISHOT_LIMITS.buffer_size as u64;
    for seed in 1..300u64 {
        let mut random = Random(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let mut relay = Relay::new(MULTISHOT_LIMITS, 0);
        let mut pool = TestPool::default();
        let mut out = Vec::new();
        relay.start(0, &mut out);
        // The client side's armed receive: (multishot, cap, bytes taken).
        let mut armed: Option<(bool, u32, u32)> = None;
        // Bytes the send in flight covers.
        let mut in_flight: Option<u32> = None;
        let (mut next_in, mut next_out) = (0u64, 0u64);
        for step in 0..3_000u64 {
            for action in out.drain(..) {
                match action {
                    Action::ReceiveMany(Side::Client, cap) => armed = Some((true, cap, 0)),
                    Action::Receive(Side::Client) => armed = Some((false, 0, 0)),
                    Action::Send(Side::Server) => {
                        let head = relay.upstream.queue.front().expect("a send has bytes");
                        in_flight = Some(head.len - head.sent);
                    }
                    _ => {}
                }
            }
            let receive_now = random.below(3) < 2;
            if let (true, Some((multishot, cap, taken))) = (receive_now, armed) {
                let len = 1 + random.below(buffer_size);
                let bytes: Vec<u8> = (next_in..next_in + len).map(|at| at as u8).collect();
                next_in += len;
                let taken = taken + len as u32;
                let more = multishot && taken < cap;
                armed = more.then_some((multishot, cap, taken));
                out = receive_more(&mut relay, &mut pool, Side::Client, &bytes, more, step);
            } else if let Some(covered) = in_flight.take() {
                let count = 1 + random.below(u64::from(covered)) as u32;
                let head = relay.upstream.queue.front().expect("bytes under the send");
                let from = head.sent as usize;
                for (offset, byte) in head.buffer.bytes[from..from + count as usize]
                    .iter()
                    .enumerate()
                {
                    assert_eq!(*byte, (next_out + offset as u64) as u8, "seed {seed}");
                }
                next_out += u64::from(count);
                out = sent(&mut relay, &mut pool, Side::Server, Ok(count), step);
            }
            assert!(
                relay.upstream.ring_buffers() <= MULTISHOT_LIMITS.queued_buffers,
                "seed {seed} step {step}: {} buffers held",
                relay.upstream.ring_buffers()
            );
            assert_eq!(pool.outstanding(), relay.upstream.ring_buffers());
        }
        assert!(next_out > 0, "seed {seed}: bytes moved");
    }
}

#[test]
fn replayed_bytes_go_to_the_server_first_and_the_client_waits_for_them() {
    let mut relay: Relay<TestBuffer> = Relay::new(MULTISHOT_LIMITS, 0);
    let mut pool = TestPool::default();
    let mut out = Vec::new();
    relay.start_with_replay(0, b"sniffed".to_vec().into_boxed_slice(), true, &mut out);
    // The server is read; the client is not until the replay is delivered.
    assert_eq!(
        out,
        [
            Action::ReceiveMany(Side::Server, 24),
            Action::Send(Side::Server)
        ]
    );
    assert_eq!(relay.upstream.sending, Some(SendFrom::Spill));
    let (data, start, end) = relay.upstream.lend_spill().expect("lent");
    assert_eq!(&data[start..end], b"sniffed");
    relay.upstream.restore_spill(data);
    // A partial send keeps the rest for the next one.
    let out = sent(&mut relay, &mut pool, Side::Server, Ok(3), 1);
    assert_eq!(out, [Action::Send(Side::Server)]);
    let (data, start, end) = relay.upstream.lend_spill().expect("lent");
    assert_eq!(&data[start..end], b"ffed");
    relay.upstream.restore_spill(data);
    let out = sent(&mut relay, &mut pool, Side::Server, Ok(4), 2);
    assert_eq!(
        out,
        [Action::ReceiveMany(Side::Client, 24)],
        "the client is read now"
    );
    assert!(
        relay.upstream.spill.is_none(),
        "the replay memory went back"
    );
    assert_eq!(relay.delivered(), (7, 0));
}

#[test]
fn a_replayed_proxy_header_alone_keeps_the_first_byte_deadline() {
    let mut relay: Relay<TestBuffer> = Relay::new(FIRST_BYTE_LIMITS, 0);
    let mut out = Vec::new();
    relay.start_with_replay(
        5,
        b"PROXY ...\r\n".to_vec().into_boxed_slice(),
        false,
        &mut out,
    );
    assert_eq!(
        relay.next_deadline(),
        35,
        "the client must still speak by tick 35"
    );
    let mut spoke: Relay<TestBuffer> = Relay::new(FIRST_BYTE_LIMITS, 0);
    spoke.start_with_replay(5, b"GET /".to_vec().into_boxed_slice(), true, &mut out);
    assert!(
        spoke.next_deadline() > 35,
        "sniffed client bytes count as its first byte"
    );
}

#[test]
fn a_partly_sent_spill_with_room_still_reads_and_an_empty_queue_makes_no_spill() {
    let mut pool = TestPool::default();
    let mut flow: Flow<TestBuffer> = Flow::default();
    // A cancelled send that completed in full: nothing to copy, no spill to hold the flow.
    flow.spill_queue(64, &mut pool);
    assert!(flow.spill.is_none());
    assert!(flow.wants_receive(LIMITS.queued_buffers, LIMITS.buffer_size));
    // A spill of 32 bytes holding 8, half of them sent: 28 free, a receive fits.
    let (buffer, len) = pool.buffer(&[7; 8]);
    flow.push(buffer, len, 0, &mut pool);
    flow.spill_queue(32, &mut pool);
    assert_eq!(flow.next_send(), Some(SendFrom::Spill));
    flow.sending = Some(SendFrom::Spill);
    flow.sent(SendFrom::Spill, 4, 1, &mut pool);
    flow.sending = None;
    assert!(
        flow.wants_receive(LIMITS.queued_buffers, LIMITS.buffer_size),
        "free room counts, not what was sent"
    );
}

// ---- TLS termination ----------------------------------------------------------------------

mod tls {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Arc;

    const TLS_LIMITS: Limits = Limits {
        buffer_size: 4096,
        ..LIMITS
    };

    /// A server config for `localhost` (self-signed) and a client config trusting it.
    fn configs() -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let certificate = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let der = certificate.der().clone();
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![der.clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// The loop around one TLS session: a rustls client on one side, a byte sink for the
    /// server on the other; every action is carried out at once.
    struct Harness {
        relay: Relay<TestBuffer>,
        pool: TestPool,
        client: rustls::ClientConnection,
        client_receive: bool,
        server_receive: bool,
        to_server: Vec<u8>,
        shut: Vec<Side>,
        established: bool,
        closed: Option<(CloseMode, CloseReason)>,
        client_error: Option<rustls::Error>,
        now: u64,
    }

    impl Harness {
        fn new() -> Harness {
            let (server, client) = configs();
            let mut relay = Relay::new(TLS_LIMITS, 0);
            let mut out = Vec::new();
            let stream = crate::tls::TlsStream::new(Arc::clone(&server)).expect("stream");
            relay.start_tls(Box::new(stream), 50, 0, &[], &mut out);
            let client =
                rustls::ClientConnection::new(client, "localhost".try_into().expect("name"))
                    .expect("client");
            let mut harness = Harness {
                relay,
                pool: TestPool::default(),
                client,
                client_receive: false,
                server_receive: false,
                to_server: Vec::new(),
                shut: Vec::new(),
                established: false,
                closed: None,
                client_error: None,
                now: 0,
            };
            harness.run(out);
            harness
        }

        fn run(&mut self, mut actions: Actions) {
            while !actions.is_empty() {
                let mut next = Vec::new();
                for action in actions.drain(..) {
                    match action {
                        Action::Receive(Side::Client) => self.client_receive = true,
                        Action::Receive(Side::Server) => self.server_receive = true,
                        Action::Send(destination) => {
                            let flow = self.relay.flow_to(destination);
                            let (data, start, end) = flow.lend_spill().expect("a spill to send");
                            let bytes = data[start..end].to_vec();
                            self.relay.flow_to(destination).restore_spill(data);
                            match destination {
                                Side::Client => {
                                    let mut reader = &bytes[..];
                                    while !reader.is_empty() && self.client_error.is_none() {
                                        self.client.read_tls(&mut reader).expect("client read");
                                        if let Err(error) = self.client.process_new_packets() {
                                            self.client_error = Some(error);
                                        }
                                    }
                                }
                                Side::Server => self.to_server.extend_from_slice(&bytes),
                            }
                            self.relay.on_sent(
                                destination,
                                Ok(bytes.len() as u32),
                                self.now,
                                &mut self.pool,
                                &mut next,
                            );
                        }
                        Action::ShutdownWrite(side) => self.shut.push(side),
                        Action::TlsEstablished => {
                            self.established = true;
                            self.relay
                                .server_connected(self.now, Box::new([]), &mut next);
                        }
                        Action::Close(mode, reason) => self.closed = Some((mode, reason)),
                        other => panic!("unexpected {other:?}"),
                    }
                }
                actions = next;
            }
        }

        /// The client's pending TLS bytes go to the relay, a buffer at a time.
        fn client_sends(&mut self) {
            let mut bytes = Vec::new();
            while self.client.wants_write() {
                self.client.write_tls(&mut bytes).expect("client write");
            }
            self.feed(Side::Client, &bytes);
        }

        fn feed(&mut self, source: Side, bytes: &[u8]) {
            for chunk in bytes.chunks(TLS_LIMITS.buffer_size) {
                let armed = match source {
                    Side::Client => &mut self.client_receive,
                    Side::Server => &mut self.server_receive,
                };
                assert!(*armed, "{source:?} was sent to without a receive armed");
                *armed = false;
                let (buffer, len) = self.pool.buffer(chunk);
                let mut out = Vec::new();
                self.relay.on_received(
                    source,
                    buffer,
                    len,
                    false,
                    self.now,
                    &mut self.pool,
                    &mut out,
                );
                self.run(out);
            }
        }

        fn handshake(&mut self) {
            for _ in 0..4 {
                if !self.client.is_handshaking() && self.established {
                    break;
                }
                self.client_sends();
            }
            assert!(self.established && !self.client.is_handshaking());
        }

        fn client_reads(&mut self) -> Vec<u8> {
            let mut plain = Vec::new();
            let _ = self.client.reader().read_to_end(&mut plain);
            plain
        }
    }

    #[test]
    fn handshake_then_both_ways_and_close_notify_before_the_fin() {
        let mut session = Harness::new();
        assert!(session.client_receive, "only the client is read first");
        assert!(!session.server_receive, "no server before the handshake");
        session.handshake();
        assert!(session.server_receive, "the server is read once connected");
        session
            .client
            .writer()
            .write_all(b"hello server")
            .expect("write");
        session.client_sends();
        assert_eq!(session.to_server, b"hello server");
        let reply = vec![b'r'; 10_000];
        session.feed(Side::Server, &reply);
        assert_eq!(session.client_reads(), reply, "every byte, in order");
        // The server's FIN: close_notify reaches the client before the FIN.
        let mut out = Vec::new();
        session.relay.on_eof(Side::Server, &mut out);
        session.run(out);
        assert_eq!(session.shut, [Side::Client]);
        let mut rest = Vec::new();
        assert_eq!(session.client.reader().read_to_end(&mut rest).ok(), Some(0));
        assert_eq!(session.pool.outstanding(), 0, "no ring buffer held");
    }

    #[test]
    fn bytes_read_before_the_start_begin_the_handshake() {
        // What followed a PROXY header: the ClientHello is answered at once.
        let (server, client) = configs();
        let mut client =
            rustls::ClientConnection::new(client, "localhost".try_into().expect("name"))
                .expect("client");
        let mut hello = Vec::new();
        client.write_tls(&mut hello).expect("hello");
        let mut relay: Relay<TestBuffer> = Relay::new(TLS_LIMITS, 0);
        let mut out = Vec::new();
        let stream = crate::tls::TlsStream::new(Arc::clone(&server)).expect("stream");
        relay.start_tls(Box::new(stream), 50, 0, &hello, &mut out);
        assert!(out.contains(&Action::Send(Side::Client)), "{out:?}");
        assert!(out.contains(&Action::Receive(Side::Client)), "{out:?}");
        assert_eq!(relay.received(), (hello.len() as u64, 0));
    }

    #[test]
    fn the_clients_close_notify_is_a_fin_after_its_bytes() {
        let mut session = Harness::new();
        session.handshake();
        session
            .client
            .writer()
            .write_all(b"last words")
            .expect("write");
        session.client.send_close_notify();
        session.client_sends();
        assert_eq!(session.to_server, b"last words");
        assert_eq!(session.shut, [Side::Server]);
    }

    #[test]
    fn garbage_gets_an_alert_and_ends_without_a_server() {
        let mut session = Harness::new();
        session.feed(Side::Client, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(
            session.closed,
            Some((CloseMode::Graceful, CloseReason::TlsFailed))
        );
        assert!(!session.established);
        assert!(session.relay.tls_error().is_some());
        assert!(
            session.client.process_new_packets().is_err() || session.client_error.is_some(),
            "the alert reached the client"
        );
    }

    #[test]
    fn a_silent_client_is_cut_at_the_handshake_deadline() {
        let mut session = Harness::new();
        assert_eq!(session.relay.next_deadline(), 50);
        let mut out = Vec::new();
        session.relay.on_tick(49, |_| None, &mut out);
        assert!(out.is_empty());
        session.relay.on_tick(50, |_| None, &mut out);
        assert_eq!(
            out,
            [Action::Close(
                CloseMode::Graceful,
                CloseReason::HandshakeTimeout
            )]
        );
    }

    #[test]
    fn the_server_is_not_read_while_ciphertext_waits_for_the_client() {
        let mut session = Harness::new();
        session.handshake();
        // Hold the client's sends: what the server sends stays in the relay.
        let server_sends = |session: &mut Harness| {
            let mut out = Vec::new();
            let (buffer, len) = session.pool.buffer(&[b's'; 4096]);
            session.relay.on_received(
                Side::Server,
                buffer,
                len,
                false,
                1,
                &mut session.pool,
                &mut out,
            );
            out
        };
        session.server_receive = false;
        let out = server_sends(&mut session);
        // A send toward the client is asked for; until it completes, the spill is lent.
        assert!(out.contains(&Action::Send(Side::Client)), "{out:?}");
        let lent = session
            .relay
            .flow_to(Side::Client)
            .lend_spill()
            .expect("spill");
        let more = server_sends(&mut session);
        assert!(
            !more
                .iter()
                .any(|a| matches!(a, Action::Receive(Side::Server))),
            "the server must wait while rustls holds ciphertext: {more:?}"
        );
        session.relay.flow_to(Side::Client).restore_spill(lent.0);
        assert_eq!(session.pool.outstanding(), 0, "buffers went back at once");
    }
}

// ---- TLS origination ----------------------------------------------------------------------

mod origin {
    use super::*;
    use std::io::{Read, Write};
    use std::sync::Arc;

    const TLS_LIMITS: Limits = Limits {
        buffer_size: 4096,
        ..LIMITS
    };

    /// A server config for a certificate naming `names` (self-signed), and a proxy-side client
    /// config trusting that certificate.
    fn backend(names: &[&str]) -> (Arc<rustls::ServerConfig>, Arc<rustls::ClientConfig>) {
        let key = rcgen::KeyPair::generate().expect("key");
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let certificate = rcgen::CertificateParams::new(names)
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let der = certificate.der().clone();
        let server = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_no_client_auth()
            .with_single_cert(
                vec![der.clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .expect("server config");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(der).expect("root");
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        (Arc::new(server), Arc::new(client))
    }

    /// The loop around one session with a plain client and a TLS server (a rustls server in
    /// the test). Sends to the server stay in flight until `flush_server`, so overlapping
    /// operations on the server's socket during its handshake are seen.
    struct Origin {
        relay: Relay<TestBuffer>,
        pool: TestPool,
        backend: rustls::ServerConnection,
        client_receive: bool,
        server_receive: bool,
        server_send: Option<Vec<u8>>,
        to_client: Vec<u8>,
        shut: Vec<Side>,
        seen: Vec<Action>,
        /// A server operation was asked for while another was in flight, during the handshake.
        overlapped: bool,
        now: u64,
    }

    impl Origin {
        fn start(
            proxy: Arc<rustls::ClientConfig>,
            server: Arc<rustls::ServerConfig>,
            header: &[u8],
            sniffed: &[u8],
        ) -> Origin {
            let mut origin = Origin {
                relay: Relay::new(TLS_LIMITS, 0),
                pool: TestPool::default(),
                backend: rustls::ServerConnection::new(server).expect("backend"),
                client_receive: false,
                server_receive: false,
                server_send: None,
                to_client: Vec::new(),
                shut: Vec::new(),
                seen: Vec::new(),
                overlapped: false,
                now: 0,
            };
            origin.connect(proxy, header, sniffed);
            origin
        }

        fn connect(&mut self, proxy: Arc<rustls::ClientConfig>, header: &[u8], sniffed: &[u8]) {
            let stream =
                crate::tls::TlsStream::connect(proxy, "app.internal".try_into().expect("name"))
                    .expect("stream");
            let mut out = Vec::new();
            self.relay.prepare_server_tls(stream);
            assert!(self.relay.server_tls_prepared());
            self.relay.connect_tls_server(
                self.now,
                30,
                header.into(),
                sniffed.to_vec(),
                !sniffed.is_empty(),
                &mut out,
            );
            self.run(out);
        }

        fn run(&mut self, mut actions: Actions) {
            while !actions.is_empty() {
                let mut next = Vec::new();
                for action in actions.drain(..) {
                    self.seen.push(action);
                    let handshaking = self.relay.server_handshaking();
                    match action {
                        Action::Receive(Side::Client) => self.client_receive = true,
                        Action::Receive(Side::Server) => {
                            self.overlapped |= handshaking && self.server_send.is_some();
                            self.server_receive = true;
                        }
                        Action::Send(Side::Server) => {
                            self.overlapped |= handshaking && self.server_receive;
                            let flow = self.relay.flow_to(Side::Server);
                            let (data, start, end) = flow.lend_spill().expect("a spill to send");
                            let bytes = data[start..end].to_vec();
                            self.relay.flow_to(Side::Server).restore_spill(data);
                            assert!(self.server_send.is_none(), "two sends at once");
                            self.server_send = Some(bytes);
                        }
                        Action::Send(Side::Client) => {
                            let flow = self.relay.flow_to(Side::Client);
                            let (data, start, end) = flow.lend_spill().expect("a spill to send");
                            let bytes = data[start..end].to_vec();
                            self.relay.flow_to(Side::Client).restore_spill(data);
                            self.to_client.extend_from_slice(&bytes);
                            self.relay.on_sent(
                                Side::Client,
                                Ok(bytes.len() as u32),
                                self.now,
                                &mut self.pool,
                                &mut next,
                            );
                        }
                        Action::ShutdownWrite(side) => self.shut.push(side),
                        Action::ServerTlsEstablished
                        | Action::ServerTlsFailed
                        | Action::AbortServer
                        | Action::Close(..) => {}
                        other => panic!("unexpected {other:?}"),
                    }
                }
                actions = next;
            }
        }

        /// The send in flight toward the server arrives there and completes.
        fn flush_server(&mut self) {
            let Some(bytes) = self.server_send.take() else {
                return;
            };
            let mut reader = &bytes[..];
            while !reader.is_empty() {
                self.backend.read_tls(&mut reader).expect("backend read");
                if self.backend.process_new_packets().is_err() {
                    break;
                }
            }
            let mut out = Vec::new();
            self.relay.on_sent(
                Side::Server,
                Ok(bytes.len() as u32),
                self.now,
                &mut self.pool,
                &mut out,
            );
            self.run(out);
        }

        /// What the backend has to say reaches the relay, a buffer at a time.
        fn backend_sends(&mut self) {
            let mut bytes = Vec::new();
            while self.backend.wants_write() {
                self.backend.write_tls(&mut bytes).expect("backend write");
            }
            self.feed(Side::Server, &bytes);
        }

        fn feed(&mut self, source: Side, bytes: &[u8]) {
            for chunk in bytes.chunks(TLS_LIMITS.buffer_size) {
                let armed = match source {
                    Side::Client => &mut self.client_receive,
                    Side::Server => &mut self.server_receive,
                };
                assert!(*armed, "{source:?} was sent to without a receive armed");
                *armed = false;
                let (buffer, len) = self.pool.buffer(chunk);
                let mut out = Vec::new();
                self.relay.on_received(
                    source,
                    buffer,
                    len,
                    false,
                    self.now,
                    &mut self.pool,
                    &mut out,
                );
                self.run(out);
            }
        }

        fn handshake_rounds(&mut self) {
            for _ in 0..6 {
                if self.seen.contains(&Action::ServerTlsEstablished)
                    || self.seen.contains(&Action::ServerTlsFailed)
                {
                    break;
                }
                self.flush_server();
                self.backend_sends();
            }
            self.flush_server();
        }

        fn backend_reads(&mut self) -> Vec<u8> {
            let mut plain = Vec::new();
            let _ = self.backend.reader().read_to_end(&mut plain);
            plain
        }
    }

    #[test]
    fn header_in_the_clear_then_the_handshake_then_the_sniffed_bytes_inside() {
        let (server, proxy) = backend(&["app.internal"]);
        let mut session = Origin::start(
            proxy,
            server,
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
            b"GET / HTTP/1.1\r\n",
        );
        let first = session.server_send.take().expect("the header");
        assert_eq!(first, b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n");
        assert!(!session.server_receive, "one operation at a time");
        assert!(
            !session.client_receive,
            "the client waits for the handshake"
        );
        // The header's send completes (the test backend does not expect it).
        let mut out = Vec::new();
        session
            .relay
            .on_sent(Side::Server, Ok(32), 0, &mut session.pool, &mut out);
        session.run(out);
        let hello = session
            .server_send
            .as_deref()
            .expect("then the ClientHello");
        assert_eq!(hello[0], 0x16, "a TLS handshake record");
        session.handshake_rounds();
        assert!(session.seen.contains(&Action::ServerTlsEstablished));
        assert!(
            !session.overlapped,
            "one operation at a time during the handshake"
        );
        assert_eq!(session.backend_reads(), b"GET / HTTP/1.1\r\n");
        assert!(
            session.client_receive,
            "the client is read once the server is ready"
        );
        assert!(session.server_receive);
        assert_eq!(
            session.relay.server_tls_facts().map(|f| f.version > 0),
            Some(true)
        );
    }

    #[test]
    fn both_ways_then_close_notify_before_the_fin_toward_the_server() {
        let (server, proxy) = backend(&["app.internal"]);
        let mut session = Origin::start(proxy, server, b"", b"");
        session.handshake_rounds();
        let request: Vec<u8> = (0..20_000u32).map(|i| i as u8).collect();
        let mut delivered = Vec::new();
        for chunk in request.chunks(TLS_LIMITS.buffer_size) {
            // A spilled direction reads its source again once its send is done.
            while !session.client_receive {
                assert!(session.server_send.is_some(), "stalled without a send");
                session.flush_server();
                delivered.extend(session.backend_reads());
            }
            session.feed(Side::Client, chunk);
        }
        while session.server_send.is_some() {
            session.flush_server();
            delivered.extend(session.backend_reads());
        }
        assert_eq!(delivered, request, "every byte, in order");
        let reply = vec![b'r'; 30_000];
        session.backend.writer().write_all(&reply).expect("reply");
        session.backend_sends();
        assert_eq!(session.to_client, reply);
        // The client's FIN: close_notify first, then the FIN.
        let mut out = Vec::new();
        session.relay.on_eof(Side::Client, &mut out);
        session.run(out);
        assert!(
            session.shut.is_empty(),
            "close_notify goes out before the FIN"
        );
        session.flush_server();
        assert_eq!(session.shut, [Side::Server]);
        let mut rest = Vec::new();
        assert_eq!(
            session.backend.reader().read_to_end(&mut rest).ok(),
            Some(0)
        );
        assert_eq!(session.pool.outstanding(), 0, "no ring buffer held");
    }

    #[test]
    fn a_refused_certificate_keeps_the_clients_bytes_for_the_next_server() {
        let (wrong, _) = backend(&["other.internal"]);
        let (good, proxy) = backend(&["app.internal"]);
        // The proxy trusts only the good server's certificate.
        let mut session = Origin::start(Arc::clone(&proxy), wrong, b"", b"hello");
        session.handshake_rounds();
        assert!(
            session.seen.contains(&Action::ServerTlsFailed),
            "{:?}",
            session.seen
        );
        assert!(
            !session.seen.contains(&Action::AbortServer),
            "nothing was in flight"
        );
        assert!(matches!(
            session.relay.server_tls_failure(),
            Some(ServerTlsFailure::Refused(_))
        ));
        assert!(
            session.backend_reads().is_empty(),
            "no byte of the client's went out"
        );
        // The loop closes the socket and connects the next server.
        session.relay.drop_server_tls();
        session.server_receive = false;
        session.seen.clear();
        session.backend = rustls::ServerConnection::new(good).expect("backend");
        session.connect(proxy, b"", b"");
        session.handshake_rounds();
        assert!(session.seen.contains(&Action::ServerTlsEstablished));
        assert_eq!(
            session.backend_reads(),
            b"hello",
            "the client's bytes, once"
        );
    }

    #[test]
    fn a_silent_server_is_aborted_at_the_deadline_then_reported() {
        let (server, proxy) = backend(&["app.internal"]);
        let mut session = Origin::start(proxy, server, b"", b"");
        session.flush_server();
        assert!(session.server_receive, "waiting for the ServerHello");
        assert_eq!(session.relay.next_deadline(), 30);
        let mut out = Vec::new();
        session.relay.on_tick(30, |_| None, &mut out);
        assert_eq!(out, [Action::AbortServer], "the receive must end first");
        let mut out = Vec::new();
        session.relay.on_eof(Side::Server, &mut out);
        assert_eq!(out, [Action::ServerTlsFailed]);
        assert_eq!(
            session.relay.server_tls_failure(),
            Some(&ServerTlsFailure::Timeout)
        );
    }

    #[test]
    fn a_server_closing_in_the_handshake_is_a_failed_connect() {
        let (server, proxy) = backend(&["app.internal"]);
        let mut session = Origin::start(proxy, server, b"", b"");
        session.flush_server();
        let mut out = Vec::new();
        session.relay.on_eof(Side::Server, &mut out);
        assert_eq!(out, [Action::ServerTlsFailed]);
        assert_eq!(
            session.relay.server_tls_failure(),
            Some(&ServerTlsFailure::Closed)
        );
        assert!(
            session.relay.is_relaying(),
            "the session lives on for another server"
        );
    }
}

mod origin_plain_again {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn a_pool_that_turned_plain_gets_the_held_bytes_in_the_clear() {
        let key = rcgen::KeyPair::generate().expect("key");
        let certificate = rcgen::CertificateParams::new(vec!["app.internal".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("certificate");
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certificate.der().clone()).expect("root");
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        let stream = crate::tls::TlsStream::connect(
            Arc::new(config),
            "app.internal".try_into().expect("name"),
        )
        .expect("stream");
        let mut relay: Relay<TestBuffer> = Relay::new(LIMITS, 0);
        let mut out = Vec::new();
        relay.prepare_server_tls(stream);
        relay.connect_tls_server(0, 30, Box::new([]), b"sniffed".to_vec(), true, &mut out);
        // The server closed during its handshake; the loop drops it.
        let mut out = Vec::new();
        relay.on_sent(Side::Server, Ok(1), 0, &mut TestPool::default(), &mut out);
        relay.on_eof(Side::Server, &mut out);
        relay.drop_server_tls();
        // A reload made the pool plain: the sniffed bytes come back for a plain replay.
        assert_eq!(relay.take_plain_replay(), b"sniffed");
        assert!(!relay.server_tls_prepared());
        let mut out = Vec::new();
        relay.start_with_replay(0, b"sniffed".to_vec().into_boxed_slice(), true, &mut out);
        assert!(out.contains(&Action::Send(Side::Server)), "{out:?}");
    }
}
