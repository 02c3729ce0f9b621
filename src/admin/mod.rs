//! The admin API: HTTP/1.1 on `[admin] bind`, served by hyper on the control thread's tokio
//! runtime (never on a shard).
//!
//! Owns the listening socket, the connection cap, header and body limits, authentication and
//! the mapping of routes to the control thread's operations. Bad input of any kind gets a JSON
//! error (400, 401, 403, 404, 405 with `Allow`, 413), never a panic; a client that sends its
//! headers too slowly is cut (slowloris), and connections beyond `admin.max_connections` are
//! closed at accept.

pub mod ctl;
pub mod routes;

use std::cell::RefCell;
use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::rc::Rc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, AUTHORIZATION, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tracing::{debug, warn};

use crate::control::overrides::{AddedServer, AdminState};
use crate::control::{self, Shared};
use routes::{Route, RouteError, ServerAction, route};

/// Request bodies larger than this are refused (413).
pub const MAX_BODY: usize = 64 * 1024;
/// A client must send its whole request head within this long, and then its body.
const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
const BODY_TIMEOUT: Duration = Duration::from_secs(5);
/// A connection (keep-alive included) lives at most this long.
const CONNECTION_LIFETIME: Duration = Duration::from_secs(60);
/// The environment variable that may hold the admin token instead of `admin.token_file`.
pub const TOKEN_VARIABLE: &str = "RINGPROXY_ADMIN_TOKEN";

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("admin: cannot bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("admin.token_file {path}: {message}")]
    Token { path: String, message: String },
}

/// The bearer token mutating calls need, if one is configured.
#[derive(Clone)]
pub struct Token(Vec<u8>);

impl Token {
    fn matches(&self, presented: &[u8]) -> bool {
        self.0.len() == presented.len() && bool::from(self.0.as_slice().ct_eq(presented))
    }
}

/// Reads the token: from `token_file` (which must not be readable by group or others), else
/// from `RINGPROXY_ADMIN_TOKEN`; `None` when neither is set.
pub fn load_token(token_file: Option<&Path>) -> Result<Option<Token>, AdminError> {
    if let Some(path) = token_file {
        let error = |message: String| AdminError::Token {
            path: path.display().to_string(),
            message,
        };
        let metadata = std::fs::metadata(path).map_err(|e| error(e.to_string()))?;
        let mode = metadata.permissions().mode();
        if mode & 0o077 != 0 {
            return Err(error(format!(
                "is readable by group or others (mode {:o}); chmod 600 it",
                mode & 0o777
            )));
        }
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(error("is empty".to_string()));
        }
        return Ok(Some(Token(token.as_bytes().to_vec())));
    }
    match std::env::var(TOKEN_VARIABLE) {
        Ok(token) if !token.trim().is_empty() => Ok(Some(Token(token.trim().as_bytes().to_vec()))),
        _ => Ok(None),
    }
}

/// Binds the admin socket (no SO_REUSEPORT: a second instance fails here instead of sharing).
pub fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, AdminError> {
    let listener =
        std::net::TcpListener::bind(addr).map_err(|source| AdminError::Bind { addr, source })?;
    listener
        .set_nonblocking(true)
        .map_err(|source| AdminError::Bind { addr, source })?;
    Ok(listener)
}

struct Admin {
    shared: Shared,
    token: RefCell<Option<Token>>,
    max_connections: usize,
    open: RefCell<usize>,
}

