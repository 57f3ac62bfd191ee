//! `seedctl new`: generate a machine identity in `machines/<name>/`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use nixseed_core::identity::Fresh;
use nixseed_core::identity::{
    ADMIN_KEYS, HOSTNAME, HOSTS, MACHINE_ID, RESOLV_CONF, SSH_HOST_KEY, SSH_HOST_KEY_PUB,
    TCP_PORTS, UDP_PORTS, USER_KEYS, mode_of,
};
use serde_json::json;

use crate::fsutil::{sync_dir, write_atomic};
use crate::machine::{DEFAULT_NIX, META_NIX, PRODUCT_UUID, Paths, parse_authorized_key};
use crate::names;
use crate::output::Report;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl new web1 --admin-key @~/.ssh/id_ed25519.pub
  seedctl new db1 --hostname db1.example.org --tcp-port 22 --tcp-port 5432 \\
      --nameserver 192.0.2.53 --search example.org
  seedctl new web1 --force            # replace an existing identity")]
pub struct NewArgs {
    /// Machine name: directory under machines/ and default hostname
    pub name: String,
    /// Hostname (default: the machine name); a dotted name also sets the FQDN
    #[arg(long)]
    pub hostname: Option<String>,
    /// machine-id to use instead of a random one (32 lowercase hex digits)
    #[arg(long)]
    pub machine_id: Option<String>,
    /// SSH public key for root, or @FILE to read keys from a file (repeatable)
    #[arg(long = "admin-key", value_name = "KEY|@FILE")]
    pub admin_keys: Vec<String>,
    /// SSH public key for the unprivileged user, or @FILE (repeatable)
    #[arg(long = "user-key", value_name = "KEY|@FILE")]
    pub user_keys: Vec<String>,
    /// TCP port or range N-M to open in the guest firewall (default: 22; repeatable)
    #[arg(long = "tcp-port", value_name = "P")]
    pub tcp_ports: Vec<String>,
    /// UDP port or range to open (repeatable)
    #[arg(long = "udp-port", value_name = "P")]
    pub udp_ports: Vec<String>,
    /// DNS server for resolv.conf (repeatable; default: none, and the guest keeps the image's resolver, e.g. the systemd-resolved stub)
    #[arg(long = "nameserver", value_name = "IP")]
    pub nameservers: Vec<String>,
    /// DNS search domain for resolv.conf
    #[arg(long)]
    pub search: Option<String>,
    /// Extra /etc/hosts line (repeatable); the guest's /etc/hosts has them after the `127.0.1.1 FQDN HOST` line made from the hostname
    #[arg(long = "hosts-line", value_name = "LINE")]
    pub hosts_lines: Vec<String>,
    /// Replace an existing identity: every identity file is written anew from these options and their defaults (new machine-id and host key); the product UUID (and so the MAC) and other files such as network-config stay
    #[arg(long)]
    pub force: bool,
}

/// Expand `KEY` / `@FILE` arguments into validated authorized_keys lines.
fn expand_keys(args: &[String], what: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for arg in args {
        let (lines, source) = match arg.strip_prefix('@') {
            Some(file) => {
                let path = expand_tilde(file);
                let text = std::fs::read_to_string(&path)
                    .with_context(|| format!("reading {what} key file {}", path.display()))?;
                (
                    crate::machine::content_lines(&text),
                    path.display().to_string(),
                )
            }
            // A value may hold several lines (`--admin-key "$(cat keys)"`): each is checked.
            None => (
                crate::machine::content_lines(arg),
                "the command line".to_owned(),
            ),
        };
        if lines.is_empty() {
            bail!("{what} key from {source} holds no key");
        }
        for line in lines {
            parse_authorized_key(&line)
                .with_context(|| format!("{what} key `{line}` from {source}"))?;
            out.push(line);
        }
    }
    Ok(out)
}

fn expand_tilde(p: &str) -> PathBuf {
    match (p.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => Path::new(&home).join(rest),
        _ => PathBuf::from(p),
    }
}

fn lines(items: &[String]) -> String {
    items.iter().map(|l| format!("{l}\n")).collect()
}

