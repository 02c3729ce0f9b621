//! Shared harness for the integration tests: the real `ringproxy` binary on loopback, and small
//! deterministic test servers. No fixed ports: everything binds 127.0.0.1:0 and the proxy's
//! ports are read from its `listener ready` log lines.
#![allow(dead_code)]

use std::collections::HashMap;
use std::io::{self, BufRead, BufReader, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

pub mod admin;
pub mod pki;

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
    _dir: Option<tempfile::TempDir>,
    config_path: std::path::PathBuf,
    exit: Option<ExitStatus>,
}

/// How to start a proxy beyond its config text.
#[derive(Default, Clone)]
pub struct Launch {
    /// RLIMIT_NOFILE (soft and hard) in the child only.
    pub nofile: Option<u64>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Use (and overwrite) this config file instead of one in a fresh temporary directory, so
    /// a second proxy can start on the same file, and reloads can rewrite it.
    pub config_path: Option<std::path::PathBuf>,
}

impl Proxy {
    pub fn start(config: &str) -> Proxy {
        Self::try_start(config).unwrap_or_else(|error| panic!("proxy did not start: {error}"))
    }

    /// Starts the proxy with RLIMIT_NOFILE (soft and hard) set to `limit` in the child only.
    pub fn start_with_nofile(config: &str, limit: u64) -> Proxy {
        Self::try_start_with(config, Some(limit))
            .unwrap_or_else(|error| panic!("proxy did not start: {error}"))
    }

    pub fn try_start(config: &str) -> Result<Proxy, String> {
        Self::try_start_with(config, None)
    }

    pub fn launch(config: &str, launch: Launch) -> Proxy {
        Self::try_launch(config, launch)
            .unwrap_or_else(|error| panic!("proxy did not start: {error}"))
    }

    fn try_start_with(config: &str, nofile: Option<u64>) -> Result<Proxy, String> {
        Self::try_launch(
            config,
            Launch {
                nofile,
                ..Launch::default()
            },
        )
    }

