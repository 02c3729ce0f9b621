//! Address checks shared by every mode: loopback only unless the operator says otherwise.

use std::fmt;
use std::net::SocketAddr;

/// A mistake in the command line found after parsing (exit status 2).
#[derive(Debug)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Prints the process limits a load run depends on (stderr), and returns RLIMIT_NOFILE.
pub fn report_limits() -> u64 {
    let files = ringproxy::uring::socket::open_file_limit();
    let memlock = match ringproxy::uring::socket::locked_memory_limit() {
        Some(bytes) => format!("{} KiB", bytes / 1024),
        None => "unlimited".to_string(),
    };
    eprintln!(
        "limits: RLIMIT_NOFILE {files} (one descriptor per connection), RLIMIT_MEMLOCK {memlock} (io_uring rings and buffers on kernels before 5.12)"
    );
    files
}

/// Refuses any address outside 127.0.0.0/8 and ::1 unless `allow_remote`.
pub fn check_addresses(addrs: &[SocketAddr], allow_remote: bool) -> Result<(), UsageError> {
    if allow_remote {
        return Ok(());
    }
    match addrs.iter().find(|addr| !addr.ip().is_loopback()) {
        Some(addr) => Err(UsageError(format!(
            "{addr} is not a loopback address; pass --allow-remote to use it"
        ))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_without_allow_remote() {
        let local: Vec<SocketAddr> = vec![
            "127.0.0.2:80".parse().unwrap_or_else(|_| unreachable!()),
            "[::1]:80".parse().unwrap_or_else(|_| unreachable!()),
        ];
        assert!(check_addresses(&local, false).is_ok());
        let remote: Vec<SocketAddr> =
            vec!["10.0.0.1:80".parse().unwrap_or_else(|_| unreachable!())];
        assert!(check_addresses(&remote, false).is_err());
        assert!(check_addresses(&remote, true).is_ok());
    }
}
