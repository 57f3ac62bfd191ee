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
    check_hostname(name)
        .map_err(|e| anyhow::anyhow!("machine name `{name}` is not a valid hostname: {e}"))
}

/// RFC 1123 hostname: dot-separated labels of 1..=63 `[A-Za-z0-9-]`, no leading or
/// trailing `-`, at most 253 characters.
pub fn check_hostname(host: &str) -> Result<()> {
    if host.is_empty() || host.len() > 253 {
        bail!("hostname must have 1 to 253 characters");
    }
    for label in host.split('.') {
        if label.is_empty() || label.len() > 63 {
            bail!("hostname label `{label}` must have 1 to 63 characters");
        }
        if label.starts_with('-') || label.ends_with('-') {
            bail!("hostname label `{label}` starts or ends with `-`");
        }
        if let Some(c) = label
            .chars()
            .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
        {
            bail!("hostname label `{label}` contains `{c}`; use letters, digits and `-`");
        }
    }
    Ok(())
}

/// systemd's machine-id(5): 32 lowercase hex digits, not all zero.
pub fn check_machine_id(id: &str) -> Result<()> {
    if id.len() != 32
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        bail!("`{id}` is not 32 lowercase hexadecimal digits");
    }
    if id.bytes().all(|b| b == b'0') {
        bail!("the all-zero machine-id is reserved by systemd");
    }
    Ok(())
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

/// One line of `tcp_ports`/`udp_ports`: a port `N` or an inclusive range `N-M`.
pub fn check_port_line(line: &str) -> Result<()> {
    let parse = |s: &str| -> Result<u16> {
        match s.parse::<u16>() {
            Ok(p) if p > 0 => Ok(p),
            _ => bail!("`{s}` is not a port number between 1 and 65535"),
        }
    };
    match line.split_once('-') {
        None => parse(line).map(|_| ()),
        Some((a, b)) => {
            let (a, b) = (parse(a)?, parse(b)?);
            if a > b {
                bail!("port range `{line}` runs backwards; write the lower port first");
            }
            Ok(())
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

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

/// A random machine-id (never all zero: retried on the 2^-128 chance).
pub fn random_machine_id() -> Result<String> {
    loop {
        let mut b = [0u8; 16];
        getrandom::getrandom(&mut b).map_err(|e| anyhow::anyhow!("reading random bytes: {e}"))?;
        if b.iter().any(|x| *x != 0) {
            return Ok(hex(&b));
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn machine_names() {
        for good in ["web1", "db-2", "a.example.org", "0123"] {
            assert!(check_machine_name(good).is_ok(), "{good}");
        }
        for bad in ["", "-x", "a/b", "a b", "..", "a..b", "x_y", "a-", "é"] {
            assert!(check_machine_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn machine_ids() {
        assert!(check_machine_id("0123456789abcdef0123456789abcdef").is_ok());
        assert!(check_machine_id("00000000000000000000000000000000").is_err());
        assert!(check_machine_id("0123456789ABCDEF0123456789abcdef").is_err());
        assert!(check_machine_id("0123").is_err());
        let id = random_machine_id().unwrap();
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
