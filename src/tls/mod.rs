//! TLS with rustls (aws-lc-rs as the crypto provider): termination toward clients, and
//! origination toward servers (`origin`).
//!
//! The control thread loads and checks certificates and keys (`load_certificate`, at config
//! load and on every reload) into `TlsSettings`, which travel to the shards in the snapshot.
//! Each shard builds its own `rustls::ServerConfig` from them (`ShardTls::build`): its own
//! certificate resolver, keys, client verifier and ticket encrypter, so a handshake touches no
//! reference count, lock or cache another shard uses. Session tickets are sealed with keys
//! every shard shares (`TicketKeys`), so a client resumes on whichever shard it lands.
//! `TlsStream` is the sans-IO side of one session, driven by the relay.

mod origin;
mod session_cache;
mod stream;
mod ticket;

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::RootCertStore;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, WebPkiClientVerifier,
};
use rustls::sign::CertifiedKey;

pub use origin::{
    AnyServerCertificate, CaSource, OriginSettings, system_roots, with_own_session_store,
};
pub use stream::{Plain, TlsFacts, TlsStream};
pub use ticket::{ShardTicketer, TICKET_LIFETIME_SECONDS, TicketKeys};

/// How often the session ticket key changes (the one before still opens tickets).
pub const TICKET_ROTATION: Duration = Duration::from_secs(12 * 60 * 60);

/// The crypto provider every TLS object of the process uses.
pub fn provider() -> CryptoProvider {
    rustls::crypto::aws_lc_rs::default_provider()
}

/// The provider with its cipher suites in our order of preference: `wanted` as listed (only
/// those), or by default TLS 1.3 first, then AES-128-GCM before AES-256-GCM before
/// ChaCha20-Poly1305 (Go's crypto/tls order where the CPU has AES instructions): the handshake
/// hashes with SHA-256 instead of SHA-384 (SHA-256 has CPU instructions, SHA-512 on AMD has no
/// fast path in aws-lc) and bulk data takes 10 AES rounds instead of 14, at a strength above
/// the key exchange's (X25519, P-256: 128 bits).
pub fn provider_with_suites(wanted: &[rustls::CipherSuite]) -> CryptoProvider {
    let mut provider = provider();
    if wanted.is_empty() {
        provider
            .cipher_suites
            .sort_by_key(|suite| (suite.tls13().is_none(), cipher_family(suite.suite())));
    } else {
        let all = std::mem::take(&mut provider.cipher_suites);
        provider.cipher_suites = wanted
            .iter()
            .filter_map(|name| all.iter().find(|suite| suite.suite() == *name).copied())
            .collect();
    }
    provider
}

fn cipher_family(suite: rustls::CipherSuite) -> u8 {
    let name = suite.as_str().unwrap_or_default();
    if name.contains("AES_128_GCM") {
        0
    } else if name.contains("AES_256_GCM") {
        1
    } else {
        2
    }
}

/// Every cipher suite name `cipher_suites` accepts, in the default order.
pub fn cipher_suite_names() -> Vec<&'static str> {
    provider_with_suites(&[])
        .cipher_suites
        .iter()
        .filter_map(|suite| suite.suite().as_str())
        .collect()
}

/// A `cipher_suites` list, checked: known names, no repeats, and at least one suite of TLS 1.3
/// when `tls13_only`.
pub fn cipher_suites_named(
    names: &[&str],
    tls13_only: bool,
) -> Result<Vec<rustls::CipherSuite>, String> {
    let available = provider().cipher_suites;
    let mut chosen = Vec::with_capacity(names.len());
    for name in names {
        let wanted = name.trim().to_ascii_uppercase();
        // rustls's names, or the IANA (and OpenSSL `-ciphersuites`) ones of TLS 1.3 suites.
        let Some(suite) = available.iter().find(|suite| {
            suite.suite().as_str().is_some_and(|known| {
                known == wanted || known.replacen("TLS13_", "TLS_", 1) == wanted
            })
        }) else {
            return Err(format!(
                "unknown cipher suite {name:?}; known: {}",
                cipher_suite_names().join(", ")
            ));
        };
        if chosen.contains(&suite.suite()) {
            return Err(format!("cipher suite {name:?} is listed twice"));
        }
        if tls13_only && suite.tls13().is_none() {
            return Err(format!(
                "cipher suite {name:?} is a TLS 1.2 suite and min_version is \"1.3\""
            ));
        }
        chosen.push(suite.suite());
    }
    if chosen.is_empty() {
        return Err("cipher_suites is empty: list at least one, or leave it out".to_string());
    }
    Ok(chosen)
}