    pub fn try_launch(config: &str, launch: Launch) -> Result<Proxy, String> {
        let nofile = launch.nofile;
        let (dir, path) = match &launch.config_path {
            Some(path) => (None, path.clone()),
            None => {
                let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                let path = dir.path().join("ringproxy.toml");
                (Some(dir), path)
            }
        };
        std::fs::write(&path, config).map_err(|e| e.to_string())?;
        let mut command = Command::new(BIN);
        command
            .args(["--log-format", "json", "run", "--config"])
            .arg(&path)
            .env(
                "RUST_LOG",
                std::env::var("TEST_PROXY_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for (key, value) in &launch.env {
            command.env(key, value);
        }
        if let Some(limit) = nofile {
            // SAFETY: the closure runs in the forked child before exec and calls only
            // setrlimit, which is async-signal-safe; lowering a limit is always allowed.
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit {
                        rlim_cur: limit,
                        rlim_max: limit,
                    };
                    if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        let mut child = command.spawn().map_err(|e| e.to_string())?;
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
            config_path: path,
            exit: None,
        };
        let ready = wait_for(Duration::from_secs(10), || {
            proxy.ready_listeners().len() >= listener_count || proxy.has_exited()
        });
        proxy.listeners = proxy.ready_listeners();
        if !ready || proxy.listeners.len() < listener_count {
            if proxy.has_exited() {
                // The log reader may lag the exit by a moment; the last line says why.
                wait_for(Duration::from_secs(1), || !proxy.logs().is_empty());
            }
            return Err(format!(
                "not ready (exit status {:?}); logs: {:?}",
                proxy.exit,
                proxy.logs()
            ));
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

    /// The admin API's address (from its `admin API ready` log line).
    pub fn admin(&self) -> SocketAddr {
        wait_for(Duration::from_secs(5), || self.admin_addr().is_some());
        self.admin_addr().expect("the admin API is up")
    }

    fn admin_addr(&self) -> Option<SocketAddr> {
        self.logs()
            .iter()
            .find(|line| line["fields"]["message"] == "admin API ready")
            .and_then(|line| line["fields"]["addr"].as_str()?.parse().ok())
    }

    pub fn config_path(&self) -> &std::path::Path {
        &self.config_path
    }

    /// Rewrites the config file (for a reload).
    pub fn rewrite_config(&self, text: &str) {
        std::fs::write(&self.config_path, text).expect("rewrite the config");
    }

    /// Log lines with this message.
    pub fn logs_with(&self, message: &str) -> Vec<serde_json::Value> {
        self.logs()
            .into_iter()
            .filter(|line| line["fields"]["message"] == message)
            .collect()
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

    /// The exit status, once the process has exited.
    pub fn exit_status(&mut self) -> Option<ExitStatus> {
        self.has_exited();
        self.exit
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
    config_with(shards, "", pool_extra, servers)
}

/// As `config`, with extra lines (`key = value`, newline separated) in the listener's table.
pub fn config_with(
    shards: u32,
    listener_extra: &str,
    pool_extra: &str,
    servers: &[String],
) -> String {
    let listener_extra = if listener_extra.is_empty() {
        String::new()
    } else {
        format!("{}\n", listener_extra.trim_end())
    };
    format!(
        "[runtime]\nshards = {shards}\ndrain_timeout = \"5s\"\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\
         {listener_extra}\n\
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
    /// Read once, answer with these bytes, then wait for the client to close (a health-check
    /// target: `pong`, an HTTP status line).
    Reply(&'static [u8]),
}

/// A test server on an ephemeral loopback port. Stops accepting (and frees its port) on drop.
pub struct TestServer {
    pub addr: SocketAddr,
    pub accepted: Arc<AtomicU64>,
    /// Connections accepted whose handler has not returned yet (the peer is still there).
    pub active: Arc<AtomicU64>,
    /// Bytes counted by `CountUntilFin` / `GreetThenCount` connections.
    pub counted: Arc<Mutex<Vec<u64>>>,
    stop: Arc<AtomicBool>,
    accept_thread: Option<thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn start(behaviour: Behaviour) -> TestServer {
        Self::serve(listen_loopback(4096), behaviour)
    }

    /// On a given address (SO_REUSEADDR, so a server can come back on the port it had).
    pub fn start_at(addr: SocketAddr, behaviour: Behaviour) -> TestServer {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)
            .expect("socket");
        socket.set_reuse_address(true).expect("reuseaddr");
        socket
            .bind(&addr.into())
            .expect("bind the server's address again");
        socket.listen(4096).expect("listen");
        Self::serve(socket.into(), behaviour)
    }

    fn serve(listener: TcpListener, behaviour: Behaviour) -> TestServer {
        let addr = listener.local_addr().expect("local addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let active = Arc::new(AtomicU64::new(0));
        let counted = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (accepts, actives, counts, stopping) = (
            Arc::clone(&accepted),
            Arc::clone(&active),
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
                actives.fetch_add(1, Ordering::SeqCst);
                let counts = Arc::clone(&counts);
                let actives = Arc::clone(&actives);
                let stopping = Arc::clone(&stopping);
                thread::Builder::new()
                    .stack_size(128 * 1024)
                    .spawn(move || {
                        serve(stream, behaviour, &counts, &stopping);
                        actives.fetch_sub(1, Ordering::SeqCst);
                    })
                    .expect("spawn connection thread");
            }
        });
        TestServer {
            addr,
            accepted,
            active,
            counted,
            stop,
            accept_thread: Some(accept_thread),
        }
    }

    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    pub fn active(&self) -> u64 {
        self.active.load(Ordering::SeqCst)
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
        Behaviour::Reply(answer) => {
            let mut request = [0u8; 4096];
            if matches!(stream.read(&mut request), Ok(n) if n > 0)
                && stream.write_all(answer).is_ok()
            {
                let _ = stream.read(&mut request);
            }
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
    // Accepted connections inherit it, so a server restarted on this port (`start_at`) can bind
    // while connections of its previous life are still open or in TIME_WAIT.
    socket.set_reuse_address(true).expect("reuseaddr");
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

// ---- process and socket measurements ----------------------------------------------------------

/// Raises this process's soft RLIMIT_NOFILE to its hard limit (the proxy, a child, inherits it);
/// returns the soft limit now in force.
/// Raises the soft descriptor limit to the hard one and grows this test process's descriptor
/// table to it at once: a growth while many threads run waits for an RCU grace period, which
/// would freeze whichever test thread opened the descriptor (see
/// `ringproxy::uring::socket::reserve_descriptor_table`).
pub fn raise_nofile_limit() -> u64 {
    let limit = raise_soft_nofile_limit();
    let _ = ringproxy::uring::socket::reserve_descriptor_table(limit);
    limit
}

fn raise_soft_nofile_limit() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read and write one rlimit struct on our stack.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) != 0 {
            return 1024;
        }
        if limit.rlim_cur < limit.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: limit.rlim_max,
                rlim_max: limit.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                limit = raised;
            }
        }
    }
    limit.rlim_cur
}

/// Resident memory of a process, from /proc/PID/status.
pub fn rss_bytes(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .expect("VmRSS")
        * 1024
}

/// Open descriptors of a process (entries of /proc/PID/fd).
pub fn open_fds(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|entries| entries.count())
        .unwrap_or(0)
}

/// A `/proc/PID/status` field as a number (the first word after the colon).
pub fn proc_status_number(pid: i32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
}

/// Kernel memory held by all TCP sockets of the host, from /proc/net/sockstat (pages x 4 KiB).
pub fn tcp_kernel_memory() -> u64 {
    let text = std::fs::read_to_string("/proc/net/sockstat").unwrap_or_default();
    text.lines()
        .find(|line| line.starts_with("TCP:"))
        .and_then(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at = words.iter().position(|&word| word == "mem")?;
            words.get(at + 1)?.parse::<u64>().ok()
        })
        .unwrap_or(0)
        * 4096
}

/// Bytes waiting in a socket's receive queue (FIONREAD / SIOCINQ).
pub fn socket_inq(fd: RawFd) -> usize {
    let mut queued: libc::c_int = 0;
    // SAFETY: FIONREAD writes one c_int into a live stack value; fd is a socket we hold.
    let result = unsafe { libc::ioctl(fd, libc::FIONREAD, &mut queued) };
    if result == 0 { queued as usize } else { 0 }
}

/// Bytes in a socket's send queue not yet acknowledged by the peer (TIOCOUTQ == SIOCOUTQ).
pub fn socket_outq(fd: RawFd) -> usize {
    let mut queued: libc::c_int = 0;
    // SAFETY: TIOCOUTQ writes one c_int into a live stack value; fd is a socket we hold.
    let result = unsafe { libc::ioctl(fd, libc::TIOCOUTQ, &mut queued) };
    if result == 0 { queued as usize } else { 0 }
}

/// The `index`-th client source address, cycling through 127.0.0.2..=127.0.0.254, so many
/// connections to one proxy port do not run one source address out of ports.
pub fn source_ip(index: u64) -> Ipv4Addr {
    Ipv4Addr::new(127, 0, 0, 2 + (index % 253) as u8)
}

/// A TCP socket bound to `source` (port chosen at connect time, IP_BIND_ADDRESS_NO_PORT),
/// with an optional receive buffer size set before connecting; not yet connected.
pub fn client_socket(source: Ipv4Addr, recv_buffer: Option<usize>) -> io::Result<socket2::Socket> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    let enable: libc::c_int = 1;
    // SAFETY: setsockopt reads one c_int from a live stack value; the socket is ours.
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
    if let Some(size) = recv_buffer {
        socket.set_recv_buffer_size(size)?;
    }
    socket.bind(&SocketAddr::new(IpAddr::V4(source), 0).into())?;
    Ok(socket)
}

