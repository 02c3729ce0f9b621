//! The per-core io_uring: ring setup, typed submissions, the provided buffer ring, timers and
//! the socket calls the loop needs.
//!
//! Owns every `unsafe` of the data plane. The rest of the crate submits work through the safe
//! methods of `Ring`, each of which keeps the memory it hands the kernel alive until the kernel
//! is done with it (buffers through `BufRing`'s in-flight tracking, addresses and timespecs in
//! ring-owned storage that lives as long as the ring). It knows nothing of sessions: a
//! completion is a `user_data` word, a result and flags.

pub mod buf_ring;
pub mod socket;
pub mod timer;

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};
use socket2::SockAddr;

pub use buf_ring::{BufRing, BufToken};

/// `user_data` bit the ring keeps for itself: set on accepts, whose positive result is a new
/// descriptor that `Completion::accepted_fd` may wrap. Cleared from every other submission, so
/// no other completion can be taken for a descriptor.
const ACCEPT_BIT: u64 = 1 << 63;
/// `user_data` bit the ring keeps for sends of memory it holds (`send_owned`): their
/// completions hand that memory back.
const OWNED_BIT: u64 = 1 << 62;
/// The bits a caller's `user_data` may use.
pub const USER_DATA_BITS: u64 = !(ACCEPT_BIT | OWNED_BIT);

/// IORING_RECVSEND_POLL_FIRST from the kernel's uapi (the io-uring crate does not export it).
const RECVSEND_POLL_FIRST: u16 = 1;

/// IORING_RECV_MULTISHOT from the kernel's uapi (the io-uring crate does not export it).
const RECV_MULTISHOT: u16 = 2;

/// Identifies a ring, so tokens and completions of one ring are never used with another.
static NEXT_RING_ID: AtomicU32 = AtomicU32::new(1);

/// One completion: what was asked (`user_data`), the result (>= 0, or -errno) and the flags.
/// Only a `Ring` makes them, and they are neither `Copy` nor `Clone`: the buffer or descriptor
/// a completion carries can be taken out once.
#[derive(Debug)]
pub struct Completion {
    user_data: u64,
    result: i32,
    flags: u32,
    ring: u32,
    /// The memory of a `send_owned`, back from the kernel.
    owned: Option<Vec<u8>>,
}

impl Completion {
    /// The `user_data` of the submission (the bits the caller chose).
    pub fn user_data(&self) -> u64 {
        self.user_data & USER_DATA_BITS
    }

    /// The memory a `send_owned` lent to the kernel, now that the send is over.
    pub fn take_owned(&mut self) -> Option<Vec<u8>> {
        self.owned.take()
    }

    pub fn result(&self) -> i32 {
        self.result
    }

    pub fn flags(&self) -> u32 {
        self.flags
    }

    /// Whether a multishot request stays armed after this completion.
    pub fn more(&self) -> bool {
        io_uring::cqueue::more(self.flags)
    }

    /// Whether a provided buffer came with this completion (and has not been taken yet).
    pub fn has_buffer(&self) -> bool {
        io_uring::cqueue::buffer_select(self.flags).is_some()
    }

    /// The descriptor an accept completion created, once.
    pub fn accepted_fd(&mut self) -> Option<OwnedFd> {
        if self.user_data & ACCEPT_BIT == 0 || self.result < 0 {
            return None;
        }
        self.user_data &= !ACCEPT_BIT;
        // SAFETY: an accept's non-negative result is a descriptor the kernel just created for
        // this process and nobody else holds; the accept bit was cleared above, so it is
        // wrapped at most once.
        Some(unsafe { OwnedFd::from_raw_fd(self.result) })
    }
}

/// A submission that did not fit in the submission queue, kept in order until it does. Linked
/// pairs travel together, since a flush between them would break the link.
enum Queued {
    One(squeue::Entry),
    Pair(squeue::Entry, squeue::Entry),
}

pub struct Ring {
    // Declared first, dropped first: the io_uring goes before the memory it may still touch.
    ring: IoUring,
    id: u32,
    buffers: BufRing,
    /// Submissions waiting for room in the submission queue (full queue, or the kernel busy).
    backlog: VecDeque<Queued>,
    /// Socket addresses handed to connect, kept for the ring's life (keyed by address, so one per
    /// server, not one per connect).
    addresses: HashMap<SocketAddr, Box<SockAddr>>,
    /// Timespecs handed to link timeouts, one per distinct duration.
    timespecs: Vec<(Duration, Box<types::Timespec>)>,
    /// Target of the eventfd read that wakes the shard.
    wake_buffer: Box<[u8; 8]>,
    /// Memory read by sends in flight (`send_owned`, `send_buffers`), by their user_data.
    owned: HashMap<u64, Owned>,
}

