//! Hardening: the real binary against hostile or broken peers and at scale, over real loopback
//! sockets. Each test states the behaviour it requires and the bound it checks; several describe
//! behaviour the proxy must have (write timeouts, sessions that cannot hoard the shard's receive
//! buffers, bytes before a reset, descriptors for the server side of what it accepts).
//!
//! These tests are heavy (up to 16,000 sockets, saturated socket buffers, 110,000 connections):
//! they run one at a time (`serial()`), so their descriptor budgets and timings do not add up.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// The `p`-th percentile (0..=1) of sorted samples, nearest rank.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Waits until `sample` has not changed for `still` (checked every 10 ms) and at least `min`
/// has passed, at most `max`; returns the last value.
fn wait_until_still(
    min: Duration,
    still: Duration,
    max: Duration,
    sample: impl Fn() -> u64,
) -> u64 {
    let begun = Instant::now();
    let mut last = sample();
    let mut changed = Instant::now();
    loop {
        thread::sleep(Duration::from_millis(10));
        let now = sample();
        if now != last {
            last = now;
            changed = Instant::now();
        }
        let elapsed = begun.elapsed();
        if (elapsed >= min && changed.elapsed() >= still) || elapsed >= max {
            return last;
        }
    }
}

/// The byte at offset `i` of the deterministic streams below.
fn pattern_byte(i: u64) -> u8 {
    i.wrapping_mul(7).wrapping_add(i / 251) as u8
}

fn fill_pattern(offset: u64, out: &mut [u8]) {
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = pattern_byte(offset + i as u64);
    }
}

/// The first offset at which `data` (starting at stream offset `offset`) breaks the pattern.
fn pattern_mismatch(offset: u64, data: &[u8]) -> Option<u64> {
    data.iter()
        .enumerate()
        .find(|&(i, &byte)| byte != pattern_byte(offset + i as u64))
        .map(|(i, _)| offset + i as u64)
}

// ---- 1. non-reading clients ------------------------------------------------------------------

const BIG_REPLY: u64 = 64 * MIB;
static ZEROES: [u8; 64 * 1024] = [0x5a; 64 * 1024];

/// Answers each line `BIG\n` with 64 MiB (as fast as the socket takes it, until the peer goes
/// away) and echoes any other line. One thread per connection with a 128 KiB stack; its send
/// buffer is kept at 64 KiB so 1,000 stalled replies do not push the host's TCP memory into
/// pressure (which would slow every socket, the honest ones included).
struct LineServer {
    addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    active: Arc<AtomicU64>,
    big_requests: Arc<AtomicU64>,
    big_bytes: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    accept_thread: Option<thread::JoinHandle<()>>,
}

impl LineServer {
    fn start() -> LineServer {
        let listener = listen_loopback(4096);
        let addr = listener.local_addr().expect("addr");
        let mut server = LineServer {
            addr,
            accepted: Arc::default(),
            active: Arc::default(),
            big_requests: Arc::default(),
            big_bytes: Arc::default(),
            stop: Arc::default(),
            accept_thread: None,
        };
        let (accepted, active, requests, bytes, stop) = (
            Arc::clone(&server.accepted),
            Arc::clone(&server.active),
            Arc::clone(&server.big_requests),
            Arc::clone(&server.big_bytes),
            Arc::clone(&server.stop),
        );
        let accept_thread = thread::spawn(move || {
            for stream in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                accepted.fetch_add(1, Ordering::SeqCst);
                active.fetch_add(1, Ordering::SeqCst);
                let (active, requests, bytes, stop) = (
                    Arc::clone(&active),
                    Arc::clone(&requests),
                    Arc::clone(&bytes),
                    Arc::clone(&stop),
                );
                thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn(move || {
                        serve_lines(stream, &requests, &bytes, &stop);
                        active.fetch_sub(1, Ordering::SeqCst);
                    })
                    .expect("spawn line connection");
            }
        });
        server.accept_thread = Some(accept_thread);
        server
    }
}

impl Drop for LineServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
        // Connection threads notice `stop` within 500 ms; wait so their sockets are gone
        // before the next test counts descriptors.
        wait_for(Duration::from_secs(5), || {
            self.active.load(Ordering::SeqCst) == 0
        });
    }
}

fn serve_lines(mut stream: TcpStream, requests: &AtomicU64, bytes: &AtomicU64, stop: &AtomicBool) {
    let _ = socket2::SockRef::from(&stream).set_send_buffer_size(64 * 1024);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let _ = stream.set_write_timeout(Some(Duration::from_millis(500)));
    let mut line = Vec::new();
    let mut buffer = [0u8; 4096];
    let retry = |error: &std::io::Error| {
        matches!(
            error.kind(),
            ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
        )
    };
    while !stop.load(Ordering::SeqCst) {
        let n = match stream.read(&mut buffer) {
            Ok(0) => return,
            Ok(n) => n,
            Err(error) if retry(&error) => continue,
            Err(_) => return,
        };
        line.extend_from_slice(&buffer[..n]);
        while let Some(end) = line.iter().position(|&byte| byte == b'\n') {
            let request: Vec<u8> = line.drain(..=end).collect();
            if request != b"BIG\n" {
                if stream.write_all(&request).is_err() {
                    return;
                }
                continue;
            }
            requests.fetch_add(1, Ordering::SeqCst);
            let mut sent = 0u64;
            while sent < BIG_REPLY {
                if stop.load(Ordering::SeqCst) {
                    return;
                }
                let len = (BIG_REPLY - sent).min(ZEROES.len() as u64) as usize;
                match stream.write(&ZEROES[..len]) {
                    Ok(0) => return,
                    Ok(n) => {
                        sent += n as u64;
                        bytes.fetch_add(n as u64, Ordering::SeqCst);
                    }
                    Err(error) if retry(&error) => {}
                    Err(_) => return,
                }
            }
        }
    }
}

