//! The control thread: config loading and hot reload, health checks, the admin API, metrics
//! export and systemd notification, beside the shards and never in their way.
//!
//! A plain std thread runs a current-thread tokio runtime (admin HTTP with hyper, health probes
//! with `tokio::net`). It owns the config, stable ids, operators' overrides and health state,
//! and hands the shards immutable snapshots through their inboxes; it reads their counters from
//! the slots they publish into. It holds nothing a shard waits on.
//!
//! `Proxy` is what `ringproxy run` and `ringproxy demo` start: the listeners bound, the shards
//! running, the control thread serving.

pub mod overrides;

mod export;
mod notify;
mod reload;
mod shares;
mod state;
mod status;

use std::cell::RefCell;
use std::collections::HashSet;
use std::io;
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::rc::Rc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use crate::admin::{self, AdminError, Token};
use crate::config::Config;
use crate::health::{HealthTracker, probe};
use crate::listener;
use crate::runtime::{self, Runtime, RuntimeControl, ShardReport, StartError};
use crate::snapshot::{Identities, ServerId, Snapshot};
pub use notify::Notifier;
use overrides::Overrides;
pub use state::{ApiError, ConfigPaths, ReloadRecord};
use state::{BoundSockets, Control, ReloadLog, ServerHealth};

/// The control state as the control thread's tasks share it (one thread, no locks).
pub type Shared = Rc<RefCell<Control>>;

