//! The NoCloud seed files (`meta-data`, `user-data`, `network-config`) for one identity.
//! Plain cloud-init reads them as it reads a Proxmox seed; the nixseed agent also reads
//! the `nixseed:` block. Strings are written as double-quoted YAML scalars (JSON string
//! syntax is valid YAML), so a hostname like `0123` stays a string under YAML 1.1.
//!
//! Decisions:
//! - Admin keys go to `ssh_authorized_keys` with `disable_root: false`: cloud-init puts
//!   them on the default user and on root, and `seedctl ssh` logs in as root.
//! - User keys, when there are any, become a locked-password user named `user` in
//!   `users:` besides `default`; the nixseed agent writes them to `user_authorized_keys`.
//! - Password login is off (`ssh_pwauth: false`): the seed carries no passwords.

use crate::machine::Identity;
use crate::names::hex;

/// The three seed files, in the order they appear on the volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeedFiles {
    pub meta_data: String,
    pub user_data: String,
    pub network_config: String,
    /// The signed manifest and its signature, when seeds are signed ([`crate::signing`]).
    pub extra: Vec<(String, Vec<u8>)>,
}

impl SeedFiles {
    /// The files as nixseed-core's seed parser and the control channel take them.
    pub fn to_core(&self) -> nixseed_core::seed::SeedFiles {
        nixseed_core::seed::SeedFiles(
            self.as_list()
                .iter()
                .map(|(n, b)| ((*n).to_owned(), b.to_vec()))
                .collect(),
        )
    }

    pub fn as_list(&self) -> Vec<(&str, &[u8])> {
        let mut list = vec![
            ("meta-data", self.meta_data.as_bytes()),
            ("network-config", self.network_config.as_bytes()),
            ("user-data", self.user_data.as_bytes()),
        ];
        list.extend(self.extra.iter().map(|(n, b)| (n.as_str(), b.as_slice())));
        list.sort_by_key(|(n, _)| *n);
        list
    }
}

fn q(s: &str) -> String {
    // JSON's escapes are YAML's too. JSON leaves DEL, the C1 controls and U+FFFE/U+FFFF
    // raw, which YAML does not allow in a document (PyYAML refuses the file), and NEL and
    // the Unicode line separators, which YAML folds into a space.
    let json = serde_json::Value::String(s.to_owned()).to_string();
    let mut out = String::with_capacity(json.len());
    for c in json.chars() {
        if matches!(
            c,
            '\u{7f}'..='\u{9f}' | '\u{2028}' | '\u{2029}' | '\u{fffe}' | '\u{ffff}'
        ) {
            out.push_str(&format!("\\u{:04x}", u32::from(c)));
        } else {
            out.push(c);
        }
    }
    out
}

/// `nixseed-` plus the first 32 hex digits of the identity digest.
pub fn instance_id(id: &Identity) -> String {
    format!("nixseed-{}", &hex(&id.digest())[..32])
}

pub fn meta_data(id: &Identity) -> String {
    format!(
        "instance-id: {}\nlocal-hostname: {}\n",
        q(&instance_id(id)),
        q(&id.hostname)
    )
}

fn list(out: &mut String, indent: &str, key: &str, items: &[String], plain: bool) {
    if items.is_empty() {
        out.push_str(&format!("{indent}{key}: []\n"));
        return;
    }
    out.push_str(&format!("{indent}{key}:\n"));
    for i in items {
        let v = if plain { i.clone() } else { q(i) };
        out.push_str(&format!("{indent}  - {v}\n"));
    }
}

pub fn user_data(id: &Identity) -> String {
    let mut u = String::from("#cloud-config\n");
    u.push_str(&format!("hostname: {}\n", q(id.short_hostname())));
    if let Some(fqdn) = id.fqdn() {
        u.push_str(&format!("fqdn: {}\n", q(&fqdn)));
    }
    u.push_str("manage_etc_hosts: true\n");
    u.push_str("disable_root: false\n");
    u.push_str("ssh_pwauth: false\n");
    u.push_str("ssh_keys:\n  ed25519_private: |\n");
    for line in id.host_key.lines() {
        u.push_str(&format!("    {line}\n"));
    }
    u.push_str(&format!("  ed25519_public: {}\n", q(&id.host_key_pub)));
    list(&mut u, "", "ssh_authorized_keys", &id.admin_keys, false);
    u.push_str("users:\n  - default\n");
    if !id.user_keys.is_empty() {
        u.push_str("  - name: \"user\"\n    lock_passwd: true\n");
        list(&mut u, "    ", "ssh_authorized_keys", &id.user_keys, false);
    }
    u.push_str("nixseed:\n");
    u.push_str(&format!("  machine-id: {}\n", q(&id.machine_id)));
    u.push_str(&format!("  product-uuid: {}\n", q(&id.product_uuid)));
    // Ports were validated as `N` or `N-M`, so they are safe plain scalars.
    list(&mut u, "  ", "tcp_ports", &id.tcp_ports, true);
    list(&mut u, "  ", "udp_ports", &id.udp_ports, true);
    list(&mut u, "  ", "hosts", &id.hosts, false);
    u.push_str(&format!("  resolv_conf: {}\n", q(&id.resolv_conf)));
    u
}

/// The machine's own `network-config` when it has one, else DHCPv4 on the NIC carrying
/// the machine's MAC ([`Identity::mac`], which `seedctl run` and `seedctl xml` give the
/// VM). A `match: name:` glob would not do: cloud-init's networkd renderer (and nixseed's,
/// which follows it) writes the id key as `Name=`, not the glob. With `macaddress` and no
/// `set-name` both find the guest's own interface name by MAC and keep it, so the
/// rendered file carries `Name=<guest NIC>` and `MACAddress=`.
pub fn network_config(id: &Identity) -> String {
    if let Some(nc) = &id.network_config {
        return nc.clone();
    }
    format!(
        "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: {}\n    dhcp4: true\n",
        q(&id.mac())
    )
}

/// The seed files of a machine: the one source of the seed ISO, the vfat image, `render`
/// and the control channel's `push` bundle, so they can never disagree.
pub fn seed_files(id: &Identity) -> SeedFiles {
    SeedFiles {
        meta_data: meta_data(id),
        user_data: user_data(id),
        network_config: network_config(id),
        extra: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::q;

    #[test]
    fn quoted_scalars_escape_what_yaml_does_not_allow_raw() {
        let text = "a\u{7f}b\u{85}c\u{9f}d\u{fffe}e\"f\\g\u{1}h\u{e9}\u{2028}i";
        let quoted = q(text);
        assert!(
            !quoted.contains(['\u{7f}', '\u{9f}', '\u{fffe}', '\u{1}']),
            "{quoted}"
        );
        let back = nixseed_core::yaml::parse_mapping(&format!("k: {quoted}\n"), "t").unwrap();
        assert_eq!(back["k"].as_str(), Some(text));
    }
}
