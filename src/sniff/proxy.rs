//! The PROXY protocol header (v1 text, v2 binary) that a trusted load balancer puts before the
//! client's own bytes: the `ppp` crate parses it; this module decides when enough bytes are
//! there, bounds them, and keeps what the proxy needs (addresses, TLVs, header length).

use std::net::{IpAddr, SocketAddr};

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

/// Which PROXY header a pool sends its servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

impl ProxyVersion {
    pub fn name(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
        }
    }
}

/// v2 TLV types not passed on: a checksum of the header it came in (wrong for ours) and
/// padding.
const TLV_CRC32C: u8 = 0x03;
const TLV_NOOP: u8 = 0x04;

/// The header announcing a TCP connection from `source` to `destination`, with the TLVs of a
/// v2 header the client's own load balancer sent (v1 has no TLVs; a checksum and padding are
/// left out). TLVs that would not fit the header's 16-bit length are left out too.
pub fn header_passing_on(
    version: ProxyVersion,
    source: SocketAddr,
    destination: SocketAddr,
    tlvs: &[(u8, Vec<u8>)],
) -> Vec<u8> {
    let mut bytes = header(version, source, destination);
    if version == ProxyVersion::V1 {
        return bytes;
    }
    for (kind, value) in tlvs {
        if matches!(*kind, TLV_CRC32C | TLV_NOOP) {
            continue;
        }
        let Ok(length) = u16::try_from(value.len()) else {
            continue;
        };
        let announced = usize::from(u16::from_be_bytes([bytes[14], bytes[15]]));
        let Ok(total) = u16::try_from(announced + 3 + value.len()) else {
            continue;
        };
        bytes.push(*kind);
        bytes.extend_from_slice(&length.to_be_bytes());
        bytes.extend_from_slice(value);
        bytes[14..16].copy_from_slice(&total.to_be_bytes());
    }
    bytes
}

/// The header announcing a TCP connection from `source` to `destination`. Mixed families (an
/// IPv4 client on a dual-stack IPv6 socket) are written as IPv6, with the IPv4 address mapped.
pub fn header(version: ProxyVersion, source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    let (source_ip, destination_ip) = match (source.ip(), destination.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => (IpAddr::V4(s), IpAddr::V4(d)),
        (s, d) => (IpAddr::V6(as_v6(s)), IpAddr::V6(as_v6(d))),
    };
    match version {
        ProxyVersion::V1 => {
            let family = if source_ip.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {family} {source_ip} {destination_ip} {} {}\r\n",
                source.port(),
                destination.port()
            )
            .into_bytes()
        }
        ProxyVersion::V2 => {
            let mut bytes = V2_SIGNATURE.to_vec();
            bytes.push(0x21); // version 2, PROXY
            match (source_ip, destination_ip) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    bytes.push(0x11); // TCP over IPv4
                    bytes.extend_from_slice(&12u16.to_be_bytes());
                    bytes.extend_from_slice(&s.octets());
                    bytes.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    bytes.push(0x21); // TCP over IPv6
                    bytes.extend_from_slice(&36u16.to_be_bytes());
                    bytes.extend_from_slice(&as_v6(s).octets());
                    bytes.extend_from_slice(&as_v6(d).octets());
                }
            }
            bytes.extend_from_slice(&source.port().to_be_bytes());
            bytes.extend_from_slice(&destination.port().to_be_bytes());
            bytes
        }
    }
}

fn as_v6(ip: IpAddr) -> std::net::Ipv6Addr {
    match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    }
}
