//! Binding listeners: one SO_REUSEPORT socket per listener per shard, so the kernel spreads
//! accepted connections across shards.
//!
//! Owns socket creation and binding only; accepting is the shard loop's job. A listener bound to
//! port 0 gets its port from the first shard's socket and the other shards join that port.

use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use socket2::{Domain, Protocol, Socket, Type};

use crate::admission::{Steer, steer};
use crate::config::{DEFAULT_IPV6_PREFIX, ListenerConfig, TcpOptions};
use crate::uring::socket::{apply_tcp_options, attach_reuseport_cbpf, detach_reuseport_bpf};

/// The sockets of one listener, one per shard, and the address they share.
pub struct BoundListener {
    pub addr: SocketAddr,
    pub sockets: Vec<OwnedFd>,
}

#[derive(Debug, thiserror::Error)]
#[error("listener {name:?}: cannot bind {addr}: {source}")]
pub struct BindError {
    pub name: String,
    pub addr: SocketAddr,
    #[source]
    pub source: io::Error,
}

fn bind_one(addr: SocketAddr, backlog: u32, options: &TcpOptions) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Accepted sockets inherit it, which saves a setsockopt per connection.
    socket.set_tcp_nodelay(true)?;
    // Keepalive and the user timeout are inherited by accepted sockets too.
    apply_tcp_options(socket2::SockRef::from(&socket), options)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket)
}

/// Binds `addr` `count` times with SO_REUSEPORT (port 0: the first socket's port for all).
/// On failure, returns the address that failed with the error.
pub fn bind_reuseport(
    addr: SocketAddr,
    backlog: u32,
    count: usize,
) -> Result<BoundListener, (SocketAddr, io::Error)> {
    bind_reuseport_with(addr, backlog, count, &TcpOptions::default())
}

/// As `bind_reuseport`, with options the accepted connections inherit.
pub fn bind_reuseport_with(
    addr: SocketAddr,
    backlog: u32,
    count: usize,
    options: &TcpOptions,
) -> Result<BoundListener, (SocketAddr, io::Error)> {
    let first = bind_one(addr, backlog, options).map_err(|error| (addr, error))?;
    let bound = first
        .local_addr()
        .ok()
        .and_then(|local| local.as_socket())
        .unwrap_or(addr);
    let mut sockets = vec![OwnedFd::from(first)];
    for _ in 1..count {
        let socket = bind_one(bound, backlog, options).map_err(|error| (bound, error))?;
        sockets.push(OwnedFd::from(socket));
    }
    Ok(BoundListener {
        addr: bound,
        sockets,
    })
}

/// The steering a listener asks for: None for the kernel's hash, or the IPv6 prefix by which
/// the BPF program groups client addresses (the per-source table's).
pub fn steering(listener: &ListenerConfig) -> Option<u8> {
    (listener.admission.steer == Steer::Source).then(|| {
        listener
            .admission
            .per_source
            .as_ref()
            .map_or(DEFAULT_IPV6_PREFIX, |per_source| per_source.ipv6_prefix)
    })
}

/// Attaches (or, for None, takes off) the steering program of the reuseport group `fd` is in.
pub fn apply_steering(fd: BorrowedFd<'_>, steering: Option<u8>, shards: usize) -> io::Result<()> {
    match steering {
        None => detach_reuseport_bpf(fd),
        Some(prefix) => {
            let program = steer::program(shards as u32, prefix);
            attach_reuseport_cbpf(fd, &program).map_err(|source| {
                io::Error::new(
                    source.kind(),
                    format!("steer = \"source\": cannot attach the BPF program: {source}"),
                )
            })
        }
    }
}

/// Binds `listener` once per shard (in shard order, which is the order of the reuseport group).
/// With `steer = "source"`, attaches the program that sends each client address to one shard.
pub fn bind(listener: &ListenerConfig, shards: usize) -> Result<BoundListener, BindError> {
    let error = |addr, source| BindError {
        name: listener.name.clone(),
        addr,
        source,
    };
    let bound = bind_reuseport_with(listener.bind, listener.backlog, shards, &listener.tcp)
        .map_err(|(addr, source)| error(addr, source))?;
    if let Some(first) = bound.sockets.first() {
        apply_steering(first.as_fd(), steering(listener), shards)
            .map_err(|source| error(bound.addr, source))?;
    }
    Ok(bound)
}
