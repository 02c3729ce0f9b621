//! Unit tests of config resolution.

use super::*;

const MINIMAL: &str = r#"
[[listener]]
name = "front"
bind = "127.0.0.1:8080"
pool = "app"

[[pool]]
name = "app"
servers = [ { addr = "127.0.0.1:9001" } ]
"#;

#[test]
fn minimal_config_gets_defaults() {
    let config = Config::parse("t.toml", MINIMAL).expect("valid");
    assert_eq!(config.runtime.shards, Shards::Auto);
    assert_eq!(config.runtime.drain_timeout, DEFAULT_DRAIN_TIMEOUT);
    let listener = &config.listeners[0];
    assert_eq!(listener.max_connections.get(), DEFAULT_MAX_CONNECTIONS);
    assert_eq!(listener.idle_timeout, DEFAULT_IDLE_TIMEOUT);
    let pool = &config.pools[0];
    assert_eq!(pool.balance, Algorithm::RoundRobin);
    assert_eq!(pool.retries, DEFAULT_RETRIES);
    assert_eq!(pool.servers[0].weight.get(), 1);
}

#[test]
fn connection_options_resolve_and_print_back() {
    let text = MINIMAL
        .replace(
            "pool = \"app\"\n",
            "pool = \"app\"\nwrite_timeout = \"2s\"\ntcp_keepalive = { idle = \"30s\" }\ntcp_user_timeout = \"20s\"\n",
        )
        .replace(
            "name = \"app\"\n",
            "name = \"app\"\nsource_addresses = [\"127.0.0.2-127.0.0.4\", \"127.0.0.9\"]\ntcp_keepalive = { idle = \"5s\", interval = \"1s\", count = 3 }\n",
        );
    let config = Config::parse("t.toml", &text).expect("valid");
    let listener = &config.listeners[0];
    assert_eq!(listener.write_timeout, Duration::from_secs(2));
    assert_eq!(
        listener.tcp.keepalive,
        Some(Keepalive {
            idle: Duration::from_secs(30),
            interval: Duration::from_secs(10),
            count: 6
        })
    );
    assert_eq!(listener.tcp.user_timeout, Some(Duration::from_secs(20)));
    let pool = &config.pools[0];
    let sources: Vec<String> = pool
        .source_addresses
        .iter()
        .map(|ip| ip.to_string())
        .collect();
    assert_eq!(
        sources,
        ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.9"]
    );
    assert_eq!(pool.tcp.keepalive.map(|k| k.count), Some(3));
    let again = Config::parse("printed", &config.to_toml()).expect("printed parses");
    assert_eq!(config, again);
    assert_eq!(
        Config::parse("t.toml", MINIMAL).expect("valid").listeners[0].write_timeout,
        DEFAULT_WRITE_TIMEOUT
    );
}

#[test]
fn bad_connection_options_are_located() {
    for (needle, replacement, message) in [
        (
            "pool = \"app\"\n",
            "pool = \"app\"\nwrite_timeout = \"0s\"\n",
            "write_timeout must be greater than zero",
        ),
        (
            "pool = \"app\"\n",
            "pool = \"app\"\ntcp_keepalive = { idle = \"1500ms\" }\n",
            "whole seconds",
        ),
        (
            "pool = \"app\"\n",
            "pool = \"app\"\ntcp_keepalive = { idel = \"1s\" }\n",
            "unknown field",
        ),
        (
            "pool = \"app\"\n",
            "pool = \"app\"\ntcp_user_timeout = \"0s\"\n",
            "tcp_user_timeout",
        ),
        (
            "name = \"app\"\n",
            "name = \"app\"\nsource_addresses = [\"127.0.0.9-127.0.0.2\"]\n",
            "runs backwards",
        ),
        (
            "name = \"app\"\n",
            "name = \"app\"\nsource_addresses = [\"localhost\"]\n",
            "invalid source address",
        ),
        (
            "name = \"app\"\n",
            "name = \"app\"\nsource_addresses = [\"::1\"]\n",
            "no source address of its family",
        ),
        (
            "name = \"app\"\n",
            "name = \"app\"\nsource_addresses = [\"10.0.0.0-10.1.0.0\"]\n",
            "larger than",
        ),
    ] {
        let text = MINIMAL.replacen(needle, replacement, 1);
        let error = Config::parse("t.toml", &text).expect_err(replacement);
        assert!(error.message.contains(message), "{replacement}: {error}");
        assert!(error.line > 1, "{error}");
    }
}

