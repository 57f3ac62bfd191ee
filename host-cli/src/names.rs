//! Validation of machine names, hostnames, machine-ids, UUIDs and port lines: everything
//! an operator types that later becomes a path, a file or a guest setting.

use anyhow::{Result, bail};

/// A machine name is used as a directory name and as the default hostname, so it must be
/// both a safe path component and a valid hostname.
pub fn check_machine_name(name: &str) -> Result<()> {
    if name.is_empty() {
        bail!("the machine name is empty; give a name such as `web1`");
    }
    if name.starts_with('-') {
        bail!("machine name `{name}` starts with `-`; names must start with a letter or digit");
    }
    if name.contains('/') || name.contains("..") || name.chars().any(char::is_whitespace) {
        bail!(
            "machine name `{name}` contains `/`, `..` or whitespace; use letters, digits, `-` and `.` only"
        );
    }
    // virsh reads a number as a domain ID and a UUID as a domain's UUID before it tries a
    // name, so `seedctl destroy 1` would reach whichever domain has ID 1.
    if name.bytes().all(|b| b.is_ascii_digit()) || check_uuid(&name.to_ascii_lowercase()).is_ok() {
        bail!(
            "machine name `{name}` is all digits or a UUID, which virsh takes for a domain ID or UUID; add a letter, such as `vm{name}`"
        );
    }
    // The name is the default hostname and the name `known-hosts` pins its key under.
    if ends_in_a_number(name) {
        bail!(
            "machine name `{name}` ends in an all-digit label, which ssh and known_hosts read as an IP address; add a letter"
        );
    }
    // The name is a directory, and `seedctl new` builds it aside under a longer one.
    if name.len() > MAX_MACHINE_NAME {
        bail!(
            "machine name `{name}` has {} characters; the most is {MAX_MACHINE_NAME} (give a longer hostname with --hostname)",
            name.len()
        );
    }
    if RESERVED.contains(&name) {
        bail!(
            "machine name `{name}` is reserved: the state directory keeps its own `{name}` beside the machines'"
        );
    }
    check_hostname(name)
        .map_err(|e| anyhow::anyhow!("machine name `{name}` is not a valid hostname: {e}"))
}

/// The longest machine name: a directory name of at most 255 bytes holds it with `seedctl
/// new`'s staging prefix and suffix to spare.
pub const MAX_MACHINE_NAME: usize = 200;

/// Entries of the state directory that are not machines.
const RESERVED: &[&str] = &[
    crate::state::DEFAULT_BASE,
    crate::state::BASE_ROOTS,
    crate::accel::CACHE,
];

/// RFC 1123 hostname, by the same rule the agent applies to seeds.
pub fn check_hostname(host: &str) -> Result<()> {
    nixseed_core::identity::check_hostname(host).map_err(anyhow::Error::msg)?;
    if ends_in_a_number(host) {
        bail!(
            "hostname `{host}` ends in an all-digit label, which ssh, known_hosts and resolvers read as an IP address or a number (RFC 1123 2.1); add a letter"
        );
    }
    Ok(())
}

/// The last dot-separated label is all digits (`1.2.3.4`, `123`).
fn ends_in_a_number(name: &str) -> bool {
    name.rsplit('.')
        .next()
        .is_some_and(|l| !l.is_empty() && l.bytes().all(|b| b.is_ascii_digit()))
}

/// systemd's machine-id(5): 32 lowercase hex digits, not all zero (the agent's rule).
pub fn check_machine_id(id: &str) -> Result<()> {
    nixseed_core::identity::check_machine_id(id).map_err(anyhow::Error::msg)
}

/// An RFC 4122 UUID in its canonical lowercase 8-4-4-4-12 text form.
pub fn check_uuid(uuid: &str) -> Result<()> {
    let groups: Vec<&str> = uuid.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    let ok = groups.len() == 5
        && groups.iter().zip(lens).all(|(g, n)| {
            g.len() == n
                && g.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
    if !ok {
        bail!("`{uuid}` is not a lowercase UUID like 0b9f6f1e-3c0a-4c47-9a4e-2f1d5b7c8e90");
    }
    Ok(())
}

/// One line of `tcp_ports`/`udp_ports`: a port `N` or an inclusive range `N-M`, written
/// exactly in the canonical form the agent writes back.
pub fn check_port_line(line: &str) -> Result<()> {
    let canonical = nixseed_core::identity::check_port(line).map_err(anyhow::Error::msg)?;
    if canonical != line {
        bail!("port line `{line}` is not in canonical form; write `{canonical}`");
    }
    Ok(())
}

pub use nixseed_core::seed::hex;

/// A random version-4 UUID (RFC 4122 variant bits set).
pub fn random_uuid() -> Result<String> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| anyhow::anyhow!("reading random bytes: {e}"))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let h = hex(&b);
    Ok(format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    ))
}