/// Connects to `addr` from `source` with 5 s read/write timeouts (see `client_socket`).
pub fn connect_from(
    addr: SocketAddr,
    source: Ipv4Addr,
    recv_buffer: Option<usize>,
) -> io::Result<TcpStream> {
    let socket = client_socket(source, recv_buffer)?;
    socket.connect_timeout(&addr.into(), Duration::from_secs(5))?;
    socket.set_read_timeout(Some(Duration::from_secs(5)))?;
    socket.set_write_timeout(Some(Duration::from_secs(5)))?;
    Ok(socket.into())
}

/// A nonblocking peek at whether the peer has closed: `Some(true)` on EOF or reset,
/// `Some(false)` while open with nothing to read, `None` when bytes are waiting.
pub fn peer_closed(stream: &TcpStream) -> Option<bool> {
    let mut byte = [0u8; 1];
    // SAFETY: recv writes at most one byte into a live stack buffer; the socket is ours.
    let result = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            byte.as_mut_ptr().cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_PEEK,
        )
    };
    match result {
        0 => Some(true),
        1.. => None,
        _ => {
            let error = io::Error::last_os_error();
            match error.kind() {
                ErrorKind::WouldBlock | ErrorKind::Interrupted => Some(false),
                _ => Some(true),
            }
        }
    }
}

