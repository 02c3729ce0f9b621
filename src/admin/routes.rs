//! The admin API's routes: method and path in, a `Route` (or why not) out. Pure, so every path
//! shape, percent-encoding and wrong method is unit tested without a socket.

use percent_encoding::percent_decode_str;

/// What a request asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    Healthz,
    Ready,
    Status,
    Metrics,
    Config,
    Reload,
    /// `POST /pools/{pool}/servers/{server}/{action}`.
    ServerAction {
        pool: String,
        server: String,
        action: ServerAction,
    },
    /// `PUT /pools/{pool}/servers/{server}/weight`.
    SetWeight {
        pool: String,
        server: String,
    },
    /// `POST /pools/{pool}/servers`.
    AddServer {
        pool: String,
    },
    /// `DELETE /pools/{pool}/servers/{server}`.
    DeleteServer {
        pool: String,
        server: String,
    },
    /// `PUT /splits/{split}`: new weights.
    SetSplitWeights {
        split: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerAction {
    Drain,
    Maint,
    Enable,
    ShutdownSessions,
}

impl Route {
    /// Whether the route changes anything (and so always needs the token).
    pub fn mutates(&self) -> bool {
        !matches!(
            self,
            Route::Healthz | Route::Ready | Route::Status | Route::Metrics | Route::Config
        )
    }

    /// Probes that stay open even with `auth_reads` (liveness and readiness checkers seldom
    /// carry tokens).
    pub fn is_probe(&self) -> bool {
        matches!(self, Route::Healthz | Route::Ready)
    }
}

/// Why a request matches no route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteError {
    NotFound,
    /// The path exists, not with this method; the methods it takes.
    MethodNotAllowed(&'static str),
    /// A path segment that is not valid percent-encoded UTF-8.
    BadSegment(String),
}

fn segment(raw: &str) -> Result<String, RouteError> {
    let decoded = percent_decode_str(raw)
        .decode_utf8()
        .map_err(|_| RouteError::BadSegment(raw.to_string()))?;
    if decoded.is_empty() || decoded.len() > 256 || decoded.chars().any(char::is_control) {
        return Err(RouteError::BadSegment(raw.to_string()));
    }
    Ok(decoded.into_owned())
}

pub fn route(method: &str, path: &str) -> Result<Route, RouteError> {
    let path = path.split('?').next().unwrap_or(path);
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let only = |allowed: &'static str, route: Route| {
        if allowed.split(", ").any(|m| m == method) {
            Ok(route)
        } else {
            Err(RouteError::MethodNotAllowed(allowed))
        }
    };
    match parts.as_slice() {
        ["healthz"] => only("GET, HEAD", Route::Healthz),
        ["ready"] => only("GET, HEAD", Route::Ready),
        ["status"] => only("GET, HEAD", Route::Status),
        ["metrics"] => only("GET, HEAD", Route::Metrics),
        ["config"] => only("GET, HEAD", Route::Config),
        ["reload"] => only("POST", Route::Reload),
        ["splits", split] => {
            let split = segment(split)?;
            only("PUT", Route::SetSplitWeights { split })
        }
        ["pools", pool, "servers"] => {
            let pool = segment(pool)?;
            only("POST", Route::AddServer { pool })
        }
        ["pools", pool, "servers", server] => {
            let (pool, server) = (segment(pool)?, segment(server)?);
            only("DELETE", Route::DeleteServer { pool, server })
        }
        ["pools", pool, "servers", server, action] => {
            let (pool, server) = (segment(pool)?, segment(server)?);
            let action = match *action {
                "drain" => ServerAction::Drain,
                "maint" => ServerAction::Maint,
                "enable" => ServerAction::Enable,
                "shutdown-sessions" => ServerAction::ShutdownSessions,
                "weight" => return only("PUT", Route::SetWeight { pool, server }),
                _ => return Err(RouteError::NotFound),
            };
            only(
                "POST",
                Route::ServerAction {
                    pool,
                    server,
                    action,
                },
            )
        }
        _ => Err(RouteError::NotFound),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_and_their_methods() {
        assert_eq!(route("GET", "/status"), Ok(Route::Status));
        assert_eq!(route("GET", "/metrics?x=1"), Ok(Route::Metrics));
        assert_eq!(
            route("DELETE", "/status"),
            Err(RouteError::MethodNotAllowed("GET, HEAD"))
        );
        assert_eq!(route("POST", "/reload"), Ok(Route::Reload));
        assert_eq!(
            route("PUT", "/splits/app%2Dv2"),
            Ok(Route::SetSplitWeights {
                split: "app-v2".into()
            })
        );
        assert_eq!(
            route("POST", "/splits/app"),
            Err(RouteError::MethodNotAllowed("PUT"))
        );
        assert_eq!(route("PUT", "/splits"), Err(RouteError::NotFound));
        assert_eq!(
            route("GET", "/reload"),
            Err(RouteError::MethodNotAllowed("POST"))
        );
        assert_eq!(route("GET", "/nope"), Err(RouteError::NotFound));
        assert_eq!(route("GET", "/"), Err(RouteError::NotFound));
        assert_eq!(
            route("POST", "/pools/web/servers/%5B%3A%3A1%5D%3A9001/drain"),
            Ok(Route::ServerAction {
                pool: "web".into(),
                server: "[::1]:9001".into(),
                action: ServerAction::Drain
            })
        );
        assert_eq!(
            route("PUT", "/pools/web/servers/a/weight"),
            Ok(Route::SetWeight {
                pool: "web".into(),
                server: "a".into()
            })
        );
        assert_eq!(
            route("POST", "/pools/web/servers/a/weight"),
            Err(RouteError::MethodNotAllowed("PUT"))
        );
        assert_eq!(
            route("POST", "/pools/web/servers"),
            Ok(Route::AddServer { pool: "web".into() })
        );
        assert_eq!(
            route("DELETE", "/pools/web/servers/127.0.0.1:9001"),
            Ok(Route::DeleteServer {
                pool: "web".into(),
                server: "127.0.0.1:9001".into()
            })
        );
        assert_eq!(
            route("POST", "/pools/web/servers/a/explode"),
            Err(RouteError::NotFound)
        );
        assert!(matches!(
            route("POST", "/pools/%FF/servers"),
            Err(RouteError::BadSegment(_))
        ));
        assert!(matches!(
            route("POST", "/pools//servers"),
            Err(RouteError::BadSegment(_))
        ));
        assert!(Route::Reload.mutates() && !Route::Status.mutates());
    }
}
