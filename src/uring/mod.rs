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

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::Duration;

use io_uring::{IoUring, opcode, squeue, types};
use socket2::SockAddr;

pub use buf_ring::{BufRing, BufToken};

/// One completion: what was asked (`user_data`), the result (>= 0, or -errno) and the flags.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub user_data: u64,
    pub result: i32,
    pub flags: u32,
}

impl Completion {
    /// Whether a multishot request stays armed after this completion.
    pub fn more(&self) -> bool {
        io_uring::cqueue::more(self.flags)
    }
}

pub struct Ring {
    ring: IoUring,
    /// Socket addresses handed to connect, kept for the ring's life (keyed by address, so one per
    /// server, not one per connect).
    addresses: HashMap<SocketAddr, Box<SockAddr>>,
    /// Timespecs handed to link timeouts, one per distinct duration.
    timespecs: Vec<(Duration, Box<types::Timespec>)>,
    /// Target of the eventfd read that wakes the shard.
    wake_buffer: Box<[u8; 8]>,
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
        Ok(Ring {
            ring,
            addresses: HashMap::new(),
            timespecs: Vec::new(),
            wake_buffer: Box::new([0; 8]),
        })
    }

    fn push(&mut self, entry: squeue::Entry) -> io::Result<()> {
        loop {
            // SAFETY: every entry built by this module points only at memory that outlives the
            // operation (see the methods below); pushing copies the SQE.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                return Ok(());
            }
            // Submission queue full: hand what is queued to the kernel and retry.
            self.ring.submit()?;
        }
    }

    /// Pushes two linked entries without a flush between them (a flush would break the link).
    fn push_pair(&mut self, first: squeue::Entry, second: squeue::Entry) -> io::Result<()> {
        loop {
            {
                let mut queue = self.ring.submission();
                if queue.capacity() - queue.len() >= 2 {
                    // SAFETY: as in `push`; room for both was checked just above.
                    unsafe {
                        queue
                            .push(&first)
                            .and_then(|()| queue.push(&second))
                            .map_err(|_| io::Error::other("submission queue full"))?;
                    }
                    return Ok(());
                }
            }
            self.ring.submit()?;
        }
    }

    /// Arms a multishot accept on a listening socket.
    pub fn accept_multishot(&mut self, listener: RawFd, user_data: u64) -> io::Result<()> {
        let entry = opcode::AcceptMulti::new(types::Fd(listener))
            .flags(libc::SOCK_CLOEXEC)
            .build()
            .user_data(user_data);
        self.push(entry)
    }

    /// Arms a multishot receive into buffers of `buffers`' group.
    pub fn recv_multishot(
        &mut self,
        fd: RawFd,
        buffers: &BufRing,
        user_data: u64,
    ) -> io::Result<()> {
        let entry = opcode::RecvMulti::new(types::Fd(fd), buffers.group())
            .build()
            .user_data(user_data);
        self.push(entry)
    }

    /// Sends `token`'s bytes from `offset` on. The buffer is marked in flight, so it cannot go
    /// back to the kernel for a receive until `BufRing::send_completed`.
    pub fn send(
        &mut self,
        fd: RawFd,
        buffers: &mut BufRing,
        token: &BufToken,
        offset: u32,
        user_data: u64,
    ) -> io::Result<()> {
        let (start, len) = buffers.send_range(token, offset);
        buffers.mark_sending(token);
        let entry = opcode::Send::new(types::Fd(fd), start, len)
            .flags(libc::MSG_NOSIGNAL)
            .build()
            .user_data(user_data);
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
            .user_data(user_data);
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
            .user_data(user_data);
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
            .user_data(timeout_user_data);
        self.push_pair(connect, link_timeout)
    }

    /// Half-closes the sending side of `fd` (a FIN toward its peer).
    pub fn shutdown_write(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let entry = opcode::Shutdown::new(types::Fd(fd), libc::SHUT_WR)
            .build()
            .user_data(user_data);
        self.push(entry)
    }

    pub fn close(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let entry = opcode::Close::new(types::Fd(fd))
            .build()
            .user_data(user_data);
        self.push(entry)
    }

    /// Cancels every operation in flight on `fd`.
    pub fn cancel_fd(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel2::new(types::CancelBuilder::fd(types::Fd(fd)).all())
            .build()
            .user_data(user_data);
        self.push(entry)
    }

    /// Cancels the operation submitted with `target` as its user_data.
    pub fn cancel(&mut self, target: u64, user_data: u64) -> io::Result<()> {
        let entry = opcode::AsyncCancel::new(target)
            .build()
            .user_data(user_data);
        self.push(entry)
    }

    /// Reads the 8-byte counter of an eventfd (the completion is the wake-up).
    pub fn read_eventfd(&mut self, fd: RawFd, user_data: u64) -> io::Result<()> {
        let entry = opcode::Read::new(types::Fd(fd), self.wake_buffer.as_mut_ptr(), 8)
            .build()
            .user_data(user_data);
        self.push(entry)
    }

    /// Submits what is queued without waiting.
    pub fn flush(&mut self) -> io::Result<()> {
        self.ring.submit().map(drop)
    }

    /// Submits what is queued and waits for at least one completion or `timeout`.
    pub fn submit_and_wait(&mut self, timeout: Option<Duration>) -> io::Result<()> {
        let result = match timeout {
            Some(timeout) => {
                let timespec = types::Timespec::new()
                    .sec(timeout.as_secs())
                    .nsec(timeout.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&timespec);
                self.ring.submitter().submit_with_args(1, &args)
            }
            None => self.ring.submitter().submit_and_wait(1),
        };
        match result {
            Ok(_) => Ok(()),
            Err(error) => match error.raw_os_error() {
                // Timed out, interrupted, or completions to reap first: all mean "look".
                Some(libc::ETIME | libc::EINTR | libc::EBUSY | libc::EAGAIN) => Ok(()),
                _ => Err(error),
            },
        }
    }

    /// Moves every ready completion into `into` (which the caller reuses across turns).
    pub fn drain_completions(&mut self, into: &mut Vec<Completion>) {
        into.extend(self.ring.completion().map(|entry| Completion {
            user_data: entry.user_data(),
            result: entry.result(),
            flags: entry.flags(),
        }));
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        // The kernel tears requests down after the ring fd closes, asynchronously: an eventfd
        // read could still target this buffer, so it is leaked (8 bytes per shard) not freed.
        let buffer = std::mem::replace(&mut self.wake_buffer, Box::new([0; 8]));
        Box::leak(buffer);
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
    use super::kernel_version;

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
}
