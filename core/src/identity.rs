//! The identity contract: the files under `/var/identity`, their modes, and how a seed
//! becomes that file tree. Everyone (agent, seedctl, NixOS module, vm-tests) uses these names.

use std::collections::BTreeMap;

/// One file of an identity generation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdentityFile {
    pub mode: u32,
    pub bytes: Vec<u8>,
}

/// The flat file names of the identity contract (docs/identity.md), with their modes.
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

/// The files every composed identity holds (a machine directory on the host too).
pub const ALWAYS: [&str; 10] = [
    MACHINE_ID,
    HOSTNAME,
    SSH_HOST_KEY,
    SSH_HOST_KEY_PUB,
    RESOLV_CONF,
    HOSTS,
    TCP_PORTS,
    UDP_PORTS,
    ADMIN_KEYS,
    USER_KEYS,
];

/// Mode of a contract file; `network/*.network` files are 0644.
pub fn mode_of(name: &str) -> u32 {
    match name {
        MACHINE_ID => 0o444,
        // Crypt hashes, like /etc/shadow: for root (user provisioning) only.
        SSH_HOST_KEY | USERS => 0o600,
        _ => 0o644,
    }
}

/// The complete file tree of one generation, keyed by relative path
/// (`hostname`, `network/10-cloud-init-eth0.network`, ...). The manifest is not in here:
/// it is derived from this tree when the generation is written.
pub type IdentityTree = BTreeMap<String, IdentityFile>;

use crate::network::{self, Link, NetworkSetting};
use crate::seed::Seed;
use crate::userdata::{CloudConfig, User};

/// Users beyond the two authorized-keys files, for the image's user provisioning
/// (`users.json`, an extension of the contract; written only when the seed has users).
pub const USERS: &str = "users.json";
/// cloud-init's `bootcmd` (every boot) and `runcmd` (once per instance) as shell scripts;
/// run by stage 2 only with `--run-commands` (extensions of the contract, written only
/// when the seed has commands).
pub const BOOTCMD: &str = "bootcmd";
pub const RUNCMD: &str = "runcmd";

#[derive(Debug, thiserror::Error)]
#[error("{origin}: key '{key}': {detail}")]
pub struct IdentityError {
    pub origin: String,
    pub key: String,
    pub detail: String,
}

/// Where fresh secrets come from. The agent and seedctl use the OS RNG; unit tests use a
/// named fake so that compose stays a pure function.
pub trait Fresh {
    /// 32 lowercase hex digits, not all zero.
    fn machine_id(&mut self) -> String;
    /// An ed25519 host key pair in OpenSSH format: (private, public line).
    fn host_key(&mut self, comment: &str) -> Result<(String, String), String>;
}

/// Inputs to [`compose`] besides the seed.
#[derive(Debug, Clone, Default)]
pub struct ComposeContext {
    /// The guest's network interfaces, to match `mac_address` entries.
    pub links: Vec<Link>,
    /// Regenerate machine-id and host keys (a clone under the `regenerate` policy).
    pub regenerate: bool,
}

