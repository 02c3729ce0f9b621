//! Binding listeners: one SO_REUSEPORT socket per listener per shard, so the kernel spreads
//! accepted connections across shards.
//!
//! Owns socket creation and binding only; accepting is the shard loop's job. A listener bound to
//! port 0 gets its port from the first shard's socket and the other shards join that port.

use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;

use socket2::{Domain, Protocol, Socket, Type};

use crate::config::ListenerConfig;

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

fn bind_one(addr: SocketAddr, backlog: u32) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Accepted sockets inherit it, which saves a setsockopt per connection.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    Ok(socket)
}

/// Binds `listener` once per shard.
pub fn bind(listener: &ListenerConfig, shards: usize) -> Result<BoundListener, BindError> {
    let error = |addr, source| BindError {
        name: listener.name.clone(),
        addr,
        source,
    };
    let first = bind_one(listener.bind, listener.backlog).map_err(|e| error(listener.bind, e))?;
    let addr = first
        .local_addr()
        .ok()
        .and_then(|addr| addr.as_socket())
        .unwrap_or(listener.bind);
    let mut sockets = vec![OwnedFd::from(first)];
    for _ in 1..shards {
        let socket = bind_one(addr, listener.backlog).map_err(|e| error(addr, e))?;
        sockets.push(OwnedFd::from(socket));
    }
    Ok(BoundListener { addr, sockets })
}
