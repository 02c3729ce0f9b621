//! A test PKI made with rcgen: a CA and the certificates it issues, in a temporary directory.

use std::path::PathBuf;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, PKCS_RSA_SHA256,
    RsaKeySize,
};

/// A test CA and the files it issued, in a temporary directory.
pub struct Pki {
    pub dir: tempfile::TempDir,
    pub ca: CertifiedIssuer<'static, KeyPair>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().expect("CA key"))
            .expect("CA certificate");
        let dir = tempfile::tempdir().expect("temporary directory");
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).expect("ca.pem");
        Pki { dir, ca }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// Issues `stem.pem` / `stem.key` for `names` (CN: the first name); RSA-2048 or ECDSA
    /// P-256.
    pub fn issue(&self, stem: &str, names: &[&str], rsa: bool) -> (PathBuf, PathBuf) {
        let names: Vec<String> = names.iter().map(|name| name.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("leaf params");
        params.distinguished_name.push(
            DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        let key = if rsa {
            KeyPair::generate_rsa_for(&PKCS_RSA_SHA256, RsaKeySize::_2048).expect("RSA key")
        } else {
            KeyPair::generate().expect("ECDSA key")
        };
        let certificate = params.signed_by(&key, &self.ca).expect("leaf certificate");
        let (cert, key_path) = (
            self.path(&format!("{stem}.pem")),
            self.path(&format!("{stem}.key")),
        );
        std::fs::write(&cert, certificate.pem()).expect("write certificate");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert, key_path)
    }
}
