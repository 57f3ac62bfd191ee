//! ConfigDrive2 (label `config-2`) as Proxmox VE and OpenStack Nova write it:
//! `openstack/latest/meta_data.json`, `user_data`, the network as `network_data.json`
//! (Nova) or as an ENI file under `openstack/content/` (Proxmox), and a possibly empty
//! `vendor_data.json`.

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
#[error("{origin}: {detail}")]
pub struct ConfigDriveError {
    pub origin: String,
    pub detail: String,
}

#[derive(Debug, Deserialize, Default)]
struct RawMeta {
    uuid: Option<String>,
    hostname: Option<String>,
    name: Option<String>,
    #[serde(default)]
    public_keys: PublicKeys,
    network_config: Option<NetworkRef>,
}

/// `public_keys` in every shape cloud-init accepts (`normalize_pubkey_data`): Nova's
/// `{"name": "key"}`, a list per name, a plain list or one string. What is not a string
/// is passed over, as cloud-init passes it over.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PublicKeys {
    Named(std::collections::BTreeMap<String, serde_json::Value>),
    List(Vec<serde_json::Value>),
    One(String),
    Other(serde_json::Value),
}

impl Default for PublicKeys {
    fn default() -> Self {
        PublicKeys::List(Vec::new())
    }
}

impl PublicKeys {
    fn into_keys(self) -> Vec<String> {
        let strings = |v: serde_json::Value| -> Vec<String> {
            match v {
                serde_json::Value::String(k) => vec![k],
                serde_json::Value::Array(items) => items
                    .into_iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect(),
                _ => Vec::new(),
            }
        };
        let keys = match self {
            PublicKeys::Named(map) => map.into_values().flat_map(strings).collect(),
            PublicKeys::List(items) => strings(serde_json::Value::Array(items)),
            PublicKeys::One(k) => vec![k],
            PublicKeys::Other(v) => strings(v),
        };
        keys.into_iter().filter(|k| !k.is_empty()).collect()
    }
}

#[derive(Debug, Deserialize)]
struct NetworkRef {
    content_path: String,
}

/// The parts of `meta_data.json` nixseed uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigDriveMeta {
    pub instance_id: String,
    pub hostname: Option<String>,
    pub public_keys: Vec<String>,
    /// Path of the ENI file relative to `openstack/` (e.g. `content/0000`), validated to
    /// stay inside the drive.
    pub network_path: Option<String>,
}

pub fn parse_meta_data(bytes: &[u8], origin: &str) -> Result<ConfigDriveMeta, ConfigDriveError> {
    let fail = |detail: String| ConfigDriveError {
        origin: origin.to_string(),
        detail,
    };
    // Through a JSON value first: a key given twice keeps its last value, as Python's
    // json (and so cloud-init) reads it, instead of refusing the file.
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| fail(format!("malformed JSON: {e}")))?;
    let raw: RawMeta =
        serde_json::from_value(value).map_err(|e| fail(format!("unexpected content: {e}")))?;
    // cloud-init refuses a drive without one (`BrokenMetadata`): it is the instance-id,
    // so a fixed stand-in would hide every later change of the drive.
    let Some(uuid) = raw.uuid.filter(|u| !u.trim().is_empty()) else {
        return Err(fail(
            "no `uuid`: it is the instance-id, and cloud-init refuses a drive without it too"
                .into(),
        ));
    };
    let network_path = match raw.network_config {
        Some(n) => {
            let rel = n.content_path.trim_start_matches('/');
            if rel.split('/').any(|c| c == ".." || c.is_empty()) {
                return Err(ConfigDriveError {
                    origin: origin.to_string(),
                    detail: format!(
                        "network_config.content_path '{}' leaves the drive",
                        n.content_path
                    ),
                });
            }
            Some(rel.to_string())
        }
        None => None,
    };
    Ok(ConfigDriveMeta {
        instance_id: uuid,
        hostname: raw.hostname.or(raw.name),
        public_keys: raw.public_keys.into_keys(),
        network_path,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxmox_meta_data_json() {
        let m = parse_meta_data(
            br#"{"uuid": "6f1c", "network_config": {"content_path": "/content/0000"}}"#,
            "meta_data.json",
        )
        .unwrap();
        assert_eq!(m.instance_id, "6f1c");
        assert_eq!(m.network_path.as_deref(), Some("content/0000"));
    }

    #[test]
    fn meta_data_as_python_reads_it() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8 op";
        for keys in [
            format!(r#"{{"k": "{key}"}}"#),
            format!(r#"{{"k": ["{key}", "", 7], "n": null}}"#),
            format!(r#"["{key}"]"#),
            format!(r#""{key}""#),
        ] {
            let json =
                format!(r#"{{"uuid": "a", "hostname": "x", "uuid": "b", "public_keys": {keys}}}"#);
            let m = parse_meta_data(json.as_bytes(), "meta_data.json").unwrap();
            assert_eq!(m.instance_id, "b", "{json}");
            assert_eq!(m.public_keys, [key], "{json}");
        }
    }

    #[test]
    fn a_drive_without_uuid_is_refused() {
        for json in [
            r#"{"hostname": "alpha"}"#,
            r#"{"uuid": " ", "hostname": "alpha"}"#,
        ] {
            let e = parse_meta_data(
                json.as_bytes(),
                "configdrive:/dev/sr0/latest/meta_data.json",
            )
            .unwrap_err()
            .to_string();
            assert!(
                e.starts_with("configdrive:/dev/sr0/latest/meta_data.json: no `uuid`"),
                "{e}"
            );
        }
    }

    #[test]
    fn content_path_cannot_escape() {
        let e = parse_meta_data(
            br#"{"uuid": "x", "network_config": {"content_path": "/../../etc/shadow"}}"#,
            "meta_data.json",
        )
        .unwrap_err();
        assert!(e.to_string().contains("leaves the drive"));
    }
}