/// Memory the ring holds for a send in flight.
enum Owned {
    /// Bytes the caller lent (`send_owned`); handed back by the completion.
    Bytes(Vec<u8>),
    /// The message header and iovecs of a `send_buffers`; freed by the completion.
    Vector(Box<SendVector>),
}

/// A sendmsg's header and the iovecs it points to, kept together at a stable address.
struct SendVector {
    header: libc::msghdr,
    iovecs: Vec<libc::iovec>,
}

impl Ring {
    /// A ring for one shard: single issuer, deferred and cooperative task running (completions
    /// are processed only when this thread enters the kernel, without IPIs).
    pub fn new(entries: u32) -> io::Result<Ring> {
        let ring = IoUring::builder()
            .setup_single_issuer()
            .setup_defer_taskrun()
            .setup_coop_taskrun()
            .setup_submit_all()
            .setup_cqsize(entries.saturating_mul(4))
            .build(entries)?;
        let id = NEXT_RING_ID.fetch_add(1, Ordering::Relaxed);
        Ok(Ring {
            ring,
            id,
            buffers: BufRing::none(id),
            backlog: VecDeque::new(),
            addresses: HashMap::new(),
            timespecs: Vec::new(),
            wake_buffer: Box::new([0; 8]),
            owned: HashMap::new(),
        })
    }

    /// A ring with a provided buffer ring of `count` (power of two) buffers of `size` bytes,
    /// registered as group 0.
    pub fn with_buffers(entries: u32, count: u16, size: u32) -> io::Result<Ring> {
        let mut ring = Ring::new(entries)?;
        ring.buffers = BufRing::register(&ring.ring, ring.id, 0, count, size)?;
        Ok(ring)
    }

    pub fn buffers(&self) -> &BufRing {
        &self.buffers
    }

    pub fn buffers_mut(&mut self) -> &mut BufRing {
        &mut self.buffers
    }

    /// Submissions waiting for room in the submission queue.
    pub fn backlog(&self) -> usize {
        self.backlog.len()
    }

    fn try_push(&mut self, entry: &squeue::Entry) -> bool {
        // SAFETY: every entry built by this module points only at memory that outlives the
        // operation (see the methods below); pushing copies the SQE.
        unsafe { self.ring.submission().push(entry) }.is_ok()
    }