/// A listed `cipher_suites` without TLS 1.3 suites must hold a TLS 1.2 suite for each
/// certificate's key (ECDSA suites for ECDSA and Ed25519 keys, RSA suites for RSA keys):
/// otherwise every handshake with that certificate would fail.
pub fn check_suites_fit_keys(
    suites: &[rustls::CipherSuite],
    certificates: &[Certificate],
) -> Result<(), String> {
    let names: Vec<&str> = suites.iter().filter_map(|suite| suite.as_str()).collect();
    if suites.is_empty() || names.iter().any(|name| name.starts_with("TLS13_")) {
        return Ok(());
    }
    let key_provider = provider().key_provider;
    for certificate in certificates {
        let algorithm = key_provider
            .load_private_key(certificate.key())
            .map_err(|error| format!("{}: {error}", certificate.key_path.display()))?
            .algorithm();
        let (family, marker) = match algorithm {
            rustls::SignatureAlgorithm::RSA => ("RSA", "_RSA_"),
            _ => ("ECDSA", "_ECDSA_"),
        };
        if !names.iter().any(|name| name.contains(marker)) {
            return Err(format!(
                "cipher_suites has no TLS 1.3 suite and no {family} suite for the key of {}: \
                 every handshake with it would fail",
                certificate.cert_path.display()
            ));
        }
    }
    Ok(())
}

/// The suites a `cipher_suites` setting ends up with, in order, by name (`/status`).
pub fn effective_cipher_suites(wanted: &[rustls::CipherSuite]) -> Vec<String> {
    let suites: Vec<rustls::CipherSuite> = provider_with_suites(wanted)
        .cipher_suites
        .iter()
        .map(|suite| suite.suite())
        .collect();
    cipher_suite_list(&suites)
}

/// How `ringproxy check` and `/status` name a `cipher_suites` list.
pub fn cipher_suite_list(suites: &[rustls::CipherSuite]) -> Vec<String> {
    suites
        .iter()
        .map(|suite| {
            suite
                .as_str()
                .map_or_else(|| format!("{suite:?}"), str::to_string)
        })
        .collect()
}

/// One certificate chain and its key, as loaded from their files.
#[derive(Clone)]
pub struct Certificate {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub chain: Vec<CertificateDer<'static>>,
    /// The private key's DER (PKCS#8, PKCS#1 or SEC1, as the file had it).
    key_der: Vec<u8>,
    key_kind: KeyKind,
    /// DNS names the leaf certificate is for (lower-cased; `*.example.com` for wildcards).
    pub names: Vec<String>,
    /// The leaf's notAfter, in Unix seconds.
    pub not_after: i64,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum KeyKind {
    Pkcs8,
    Pkcs1,
    Sec1,
}

impl Certificate {
    pub(crate) fn key(&self) -> PrivateKeyDer<'static> {
        let der = self.key_der.clone();
        match self.key_kind {
            KeyKind::Pkcs8 => PrivateKeyDer::Pkcs8(der.into()),
            KeyKind::Pkcs1 => PrivateKeyDer::Pkcs1(der.into()),
            KeyKind::Sec1 => PrivateKeyDer::Sec1(der.into()),
        }
    }

    /// The name it is shown under in metrics and `/status`: its first DNS name.
    pub fn label(&self) -> &str {
        self.names.first().map_or("", String::as_str)
    }
}

impl PartialEq for Certificate {
    fn eq(&self, other: &Self) -> bool {
        self.cert_path == other.cert_path
            && self.key_path == other.key_path
            && self.chain == other.chain
            && self.key_der == other.key_der
    }
}

impl Eq for Certificate {}

impl fmt::Debug for Certificate {
    // Never the key.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificate")
            .field("cert", &self.cert_path)
            .field("key", &self.key_path)
            .field("names", &self.names)
            .field("not_after", &self.not_after)
            .finish()
    }
}

