//! Sniffers against bytes captured from real clients (`captures/`: openssl s_client, curl,
//! psql, redis-cli, OpenSSH, HAProxy's send-proxy-v2), messages built from their
//! specifications where no client was at hand (MongoDB, RTMP, GSSENCRequest), every prefix of
//! each (a message split across segments), a deterministic mutation sweep, and a fuzz run of a
//! million proptest-mutated inputs per sniffer and for the PROXY parser (in place of
//! cargo-fuzz, which needs a nightly toolchain this project does not build with).

use super::proxy::{ProxyVerdict, parse};
use super::*;

const TLS13: &[u8] = include_bytes!("captures/tls13_sni_alpn.bin");
const TLS12: &[u8] = include_bytes!("captures/tls12_sni.bin");
const TLS_NO_SNI: &[u8] = include_bytes!("captures/tls_no_sni.bin");
const HTTP11: &[u8] = include_bytes!("captures/http11_curl.bin");
const H2: &[u8] = include_bytes!("captures/h2_prior_knowledge.bin");
const PG_SSL: &[u8] = include_bytes!("captures/postgres_sslrequest.bin");
const PG_STARTUP: &[u8] = include_bytes!("captures/postgres_startup.bin");
const REDIS2: &[u8] = include_bytes!("captures/redis_ping_resp2.bin");
const REDIS3: &[u8] = include_bytes!("captures/redis_hello_resp3.bin");
const SSH: &[u8] = include_bytes!("captures/ssh_client.bin");
const PROXY_V1: &[u8] = include_bytes!("captures/proxy_v1_curl.bin");
const PROXY_V2_V4: &[u8] = include_bytes!("captures/proxy_v2_haproxy_ipv4.bin");
const PROXY_V2_V6: &[u8] = include_bytes!("captures/proxy_v2_haproxy_ipv6.bin");
const PROXY_V2_TLVS: &[u8] = include_bytes!("captures/proxy_v2_haproxy_tlvs.bin");

/// A MongoDB OP_MSG `hello` as drivers send it first: header, flag bits, a kind-0 section.
fn mongo_hello() -> Vec<u8> {
    let document: &[u8] =
        b"\x23\x00\x00\x00\x10hello\x00\x01\x00\x00\x00\x02$db\x00\x06\x00\x00\x00admin\x00\x00";
    let mut message = Vec::new();
    let length = 16 + 4 + 1 + document.len();
    message.extend_from_slice(&(length as u32).to_le_bytes());
    message.extend_from_slice(&7u32.to_le_bytes()); // requestID
    message.extend_from_slice(&0u32.to_le_bytes()); // responseTo
    message.extend_from_slice(&2013u32.to_le_bytes()); // OP_MSG
    message.extend_from_slice(&0u32.to_le_bytes()); // flagBits
    message.push(0); // section kind 0
    message.extend_from_slice(document);
    message
}

/// RTMP C0 (version 3) and a simple-handshake C1: time, four zero bytes, 1,528 random bytes.
fn rtmp_c0_c1() -> Vec<u8> {
    let mut bytes = vec![3u8];
    bytes.extend_from_slice(&1234u32.to_be_bytes());
    bytes.extend_from_slice(&[0; 4]);
    bytes.extend((0..1528u32).map(|i| (i * 31 % 251) as u8));
    bytes
}

/// Every capture and built message: the seeds of the mutation sweep and the fuzz run.
fn every_capture() -> Vec<Vec<u8>> {
    let mut captures: Vec<Vec<u8>> = [
        TLS13,
        TLS12,
        TLS_NO_SNI,
        HTTP11,
        H2,
        PG_SSL,
        PG_STARTUP,
        REDIS2,
        REDIS3,
        SSH,
        PROXY_V1,
        PROXY_V2_V4,
        PROXY_V2_V6,
        PROXY_V2_TLVS,
    ]
    .iter()
    .map(|bytes| bytes.to_vec())
    .collect();
    captures.push(mongo_hello());
    captures.push(rtmp_c0_c1());
    captures
}

fn all() -> Vec<Protocol> {
    Protocol::ALL.to_vec()
}

fn matched(bytes: &[u8]) -> (Protocol, Facts) {
    match sniff(bytes, &all()) {
        Verdict::Match(protocol, facts) => (protocol, facts),
        other => panic!("no match on {} bytes: {other:?}", bytes.len()),
    }
}

