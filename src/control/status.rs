//! `/status` and `/ready`: what the running proxy says about itself, as JSON.
//!
//! The skeleton is a contract later features extend and never rename: `generation`,
//! `last_reload`, `shards`, `listeners`, `pools` (each with its `servers`).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use super::state::{Control, ReloadRecord};
use crate::metrics::{CloseKind, ListenerCounters, Merged, RejectKind};
use crate::snapshot::{Destination, ListenerSnapshot, PoolSnapshot, ServerSnapshot, ServerState};

pub fn unix_seconds(at: SystemTime) -> f64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0.0, |elapsed| elapsed.as_secs_f64())
}

/// The name of a destination's pool (`split` false) or split (`split` true); null when it is
/// the other kind.
fn destination_name(control: &Control, destination: Destination, split: bool) -> Option<String> {
    match destination {
        Destination::Pool(pool) if !split => control.snapshot.pool(pool).map(|p| p.name.clone()),
        Destination::Split(id) if split => control.snapshot.split(id).map(|s| s.name.clone()),
        _ => None,
    }
}

/// Each split's weights now and its sessions per side (open now and in all), with how often
/// its weights changed.
pub fn splits_json(control: &Control, merged: &Merged) -> Vec<Value> {
    control
        .snapshot
        .splits
        .iter()
        .map(|split| {
            let sides: Vec<Value> = split
                .backends
                .iter()
                .map(|(pool, weight)| {
                    let counters = merged
                        .splits
                        .get(&(split.id, *pool))
                        .cloned()
                        .unwrap_or_default();
                    json!({
                        "pool": control.snapshot.pool(*pool).map(|p| p.name.clone()),
                        "weight": weight,
                        "active": counters.active,
                        "sessions": counters.sessions,
                    })
                })
                .collect();
            json!({
                "name": split.name,
                "sticky": split.sticky.name(),
                "backends": sides,
                "weight_changes": control.split_changes.get(&split.id).copied().unwrap_or(0),
            })
        })
        .collect()
}

/// A listener's routes (conditions and pool, in order) and what its sniffing found; null for a
/// listener without routes.
fn routing_json(
    control: &Control,
    listener: &ListenerSnapshot,
    counters: &ListenerCounters,
) -> Value {
    let Some(routing) = &listener.routing else {
        return Value::Null;
    };
    let routes: Vec<Value> = routing
        .routes
        .iter()
        .map(|route| {
            let conditions = &route.conditions;
            json!({
                "protocol": conditions.protocol.map(|protocol| protocol.name()),
                "sni": conditions.sni.as_ref().map(|pattern| pattern.text()),
                "alpn": conditions.alpn,
                "host": conditions.host.as_ref().map(|pattern| pattern.text()),
                "path_prefix": conditions.path_prefix,
                "source": conditions.source.map(|network| network.to_string()),
                "pool": destination_name(control, route.target, false),
                "split": destination_name(control, route.target, true),
                "tls": match &route.tls {
                    crate::route::RouteTls::Listener => Value::Null,
                    crate::route::RouteTls::Passthrough => Value::from("passthrough"),
                    crate::route::RouteTls::Terminate(settings) => json!({
                        "certificates": settings.certificates.iter().map(|c| json!({
                            "names": c.names,
                            "cert": c.cert_path.display().to_string(),
                            "not_after": c.not_after,
                        })).collect::<Vec<_>>(),
                    }),
                },
            })
        })
        .collect();
    let detected: serde_json::Map<String, Value> = crate::metrics::Detection::ALL
        .iter()
        .zip(counters.detected)
        .map(|(detection, count)| (detection.name().to_string(), Value::from(count)))
        .collect();
    json!({
        "routes": routes,
        "unmatched": routing.unmatched.name(),
        "sniff_max_bytes": routing.sniff_max_bytes,
        "sniff_timeout_ms": routing.sniff_timeout.as_millis() as u64,
        "server_first_after_ms": routing.server_first_after.as_millis() as u64,
        "detected": detected,
        "sniff_timeouts": counters.sniff_timeouts,
        "unmatched_clients": counters.unmatched,
    })
}

