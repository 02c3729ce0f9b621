//! A listener's admission keys (`steer`, `reject`, `first_byte_timeout`, the rates, and the
//! `[listener.limits]`, `[listener.per_source]` and `[listener.acl]` tables), resolved into
//! `admission::AdmissionSettings`, and their printed form.

use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::time::Duration;

use ipnet::IpNet;
use toml::Spanned;

use super::file::{FileAcl, FileLimits, FileListener, FilePerSource};
use super::{ConfigError, Source, format_duration, in_range, nonzero_duration};
use crate::admission::{Acl, AdmissionSettings, RateLimit, RejectMode, SourceSettings, Steer};

pub const DEFAULT_IPV6_PREFIX: u8 = 64;
pub const DEFAULT_TABLE_SIZE: u32 = 100_000;
pub const DEFAULT_EXPIRE: Duration = Duration::from_secs(60);
const MAX_CONNECTION_RATE: u64 = 10_000_000;
const MAX_TABLE_SIZE: u64 = 10_000_000;
/// 100 Gbit/s in bytes.
const MAX_BYTE_RATE: u64 = 12_500_000_000;
const MAX_ACL_ENTRIES: usize = 10_000;

fn optional(
    source: &Source,
    value: Option<&Spanned<i64>>,
    key: &str,
    range: RangeInclusive<u64>,
) -> Result<Option<u64>, ConfigError> {
    value
        .map(|value| in_range(source, value, key, range))
        .transpose()
}

pub(super) fn resolve(
    source: &Source,
    listener: &FileListener,
) -> Result<AdmissionSettings, ConfigError> {
    let steer = match &listener.steer {
        None => Steer::Kernel,
        Some(text) => match text.get_ref().as_str() {
            "kernel" => Steer::Kernel,
            "source" => Steer::Source,
            other => {
                return Err(source.at(
                    text,
                    format!("steer must be \"kernel\" or \"source\", not {other:?}"),
                ));
            }
        },
    };
    let reject = match &listener.reject {
        None => RejectMode::Close,
        Some(text) => match text.get_ref().as_str() {
            "close" => RejectMode::Close,
            "reset" => RejectMode::Reset,
            other => {
                return Err(source.at(
                    text,
                    format!("reject must be \"close\" or \"reset\", not {other:?}"),
                ));
            }
        },
    };
    let first_byte_timeout = match &listener.first_byte_timeout {
        None => None,
        Some(text) => Some(nonzero_duration(
            source,
            Some(text),
            "first_byte_timeout",
            Duration::ZERO,
        )?),
    };
    let rate =
        |value: Option<&Spanned<i64>>, key: &str| optional(source, value, key, 1..=MAX_BYTE_RATE);
    Ok(AdmissionSettings {
        acl: match &listener.acl {
            None => Acl::default(),
            Some(acl) => resolve_acl(source, acl.get_ref())?,
        },
        limits: listener
            .limits
            .as_ref()
            .map(|limits| resolve_limits(source, limits.get_ref()))
            .transpose()?,
        per_source: listener
            .per_source
            .as_ref()
            .map(|per_source| resolve_per_source(source, per_source))
            .transpose()?,
        steer,
        reject,
        first_byte_timeout,
        upload_rate: rate(listener.upload_rate.as_ref(), "upload_rate")?,
        download_rate: rate(listener.download_rate.as_ref(), "download_rate")?,
        bandwidth: rate(listener.bandwidth.as_ref(), "bandwidth")?,
    })
}

fn resolve_limits(source: &Source, limits: &FileLimits) -> Result<RateLimit, ConfigError> {
    let per_second = in_range(
        source,
        &limits.connections_per_second,
        "limits.connections_per_second",
        1..=MAX_CONNECTION_RATE,
    )?;
    let burst = optional(
        source,
        limits.burst.as_ref(),
        "limits.burst",
        1..=MAX_CONNECTION_RATE,
    )?
    .unwrap_or(per_second);
    Ok(RateLimit { per_second, burst })
}