/// Every strict prefix is undecided, the whole message decides.
fn assert_prefixes_wait(bytes: &[u8], decided_at: usize) {
    for end in 0..decided_at {
        assert_eq!(
            sniff(&bytes[..end], &all()),
            Verdict::NeedMore,
            "prefix of {end} of {} bytes",
            bytes.len()
        );
    }
}

#[test]
fn a_tls13_client_hello_gives_sni_alpn_and_version() {
    let (protocol, facts) = matched(TLS13);
    assert_eq!(protocol, Protocol::Tls);
    assert_eq!(facts.server_name.as_deref(), Some("api.example.com"));
    assert_eq!(facts.alpn, ["h2", "http/1.1"]);
    assert_eq!(facts.tls_version, Some(0x0304));
    assert_prefixes_wait(TLS13, TLS13.len());
}

#[test]
fn a_tls12_only_hello_and_one_without_sni() {
    let (protocol, facts) = matched(TLS12);
    assert_eq!(protocol, Protocol::Tls);
    assert_eq!(facts.server_name.as_deref(), Some("db.internal"));
    assert_eq!(facts.tls_version, Some(0x0303));
    let (protocol, facts) = matched(TLS_NO_SNI);
    assert_eq!(protocol, Protocol::Tls);
    assert_eq!(facts.server_name, None);
}

#[test]
fn a_client_hello_split_over_two_records_is_joined() {
    // Re-frame the handshake message of the capture into two records.
    let handshake = &TLS13[5..];
    let (first, second) = handshake.split_at(100);
    let mut framed = Vec::new();
    for part in [first, second] {
        framed.extend_from_slice(&[22, 3, 1]);
        framed.extend_from_slice(&(part.len() as u16).to_be_bytes());
        framed.extend_from_slice(part);
    }
    let (protocol, facts) = matched(&framed);
    assert_eq!(protocol, Protocol::Tls);
    assert_eq!(facts.server_name.as_deref(), Some("api.example.com"));
    assert_prefixes_wait(&framed, framed.len());
}

#[test]
fn a_plain_http_request_to_a_tls_sniffer_is_no_match() {
    assert_eq!(sniff_one(Protocol::Tls, HTTP11), Verdict::NoMatch);
    assert_eq!(
        sniff_one(Protocol::Tls, b"\x16\x03\x01\x00\x00"),
        Verdict::NoMatch
    );
}

#[test]
fn an_http11_request_gives_method_host_and_path() {
    let (protocol, facts) = matched(HTTP11);
    assert_eq!(protocol, Protocol::Http);
    assert_eq!(facts.method.as_deref(), Some("GET"));
    assert_eq!(facts.path.as_deref(), Some("/v1/users?x=1"));
    assert_eq!(facts.host.as_deref(), Some("admin.example.com"));
    // The head ends at the blank line: until then, undecided.
    let head_end = HTTP11
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("head")
        + 4;
    assert_prefixes_wait(HTTP11, head_end);
    let (_, facts) = matched(b"POST /x HTTP/1.0\r\nHost: Example.COM:8080\r\n\r\n");
    assert_eq!(facts.host.as_deref(), Some("example.com"));
}

#[test]
fn the_h2_preface_is_h2_not_http() {
    let (protocol, _) = matched(H2);
    assert_eq!(protocol, Protocol::H2);
    assert_prefixes_wait(H2, 24);
    assert_eq!(sniff_one(Protocol::Http, H2), Verdict::NoMatch);
}

#[test]
fn postgres_first_messages() {
    let (protocol, facts) = matched(PG_SSL);
    assert_eq!(protocol, Protocol::Postgres);
    assert_eq!(facts.postgres, Some(PostgresFirst::SslRequest));
    let (_, facts) = matched(PG_STARTUP);
    assert_eq!(facts.postgres, Some(PostgresFirst::Startup));
    assert_eq!(facts.user.as_deref(), Some("alice"));
    assert_eq!(facts.database.as_deref(), Some("shop"));
    let gssenc = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30];
    assert_eq!(
        matched(&gssenc).1.postgres,
        Some(PostgresFirst::GssEncRequest)
    );
    let cancel = [0, 0, 0, 16, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1, 0, 0, 0, 2];
    assert_eq!(
        matched(&cancel).1.postgres,
        Some(PostgresFirst::CancelRequest)
    );
    assert_prefixes_wait(PG_SSL, 8);
    // An SSLRequest with the wrong length is not one.
    assert_eq!(
        sniff_one(Protocol::Postgres, &[0, 0, 0, 9, 0x04, 0xd2, 0x16, 0x2f, 0]),
        Verdict::NoMatch
    );
}

