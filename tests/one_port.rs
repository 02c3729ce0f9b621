//! One listener, one port, real servers and real clients (Debian's packages, installed by
//! `tests/run.sh`): PostgreSQL (psql with `sslmode=prefer`, which starts with an SSLRequest),
//! Redis (redis-cli SET then GET), MariaDB (the mariadb client, routed by its silence), nginx
//! (curl, the default pool), two TLS servers told apart by SNI (openssl s_client sees each
//! server's own certificate: passthrough), and nginx-rtmp (ffmpeg pushing a 3 s stream). Each
//! client does real work through the same port and lands in its own pool.

mod common;

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;

/// A file the Debian packages install; under `CI=true` missing fails the test.
fn installed(path: Option<PathBuf>, what: &str, package: &str) -> Option<PathBuf> {
    if path.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{what} is missing (Debian package {package}); CI must install it"
        );
        eprintln!("SKIPPED: {what} is not installed (apt-get install {package})");
    }
    path
}

fn postgres_bin(name: &str) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .map(|version| version.path().join("bin").join(name))
        .filter(|path| path.is_file())
        .collect();
    found.sort();
    found.pop()
}

fn user_ids(user: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let output = Command::new("id").args([flag, user]).output().expect("id");
        String::from_utf8_lossy(&output.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}

fn run(program: &Path, args: &[&str]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|error| panic!("{program:?}: {error}"))
}

fn text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

fn start_postgres(dir: &Path) -> (Started, u16) {
    let initdb = postgres_bin("initdb").expect("initdb");
    let postgres = postgres_bin("postgres").expect("postgres");
    let (uid, gid) = user_ids("postgres");
    let data = dir.join("pg");
    std::fs::create_dir_all(&data).expect("pg dir");
    // initdb refuses root: the data directory belongs to the postgres user, which runs both.
    std::os::unix::fs::chown(dir, Some(uid), Some(gid)).expect("chown");
    std::os::unix::fs::chown(&data, Some(uid), Some(gid)).expect("chown");
    let output = Command::new(&initdb)
        .args([
            "-D",
            &data.display().to_string(),
            "-A",
            "trust",
            "-U",
            "postgres",
        ])
        .uid(uid)
        .gid(gid)
        .output()
        .expect("initdb");
    assert!(output.status.success(), "initdb: {}", text(&output));
    let port = free_port();
    let started = start_server(
        "postgres",
        Command::new(&postgres)
            .args([
                "-D",
                &data.display().to_string(),
                "-p",
                &port.to_string(),
                "-k",
                &dir.display().to_string(),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                "ssl=off",
            ])
            .uid(uid)
            .gid(gid),
        &[port],
        Duration::from_secs(20),
    );
    (started, port)
}

fn start_redis(redis_server: &Path) -> (Started, u16) {
    let port = free_port();
    let started = start_server(
        "redis-server",
        Command::new(redis_server).args([
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ]),
        &[port],
        Duration::from_secs(10),
    );
    (started, port)
}

fn start_mariadb(mariadbd: &Path, dir: &Path) -> (Started, u16) {
    let data = dir.join("mariadb");
    std::fs::create_dir_all(&data).expect("mariadb dir");
    let install = Command::new("mariadb-install-db")
        .args([
            "--no-defaults",
            &format!("--datadir={}", data.display()),
            "--user=root",
            "--auth-root-authentication-method=normal",
            "--skip-test-db",
        ])
        .output()
        .expect("mariadb-install-db");
    assert!(
        install.status.success(),
        "mariadb-install-db: {}",
        text(&install)
    );
    let port = free_port();
    let started = start_server(
        "mariadbd",
        Command::new(mariadbd).args([
            "--no-defaults",
            &format!("--datadir={}", data.display()),
            "--user=root",
            &format!("--port={port}"),
            "--bind-address=127.0.0.1",
            &format!("--socket={}", dir.join("mariadb.sock").display()),
            &format!("--pid-file={}", dir.join("mariadb.pid").display()),
            "--skip-grant-tables",
            "--skip-log-bin",
        ]),
        &[port],
        Duration::from_secs(30),
    );
    (started, port)
}

