//! A machine's identity as stored on the host in `machines/<name>/`: the same flat file
//! names as the guest's `/var/identity` (nixseed_core::identity), plus `product_uuid`,
//! `meta.nix` and `default.nix`. Loading validates every file, so a typo is reported here
//! with its path instead of surfacing later inside a guest.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nixseed_core::identity::{
    ADMIN_KEYS, HOSTNAME, HOSTS, MACHINE_ID, RESOLV_CONF, SSH_HOST_KEY, SSH_HOST_KEY_PUB,
    TCP_PORTS, UDP_PORTS, USER_KEYS,
};
use sha2::{Digest, Sha256};
use ssh_key::{PrivateKey, PublicKey};

use crate::names;

/// Host-side files that are not part of the guest contract.
pub const PRODUCT_UUID: &str = "product_uuid";
pub const META_NIX: &str = "meta.nix";
pub const DEFAULT_NIX: &str = "default.nix";
/// Optional operator-written NoCloud network-config (v1 or v2), copied into the seed as is.
pub const NETWORK_CONFIG: &str = "network-config";

/// The largest identity file `seedctl` reads: the channel carries at most 1 MiB in one
/// frame, and every file here is a few lines.
pub const MAX_FILE: u64 = 1 << 20;

/// Reads `dir/file` as text, or `None` when it does not exist. Only a regular file of at
/// most [`MAX_FILE`] bytes is read, and only from inside `dir` or `machines`: a symlink
/// may point to a file shared by several machines, but not out of the machines directory
/// (`resolv.conf -> /etc/shadow` would put the shadow file into the seed), and a FIFO or
/// device is refused instead of blocking or reading without end. The check is made on
/// the file actually opened, so a link swapped in between is caught too.
pub fn read_machine_file(machines: &Path, dir: &Path, file: &str) -> Result<Option<String>> {
    let path = dir.join(file);
    match std::fs::symlink_metadata(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into()),
        Ok(m) if m.file_type().is_symlink() => {
            let target = std::fs::canonicalize(&path)
                .map_err(|e| anyhow::anyhow!("a symlink that cannot be followed: {e}"))?;
            check_inside(machines, dir, &target)?;
        }
        Ok(_) => {}
    }
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(&path)?;
    let opened = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))?;
    check_inside(machines, dir, &opened)?;
    let meta = f.metadata()?;
    if !meta.is_file() {
        bail!("not a regular file; seedctl reads identity files only");
    }
    let mut bytes = Vec::new();
    f.take(MAX_FILE + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > MAX_FILE {
        bail!("larger than {MAX_FILE} bytes, the most seedctl reads for one identity file");
    }
    String::from_utf8(bytes)
        .map(Some)
        .map_err(|e| anyhow::anyhow!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()))
}

fn check_inside(machines: &Path, dir: &Path, target: &Path) -> Result<()> {
    let inside = [machines, dir]
        .iter()
        .filter_map(|root| std::fs::canonicalize(root).ok())
        .any(|root| target.starts_with(root));
    if !inside {
        bail!(
            "leads to {}, outside {}; a symlink here may point only to a file inside the machines directory",
            target.display(),
            machines.display()
        );
    }
    Ok(())
}

/// Where machines and host-side VM state live.
#[derive(Debug, Clone)]
pub struct Paths {
    pub machines: PathBuf,
    pub state: PathBuf,
}

impl Paths {
    /// `--machines`/`SEEDCTL_MACHINES` (default `./machines`) and `--state`/`SEEDCTL_STATE`
    /// (default `.seedctl` beside the machines directory).
    pub fn resolve(machines: Option<PathBuf>, state: Option<PathBuf>) -> Paths {
        // An empty value (`SEEDCTL_STATE=` in a script) is unset, not the current directory.
        let given = |p: Option<PathBuf>, var: &str| {
            p.or_else(|| std::env::var_os(var).map(PathBuf::from))
                .filter(|p| !p.as_os_str().is_empty())
        };
        let machines =
            given(machines, "SEEDCTL_MACHINES").unwrap_or_else(|| PathBuf::from("machines"));
        let state = given(state, "SEEDCTL_STATE").unwrap_or_else(|| {
            match machines.parent().filter(|p| !p.as_os_str().is_empty()) {
                Some(parent) => parent.join(".seedctl"),
                None => PathBuf::from(".seedctl"),
            }
        });
        Paths { machines, state }
    }

