//! Which backend a connection goes to, from what sniffing found: sans-IO.
//!
//! A listener's routes are tried in order and the first whose every condition holds wins;
//! none matching leaves the listener's default (or a refusal, by the listener's `unmatched`).
//! Conditions: the protocol detected (or, for server-speaks-first protocols, the client's
//! silence), the TLS server name and ALPN offer, the HTTP/1.x Host and path prefix, and the
//! client's address. Name patterns follow NGINX's `server_name`: exact names, or `*.domain`
//! for any name below `domain` (not `domain` itself), case-insensitive, a trailing dot ignored.
//! Nothing here reads a socket or a clock; the shard feeds in what the sniffers returned.

use std::net::IpAddr;

use ipnet::IpNet;

use crate::sniff::{Facts, Protocol};

/// What the client turned out to speak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detected {
    /// A sniffer matched.
    Protocol(Protocol, Facts),
    /// The client sent nothing before `server_first_after`: a server-speaks-first protocol.
    Silence,
    /// Bytes no sniffer recognised (or sniffing hit its byte or time limit).
    Unknown,
}

/// A protocol a route may name: one the sniffers recognise, or one chosen by silence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RouteProtocol {
    Sniffed(Protocol),
    /// MySQL/MariaDB, SMTP, FTP: the server speaks first, so the client's silence is the sign.
    ServerFirst(ServerFirst),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerFirst {
    Mysql,
    Smtp,
    Ftp,
}

impl RouteProtocol {
    /// The name used in configs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            RouteProtocol::Sniffed(protocol) => protocol.name(),
            RouteProtocol::ServerFirst(ServerFirst::Mysql) => "mysql",
            RouteProtocol::ServerFirst(ServerFirst::Smtp) => "smtp",
            RouteProtocol::ServerFirst(ServerFirst::Ftp) => "ftp",
        }
    }

    /// Parses a protocol name of the config (`tls`, `http`, ..., `mysql`, `smtp`, `ftp`).
    pub fn from_name(name: &str) -> Option<RouteProtocol> {
        let server_first = match name {
            "mysql" => Some(ServerFirst::Mysql),
            "smtp" => Some(ServerFirst::Smtp),
            "ftp" => Some(ServerFirst::Ftp),
            _ => None,
        };
        if let Some(protocol) = server_first {
            return Some(RouteProtocol::ServerFirst(protocol));
        }
        Protocol::ALL
            .into_iter()
            .find(|protocol| protocol.name() == name)
            .map(RouteProtocol::Sniffed)
    }
}

/// A DNS name pattern: exact, or `*.suffix` for any name below the suffix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NamePattern {
    Exact(String),
    /// The suffix with its leading dot (".example.com").
    Below(String),
}

impl NamePattern {
    /// None for an empty name, a `*` anywhere but a leading `*.`, or characters a DNS name
    /// cannot have.
    pub fn parse(text: &str) -> Option<NamePattern> {
        let text = normalise(text);
        let (wildcard, name) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text.as_str()),
        };
        let valid = !name.is_empty()
            && name.len() <= 253
            && name
                .split('.')
                .all(|label| !label.is_empty() && label.len() <= 63)
            && name
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || b"-._".contains(&byte));
        if !valid {
            return None;
        }
        Some(if wildcard {
            NamePattern::Below(format!(".{name}"))
        } else {
            NamePattern::Exact(name.to_owned())
        })
    }

    /// The pattern as written in a config (`api.example.com`, `*.example.com`).
    pub fn text(&self) -> String {
        match self {
            NamePattern::Exact(name) => name.clone(),
            NamePattern::Below(suffix) => format!("*{suffix}"),
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        let name = normalise(name);
        match self {
            NamePattern::Exact(exact) => name == *exact,
            NamePattern::Below(suffix) => name.len() > suffix.len() && name.ends_with(suffix),
        }
    }
}

fn normalise(name: &str) -> String {
    name.trim_end_matches('.').to_ascii_lowercase()
}

/// The conditions of one route; all that are set must hold.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Conditions {
    pub protocol: Option<RouteProtocol>,
    pub sni: Option<NamePattern>,
    /// Matches when the client offers this ALPN protocol.
    pub alpn: Option<String>,
    pub host: Option<NamePattern>,
    pub path_prefix: Option<String>,
    pub source: Option<IpNet>,
}

impl Conditions {
    /// No condition at all (a route that would match everything).
    pub fn is_empty(&self) -> bool {
        *self == Conditions::default()
    }

    /// Whether deciding needs the client's first bytes (a route on the source address alone
    /// does not: such a listener reads nothing before connecting).
    pub fn needs_bytes(&self) -> bool {
        self.protocol.is_some()
            || self.sni.is_some()
            || self.alpn.is_some()
            || self.host.is_some()
            || self.path_prefix.is_some()
    }