#[test]
fn embedded_default_resolves() {
    let config = Config::default_config().expect("embedded default is valid");
    assert!(!config.listeners.is_empty());
}

#[test]
fn printed_config_parses_back_to_the_same() {
    let config = Config::default_config().expect("valid");
    let printed = config.to_toml();
    let again = Config::parse("printed", &printed).expect("printed config parses");
    assert_eq!(config, again);
}

#[test]
fn error_points_at_line_and_column() {
    let text = MINIMAL.replace("127.0.0.1:9001", "nonsense");
    let error = Config::parse("t.toml", &text).expect_err("bad addr");
    assert_eq!((error.line, error.column), (9, 22), "{error}");
    assert!(
        error
            .to_string()
            .starts_with("t.toml:9:22: invalid address")
    );
}

/// Mutated configs (bytes dropped, inserted, replaced) resolve or fail with a location
/// inside the text; none panics.
#[test]
fn mutated_configs_never_panic() {
    let seed_text = include_str!("../../systemd/ringproxy.toml");
    let alphabet = b"[]{}=\",.:0123456789abcdefghijklmnopqrstuvwxyz_ \n#-";
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let (mut accepted, mut rejected) = (0, 0);
    for _ in 0..3000 {
        let mut bytes = seed_text.as_bytes().to_vec();
        for _ in 0..1 + next() % 4 {
            let at = (next() % bytes.len() as u64) as usize;
            let byte = alphabet[(next() % alphabet.len() as u64) as usize];
            match next() % 3 {
                0 => {
                    bytes.remove(at);
                }
                1 => bytes.insert(at, byte),
                _ => bytes[at] = byte,
            }
        }
        let text = String::from_utf8_lossy(&bytes);
        match Config::parse("fuzz.toml", &text) {
            Ok(_) => accepted += 1,
            Err(error) => {
                rejected += 1;
                let lines = text.lines().count().max(1);
                assert!(
                    error.line >= 1 && error.line <= lines + 1,
                    "{error} in\n{text}"
                );
                assert!(!error.message.is_empty());
            }
        }
    }
    assert!(
        accepted > 0 && rejected > 0,
        "{accepted} accepted, {rejected} rejected"
    );
}

#[test]
fn profile_overlays_only_tuning() {
    let mut config = Config::parse("t.toml", MINIMAL).expect("valid");
    config
        .apply_profile_text("p.toml", "[tuning]\nbuffer_size = 65536\n")
        .expect("valid profile");
    assert_eq!(config.tuning.buffer_size, 65536);
    assert_eq!(config.tuning.ring_entries, Tuning::default().ring_entries);
    let error = config
        .apply_profile_text("p.toml", "[runtime]\nshards = 2\n")
        .expect_err("profiles carry only [tuning]");
    assert_eq!(error.line, 1);
}

const ADMISSION: &str = r#"
[runtime]
max_connections = 5000

[[listener]]
name = "front"
bind = "127.0.0.1:8080"
pool = "app"
steer = "source"
reject = "reset"
first_byte_timeout = "3s"
upload_rate = 1048576
download_rate = 2097152
bandwidth = 100000000
[listener.limits]
connections_per_second = 1000
[listener.per_source]
connections_per_second = 20
max_connections = 50
ipv6_prefix = 56
[listener.acl]
allow = ["127.0.0.1/8", "::1"]
deny = ["127.0.0.66"]

[[pool]]
name = "app"
servers = [ { addr = "127.0.0.1:9001" } ]
"#;