    pub fn machine_dir(&self, name: &str) -> PathBuf {
        self.machines.join(name)
    }

    pub fn state_dir(&self, name: &str) -> PathBuf {
        self.state.join(name)
    }

    /// Names of all machine directories (every directory in `machines`, not hidden, that
    /// holds any identity file or cannot be read), sorted, whether or not they hold a
    /// whole identity.
    pub fn machine_names(&self) -> Result<Vec<String>> {
        let mut out = Vec::new();
        let rd = match std::fs::read_dir(&self.machines) {
            Ok(rd) => rd,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                // No machine yet, or a mistyped --machines: either way, said.
                eprintln!(
                    "seedctl: no machines directory at {} (`seedctl new NAME` makes one there)",
                    self.machines.display()
                );
                return Ok(out);
            }
            Err(e) => {
                return Err(e).with_context(|| format!("listing {}", self.machines.display()));
            }
        };
        for entry in rd {
            let entry = entry.with_context(|| format!("listing {}", self.machines.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            // A directory that holds any identity file is a machine, whole or not: one that
            // does not load is reported by the caller, not skipped here. Hidden ones
            // (`seedctl new`'s staging) and directories of other files (shared ones that
            // identity files link to) are not machines.
            let dir = entry.path();
            let is_dir = std::fs::metadata(&dir).is_ok_and(|m| m.is_dir());
            let holds_identity = || {
                nixseed_core::identity::ALWAYS
                    .iter()
                    .chain(&[PRODUCT_UUID])
                    .any(|f| std::fs::symlink_metadata(dir.join(f)).is_ok())
                    || std::fs::read_dir(&dir).is_err()
            };
            if is_dir && !name.starts_with('.') && holds_identity() {
                out.push(name);
            }
        }
        out.sort();
        Ok(out)
    }
}

/// One machine's identity, validated.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub dir: PathBuf,
    pub machine_id: String,
    pub hostname: String,
    pub host_key: String,
    pub host_key_pub: String,
    pub resolv_conf: String,
    pub hosts: Vec<String>,
    pub tcp_ports: Vec<String>,
    pub udp_ports: Vec<String>,
    pub admin_keys: Vec<String>,
    pub user_keys: Vec<String>,
    pub product_uuid: String,
    pub network_config: Option<String>,
}

/// Lines that carry content: not blank, not `#` comments.
pub fn content_lines(text: &str) -> Vec<String> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// The options sshd takes before a key in authorized_keys (OpenSSH's
/// `sshauthopt_parse`), in lower case; sshd ignores a line with any other word there.
const KEY_OPTIONS: [&str; 24] = [
    "agent-forwarding",
    "cert-authority",
    "command",
    "environment",
    "expiry-time",
    "from",
    "no-agent-forwarding",
    "no-port-forwarding",
    "no-pty",
    "no-touch-required",
    "no-user-rc",
    "no-verify-required",
    "no-x11-forwarding",
    "permitlisten",
    "permitopen",
    "port-forwarding",
    "principals",
    "pty",
    "restrict",
    "touch-required",
    "tunnel",
    "user-rc",
    "verify-required",
    "x11-forwarding",
];

/// The text before a key's type must be sshd options: `name` or `name="value"`, joined by
/// commas, with no blank outside the quotes. A pasted known_hosts line
/// (`web1.example.org ssh-ed25519 …`) is not, and sshd would ignore the whole key.
fn check_key_options(options: &str) -> Result<()> {
    let mut items = Vec::new();
    let (mut item, mut quoted) = (String::new(), false);
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            // Inside quotes, `\"` is a quote of the value, as sshd reads it.
            '\\' if quoted => {
                item.push(c);
                item.extend(chars.next());
            }
            '"' => {
                quoted = !quoted;
                item.push(c);
            }
            ',' if !quoted => items.push(std::mem::take(&mut item)),
            c if c.is_whitespace() && !quoted => {
                bail!(
                    "`{options}` before the key type is not a list of sshd options (a known_hosts line?); sshd would ignore this key"
                )
            }
            c => item.push(c),
        }
    }
    if quoted {
        bail!("`{options}` before the key type has an unclosed quote; sshd would ignore this key");
    }
    items.push(item);
    for item in items {
        let name = item.split_once('=').map_or(item.as_str(), |(n, _)| n);
        if !KEY_OPTIONS.contains(&name.to_ascii_lowercase().as_str()) {
            bail!(
                "`{name}` before the key type is no sshd option (a known_hosts line?); sshd would ignore this key"
            );
        }
    }
    Ok(())
}