/// How often the control thread looks after removals, slow-start ramps and the watchdog.
const HOUSEKEEPING: Duration = Duration::from_millis(100);

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error(transparent)]
    Bind(#[from] listener::BindError),
    #[error(transparent)]
    Admin(#[from] AdminError),
    #[error("cannot start the control thread: {0}")]
    Thread(#[source] io::Error),
}

pub struct ProxyOptions {
    pub paths: ConfigPaths,
    /// Counts log lines the non-blocking writer dropped (for `/metrics`).
    pub dropped_logs: Arc<dyn Fn() -> u64 + Send + Sync>,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        ProxyOptions {
            paths: ConfigPaths::default(),
            dropped_logs: Arc::new(|| 0),
        }
    }
}

enum Command {
    Reload,
    Drain,
    Stop,
    Quit,
}

/// Asks the control thread for things from other threads (signal handling).
#[derive(Clone)]
pub struct ProxyHandle {
    commands: mpsc::UnboundedSender<Command>,
}

impl ProxyHandle {
    pub fn reload(&self) {
        let _ = self.commands.send(Command::Reload);
    }

    /// Stop accepting, let live sessions finish up to `drain_timeout`, then stop.
    pub fn drain(&self) {
        let _ = self.commands.send(Command::Drain);
    }

    pub fn stop(&self) {
        let _ = self.commands.send(Command::Stop);
    }
}

/// The running proxy.
pub struct Proxy {
    runtime: Runtime,
    runtime_control: RuntimeControl,
    control: Option<JoinHandle<()>>,
    handle: ProxyHandle,
    listener_addrs: Vec<(String, SocketAddr)>,
    admin_addr: Option<SocketAddr>,
}

/// One listener's sockets bound for every shard, plus duplicates the control thread keeps.
fn bind_listener(
    listener: &crate::config::ListenerConfig,
    shards: usize,
) -> Result<(BoundSockets, Vec<OwnedFd>), listener::BindError> {
    let bound = listener::bind(listener, shards)?;
    let duplicates = bound
        .sockets
        .iter()
        .map(OwnedFd::try_clone)
        .collect::<io::Result<Vec<_>>>()
        .map_err(|source| listener::BindError {
            name: listener.name.clone(),
            addr: bound.addr,
            source,
        })?;
    Ok((
        BoundSockets {
            configured: listener.bind,
            addr: bound.addr,
            backlog: listener.backlog,
            tcp: listener.tcp,
            steering: listener::steering(listener),
            duplicates,
        },
        bound.sockets,
    ))
}

impl Proxy {
    /// Binds every listener (and the admin API), starts the shards and the control thread.
    pub fn start(config: Config, options: ProxyOptions) -> Result<Proxy, ProxyError> {
        let shards = runtime::shard_count(&config);
        runtime::reserve_descriptors(&config, shards);
        let overrides = match config.admin.as_ref().and_then(|a| a.state_file.as_ref()) {
            Some(path) => Overrides::load(path).unwrap_or_else(|message| {
                error!(%message, "cannot use the state file; starting without its overrides");
                Overrides::default()
            }),
            None => Overrides::default(),
        };
        let mut overrides = overrides;
        if overrides.reconcile_splits(&config) {
            // The file changed a split's weights while we were down (or the state file holds
            // weights the API would refuse): the file wins, as on a reload.
            tracing::info!("split weights from the state file dropped: the config's differ");
        }
        let token = match &config.admin {
            Some(admin) => admin::load_token(admin.token_file.as_deref())?,
            None => None,
        };
        let admin_listener = match &config.admin {
            Some(admin) => Some(admin::bind(admin.bind)?),
            None => None,
        };
        let admin_addr = admin_listener
            .as_ref()
            .and_then(|listener| listener.local_addr().ok());
        let config = Arc::new(config);
        let placeholder = Arc::new(Snapshot::new(
            0,
            Arc::clone(&config),
            Vec::new(),
            Vec::new(),
            Vec::new(),
        ));
        let mut control = Control {
            config: Arc::clone(&config),
            paths: options.paths,
            ids: Identities::default(),
            overrides,
            health: Default::default(),
            ramps: Default::default(),
            snapshot: placeholder,
            runtime: RuntimeControl::detached(),
            slots: Vec::new(),
            shards,
            listeners: Default::default(),
            reloads: ReloadLog::default(),
            pending_restart: Vec::new(),
            started: SystemTime::now(),
            draining: false,
            removing: Default::default(),
            admin_changes: Default::default(),
            split_changes: Default::default(),
            dropped_logs: options.dropped_logs,
            ticket_keys: crate::tls::TicketKeys::generate(),
            tickets_made: std::time::Instant::now(),
            notifier: Notifier::from_env(),
        };
        let snapshot = control.build_snapshot(Instant::now());
        control.snapshot = Arc::clone(&snapshot);
        let mut sockets = Vec::with_capacity(config.listeners.len());
        for (listener, snap) in config.listeners.iter().zip(&snapshot.listeners) {
            let (bound, shard_sockets) = bind_listener(listener, shards)?;
            control.listeners.insert(snap.id, bound);
            sockets.push((snap.id, shard_sockets));
        }
        let runtime = Runtime::start(
            shards,
            &config.tuning,
            &config.runtime.pin,
            Arc::clone(&snapshot),
            sockets,
        )?;
        let runtime_control = runtime.control();
        control.slots = runtime_control.slots();
        control.runtime = runtime_control.clone();
        let listener_addrs: Vec<(String, SocketAddr)> = snapshot
            .listeners
            .iter()
            .filter_map(|listener| {
                let bound = control.listeners.get(&listener.id)?;
                Some((listener.name.clone(), bound.addr))
            })
            .collect();
        for (name, addr) in &listener_addrs {
            info!(listener = %name, %addr, shards, "listener ready");
        }
        if let Some(addr) = admin_addr {
            info!(%addr, "admin API ready");
        }
        let (commands, receiver) = mpsc::unbounded_channel();
        let max_admin = config
            .admin
            .as_ref()
            .map_or(0, |admin| admin.max_connections as usize);
        let thread = std::thread::Builder::new()
            .name("control".into())
            .spawn(move || control_thread(control, receiver, admin_listener, token, max_admin))
            .map_err(|error| {
                runtime_control.stop();
                ProxyError::Thread(error)
            });
        let thread = match thread {
            Ok(thread) => thread,
            Err(error) => {
                let _ = runtime.join();
                return Err(error);
            }
        };
        Ok(Proxy {
            runtime,
            runtime_control,
            control: Some(thread),
            handle: ProxyHandle { commands },
            listener_addrs,
            admin_addr,
        })
    }

    /// Each listener's name and the address it is bound to (the real port when 0 was asked).
    pub fn listener_addrs(&self) -> &[(String, SocketAddr)] {
        &self.listener_addrs
    }

    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin_addr
    }

    pub fn handle(&self) -> ProxyHandle {
        self.handle.clone()
    }

    /// Waits for the shards to stop (after a drain, a stop, or a shard's failure), then for the
    /// control thread.
    pub fn join(mut self) -> io::Result<Vec<ShardReport>> {
        let outcome = self.runtime.join();
        self.runtime_control.stop();
        let _ = self.handle.commands.send(Command::Quit);
        if let Some(thread) = self.control.take() {
            let _ = thread.join();
        }
        outcome
    }
}

