//! The probes of active health checks: one TCP connection per check, on the control thread's
//! tokio runtime. Every probe is bounded by the check's timeout, reads at most
//! `MAX_ANSWER` bytes, and closes with a reset (SO_LINGER 0, as HAProxy does), so thousands of
//! checks leave no TIME_WAIT behind.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout_at};
use tokio_rustls::TlsConnector;

use super::CheckResult;
use crate::config::{HealthCheck, HealthKind, escape_bytes};

/// Bytes of an answer a probe reads at most.
const MAX_ANSWER: usize = 16 * 1024;
/// Bytes of an unexpected answer quoted in the reason.
const QUOTED_BYTES: usize = 64;

/// Where a check of a server at `addr` connects (its traffic port, or the check's own port).
pub fn probe_target(addr: SocketAddr, check: &HealthCheck) -> SocketAddr {
    match check.port {
        Some(port) => SocketAddr::new(addr.ip(), port),
        None => addr,
    }
}

/// What a check of a TLS pool handshakes with (built once per probed server), or why it
/// cannot.
pub type ProbeTls = Result<TlsConnector, String>;

/// The TLS side of a check of `check`'s pool, if it speaks TLS.
pub fn probe_tls(check: &HealthCheck) -> Option<ProbeTls> {
    check
        .tls
        .as_ref()
        .map(|tls| tls.client_config().map(TlsConnector::from))
}

/// Runs one check of the server at `addr` (its traffic address; `Host` defaults to it).
pub async fn probe(addr: SocketAddr, check: &HealthCheck, tls: Option<&ProbeTls>) -> CheckResult {
    let started = Instant::now();
    let deadline = started + check.timeout;
    let outcome = run(addr, check, tls, deadline).await;
    let duration = started.elapsed();
    match outcome {
        Ok(reason) => CheckResult {
            ok: true,
            reason,
            duration,
        },
        Err(reason) => CheckResult {
            ok: false,
            reason,
            duration,
        },
    }
}

fn describe(error: &io::Error) -> String {
    match error.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused".to_string(),
        io::ErrorKind::ConnectionReset => "connection reset".to_string(),
        _ => error.to_string(),
    }
}

fn quote(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(QUOTED_BYTES)];
    let more = if bytes.len() > QUOTED_BYTES {
        "..."
    } else {
        ""
    };
    format!("\"{}{more}\"", escape_bytes(shown))
}

fn timed_out(check: &HealthCheck, what: &str) -> String {
    format!(
        "timeout after {} ms {what}",
        check.timeout.as_millis().max(1)
    )
}

async fn run(
    addr: SocketAddr,
    check: &HealthCheck,
    tls: Option<&ProbeTls>,
    deadline: Instant,
) -> Result<String, String> {
    let target = probe_target(addr, check);
    let mut stream = match timeout_at(deadline, TcpStream::connect(target)).await {
        Err(_) => return Err(timed_out(check, "connecting")),
        Ok(Err(error)) => return Err(describe(&error)),
        Ok(Ok(stream)) => stream,
    };
    // Close with a reset: no TIME_WAIT per check (a zero linger never blocks the close).
    let _ = socket2::SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    let _ = stream.set_nodelay(true);
    if let Some(version) = check.send_proxy {
        let (Ok(local), Ok(peer)) = (stream.local_addr(), stream.peer_addr()) else {
            return Err("cannot read the probe's addresses for its PROXY header".to_string());
        };
        let header = crate::sniff::proxy::header(version, local, peer);
        write(&mut stream, &header, check, deadline).await?;
    }
    let Some(tls) = tls else {
        return exchange(&mut stream, addr, check, deadline, "connected").await;
    };
    let connector = tls.as_ref().map_err(Clone::clone)?;
    let name = check.tls.as_ref().map_or(
        rustls::pki_types::ServerName::IpAddress(addr.ip().into()),
        |tls| tls.server_name_for(addr),
    );
    let mut stream = match timeout_at(deadline, connector.connect(name, stream)).await {
        Err(_) => return Err(timed_out(check, "in the TLS handshake")),
        Ok(Err(error)) => return Err(format!("TLS handshake: {error}")),
        Ok(Ok(stream)) => stream,
    };
    exchange(&mut stream, addr, check, deadline, "TLS handshake done").await
}

