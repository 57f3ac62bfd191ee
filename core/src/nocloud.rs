//! NoCloud: meta-data, and the `ds=nocloud;…` token from the kernel command line or the
//! SMBIOS serial (cloud-init's DataSourceNoCloud).

use crate::yaml::{self, Value};

/// The files of a NoCloud seed nixseed reads, wherever it comes from (volume, directory,
/// control-channel bundle): no other name is ever read, so no path comes from the seed.
pub const SEED_FILES: &[&str] = &[
    "meta-data",
    "user-data",
    "vendor-data",
    "network-config",
    crate::trust::MANIFEST_FILE,
    crate::trust::SIGNATURE_FILE,
];

/// Parsed meta-data.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MetaData {
    /// Raw scalar text; `nocloud` when meta-data is empty.
    pub instance_id: String,
    pub local_hostname: Option<String>,
    pub public_keys: Vec<String>,
    pub dsmode: Option<String>,
    /// `network-interfaces`: an ENI text, the network when the seed has no
    /// `network-config` file (cloud-init's DataSourceNoCloud).
    pub network_interfaces: Option<String>,
    pub warnings: Vec<String>,
}

pub fn parse_meta_data(bytes: &[u8], origin: &str) -> Result<MetaData, yaml::YamlError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| yaml::YamlError::new(origin, format!("not UTF-8 text ({e})")))?;
    let map = yaml::parse_mapping(text, origin)?;
    let mut meta = MetaData {
        instance_id: "nocloud".into(),
        ..MetaData::default()
    };
    for (k, v) in &map {
        let key = match yaml::plain_key(k, origin) {
            Ok(key) => key,
            Err(warning) => {
                meta.warnings.push(warning);
                continue;
            }
        };
        // Only the names cloud-init reads: a seed means the same to both.
        match key {
            "instance-id" => {
                meta.instance_id = yaml::keep_text(v, text, key).ok_or_else(|| {
                    yaml::YamlError::new(origin, format!("key '{key}': expected a string"))
                })?
            }
            // An empty one names no host, as for cloud-init.
            "local-hostname" => {
                meta.local_hostname = yaml::keep_text(v, text, key).filter(|h| !h.is_empty())
            }
            "public-keys" => meta.public_keys = public_keys(v, origin, &mut meta.warnings),
            "dsmode" => meta.dsmode = yaml::scalar_text(v),
            "network-interfaces" => match v {
                Value::String(eni) => meta.network_interfaces = Some(eni.clone()),
                Value::Null => {}
                other => meta.warnings.push(format!(
                    "{origin}: key 'network-interfaces' ignored: {}, not ENI text",
                    yaml::kind(other)
                )),
            },
            "instance_id" | "local_hostname" | "hostname" | "public_keys" => {
                let read = match key {
                    "instance_id" => "instance-id",
                    "public_keys" => "public-keys",
                    _ => "local-hostname",
                };
                meta.warnings.push(format!(
                    "{origin}: key '{key}' ignored; meta-data names it '{read}', as cloud-init reads it"
                ))
            }
            other => meta
                .warnings
                .push(format!("{origin}: unknown key '{other}' ignored")),
        }
    }
    Ok(meta)
}

/// `public-keys` may be a string, a list, or a map of strings or lists of keys. A map's
/// value that is itself a map (EC2's `{k0: {openssh-key: ...}}`) is passed over with a
/// warning, as cloud-init passes it over.
fn public_keys(v: &Value, origin: &str, warnings: &mut Vec<String>) -> Vec<String> {
    let mut out = Vec::new();
    match v {
        Value::Mapping(m) => {
            for (name, v) in m {
                match v {
                    Value::Sequence(_) | Value::String(_) => out.extend(yaml::string_list(v)),
                    other => warnings.push(format!(
                        "{origin}: key 'public-keys': '{}' ignored: {}, not a key or a list of keys",
                        yaml::scalar_text(name).unwrap_or_default(),
                        yaml::kind(other)
                    )),
                }
            }
        }
        other => out.extend(yaml::string_list(other)),
    }
    out.into_iter()
        .flat_map(|k| k.lines().map(str::to_string).collect::<Vec<_>>())
        .map(|k| k.trim().to_string())
        .filter(|k| !k.is_empty())
        .collect()
}

