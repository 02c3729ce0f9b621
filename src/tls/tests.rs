//! Certificate loading and selection, without a socket.

use super::*;

/// Writes a certificate for `names` and its key into `dir` as `stem.pem` / `stem.key`.
fn issue(dir: &Path, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let key = rcgen::KeyPair::generate().expect("key");
    let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
    let certificate = rcgen::CertificateParams::new(names)
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let cert = dir.join(format!("{stem}.pem"));
    let key_path = dir.join(format!("{stem}.key"));
    std::fs::write(&cert, certificate.pem()).expect("cert");
    std::fs::write(&key_path, key.serialize_pem()).expect("key");
    (cert, key_path)
}

fn settings(certificates: Vec<Certificate>, default: DefaultCertificate) -> TlsSettings {
    TlsSettings {
        certificates,
        default_certificate: default,
        alpn: Vec::new(),
        min_version: 0x0303,
        client_ca: None,
        client_auth: ClientAuth::None,
        handshake_timeout: Duration::from_secs(10),
        session_tickets: true,
        watch: false,
        cipher_suites: Vec::new(),
    }
}

fn resolver(settings: &TlsSettings) -> (CertificateResolver, Vec<Vec<u8>>) {
    // Rebuild what ShardTls::build makes, keeping the leaf of each certificate to compare.
    let provider = provider();
    let mut resolver = CertificateResolver {
        exact: HashMap::new(),
        wildcard: HashMap::new(),
        default: None,
    };
    let mut leaves = Vec::new();
    for (index, certificate) in settings.certificates.iter().enumerate() {
        let key = Arc::new(
            CertifiedKey::from_der(certificate.chain.clone(), certificate.key(), &provider)
                .expect("key"),
        );
        leaves.push(certificate.chain[0].to_vec());
        for name in &certificate.names {
            match name.strip_prefix("*.") {
                Some(parent) => resolver.wildcard.entry(parent.to_string()),
                None => resolver.exact.entry(name.clone()),
            }
            .or_insert_with(|| Arc::clone(&key));
        }
        if settings.default_certificate == DefaultCertificate::Index(index) {
            resolver.default = Some(key);
        }
    }
    (resolver, leaves)
}

#[test]
fn exact_names_beat_wildcards_and_unknown_names_get_the_default() {
    let dir = tempfile::tempdir().expect("dir");
    let (a, a_key) = issue(dir.path(), "wild", &["*.example.com"]);
    let (b, b_key) = issue(dir.path(), "api", &["API.example.com", "other.test"]);
    let certificates = vec![
        load_certificate(&a, &a_key).expect("wildcard"),
        load_certificate(&b, &b_key).expect("exact"),
    ];
    assert_eq!(certificates[1].names, ["api.example.com", "other.test"]);
    assert_eq!(certificates[1].label(), "api.example.com");
    let (resolver, leaves) = resolver(&settings(certificates, DefaultCertificate::Index(0)));
    let leaf = |name: Option<&str>| {
        resolver
            .find(name)
            .map(|key| key.cert[0].to_vec())
            .expect("a certificate")
    };
    assert_eq!(
        leaf(Some("api.example.com")),
        leaves[1],
        "exact beats wildcard"
    );
    assert_eq!(
        leaf(Some("Api.Example.COM.")),
        leaves[1],
        "case and root dot"
    );
    assert_eq!(leaf(Some("db.example.com")), leaves[0]);
    assert_eq!(
        leaf(Some("a.b.example.com")),
        leaves[0],
        "a wildcard covers one label"
    );
    assert_eq!(leaf(Some("unknown.test")), leaves[0], "the default");
    assert_eq!(leaf(None), leaves[0]);
}

#[test]
fn reject_as_default_refuses_unknown_names() {
    let dir = tempfile::tempdir().expect("dir");
    let (a, a_key) = issue(dir.path(), "api", &["api.example.com"]);
    let certificates = vec![load_certificate(&a, &a_key).expect("load")];
    let (resolver, _) = resolver(&settings(certificates, DefaultCertificate::Reject));
    assert!(resolver.find(Some("api.example.com")).is_some());
    assert!(resolver.find(Some("x.example.com")).is_none());
    assert!(resolver.find(None).is_none());
}

#[test]
fn broken_files_are_refused_with_their_name() {
    let dir = tempfile::tempdir().expect("dir");
    let (a, a_key) = issue(dir.path(), "a", &["a.test"]);
    let (_, b_key) = issue(dir.path(), "b", &["b.test"]);
    let mismatch = load_certificate(&a, &b_key).expect_err("mismatched key");
    assert!(
        mismatch.contains("b.key") && mismatch.contains("does not match"),
        "{mismatch}"
    );
    let missing = load_certificate(&dir.path().join("none.pem"), &a_key).expect_err("missing");
    assert!(missing.contains("none.pem"), "{missing}");
    std::fs::write(dir.path().join("empty.pem"), "not pem").expect("write");
    let empty = load_certificate(&dir.path().join("empty.pem"), &a_key).expect_err("empty");
    assert!(empty.contains("no CERTIFICATE"), "{empty}");
    std::fs::write(
        dir.path().join("junk.key"),
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .expect("write");
    let junk = load_certificate(&a, &dir.path().join("junk.key")).expect_err("junk key");
    assert!(junk.contains("junk.key"), "{junk}");
    assert!(load_ca(&dir.path().join("empty.pem")).is_err());
}

#[test]
fn every_shard_builds_its_own_config_from_the_settings() {
    let dir = tempfile::tempdir().expect("dir");
    let (a, a_key) = issue(dir.path(), "a", &["a.test"]);
    let settings = settings(
        vec![load_certificate(&a, &a_key).expect("load")],
        DefaultCertificate::Index(0),
    );
    let keys = TicketKeys::generate().expect("keys");
    let one = ShardTls::build(&settings, Some(&keys)).expect("build");
    let two = ShardTls::build(&settings, Some(&keys)).expect("build");
    assert!(!Arc::ptr_eq(&one.config, &two.config));
    assert!(one.config.ticketer.enabled());
    let no_tickets = ShardTls::build(&settings, None).expect("build");
    assert!(!no_tickets.config.ticketer.enabled());
}
