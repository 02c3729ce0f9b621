//! Relay behaviour over real loopback sockets through the real binary.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::thread;
use std::time::{Duration, Instant};

use common::*;
use ringproxy::demo::Payload;

/// Payload sizes from 1 B to 8 MiB, spread evenly on a log scale.
fn payload_size(index: u64, random: &mut Payload) -> usize {
    match index {
        0 => 1,
        1 => 8 << 20,
        _ => {
            let exponent = (random.next_u64() % 2301) as f64 / 100.0; // 2^0 .. 2^23
            (2f64.powf(exponent) as usize).clamp(1, 8 << 20)
        }
    }
}

#[test]
fn random_payloads_relay_byte_exact_both_ways_over_1000_connections() {
    random_payloads_over_1000_connections("");
}

/// The same with one single-shot receive per buffer, as kernels before 6.17 run it.
#[test]
fn random_payloads_relay_byte_exact_with_single_shot_receives() {
    random_payloads_over_1000_connections("[tuning]\nreceives = \"single_shot\"\n");
}

fn random_payloads_over_1000_connections(tuning: &str) {
    // The 1,000-connection runs and the timing-sensitive reset checks do not overlap.
    let _serial = serial();
    let echo = TestServer::start(Behaviour::Echo);
    let text = format!("{tuning}{}", config(2, "", &[server(echo.addr)]));
    let mut proxy = Proxy::start(&text);
    let addr = proxy.addr();
    let started = Instant::now();
    let clients: Vec<_> = (0..1000u64)
        .map(|index| {
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || {
                    let mut random = Payload::new(index + 77);
                    let size = payload_size(index, &mut random);
                    let mut payload = vec![0u8; size];
                    random.fill(&mut payload);
                    let mut stream = connect(addr);
                    stream
                        .set_read_timeout(Some(Duration::from_secs(60)))
                        .expect("timeout");
                    let mut writer = stream.try_clone().expect("clone");
                    let sent = payload.clone();
                    let write = thread::Builder::new()
                        .stack_size(128 * 1024)
                        .spawn(move || {
                            writer.write_all(&sent).expect("write");
                            writer.shutdown(Shutdown::Write).expect("shutdown");
                        })
                        .expect("spawn writer");
                    let mut received = Vec::with_capacity(size);
                    stream.read_to_end(&mut received).expect("read echo");
                    write.join().expect("writer");
                    assert_eq!(received.len(), size, "connection {index}: length");
                    assert!(received == payload, "connection {index}: bytes differ");
                    size as u64
                })
                .expect("spawn client")
        })
        .collect();
    let mut total = 0;
    for client in clients {
        total += client.join().expect("client thread");
    }
    eprintln!("{total} bytes each way in {:?}", started.elapsed());
    assert!(total > 8 << 20, "total {total}");
    assert_eq!(echo.accepted(), 1000);
    let accepted = proxy.stop_and_count_accepts();
    assert_eq!(accepted.iter().sum::<u64>(), 1000);
}

#[test]
fn half_close_from_client_keeps_reverse_direction() {
    let counter = TestServer::start(Behaviour::CountUntilFin);
    let proxy = Proxy::start(&config(1, "", &[server(counter.addr)]));
    let mut stream = connect(proxy.addr());
    let payload = vec![7u8; 300_000];
    stream.write_all(&payload).expect("write");
    stream.shutdown(Shutdown::Write).expect("half-close");
    let mut answer = String::new();
    stream
        .read_to_string(&mut answer)
        .expect("answer after our FIN");
    assert_eq!(answer, "300000\n");
}

#[test]
fn half_close_from_server_keeps_forward_direction() {
    let greeter = TestServer::start(Behaviour::GreetThenCount);
    let proxy = Proxy::start(&config(1, "", &[server(greeter.addr)]));
    let mut stream = connect(proxy.addr());
    let mut greeting = Vec::new();
    // The server's FIN arrives as end of stream while our direction stays open.
    stream
        .read_to_end(&mut greeting)
        .expect("greeting then FIN");
    assert_eq!(greeting, b"hello\n");
    let payload = vec![3u8; 1_000_000];
    stream.write_all(&payload).expect("write after server FIN");
    stream.shutdown(Shutdown::Write).expect("half-close");
    assert!(
        wait_for(Duration::from_secs(5), || {
            greeter.counted.lock().expect("lock").first() == Some(&1_000_000)
        }),
        "server counted {:?}",
        greeter.counted.lock().expect("lock")
    );
}

