//! A small HTTP/1.1 client for the admin API in tests (one request per connection), and helpers
//! to read `/status`.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|error| panic!("not JSON ({error}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case(name)
                .then(|| value.trim().to_string())
        })
    }
}

/// Sends raw bytes and reads one response: until its head and `Content-Length` body are in,
/// or the server closes, or 10 s pass.
pub fn raw(addr: SocketAddr, request: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    // The server may answer (and close) before taking everything: that is an answer too.
    let _ = stream.write_all(request);
    let mut answer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        if let Some(complete) = complete_response(&answer) {
            answer.truncate(complete);
            break;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
    }
    Ok(answer)
}

/// The length of a complete response at the start of `bytes`, if one is there.
fn complete_response(bytes: &[u8]) -> Option<usize> {
    let end = bytes.windows(4).position(|window| window == b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&bytes[..end]);
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim()
                .eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .unwrap_or(0);
    (bytes.len() >= end + length).then_some(end + length)
}

pub fn parse(answer: &[u8]) -> Option<Response> {
    let text = String::from_utf8_lossy(answer).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let status = head.split_whitespace().nth(1)?.parse().ok()?;
    Some(Response {
        status,
        head: head.to_string(),
        body: body.to_string(),
    })
}

/// One request with `Connection: close`; panics when no HTTP answer comes.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> Response {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    if let Some(body) = body {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
    } else {
        request.push_str("Content-Length: 0\r\n\r\n");
    }
    let answer = raw(addr, request.as_bytes()).expect("admin request");
    parse(&answer).unwrap_or_else(|| {
        panic!(
            "no HTTP answer to {method} {path}: {:?}",
            String::from_utf8_lossy(&answer)
        )
    })
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    http(addr, "GET", path, None, None)
}

pub fn status(addr: SocketAddr) -> serde_json::Value {
    let response = get(addr, "/status");
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()
}

/// A server's object in `/status` (by pool and server name).
pub fn server_in(
    status: &serde_json::Value,
    pool: &str,
    server: &str,
) -> Option<serde_json::Value> {
    status["pools"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == pool)?["servers"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == server)
        .cloned()
}

/// A server's state in `/status` ("gone" when it is not listed).
pub fn server_state(addr: SocketAddr, pool: &str, server: &str) -> String {
    server_in(&status(addr), pool, server)
        .and_then(|server| server["state"].as_str().map(str::to_string))
        .unwrap_or_else(|| "gone".to_string())
}