/// 1,000 clients that ask for 64 MiB each and never read must not take the shard's receive
/// buffers (or its memory) from everybody else: honest clients on the same shard are still
/// answered promptly. Without a bound, each stalled session parks `queued_buffers` buffers of
/// the shard's ring (1,000 x 8 > the default 1,024) and every other receive starves.
#[test]
fn non_reading_clients_cannot_starve_a_shard() {
    const HOGS: u64 = 1000;
    const HONEST: u64 = 20;
    let _serial = serial();
    raise_nofile_limit();
    let server = LineServer::start();
    let proxy = Proxy::start(&config(1, "", &[common::server(server.addr)]));
    let addr = proxy.addr();
    let pid = proxy.pid();
    let started = Instant::now();
    let mut hogs = Vec::new();
    for index in 0..HOGS {
        // SO_RCVBUF 4 KiB, set before connecting so the window is small from the start.
        let mut stream =
            connect_from(addr, source_ip(index), Some(4096)).expect("non-reading client connect");
        stream.write_all(b"BIG\n").expect("BIG request");
        hogs.push(stream);
    }
    // The proxy connects each session on accept; the requests then travel as buffers allow.
    let reached = wait_for(Duration::from_secs(10), || {
        server.accepted.load(Ordering::SeqCst) >= HOGS
    });
    // Let the replies fill every buffer on the way: at least 1 s, then until the server's
    // writes have not advanced for 200 ms (at most 5 s).
    let replied = wait_until_still(
        Duration::from_secs(1),
        Duration::from_millis(200),
        Duration::from_secs(5),
        || server.big_bytes.load(Ordering::SeqCst),
    );
    let rss_filled = rss_bytes(pid);
    eprintln!(
        "{HOGS} non-reading clients in {:?} (all reached the server: {reached}); {} BIG requests \
         reached the server, which wrote {} MiB; proxy RSS {} MiB; host TCP memory {} MiB",
        started.elapsed(),
        server.big_requests.load(Ordering::SeqCst),
        replied / MIB,
        rss_filled / MIB,
        tcp_kernel_memory() / MIB,
    );

    let honest: Vec<_> = (0..HONEST)
        .map(|index| {
            thread::spawn(move || -> Result<Duration, String> {
                let begun = Instant::now();
                let mut stream = connect_from(addr, source_ip(HOGS + index), None)
                    .map_err(|error| format!("connect: {error}"))?;
                stream
                    .set_read_timeout(Some(Duration::from_secs(1)))
                    .map_err(|error| error.to_string())?;
                stream
                    .write_all(b"hello\n")
                    .map_err(|error| format!("write: {error}"))?;
                let mut answer = [0u8; 6];
                stream
                    .read_exact(&mut answer)
                    .map_err(|error| format!("no answer after {:?}: {error}", begun.elapsed()))?;
                if &answer != b"hello\n" {
                    return Err(format!("wrong answer {answer:?}"));
                }
                Ok(begun.elapsed())
            })
        })
        .collect();
    let results: Vec<Result<Duration, String>> = honest
        .into_iter()
        .map(|thread| thread.join().expect("honest client thread"))
        .collect();
    let mut latencies: Vec<Duration> = results
        .iter()
        .filter_map(|r| r.as_ref().ok().copied())
        .collect();
    latencies.sort_unstable();
    let failures: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    let rss = rss_bytes(pid).max(rss_filled);
    let mut proxy = proxy;
    proxy.signal(libc::SIGTERM);
    proxy.wait_exit(Duration::from_secs(10));
    wait_for(Duration::from_secs(2), || {
        proxy
            .logs()
            .iter()
            .any(|line| line["fields"]["message"] == "shard stopped")
    });
    for line in proxy.logs() {
        if line["fields"]["message"] == "shard stopped" {
            eprintln!("shard summary: {}", line["fields"]);
        }
    }
    eprintln!(
        "honest clients: {} of {HONEST} answered; p50 {:?}, p99 {:?}, max {:?}; proxy RSS {} MiB",
        latencies.len(),
        percentile(&latencies, 0.50),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        rss / MIB,
    );
    // Memory bound: the shard's buffer ring (16 MiB by default) plus, per session, at most
    // 2 directions x queued_buffers (8) x buffer_size (16 KiB) = 256 KiB of data held in user
    // space, plus 48 MiB for the binary, heap, stacks and slack.
    let rss_bound = 64 * MIB + HOGS * 256 * KIB;
    assert!(
        failures.is_empty(),
        "{} of {HONEST} honest clients were not answered within 1 s while {HOGS} clients did \
         not read (the shard's receive buffers are held by the stalled sessions); first: {:?}",
        failures.len(),
        failures.iter().take(3).collect::<Vec<_>>()
    );
    assert!(
        latencies
            .iter()
            .all(|&latency| latency <= Duration::from_secs(1)),
        "honest latencies {latencies:?}"
    );
    assert!(
        rss < rss_bound,
        "proxy RSS {rss} bytes exceeds the bound {rss_bound} (64 MiB + {HOGS} x 256 KiB)"
    );
    drop(hogs);
    drop(proxy);
}

// ---- 2. write timeout -----------------------------------------------------------------------

/// What the pattern server knows about one of its connections (in accept order).
#[derive(Default, Clone, Debug)]
struct StreamRecord {
    written: u64,
    /// When a write failed (the proxy closed or reset this server connection).
    failed_at: Option<Instant>,
    error: Option<String>,
}

/// On connect, streams `total` bytes of the deterministic pattern, then closes. One thread per
/// connection; records when a write fails.
struct PatternServer {
    addr: SocketAddr,
    records: Arc<Mutex<Vec<StreamRecord>>>,
    stop: Arc<AtomicBool>,
    accept_thread: Option<thread::JoinHandle<()>>,
}

impl PatternServer {
    fn start(total: u64) -> PatternServer {
        let listener = listen_loopback(64);
        let addr = listener.local_addr().expect("addr");
        let records: Arc<Mutex<Vec<StreamRecord>>> = Arc::default();
        let stop: Arc<AtomicBool> = Arc::default();
        let (all, stopping) = (Arc::clone(&records), Arc::clone(&stop));
        let accept_thread = thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(mut stream) = stream else { continue };
                let index = {
                    let mut records = all.lock().expect("records");
                    records.push(StreamRecord::default());
                    records.len() - 1
                };
                let (records, stop) = (Arc::clone(&all), Arc::clone(&stopping));
                thread::spawn(move || {
                    let _ = stream.set_write_timeout(Some(Duration::from_millis(200)));
                    let mut chunk = vec![0u8; 64 * 1024];
                    let mut written = 0u64;
                    while written < total && !stop.load(Ordering::SeqCst) {
                        let len = (total - written).min(chunk.len() as u64) as usize;
                        fill_pattern(written, &mut chunk[..len]);
                        match stream.write(&chunk[..len]) {
                            Ok(n) => {
                                written += n as u64;
                                records.lock().expect("records")[index].written = written;
                            }
                            Err(error)
                                if matches!(
                                    error.kind(),
                                    ErrorKind::WouldBlock | ErrorKind::TimedOut
                                ) => {}
                            Err(error) => {
                                let mut records = records.lock().expect("records");
                                records[index].failed_at = Some(Instant::now());
                                records[index].error = Some(error.to_string());
                                return;
                            }
                        }
                    }
                });
            }
        });
        PatternServer {
            addr,
            records,
            stop,
            accept_thread: Some(accept_thread),
        }
    }

    fn connections(&self) -> usize {
        self.records.lock().expect("records").len()
    }

    fn record(&self, index: usize) -> StreamRecord {
        self.records.lock().expect("records")[index].clone()
    }
}