/// The file set of a new identity, in the order it is written.
/// `product_uuid` is the VM's own (its SMBIOS UUID, and the MAC derives from it): a
/// replaced identity keeps the old one, so a domain defined earlier still matches.
fn render_files(a: &NewArgs, product_uuid: Option<String>) -> Result<Vec<(&'static str, Vec<u8>)>> {
    let hostname = a.hostname.clone().unwrap_or_else(|| a.name.clone());
    names::check_hostname(&hostname).with_context(|| format!("--hostname `{hostname}`"))?;
    let machine_id = match &a.machine_id {
        Some(id) => {
            names::check_machine_id(id).context("--machine-id")?;
            id.clone()
        }
        None => names::random_machine_id(),
    };
    for p in a.tcp_ports.iter().chain(&a.udp_ports) {
        names::check_port_line(p).with_context(|| format!("port `{p}`"))?;
    }
    for ns in &a.nameservers {
        names::check_nameserver(ns).context("--nameserver")?;
    }
    if let Some(search) = &a.search {
        if search.chars().any(|c| c.is_control()) {
            bail!(
                "--search {search:?} holds a line break or control character; give domains separated by spaces"
            );
        }
        for domain in search.split_whitespace() {
            names::check_hostname(domain)
                .with_context(|| format!("--search `{search}`: `{domain}` is not a domain"))?;
        }
        if search.split_whitespace().next().is_none() {
            bail!("--search is empty; give one or more domains separated by spaces");
        }
    }
    let admin = expand_keys(&a.admin_keys, "admin")?;
    let user = expand_keys(&a.user_keys, "user")?;

    let (private, public) = nixseed_core::fresh::OsFresh
        .host_key(&format!("root@{hostname}"))
        .map_err(|e| anyhow::anyhow!("generating the ed25519 host key: {e}"))?;

    let short = hostname.split('.').next().unwrap_or(&hostname).to_owned();
    for line in &a.hosts_lines {
        names::check_hosts_line(line).with_context(|| format!("--hosts-line `{line}`"))?;
    }
    // Only the lines given: the machine's own `127.0.1.1 FQDN HOST` line is made from the
    // hostname when the seed is written (`manage_etc_hosts`), so it follows a later edit
    // of machines/NAME/hostname.
    let hosts: Vec<String> = a.hosts_lines.iter().map(|l| l.trim().to_owned()).collect();
    // Without explicit servers the file names none, and the guest's /etc/resolv.conf is
    // the image's own (the systemd-resolved stub, which learns the DHCP servers, or the
    // image's static servers): only the image knows which resolver it runs.
    let mut resolv = String::new();
    for ns in &a.nameservers {
        resolv.push_str(&format!("nameserver {ns}\n"));
    }
    if let Some(s) = &a.search {
        let domains: Vec<&str> = s.split_whitespace().collect();
        resolv.push_str(&format!("search {}\n", domains.join(" ")));
    }
    let tcp = if a.tcp_ports.is_empty() {
        vec!["22".to_owned()]
    } else {
        a.tcp_ports.clone()
    };

    Ok(vec![
        (MACHINE_ID, format!("{machine_id}\n").into_bytes()),
        (HOSTNAME, format!("{hostname}\n").into_bytes()),
        (SSH_HOST_KEY, private.as_bytes().to_vec()),
        (SSH_HOST_KEY_PUB, format!("{public}\n").into_bytes()),
        (RESOLV_CONF, resolv.into_bytes()),
        (HOSTS, lines(&hosts).into_bytes()),
        (TCP_PORTS, lines(&tcp).into_bytes()),
        (UDP_PORTS, lines(&a.udp_ports).into_bytes()),
        (ADMIN_KEYS, lines(&admin).into_bytes()),
        (USER_KEYS, lines(&user).into_bytes()),
        (
            PRODUCT_UUID,
            format!(
                "{}\n",
                match product_uuid {
                    Some(u) => u,
                    None => names::random_uuid()?,
                }
            )
            .into_bytes(),
        ),
        (META_NIX, b"{ system = \"x86_64-linux\"; }\n".to_vec()),
        (
            DEFAULT_NIX,
            format!(
                "{{ ... }}:\n{{\n  services.nixseed.enable = true;\n  networking.hostName = \"{short}\";\n}}\n"
            )
            .into_bytes(),
        ),
    ])
}