/// Serves the admin API until the control thread ends (call inside its `LocalSet`).
pub async fn serve(
    listener: std::net::TcpListener,
    shared: Shared,
    token: Option<Token>,
    max_connections: usize,
) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(listener) => listener,
        Err(error) => {
            warn!(%error, "admin: cannot serve the bound socket");
            return;
        }
    };
    let admin = Rc::new(Admin {
        shared,
        token: RefCell::new(token),
        max_connections,
        open: RefCell::new(0),
    });
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                debug!(%error, "admin: accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if *admin.open.borrow() >= admin.max_connections {
            debug!(%peer, "admin: connection cap reached; closing");
            drop(stream);
            continue;
        }
        *admin.open.borrow_mut() += 1;
        let admin = Rc::clone(&admin);
        tokio::task::spawn_local(async move {
            let io = TokioIo::new(stream);
            let service = {
                let admin = Rc::clone(&admin);
                service_fn(move |request| {
                    let admin = Rc::clone(&admin);
                    async move { Ok::<_, Infallible>(handle(&admin, request).await) }
                })
            };
            let connection = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .max_buf_size(MAX_BODY)
                .serve_connection(io, service);
            let _ = tokio::time::timeout(CONNECTION_LIFETIME, connection).await;
            *admin.open.borrow_mut() -= 1;
        });
    }
}

fn json_response(status: u16, body: &Value) -> Response<Full<Bytes>> {
    let mut text = serde_json::to_string_pretty(body).unwrap_or_else(|_| "{}".to_string());
    text.push('\n');
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() =
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

fn error_response(status: u16, message: impl Into<String>) -> Response<Full<Bytes>> {
    json_response(status, &json!({ "error": message.into() }))
}

fn text_response(content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

/// Checks the bearer token; `Some(response)` refuses the request.
fn authorize(
    admin: &Admin,
    request: &Request<Incoming>,
    route: &Route,
) -> Option<Response<Full<Bytes>>> {
    let auth_reads = admin.shared.borrow().auth_reads();
    let needs_token = route.mutates() || (auth_reads && !route.is_probe());
    if !needs_token {
        return None;
    }
    let token = admin.token.borrow();
    let Some(token) = token.as_ref() else {
        return Some(error_response(
            403,
            "no admin token is configured (admin.token_file or RINGPROXY_ADMIN_TOKEN): changes through the API are disabled",
        ));
    };
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(presented) if token.matches(presented) => None,
        _ => {
            let mut response = error_response(401, "missing or wrong bearer token");
            response.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer"),
            );
            Some(response)
        }
    }
}

async fn read_json(request: Request<Incoming>) -> Result<Value, Response<Full<Bytes>>> {
    let body = Limited::new(request.into_body(), MAX_BODY);
    let Ok(collected) = tokio::time::timeout(BODY_TIMEOUT, body.collect()).await else {
        return Err(error_response(
            408,
            "the request body did not arrive in time",
        ));
    };
    let bytes = match collected {
        Ok(collected) => collected.to_bytes(),
        Err(error) => {
            let too_large = error
                .downcast_ref::<http_body_util::LengthLimitError>()
                .is_some();
            return Err(if too_large {
                error_response(413, format!("request body larger than {MAX_BODY} bytes"))
            } else {
                error_response(400, format!("cannot read the request body: {error}"))
            });
        }
    };
    if bytes.is_empty() {
        return Err(error_response(400, "a JSON body is required"));
    }
    serde_json::from_slice(&bytes)
        .map_err(|error| error_response(400, format!("invalid JSON: {error}")))
}

