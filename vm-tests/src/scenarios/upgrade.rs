//! A new base image under an existing machine (`seedctl upgrade`): `/var` and the identity
//! stay, the root filesystem is the new one.

use super::*;
use crate::cmd;
use std::fs;
use std::process::Command;

/// The file that only the "rebuilt" base carries.
const RELEASE_FILE: &str = "/etc/nixseed-test-release";

/// A copy of `base` with one file added (debugfs on the raw ext4, no mount), as a
/// rebuilt image would differ.
fn rebuilt_base(base: &std::path::Path, dir: &std::path::Path, stamp: &str) -> Result<PathBuf> {
    fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let raw = dir.join("next.raw");
    let out = dir.join("base-next.qcow2");
    let _ = fs::remove_file(&out);
    cmd::run(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "qcow2", "-O", "raw"])
            .arg(base)
            .arg(&raw),
    )?;
    let content = dir.join("release");
    fs::write(&content, format!("{stamp}\n")).context("writing the release stamp")?;
    let (parent, name) = RELEASE_FILE.rsplit_once('/').unwrap_or(("/", RELEASE_FILE));
    let script = dir.join("inject.debugfs");
    fs::write(
        &script,
        format!(
            "cd {parent}\nwrite {} {name}\nsif {RELEASE_FILE} mode 0100644\nsif {RELEASE_FILE} uid 0\nsif {RELEASE_FILE} gid 0\n",
            content.display()
        ),
    )
    .context("writing the debugfs script")?;
    let o = cmd::run(
        Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script)
            .arg(&raw),
    )?;
    let err = String::from_utf8_lossy(&o.stderr);
    ensure!(
        !err.lines()
            .any(|l| !l.starts_with("debugfs ") && !l.trim().is_empty()),
        "debugfs could not add {RELEASE_FILE} to {}: {err}",
        raw.display()
    );
    cmd::run(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(&out),
    )?;
    fs::remove_file(&raw).with_context(|| format!("removing {}", raw.display()))?;
    Ok(out)
}

pub fn upgrade(h: &Harness) -> Result<()> {
    let m = h.new_machine("upgrade")?;
    let stamp = format!("rebuilt-{}", std::process::id());
    let b = h.boot(&m)?;
    b.ssh
        .run("mkdir -p /var/lib/test && echo kept-across-upgrade > /var/lib/test/marker && sync")?;
    let gen1 = b.ssh.run("readlink /var/identity/current")?;
    let manifest1 = b.ssh.run("cat /var/identity/manifest.json")?;
    ensure!(
        b.ssh
            .output(&format!("test -e {RELEASE_FILE}"))?
            .status
            .code()
            == Some(1),
        "{RELEASE_FILE} exists on the old base already"
    );
    b.poweroff()?;

    let next = rebuilt_base(&h.image.base_qcow2, &m.state.join("rebuilt-base"), &stamp)?;
    let out = cmd::stdout(
        m.seedctl(h.seedctl.as_ref())?
            .args(["upgrade", &m.name, "--base"])
            .arg(&next),
    )?;
    eprintln!("vm-tests: {}: {}", m.name, out.trim());

    let b = h.boot(&m)?;
    let marker = b.ssh.run("cat /var/lib/test/marker")?;
    ensure!(
        marker.trim() == "kept-across-upgrade",
        "/var/lib/test/marker after the upgrade reads '{}'",
        marker.trim()
    );
    let release = b.ssh.run(&format!("cat {RELEASE_FILE}"))?;
    ensure!(
        release.trim() == stamp,
        "{RELEASE_FILE} reads '{}', the new base wrote '{stamp}': the root is not the new base",
        release.trim()
    );
    let gen2 = b.ssh.run("readlink /var/identity/current")?;
    let manifest2 = b.ssh.run("cat /var/identity/manifest.json")?;
    ensure!(
        gen1 == gen2,
        "the identity generation changed across the upgrade: {} -> {}",
        gen1.trim(),
        gen2.trim()
    );
    ensure!(
        manifest1 == manifest2,
        "manifest.json changed across the upgrade:\nbefore: {manifest1}\nafter: {manifest2}"
    );
    let id = b.ssh.run("cat /etc/machine-id")?;
    ensure!(
        id.trim() == m.machine_id()?,
        "machine-id changed across the upgrade"
    );
    ensure!(
        root_is_read_only(&b.ssh)?,
        "/ is not read-only on the new base"
    );
    b.discard()?;
    let _ = fs::remove_file(&next);
    Ok(())
}
