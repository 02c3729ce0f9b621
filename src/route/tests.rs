use super::*;
use crate::sniff::{Verdict, sniff};

fn route(conditions: Conditions, target: &'static str) -> Route<&'static str> {
    Route {
        conditions,
        target,
        tls: RouteTls::Listener,
    }
}

fn tls(server_name: Option<&str>, alpn: &[&str]) -> Detected {
    Detected::Protocol(
        Protocol::Tls,
        Facts {
            server_name: server_name.map(str::to_owned),
            alpn: alpn.iter().map(|name| name.to_string()).collect(),
            ..Facts::default()
        },
    )
}

fn http(host: &str, path: &str) -> Detected {
    Detected::Protocol(
        Protocol::Http,
        Facts {
            host: Some(host.to_owned()),
            path: Some(path.to_owned()),
            method: Some("GET".to_owned()),
            ..Facts::default()
        },
    )
}

const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(192, 0, 2, 7));

/// The example listener, in its order.
fn example() -> Vec<Route<&'static str>> {
    vec![
        route(
            Conditions {
                protocol: RouteProtocol::from_name("postgres"),
                ..Conditions::default()
            },
            "pg",
        ),
        route(
            Conditions {
                protocol: RouteProtocol::from_name("redis"),
                ..Conditions::default()
            },
            "cache",
        ),
        route(
            Conditions {
                protocol: RouteProtocol::from_name("mysql"),
                ..Conditions::default()
            },
            "mysql",
        ),
        route(
            Conditions {
                sni: NamePattern::parse("*.api.example.com"),
                ..Conditions::default()
            },
            "api-tls",
        ),
        route(
            Conditions {
                alpn: Some("h2".to_owned()),
                ..Conditions::default()
            },
            "grpc",
        ),
        route(
            Conditions {
                host: NamePattern::parse("admin.example.com"),
                path_prefix: Some("/v1/".to_owned()),
                ..Conditions::default()
            },
            "admin",
        ),
        route(
            Conditions {
                source: Some("10.0.0.0/8".parse().expect("cidr")),
                ..Conditions::default()
            },
            "internal",
        ),
    ]
}

#[test]
fn the_first_route_whose_conditions_all_hold_wins() {
    let routes = example();
    let pg = Detected::Protocol(Protocol::Postgres, Facts::default());
    assert_eq!(decide(&routes, &pg, CLIENT), Some(&"pg"));
    assert_eq!(decide(&routes, &Detected::Silence, CLIENT), Some(&"mysql"));
    assert_eq!(
        decide(&routes, &tls(Some("eu.api.example.com"), &["h2"]), CLIENT),
        Some(&"api-tls"),
        "the SNI route comes before the ALPN one"
    );
    assert_eq!(
        decide(
            &routes,
            &tls(Some("www.example.com"), &["http/1.1", "h2"]),
            CLIENT
        ),
        Some(&"grpc")
    );
    assert_eq!(
        decide(
            &routes,
            &tls(Some("www.example.com"), &["http/1.1"]),
            CLIENT
        ),
        None
    );
    assert_eq!(
        decide(&routes, &http("admin.example.com", "/v1/users"), CLIENT),
        Some(&"admin")
    );
    assert_eq!(
        decide(&routes, &http("admin.example.com", "/v2/users"), CLIENT),
        None,
        "host and path prefix must both hold"
    );
    let internal: IpAddr = "10.1.2.3".parse().expect("ip");
    assert_eq!(
        decide(&routes, &Detected::Unknown, internal),
        Some(&"internal")
    );
    let mapped: IpAddr = "::ffff:10.9.9.9".parse().expect("ip");
    assert_eq!(
        decide(&routes, &Detected::Unknown, mapped),
        Some(&"internal")
    );
    assert_eq!(decide(&routes, &Detected::Unknown, CLIENT), None);
}

#[test]
fn name_patterns_follow_nginx_server_name() {
    let below = NamePattern::parse("*.Example.COM.").expect("pattern");
    assert!(below.matches("www.example.com"));
    assert!(below.matches("a.b.example.com"));
    assert!(below.matches("WWW.EXAMPLE.COM."));
    assert!(!below.matches("example.com"), "not the domain itself");
    assert!(!below.matches("badexample.com"));
    let exact = NamePattern::parse("api.example.com").expect("pattern");
    assert!(exact.matches("API.example.com"));
    assert!(!exact.matches("x.api.example.com"));
    for bad in [
        "",
        "*",
        "*.",
        "a.*.com",
        "exa mple.com",
        "a..b",
        "*example.com",
    ] {
        assert_eq!(NamePattern::parse(bad), None, "{bad:?}");
    }
}

#[test]
fn protocol_names_of_the_config() {
    for name in [
        "tls", "http", "h2", "postgres", "mongodb", "redis", "rtmp", "ssh", "mysql", "smtp", "ftp",
    ] {
        assert!(RouteProtocol::from_name(name).is_some(), "{name}");
    }
    assert_eq!(RouteProtocol::from_name("pgsql"), None);
}

#[test]
fn only_routes_on_bytes_need_sniffing() {
    let source_only = vec![route(
        Conditions {
            source: Some("10.0.0.0/8".parse().expect("cidr")),
            ..Conditions::default()
        },
        "internal",
    )];
    assert!(sniffers_needed(&source_only).is_empty());
    assert!(!source_only[0].conditions.needs_bytes());
    let wanted = sniffers_needed(&example());
    for protocol in [
        Protocol::Postgres,
        Protocol::Redis,
        Protocol::Tls,
        Protocol::Http,
    ] {
        assert!(wanted.contains(&protocol), "{protocol:?} in {wanted:?}");
    }
    assert!(!wanted.contains(&Protocol::Ssh));
}

/// From real captured bytes through the sniffers to a route.
#[test]
fn captured_clients_reach_their_routes() {
    let routes = example();
    let wanted = sniffers_needed(&routes);
    for (bytes, expected) in [
        (
            &include_bytes!("../sniff/captures/postgres_startup.bin")[..],
            Some(&"pg"),
        ),
        (
            include_bytes!("../sniff/captures/redis_ping_resp2.bin"),
            Some(&"cache"),
        ),
        (
            include_bytes!("../sniff/captures/tls13_sni_alpn.bin"),
            Some(&"grpc"),
        ),
        (
            include_bytes!("../sniff/captures/http11_curl.bin"),
            Some(&"admin"),
        ),
    ] {
        let detected = match sniff(bytes, &wanted) {
            Verdict::Match(protocol, facts) => Detected::Protocol(protocol, facts),
            other => panic!("{other:?}"),
        };
        assert_eq!(decide(&routes, &detected, CLIENT), expected, "{detected:?}");
    }
}
