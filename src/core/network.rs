//! Bound networks: the CIDRs a token (or its key type) may be used from, and whether a client
//! address is inside one. The edge hands over Postgres `cidr` values as their on-disk fields
//! (family, prefix length, address bytes) and the client address as a `std::net::IpAddr`;
//! nothing here parses text from the network. Pure: no Postgres.
//!
//! A client that connected over a Unix-domain socket has no address. It is treated as the
//! loopback address of either family: a list that allows 127.0.0.1 or ::1 allows it, any other
//! list refuses it (a socket on the database host is as local as loopback).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Networks per token or key type, at most.
pub const MAX_NETWORKS: usize = 64;

/// One CIDR block. Host bits beyond `bits` are zero (Postgres' `cidr` guarantees it; `new`
/// clears them anyway).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    v6: bool,
    bits: u8,
    addr: [u8; 16],
}

impl Network {
    /// A block from its parts; None when the prefix length does not fit the family.
    pub fn new(v6: bool, bits: u8, addr: &[u8]) -> Option<Network> {
        let len = if v6 { 16 } else { 4 };
        if addr.len() != len || usize::from(bits) > len * 8 {
            return None;
        }
        let mut a = [0u8; 16];
        a[..len].copy_from_slice(addr);
        let mut n = Network { v6, bits, addr: a };
        n.addr = n.masked(&a);
        Some(n)
    }

    /// A block as Postgres prints a `cidr` (`10.0.0.0/8`, `2001:db8::/32`); a bare address is
    /// a single host.
    pub fn parse(s: &str) -> Option<Network> {
        let (addr, bits) = match s.split_once('/') {
            Some((a, b)) => (a, Some(b.parse::<u8>().ok()?)),
            None => (s, None),
        };
        match addr.parse::<IpAddr>().ok()? {
            IpAddr::V4(v4) => Network::new(false, bits.unwrap_or(32), &v4.octets()),
            IpAddr::V6(v6) => Network::new(true, bits.unwrap_or(128), &v6.octets()),
        }
    }

    /// `addr` with the bits beyond this block's prefix cleared.
    fn masked(&self, addr: &[u8; 16]) -> [u8; 16] {
        let mut out = [0u8; 16];
        let full = usize::from(self.bits / 8);
        out[..full].copy_from_slice(&addr[..full]);
        let rest = self.bits % 8;
        if rest > 0 {
            out[full] = addr[full] & (0xffu8 << (8 - rest));
        }
        out
    }

    /// Whether `ip` lies in this block. An IPv4-mapped IPv6 client (::ffff:a.b.c.d) is
    /// compared as the IPv4 address it is.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 => v4,
        };
        let mut a = [0u8; 16];
        match (ip, self.v6) {
            (IpAddr::V4(v4), false) => a[..4].copy_from_slice(&v4.octets()),
            (IpAddr::V6(v6), true) => a.copy_from_slice(&v6.octets()),
            _ => return false,
        }
        self.masked(&a) == self.addr
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.v6 {
            let mut o = [0u8; 16];
            o.copy_from_slice(&self.addr);
            write!(f, "{}/{}", Ipv6Addr::from(o), self.bits)
        } else {
            write!(f, "{}/{}", Ipv4Addr::new(self.addr[0], self.addr[1], self.addr[2], self.addr[3]), self.bits)
        }
    }
}

/// Whether a client is allowed by `networks`. `None` is a Unix-socket client (see the module
/// comment).
pub fn allows(networks: &[Network], client: Option<IpAddr>) -> bool {
    match client {
        Some(ip) => networks.iter().any(|n| n.contains(ip)),
        None => networks
            .iter()
            .any(|n| n.contains(IpAddr::V4(Ipv4Addr::LOCALHOST)) || n.contains(IpAddr::V6(Ipv6Addr::LOCALHOST))),
    }
}

/// How a client is named in a refusal's detail.
pub fn describe(client: Option<IpAddr>) -> String {
    client.map_or_else(|| "a Unix-domain socket".into(), |ip| ip.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> Network {
        Network::parse(s).expect("cidr")
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn blocks_contain_their_addresses_only() {
        let n = net("10.1.0.0/16");
        assert!(n.contains(ip("10.1.255.3")));
        assert!(!n.contains(ip("10.2.0.1")));
        assert!(!n.contains(ip("::1")), "another family");
        assert!(n.contains(ip("::ffff:10.1.2.3")), "IPv4-mapped IPv6 is IPv4");
        let odd = net("192.168.1.128/25");
        assert!(odd.contains(ip("192.168.1.200")) && !odd.contains(ip("192.168.1.127")));
        assert!(net("0.0.0.0/0").contains(ip("8.8.8.8")));
        assert!(net("203.0.113.7/32").contains(ip("203.0.113.7")) && !net("203.0.113.7/32").contains(ip("203.0.113.8")));
        let v6 = net("2001:db8::/32");
        assert!(v6.contains(ip("2001:db8:1::5")) && !v6.contains(ip("2001:db9::1")));
    }

    #[test]
    fn host_bits_are_cleared_and_bad_lengths_refused() {
        assert_eq!(Network::new(false, 24, &[10, 0, 0, 99]), Some(net("10.0.0.0/24")));
        assert_eq!(Network::new(false, 33, &[10, 0, 0, 0]), None);
        assert_eq!(Network::new(true, 129, &[0; 16]), None);
        assert_eq!(Network::new(false, 8, &[10, 0, 0]), None);
        assert_eq!(net("10.0.0.0/8").to_string(), "10.0.0.0/8");
        assert_eq!(net("2001:db8::/32").to_string(), "2001:db8::/32");
        assert_eq!(Network::parse("10.0.0.7"), Network::new(false, 32, &[10, 0, 0, 7]));
        assert_eq!(Network::parse("10.0.0.0/x"), None);
        assert_eq!(Network::parse("nonsense/8"), None);
    }

    #[test]
    fn a_socket_client_counts_as_loopback() {
        assert!(allows(&[net("127.0.0.1/32")], None));
        assert!(allows(&[net("::1/128")], None));
        assert!(!allows(&[net("10.0.0.0/8")], None));
        assert!(!allows(&[], Some(ip("127.0.0.1"))), "an empty list allows nobody");
        assert_eq!(describe(None), "a Unix-domain socket");
    }
}