#[test]
fn admission_keys_resolve_with_defaults_and_print_back() {
    use crate::admission::{RejectMode, Steer};
    let config = Config::parse("t.toml", ADMISSION).expect("valid");
    assert_eq!(config.runtime.max_connections.map(|n| n.get()), Some(5000));
    let admission = &config.listeners[0].admission;
    assert_eq!(admission.steer, Steer::Source);
    assert_eq!(admission.reject, RejectMode::Reset);
    assert_eq!(admission.first_byte_timeout, Some(Duration::from_secs(3)));
    assert_eq!(admission.upload_rate, Some(1_048_576));
    assert_eq!(admission.bandwidth, Some(100_000_000));
    let limits = admission.limits.expect("limits");
    assert_eq!((limits.per_second, limits.burst), (1000, 1000));
    let per_source = admission.per_source.as_ref().expect("per_source");
    assert_eq!(per_source.rate, Some((20, 20)));
    assert_eq!(per_source.max_connections, Some(50));
    assert_eq!(per_source.ipv6_prefix, 56);
    assert_eq!(per_source.table_size, 100_000);
    assert_eq!(per_source.expire_us, 60_000_000);
    let allow: Vec<String> = admission
        .acl
        .allow
        .iter()
        .flatten()
        .map(ToString::to_string)
        .collect();
    assert_eq!(allow, ["127.0.0.0/8", "::1/128"]);
    assert_eq!(admission.acl.deny[0].to_string(), "127.0.0.66/32");
    let again = Config::parse("printed", &config.to_toml()).expect("printed parses");
    assert_eq!(config, again);
    let plain = Config::parse("t.toml", MINIMAL).expect("valid");
    assert!(!plain.listeners[0].admission.needs_address());
    assert_eq!(plain.runtime.max_connections, None);
}

#[test]
fn bad_admission_keys_are_located_errors() {
    for (from, to, expected) in [
        ("steer = \"source\"", "steer = \"cpu\"", "steer must be"),
        ("reject = \"reset\"", "reject = \"drop\"", "reject must be"),
        (
            "first_byte_timeout = \"3s\"",
            "first_byte_timeout = \"0s\"",
            "first_byte_timeout must be greater than zero",
        ),
        (
            "upload_rate = 1048576",
            "upload_rate = 0",
            "upload_rate must be from 1",
        ),
        (
            "connections_per_second = 1000",
            "connections_per_second = -1",
            "limits.connections_per_second must be from 1",
        ),
        (
            "ipv6_prefix = 56",
            "ipv6_prefix = 129",
            "per_source.ipv6_prefix must be from 1 to 128",
        ),
        (
            "deny = [\"127.0.0.66\"]",
            "deny = [\"127.0.0.300\"]",
            "acl.deny: \"127.0.0.300\" is not a network",
        ),
        (
            "allow = [\"127.0.0.1/8\", \"::1\"]",
            "allow = []",
            "acl.allow is empty",
        ),
        (
            "connections_per_second = 20\nmax_connections = 50\n",
            "expire = \"5s\"\n",
            "needs connections_per_second or max_connections",
        ),
        (
            "connections_per_second = 20\nmax_connections = 50\n",
            "burst = 5\nmax_connections = 50\n",
            "per_source.burst needs",
        ),
        (
            "max_connections = 5000",
            "max_connections = 0",
            "runtime.max_connections must be from 1",
        ),
        ("bandwidth = 100000000", "bandwdith = 1", "unknown field"),
    ] {
        assert!(ADMISSION.contains(from), "{from}");
        let text = ADMISSION.replacen(from, to, 1);
        let error = Config::parse("t.toml", &text).expect_err(to);
        assert!(
            error.message.contains(expected),
            "{to}: {error}, expected {expected:?}"
        );
        assert!(error.line > 1, "{to}: {error}");
    }
}

#[test]
fn receives_is_auto_by_default_and_single_shot_on_request() {
    let config = Config::parse("t.toml", MINIMAL).expect("valid");
    assert_eq!(config.tuning.receives, ReceiveMode::Auto);
    let text = format!("[tuning]\nreceives = \"single_shot\"\n{MINIMAL}");
    let config = Config::parse("t.toml", &text).expect("valid");
    assert_eq!(config.tuning.receives, ReceiveMode::SingleShot);
    let again = Config::parse("printed", &config.to_toml()).expect("printed config parses");
    assert_eq!(again.tuning.receives, ReceiveMode::SingleShot);
    let text = format!("[tuning]\nreceives = \"multishot\"\n{MINIMAL}");
    let error = Config::parse("t.toml", &text).expect_err("unknown mode");
    assert!(
        error
            .to_string()
            .contains("unknown receives \"multishot\": use auto or single_shot"),
        "{error}"
    );
}

