//! `/metrics`: every shard's slot summed, plus the control thread's own figures (health
//! checks, reloads, server states) and the standard `process_*` metrics, as Prometheus text.

use super::state::Control;
use super::status::{all_down, unix_seconds};
use crate::metrics::names::*;
use crate::metrics::render::Exposition;
use crate::metrics::{
    CONNECT_BUCKETS, CloseKind, ConnectErrorKind, Detection, Histogram, ListenerCounters, Merged,
    ProxyError, RejectKind, SESSION_BUCKETS, ShardPublished, TlsFailure,
};
use crate::snapshot::{ListenerSnapshot, PoolSnapshot, ServerSnapshot, ServerState, Snapshot};

/// One sample per listener of a family whose value is a listener counter.
struct ListenerFamilies<'a> {
    snapshot: &'a Snapshot,
    merged: &'a Merged,
}

impl ListenerFamilies<'_> {
    fn family(
        &self,
        out: &mut Exposition,
        (name, kind): (&str, &str),
        help: &str,
        include: impl Fn(&ListenerSnapshot) -> bool,
        value: impl Fn(&ListenerCounters) -> f64,
    ) {
        out.family(name, kind, help);
        let empty = ListenerCounters::default();
        for listener in self.snapshot.listeners.iter().filter(|l| include(l)) {
            let counters = self.merged.listeners.get(&listener.id).unwrap_or(&empty);
            out.sample(name, &[("listener", &listener.name)], value(counters));
        }
    }
}

/// The build's commit, when the build knew it.
const COMMIT: &str = match option_env!("RINGPROXY_COMMIT") {
    Some(commit) => commit,
    None => "unknown",
};