/// Which certificate a handshake without a known server name gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultCertificate {
    /// The certificate at this position of the list.
    Index(usize),
    /// None: the handshake is refused.
    Reject,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientAuth {
    None,
    Optional,
    Required,
}

impl ClientAuth {
    pub fn name(self) -> &'static str {
        match self {
            ClientAuth::None => "none",
            ClientAuth::Optional => "optional",
            ClientAuth::Required => "required",
        }
    }
}

/// A listener's `[listener.tls]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    pub certificates: Vec<Certificate>,
    pub default_certificate: DefaultCertificate,
    pub alpn: Vec<Vec<u8>>,
    /// Oldest version accepted: 0x0303 (1.2) or 0x0304 (1.3).
    pub min_version: u16,
    pub client_ca: Option<(PathBuf, Vec<CertificateDer<'static>>)>,
    pub client_auth: ClientAuth,
    pub handshake_timeout: Duration,
    pub session_tickets: bool,
    /// The control thread reloads when one of the files changes.
    pub watch: bool,
    /// Suites chosen from, most preferred first (empty: `provider_with_suites`'s default).
    pub cipher_suites: Vec<rustls::CipherSuite>,
}

impl TlsSettings {
    /// What these settings demand of clients, as a digest bound into their session tickets:
    /// a ticket issued where no client certificate was asked for (or under another CA) never
    /// resumes where one is required.
    pub fn ticket_context(&self) -> [u8; 32] {
        let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
        context.update(self.client_auth.name().as_bytes());
        for ca in self.client_ca.iter().flat_map(|(_, cas)| cas) {
            context.update(&(ca.len() as u64).to_be_bytes());
            context.update(ca.as_ref());
        }
        let digest = context.finish();
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        out
    }

    /// Every file the settings were read from.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.certificates
            .iter()
            .flat_map(|c| [c.cert_path.as_path(), c.key_path.as_path()])
            .chain(self.client_ca.iter().map(|(path, _)| path.as_path()))
    }
}

/// What a watched file looks like now (modification time, size, inode; None: unreadable), to
/// notice a replacement whichever way it was made (rewritten, renamed over, a symlink moved).
pub fn file_fingerprint(path: &Path) -> Option<(std::time::SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let metadata = std::fs::metadata(path).ok()?;
    Some((metadata.modified().ok()?, metadata.len(), metadata.ino()))
}

/// Reads a server certificate chain and its key and checks that they belong together and
/// that the leaf names a DNS name to serve.
pub fn load_certificate(cert_path: &Path, key_path: &Path) -> Result<Certificate, String> {
    let certificate = load_key_pair(cert_path, key_path)?;
    if certificate.names.is_empty() {
        return Err(format!(
            "{}: the certificate names no DNS name (subjectAltName or CN)",
            cert_path.display()
        ));
    }
    Ok(certificate)
}

