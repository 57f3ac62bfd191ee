//! Address arithmetic the renderer needs: netmask → prefix and "is the gateway on
//! this subnet". Same answers as Python's `ipaddress`, which cloud-init uses.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Prefix length of an IPv4 netmask given as `24`, `255.255.255.0` or the host
/// mask `0.0.0.255`.
pub(crate) fn v4_prefix(mask: &str) -> Option<u8> {
    if let Ok(n) = mask.parse::<u8>() {
        return (n <= 32).then_some(n);
    }
    let bits = u32::from(mask.parse::<Ipv4Addr>().ok()?);
    contiguous(u128::from(bits) << 96, bits.count_ones())
        .or_else(|| contiguous(u128::from(!bits) << 96, (!bits).count_ones()))
        .and_then(|p| u8::try_from(p).ok())
}

/// Prefix length of an IPv6 prefix (`64`) or mask (`ffff:ffff:ffff:ffff::`).
pub(crate) fn v6_prefix(mask: &str) -> Option<u8> {
    if let Ok(n) = mask.parse::<u8>() {
        return (n <= 128).then_some(n);
    }
    let bits = u128::from(mask.parse::<Ipv6Addr>().ok()?);
    contiguous(bits, bits.count_ones()).and_then(|p| u8::try_from(p).ok())
}

/// `Some(ones)` when `bits` is `ones` one-bits followed by zeros.
fn contiguous(bits: u128, ones: u32) -> Option<u32> {
    let want = if ones == 0 {
        0
    } else {
        u128::MAX << (128 - ones)
    };
    (bits == want).then_some(ones)
}

/// Whether `gateway` lies in `addr/prefix`. A gateway of the other family, or one that
/// is not an address at all, is not in the subnet.
pub(crate) fn contains(addr: &str, prefix: u8, gateway: &str) -> Option<bool> {
    let net: IpAddr = addr.parse().ok()?;
    let gw: IpAddr = gateway.parse().ok()?;
    Some(match (net, gw) {
        (IpAddr::V4(n), IpAddr::V4(g)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u32::MAX << (32 - u32::from(prefix.min(32)))
            };
            u32::from(n) & mask == u32::from(g) & mask
        }
        (IpAddr::V6(n), IpAddr::V6(g)) => {
            let mask = if prefix == 0 {
                0
            } else {
                u128::MAX << (128 - u32::from(prefix.min(128)))
            };
            u128::from(n) & mask == u128::from(g) & mask
        }
        _ => false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmasks_become_prefixes() {
        assert_eq!(v4_prefix("255.255.255.0"), Some(24));
        assert_eq!(v4_prefix("255.255.0.0"), Some(16));
        assert_eq!(v4_prefix("255.255.255.255"), Some(32));
        assert_eq!(v4_prefix("0.0.0.0"), Some(0));
        assert_eq!(v4_prefix("0.0.0.255"), Some(24));
        assert_eq!(v4_prefix("20"), Some(20));
        assert_eq!(v4_prefix("255.0.255.0"), None);
        assert_eq!(v4_prefix("33"), None);
        assert_eq!(v6_prefix("64"), Some(64));
        assert_eq!(v6_prefix("ffff:ffff:ffff::"), Some(48));
        assert_eq!(v6_prefix("ffff::ffff"), None);
    }

    #[test]
    fn gateway_containment() {
        assert_eq!(contains("192.168.1.5", 24, "192.168.1.1"), Some(true));
        assert_eq!(contains("203.0.113.77", 32, "172.31.1.1"), Some(false));
        assert_eq!(contains("2001:db8::2", 64, "fe80::1"), Some(false));
        assert_eq!(contains("2001:db8::2", 64, "10.0.0.1"), Some(false));
        assert_eq!(contains("2001:db8::2", 64, "bogus"), None);
    }
}
