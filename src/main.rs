//! The `ringproxy` command: run, check, demo.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{error, info, warn};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

use ringproxy::admin::ctl::{self, Call};
use ringproxy::config::{Config, DEFAULT_CONFIG};
use ringproxy::control::{ConfigPaths, Proxy, ProxyOptions};
use ringproxy::demo::{self, DemoOptions};

/// Exit status for a config that does not validate.
const EXIT_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "ringproxy",
    version,
    about = "Thread-per-core io_uring TCP load balancer"
)]
struct Cli {
    /// Log format on stderr; the level comes from RUST_LOG (default "info").
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy in the foreground until SIGTERM or SIGINT.
    Run {
        /// Config file; without it the embedded default (`ringproxy check --default`) is used.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Tuning profile whose [tuning] table overlays the config's.
        #[arg(long)]
        profile: Option<PathBuf>,
    },
    /// Validate a config and print it resolved, every default spelled out.
    Check {
        #[arg(long, required_unless_present = "default", conflicts_with = "default")]
        config: Option<PathBuf>,
        #[arg(long)]
        profile: Option<PathBuf>,
        /// Print the embedded default config instead.
        #[arg(long)]
        default: bool,
    },
    /// Start the proxy on the default config in front of built-in loopback echo servers, drive a
    /// short byte-verified load through it, print what happened and exit.
    Demo {
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Request/response round trips per connection.
        #[arg(long, default_value_t = 200)]
        requests: usize,
        /// Largest payload of one request, in bytes (sizes are uniform from 1 to this).
        #[arg(long, default_value_t = 65536)]
        max_size: usize,
    },
    /// Talk to a running proxy's admin API: status, drain, maint, enable, weight, add, remove,
    /// shutdown-sessions, reload.
    Ctl {
        /// The admin API's address.
        #[arg(long, default_value = "127.0.0.1:9900")]
        admin: std::net::SocketAddr,
        /// File holding the bearer token (default: the RINGPROXY_ADMIN_TOKEN variable).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Print the API's JSON instead of tables.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: CtlAction,
    },
}

#[derive(Subcommand)]
enum CtlAction {
    /// Listeners, pools and servers with their states and counters.
    Status,
    /// No new sessions for the server; its live sessions finish.
    Drain { pool: String, server: String },
    /// Maintenance: no new sessions for the server.
    Maint { pool: String, server: String },
    /// Back to normal after drain or maint.
    Enable { pool: String, server: String },
    /// Set the server's weight (1-10000).
    Weight {
        pool: String,
        server: String,
        weight: u32,
    },
    /// Register a new server in a pool.
    Add {
        pool: String,
        addr: String,
        #[arg(long, default_value_t = 1)]
        weight: u32,
        #[arg(long)]
        backup: bool,
        #[arg(long)]
        name: Option<String>,
    },
    /// Delete a server: no new sessions; it disappears once its last session ends.
    Remove { pool: String, server: String },
    /// Cut the server's live sessions now.
    ShutdownSessions { pool: String, server: String },
    /// Reload the config file (as SIGHUP does).
    Reload,
}

/// Log lines waiting for the writer thread; past this, new lines are dropped (and counted)
/// rather than making a shard wait on a slow stderr.
const LOG_QUEUE_LINES: usize = 65_536;

/// Logs go through a writer thread with a bounded queue, so a shard never blocks on stderr.
/// The guard flushes the queue when dropped; the counter tells how many lines were dropped.
fn init_logging(format: LogFormat) -> (WorkerGuard, ErrorCounter) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(LOG_QUEUE_LINES)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let dropped = writer.error_counter();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(writer);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
    (guard, dropped)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (_flush_on_exit, dropped_logs) = init_logging(cli.log_format);
    match cli.command {
        Command::Check {
            config,
            profile,
            default,
        } => check(config, profile, default),
        Command::Run { config, profile } => run(config, profile, &dropped_logs),
        Command::Ctl {
            admin,
            token_file,
            json,
            action,
        } => run_ctl(admin, token_file, json, action),
        Command::Demo {
            connections,
            requests,
            max_size,
        } => run_demo(DemoOptions {
            connections: connections.clamp(1, 4096),
            requests_per_connection: requests.clamp(1, 1_000_000),
            max_payload: max_size.clamp(1, 8 << 20),
        }),
    }
}