/// `ds=nocloud;h=..;i=..;s=..` as given on the kernel command line or SMBIOS serial.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DsToken {
    pub network: bool,
    pub local_hostname: Option<String>,
    pub instance_id: Option<String>,
    pub seedfrom: Option<String>,
}

/// The last `ds=nocloud…` token in a whitespace-separated string, if any.
pub fn parse_ds_token(text: &str) -> Option<DsToken> {
    let mut found = None;
    for word in text.split_whitespace() {
        let Some(value) = word.strip_prefix("ds=") else {
            continue;
        };
        let mut fields = value.split(';');
        let network = match fields.next() {
            Some("nocloud") => false,
            Some("nocloud-net") => true,
            _ => continue,
        };
        let mut tok = DsToken {
            network,
            ..DsToken::default()
        };
        for field in fields {
            // An empty value (`h=`) gives nothing: the seed's own value stands, and an
            // empty hostname does not refuse the whole seed.
            let Some((k, v)) = field.split_once('=').filter(|(_, v)| !v.is_empty()) else {
                continue;
            };
            match k {
                "h" | "local-hostname" => tok.local_hostname = Some(v.to_string()),
                "i" | "instance-id" => tok.instance_id = Some(v.to_string()),
                "s" | "seedfrom" => tok.seedfrom = Some(v.to_string()),
                _ => {}
            }
        }
        found = Some(tok);
    }
    found
}

impl DsToken {
    /// This token's values over `lower`'s, field by field: cloud-init merges the SMBIOS
    /// serial's token before the command line's, and the first value of a key wins.
    pub fn over(&self, lower: &DsToken) -> DsToken {
        DsToken {
            network: self.network || lower.network,
            local_hostname: self.local_hostname.clone().or(lower.local_hostname.clone()),
            instance_id: self.instance_id.clone().or(lower.instance_id.clone()),
            seedfrom: self.seedfrom.clone().or(lower.seedfrom.clone()),
        }
    }

    /// Values given on the command line override the seed's meta-data.
    pub fn apply(&self, meta: &mut MetaData) {
        if let Some(h) = &self.local_hostname {
            meta.local_hostname = Some(h.clone());
        }
        if let Some(i) = &self.instance_id {
            meta.instance_id = i.clone();
        }
    }

