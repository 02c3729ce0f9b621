//! The provided buffer ring: receive buffers shared by every connection of one shard.
//!
//! Owns the ring of `io_uring_buf` entries and the buffer memory, both mmap'd (so untouched
//! buffers cost no RSS). A buffer is either in the kernel's ring or checked out as a
//! `BufToken`. Only a completion of the ring this buffer ring is registered on can mint a token
//! (once: taking clears the completion's buffer flag, and a buffer already checked out cannot
//! be minted again), and a token goes back only through `recycle`, which consumes it.
//! Invariant: while a token lives, or a send reads from its bytes, the buffer is not handed to
//! the kernel for another receive.
//!
//! Buffers go back hottest first: recycled buffers wait on a stack and only a window of them is
//! published to the kernel, topped up each loop turn from the top of the stack and doubled
//! whenever the kernel took every published buffer. So the memory touched (RSS) follows the
//! buffers in use rather than creeping over the whole ring as the kernel cycles through it, and
//! the bytes a receive lands in are likely still in cache.
//!
//! A `BufRing` lives inside its `Ring` (`Ring::with_buffers`), and the ring unregisters it before
//! either is freed. Tokens and completions carry their ring's id, so even buffer rings swapped
//! between two rings (`std::mem::swap` on `Ring::buffers_mut`) mint, read and recycle nothing
//! of the other ring's, and a ring leaks, never frees, a buffer ring registered on another.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::IoUring;
use io_uring::types::BufRingEntry;

use super::Completion;

/// IORING_CQE_F_BUFFER from the kernel's uapi (the io-uring crate does not export it).
const CQE_F_BUFFER: u32 = 1;

/// A received buffer checked out of the ring: which ring, buffer id and how many bytes it holds.
/// Deliberately neither `Copy` nor `Clone`: there is exactly one owner until `recycle`.
#[derive(Debug, PartialEq, Eq)]
pub struct BufToken {
    ring: u32,
    id: u16,
    len: u32,
}

impl BufToken {
    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// An anonymous private mapping, unmapped on drop.
struct Mapping {
    base: NonNull<u8>,
    len: usize,
}

impl Mapping {
    fn new(len: usize) -> io::Result<Mapping> {
        if len == 0 {
            return Ok(Mapping::empty());
        }
        // SAFETY: an anonymous private mapping with no address hint touches no existing memory;
        // the result is checked for MAP_FAILED before use.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let base = NonNull::new(base.cast::<u8>()).ok_or_else(io::Error::last_os_error)?;
        Ok(Mapping { base, len })
    }

    fn empty() -> Mapping {
        Mapping {
            base: NonNull::dangling(),
            len: 0,
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: base/len are exactly what mmap returned. The owner drops a mapping only once
        // the kernel can no longer touch it: the buffer ring was unregistered (so no receive
        // selects these buffers any more) and no send reads from them (`BufRing::drop` leaks
        // the buffer mapping otherwise).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

fn bit(bits: &[u64], id: u16) -> bool {
    bits[usize::from(id / 64)] & (1 << (id % 64)) != 0
}

fn set_bit(bits: &mut [u64], id: u16, value: bool) {
    let word = &mut bits[usize::from(id / 64)];
    if value {
        *word |= 1 << (id % 64);
    } else {
        *word &= !(1 << (id % 64));
    }
}

pub struct BufRing {
    ring: u32,
    entries: Mapping,
    buffers: Mapping,
    group: u16,
    count: u16,
    buffer_size: u32,
    registered: bool,
    /// Our copy of the ring tail; published to the kernel by `publish`.
    tail: u16,
    published_tail: u16,
    /// One bit per buffer id held by a token.
    checked_out: Vec<u64>,
    /// One bit per buffer id with a send in flight: such a buffer is never handed back to the
    /// kernel, so a safe `Ring::send` cannot have its bytes overwritten by a receive.
    sending: Vec<u64>,
    /// Buffers recycled while their send was still in flight; returned when it completes.
    deferred: Vec<u16>,
    /// Free buffers not published to the kernel, most recently recycled on top.
    free: Vec<u16>,
    /// Buffers published to the kernel and not yet taken back by a completion.
    in_kernel: u32,
    /// How many buffers `publish` keeps in the kernel's ring.
    window: u32,
}

/// Buffers published at first; the window doubles whenever the kernel used them all.
const INITIAL_WINDOW: u32 = 64;

impl BufRing {
    /// A buffer ring with no buffers (for rings that only send, connect or accept).
    pub(super) fn none(ring: u32) -> BufRing {
        BufRing {
            ring,
            entries: Mapping::empty(),
            buffers: Mapping::empty(),
            group: 0,
            count: 0,
            buffer_size: 0,
            registered: false,
            tail: 0,
            published_tail: 0,
            checked_out: Vec::new(),
            sending: Vec::new(),
            deferred: Vec::new(),
            free: Vec::new(),
            in_kernel: 0,
            window: 0,
        }
    }

    /// Allocates `count` (a power of two, at most 32768) buffers of `buffer_size` bytes and
    /// registers them with `uring` as buffer group `group`.
    pub(super) fn register(
        uring: &IoUring,
        ring: u32,
        group: u16,
        count: u16,
        buffer_size: u32,
    ) -> io::Result<BufRing> {
        if !count.is_power_of_two() || count > 32_768 || buffer_size == 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer count must be a power of two no larger than 32768, and buffers non-empty",
            ));
        }
        let entry_bytes = usize::from(count) * std::mem::size_of::<BufRingEntry>();
        let entries = Mapping::new(entry_bytes)?;
        let buffers = Mapping::new(usize::from(count) * buffer_size as usize)?;
        // SAFETY: the entry mapping is page aligned, sized for `count` entries, and lives as
        // long as this BufRing, which is unregistered by its own ring before it is dropped, or
        // leaked (still registered, or held by another ring).
        unsafe {
            uring.submitter().register_buf_ring_with_flags(
                entries.base.as_ptr() as u64,
                count,
                group,
                0,
            )?;
        }
        let words = usize::from(count).div_ceil(64);
        let mut buf_ring = BufRing {
            ring,
            entries,
            buffers,
            group,
            count,
            buffer_size,
            registered: true,
            tail: 0,
            published_tail: 0,
            checked_out: vec![0; words],
            sending: vec![0; words],
            deferred: Vec::new(),
            // Lowest ids on top: the first buffers used are the first pages of the mapping.
            free: (0..count).rev().collect(),
            in_kernel: 0,
            window: INITIAL_WINDOW.min(u32::from(count)),
        };
        buf_ring.publish();
        Ok(buf_ring)
    }

