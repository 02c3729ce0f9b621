//! The command line: `check` on good and bad configs, `--version`, the embedded default, and
//! every shipped config and tuning profile.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::BIN;

fn check(text: &str) -> (Output, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, text).expect("write");
    let output = Command::new(BIN)
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .expect("run check");
    (output, path.display().to_string())
}

const GOOD: &str = r#"[runtime]
shards = 2
drain_timeout = "10s"

[[listener]]
name = "front"
bind = "127.0.0.1:8080"
pool = "app"

[[pool]]
name = "app"
balance = "weighted"
servers = [
  { addr = "127.0.0.1:9001", weight = 3 },
  { addr = "127.0.0.1:9002", backup = true },
]
"#;

#[test]
fn check_prints_the_resolved_config() {
    let (output, _) = check(GOOD);
    assert!(output.status.success(), "{output:?}");
    let printed = String::from_utf8_lossy(&output.stdout);
    for expected in [
        "shards = 2",
        "drain_timeout = \"10s\"",
        "max_connections = 100000",
        "idle_timeout = \"10m\"",
        "connect_timeout = \"1s\"",
        "retries = 2",
        "{ addr = \"127.0.0.1:9001\", weight = 3, backup = false }",
        "{ addr = \"127.0.0.1:9002\", weight = 1, backup = true }",
    ] {
        assert!(
            printed.contains(expected),
            "missing {expected:?} in:\n{printed}"
        );
    }
}

/// Each bad config: (what is wrong, the text, expected line, expected column, words in message).
const BAD: &[(&str, &str, usize, usize, &str)] = &[
    (
        "unknown top-level key",
        "[runtime]\nshard = 2\n",
        2,
        1,
        "unknown field `shard`",
    ),
    (
        "unknown listener key",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\nmaxconn = 5\n",
        5,
        1,
        "unknown field `maxconn`",
    ),
    ("syntax error", "[runtime\nshards = 2\n", 1, 9, ""),
    (
        "bad duration",
        "[runtime]\ndrain_timeout = \"30 seconds\"\n",
        2,
        17,
        "invalid duration",
    ),
    (
        "duration without unit",
        "[runtime]\ndrain_timeout = \"30\"\n",
        2,
        17,
        "missing unit",
    ),
    (
        "zero shards",
        "[runtime]\nshards = 0\n",
        2,
        10,
        "shards must be",
    ),
    (
        "shards word",
        "[runtime]\nshards = \"many\"\n",
        2,
        10,
        "shards must be",
    ),
    (
        "no listener",
        "[runtime]\nshards = 1\n",
        1,
        1,
        "at least one listener",
    ),
    (
        "bad bind address",
        "[[listener]]\nname = \"a\"\nbind = \"localhost:80\"\npool = \"p\"\n[[pool]]\nname = \"p\"\nservers = [{ addr = \"127.0.0.1:9\" }]\n",
        3,
        8,
        "invalid address",
    ),
    (
        "dangling pool",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\npool = \"nope\"\n[[pool]]\nname = \"p\"\nservers = [{ addr = \"127.0.0.1:9\" }]\n",
        4,
        8,
        "not defined",
    ),
    (
        "duplicate listener",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:2\"\npool = \"p\"\n[[pool]]\nname = \"p\"\nservers = [{ addr = \"127.0.0.1:9\" }]\n",
        6,
        8,
        "duplicate listener name",
    ),
    (
        "duplicate pool",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[[pool]]\nname = \"p\"\nservers = [{ addr = \"127.0.0.1:9\" }]\n[[pool]]\nname = \"p\"\nservers = [{ addr = \"127.0.0.1:8\" }]\n",
        9,
        8,
        "duplicate pool name",
    ),
    (
        "empty pool",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[[pool]]\nname = \"p\"\nservers = []\n",
        7,
        11,
        "has no servers",
    ),
    (
        "zero weight",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[[pool]]\nname = \"p\"\nservers = [{ addr = \"127.0.0.1:9\", weight = 0 }]\n",
        7,
        45,
        "weight must be",
    ),
    (
        "unknown balance",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[[pool]]\nname = \"p\"\nbalance = \"random\"\nservers = [{ addr = \"127.0.0.1:9\" }]\n",
        7,
        11,
        "unknown balance",
    ),
    (
        "bad server address",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[[pool]]\nname = \"p\"\nservers = [{ addr = \"127.0.0.1\" }]\n",
        7,
        21,
        "invalid address",
    ),
    (
        "only backups",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[[pool]]\nname = \"p\"\nservers = [{ addr = \"127.0.0.1:9\", backup = true }]\n",
        7,
        11,
        "only backup servers",
    ),
    (
        "zero max_connections",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\nmax_connections = 0\n[[pool]]\nname = \"p\"\nservers = [{ addr = \"127.0.0.1:9\" }]\n",
        5,
        19,
        "max_connections must be",
    ),
    (
        "duplicate server",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[[pool]]\nname = \"p\"\nservers = [{ addr = \"127.0.0.1:9\" }, { addr = \"127.0.0.1:9\" }]\n",
        7,
        47,
        "appears twice",
    ),
    (
        "negative retries",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[[pool]]\nname = \"p\"\nretries = -1\nservers = [{ addr = \"127.0.0.1:9\" }]\n",
        7,
        11,
        "retries must be",
    ),
    (
        "zero connect timeout",
        "[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[[pool]]\nname = \"p\"\nconnect_timeout = \"0s\"\nservers = [{ addr = \"127.0.0.1:9\" }]\n",
        7,
        19,
        "greater than zero",
    ),
    (
        "wrong type",
        "[[listener]]\nname = \"a\"\nbind = 8080\npool = \"p\"\n",
        3,
        8,
        "invalid type",
    ),
    (
        "tuning not a power of two",
        "[tuning]\nbuffer_count = 1000\n[[listener]]\nname = \"a\"\nbind = \"127.0.0.1:1\"\npool = \"p\"\n[[pool]]\nname = \"p\"\nservers = [{ addr = \"127.0.0.1:9\" }]\n",
        2,
        16,
        "power of two",
    ),
];

