//! Options of the TCP connections a listener accepts or a pool opens: keepalive probing, the
//! user timeout, and the source addresses outgoing connections bind to.
//!
//! Pure resolution of the raw keys into typed values; applying them to sockets is the job of
//! `uring::socket`.

use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use toml::Spanned;

use super::file::FileKeepalive;
use super::{ConfigError, Source, duration_at, format_duration, integer, nonzero_duration};

pub const DEFAULT_KEEPALIVE_IDLE: Duration = Duration::from_secs(60);
pub const DEFAULT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_KEEPALIVE_COUNT: u32 = 6;
/// Outgoing source addresses of one pool, after ranges are expanded.
pub const MAX_SOURCE_ADDRESSES: usize = 4096;

/// TCP keepalive probing of a connection (SO_KEEPALIVE with TCP_KEEPIDLE/INTVL/CNT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Keepalive {
    pub idle: Duration,
    pub interval: Duration,
    pub count: u32,
}

/// Options for a TCP connection the proxy accepts or opens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TcpOptions {
    pub keepalive: Option<Keepalive>,
    /// TCP_USER_TIMEOUT: how long sent data may stay unacknowledged before the kernel drops
    /// the connection.
    pub user_timeout: Option<Duration>,
}

impl TcpOptions {
    pub fn is_default(&self) -> bool {
        self.keepalive.is_none() && self.user_timeout.is_none()
    }

    /// The options as TOML lines (what `ringproxy check` prints).
    pub fn write_toml(&self, out: &mut String) -> fmt::Result {
        if let Some(keepalive) = self.keepalive {
            writeln!(
                out,
                "tcp_keepalive = {{ idle = \"{}\", interval = \"{}\", count = {} }}",
                format_duration(keepalive.idle),
                format_duration(keepalive.interval),
                keepalive.count
            )?;
        }
        if let Some(timeout) = self.user_timeout {
            writeln!(out, "tcp_user_timeout = \"{}\"", format_duration(timeout))?;
        }
        Ok(())
    }
}

pub(super) fn resolve_tcp_options(
    source: &Source,
    keepalive: Option<&Spanned<FileKeepalive>>,
    user_timeout: Option<&Spanned<String>>,
) -> Result<TcpOptions, ConfigError> {
    let keepalive = match keepalive {
        None => None,
        Some(spanned) => {
            let file = spanned.get_ref();
            let seconds = |text: Option<&Spanned<String>>, key: &str, default: Duration| {
                let value = nonzero_duration(source, text, key, default)?;
                if value.as_secs() == 0 || value.as_secs() > 32_767 || value.subsec_nanos() != 0 {
                    let at = text.map_or(spanned.span(), Spanned::span);
                    return Err(source.error(
                        at,
                        format!("tcp_keepalive {key} must be whole seconds from 1s to 32767s"),
                    ));
                }
                Ok(value)
            };
            Some(Keepalive {
                idle: seconds(file.idle.as_ref(), "idle", DEFAULT_KEEPALIVE_IDLE)?,
                interval: seconds(
                    file.interval.as_ref(),
                    "interval",
                    DEFAULT_KEEPALIVE_INTERVAL,
                )?,
                count: integer(
                    source,
                    file.count.as_ref(),
                    "tcp_keepalive count",
                    DEFAULT_KEEPALIVE_COUNT,
                    1..=127,
                )?,
            })
        }
    };
    let user_timeout = match user_timeout {
        None => None,
        Some(text) => {
            let timeout = duration_at(source, text, "tcp_user_timeout")?;
            if timeout.is_zero() || timeout.as_millis() > u128::from(i32::MAX as u32) {
                return Err(source.at(
                    text,
                    "tcp_user_timeout must be greater than zero and at most 24 days",
                ));
            }
            Some(timeout)
        }
    };
    Ok(TcpOptions {
        keepalive,
        user_timeout,
    })
}

/// Expands `["127.0.0.2-127.0.0.9", "::1"]` into addresses: single addresses of either family,
/// or IPv4 ranges.
pub(super) fn resolve_source_addresses(
    source: &Source,
    list: Option<&Spanned<Vec<Spanned<String>>>>,
    servers: &[SocketAddr],
) -> Result<Vec<IpAddr>, ConfigError> {
    let Some(list) = list else {
        return Ok(Vec::new());
    };
    if list.get_ref().is_empty() {
        return Err(source.at(list, "source_addresses is empty: leave it out instead"));
    }
    let mut addresses = Vec::new();
    for entry in list.get_ref() {
        let text = entry.get_ref().trim();
        let bad = || {
            source.at(
                entry,
                format!(
                    "invalid source address {text:?}: expected an IP such as \"127.0.0.2\" or an IPv4 range such as \"127.0.0.2-127.0.0.9\""
                ),
            )
        };
        match text.split_once('-') {
            None => addresses.push(text.parse::<IpAddr>().map_err(|_| bad())?),
            Some((first, last)) => {
                let first: Ipv4Addr = first.trim().parse().map_err(|_| bad())?;
                let last: Ipv4Addr = last.trim().parse().map_err(|_| bad())?;
                let (first, last) = (u32::from(first), u32::from(last));
                if last < first {
                    return Err(source.at(entry, format!("source range {text:?} runs backwards")));
                }
                if (last - first) as usize >= MAX_SOURCE_ADDRESSES {
                    return Err(source.at(
                        entry,
                        format!(
                            "source range {text:?} is larger than {MAX_SOURCE_ADDRESSES} addresses"
                        ),
                    ));
                }
                addresses.extend((first..=last).map(|ip| IpAddr::V4(Ipv4Addr::from(ip))));
            }
        }
        if addresses.len() > MAX_SOURCE_ADDRESSES {
            return Err(source.at(
                list,
                format!("source_addresses has more than {MAX_SOURCE_ADDRESSES} addresses"),
            ));
        }
    }
    for server in servers {
        if !addresses
            .iter()
            .any(|address| address.is_ipv4() == server.is_ipv4())
        {
            return Err(source.at(
                list,
                format!("server {server} has no source address of its family in source_addresses"),
            ));
        }
    }
    Ok(addresses)
}

/// The addresses as the shortest list of ranges (what `ringproxy check` prints).
pub fn format_source_addresses(addresses: &[IpAddr]) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut index = 0;
    while index < addresses.len() {
        let start = addresses[index];
        let mut end = index;
        if let IpAddr::V4(first) = start {
            while let Some(IpAddr::V4(next)) = addresses.get(end + 1) {
                if u32::from(*next) != u32::from(first) + (end + 1 - index) as u32 {
                    break;
                }
                end += 1;
            }
        }
        if end > index {
            parts.push(format!("\"{}-{}\"", start, addresses[end]));
        } else {
            parts.push(format!("\"{start}\""));
        }
        index = end + 1;
    }
    format!("[{}]", parts.join(", "))
}