    /// Queues one entry; never fails: when the submission queue is full and the kernel cannot
    /// take more right now, the entry waits in the backlog (in order) for the next flush.
    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        if self.backlog.is_empty() {
            if self.try_push(&entry) {
                return Ok(());
            }
            if self.ring.submit().is_ok() && self.try_push(&entry) {
                return Ok(());
            }
        }
        self.backlog.push_back(Queued::One(entry));
        Ok(())
    }

    fn room(&mut self) -> usize {
        let queue = self.ring.submission();
        queue.capacity() - queue.len()
    }

    /// Queues two linked entries without a flush between them (a flush would break the link).
    fn push_pair(&mut self, first: squeue::Entry, second: squeue::Entry) -> io::Result<()> {
        if self.backlog.is_empty() {
            if self.room() < 2 {
                let _ = self.ring.submit();
            }
            if self.room() >= 2 {
                let pushed = self.try_push(&first) && self.try_push(&second);
                debug_assert!(pushed, "room for two was checked");
                return Ok(());
            }
        }
        self.backlog.push_back(Queued::Pair(first, second));
        Ok(())
    }

    /// Moves backlogged entries into the submission queue, submitting to make room. Stops
    /// when the kernel pushes back (e.g. EBUSY while completions wait to be reaped).
    fn move_backlog(&mut self) {
        while let Some(front) = self.backlog.front() {
            let needed = match front {
                Queued::One(_) => 1,
                Queued::Pair(..) => 2,
            };
            if self.room() < needed {
                match self.ring.submit() {
                    Ok(_) if self.room() >= needed => {}
                    _ => return,
                }
            }
            match self.backlog.pop_front() {
                Some(Queued::One(entry)) => {
                    self.try_push(&entry);
                }
                Some(Queued::Pair(first, second)) => {
                    self.try_push(&first);
                    self.try_push(&second);
                }
                None => return,
            }
        }
    }

    /// Arms a multishot accept on a listening socket. Its completions' descriptors are taken
    /// with `Completion::accepted_fd`.
    pub fn accept_multishot(&mut self, listener: RawFd, user_data: u64) -> io::Result<()> {
        let entry = opcode::AcceptMulti::new(types::Fd(listener))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data((user_data & USER_DATA_BITS) | ACCEPT_BIT);
        self.push(entry)
    }

    /// Arms one accept on a listening socket (one connection). Its completion's descriptor is
    /// taken with `Completion::accepted_fd`.
    pub fn accept(&mut self, listener: RawFd, user_data: u64) -> io::Result<()> {
        let entry = opcode::Accept::new(
            types::Fd(listener),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        )
        .flags(libc::SOCK_CLOEXEC)
        .build()
        .user_data((user_data & USER_DATA_BITS) | ACCEPT_BIT);
        self.push(entry)
    }

    /// Arms one receive into one buffer of this ring's buffer group: the receive can never
    /// take more than that one buffer. (Receive bundles would fill several, but the kernel
    /// retries a bundle past its length cap while the socket holds more, so they give no
    /// bound.) `poll_first` skips the first attempt when data is unlikely to be waiting
    /// already (a request/response peer).
    pub fn recv(&mut self, fd: RawFd, user_data: u64, poll_first: bool) -> io::Result<()> {
        let ioprio = if poll_first { RECVSEND_POLL_FIRST } else { 0 };
        let entry = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), 0)
            .buf_group(self.buffers.group())
            .ioprio(ioprio)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(user_data & USER_DATA_BITS);
        self.push(entry)
    }

    /// Arms a multishot receive into buffers of this ring's buffer group. It takes as many
    /// buffers as the socket holds at a wake-up: only for peers the caller trusts to be read.
    pub fn recv_multishot(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let entry = opcode::RecvMulti::new(types::Fd(fd), self.buffers.group())
            .build()
            .user_data(user_data & USER_DATA_BITS);
        self.push(entry)
    }

    /// Arms a multishot receive that ends by itself (a completion without `more()`) once it
    /// has received `total_bytes` or more: at most `total_bytes + buffer_size - 1` bytes in
    /// all, one buffer per completion. Needs Linux 6.17 or later (`supports_capped_multishot`);
    /// older kernels fail it with EINVAL.
    pub fn recv_multishot_capped(
        &mut self,
        fd: RawFd,
        user_data: u64,
        total_bytes: u32,
        poll_first: bool,
    ) -> io::Result<()> {
        let ioprio = RECV_MULTISHOT | if poll_first { RECVSEND_POLL_FIRST } else { 0 };
        let entry = opcode::Recv::new(types::Fd(fd), std::ptr::null_mut(), 0)
            .buf_group(self.buffers.group())
            .ioprio(ioprio)
            .build()
            .flags(squeue::Flags::BUFFER_SELECT)
            .user_data(user_data & USER_DATA_BITS);
        self.push(with_optlen(entry, total_bytes))
    }

    /// Whether this kernel caps a multishot receive by total bytes (Linux 6.17+): asked once
    /// per process on a socket pair with a ring of its own.
    pub fn supports_capped_multishot() -> bool {
        static SUPPORTED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        *SUPPORTED.get_or_init(|| probe_capped_multishot().unwrap_or(false))
    }

    /// Sends `token`'s bytes from `offset` on. The buffer is marked in flight, so it cannot go
    /// back to the kernel for a receive until `BufRing::send_completed`.
    pub fn send(
        &mut self,
        fd: RawFd,
        token: &BufToken,
        offset: u32,
        user_data: u64,
    ) -> io::Result<()> {
        let Some((start, len)) = self.buffers.send_range(token, offset) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a buffer token of another ring",
            ));
        };
        self.buffers.mark_sending(token);
        let entry = opcode::Send::new(types::Fd(fd), start, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data & USER_DATA_BITS);
        self.push(entry)
    }

    /// Sends `data[start..end]`; the ring holds `data` until the send completes and hands it
    /// back in that completion (`Completion::take_owned`). One such send per `user_data` at a
    /// time: a second is refused (and its data dropped) while the first is in flight.
    pub fn send_owned(
        &mut self,
        fd: RawFd,
        data: Vec<u8>,
        start: usize,
        end: usize,
        user_data: u64,
    ) -> io::Result<()> {
        let key = (user_data & USER_DATA_BITS) | OWNED_BIT;
        if self.owned.contains_key(&key) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a send of owned memory with this user_data is in flight",
            ));
        }
        let end = end.min(data.len());
        let start = start.min(end);
        let len = u32::try_from(end - start).unwrap_or(u32::MAX);
        let entry = opcode::Send::new(types::Fd(fd), data[start..].as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(key);
        // The vector's bytes do not move when the vector does (it is not changed while the
        // map keeps it alive).
        self.owned.insert(key, Owned::Bytes(data));
        self.push(entry)
    }

    /// Sends several buffers in one sendmsg: `buffers` in order, the first from `offset` on.
    /// Each is marked in flight as by `send`. One such send per `user_data` at a time.
    pub fn send_buffers(
        &mut self,
        fd: RawFd,
        buffers: &[&BufToken],
        offset: u32,
        user_data: u64,
    ) -> io::Result<()> {
        let key = (user_data & USER_DATA_BITS) | OWNED_BIT;
        if self.owned.contains_key(&key) {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a send of owned memory with this user_data is in flight",
            ));
        }
        let mut iovecs = Vec::with_capacity(buffers.len());
        for (index, token) in buffers.iter().enumerate() {
            let from = if index == 0 { offset } else { 0 };
            let Some((start, len)) = self.buffers.send_range(token, from) else {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a buffer token of another ring",
                ));
            };
            iovecs.push(libc::iovec {
                iov_base: start.cast_mut().cast(),
                iov_len: len as usize,
            });
        }
        for token in buffers {
            self.buffers.mark_sending(token);
        }
        // SAFETY: msghdr is a plain C struct for which all zeroes is a valid (empty) value.
        let header: libc::msghdr = unsafe { std::mem::zeroed() };
        let mut vector = Box::new(SendVector { header, iovecs });
        vector.header.msg_iov = vector.iovecs.as_mut_ptr();
        vector.header.msg_iovlen = vector.iovecs.len();
        let entry = opcode::SendMsg::new(types::Fd(fd), &vector.header)
            .flags(libc::MSG_NOSIGNAL as u32)
            .build()
            .user_data(key);
        // The header and the iovec array stay at their heap addresses while the box lives in
        // the map; the buffers they point to are marked in flight until send_completed.
        self.owned.insert(key, Owned::Vector(vector));
        self.push(entry)
    }

    /// Sends bytes that live for the whole program (fixed responses, greetings).
    pub fn send_static(
        &mut self,
        fd: RawFd,
        bytes: &'static [u8],
        user_data: u64,
    ) -> io::Result<()> {
        let len = u32::try_from(bytes.len()).unwrap_or(u32::MAX);
        let entry = opcode::Send::new(types::Fd(fd), bytes.as_ptr(), len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data & USER_DATA_BITS);
        self.push(entry)
    }

    /// Connects `fd` to `addr`, failing with -ECANCELED if it takes longer than `timeout`
    /// (a linked timeout whose own completion carries `timeout_user_data`).
    pub fn connect(
        &mut self,
        fd: RawFd,
        addr: SocketAddr,
        timeout: Duration,
        user_data: u64,
        timeout_user_data: u64,
    ) -> io::Result<()> {
        let sockaddr = self
            .addresses
            .entry(addr)
            .or_insert_with(|| Box::new(SockAddr::from(addr)));
        let connect = opcode::Connect::new(types::Fd(fd), sockaddr.as_ptr().cast(), sockaddr.len())
            .build()
            .flags(squeue::Flags::IO_LINK)
            .user_data(user_data & USER_DATA_BITS);
        let timespec_index = match self.timespecs.iter().position(|(d, _)| *d == timeout) {
            Some(index) => index,
            None => {
                let timespec = types::Timespec::new()
                    .sec(timeout.as_secs())
                    .nsec(timeout.subsec_nanos());
                self.timespecs.push((timeout, Box::new(timespec)));
                self.timespecs.len() - 1
            }
        };
        let timespec: *const types::Timespec = &*self.timespecs[timespec_index].1;
        let link_timeout = opcode::LinkTimeout::new(timespec)
            .build()
            .user_data(timeout_user_data & USER_DATA_BITS);
        self.push_pair(connect, link_timeout)
    }

    /// Half-closes the sending side of `fd` (a FIN toward its peer). The kernel runs this on an
    /// io-wq worker thread; the proxy's loop uses `socket::shutdown` instead.
    pub fn shutdown_write(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let entry = opcode::Shutdown::new(types::Fd(fd), libc::SHUT_WR)
            .build()
            .user_data(user_data & USER_DATA_BITS);
        self.push(entry)
    }

    /// Closes a descriptor through the ring; the ring takes it over. With `quiet`, a successful
    /// close posts no completion.
    pub fn close(&mut self, fd: OwnedFd, user_data: u64, quiet: bool) -> io::Result<()> {
        let mut entry = opcode::Close::new(types::Fd(fd.into_raw_fd()))
            .build()
            .user_data(user_data & USER_DATA_BITS);
        if quiet {
            entry = entry.flags(squeue::Flags::SKIP_SUCCESS);
        }
        self.push(entry)
    }

    /// Cancels every operation in flight on `fd`. A cancel that succeeds posts no completion
    /// of its own (the cancelled operations post theirs); one that fails does.
    pub fn cancel_fd(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(user_data & USER_DATA_BITS);
        self.push(entry)
    }

    /// Cancels the operation submitted with `target` as its user_data (quiet on success, as
    /// `cancel_fd`).
    pub fn cancel(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target & USER_DATA_BITS)
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(user_data & USER_DATA_BITS);
        self.push(entry)
    }

    /// Cancels a `send_owned` or `send_buffers` submitted with `target` as its user_data.
    pub fn cancel_owned(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new((target & USER_DATA_BITS) | OWNED_BIT)
            .build()
            .flags(squeue::Flags::SKIP_SUCCESS)
            .user_data(user_data & USER_DATA_BITS);
        self.push(entry)
    }

    /// Reads the 8-byte counter of an eventfd (the completion is the wake-up).
    pub fn read_eventfd(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let entry = opcode::Read::new(types::Fd(fd), self.wake_buffer.as_mut_ptr(), 8)
            .build()
            .user_data(user_data & USER_DATA_BITS);
        self.push(entry)
    }

    /// Submits what is queued without waiting.
    pub fn flush(&mut self) -> io::Result<()> {
        self.move_backlog();
        match self.ring.submit() {
            Ok(_) => Ok(()),
            Err(error) if is_retry(&error) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Submits what is queued and waits for at least one completion or `timeout`. Does not
    /// wait while submissions are still backlogged.
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        self.move_backlog();
        let want = usize::from(self.backlog.is_empty());
        let result = match timeout {
            Some(timeout) => {
                let timespec = types::Timespec::new()
                    .sec(timeout.as_secs())
                    .nsec(timeout.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&timespec);
                self.ring.submitter().submit_with_args(want, &args)
            }
            None => self.ring.submitter().submit_and_wait(want),
        };
        match result {
            Ok(_) => Ok(()),
            Err(error) if is_retry(&error) => Ok(()),
            Err(error) => Err(error),
        }
    }

    /// Moves every ready completion into `into` (which the caller reuses across turns).
    pub fn drain_completions(&mut self, into: &mut Vec<Completion>) {
        let ring = self.id;
        let owned = &mut self.owned;
        into.extend(self.ring.completion().map(|entry| {
            let user_data = entry.user_data();
            Completion {
                user_data,
                result: entry.result(),
                flags: entry.flags(),
                ring,
                owned: if user_data & OWNED_BIT != 0 {
                    match owned.remove(&user_data) {
                        Some(Owned::Bytes(data)) => Some(data),
                        _ => None,
                    }
                } else {
                    None
                },
            }
        }));
    }
}

