//! Shared harness for the integration tests: the real `ringproxy` binary on loopback, and small
//! deterministic test servers. No fixed ports: everything binds 127.0.0.1:0 and the proxy's
//! ports are read from its `listener ready` log lines.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_ringproxy");

/// Polls `condition` until it holds or `timeout` passes.
pub fn wait_for(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        thread::sleep(Duration::from_millis(10));
    }
    condition()
}

/// A running `ringproxy run` process; killed (by PID, through its handle) when dropped.
pub struct Proxy {
    child: Child,
    pub listeners: HashMap<String, SocketAddr>,
    logs: Arc<Mutex<Vec<serde_json::Value>>>,
    _dir: tempfile::TempDir,
    exit: Option<ExitStatus>,
}

impl Proxy {
    pub fn start(config: &str) -> Proxy {
        Self::try_start(config).unwrap_or_else(|error| panic!("proxy did not start: {error}"))
    }

    pub fn try_start(config: &str) -> Result<Proxy, String> {
        let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
        let path = dir.path().join("ringproxy.toml");
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        let mut child = Command::new(BIN)
            .args(["--log-format", "json", "run", "--config"])
            .arg(&path)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| e.to_string())?;
        let stderr = child.stderr.take().ok_or("no stderr")?;
        let logs = Arc::new(Mutex::new(Vec::new()));
        let sink = Arc::clone(&logs);
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                sink.lock().expect("log lock").push(value);
            }
        });
        let listener_count = config.matches("[[listener]]").count();
        let mut proxy = Proxy {
            child,
            listeners: HashMap::new(),
            logs,
            _dir: dir,
            exit: None,
        };
        let ready = wait_for(Duration::from_secs(10), || {
            proxy.ready_listeners().len() >= listener_count || proxy.has_exited()
        });
        proxy.listeners = proxy.ready_listeners();
        if !ready || proxy.listeners.len() < listener_count {
            return Err(format!("not ready; logs: {:?}", proxy.logs()));
        }
        Ok(proxy)
    }

    fn ready_listeners(&self) -> HashMap<String, SocketAddr> {
        self.logs()
            .iter()
            .filter(|line| line["fields"]["message"] == "listener ready")
            .filter_map(|line| {
                let name = line["fields"]["listener"].as_str()?.to_string();
                let addr = line["fields"]["addr"].as_str()?.parse().ok()?;
                Some((name, addr))
            })
            .collect()
    }

    /// The address of the listener named "front" (the usual single listener).
    pub fn addr(&self) -> SocketAddr {
        self.listeners["front"]
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn logs(&self) -> Vec<serde_json::Value> {
        self.logs.lock().expect("log lock").clone()
    }

    pub fn signal(&self, signal: i32) {
        // SAFETY: kill(2) on the PID of our own child process.
        let result = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(result, 0, "kill failed");
    }

    pub fn has_exited(&mut self) -> bool {
        if self.exit.is_none() {
            self.exit = self.child.try_wait().ok().flatten();
        }
        self.exit.is_some()
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        wait_for(timeout, || self.has_exited());
        self.exit
    }

    /// Sends SIGTERM and waits for exit; returns the per-shard `accepted` counts it logged.
    pub fn stop_and_count_accepts(&mut self) -> Vec<u64> {
        self.signal(libc::SIGTERM);
        let status = self.wait_exit(Duration::from_secs(10)).expect("exited");
        assert!(status.success(), "exit status {status:?}");
        // The log reader may lag the exit by a moment.
        wait_for(Duration::from_secs(2), || {
            self.logs()
                .iter()
                .any(|line| line["fields"]["message"] == "stopped")
        });
        let mut by_shard: Vec<(u64, u64)> = self
            .logs()
            .iter()
            .filter(|line| line["fields"]["message"] == "shard stopped")
            .filter_map(|line| {
                Some((
                    line["fields"]["shard"].as_u64()?,
                    line["fields"]["accepted"].as_u64()?,
                ))
            })
            .collect();
        by_shard.sort_unstable();
        by_shard.into_iter().map(|(_, accepted)| accepted).collect()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if !self.has_exited() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A config with one listener "front" on an ephemeral port and one pool "app".
pub fn config(shards: u32, pool_extra: &str, servers: &[String]) -> String {
    format!(
        "[runtime]\nshards = {shards}\ndrain_timeout = \"5s\"\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\n\
         [[pool]]\nname = \"app\"\n{pool_extra}\nservers = [\n{}\n]\n",
        servers.join(",\n")
    )
}

pub fn server(addr: SocketAddr) -> String {
    format!("  {{ addr = \"{addr}\" }}")
}

/// What a test server does with each accepted connection.
#[derive(Clone, Copy)]
pub enum Behaviour {
    /// Echo every byte back; FIN after the client's FIN.
    Echo,
    /// Write `tag` and a newline, then echo.
    Tagged(u8),
    /// Read until the client's FIN, then answer with the byte count and close.
    CountUntilFin,
    /// Write a greeting, half-close, then count what the client sends until its FIN.
    GreetThenCount,
    /// Read a little, then reset the connection.
    ResetAfterRead,
    /// Accept and never read nor write, until the server is dropped.
    Silent,
}

/// A test server on an ephemeral loopback port. Stops accepting (and frees its port) on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    /// Bytes counted by `CountUntilFin` / `GreetThenCount` connections.
    pub counted: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    accept_thread: Option<thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(behaviour: Behaviour) -> TestServer {
        let listener = listen_loopback(4096);
        let addr = listener.local_addr().expect("local addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let counted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (accepts, counts, stopping) = (
            Arc::clone(&accepted),
            Arc::clone(&counted),
            Arc::clone(&stop),
        );
        let accept_thread = thread::spawn(move || {
            for stream in listener.incoming() {
                if stopping.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(stream) = stream else { continue };
                accepts.fetch_add(1, Ordering::SeqCst);
                let counts = Arc::clone(&counts);
                let stopping = Arc::clone(&stopping);
                thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn(move || serve(stream, behaviour, &counts, &stopping))
                    .expect("spawn connection thread");
            }
        });
        TestServer {
            addr,
            accepted,
            counted,
            stop,
            accept_thread: Some(accept_thread),
        }
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(thread) = self.accept_thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    mut stream: TcpStream,
    behaviour: Behaviour,
    counts: &Mutex<Vec<u64>>,
    stopping: &AtomicBool,
) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(60)));
    let mut buffer = vec![0u8; 64 * 1024];
    let mut count_until_fin = |stream: &mut TcpStream| {
        let mut total = 0u64;
        loop {
            match stream.read(&mut buffer) {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n as u64,
            }
        }
        counts.lock().expect("counts lock").push(total);
        total
    };
    match behaviour {
        Behaviour::Echo | Behaviour::Tagged(_) => {
            if let Behaviour::Tagged(tag) = behaviour
                && stream.write_all(&[tag, b'\n']).is_err()
            {
                return;
            }
            ringproxy::demo::echo(stream);
        }
        Behaviour::CountUntilFin => {
            let total = count_until_fin(&mut stream);
            let _ = stream.write_all(format!("{total}\n").as_bytes());
        }
        Behaviour::GreetThenCount => {
            if stream.write_all(b"hello\n").is_err() {
                return;
            }
            let _ = stream.shutdown(Shutdown::Write);
            count_until_fin(&mut stream);
        }
        Behaviour::ResetAfterRead => {
            let mut first = [0u8; 1];
            let _ = stream.read(&mut first);
            let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
            drop(stream);
        }
        Behaviour::Silent => {
            // Hold the connection, never reading, until the server is dropped (30 s at most).
            let started = Instant::now();
            while !stopping.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(30) {
                thread::sleep(Duration::from_millis(20));
            }
            drop(stream);
        }
    }
}

