//! The admin API on a real socket: drain, maint, enable, weights, adding and deleting servers
//! (kept across a reload and a restart with a state file), authentication, `ringproxy ctl`,
//! and 10,000 malformed requests that leave it serving.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

use common::admin::{self, http, server_in, server_state};
use common::*;

const TOKEN: &str = "test-token-0123456789";

fn admin_config(servers: &[(SocketAddr, &str)], admin_extra: &str) -> String {
    let servers: Vec<String> = servers
        .iter()
        .map(|(addr, name)| format!("  {{ addr = \"{addr}\", name = \"{name}\" }}"))
        .collect();
    format!(
        "[runtime]\nshards = 2\ndrain_timeout = \"2s\"\n\n\
         [admin]\nbind = \"127.0.0.1:0\"\n{admin_extra}\n\n\
         [[listener]]\nname = \"front\"\nbind = \"127.0.0.1:0\"\npool = \"app\"\n\n\
         [[pool]]\nname = \"app\"\nservers = [\n{}\n]\n",
        servers.join(",\n")
    )
}

fn with_token() -> Launch {
    Launch {
        env: vec![("RINGPROXY_ADMIN_TOKEN".into(), TOKEN.into())],
        ..Launch::default()
    }
}

/// One connection through the proxy: the server's tag.
fn tag_of_new_connection(addr: SocketAddr) -> (TcpStream, u8) {
    let mut stream = connect(addr);
    let mut tag = [0u8; 2];
    stream.read_exact(&mut tag).expect("tag");
    (stream, tag[0])
}

fn tags(addr: SocketAddr, count: usize) -> Vec<u8> {
    (0..count).map(|_| tag_of_new_connection(addr).1).collect()
}

fn still_echoes(stream: &mut TcpStream) -> bool {
    stream.write_all(b"ping").is_ok() && {
        let mut answer = [0u8; 4];
        stream.read_exact(&mut answer).is_ok() && &answer == b"ping"
    }
}

fn post(admin: SocketAddr, path: &str) -> admin::Response {
    http(admin, "POST", path, Some(TOKEN), None)
}