/// Turns a seed into the complete identity tree. `previous` is the current generation:
/// values the seed does not carry (host keys, machine-id) are kept from it.
pub fn compose(
    seed: &Seed,
    previous: Option<&IdentityTree>,
    ctx: &ComposeContext,
    fresh: &mut dyn Fresh,
) -> Result<IdentityTree, IdentityError> {
    let user_origin = seed.user_origin();
    let err = |key: &str, detail: String| IdentityError {
        origin: user_origin.clone(),
        key: key.to_string(),
        detail,
    };
    let network_err = |detail: String| IdentityError {
        origin: seed.network_origin(),
        key: "network".to_string(),
        detail,
    };
    let cfg = merged(seed);
    let prev = |name: &str| previous.and_then(|p| p.get(name)).map(|f| f.bytes.clone());
    let mut tree = IdentityTree::new();
    let mut put = |name: &str, bytes: Vec<u8>| {
        tree.insert(
            name.to_string(),
            IdentityFile {
                mode: mode_of(name),
                bytes,
            },
        );
    };

    // machine-id
    let machine_id = match (&cfg.nixseed.machine_id, ctx.regenerate) {
        (_, true) => fresh.machine_id(),
        (Some(id), false) => {
            let id = id.trim().to_ascii_lowercase();
            check_machine_id(&id).map_err(|d| err("nixseed.machine-id", d))?;
            id
        }
        (None, false) => match prev(MACHINE_ID) {
            Some(b) if check_machine_id(String::from_utf8_lossy(&b).trim()).is_ok() => {
                String::from_utf8_lossy(&b).trim().to_string()
            }
            _ => fresh.machine_id(),
        },
    };
    put(MACHINE_ID, format!("{machine_id}\n").into_bytes());

    // hostname and /etc/hosts extras
    let (hostname, fqdn) = hostname_and_fqdn(&cfg, seed);
    let check = |n: &Named| {
        check_hostname(&n.name).map_err(|detail| IdentityError {
            origin: if n.meta {
                seed.meta_origin()
            } else {
                user_origin.clone()
            },
            key: n.key.to_string(),
            detail,
        })
    };
    let fqdn = match fqdn {
        Some(f) => {
            check(&f)?;
            Some(f.name)
        }
        None => None,
    };
    let short = match hostname {
        Some(h) => {
            check(&h)?;
            Some(h.name)
        }
        None => None,
    };
    // preserve_hostname keeps the name the machine has (the current generation's, or the
    // image's fallback on a first boot); prefer_fqdn_over_hostname names it by its FQDN.
    let hostname = match (&short, &fqdn) {
        _ if cfg.preserve_hostname == Some(true) => prev(HOSTNAME).unwrap_or_default(),
        (Some(_), Some(f)) if cfg.prefer_fqdn_over_hostname == Some(true) => {
            format!("{f}\n").into_bytes()
        }
        (Some(h), _) => format!("{h}\n").into_bytes(),
        (None, _) => prev(HOSTNAME).unwrap_or_default(),
    };
    put(HOSTNAME, hostname.clone());
    let mut hosts = String::new();
    if cfg.manage_etc_hosts == Some(true) {
        let short = short.unwrap_or_else(|| String::from_utf8_lossy(&hostname).trim().to_string());
        if !short.is_empty() {
            match &fqdn {
                Some(f) if f != &short => hosts.push_str(&format!("127.0.1.1 {f} {short}\n")),
                _ => hosts.push_str(&format!("127.0.1.1 {short}\n")),
            }
        }
    }
    for line in &cfg.nixseed.hosts {
        if line.contains(['\n', '\0']) {
            return Err(err("nixseed.hosts", "an entry spans several lines".into()));
        }
        // seedctl writes the manage_etc_hosts line into the block too: keep one copy.
        if !hosts.lines().any(|l| l == line.trim()) {
            hosts.push_str(line.trim());
            hosts.push('\n');
        }
    }
    put(HOSTS, hosts.into_bytes());

    // SSH host key
    let seeded_key = (
        cfg.ssh_keys.get("ed25519_private"),
        cfg.ssh_keys.get("ed25519_public"),
    );
    let (private, public) = match seeded_key {
        (Some(private), Some(public)) if !ctx.regenerate => {
            if !private.contains("BEGIN OPENSSH PRIVATE KEY") {
                return Err(err(
                    "ssh_keys.ed25519_private",
                    "not an OpenSSH private key".into(),
                ));
            }
            if !public.starts_with("ssh-ed25519 ") {
                return Err(err(
                    "ssh_keys.ed25519_public",
                    "not an ssh-ed25519 public key".into(),
                ));
            }
            (ensure_newline(private), ensure_newline(public))
        }
        _ => match (prev(SSH_HOST_KEY), prev(SSH_HOST_KEY_PUB), ctx.regenerate) {
            (Some(k), Some(p), false) if !k.is_empty() => (
                String::from_utf8_lossy(&k).into_owned(),
                String::from_utf8_lossy(&p).into_owned(),
            ),
            _ => {
                let (k, p) = fresh
                    .host_key("nixseed")
                    .map_err(|e| err("ssh_keys", format!("cannot generate a host key: {e}")))?;
                (ensure_newline(&k), ensure_newline(&p))
            }
        },
    };
    put(SSH_HOST_KEY, private.into_bytes());
    put(SSH_HOST_KEY_PUB, public.into_bytes());

    // resolv.conf
    let resolv = match (&cfg.nixseed.resolv_conf, &cfg.resolv_conf) {
        (Some(text), _) => ensure_newline(text),
        (None, Some(rc)) => {
            let mut s = String::new();
            for ns in &rc.nameservers {
                s.push_str(&format!("nameserver {ns}\n"));
            }
            let mut search = rc.searchdomains.clone();
            if let Some(d) = &rc.domain {
                s.push_str(&format!("domain {d}\n"));
                if search.is_empty() {
                    search.push(d.clone());
                }
            }
            if !search.is_empty() {
                s.push_str(&format!("search {}\n", search.join(" ")));
            }
            if !rc.options.is_empty() {
                s.push_str(&format!("options {}\n", rc.options.join(" ")));
            }
            s
        }
        (None, None) => match &seed.network {
            Some(NetworkSetting::Config(n)) => resolv_from_network(n).map_err(network_err)?,
            _ => String::new(),
        },
    };
    put(RESOLV_CONF, resolv.into_bytes());

    // firewall ports
    for (name, key, ports) in [
        (TCP_PORTS, "nixseed.tcp_ports", &cfg.nixseed.tcp_ports),
        (UDP_PORTS, "nixseed.udp_ports", &cfg.nixseed.udp_ports),
    ] {
        let mut out = String::new();
        for p in ports {
            out.push_str(&check_port(p).map_err(|d| err(key, d))?);
            out.push('\n');
        }
        put(name, out.into_bytes());
    }

    // authorized keys: see docs/identity.md for who counts as admin.
    let mut admin: Vec<String> = cfg.ssh_authorized_keys.clone();
    // meta-data keys as cloud-init normalises them: each line a key (Nova ends them with a
    // newline), blank lines dropped.
    admin.extend(
        seed.public_keys
            .iter()
            .flat_map(|k| k.lines())
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(str::to_string),
    );
    let mut user_keys = Vec::new();
    for u in &cfg.users {
        if is_admin(u) {
            admin.extend(u.ssh_authorized_keys.iter().cloned());
        } else {
            user_keys.extend(u.ssh_authorized_keys.iter().cloned());
        }
    }
    for (name, keys) in [(ADMIN_KEYS, admin), (USER_KEYS, user_keys)] {
        let mut seen = std::collections::BTreeSet::new();
        let mut out = String::new();
        for k in keys {
            if k.contains('\n') {
                return Err(err(
                    "ssh_authorized_keys",
                    "a key spans several lines".into(),
                ));
            }
            if seen.insert(k.clone()) {
                out.push_str(&k);
                out.push('\n');
            }
        }
        put(name, out.into_bytes());
    }

    // users beyond the key files, and ssh_pwauth (docs/identity.md, "Passwords")
    if !cfg.users.is_empty() || !cfg.chpasswd.is_empty() || cfg.ssh_pwauth.is_some() {
        let doc = serde_json::json!({
            "users": cfg.users,
            "ssh_pwauth": cfg.ssh_pwauth,
            "chpasswd": cfg.chpasswd.hashes(),
        });
        let mut bytes = serde_json::to_vec_pretty(&doc).unwrap_or_default();
        bytes.push(b'\n');
        put(USERS, bytes);
    }

    // commands, as scripts
    for (name, commands) in [(BOOTCMD, &cfg.bootcmd), (RUNCMD, &cfg.runcmd)] {
        if !commands.is_empty() {
            let mut script = String::from(
                "#!/bin/sh\n# From the seed's user-data; run by nixseed-agent apply --run-commands.\nset -e\n",
            );
            for c in commands {
                script.push_str(c);
                script.push('\n');
            }
            put(name, script.into_bytes());
        }
    }

    // networkd
    if let Some(NetworkSetting::Config(net)) = &seed.network {
        let mut net = net.clone();
        if seed.network_from_eni {
            network::adopt_single_link(&mut net, &ctx.links);
        }
        let files = network::render_networkd(&net, &ctx.links).map_err(network_err)?;
        for (file, content) in files {
            if file.contains('/') || file.starts_with('.') {
                return Err(network_err(format!(
                    "an interface name that cannot be a file name: {file}"
                )));
            }
            put(&format!("{NETWORK_DIR}/{file}"), content.into_bytes());
        }
    }
    Ok(tree)
}

