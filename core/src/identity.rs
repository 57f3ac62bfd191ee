//! The identity contract: the files under `/var/identity`, their modes, and how a seed
//! becomes that file tree. Everyone (agent, seedctl, NixOS module, vm-tests) uses these names.

use std::collections::BTreeMap;

/// One file of an identity generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFile {
    pub mode: u32,
    pub bytes: Vec<u8>,
}

/// The flat file names of the identity contract (DESIGN.md), with their modes.
pub const MACHINE_ID: &str = "machine-id";
pub const HOSTNAME: &str = "hostname";
pub const SSH_HOST_KEY: &str = "ssh_host_ed25519_key";
pub const SSH_HOST_KEY_PUB: &str = "ssh_host_ed25519_key.pub";
pub const RESOLV_CONF: &str = "resolv.conf";
pub const HOSTS: &str = "hosts";
pub const TCP_PORTS: &str = "tcp_ports";
pub const UDP_PORTS: &str = "udp_ports";
pub const ADMIN_KEYS: &str = "admin_authorized_keys";
pub const USER_KEYS: &str = "user_authorized_keys";
pub const NETWORK_DIR: &str = "network";
pub const MANIFEST: &str = "manifest.json";

/// Mode of a contract file; `network/*.network` files are 0644.
pub fn mode_of(name: &str) -> u32 {
    match name {
        MACHINE_ID => 0o444,
        SSH_HOST_KEY => 0o600,
        _ => 0o644,
    }
}

/// The complete file tree of one generation, keyed by relative path
/// (`hostname`, `network/10-cloud-init-eth0.network`, ...). The manifest is not in here:
/// it is derived from this tree when the generation is written.
pub type IdentityTree = BTreeMap<String, IdentityFile>;
