//! The provided buffer ring: receive buffers shared by every connection of one shard.
//!
//! Owns the ring of `io_uring_buf` entries and the buffer memory, both mmap'd (so untouched
//! buffers cost no RSS). A buffer is either in the kernel's ring or checked out as a
//! `BufToken`; a token is created only from a completion that selected that buffer and goes back
//! only through `recycle`. Invariant: while a token lives its bytes are not handed to the kernel
//! for another receive, so a send may point into them until its completion arrives.

use std::io;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU16, Ordering};

use io_uring::types::BufRingEntry;

use super::Ring;

/// A received buffer checked out of the ring: buffer id and how many bytes it holds.
/// Deliberately neither `Copy` nor `Clone`: there is exactly one owner until `recycle`.
#[derive(Debug, PartialEq, Eq)]
pub struct BufToken {
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
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if self.len == 0 {
            return;
        }
        // SAFETY: base/len are exactly what mmap returned and nothing refers to the mapping any
        // more (the owning BufRing is being dropped after its io_uring, which pins the pages it
        // registered until its own teardown).
        unsafe {
            libc::munmap(self.base.as_ptr().cast(), self.len);
        }
    }
}

pub struct BufRing {
    entries: Mapping,
    buffers: Mapping,
    group: u16,
    count: u16,
    buffer_size: u32,
    /// Our copy of the ring tail; published to the kernel by `publish`.
    tail: u16,
    published_tail: u16,
    available: u32,
    /// One bit per buffer id with a send in flight: such a buffer is never handed back to the
    /// kernel, so a safe `Ring::send` cannot have its bytes overwritten by a receive.
    sending: Vec<u64>,
    /// Buffers recycled while their send was still in flight; returned when it completes.
    deferred: Vec<u16>,
}

impl BufRing {
    /// Allocates `count` (a power of two, at most 32768) buffers of `buffer_size` bytes and
    /// registers them with `ring` as buffer group `group`.
    pub fn new(ring: &Ring, group: u16, count: u16, buffer_size: u32) -> io::Result<BufRing> {
        if !count.is_power_of_two() || count > 32_768 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "buffer count must be a power of two no larger than 32768",
            ));
        }
        let entry_bytes = usize::from(count) * std::mem::size_of::<BufRingEntry>();
        let entries = Mapping::new(entry_bytes)?;
        let buffers = Mapping::new(usize::from(count) * buffer_size as usize)?;
        // SAFETY: the entry mapping is page aligned, sized for `count` entries, and lives as
        // long as this BufRing, which the shard drops only after the ring.
        unsafe {
            ring.ring.submitter().register_buf_ring_with_flags(
                entries.base.as_ptr() as u64,
                count,
                group,
                0,
            )?;
        }
        let mut buf_ring = BufRing {
            entries,
            buffers,
            group,
            count,
            buffer_size,
            tail: 0,
            published_tail: 0,
            available: 0,
            sending: vec![0; usize::from(count).div_ceil(64)],
            deferred: Vec::new(),
        };
        for id in 0..count {
            buf_ring.push_entry(id);
        }
        buf_ring.publish();
        Ok(buf_ring)
    }

    pub fn group(&self) -> u16 {
        self.group
    }

    /// Buffers currently in the ring, ready for receives.
    pub fn available(&self) -> u32 {
        self.available
    }

    /// Takes ownership of the buffer a receive completion selected.
    pub fn take(&mut self, flags: u32, len: u32) -> Option<BufToken> {
        let id = io_uring::cqueue::buffer_select(flags)?;
        if id >= self.count || len > self.buffer_size {
            return None;
        }
        self.available = self.available.saturating_sub(1);
        Some(BufToken { id, len })
    }

    /// The bytes of a checked-out buffer.
    pub fn bytes(&self, token: &BufToken) -> &[u8] {
        // SAFETY: the token's id is < count, len <= buffer_size, so the range is inside the
        // buffer mapping; the kernel does not write it while the token is checked out.
        unsafe { std::slice::from_raw_parts(self.buffer_ptr(token.id), token.len as usize) }
    }

    fn buffer_ptr(&self, id: u16) -> *mut u8 {
        // SAFETY: id < count, so the offset stays inside the buffer mapping.
        unsafe {
            self.buffers
                .base
                .as_ptr()
                .add(usize::from(id) * self.buffer_size as usize)
        }
    }

    /// Returns a buffer to the ring; it becomes visible to the kernel at the next `publish`.
    pub fn recycle(&mut self, token: BufToken) {
        if self.is_sending(token.id) {
            self.deferred.push(token.id);
        } else {
            self.push_entry(token.id);
        }
    }

    fn is_sending(&self, id: u16) -> bool {
        self.sending[usize::from(id / 64)] & (1 << (id % 64)) != 0
    }

    /// Records that a send reading `token`'s bytes has been queued.
    pub(super) fn mark_sending(&mut self, token: &BufToken) {
        self.sending[usize::from(token.id / 64)] |= 1 << (token.id % 64);
    }

    /// The send that read `token`'s bytes has completed.
    pub fn send_completed(&mut self, token: &BufToken) {
        self.sending[usize::from(token.id / 64)] &= !(1 << (token.id % 64));
        if let Some(position) = self.deferred.iter().position(|&id| id == token.id) {
            self.deferred.swap_remove(position);
            self.push_entry(token.id);
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
        self.available += 1;
    }

    /// Makes recycled buffers visible to the kernel (one release store per loop turn).
    pub fn publish(&mut self) {
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

    /// Pointer and length for a send of `token`'s bytes from `offset` on.
    pub(super) fn send_range(&self, token: &BufToken, offset: u32) -> (*const u8, u32) {
        let offset = offset.min(token.len);
        // SAFETY: offset <= len <= buffer_size keeps the pointer inside the buffer.
        let start = unsafe { self.buffer_ptr(token.id).add(offset as usize) };
        (start.cast_const(), token.len - offset)
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        if self.any_sending() {
            // A send the kernel may still read from: keep the memory rather than free it.
            let buffers = std::mem::replace(
                &mut self.buffers,
                Mapping {
                    base: NonNull::dangling(),
                    len: 0,
                },
            );
            std::mem::forget(buffers);
        }
    }
}