/// Reads a certificate chain and its key and checks that they belong together (a client
/// certificate needs no DNS name).
pub fn load_key_pair(cert_path: &Path, key_path: &Path) -> Result<Certificate, String> {
    let cert_text = std::fs::read(cert_path)
        .map_err(|error| format!("cannot read {}: {error}", cert_path.display()))?;
    let chain = CertificateDer::pem_slice_iter(&cert_text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| {
            format!(
                "{}: not a PEM certificate chain: {error}",
                cert_path.display()
            )
        })?;
    if chain.is_empty() {
        return Err(format!(
            "{}: no CERTIFICATE in the file",
            cert_path.display()
        ));
    }
    let key_text = std::fs::read(key_path)
        .map_err(|error| format!("cannot read {}: {error}", key_path.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&key_text).map_err(|error| {
        format!(
            "{}: no private key (PKCS#8, PKCS#1 or SEC1 PEM) in the file: {error}",
            key_path.display()
        )
    })?;
    let (key_kind, key_der) = match &key {
        PrivateKeyDer::Pkcs8(der) => (KeyKind::Pkcs8, der.secret_pkcs8_der().to_vec()),
        PrivateKeyDer::Pkcs1(der) => (KeyKind::Pkcs1, der.secret_pkcs1_der().to_vec()),
        PrivateKeyDer::Sec1(der) => (KeyKind::Sec1, der.secret_sec1_der().to_vec()),
        _ => {
            return Err(format!(
                "{}: unsupported private key kind",
                key_path.display()
            ));
        }
    };
    let provider = provider();
    let signing = provider
        .key_provider
        .load_private_key(key)
        .map_err(|error| format!("{}: unusable private key: {error}", key_path.display()))?;
    CertifiedKey::new(chain.clone(), signing)
        .keys_match()
        .map_err(|error| {
            format!(
                "{} does not match the certificate in {}: {error}",
                key_path.display(),
                cert_path.display()
            )
        })?;
    let (names, not_after) =
        leaf_facts(&chain[0]).map_err(|error| format!("{}: {error}", cert_path.display()))?;
    Ok(Certificate {
        cert_path: cert_path.to_path_buf(),
        key_path: key_path.to_path_buf(),
        chain,
        key_der,
        key_kind,
        names,
        not_after,
    })
}

/// Reads a PEM bundle of CA certificates (client verification).
pub fn load_ca(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let text =
        std::fs::read(path).map_err(|error| format!("cannot read {}: {error}", path.display()))?;
    let certificates = CertificateDer::pem_slice_iter(&text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|error| format!("{}: not a PEM certificate bundle: {error}", path.display()))?;
    if certificates.is_empty() {
        return Err(format!("{}: no CERTIFICATE in the file", path.display()));
    }
    let mut roots = RootCertStore::empty();
    for certificate in &certificates {
        roots
            .add(certificate.clone())
            .map_err(|error| format!("{}: unusable CA certificate: {error}", path.display()))?;
    }
    Ok(certificates)
}

/// A certificate's subject CN.
fn subject_cn(certificate: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(certificate.as_ref()).ok()?;
    let cn = parsed.subject().iter_common_name().next()?;
    cn.as_str().ok().map(str::to_string)
}

/// PROXY protocol v2 TLVs describing a terminated session, as HAProxy's `send-proxy-v2-ssl-cn`
/// writes them: ALPN (0x01), the SNI as authority (0x02), and PP2_TYPE_SSL (0x20: client flags,
/// verify result 0, then the version, the client certificate's CN and the cipher as sub-TLVs).
pub fn proxy_tlvs(facts: &TlsFacts, client_cn: Option<&str>) -> Vec<(u8, Vec<u8>)> {
    const PP2_CLIENT_SSL: u8 = 0x01;
    const PP2_CLIENT_CERT_CONN: u8 = 0x02;
    const PP2_CLIENT_CERT_SESS: u8 = 0x04;
    let mut tlvs = Vec::new();
    if let Some(alpn) = &facts.alpn {
        tlvs.push((0x01, alpn.as_bytes().to_vec()));
    }
    if let Some(name) = &facts.server_name {
        tlvs.push((0x02, name.as_bytes().to_vec()));
    }
    let mut client = PP2_CLIENT_SSL;
    if facts.client_certificate {
        client |= PP2_CLIENT_CERT_CONN | PP2_CLIENT_CERT_SESS;
    }
    // A handshake that completed verified any client certificate it carried: verify = 0.
    let mut ssl = vec![client, 0, 0, 0, 0];
    let mut sub = |kind: u8, value: &[u8]| {
        if let Ok(length) = u16::try_from(value.len()) {
            ssl.push(kind);
            ssl.extend_from_slice(&length.to_be_bytes());
            ssl.extend_from_slice(value);
        }
    };
    let version = match facts.version {
        0x0304 => "TLSv1.3",
        0x0303 => "TLSv1.2",
        _ => "",
    };
    if !version.is_empty() {
        sub(0x21, version.as_bytes());
    }
    if let Some(cn) = client_cn {
        sub(0x22, cn.as_bytes());
    }
    if let Some(cipher) = facts.cipher {
        // rustls names TLS 1.3 suites TLS13_*; the IANA (and OpenSSL) names are TLS_*.
        let iana = cipher.replacen("TLS13_", "TLS_", 1);
        sub(0x23, iana.as_bytes());
    }
    tlvs.push((0x20, ssl));
    tlvs
}

/// The leaf's DNS names (subjectAltName, else the subject's CN) and notAfter.
fn leaf_facts(leaf: &CertificateDer<'_>) -> Result<(Vec<String>, i64), String> {
    use x509_parser::prelude::*;
    let (_, certificate) = parse_x509_certificate(leaf.as_ref())
        .map_err(|error| format!("cannot parse the certificate: {error}"))?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = certificate.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::DNSName(name) = name {
                names.push(name.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in certificate.subject().iter_common_name() {
            if let Ok(name) = cn.as_str() {
                names.push(name.to_ascii_lowercase());
            }
        }
    }
    Ok((names, certificate.validity().not_after.timestamp()))
}

/// Chooses the certificate by the ClientHello's server name: an exact name beats a wildcard,
/// the first certificate naming it wins, and a name no certificate has gets the default.
#[derive(Debug)]
struct CertificateResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// By the part after `*.`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Option<Arc<CertifiedKey>>,
}

impl CertificateResolver {
    fn find(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = server_name else {
            return self.default.clone();
        };
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(found) = self.exact.get(&name) {
            return Some(Arc::clone(found));
        }
        if let Some((_, parent)) = name.split_once('.')
            && let Some(found) = self.wildcard.get(parent)
        {
            return Some(Arc::clone(found));
        }
        self.default.clone()
    }
}

impl ResolvesServerCert for CertificateResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.find(client_hello.server_name())
    }
}