#[test]
fn server_reset_reaches_client_promptly() {
    // The 1,000-connection runs and the timing-sensitive reset checks do not overlap.
    let _serial = serial();
    let resetter = TestServer::start(Behaviour::ResetAfterRead);
    let proxy = Proxy::start(&config(1, "", &[server(resetter.addr)]));
    let mut stream = connect(proxy.addr());
    stream.write_all(b"x").expect("write");
    let started = Instant::now();
    let mut buffer = [0u8; 16];
    let result = stream.read(&mut buffer);
    let elapsed = started.elapsed();
    match result {
        Err(error) => assert_eq!(error.kind(), ErrorKind::ConnectionReset, "{error}"),
        Ok(n) => panic!("expected a reset, read {n} bytes"),
    }
    assert!(elapsed < Duration::from_secs(1), "reset took {elapsed:?}");
}

#[test]
fn client_reset_reaches_server() {
    // The 1,000-connection runs and the timing-sensitive reset checks do not overlap.
    let _serial = serial();
    let counter = TestServer::start(Behaviour::CountUntilFin);
    let proxy = Proxy::start(&config(1, "", &[server(counter.addr)]));
    let mut stream = connect(proxy.addr());
    stream.write_all(b"abc").expect("write");
    assert!(wait_for(Duration::from_secs(5), || counter.accepted() == 1));
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .expect("linger");
    drop(stream);
    // The server's read loop ends (by the reset) and records what it had.
    assert!(
        wait_for(Duration::from_secs(5), || counter
            .counted
            .lock()
            .expect("lock")
            .len()
            == 1),
        "the server never saw the client go away"
    );
}

#[test]
fn idle_timeout_closes_quiet_sessions_only() {
    let echo = TestServer::start(Behaviour::Echo);
    let mut text = config(1, "", &[server(echo.addr)]);
    text = text.replace(
        "pool = \"app\"\n\n[[pool]]",
        "pool = \"app\"\nidle_timeout = \"400ms\"\n\n[[pool]]",
    );
    let proxy = Proxy::start(&text);
    let mut idle = connect(proxy.addr());
    let mut busy = connect(proxy.addr());
    let started = Instant::now();
    // Keep one session busy past the idle timeout.
    while started.elapsed() < Duration::from_millis(900) {
        busy.write_all(b"ping").expect("busy write");
        let mut echo = [0u8; 4];
        busy.read_exact(&mut echo).expect("busy echo");
        thread::sleep(Duration::from_millis(50));
    }
    let mut buffer = [0u8; 1];
    assert_eq!(
        idle.read(&mut buffer).expect("idle session ends with FIN"),
        0
    );
    assert!(started.elapsed() < Duration::from_secs(3));
    busy.write_all(b"pong").expect("busy still open");
    let mut echo = [0u8; 4];
    busy.read_exact(&mut echo).expect("busy session survived");
    assert_eq!(&echo, b"pong");
}

#[test]
fn slow_server_stops_client_reads_and_memory_stays_bounded() {
    slow_server_pushes_back("auto");
}

#[test]
fn slow_server_pushes_back_with_single_shot_receives() {
    slow_server_pushes_back("single_shot");
}