/// nginx with an HTTP server and, through Debian's module, an RTMP application that records
/// what is pushed to it.
fn start_nginx(nginx: &Path, rtmp_module: &Path, dir: &Path) -> (Started, u16, u16) {
    let (http, rtmp) = (free_port(), free_port());
    let records = dir.join("records");
    std::fs::create_dir_all(&records).expect("records dir");
    let conf = dir.join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "load_module {module};\ndaemon off;\nmaster_process off;\nworker_processes 1;\n\
             pid {d}/nginx.pid;\nerror_log {d}/nginx-error.log;\nevents {{ worker_connections 64; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {d};\n  proxy_temp_path {d};\n\
               fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n\
               server {{ listen 127.0.0.1:{http}; location / {{ return 200 \"nginx page\\n\"; }} }}\n}}\n\
             rtmp {{\n  server {{\n    listen 127.0.0.1:{rtmp};\n    application live {{\n\
                   live on;\n      record all;\n      record_path {records};\n    }}\n  }}\n}}\n",
            module = rtmp_module.display(),
            d = dir.display(),
            records = records.display(),
        ),
    )
    .expect("nginx.conf");
    let started = start_server(
        "nginx",
        Command::new(nginx).args([
            "-p",
            &dir.display().to_string(),
            "-c",
            &conf.display().to_string(),
        ]),
        &[http, rtmp],
        Duration::from_secs(10),
    );
    (started, http, rtmp)
}

/// An `openssl s_server` with a self-signed certificate for `name`.
fn start_tls_server(openssl: &Path, dir: &Path, name: &str) -> (Started, u16) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    let made = run(
        openssl,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &key.display().to_string(),
            "-out",
            &cert.display().to_string(),
        ],
    );
    assert!(made.status.success(), "openssl req: {}", text(&made));
    let port = free_port();
    let started = start_server(
        "openssl s_server",
        Command::new(openssl).args([
            "s_server",
            "-accept",
            &format!("127.0.0.1:{port}"),
            "-cert",
            &cert.display().to_string(),
            "-key",
            &key.display().to_string(),
            "-www",
            "-quiet",
        ]),
        &[port],
        Duration::from_secs(10),
    );
    (started, port)
}

