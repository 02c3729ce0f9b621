//! The TLS ClientHello (RFC 8446 4.1.2, RFC 5246 7.4.1.2): server name (RFC 6066), ALPN
//! (RFC 7301) and the highest version offered (supported_versions, RFC 8446 4.2.1).
//!
//! The hello may come in several TCP segments (`NeedMore` until it is whole) and, as a
//! handshake message, in several TLS records: the handshake bytes of consecutive records are
//! joined before parsing. Nothing is decrypted; the bytes are only read.

use super::{Facts, Protocol, Verdict};

const CONTENT_HANDSHAKE: u8 = 22;
const HANDSHAKE_CLIENT_HELLO: u8 = 1;
const RECORD_HEADER: usize = 5;
/// A plaintext record carries at most 2^14 bytes (RFC 8446 5.1).
const MAX_RECORD: usize = 1 << 14;
/// Larger hellos than this are not worth waiting for (post-quantum key shares make them a few
/// KiB; the caller's byte limit is lower still).
const MAX_HELLO: usize = 1 << 16;

const EXT_SERVER_NAME: u16 = 0;
const EXT_ALPN: u16 = 16;
const EXT_SUPPORTED_VERSIONS: u16 = 43;
const NAME_TYPE_HOST: u8 = 0;

pub fn sniff(bytes: &[u8]) -> Verdict {
    let mut handshake = Vec::new();
    let mut at = 0;
    loop {
        let header = &bytes[at.min(bytes.len())..];
        // The record header: handshake, version 3.x (x <= 4), length.
        match header {
            [] => return Verdict::NeedMore,
            [CONTENT_HANDSHAKE, ..] => {}
            _ => return Verdict::NoMatch,
        }
        if header.len() >= 2 && header[1] != 3 {
            return Verdict::NoMatch;
        }
        if header.len() >= 3 && header[2] > 4 {
            return Verdict::NoMatch;
        }
        if header.len() < RECORD_HEADER {
            return Verdict::NeedMore;
        }
        let length = usize::from(u16::from_be_bytes([header[3], header[4]]));
        if length == 0 || length > MAX_RECORD {
            return Verdict::NoMatch;
        }
        let body = &header[RECORD_HEADER..];
        handshake.extend_from_slice(&body[..length.min(body.len())]);
        // The handshake header: client hello, 24-bit length.
        if let Some(&kind) = handshake.first()
            && kind != HANDSHAKE_CLIENT_HELLO
        {
            return Verdict::NoMatch;
        }
        if handshake.len() >= 4 {
            let hello_len = usize::from(handshake[1]) << 16
                | usize::from(handshake[2]) << 8
                | usize::from(handshake[3]);
            if hello_len > MAX_HELLO {
                return Verdict::NoMatch;
            }
            if handshake.len() >= 4 + hello_len {
                return match client_hello(&handshake[4..4 + hello_len]) {
                    Some(facts) => Verdict::Match(Protocol::Tls, facts),
                    None => Verdict::NoMatch,
                };
            }
        }
        if body.len() < length {
            return Verdict::NeedMore;
        }
        // The hello continues in the next record.
        at += RECORD_HEADER + length;
    }
}

/// Reads big-endian fields off a slice; every read is checked.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        if count > self.bytes.len() {
            return None;
        }
        let (head, rest) = self.bytes.split_at(count);
        self.bytes = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        self.take(1).map(|bytes| bytes[0])
    }

    fn u16(&mut self) -> Option<u16> {
        self.take(2)
            .map(|bytes| u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    /// A vector with a one-byte length.
    fn vec8(&mut self) -> Option<Reader<'a>> {
        let length = usize::from(self.u8()?);
        self.take(length).map(|bytes| Reader { bytes })
    }

    /// A vector with a two-byte length.
    fn vec16(&mut self) -> Option<Reader<'a>> {
        let length = usize::from(self.u16()?);
        self.take(length).map(|bytes| Reader { bytes })
    }

    fn is_empty(&self) -> bool {
        self.bytes.is_empty()
    }
}

fn client_hello(body: &[u8]) -> Option<Facts> {
    let mut hello = Reader { bytes: body };
    let legacy_version = hello.u16()?;
    hello.take(32)?; // random
    let session_id = hello.vec8()?;
    if session_id.bytes.len() > 32 {
        return None;
    }
    let suites = hello.vec16()?;
    if suites.bytes.is_empty() || suites.bytes.len() % 2 != 0 {
        return None;
    }
    let compression = hello.vec8()?;
    if compression.bytes.is_empty() {
        return None;
    }
    let mut facts = Facts {
        tls_version: Some(legacy_version),
        ..Facts::default()
    };
    if hello.is_empty() {
        // A hello without extensions (TLS 1.2 and older may omit them).
        return Some(facts);
    }
    let mut extensions = hello.vec16()?;
    if !hello.is_empty() {
        return None;
    }
    while !extensions.is_empty() {
        let kind = extensions.u16()?;
        let mut data = extensions.vec16()?;
        match kind {
            EXT_SERVER_NAME => facts.server_name = server_name(&mut data)?,
            EXT_ALPN => facts.alpn = alpn(&mut data)?,
            EXT_SUPPORTED_VERSIONS => {
                let mut versions = data.vec8()?;
                while !versions.is_empty() {
                    let version = versions.u16()?;
                    // GREASE values (RFC 8701) are offered to be ignored.
                    if version & 0x0f0f != 0x0a0a {
                        facts.tls_version = facts.tls_version.max(Some(version));
                    }
                }
            }
            _ => {}
        }
    }
    Some(facts)
}

/// The first host name of a server_name extension, lower-cased; `Some(None)` when it carries
/// none. A name that is not a plausible DNS name fails the hello.
fn server_name(data: &mut Reader<'_>) -> Option<Option<String>> {
    let mut list = data.vec16()?;
    while !list.is_empty() {
        let kind = list.u8()?;
        let name = list.vec16()?;
        if kind == NAME_TYPE_HOST {
            let valid = !name.bytes.is_empty()
                && name.bytes.len() <= 255
                && name
                    .bytes
                    .iter()
                    .all(|&byte| byte.is_ascii_alphanumeric() || b"-._".contains(&byte));
            if !valid {
                return None;
            }
            return Some(Some(
                String::from_utf8_lossy(name.bytes).to_ascii_lowercase(),
            ));
        }
    }
    Some(None)
}

fn alpn(data: &mut Reader<'_>) -> Option<Vec<String>> {
    let mut list = data.vec16()?;
    let mut protocols = Vec::new();
    while !list.is_empty() {
        let protocol = list.vec8()?;
        if protocol.bytes.is_empty() {
            return None;
        }
        protocols.push(String::from_utf8_lossy(protocol.bytes).into_owned());
    }
    Some(protocols)
}
