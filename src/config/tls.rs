//! `[listener.tls]`: certificates and keys are read and checked here, so a config that loads
//! can terminate TLS (and a reload with a broken file keeps the running config).

use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::Spanned;

use super::file::{FileListener, FileOriginTls, FileTls};
use super::{ConfigError, Source, format_duration, nonzero_duration};
use crate::tls::{
    CaSource, ClientAuth, DefaultCertificate, OriginSettings, TlsSettings, cipher_suite_list,
};

pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A path as written, or relative to the config file's directory.
fn path_at(source: &Source, text: &Spanned<String>) -> Result<PathBuf, ConfigError> {
    let written = text.get_ref().trim();
    if written.is_empty() {
        return Err(source.at(text, "empty path"));
    }
    let path = Path::new(written);
    if path.is_absolute() {
        return Ok(path.to_path_buf());
    }
    let base = Path::new(source.name)
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    Ok(base.join(path))
}

pub(super) fn resolve(
    source: &Source,
    listener: &FileListener,
) -> Result<Option<TlsSettings>, ConfigError> {
    let Some(spanned) = &listener.tls else {
        return Ok(None);
    };
    let tls: &FileTls = spanned.get_ref();
    for route in listener.routes.iter().flatten() {
        let route = route.get_ref();
        if route.tls.is_some() {
            // Decided on the ClientHello: checked with the route.
            continue;
        }
        if let Some(protocol) = &route.protocol {
            let name = protocol.get_ref().as_str();
            let server_first = matches!(
                crate::route::RouteProtocol::from_name(name),
                Some(crate::route::RouteProtocol::ServerFirst(_))
            );
            if name == "tls" || server_first {
                return Err(source.at(
                    protocol,
                    format!(
                        "on a listener with [listener.tls], protocol names what the decrypted \
                         bytes carry (http, h2, postgres, redis, ...); {name:?} cannot be one"
                    ),
                ));
            }
        }
    }
    let settings = resolve_settings(source, spanned.span(), tls)?;
    for route in listener.routes.iter().flatten() {
        let route = route.get_ref();
        if route.tls.is_none() {
            check_alpn_offered(source, route.alpn.as_ref(), &settings, "this listener's")?;
        }
    }
    Ok(Some(settings))
}

/// A route on the negotiated ALPN can only match a protocol the terminating config offers.
pub(super) fn check_alpn_offered(
    source: &Source,
    alpn: Option<&Spanned<String>>,
    settings: &TlsSettings,
    whose: &str,
) -> Result<(), ConfigError> {
    let Some(wanted) = alpn else {
        return Ok(());
    };
    if settings
        .alpn
        .iter()
        .any(|offered| offered == wanted.get_ref().as_bytes())
    {
        return Ok(());
    }
    Err(source.at(
        wanted,
        format!(
            "alpn {:?} is not in {whose} tls alpn list: after the handshake a route matches the \
             negotiated protocol, which can only be one of those",
            wanted.get_ref()
        ),
    ))
}