/// Copies the files of an existing machine directory that the new identity does not write
/// (`seed_generation`, the signed-seed counter the guest checks; an operator's
/// `network-config`; notes) into `staging`: `--force` replaces the identity, not the rest.
/// A symlink is kept as the same link; anything else but a regular file is refused before
/// anything changes.
fn carry_over(old: &Path, staging: &Path, written: &[(&str, Vec<u8>)]) -> Result<Vec<String>> {
    let mut kept = Vec::new();
    let entries = match std::fs::read_dir(old) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(kept),
        Err(e) => return Err(e).with_context(|| format!("listing {}", old.display())),
    };
    for entry in entries {
        let entry = entry.with_context(|| format!("listing {}", old.display()))?;
        let name = entry.file_name();
        if written.iter().any(|(w, _)| name == *w) {
            continue;
        }
        let from = entry.path();
        let kind = entry
            .file_type()
            .with_context(|| format!("reading {}", from.display()))?;
        // A link to a file shared by several machines stays a link.
        if kind.is_symlink() {
            let to = std::fs::read_link(&from)
                .with_context(|| format!("reading the link {}", from.display()))?;
            std::os::unix::fs::symlink(&to, staging.join(&name))
                .with_context(|| format!("keeping the link {}", from.display()))?;
            kept.push(name.to_string_lossy().into_owned());
            continue;
        }
        if !kind.is_file() {
            bail!(
                "{} is not a regular file and would not carry over to the new identity; move it out of {} first",
                from.display(),
                old.display()
            );
        }
        std::fs::copy(&from, staging.join(&name))
            .with_context(|| format!("keeping {}", from.display()))?;
        kept.push(name.to_string_lossy().into_owned());
    }
    kept.sort();
    Ok(kept)
}