#[test]
fn drain_maint_enable_weight_add_and_delete_take_effect_on_every_shard() {
    let a = TestServer::start(Behaviour::Tagged(b'a'));
    let b = TestServer::start(Behaviour::Tagged(b'b'));
    let c = TestServer::start(Behaviour::Tagged(b'c'));
    let proxy = Proxy::launch(
        &admin_config(&[(a.addr, "a"), (b.addr, "b")], ""),
        with_token(),
    );
    let admin = proxy.admin();
    let addr = proxy.addr();

    // A live session on a, kept open across the drain.
    let (mut on_a, _) = std::iter::repeat_with(|| tag_of_new_connection(addr))
        .find(|(_, tag)| *tag == b'a')
        .expect("a session on a");
    let drained = post(admin, "/pools/app/servers/a/drain");
    assert_eq!(drained.status, 200, "{}", drained.body);
    assert_eq!(drained.json()["state"], "draining");
    assert_eq!(drained.json()["name"], "a");
    // Within 100 ms on every shard: no new session goes to a.
    thread::sleep(Duration::from_millis(100));
    assert!(
        tags(addr, 20).iter().all(|&tag| tag == b'b'),
        "a is drained"
    );
    assert!(
        still_echoes(&mut on_a),
        "the live session on a finishes normally"
    );

    assert_eq!(
        post(admin, "/pools/app/servers/a/maint").json()["state"],
        "maint"
    );
    thread::sleep(Duration::from_millis(100));
    assert!(
        tags(addr, 10).iter().all(|&tag| tag == b'b'),
        "a is in maintenance"
    );
    assert_eq!(
        post(admin, "/pools/app/servers/a/enable").json()["state"],
        "up"
    );
    thread::sleep(Duration::from_millis(100));
    assert!(tags(addr, 20).contains(&b'a'), "a takes sessions again");

    // Weight: 3 to 1 with the weighted algorithm is not available here (round robin), but the
    // weight is what the snapshot and /status carry.
    let weighted = http(
        admin,
        "PUT",
        "/pools/app/servers/b/weight",
        Some(TOKEN),
        Some(r#"{"weight": 7}"#),
    );
    assert_eq!(weighted.status, 200, "{}", weighted.body);
    assert_eq!(weighted.json()["weight"], 7);

    // Register c: it gets traffic.
    let added = http(
        admin,
        "POST",
        "/pools/app/servers",
        Some(TOKEN),
        Some(&format!(
            r#"{{"addr": "{}", "name": "c", "weight": 1}}"#,
            c.addr
        )),
    );
    assert_eq!(added.status, 201, "{}", added.body);
    thread::sleep(Duration::from_millis(100));
    let (mut on_c, _) = std::iter::repeat_with(|| tag_of_new_connection(addr))
        .take(30)
        .find(|(_, tag)| *tag == b'c')
        .expect("the added server takes sessions");
    // Adding it twice is a conflict.
    let again = http(
        admin,
        "POST",
        "/pools/app/servers",
        Some(TOKEN),
        Some(&format!(r#"{{"addr": "{}"}}"#, c.addr)),
    );
    assert_eq!(again.status, 409, "{}", again.body);

    // Delete c while a session is on it: removing, no new sessions, the live one finishes,
    // then c is gone.
    let deleted = http(admin, "DELETE", "/pools/app/servers/c", Some(TOKEN), None);
    assert_eq!(deleted.status, 200, "{}", deleted.body);
    assert_eq!(deleted.json()["state"], "removing");
    thread::sleep(Duration::from_millis(100));
    assert!(
        !tags(addr, 20).contains(&b'c'),
        "no new session on a removed server"
    );
    assert!(still_echoes(&mut on_c));
    assert_eq!(server_state(admin, "app", "c"), "removing");
    drop(on_c);
    assert!(
        wait_for(Duration::from_secs(5), || server_state(admin, "app", "c")
            == "gone"),
        "c disappears once its last session ended: {}",
        admin::status(admin)
    );

    // Cutting a server's sessions.
    let (mut on_b, _) = std::iter::repeat_with(|| tag_of_new_connection(addr))
        .find(|(_, tag)| *tag == b'b')
        .expect("a session on b");
    assert_eq!(
        post(admin, "/pools/app/servers/b/shutdown-sessions").status,
        200
    );
    on_b.set_read_timeout(Some(Duration::from_secs(2)))
        .expect("timeout");
    let mut byte = [0u8; 1];
    assert!(
        !matches!(on_b.read(&mut byte), Ok(n) if n > 0),
        "the session on b was cut"
    );
    assert!(
        still_echoes(&mut on_a),
        "sessions on other servers carry on"
    );
}

#[test]
fn overrides_survive_a_reload_and_a_restart_with_the_state_file() {
    let a = TestServer::start(Behaviour::Tagged(b'a'));
    let b = TestServer::start(Behaviour::Tagged(b'b'));
    let d = TestServer::start(Behaviour::Tagged(b'd'));
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state.json");
    let config_path = dir.path().join("ringproxy.toml");
    let config = admin_config(
        &[(a.addr, "a"), (b.addr, "b")],
        &format!("state_file = \"{}\"", state.display()),
    );
    let launch = Launch {
        config_path: Some(config_path.clone()),
        ..with_token()
    };
    let mut proxy = Proxy::launch(&config, launch.clone());
    let admin = proxy.admin();
    assert_eq!(post(admin, "/pools/app/servers/b/drain").status, 200);
    let added = http(
        admin,
        "POST",
        "/pools/app/servers",
        Some(TOKEN),
        Some(&format!(r#"{{"addr": "{}", "name": "d"}}"#, d.addr)),
    );
    assert_eq!(added.status, 201, "{}", added.body);
    let saved = std::fs::read_to_string(&state).expect("state file written");
    assert!(
        saved.contains("drain") && saved.contains(&d.addr.to_string()),
        "{saved}"
    );

    // Reload with the same file: the overrides stay.
    let reloaded = post(admin, "/reload");
    assert_eq!(reloaded.status, 200, "{}", reloaded.body);
    assert_eq!(server_state(admin, "app", "b"), "draining");
    assert_eq!(server_state(admin, "app", "d"), "up");

    // Restart: a new process on the same files.
    proxy.signal(libc::SIGTERM);
    assert!(
        proxy
            .wait_exit(Duration::from_secs(10))
            .is_some_and(|s| s.success())
    );
    drop(proxy);
    let proxy = Proxy::launch(&config, launch);
    let admin = proxy.admin();
    assert_eq!(
        server_state(admin, "app", "b"),
        "draining",
        "{}",
        admin::status(admin)
    );
    assert_eq!(server_state(admin, "app", "d"), "up");
    let seen = tags(proxy.addr(), 20);
    assert!(seen.contains(&b'd') && !seen.contains(&b'b'), "{seen:?}");
}

#[test]
fn mutating_calls_need_the_token_and_reads_need_it_with_auth_reads() {
    let a = TestServer::start(Behaviour::Echo);
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("token");
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o600)).expect("chmod");
    let config = admin_config(
        &[(a.addr, "a")],
        &format!("token_file = \"{}\"", token_file.display()),
    );
    let proxy = Proxy::start(&config);
    let admin = proxy.admin();
    assert_eq!(
        admin::get(admin, "/status").status,
        200,
        "reads are open by default"
    );
    let missing = http(admin, "POST", "/pools/app/servers/a/drain", None, None);
    assert_eq!(missing.status, 401, "{}", missing.body);
    assert_eq!(
        missing.header("www-authenticate").as_deref(),
        Some("Bearer")
    );
    let wrong = http(
        admin,
        "POST",
        "/pools/app/servers/a/drain",
        Some("nope"),
        None,
    );
    assert_eq!(wrong.status, 401);
    let right = http(
        admin,
        "POST",
        "/pools/app/servers/a/drain",
        Some(TOKEN),
        None,
    );
    assert_eq!(right.status, 200, "{}", right.body);
    drop(proxy);

    // auth_reads: reads need the token too, probes stay open.
    let config = admin_config(
        &[(a.addr, "a")],
        &format!(
            "token_file = \"{}\"\nauth_reads = true",
            token_file.display()
        ),
    );
    let proxy = Proxy::start(&config);
    let admin = proxy.admin();
    assert_eq!(admin::get(admin, "/status").status, 401);
    assert_eq!(admin::get(admin, "/metrics").status, 401);
    assert_eq!(http(admin, "GET", "/status", Some(TOKEN), None).status, 200);
    assert_eq!(admin::get(admin, "/healthz").status, 200);
    assert_eq!(admin::get(admin, "/ready").status, 200);
    drop(proxy);

    // No token configured: changes are refused (403), reads work.
    let proxy = Proxy::start(&admin_config(&[(a.addr, "a")], ""));
    let admin = proxy.admin();
    let forbidden = http(admin, "POST", "/reload", Some(TOKEN), None);
    assert_eq!(forbidden.status, 403, "{}", forbidden.body);
    assert_eq!(admin::get(admin, "/status").status, 200);
    drop(proxy);

    // A token file others can read: the proxy refuses to start.
    std::fs::set_permissions(&token_file, std::fs::Permissions::from_mode(0o644)).expect("chmod");
    let error = Proxy::try_start(&config).err().expect("refused to start");
    assert!(error.contains("readable by group or others"), "{error}");
}

#[test]
fn ctl_wraps_the_api_with_tables_and_json() {
    let a = TestServer::start(Behaviour::Echo);
    let b = TestServer::start(Behaviour::Echo);
    let proxy = Proxy::launch(
        &admin_config(&[(a.addr, "a"), (b.addr, "b")], ""),
        with_token(),
    );
    let admin = proxy.admin().to_string();
    let ctl = |args: &[&str], token: bool| {
        let mut command = Command::new(BIN);
        command.args(["ctl", "--admin", &admin]).args(args);
        if token {
            command.env("RINGPROXY_ADMIN_TOKEN", TOKEN);
        } else {
            command.env_remove("RINGPROXY_ADMIN_TOKEN");
        }
        command.output().expect("ctl")
    };
    let status = ctl(&["status"], false);
    assert!(status.status.success());
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(
        text.contains("pool app (round_robin)") && text.contains(" a "),
        "{text}"
    );
    let drained = ctl(&["drain", "app", "a"], true);
    assert!(
        drained.status.success(),
        "{}",
        String::from_utf8_lossy(&drained.stderr)
    );
    assert!(String::from_utf8_lossy(&drained.stdout).contains("draining"));
    let refused = ctl(&["enable", "app", "a"], false);
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("401"));
    let unknown = ctl(&["drain", "app", "zzz"], true);
    assert_eq!(unknown.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("404"));
    let json = ctl(&["--json", "weight", "app", &b.addr.to_string(), "3"], true);
    assert!(
        json.status.success(),
        "{}",
        String::from_utf8_lossy(&json.stderr)
    );
    let value: serde_json::Value = serde_json::from_slice(&json.stdout).expect("json");
    assert_eq!(value["weight"], 3);
    let reload = ctl(&["reload"], true);
    assert!(String::from_utf8_lossy(&reload.stdout).contains("reload: success"));
    let unreachable = Command::new(BIN)
        .args(["ctl", "--admin", "127.0.0.1:1", "status"])
        .output()
        .expect("ctl");
    assert_eq!(unreachable.status.code(), Some(3));
}

/// A request with a JSON body and the token.
fn with_body(method: &str, path: &str, body: &str) -> Vec<u8> {
    format!(
        "{method} {path} HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// Random bytes, huge headers, bad JSON, bad addresses, unknown paths, wrong methods, slow
/// headers: every request gets an error (or a closed connection), none a panic, and the API
/// answers normally afterwards.
#[test]
fn ten_thousand_malformed_admin_requests_leave_it_serving() {
    let a = TestServer::start(Behaviour::Echo);
    let mut proxy = Proxy::launch(&admin_config(&[(a.addr, "a")], ""), with_token());
    let admin = proxy.admin();
    let huge_header = format!(
        "GET /status HTTP/1.1\r\nX-Big: {}\r\n\r\n",
        "x".repeat(200_000)
    );
    let big_body = format!(
        "POST /pools/app/servers HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 100000\r\n\r\n{}",
        "{".repeat(100_000)
    );
    let fixed: Vec<Vec<u8>> = vec![
        huge_header.into_bytes(),
        big_body.into_bytes(),
        b"\x00\x01\x02\x03\r\n\r\n".to_vec(),
        b"GET /status HTTP/9.9\r\n\r\n".to_vec(),
        b"BREW /coffee HTTP/1.1\r\n\r\n".to_vec(),
        with_body("POST", "/pools/app/servers", r#"{"addr":}"#),
        with_body("POST", "/pools/app/servers", r#"{"addr":"nowhere:x"}"#),
        with_body("POST", "/pools/app/servers", r#"{"addr":"[::1]:99999"}"#),
        with_body("PUT", "/pools/app/servers/a/weight", r#"{"weight":-5}"#),
        with_body("PUT", "/pools/app/servers/a/weight", r#"{"weight":1e400}"#),
        with_body("POST", "/pools/nope/servers", r#"{"addr":"127.0.0.1:1"}"#),
        format!(
            "POST /pools/%FF%FE/servers/a/drain HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\n\r\n"
        )
        .into_bytes(),
        b"DELETE /status HTTP/1.1\r\n\r\n".to_vec(),
        b"GET /pools/app/servers/a/explode HTTP/1.1\r\n\r\n".to_vec(),
    ];
    let mut statuses = std::collections::BTreeMap::new();
    let begun = Instant::now();
    let workers: Vec<_> = (0..4u64)
        .map(|worker| {
            let fixed = fixed.clone();
            thread::spawn(move || {
                let mut seen = std::collections::BTreeMap::<u16, u64>::new();
                let mut state = 0x9e37_79b9_7f4a_7c15u64 ^ worker;
                for index in 0..2_500u64 {
                    let request = if index % 3 == 0 {
                        fixed[(index / 3) as usize % fixed.len()].clone()
                    } else {
                        // Random bytes, sometimes after a plausible request line.
                        let mut bytes = if index % 2 == 0 {
                            b"POST /pools/app/servers HTTP/1.1\r\n".to_vec()
                        } else {
                            Vec::new()
                        };
                        let mut next = || {
                            state ^= state << 13;
                            state ^= state >> 7;
                            state ^= state << 17;
                            state
                        };
                        let length = 1 + next() % 300;
                        for _ in 0..length {
                            bytes.push(next() as u8);
                        }
                        bytes.extend_from_slice(b"\r\n\r\n");
                        bytes
                    };
                    let answer = admin::raw(admin, &request).unwrap_or_default();
                    let status = admin::parse(&answer).map_or(0, |response| response.status);
                    *seen.entry(status).or_default() += 1;
                }
                seen
            })
        })
        .collect();
    for worker in workers {
        for (status, count) in worker.join().expect("worker") {
            *statuses.entry(status).or_insert(0u64) += count;
        }
    }
    eprintln!(
        "10,000 malformed requests in {:?}: {statuses:?}",
        begun.elapsed()
    );
    assert!(
        !statuses.contains_key(&500),
        "no internal errors: {statuses:?}"
    );
    assert!(
        statuses
            .keys()
            .all(|&status| status == 0 || (400..500).contains(&status)),
        "only client errors or closed connections: {statuses:?}"
    );
    // A client that never finishes its headers is cut (slowloris).
    let mut slow = TcpStream::connect(admin).expect("connect");
    slow.write_all(b"GET /status HTTP/1.1\r\nX-Slow: ")
        .expect("partial head");
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let cut_after = Instant::now();
    let mut rest = Vec::new();
    let _ = slow.read_to_end(&mut rest);
    assert!(
        cut_after.elapsed() < Duration::from_secs(8),
        "a slow header is cut after the header timeout, not held: {:?}",
        cut_after.elapsed()
    );
    // A body that never comes: answered 408 after the body timeout.
    let begun = Instant::now();
    let late_body = admin::raw(
        admin,
        format!("PUT /pools/app/servers/a/weight HTTP/1.1\r\nAuthorization: Bearer {TOKEN}\r\nContent-Length: 50\r\n\r\n{{").as_bytes(),
    )
    .expect("request");
    assert_eq!(admin::parse(&late_body).map(|r| r.status), Some(408));
    assert!(
        begun.elapsed() < Duration::from_secs(8),
        "{:?}",
        begun.elapsed()
    );
    // Still serving, and the server list is untouched.
    assert!(!proxy.has_exited());
    assert_eq!(admin::get(admin, "/healthz").status, 200);
    let status = admin::status(admin);
    assert_eq!(
        status["pools"][0]["servers"].as_array().map(Vec::len),
        Some(1)
    );
    assert_eq!(server_in(&status, "app", "a").expect("a")["weight"], 1);
}

/// The admin socket does not use SO_REUSEPORT: a second instance on the same admin address
/// fails to start (where its listeners alone would have shared the traffic).
#[test]
fn a_second_instance_on_the_same_admin_address_fails_to_start() {
    let a = TestServer::start(Behaviour::Echo);
    let first = Proxy::start(&admin_config(&[(a.addr, "a")], ""));
    let taken = first.admin();
    // The admin section comes first: its bind is the first one.
    let second = admin_config(&[(a.addr, "a")], "").replacen(
        "bind = \"127.0.0.1:0\"",
        &format!("bind = \"{taken}\""),
        1,
    );
    assert!(second.contains(&taken.to_string()), "{second}");
    let error = Proxy::try_start(&second)
        .err()
        .expect("the second instance fails");
    assert!(
        error.contains("admin: cannot bind") && error.contains(&taken.to_string()),
        "{error}"
    );
    assert_eq!(
        admin::get(taken, "/healthz").status,
        200,
        "the first one serves on"
    );
}