fn load(config: Option<PathBuf>, profile: Option<PathBuf>) -> Result<Config, ExitCode> {
    let loaded = match &config {
        Some(path) => Config::load(path, profile.as_deref()),
        None => Config::default_config().and_then(|mut config| {
            if let Some(profile) = &profile {
                config.apply_profile(profile)?;
            }
            Ok(config)
        }),
    };
    loaded.map_err(|error| {
        eprintln!("{error}");
        ExitCode::from(EXIT_CONFIG)
    })
}

fn check(config: Option<PathBuf>, profile: Option<PathBuf>, default: bool) -> ExitCode {
    if default {
        print!("{DEFAULT_CONFIG}");
        return ExitCode::SUCCESS;
    }
    match load(config, profile) {
        Ok(config) => {
            print!("{}", config.to_toml());
            ExitCode::SUCCESS
        }
        Err(code) => code,
    }
}

fn run(
    config_path: Option<PathBuf>,
    profile: Option<PathBuf>,
    dropped_logs: &ErrorCounter,
) -> ExitCode {
    if config_path.is_none() {
        info!("no --config given: using the embedded default config");
    }
    let paths = ConfigPaths {
        config: config_path.clone(),
        profile: profile.clone(),
    };
    let config = match load(config_path, profile) {
        Ok(config) => config,
        Err(code) => return code,
    };
    // Registered before the shards start, so no signal is ever handled by the default action.
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(signals) => signals,
        Err(error) => {
            error!(%error, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let counter = dropped_logs.clone();
    let options = ProxyOptions {
        paths,
        dropped_logs: Arc::new(move || counter.dropped_lines() as u64),
    };
    let drain_timeout = config.runtime.drain_timeout;
    let proxy = match Proxy::start(config, options) {
        Ok(proxy) => proxy,
        Err(error) => {
            error!(%error, "cannot start");
            eprintln!("ringproxy: {error}");
            return ExitCode::FAILURE;
        }
    };
    let handle = proxy.handle();
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut received = 0;
            for signal in signals.forever() {
                if signal == SIGHUP {
                    info!("SIGHUP: reloading the config");
                    handle.reload();
                    continue;
                }
                received += 1;
                if received == 1 {
                    info!(
                        signal,
                        ?drain_timeout,
                        "draining: no new connections, live sessions may finish"
                    );
                    handle.drain();
                } else {
                    warn!(
                        signal,
                        "second signal: exiting now without waiting for live sessions"
                    );
                    std::process::exit(1);
                }
            }
        })
        .ok();
    match proxy.join() {
        Ok(reports) => {
            let accepted: u64 = reports.iter().map(|r| r.stats.accepted).sum();
            info!(
                shards = reports.len(),
                accepted,
                log_lines_dropped = dropped_logs.dropped_lines(),
                "stopped"
            );
            ExitCode::SUCCESS
        }
        Err(error) => {
            error!(%error, log_lines_dropped = dropped_logs.dropped_lines(), "a shard failed; the proxy stopped");
            ExitCode::FAILURE
        }
    }
}

/// Exit status of `ctl` when the API answered with an error.
const EXIT_CTL_REFUSED: u8 = 1;
/// Exit status of `ctl` when the API could not be reached.
const EXIT_CTL_UNREACHABLE: u8 = 3;