pub fn render(control: &Control) -> String {
    let merged = control.merged();
    let snapshot = &control.snapshot;
    let mut out = Exposition::default();

    out.family(BUILD_INFO, "gauge", "Build information (always 1).");
    out.sample(
        BUILD_INFO,
        &[("version", env!("CARGO_PKG_VERSION")), ("commit", COMMIT)],
        1.0,
    );

    let listeners = ListenerFamilies {
        snapshot,
        merged: &merged,
    };
    listeners.family(
        &mut out,
        (CONNECTIONS_ACCEPTED, "counter"),
        "Client connections accepted, per listener.",
        |_| true,
        |c| c.accepted as f64,
    );
    out.family(
        CONNECTIONS_REJECTED,
        "counter",
        "Client connections turned away before becoming a session, per listener and reason.",
    );
    for listener in &snapshot.listeners {
        let counters = merged.listeners.get(&listener.id);
        for (index, kind) in RejectKind::ALL.iter().enumerate() {
            let count = counters.map_or(0, |c| c.rejected[index]);
            out.sample(
                CONNECTIONS_REJECTED,
                &[("listener", &listener.name), ("reason", kind.name())],
                count as f64,
            );
        }
    }
    listeners.family(
        &mut out,
        (LISTENER_RATE_TOKENS, "gauge"),
        "Tokens in the listener-wide connection-rate buckets (all shards), per listener with [listener.limits].",
        |l| l.admission.limits.is_some(),
        |c| c.rate_tokens as f64,
    );
    listeners.family(
        &mut out,
        (SOURCE_TABLE_ENTRIES, "gauge"),
        "Client addresses in the per-source tables (all shards), per listener with [listener.per_source].",
        |l| l.admission.per_source.is_some(),
        |c| c.sources as f64,
    );
    listeners.family(
        &mut out,
        (SOURCE_TABLE_EVICTIONS, "counter"),
        "Addresses evicted from full per-source tables, per listener.",
        |l| l.admission.per_source.is_some(),
        |c| c.source_evictions as f64,
    );
    out.family(
        LISTENER_DETECTED,
        "counter",
        "Clients of listeners with routes, by what sniffing found (a protocol, silence or unknown).",
    );
    for listener in snapshot.listeners.iter().filter(|l| l.routing.is_some()) {
        let counters = merged.listeners.get(&listener.id);
        for (index, detection) in Detection::ALL.iter().enumerate() {
            let count = counters.map_or(0, |c| c.detected[index]);
            out.sample(
                LISTENER_DETECTED,
                &[("listener", &listener.name), ("protocol", detection.name())],
                count as f64,
            );
        }
    }
    out.family(
        LISTENER_ROUTED,
        "counter",
        "Clients of listeners with routes, by the route that sent them (its position, 1 first, or default) and where it sent them.",
    );
    for listener in &snapshot.listeners {
        let Some(routing) = &listener.routing else {
            continue;
        };
        let counters = merged.listeners.get(&listener.id);
        let count =
            |slot: usize| counters.map_or(0, |c| c.routed.get(slot).copied().unwrap_or(0)) as f64;
        for (position, route) in routing.routes.iter().enumerate() {
            let route_label = (position + 1).to_string();
            out.sample(
                LISTENER_ROUTED,
                &[
                    ("listener", &listener.name),
                    ("route", &route_label),
                    ("to", &destination_label(snapshot, route.target)),
                ],
                count(position),
            );
        }
        out.sample(
            LISTENER_ROUTED,
            &[
                ("listener", &listener.name),
                ("route", "default"),
                ("to", &destination_label(snapshot, listener.target)),
            ],
            count(routing.routes.len()),
        );
    }
    listeners.family(
        &mut out,
        (LISTENER_SNIFF_TIMEOUTS, "counter"),
        "Clients that sent nothing decisive within sniff_timeout or sniff_max_bytes, per listener with routes.",
        |l| l.routing.is_some(),
        |c| c.sniff_timeouts as f64,
    );
    listeners.family(
        &mut out,
        (LISTENER_UNMATCHED, "counter"),
        "Clients no route matched (sent to the listener's pool, or refused with unmatched = \"reject\"), per listener with routes.",
        |l| l.routing.is_some(),
        |c| c.unmatched as f64,
    );
    listeners.family(
        &mut out,
        (LISTENER_PROXY_HEADERS, "counter"),
        "PROXY protocol headers taken from trusted peers, per listener with proxy_protocol on.",
        |l| l.proxy.is_some(),
        |c| c.proxy_headers as f64,
    );
    out.family(
        LISTENER_PROXY_ERRORS,
        "counter",
        "Connections refused for their PROXY protocol header, by reason: untrusted (a header from a peer not in trusted_proxies), missing (required but absent), invalid, timeout.",
    );
    for listener in snapshot.listeners.iter().filter(|l| l.proxy.is_some()) {
        let counters = merged.listeners.get(&listener.id);
        for (index, error) in ProxyError::ALL.iter().enumerate() {
            let count = counters.map_or(0, |c| c.proxy_errors[index]);
            out.sample(
                LISTENER_PROXY_ERRORS,
                &[("listener", &listener.name), ("reason", error.name())],
                count as f64,
            );
        }
    }
    tls_families(snapshot, &merged, &mut out);
    split_families(control, &merged, &mut out);
    listeners.family(
        &mut out,
        (CONNECTIONS_ACTIVE, "gauge"),
        "Sessions open now, per listener.",
        |_| true,
        |c| f64::from(c.active),
    );
    out.family(
        SESSIONS_CLOSED,
        "counter",
        "Sessions ended, per listener and reason (the reason names the side).",
    );
    for listener in &snapshot.listeners {
        let counters = merged.listeners.get(&listener.id);
        for (index, kind) in CloseKind::ALL.iter().enumerate() {
            let count = counters.map_or(0, |c| c.closed[index]);
            out.sample(
                SESSIONS_CLOSED,
                &[("listener", &listener.name), ("reason", kind.name())],
                count as f64,
            );
        }
    }
    out.family(
        SESSION_DURATION,
        "histogram",
        "Session durations, per listener.",
    );
    let empty_sessions = Histogram::new(&SESSION_BUCKETS);
    for listener in &snapshot.listeners {
        let histogram = merged
            .listeners
            .get(&listener.id)
            .map_or(&empty_sessions, |l| &l.session_duration);
        out.histogram(SESSION_DURATION, &[("listener", &listener.name)], histogram);
    }
    out.family(
        LISTENER_BYTES,
        "counter",
        "Bytes relayed, per listener and direction.",
    );
    for listener in &snapshot.listeners {
        let counters = merged.listeners.get(&listener.id);
        out.sample(
            LISTENER_BYTES,
            &[
                ("listener", &listener.name),
                ("direction", "client_to_server"),
            ],
            counters.map_or(0, |c| c.bytes_client_to_server) as f64,
        );
        out.sample(
            LISTENER_BYTES,
            &[
                ("listener", &listener.name),
                ("direction", "server_to_client"),
            ],
            counters.map_or(0, |c| c.bytes_server_to_client) as f64,
        );
    }

    out.family(
        POOL_BYTES,
        "counter",
        "Bytes relayed, per pool and direction.",
    );
    for pool in &snapshot.pools {
        let counters = merged.pools.get(&pool.id);
        out.sample(
            POOL_BYTES,
            &[("pool", &pool.name), ("direction", "client_to_server")],
            counters.map_or(0, |c| c.bytes_to_server) as f64,
        );
        out.sample(
            POOL_BYTES,
            &[("pool", &pool.name), ("direction", "server_to_client")],
            counters.map_or(0, |c| c.bytes_to_client) as f64,
        );
    }
    out.family(
        POOL_CONNECT_DURATION,
        "histogram",
        "Time to connect to a server, per pool (successful connects).",
    );
    let empty_connects = Histogram::new(&crate::metrics::CONNECT_BUCKETS);
    for pool in &snapshot.pools {
        let histogram = merged
            .pools
            .get(&pool.id)
            .map_or(&empty_connects, |p| &p.connect_time);
        out.histogram(POOL_CONNECT_DURATION, &[("pool", &pool.name)], histogram);
    }
    out.family(
        POOL_ALL_DOWN,
        "gauge",
        "1 when no server of the pool is up (new sessions then try the down ones anyway).",
    );
    for pool in &snapshot.pools {
        out.sample(
            POOL_ALL_DOWN,
            &[("pool", &pool.name)],
            f64::from(u8::from(all_down(pool))),
        );
    }

    let servers: Vec<ServerRow> = snapshot
        .pools
        .iter()
        .flat_map(|pool| {
            pool.servers
                .iter()
                .map(move |server| (pool.as_ref(), server))
        })
        .collect();
    let counters =
        |server: &ServerSnapshot| merged.servers.get(&server.id).cloned().unwrap_or_default();
    per_server(
        &mut out,
        &servers,
        SERVER_SESSIONS_ACTIVE,
        "gauge",
        "Sessions on the server now.",
        None,
        |server| vec![("", f64::from(counters(server).active))],
    );
    per_server(
        &mut out,
        &servers,
        SERVER_SESSIONS,
        "counter",
        "Sessions connected to the server.",
        None,
        |server| vec![("", counters(server).sessions as f64)],
    );
    per_server(
        &mut out,
        &servers,
        SERVER_STATE,
        "gauge",
        "The server's state: 1 for the state it is in, 0 for the others.",
        Some("state"),
        |server| {
            ServerState::ALL
                .iter()
                .map(|&state| (state.name(), f64::from(u8::from(server.state == state))))
                .collect()
        },
    );
    per_server(
        &mut out,
        &servers,
        SERVER_WEIGHT,
        "gauge",
        "The server's weight in effect (slow start applied).",
        None,
        |server| vec![("", server.effective_weight())],
    );
    per_server(
        &mut out,
        &servers,
        SERVER_CONNECT_ERRORS,
        "counter",
        "Failed connects to the server, by kind.",
        Some("kind"),
        |server| {
            let errors = counters(server).connect_errors;
            ConnectErrorKind::ALL
                .iter()
                .zip(errors)
                .map(|(kind, count)| (kind.name(), count as f64))
                .collect()
        },
    );
    per_server(
        &mut out,
        &servers,
        SERVER_PASSIVE_DOWN_SHARDS,
        "gauge",
        "Shards on which passive health (max_fails) skips the server now.",
        None,
        |server| vec![("", f64::from(counters(server).passive_down))],
    );
    per_server(
        &mut out,
        &servers,
        SERVER_STATE_CHANGES,
        "counter",
        "State changes of the server (health checks and operators).",
        None,
        |server| {
            let changes = control
                .health
                .get(&server.id)
                .map_or(0, |h| h.tracker.changes)
                + control.admin_changes.get(&server.id).copied().unwrap_or(0);
            vec![("", changes as f64)]
        },
    );
    per_server(
        &mut out,
        &servers,
        HEALTH_CHECKS,
        "counter",
        "Active health checks run, per server and result.",
        Some("result"),
        |server| match control.health.get(&server.id) {
            Some(health) => vec![
                ("success", health.tracker.checks_ok as f64),
                ("failure", health.tracker.checks_failed as f64),
            ],
            None => Vec::new(),
        },
    );
    per_server(
        &mut out,
        &servers,
        HEALTH_CHECK_DURATION,
        "gauge",
        "How long the server's last health check took.",
        None,
        |server| {
            control
                .health
                .get(&server.id)
                .and_then(|health| health.tracker.last.as_ref())
                .map(|(_, result)| vec![("", result.duration.as_secs_f64())])
                .unwrap_or_default()
        },
    );

    out.family(RELOADS, "counter", "Config reloads, by result.");
    out.sample(
        RELOADS,
        &[("result", "success")],
        control.reloads.succeeded as f64,
    );
    out.sample(
        RELOADS,
        &[("result", "failure")],
        control.reloads.failed as f64,
    );
    out.family(
        LAST_RELOAD_SUCCESS,
        "gauge",
        "When the config was last loaded successfully (the start counts).",
    );
    let last = control.reloads.last_success.unwrap_or(control.started);
    out.sample(LAST_RELOAD_SUCCESS, &[], unix_seconds(last));
    out.family(
        CONFIG_GENERATION,
        "gauge",
        "The snapshot generation the proxy runs.",
    );
    out.sample(CONFIG_GENERATION, &[], snapshot.generation as f64);

    type ShardValue = fn(&ShardPublished) -> f64;
    let shard_families: [(&str, &str, &str, ShardValue); 5] = [
        (
            SHARD_BUFFER_STARVATION,
            "counter",
            "Receives that found the shard's buffer ring empty.",
            |shard| shard.stats.buffer_starvation as f64,
        ),
        (
            SHARD_LOOP_TURNS,
            "counter",
            "Loop turns of the shard.",
            |shard| shard.stats.loop_turns as f64,
        ),
        (
            SHARD_SESSIONS,
            "gauge",
            "Sessions the shard holds now.",
            |shard| shard.sessions as f64,
        ),
        (
            SHARD_BUFFERS_FREE,
            "gauge",
            "Receive buffers of the shard's ring not in use.",
            |shard| f64::from(shard.buffers_free),
        ),
        (
            SHARD_TIMER_NODES,
            "gauge",
            "Entries the shard's timer wheel has allocated (its high-water mark: bounded by the most sessions live at once, not by the connections made).",
            |shard| shard.timer_nodes as f64,
        ),
    ];
    for (name, kind, help, value) in shard_families {
        out.family(name, kind, help);
        for shard in &merged.shards {
            let label = shard.shard.to_string();
            out.sample(name, &[("shard", &label)], value(shard.as_ref()));
        }
    }
    out.family(
        LOG_LINES_DROPPED,
        "counter",
        "Log lines dropped because the log writer's queue was full.",
    );
    out.sample(LOG_LINES_DROPPED, &[], (control.dropped_logs)() as f64);

    process_metrics(&mut out);
    out.finish()
}

