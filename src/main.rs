//! The `ringproxy` command: run, check, demo.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand, ValueEnum};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tracing::{error, info, warn};
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};

use ringproxy::config::{Config, DEFAULT_CONFIG};
use ringproxy::demo::{self, DemoOptions};
use ringproxy::runtime::Runtime;

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
    let config = match load(config_path, profile) {
        Ok(config) => Arc::new(config),
        Err(code) => return code,
    };
    // Registered before the shards start, so no signal is ever handled by the default action.
    // SIGHUP is caught too: operators send it to reload, and its default action would kill the
    // proxy without draining.
    let mut signals = match Signals::new([SIGTERM, SIGINT, SIGHUP]) {
        Ok(signals) => signals,
        Err(error) => {
            error!(%error, "cannot install signal handlers");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match Runtime::start(Arc::clone(&config)) {
        Ok(runtime) => runtime,
        Err(error) => {
            error!(%error, "cannot start");
            eprintln!("ringproxy: {error}");
            return ExitCode::FAILURE;
        }
    };
    let control = runtime.control();
    let drain_timeout = config.runtime.drain_timeout;
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut received = 0;
            for signal in signals.forever() {
                if signal == SIGHUP {
                    warn!("SIGHUP: reloading is not supported yet; the running config stays");
                    continue;
                }
                received += 1;
                if received == 1 {
                    info!(
                        signal,
                        ?drain_timeout,
                        "draining: no new connections, live sessions may finish"
                    );
                    control.drain();
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
    match runtime.join() {
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
