//! One direction of a session: bytes read from a source socket, waiting to be written to the
//! destination socket.
//!
//! Owns the received buffers not yet sent, and the copy-out ("spill") buffer that takes their
//! bytes when the destination stalls while receive buffers are scarce. Invariants: a flow holds
//! at most `queued_buffers` ring buffers, counting those its armed receive may fill; bytes go
//! out in the order they came in (spilled bytes are always older than queued buffers); the
//! spill buffer never grows past `queued_buffers x buffer_size` bytes and is freed once it
//! drains.

use std::collections::VecDeque;

/// The buffers a flow holds come from a pool it can read and give back to.
pub trait BufferPool<B> {
    fn bytes<'a>(&'a self, buffer: &'a B) -> &'a [u8];
    fn recycle(&mut self, buffer: B);
    /// Copies `from`'s bytes after `into`'s when both fit in one buffer; whether it did.
    /// Bytes past `into`'s length must never be under a send in flight.
    fn append(&mut self, into: &mut B, from: &B) -> bool;
}

/// Receives armed at once on a streaming source. More than one moves several buffers per loop
/// turn in bulk, but measured against 1,000 clients that never read it multiplied the
/// empty-ring receives (50,000 instead of 2,700) and slowed every loop turn, so it stays 1.
pub const PARALLEL_RECEIVES: usize = 1;

/// A buffer that knows how many bytes it holds.
pub trait Measured {
    fn byte_len(&self) -> u32;
}

/// A received buffer not yet fully sent on.
#[derive(Debug)]
pub struct Pending<B> {
    pub buffer: B,
    /// Bytes of it already sent.
    pub sent: u32,
    pub len: u32,
}

/// Where the send in flight reads from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendFrom {
    /// The head of the queue: a ring buffer, zero copy.
    Queue,
    /// The spill buffer (lent to the ring while the send is in flight).
    Spill,
}

/// Bytes copied out of ring buffers into memory of the session's own: `data[start..end]`,
/// never more than `capacity` bytes (appended, so the memory is never zeroed first).
#[derive(Debug)]
pub struct Spill {
    /// `None` while lent to a send in flight. Its length is `end`.
    data: Option<Vec<u8>>,
    start: usize,
    end: usize,
    capacity: usize,
}

/// Appends to a spill's vector without growing it past its capacity.
pub struct SpillWriter<'a> {
    data: &'a mut Vec<u8>,
    capacity: usize,
}

impl SpillWriter<'_> {
    /// Room left.
    pub fn room(&self) -> usize {
        self.capacity.saturating_sub(self.data.len())
    }

    /// Appends as much of `bytes` as fits; returns how much.
    pub fn append(&mut self, bytes: &[u8]) -> usize {
        let count = bytes.len().min(self.room());
        self.data.extend_from_slice(&bytes[..count]);
        count
    }
}

impl std::io::Write for SpillWriter<'_> {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        Ok(self.append(bytes))
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Spill {
    fn new(capacity: usize) -> Spill {
        Spill {
            data: Some(Vec::with_capacity(capacity)),
            start: 0,
            end: 0,
            capacity,
        }
    }

    /// A spill holding exactly `bytes` (no room for more until they drain).
    pub fn filled(bytes: Box<[u8]>) -> Spill {
        let end = bytes.len();
        Spill {
            data: Some(bytes.into_vec()),
            start: 0,
            end,
            capacity: end,
        }
    }

    pub fn len(&self) -> usize {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.start == self.end
    }

    /// Bytes it can still take (once what it holds is moved to the front).
    pub fn free(&self) -> usize {
        self.capacity - self.len()
    }

    /// Copies as much of `bytes` as fits; returns how much. Nothing while lent.
    fn push(&mut self, bytes: &[u8]) -> usize {
        let count = self
            .writer(bytes.len())
            .map_or(0, |mut writer| writer.append(bytes));
        self.end += count;
        count
    }

    /// A writer appending after the held bytes, moved to the front first when fewer than
    /// `wanted` bytes of room are left behind them. None while lent.
    fn writer(&mut self, wanted: usize) -> Option<SpillWriter<'_>> {
        let data = self.data.as_mut()?;
        if self.start > 0 && (self.start == self.end || self.capacity - self.end < wanted) {
            data.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            data.truncate(self.end);
        }
        Some(SpillWriter {
            data,
            capacity: self.capacity,
        })
    }
}