#[test]
fn every_bad_config_is_located_and_exits_2() {
    assert!(BAD.len() >= 12);
    for &(what, text, line, column, words) in BAD {
        let (output, path) = check(text);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{what}: {stderr}");
        let prefix = format!("{path}:{line}:{column}: ");
        assert!(
            stderr.starts_with(&prefix),
            "{what}: expected {prefix:?}, got {stderr:?}"
        );
        assert!(
            stderr.contains(words),
            "{what}: expected {words:?} in {stderr:?}"
        );
        assert!(!stderr.contains("panicked"), "{what}: {stderr}");
        assert!(output.stdout.is_empty(), "{what}: nothing on stdout");
    }
}

#[test]
fn bad_config_makes_run_exit_2_too() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[runtime]\nshards = 0\n").expect("write");
    let output = Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .expect("run");
    assert_eq!(output.status.code(), Some(2));
    let missing = Command::new(BIN)
        .args(["check", "--config", "/nonexistent/ringproxy.toml"])
        .output()
        .expect("run");
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read file"));
}

#[test]
fn version_and_default_config() {
    let version = Command::new(BIN).arg("--version").output().expect("run");
    assert!(version.status.success());
    assert_eq!(
        String::from_utf8_lossy(&version.stdout).trim(),
        format!("ringproxy {}", env!("CARGO_PKG_VERSION"))
    );
    let default = Command::new(BIN)
        .args(["check", "--default"])
        .output()
        .expect("run");
    assert!(default.status.success());
    assert_eq!(
        String::from_utf8_lossy(&default.stdout),
        ringproxy::config::DEFAULT_CONFIG
    );
}

fn files_in(dir: &Path, extension: &str) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .map(|entries| entries.filter_map(Result::ok).map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|path| path.extension().is_some_and(|e| e == extension));
    files.sort();
    files
}

#[test]
fn every_shipped_config_and_tuning_profile_checks() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let examples = files_in(&root.join("systemd"), "toml");
    let profiles = files_in(&root.join("tuning"), "toml");
    assert!(!examples.is_empty() && !profiles.is_empty());
    for example in &examples {
        for profile in std::iter::once(None).chain(profiles.iter().map(Some)) {
            let mut command = Command::new(BIN);
            command.args(["check", "--config"]).arg(example);
            if let Some(profile) = profile {
                command.arg("--profile").arg(profile);
            }
            let output = command.output().expect("run");
            assert!(
                output.status.success(),
                "{} with {profile:?}: {}",
                example.display(),
                String::from_utf8_lossy(&output.stderr)
            );
        }
    }
}

#[test]
fn demo_relays_and_verifies_every_byte() {
    let output = Command::new(BIN)
        .args([
            "demo",
            "--connections",
            "16",
            "--requests",
            "50",
            "--max-size",
            "100000",
        ])
        .output()
        .expect("run demo");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("requests           800 "), "{stdout}");
    assert!(stdout.contains("failed clients     0"), "{stdout}");
    assert!(
        stdout.contains("OK: every byte came back as sent"),
        "{stdout}"
    );
    assert_eq!(
        stdout.matches(" connections\n").count(),
        2,
        "both servers listed: {stdout}"
    );
}