const ROUTED: &str = r#"
[[listener]]
name = "edge"
bind = "127.0.0.1:5000"
pool = "web"
routes = [
  { protocol = "postgres", pool = "pg" },
  { protocol = "mysql", pool = "pg" },
  { sni = "*.api.example.com", pool = "web" },
  { alpn = "h2", pool = "web" },
  { host = "admin.example.com", path_prefix = "/v1/", pool = "pg" },
  { source = "10.0.0.0/8", pool = "pg" },
]
unmatched = "reject"
sniff_max_bytes = 2048

[[pool]]
name = "web"
servers = [ { addr = "127.0.0.1:9001" } ]

[[pool]]
name = "pg"
servers = [ { addr = "127.0.0.1:9002" } ]
"#;

#[test]
fn routes_resolve_and_print_back() {
    let config = Config::parse("t.toml", ROUTED).expect("valid");
    let routing = config.listeners[0].routing.as_ref().expect("routes");
    assert_eq!(routing.routes.len(), 6);
    assert_eq!(routing.unmatched, Unmatched::Reject);
    assert_eq!(routing.sniff_max_bytes, 2048);
    assert_eq!(routing.sniff_timeout, DEFAULT_SNIFF_TIMEOUT);
    assert_eq!(routing.server_first_after, DEFAULT_SERVER_FIRST_AFTER);
    assert_eq!(
        routing.routes[0].target,
        crate::config::Target::Pool(PoolIndex(1))
    );
    let again = Config::parse("printed", &config.to_toml()).expect("printed config parses");
    assert_eq!(config, again);
    // A listener without routes reads nothing first.
    assert!(
        Config::parse("t.toml", MINIMAL).expect("valid").listeners[0]
            .routing
            .is_none()
    );
}

#[test]
fn bad_routes_are_refused_with_the_reason() {
    for (from, to, message) in [
        (
            "protocol = \"postgres\"",
            "protocol = \"pgsql\"",
            "unknown protocol \"pgsql\"",
        ),
        (
            "pool = \"pg\" },\n  { protocol = \"mysql\"",
            "pool = \"nope\" },\n  { protocol = \"mysql\"",
            "pool \"nope\", which is not defined",
        ),
        (
            "{ alpn = \"h2\", pool = \"web\" }",
            "{ pool = \"web\" }",
            "needs at least one of",
        ),
        (
            "sni = \"*.api.example.com\"",
            "sni = \"a.*.com\"",
            "not a DNS name",
        ),
        (
            "path_prefix = \"/v1/\"",
            "path_prefix = \"v1\"",
            "must start with",
        ),
        (
            "source = \"10.0.0.0/8\"",
            "source = \"ten\"",
            "not a network",
        ),
        (
            "unmatched = \"reject\"",
            "unmatched = \"drop\"",
            "unmatched must be",
        ),
        (
            "sniff_max_bytes = 2048",
            "sniff_max_bytes = 1",
            "sniff_max_bytes must be from 16",
        ),
        (
            "{ protocol = \"mysql\", pool = \"pg\" }",
            "{ protocol = \"mysql\", sni = \"a.b\", pool = \"pg\" }",
            "cannot be combined",
        ),
        (
            "{ alpn = \"h2\", pool = \"web\" }",
            "{ protocol = \"http\", alpn = \"h2\", pool = \"web\" }",
            "never carries sni or alpn",
        ),
        (
            "{ alpn = \"h2\", pool = \"web\" }",
            "{ alpn = \"h2\", host = \"a.b\", pool = \"web\" }",
            "cannot have both",
        ),
        (
            "{ alpn = \"h2\", pool = \"web\" }",
            "{ alpn = \"h2\", split = \"app\", pool = \"web\" }",
            "has both pool and split",
        ),
    ] {
        assert!(ROUTED.contains(from), "{from}");
        let text = ROUTED.replace(from, to);
        let error = Config::parse("t.toml", &text).expect_err(message);
        assert!(error.to_string().contains(message), "{message}: {error}");
    }
    // Waiting for silence needs a first-byte timeout longer than the wait.
    let text = ROUTED.replace("unmatched = \"reject\"", "first_byte_timeout = \"200ms\"");
    let error = Config::parse("t.toml", &text).expect_err("first byte");
    assert!(
        error
            .to_string()
            .contains("must be longer than server_first_after"),
        "{error}"
    );
    let start = ROUTED.find("routes = [").expect("routes");
    let end = start + ROUTED[start..].find("]\n").expect("end") + 2;
    let text = format!("{}routes = []\n{}", &ROUTED[..start], &ROUTED[end..]);
    let error = Config::parse("t.toml", &text).expect_err("empty routes");
    assert!(error.to_string().contains("routes is empty"), "{error}");
    // Routing keys without routes.
    let text = MINIMAL.replace(
        "pool = \"app\"\n",
        "pool = \"app\"\nsniff_timeout = \"1s\"\n",
    );
    let error = Config::parse("t.toml", &text).expect_err("no routes");
    assert!(error.to_string().contains("has no routes"), "{error}");
}

