//! What every ringload mode does around its workers: stop on SIGTERM/SIGINT (or when the parent
//! closes our stdin), pick the thread count, print a progress line each second, write the JSON
//! summary. Nothing here runs per request.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

/// A flag that SIGTERM and SIGINT set.
pub fn stop_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&stop)).context("signal handler")?;
    }
    Ok(stop)
}

/// Sets `stop` once stdin closes: how a parent process stops its workers, and why a worker
/// never outlives a parent that died.
pub fn stop_when_stdin_closes(stop: &Arc<AtomicBool>) {
    let stop = Arc::clone(stop);
    std::thread::spawn(move || {
        let mut discard = [0u8; 64];
        let mut stdin = std::io::stdin();
        while matches!(stdin.read(&mut discard), Ok(n) if n > 0) {}
        stop.store(true, Ordering::Relaxed);
    });
}

/// `requested`, or one thread per core.
pub fn thread_count(requested: Option<usize>) -> usize {
    requested.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// Until every worker has finished, prints `line(seconds since the last line)` on stderr once
/// a second, numbered.
pub fn progress_until_finished<T>(workers: &[JoinHandle<T>], mut line: impl FnMut(f64) -> String) {
    let mut last = Instant::now();
    let mut second = 0;
    while !workers.iter().all(|worker| worker.is_finished()) {
        std::thread::sleep(Duration::from_millis(50));
        if last.elapsed() >= Duration::from_secs(1) {
            second += 1;
            let text = line(last.elapsed().as_secs_f64());
            eprintln!("{second:>4}s  {text}");
            last = Instant::now();
        }
    }
}

/// Writes `summary` as pretty JSON to `path`, when one was asked for.
pub fn write_json(path: Option<&Path>, summary: &impl Serialize) -> anyhow::Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    let mut file =
        std::fs::File::create(path).with_context(|| format!("cannot write {}", path.display()))?;
    serde_json::to_writer_pretty(&mut file, summary)?;
    writeln!(file)?;
    Ok(())
}