/// A loopback listener on an ephemeral port with a deep accept queue (std's is only 128).
pub fn listen_loopback(backlog: i32) -> TcpListener {
    let socket =
        socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).expect("socket");
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    socket.bind(&any.into()).expect("bind");
    socket.listen(backlog).expect("listen");
    socket.into()
}

/// A port on which connects are refused: bound, never listening, held until dropped.
pub struct RefusedPort {
    pub addr: SocketAddr,
    _socket: socket2::Socket,
}

impl RefusedPort {
    pub fn new() -> RefusedPort {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        socket.bind(&any.into()).expect("bind");
        let addr = socket
            .local_addr()
            .expect("local addr")
            .as_socket()
            .expect("inet");
        RefusedPort {
            addr,
            _socket: socket,
        }
    }
}

/// A listener whose accept queue is full, so further SYNs are dropped and connects hang
/// (a server that does not answer).
pub struct BlackHole {
    pub addr: SocketAddr,
    _listener: socket2::Socket,
    _fillers: Vec<TcpStream>,
}

impl BlackHole {
    pub fn new() -> BlackHole {
        let listener = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        listener.bind(&any.into()).expect("bind");
        listener.listen(0).expect("listen");
        let addr = listener
            .local_addr()
            .expect("local addr")
            .as_socket()
            .expect("inet");
        let mut fillers = Vec::new();
        // Fill the accept queue (its size is backlog + 1) until a connect no longer completes.
        for _ in 0..8 {
            match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                Ok(stream) => fillers.push(stream),
                Err(_) => break,
            }
        }
        BlackHole {
            addr,
            _listener: listener,
            _fillers: fillers,
        }
    }
}

/// Connects to the proxy with read/write timeouts so no test can hang.
pub fn connect(addr: SocketAddr) -> TcpStream {
    let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
        .set_write_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    stream
}

/// Reads the one-byte tag line a `Tagged` server sends first.
pub fn read_tag(stream: &mut TcpStream) -> Option<u8> {
    let mut line = [0u8; 2];
    stream.read_exact(&mut line).ok()?;
    (line[1] == b'\n').then_some(line[0])
}
