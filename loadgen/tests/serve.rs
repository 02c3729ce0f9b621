//! `ringload serve` over real loopback sockets.

use std::io::{ErrorKind, Read, Write};
use std::net::Shutdown;
use std::process::Command;
use std::thread;
use std::time::Duration;

mod common;

use common::{BIN, Server};

#[test]
fn echo_returns_every_byte_then_fin() {
    let server = Server::start("echo", &["--threads", "2"]);
    let mut stream = server.connect();
    let payload: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    let mut writer = stream.try_clone().expect("clone");
    let sent = payload.clone();
    let write = thread::spawn(move || {
        writer.write_all(&sent).expect("write");
        writer.shutdown(Shutdown::Write).expect("fin");
    });
    let mut received = Vec::new();
    stream.read_to_end(&mut received).expect("echo then FIN");
    write.join().expect("writer");
    assert!(
        received == payload,
        "echo differs ({} of {} bytes)",
        received.len(),
        payload.len()
    );
    let summary = server.stop();
    assert!(
        summary.contains("accepted 1 connections, received 3000000 bytes, sent 3000000 bytes"),
        "{summary}"
    );
}

fn expected_response(body: &str) -> String {
    format!(
        "HTTP/1.1 200 OK\r\nServer: ringload\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

fn expected_closing_response(body: &str) -> String {
    expected_response(body).replace("\r\n\r\n", "\r\nConnection: close\r\n\r\n")
}

#[test]
fn http_answers_pipelined_requests_and_honours_connection_close() {
    let server = Server::start("http", &["--threads", "2"]);
    let mut stream = server.connect();
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
        .expect("write");
    let one = expected_response("ok\n");
    let mut two = vec![0u8; one.len() * 2];
    stream.read_exact(&mut two).expect("two responses");
    assert_eq!(String::from_utf8_lossy(&two), one.repeat(2));
    stream
        .write_all(b"GET /c HTTP/1.1\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut rest = String::new();
    stream.read_to_string(&mut rest).expect("response then FIN");
    assert_eq!(rest, expected_closing_response("ok\n"));

    let server = Server::start("http", &["--threads", "2", "--body-size", "1000"]);
    let mut stream = server.connect();
    stream
        .write_all(b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n")
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read");
    assert_eq!(response, expected_closing_response(&"x".repeat(1000)));
}

#[test]
fn discard_reads_everything_and_closes_after_fin() {
    let server = Server::start("discard", &["--threads", "2"]);
    let mut stream = server.connect();
    stream.write_all(&vec![1u8; 2_000_000]).expect("write");
    stream.shutdown(Shutdown::Write).expect("fin");
    let mut buffer = [0u8; 16];
    assert_eq!(stream.read(&mut buffer).expect("FIN back"), 0);
    let summary = server.stop();
    assert!(
        summary.contains("received 2000000 bytes, sent 0 bytes"),
        "{summary}"
    );
}

#[test]
fn sink_never_reads() {
    let server = Server::start("sink", &["--threads", "2"]);
    let mut stream = server.connect();
    stream
        .set_write_timeout(Some(Duration::from_millis(300)))
        .expect("timeout");
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0usize;
    let error = loop {
        match stream.write(&chunk) {
            Ok(n) => written += n,
            Err(error) => break error,
        }
        assert!(written < 256 << 20, "the sink is reading");
    };
    assert!(
        matches!(error.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut),
        "{error}"
    );
    let summary = server.stop();
    assert!(
        summary.contains("accepted 1 connections, received 0 bytes"),
        "{summary}"
    );
}

#[test]
fn bad_flags_and_remote_targets_exit_2() {
    for args in [
        vec!["serve", "--mode", "nope", "--listen", "127.0.0.1:0"],
        vec!["serve", "--mode", "echo"],
        vec!["serve", "--mode", "echo", "--listen", "not-an-address"],
        vec![
            "serve",
            "--mode",
            "echo",
            "--listen",
            "127.0.0.1:0",
            "--duration",
            "forever",
        ],
        vec!["serve", "--mode", "echo", "--listen", "10.1.2.3:80"],
        vec!["bogus"],
    ] {
        let output = Command::new(BIN).args(&args).output().expect("run");
        assert_eq!(output.status.code(), Some(2), "{args:?}: {output:?}");
        assert!(
            !output.stderr.is_empty(),
            "{args:?}: an explanation on stderr"
        );
    }
    let remote = Command::new(BIN)
        .args(["serve", "--mode", "echo", "--listen", "10.1.2.3:80"])
        .output()
        .expect("run");
    assert!(String::from_utf8_lossy(&remote.stderr).contains("not a loopback address"));
}
