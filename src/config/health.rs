//! Active health checks of a pool (`[pool.health]`): what to probe, how often, and how many
//! results in a row change a server's state.
//!
//! Pure resolution of the raw keys into typed values, and their printed form; probing is the
//! control thread's job (`crate::health`).

use std::fmt::{self, Write as _};
use std::ops::RangeInclusive;
use std::time::Duration;

use toml::Spanned;

use super::file::FileHealth;
use super::{ConfigError, Source, format_duration, integer, nonzero_duration};

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
pub const DEFAULT_RISE: u32 = 2;
pub const DEFAULT_FALL: u32 = 3;
/// Bytes of a `send` or `expect` string, after escapes.
pub const MAX_PROBE_BYTES: usize = 4096;

/// What a probe does once connected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HealthKind {
    /// The connect itself is the check.
    Tcp,
    /// Send `send` (may be empty: the server speaks first), then the answer must contain
    /// `expect` within the timeout.
    SendExpect { send: Vec<u8>, expect: Vec<u8> },
    /// `GET path HTTP/1.1`; the status must be in `expect_status`.
    Http {
        path: String,
        host: Option<String>,
        expect_status: RangeInclusive<u16>,
    },
}

impl HealthKind {
    pub fn name(&self) -> &'static str {
        match self {
            HealthKind::Tcp => "tcp",
            HealthKind::SendExpect { .. } => "send_expect",
            HealthKind::Http { .. } => "http",
        }
    }
}

/// The state a server is in before its first checks have run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StartState {
    Up,
    Down,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    pub kind: HealthKind,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive successes that bring a down server up.
    pub rise: u32,
    /// Consecutive failures that take an up server down.
    pub fall: u32,
    /// Probe this port instead of the server's traffic port (HAProxy `check port`).
    pub port: Option<u16>,
    pub start: StartState,
    /// The pool's `send_proxy`: probes send the same header first (HAProxy's
    /// `check-send-proxy`), so servers that require it can be checked.
    pub send_proxy: Option<crate::sniff::proxy::ProxyVersion>,
    /// The pool's `[pool.tls]` when `check_tls` (probes handshake and verify as traffic does).
    pub tls: Option<std::sync::Arc<crate::tls::OriginSettings>>,
}

impl HealthCheck {
    /// The check as a `[pool.health]` table (printed after its pool's keys).
    pub fn write_toml(&self, out: &mut String) -> fmt::Result {
        writeln!(out, "[pool.health]")?;
        writeln!(out, "kind = \"{}\"", self.kind.name())?;
        writeln!(out, "interval = \"{}\"", format_duration(self.interval))?;
        writeln!(out, "timeout = \"{}\"", format_duration(self.timeout))?;
        writeln!(out, "rise = {}", self.rise)?;
        writeln!(out, "fall = {}", self.fall)?;
        if let Some(port) = self.port {
            writeln!(out, "port = {port}")?;
        }
        let start = match self.start {
            StartState::Up => "up",
            StartState::Down => "down",
        };
        writeln!(out, "start = \"{start}\"")?;
        match &self.kind {
            HealthKind::Tcp => {}
            HealthKind::SendExpect { send, expect } => {
                writeln!(out, "send = \"{}\"", escape_toml(send))?;
                writeln!(out, "expect = \"{}\"", escape_toml(expect))?;
            }
            HealthKind::Http {
                path,
                host,
                expect_status,
            } => {
                writeln!(out, "path = \"{}\"", toml_string_body(path))?;
                if let Some(host) = host {
                    writeln!(out, "host = \"{}\"", toml_string_body(host))?;
                }
                if expect_status.start() == expect_status.end() {
                    writeln!(out, "expect_status = \"{}\"", expect_status.start())?;
                } else {
                    writeln!(
                        out,
                        "expect_status = \"{}-{}\"",
                        expect_status.start(),
                        expect_status.end()
                    )?;
                }
            }
        }
        Ok(())
    }
}

/// Bytes as the body of a TOML basic string whose value, after TOML's escapes and then
/// `unescape`, is the same bytes: our escapes with their backslashes doubled for TOML.
fn escape_toml(bytes: &[u8]) -> String {
    toml_string_body(&escape(bytes))
}

/// Text as the body of a TOML basic string (backslashes and quotes escaped; the text is
/// printable ASCII).
fn toml_string_body(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for ch in text.chars() {
        match ch {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            _ => out.push(ch),
        }
    }
    out
}