// ---- an epoll test server for many connections -------------------------------------------------

/// What an `EventServer` does with each connection.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum EventMode {
    /// Echo every byte; close after the peer's FIN.
    Echo,
    /// Read and drop; close after the peer's FIN. Holds idle connections indefinitely.
    Discard,
    /// Reset every connection as soon as it is accepted (SO_LINGER 0, close).
    Reset,
}

/// A single-threaded epoll server for thousands of connections (one thread per connection
/// would not fit 8,000 sessions or 100,000 short ones on a 2-core box). Stops on drop.
pub struct EventServer {
    pub addr: SocketAddr,
    accepted: Arc<AtomicU64>,
    closed: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
}

impl EventServer {
    pub fn start(mode: EventMode) -> EventServer {
        let listener = listen_loopback(4096);
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("local addr");
        let accepted = Arc::new(AtomicU64::new(0));
        let closed = Arc::new(AtomicU64::new(0));
        let received = Arc::new(AtomicU64::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let counters = EventCounters {
            accepted: Arc::clone(&accepted),
            closed: Arc::clone(&closed),
            received: Arc::clone(&received),
            stop: Arc::clone(&stop),
        };
        let thread = thread::Builder::new()
            .name("event-server".into())
            .spawn(move || run_event_server(listener, mode, &counters))
            .expect("spawn event server");
        EventServer {
            addr,
            accepted,
            closed,
            received,
            stop,
            thread: Some(thread),
        }
    }

    /// Connections accepted so far.
    pub fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }

    /// Connections that ended (peer FIN or reset; in `Reset` mode, every accepted one).
    pub fn closed(&self) -> u64 {
        self.closed.load(Ordering::SeqCst)
    }

    /// Bytes read from all connections.
    pub fn received(&self) -> u64 {
        self.received.load(Ordering::SeqCst)
    }
}

impl Drop for EventServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct EventCounters {
    accepted: Arc<AtomicU64>,
    closed: Arc<AtomicU64>,
    received: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
}

struct EventConnection {
    stream: TcpStream,
    /// Echo bytes the socket did not take yet; reads pause until they are written.
    pending: Vec<u8>,
}

const LISTENER_TOKEN: u64 = u64::MAX;

fn epoll_control(epoll: &OwnedFd, op: libc::c_int, fd: RawFd, events: u32) {
    let mut event = libc::epoll_event {
        events,
        u64: fd as u64,
    };
    // SAFETY: epoll_ctl reads one epoll_event from a live stack value.
    unsafe { libc::epoll_ctl(epoll.as_raw_fd(), op, fd, &mut event) };
}

