//! The raw config: structs that mirror the TOML file one to one.
//!
//! Owns nothing but the shape of the file. Every table denies unknown keys; values that need a
//! semantic check later carry their span so `resolve` can point at the exact place.

use serde::Deserialize;
use toml::Spanned;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub runtime: FileRuntime,
    pub admin: Option<FileAdmin>,
    #[serde(default)]
    pub tuning: FileTuning,
    #[serde(default, rename = "listener")]
    pub listeners: Vec<Spanned<FileListener>>,
    #[serde(default, rename = "pool")]
    pub pools: Vec<Spanned<FilePool>>,
    #[serde(default, rename = "split")]
    pub splits: Vec<Spanned<FileSplit>>,
}

/// `[[split]]`: pools that share a listener's (or a route's) new connections by weight.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSplit {
    pub name: Spanned<String>,
    pub sticky: Option<Spanned<String>>,
    pub backends: Spanned<Vec<Spanned<FileSplitBackend>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSplitBackend {
    pub pool: Spanned<String>,
    pub weight: Spanned<i64>,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileRuntime {
    pub shards: Option<Spanned<FileShards>>,
    pub drain_timeout: Option<Spanned<String>>,
    pub pin: Option<Spanned<FilePin>>,
    pub max_connections: Option<Spanned<i64>>,
}

/// `pin = "auto" | "none" | [0, 1]`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FilePin {
    Word(String),
    Cores(Vec<i64>),
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum FileShards {
    Count(i64),
    Word(String),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    pub bind: Spanned<String>,
    pub token_file: Option<Spanned<String>>,
    #[serde(default)]
    pub auth_reads: bool,
    pub state_file: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<i64>>,
}

/// Runtime knobs a tuning profile may overlay (`--profile`).
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileTuning {
    pub ring_entries: Option<Spanned<i64>>,
    pub buffer_size: Option<Spanned<i64>>,
    pub buffer_count: Option<Spanned<i64>>,
    pub queued_buffers: Option<Spanned<i64>>,
    pub receives: Option<Spanned<String>>,
}

/// A tuning profile file: only the `[tuning]` table.
#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FileProfile {
    #[serde(default)]
    pub tuning: FileTuning,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    pub name: Spanned<String>,
    pub bind: Spanned<String>,
    pub pool: Option<Spanned<String>>,
    pub split: Option<Spanned<String>>,
    pub max_connections: Option<Spanned<i64>>,
    pub backlog: Option<Spanned<i64>>,
    pub idle_timeout: Option<Spanned<String>>,
    pub write_timeout: Option<Spanned<String>>,
    pub tcp_keepalive: Option<Spanned<FileKeepalive>>,
    pub tcp_user_timeout: Option<Spanned<String>>,
    #[serde(default)]
    pub log: bool,
    pub steer: Option<Spanned<String>>,
    pub reject: Option<Spanned<String>>,
    pub first_byte_timeout: Option<Spanned<String>>,
    pub upload_rate: Option<Spanned<i64>>,
    pub download_rate: Option<Spanned<i64>>,
    pub bandwidth: Option<Spanned<i64>>,
    pub limits: Option<Spanned<FileLimits>>,
    pub per_source: Option<Spanned<FilePerSource>>,
    pub acl: Option<Spanned<FileAcl>>,
    pub routes: Option<Vec<Spanned<FileRoute>>>,
    pub unmatched: Option<Spanned<String>>,
    pub sniff_max_bytes: Option<Spanned<i64>>,
    pub sniff_timeout: Option<Spanned<String>>,
    pub server_first_after: Option<Spanned<String>>,
    pub proxy_protocol: Option<Spanned<String>>,
    pub trusted_proxies: Option<Spanned<Vec<Spanned<String>>>>,
    pub tls: Option<Spanned<FileTls>>,
}

/// `[listener.tls]`: TLS termination.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    pub certificates: Spanned<Vec<Spanned<FileCertificate>>>,
    pub default_certificate: Option<Spanned<String>>,
    pub alpn: Option<Spanned<Vec<Spanned<String>>>>,
    pub min_version: Option<Spanned<String>>,
    pub client_ca: Option<Spanned<String>>,
    pub client_auth: Option<Spanned<String>>,
    pub handshake_timeout: Option<Spanned<String>>,
    pub session_tickets: Option<Spanned<bool>>,
    pub watch: Option<Spanned<bool>>,
    pub cipher_suites: Option<Spanned<Vec<Spanned<String>>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileCertificate {
    pub cert: Spanned<String>,
    pub key: Spanned<String>,
}