#[derive(Debug)]
pub struct Flow<B> {
    pub queue: VecDeque<Pending<B>>,
    /// Boxed: most flows never spill, and an idle session should stay small.
    pub spill: Option<Box<Spill>>,
    /// A send toward the destination is in flight, and from where.
    pub sending: Option<SendFrom>,
    /// How many queued buffers (from the head) the send in flight reads.
    pub sending_buffers: u16,
    /// The in-flight send was cancelled so its buffer can be copied out.
    pub cancelling: bool,
    /// Receives armed on the source (a single-shot one fills at most one buffer, a capped
    /// multishot one at most the room it was armed with; completions come in the order the
    /// bytes were read).
    pub receiving: u8,
    /// The armed receive is a capped multishot one: nothing else is armed beside it.
    pub multishot: bool,
    /// The source's receive found no buffer; the loop re-arms it when buffers return.
    pub starved: bool,
    /// The source sent FIN.
    pub eof: bool,
    /// The FIN was passed on (shutdown of the destination's write side).
    pub shut: bool,
    /// The destination is gone (reset or failed): nothing more is sent, received bytes are
    /// dropped.
    pub abandoned: bool,
    /// The last receive filled its whole buffer (more is likely waiting in the socket).
    pub last_receive_full: bool,
    /// The source reset or failed: it is not read any more.
    pub source_failed: bool,
    /// Tick since which bytes have been waiting without the destination taking any (for
    /// `write_timeout`); `None` when nothing waits.
    pub waiting_since: Option<u64>,
    /// The destination socket's unacknowledged bytes at the last write-timeout check: when
    /// they shrink, the destination is taking bytes even if no send has completed (a socket
    /// with a large send buffer reports writable again only once a third of it is free).
    pub last_unacknowledged: Option<u32>,
    /// Bytes received from the source.
    pub received: u64,
    /// Bytes the destination accepted.
    pub delivered: u64,
}

impl<B> Default for Flow<B> {
    fn default() -> Self {
        Flow {
            queue: VecDeque::new(),
            spill: None,
            sending: None,
            sending_buffers: 0,
            cancelling: false,
            receiving: 0,
            multishot: false,
            starved: false,
            eof: false,
            shut: false,
            abandoned: false,
            source_failed: false,
            last_receive_full: false,
            waiting_since: None,
            last_unacknowledged: None,
            received: 0,
            delivered: 0,
        }
    }
}

impl<B> Flow<B> {
    /// Nothing is waiting to be sent and no send is in flight.
    pub fn is_flushed(&self) -> bool {
        self.queue.is_empty()
            && self.sending.is_none()
            && self.spill.as_deref().is_none_or(Spill::is_empty)
    }

    /// Everything received has been delivered and the FIN passed on (or the destination is
    /// gone).
    pub fn finished(&self) -> bool {
        (self.eof && self.shut) || self.abandoned
    }

    /// Bytes waiting for the destination (queued and spilled).
    pub fn waiting_bytes(&self) -> u64 {
        let queued: u64 = self
            .queue
            .iter()
            .map(|pending| u64::from(pending.len - pending.sent))
            .sum();
        queued + self.spill.as_ref().map_or(0, |spill| spill.len() as u64)
    }

    /// How many more receives to arm on the source now (counted as single-shot ones; the relay
    /// arms one capped multishot receive instead where it may). Queued buffers plus armed receives
    /// never exceed `queued_buffers` (each receive fills at most one buffer); while the source
    /// streams (its last receive filled a whole buffer) up to `PARALLEL_RECEIVES` are armed,
    /// otherwise one.
    pub fn receives_wanted(&self, queued_buffers: usize, buffer_size: usize) -> usize {
        if self.starved || self.eof || self.abandoned || self.source_failed || self.multishot {
            return 0;
        }
        let armed = usize::from(self.receiving);
        match &self.spill {
            // Spilled: a receive's buffer is copied out at once, so read only while the spill
            // is at hand and has room for a whole buffer, one receive at a time.
            Some(spill) => match &spill.data {
                Some(_) if armed == 0 && self.queue.is_empty() && spill.free() >= buffer_size => 1,
                _ => 0,
            },
            None => {
                let room = queued_buffers.saturating_sub(self.queue.len() + armed);
                let target = if self.last_receive_full {
                    PARALLEL_RECEIVES
                } else {
                    1
                };
                room.min(target.saturating_sub(armed))
            }
        }
    }

    /// Whether a receive should be armed now.
    pub fn wants_receive(&self, queued_buffers: usize, buffer_size: usize) -> bool {
        self.receives_wanted(queued_buffers, buffer_size) > 0
    }

    /// What the next send should read, if a send may start now.
    pub fn next_send(&self) -> Option<SendFrom> {
        if self.sending.is_some() || self.cancelling || self.abandoned {
            return None;
        }
        match &self.spill {
            Some(spill) if !spill.is_empty() => spill.data.as_ref().map(|_| SendFrom::Spill),
            Some(_) => None,
            None => (!self.queue.is_empty()).then_some(SendFrom::Queue),
        }
    }

    /// Takes a received buffer of `len` bytes.
    pub fn push(&mut self, buffer: B, len: u32, now: u64, pool: &mut impl BufferPool<B>) {
        self.received += u64::from(len);
        if self.abandoned {
            pool.recycle(buffer);
            return;
        }
        if self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
        // Small reads behind a slow destination share one buffer: the bound on buffers a
        // capped multishot receive can fill rests on it (see the relay's invariants).
        if let Some(tail) = self.queue.back_mut()
            && pool.append(&mut tail.buffer, &buffer)
        {
            tail.len += len;
            pool.recycle(buffer);
        } else {
            self.queue.push_back(Pending {
                buffer,
                sent: 0,
                len,
            });
        }
        if self.spill.is_some() {
            self.copy_out(pool);
        }
    }