#[test]
fn send_proxy_resolves_reaches_the_checks_and_prints_back() {
    let text = MINIMAL.replace("name = \"app\"\n", "name = \"app\"\nsend_proxy = \"v2\"\n")
        + "[pool.health]\nkind = \"tcp\"\n";
    let config = Config::parse("t.toml", &text).expect("valid");
    let pool = &config.pools[0];
    assert_eq!(pool.send_proxy, Some(crate::sniff::proxy::ProxyVersion::V2));
    assert_eq!(
        pool.health.as_ref().expect("health").send_proxy,
        pool.send_proxy,
        "checks send the pool's header"
    );
    let again = Config::parse("printed", &config.to_toml()).expect("printed config parses");
    assert_eq!(config, again);
    let text = MINIMAL.replace("name = \"app\"\n", "name = \"app\"\nsend_proxy = \"v3\"\n");
    let error = Config::parse("t.toml", &text).expect_err("v3");
    assert!(error.to_string().contains("send_proxy must be"), "{error}");
}

#[test]
fn proxy_protocol_keys_resolve_print_back_and_refuse_mistakes() {
    let text = MINIMAL.replace(
        "pool = \"app\"\n",
        "pool = \"app\"\nproxy_protocol = \"required\"\ntrusted_proxies = [\"10.0.0.0/8\", \
         \"2001:db8::1\"]\nsniff_timeout = \"2s\"\n",
    );
    let config = Config::parse("t.toml", &text).expect("valid");
    let proxy = config.listeners[0].proxy.as_ref().expect("proxy");
    assert!(proxy.required);
    assert_eq!(proxy.header_timeout, std::time::Duration::from_secs(2));
    assert_eq!(proxy.silence_after, DEFAULT_SERVER_FIRST_AFTER);
    assert!(proxy.trusts("10.9.8.7".parse().expect("ip")));
    assert!(
        proxy.trusts("::ffff:10.9.8.7".parse().expect("ip")),
        "v4-mapped peers"
    );
    assert!(!proxy.trusts("11.0.0.1".parse().expect("ip")));
    assert!(proxy.trusts("2001:db8::1".parse().expect("ip")));
    let again = Config::parse("printed", &config.to_toml()).expect("printed config parses");
    assert_eq!(config, again);
    assert!(
        Config::parse("t.toml", MINIMAL).expect("valid").listeners[0]
            .proxy
            .is_none(),
        "off by default"
    );
    for (keys, message) in [
        ("proxy_protocol = \"on\"\n", "proxy_protocol must be"),
        (
            "proxy_protocol = \"optional\"\n",
            "trusted_proxies is empty",
        ),
        (
            "proxy_protocol = \"optional\"\ntrusted_proxies = []\n",
            "trusted_proxies is empty",
        ),
        (
            "trusted_proxies = [\"10.0.0.1\"]\n",
            "proxy_protocol is off",
        ),
        (
            "proxy_protocol = \"optional\"\ntrusted_proxies = [\"lb\"]\n",
            "\"lb\" is not a network",
        ),
        ("server_first_after = \"1s\"\n", "has no routes"),
    ] {
        let text = MINIMAL.replace("pool = \"app\"\n", &format!("pool = \"app\"\n{keys}"));
        let error = Config::parse("t.toml", &text).expect_err(message);
        assert!(error.to_string().contains(message), "{message}: {error}");
    }
}