/// One entry of a listener's `routes`: conditions, and the pool it sends to.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileRoute {
    pub protocol: Option<Spanned<String>>,
    pub sni: Option<Spanned<String>>,
    pub alpn: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    pub path_prefix: Option<Spanned<String>>,
    pub source: Option<Spanned<String>>,
    pub pool: Option<Spanned<String>>,
    pub split: Option<Spanned<String>>,
    pub tls: Option<Spanned<FileRouteTls>>,
}

/// A route's `tls`: `"passthrough"`, or a table shaped as `[listener.tls]`.
#[derive(Debug)]
pub enum FileRouteTls {
    Mode(String),
    Terminate(Box<FileTls>),
}

impl<'de> Deserialize<'de> for FileRouteTls {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Shape;
        impl<'de> serde::de::Visitor<'de> for Shape {
            type Value = FileRouteTls;

            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("\"passthrough\" or a table of TLS settings")
            }

            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<FileRouteTls, E> {
                Ok(FileRouteTls::Mode(text.to_string()))
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<FileRouteTls, A::Error> {
                // Through the map itself (not a buffered copy): the fields keep their spans.
                FileTls::deserialize(serde::de::value::MapAccessDeserializer::new(map))
                    .map(|tls| FileRouteTls::Terminate(Box::new(tls)))
            }
        }
        deserializer.deserialize_any(Shape)
    }
}

/// `[listener.limits]`: the listener-wide connection rate.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    pub connections_per_second: Spanned<i64>,
    pub burst: Option<Spanned<i64>>,
}

/// `[listener.per_source]`: limits per client address.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePerSource {
    pub connections_per_second: Option<Spanned<i64>>,
    pub burst: Option<Spanned<i64>>,
    pub max_connections: Option<Spanned<i64>>,
    pub ipv6_prefix: Option<Spanned<i64>>,
    pub table_size: Option<Spanned<i64>>,
    pub expire: Option<Spanned<String>>,
}

/// `[listener.acl]`: networks allowed and denied.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAcl {
    pub allow: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub deny: Vec<Spanned<String>>,
}

/// `tcp_keepalive = { idle = "60s", interval = "10s", count = 6 }`; absent keys take those
/// defaults.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileKeepalive {
    pub idle: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub count: Option<Spanned<i64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilePool {
    pub name: Spanned<String>,
    pub balance: Option<Spanned<String>>,
    pub connect_timeout: Option<Spanned<String>>,
    pub retries: Option<Spanned<i64>>,
    pub max_fails: Option<Spanned<i64>>,
    pub fail_timeout: Option<Spanned<String>>,
    pub tcp_keepalive: Option<Spanned<FileKeepalive>>,
    pub tcp_user_timeout: Option<Spanned<String>>,
    pub source_addresses: Option<Spanned<Vec<Spanned<String>>>>,
    pub slow_start: Option<Spanned<String>>,
    pub send_proxy: Option<Spanned<String>>,
    pub health: Option<Spanned<FileHealth>>,
    pub tls: Option<Spanned<FileOriginTls>>,
    pub servers: Spanned<Vec<Spanned<FileServer>>>,
}

/// `[pool.tls]`: TLS toward the pool's servers.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOriginTls {
    pub ca: Option<Spanned<String>>,
    pub server_name: Option<Spanned<String>>,
    pub verify: Option<Spanned<bool>>,
    pub client_cert: Option<Spanned<String>>,
    pub client_key: Option<Spanned<String>>,
    pub alpn: Option<Spanned<Vec<Spanned<String>>>>,
    pub check_tls: Option<Spanned<bool>>,
    pub session_reuse: Option<Spanned<bool>>,
    pub cipher_suites: Option<Spanned<Vec<Spanned<String>>>>,
}

/// `[pool.health]`: active checks.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileHealth {
    pub kind: Option<Spanned<String>>,
    pub interval: Option<Spanned<String>>,
    pub timeout: Option<Spanned<String>>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
    pub port: Option<Spanned<i64>>,
    pub send: Option<Spanned<String>>,
    pub expect: Option<Spanned<String>>,
    pub path: Option<Spanned<String>>,
    pub host: Option<Spanned<String>>,
    pub expect_status: Option<Spanned<String>>,
    pub start: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileServer {
    pub addr: Spanned<String>,
    pub name: Option<Spanned<String>>,
    pub weight: Option<Spanned<i64>>,
    #[serde(default)]
    pub backup: bool,
    pub max_connections: Option<Spanned<i64>>,
}
