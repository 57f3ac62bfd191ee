//! network-config (v1, v2, ConfigDrive ENI) and its rendering to systemd-networkd files.

use std::collections::BTreeMap;

/// A parsed network-config, whatever form it came in.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NetworkConfig {}

/// What the seed says about networking.
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkSetting {
    /// `{config: disabled}`: leave networking alone.
    Disabled,
    Config(NetworkConfig),
}

/// A network interface present in the guest, used to match `mac_address` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    /// Lowercase, colon-separated.
    pub mac: String,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{origin}: {detail}")]
    Invalid { origin: String, detail: String },
}

/// Parses a network-config document (v1 or v2, optionally under a top-level `network:`).
/// `origin` names the file in errors.
pub fn parse(_bytes: &[u8], _origin: &str) -> Result<NetworkSetting, NetworkError> {
    Ok(NetworkSetting::Config(NetworkConfig::default()))
}

/// Parses Debian ENI text (ConfigDrive2 `content/0000`).
pub fn parse_eni(_text: &str, _origin: &str) -> Result<NetworkConfig, NetworkError> {
    Ok(NetworkConfig::default())
}

/// Renders systemd-networkd files: file name → content.
pub fn render_networkd(_cfg: &NetworkConfig, _links: &[Link]) -> BTreeMap<String, String> {
    BTreeMap::new()
}
