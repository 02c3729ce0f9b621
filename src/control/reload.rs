//! Hot reload: read the config (and profile) again, validate, bind what is new, then hand the
//! shards the new snapshot and their new listener sockets, and close what left.
//!
//! A config that does not validate, or a new listener that cannot bind, changes nothing: the
//! running config stays and the error (with its `FILE:LINE:COL`) is the answer. An unchanged
//! listener keeps its sockets (its backlog and TCP options are changed in place), so no
//! connection is refused during a reload; established sessions carry on whatever happens to
//! their listener, pool or server. Keys that only a restart can apply are kept at their running
//! values and listed as pending.

use std::collections::HashMap;
use std::os::fd::AsFd;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

use serde_json::{Value, json};
use tracing::{info, warn};

use super::bind_listener;
use super::state::{Control, ReloadRecord};
use super::status::unix_seconds;
use crate::config::{Config, ConfigError};
use crate::snapshot::ListenerId;
use crate::uring::socket;

/// The keys whose change needs a restart, with their running values kept.
fn restart_only_changes(running: &Config, new: &mut Config) -> Vec<String> {
    let mut pending = Vec::new();
    if running.runtime.shards != new.runtime.shards {
        pending.push("runtime.shards".to_string());
        new.runtime.shards = running.runtime.shards;
    }
    if running.runtime.pin != new.runtime.pin {
        pending.push("runtime.pin".to_string());
        new.runtime.pin = running.runtime.pin.clone();
    }
    let tuning = [
        (
            "tuning.ring_entries",
            running.tuning.ring_entries != new.tuning.ring_entries,
        ),
        (
            "tuning.buffer_size",
            running.tuning.buffer_size != new.tuning.buffer_size,
        ),
        (
            "tuning.buffer_count",
            running.tuning.buffer_count != new.tuning.buffer_count,
        ),
        (
            "tuning.queued_buffers",
            running.tuning.queued_buffers != new.tuning.queued_buffers,
        ),
    ];
    for (key, changed) in tuning {
        if changed {
            pending.push(key.to_string());
        }
    }
    new.tuning = running.tuning.clone();
    match (&running.admin, &mut new.admin) {
        (None, None) => {}
        (Some(_), None) | (None, Some(_)) => {
            pending.push("admin".to_string());
            new.admin = running.admin.clone();
        }
        (Some(old), Some(admin)) => {
            if old.bind != admin.bind {
                pending.push("admin.bind".to_string());
                admin.bind = old.bind;
            }
            if old.max_connections != admin.max_connections {
                pending.push("admin.max_connections".to_string());
                admin.max_connections = old.max_connections;
            }
        }
    }
    pending
}

fn load(control: &Control) -> Result<Config, ConfigError> {
    let paths = &control.paths;
    match &paths.config {
        Some(path) => Config::load(path, paths.profile.as_deref()),
        None => Config::default_config().and_then(|mut config| {
            if let Some(profile) = &paths.profile {
                config.apply_profile(profile)?;
            }
            Ok(config)
        }),
    }
}

/// Runs a reload; answers (HTTP status, JSON body).
pub fn reload(control: &mut Control) -> (u16, Value) {
    let started = Instant::now();
    control.notifier.reloading();
    let outcome = apply(control);
    let duration_ms = started.elapsed().as_secs_f64() * 1000.0;
    let record = match outcome {
        Ok(pending) => {
            control.reloads.succeeded += 1;
            control.reloads.last_success = Some(SystemTime::now());
            info!(
                generation = control.snapshot.generation,
                duration_ms,
                pending_restart = ?pending,
                "config reloaded"
            );
            ReloadRecord {
                at: SystemTime::now(),
                ok: true,
                error: None,
                pending_restart: pending,
                generation: control.snapshot.generation,
                duration_ms,
            }
        }
        Err(error) => {
            control.reloads.failed += 1;
            warn!(%error, "reload failed; the running config stays");
            ReloadRecord {
                at: SystemTime::now(),
                ok: false,
                error: Some(error),
                pending_restart: control.pending_restart.clone(),
                generation: control.snapshot.generation,
                duration_ms,
            }
        }
    };
    control.notifier.ready("reloaded");
    let status = if record.ok { 200 } else { 400 };
    let body = json!({
        "result": if record.ok { "success" } else { "failure" },
        "error": record.error,
        "generation": record.generation,
        "pending_restart": record.pending_restart,
        "duration_ms": record.duration_ms,
        "at": unix_seconds(record.at),
    });
    control.reloads.last = Some(record);
    (status, body)
}

fn apply(control: &mut Control) -> Result<Vec<String>, String> {
    let mut new = load(control).map_err(|error| error.to_string())?;
    let pending = restart_only_changes(&control.config, &mut new);

    // Bind what is new before changing anything: a listener that cannot bind fails the reload.
    let mut fresh = Vec::new();
    let mut in_place = Vec::new();
    let mut wanted: HashMap<ListenerId, ()> = HashMap::new();
    for listener in &new.listeners {
        let id = control.ids.listener(&listener.name);
        wanted.insert(id, ());
        match control.listeners.get(&id) {
            Some(bound) if bound.configured == listener.bind => {
                let steering = crate::listener::steering(listener);
                if bound.backlog != listener.backlog
                    || bound.tcp != listener.tcp
                    || bound.steering != steering
                {
                    in_place.push((id, listener.backlog, listener.tcp, steering));
                }
            }
            _ => {
                let (bound, sockets) =
                    bind_listener(listener, control.shards).map_err(|error| error.to_string())?;
                fresh.push((id, listener.name.clone(), bound, sockets));
            }
        }
    }

    // Commit.
    for (id, backlog, tcp, steering) in in_place {
        if let Some(bound) = control.listeners.get_mut(&id) {
            if bound.steering != steering {
                let applied = bound.duplicates.first().map(|first| {
                    crate::listener::apply_steering(first.as_fd(), steering, control.shards)
                });
                match applied {
                    Some(Err(error)) => warn!(%error, "cannot change a listener's steering"),
                    _ => bound.steering = steering,
                }
            }
            for socket in &bound.duplicates {
                if let Err(error) = socket::relisten(socket.as_fd(), backlog) {
                    warn!(%error, "cannot change a listener's backlog in place");
                }
                if let Err(error) = socket::replace_tcp_options(socket.as_fd(), &tcp) {
                    warn!(%error, "cannot change a listener's TCP options in place");
                }
            }
            bound.backlog = backlog;
            bound.tcp = tcp;
        }
    }
    control.config = Arc::new(new);
    if control.overrides.reconcile(&control.config) {
        control.save_state();
    }
    control.publish();
    for (id, name, bound, sockets) in fresh {
        info!(listener = %name, addr = %bound.addr, shards = control.shards, "listener ready");
        control.runtime.add_listener(id, sockets);
        control.listeners.insert(id, bound);
    }
    let gone: Vec<ListenerId> = control
        .listeners
        .keys()
        .filter(|id| !wanted.contains_key(id))
        .copied()
        .collect();
    for id in gone {
        control.runtime.remove_listener(id);
        control.listeners.remove(&id);
    }
    control.pending_restart = pending.clone();
    Ok(pending)
}
