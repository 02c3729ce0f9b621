//! Socket helpers for the loop: the few synchronous socket calls it makes on raw descriptors
//! that io_uring handed it (options, peer address, creation of server-side sockets).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};

use socket2::{Domain, Protocol, SockRef, Socket, Type};

fn with_socket<T>(fd: RawFd, action: impl FnOnce(SockRef<'_>) -> io::Result<T>) -> io::Result<T> {
    if fd < 0 {
        return Err(io::Error::from_raw_os_error(libc::EBADF));
    }
    // SAFETY: the caller (the shard) owns `fd` and keeps it open for this call; it closes its
    // descriptors only through the ring after every operation on them completed.
    let borrowed = unsafe { BorrowedFd::borrow_raw(fd) };
    action(SockRef::from(&borrowed))
}

/// A new TCP socket for connecting to `addr`, with TCP_NODELAY set. Returned as a raw fd the
/// caller owns (it is closed through the ring).
pub fn tcp_socket_for(addr: &SocketAddr) -> io::Result<RawFd> {
    let socket = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    Ok(socket.into_raw_fd())
}

/// Makes the next close of `fd` send a RST instead of a FIN (used to pass a reset through).
pub fn set_linger_zero(fd: RawFd) -> io::Result<()> {
    with_socket(fd, |socket| {
        socket.set_linger(Some(std::time::Duration::ZERO))
    })
}

pub fn peer_ip(fd: RawFd) -> io::Result<IpAddr> {
    with_socket(fd, |socket| {
        socket
            .peer_addr()?
            .as_socket()
            .map(|addr| addr.ip())
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP socket"))
    })
}

/// Closes a descriptor no io_uring operation has ever referenced (a just-accepted socket that
/// admission turned away).
pub fn close_unused(fd: RawFd) {
    if fd >= 0 {
        // SAFETY: the caller owns fd and no operation refers to it; taking ownership closes it.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
    }
}

/// A non-blocking eventfd, to wake a shard's ring from another thread.
pub fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd has no memory arguments; the result is checked before use.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd was just created and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Adds 1 to an eventfd (wakes the ring that reads it).
pub fn eventfd_signal(fd: &OwnedFd) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live stack buffer to a descriptor we borrow.
    let written = unsafe { libc::write(fd.as_raw_fd(), one.as_ptr().cast(), one.len()) };
    if written == 8 {
        Ok(())
    } else {
        let error = io::Error::last_os_error();
        // A full counter (EAGAIN) means the shard has a wake-up pending anyway.
        if error.kind() == io::ErrorKind::WouldBlock {
            Ok(())
        } else {
            Err(error)
        }
    }
}

/// A new TCP socket for connecting to `target` from `source` (any port): bound before connect
/// with IP_BIND_ADDRESS_NO_PORT, so the port is chosen at connect time per destination and one
/// source address can reach many destinations without running out of ports.
pub fn tcp_socket_from(source: IpAddr, target: &SocketAddr) -> io::Result<RawFd> {
    let socket = Socket::new(
        Domain::for_address(*target),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    if source.is_ipv4() {
        let enable: libc::c_int = 1;
        // SAFETY: setsockopt reads sizeof(c_int) bytes from a live stack value; the socket is
        // owned by `socket` for the whole call.
        let result = unsafe {
            libc::setsockopt(
                socket.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&enable as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    socket.bind(&SocketAddr::new(source, 0).into())?;
    Ok(socket.into_raw_fd())
}

/// The soft limit on open descriptors of this process (RLIMIT_NOFILE).
pub fn open_file_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct into a live stack value.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0 {
        limit.rlim_cur
    } else {
        1024
    }
}

/// The soft limit on locked memory (RLIMIT_MEMLOCK), in bytes; `None` when unlimited.
pub fn locked_memory_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit struct into a live stack value.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return None;
    }
    Some(limit.rlim_cur)
}
