//! Socket helpers for the loop: the few synchronous socket calls it makes on raw descriptors
//! that io_uring handed it (options, peer address, creation of server-side sockets).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::time::Duration;

use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};

use crate::config::TcpOptions;

/// Applies keepalive and user-timeout options to a socket (a listening socket passes them on
/// to the connections it accepts).
pub fn apply_tcp_options(socket: SockRef<'_>, options: &TcpOptions) -> io::Result<()> {
    if let Some(keepalive) = options.keepalive {
        let params = TcpKeepalive::new()
            .with_time(keepalive.idle)
            .with_interval(keepalive.interval)
            .with_retries(keepalive.count);
        socket.set_tcp_keepalive(&params)?;
    }
    if let Some(timeout) = options.user_timeout {
        socket.set_tcp_user_timeout(Some(timeout))?;
    }
    Ok(())
}

/// Sets a listening socket's options to exactly `options` (a reload changed them): options
/// turned off are turned off, not left as they were.
pub fn replace_tcp_options(fd: BorrowedFd<'_>, options: &TcpOptions) -> io::Result<()> {
    let socket = SockRef::from(&fd);
    if options.keepalive.is_none() {
        socket.set_keepalive(false)?;
    }
    if options.user_timeout.is_none() {
        socket.set_tcp_user_timeout(None)?;
    }
    apply_tcp_options(socket, options)
}

/// Calls listen(2) again on a listening socket: Linux takes the new backlog in place.
pub fn relisten(fd: BorrowedFd<'_>, backlog: u32) -> io::Result<()> {
    SockRef::from(&fd).listen(i32::try_from(backlog).unwrap_or(i32::MAX))
}

/// Clock ticks per second (for /proc CPU times).
pub fn clock_ticks() -> f64 {
    // SAFETY: sysconf reads a system constant; no memory is involved.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// The memory page size (for /proc sizes given in pages).
pub fn page_size() -> f64 {
    // SAFETY: sysconf reads a system constant; no memory is involved.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as f64 } else { 4096.0 }
}

/// A new TCP socket for connecting to `addr`, with TCP_NODELAY and `options` set, bound first
/// to `source` (any port) when given: with IP_BIND_ADDRESS_NO_PORT the port is chosen at
/// connect time per destination, so one source address can reach many destinations without
/// running out of ports.
pub fn tcp_socket(
    addr: &SocketAddr,
    source: Option<IpAddr>,
    options: &TcpOptions,
) -> io::Result<OwnedFd> {
    let socket = Socket::new(
        Domain::for_address(*addr),
        Type::STREAM,
        Some(Protocol::TCP),
    )?;
    socket.set_tcp_nodelay(true)?;
    apply_tcp_options(SockRef::from(&socket), options)?;
    if let Some(source) = source {
        bind_address_no_port(&socket)?;
        socket.bind(&SocketAddr::new(source, 0).into())?;
    }
    Ok(OwnedFd::from(socket))
}

/// A new TCP socket for connecting to `addr`, with TCP_NODELAY set.
pub fn tcp_socket_for(addr: &SocketAddr) -> io::Result<OwnedFd> {
    tcp_socket(addr, None, &TcpOptions::default())
}

/// A new TCP socket for connecting to `target` from `source` (any port).
pub fn tcp_socket_from(source: IpAddr, target: &SocketAddr) -> io::Result<OwnedFd> {
    tcp_socket(target, Some(source), &TcpOptions::default())
}

fn bind_address_no_port(socket: &Socket) -> io::Result<()> {
    let enable: libc::c_int = 1;
    // IP_BIND_ADDRESS_NO_PORT is an IPPROTO_IP option that also applies to IPv6 sockets.
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
    Ok(())
}

/// asm-generic values (x86-64, arm64, riscv); mips, sparc and parisc number them differently.
const SO_ATTACH_REUSEPORT_CBPF: libc::c_int = 51;
const SO_DETACH_REUSEPORT_BPF: libc::c_int = 68;

/// Takes the reuseport program off a listener's group: the kernel's hash spreads again.
/// ENOENT (none attached) is not an error.
pub fn detach_reuseport_bpf(fd: BorrowedFd<'_>) -> io::Result<()> {
    let unused: libc::c_int = 0;
    // SAFETY: setsockopt reads sizeof(c_int) bytes from a live stack value; `fd` is borrowed
    // for the whole call.
    let result = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_DETACH_REUSEPORT_BPF,
            (&unused as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if result != 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::ENOENT) {
            return Err(error);
        }
    }
    Ok(())
}