const SPLIT: &str = r#"
[[listener]]
name = "front"
bind = "127.0.0.1:8080"
split = "app"
routes = [ { protocol = "http", split = "app" }, { protocol = "redis", pool = "blue" } ]

[[pool]]
name = "blue"
servers = [ { addr = "127.0.0.1:9001" } ]

[[pool]]
name = "green"
servers = [ { addr = "127.0.0.1:9002" } ]

[[split]]
name = "app"
sticky = "source"
backends = [ { pool = "blue", weight = 90 }, { pool = "green", weight = 10 } ]
"#;

#[test]
fn splits_resolve_print_back_and_refuse_mistakes() {
    use crate::config::{SplitIndex, Sticky, Target};
    let config = Config::parse("t.toml", SPLIT).expect("valid");
    assert_eq!(config.listeners[0].target, Target::Split(SplitIndex(0)));
    let routing = config.listeners[0].routing.as_ref().expect("routes");
    assert_eq!(routing.routes[0].target, Target::Split(SplitIndex(0)));
    assert_eq!(routing.routes[1].target, Target::Pool(PoolIndex(0)));
    let split = &config.splits[0];
    assert_eq!(split.sticky, Sticky::Source);
    assert_eq!(split.backends, vec![(PoolIndex(0), 90), (PoolIndex(1), 10)]);
    let again = Config::parse("printed", &config.to_toml()).expect("printed config parses");
    assert_eq!(config, again);
    let unsticky = SPLIT.replace("sticky = \"source\"\n", "");
    assert_eq!(
        Config::parse("t.toml", &unsticky).expect("valid").splits[0].sticky,
        Sticky::None
    );
    for (from, to, message) in [
        (
            "split = \"app\"\nroutes",
            "split = \"ab\"\nroutes",
            "split \"ab\", which is not defined",
        ),
        (
            "split = \"app\"\nroutes",
            "pool = \"blue\"\nsplit = \"app\"\nroutes",
            "has both pool and split",
        ),
        (
            "split = \"app\"\nroutes",
            "routes",
            "needs a pool or a split",
        ),
        (
            "sticky = \"source\"",
            "sticky = \"cookie\"",
            "sticky must be",
        ),
        ("weight = 10 }", "weight = 0 }", ""),
        (
            "weight = 90 }, { pool = \"green\", weight = 10 }",
            "weight = 0 }, { pool = \"green\", weight = 0 }",
            "every weight of split \"app\" is 0",
        ),
        (
            "{ pool = \"green\", weight = 10 }",
            "{ pool = \"blue\", weight = 10 }",
            "named twice",
        ),
        (
            "{ pool = \"green\", weight = 10 }",
            "{ pool = \"red\", weight = 10 }",
            "pool \"red\", which is not defined",
        ),
        (
            "weight = 10 }",
            "weight = 10001 }",
            "weight must be from 0 to 10000",
        ),
        (
            "backends = [ { pool = \"blue\", weight = 90 }, { pool = \"green\", weight = 10 } ]",
            "backends = []",
            "needs 1 to 64 backends",
        ),
        (
            "name = \"app\"\nsticky",
            "name = \"blue\"\nsticky",
            "has the name of a pool",
        ),
    ] {
        assert!(SPLIT.contains(from), "{from}");
        let text = SPLIT.replace(from, to);
        if message.is_empty() {
            Config::parse("t.toml", &text).expect("valid");
            continue;
        }
        let error = Config::parse("t.toml", &text).expect_err(message);
        assert!(error.to_string().contains(message), "{message}: {error}");
    }
}