    /// Whether it looks at what a client says (beyond a TLS handshake's facts and the source).
    pub fn reads_decrypted(&self) -> bool {
        self.protocol.is_some() || self.host.is_some() || self.path_prefix.is_some()
    }

    pub fn hold(&self, detected: &Detected, client: IpAddr) -> bool {
        if let Some(network) = &self.source
            && !network.contains(&canonical(client))
        {
            return false;
        }
        let (protocol, facts) = match detected {
            Detected::Protocol(protocol, facts) => (Some(*protocol), Some(facts)),
            Detected::Silence | Detected::Unknown => (None, None),
        };
        match self.protocol {
            None => {}
            Some(RouteProtocol::Sniffed(wanted)) if protocol == Some(wanted) => {}
            Some(RouteProtocol::ServerFirst(_)) if *detected == Detected::Silence => {}
            Some(_) => return false,
        }
        let text_holds = |pattern: &Option<NamePattern>, value: Option<&String>| match pattern {
            None => true,
            Some(pattern) => value.is_some_and(|value| pattern.matches(value)),
        };
        if !text_holds(
            &self.sni,
            facts.and_then(|facts| facts.server_name.as_ref()),
        ) {
            return false;
        }
        if !text_holds(&self.host, facts.and_then(|facts| facts.host.as_ref())) {
            return false;
        }
        if let Some(wanted) = &self.alpn
            && !facts.is_some_and(|facts| facts.alpn.iter().any(|offered| offered == wanted))
        {
            return false;
        }
        if let Some(prefix) = &self.path_prefix
            && !facts
                .and_then(|facts| facts.path.as_ref())
                .is_some_and(|path| path.starts_with(prefix.as_str()))
        {
            return false;
        }
        true
    }
}

/// An IPv4-mapped IPv6 address is its IPv4 address for matching (as the ACLs treat it).
fn canonical(address: IpAddr) -> IpAddr {
    match address {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(address, IpAddr::V4),
        IpAddr::V4(_) => address,
    }
}

/// What a route does with TLS (`tls = ...`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RouteTls {
    /// No `tls` key: as its listener does (a TLS listener terminates with its own
    /// certificates and the route matches the handshake; any other relays the bytes).
    #[default]
    Listener,
    /// `tls = "passthrough"`: the handshake is relayed untouched, even on a TLS listener.
    Passthrough,
    /// `tls = { certificates = ... }`: the proxy terminates with these settings.
    Terminate(std::sync::Arc<crate::tls::TlsSettings>),
}

impl RouteTls {
    /// Decided on the ClientHello, before any handshake (on a TLS listener too).
    pub fn before_handshake(&self) -> bool {
        !matches!(self, RouteTls::Listener)
    }
}

/// One route: its conditions and where it sends (a pool or a split, as the caller names them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route<T> {
    pub conditions: Conditions,
    pub target: T,
    pub tls: RouteTls,
}

/// The first route whose conditions hold.
pub fn decide<'a, T>(routes: &'a [Route<T>], detected: &Detected, client: IpAddr) -> Option<&'a T> {
    decide_at(routes, detected, client).map(|position| &routes[position].target)
}

/// The position of the first route whose conditions hold.
pub fn decide_at<T>(routes: &[Route<T>], detected: &Detected, client: IpAddr) -> Option<usize> {
    decide_among(routes, detected, client, |_| true)
}

/// The position of the first route `eligible` lets in whose conditions hold (a TLS listener
/// decides its `tls = ...` routes on the ClientHello, the others after its handshake).
pub fn decide_among<T>(
    routes: &[Route<T>],
    detected: &Detected,
    client: IpAddr,
    eligible: impl Fn(&Route<T>) -> bool,
) -> Option<usize> {
    routes
        .iter()
        .position(|route| eligible(route) && route.conditions.hold(detected, client))
}

/// Whether any route needs the client's bytes, and which sniffers it needs.
pub fn sniffers_needed<T>(routes: &[Route<T>]) -> Vec<Protocol> {
    let mut wanted = Vec::new();
    for route in routes {
        let conditions = &route.conditions;
        let mut add = |protocol| {
            if !wanted.contains(&protocol) {
                wanted.push(protocol);
            }
        };
        match conditions.protocol {
            Some(RouteProtocol::Sniffed(protocol)) => add(protocol),
            Some(RouteProtocol::ServerFirst(_)) | None => {}
        }
        if conditions.sni.is_some() || conditions.alpn.is_some() {
            add(Protocol::Tls);
        }
        if conditions.host.is_some() || conditions.path_prefix.is_some() {
            add(Protocol::Http);
        }
    }
    wanted
}

#[cfg(test)]
mod tests;
