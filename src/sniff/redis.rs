//! Redis: a RESP2/RESP3 command (an array of bulk strings, `*N\r\n$`, as every client library
//! and `redis-cli` send) or an inline command (`PING\r\n`, as typed into telnet).

use super::{Facts, Protocol, Verdict};

/// Commands a client plausibly sends first inline; anything else inline is left unmatched
/// rather than guessed (a bare word and CRLF is too common in other text protocols).
const INLINE_FIRST: &[&[u8]] = &[
    b"PING",
    b"AUTH",
    b"HELLO",
    b"SELECT",
    b"INFO",
    b"CLIENT",
    b"QUIT",
    b"ECHO",
    b"GET",
    b"SET",
    b"KEYS",
    b"MONITOR",
    b"SUBSCRIBE",
    b"PSUBSCRIBE",
    b"COMMAND",
    b"DBSIZE",
    b"TYPE",
    b"EXISTS",
];

/// The longest element count worth reading before the first bulk string.
const MAX_COUNT_DIGITS: usize = 10;

pub fn sniff(bytes: &[u8]) -> Verdict {
    match bytes.first() {
        None => Verdict::NeedMore,
        Some(b'*') => array(&bytes[1..]),
        Some(_) => inline(bytes),
    }
}

/// `*<count>\r\n$`: a positive count, then the first bulk string's marker.
fn array(rest: &[u8]) -> Verdict {
    let digits = rest.iter().take_while(|byte| byte.is_ascii_digit()).count();
    if digits > MAX_COUNT_DIGITS {
        return Verdict::NoMatch;
    }
    let after = &rest[digits..];
    if after.is_empty() {
        return Verdict::NeedMore;
    }
    if digits == 0 || rest[..digits].iter().all(|&byte| byte == b'0') {
        return Verdict::NoMatch;
    }
    match after {
        [b'\r'] | [b'\r', b'\n'] => Verdict::NeedMore,
        [b'\r', b'\n', b'$', ..] => Verdict::Match(Protocol::Redis, Facts::default()),
        _ => Verdict::NoMatch,
    }
}

/// A known command word, in any case, then a space or CRLF.
fn inline(bytes: &[u8]) -> Verdict {
    let word_len = bytes
        .iter()
        .take_while(|byte| byte.is_ascii_alphabetic())
        .count();
    let word = &bytes[..word_len];
    let known = |command: &&[u8]| command.eq_ignore_ascii_case(word);
    let prefix_of_known = |command: &&[u8]| {
        command.len() >= word.len() && command[..word.len()].eq_ignore_ascii_case(word)
    };
    match bytes.get(word_len) {
        None if INLINE_FIRST.iter().any(prefix_of_known) => Verdict::NeedMore,
        Some(b' ' | b'\r') if INLINE_FIRST.iter().any(known) => {
            if bytes[word_len] == b'\r' && bytes.len() == word_len + 1 {
                Verdict::NeedMore
            } else if bytes[word_len] == b'\r' && bytes[word_len + 1] != b'\n' {
                Verdict::NoMatch
            } else if bytes[word_len] == b' ' {
                arguments(&bytes[word_len..])
            } else {
                Verdict::Match(Protocol::Redis, Facts::default())
            }
        }
        _ => Verdict::NoMatch,
    }
}

/// An inline command's arguments, to the end of the line: `GET / HTTP/1.1` is an HTTP request
/// line, not Redis's GET.
fn arguments(rest: &[u8]) -> Verdict {
    let Some(end) = rest.iter().position(|&byte| byte == b'\n') else {
        return Verdict::NeedMore;
    };
    let line = rest[..end].strip_suffix(b"\r").unwrap_or(&rest[..end]);
    let http = line.len() >= 9 && {
        let tail = &line[line.len() - 9..];
        tail.starts_with(b" HTTP/")
            && tail[6].is_ascii_digit()
            && tail[7] == b'.'
            && tail[8].is_ascii_digit()
    };
    if http {
        Verdict::NoMatch
    } else {
        Verdict::Match(Protocol::Redis, Facts::default())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_http_request_line_is_not_an_inline_get() {
        assert_eq!(
            sniff(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"),
            Verdict::NoMatch
        );
        assert_eq!(sniff(b"GET /index.html HTTP/1.0\n"), Verdict::NoMatch);
        assert_eq!(
            sniff(b"GET / HTTP/1.1"),
            Verdict::NeedMore,
            "the line is not over yet"
        );
        assert!(matches!(sniff(b"GET key\r\n"), Verdict::Match(..)));
        assert!(matches!(sniff(b"PING\r\n"), Verdict::Match(..)));
    }
}
