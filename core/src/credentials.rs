//! systemd credentials passed by the VM's host: QEMU fw_cfg entries
//! (`opt/io.systemd.credentials/NAME`), SMBIOS type 11 OEM strings
//! (`io.systemd.credential:NAME=VALUE`, `io.systemd.credential.binary:NAME=BASE64`) and
//! the kernel command line (`systemd.set_credential=NAME:VALUE`). nixseed reads the
//! well-known names systemd itself uses for first boot.

use std::collections::BTreeMap;

/// Credential names nixseed understands, as systemd documents them.
pub const HOSTNAME: &str = "system.hostname";
pub const MACHINE_ID: &str = "system.machine_id";
pub const ROOT_KEYS: &str = "ssh.authorized_keys.root";

/// Parses one raw SMBIOS structure (`/sys/firmware/dmi/entries/11-*/raw`): the formatted
/// header, then NUL-terminated strings ending with an empty string. The credentials come
/// in the order the structure holds them, repeats included: [`Credentials::add`] keeps
/// the first, as systemd does.
pub fn parse_smbios_type11(raw: &[u8]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
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
        if let Some(cred) = parse_oem_string(s) {
            out.push(cred);
        }
    }
    out
}

/// Credentials gathered from several SMBIOS structures, read in their numeric order
/// (`11-0`, `11-1`, ..., `11-10`). A name set twice keeps its first value, with a
/// warning: systemd imports each credential once and ignores a repeat, so nixseed and
/// systemd see the same value in the same VM.
#[derive(Debug, Default)]
pub struct Credentials {
    pub values: BTreeMap<String, Vec<u8>>,
    pub warnings: Vec<String>,
}

impl Credentials {
    pub fn add(&mut self, creds: Vec<(String, Vec<u8>)>, origin: &str) {
        for (name, value) in creds {
            match self.values.entry(name) {
                std::collections::btree_map::Entry::Occupied(e) => self.warnings.push(format!(
                    "{origin}: credential {} is set twice; the first value is kept, as systemd keeps it",
                    e.key()
                )),
                std::collections::btree_map::Entry::Vacant(e) => {
                    e.insert(value);
                }
            }
        }
    }
}

/// The index of an SMBIOS entry directory (`11-3` gives 3), for ordering them.
pub fn smbios_entry_index(name: &str) -> Option<u32> {
    name.strip_prefix("11-")?.parse().ok()
}

/// A `system.machine_id` credential as systemd reads it (`sd_id128_from_string`): 32 hex
/// digits or the UUID form with dashes, in either case. `firmware` asks for the VM's
/// SMBIOS product UUID, given here as `product_uuid`.
pub fn machine_id_from_credential(
    value: &str,
    product_uuid: Option<&str>,
) -> Result<String, String> {
    let value = value.trim();
    let id = if value == "firmware" {
        product_uuid
            .ok_or("`firmware` asks for the VM's product UUID, and the firmware gives none")?
            .trim()
    } else {
        value
    };
    let uuid_form = id.len() == 36
        && id
            .char_indices()
            .all(|(i, c)| (c == '-') == [8, 13, 18, 23].contains(&i));
    let hex: String = if uuid_form {
        id.chars().filter(|c| *c != '-').collect()
    } else {
        id.to_string()
    };
    let hex = hex.to_ascii_lowercase();
    crate::identity::check_machine_id(&hex)
        .map_err(|_| format!("{value:?} is neither 32 hex digits nor a UUID"))?;
    Ok(hex)
}

/// The credentials on a kernel command line, as systemd's PID 1 imports them:
/// `systemd.set_credential=NAME:VALUE` and `systemd.set_credential_binary=NAME:BASE64`,
/// in order. Words are split as systemd splits them: at blanks outside double quotes,
/// the quotes removed (`systemd.set_credential=ssh.authorized_keys.root:"ssh-ed25519 AAAA…"`).
pub fn parse_cmdline(cmdline: &str) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for word in cmdline_words(cmdline) {
        // systemd compares keys with `-` and `_` as one (`systemd.set-credential=`).
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let binary = match key.replace('-', "_").as_str() {
            "systemd.set_credential" => false,
            "systemd.set_credential_binary" => true,
            _ => continue,
        };
        let Some((name, value)) = value.split_once(':') else {
            continue;
        };
        let bytes = match binary {
            false => Some(value.as_bytes().to_vec()),
            true => base64_decode(value),
        };
        if let Some(bytes) = bytes.filter(|_| !name.is_empty()) {
            out.push((name.to_string(), bytes));
        }
    }
    out
}