impl Drop for PatternServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
    }
}

/// Polls the bytes queued in `stream`'s receive buffer every 10 ms until they have been
/// non-zero and unchanged for `still`; returns when they last changed and how many there were.
fn wait_for_stall(stream: &TcpStream, still: Duration, max: Duration) -> Option<(Instant, usize)> {
    let begun = Instant::now();
    let mut last = socket_inq(stream.as_raw_fd());
    let mut changed = Instant::now();
    while begun.elapsed() < max {
        thread::sleep(Duration::from_millis(10));
        let now = socket_inq(stream.as_raw_fd());
        if now != last {
            last = now;
            changed = Instant::now();
        } else if last > 0 && changed.elapsed() >= still {
            return Some((changed, last));
        }
    }
    None
}

/// `write_timeout = "2s"`: a session whose destination accepts no byte for 2 s ends, and one
/// whose destination is slow but keeps taking bytes does not.
///
/// How the cut is timed: client B (SO_RCVBUF 4 KiB) never reads. Its receive queue (SIOCINQ)
/// grows until its window closes; once it has not grown for 100 ms, B's side is stalled and the
/// proxy's sends toward B stop making progress (on loopback the proxy's socket fills within
/// milliseconds of B's window closing). The stall moment is when the queue last grew. The cut
/// is seen from the server: B's server connection has unread data in the proxy's socket, so
/// whatever way the proxy ends the session (FIN or RST) that socket is reset, and the server's
/// blocked write to B fails at once. Expected: 2 s after the stall, +-0.5 s for the timer tick
/// and buffer filling; the window asserted is 1.5 s ..= 2.5 s.
///
/// Client A takes 128 KiB every 500 ms. Its socket may not report writable to the proxy for
/// longer than 2 s at that pace (TCP wakes a writer only once a good part of a large send
/// buffer is free), so the timeout has to count any byte the destination accepts, not only
/// completed sends. A's receive buffer is fixed (SO_RCVBUF 128 KiB, 256 KiB in the kernel):
/// with an autotuned one of several MiB, the receiver's own silly-window avoidance keeps its
/// window shut until a sixteenth of the buffer is free, which at a slow pace can take longer
/// than 2 s; the proxy then truly sees no byte taken (CI once cut A that way).
///
/// Throughout (each second the shard publishes), the shard's free ring buffers (`/status`)
/// never drop by more than 2 x `queued_buffers`: only the server-to-client direction of each
/// session carries bytes, and a direction holds at most `queued_buffers`, so neither the slow
/// nor the stuck destination lets its session hoard buffers.
#[test]
fn write_timeout_cuts_a_stuck_reader_and_keeps_a_slow_one() {
    const STREAM: u64 = 32 * MIB;
    const SLOW_READS: u64 = 16;
    const SLOW_CHUNK: usize = 128 * 1024;
    let _serial = serial();
    let server = PatternServer::start(STREAM);
    const BUFFER_COUNT: u64 = 1024;
    const QUEUED_BUFFERS: u64 = 8;
    let text = format!(
        "{}\n[tuning]\nbuffer_count = {BUFFER_COUNT}\nqueued_buffers = {QUEUED_BUFFERS}\n\n\
         [admin]\nbind = \"127.0.0.1:0\"\n",
        config_with(
            1,
            "write_timeout = \"2s\"\nidle_timeout = \"60s\"",
            "",
            &[common::server(server.addr)],
        )
    );
    let proxy = Proxy::start(&text);
    let addr = proxy.addr();
    let admin = proxy.admin();
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = Arc::clone(&sampling);
        thread::spawn(move || {
            let mut fewest_free = u64::MAX;
            while sampling.load(Ordering::SeqCst) {
                let status = common::admin::status(admin);
                if let Some(free) = status["shards"][0]["buffers_free"].as_u64() {
                    fewest_free = fewest_free.min(free);
                }
                thread::sleep(Duration::from_millis(50));
            }
            fewest_free
        })
    };

    // A: reads 128 KiB every 500 ms for 8 s, checking every byte.
    let mut slow = connect_from(addr, source_ip(0), Some(128 * 1024)).expect("connect A");
    assert!(wait_for(Duration::from_secs(5), || server.connections() == 1));
    let reader = thread::spawn(move || {
        let mut buffer = vec![0u8; SLOW_CHUNK];
        let mut offset = 0u64;
        let begun = Instant::now();
        let _ = slow.set_read_timeout(Some(Duration::from_secs(3)));
        for round in 0..SLOW_READS {
            let due = begun + Duration::from_millis(500) * (round as u32 + 1);
            thread::sleep(due.saturating_duration_since(Instant::now()));
            if let Err(error) = slow.read_exact(&mut buffer) {
                return (
                    slow,
                    offset,
                    Some(format!("read {round} at offset {offset}: {error}")),
                );
            }
            if let Some(at) = pattern_mismatch(offset, &buffer) {
                return (slow, offset, Some(format!("byte {at} differs")));
            }
            offset += SLOW_CHUNK as u64;
        }
        (slow, offset, None)
    });

    // B: never reads.
    let connected = Instant::now();
    let mut stuck = connect_from(addr, source_ip(1), Some(4096)).expect("connect B");
    assert!(wait_for(Duration::from_secs(5), || server.connections() == 2));
    let (stalled_at, queued) =
        wait_for_stall(&stuck, Duration::from_millis(100), Duration::from_secs(10))
            .expect("B's receive queue never stopped growing");
    let cut = wait_for(Duration::from_secs(10), || {
        server.record(1).failed_at.is_some()
    });
    let record = server.record(1);
    let cut_after = record
        .failed_at
        .map(|at| at.saturating_duration_since(stalled_at));
    eprintln!(
        "B stalled {:?} after connecting with {queued} bytes queued; the server wrote {} KiB to \
         B; cut {cut_after:?} after the stall ({:?})",
        stalled_at.saturating_duration_since(connected),
        record.written / KIB,
        record.error,
    );
    assert!(cut, "B's session was not cut within 10 s of its stall");
    let cut_after = cut_after.expect("cut");
    assert!(
        (Duration::from_millis(1500)..=Duration::from_millis(2500)).contains(&cut_after),
        "B was cut {cut_after:?} after its stall; write_timeout is 2s"
    );
    // B itself sees the end: what was queued, then EOF or a reset, never the whole stream.
    stuck
        .set_read_timeout(Some(Duration::from_secs(3)))
        .expect("timeout");
    let mut buffer = vec![0u8; 64 * 1024];
    let mut read = 0u64;
    let end = loop {
        match stuck.read(&mut buffer) {
            Ok(0) => break Ok(()),
            Ok(n) => read += n as u64,
            Err(error) => break Err(error),
        }
    };
    eprintln!("B read {read} bytes after the cut, then {end:?}");
    assert!(
        matches!(&end, Ok(())) || matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "B did not see its session end: {end:?}"
    );
    assert!(read < STREAM, "B received the whole stream");

    let (mut slow, offset, error) = reader.join().expect("reader thread");
    assert_eq!(error, None, "slow reader A failed");
    assert_eq!(offset, SLOW_READS * SLOW_CHUNK as u64);
    // A is still connected: the stream goes on, in order.
    let mut more = vec![0u8; SLOW_CHUNK];
    slow.read_exact(&mut more)
        .expect("A is still connected after 8 s of slow reading");
    assert_eq!(pattern_mismatch(offset, &more), None, "A's bytes after 8 s");
    let record = server.record(0);
    assert!(
        record.failed_at.is_none(),
        "A's server connection was cut: {:?}",
        record.error
    );
    eprintln!(
        "A read {} KiB in order over 8 s and is still connected",
        (offset + SLOW_CHUNK as u64) / KIB
    );
    sampling.store(false, Ordering::SeqCst);
    let fewest_free = sampler.join().expect("sampler");
    let bound = 2 * QUEUED_BUFFERS;
    eprintln!("fewest free ring buffers: {fewest_free} of {BUFFER_COUNT}");
    assert!(
        fewest_free != u64::MAX && BUFFER_COUNT - fewest_free <= bound,
        "the two sessions held {} ring buffers at once; their bound is {bound}",
        BUFFER_COUNT.saturating_sub(fewest_free)
    );
}