#[test]
fn one_port_in_front_of_postgres_redis_mariadb_nginx_tls_and_rtmp() {
    let _serial = serial();
    let tools = (
        tool("psql", "postgresql-client"),
        tool("redis-cli", "redis-tools"),
        tool("redis-server", "redis-server"),
        tool("mariadb", "mariadb-client"),
        tool("mariadbd", "mariadb-server"),
        tool("curl", "curl"),
        tool("openssl", "openssl"),
        tool("nginx", "nginx"),
        tool("ffmpeg", "ffmpeg"),
    );
    let (
        Some(psql),
        Some(redis_cli),
        Some(redis_server),
        Some(mariadb),
        Some(mariadbd),
        Some(curl),
        Some(openssl),
        Some(nginx),
        Some(ffmpeg),
    ) = tools
    else {
        return;
    };
    let (Some(_), Some(rtmp_module)) = (
        installed(postgres_bin("postgres"), "PostgreSQL server", "postgresql"),
        installed(
            Some(PathBuf::from("/usr/lib/nginx/modules/ngx_rtmp_module.so"))
                .filter(|path| path.is_file()),
            "nginx's RTMP module",
            "libnginx-mod-rtmp",
        ),
    ) else {
        return;
    };
    let scratch = tempfile::tempdir().expect("scratch dir");
    let dir = scratch.path();
    let (_postgres, pg_port) = start_postgres(dir);
    let (_redis, redis_port) = start_redis(&redis_server);
    let (_mariadb, mariadb_port) = start_mariadb(&mariadbd, dir);
    let (_nginx, http_port, rtmp_port) = start_nginx(&nginx, &rtmp_module, dir);
    let (_tls_a, tls_a_port) = start_tls_server(&openssl, dir, "a.example.test");
    let (_tls_b, tls_b_port) = start_tls_server(&openssl, dir, "b.example.test");

    let pool = |name: &str, port: u16| {
        format!("\n[[pool]]\nname = \"{name}\"\nservers = [ {{ addr = \"127.0.0.1:{port}\" }} ]\n")
    };
    let config = format!(
        "[runtime]\nshards = 2\ndrain_timeout = \"1s\"\n\n[admin]\nbind = \"127.0.0.1:0\"\n\n\
         [[listener]]\nname = \"edge\"\nbind = \"127.0.0.1:0\"\npool = \"web\"\n\
         routes = [\n\
           {{ protocol = \"postgres\", pool = \"pg\" }},\n\
           {{ protocol = \"redis\", pool = \"cache\" }},\n\
           {{ protocol = \"mysql\", pool = \"mysql\" }},\n\
           {{ protocol = \"rtmp\", pool = \"rtmp\" }},\n\
           {{ sni = \"a.example.test\", pool = \"tls-a\" }},\n\
           {{ sni = \"*.example.test\", pool = \"tls-b\" }},\n\
         ]\n{}{}{}{}{}{}{}",
        pool("web", http_port),
        pool("pg", pg_port),
        pool("cache", redis_port),
        pool("mysql", mariadb_port),
        pool("rtmp", rtmp_port),
        pool("tls-a", tls_a_port),
        pool("tls-b", tls_b_port),
    );
    let proxy = Proxy::start(&config);
    let port = proxy.listeners["edge"].port().to_string();

    // PostgreSQL: SSLRequest first (sslmode=prefer), refused by the server, then the query.
    let output = run(
        &psql,
        &[
            &format!("host=127.0.0.1 port={port} user=postgres dbname=postgres sslmode=prefer"),
            "-tA",
            "-c",
            "select 40 + 2",
        ],
    );
    assert_eq!(text(&output).trim(), "42", "psql through the proxy");

    // Redis: a write, then a read of it.
    let output = run(
        &redis_cli,
        &["-h", "127.0.0.1", "-p", &port, "SET", "k", "v1"],
    );
    assert_eq!(text(&output).trim(), "OK");
    let output = run(&redis_cli, &["-h", "127.0.0.1", "-p", &port, "GET", "k"]);
    assert_eq!(text(&output).trim(), "v1");

    // MariaDB: the client waits for the server's greeting, so it is routed by its silence.
    let output = run(
        &mariadb,
        &[
            "-h",
            "127.0.0.1",
            "-P",
            &port,
            "-u",
            "root",
            "--skip-ssl",
            "--connect-timeout=5",
            "-N",
            "-e",
            "select 6 * 7",
        ],
    );
    assert_eq!(text(&output).trim(), "42", "mariadb through the proxy");

    // HTTP: anything unmatched goes to the default pool, nginx.
    let output = run(
        &curl,
        &["-s", "-m", "5", &format!("http://127.0.0.1:{port}/")],
    );
    assert_eq!(text(&output), "nginx page\n");

    // TLS passthrough by SNI: each name sees its own server's certificate.
    for (name, expected) in [
        ("a.example.test", "a.example.test"),
        ("x.example.test", "b.example.test"),
    ] {
        let output = run(
            &openssl,
            &[
                "s_client",
                "-connect",
                &format!("127.0.0.1:{port}"),
                "-servername",
                name,
            ],
        );
        let shown = text(&output);
        let subject = shown
            .lines()
            .find(|line| line.starts_with("subject="))
            .unwrap_or_default();
        assert!(
            subject.contains(expected),
            "{name}: expected the certificate of {expected}, got {subject:?}"
        );
    }

    // RTMP: ffmpeg pushes a 3 s stream; nginx-rtmp records it.
    let output = run(
        &ffmpeg,
        &[
            "-hide_banner",
            "-loglevel",
            "error",
            "-re",
            "-f",
            "lavfi",
            "-i",
            "testsrc=size=160x120:rate=10",
            "-t",
            "3",
            "-c:v",
            "flv1",
            "-f",
            "flv",
            &format!("rtmp://127.0.0.1:{port}/live/stream"),
        ],
    );
    assert!(output.status.success(), "ffmpeg: {}", text(&output));
    let recorded = dir.join("records").join("stream.flv");
    assert!(
        wait_for(Duration::from_secs(5), || {
            std::fs::metadata(&recorded).is_ok_and(|meta| meta.len() > 10_000)
        }),
        "nginx-rtmp recorded {:?} bytes",
        std::fs::metadata(&recorded).map(|meta| meta.len())
    );

    // Each client was detected as what it is (no route asks for HTTP, so curl is "unknown"),
    // and each route sent exactly its clients.
    let sample = |metrics: &str, series: &str| {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(series))
            .and_then(|value| value.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let expected: Vec<(String, f64)> = [
        ("postgres", 1.0),
        ("redis", 2.0),
        ("silence", 1.0),
        ("unknown", 1.0),
        ("tls", 2.0),
        ("rtmp", 1.0),
    ]
    .iter()
    .map(|(protocol, count)| {
        (
            format!("ringproxy_listener_detected_total{{listener=\"edge\",protocol=\"{protocol}\"}} "),
            *count,
        )
    })
    .chain(
        [("1", "pg", 1.0), ("2", "cache", 2.0), ("3", "mysql", 1.0), ("4", "rtmp", 1.0),
         ("5", "tls-a", 1.0), ("6", "tls-b", 1.0), ("default", "web", 1.0)]
            .iter()
            .map(|(route, pool, count)| {
                (
                    format!(
                        "ringproxy_listener_routed_total{{listener=\"edge\",route=\"{route}\",to=\"pool:{pool}\"}} "
                    ),
                    *count,
                )
            }),
    )
    .collect();
    let counted = wait_for(Duration::from_secs(5), || {
        let metrics = admin::get(proxy.admin(), "/metrics").body;
        expected
            .iter()
            .all(|(series, count)| sample(&metrics, series) == *count)
    });
    assert!(counted, "{}", admin::get(proxy.admin(), "/metrics").body);
}