async fn handle(admin: &Admin, request: Request<Incoming>) -> Response<Full<Bytes>> {
    let method = request.method().clone();
    let route = match route(method.as_str(), request.uri().path()) {
        Ok(route) => route,
        Err(RouteError::NotFound) => return error_response(404, "no such endpoint"),
        Err(RouteError::BadSegment(segment)) => {
            return error_response(400, format!("bad path segment {segment:?}"));
        }
        Err(RouteError::MethodNotAllowed(allowed)) => {
            let mut response = error_response(405, format!("method {method} not allowed here"));
            response
                .headers_mut()
                .insert(ALLOW, HeaderValue::from_static(allowed));
            return response;
        }
    };
    if let Some(refused) = authorize(admin, &request, &route) {
        return refused;
    }
    let mut response = match route {
        Route::Healthz => json_response(200, &json!({"status": "ok"})),
        Route::Ready => {
            let reasons = control::not_ready_reasons(&admin.shared.borrow());
            if reasons.is_empty() {
                json_response(200, &json!({"ready": true}))
            } else {
                json_response(503, &json!({"ready": false, "reasons": reasons}))
            }
        }
        Route::Status => json_response(200, &control::status_json(&admin.shared.borrow())),
        Route::Metrics => text_response(
            "text/plain; version=0.0.4; charset=utf-8",
            control::render_metrics(&admin.shared.borrow()),
        ),
        Route::Config => text_response(
            "text/plain; charset=utf-8",
            admin.shared.borrow().config.to_toml(),
        ),
        Route::Reload => {
            let (status, body) = control::reload(&admin.shared);
            if status == 200 {
                // A reload may name a new token file.
                if let Ok(token) = admin.shared.borrow().load_token() {
                    *admin.token.borrow_mut() = token;
                }
            }
            json_response(status, &body)
        }
        Route::ServerAction {
            pool,
            server,
            action,
        } => {
            let mut control = admin.shared.borrow_mut();
            let outcome = match action {
                ServerAction::Drain => control.set_admin(&pool, &server, Some(AdminState::Drain)),
                ServerAction::Maint => control.set_admin(&pool, &server, Some(AdminState::Maint)),
                ServerAction::Enable => control.set_admin(&pool, &server, None),
                ServerAction::ShutdownSessions => control.cut_sessions(&pool, &server),
            };
            match outcome {
                Ok(id) => json_response(200, &control::server_status(&control, id)),
                Err(error) => error_response(error.status, error.message),
            }
        }
        Route::SetWeight { pool, server } => {
            let body = match read_json(request).await {
                Ok(body) => body,
                Err(response) => return response,
            };
            let Some(weight) = body.get("weight").and_then(Value::as_u64) else {
                return error_response(400, "expected {\"weight\": N} with N from 1 to 10000");
            };
            let weight = u32::try_from(weight).unwrap_or(u32::MAX);
            let mut control = admin.shared.borrow_mut();
            match control.set_weight(&pool, &server, weight) {
                Ok(id) => json_response(200, &control::server_status(&control, id)),
                Err(error) => error_response(error.status, error.message),
            }
        }
        Route::AddServer { pool } => {
            let body = match read_json(request).await {
                Ok(body) => body,
                Err(response) => return response,
            };
            let server = match parse_added_server(&body) {
                Ok(server) => server,
                Err(message) => return error_response(400, message),
            };
            let mut control = admin.shared.borrow_mut();
            let outcome = control.add_server(&pool, server);
            drop(control);
            match outcome {
                Ok(id) => {
                    control::reconcile_health(&admin.shared);
                    json_response(201, &control::server_status(&admin.shared.borrow(), id))
                }
                Err(error) => error_response(error.status, error.message),
            }
        }
        Route::SetSplitWeights { split } => {
            let body = match read_json(request).await {
                Ok(body) => body,
                Err(response) => return response,
            };
            let weights = match parse_split_weights(&body) {
                Ok(weights) => weights,
                Err(message) => return error_response(400, message),
            };
            let mut control = admin.shared.borrow_mut();
            match control.set_split_weights(&split, &weights) {
                Ok(()) => json_response(200, &control::split_status(&control, &split)),
                Err(error) => error_response(error.status, error.message),
            }
        }
        Route::DeleteServer { pool, server } => {
            let mut control = admin.shared.borrow_mut();
            match control.set_admin(&pool, &server, Some(AdminState::Remove)) {
                Ok(id) => json_response(200, &control::server_status(&control, id)),
                Err(error) => error_response(error.status, error.message),
            }
        }
    };
    if method == Method::HEAD {
        *response.body_mut() = Full::new(Bytes::new());
    }
    response
}