fn run_event_server(listener: TcpListener, mode: EventMode, counters: &EventCounters) {
    // SAFETY: epoll_create1 takes no pointers; the result is checked before use.
    let raw = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(raw >= 0, "epoll_create1: {}", io::Error::last_os_error());
    // SAFETY: raw was just created and is owned by nobody else.
    let epoll = unsafe { OwnedFd::from_raw_fd(raw) };
    let readable = (libc::EPOLLIN | libc::EPOLLRDHUP) as u32;
    let writable = libc::EPOLLOUT as u32;
    // The listener's token is LISTENER_TOKEN; a connection's is its fd.
    {
        let mut event = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: LISTENER_TOKEN,
        };
        // SAFETY: as in epoll_control.
        unsafe {
            libc::epoll_ctl(
                epoll.as_raw_fd(),
                libc::EPOLL_CTL_ADD,
                listener.as_raw_fd(),
                &mut event,
            )
        };
    }
    let mut connections: HashMap<RawFd, EventConnection> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 512];
    let mut buffer = vec![0u8; 64 * 1024];
    while !counters.stop.load(Ordering::SeqCst) {
        // SAFETY: epoll_wait writes at most events.len() entries into the live vector.
        let ready = unsafe {
            libc::epoll_wait(
                epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as libc::c_int,
                50,
            )
        };
        if ready < 0 {
            if io::Error::last_os_error().kind() == ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        for event in &events[..ready as usize] {
            let token = event.u64;
            if token == LISTENER_TOKEN {
                loop {
                    match listener.accept() {
                        Ok((stream, _)) => {
                            counters.accepted.fetch_add(1, Ordering::SeqCst);
                            if mode == EventMode::Reset {
                                let _ = socket2::SockRef::from(&stream)
                                    .set_linger(Some(Duration::ZERO));
                                drop(stream);
                                counters.closed.fetch_add(1, Ordering::SeqCst);
                                continue;
                            }
                            let _ = stream.set_nonblocking(true);
                            let fd = stream.as_raw_fd();
                            epoll_control(&epoll, libc::EPOLL_CTL_ADD, fd, readable);
                            connections.insert(
                                fd,
                                EventConnection {
                                    stream,
                                    pending: Vec::new(),
                                },
                            );
                        }
                        Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                        Err(_) => {
                            // Out of descriptors or similar: let the backlog hold them.
                            thread::sleep(Duration::from_millis(5));
                            break;
                        }
                    }
                }
                continue;
            }
            let fd = token as RawFd;
            let Some(connection) = connections.get_mut(&fd) else {
                continue;
            };
            let mut done = false;
            if !connection.pending.is_empty() {
                match connection.stream.write(&connection.pending) {
                    Ok(n) => {
                        connection.pending.drain(..n);
                    }
                    Err(error) if error.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => done = true,
                }
                if !done && connection.pending.is_empty() {
                    epoll_control(&epoll, libc::EPOLL_CTL_MOD, fd, readable);
                }
            }
            while !done && connection.pending.is_empty() {
                match connection.stream.read(&mut buffer) {
                    Ok(0) => done = true,
                    Ok(n) => {
                        counters.received.fetch_add(n as u64, Ordering::SeqCst);
                        if mode != EventMode::Echo {
                            continue;
                        }
                        let written = match connection.stream.write(&buffer[..n]) {
                            Ok(written) => written,
                            Err(error) if error.kind() == ErrorKind::WouldBlock => 0,
                            Err(_) => {
                                done = true;
                                break;
                            }
                        };
                        if written < n {
                            connection.pending.extend_from_slice(&buffer[written..n]);
                            epoll_control(&epoll, libc::EPOLL_CTL_MOD, fd, writable);
                        }
                    }
                    Err(error) if error.kind() == ErrorKind::WouldBlock => break,
                    Err(error) if error.kind() == ErrorKind::Interrupted => {}
                    Err(_) => done = true,
                }
            }
            if done {
                epoll_control(&epoll, libc::EPOLL_CTL_DEL, fd, 0);
                connections.remove(&fd);
                counters.closed.fetch_add(1, Ordering::SeqCst);
            }
        }
    }
}