/// The settings of a `[listener.tls]` table or of a route's `tls = { ... }`.
pub(super) fn resolve_settings(
    source: &Source,
    span: std::ops::Range<usize>,
    tls: &FileTls,
) -> Result<TlsSettings, ConfigError> {
    if tls.certificates.get_ref().is_empty() {
        return Err(source.at(
            &tls.certificates,
            "certificates is empty: list at least one",
        ));
    }
    let mut certificates = Vec::new();
    for entry in tls.certificates.get_ref() {
        let entry = entry.get_ref();
        let cert = path_at(source, &entry.cert)?;
        let key = path_at(source, &entry.key)?;
        let loaded =
            crate::tls::load_certificate(&cert, &key).map_err(|why| source.at(&entry.cert, why))?;
        certificates.push(loaded);
    }
    let default_certificate = match &tls.default_certificate {
        None => DefaultCertificate::Index(0),
        Some(name) if name.get_ref() == "reject" => DefaultCertificate::Reject,
        Some(name) => {
            let wanted = name.get_ref().to_ascii_lowercase();
            let index = certificates
                .iter()
                .position(|certificate| certificate.names.contains(&wanted))
                .ok_or_else(|| {
                    source.at(
                        name,
                        format!(
                            "default_certificate {wanted:?} is no DNS name of the listed \
                             certificates (or \"reject\")"
                        ),
                    )
                })?;
            DefaultCertificate::Index(index)
        }
    };
    let alpn = alpn_list(source, tls.alpn.as_ref())?;
    let min_version = match tls.min_version.as_ref().map(|v| (v, v.get_ref().as_str())) {
        None | Some((_, "1.2")) => 0x0303,
        Some((_, "1.3")) => 0x0304,
        Some((text, other)) => {
            return Err(source.at(
                text,
                format!("min_version must be \"1.2\" or \"1.3\", not {other:?}"),
            ));
        }
    };
    let client_auth = match tls.client_auth.as_ref().map(|v| (v, v.get_ref().as_str())) {
        None => {
            if tls.client_ca.is_some() {
                ClientAuth::Required
            } else {
                ClientAuth::None
            }
        }
        Some((_, "none")) => ClientAuth::None,
        Some((_, "optional")) => ClientAuth::Optional,
        Some((_, "required")) => ClientAuth::Required,
        Some((text, other)) => {
            return Err(source.at(
                text,
                format!(
                    "client_auth must be \"none\", \"optional\" or \"required\", not {other:?}"
                ),
            ));
        }
    };
    let client_ca = match &tls.client_ca {
        Some(text) => {
            let path = path_at(source, text)?;
            let cas = crate::tls::load_ca(&path).map_err(|why| source.at(text, why))?;
            Some((path, cas))
        }
        None if client_auth != ClientAuth::None => {
            return Err(source.error(
                tls.client_auth.as_ref().map_or(span, Spanned::span),
                "client_auth asks for client certificates but no client_ca is set",
            ));
        }
        None => None,
    };
    let handshake_timeout = nonzero_duration(
        source,
        tls.handshake_timeout.as_ref(),
        "handshake_timeout",
        DEFAULT_HANDSHAKE_TIMEOUT,
    )?;
    let cipher_suites = cipher_suites(source, tls.cipher_suites.as_ref(), min_version >= 0x0304)?;
    if let Some(listed) = &tls.cipher_suites {
        crate::tls::check_suites_fit_keys(&cipher_suites, &certificates)
            .map_err(|why| source.at(listed, why))?;
    }
    Ok(TlsSettings {
        certificates,
        default_certificate,
        alpn,
        min_version,
        client_ca,
        client_auth,
        handshake_timeout,
        session_tickets: tls.session_tickets.as_ref().is_none_or(|b| *b.get_ref()),
        watch: tls.watch.as_ref().is_some_and(|b| *b.get_ref()),
        cipher_suites,
    })
}

/// `cipher_suites`: unset is the default order (an empty list).
fn cipher_suites(
    source: &Source,
    names: Option<&Spanned<Vec<Spanned<String>>>>,
    tls13_only: bool,
) -> Result<Vec<rustls::CipherSuite>, ConfigError> {
    let Some(names) = names else {
        return Ok(Vec::new());
    };
    let listed: Vec<&str> = names
        .get_ref()
        .iter()
        .map(|n| n.get_ref().as_str())
        .collect();
    crate::tls::cipher_suites_named(&listed, tls13_only).map_err(|why| source.at(names, why))
}

fn alpn_list(
    source: &Source,
    list: Option<&Spanned<Vec<Spanned<String>>>>,
) -> Result<Vec<Vec<u8>>, ConfigError> {
    let mut alpn = Vec::new();
    for protocol in list.iter().flat_map(|list| list.get_ref()) {
        let bytes = protocol.get_ref().as_bytes();
        if bytes.is_empty() || bytes.len() > 255 {
            return Err(source.at(protocol, "an ALPN protocol name is 1 to 255 bytes"));
        }
        alpn.push(bytes.to_vec());
    }
    Ok(alpn)
}

/// `[pool.tls]`: the CA certificates and the client certificate are read and checked here.
pub(super) fn resolve_origin(
    source: &Source,
    spanned: &Spanned<FileOriginTls>,
) -> Result<OriginSettings, ConfigError> {
    let tls = spanned.get_ref();
    let verify = tls.verify.as_ref().is_none_or(|b| *b.get_ref());
    let ca = match &tls.ca {
        Some(text) if text.get_ref().trim() == "system" => Some(CaSource::System(
            crate::tls::system_roots().map_err(|why| source.at(text, why))?,
        )),
        Some(text) => {
            let path = path_at(source, text)?;
            let cas = crate::tls::load_ca(&path).map_err(|why| source.at(text, why))?;
            Some(CaSource::File(path, cas))
        }
        None if verify => Some(CaSource::System(crate::tls::system_roots().map_err(
            |why| {
                source.error(
                    spanned.span(),
                    format!("{why}; set ca = \"FILE\" (or verify = false)"),
                )
            },
        )?)),
        None => None,
    };
    let server_name = match &tls.server_name {
        None => None,
        Some(text) => {
            let name = text.get_ref().trim().to_ascii_lowercase();
            if rustls::pki_types::ServerName::try_from(name.clone()).is_err() {
                return Err(source.at(
                    text,
                    format!("server_name {name:?} is not a DNS name or an IP address"),
                ));
            }
            Some(name)
        }
    };
    let client_certificate = match (&tls.client_cert, &tls.client_key) {
        (None, None) => None,
        (Some(cert), Some(key)) => {
            let cert_path = path_at(source, cert)?;
            let key_path = path_at(source, key)?;
            Some(
                crate::tls::load_key_pair(&cert_path, &key_path)
                    .map_err(|why| source.at(cert, why))?,
            )
        }
        (Some(text), None) | (None, Some(text)) => {
            return Err(source.at(text, "client_cert and client_key go together: set both"));
        }
    };
    let settings = OriginSettings {
        ca,
        server_name,
        verify,
        client_certificate,
        alpn: alpn_list(source, tls.alpn.as_ref())?,
        check_tls: tls.check_tls.as_ref().is_none_or(|b| *b.get_ref()),
        session_reuse: tls.session_reuse.as_ref().is_none_or(|b| *b.get_ref()),
        cipher_suites: cipher_suites(source, tls.cipher_suites.as_ref(), false)?,
    };
    // What every shard will build: refused here, with the file's name, rather than later.
    settings
        .client_config()
        .map_err(|why| source.error(spanned.span(), why))?;
    Ok(settings)
}