pub fn run(paths: &Paths, a: &NewArgs) -> Result<Report> {
    names::check_machine_name(&a.name)?;
    let target = paths.machine_dir(&a.name);
    if target.exists() && !a.force {
        bail!(
            "machine `{}` already exists at {}; pass --force to replace its identity (new machine-id and host key; the product UUID and MAC stay)",
            a.name,
            target.display()
        );
    }
    // The old product UUID stays; one that cannot be read is an error, not a reason to
    // change the VM's UUID and MAC behind the operator's back.
    let kept_uuid = match crate::machine::read_machine_file(&paths.machines, &target, PRODUCT_UUID)
    {
        Ok(None) => None,
        Ok(Some(u)) => {
            let u = u.trim().to_owned();
            names::check_uuid(&u).with_context(|| {
                format!(
                    "{}: the product UUID that --force keeps; fix it, or remove the file to make a new one (a new MAC too)",
                    target.join(PRODUCT_UUID).display()
                )
            })?;
            Some(u)
        }
        Err(e) => {
            return Err(e.context(format!(
                "{}: the product UUID that --force keeps",
                target.join(PRODUCT_UUID).display()
            )));
        }
    };
    let mut files = render_files(a, kept_uuid).with_context(|| format!("machine `{}`", a.name))?;
    // The NixOS stubs are the operator's to edit once made: --force carries them over.
    files.retain(|(name, _)| {
        !(matches!(*name, META_NIX | DEFAULT_NIX) && target.join(name).symlink_metadata().is_ok())
    });

    std::fs::create_dir_all(&paths.machines)
        .with_context(|| format!("creating {}", paths.machines.display()))?;
    // Build the whole directory aside, then rename it into place: a failure leaves no
    // partial machine directory behind.
    let staging = tempfile::Builder::new()
        .prefix(&format!(".{}.new-", a.name))
        .tempdir_in(&paths.machines)
        .with_context(|| {
            format!(
                "creating a staging directory in {}",
                paths.machines.display()
            )
        })?;
    for (name, bytes) in &files {
        let mode = match *name {
            MACHINE_ID | HOSTNAME | SSH_HOST_KEY | SSH_HOST_KEY_PUB | RESOLV_CONF | HOSTS
            | TCP_PORTS | UDP_PORTS | ADMIN_KEYS | USER_KEYS => mode_of(name),
            _ => 0o644,
        };
        // machine-id is 0444 in the guest; on the host the owner keeps write access.
        let mode = if *name == MACHINE_ID { 0o644 } else { mode };
        write_atomic(&staging.path().join(name), bytes, mode)?;
    }
    let kept = carry_over(&target, staging.path(), &files)?;
    // The new identity must load before it replaces anything: a failure here leaves the
    // machine directory (or its absence) as it was.
    // The report is made from what was built here: another `seedctl new --force` of the
    // same name may replace the directory as soon as it is in place.
    let id = crate::machine::Identity::load_dir(&paths.machines, staging.path(), &a.name)
        .context("the new identity does not load; nothing was changed")?;
    let staged = staging.keep();
    // The old identity goes aside under the staging directory's own unique suffix, so a
    // leftover from an interrupted run cannot block it.
    let suffix = staged
        .file_name()
        .map(|n| {
            n.to_string_lossy()
                .rsplit('-')
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default();
    let backup = target.with_file_name(format!(".{}.old-{suffix}", a.name));
    // Under --force the new directory and the old one trade places in one rename(2), so
    // no moment leaves the machine without a directory (a kill in between would, and the
    // next `seedctl new` would then make a new product UUID and MAC). A filesystem that
    // cannot exchange names gets the two renames below.
    let exchanged = a.force
        && target.exists()
        && nix::fcntl::renameat2(
            None,
            &staged,
            None,
            &target,
            nix::fcntl::RenameFlags::RENAME_EXCHANGE,
        )
        .is_ok();
    if exchanged && let Err(e) = std::fs::remove_dir_all(&staged) {
        eprintln!(
            "seedctl: warning: the old identity of `{}` stays in {}: {e}",
            a.name,
            staged.display()
        );
    }
    // Without --force nothing is moved aside: the rename fails on a machine directory
    // that another `seedctl new` of the same name put there since the check above.
    if !exchanged
        && a.force
        && target.exists()
        && let Err(e) = std::fs::rename(&target, &backup)
    {
        let _ = std::fs::remove_dir_all(&staged);
        return Err(e)
            .with_context(|| format!("moving the old identity {} aside", target.display()));
    }
    let moved = if exchanged {
        Ok(())
    } else {
        std::fs::rename(&staged, &target)
    };
    if let Err(e) = moved {
        let _ = std::fs::remove_dir_all(&staged);
        if backup.exists() {
            let _ = std::fs::rename(&backup, &target);
        }
        const ENOTEMPTY: i32 = nix::errno::Errno::ENOTEMPTY as i32;
        const EEXIST: i32 = nix::errno::Errno::EEXIST as i32;
        if !a.force && matches!(e.raw_os_error(), Some(ENOTEMPTY | EEXIST)) {
            bail!(
                "machine `{}` already exists at {} (made by another `seedctl new` meanwhile); pass --force to replace its identity",
                a.name,
                target.display()
            );
        }
        return Err(e)
            .with_context(|| format!("renaming the new identity into {}", target.display()));
    }
    if backup.exists() {
        std::fs::remove_dir_all(&backup)
            .with_context(|| format!("removing the old identity {}", backup.display()))?;
    }
    sync_dir(&paths.machines)?;
    if id.admin_keys.is_empty() && id.user_keys.is_empty() {
        eprintln!(
            "seedctl: warning: machine `{}` has no admin or user key, and its seed turns password login off: nothing can log in over SSH. Add a key to {}",
            a.name,
            target.join(ADMIN_KEYS).display()
        );
    }
    // The identity is whole, but with this state directory the machine could not run.
    if let Err(e) = crate::state::StateDir::new(paths, &a.name).check_all_socket_paths() {
        eprintln!("seedctl: warning: {e:#}");
    }

    let mut human = format!(
        "created machine `{}` in {}\n  hostname     {}\n  machine-id   {}\n  product_uuid {}\n  host key     {}",
        a.name,
        target.display(),
        id.hostname,
        id.machine_id,
        id.product_uuid,
        id.host_key_pub
    );
    if !kept.is_empty() {
        human.push_str(&format!("\n  kept         {}", kept.join(", ")));
    }
    Ok(Report::new(
        human,
        json!({
            "machine": a.name,
            "dir": target,
            "hostname": id.hostname,
            "machine_id": id.machine_id,
            "product_uuid": id.product_uuid,
            "host_key_pub": id.host_key_pub,
            "kept": kept,
        }),
    ))
}
