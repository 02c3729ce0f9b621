//! TLS toward a pool's servers (`[pool.tls]`): the control thread loads and checks the CA
//! certificates and the client certificate into `OriginSettings`; each shard builds its own
//! `rustls::ClientConfig` from them (`client_config`), and so does the control thread for the
//! health checks. Sessions resumed toward servers live in the calling thread's table
//! (`session_cache`): rustls's own client cache takes a lock, and a shard takes none on its data
//! path.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};

use super::session_cache::ThreadSessionStore;
use super::{Certificate, provider_with_suites};

/// Where a pool's trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaSource {
    /// The system's store (`ca = "system"`, or no `ca` with `verify = true`).
    System(Vec<CertificateDer<'static>>),
    File(PathBuf, Vec<CertificateDer<'static>>),
}

impl CaSource {
    fn certificates(&self) -> &[CertificateDer<'static>] {
        match self {
            CaSource::System(certificates) | CaSource::File(_, certificates) => certificates,
        }
    }

    /// How `/status` and logs name it.
    pub fn describe(&self) -> String {
        match self {
            CaSource::System(_) => "system".to_string(),
            CaSource::File(path, _) => path.display().to_string(),
        }
    }
}

/// A pool's `[pool.tls]`, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginSettings {
    /// None only with `verify = false`.
    pub ca: Option<CaSource>,
    /// The name sent as SNI and verified (None: each server's IP address, verified against the
    /// certificate's IP addresses; no SNI is sent for an address).
    pub server_name: Option<String>,
    pub verify: bool,
    pub client_certificate: Option<Certificate>,
    pub alpn: Vec<Vec<u8>>,
    /// The pool's health checks speak TLS too.
    pub check_tls: bool,
    /// Resume TLS sessions toward the servers (each shard keeps its own tickets).
    pub session_reuse: bool,
    /// Suites offered, most preferred first (empty: `provider_with_suites`'s default).
    pub cipher_suites: Vec<rustls::CipherSuite>,
}

impl OriginSettings {
    /// A rustls client config of its own (keys parsed again: nothing shared with the caller's
    /// other configs).
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, String> {
        let provider = Arc::new(provider_with_suites(&self.cipher_suites));
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|error| error.to_string())?;
        let builder = if self.verify {
            let mut roots = RootCertStore::empty();
            let certificates = self.ca.as_ref().map_or(&[][..], CaSource::certificates);
            let (added, _ignored) = roots.add_parsable_certificates(certificates.iter().cloned());
            if added == 0 {
                return Err("no usable CA certificate to verify servers with".to_string());
            }
            builder.with_root_certificates(roots)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyServerCertificate::new(provider)))
        };
        let mut config = match &self.client_certificate {
            Some(certificate) => builder
                .with_client_auth_cert(certificate.chain.clone(), certificate.key())
                .map_err(|error| format!("{}: {error}", certificate.key_path.display()))?,
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = self.alpn.clone();
        config.resumption = if self.session_reuse {
            rustls::client::Resumption::store(Arc::new(ThreadSessionStore::new()))
        } else {
            rustls::client::Resumption::disabled()
        };
        Ok(Arc::new(config))
    }

    /// The name a connection to the server at `addr` verifies (and sends as SNI).
    pub fn server_name_for(&self, addr: SocketAddr) -> ServerName<'static> {
        self.server_name
            .as_deref()
            .and_then(|name| ServerName::try_from(name.to_string()).ok())
            .unwrap_or_else(|| ServerName::IpAddress(addr.ip().into()))
    }

    /// Every file the settings were read from.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        let ca = match &self.ca {
            Some(CaSource::File(path, _)) => Some(path.as_path()),
            _ => None,
        };
        ca.into_iter().chain(
            self.client_certificate
                .iter()
                .flat_map(|c| [c.cert_path.as_path(), c.key_path.as_path()]),
        )
    }
}

/// A copy of `config` (same verifier, client certificate and suites) with a session store of
/// its own: one per server, so that each server's tickets go back to it only.
pub fn with_own_session_store(config: &Arc<ClientConfig>) -> Arc<ClientConfig> {
    let mut own = (**config).clone();
    own.resumption = rustls::client::Resumption::store(Arc::new(ThreadSessionStore::new()));
    Arc::new(own)
}

/// The system's trusted CA certificates (`SSL_CERT_FILE`/`SSL_CERT_DIR` when set, else the
/// distribution's bundle).
pub fn system_roots() -> Result<Vec<CertificateDer<'static>>, String> {
    let found = rustls_native_certs::load_native_certs();
    if found.certs.is_empty() {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_string(), ToString::to_string);
        return Err(format!("cannot load the system's CA certificates: {why}"));
    }
    Ok(found.certs)
}

/// `verify = false` (and ringload's `--insecure`): any certificate is accepted; the handshake's
/// signatures are still checked, so the peer holds the key of the certificate it sent.
#[derive(Debug)]
pub struct AnyServerCertificate(Arc<CryptoProvider>);

impl AnyServerCertificate {
    pub fn new(provider: Arc<CryptoProvider>) -> AnyServerCertificate {
        AnyServerCertificate(provider)
    }
}

impl ServerCertVerifier for AnyServerCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}