#[test]
fn a_mongodb_op_msg_and_op_query() {
    let hello = mongo_hello();
    assert_eq!(matched(&hello).0, Protocol::MongoDb);
    assert_prefixes_wait(&hello, 16);
    let mut query = hello.clone();
    query[12..16].copy_from_slice(&2004u32.to_le_bytes());
    assert_eq!(matched(&query).0, Protocol::MongoDb);
    let mut reply = hello;
    reply[8..12].copy_from_slice(&5u32.to_le_bytes()); // a response, not a first request
    assert_eq!(sniff_one(Protocol::MongoDb, &reply), Verdict::NoMatch);
}

#[test]
fn redis_resp2_resp3_and_inline() {
    assert_eq!(matched(REDIS2).0, Protocol::Redis);
    assert_eq!(matched(REDIS3).0, Protocol::Redis);
    assert_prefixes_wait(REDIS2, 5);
    assert_eq!(matched(b"PING\r\n").0, Protocol::Redis);
    assert_eq!(matched(b"auth secret\r\n").0, Protocol::Redis);
    // GET with a key is Redis; GET with a path and version is HTTP.
    assert_eq!(matched(b"GET key\r\n").0, Protocol::Redis);
    assert_eq!(matched(b"GET / HTTP/1.1\r\n\r\n").0, Protocol::Http);
    assert_eq!(
        sniff_one(Protocol::Redis, b"HELO mail.example.com\r\n"),
        Verdict::NoMatch
    );
    assert_eq!(sniff_one(Protocol::Redis, b"*0\r\n"), Verdict::NoMatch);
}

#[test]
fn rtmp_needs_the_whole_c1() {
    let handshake = rtmp_c0_c1();
    assert_eq!(matched(&handshake).0, Protocol::Rtmp);
    assert_prefixes_wait(&handshake, handshake.len());
}

#[test]
fn ssh_identification() {
    assert_eq!(matched(SSH).0, Protocol::Ssh);
    assert_prefixes_wait(SSH, 8);
    assert_eq!(matched(b"SSH-1.99-PuTTY\r\n").0, Protocol::Ssh);
    assert_eq!(
        sniff_one(Protocol::Ssh, b"SSH-1.5-old\r\n"),
        Verdict::NoMatch
    );
}

#[test]
fn only_the_wanted_protocols_are_considered() {
    assert_eq!(sniff(TLS13, &[Protocol::Http]), Verdict::NoMatch);
    assert_eq!(sniff(HTTP11, &[Protocol::Http, Protocol::Redis]).clone(), {
        let (_, facts) = matched(HTTP11);
        Verdict::Match(Protocol::Http, facts)
    });
    assert_eq!(sniff(b"", &[]), Verdict::NoMatch);
    assert_eq!(sniff(b"\x00\x01garbage", &all()), Verdict::NoMatch);
}

#[test]
fn proxy_v1_from_curl() {
    let ProxyVerdict::Header(header) = parse(PROXY_V1) else {
        panic!("{:?}", parse(PROXY_V1));
    };
    assert_eq!(header.version, 1);
    let (source, destination) = header.addresses.expect("tcp4");
    assert_eq!(source.ip().to_string(), "127.0.0.1");
    assert_eq!(destination.port(), 9713);
    assert!(PROXY_V1[header.length..].starts_with(b"GET / HTTP/1.1"));
    for end in 0..header.length {
        assert_eq!(
            parse(&PROXY_V1[..end]),
            ProxyVerdict::NeedMore,
            "prefix {end}"
        );
    }
    assert_eq!(
        parse(b"PROXY UNKNOWN\r\n"),
        ProxyVerdict::Header(super::proxy::ProxyHeader {
            version: 1,
            addresses: None,
            tlvs: Vec::new(),
            length: 15
        })
    );
    assert!(matches!(
        parse(b"PROXY TCP4 1.2.3.4 x 1 2\r\n"),
        ProxyVerdict::Invalid(_)
    ));
    let endless = [b"PROXY TCP4 ".as_slice(), &[b'1'; 200]].concat();
    assert!(matches!(parse(&endless), ProxyVerdict::Invalid(_)));
    assert_eq!(parse(HTTP11), ProxyVerdict::Absent);
}