static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// One heavy test of a test binary at a time (a failed one must not block the rest: poison is
/// ignored), so their descriptor budgets and timings do not add up.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// CPU seconds (user + system) a process has used, from /proc/PID/stat.
pub fn cpu_seconds(pid: i32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("stat");
    let after_name = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// A tool from the Debian packages the test command installs. Under `CI=true` a missing one
/// fails the test; elsewhere the test says loudly that it skipped.
pub fn tool(name: &str, package: &str) -> Option<std::path::PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|path| path.is_file())
    });
    if found.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{name} is missing (Debian package {package}); CI must install it"
        );
        eprintln!("SKIPPED: {name} is not installed (apt-get install {package})");
    }
    found
}

/// `promtool check metrics` on an exposition; panics with promtool's words when it refuses it.
pub fn promtool_check(promtool: &std::path::Path, text: &str) {
    let mut check = Command::new(promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    check
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("feed promtool");
    let output = check.wait_with_output().expect("promtool");
    assert!(
        output.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

// ---- real servers the tests start -------------------------------------------------------------

/// `ringload`, built beside this test's `ringproxy` (built on the spot if this test runs alone).
pub fn ringload() -> std::path::PathBuf {
    let path = std::path::Path::new(BIN)
        .parent()
        .expect("target dir")
        .join("ringload");
    if !path.exists() {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let built = Command::new(cargo)
            .args(["build", "-p", "ringload", "--quiet"])
            .status()
            .expect("build ringload");
        assert!(built.success(), "cannot build ringload");
    }
    path
}

/// A free loopback port (bound, then let go for the server the test starts on it).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("a free port")
}

/// Waits until `name` accepts connections on loopback `port`; panics after `timeout`.
pub fn wait_listening(name: &str, port: u16, timeout: Duration) {
    assert!(
        wait_for(timeout, || TcpStream::connect(("127.0.0.1", port)).is_ok()),
        "{name} does not listen on {port}"
    );
}

/// A server process a test started, stopped by its PID when dropped: SIGTERM (PostgreSQL and
/// MariaDB shut down cleanly on it), SIGKILL if it is still there 10 s later.
pub struct Started {
    pub child: Child,
    pub name: &'static str,
}

impl Drop for Started {
    fn drop(&mut self) {
        // SAFETY: kill sends a signal to the PID of a child this test started and still owns
        // (not yet waited for, so the PID cannot have been reused).
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM);
        }
        let stopped = wait_for(Duration::from_secs(10), || {
            matches!(self.child.try_wait(), Ok(Some(_)))
        });
        if !stopped {
            eprintln!("{} did not stop on SIGTERM; killing it", self.name);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Starts `nginx` on `dir/nginx.conf` with `dir` as its prefix; waits up to 10 s until it
/// listens on every one of `ports`.
pub fn start_nginx(nginx: &std::path::Path, dir: &std::path::Path, ports: &[u16]) -> Started {
    start_server(
        "nginx",
        Command::new(nginx)
            .arg("-c")
            .arg(dir.join("nginx.conf"))
            .arg("-p")
            .arg(dir),
        ports,
        Duration::from_secs(10),
    )
}

/// Spawns a server (output discarded) and waits up to `timeout` until it listens on every one of
/// `ports`.
pub fn start_server(
    name: &'static str,
    command: &mut Command,
    ports: &[u16],
    timeout: Duration,
) -> Started {
    let child = command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|error| panic!("cannot start {name}: {error}"));
    let started = Started { child, name };
    for &port in ports {
        wait_listening(name, port, timeout);
    }
    started
}
