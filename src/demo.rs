//! `ringproxy demo`: the proxy on its embedded default config, in front of built-in echo servers
//! on loopback, under a short, bounded, byte-verified load.
//!
//! Owns the demo's test servers and clients (plain threads and std sockets: they are the
//! outside world, not the data plane). Everything targets 127.0.0.1 and stops by itself.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

use crate::admin::ctl;
use crate::config::Config;
use crate::control::{Proxy, ProxyOptions};
use crate::runtime::ShardReport;

#[derive(Debug, Clone)]
pub struct DemoOptions {
    pub connections: usize,
    pub requests_per_connection: usize,
    pub max_payload: usize,
}

impl Default for DemoOptions {
    fn default() -> Self {
        DemoOptions {
            connections: 64,
            requests_per_connection: 200,
            max_payload: 64 * 1024,
        }
    }
}

#[derive(Debug)]
pub struct DemoReport {
    pub listener: SocketAddr,
    pub servers: Vec<(SocketAddr, u64)>,
    pub requests: u64,
    pub bytes_verified: u64,
    pub failures: u64,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
    pub shards: Vec<ShardReport>,
    /// Where the admin API listened, and the connections its `/status` counted.
    pub admin: Option<(SocketAddr, u64)>,
}

impl DemoReport {
    pub fn succeeded(&self) -> bool {
        self.failures == 0
    }
}

/// An echo server on an ephemeral loopback port, counting the connections it accepted.
pub struct EchoServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

impl EchoServer {
    pub fn start() -> io::Result<EchoServer> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let accepted = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let (count, stopping) = (Arc::clone(&accepted), Arc::clone(&stop));
        thread::Builder::new()
            .name("demo-echo".into())
            .spawn(move || {
                for stream in listener.incoming() {
                    if stopping.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    count.fetch_add(1, Ordering::Relaxed);
                    let _ = thread::Builder::new()
                        .stack_size(64 * 1024)
                        .spawn(move || echo(stream));
                }
            })?;
        Ok(EchoServer {
            addr,
            accepted,
            stop,
        })
    }
}

impl Drop for EchoServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(200));
    }
}

/// Echoes every byte back until the peer's FIN (or an error, or 30 s of silence), then sends
/// FIN. The echo server of the demo and of the integration tests.
pub fn echo(mut stream: TcpStream) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if stream.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        }
    }
    let _ = stream.shutdown(Shutdown::Write);
}

/// A small fast PRNG for payloads (xorshift64*).
pub struct Payload(u64);

impl Payload {
    pub fn new(seed: u64) -> Payload {
        Payload(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn fill(&mut self, buffer: &mut [u8]) {
        for chunk in buffer.chunks_mut(8) {
            let bytes = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&bytes[..chunk.len()]);
        }
    }
}

/// Runs the demo end to end: echo servers, the proxy on the embedded default config (listener
/// moved to an ephemeral port, pool pointed at the echo servers), bounded load, drain.
pub fn run(options: &DemoOptions) -> anyhow::Result<DemoReport> {
    let servers = [EchoServer::start()?, EchoServer::start()?];
    let mut config = Config::default_config()?;
    for listener in &mut config.listeners {
        listener.bind = "127.0.0.1:0".parse()?;
    }
    for pool in &mut config.pools {
        for (server, echo) in pool.servers.iter_mut().zip(&servers) {
            server.addr = echo.addr;
        }
    }
    config.runtime.drain_timeout = Duration::from_secs(5);
    if let Some(admin) = &mut config.admin {
        admin.bind = "127.0.0.1:0".parse()?;
        admin.state_file = None;
    }
    let proxy = Proxy::start(config, ProxyOptions::default())?;
    let listener = proxy.listener_addrs()[0].1;

    let started = Instant::now();
    let clients: Vec<_> = (0..options.connections)
        .map(|client| {
            let options = options.clone();
            thread::spawn(move || drive_client(listener, client as u64, &options))
        })
        .collect();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let (mut requests, mut bytes_verified, mut failures) = (0, 0, 0);
    for client in clients {
        match client.join() {
            Ok(Ok(result)) => {
                requests += result.requests;
                bytes_verified += result.bytes;
                latency.add(&result.latency)?;
            }
            Ok(Err(error)) => {
                failures += 1;
                tracing::warn!(%error, "demo client failed");
            }
            Err(_) => failures += 1,
        }
    }
    let elapsed = started.elapsed();
    let expected = options.connections as u64;
    let admin = proxy
        .admin_addr()
        .map(|addr| (addr, accepted_per_status(addr, expected)));
    proxy.handle().drain();
    let shards = proxy.join()?;
    Ok(DemoReport {
        listener,
        servers: servers
            .iter()
            .map(|server| (server.addr, server.accepted.load(Ordering::Relaxed)))
            .collect(),
        requests,
        bytes_verified,
        failures,
        elapsed,
        latency,
        shards,
        admin,
    })
}

/// The connections the admin API's `/status` counted on every listener (shards publish their
/// counters once a second, so this waits up to 3 s for them to reach `expected`).
fn accepted_per_status(admin: SocketAddr, expected: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut accepted = 0;
    while Instant::now() < deadline {
        if let Ok(answer) = ctl::send(admin, None, &ctl::Call::get("/status"))
            && let Ok(status) = answer.body
        {
            accepted = status["listeners"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|listener| listener["accepted"].as_u64())
                .sum();
            if accepted >= expected {
                break;
            }
        }
        thread::sleep(Duration::from_millis(200));
    }
    accepted
}

struct ClientResult {
    requests: u64,
    bytes: u64,
    latency: Histogram<u64>,
}

fn drive_client(
    target: SocketAddr,
    seed: u64,
    options: &DemoOptions,
) -> anyhow::Result<ClientResult> {
    let mut stream = TcpStream::connect_timeout(&target, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(10)))?;
    stream.set_nodelay(true)?;
    let mut random = Payload::new(seed + 1);
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut sent = vec![0u8; options.max_payload.max(1)];
    let mut received = vec![0u8; options.max_payload.max(1)];
    let mut bytes = 0;
    for _ in 0..options.requests_per_connection {
        let size = 1 + (random.next_u64() as usize) % options.max_payload.max(1);
        random.fill(&mut sent[..size]);
        let begin = Instant::now();
        stream.write_all(&sent[..size])?;
        stream.read_exact(&mut received[..size])?;
        latency.saturating_record(begin.elapsed().as_micros() as u64);
        if sent[..size] != received[..size] {
            anyhow::bail!("echoed bytes differ from the bytes sent");
        }
        bytes += size as u64;
    }
    stream.shutdown(Shutdown::Write)?;
    let mut rest = Vec::new();
    stream.read_to_end(&mut rest)?;
    if !rest.is_empty() {
        anyhow::bail!("{} unexpected bytes after the last echo", rest.len());
    }
    Ok(ClientResult {
        requests: options.requests_per_connection as u64,
        bytes,
        latency,
    })
}