/// `{"weights": {"blue": 0, "green": 100}}`.
fn parse_split_weights(body: &Value) -> Result<std::collections::BTreeMap<String, u32>, String> {
    const SHAPE: &str = "expected {\"weights\": {\"pool\": N, ...}} with N from 0 to 10000";
    let object = body.as_object().ok_or(SHAPE)?;
    if let Some(key) = object.keys().find(|key| *key != "weights") {
        return Err(format!("unknown key {key:?}: {SHAPE}"));
    }
    let weights = object
        .get("weights")
        .and_then(Value::as_object)
        .ok_or(SHAPE)?;
    weights
        .iter()
        .map(|(pool, weight)| {
            weight
                .as_u64()
                .and_then(|weight| u32::try_from(weight).ok())
                .map(|weight| (pool.clone(), weight))
                .ok_or_else(|| format!("weight of {pool:?} is not a whole number: {SHAPE}"))
        })
        .collect()
}

/// `{"addr": "IP:PORT", "weight": N, "backup": false, "name": "...", "max_connections": N}`.
fn parse_added_server(body: &Value) -> Result<AddedServer, String> {
    let object = body
        .as_object()
        .ok_or("expected a JSON object such as {\"addr\": \"127.0.0.1:9001\", \"weight\": 1}")?;
    for key in object.keys() {
        if !matches!(
            key.as_str(),
            "addr" | "weight" | "backup" | "name" | "max_connections"
        ) {
            return Err(format!(
                "unknown key {key:?} (addr, weight, backup, name, max_connections)"
            ));
        }
    }
    let addr = object
        .get("addr")
        .and_then(Value::as_str)
        .ok_or("\"addr\" (a string IP:PORT) is required")?;
    let addr: SocketAddr = addr.parse().map_err(|_| {
        format!("invalid address {addr:?}: expected IP:PORT (host names are not resolved)")
    })?;
    let weight = match object.get("weight") {
        None => 1,
        Some(value) => value
            .as_u64()
            .and_then(|weight| u32::try_from(weight).ok())
            .ok_or("\"weight\" must be a whole number from 1 to 10000")?,
    };
    let backup = match object.get("backup") {
        None => false,
        Some(value) => value.as_bool().ok_or("\"backup\" must be true or false")?,
    };
    let name = match object.get("name") {
        None => None,
        Some(value) => Some(
            value
                .as_str()
                .ok_or("\"name\" must be a string")?
                .to_string(),
        ),
    };
    let max_connections = match object.get("max_connections") {
        None => None,
        Some(value) => Some(
            value
                .as_u64()
                .and_then(|limit| u32::try_from(limit).ok())
                .filter(|&limit| limit > 0)
                .ok_or("\"max_connections\" must be a positive whole number")?,
        ),
    };
    Ok(AddedServer {
        addr,
        name,
        weight,
        backup,
        max_connections,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_server_bodies() {
        let ok =
            parse_added_server(&json!({"addr": "127.0.0.1:9001", "weight": 3})).expect("valid");
        assert_eq!(ok.weight, 3);
        assert!(!ok.backup);
        for bad in [
            json!([]),
            json!({}),
            json!({"addr": "nowhere"}),
            json!({"addr": "127.0.0.1:1", "weight": "x"}),
            json!({"addr": "127.0.0.1:1", "weight": 99999999999u64}),
            json!({"addr": "127.0.0.1:1", "backup": 1}),
            json!({"addr": "127.0.0.1:1", "extra": 1}),
            json!({"addr": "127.0.0.1:1", "max_connections": 0}),
        ] {
            assert!(parse_added_server(&bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn tokens_compare_whole() {
        let token = Token(b"secret".to_vec());
        assert!(token.matches(b"secret"));
        assert!(!token.matches(b"secre"));
        assert!(!token.matches(b"secret2"));
        assert!(!token.matches(b""));
    }
}