fn control_thread(
    control: Control,
    mut commands: mpsc::UnboundedReceiver<Command>,
    admin_listener: Option<std::net::TcpListener>,
    token: Option<Token>,
    max_admin: usize,
) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            error!(%error, "cannot start the control thread's runtime; the shards run on without it");
            return;
        }
    };
    let local = tokio::task::LocalSet::new();
    let shared: Shared = Rc::new(RefCell::new(control));
    local.block_on(&runtime, async move {
        if let Some(listener) = admin_listener {
            tokio::task::spawn_local(admin::serve(
                listener,
                Rc::clone(&shared),
                token,
                max_admin.max(1),
            ));
        }
        reconcile_health(&shared);
        tokio::task::spawn_local(housekeeping(Rc::clone(&shared)));
        {
            let control = shared.borrow();
            control.notifier.ready(&format!(
                "serving {} listeners on {} shards",
                control.snapshot.listeners.len(),
                control.shards
            ));
        }
        while let Some(command) = commands.recv().await {
            match command {
                Command::Reload => {
                    let (status, body) = reload(&shared);
                    if status != 200 {
                        warn!(error = %body["error"], "reload rejected; the running config stays");
                    }
                }
                Command::Drain => {
                    let mut control = shared.borrow_mut();
                    if !control.draining {
                        control.begin_drain();
                        control.runtime.drain();
                    }
                }
                Command::Stop => {
                    let mut control = shared.borrow_mut();
                    control.begin_drain();
                    control.runtime.stop();
                }
                Command::Quit => break,
            }
        }
        let mut control = shared.borrow_mut();
        for health in control.health.values_mut() {
            if let Some(task) = health.task.take() {
                task.abort();
            }
        }
    });
}

/// How often files of `[listener.tls]` with `watch = true` are looked at.
const TLS_WATCH_PERIOD: Duration = Duration::from_secs(2);

type Fingerprints = Vec<(
    std::path::PathBuf,
    Option<(std::time::SystemTime, u64, u64)>,
)>;

/// The files of every TLS listener and route with `watch = true`, as they look now.
fn tls_fingerprints(config: &Config) -> Fingerprints {
    let routes = config
        .listeners
        .iter()
        .filter_map(|listener| listener.routing.as_ref())
        .flat_map(|routing| &routing.routes)
        .filter_map(|route| match &route.tls {
            crate::route::RouteTls::Terminate(settings) => Some(settings.as_ref()),
            _ => None,
        });
    let mut files: Fingerprints = config
        .listeners
        .iter()
        .filter_map(|listener| listener.tls.as_deref())
        .chain(routes)
        .filter(|tls| tls.watch)
        .flat_map(|tls| tls.files())
        .map(|path| (path.to_path_buf(), crate::tls::file_fingerprint(path)))
        .collect();
    files.sort();
    files.dedup();
    files
}