#[test]
fn proxy_v2_from_haproxy_ipv4_ipv6_and_tlvs() {
    for (bytes, family_v6) in [(PROXY_V2_V4, false), (PROXY_V2_V6, true)] {
        let ProxyVerdict::Header(header) = parse(bytes) else {
            panic!("{:?}", parse(bytes));
        };
        assert_eq!(header.version, 2);
        let (source, _) = header.addresses.expect("addresses");
        assert_eq!(source.is_ipv6(), family_v6);
        assert!(bytes[header.length..].starts_with(b"GET / HTTP/1.1"));
        for end in 0..header.length {
            assert_eq!(parse(&bytes[..end]), ProxyVerdict::NeedMore, "prefix {end}");
        }
    }
    let ProxyVerdict::Header(header) = parse(PROXY_V2_TLVS) else {
        panic!("{:?}", parse(PROXY_V2_TLVS));
    };
    let kinds: Vec<u8> = header.tlvs.iter().map(|(kind, _)| *kind).collect();
    assert_eq!(kinds, [0x03, 0x05], "CRC32C and UNIQUE_ID, in order");
    assert!(header.tlvs[1].1.starts_with(b"abc-127.0.0.1-"));
    // A TLV running past the announced length is refused.
    let mut broken = PROXY_V2_TLVS[..header.length].to_vec();
    broken[29] = 0xff; // the first TLV's length, high byte
    assert!(matches!(parse(&broken), ProxyVerdict::Invalid(_)));
}

#[test]
fn headers_we_send_parse_back() {
    use super::proxy::{ProxyVersion, header};
    let cases: [(&str, &str); 3] = [
        ("192.0.2.7:41000", "127.0.0.1:5432"),
        ("[2001:db8::1]:41000", "[::1]:443"),
        ("192.0.2.7:41000", "[::1]:443"),
    ];
    for (source, destination) in cases {
        let source: std::net::SocketAddr = source.parse().expect("addr");
        let destination: std::net::SocketAddr = destination.parse().expect("addr");
        for version in [ProxyVersion::V1, ProxyVersion::V2] {
            let mut bytes = header(version, source, destination);
            let length = bytes.len();
            bytes.extend_from_slice(b"payload");
            let ProxyVerdict::Header(parsed) = parse(&bytes) else {
                panic!("{version:?} {source} {destination}: {:?}", parse(&bytes));
            };
            assert_eq!(parsed.length, length);
            let (got_source, got_destination) = parsed.addresses.expect("addresses");
            assert_eq!(got_source.port(), source.port());
            assert_eq!(got_destination.port(), destination.port());
            if source.is_ipv4() == destination.is_ipv4() {
                assert_eq!((got_source, got_destination), (source, destination));
            } else {
                assert!(got_source.is_ipv6(), "mixed families become IPv6");
            }
        }
    }
}

/// A v2 header passed on keeps the TLVs it came with (not a checksum, which would be wrong
/// for the new header, nor padding); v1 has none to keep.
#[test]
fn headers_passed_on_keep_their_tlvs() {
    use super::proxy::{ProxyVersion, header_passing_on};
    let source: std::net::SocketAddr = "192.0.2.7:41000".parse().expect("addr");
    let destination: std::net::SocketAddr = "198.51.100.1:443".parse().expect("addr");
    let tlvs = vec![
        (0x01, b"h2".to_vec()),
        (0x03, vec![1, 2, 3, 4]),
        (0x04, vec![0; 8]),
        (0xE0, b"vpc-1".to_vec()),
        (0xE1, vec![7; 70_000]),
    ];
    let mut bytes = header_passing_on(ProxyVersion::V2, source, destination, &tlvs);
    let length = bytes.len();
    bytes.extend_from_slice(b"rest");
    let ProxyVerdict::Header(parsed) = parse(&bytes) else {
        panic!("{:?}", parse(&bytes));
    };
    assert_eq!(parsed.length, length);
    assert_eq!(parsed.addresses, Some((source, destination)));
    assert_eq!(
        parsed.tlvs,
        vec![(0x01, b"h2".to_vec()), (0xE0, b"vpc-1".to_vec())],
        "checksum, padding and a value too long for the header are left out"
    );
    let v1 = header_passing_on(ProxyVersion::V1, source, destination, &tlvs);
    assert_eq!(v1, b"PROXY TCP4 192.0.2.7 198.51.100.1 41000 443\r\n");
}