/// A listener's TLS certificates (names, files, expiry) and handshake counts; null without TLS
/// (on the listener or its routes).
fn tls_json(listener: &ListenerSnapshot, counters: &ListenerCounters) -> Value {
    let failures: serde_json::Map<String, Value> = crate::metrics::TlsFailure::ALL
        .iter()
        .zip(counters.tls_failures)
        .map(|(failure, count)| (failure.name().to_string(), Value::from(count)))
        .collect();
    let Some(tls) = &listener.tls else {
        let routes_terminate = listener.routing.as_deref().is_some_and(|routing| {
            routing
                .routes
                .iter()
                .any(|route| matches!(route.tls, crate::route::RouteTls::Terminate(_)))
        });
        // Its routes terminate (their certificates are listed with them).
        return if routes_terminate {
            json!({
                "handshakes": { "full": counters.tls_full, "resumed": counters.tls_resumed },
                "failures": failures,
            })
        } else {
            Value::Null
        };
    };
    let settings = &tls.settings;
    let certificates: Vec<Value> = settings
        .certificates
        .iter()
        .map(|certificate| {
            json!({
                "names": certificate.names,
                "cert": certificate.cert_path.display().to_string(),
                "key": certificate.key_path.display().to_string(),
                "not_after": certificate.not_after,
            })
        })
        .collect();
    json!({
        "certificates": certificates,
        "default_certificate": match settings.default_certificate {
            crate::tls::DefaultCertificate::Index(index) => settings
                .certificates
                .get(index)
                .map_or(Value::Null, |c| Value::from(c.label())),
            crate::tls::DefaultCertificate::Reject => Value::from("reject"),
        },
        "alpn": settings.alpn.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>(),
        "min_version": if settings.min_version >= 0x0304 { "1.3" } else { "1.2" },
        "client_auth": settings.client_auth.name(),
        "session_tickets": settings.session_tickets,
        "cipher_suites": crate::tls::effective_cipher_suites(&settings.cipher_suites)
            .into_iter()
            .filter(|name| settings.min_version < 0x0304 || name.starts_with("TLS13_"))
            .collect::<Vec<_>>(),
        "handshakes": { "full": counters.tls_full, "resumed": counters.tls_resumed },
        "failures": failures,
    })
}

/// A listener's PROXY protocol settings and counts; null with `proxy_protocol = "off"`.
fn proxy_json(listener: &ListenerSnapshot, counters: &ListenerCounters) -> Value {
    let Some(proxy) = &listener.proxy else {
        return Value::Null;
    };
    let errors: serde_json::Map<String, Value> = crate::metrics::ProxyError::ALL
        .iter()
        .zip(counters.proxy_errors)
        .map(|(error, count)| (error.name().to_string(), Value::from(count)))
        .collect();
    json!({
        "mode": if proxy.required { "required" } else { "optional" },
        "trusted_proxies": proxy.trusted.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "headers": counters.proxy_headers,
        "errors": errors,
    })
}

/// A listener's admission settings and live state: its connection-rate bucket (tokens and
/// rate share per shard), its per-source table (addresses per shard, evictions).
fn admission_json(
    merged: &Merged,
    listener: &ListenerSnapshot,
    counters: &ListenerCounters,
) -> Value {
    let settings = &listener.admission;
    let networks =
        |list: &[ipnet::IpNet]| -> Vec<String> { list.iter().map(ToString::to_string).collect() };
    let limits = settings.limits.map(|limits| {
        json!({
            "connections_per_second": limits.per_second,
            "burst": limits.burst,
            "tokens": counters.rate_tokens,
            "per_shard_tokens": merged.per_shard(listener.id, |c| c.rate_tokens),
            "per_shard_share": merged.per_shard(listener.id, |c| c.rate_share),
        })
    });
    let per_source = settings.per_source.as_ref().map(|per_source| {
        json!({
            "connections_per_second": per_source.rate.map(|(rate, _)| rate),
            "burst": per_source.rate.map(|(_, burst)| burst),
            "max_connections": per_source.max_connections,
            "ipv6_prefix": per_source.ipv6_prefix,
            "table_size": per_source.table_size,
            "expire_ms": per_source.expire_us / 1000,
            "addresses": counters.sources,
            "per_shard_addresses": merged.per_shard(listener.id, |c| c.sources),
            "evictions": counters.source_evictions,
        })
    });
    json!({
        "steer": settings.steer.name(),
        "reject": settings.reject.name(),
        "first_byte_timeout_ms": settings.first_byte_timeout.map(|t| t.as_millis() as u64),
        "acl": {
            "allow": settings.acl.allow.as_deref().map(networks),
            "deny": networks(&settings.acl.deny),
        },
        "limits": limits,
        "per_source": per_source,
        "upload_rate": settings.upload_rate,
        "download_rate": settings.download_rate,
        "bandwidth": settings.bandwidth,
    })
}