fn run_ctl(
    admin: std::net::SocketAddr,
    token_file: Option<PathBuf>,
    json: bool,
    action: CtlAction,
) -> ExitCode {
    let token = match &token_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(text) => Some(text.trim().to_string()),
            Err(error) => {
                eprintln!("ringproxy ctl: cannot read {}: {error}", path.display());
                return ExitCode::from(EXIT_CONFIG);
            }
        },
        None => std::env::var(ringproxy::admin::TOKEN_VARIABLE)
            .ok()
            .map(|token| token.trim().to_string())
            .filter(|token| !token.is_empty()),
    };
    use hyper::Method;
    let is_status = matches!(action, CtlAction::Status);
    let call = match action {
        CtlAction::Status => Call::get("/status"),
        CtlAction::Drain { pool, server } => {
            Call::server(Method::POST, &pool, &server, Some("drain"))
        }
        CtlAction::Maint { pool, server } => {
            Call::server(Method::POST, &pool, &server, Some("maint"))
        }
        CtlAction::Enable { pool, server } => {
            Call::server(Method::POST, &pool, &server, Some("enable"))
        }
        CtlAction::ShutdownSessions { pool, server } => {
            Call::server(Method::POST, &pool, &server, Some("shutdown-sessions"))
        }
        CtlAction::Weight {
            pool,
            server,
            weight,
        } => Call::server(Method::PUT, &pool, &server, Some("weight"))
            .with_body(serde_json::json!({ "weight": weight })),
        CtlAction::Add {
            pool,
            addr,
            weight,
            backup,
            name,
        } => {
            let mut body = serde_json::json!({ "addr": addr, "weight": weight, "backup": backup });
            if let Some(name) = name {
                body["name"] = serde_json::Value::from(name);
            }
            Call {
                method: Method::POST,
                path: format!("/pools/{}/servers", ctl::encode(&pool)),
                body: Some(body),
            }
        }
        CtlAction::Remove { pool, server } => Call::server(Method::DELETE, &pool, &server, None),
        CtlAction::Reload => Call {
            method: Method::POST,
            path: "/reload".to_string(),
            body: None,
        },
    };
    let answer = match ctl::send(admin, token.as_deref(), &call) {
        Ok(answer) => answer,
        Err(message) => {
            eprintln!("ringproxy ctl: {message}");
            return ExitCode::from(EXIT_CTL_UNREACHABLE);
        }
    };
    let body = match answer.body {
        Ok(body) => body,
        Err(text) => {
            eprintln!("ringproxy ctl: HTTP {}: {text}", answer.status);
            return ExitCode::from(EXIT_CTL_REFUSED);
        }
    };
    if !(200..300).contains(&answer.status) {
        let message = body["error"]
            .as_str()
            .map_or_else(|| body.to_string(), str::to_string);
        eprintln!("ringproxy ctl: HTTP {}: {message}", answer.status);
        return ExitCode::from(EXIT_CTL_REFUSED);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&body).unwrap_or_default()
        );
    } else if is_status {
        print!("{}", ctl::format_status(&body));
    } else if body.get("result").is_some() {
        println!(
            "reload: {} (generation {}){}",
            body["result"].as_str().unwrap_or("?"),
            body["generation"],
            body["pending_restart"]
                .as_array()
                .filter(|keys| !keys.is_empty())
                .map(|keys| format!("; pending restart: {keys:?}"))
                .unwrap_or_default()
        );
    } else {
        println!("{}", ctl::format_server(&body));
    }
    ExitCode::SUCCESS
}

fn run_demo(options: DemoOptions) -> ExitCode {
    println!(
        "ringproxy demo: default config, 2 loopback echo servers, {} connections x {} requests (1..={} bytes each)",
        options.connections, options.requests_per_connection, options.max_payload
    );
    let report = match demo::run(&options) {
        Ok(report) => report,
        Err(error) => {
            eprintln!("demo failed: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let seconds = report.elapsed.as_secs_f64().max(1e-9);
    println!("proxy listener     {}", report.listener);
    println!(
        "requests           {} in {:.2} s ({:.0} req/s)",
        report.requests,
        seconds,
        report.requests as f64 / seconds
    );
    println!(
        "bytes verified     {} each way ({:.1} MiB/s each way)",
        report.bytes_verified,
        report.bytes_verified as f64 / seconds / (1 << 20) as f64
    );
    println!("failed clients     {}", report.failures);
    let latency = &report.latency;
    println!(
        "round trip (us)    p50 {}  p99 {}  p99.9 {}  max {}",
        latency.value_at_quantile(0.5),
        latency.value_at_quantile(0.99),
        latency.value_at_quantile(0.999),
        latency.max()
    );
    for (addr, accepted) in &report.servers {
        println!("server {addr:<15} {accepted} connections");
    }
    if let Some((addr, accepted)) = report.admin {
        println!("admin API          {addr} (/status counted {accepted} connections)");
    }
    for shard in &report.shards {
        println!(
            "shard {:<12} accepted {}  bytes to servers {}  bytes to clients {}",
            shard.shard,
            shard.stats.accepted,
            shard.stats.bytes_to_server,
            shard.stats.bytes_to_client
        );
    }
    if report.succeeded() {
        println!("result             OK: every byte came back as sent");
        ExitCode::SUCCESS
    } else {
        println!("result             FAILED");
        ExitCode::FAILURE
    }
}