/// The check's own exchange over a connected (and, for TLS pools, handshaken) stream.
async fn exchange<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    addr: SocketAddr,
    check: &HealthCheck,
    deadline: Instant,
    connected: &str,
) -> Result<String, String> {
    match &check.kind {
        HealthKind::Tcp => Ok(connected.to_string()),
        HealthKind::SendExpect { send, expect } => {
            if !send.is_empty() {
                write(stream, send, check, deadline).await?;
            }
            let mut answer = Vec::new();
            loop {
                if contains(&answer, expect) {
                    return Ok(format!("answer contains {}", quote(expect)));
                }
                if answer.len() >= MAX_ANSWER {
                    return Err(format!("unexpected answer {}", quote(&answer)));
                }
                match read_more(stream, &mut answer, deadline).await {
                    ReadOutcome::Data => {}
                    ReadOutcome::Closed if answer.is_empty() => {
                        return Err("closed without an answer".to_string());
                    }
                    ReadOutcome::Closed => {
                        return Err(format!("unexpected answer {}", quote(&answer)));
                    }
                    ReadOutcome::TimedOut if answer.is_empty() => {
                        return Err(timed_out(check, "waiting for an answer"));
                    }
                    ReadOutcome::TimedOut => {
                        return Err(format!(
                            "unexpected answer {} (timeout after {} ms)",
                            quote(&answer),
                            check.timeout.as_millis()
                        ));
                    }
                    ReadOutcome::Failed(error) => return Err(describe(&error)),
                }
            }
        }
        HealthKind::Http {
            path,
            host,
            expect_status,
        } => {
            let host = host.clone().unwrap_or_else(|| addr.to_string());
            let request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: ringproxy-health-check\r\n\
                 Accept: */*\r\nConnection: close\r\n\r\n"
            );
            write(stream, request.as_bytes(), check, deadline).await?;
            let mut answer = Vec::new();
            loop {
                let mut headers = [httparse::EMPTY_HEADER; 64];
                let mut response = httparse::Response::new(&mut headers);
                match response.parse(&answer) {
                    Ok(httparse::Status::Complete(_)) => {
                        let status = response.code.unwrap_or(0);
                        return if expect_status.contains(&status) {
                            Ok(format!("status {status}"))
                        } else {
                            Err(format!("status {status}"))
                        };
                    }
                    Ok(httparse::Status::Partial) => {}
                    Err(error) => {
                        return Err(format!(
                            "not an HTTP response ({error}): {}",
                            quote(&answer)
                        ));
                    }
                }
                if answer.len() >= MAX_ANSWER {
                    return Err(format!("response head too long: {}", quote(&answer)));
                }
                match read_more(stream, &mut answer, deadline).await {
                    ReadOutcome::Data => {}
                    ReadOutcome::Closed if answer.is_empty() => {
                        return Err("closed without a response".to_string());
                    }
                    ReadOutcome::Closed => {
                        return Err(format!("incomplete response {}", quote(&answer)));
                    }
                    ReadOutcome::TimedOut => {
                        return Err(timed_out(check, "waiting for the response"));
                    }
                    ReadOutcome::Failed(error) => return Err(describe(&error)),
                }
            }
        }
    }
}

async fn write<S: AsyncWrite + Unpin>(
    stream: &mut S,
    bytes: &[u8],
    check: &HealthCheck,
    deadline: Instant,
) -> Result<(), String> {
    match timeout_at(deadline, stream.write_all(bytes)).await {
        Err(_) => Err(timed_out(check, "sending")),
        Ok(Err(error)) => Err(describe(&error)),
        Ok(Ok(())) => Ok(()),
    }
}

enum ReadOutcome {
    Data,
    Closed,
    TimedOut,
    Failed(io::Error),
}

async fn read_more<S: AsyncRead + Unpin>(
    stream: &mut S,
    answer: &mut Vec<u8>,
    deadline: Instant,
) -> ReadOutcome {
    let mut chunk = [0u8; 4096];
    let room = (MAX_ANSWER - answer.len().min(MAX_ANSWER)).min(chunk.len());
    match timeout_at(deadline, stream.read(&mut chunk[..room.max(1)])).await {
        Err(_) => ReadOutcome::TimedOut,
        Ok(Ok(0)) => ReadOutcome::Closed,
        Ok(Ok(count)) => {
            answer.extend_from_slice(&chunk[..count]);
            ReadOutcome::Data
        }
        Ok(Err(error)) => ReadOutcome::Failed(error),
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    !needle.is_empty()
        && haystack
            .windows(needle.len())
            .any(|window| window == needle)
}