    /// A local directory to seed from (`s=/path/` or `s=file:///path/`); network URLs are
    /// not fetched by nixseed.
    pub fn local_seed_dir(&self) -> Option<&str> {
        let s = self.seedfrom.as_deref()?;
        let path = s.strip_prefix("file://").unwrap_or(s);
        path.starts_with('/').then_some(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_meta_data_gives_nocloud() {
        let m = parse_meta_data(b"", "meta-data").unwrap();
        assert_eq!(m.instance_id, "nocloud");
    }

    #[test]
    fn a_tagged_key_is_not_the_instance_id() {
        let m = parse_meta_data(b"!x instance-id: 7\nlocal-hostname: 0123\n", "meta-data").unwrap();
        assert_eq!(m.instance_id, "nocloud");
        assert_eq!(m.local_hostname.as_deref(), Some("0123"));
        assert_eq!(
            m.warnings,
            ["meta-data: a key ignored: a tagged value, not a plain string"]
        );
    }

    #[test]
    fn proxmox_meta_data_keeps_the_sha1_text() {
        let m = parse_meta_data(
            b"instance-id: 1234567890123456789012345678901234567890\n",
            "meta-data",
        )
        .unwrap();
        assert_eq!(m.instance_id, "1234567890123456789012345678901234567890");
    }

    #[test]
    fn public_keys_in_all_three_shapes() {
        let a = parse_meta_data(b"public-keys: ssh-ed25519 A\n", "m").unwrap();
        let b = parse_meta_data(b"public-keys: [ssh-ed25519 A, ssh-rsa B]\n", "m").unwrap();
        let c = parse_meta_data(
            b"public-keys:\n  k0:\n    openssh-key: ssh-ed25519 A\n  k1: [ssh-rsa B]\n",
            "m",
        )
        .unwrap();
        assert_eq!(a.public_keys, vec!["ssh-ed25519 A"]);
        assert_eq!(b.public_keys, vec!["ssh-ed25519 A", "ssh-rsa B"]);
        // cloud-init's normalize_pubkey_data takes a map's strings and lists only.
        assert_eq!(c.public_keys, vec!["ssh-rsa B"]);
        assert_eq!(
            c.warnings,
            ["m: key 'public-keys': 'k0' ignored: a mapping, not a key or a list of keys"]
        );
    }

    /// The names cloud-init reads, and no others: `hostname`, `local_hostname`,
    /// `instance_id` and `public_keys` are named in warnings and change nothing; an empty
    /// `local-hostname` names no host.
    #[test]
    fn only_cloud_inits_key_names_are_read() {
        let m = parse_meta_data(
            b"hostname: myhost\nlocal_hostname: other\ninstance_id: x\npublic_keys: [ssh-rsa B]\n",
            "m",
        )
        .unwrap();
        assert_eq!(m.local_hostname, None);
        assert_eq!(m.instance_id, "nocloud");
        assert!(m.public_keys.is_empty());
        assert_eq!(m.warnings.len(), 4, "{:?}", m.warnings);
        assert!(
            m.warnings[0].contains("'hostname' ignored")
                && m.warnings[0].contains("'local-hostname'"),
            "{:?}",
            m.warnings
        );
        let empty = parse_meta_data(b"instance-id: a\nlocal-hostname: ''\n", "m").unwrap();
        assert_eq!(empty.local_hostname, None);
    }

    #[test]
    fn network_interfaces_is_kept_as_eni_text() {
        let m = parse_meta_data(
            b"instance-id: a\nnetwork-interfaces: |\n  auto eth0\n  iface eth0 inet static\n    address 192.168.1.10/24\n",
            "m",
        )
        .unwrap();
        assert!(
            m.network_interfaces
                .unwrap()
                .contains("address 192.168.1.10/24")
        );
        assert!(m.warnings.is_empty());
    }

    #[test]
    fn last_ds_token_wins_and_overrides_meta_data() {
        let t = parse_ds_token("quiet ds=nocloud;h=a ro ds=nocloud;i=iid-9;h=b;s=file:///seed/")
            .unwrap();
        assert_eq!(t.local_hostname.as_deref(), Some("b"));
        assert_eq!(t.local_seed_dir(), Some("/seed/"));
        let mut m = MetaData::default();
        t.apply(&mut m);
        assert_eq!(m.instance_id, "iid-9");
        assert!(parse_ds_token("ds=ec2").is_none());
        let empty = parse_ds_token("ds=nocloud;s=/seed/;h=").unwrap();
        assert_eq!(empty.local_hostname, None);
    }

    #[test]
    fn the_serials_token_wins_field_by_field() {
        let serial = parse_ds_token("ds=nocloud;i=iid-serial").unwrap();
        let cmdline = parse_ds_token("ds=nocloud;i=iid-cmdline;h=cmd;s=/seed/").unwrap();
        let t = serial.over(&cmdline);
        assert_eq!(t.instance_id.as_deref(), Some("iid-serial"));
        assert_eq!(t.local_hostname.as_deref(), Some("cmd"));
        assert_eq!(t.local_seed_dir(), Some("/seed/"));
    }
}