/// Parse one authorized_keys line, which may start with options (`from="..." ssh-ed25519 ...`).
pub fn parse_authorized_key(line: &str) -> Result<PublicKey> {
    let tokens: Vec<&str> = line.split_whitespace().collect();
    let is_type =
        |t: &str| t.starts_with("ssh-") || t.starts_with("ecdsa-") || t.starts_with("sk-");
    // The key starts at the first token that begins a key that parses: an option such
    // as `command="echo ssh-x"` may hold a token that only looks like a key type.
    let mut first_error = None;
    for start in (0..tokens.len()).filter(|&i| is_type(tokens[i])) {
        match PublicKey::from_openssh(&tokens[start..].join(" ")) {
            Ok(key) => {
                if start > 0 {
                    check_key_options(&tokens[..start].join(" "))?;
                }
                return Ok(key);
            }
            Err(e) => {
                first_error.get_or_insert(e);
            }
        }
    }
    match first_error {
        Some(e) => bail!("not an OpenSSH public key: {e}"),
        None => bail!("no key type such as ssh-ed25519 found"),
    }
}

impl Identity {
    /// Load and validate `machines/<name>/`.
    pub fn load(paths: &Paths, name: &str) -> Result<Identity> {
        names::check_machine_name(name)?;
        let dir = paths.machine_dir(name);
        if !dir.is_dir() {
            bail!(
                "machine `{name}` not found: {} does not exist; create it with `seedctl new {name}` or pass --machines DIR",
                dir.display()
            );
        }
        Identity::load_dir(&paths.machines, &dir, name)
    }