pub(super) fn resolve_health(
    source: &Source,
    spanned: &Spanned<FileHealth>,
) -> Result<HealthCheck, ConfigError> {
    let file = spanned.get_ref();
    let interval = nonzero_duration(
        source,
        file.interval.as_ref(),
        "health.interval",
        DEFAULT_INTERVAL,
    )?;
    let timeout = nonzero_duration(
        source,
        file.timeout.as_ref(),
        "health.timeout",
        DEFAULT_TIMEOUT,
    )?;
    if interval < Duration::from_millis(100) || interval > Duration::from_secs(3600) {
        let at = file.interval.as_ref().map_or(spanned.span(), Spanned::span);
        return Err(source.error(at, "health.interval must be from 100ms to 1h"));
    }
    if timeout > interval {
        let at = file.timeout.as_ref().map_or(spanned.span(), Spanned::span);
        return Err(source.error(
            at,
            format!(
                "health.timeout ({}) must not be longer than health.interval ({})",
                format_duration(timeout),
                format_duration(interval)
            ),
        ));
    }
    let rise = integer(
        source,
        file.rise.as_ref(),
        "health.rise",
        DEFAULT_RISE,
        1..=100,
    )?;
    let fall = integer(
        source,
        file.fall.as_ref(),
        "health.fall",
        DEFAULT_FALL,
        1..=100,
    )?;
    let port = match &file.port {
        None => None,
        Some(value) => Some(integer(source, Some(value), "health.port", 0, 1..=65_535)? as u16),
    };
    let start = match &file.start {
        None => StartState::Down,
        Some(text) => match text.get_ref().as_str() {
            "up" => StartState::Up,
            "down" => StartState::Down,
            other => {
                return Err(source.at(
                    text,
                    format!("health.start must be \"up\" or \"down\", not {other:?}"),
                ));
            }
        },
    };
    let unused = |key: &str, present: bool, kind: &str| -> Result<(), ConfigError> {
        if present {
            Err(source.error(
                spanned.span(),
                format!("health.{key} does not apply to kind = \"{kind}\""),
            ))
        } else {
            Ok(())
        }
    };
    let kind_name = file
        .kind
        .as_ref()
        .map_or("tcp", |kind| kind.get_ref().as_str());
    let kind = match kind_name {
        "tcp" => {
            unused("send", file.send.is_some(), "tcp")?;
            unused("expect", file.expect.is_some(), "tcp")?;
            unused("path", file.path.is_some(), "tcp")?;
            unused("host", file.host.is_some(), "tcp")?;
            unused("expect_status", file.expect_status.is_some(), "tcp")?;
            HealthKind::Tcp
        }
        "send_expect" => {
            unused("path", file.path.is_some(), "send_expect")?;
            unused("host", file.host.is_some(), "send_expect")?;
            unused("expect_status", file.expect_status.is_some(), "send_expect")?;
            let send = match &file.send {
                None => Vec::new(),
                Some(text) => probe_bytes(source, text, "health.send")?,
            };
            let Some(expect_text) = &file.expect else {
                return Err(source.error(
                    spanned.span(),
                    "health kind = \"send_expect\" needs expect = \"...\" (the bytes the answer must contain)",
                ));
            };
            let expect = probe_bytes(source, expect_text, "health.expect")?;
            if expect.is_empty() {
                return Err(source.at(expect_text, "health.expect must not be empty"));
            }
            HealthKind::SendExpect { send, expect }
        }
        "http" => {
            unused("send", file.send.is_some(), "http")?;
            unused("expect", file.expect.is_some(), "http")?;
            let path = match &file.path {
                None => "/".to_string(),
                Some(text) => {
                    let path = text.get_ref();
                    if !path.starts_with('/') || !header_safe(path) || path.contains(' ') {
                        return Err(source.at(
                            text,
                            format!(
                                "health.path must start with / and contain no spaces or control characters, not {path:?}"
                            ),
                        ));
                    }
                    path.clone()
                }
            };
            let host = match &file.host {
                None => None,
                Some(text) => {
                    let host = text.get_ref();
                    if host.is_empty() || !header_safe(host) || host.contains(' ') {
                        return Err(source.at(
                            text,
                            format!("health.host must be a host name without spaces, not {host:?}"),
                        ));
                    }
                    Some(host.clone())
                }
            };
            let expect_status = match &file.expect_status {
                None => 200..=399,
                Some(text) => parse_status_range(text.get_ref())
                    .map_err(|message| source.at(text, message))?,
            };
            HealthKind::Http {
                path,
                host,
                expect_status,
            }
        }
        other => {
            let at = file.kind.as_ref().map_or(spanned.span(), Spanned::span);
            return Err(source.error(
                at,
                format!("unknown health kind {other:?}: use tcp, send_expect or http"),
            ));
        }
    };
    Ok(HealthCheck {
        kind,
        interval,
        timeout,
        rise,
        fall,
        port,
        start,
        send_proxy: None,
        tls: None,
    })
}