/// Attaches a classic BPF program that picks the socket of a SO_REUSEPORT group for each new
/// connection (`SO_ATTACH_REUSEPORT_CBPF`; the kernel checks the program before taking it).
pub fn attach_reuseport_cbpf(
    fd: BorrowedFd<'_>,
    program: &[crate::admission::steer::Insn],
) -> io::Result<()> {
    let mut filters: Vec<libc::sock_filter> = program
        .iter()
        .map(|insn| libc::sock_filter {
            code: insn.code,
            jt: insn.jt,
            jf: insn.jf,
            k: insn.k,
        })
        .collect();
    let len = u16::try_from(filters.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "BPF program too long"))?;
    let fprog = libc::sock_fprog {
        len,
        filter: filters.as_mut_ptr(),
    };
    // SAFETY: setsockopt reads one sock_fprog from the stack, whose `filter` points at `len`
    // live instructions in `filters`; the kernel copies them before returning, and `fd` is
    // borrowed for the whole call.
    let result = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_ATTACH_REUSEPORT_CBPF,
            (&fprog as *const libc::sock_fprog).cast(),
            std::mem::size_of::<libc::sock_fprog>() as libc::socklen_t,
        )
    };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the next close of `fd` send a RST instead of a FIN (used to pass a reset through).
pub fn set_linger_zero(fd: BorrowedFd<'_>) -> io::Result<()> {
    SockRef::from(&fd).set_linger(Some(Duration::ZERO))
}

pub fn peer_ip(fd: BorrowedFd<'_>) -> io::Result<IpAddr> {
    peer_addr(fd).map(|addr| addr.ip())
}

/// The local address of a connected socket (getsockname).
pub fn local_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    socket2::SockRef::from(&fd)
        .local_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "not an IP socket"))
}

pub fn peer_addr(fd: BorrowedFd<'_>) -> io::Result<SocketAddr> {
    SockRef::from(&fd)
        .peer_addr()?
        .as_socket()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "not an IP socket"))
}

/// shutdown(2), synchronously: cheap (no io-wq hand-off, which IORING_OP_SHUTDOWN takes), and
/// it wakes every operation waiting on the socket (a receive sees EOF, a send fails), which is
/// how the loop ends a session's pending operations without one cancellation each.
pub fn shutdown(fd: BorrowedFd<'_>, how: std::net::Shutdown) -> io::Result<()> {
    SockRef::from(&fd).shutdown(how)
}

/// Bytes sent on `fd` that the peer has not acknowledged yet (SIOCOUTQ).
pub fn unacknowledged_bytes(fd: BorrowedFd<'_>) -> io::Result<u32> {
    let mut pending: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ) writes one c_int into a live stack value; `fd` is borrowed
    // for the call.
    let result = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCOUTQ, &mut pending) };
    if result != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u32::try_from(pending).unwrap_or(0))
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
pub fn eventfd_signal(fd: &impl AsFd) -> io::Result<()> {
    let one = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live stack buffer to a descriptor we borrow.
    let written = unsafe { libc::write(fd.as_fd().as_raw_fd(), one.as_ptr().cast(), one.len()) };
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

/// Grows this process's descriptor table to hold descriptors up to `count` now, so it never
/// grows later. The kernel grows the table by doubling, and in a multi-threaded process each
/// growth waits for an RCU grace period (`synchronize_rcu` in `expand_fdtable`): measured here,
/// 4 to 20 ms and on a loaded host up to a second, during which the thread that opened the
/// descriptor (a shard accepting or connecting) is frozen. Called before the shards start, the
/// one growth costs nothing. Returns the size reserved (capped at RLIMIT_NOFILE).
pub fn reserve_descriptor_table(count: u64) -> io::Result<u64> {
    let count = count.min(open_file_limit()).max(1);
    let highest = libc::c_int::try_from(count - 1).unwrap_or(libc::c_int::MAX);
    let probe = eventfd()?;
    // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor we own into the lowest free slot at or
    // above `highest`; it has no memory arguments and the result is checked before use.
    let duplicate = unsafe { libc::fcntl(probe.as_raw_fd(), libc::F_DUPFD_CLOEXEC, highest) };
    if duplicate < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the duplicate was just created and is owned by nobody else; dropping it closes it.
    drop(unsafe { OwnedFd::from_raw_fd(duplicate) });
    Ok(count)
}

/// How many descriptors this process has open now.
pub fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd").map_or(0, |entries| entries.count().saturating_sub(1))
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
