//! libvirt without systemd (containers, CI): the system `libvirtd` with the QEMU driver,
//! set up the way a hypervisor host would be, minus the units and the security driver.
//!
//! `ensure()` is idempotent and cheap when the daemons already answer: it connects to the
//! two sockets and returns. Otherwise it installs the packages, creates the `libvirt-qemu`
//! user and the `kvm` group, the state directories, writes the three `qemu.conf` settings
//! it needs, and starts `virtlogd -d` and `libvirtd -d`. Daemons it starts keep running
//! (the next run reuses them, like a host where libvirt is a service); `ensure()` says
//! which ones it started.

use crate::cmd;
use crate::deps;
use anyhow::{Context, Result, bail};
use std::fs;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// The connection every libvirt scenario uses.
pub const URI: &str = "qemu:///system";

const LIBVIRTD_SOCK: &str = "/run/libvirt/libvirt-sock";
const VIRTLOGD_SOCK: &str = "/run/libvirt/virtlogd-sock";
const QEMU_CONF: &str = "/etc/libvirt/qemu.conf";

/// The settings a root-only, unconfined QEMU driver needs where no distribution setup ran.
const QEMU_CONF_SETTINGS: &[(&str, &str)] = &[
    ("user", "\"root\""),
    ("group", "\"root\""),
    ("security_driver", "\"none\""),
];

/// What `ensure` did.
#[derive(Debug, Default)]
pub struct Setup {
    /// Daemons this call started (empty when both already answered).
    pub started: Vec<&'static str>,
    pub took: Duration,
}

fn answers(sock: &str) -> bool {
    UnixStream::connect(sock).is_ok()
}

/// Makes `qemu:///system` usable; fast when the daemons are already up.
pub fn ensure() -> Result<Setup> {
    let t = Instant::now();
    let mut setup = Setup::default();
    if answers(LIBVIRTD_SOCK) && answers(VIRTLOGD_SOCK) && virsh_answers() {
        setup.took = t.elapsed();
        return Ok(setup);
    }
    deps::ensure_packages(deps::LIBVIRT_PACKAGES)?;
    ensure_group("kvm")?;
    ensure_group("libvirt-qemu")?;
    ensure_user("libvirt-qemu", "libvirt-qemu", "kvm")?;
    for d in [
        "/var/log/libvirt/qemu",
        "/run/libvirt",
        "/var/lib/libvirt/qemu",
        "/var/cache/libvirt/qemu",
    ] {
        fs::create_dir_all(d).with_context(|| format!("creating {d}"))?;
    }
    let conf = fs::read_to_string(QEMU_CONF).unwrap_or_default();
    let new = with_settings(&conf, QEMU_CONF_SETTINGS);
    if new != conf {
        fs::write(QEMU_CONF, &new).with_context(|| format!("writing {QEMU_CONF}"))?;
    }
    if !answers(VIRTLOGD_SOCK) {
        cmd::run(Command::new("virtlogd").arg("-d"))?;
        wait_socket(VIRTLOGD_SOCK, "virtlogd")?;
        setup.started.push("virtlogd");
    }
    if !answers(LIBVIRTD_SOCK) {
        cmd::run(Command::new("libvirtd").arg("-d"))?;
        wait_socket(LIBVIRTD_SOCK, "libvirtd")?;
        setup.started.push("libvirtd");
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while !virsh_answers() {
        if Instant::now() > deadline {
            bail!(
                "libvirtd answers on {LIBVIRTD_SOCK} but `virsh -c {URI} version` still fails after 30 s (see /var/log/libvirt)"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    setup.took = t.elapsed();
    Ok(setup)
}

fn virsh_answers() -> bool {
    Command::new("virsh")
        .args(["-q", "-c", URI, "version"])
        .stdin(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

fn wait_socket(sock: &str, daemon: &str) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !answers(sock) {
        if Instant::now() > deadline {
            bail!("{daemon} -d exited but nothing answers on {sock} after 30 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn getent(db: &str, name: &str) -> bool {
    Command::new("getent")
        .args([db, name])
        .stdin(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

fn ensure_group(name: &str) -> Result<()> {
    if !getent("group", name) {
        cmd::run(Command::new("groupadd").args(["--system", name]))?;
    }
    Ok(())
}

fn ensure_user(name: &str, group: &str, extra: &str) -> Result<()> {
    if !getent("passwd", name) {
        cmd::run(Command::new("useradd").args([
            "--system",
            "--gid",
            group,
            "--groups",
            extra,
            "--home-dir",
            "/var/lib/libvirt",
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            name,
        ]))?;
    }
    Ok(())
}

/// `conf` with each `key = value` set: an active line for the key is replaced, else the
/// setting is appended. Comments and other keys stay as they are.
pub fn with_settings(conf: &str, settings: &[(&str, &str)]) -> String {
    let key_of = |line: &str| -> Option<String> {
        let l = line.trim_start();
        if l.starts_with('#') {
            return None;
        }
        let (k, _) = l.split_once('=')?;
        Some(k.trim().to_string())
    };
    let mut out = Vec::new();
    let mut done = vec![false; settings.len()];
    for line in conf.lines() {
        match key_of(line).and_then(|k| settings.iter().position(|(s, _)| *s == k)) {
            Some(i) if !done[i] => {
                out.push(format!("{} = {}", settings[i].0, settings[i].1));
                done[i] = true;
            }
            Some(_) => {} // a repeated key: the first occurrence carries the value
            None => out.push(line.to_string()),
        }
    }
    for (i, (k, v)) in settings.iter().enumerate() {
        if !done[i] {
            out.push(format!("{k} = {v}"));
        }
    }
    let mut s = out.join("\n");
    s.push('\n');
    s
}

/// True when a domain of that name is defined on `URI`.
pub fn domain_defined(name: &str) -> bool {
    Command::new("virsh")
        .args(["-q", "-c", URI, "domstate", name])
        .stdin(std::process::Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `virsh -c URI ARGS`: stdout, or an error naming the command and libvirt's message.
/// Not `-q`: that also drops results such as "Froze 2 filesystem(s)".
pub fn virsh(args: &[&str]) -> Result<String> {
    cmd::stdout(Command::new("virsh").args(["-c", URI]).args(args))
}

/// Destroys (if running) and undefines `name`; no error when it does not exist.
pub fn remove_domain(name: &str) {
    if domain_defined(name) {
        let _ = virsh(&["destroy", name]);
        let _ = virsh(&["undefine", "--nvram", name]);
    }
}

/// The domain's QEMU log, for error messages.
pub fn qemu_log(name: &str) -> String {
    let p = Path::new("/var/log/libvirt/qemu").join(format!("{name}.log"));
    format!(
        "--- {} (last lines) ---\n{}",
        p.display(),
        crate::cmd::log_tail(&p, 20)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_replace_active_lines_and_append_missing_ones() {
        let conf = "# user = \"nobody\"\nuser = \"libvirt-qemu\"\nvnc_listen = \"0.0.0.0\"\nuser = \"x\"\n";
        let out = with_settings(conf, QEMU_CONF_SETTINGS);
        assert_eq!(
            out,
            "# user = \"nobody\"\nuser = \"root\"\nvnc_listen = \"0.0.0.0\"\ngroup = \"root\"\nsecurity_driver = \"none\"\n"
        );
        // Applying it again changes nothing: no rewrite on the next run.
        assert_eq!(with_settings(&out, QEMU_CONF_SETTINGS), out);
    }
}