/// Removals, slow-start ramps, the watchdog and the status line, a few times a second.
async fn housekeeping(shared: Shared) {
    let mut last_ramp_publish = Instant::now();
    let mut last_watchdog = Instant::now();
    let mut last_status = Instant::now();
    let mut last_rebalance = Instant::now();
    let mut rates = shares::RateBalancer::default();
    let mut interval = tokio::time::interval(HOUSEKEEPING);
    let mut last_watch = Instant::now();
    let mut watched = tls_fingerprints(&shared.borrow().config);
    loop {
        interval.tick().await;
        let now = Instant::now();
        if now.duration_since(last_watch) >= TLS_WATCH_PERIOD {
            last_watch = now;
            let seen = tls_fingerprints(&shared.borrow().config);
            if seen != watched {
                info!("a watched TLS file changed: reloading");
                let (status, body) = reload(&shared);
                if status != 200 {
                    warn!(error = %body["error"], "reload rejected; the running config stays");
                }
                // Once per change: a broken file is not tried again until it changes again.
                watched = tls_fingerprints(&shared.borrow().config);
            }
        }
        let mut control = shared.borrow_mut();
        control.collect_removed();
        let ramps_before = control.ramps.len();
        if control.ramping(now)
            && (now.duration_since(last_ramp_publish) >= Duration::from_millis(500)
                || control.ramps.len() < ramps_before)
        {
            last_ramp_publish = now;
            control.publish();
        }
        if now.duration_since(control.tickets_made) >= crate::tls::TICKET_ROTATION
            && let Some(rotated) = control.ticket_keys.as_ref().and_then(|k| k.rotated())
        {
            // New tickets under a new key; the previous key still opens the ones out there.
            control.ticket_keys = Some(rotated);
            control.tickets_made = now;
            if control.snapshot.listeners.iter().any(|l| l.tls.is_some()) {
                control.publish();
            }
        }
        if now.duration_since(last_rebalance) >= Duration::from_secs(1) {
            last_rebalance = now;
            let shares = rates.update(&control.merged(), &control.snapshot, control.shards);
            control.runtime.set_rate_shares(shares);
        }
        if let Some(watchdog) = control.notifier.watchdog()
            && now.duration_since(last_watchdog) >= watchdog / 2
        {
            // Only while every shard's loop has turned lately: a stuck shard stops the pings
            // and systemd restarts the service.
            let stale = watchdog.max(Duration::from_secs(3));
            let merged = control.merged();
            let alive = merged.shards.len() == control.shards
                && merged
                    .shards
                    .iter()
                    .all(|shard| now.saturating_duration_since(shard.at) < stale);
            if alive {
                control.notifier.watchdog_ping();
                last_watchdog = now;
            } else {
                warn!("a shard has not turned its loop lately: withholding the watchdog ping");
            }
        }
        if now.duration_since(last_status) >= Duration::from_secs(5) {
            last_status = now;
            let merged = control.merged();
            let sessions: usize = merged.shards.iter().map(|shard| shard.sessions).sum();
            control.notifier.status(&format!(
                "{sessions} sessions, generation {}",
                control.snapshot.generation
            ));
        }
    }
}

/// Starts, stops or reconfigures health-check tasks to match the current snapshot.
pub fn reconcile_health(shared: &Shared) {
    let mut control = shared.borrow_mut();
    let now = Instant::now();
    let snapshot = Arc::clone(&control.snapshot);
    let config = Arc::clone(&control.config);
    let mut wanted = HashSet::new();
    let mut to_start = Vec::new();
    for pool in &snapshot.pools {
        let Some(check) = config
            .pools
            .iter()
            .find(|p| p.name == pool.name)
            .and_then(|p| p.health.clone())
        else {
            continue;
        };
        for server in &pool.servers {
            wanted.insert(server.id);
            match control.health.get_mut(&server.id) {
                Some(health) if health.check == check && health.addr == server.addr => {}
                Some(health) if health.addr == server.addr => {
                    // New check settings: same tracker (state and counts), new probe task.
                    health.tracker.reconfigure(&check);
                    health.check = check.clone();
                    if let Some(task) = health.task.take() {
                        task.abort();
                    }
                    to_start.push((server.id, server.addr, check.clone()));
                }
                _ => {
                    if let Some(mut old) = control.health.remove(&server.id)
                        && let Some(task) = old.task.take()
                    {
                        task.abort();
                    }
                    control.health.insert(
                        server.id,
                        ServerHealth {
                            tracker: HealthTracker::new(&check, now),
                            check: check.clone(),
                            addr: server.addr,
                            pool: pool.name.clone(),
                            task: None,
                        },
                    );
                    to_start.push((server.id, server.addr, check.clone()));
                }
            }
        }
    }
    control.health.retain(|id, health| {
        let keep = wanted.contains(id);
        if !keep && let Some(task) = health.task.take() {
            task.abort();
        }
        keep
    });
    for (id, addr, check) in to_start {
        let task = tokio::task::spawn_local(probe_loop(Rc::clone(shared), id, addr, check));
        if let Some(health) = control.health.get_mut(&id) {
            health.task = Some(task.abort_handle());
        }
    }
}

