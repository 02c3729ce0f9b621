//! Sniffers for formats with fixed magic numbers or layouts: the HTTP/2 preface, PostgreSQL's
//! first message, MongoDB's wire header, RTMP's C0+C1 and SSH's identification string.

use super::{Facts, PostgresFirst, Protocol, Verdict, agrees_with};

/// The HTTP/2 connection preface a prior-knowledge client sends first (RFC 9113, 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

pub fn h2(bytes: &[u8]) -> Verdict {
    if !agrees_with(bytes, H2_PREFACE) {
        Verdict::NoMatch
    } else if bytes.len() < H2_PREFACE.len() {
        Verdict::NeedMore
    } else {
        Verdict::Match(Protocol::H2, Facts::default())
    }
}

/// PostgreSQL's protocol 3.0 and its special request codes (`protocol.sgml`).
const POSTGRES_V3: u32 = 3 << 16;
const SSL_REQUEST: u32 = 80_877_103;
const GSSENC_REQUEST: u32 = 80_877_104;
const CANCEL_REQUEST: u32 = 80_877_102;
/// The server refuses startup packets longer than this (`MAX_STARTUP_PACKET_LENGTH`).
const POSTGRES_MAX_STARTUP: u32 = 10_000;

/// A client's first message has no type byte: a 32-bit length, then a 32-bit code.
pub fn postgres(bytes: &[u8]) -> Verdict {
    if bytes.len() < 8 {
        // The length's first two bytes are zero for every valid first message.
        return if agrees_with(bytes, &[0, 0]) {
            Verdict::NeedMore
        } else {
            Verdict::NoMatch
        };
    }
    let length = be32(bytes, 0);
    let code = be32(bytes, 4);
    let first = match (code, length) {
        (SSL_REQUEST, 8) => PostgresFirst::SslRequest,
        (GSSENC_REQUEST, 8) => PostgresFirst::GssEncRequest,
        (CANCEL_REQUEST, 16) => PostgresFirst::CancelRequest,
        (POSTGRES_V3, 9..=POSTGRES_MAX_STARTUP) => PostgresFirst::Startup,
        _ => return Verdict::NoMatch,
    };
    let mut facts = Facts {
        postgres: Some(first),
        ..Facts::default()
    };
    if first == PostgresFirst::Startup {
        // Parameters follow as NUL-terminated name/value pairs; user and database name the
        // session. Read what is there; a truncated list only means fewer facts.
        let end = (length as usize).min(bytes.len());
        let mut fields = bytes[8..end].split(|&byte| byte == 0);
        while let (Some(name), Some(value)) = (fields.next(), fields.next()) {
            let value = String::from_utf8_lossy(value).into_owned();
            match name {
                b"user" => facts.user = Some(value),
                b"database" => facts.database = Some(value),
                b"" => break,
                _ => {}
            }
        }
    }
    Verdict::Match(Protocol::Postgres, facts)
}

/// MongoDB's client opcodes (OP_QUERY is what legacy drivers and the handshake of old servers
/// use; OP_MSG everything since 3.6; OP_COMPRESSED wraps either).
const OP_QUERY: u32 = 2004;
const OP_COMPRESSED: u32 = 2012;
const OP_MSG: u32 = 2013;
/// mongod's `maxMessageSizeBytes`.
const MONGO_MAX_MESSAGE: u32 = 48_000_000;

/// The 16-byte little-endian header: messageLength, requestID, responseTo, opCode. A client's
/// first message answers nothing, so responseTo is 0.
pub fn mongodb(bytes: &[u8]) -> Verdict {
    if bytes.len() < 16 {
        return match bytes.len() {
            // The length must be at least a header and at most 48 MB: its top byte is < 3.
            4.. if !(16..=MONGO_MAX_MESSAGE).contains(&le32(bytes, 0)) => Verdict::NoMatch,
            12.. if le32(bytes, 8) != 0 => Verdict::NoMatch,
            _ => Verdict::NeedMore,
        };
    }
    let length = le32(bytes, 0);
    let response_to = le32(bytes, 8);
    let opcode = le32(bytes, 12);
    if (16..=MONGO_MAX_MESSAGE).contains(&length)
        && response_to == 0
        && matches!(opcode, OP_QUERY | OP_COMPRESSED | OP_MSG)
    {
        Verdict::Match(Protocol::MongoDb, Facts::default())
    } else {
        Verdict::NoMatch
    }
}

/// RTMP's handshake: C0 is the version byte 3, C1 is 1,536 bytes (time, four zero bytes in the
/// simple handshake, random data). Only the version and the length are certain, so the whole
/// C1 must be there before it counts.
const RTMP_VERSION: u8 = 3;
const RTMP_C1_LEN: usize = 1536;

pub fn rtmp(bytes: &[u8]) -> Verdict {
    match bytes.first() {
        None => Verdict::NeedMore,
        Some(&RTMP_VERSION) if bytes.len() > RTMP_C1_LEN => {
            Verdict::Match(Protocol::Rtmp, Facts::default())
        }
        Some(&RTMP_VERSION) => Verdict::NeedMore,
        Some(_) => Verdict::NoMatch,
    }
}

/// SSH's identification string (RFC 4253, 4.2), "SSH-1.99-" for clients that also speak 1.x.
pub fn ssh(bytes: &[u8]) -> Verdict {
    for prefix in [&b"SSH-2.0-"[..], b"SSH-1.99-"] {
        if agrees_with(bytes, prefix) {
            return if bytes.len() >= prefix.len() {
                Verdict::Match(Protocol::Ssh, Facts::default())
            } else {
                Verdict::NeedMore
            };
        }
    }
    Verdict::NoMatch
}

fn be32(bytes: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

fn le32(bytes: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}