/// resolv.conf from network-config's nameservers (global, per interface, per subnet),
/// in order of appearance without repeats. Static configs need it: with no DHCP, nothing
/// else tells the resolver where to go.
fn resolv_from_network(n: &network::NetworkConfig) -> Result<String, String> {
    let mut servers: Vec<&String> = n.nameservers.iter().collect();
    let mut search: Vec<&String> = n.search.iter().collect();
    for i in &n.interfaces {
        if let Some(d) = &i.dns {
            servers.extend(&d.nameservers);
            search.extend(&d.search);
        }
        for s in &i.subnets {
            servers.extend(&s.dns_nameservers);
            search.extend(&s.dns_search);
        }
    }
    if let Some(bad) = servers
        .iter()
        .chain(&search)
        .find(|v| v.chars().any(char::is_control))
    {
        return Err(format!(
            "nameserver or search domain {bad:?} holds a line break or another control character"
        ));
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut out = String::new();
    for ns in servers {
        if seen.insert(ns) {
            out.push_str(&format!("nameserver {ns}\n"));
        }
    }
    let mut seen = std::collections::BTreeSet::new();
    let search: Vec<&str> = search
        .into_iter()
        .filter(|d| seen.insert(*d))
        .map(String::as_str)
        .collect();
    if !search.is_empty() {
        out.push_str(&format!("search {}\n", search.join(" ")));
    }
    Ok(out)
}

/// user-data over vendor-data, key by key.
fn merged(seed: &Seed) -> CloudConfig {
    match &seed.vendor {
        Some(v) => seed.user.clone().over(v.clone()),
        None => seed.user.clone(),
    }
}

/// A name and the seed key it came from, for messages.
struct Named {
    name: String,
    key: &'static str,
    /// From meta-data rather than user-data.
    meta: bool,
}

/// The short hostname and the FQDN, as cloud-init's `get_hostname_fqdn` picks them:
/// `fqdn`, else a dotted `hostname`, else meta-data's `local-hostname` as the FQDN with
/// user-data's `hostname` (when given) as the short name.
fn hostname_and_fqdn(cfg: &CloudConfig, seed: &Seed) -> (Option<Named>, Option<Named>) {
    let user = |name: &str, key| Named {
        name: name.to_string(),
        key,
        meta: false,
    };
    let short = |name: &str| name.split_once('.').map_or(name, |(s, _)| s).to_string();
    if let Some(fqdn) = &cfg.fqdn {
        let host = match &cfg.hostname {
            Some(h) => user(h, "hostname"),
            None => user(&short(fqdn), "fqdn"),
        };
        return (Some(host), Some(user(fqdn, "fqdn")));
    }
    if let Some(h) = cfg.hostname.as_deref().filter(|h| h.contains('.')) {
        return (Some(user(&short(h), "hostname")), Some(user(h, "hostname")));
    }
    // An IPv4 address as local-hostname is the name `ip-10-0-0-5`, as cloud-init's
    // get_hostname makes it (without a reverse lookup), not the host `10`.
    let meta = seed.local_hostname.as_deref().map(|h| Named {
        name: match h.parse::<std::net::Ipv4Addr>() {
            Ok(_) => format!("ip-{}", h.replace('.', "-")),
            Err(_) => h.to_string(),
        },
        key: "local-hostname",
        meta: true,
    });
    match (&cfg.hostname, meta) {
        (Some(h), meta) => (
            Some(user(h, "hostname")),
            meta.filter(|m| m.name.contains('.')),
        ),
        (None, Some(m)) if m.name.contains('.') => (
            Some(Named {
                name: short(&m.name),
                ..m
            }),
            Some(m),
        ),
        (None, m) => (m, None),
    }
}

fn is_admin(u: &User) -> bool {
    u.name == "root"
        || !u.sudo.is_empty()
        || u.groups
            .iter()
            .any(|g| matches!(g.as_str(), "wheel" | "sudo" | "admin"))
}

fn ensure_newline(s: &str) -> String {
    let t = s.trim_end_matches('\n');
    format!("{t}\n")
}

/// A hostname or FQDN: dot-separated labels of letters, digits and `-`, each 1–63 bytes,
/// not starting or ending with `-`; 253 bytes in all.
pub fn check_hostname(name: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "{name:?} is not a valid hostname (letters, digits and '-' in dot-separated labels of 1-63 characters)"
        )
    };
    if name.is_empty() || name.len() > 253 {
        return Err(bad());
    }
    for label in name.split('.') {
        if label.is_empty()
            || label.len() > 63
            || label.starts_with('-')
            || label.ends_with('-')
            || !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            return Err(bad());
        }
    }
    Ok(())
}