/// Probes one server for ever (until aborted), with jitter so that many servers are not
/// probed in the same millisecond.
async fn probe_loop(
    shared: Shared,
    id: ServerId,
    addr: SocketAddr,
    check: crate::config::HealthCheck,
) {
    let mut random = Jitter::new(u64::from(id.0));
    // TLS pools: one rustls config per probed server, built on the control thread.
    let tls = probe::probe_tls(&check);
    // The first check soon, spread over a tenth of the interval.
    tokio::time::sleep(check.interval.mul_f64(random.fraction() * 0.1)).await;
    loop {
        let result = probe::probe(addr, &check, tls.as_ref()).await;
        {
            let mut control = shared.borrow_mut();
            if control.record_health(id, result) {
                control.publish();
            }
        }
        // 95% to 105% of the interval.
        let factor = 0.95 + random.fraction() * 0.1;
        tokio::time::sleep(check.interval.mul_f64(factor)).await;
    }
}

/// A small random source for probe jitter (xorshift64*, seeded per server and start time).
struct Jitter(u64);

impl Jitter {
    fn new(seed: u64) -> Jitter {
        let time = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |elapsed| elapsed.as_nanos() as u64);
        Jitter((seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ time) | 1)
    }

    /// Uniform in [0, 1).
    fn fraction(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Reloads the config files; answers (HTTP status, JSON body) for `/reload`.
pub fn reload(shared: &Shared) -> (u16, Value) {
    let outcome = reload::reload(&mut shared.borrow_mut());
    reconcile_health(shared);
    outcome
}

pub fn status_json(control: &Control) -> Value {
    status::status_json(control)
}

pub fn not_ready_reasons(control: &Control) -> Vec<String> {
    status::not_ready_reasons(control)
}

pub fn render_metrics(control: &Control) -> String {
    export::render(control)
}

/// The `/status` object of one split (what `PUT /splits/{name}` answers).
pub fn split_status(control: &Control, name: &str) -> Value {
    let merged = control.merged();
    status::splits_json(control, &merged)
        .into_iter()
        .find(|split| split["name"] == name)
        .unwrap_or(Value::Null)
}

/// The `/status` object of one server (what the mutating endpoints answer).
pub fn server_status(control: &Control, id: ServerId) -> Value {
    let merged = control.merged();
    control
        .snapshot
        .pools
        .iter()
        .find_map(|pool| {
            let server = pool.server(id)?;
            let mut value = status::server_json(control, &merged, server);
            value["pool"] = Value::from(pool.name.clone());
            Some(value)
        })
        .unwrap_or_else(|| serde_json::json!({"removed": true}))
}

impl Control {
    /// Shutting down: the listening sockets' last duplicates go (the shards close theirs), so
    /// new connections are refused from now on.
    fn begin_drain(&mut self) {
        self.draining = true;
        self.notifier.stopping();
        for bound in self.listeners.values_mut() {
            bound.duplicates.clear();
        }
    }

    pub fn auth_reads(&self) -> bool {
        self.config
            .admin
            .as_ref()
            .is_some_and(|admin| admin.auth_reads)
    }

    pub fn load_token(&self) -> Result<Option<Token>, AdminError> {
        admin::load_token(
            self.config
                .admin
                .as_ref()
                .and_then(|admin| admin.token_file.as_deref()),
        )
    }

    /// Cuts a server's live sessions on every shard (HAProxy's `shutdown sessions server`).
    pub fn cut_sessions(&mut self, pool: &str, key: &str) -> Result<ServerId, ApiError> {
        let (pool, server) = self.find_server(pool, key)?;
        warn!(pool = %pool.name, server = %server.addr, "cutting the server's sessions (operator)");
        self.runtime.cut_server(server.id);
        Ok(server.id)
    }
}