    /// Load and validate the identity files in `dir` (a machine directory, or `seedctl
    /// new`'s staging directory before it takes the machine's place) for machine `name`.
    pub fn load_dir(machines: &Path, dir: &Path, name: &str) -> Result<Identity> {
        let dir = dir.to_path_buf();
        let fix = |file: &str, e: anyhow::Error| {
            anyhow::anyhow!(
                "machine `{name}`: {}: {e:#}; fix the file (`seedctl new {name} --force` would replace every identity file, keys and settings included)",
                dir.join(file).display()
            )
        };
        let read_optional = |file: &str| -> Result<Option<String>> {
            read_machine_file(machines, &dir, file).map_err(|e| fix(file, e))
        };
        let read = |file: &str| -> Result<String> {
            read_optional(file)?.ok_or_else(|| fix(file, anyhow::anyhow!("missing")))
        };

        let machine_id = read(MACHINE_ID)?.trim_end().to_owned();
        names::check_machine_id(&machine_id).map_err(|e| fix(MACHINE_ID, e))?;
        let hostname = read(HOSTNAME)?.trim().to_owned();
        names::check_hostname(&hostname).map_err(|e| fix(HOSTNAME, e))?;
        let product_uuid = read(PRODUCT_UUID)?.trim().to_owned();
        names::check_uuid(&product_uuid).map_err(|e| fix(PRODUCT_UUID, e))?;

        // As an editor may leave it (CRLF line ends, a blank line before or after): the
        // guest's sshd takes only the plain PEM text, so that is what goes to the seed.
        let host_key = format!("{}\n", read(SSH_HOST_KEY)?.replace("\r\n", "\n").trim());
        let private = PrivateKey::from_openssh(&host_key).map_err(|e| {
            fix(
                SSH_HOST_KEY,
                anyhow::anyhow!("not an OpenSSH private key: {e}"),
            )
        })?;
        // The guest's sshd reads the key unattended: a passphrase would lock it out.
        if private.is_encrypted() {
            return Err(fix(
                SSH_HOST_KEY,
                anyhow::anyhow!(
                    "the key is protected by a passphrase, which sshd cannot give at boot; remove it with `ssh-keygen -p -N '' -f FILE`"
                ),
            ));
        }
        if private.algorithm() != ssh_key::Algorithm::Ed25519 {
            return Err(fix(
                SSH_HOST_KEY,
                anyhow::anyhow!(
                    "a {} key; this file holds the ed25519 host key",
                    private.algorithm()
                ),
            ));
        }
        let host_key_pub = read(SSH_HOST_KEY_PUB)?.trim().to_owned();
        let public = PublicKey::from_openssh(&host_key_pub).map_err(|e| {
            fix(
                SSH_HOST_KEY_PUB,
                anyhow::anyhow!("not an OpenSSH public key: {e}"),
            )
        })?;
        if public.key_data() != private.public_key().key_data() {
            return Err(fix(
                SSH_HOST_KEY_PUB,
                anyhow::anyhow!("does not match the private key in {SSH_HOST_KEY}"),
            ));
        }

        let keys = |file: &str| -> Result<Vec<String>> {
            let lines = content_lines(&read(file)?);
            for (i, l) in lines.iter().enumerate() {
                parse_authorized_key(l)
                    .map_err(|e| fix(file, anyhow::anyhow!("key {}: {e}", i + 1)))?;
            }
            Ok(lines)
        };
        let admin_keys = keys(ADMIN_KEYS)?;
        let user_keys = keys(USER_KEYS)?;

        let ports = |file: &str| -> Result<Vec<String>> {
            let lines = content_lines(&read(file)?);
            for l in &lines {
                names::check_port_line(l).map_err(|e| fix(file, e))?;
            }
            Ok(lines)
        };
        let tcp_ports = ports(TCP_PORTS)?;
        let udp_ports = ports(UDP_PORTS)?;
        // glibc reads `\r` as part of a name and a BOM as part of the first word, and so
        // drops the nameserver: the guest gets the text without either.
        let resolv_conf = read(RESOLV_CONF)?
            .trim_start_matches('\u{feff}')
            .replace("\r\n", "\n");
        names::check_resolv_conf(&resolv_conf).map_err(|e| fix(RESOLV_CONF, e))?;
        let hosts = content_lines(&read(HOSTS)?.replace('\r', ""));
        for line in &hosts {
            names::check_hosts_line(line)
                .map_err(|e| fix(HOSTS, e.context(format!("`{line}`"))))?;
        }
        let network_config = read_optional(NETWORK_CONFIG)?;

        Ok(Identity {
            name: name.to_owned(),
            dir,
            machine_id,
            hostname,
            host_key,
            host_key_pub,
            resolv_conf,
            hosts,
            tcp_ports,
            udp_ports,
            admin_keys,
            user_keys,
            product_uuid,
            network_config,
        })
    }

    /// The fully qualified name: the hostname itself when dotted, else the first dotted
    /// name on a `hosts` line that also names the short hostname.
    pub fn fqdn(&self) -> Option<String> {
        if self.hostname.contains('.') {
            return Some(self.hostname.clone());
        }
        self.hosts.iter().find_map(|line| {
            let names: Vec<&str> = line.split_whitespace().skip(1).collect();
            if !names.contains(&self.hostname.as_str()) {
                return None;
            }
            let prefix = format!("{}.", self.hostname);
            names
                .iter()
                .find(|n| n.starts_with(&prefix))
                .map(|n| (*n).to_owned())
        })
    }

    /// `hosts` lines for `127.0.1.1` (the address of the machine's own line, which the
    /// seed makes from the hostname) that name none of the machine's names, or an FQDN that
    /// is not its own: left from an earlier hostname, they would go on resolving that name
    /// to this machine.
    pub fn stale_host_lines(&self) -> Vec<&str> {
        let fqdn = self.fqdn();
        let own = |n: &str| {
            n == self.hostname || n == self.short_hostname() || Some(n) == fqdn.as_deref()
        };
        self.hosts
            .iter()
            .filter(|line| {
                let mut words = line.split_whitespace();
                if words.next() != Some("127.0.1.1") {
                    return false;
                }
                // Stale when it names none of the machine's names, or an FQDN that is not
                // the machine's (`web1.old.org web1` after a move to `web1.new.org`).
                let names: Vec<&str> = words.collect();
                !names.iter().any(|n| own(n)) || names.iter().any(|n| n.contains('.') && !own(n))
            })
            .map(String::as_str)
            .collect()
    }

