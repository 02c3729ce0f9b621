//! Allow and deny lists of networks (`[listener.acl]`).
//!
//! Deny is checked first; when an allow list is present, an address on neither list is refused.
//! IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) are checked as the IPv4 address they carry, so
//! a dual-stack client cannot slip past an IPv4 rule.

use std::net::IpAddr;

use ipnet::IpNet;

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Acl {
    pub allow: Option<Vec<IpNet>>,
    pub deny: Vec<IpNet>,
}

impl Acl {
    pub fn permits(&self, address: IpAddr) -> bool {
        let address = address.to_canonical();
        if self.deny.iter().any(|net| net.contains(&address)) {
            return false;
        }
        match &self.allow {
            Some(allow) => allow.iter().any(|net| net.contains(&address)),
            None => true,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.allow.is_none() && self.deny.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|net| net.parse().unwrap()).collect()
    }

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    #[test]
    fn deny_wins_over_allow() {
        let acl = Acl {
            allow: Some(nets(&["127.0.0.0/8", "::1/128"])),
            deny: nets(&["127.0.0.66/32"]),
        };
        assert!(acl.permits(ip("127.0.0.1")));
        assert!(acl.permits(ip("127.1.2.3")));
        assert!(!acl.permits(ip("127.0.0.66")));
        assert!(acl.permits(ip("::1")));
        assert!(!acl.permits(ip("10.0.0.1")));
        assert!(!acl.permits(ip("::2")));
    }

    #[test]
    fn without_allow_everything_not_denied_passes() {
        let acl = Acl {
            allow: None,
            deny: nets(&["2001:db8::/32", "10.0.0.0/8"]),
        };
        assert!(!acl.permits(ip("2001:db8:1::5")));
        assert!(acl.permits(ip("2001:db9::1")));
        assert!(!acl.permits(ip("10.200.0.1")));
        assert!(acl.permits(ip("11.0.0.1")));
    }

    #[test]
    fn ipv6_prefixes_match_by_prefix() {
        let acl = Acl {
            allow: Some(nets(&["fd00:1:2:3::/64", "2001:db8::1/128"])),
            deny: nets(&["fd00:1:2:3:ffff::/80"]),
        };
        assert!(acl.permits(ip("fd00:1:2:3::42")));
        assert!(acl.permits(ip("fd00:1:2:3:abcd::1")));
        assert!(!acl.permits(ip("fd00:1:2:3:ffff::1")));
        assert!(!acl.permits(ip("fd00:1:2:4::1")));
        assert!(acl.permits(ip("2001:db8::1")));
        assert!(!acl.permits(ip("2001:db8::2")));
    }

    #[test]
    fn mapped_ipv4_is_checked_as_ipv4() {
        let acl = Acl {
            allow: Some(nets(&["::1/128"])),
            deny: nets(&["192.0.2.0/24"]),
        };
        assert!(!acl.permits(ip("::ffff:192.0.2.7")));
        let acl = Acl {
            allow: Some(nets(&["127.0.0.0/8"])),
            deny: Vec::new(),
        };
        assert!(acl.permits(ip("::ffff:127.0.0.1")));
    }
}
