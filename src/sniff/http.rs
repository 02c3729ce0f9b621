//! HTTP/1.x requests, as far as the first header block: method, path and Host (httparse).

use super::{Facts, Protocol, Verdict};

/// Headers beyond this many fail the request (as httparse's fixed array does).
const MAX_HEADERS: usize = 64;

pub fn sniff(bytes: &[u8]) -> Verdict {
    // The HTTP/2 preface is a valid-looking request line to httparse ("PRI * HTTP/2.0"): it is
    // h2's, not ours.
    if bytes.starts_with(b"PRI * HTTP/2") {
        return Verdict::NoMatch;
    }
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut headers);
    match request.parse(bytes) {
        Ok(httparse::Status::Complete(_)) => {
            let host = request
                .headers
                .iter()
                .find(|header| header.name.eq_ignore_ascii_case("host"))
                .map(|header| host_without_port(header.value));
            Verdict::Match(
                Protocol::Http,
                Facts {
                    method: request.method.map(str::to_owned),
                    path: request.path.map(str::to_owned),
                    host,
                    ..Facts::default()
                },
            )
        }
        // httparse accepts any token as a method; a partial line is HTTP only once a space
        // followed a plausible method.
        Ok(httparse::Status::Partial) if plausible_start(bytes) => Verdict::NeedMore,
        Ok(httparse::Status::Partial) | Err(_) => Verdict::NoMatch,
    }
}

/// The start of a request line: an upper-case method (as every registered one is) followed by
/// a space, or a prefix of one.
fn plausible_start(bytes: &[u8]) -> bool {
    let method_len = bytes
        .iter()
        .take_while(|byte| byte.is_ascii_uppercase())
        .count();
    match bytes.get(method_len) {
        None => method_len <= 16,
        Some(b' ') => (1..=16).contains(&method_len),
        Some(_) => false,
    }
}

/// The Host header's name, lower-cased, without a port (and without the brackets of an IPv6
/// literal's port form).
fn host_without_port(value: &[u8]) -> String {
    let host = String::from_utf8_lossy(value).trim().to_ascii_lowercase();
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default().to_owned();
    }
    match host.rsplit_once(':') {
        Some((name, port)) if port.bytes().all(|byte| byte.is_ascii_digit()) => name.to_owned(),
        _ => host,
    }
}