/// What a shard terminates TLS with on one listener.
pub struct ShardTls {
    pub config: Arc<rustls::ServerConfig>,
}

impl ShardTls {
    /// Builds the shard's own rustls config (keys parsed again: nothing shared with other
    /// shards).
    pub fn build(settings: &TlsSettings, tickets: Option<&TicketKeys>) -> Result<ShardTls, String> {
        let provider = Arc::new(provider_with_suites(&settings.cipher_suites));
        let mut keys = Vec::with_capacity(settings.certificates.len());
        for certificate in &settings.certificates {
            let signing = provider
                .key_provider
                .load_private_key(certificate.key())
                .map_err(|error| format!("{}: {error}", certificate.key_path.display()))?;
            keys.push(Arc::new(CertifiedKey::new(
                certificate.chain.clone(),
                signing,
            )));
        }
        let mut resolver = CertificateResolver {
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default: match settings.default_certificate {
                DefaultCertificate::Index(index) => keys.get(index).cloned(),
                DefaultCertificate::Reject => None,
            },
        };
        for (certificate, key) in settings.certificates.iter().zip(&keys) {
            for name in &certificate.names {
                let (map, name) = match name.strip_prefix("*.") {
                    Some(parent) => (&mut resolver.wildcard, parent),
                    None => (&mut resolver.exact, name.as_str()),
                };
                map.entry(name.to_string())
                    .or_insert_with(|| Arc::clone(key));
            }
        }
        let versions: &[&rustls::SupportedProtocolVersion] = if settings.min_version >= 0x0304 {
            &[&rustls::version::TLS13]
        } else {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        };
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_protocol_versions(versions)
            .map_err(|error| error.to_string())?;
        let builder = match (&settings.client_ca, settings.client_auth) {
            (Some((_, cas)), auth) if auth != ClientAuth::None => {
                let mut roots = RootCertStore::empty();
                for ca in cas {
                    roots.add(ca.clone()).map_err(|error| error.to_string())?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
                let verifier = if auth == ClientAuth::Optional {
                    verifier.allow_unauthenticated()
                } else {
                    verifier
                };
                builder.with_client_cert_verifier(verifier.build().map_err(|e| e.to_string())?)
            }
            _ => builder.with_no_client_auth(),
        };
        let mut config = builder.with_cert_resolver(Arc::new(resolver));
        config.alpn_protocols = settings.alpn.clone();
        // Our order of suites, not the client's (HAProxy's default, `prefer-client-ciphers`
        // off): most clients list AES-256-GCM first.
        config.ignore_client_order = true;
        // No session cache shared by the shards (it takes a lock): resumption is by ticket.
        config.session_storage = Arc::new(NoServerSessionStorage {});
        if settings.session_tickets
            && let Some(tickets) = tickets
        {
            config.ticketer = Arc::new(ShardTicketer::new(tickets, settings.ticket_context()));
            config.send_tls13_tickets = 1;
        } else {
            config.send_tls13_tickets = 0;
        }
        Ok(ShardTls {
            config: Arc::new(config),
        })
    }
}

#[cfg(test)]
mod tests;