/// A server of a pool, as the per-server families list them.
type ServerRow<'a> = (&'a PoolSnapshot, &'a ServerSnapshot);

/// One per-server family: for each server, the samples `values` gives, labelled with its pool
/// and name, and with `extra` set to each sample's label value when given.
fn per_server(
    out: &mut Exposition,
    servers: &[ServerRow],
    name: &str,
    kind: &str,
    help: &str,
    extra: Option<&str>,
    values: impl Fn(&ServerSnapshot) -> Vec<(&'static str, f64)>,
) {
    out.family(name, kind, help);
    for (pool, server) in servers {
        for (label, value) in values(server) {
            let mut labels = vec![
                ("pool", pool.name.as_str()),
                ("server", server.name.as_str()),
            ];
            if let Some(extra) = extra {
                labels.push((extra, label));
            }
            out.sample(name, &labels, value);
        }
    }
}

/// The standard `process_*` metrics, read from /proc.
fn process_metrics(out: &mut Exposition) {
    let ticks = crate::uring::socket::clock_ticks();
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or(Vec::new(), |(_, rest)| rest.split_whitespace().collect());
    let field = |index: usize| -> f64 {
        fields
            .get(index)
            .and_then(|value| value.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // In the fields after ')': state is 0, utime 11, stime 12, starttime 19, vsize 20, rss 21.
    let cpu = (field(11) + field(12)) / ticks;
    out.family(
        PROCESS_CPU,
        "counter",
        "User and system CPU time spent, in seconds.",
    );
    out.sample(PROCESS_CPU, &[], cpu);
    let page_size = crate::uring::socket::page_size();
    out.family(
        PROCESS_RESIDENT_MEMORY,
        "gauge",
        "Resident memory size in bytes.",
    );
    out.sample(PROCESS_RESIDENT_MEMORY, &[], field(21) * page_size);
    out.family(
        PROCESS_VIRTUAL_MEMORY,
        "gauge",
        "Virtual memory size in bytes.",
    );
    out.sample(PROCESS_VIRTUAL_MEMORY, &[], field(20));
    let boot = std::fs::read_to_string("/proc/stat")
        .unwrap_or_default()
        .lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse::<f64>().ok())
        .unwrap_or(0.0);
    out.family(
        PROCESS_START_TIME,
        "gauge",
        "Start time of the process since the Unix epoch, in seconds.",
    );
    out.sample(PROCESS_START_TIME, &[], boot + field(19) / ticks);
    let open = std::fs::read_dir("/proc/self/fd").map_or(0, |entries| entries.count());
    out.family(PROCESS_OPEN_FDS, "gauge", "Open file descriptors.");
    out.sample(PROCESS_OPEN_FDS, &[], open as f64);
    out.family(PROCESS_MAX_FDS, "gauge", "Maximum open file descriptors.");
    out.sample(
        PROCESS_MAX_FDS,
        &[],
        crate::uring::socket::open_file_limit() as f64,
    );
}

/// Each split's weights, sessions per side and weight changes.
fn split_families(control: &Control, merged: &Merged, out: &mut Exposition) {
    let snapshot = &control.snapshot;
    let sides = || {
        snapshot.splits.iter().flat_map(|split| {
            split.backends.iter().map(move |(pool, weight)| {
                let name = snapshot.pool(*pool).map_or("", |p| p.name.as_str());
                let counters = merged
                    .splits
                    .get(&(split.id, *pool))
                    .cloned()
                    .unwrap_or_default();
                (split.name.as_str(), name, *weight, counters)
            })
        })
    };
    out.family(
        SPLIT_WEIGHT,
        "gauge",
        "Each split's weight per pool now (the file's, or an operator's).",
    );
    for (split, pool, weight, _) in sides() {
        out.sample(
            SPLIT_WEIGHT,
            &[("split", split), ("pool", pool)],
            f64::from(weight),
        );
    }
    out.family(
        SPLIT_ACTIVE,
        "gauge",
        "Sessions a split sent to each pool that are open now.",
    );
    for (split, pool, _, counters) in sides() {
        out.sample(
            SPLIT_ACTIVE,
            &[("split", split), ("pool", pool)],
            f64::from(counters.active),
        );
    }
    out.family(
        SPLIT_SESSIONS,
        "counter",
        "Sessions a split sent to each pool.",
    );
    for (split, pool, _, counters) in sides() {
        out.sample(
            SPLIT_SESSIONS,
            &[("split", split), ("pool", pool)],
            counters.sessions as f64,
        );
    }
    out.family(
        SPLIT_CHANGES,
        "counter",
        "Changes of each split's weights (admin API or reload).",
    );
    for split in &snapshot.splits {
        let changes = control.split_changes.get(&split.id).copied().unwrap_or(0);
        out.sample(
            SPLIT_CHANGES,
            &[("split", split.name.as_str())],
            changes as f64,
        );
    }
}

/// A route's or listener's destination as a label value: `pool:NAME` or `split:NAME`.
fn destination_label(snapshot: &Snapshot, destination: crate::snapshot::Destination) -> String {
    match destination {
        crate::snapshot::Destination::Pool(pool) => format!(
            "pool:{}",
            snapshot.pool(pool).map_or("", |p| p.name.as_str())
        ),
        crate::snapshot::Destination::Split(split) => format!(
            "split:{}",
            snapshot.split(split).map_or("", |s| s.name.as_str())
        ),
    }
}

/// A listener's counts by the values of one label.
type LabelCounts = dyn Fn(&ListenerSnapshot, &ListenerCounters) -> Vec<(String, u64)>;

/// TLS handshakes, failures, versions and durations per TLS listener, and each certificate's
/// expiry.
fn tls_families(snapshot: &Snapshot, merged: &Merged, out: &mut Exposition) {
    fn route_certificates(
        listener: &crate::snapshot::ListenerSnapshot,
    ) -> Vec<&crate::tls::Certificate> {
        listener
            .routing
            .iter()
            .flat_map(|routing| &routing.routes)
            .filter_map(|route| match &route.tls {
                crate::route::RouteTls::Terminate(settings) => Some(settings.certificates.iter()),
                _ => None,
            })
            .flatten()
            .collect()
    }
    // Listeners that terminate TLS themselves or on a route.
    let tls_listeners = || {
        snapshot
            .listeners
            .iter()
            .filter(|l| l.tls.is_some() || !route_certificates(l).is_empty())
    };
    let empty = ListenerCounters::default();
    // Counters per TLS listener and one label.
    let labelled =
        |out: &mut Exposition, (name, help, key): (&str, &str, &str), counts: &LabelCounts| {
            out.family(name, "counter", help);
            for listener in tls_listeners() {
                let counters = merged.listeners.get(&listener.id).unwrap_or(&empty);
                for (label, count) in counts(listener, counters) {
                    out.sample(
                        name,
                        &[("listener", &listener.name), (key, &label)],
                        count as f64,
                    );
                }
            }
        };
    labelled(
        out,
        (
            TLS_HANDSHAKES,
            "TLS handshakes completed, per listener, by result: full or resumed (session ticket).",
            "result",
        ),
        &|_, c| {
            vec![
                ("full".into(), c.tls_full),
                ("resumed".into(), c.tls_resumed),
            ]
        },
    );
    labelled(
        out,
        (
            TLS_HANDSHAKE_FAILURES,
            "TLS handshakes that failed, per listener, by reason: timeout, client_closed, protocol (no TLS, or broken), incompatible (no version, cipher or ALPN in common), no_certificate, client_certificate (mTLS), other.",
            "reason",
        ),
        &|_, c| {
            TlsFailure::ALL
                .iter()
                .zip(c.tls_failures)
                .map(|(failure, count)| (failure.name().to_string(), count))
                .collect()
        },
    );
    labelled(
        out,
        (
            TLS_VERSIONS,
            "TLS handshakes completed, per listener and protocol version.",
            "version",
        ),
        &|_, c| {
            vec![
                ("1.2".into(), c.tls_versions[0]),
                ("1.3".into(), c.tls_versions[1]),
            ]
        },
    );
    labelled(
        out,
        (
            TLS_ALPN,
            "TLS handshakes completed, per listener, by the ALPN protocol chosen (none: the client offered none the listener has).",
            "protocol",
        ),
        &|listener, c| {
            let offered = listener
                .tls
                .as_ref()
                .map_or(&[][..], |tls| &tls.settings.alpn[..]);
            offered
                .iter()
                .map(|p| String::from_utf8_lossy(p).into_owned())
                .chain(std::iter::once("none".to_string()))
                .enumerate()
                .map(|(index, name)| (name, c.tls_alpn.get(index).copied().unwrap_or(0)))
                .collect()
        },
    );
    out.family(
        TLS_HANDSHAKE_DURATION,
        "histogram",
        "Time from accept to a completed TLS handshake, per listener.",
    );
    let empty_time = Histogram::new(&CONNECT_BUCKETS);
    for listener in tls_listeners() {
        let histogram = merged
            .listeners
            .get(&listener.id)
            .map_or(&empty_time, |l| &l.tls_handshake_time);
        out.histogram(
            TLS_HANDSHAKE_DURATION,
            &[("listener", &listener.name)],
            histogram,
        );
    }
    out.family(
        TLS_CERTIFICATE_EXPIRY,
        "gauge",
        "When each loaded certificate expires (its notAfter, Unix seconds), per listener, labelled by the certificate's first DNS name.",
    );
    for listener in tls_listeners() {
        let own = listener
            .tls
            .iter()
            .flat_map(|tls| tls.settings.certificates.iter());
        // One series per name: a name served by several certificates (the listener's and a
        // route's) shows the one that expires first.
        let mut soonest = std::collections::BTreeMap::new();
        for certificate in own.chain(route_certificates(listener)) {
            let at = soonest
                .entry(certificate.label())
                .or_insert(certificate.not_after);
            *at = (*at).min(certificate.not_after);
        }
        for (label, not_after) in soonest {
            out.sample(
                TLS_CERTIFICATE_EXPIRY,
                &[("listener", &listener.name), ("certificate", label)],
                not_after as f64,
            );
        }
    }
}