fn resolve_per_source(
    source: &Source,
    spanned: &Spanned<FilePerSource>,
) -> Result<SourceSettings, ConfigError> {
    let per_source = spanned.get_ref();
    let per_second = optional(
        source,
        per_source.connections_per_second.as_ref(),
        "per_source.connections_per_second",
        1..=MAX_CONNECTION_RATE,
    )?;
    let burst = optional(
        source,
        per_source.burst.as_ref(),
        "per_source.burst",
        1..=MAX_CONNECTION_RATE,
    )?;
    if let (None, Some(burst)) = (per_second, &per_source.burst) {
        return Err(source.at(
            burst,
            "per_source.burst needs per_source.connections_per_second",
        ));
    }
    let max_connections = optional(
        source,
        per_source.max_connections.as_ref(),
        "per_source.max_connections",
        1..=u64::from(u32::MAX),
    )?;
    if per_second.is_none() && max_connections.is_none() {
        return Err(source.at(
            spanned,
            "[listener.per_source] needs connections_per_second or max_connections",
        ));
    }
    let ipv6_prefix = optional(
        source,
        per_source.ipv6_prefix.as_ref(),
        "per_source.ipv6_prefix",
        1..=128,
    )?
    .map_or(DEFAULT_IPV6_PREFIX, |prefix| prefix as u8);
    let table_size = optional(
        source,
        per_source.table_size.as_ref(),
        "per_source.table_size",
        1..=MAX_TABLE_SIZE,
    )?
    .map_or(DEFAULT_TABLE_SIZE, |size| size as u32);
    let expire = nonzero_duration(
        source,
        per_source.expire.as_ref(),
        "per_source.expire",
        DEFAULT_EXPIRE,
    )?;
    Ok(SourceSettings {
        rate: per_second.map(|rate| (rate, burst.unwrap_or(rate))),
        max_connections: max_connections.map(|limit| limit as u32),
        ipv6_prefix,
        table_size,
        expire_us: u64::try_from(expire.as_micros()).unwrap_or(u64::MAX),
    })
}

fn resolve_acl(source: &Source, acl: &FileAcl) -> Result<Acl, ConfigError> {
    let networks = |list: &[Spanned<String>], key: &str| -> Result<Vec<IpNet>, ConfigError> {
        if list.len() > MAX_ACL_ENTRIES {
            return Err(source.at(
                &list[MAX_ACL_ENTRIES],
                format!("acl.{key} lists at most {MAX_ACL_ENTRIES} networks"),
            ));
        }
        list.iter()
            .map(|text| parse_network(text.get_ref()).ok_or_else(|| {
                source.at(
                    text,
                    format!(
                        "acl.{key}: {:?} is not a network such as \"10.0.0.0/8\", \"2001:db8::/32\" or an address",
                        text.get_ref()
                    ),
                )
            }))
            .collect()
    };
    let allow = match &acl.allow {
        None => None,
        Some(list) if list.get_ref().is_empty() => {
            return Err(source.at(
                list,
                "acl.allow is empty, which would refuse every client: leave it out to allow all, or deny = [\"0.0.0.0/0\", \"::/0\"] to refuse all",
            ));
        }
        Some(list) => Some(networks(list.get_ref(), "allow")?),
    };
    Ok(Acl {
        allow,
        deny: networks(&acl.deny, "deny")?,
    })
}

/// A CIDR (host bits are cleared) or a single address.
pub(super) fn parse_network(text: &str) -> Option<IpNet> {
    if let Ok(network) = text.parse::<IpNet>() {
        return Some(network.trunc());
    }
    text.parse::<IpAddr>().ok().map(IpNet::from)
}

fn list(networks: &[IpNet]) -> String {
    let items: Vec<String> = networks.iter().map(|net| format!("\"{net}\"")).collect();
    format!("[{}]", items.join(", "))
}

/// The listener's admission keys, then its sub-tables (printed after all its other keys).
pub fn write_keys(settings: &AdmissionSettings, out: &mut String) -> fmt::Result {
    writeln!(out, "steer = \"{}\"", settings.steer.name())?;
    writeln!(out, "reject = \"{}\"", settings.reject.name())?;
    if let Some(timeout) = settings.first_byte_timeout {
        writeln!(out, "first_byte_timeout = \"{}\"", format_duration(timeout))?;
    }
    for (key, value) in [
        ("upload_rate", settings.upload_rate),
        ("download_rate", settings.download_rate),
        ("bandwidth", settings.bandwidth),
    ] {
        if let Some(value) = value {
            writeln!(out, "{key} = {value}")?;
        }
    }
    Ok(())
}

pub fn write_tables(settings: &AdmissionSettings, out: &mut String) -> fmt::Result {
    if let Some(limits) = settings.limits {
        writeln!(out, "[listener.limits]")?;
        writeln!(out, "connections_per_second = {}", limits.per_second)?;
        writeln!(out, "burst = {}", limits.burst)?;
    }
    if let Some(per_source) = &settings.per_source {
        writeln!(out, "[listener.per_source]")?;
        if let Some((rate, burst)) = per_source.rate {
            writeln!(out, "connections_per_second = {rate}")?;
            writeln!(out, "burst = {burst}")?;
        }
        if let Some(limit) = per_source.max_connections {
            writeln!(out, "max_connections = {limit}")?;
        }
        writeln!(out, "ipv6_prefix = {}", per_source.ipv6_prefix)?;
        writeln!(out, "table_size = {}", per_source.table_size)?;
        writeln!(
            out,
            "expire = \"{}\"",
            format_duration(Duration::from_micros(per_source.expire_us))
        )?;
    }
    if !settings.acl.is_empty() {
        writeln!(out, "[listener.acl]")?;
        if let Some(allow) = &settings.acl.allow {
            writeln!(out, "allow = {}", list(allow))?;
        }
        writeln!(out, "deny = {}", list(&settings.acl.deny))?;
    }
    Ok(())
}
