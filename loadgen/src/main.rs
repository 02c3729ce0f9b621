//! ringload: the project's io_uring load generator and test servers.
//!
//! It provides the test servers (`serve`), request/response load (`rr`), throughput (`bulk`)
//! and many held connections (`hold`). Everything targets loopback unless `--allow-remote` is given, and every run
//! is bounded in time.

mod bulk;
mod hold;
mod process;
mod rr;
mod serve;
mod target;
mod tls;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "ringload",
    version,
    about = "io_uring load generator and test servers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Test servers, one pinned io_uring thread per core on SO_REUSEPORT listeners.
    Serve(serve::ServeArgs),
    /// Request/response load (echo or HTTP), closed loop or open loop with --rate.
    Rr(rr::RrArgs),
    /// Throughput: streams that send as fast as the target takes it.
    Bulk(bulk::BulkArgs),
    /// Open many connections at a capped rate, hold them, report, close.
    Hold(hold::HoldArgs),
    /// One worker process of `hold` (started by it).
    #[command(hide = true)]
    HoldWorker(hold::WorkerArgs),
}

fn main() -> ExitCode {
    // clap prints usage errors and exits 2 by itself.
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Rr(args) => rr::run(args),
        Command::Bulk(args) => bulk::run(args),
        Command::Hold(args) => hold::run(args),
        Command::HoldWorker(args) => hold::run_worker(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("ringload: {error:#}");
            ExitCode::from(if error.is::<target::UsageError>() {
                2
            } else {
                1
            })
        }
    }
}