/// A command line's words as systemd's `EXTRACT_UNQUOTE` gives them: blanks outside
/// quotes (double or single) separate them, and the quotes themselves are dropped.
fn cmdline_words(text: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut started = false;
    for c in text.chars() {
        match c {
            '"' | '\'' if quote.is_none() => {
                quote = Some(c);
                started = true;
            }
            c if Some(c) == quote => quote = None,
            c if c.is_whitespace() && quote.is_none() => {
                if started {
                    words.push(std::mem::take(&mut word));
                    started = false;
                }
            }
            c => {
                word.push(c);
                started = true;
            }
        }
    }
    if started {
        words.push(word);
    }
    words
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
mod cmdline_tests {
    use super::*;

    #[test]
    fn command_line_credentials_are_split_as_systemd_splits_them() {
        let got = parse_cmdline(
            "ro quiet systemd.set-credential=system.hostname:web7 systemd.set_credential=ssh.authorized_keys.root:'ssh-ed25519 AAAAQ root@h' systemd.set_credential_binary=system.machine_id:MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY= systemd.set_credential=nocolon systemd.set_credential=:empty\n",
        );
        assert_eq!(
            got,
            [
                ("system.hostname", b"web7".to_vec()),
                (
                    "ssh.authorized_keys.root",
                    b"ssh-ed25519 AAAAQ root@h".to_vec()
                ),
                (
                    "system.machine_id",
                    b"0123456789abcdef0123456789abcdef".to_vec()
                ),
            ]
            .map(|(n, v)| (n.to_string(), v))
        );
    }
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
        raw.extend_from_slice(b"io.systemd.credential:system.hostname=vm2\0");
        raw.extend_from_slice(b"unrelated\0\0");
        let mut c = Credentials::default();
        c.add(parse_smbios_type11(&raw), "11-0");
        assert_eq!(c.values[HOSTNAME], b"vm1");
        assert_eq!(c.values[ROOT_KEYS], b"ssh-ed25519 AAAA");
        assert_eq!(c.values.len(), 2);
        assert_eq!(c.warnings.len(), 1);
        assert!(c.warnings[0].contains("system.hostname is set twice"));
    }

    #[test]
    fn smbios_entries_order_by_number() {
        let mut names = vec!["11-10", "11-2", "11-0"];
        names.sort_by_key(|n| smbios_entry_index(n));
        assert_eq!(names, ["11-0", "11-2", "11-10"]);
    }

    #[test]
    fn machine_id_credentials_take_what_systemd_takes() {
        let hex = "0123abcd456789abcdef0123456789ab";
        for given in [
            hex,
            "0123ABCD456789ABCDEF0123456789AB",
            "0123abcd-4567-89ab-cdef-0123456789ab",
        ] {
            assert_eq!(machine_id_from_credential(given, None).as_deref(), Ok(hex));
        }
        assert_eq!(
            machine_id_from_credential("firmware", Some("0123ABCD-4567-89AB-CDEF-0123456789AB"))
                .as_deref(),
            Ok(hex)
        );
        assert!(machine_id_from_credential("firmware", None).is_err());
        for bad in [
            "",
            "0123abcd-4567-89ab-cdef0-123456789ab",
            "00000000000000000000000000000000",
            "xyz",
        ] {
            assert!(machine_id_from_credential(bad, None).is_err(), "{bad}");
        }
    }

    #[test]
    fn base64_rejects_garbage() {
        assert_eq!(base64_decode("aGk=").as_deref(), Some(&b"hi"[..]));
        assert_eq!(base64_decode("a*b"), None);
    }
}