fn slow_server_pushes_back(receives: &str) {
    let silent = TestServer::start(Behaviour::Silent);
    // A 128 MiB buffer ring: without backpressure the proxy would soak up well over 100 MB of
    // the client's bytes before running out of buffers.
    let text = format!(
        "[tuning]\nbuffer_count = 8192\nbuffer_size = 16384\nqueued_buffers = 8\n\
         receives = \"{receives}\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n{}",
        config(1, "", &[server(silent.addr)])
    );
    let proxy = Proxy::start(&text);
    let admin = proxy.admin();
    // The mode in force is the one asked for (or the only one this kernel has).
    let expected = if receives == "single_shot" || !kernel_at_least(6, 17) {
        "single-shot"
    } else {
        "capped multishot"
    };
    let mode = proxy.logs_with("receive mode");
    assert_eq!(mode.len(), 1, "one receive mode line: {mode:?}");
    assert_eq!(mode[0]["fields"]["receives"], expected);
    let rss_before = rss_bytes(proxy.pid());
    let mut stream = connect(proxy.addr());
    stream
        .set_write_timeout(Some(Duration::from_millis(500)))
        .expect("timeout");
    let chunk = vec![9u8; 256 * 1024];
    let mut written = 0u64;
    let blocked = loop {
        match stream.write(&chunk) {
            Ok(n) => written += n as u64,
            Err(error) if matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                break true;
            }
            Err(error) => panic!("write failed: {error}"),
        }
        if written > 512 << 20 {
            break false;
        }
    };
    assert!(
        blocked,
        "the client was never pushed back ({written} bytes accepted)"
    );
    let growth = rss_bytes(proxy.pid()).saturating_sub(rss_before);
    eprintln!("client blocked after {written} bytes; proxy RSS grew {growth} bytes");
    // Before the client is pushed back its bytes fill the kernel's socket buffers on the way:
    // the client's send buffer (up to tcp_wmem's 4 MiB), the proxy's receive buffer, the
    // proxy's send buffer to the server and the silent server's receive buffer. On loopback
    // that is several MB (about 9 MB measured on the 2-core dev VM); 16 MiB leaves margin, and
    // a proxy without backpressure would take in its whole 128 MiB ring and more.
    assert!(
        written < 16 << 20,
        "{written} bytes accepted before the client was pushed back"
    );
    // The proxy holds at most 2 x queued_buffers x buffer_size of user-space data per session
    // (2 x 8 x 16 KiB = 256 KiB here); the rest waits in socket buffers and TCP windows. 4 MiB
    // leaves room for allocator and page granularity, but not for buffers touched beyond that
    // bound.
    assert!(
        growth < 4 << 20,
        "proxy RSS grew by {growth} bytes for one session (bound: 256 KiB of held data)"
    );
    // Exactly: only the client-to-server direction carries bytes, and a direction holds at
    // most queued_buffers of the shard's ring buffers. Shards publish once a second: read a
    // copy made after the client was pushed back.
    thread::sleep(Duration::from_millis(1200));
    let free = common::admin::status(admin)["shards"][0]["buffers_free"]
        .as_u64()
        .expect("buffers_free in /status");
    eprintln!(
        "ring buffers held with the client pushed back: {}",
        8192 - free
    );
    assert!(
        (1..=8).contains(&(8192 - free)),
        "one session holds {} ring buffers with its server silent; the bound of its one busy \
         direction is queued_buffers = 8 (and it must hold some)",
        8192 - free
    );
}

#[test]
fn relays_over_ipv6_loopback() {
    let Ok(server) = std::net::TcpListener::bind("[::1]:0") else {
        // CI must exercise IPv6: a CI host without ::1 is a broken host, not a pass.
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "no IPv6 loopback (::1) on this CI host: relays_over_ipv6_loopback cannot run"
        );
        eprintln!("SKIPPED relays_over_ipv6_loopback: no IPv6 loopback (::1) on this host");
        return;
    };
    let server_addr = server.local_addr().expect("addr");
    thread::spawn(move || {
        if let Ok((stream, _)) = server.accept() {
            ringproxy::demo::echo(stream);
        }
    });
    let text = config(2, "", &[format!("  {{ addr = \"{server_addr}\" }}")])
        .replace("bind = \"127.0.0.1:0\"", "bind = \"[::1]:0\"");
    let proxy = Proxy::start(&text);
    assert!(proxy.addr().is_ipv6(), "{:?}", proxy.addr());
    let mut stream = connect(proxy.addr());
    stream.write_all(b"over v6").expect("write");
    stream.shutdown(Shutdown::Write).expect("fin");
    let mut echoed = Vec::new();
    stream.read_to_end(&mut echoed).expect("echo");
    assert_eq!(echoed, b"over v6");
}

/// Whether the running kernel is at least `major.minor`.
fn kernel_at_least(major: u32, minor: u32) -> bool {
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    ringproxy::uring::kernel_version(release.trim()) >= (major, minor)
}
