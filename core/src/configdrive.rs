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
    public_keys: std::collections::BTreeMap<String, String>,
    network_config: Option<NetworkRef>,
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
    let raw: RawMeta = serde_json::from_slice(bytes).map_err(|e| ConfigDriveError {
        origin: origin.to_string(),
        detail: format!("malformed JSON: {e}"),
    })?;
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
        instance_id: raw.uuid.unwrap_or_else(|| "iid-configdrive".into()),
        hostname: raw.hostname.or(raw.name),
        public_keys: raw.public_keys.into_values().collect(),
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
    fn content_path_cannot_escape() {
        let e = parse_meta_data(
            br#"{"uuid": "x", "network_config": {"content_path": "/../../etc/shadow"}}"#,
            "meta_data.json",
        )
        .unwrap_err();
        assert!(e.to_string().contains("leaves the drive"));
    }
}