fn quoted(path: &std::path::Path) -> String {
    format!("{:?}", path.display().to_string())
}

fn alpn_toml(alpn: &[Vec<u8>]) -> String {
    let names: Vec<String> = alpn
        .iter()
        .map(|p| format!("{:?}", String::from_utf8_lossy(p)))
        .collect();
    format!("[{}]", names.join(", "))
}

/// The keys of TLS settings, one `key = value` each (a `[listener.tls]` table's lines, or a
/// route's inline table).
fn tls_keys(tls: &TlsSettings) -> Vec<String> {
    let certificates: Vec<String> = tls
        .certificates
        .iter()
        .map(|c| {
            format!(
                "{{ cert = {}, key = {} }}",
                quoted(&c.cert_path),
                quoted(&c.key_path)
            )
        })
        .collect();
    let mut keys = vec![format!("certificates = [{}]", certificates.join(", "))];
    match tls.default_certificate {
        DefaultCertificate::Reject => keys.push("default_certificate = \"reject\"".to_string()),
        DefaultCertificate::Index(index) => {
            if let Some(name) = tls.certificates.get(index).and_then(|c| c.names.first()) {
                keys.push(format!("default_certificate = {name:?}"));
            }
        }
    }
    keys.push(format!("alpn = {}", alpn_toml(&tls.alpn)));
    let min = if tls.min_version >= 0x0304 {
        "1.3"
    } else {
        "1.2"
    };
    keys.push(format!("min_version = \"{min}\""));
    if !tls.cipher_suites.is_empty() {
        keys.push(format!(
            "cipher_suites = {:?}",
            cipher_suite_list(&tls.cipher_suites)
        ));
    }
    if let Some((path, _)) = &tls.client_ca {
        keys.push(format!("client_ca = {}", quoted(path)));
    }
    keys.push(format!("client_auth = \"{}\"", tls.client_auth.name()));
    keys.push(format!(
        "handshake_timeout = \"{}\"",
        format_duration(tls.handshake_timeout)
    ));
    keys.push(format!("session_tickets = {}", tls.session_tickets));
    keys.push(format!("watch = {}", tls.watch));
    keys
}

/// `[listener.tls]` as printed by `ringproxy check` (paths resolved).
pub(super) fn write_listener_tls(tls: &TlsSettings, out: &mut String) -> std::fmt::Result {
    use std::fmt::Write as _;
    writeln!(out, "[listener.tls]")?;
    for key in tls_keys(tls) {
        writeln!(out, "{key}")?;
    }
    Ok(())
}

/// A route's `tls = { ... }` as printed by `ringproxy check`.
pub(super) fn route_tls_inline(tls: &TlsSettings) -> String {
    format!("{{ {} }}", tls_keys(tls).join(", "))
}

/// `[pool.tls]` as printed by `ringproxy check`.
pub(super) fn write_pool_tls(tls: &OriginSettings, out: &mut String) -> std::fmt::Result {
    use std::fmt::Write as _;
    writeln!(out, "[pool.tls]")?;
    match &tls.ca {
        Some(CaSource::System(_)) => writeln!(out, "ca = \"system\"")?,
        Some(CaSource::File(path, _)) => writeln!(out, "ca = {}", quoted(path))?,
        None => {}
    }
    if let Some(name) = &tls.server_name {
        writeln!(out, "server_name = {name:?}")?;
    }
    writeln!(out, "verify = {}", tls.verify)?;
    if let Some(certificate) = &tls.client_certificate {
        writeln!(out, "client_cert = {}", quoted(&certificate.cert_path))?;
        writeln!(out, "client_key = {}", quoted(&certificate.key_path))?;
    }
    writeln!(out, "alpn = {}", alpn_toml(&tls.alpn))?;
    writeln!(out, "check_tls = {}", tls.check_tls)?;
    writeln!(out, "session_reuse = {}", tls.session_reuse)?;
    if !tls.cipher_suites.is_empty() {
        writeln!(
            out,
            "cipher_suites = {:?}",
            cipher_suite_list(&tls.cipher_suites)
        )?;
    }
    Ok(())
}