    pub fn group(&self) -> u16 {
        self.group
    }

    /// Free buffers (published to the kernel or waiting to be), ready for receives.
    pub fn available(&self) -> u32 {
        self.in_kernel + self.free.len() as u32
    }

    /// How many buffers are kept published to the kernel now.
    pub fn window(&self) -> u32 {
        self.window
    }

    /// How many buffers the ring has in all.
    pub fn count(&self) -> u32 {
        u32::from(self.count)
    }

    pub fn buffer_size(&self) -> u32 {
        self.buffer_size
    }

    /// Takes ownership of the buffer `completion` selected, once: the completion no longer
    /// carries it afterwards. `None` when it carries no buffer of this ring.
    pub fn take(&mut self, completion: &mut Completion) -> Option<BufToken> {
        if completion.ring != self.ring || !self.registered {
            return None;
        }
        let id = io_uring::cqueue::buffer_select(completion.flags)?;
        completion.flags &= !CQE_F_BUFFER;
        let len = u32::try_from(completion.result)
            .unwrap_or(0)
            .min(self.buffer_size);
        if id >= self.count || bit(&self.checked_out, id) {
            return None;
        }
        set_bit(&mut self.checked_out, id, true);
        self.in_kernel = self.in_kernel.saturating_sub(1);
        Some(BufToken {
            ring: self.ring,
            id,
            len,
        })
    }

    /// The bytes of a checked-out buffer.
    pub fn bytes(&self, token: &BufToken) -> &[u8] {
        if token.ring != self.ring {
            debug_assert!(false, "a token of another ring");
            return &[];
        }
        // SAFETY: the token's id is < count and len <= buffer_size (checked when it was
        // minted), so the range is inside the buffer mapping; the kernel does not write a
        // checked-out buffer.
        unsafe { std::slice::from_raw_parts(self.buffer_ptr(token.id), token.len as usize) }
    }