fn reload_json(record: Option<&ReloadRecord>) -> Value {
    match record {
        None => Value::Null,
        Some(record) => json!({
            "at": unix_seconds(record.at),
            "result": if record.ok { "success" } else { "failure" },
            "error": record.error,
            "pending_restart": record.pending_restart,
            "generation": record.generation,
            "duration_ms": record.duration_ms,
        }),
    }
}

/// A pool none of whose servers can take sessions normally (all down, or none up).
pub fn all_down(pool: &PoolSnapshot) -> bool {
    !pool
        .servers
        .iter()
        .any(|server| server.state == ServerState::Up)
}

pub fn server_json(control: &Control, merged: &Merged, server: &ServerSnapshot) -> Value {
    let counters = merged.servers.get(&server.id).cloned().unwrap_or_default();
    let health = control.health.get(&server.id);
    let reason = match server.state {
        ServerState::Draining => "drained by an operator".to_string(),
        ServerState::Maint => "maintenance set by an operator".to_string(),
        ServerState::Removing => "deleted by an operator; waiting for its last session".to_string(),
        ServerState::Up | ServerState::Down => health.map_or_else(
            || "no health checks".to_string(),
            |health| health.tracker.reason.clone(),
        ),
    };
    let now = Instant::now();
    let last_check = health
        .and_then(|health| health.tracker.last.as_ref())
        .map(|(at, result)| {
            json!({
                "result": if result.ok { "success" } else { "failure" },
                "reason": result.reason,
                "duration_ms": result.duration.as_secs_f64() * 1000.0,
                "age_ms": now.saturating_duration_since(*at).as_millis() as u64,
            })
        });
    let passive: Vec<Value> = merged
        .shards
        .iter()
        .filter_map(|shard| {
            let (_, counters) = shard.servers.iter().find(|(id, _)| *id == server.id)?;
            Some(json!({
                "shard": shard.shard,
                "down": counters.passive_down > 0,
                "connect_failures": counters.connect_errors_total(),
            }))
        })
        .collect();
    let changes = health.map_or(0, |health| health.tracker.changes)
        + control.admin_changes.get(&server.id).copied().unwrap_or(0);
    json!({
        "name": server.name,
        "addr": server.addr.to_string(),
        "state": server.state.name(),
        "reason": reason,
        "backup": server.backup,
        "weight": server.weight,
        "effective_weight": server.effective_weight(),
        "active": counters.active,
        "total": counters.sessions,
        "failures": counters.connect_errors_total(),
        "connect_errors": crate::metrics::ConnectErrorKind::ALL
            .iter()
            .zip(counters.connect_errors)
            .map(|(kind, count)| (kind.name().to_string(), Value::from(count)))
            .collect::<serde_json::Map<String, Value>>(),
        "passive": passive,
        "state_changes": changes,
        "checks": health.map(|health| json!({
            "success": health.tracker.checks_ok,
            "failure": health.tracker.checks_failed,
        })),
        "last_check": last_check,
    })
}

/// A pool's `[pool.tls]`: what it verifies servers against and presents to them.
fn origin_json(tls: &crate::tls::OriginSettings) -> Value {
    json!({
        "verify": tls.verify,
        "ca": tls.ca.as_ref().map(crate::tls::CaSource::describe),
        "server_name": tls.server_name,
        "alpn": tls.alpn.iter().map(|p| String::from_utf8_lossy(p).into_owned()).collect::<Vec<_>>(),
        "client_certificate": tls.client_certificate.as_ref().map(|certificate| json!({
            "cert": certificate.cert_path.display().to_string(),
            "not_after": certificate.not_after,
        })),
        "check_tls": tls.check_tls,
        "session_reuse": tls.session_reuse,
        "cipher_suites": crate::tls::effective_cipher_suites(&tls.cipher_suites),
    })
}