/// systemd's machine-id format: 32 lowercase hex digits, not all zero.
pub fn check_machine_id(id: &str) -> Result<(), String> {
    if id.len() != 32
        || !id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return Err(format!("{id:?} is not 32 lowercase hex digits"));
    }
    if id.bytes().all(|b| b == b'0') {
        return Err("an all-zero machine-id is invalid".into());
    }
    Ok(())
}

/// A port or an inclusive range, `22` or `8000-8080`; returned in canonical form.
pub fn check_port(p: &str) -> Result<String, String> {
    let num = |s: &str| -> Result<u16, String> {
        match s.trim().parse::<u16>() {
            Ok(n) if n > 0 => Ok(n),
            _ => Err(format!(
                "{p:?} is not a port (1-65535) or a range like 8000-8080"
            )),
        }
    };
    match p.split_once('-') {
        Some((a, b)) => {
            let (a, b) = (num(a)?, num(b)?);
            if a > b {
                return Err(format!("{p:?}: the range is reversed"));
            }
            Ok(format!("{a}-{b}"))
        }
        None => Ok(num(p)?.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seed::{Seed, SeedFiles};

    /// A fake entropy source: counts up so tests can tell fresh values apart.
    struct FakeFresh(u32);
    impl Fresh for FakeFresh {
        fn machine_id(&mut self) -> String {
            self.0 += 1;
            format!("{:032x}", self.0)
        }
        fn host_key(&mut self, _c: &str) -> Result<(String, String), String> {
            self.0 += 1;
            Ok((
                format!(
                    "-----BEGIN OPENSSH PRIVATE KEY-----\nfake{}\n-----END OPENSSH PRIVATE KEY-----\n",
                    self.0
                ),
                format!("ssh-ed25519 FAKE{} nixseed\n", self.0),
            ))
        }
    }

    fn seed(meta: &str, user: &str) -> Seed {
        let files = SeedFiles(
            [("meta-data", meta), ("user-data", user)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        );
        Seed::from_nocloud(&files, "nocloud:test", None).unwrap()
    }

    /// A libvirt domain named `my_vm` (virt-install's local-hostname) or `hostname:
    /// Web_01` names no hostname systemd takes: the name is dropped with a warning that
    /// names the file and the rest of the seed applies; an FQDN's trailing dot is taken
    /// off; a name that is a path still refuses the seed.
    #[test]
    fn a_hostname_systemd_would_not_take_is_dropped_and_the_rest_applies() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA0 a@b";
        let s = seed(
            "instance-id: i\nlocal-hostname: my_vm\n",
            &format!("#cloud-config\nssh_authorized_keys: ['{key}']\n"),
        );
        assert!(
            s.warnings.iter().any(|w| w.contains(
                "nocloud:test/meta-data: key 'local-hostname': \"my_vm\" is not a hostname"
            )),
            "{:?}",
            s.warnings
        );
        let t = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap();
        assert_eq!(t[HOSTNAME].bytes, b"");
        assert!(String::from_utf8_lossy(&t[ADMIN_KEYS].bytes).contains(key));
        let s = seed(
            "instance-id: i\n",
            "#cloud-config\nhostname: Web_01\nfqdn: web1.example.com.\nmanage_etc_hosts: true\n",
        );
        let t = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap();
        assert_eq!(t[HOSTNAME].bytes, b"web1\n");
        assert_eq!(t[HOSTS].bytes, b"127.0.1.1 web1.example.com web1\n");
        let s = seed("instance-id: i\n", "#cloud-config\nhostname: ../../etc\n");
        let e = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap_err();
        assert!(e.to_string().contains("not a valid hostname"), "{e}");
    }

    /// A vendor snippet (Proxmox's `cicustom: vendor=...`) gives `ssh_pwauth` and
    /// `chpasswd` where user-data does not; user-data's own value wins.
    #[test]
    fn vendor_data_gives_ssh_pwauth_and_passwords_under_user_data() {
        let files = |user: &str| {
            SeedFiles(
                [
                    ("meta-data", "instance-id: v\n"),
                    ("user-data", user),
                    (
                        "vendor-data",
                        "#cloud-config\nssh_pwauth: true\nchpasswd: {list: ['root:$6$a$b']}\n",
                    ),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
            )
        };
        let users = |user: &str| {
            let s = Seed::from_nocloud(&files(user), "nocloud:test", None).unwrap();
            let t = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap();
            crate::shadow::Accounts::parse(&t[USERS].bytes, USERS).unwrap()
        };
        let a = users("#cloud-config\nhostname: v\n");
        assert_eq!(a.ssh_pwauth, Some(true));
        assert_eq!(a.chpasswd["root"], "$6$a$b");
        assert_eq!(
            users("#cloud-config\nssh_pwauth: false\n").ssh_pwauth,
            Some(false)
        );
        // Proxmox's user-data with a vendor snippet listing passwords: cloud-init's merged
        // `chpasswd:` has a list, so the legacy `password:` does not count.
        let a = users("#cloud-config\nuser: admin\npassword: $5$s$h\nchpasswd: {expire: False}\n");
        let admin = a.users.iter().find(|u| u.name == "admin").unwrap();
        assert_eq!(admin.passwd, None);
        assert_eq!(a.chpasswd["root"], "$6$a$b");
    }

    /// `user:` in user-data and the legacy `password:` in vendor-data (or the other way
    /// round) meet, as in cloud-init's merged config: the default user gets the hash.
    #[test]
    fn the_legacy_password_meets_the_default_user_across_user_and_vendor_data() {
        let users = |user: &str, vendor: &str| {
            let files = SeedFiles(
                [
                    ("meta-data", "instance-id: v\n"),
                    ("user-data", user),
                    ("vendor-data", vendor),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
            );
            let s = Seed::from_nocloud(&files, "nocloud:test", None).unwrap();
            let t = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap();
            let a = crate::shadow::Accounts::parse(&t[USERS].bytes, USERS).unwrap();
            a.users
                .iter()
                .find(|u| u.name == "admin")
                .and_then(|u| u.passwd.clone())
        };
        let hash = Some("$6$s$h".to_owned());
        assert_eq!(
            users(
                "#cloud-config\nuser: admin\n",
                "#cloud-config\npassword: $6$s$h\n"
            ),
            hash
        );
        assert_eq!(
            users(
                "#cloud-config\npassword: $6$s$h\n",
                "#cloud-config\nuser: admin\n"
            ),
            hash
        );
        // User-data's password wins over vendor-data's.
        assert_eq!(
            users(
                "#cloud-config\nuser: admin\npassword: $6$s$h\n",
                "#cloud-config\npassword: $6$v$v\n"
            ),
            hash
        );
    }

    #[test]
    fn proxmox_seed_composes_the_contract_files() {
        let s = seed(
            "instance-id: abc\n",
            "#cloud-config\nhostname: web1\nmanage_etc_hosts: true\nfqdn: web1.example.com\nuser: admin\nssh_authorized_keys:\n  - ssh-ed25519 AAAA admin\n",
        );
        let t = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap();
        assert_eq!(t[HOSTNAME].bytes, b"web1\n");
        assert_eq!(t[HOSTS].bytes, b"127.0.1.1 web1.example.com web1\n");
        let dup = seed(
            "",
            "#cloud-config\nfqdn: web1.example.com\nmanage_etc_hosts: true\nnixseed:\n  hosts: ['127.0.1.1 web1.example.com web1', '10.0.0.5 db']\n",
        );
        let t2 = compose(&dup, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap();
        assert_eq!(
            t2[HOSTS].bytes,
            b"127.0.1.1 web1.example.com web1\n10.0.0.5 db\n"
        );
        assert_eq!(t[ADMIN_KEYS].bytes, b"ssh-ed25519 AAAA admin\n");
        assert_eq!(t[MACHINE_ID].mode, 0o444);
        assert_eq!(t[SSH_HOST_KEY].mode, 0o600);
        assert_eq!(mode_of(USERS), 0o600);
        for name in ALWAYS {
            assert!(t.contains_key(name), "{name} missing");
        }
    }

    /// NoCloud meta-data's `network-interfaces` (ENI) is the network when the seed has no
    /// `network-config` file, as in cloud-init; its MAC-less `eth0` is bound to a guest's
    /// only NIC, as a ConfigDrive's ENI is. A `network-config` file wins over it.
    #[test]
    fn meta_data_network_interfaces_configure_the_nic() {
        let meta = "instance-id: a\nnetwork-interfaces: |\n  auto eth0\n  iface eth0 inet static\n    address 192.168.1.10/24\n    gateway 192.168.1.254\n";
        let ctx = ComposeContext {
            links: vec!["ens18=52:54:00:12:34:56".parse().unwrap()],
            ..ComposeContext::default()
        };
        let t = compose(&seed(meta, ""), None, &ctx, &mut FakeFresh(0)).unwrap();
        let net: Vec<(&String, String)> = t
            .iter()
            .filter(|(k, _)| k.starts_with(NETWORK_DIR))
            .map(|(k, f)| (k, String::from_utf8_lossy(&f.bytes).into_owned()))
            .collect();
        assert_eq!(net.len(), 1, "{net:?}");
        let (_, file) = &net[0];
        assert!(
            file.contains("MACAddress=52:54:00:12:34:56")
                && file.contains("Address=192.168.1.10/24")
                && file.contains("Gateway=192.168.1.254"),
            "{file}"
        );
        let files = SeedFiles(
            [
                ("meta-data", meta),
                ("user-data", ""),
                ("network-config", "version: 1\nconfig:\n  - type: physical\n    name: ens18\n    subnets: [{type: dhcp}]\n"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        );
        let with_file = Seed::from_nocloud(&files, "nocloud:test", None).unwrap();
        let t = compose(&with_file, None, &ctx, &mut FakeFresh(0)).unwrap();
        let rendered: String = t
            .iter()
            .filter(|(k, _)| k.starts_with(NETWORK_DIR))
            .map(|(_, f)| String::from_utf8_lossy(&f.bytes).into_owned())
            .collect();
        assert!(
            rendered.contains("DHCP=") && !rendered.contains("192.168.1.10"),
            "{rendered}"
        );
    }

    #[test]
    fn an_ipv4_local_hostname_is_named_as_cloud_init_names_it() {
        let t = compose(
            &seed(
                "instance-id: a\nlocal-hostname: 10.0.0.5\n",
                "#cloud-config\nmanage_etc_hosts: true\n",
            ),
            None,
            &ComposeContext::default(),
            &mut FakeFresh(0),
        )
        .unwrap();
        assert_eq!(t[HOSTNAME].bytes, b"ip-10-0-0-5\n");
    }

    /// meta-data's `network-interfaces` that cannot be read is a warning, not a refused
    /// seed: the keys still apply and the network is left alone.
    #[test]
    fn unreadable_network_interfaces_are_a_warning() {
        let s = seed(
            "instance-id: a\nnetwork-interfaces: |\n  address 10.0.0.5\n  iface\n",
            "#cloud-config\nssh_authorized_keys: [ssh-ed25519 AAAA k]\n",
        );
        assert!(s.network.is_none());
        assert!(
            s.warnings.iter().any(|w| w.contains("network-interfaces")),
            "{:?}",
            s.warnings
        );
        let t = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap();
        assert_eq!(t[ADMIN_KEYS].bytes, b"ssh-ed25519 AAAA k\n");
    }

    /// An empty `local-hostname` names no host (cloud-init passes it over): the seed's
    /// keys still apply.
    #[test]
    fn an_empty_local_hostname_is_no_hostname() {
        let t = compose(
            &seed(
                "instance-id: a\nlocal-hostname: ''\n",
                "#cloud-config\nssh_authorized_keys: [ssh-ed25519 AAAA k]\n",
            ),
            None,
            &ComposeContext::default(),
            &mut FakeFresh(0),
        )
        .unwrap();
        assert_eq!(t[ADMIN_KEYS].bytes, b"ssh-ed25519 AAAA k\n");
        assert_eq!(t[HOSTNAME].bytes, b"");
    }

    #[test]
    fn host_keys_and_machine_id_survive_a_new_instance() {
        let first = compose(
            &seed("instance-id: a\n", "#cloud-config\nhostname: a\n"),
            None,
            &ComposeContext::default(),
            &mut FakeFresh(0),
        )
        .unwrap();
        let second = compose(
            &seed("instance-id: b\n", "#cloud-config\nhostname: b\n"),
            Some(&first),
            &ComposeContext::default(),
            &mut FakeFresh(100),
        )
        .unwrap();
        assert_eq!(first[SSH_HOST_KEY], second[SSH_HOST_KEY]);
        assert_eq!(first[MACHINE_ID], second[MACHINE_ID]);
        assert_eq!(second[HOSTNAME].bytes, b"b\n");
        let ctx = ComposeContext {
            regenerate: true,
            ..Default::default()
        };
        let clone = compose(
            &seed("instance-id: b\n", ""),
            Some(&first),
            &ctx,
            &mut FakeFresh(200),
        )
        .unwrap();
        assert_ne!(first[SSH_HOST_KEY], clone[SSH_HOST_KEY]);
        assert_ne!(first[MACHINE_ID], clone[MACHINE_ID]);
    }

    #[test]
    fn path_traversal_hostname_is_refused_naming_file_and_key() {
        let s = seed("instance-id: a\n", "#cloud-config\nhostname: ../../etc\n");
        let e = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap_err();
        assert!(
            e.to_string().starts_with(
                "nocloud:test/user-data: key 'hostname': \"../../etc\" is not a valid hostname"
            ),
            "{e}"
        );
    }

    #[test]
    fn a_user_with_a_sudo_rule_is_an_admin() {
        let s = seed(
            "instance-id: a\n",
            "#cloud-config\nusers:\n  - {name: alice, sudo: 'ALL=(ALL) NOPASSWD:ALL', ssh_authorized_keys: [ssh-ed25519 AAAA alice]}\n  - {name: carol, sudo: false, ssh_authorized_keys: [ssh-ed25519 BBBB carol]}\n",
        );
        let t = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap();
        assert_eq!(t[ADMIN_KEYS].bytes, b"ssh-ed25519 AAAA alice\n");
        assert_eq!(t[USER_KEYS].bytes, b"ssh-ed25519 BBBB carol\n");
    }

    #[test]
    fn preserve_hostname_keeps_the_machines_name_and_prefer_fqdn_uses_the_fqdn() {
        let user =
            "#cloud-config\nhostname: web1\nfqdn: web1.example.com\nmanage_etc_hosts: true\n";
        let first = compose(
            &seed("instance-id: a\n", user),
            None,
            &ComposeContext::default(),
            &mut FakeFresh(0),
        )
        .unwrap();
        let preserve = format!("{user}preserve_hostname: true\nhostname: web2\n");
        let t = compose(
            &seed("instance-id: b\n", &preserve),
            Some(&first),
            &ComposeContext::default(),
            &mut FakeFresh(0),
        )
        .unwrap();
        assert_eq!(t[HOSTNAME].bytes, b"web1\n", "the current name stays");
        assert_eq!(t[HOSTS].bytes, b"127.0.1.1 web1.example.com web2\n");
        let t = compose(
            &seed("instance-id: b\n", &preserve),
            None,
            &ComposeContext::default(),
            &mut FakeFresh(0),
        )
        .unwrap();
        assert_eq!(
            t[HOSTNAME].bytes, b"",
            "a first boot leaves the image's fallback"
        );
        let prefer = format!("{user}prefer_fqdn_over_hostname: true\n");
        let t = compose(
            &seed("instance-id: b\n", &prefer),
            None,
            &ComposeContext::default(),
            &mut FakeFresh(0),
        )
        .unwrap();
        assert_eq!(t[HOSTNAME].bytes, b"web1.example.com\n");
        assert_eq!(t[HOSTS].bytes, b"127.0.1.1 web1.example.com web1\n");
    }

    #[test]
    fn a_bad_local_hostname_is_named_as_meta_data() {
        let s = seed("instance-id: a\nlocal-hostname: bad/name\n", "");
        let e = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("nocloud:test/meta-data: key 'local-hostname': \"bad/name\""),
            "{e}"
        );
    }

    #[test]
    fn the_fqdn_comes_from_meta_data_when_user_data_gives_a_short_hostname() {
        let s = seed(
            "instance-id: a\nlocal-hostname: web1.example.com\n",
            "#cloud-config\nhostname: web1\nmanage_etc_hosts: true\n",
        );
        let t = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap();
        assert_eq!(t[HOSTNAME].bytes, b"web1\n");
        assert_eq!(t[HOSTS].bytes, b"127.0.1.1 web1.example.com web1\n");
        // Without a dotted local-hostname there is no FQDN to add.
        let s = seed(
            "instance-id: a\nlocal-hostname: other\n",
            "#cloud-config\nhostname: web1\nmanage_etc_hosts: true\n",
        );
        let t = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap();
        assert_eq!(t[HOSTS].bytes, b"127.0.1.1 web1\n");
    }

    #[test]
    fn configdrive_keys_ending_in_a_newline_are_authorized() {
        let files = SeedFiles(
            [(
                "latest/meta_data.json",
                r#"{"uuid": "i-1", "hostname": "web1", "public_keys": {"mykey": "ssh-rsa AAAAB3 Generated-by-Nova\n"}}"#,
            )]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        );
        let s = Seed::from_configdrive(&files, "configdrive:/dev/sr0").unwrap();
        let t = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap();
        assert_eq!(t[ADMIN_KEYS].bytes, b"ssh-rsa AAAAB3 Generated-by-Nova\n");
        let e = compose(
            &Seed {
                local_hostname: Some("bad/name".into()),
                ..s
            },
            None,
            &ComposeContext::default(),
            &mut FakeFresh(0),
        )
        .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("configdrive:/dev/sr0/latest/meta_data.json: key 'local-hostname'"),
            "{e}"
        );
    }

    #[test]
    fn static_network_nameservers_reach_resolv_conf() {
        let mut s = seed("instance-id: a\n", "");
        s.network = Some(network::parse(
            b"version: 1\nconfig:\n  - type: physical\n    name: eth0\n    subnets:\n      - type: static\n        address: 10.0.0.2/24\n        dns_nameservers: [10.0.0.1]\n  - type: nameserver\n    address: [1.1.1.1, 10.0.0.1]\n    search: [example.com]\n",
            "network-config",
        ).unwrap());
        let t = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap();
        assert_eq!(
            String::from_utf8_lossy(&t[RESOLV_CONF].bytes),
            "nameserver 1.1.1.1\nnameserver 10.0.0.1\nsearch example.com\n"
        );
    }

    /// A network-config value with a line break in it would write lines (a section, a
    /// DNS server) the seed did not ask for: the seed is refused, naming network-config
    /// and the value.
    #[test]
    fn a_network_value_with_a_line_break_is_refused() {
        for (config, value) in [
            (
                "version: 1\nconfig:\n  - type: physical\n    name: eth0\n    subnets:\n      - type: static\n        address: 10.0.0.2/24\n        gateway: \"10.0.0.1\\n\\n[Network]\\nDNS=203.0.113.66\"\n",
                "Gateway=",
            ),
            (
                "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n    nameservers:\n      addresses: [\"1.1.1.1\\nnameserver 203.0.113.66\"]\n",
                "1.1.1.1\\nnameserver",
            ),
        ] {
            let mut s = seed("instance-id: a\n", "");
            s.network = Some(network::parse(config.as_bytes(), "network-config").unwrap());
            let e = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0))
                .unwrap_err()
                .to_string();
            assert!(
                e.starts_with("nocloud:test/network-config: key 'network'")
                    && e.contains(value)
                    && e.contains("line break"),
                "{e}"
            );
        }
    }

    #[test]
    fn commands_become_scripts_only_when_given() {
        let s = seed(
            "",
            "#cloud-config\nbootcmd:\n  - echo boot > /run/b\nruncmd:\n  - [touch, /var/lib/x y]\n",
        );
        let t = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap();
        assert!(
            String::from_utf8_lossy(&t[BOOTCMD].bytes).ends_with("set -e\necho boot > /run/b\n")
        );
        assert!(
            String::from_utf8_lossy(&t[RUNCMD].bytes).ends_with("set -e\ntouch '/var/lib/x y'\n")
        );
        let none = compose(
            &seed("", ""),
            None,
            &ComposeContext::default(),
            &mut FakeFresh(0),
        )
        .unwrap();
        assert!(!none.contains_key(BOOTCMD) && !none.contains_key(RUNCMD));
    }

    #[test]
    fn ports_are_validated_and_canonical() {
        let s = seed(
            "",
            "#cloud-config\nnixseed:\n  tcp_ports: [22, ' 80 - 90']\n  udp_ports: [53]\n",
        );
        let t = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap();
        assert_eq!(t[TCP_PORTS].bytes, b"22\n80-90\n");
        let bad = seed("", "#cloud-config\nnixseed:\n  tcp_ports: [70000]\n");
        let e = compose(&bad, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap_err();
        assert!(e.to_string().contains("nixseed.tcp_ports"), "{e}");
    }

    #[test]
    fn seeded_machine_id_and_host_key_are_used() {
        let s = seed(
            "",
            "#cloud-config\nnixseed:\n  machine-id: 0123456789ABCDEF0123456789abcdef\nssh_keys:\n  ed25519_private: |\n    -----BEGIN OPENSSH PRIVATE KEY-----\n    abc\n    -----END OPENSSH PRIVATE KEY-----\n  ed25519_public: ssh-ed25519 AAAA host\n",
        );
        let t = compose(&s, None, &ComposeContext::default(), &mut FakeFresh(0)).unwrap();
        assert_eq!(t[MACHINE_ID].bytes, b"0123456789abcdef0123456789abcdef\n");
        assert_eq!(t[SSH_HOST_KEY_PUB].bytes, b"ssh-ed25519 AAAA host\n");
    }
}