/// Every capture, cut anywhere, with bytes flipped, dropped and repeated: no sniffer panics,
/// and a verdict on a prefix never contradicts the whole (a match on a prefix stays a match).
#[test]
fn mutated_inputs_never_panic() {
    let inputs = every_capture();
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut next = move |bound: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % bound.max(1) as u64) as usize
    };
    for original in &inputs {
        for _ in 0..400 {
            let mut bytes = original.clone();
            for _ in 0..1 + next(4) {
                let at = next(bytes.len());
                match next(4) {
                    0 if !bytes.is_empty() => bytes[at] ^= 1 << next(8),
                    1 if !bytes.is_empty() => {
                        bytes.remove(at);
                    }
                    2 => bytes.insert(at.min(bytes.len()), next(256) as u8),
                    _ => bytes.truncate(at),
                }
            }
            let _ = parse(&bytes);
            for protocol in Protocol::ALL {
                let whole = sniff_one(protocol, &bytes);
                if let Verdict::Match(..) = sniff_one(protocol, &bytes[..bytes.len() / 2]) {
                    assert!(
                        matches!(whole, Verdict::Match(found, _) if found == protocol),
                        "{protocol:?} matched a prefix of {bytes:?} but not the whole: {whole:?}"
                    );
                }
            }
            let _ = sniff(&bytes, &all());
        }
    }
}

/// A fuzz run on stable (cargo-fuzz needs nightly): proptest mutates the real captures (bit
/// flips, byte insertions and deletions, truncations, splices of two captures) and sometimes
/// draws bytes from nothing, one million inputs, each fed to every sniffer and to the PROXY
/// header parser. None may panic, and every verdict must stay consistent with a prefix of the
/// same bytes (a match on a prefix is a match on the whole).
#[test]
fn a_million_fuzzed_inputs_per_sniffer_and_the_proxy_parser() {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    let seeds = every_capture();
    let count = seeds.len();
    // (kind, position, byte): 0 flip a bit, 1 delete, 2 insert, 3 truncate.
    let edit = (0u8..4, any::<u16>(), any::<u8>());
    let strategy = prop_oneof![
        9 => (0..count, 0..count, any::<u16>(), prop::collection::vec(edit, 0..6)),
        1 => prop::collection::vec(any::<u8>(), 0..64).prop_map(|noise| (usize::MAX, 0, 0, noise
            .into_iter()
            .map(|byte| (2u8, u16::MAX, byte))
            .collect())),
    ];
    let mut runner = TestRunner::new(Config {
        cases: 1_000_000,
        failure_persistence: None,
        ..Config::default()
    });
    let ran = std::cell::Cell::new(0u32);
    let result = runner.run(&strategy, |(seed, other, splice, edits)| {
        ran.set(ran.get() + 1);
        let mut bytes = match seeds.get(seed) {
            Some(bytes) => {
                let mut bytes = bytes.clone();
                if other != seed && splice % 4 == 0 {
                    // A splice: the head of one capture on the tail of another.
                    let cut = usize::from(splice) % (bytes.len() + 1);
                    bytes.truncate(cut);
                    bytes.extend_from_slice(&seeds[other][cut.min(seeds[other].len())..]);
                }
                bytes
            }
            None => Vec::new(),
        };
        for (kind, position, byte) in edits {
            let at = usize::from(position) % (bytes.len() + 1);
            match kind {
                0 if at < bytes.len() => bytes[at] ^= 1 << (byte % 8),
                1 if at < bytes.len() => {
                    bytes.remove(at);
                }
                3 => bytes.truncate(at),
                _ => bytes.insert(at, byte),
            }
        }
        let _ = parse(&bytes);
        let half = &bytes[..bytes.len() / 2];
        for protocol in Protocol::ALL {
            let whole = sniff_one(protocol, &bytes);
            if let Verdict::Match(..) = sniff_one(protocol, half) {
                prop_assert!(
                    matches!(whole, Verdict::Match(found, _) if found == protocol),
                    "{:?} matched a prefix of {:?} but not the whole: {:?}",
                    protocol,
                    bytes,
                    whole
                );
            }
        }
        if let ProxyVerdict::Header(header) = parse(half) {
            prop_assert_eq!(parse(&bytes), ProxyVerdict::Header(header));
        }
        Ok(())
    });
    assert!(result.is_ok(), "{result:?}");
    assert_eq!(ran.get(), 1_000_000, "inputs run");
}