    /// Appends `from`'s bytes after `into`'s when both fit in one buffer, and says whether it
    /// did (then `from` only needs to go back with `recycle`). Safe while a send reads `into`:
    /// a send reads a buffer only up to the length its token had when it was submitted, and
    /// lengths only grow here, so the appended bytes are never under a send in flight.
    pub fn append(&mut self, into: &mut BufToken, from: &BufToken) -> bool {
        if into.ring != self.ring || from.ring != self.ring || into.id == from.id {
            return false;
        }
        let Some(total) = into.len.checked_add(from.len) else {
            return false;
        };
        if total > self.buffer_size {
            return false;
        }
        // SAFETY: both ids are < count (checked when minted) and differ, so the source range
        // and the destination range (`into.len..total`, total <= buffer_size) lie in two
        // different buffers inside the mapping; both are checked out, so the kernel writes
        // neither, and no send in flight reads at or past `into.len` (see above).
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.buffer_ptr(from.id),
                self.buffer_ptr(into.id).add(into.len as usize),
                from.len as usize,
            );
        }
        into.len = total;
        true
    }

    fn buffer_ptr(&self, id: u16) -> *mut u8 {
        debug_assert!(id < self.count);
        // SAFETY: callers pass id < count, so the offset stays inside the buffer mapping.
        unsafe {
            self.buffers
                .base
                .as_ptr()
                .add(usize::from(id) * self.buffer_size as usize)
        }
    }

    /// Returns a buffer to the ring; it becomes visible to the kernel at the next `publish`
    /// (or when its send completes, if one is still in flight).
    pub fn recycle(&mut self, token: BufToken) {
        if token.ring != self.ring {
            debug_assert!(false, "a token of another ring");
            return;
        }
        set_bit(&mut self.checked_out, token.id, false);
        if bit(&self.sending, token.id) {
            self.deferred.push(token.id);
        } else {
            self.free.push(token.id);
        }
    }

    /// Records that a send reading `token`'s bytes has been queued.
    pub(super) fn mark_sending(&mut self, token: &BufToken) {
        set_bit(&mut self.sending, token.id, true);
    }

    /// The send that read `token`'s bytes has completed.
    pub fn send_completed(&mut self, token: &BufToken) {
        if token.ring != self.ring {
            return;
        }
        set_bit(&mut self.sending, token.id, false);
        if let Some(position) = self.deferred.iter().position(|&id| id == token.id) {
            self.deferred.swap_remove(position);
            self.free.push(token.id);
        }
    }

    /// Whether any send still reads from these buffers (then the memory must outlive us).
    fn any_sending(&self) -> bool {
        self.sending.iter().any(|&word| word != 0)
    }

    fn push_entry(&mut self, id: u16) {
        let slot = usize::from(self.tail & (self.count - 1));
        // SAFETY: slot < count, inside the entry mapping; the kernel reads only entries between
        // its head and the published tail, and this slot is past the published tail.
        let entry = unsafe { &mut *self.entries.base.as_ptr().cast::<BufRingEntry>().add(slot) };
        entry.set_addr(self.buffer_ptr(id) as u64);
        entry.set_len(self.buffer_size);
        entry.set_bid(id);
        self.tail = self.tail.wrapping_add(1);
        self.in_kernel += 1;
    }

    /// Tops the kernel's ring up to the window from the hottest free buffers and makes them
    /// visible to the kernel (one release store per loop turn).
    pub fn publish(&mut self) {
        if !self.registered {
            return;
        }
        if self.in_kernel == 0 && self.tail != 0 {
            // Everything published was taken: demand is above the window.
            self.window = (self.window * 2).min(u32::from(self.count));
        }
        while self.in_kernel < self.window {
            let Some(id) = self.free.pop() else {
                break;
            };
            self.push_entry(id);
        }
        if self.tail == self.published_tail {
            return;
        }
        // SAFETY: the tail field overlays the first entry's `resv`, inside the mapping, and is
        // only ever accessed atomically by us and the kernel.
        let tail = unsafe {
            &*BufRingEntry::tail(self.entries.base.as_ptr().cast::<BufRingEntry>())
                .cast::<AtomicU16>()
        };
        tail.store(self.tail, Ordering::Release);
        self.published_tail = self.tail;
    }

    /// Pointer and length for a send of `token`'s bytes from `offset` on, if the token is ours.
    pub(super) fn send_range(&self, token: &BufToken, offset: u32) -> Option<(*const u8, u32)> {
        if token.ring != self.ring {
            return None;
        }
        let offset = offset.min(token.len);
        // SAFETY: offset <= len <= buffer_size keeps the pointer inside the buffer.
        let start = unsafe { self.buffer_ptr(token.id).add(offset as usize) };
        Some((start.cast_const(), token.len - offset))
    }

    /// Whether this buffer ring is registered on the ring with this id.
    pub(super) fn registered_on(&self, ring: u32) -> bool {
        self.registered && self.ring == ring
    }

    /// Stops the kernel from selecting these buffers (called by the ring before teardown).
    /// Returns false when that failed, so the memory must be leaked rather than freed.
    pub(super) fn unregister(&mut self, uring: &IoUring) -> bool {
        if !self.registered {
            return true;
        }
        self.registered = false;
        uring.submitter().unregister_buf_ring(self.group).is_ok()
    }

    /// Keeps both mappings alive for the rest of the process (the kernel may still use them).
    pub(super) fn leak(&mut self) {
        std::mem::forget(std::mem::replace(&mut self.entries, Mapping::empty()));
        std::mem::forget(std::mem::replace(&mut self.buffers, Mapping::empty()));
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.registered || self.any_sending() {
            // Still registered (the ring could not unregister it), or a send the kernel may
            // still read from: keep the memory rather than free it.
            self.leak();
        }
    }
}
