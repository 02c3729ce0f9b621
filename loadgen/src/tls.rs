//! `ringload rr --tls`: the rustls client side (config, and feeding received bytes).

use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, ClientConnection};

use crate::target::UsageError;

/// What every connection of a run starts its TLS session with.
#[derive(Clone)]
pub struct ClientSetup {
    config: Arc<ClientConfig>,
    name: ServerName<'static>,
}

impl ClientSetup {
    pub fn connect(&self) -> Result<ClientConnection, rustls::Error> {
        let mut connection = ClientConnection::new(Arc::clone(&self.config), self.name.clone())?;
        // A request (up to --size, 1 MiB) goes into rustls whole; the loop drains it.
        connection.set_buffer_limit(None);
        Ok(connection)
    }
}

pub fn client_setup(
    target: &SocketAddr,
    ca: Option<&Path>,
    insecure: bool,
    server_name: Option<&str>,
    resume: bool,
    alpn: &[String],
    client: Option<(&Path, &Path)>,
) -> anyhow::Result<ClientSetup> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match (ca, insecure) {
        (Some(ca), _) => {
            let mut roots = rustls::RootCertStore::empty();
            for certificate in CertificateDer::pem_file_iter(ca)
                .map_err(|error| UsageError(format!("--ca {}: {error}", ca.display())))?
            {
                let certificate = certificate
                    .map_err(|error| UsageError(format!("--ca {}: {error}", ca.display())))?;
                roots.add(certificate)?;
            }
            builder.with_root_certificates(roots)
        }
        (None, true) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(ringproxy::tls::AnyServerCertificate::new(
                provider,
            ))),
        (None, false) => {
            return Err(UsageError("--tls needs --ca FILE (or --insecure)".into()).into());
        }
    };
    let mut config = match client {
        Some((cert, key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
                .map_err(|error| {
                    UsageError(format!("--client-cert {}: {error}", cert.display()))
                })?;
            let key = PrivateKeyDer::from_pem_file(key)
                .map_err(|error| UsageError(format!("--client-key {}: {error}", key.display())))?;
            builder.with_client_auth_cert(chain, key)?
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    if !resume {
        config.resumption = rustls::client::Resumption::disabled();
    }
    let name = match server_name {
        Some(name) => ServerName::try_from(name.to_string())
            .map_err(|_| UsageError(format!("--server-name {name:?} is not a DNS name")))?,
        None => ServerName::IpAddress(target.ip().into()),
    };
    Ok(ClientSetup {
        config: Arc::new(config),
        name,
    })
}

/// Feeds received ciphertext to the session and appends the plaintext it carried to `plain`.
pub fn receive(
    tls: &mut ClientConnection,
    mut bytes: &[u8],
    plain: &mut Vec<u8>,
) -> Result<(), rustls::Error> {
    let mut stuck = false;
    while !bytes.is_empty() {
        match tls.read_tls(&mut bytes) {
            Ok(0) => break,
            Ok(_) => {
                tls.process_new_packets()?;
                stuck = false;
            }
            // Its plaintext buffer is full: read it, then feed the rest.
            Err(_) if !stuck => stuck = true,
            Err(error) => return Err(rustls::Error::General(error.to_string())),
        }
        drain(tls, plain);
    }
    drain(tls, plain);
    Ok(())
}

fn drain(tls: &mut ClientConnection, plain: &mut Vec<u8>) {
    let mut reader = tls.reader();
    while let Ok(chunk) = reader.fill_buf() {
        if chunk.is_empty() {
            break;
        }
        let count = chunk.len();
        plain.extend_from_slice(chunk);
        reader.consume(count);
    }
}