/// A random machine-id, as the agent makes them.
pub fn random_machine_id() -> String {
    use nixseed_core::identity::Fresh;
    nixseed_core::fresh::OsFresh.machine_id()
}

/// A nameserver address as glibc's resolv.conf takes it: an IPv4 or IPv6 address, the
/// latter with a `%` zone for a link-local server (`fe80::1%eth0`).
pub fn check_nameserver(addr: &str) -> Result<()> {
    use anyhow::Context;
    let (ip, zone) = match addr.split_once('%') {
        Some((ip, zone)) => (ip, Some(zone)),
        None => (addr, None),
    };
    let ip: std::net::IpAddr = ip
        .parse()
        .with_context(|| format!("`{addr}` is not an IP address"))?;
    if let Some(zone) = zone
        && (ip.is_ipv4() || zone.is_empty() || zone.chars().any(|c| c.is_whitespace()))
    {
        bail!("`{addr}`: a `%` zone goes only after an IPv6 address, as `fe80::1%eth0`");
    }
    Ok(())
}

/// The `nameserver` lines of a resolv.conf name addresses glibc can use: it skips a line
/// it cannot parse without a word, and the guest is left without that server.
pub fn check_resolv_conf(text: &str) -> Result<()> {
    use anyhow::Context;
    for line in text.lines() {
        let mut words = line.split_whitespace();
        if words.next() == Some("nameserver") {
            let addr = words.next().unwrap_or_default();
            check_nameserver(addr).with_context(|| format!("`{line}`"))?;
        }
    }
    Ok(())
}

/// One /etc/hosts line as glibc reads it: an IP address and at least one name; a `#`
/// anywhere starts a comment. A name is any word without control characters (glibc takes
/// `db_1` or `host.example.org.` as written).
pub fn check_hosts_line(line: &str) -> Result<()> {
    use anyhow::Context;
    let line = line.split('#').next().unwrap_or_default();
    let mut fields = line.split_whitespace();
    let addr = fields.next().context("the line is empty")?;
    addr.parse::<std::net::IpAddr>()
        .with_context(|| format!("`{addr}` is not an IP address"))?;
    let mut any = false;
    for name in fields {
        if name.chars().any(char::is_control) {
            bail!("`{}` holds a control character", name.escape_debug());
        }
        any = true;
    }
    if !any {
        bail!("no name after the address");
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn machine_names() {
        for good in ["web1", "db-2", "a.example.org", "vm0123", "1a"] {
            assert!(check_machine_name(good).is_ok(), "{good}");
        }
        for bad in [
            "", "-x", "a/b", "a b", "..", "a..b", "x_y", "a-", "é", "0123", "1", "1.2.3.4",
            "web.01",
        ] {
            assert!(check_machine_name(bad).is_err(), "{bad}");
        }
        // An IPv4 literal or a number as a hostname would be pinned by `known-hosts` as
        // an address.
        for bad in ["123", "10.0.0.1", "web.1"] {
            let e = check_hostname(bad).unwrap_err().to_string();
            assert!(e.contains("all-digit label"), "{bad}: {e}");
        }
        assert!(check_hostname("web1.example.org").is_ok());
    }

    #[test]
    fn nameservers() {
        for good in ["192.0.2.53", "2001:db8::53", "fe80::1%eth0"] {
            assert!(check_nameserver(good).is_ok(), "{good}");
        }
        for bad in ["notanip", "192.0.2.53%eth0", "fe80::1%", "", "192.0.2.300"] {
            assert!(check_nameserver(bad).is_err(), "{bad}");
        }
        assert!(check_resolv_conf("# c\nsearch example.org\nnameserver 192.0.2.1\n").is_ok());
        let e =
            check_resolv_conf("nameserver 192.0.2.1\nnameserver dns.example.org\n").unwrap_err();
        assert!(
            format!("{e:#}").contains("`nameserver dns.example.org`"),
            "{e:#}"
        );
    }

    #[test]
    fn machine_ids() {
        assert!(check_machine_id("0123456789abcdef0123456789abcdef").is_ok());
        assert!(check_machine_id("00000000000000000000000000000000").is_err());
        assert!(check_machine_id("0123456789ABCDEF0123456789abcdef").is_err());
        assert!(check_machine_id("0123").is_err());
        let id = random_machine_id();
        assert!(check_machine_id(&id).is_ok());
    }

    #[test]
    fn uuids() {
        let u = random_uuid().unwrap();
        assert!(check_uuid(&u).is_ok(), "{u}");
        assert_eq!(&u[14..15], "4");
        assert!("89ab".contains(&u[19..20]));
        assert!(check_uuid("not-a-uuid").is_err());
    }

    #[test]
    fn ports() {
        for good in ["22", "1", "65535", "8000-8080", "53-53"] {
            assert!(check_port_line(good).is_ok(), "{good}");
        }
        for bad in ["0", "65536", "ssh", "80-22", "1-", "-1", " 22"] {
            assert!(check_port_line(bad).is_err(), "{bad}");
        }
    }
}