fn header_safe(text: &str) -> bool {
    !text.is_empty()
        && text
            .bytes()
            .all(|byte| (0x21..0x7f).contains(&byte) || byte == b' ')
}

fn probe_bytes(source: &Source, text: &Spanned<String>, key: &str) -> Result<Vec<u8>, ConfigError> {
    let bytes =
        unescape(text.get_ref()).map_err(|message| source.at(text, format!("{key}: {message}")))?;
    if bytes.len() > MAX_PROBE_BYTES {
        return Err(source.at(
            text,
            format!("{key} is longer than {MAX_PROBE_BYTES} bytes"),
        ));
    }
    Ok(bytes)
}

/// `"200"` or `"200-399"`, statuses from 100 to 599.
pub fn parse_status_range(text: &str) -> Result<RangeInclusive<u16>, String> {
    let parse = |part: &str| -> Result<u16, String> {
        match part.trim().parse::<u16>() {
            Ok(status @ 100..=599) => Ok(status),
            _ => Err(format!(
                "health.expect_status must be a status or a range such as \"200-399\" (100 to 599), not {text:?}"
            )),
        }
    };
    let range = match text.split_once('-') {
        Some((low, high)) => parse(low)?..=parse(high)?,
        None => {
            let status = parse(text)?;
            status..=status
        }
    };
    if range.start() > range.end() {
        return Err(format!("health.expect_status {text:?} runs backwards"));
    }
    Ok(range)
}

/// Resolves `\r \n \t \0 \\ \" \xNN` escapes (TOML's basic strings already resolve the
/// first ones; a literal backslash reaches us from TOML `'...'` strings or `\\`).
pub fn unescape(text: &str) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(text.len());
    let mut bytes = text.bytes();
    while let Some(byte) = bytes.next() {
        if byte != b'\\' {
            out.push(byte);
            continue;
        }
        match bytes.next() {
            Some(b'r') => out.push(b'\r'),
            Some(b'n') => out.push(b'\n'),
            Some(b't') => out.push(b'\t'),
            Some(b'0') => out.push(0),
            Some(b'\\') => out.push(b'\\'),
            Some(b'"') => out.push(b'"'),
            Some(b'x') => {
                let high = bytes.next().and_then(|b| (b as char).to_digit(16));
                let low = bytes.next().and_then(|b| (b as char).to_digit(16));
                match (high, low) {
                    (Some(high), Some(low)) => out.push((high * 16 + low) as u8),
                    _ => return Err("\\x must be followed by two hex digits".to_string()),
                }
            }
            Some(other) => {
                return Err(format!(
                    "unknown escape \\{} (use \\r \\n \\t \\0 \\\\ \\\" or \\xNN)",
                    other as char
                ));
            }
            None => return Err("a lone \\ at the end".to_string()),
        }
    }
    Ok(out)
}

/// Bytes as a TOML basic string body that `unescape` (after TOML's own escapes) turns back
/// into the same bytes; also how probe answers are shown in logs and `/status`.
pub fn escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &byte in bytes {
        match byte {
            b'\r' => out.push_str("\\r"),
            b'\n' => out.push_str("\\n"),
            b'\t' => out.push_str("\\t"),
            b'\\' => out.push_str("\\\\"),
            b'"' => out.push_str("\\\""),
            0x20..=0x7e => out.push(byte as char),
            _ => {
                let _ = write!(out, "\\x{byte:02x}");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_round_trip() {
        let bytes: Vec<u8> = (0..=255u8).collect();
        assert_eq!(unescape(&escape(&bytes)).expect("valid"), bytes);
        assert_eq!(unescape("GET /\\r\\n\\x41").expect("valid"), b"GET /\r\nA");
        assert!(unescape("\\q").is_err());
        assert!(unescape("\\x4").is_err());
        assert!(unescape("\\").is_err());
    }

    #[test]
    fn toml_escapes_survive_both_layers() {
        let bytes = b"GET /ping HTTP/1.0\r\n\r\n\x01\"\\".to_vec();
        let toml_text = format!("value = \"{}\"", escape_toml(&bytes));
        let table: toml::Table = toml::from_str(&toml_text).expect("valid toml");
        let value = table["value"].as_str().expect("string");
        assert_eq!(unescape(value).expect("valid escapes"), bytes);
    }

    #[test]
    fn status_ranges() {
        assert_eq!(parse_status_range("200"), Ok(200..=200));
        assert_eq!(parse_status_range("200-399"), Ok(200..=399));
        assert!(parse_status_range("399-200").is_err());
        assert!(parse_status_range("99").is_err());
        assert!(parse_status_range("abc").is_err());
    }
}
