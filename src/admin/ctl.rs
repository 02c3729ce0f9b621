//! `ringproxy ctl`: the admin API from a shell. Sends one request (hyper's HTTP/1.1 client on
//! a small current-thread runtime), prints the answer as a readable table or, with `--json`,
//! as the API's JSON.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde_json::Value;

/// How long `ctl` waits for the admin API.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// One call to the admin API.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: Method,
    pub path: String,
    pub body: Option<Value>,
}

/// A path segment as the API expects it (a server's address has `:` and `[`).
pub fn encode(segment: &str) -> String {
    utf8_percent_encode(segment, NON_ALPHANUMERIC).to_string()
}

impl Call {
    pub fn get(path: &str) -> Call {
        Call {
            method: Method::GET,
            path: path.to_string(),
            body: None,
        }
    }

    pub fn server(method: Method, pool: &str, server: &str, action: Option<&str>) -> Call {
        let mut path = format!("/pools/{}/servers/{}", encode(pool), encode(server));
        if let Some(action) = action {
            path.push('/');
            path.push_str(action);
        }
        Call {
            method,
            path,
            body: None,
        }
    }

    pub fn with_body(mut self, body: Value) -> Call {
        self.body = Some(body);
        self
    }
}

/// The answer: HTTP status and body (JSON when it parses, else text).
#[derive(Debug)]
pub struct Answer {
    pub status: u16,
    pub body: Result<Value, String>,
}

/// Sends `call` to the admin API at `admin`, with the bearer token if one is given.
pub fn send(admin: SocketAddr, token: Option<&str>, call: &Call) -> Result<Answer, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|error| format!("cannot start a runtime: {error}"))?;
    runtime.block_on(async {
        tokio::time::timeout(CALL_TIMEOUT, send_async(admin, token, call))
            .await
            .map_err(|_| format!("no answer from the admin API at {admin} within 10 s"))?
    })
}

async fn send_async(admin: SocketAddr, token: Option<&str>, call: &Call) -> Result<Answer, String> {
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .map_err(|error| format!("cannot connect to the admin API at {admin}: {error}"))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|error| format!("admin API at {admin}: {error}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let body = match &call.body {
        Some(value) => Bytes::from(value.to_string()),
        None => Bytes::new(),
    };
    let mut request = Request::builder()
        .method(call.method.clone())
        .uri(&call.path)
        .header(HOST, admin.to_string());
    if call.body.is_some() {
        request = request.header(CONTENT_TYPE, "application/json");
    }
    if let Some(token) = token {
        request = request.header(AUTHORIZATION, format!("Bearer {token}"));
    }
    let request = request
        .body(Full::new(body))
        .map_err(|error| format!("bad request: {error}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|error| format!("admin API at {admin}: {error}"))?;
    let status = response.status().as_u16();
    let bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|error| format!("admin API at {admin}: {error}"))?
        .to_bytes();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let body = serde_json::from_str(&text).map_err(|_| text);
    Ok(Answer { status, body })
}

fn cell(value: &Value) -> String {
    match value {
        Value::Null => "-".to_string(),
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|column| {
            rows.iter()
                .filter_map(|row| row.get(column))
                .map(|text| text.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let line: Vec<String> = row
            .iter()
            .enumerate()
            .map(|(column, text)| format!("{text:<width$}", width = widths[column]))
            .collect();
        let _ = writeln!(out, "  {}", line.join("  ").trim_end());
    }
    out
}

/// `/status` as tables: shards, listeners, then each pool's servers.
pub fn format_status(status: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ringproxy {}  generation {}  {}",
        cell(&status["version"]),
        cell(&status["generation"]),
        if status["draining"] == Value::Bool(true) {
            "DRAINING"
        } else {
            "running"
        }
    );
    if let Some(pending) = status["pending_restart"].as_array()
        && !pending.is_empty()
    {
        let keys: Vec<String> = pending.iter().map(cell).collect();
        let _ = writeln!(out, "pending restart: {}", keys.join(", "));
    }
    let mut rows = vec![vec![
        "listener".to_string(),
        "bind".to_string(),
        "pool".to_string(),
        "active".to_string(),
        "accepted".to_string(),
        "rejected".to_string(),
    ]];
    for listener in status["listeners"].as_array().into_iter().flatten() {
        rows.push(
            ["name", "bind", "pool", "active", "accepted", "rejected"]
                .iter()
                .map(|key| cell(&listener[*key]))
                .collect(),
        );
    }
    out.push_str(&table(&rows));
    for pool in status["pools"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "\npool {} ({}){}",
            cell(&pool["name"]),
            cell(&pool["balance"]),
            if pool["all_servers_down"] == Value::Bool(true) {
                "  NO SERVER UP"
            } else {
                ""
            }
        );
        let mut rows = vec![vec![
            "server".to_string(),
            "addr".to_string(),
            "state".to_string(),
            "weight".to_string(),
            "active".to_string(),
            "total".to_string(),
            "failures".to_string(),
            "reason".to_string(),
        ]];
        for server in pool["servers"].as_array().into_iter().flatten() {
            rows.push(vec![
                cell(&server["name"]),
                cell(&server["addr"]),
                cell(&server["state"]),
                format!(
                    "{}/{}",
                    cell(&server["effective_weight"]),
                    cell(&server["weight"])
                ),
                cell(&server["active"]),
                cell(&server["total"]),
                cell(&server["failures"]),
                cell(&server["reason"]),
            ]);
        }
        out.push_str(&table(&rows));
    }
    out
}

/// One server's status object (what the mutating calls answer) as a line.
pub fn format_server(server: &Value) -> String {
    format!(
        "{} {} ({}): {}, weight {}, {} active, {} total",
        cell(&server["pool"]),
        cell(&server["name"]),
        cell(&server["addr"]),
        cell(&server["state"]),
        cell(&server["weight"]),
        cell(&server["active"]),
        cell(&server["total"])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_paths_are_encoded() {
        let call = Call::server(Method::POST, "web", "[::1]:9001", Some("drain"));
        assert_eq!(call.path, "/pools/web/servers/%5B%3A%3A1%5D%3A9001/drain");
        let routed = crate::admin::routes::route("POST", &call.path).expect("routes back");
        assert!(matches!(
            routed,
            crate::admin::routes::Route::ServerAction { ref server, .. } if server == "[::1]:9001"
        ));
    }

    #[test]
    fn status_tables_render_missing_fields_as_dashes() {
        let text = format_status(&serde_json::json!({
            "version": "0.1.0",
            "generation": 3,
            "listeners": [{"name": "front", "bind": "127.0.0.1:8080", "active": 1}],
            "pools": [{"name": "web", "balance": "round_robin", "servers": [{"name": "a"}]}],
        }));
        assert!(text.contains("front"), "{text}");
        assert!(text.contains("pool web (round_robin)"), "{text}");
        assert!(text.contains("  a "), "{text}");
    }
}