// ---- 3. bytes, then the reset ---------------------------------------------------------------

/// A server that sends 1 MiB, waits until the proxy has acknowledged all of it (its send queue
/// is empty), then resets: the client must receive exactly that 1 MiB and then the reset. The
/// proxy holds part of the data when the reset arrives (the client reads only afterwards), so
/// passing the reset on at once would drop those bytes.
#[test]
fn server_reset_after_sending_delivers_the_bytes_then_the_reset() {
    const SIZE: usize = 1 << 20;
    let _serial = serial();
    let listener = listen_loopback(16);
    let server_addr = listener.local_addr().expect("addr");
    let (done_tx, done_rx) = mpsc::channel::<Result<Duration, String>>();
    thread::spawn(move || {
        let result = send_then_reset(&listener, SIZE);
        let _ = done_tx.send(result);
    });
    let proxy = Proxy::start(&config(1, "", &[server(server_addr)]));
    let mut client = connect(proxy.addr());
    let acked_after = done_rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the server thread reported")
        .expect("server");
    // Give the proxy a moment to see the reset before the client reads, so the bytes it holds
    // are the ones at stake (not a synchronisation: any order must deliver everything).
    thread::sleep(Duration::from_millis(200));
    client
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut received = Vec::with_capacity(SIZE);
    let mut buffer = vec![0u8; 64 * 1024];
    let end = loop {
        match client.read(&mut buffer) {
            Ok(0) => break Ok(()),
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(error) => break Err(error),
        }
        if received.len() > 2 * SIZE {
            break Ok(());
        }
    };
    eprintln!(
        "server's 1 MiB acknowledged {acked_after:?} after its last write; the client received \
         {} bytes, then {end:?}",
        received.len()
    );
    assert_eq!(
        received.len(),
        SIZE,
        "the client received {} of {SIZE} bytes before {end:?}",
        received.len()
    );
    assert_eq!(pattern_mismatch(0, &received), None, "bytes differ");
    match end {
        Err(error) => assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}"),
        Ok(()) => panic!("the client saw EOF instead of the server's reset"),
    }
}

fn send_then_reset(listener: &TcpListener, size: usize) -> Result<Duration, String> {
    listener
        .set_nonblocking(true)
        .map_err(|error| error.to_string())?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(error) if error.kind() == ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(5));
            }
            Err(error) => return Err(format!("accept: {error}")),
        }
    };
    stream
        .set_nonblocking(false)
        .map_err(|error| error.to_string())?;
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .map_err(|error| error.to_string())?;
    let mut data = vec![0u8; size];
    fill_pattern(0, &mut data);
    stream
        .write_all(&data)
        .map_err(|error| format!("write: {error}"))?;
    let written = Instant::now();
    while socket_outq(stream.as_raw_fd()) > 0 {
        if written.elapsed() > Duration::from_secs(10) {
            return Err(format!(
                "the proxy never acknowledged everything: {} bytes still queued",
                socket_outq(stream.as_raw_fd())
            ));
        }
        thread::sleep(Duration::from_millis(2));
    }
    let acked_after = written.elapsed();
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .map_err(|error| error.to_string())?;
    drop(stream);
    Ok(acked_after)
}

// ---- 4. no leak over 100,000 connections ------------------------------------------------------

