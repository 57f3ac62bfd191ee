//! systemd credentials passed through SMBIOS type 11 OEM strings
//! (`io.systemd.credential:NAME=VALUE`, `io.systemd.credential.binary:NAME=BASE64`).
//! nixseed reads the well-known names systemd itself uses for first boot.

use std::collections::BTreeMap;

/// Credential names nixseed understands, as systemd documents them.
pub const HOSTNAME: &str = "system.hostname";
pub const MACHINE_ID: &str = "system.machine_id";
pub const ROOT_KEYS: &str = "ssh.authorized_keys.root";

/// Parses one raw SMBIOS structure (`/sys/firmware/dmi/entries/11-*/raw`): the formatted
/// header, then NUL-terminated strings ending with an empty string.
pub fn parse_smbios_type11(raw: &[u8]) -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    if raw.len() < 5 || raw[0] != 11 {
        return out;
    }
    let header_len = raw[1] as usize;
    let Some(strings) = raw.get(header_len..) else {
        return out;
    };
    for s in strings.split(|b| *b == 0) {
        if s.is_empty() {
            break;
        }
        let Ok(s) = std::str::from_utf8(s) else {
            continue;
        };
        if let Some((name, value)) = parse_oem_string(s) {
            out.insert(name, value);
        }
    }
    out
}

/// One OEM string, as also accepted from the kernel command line (`systemd.set_credential=`).
pub fn parse_oem_string(s: &str) -> Option<(String, Vec<u8>)> {
    if let Some(rest) = s.strip_prefix("io.systemd.credential.binary:") {
        let (name, value) = rest.split_once('=')?;
        return Some((name.to_string(), base64_decode(value)?));
    }
    let rest = s.strip_prefix("io.systemd.credential:")?;
    let (name, value) = rest.split_once('=')?;
    Some((name.to_string(), value.as_bytes().to_vec()))
}

/// Standard base64 with optional padding and embedded whitespace (Proxmox wraps lines).
pub fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let mut acc = 0u32;
    let mut bits = 0;
    for c in text.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' | b'-' => 62,
            b'/' | b'_' => 63,
            b'=' => break,
            b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smbios_type11_strings_become_credentials() {
        let mut raw = vec![11u8, 5, 0, 0, 2];
        raw.extend_from_slice(b"io.systemd.credential:system.hostname=vm1\0");
        raw.extend_from_slice(
            b"io.systemd.credential.binary:ssh.authorized_keys.root=c3NoLWVkMjU1MTkgQUFBQQ==\0",
        );
        raw.extend_from_slice(b"unrelated\0\0");
        let c = parse_smbios_type11(&raw);
        assert_eq!(c[HOSTNAME], b"vm1");
        assert_eq!(c[ROOT_KEYS], b"ssh-ed25519 AAAA");
        assert_eq!(c.len(), 2);
    }

    #[test]
    fn base64_rejects_garbage() {
        assert_eq!(base64_decode("aGk=").as_deref(), Some(&b"hi"[..]));
        assert_eq!(base64_decode("a*b"), None);
    }
}
