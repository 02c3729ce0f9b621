//! A listener's routing keys (`routes`, `unmatched`, `sniff_max_bytes`, `sniff_timeout`,
//! `server_first_after`), resolved into `RoutingConfig`; its PROXY protocol keys
//! (`proxy_protocol`, `trusted_proxies`), resolved into `ProxyAccept`; and their printed form.

use std::fmt::{self, Write as _};
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::file::{FileListener, FileRoute, FileRouteTls};
use super::split::{SplitConfig, Target};
use super::{ConfigError, PoolConfig, Source, format_duration, in_range};
use crate::route::{Conditions, NamePattern, Route, RouteProtocol, RouteTls};

pub const DEFAULT_SNIFF_MAX_BYTES: u32 = 4096;
pub const DEFAULT_SNIFF_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_SERVER_FIRST_AFTER: Duration = Duration::from_millis(300);
const MAX_ROUTES: usize = 1024;

/// What happens to a client no route matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    /// The listener's `pool`.
    Default,
    /// The connection is closed (and counted).
    Reject,
}

impl Unmatched {
    pub fn name(self) -> &'static str {
        match self {
            Unmatched::Default => "default",
            Unmatched::Reject => "reject",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoutingConfig {
    pub routes: Vec<Route<Target>>,
    pub unmatched: Unmatched,
    pub sniff_max_bytes: u32,
    pub sniff_timeout: Duration,
    pub server_first_after: Duration,
}

/// How a listener takes PROXY protocol headers (`proxy_protocol = "optional" | "required"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyAccept {
    /// A trusted peer must send a header (`required`); otherwise it may (`optional`).
    pub required: bool,
    /// Peers whose header is believed; a header from anyone else is refused.
    pub trusted: Vec<IpNet>,
    /// The header must be complete within this long (`sniff_timeout`).
    pub header_timeout: Duration,
    /// A peer that may go without a header and says nothing for this long has none
    /// (`server_first_after`): server-speaks-first clients are not kept waiting longer.
    pub silence_after: Duration,
}

impl ProxyAccept {
    pub fn trusts(&self, peer: std::net::IpAddr) -> bool {
        let peer = match peer {
            std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(peer, std::net::IpAddr::V4),
            v4 => v4,
        };
        self.trusted.iter().any(|network| network.contains(&peer))
    }
}

/// `None` for `proxy_protocol = "off"` (the default): nothing is read for a header.
pub(super) fn resolve_proxy_accept(
    source: &Source,
    listener: &FileListener,
) -> Result<Option<ProxyAccept>, ConfigError> {
    let required = match &listener.proxy_protocol {
        None => None,
        Some(text) => match text.get_ref().as_str() {
            "off" => None,
            "optional" => Some(false),
            "required" => Some(true),
            other => {
                return Err(source.at(
                    text,
                    format!(
                        "proxy_protocol must be \"off\", \"optional\" or \"required\", not \
                         {other:?}"
                    ),
                ));
            }
        },
    };
    let Some(required) = required else {
        if let Some(list) = &listener.trusted_proxies {
            return Err(source.at(
                list,
                "trusted_proxies is set but proxy_protocol is off: no header is read",
            ));
        }
        return Ok(None);
    };
    let Some(list) = listener
        .trusted_proxies
        .as_ref()
        .filter(|list| !list.get_ref().is_empty())
    else {
        return Err(source.at(
            &listener.name,
            "proxy_protocol is on but trusted_proxies is empty: list the load balancers whose \
             headers are believed (a header from any other peer is refused)",
        ));
    };
    let trusted = list
        .get_ref()
        .iter()
        .map(|text| {
            super::admission::parse_network(text.get_ref()).ok_or_else(|| {
                source.at(
                    text,
                    format!(
                        "trusted_proxies: {:?} is not a network such as \"10.0.0.0/8\" or an \
                         address",
                        text.get_ref()
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Some(ProxyAccept {
        required,
        trusted,
        header_timeout: super::nonzero_duration(
            source,
            listener.sniff_timeout.as_ref(),
            "sniff_timeout",
            DEFAULT_SNIFF_TIMEOUT,
        )?,
        silence_after: super::nonzero_duration(
            source,
            listener.server_first_after.as_ref(),
            "server_first_after",
            DEFAULT_SERVER_FIRST_AFTER,
        )?,
    }))
}

/// `proxy_protocol` and `trusted_proxies` as TOML lines; with `timing`, also the sniff keys
/// that bound the header (a listener with routes prints them with its routes).
pub fn write_proxy_keys(proxy: &ProxyAccept, timing: bool, out: &mut String) -> fmt::Result {
    let mode = if proxy.required {
        "required"
    } else {
        "optional"
    };
    writeln!(out, "proxy_protocol = \"{mode}\"")?;
    let trusted: Vec<String> = proxy
        .trusted
        .iter()
        .map(|network| format!("\"{network}\""))
        .collect();
    writeln!(out, "trusted_proxies = [{}]", trusted.join(", "))?;
    if timing {
        writeln!(
            out,
            "sniff_timeout = \"{}\"",
            format_duration(proxy.header_timeout)
        )?;
        writeln!(
            out,
            "server_first_after = \"{}\"",
            format_duration(proxy.silence_after)
        )?;
    }
    Ok(())
}

/// `None` for a listener without routes: it reads nothing before connecting (unless it takes
/// PROXY headers).
pub(super) fn resolve(
    source: &Source,
    listener: &FileListener,
    pools: &[PoolConfig],
    splits: &[SplitConfig],
) -> Result<Option<RoutingConfig>, ConfigError> {
    let Some(entries) = &listener.routes else {
        let proxy = listener
            .proxy_protocol
            .as_ref()
            .is_some_and(|mode| mode.get_ref() != "off");
        for (key, present, header_key) in [
            ("unmatched", listener.unmatched.is_some(), false),
            ("sniff_max_bytes", listener.sniff_max_bytes.is_some(), false),
            ("sniff_timeout", listener.sniff_timeout.is_some(), true),
            (
                "server_first_after",
                listener.server_first_after.is_some(),
                true,
            ),
        ] {
            if present && !(header_key && proxy) {
                return Err(source.at(
                    &listener.name,
                    format!("{key} is set but the listener has no routes"),
                ));
            }
        }
        return Ok(None);
    };
    if entries.is_empty() {
        return Err(source.at(
            &listener.name,
            "routes is empty: list at least one route, or leave routes out",
        ));
    }
    if entries.len() > MAX_ROUTES {
        return Err(source.at(
            &listener.name,
            format!("at most {MAX_ROUTES} routes per listener"),
        ));
    }
    let mut routes = Vec::with_capacity(entries.len());
    for entry in entries {
        routes.push(resolve_route(source, entry, pools, splits)?);
    }
    let unmatched = match &listener.unmatched {
        None => Unmatched::Default,
        Some(text) => match text.get_ref().as_str() {
            "default" => Unmatched::Default,
            "reject" => Unmatched::Reject,
            other => {
                return Err(source.at(
                    text,
                    format!("unmatched must be \"default\" or \"reject\", not {other:?}"),
                ));
            }
        },
    };
    let sniff_max_bytes = match &listener.sniff_max_bytes {
        None => DEFAULT_SNIFF_MAX_BYTES,
        Some(value) => in_range(source, value, "sniff_max_bytes", 16..=65_536)?,
    };
    let sniff_timeout = super::nonzero_duration(
        source,
        listener.sniff_timeout.as_ref(),
        "sniff_timeout",
        DEFAULT_SNIFF_TIMEOUT,
    )?;
    let server_first_after = super::nonzero_duration(
        source,
        listener.server_first_after.as_ref(),
        "server_first_after",
        DEFAULT_SERVER_FIRST_AFTER,
    )?;
    let server_first = routes.iter().any(|route| {
        matches!(
            route.conditions.protocol,
            Some(RouteProtocol::ServerFirst(_))
        )
    });
    if server_first {
        if server_first_after >= sniff_timeout {
            return Err(source.at(
                &listener.name,
                "server_first_after must be shorter than sniff_timeout on a listener with a \
                 server-speaks-first route",
            ));
        }
        if let Some(first_byte) = &listener.first_byte_timeout
            && let Ok(timeout) = super::duration_at(source, first_byte, "first_byte_timeout")
            && timeout <= server_first_after
        {
            return Err(source.at(
                first_byte,
                format!(
                    "first_byte_timeout ({}) must be longer than server_first_after ({}) on a \
                     listener with a server-speaks-first route: silent clients are waited for",
                    format_duration(timeout),
                    format_duration(server_first_after)
                ),
            ));
        }
    }
    Ok(Some(RoutingConfig {
        routes,
        unmatched,
        sniff_max_bytes,
        sniff_timeout,
        server_first_after,
    }))
}

fn resolve_route(
    source: &Source,
    entry: &Spanned<FileRoute>,
    pools: &[PoolConfig],
    splits: &[SplitConfig],
) -> Result<Route<Target>, ConfigError> {
    let route = entry.get_ref();
    let target = super::split::resolve_target(
        source,
        route.pool.as_ref(),
        route.split.as_ref(),
        entry.span(),
        "route",
        pools,
        splits,
    )?;
    let pattern = |text: &Option<Spanned<String>>, key: &str| match text {
        None => Ok(None),
        Some(text) => NamePattern::parse(text.get_ref()).map(Some).ok_or_else(|| {
            source.at(
                text,
                format!(
                    "{key} {:?} is not a DNS name or a `*.domain` pattern",
                    text.get_ref()
                ),
            )
        }),
    };
    let protocol = match &route.protocol {
        None => None,
        Some(text) => Some(RouteProtocol::from_name(text.get_ref()).ok_or_else(|| {
            source.at(
                text,
                format!(
                    "unknown protocol {:?}: use tls, http, h2, postgres, mongodb, redis, rtmp, \
                     ssh, mysql, smtp or ftp",
                    text.get_ref()
                ),
            )
        })?),
    };
    let alpn = match &route.alpn {
        Some(text) if text.get_ref().is_empty() || text.get_ref().len() > 255 => {
            return Err(source.at(text, "alpn must be 1 to 255 bytes"));
        }
        other => other.as_ref().map(|text| text.get_ref().clone()),
    };
    let path_prefix = match &route.path_prefix {
        Some(text) if !text.get_ref().starts_with('/') => {
            return Err(source.at(text, "path_prefix must start with \"/\""));
        }
        other => other.as_ref().map(|text| text.get_ref().clone()),
    };
    let source_network = match &route.source {
        None => None,
        Some(text) => Some(
            super::admission::parse_network(text.get_ref()).ok_or_else(|| {
                source.at(
                    text,
                    format!("source {:?} is not a network or an address", text.get_ref()),
                )
            })?,
        ),
    };
    let conditions = Conditions {
        protocol,
        sni: pattern(&route.sni, "sni")?,
        alpn,
        host: pattern(&route.host, "host")?,
        path_prefix,
        source: source_network,
    };
    if conditions.is_empty() {
        return Err(source.at(
            entry,
            "a route needs at least one of protocol, sni, alpn, host, path_prefix or source",
        ));
    }
    let tls_only = conditions.sni.is_some() || conditions.alpn.is_some();
    let http_only = conditions.host.is_some() || conditions.path_prefix.is_some();
    if tls_only && http_only {
        return Err(source.at(
            entry,
            "sni and alpn are TLS conditions, host and path_prefix HTTP/1.x ones: one route cannot \
             have both",
        ));
    }
    if let Some(RouteProtocol::Sniffed(protocol)) = conditions.protocol
        && ((tls_only && protocol != crate::sniff::Protocol::Tls)
            || (http_only && protocol != crate::sniff::Protocol::Http))
    {
        return Err(source.at(
            entry,
            format!(
                "protocol {:?} never carries {}: such a route could not match",
                protocol.name(),
                if tls_only {
                    "sni or alpn"
                } else {
                    "host or path_prefix"
                }
            ),
        ));
    }
    if matches!(conditions.protocol, Some(RouteProtocol::ServerFirst(_)))
        && (conditions.sni.is_some()
            || conditions.alpn.is_some()
            || conditions.host.is_some()
            || conditions.path_prefix.is_some())
    {
        return Err(source.at(
            entry,
            "a server-speaks-first protocol is chosen by the client's silence: it cannot be \
             combined with sni, alpn, host or path_prefix",
        ));
    }
    let tls = match &route.tls {
        None => RouteTls::Listener,
        Some(spanned) => match spanned.get_ref() {
            FileRouteTls::Mode(mode) if mode == "passthrough" => RouteTls::Passthrough,
            FileRouteTls::Mode(other) => {
                return Err(source.at(
                    spanned,
                    format!(
                        "tls must be \"passthrough\" or a table of TLS settings \
                         ({{ certificates = [...], ... }}), not {other:?}"
                    ),
                ));
            }
            FileRouteTls::Terminate(file) => {
                let settings = super::tls::resolve_settings(source, spanned.span(), file)?;
                super::tls::check_alpn_offered(
                    source,
                    route.alpn.as_ref(),
                    &settings,
                    "the route's",
                )?;
                RouteTls::Terminate(std::sync::Arc::new(settings))
            }
        },
    };
    let matches_tls = conditions.sni.is_some()
        || conditions.alpn.is_some()
        || conditions.protocol == Some(RouteProtocol::Sniffed(crate::sniff::Protocol::Tls));
    if tls.before_handshake() && !matches_tls {
        return Err(source.at(
            entry,
            "a route with tls is chosen by the ClientHello: give it sni, alpn or protocol = \"tls\"",
        ));
    }
    Ok(Route {
        conditions,
        target,
        tls,
    })
}

/// The listener's routing keys as TOML lines (`target_key` writes a route's `pool = ...` or
/// `split = ...`).
pub fn write_keys(
    routing: &RoutingConfig,
    target_key: impl Fn(Target) -> String,
    out: &mut String,
) -> fmt::Result {
    writeln!(out, "routes = [")?;
    for route in &routing.routes {
        let conditions = &route.conditions;
        let mut fields = Vec::new();
        if let Some(protocol) = conditions.protocol {
            fields.push(format!("protocol = {:?}", protocol.name()));
        }
        if let Some(sni) = &conditions.sni {
            fields.push(format!("sni = {:?}", sni.text()));
        }
        if let Some(alpn) = &conditions.alpn {
            fields.push(format!("alpn = {alpn:?}"));
        }
        if let Some(host) = &conditions.host {
            fields.push(format!("host = {:?}", host.text()));
        }
        if let Some(prefix) = &conditions.path_prefix {
            fields.push(format!("path_prefix = {prefix:?}"));
        }
        if let Some(network) = &conditions.source {
            fields.push(format!("source = \"{network}\""));
        }
        fields.push(target_key(route.target));
        match &route.tls {
            RouteTls::Listener => {}
            RouteTls::Passthrough => fields.push("tls = \"passthrough\"".to_string()),
            RouteTls::Terminate(settings) => {
                fields.push(format!("tls = {}", super::tls::route_tls_inline(settings)));
            }
        }
        writeln!(out, "  {{ {} }},", fields.join(", "))?;
    }
    writeln!(out, "]")?;
    writeln!(out, "unmatched = \"{}\"", routing.unmatched.name())?;
    writeln!(out, "sniff_max_bytes = {}", routing.sniff_max_bytes)?;
    writeln!(
        out,
        "sniff_timeout = \"{}\"",
        format_duration(routing.sniff_timeout)
    )?;
    writeln!(
        out,
        "server_first_after = \"{}\"",
        format_duration(routing.server_first_after)
    )
}