/// One short connection: connect from a rotating source address, one byte echoed, close. Nine
/// in ten close with a reset (SO_LINGER 0), which leaves no TIME_WAIT on any of the connections
/// involved (the proxy passes the reset to its server side); one in ten closes gracefully
/// (FIN both ways) so the half-close path is counted too. Those leave TIME_WAIT on the client
/// (spread over 253 source addresses) and on the proxy's side of its server connection
/// (11,000 over the run, well inside the ~28,000 ephemeral ports of 127.0.0.1).
fn echo_once(addr: SocketAddr, index: u64) -> Result<(), String> {
    let graceful = index.is_multiple_of(10);
    let mut stream =
        connect_from(addr, source_ip(index), None).map_err(|error| format!("connect: {error}"))?;
    let byte = [index as u8];
    stream
        .write_all(&byte)
        .map_err(|error| format!("write: {error}"))?;
    let mut echoed = [0u8; 1];
    stream
        .read_exact(&mut echoed)
        .map_err(|error| format!("read: {error}"))?;
    if echoed != byte {
        return Err(format!("echoed {echoed:?}, sent {byte:?}"));
    }
    if graceful {
        stream
            .shutdown(Shutdown::Write)
            .map_err(|error| format!("shutdown: {error}"))?;
        match stream.read(&mut echoed) {
            Ok(0) => {}
            other => return Err(format!("expected EOF after our FIN, got {other:?}")),
        }
    } else {
        socket2::SockRef::from(&stream)
            .set_linger(Some(Duration::ZERO))
            .map_err(|error| format!("linger: {error}"))?;
    }
    Ok(())
}

/// Runs `count` `echo_once` connections on `threads` threads (indices from `first`), stopping
/// at `deadline`; returns (completed, failures, first failure messages).
fn run_echoes(
    addr: SocketAddr,
    first: u64,
    count: u64,
    threads: u64,
    deadline: Instant,
) -> (u64, u64, Vec<String>) {
    let workers: Vec<_> = (0..threads)
        .map(|thread_index| {
            thread::spawn(move || {
                let (mut done, mut failed, mut messages) = (0u64, 0u64, Vec::new());
                let mut index = first + thread_index;
                while index < first + count && Instant::now() < deadline {
                    match echo_once(addr, index) {
                        Ok(()) => done += 1,
                        Err(message) => {
                            failed += 1;
                            if messages.len() < 5 {
                                messages.push(format!("connection {index}: {message}"));
                            }
                        }
                    }
                    index += threads;
                }
                (done, failed, messages)
            })
        })
        .collect();
    workers
        .into_iter()
        .map(|worker| worker.join().expect("echo worker"))
        .fold(
            (0, 0, Vec::new()),
            |(d, f, mut m), (done, failed, messages)| {
                m.extend(messages);
                (d + done, f + failed, m)
            },
        )
}

