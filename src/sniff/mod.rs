//! What a client speaks, from its first bytes: sans-IO.
//!
//! Each sniffer takes the bytes a client has sent so far and answers `Match` (with what it
//! learned: SNI, ALPN, HTTP host and path, database user, ...), `NeedMore` (a prefix of its
//! protocol, undecided) or `NoMatch`. `sniff` asks every client-speaks-first sniffer and
//! decides as soon as one matches and every sniffer before it in precedence has ruled itself
//! out. No sockets, no clock: the loop feeds bytes in and enforces the byte and time limits;
//! server-speaks-first protocols (MySQL, SMTP, FTP) are chosen by the client's silence, not
//! here. The PROXY protocol header, which comes before any of these, has its own parser
//! (`proxy`).
//!
//! Precedence matters only for inputs two sniffers could both claim; the order below puts the
//! strict binary formats (fixed magic numbers and lengths) before the loose text ones.

pub mod proxy;

mod binary;
mod http;
mod redis;
mod tls;

/// A protocol a client can be recognised by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    Tls,
    Http,
    H2,
    Postgres,
    MongoDb,
    Redis,
    Rtmp,
    Ssh,
}

impl Protocol {
    pub const ALL: [Protocol; 8] = [
        Protocol::Tls,
        Protocol::Http,
        Protocol::H2,
        Protocol::Postgres,
        Protocol::MongoDb,
        Protocol::Redis,
        Protocol::Rtmp,
        Protocol::Ssh,
    ];

    /// The name used in configs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tls => "tls",
            Protocol::Http => "http",
            Protocol::H2 => "h2",
            Protocol::Postgres => "postgres",
            Protocol::MongoDb => "mongodb",
            Protocol::Redis => "redis",
            Protocol::Rtmp => "rtmp",
            Protocol::Ssh => "ssh",
        }
    }
}

/// What a sniffer learned beyond the protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facts {
    /// TLS: the server name (SNI), lower-cased.
    pub server_name: Option<String>,
    /// TLS: the protocols the client offers (ALPN), in its order.
    pub alpn: Vec<String>,
    /// TLS: the highest version the client offers (0x0304 for 1.3).
    pub tls_version: Option<u16>,
    /// HTTP/1.x: request method, path (as sent) and Host header (lower-cased, without port).
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    /// PostgreSQL: the kind of first message and, for a startup message, user and database.
    pub postgres: Option<PostgresFirst>,
    pub user: Option<String>,
    pub database: Option<String>,
}

/// The first message of a PostgreSQL client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PostgresFirst {
    Startup,
    SslRequest,
    GssEncRequest,
    CancelRequest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Match(Protocol, Facts),
    /// A prefix of this protocol (or of several): more bytes decide.
    NeedMore,
    NoMatch,
}

/// Sniffers in precedence order: strict binary formats first.
const ORDER: [Protocol; 8] = [
    Protocol::Tls,
    Protocol::Postgres,
    Protocol::MongoDb,
    Protocol::Ssh,
    Protocol::H2,
    Protocol::Http,
    Protocol::Redis,
    Protocol::Rtmp,
];

/// One protocol's sniffer on `bytes`.
pub fn sniff_one(protocol: Protocol, bytes: &[u8]) -> Verdict {
    match protocol {
        Protocol::Tls => tls::sniff(bytes),
        Protocol::Http => http::sniff(bytes),
        Protocol::H2 => binary::h2(bytes),
        Protocol::Postgres => binary::postgres(bytes),
        Protocol::MongoDb => binary::mongodb(bytes),
        Protocol::Redis => redis::sniff(bytes),
        Protocol::Rtmp => binary::rtmp(bytes),
        Protocol::Ssh => binary::ssh(bytes),
    }
}

/// What the client speaks, among `wanted`: the first sniffer in precedence order that matches
/// once every sniffer before it has said `NoMatch`; `NeedMore` while any of them is undecided.
pub fn sniff(bytes: &[u8], wanted: &[Protocol]) -> Verdict {
    let mut undecided = false;
    for protocol in ORDER {
        if !wanted.contains(&protocol) {
            continue;
        }
        match sniff_one(protocol, bytes) {
            Verdict::Match(found, facts) if !undecided => return Verdict::Match(found, facts),
            Verdict::Match(..) | Verdict::NeedMore => undecided = true,
            Verdict::NoMatch => {}
        }
    }
    if undecided {
        Verdict::NeedMore
    } else {
        Verdict::NoMatch
    }
}

/// Whether `bytes` so far agree with the start of `expected` (either may be the longer).
pub(crate) fn agrees_with(bytes: &[u8], expected: &[u8]) -> bool {
    let shared = bytes.len().min(expected.len());
    bytes[..shared] == expected[..shared]
}

#[cfg(test)]
mod tests;