pub fn pool_json(control: &Control, merged: &Merged, pool: &PoolSnapshot) -> Value {
    let config = control.config.pools.iter().find(|p| p.name == pool.name);
    let down = all_down(pool);
    json!({
        "name": pool.name,
        "balance": pool.balance.name(),
        "health_checks": config.and_then(|p| p.health.as_ref()).map(|check| check.kind.name()),
        "slow_start_ms": config.and_then(|p| p.slow_start).map(|d| d.as_millis() as u64),
        "tls": pool.tls.as_deref().map(origin_json),
        "all_servers_down": down,
        "note": if down {
            Value::from("no server is up: new sessions try the servers that are down anyway (as NGINX does)")
        } else {
            Value::Null
        },
        "bytes_to_server": merged.pools.get(&pool.id).map_or(0, |p| p.bytes_to_server),
        "bytes_to_client": merged.pools.get(&pool.id).map_or(0, |p| p.bytes_to_client),
        "servers": pool.servers.iter().map(|server| server_json(control, merged, server)).collect::<Vec<_>>(),
    })
}

pub fn status_json(control: &Control) -> Value {
    let merged = control.merged();
    let now = Instant::now();
    let shards: Vec<Value> = merged
        .shards
        .iter()
        .map(|shard| {
            json!({
                "id": shard.shard,
                "generation": shard.generation,
                "sessions": shard.sessions,
                "loop_turns": shard.stats.loop_turns,
                "completions": shard.stats.completions,
                "buffer_starvation": shard.stats.buffer_starvation,
                "buffers_free": shard.buffers_free,
                "timer_nodes": shard.timer_nodes,
                "spills": shard.stats.spills,
                "accepted": shard.stats.accepted,
                "heartbeat_age_ms": now.saturating_duration_since(shard.at).as_millis() as u64,
            })
        })
        .collect();
    let listeners: Vec<Value> = control
        .snapshot
        .listeners
        .iter()
        .map(|listener| {
            let counters = merged
                .listeners
                .get(&listener.id)
                .cloned()
                .unwrap_or_default();
            let bound = control.listeners.get(&listener.id);
            let rejected: serde_json::Map<String, Value> = RejectKind::ALL
                .iter()
                .zip(counters.rejected)
                .map(|(kind, count)| (kind.name().to_string(), Value::from(count)))
                .collect();
            let closed: serde_json::Map<String, Value> = CloseKind::ALL
                .iter()
                .zip(counters.closed)
                .map(|(kind, count)| (kind.name().to_string(), Value::from(count)))
                .collect();
            json!({
                "name": listener.name,
                "bind": bound.map_or(listener.bind, |b| b.addr).to_string(),
                "pool": destination_name(control, listener.target, false),
                "split": destination_name(control, listener.target, true),
                "active": counters.active,
                "accepted": counters.accepted,
                "rejected": counters.rejected_total(),
                "rejected_by_reason": rejected,
                "closed_by_reason": closed,
                "bytes_client_to_server": counters.bytes_client_to_server,
                "bytes_server_to_client": counters.bytes_server_to_client,
                "per_shard_accepted": merged.per_shard_accepted(listener.id),
                "bound_on_every_shard": merged.bound_everywhere(listener.id, control.shards),
                "max_connections": listener.max_connections.get(),
                "log": listener.log,
                "admission": admission_json(&merged, listener, &counters),
                "routing": routing_json(control, listener, &counters),
                "proxy_protocol": proxy_json(listener, &counters),
                "tls": tls_json(listener, &counters),
            })
        })
        .collect();
    let pools: Vec<Value> = control
        .snapshot
        .pools
        .iter()
        .map(|pool| pool_json(control, &merged, pool))
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "generation": control.snapshot.generation,
        "started": unix_seconds(control.started),
        "draining": control.draining,
        "last_reload": reload_json(control.reloads.last.as_ref()),
        "reloads": {"success": control.reloads.succeeded, "failure": control.reloads.failed},
        "pending_restart": control.pending_restart,
        "shards": shards,
        "listeners": listeners,
        "pools": pools,
        "splits": splits_json(control, &merged),
    })
}

/// Why the proxy is not ready (empty: ready): every listener bound on every shard, and every
/// pool with a server that is up.
pub fn not_ready_reasons(control: &Control) -> Vec<String> {
    let merged = control.merged();
    let mut reasons = Vec::new();
    if control.draining {
        reasons.push("draining for shutdown".to_string());
    }
    for listener in &control.snapshot.listeners {
        if !merged.bound_everywhere(listener.id, control.shards) {
            reasons.push(format!(
                "listener {:?} is not bound on every shard yet",
                listener.name
            ));
        }
    }
    for pool in &control.snapshot.pools {
        if all_down(pool) {
            reasons.push(format!("pool {:?} has no server up", pool.name));
        }
    }
    reasons
}