/// 100,000 short connections leave nothing behind: the proxy's descriptors return to their
/// idle count within 10 s, and its RSS stays within 1 MiB of the value measured after a
/// 10,000-connection warm-up (which brings the session slab, the touched buffer pages and the
/// allocator to their working size). Anything kept per closed session shows up here.
#[test]
fn rss_and_descriptors_return_to_baseline_after_100k_connections() {
    const WARMUP: u64 = 10_000;
    const RUN: u64 = 100_000;
    const THREADS: u64 = 4;
    let _serial = serial();
    let echo = EventServer::start(EventMode::Echo);
    let proxy = Proxy::start(&config(2, "", &[server(echo.addr)]));
    let addr = proxy.addr();
    let pid = proxy.pid();
    let fds_idle = open_fds(pid);

    let begun = Instant::now();
    let (done, failed, messages) =
        run_echoes(addr, 0, WARMUP, THREADS, begun + Duration::from_secs(60));
    assert_eq!((done, failed), (WARMUP, 0), "warm-up: {messages:?}");
    assert!(
        wait_for(Duration::from_secs(10), || open_fds(pid) <= fds_idle),
        "after the warm-up the proxy holds {} descriptors, {fds_idle} when idle",
        open_fds(pid)
    );
    let rss_warm = rss_bytes(pid);
    eprintln!(
        "warm-up: {WARMUP} connections in {:?}; proxy {fds_idle} fds, RSS {} KiB",
        begun.elapsed(),
        rss_warm / KIB
    );

    let begun = Instant::now();
    let (done, failed, messages) =
        run_echoes(addr, WARMUP, RUN, THREADS, begun + Duration::from_secs(120));
    let elapsed = begun.elapsed();
    eprintln!(
        "{done} connections in {elapsed:?} ({:.0}/s), {failed} failed {messages:?}",
        done as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(failed, 0, "failures: {messages:?}");
    assert_eq!(done, RUN, "only {done} of {RUN} connections within 120 s");
    let settled = wait_for(Duration::from_secs(10), || open_fds(pid) <= fds_idle);
    let (fds, rss) = (open_fds(pid), rss_bytes(pid));
    eprintln!(
        "after {RUN} more: proxy {fds} fds (idle {fds_idle}), RSS {} KiB (warm {} KiB, {:+} KiB)",
        rss / KIB,
        rss_warm / KIB,
        (rss as i64 - rss_warm as i64) / KIB as i64
    );
    assert!(
        settled,
        "descriptors did not return to {fds_idle} within 10 s: {fds}"
    );
    assert!(
        rss <= rss_warm + MIB,
        "RSS grew from {rss_warm} to {rss} bytes over {RUN} connections"
    );
}

// ---- 5. SIGTERM with 8,000 idle sessions ------------------------------------------------------

/// `drain_timeout = "1s"`: SIGTERM with 8,000 idle sessions must cut them all and exit 0 within
/// 3 s of the signal; every client and every server connection sees its end within that time.
/// Descriptors: the test holds 8,000 client sockets and the server's 8,000 accepted ones
/// (16,000 of the 20,000 RLIMIT_NOFILE); the proxy, a separate process, holds 16,000 of its own.
#[test]
fn sigterm_cuts_8000_idle_sessions_within_3s() {
    const SESSIONS: u64 = 8_000;
    let _serial = serial();
    let limit = raise_nofile_limit();
    assert!(
        limit >= 2 * SESSIONS + 1_000,
        "RLIMIT_NOFILE {limit} cannot hold {SESSIONS} sessions"
    );
    let sink = EventServer::start(EventMode::Discard);
    let text = config(1, "", &[server(sink.addr)])
        .replace("drain_timeout = \"5s\"", "drain_timeout = \"1s\"");
    let mut proxy = Proxy::start(&text);
    let addr = proxy.addr();
    let begun = Instant::now();
    let mut clients = Vec::with_capacity(SESSIONS as usize);
    for index in 0..SESSIONS {
        let mut stream = connect_from(addr, source_ip(index), None).expect("connect");
        stream.write_all(b"x").expect("one byte");
        clients.push(stream);
    }
    // One byte from each client reached the server: every session is established end to end.
    let established = wait_for(Duration::from_secs(30), || {
        sink.accepted() == SESSIONS && sink.received() == SESSIONS
    });
    eprintln!(
        "{SESSIONS} clients in {:?}; server accepted {}, received {} bytes; proxy {} fds",
        begun.elapsed(),
        sink.accepted(),
        sink.received(),
        open_fds(proxy.pid())
    );
    assert!(established, "not every session reached the server");
    for client in &clients {
        client.set_nonblocking(true).expect("nonblocking");
    }

    let signalled = Instant::now();
    proxy.signal(libc::SIGTERM);
    let deadline = signalled + Duration::from_secs(3);
    let mut exited_after = None;
    let mut open: Vec<usize> = (0..clients.len()).collect();
    let mut clients_closed_after = None;
    let mut server_closed_after = None;
    while Instant::now() < deadline {
        if exited_after.is_none() && proxy.has_exited() {
            exited_after = Some(signalled.elapsed());
        }
        open.retain(|&i| peer_closed(&clients[i]) != Some(true));
        if open.is_empty() && clients_closed_after.is_none() {
            clients_closed_after = Some(signalled.elapsed());
        }
        if server_closed_after.is_none() && sink.closed() == SESSIONS {
            server_closed_after = Some(signalled.elapsed());
        }
        if exited_after.is_some() && clients_closed_after.is_some() && server_closed_after.is_some()
        {
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    eprintln!(
        "after SIGTERM: exit {exited_after:?} ({:?}); all clients closed {clients_closed_after:?} \
         ({} still open); server side all closed {server_closed_after:?} ({} of {SESSIONS})",
        proxy.exit_status(),
        open.len(),
        sink.closed()
    );
    if exited_after.is_none() {
        // For the report: when it does exit, and what it said while draining.
        let status = proxy.wait_exit(Duration::from_secs(10));
        let said: Vec<String> = proxy
            .logs()
            .iter()
            .filter(|line| line["level"] != "INFO" || line["fields"]["message"] != "listener ready")
            .map(|line| format!("{} {}", line["level"], line["fields"]))
            .collect();
        eprintln!(
            "the proxy exited {:?} after SIGTERM with {status:?}; its logs: {said:?}",
            status.map(|_| signalled.elapsed())
        );
    }
    let status = proxy.exit_status();
    assert!(
        exited_after.is_some(),
        "the proxy had not exited 3 s after SIGTERM (drain_timeout 1s)"
    );
    assert!(
        status.is_some_and(|status| status.success()),
        "exit status {status:?}"
    );
    assert!(
        open.is_empty(),
        "{} clients had not seen their session end 3 s after SIGTERM",
        open.len()
    );
    assert_eq!(
        sink.closed(),
        SESSIONS,
        "server connections still open 3 s after SIGTERM"
    );
}

// ---- 6. out of descriptors --------------------------------------------------------------------

/// Reads whatever is waiting on each of `clients` (nonblocking) into `got`; marks those that
/// ended. Returns how many now hold their full echo.
fn collect_echoes(
    clients: &[(TcpStream, [u8; 4])],
    got: &mut [Vec<u8>],
    ended: &mut [bool],
) -> usize {
    let mut buffer = [0u8; 64];
    for (i, (stream, _)) in clients.iter().enumerate() {
        if ended[i] {
            continue;
        }
        match (&*stream).read(&mut buffer) {
            Ok(0) => ended[i] = true,
            Ok(n) => got[i].extend_from_slice(&buffer[..n]),
            Err(error) if error.kind() == ErrorKind::WouldBlock => {}
            Err(_) => ended[i] = true,
        }
    }
    clients
        .iter()
        .zip(got.iter())
        .filter(|((_, id), got)| got.as_slice() == id)
        .count()
}

/// Under RLIMIT_NOFILE 64, 200 clients at once: the sessions that fit (two descriptors each)
/// must be served, the rest wait in the backlog or are closed, and once the clients are gone
/// new ones are served again. Accepting must leave room for the server side: a shard that
/// accepts clients until no descriptor is left cannot connect any of them.
/// (`out_of_descriptors_backs_off_without_spinning_and_recovers` in lifecycle.rs checks the
/// CPU use of the back-off.)
#[test]
fn fd_exhausted_shard_keeps_serving_what_fits_and_recovers() {
    const LIMIT: u64 = 64;
    const CLIENTS: u64 = 200;
    const MUST_FIT: usize = 20;
    let _serial = serial();
    let echo = EventServer::start(EventMode::Echo);
    let mut proxy = Proxy::start_with_nofile(&config(1, "", &[server(echo.addr)]), LIMIT);
    let addr = proxy.addr();
    let pid = proxy.pid();
    let fds_idle = open_fds(pid);
    let room = (LIMIT as usize).saturating_sub(fds_idle) / 2;
    eprintln!("proxy holds {fds_idle} descriptors when idle: room for {room} sessions");
    assert!(
        room >= MUST_FIT,
        "the proxy needs {fds_idle} descriptors idle"
    );

    let clients: Vec<(TcpStream, [u8; 4])> = (0..CLIENTS)
        .map(|index| {
            let mut stream = connect_from(addr, source_ip(index), None).expect("connect");
            let id = (index as u32).to_le_bytes();
            stream.write_all(&id).expect("write id");
            stream.set_nonblocking(true).expect("nonblocking");
            (stream, id)
        })
        .collect();
    let mut got = vec![Vec::new(); clients.len()];
    let mut ended = vec![false; clients.len()];
    let begun = Instant::now();
    let mut served = 0;
    while begun.elapsed() < Duration::from_secs(5) {
        served = collect_echoes(&clients, &mut got, &mut ended);
        if served >= MUST_FIT {
            break;
        }
        thread::sleep(Duration::from_millis(10));
    }
    let closed = ended.iter().filter(|&&ended| ended).count();
    eprintln!(
        "{CLIENTS} clients at once: {served} served within {:?}, {closed} closed by the proxy, {} \
         waiting; proxy {} fds",
        begun.elapsed(),
        CLIENTS as usize - served - closed,
        open_fds(pid)
    );
    assert!(
        served >= MUST_FIT,
        "only {served} of {CLIENTS} clients were served with room for {room} sessions \
         ({closed} were closed)"
    );
    // The served sessions are live at the same time: each echoes again.
    let mut live = 0;
    for ((stream, id), got) in clients.iter().zip(&got) {
        if got.as_slice() != id {
            continue;
        }
        let mut stream = stream.try_clone().expect("clone");
        stream.set_nonblocking(false).expect("blocking");
        stream
            .set_read_timeout(Some(Duration::from_secs(2)))
            .expect("timeout");
        let mut echoed = [0u8; 4];
        if stream.write_all(id).is_ok() && stream.read_exact(&mut echoed).is_ok() && &echoed == id {
            live += 1;
        }
    }
    assert!(live >= MUST_FIT, "only {live} served sessions still echo");
    drop(clients);
    let freed = wait_for(Duration::from_secs(10), || open_fds(pid) <= fds_idle);
    eprintln!(
        "after closing them: proxy {} fds (freed: {freed})",
        open_fds(pid)
    );

    // The clients still queued in the listen backlog when they closed are accepted and ended
    // by the proxy now; wait until that is over (idle descriptors for a whole second).
    let mut quiet_since = Instant::now();
    let settle = Instant::now();
    while settle.elapsed() < Duration::from_secs(15)
        && quiet_since.elapsed() < Duration::from_secs(1)
    {
        if open_fds(pid) > fds_idle {
            quiet_since = Instant::now();
        }
        thread::sleep(Duration::from_millis(20));
    }

    // Recovery: a new batch that fits is served in full.
    let begun = Instant::now();
    let batch: Vec<(TcpStream, [u8; 4])> = (0..MUST_FIT as u64)
        .map(|index| {
            let mut stream = connect_from(addr, source_ip(CLIENTS + index), None).expect("connect");
            let id = (1_000 + index as u32).to_le_bytes();
            stream.write_all(&id).expect("write id");
            stream.set_nonblocking(true).expect("nonblocking");
            (stream, id)
        })
        .collect();
    let mut got = vec![Vec::new(); batch.len()];
    let mut ended = vec![false; batch.len()];
    let recovered = wait_for(Duration::from_secs(5), || {
        collect_echoes(&batch, &mut got, &mut ended) == MUST_FIT
    });
    let served = collect_echoes(&batch, &mut got, &mut ended);
    eprintln!(
        "recovery: {served} of {MUST_FIT} served within {:?}",
        begun.elapsed()
    );
    assert!(!proxy.has_exited(), "the proxy exited");
    assert!(
        recovered,
        "after recovery only {served} of {MUST_FIT} new clients were served"
    );
}

// ---- 7. a server that resets everything -------------------------------------------------------

/// A pool whose only server resets every connection as soon as it accepts it, flooded with
/// ~5,000 connections a second for 3 s: every client sees its session end (reset or EOF), and
/// the shard keeps running: a second listener on the same shard, pointed at an echo server,
/// answers within 1 s throughout and afterwards.
#[test]
fn server_that_resets_every_connection_does_not_stop_the_shard() {
    const RATE: u64 = 5_000;
    const THREADS: u64 = 4;
    const FLOOD: Duration = Duration::from_secs(3);
    let _serial = serial();
    let resetter = EventServer::start(EventMode::Reset);
    let echo = EventServer::start(EventMode::Echo);
    let text = format!(
        "[runtime]\nshards = 1\ndrain_timeout = \"5s\"\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"resets\"\n\n\
         [[listener]]\nname = \"side\"\nbind = \"127.0.0.1:0\"\npool = \"echo\"\n\n\
         [[pool]]\nname = \"resets\"\nservers = [\n{}\n]\n\n\
         [[pool]]\nname = \"echo\"\nservers = [\n{}\n]\n",
        server(resetter.addr),
        server(echo.addr)
    );
    let mut proxy = Proxy::start(&text);
    let front = proxy.listeners["front"];
    let side = proxy.listeners["side"];

    let stop = Arc::new(AtomicBool::new(false));
    let watcher = {
        let stop = Arc::clone(&stop);
        thread::spawn(move || {
            let mut latencies = Vec::new();
            let mut failures = Vec::new();
            let mut round = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let begun = Instant::now();
                let result = (|| -> std::io::Result<()> {
                    let mut stream = connect_from(side, source_ip(round), None)?;
                    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
                    let message = round.to_le_bytes();
                    stream.write_all(&message)?;
                    let mut echoed = [0u8; 8];
                    stream.read_exact(&mut echoed)?;
                    if echoed != message {
                        return Err(std::io::Error::other("wrong echo"));
                    }
                    Ok(())
                })();
                match result {
                    Ok(()) => latencies.push(begun.elapsed()),
                    Err(error) => failures.push(format!("round {round}: {error}")),
                }
                round += 1;
                thread::sleep(Duration::from_millis(100));
            }
            (latencies, failures)
        })
    };

    let begun = Instant::now();
    let interval = Duration::from_secs_f64(THREADS as f64 / RATE as f64);
    let flooders: Vec<_> = (0..THREADS)
        .map(|thread_index| {
            thread::spawn(move || {
                // [reset, eof, timeout, connect error, data]
                let mut outcomes = [0u64; 5];
                let mut errors = Vec::new();
                let mut due = begun;
                let mut index = thread_index;
                let cap = RATE * FLOOD.as_secs() / THREADS;
                for _ in 0..cap {
                    if begun.elapsed() >= FLOOD {
                        break;
                    }
                    thread::sleep(due.saturating_duration_since(Instant::now()));
                    due += interval;
                    index += THREADS;
                    let mut stream = match connect_from(front, source_ip(index), None) {
                        Ok(stream) => stream,
                        // The proxy's reset can land before the connect call has returned.
                        Err(error) if error.kind() == ErrorKind::ConnectionReset => {
                            outcomes[0] += 1;
                            continue;
                        }
                        Err(error) => {
                            if errors.len() < 5 {
                                errors.push(error.to_string());
                            }
                            outcomes[3] += 1;
                            continue;
                        }
                    };
                    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
                    let mut buffer = [0u8; 16];
                    match stream.read(&mut buffer) {
                        Err(error) if error.kind() == ErrorKind::ConnectionReset => {
                            outcomes[0] += 1
                        }
                        Ok(0) => outcomes[1] += 1,
                        Err(error)
                            if matches!(
                                error.kind(),
                                ErrorKind::WouldBlock | ErrorKind::TimedOut
                            ) =>
                        {
                            outcomes[2] += 1
                        }
                        Err(_) => outcomes[0] += 1,
                        Ok(_) => outcomes[4] += 1,
                    }
                }
                (outcomes, errors)
            })
        })
        .collect();
    let mut outcomes = [0u64; 5];
    let mut connect_errors = Vec::new();
    for flooder in flooders {
        let (counts, errors) = flooder.join().expect("flooder");
        for (total, count) in outcomes.iter_mut().zip(counts) {
            *total += count;
        }
        connect_errors.extend(errors);
    }
    let elapsed = begun.elapsed();
    let total: u64 = outcomes.iter().sum();
    eprintln!(
        "{total} connections in {elapsed:?} ({:.0}/s): {} reset, {} EOF, {} timed out, {} \
         connect errors, {} with data; the server reset {}",
        total as f64 / elapsed.as_secs_f64(),
        outcomes[0],
        outcomes[1],
        outcomes[2],
        outcomes[3],
        outcomes[4],
        resetter.accepted()
    );
    // Afterwards: still running, the echo listener answers, the reset listener still ends
    // sessions promptly.
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::SeqCst);
    let (mut latencies, failures) = watcher.join().expect("watcher");
    latencies.sort_unstable();
    eprintln!(
        "side listener during and after the flood: {} answered, p99 {:?}, max {:?}, {} failed",
        latencies.len(),
        percentile(&latencies, 0.99),
        latencies.last().copied().unwrap_or_default(),
        failures.len()
    );
    assert!(
        !proxy.has_exited(),
        "the proxy exited: {:?}",
        proxy.exit_status()
    );
    assert!(failures.is_empty(), "side listener failed: {failures:?}");
    assert!(
        latencies
            .iter()
            .all(|&latency| latency < Duration::from_secs(1)),
        "side listener latencies {latencies:?}"
    );
    assert_eq!(outcomes[2], 0, "sessions not ended within 2 s");
    assert_eq!(
        outcomes[3], 0,
        "connects to the proxy failed: {connect_errors:?}"
    );
    // The flood must really run near its pace (the load generator, not the proxy, is what a
    // loaded box slows): 3,000 a second over the 3 s at least.
    let floor = RATE * FLOOD.as_secs() * 3 / 5;
    assert!(
        total >= floor,
        "only {total} connections in {elapsed:?}; at least {floor} expected"
    );
    let mut after = connect(side);
    after.write_all(b"after").expect("write");
    let mut echoed = [0u8; 5];
    after.read_exact(&mut echoed).expect("echo after the flood");
    assert_eq!(&echoed, b"after");
    let mut reset = connect(front);
    reset
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("timeout");
    let end = reset.read(&mut [0u8; 1]);
    assert!(
        matches!(&end, Ok(0)) || matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
        "the reset pool's session did not end promptly: {end:?}"
    );
    assert!(!proxy.has_exited(), "the proxy exited");
}

// ---- 8. a shard that dies ---------------------------------------------------------------------

/// A shard that fails, by an error out of its loop or by a panic, takes the proxy down: the
/// cause is logged, the process exits non-zero instead of running on with one core's listener
/// sockets still accepting, and every session's client sees its connection end, whichever
/// shard held it. The fault comes through the debug builds' `RINGPROXY_DEBUG_FAULT_FILE` hook
/// (release builds have none, so there the test is ignored, visibly).
#[test]
#[cfg_attr(
    not(debug_assertions),
    ignore = "the fault hook exists in debug builds only"
)]
fn a_failing_shard_stops_the_proxy_with_its_cause() {
    const SESSIONS: usize = 16;
    let _serial = serial();
    for (shard, fault, cause) in [
        (1, "error", "injected fault"),
        (0, "panic", "the shard panicked"),
    ] {
        let echo = TestServer::start(Behaviour::Echo);
        let dir = tempfile::tempdir().expect("temporary directory");
        let fault_file = dir.path().join("fault");
        let mut proxy = Proxy::launch(
            &config_with(2, "", "", &[server(echo.addr)]),
            Launch {
                env: vec![(
                    "RINGPROXY_DEBUG_FAULT_FILE".into(),
                    fault_file.display().to_string(),
                )],
                ..Launch::default()
            },
        );
        let addr = proxy.addr();
        let mut clients: Vec<TcpStream> = (0..SESSIONS)
            .map(|index| {
                let mut client =
                    connect_from(addr, source_ip(index as u64), None).expect("connect");
                client
                    .set_read_timeout(Some(Duration::from_secs(3)))
                    .expect("timeout");
                client.write_all(b"x").expect("write");
                let mut echoed = [0u8; 1];
                client
                    .read_exact(&mut echoed)
                    .expect("echo through the proxy");
                client
            })
            .collect();

        let failed_at = Instant::now();
        std::fs::write(&fault_file, format!("{shard} {fault}")).expect("write the fault");
        let status = proxy.wait_exit(Duration::from_secs(5));
        eprintln!(
            "shard {shard} {fault}: exit {status:?} after {:?}",
            failed_at.elapsed()
        );
        let status = status.unwrap_or_else(|| panic!("shard {shard} {fault}: still running"));
        assert_eq!(
            status.code(),
            Some(1),
            "shard {shard} {fault}: the proxy exited with {status}"
        );
        // The log reader may lag the exit by a moment.
        wait_for(Duration::from_secs(2), || {
            !proxy
                .logs_with("shard failed; stopping the proxy")
                .is_empty()
        });
        let failures = proxy.logs_with("shard failed; stopping the proxy");
        assert!(
            failures.iter().any(|line| {
                line["fields"]["shard"] == shard
                    && line["fields"]["error"]
                        .as_str()
                        .is_some_and(|error| error.contains(cause))
            }),
            "shard {shard} {fault}: no log of the failure and its cause: {failures:?}"
        );
        for (index, client) in clients.iter_mut().enumerate() {
            let end = client.read(&mut [0u8; 16]);
            assert!(
                matches!(&end, Ok(0))
                    || matches!(&end, Err(e) if e.kind() == ErrorKind::ConnectionReset),
                "shard {shard} {fault}: session {index} did not end: {end:?}"
            );
        }
        let refused = TcpStream::connect_timeout(&addr, Duration::from_secs(1));
        assert!(
            refused.is_err(),
            "shard {shard} {fault}: the listener still accepts after the proxy stopped"
        );
    }
}