/// The SQE's `optlen` (offset 44, shared with `file_index`), which the io-uring crate's
/// builders do not set; a capped multishot receive reads its byte cap there.
fn with_optlen(entry: squeue::Entry, optlen: u32) -> squeue::Entry {
    const OPTLEN_OFFSET: usize = 44;
    // SAFETY: `squeue::Entry` is `#[repr(C)]` around the 64-byte `io_uring_sqe`, made of plain
    // integers and unions of them, so every byte pattern is a valid value of both types and the
    // sizes match (checked by transmute at compile time).
    let mut bytes: [u8; 64] = unsafe { std::mem::transmute::<squeue::Entry, [u8; 64]>(entry) };
    bytes[OPTLEN_OFFSET..OPTLEN_OFFSET + 4].copy_from_slice(&optlen.to_ne_bytes());
    // SAFETY: as above; only the optlen field changed.
    unsafe { std::mem::transmute::<[u8; 64], squeue::Entry>(bytes) }
}

/// Two bytes wait on a socket pair; a capped receive of 1 byte must take them in one
/// completion and end (no `more`). Kernels without the cap refuse it (EINVAL).
fn probe_capped_multishot() -> io::Result<bool> {
    let (reader, writer) = std::os::unix::net::UnixStream::pair()?;
    std::io::Write::write_all(&mut &writer, b"ab")?;
    let mut ring = Ring::with_buffers(8, 2, 64)?;
    ring.buffers_mut().publish();
    ring.recv_multishot_capped(std::os::fd::AsRawFd::as_raw_fd(&reader), 1, 1, false)?;
    ring.submit_and_wait(Some(Duration::from_secs(1)))?;
    let mut completions = Vec::new();
    ring.drain_completions(&mut completions);
    let Some(mut first) = completions.pop() else {
        return Ok(false);
    };
    let supported = first.result() > 0 && !first.more();
    if let Some(token) = ring.buffers_mut().take(&mut first) {
        ring.buffers_mut().recycle(token);
    }
    Ok(supported)
}