    /// Moves queued bytes into the spill buffer (creating it with `capacity` bytes), returning
    /// the emptied ring buffers to the pool. A buffer that does not fit whole stays queued.
    pub fn spill_queue(&mut self, capacity: usize, pool: &mut impl BufferPool<B>) {
        if self.queue.is_empty() {
            // Nothing to copy (a cancelled send that completed in full): no empty spill, which
            // would hold the flow's reads and sends back.
            return;
        }
        if self.spill.is_none() {
            self.spill = Some(Box::new(Spill::new(capacity)));
        }
        self.copy_out(pool);
    }

    fn copy_out(&mut self, pool: &mut impl BufferPool<B>) {
        let Some(spill) = self.spill.as_mut() else {
            return;
        };
        while let Some(head) = self.queue.front_mut() {
            let bytes = pool.bytes(&head.buffer);
            let rest = &bytes[(head.sent as usize).min(bytes.len())..];
            let copied = spill.push(rest);
            head.sent += copied as u32;
            if copied < rest.len() {
                break;
            }
            if let Some(done) = self.queue.pop_front() {
                pool.recycle(done.buffer);
            }
        }
    }

    /// Lets `fill` append bytes for the destination to the spill buffer (creating it with
    /// `capacity` bytes; the writer refuses more); returns how many it wrote. Nothing while the
    /// spill is lent to a send in flight. (TLS sessions: rustls's output has no ring buffer to
    /// queue.)
    pub fn fill_spill(
        &mut self,
        capacity: usize,
        now: u64,
        fill: impl FnOnce(&mut SpillWriter<'_>) -> usize,
    ) -> usize {
        let spill = self
            .spill
            .get_or_insert_with(|| Box::new(Spill::new(capacity)));
        let Some(mut writer) = spill.writer(capacity / 2) else {
            return 0;
        };
        if writer.room() == 0 {
            return 0;
        }
        let before = writer.data.len();
        fill(&mut writer);
        let written = writer.data.len() - before;
        spill.end += written;
        if written > 0 && self.waiting_since.is_none() {
            self.waiting_since = Some(now);
        }
        if spill.is_empty() && self.sending.is_none() {
            // Nothing came: give the memory back rather than keep an empty buffer.
            self.spill = None;
        }
        written
    }

    /// The spill buffer's bytes to send, lent out until `restore_spill`.
    pub fn lend_spill(&mut self) -> Option<(Vec<u8>, usize, usize)> {
        let spill = self.spill.as_mut()?;
        let data = spill.data.take()?;
        Some((data, spill.start, spill.end))
    }

    pub fn restore_spill(&mut self, data: Vec<u8>) {
        if let Some(spill) = self.spill.as_mut()
            && spill.data.is_none()
        {
            let mut data = data;
            data.truncate(spill.end);
            spill.data = Some(data);
        }
    }

    /// The destination accepted `count` bytes of the send in flight.
    pub fn sent(&mut self, from: SendFrom, count: u32, now: u64, pool: &mut impl BufferPool<B>) {
        self.delivered += u64::from(count);
        match from {
            SendFrom::Queue => {
                // A send may cover several queued buffers, the first from where it stood.
                let mut left = count;
                while let Some(head) = self.queue.front_mut() {
                    let taken = left.min(head.len - head.sent);
                    head.sent += taken;
                    left -= taken;
                    if head.sent < head.len {
                        break;
                    }
                    if let Some(done) = self.queue.pop_front() {
                        pool.recycle(done.buffer);
                    }
                    if left == 0 {
                        break;
                    }
                }
            }
            SendFrom::Spill => {
                if let Some(spill) = self.spill.as_mut() {
                    spill.start = (spill.start + count as usize).min(spill.end);
                    if spill.is_empty() {
                        spill.start = 0;
                        spill.end = 0;
                        if let Some(data) = spill.data.as_mut() {
                            data.clear();
                        }
                    }
                }
            }
        }
        if count > 0 {
            self.waiting_since = Some(now);
        }
        if let Some(spill) = &self.spill
            && spill.data.is_some()
        {
            if !self.queue.is_empty() {
                self.copy_out(pool);
            }
            if self.queue.is_empty() && self.spill.as_deref().is_some_and(Spill::is_empty) {
                // Drained: back to zero copy, and the memory goes back.
                self.spill = None;
            }
        }
        if self.is_flushed() {
            self.waiting_since = None;
            self.last_unacknowledged = None;
        }
    }

    /// Drops everything waiting (the destination is gone), returning buffers to the pool.
    pub fn abandon(&mut self, pool: &mut impl BufferPool<B>) {
        self.abandoned = true;
        self.waiting_since = None;
        self.release(pool);
    }

    /// Returns every held buffer to the pool (the session is being freed).
    pub fn release(&mut self, pool: &mut impl BufferPool<B>) {
        for pending in self.queue.drain(..) {
            pool.recycle(pending.buffer);
        }
        // A spill lent to a send in flight is owned by the ring until that send completes.
        self.spill = None;
    }

    /// Ring buffers held now.
    pub fn ring_buffers(&self) -> usize {
        self.queue.len()
    }
}