    /// One warning on stderr per [`Identity::stale_host_lines`] line, for the commands
    /// that hand the identity to the guest.
    pub fn warn_stale_host_lines(&self) {
        for line in self.stale_host_lines() {
            eprintln!(
                "seedctl: warning: machines/{}/hosts: `{line}` names an earlier hostname, not `{}`; the guest's /etc/hosts keeps it after its own 127.0.1.1 line until it is removed",
                self.name, self.hostname
            );
        }
    }

    /// The VM's NIC MAC: `52:54:00` (QEMU's locally administered prefix) and three bytes
    /// of sha256(product_uuid), so it is stable for the machine and differs between
    /// machines. The default network-config matches the NIC by it.
    pub fn mac(&self) -> String {
        let d = Sha256::digest(self.product_uuid.to_ascii_lowercase().as_bytes());
        format!("52:54:00:{:02x}:{:02x}:{:02x}", d[0], d[1], d[2])
    }

    /// The short hostname (first label).
    pub fn short_hostname(&self) -> &str {
        self.hostname.split('.').next().unwrap_or(&self.hostname)
    }

    /// sha256 over every identity file (name, length and bytes, in name order): the
    /// seed's instance-id changes exactly when the identity does.
    pub fn digest(&self) -> [u8; 32] {
        let mut files: Vec<(&str, String)> = vec![
            (ADMIN_KEYS, self.admin_keys.join("\n")),
            (HOSTNAME, self.hostname.clone()),
            (HOSTS, self.hosts.join("\n")),
            (MACHINE_ID, self.machine_id.clone()),
            (PRODUCT_UUID, self.product_uuid.clone()),
            (RESOLV_CONF, self.resolv_conf.clone()),
            (SSH_HOST_KEY, self.host_key.clone()),
            (SSH_HOST_KEY_PUB, self.host_key_pub.clone()),
            (TCP_PORTS, self.tcp_ports.join("\n")),
            (UDP_PORTS, self.udp_ports.join("\n")),
            (USER_KEYS, self.user_keys.join("\n")),
        ];
        if let Some(nc) = &self.network_config {
            files.push((NETWORK_CONFIG, nc.clone()));
        }
        files.sort_by(|a, b| a.0.cmp(b.0));
        let mut h = Sha256::new();
        for (name, body) in files {
            h.update(name.as_bytes());
            h.update([0]);
            h.update((body.len() as u64).to_be_bytes());
            h.update(body.as_bytes());
        }
        h.finalize().into()
    }

    /// The pinned host key as a known_hosts line for `host` (`[127.0.0.1]:2222` form for
    /// a non-standard port).
    pub fn known_hosts_line(&self, host: &str) -> String {
        let mut parts = self.host_key_pub.split_whitespace();
        let alg = parts.next().unwrap_or_default();
        let b64 = parts.next().unwrap_or_default();
        format!("{host} {alg} {b64}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key line whose options hold a token that only looks like a key type still parses
    /// (`ssh-keygen -l` takes it); a line with no key at all does not.
    #[test]
    fn options_that_mention_a_key_type_do_not_hide_the_key() {
        let key =
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAICShFW+bqI98ZwjRdh3DZzU4Hk1Lsbh1JEx8RFRwuuXS";
        let line = format!("command=\"echo ssh-x\" {key} root@web1");
        let parsed = parse_authorized_key(&line).expect("the key after the options");
        assert_eq!(parsed.to_openssh().ok(), Some(format!("{key} root@web1")));
        let err = parse_authorized_key("command=\"echo ssh-x\" nothing").unwrap_err();
        assert!(
            err.to_string().contains("not an OpenSSH public key"),
            "{err}"
        );
        let err = parse_authorized_key("garbage").unwrap_err();
        assert!(err.to_string().contains("no key type"), "{err}");
    }
}