/// Errors of io_uring_enter that mean "reap completions and come back", not failure.
fn is_retry(error: &io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        // Timed out, interrupted, or completions to reap first.
        Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN)
    )
}

impl Drop for Ring {
    fn drop(&mut self) {
        // Stop the kernel selecting our buffers before anything is freed; if that fails, the
        // buffer memory stays mapped for the rest of the process. `buffers_mut` lets safe code
        // swap two rings' buffer rings: one registered on another ring is never unregistered
        // from this one (that would drop this ring's own registration and free memory the
        // other ring's kernel side still fills), only leaked.
        if !self.buffers.registered_on(self.id) || !self.buffers.unregister(&self.ring) {
            self.buffers.leak();
        }
        // The kernel tears requests down after the ring fd closes, asynchronously: an eventfd
        // read could still target this buffer, so it is leaked (8 bytes per ring) not freed.
        let buffer = std::mem::replace(&mut self.wake_buffer, Box::new([0; 8]));
        Box::leak(buffer);
        // Likewise memory that sends in flight read.
        for (_, owned) in self.owned.drain() {
            match owned {
                Owned::Bytes(data) => {
                    data.leak();
                }
                Owned::Vector(vector) => {
                    Box::leak(vector);
                }
            }
        }
    }
}

/// The (major, minor) of a kernel release string such as "6.18.44-fc-v782"; (0, 0) if unreadable.
pub fn kernel_version(release: &str) -> (u32, u32) {
    let mut parts = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|part| part.parse::<u32>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

/// Fails with a plain message when the running kernel is older than `major.minor`.
pub fn check_kernel(major: u32, minor: u32) -> Result<(), String> {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_err(|error| format!("cannot read the kernel version: {error}"))?;
    let release = release.trim();
    if kernel_version(release) < (major, minor) {
        return Err(format!(
            "ringproxy needs Linux {major}.{minor} or newer (io_uring multishot receive and provided buffer rings); this kernel is {release}"
        ));
    }
    if let Ok(disabled) = std::fs::read_to_string("/proc/sys/kernel/io_uring_disabled")
        && disabled.trim() == "2"
    {
        return Err(
            "io_uring is disabled on this host (kernel.io_uring_disabled = 2); set it to 0".into(),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::net::UnixStream;

    #[test]
    fn kernel_versions_parse() {
        assert_eq!(kernel_version("6.18.44-fc-v782"), (6, 18));
        assert_eq!(kernel_version("6.1.0-13-amd64"), (6, 1));
        assert_eq!(kernel_version("5.15.0"), (5, 15));
        assert!(kernel_version("5.19.17") < (6, 1));
        assert!(kernel_version("6.0") < (6, 1));
        assert_eq!(kernel_version("garbage"), (0, 0));
        assert_eq!(kernel_version(""), (0, 0));
    }

    #[test]
    fn a_capped_multishot_receive_ends_after_its_bytes() {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        if kernel_version(release.trim()) < (6, 17) {
            eprintln!("SKIP: kernel {release} has no multishot receive cap");
            return;
        }
        assert!(
            Ring::supports_capped_multishot(),
            "6.17+ caps multishot receives"
        );
        let (reader, mut writer) = UnixStream::pair().expect("pair");
        let mut ring = Ring::with_buffers(8, 8, 4).expect("ring");
        ring.buffers_mut().publish();
        ring.recv_multishot_capped(reader.as_raw_fd(), 7, 6, false)
            .expect("arm");
        let mut taken = Vec::new();
        let mut ended = false;
        for chunk in [&b"abc"[..], b"de", b"fgh", b"ijk"] {
            writer.write_all(chunk).expect("write");
            if ended {
                break;
            }
            let mut completion = wait_one(&mut ring);
            assert!(completion.result() > 0, "{}", completion.result());
            let token = ring.buffers_mut().take(&mut completion).expect("a buffer");
            taken.extend_from_slice(ring.buffers().bytes(&token));
            ring.buffers_mut().recycle(token);
            ring.buffers_mut().publish();
            ended = !completion.more();
        }
        assert!(ended, "the receive ended by itself");
        assert_eq!(
            taken, b"abcdefgh",
            "6 bytes asked, the last read overshoots within one buffer"
        );
    }

    fn wait_one(ring: &mut Ring) -> Completion {
        let mut completions = Vec::new();
        for _ in 0..100 {
            ring.submit_and_wait(Some(Duration::from_millis(50)))
                .expect("enter");
            ring.drain_completions(&mut completions);
            if let Some(completion) = completions.pop() {
                return completion;
            }
        }
        panic!("no completion");
    }

    /// A receive fills one buffer; its token is minted once, reads the received bytes, and
    /// goes back to the free buffers; a completion from another ring mints nothing here.
    #[test]
    fn a_received_buffer_is_taken_once_and_recycled() {
        let mut ring = Ring::with_buffers(64, 256, 1024).expect("ring");
        assert_eq!(ring.buffers().available(), 256);
        assert_eq!(ring.buffers().window(), 64);
        let (mut peer, local) = UnixStream::pair().expect("socketpair");
        peer.write_all(b"hello ring").expect("write");
        ring.recv(local.as_raw_fd(), 7, false).expect("recv");
        let mut completion = wait_one(&mut ring);
        assert_eq!(completion.user_data(), 7);
        assert_eq!(completion.result(), 10);
        assert!(completion.has_buffer());
        let token = ring.buffers_mut().take(&mut completion).expect("token");
        assert!(
            ring.buffers_mut().take(&mut completion).is_none(),
            "minted twice"
        );
        assert!(completion.accepted_fd().is_none(), "a receive is no accept");
        assert_eq!(ring.buffers().bytes(&token), b"hello ring");
        assert_eq!(ring.buffers().available(), 255);
        let mut other = Ring::with_buffers(64, 64, 1024).expect("other ring");
        peer.write_all(b"x").expect("write");
        other.recv(local.as_raw_fd(), 9, false).expect("recv");
        let mut foreign = wait_one(&mut other);
        assert!(
            ring.buffers_mut().take(&mut foreign).is_none(),
            "another ring's buffer"
        );
        ring.buffers_mut().recycle(token);
        assert_eq!(ring.buffers().available(), 256);
    }

    /// Safe code can swap two rings' buffer rings; dropping one ring must then neither
    /// unregister nor unmap the buffers the other ring's kernel side still fills (a receive
    /// there would fail with EFAULT, or write into freed memory).
    #[test]
    fn swapped_buffer_rings_stay_mapped_for_the_ring_they_serve() {
        let mut first = Ring::with_buffers(8, 8, 64).expect("ring");
        let mut second = Ring::with_buffers(8, 8, 64).expect("ring");
        first.buffers_mut().publish();
        second.buffers_mut().publish();
        std::mem::swap(first.buffers_mut(), second.buffers_mut());
        drop(first);
        let (mut peer, local) = UnixStream::pair().expect("socketpair");
        peer.write_all(b"still mapped").expect("write");
        second.recv(local.as_raw_fd(), 3, false).expect("recv");
        let mut completion = wait_one(&mut second);
        assert_eq!(completion.result(), 12, "the receive filled a live buffer");
        assert!(
            second.buffers_mut().take(&mut completion).is_none(),
            "the buffer ring it holds is another ring's"
        );
    }
}
