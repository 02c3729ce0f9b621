//! The PROXY protocol header (v1 text, v2 binary) that a trusted load balancer puts before the
//! client's own bytes: the `ppp` crate parses it; this module decides when enough bytes are
//! there, bounds them, and keeps what the proxy needs (addresses, TLVs, header length).

use std::net::SocketAddr;

use ppp::v1;
use ppp::v2;

/// The v2 signature (12 bytes) and the v1 prefix.
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";
/// A v1 line is at most 107 bytes, CRLF included (the specification's worst case).
const V1_MAX: usize = 107;
/// v2: the 16-byte fixed part plus the address and TLV block it announces.
const V2_FIXED: usize = 16;

/// What the header says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyHeader {
    pub version: u8,
    /// The original client and the address it connected to; `None` for `UNKNOWN` (v1) and
    /// `LOCAL` or unspecified/unix families (v2): the connection's own addresses stand.
    pub addresses: Option<(SocketAddr, SocketAddr)>,
    /// v2 type-length-value fields, in order (type, value).
    pub tlvs: Vec<(u8, Vec<u8>)>,
    /// Header bytes to skip before the client's own.
    pub length: usize,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProxyVerdict {
    Header(ProxyHeader),
    NeedMore,
    /// The bytes do not start with a PROXY header.
    Absent,
    /// They start like one but break its rules.
    Invalid(&'static str),
}

pub fn parse(bytes: &[u8]) -> ProxyVerdict {
    if super::agrees_with(bytes, V2_SIGNATURE) {
        if bytes.len() < V2_FIXED {
            return ProxyVerdict::NeedMore;
        }
        return parse_v2(bytes);
    }
    if super::agrees_with(bytes, V1_PREFIX) {
        if bytes.len() < V1_PREFIX.len() {
            return ProxyVerdict::NeedMore;
        }
        return parse_v1(bytes);
    }
    ProxyVerdict::Absent
}

fn parse_v2(bytes: &[u8]) -> ProxyVerdict {
    let announced = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
    if bytes.len() < V2_FIXED + announced {
        return ProxyVerdict::NeedMore;
    }
    let header = match v2::Header::try_from(&bytes[..V2_FIXED + announced]) {
        Ok(header) => header,
        Err(_) => return ProxyVerdict::Invalid("malformed v2 header"),
    };
    let addresses = match header.command {
        v2::Command::Local => None,
        v2::Command::Proxy => match header.addresses {
            v2::Addresses::IPv4(ip) => Some((
                SocketAddr::from((ip.source_address, ip.source_port)),
                SocketAddr::from((ip.destination_address, ip.destination_port)),
            )),
            v2::Addresses::IPv6(ip) => Some((
                SocketAddr::from((ip.source_address, ip.source_port)),
                SocketAddr::from((ip.destination_address, ip.destination_port)),
            )),
            v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
        },
    };
    if header.command == v2::Command::Proxy && header.protocol == v2::Protocol::Datagram {
        return ProxyVerdict::Invalid("v2 header for a datagram connection");
    }
    let mut tlvs = Vec::new();
    for tlv in header.tlvs() {
        match tlv {
            Ok(tlv) => tlvs.push((tlv.kind, tlv.value.to_vec())),
            Err(_) => return ProxyVerdict::Invalid("malformed v2 TLV"),
        }
    }
    ProxyVerdict::Header(ProxyHeader {
        version: 2,
        addresses,
        tlvs,
        length: V2_FIXED + announced,
    })
}

fn parse_v1(bytes: &[u8]) -> ProxyVerdict {
    let Some(end) = bytes.windows(2).position(|pair| pair == b"\r\n") else {
        return if bytes.len() >= V1_MAX {
            ProxyVerdict::Invalid("v1 line longer than 107 bytes")
        } else {
            ProxyVerdict::NeedMore
        };
    };
    let length = end + 2;
    if length > V1_MAX {
        return ProxyVerdict::Invalid("v1 line longer than 107 bytes");
    }
    let header = match v1::Header::try_from(&bytes[..length]) {
        Ok(header) => header,
        Err(_) => return ProxyVerdict::Invalid("malformed v1 line"),
    };
    let addresses = match header.addresses {
        v1::Addresses::Tcp4(ip) => Some((
            SocketAddr::from((ip.source_address, ip.source_port)),
            SocketAddr::from((ip.destination_address, ip.destination_port)),
        )),
        v1::Addresses::Tcp6(ip) => Some((
            SocketAddr::from((ip.source_address, ip.source_port)),
            SocketAddr::from((ip.destination_address, ip.destination_port)),
        )),
        v1::Addresses::Unknown => None,
    };
    ProxyVerdict::Header(ProxyHeader {
        version: 1,
        addresses,
        tlvs: Vec::new(),
        length,
    })
}
