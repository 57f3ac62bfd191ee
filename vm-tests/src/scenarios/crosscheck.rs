//! crosscheck: the seed `seedctl seed` writes is a plain NoCloud seed. Real Debian
//! cloud-init, on the cloud-init variant of the same base, must boot it to the same
//! hostname, the same root keys and the very same SSH host key as nixseed does.

use super::*;
use crate::cmd;
use std::process::Command;

/// One file of a NoCloud ISO, read back with xorriso (the host kernel cannot mount it).
fn iso_file(iso: &std::path::Path, name: &str, scratch: &std::path::Path) -> Result<String> {
    let out = scratch.join(format!("iso-{name}"));
    let _ = std::fs::remove_file(&out);
    cmd::run(
        Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(iso)
            .args(["-extract", &format!("/{name}")])
            .arg(&out),
    )?;
    std::fs::read_to_string(&out).with_context(|| format!("reading {name} from {}", iso.display()))
}

pub fn crosscheck(_h: &Harness) -> Result<()> {
    let ci = Harness::setup(Variant::CloudInit)?;
    let m = ci.new_machine("crosscheck")?;
    let want_key = m.host_key_pub()?;
    let meta = iso_file(&m.seed_iso, "meta-data", &m.state)?;
    let want_iid = meta
        .lines()
        .find_map(|l| l.strip_prefix("instance-id:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .with_context(|| format!("no instance-id in the seed's meta-data:\n{meta}"))?;

    // Harness::boot fails at once if sshd ever presents another key than machines/NAME's.
    let b = ci.boot(&m)?;
    let seen = ssh::keyscan(b.ssh.port)
        .with_context(|| format!("ssh-keyscan on port {} got no ed25519 key", b.ssh.port))?;
    ensure!(
        Some(seen.clone()) == ssh::key_type_and_blob(&want_key),
        "cloud-init's sshd presents `{seen}`, machines/{}/ssh_host_ed25519_key.pub is `{want_key}`",
        m.name
    );
    // Logged in as root with the harness key: ssh_authorized_keys + disable_root: false work.
    let whoami = b.ssh.run("id -un")?;
    ensure!(whoami.trim() == "root", "logged in as '{}'", whoami.trim());
    let status = b.ssh.run("cloud-init status --wait --long || true")?;
    ensure!(
        status.contains("status: done"),
        "cloud-init did not finish cleanly:\n{status}"
    );
    let iid = b.ssh.run("cat /var/lib/cloud/data/instance-id")?;
    ensure!(
        iid.trim() == want_iid,
        "cloud-init's instance-id is '{}', the seed's meta-data says '{want_iid}'",
        iid.trim()
    );
    let ds = b.ssh.run("cat /run/cloud-init/cloud-id 2>/dev/null; cat /var/lib/cloud/data/result.json 2>/dev/null || true")?;
    ensure!(
        ds.to_ascii_lowercase().contains("nocloud"),
        "cloud-init did not use the NoCloud datasource:\n{ds}"
    );
    let host = b.ssh.run("hostname")?;
    let want_host = m.read("hostname")?;
    ensure!(
        host.trim() == want_host.split('.').next().unwrap_or(&want_host),
        "cloud-init set hostname '{}', machines/{}/hostname says '{want_host}'",
        host.trim(),
        m.name
    );
    let guest_pub = b.ssh.run("cat /etc/ssh/ssh_host_ed25519_key.pub")?;
    ensure!(
        ssh::key_type_and_blob(&guest_pub) == ssh::key_type_and_blob(&want_key),
        "/etc/ssh/ssh_host_ed25519_key.pub in the guest is `{}`",
        guest_pub.trim()
    );
    // The private key on disk is the one from the seed, not a regenerated one.
    let derived = b
        .ssh
        .run("ssh-keygen -y -f /etc/ssh/ssh_host_ed25519_key")?;
    ensure!(
        ssh::key_type_and_blob(&derived) == ssh::key_type_and_blob(&want_key),
        "the guest's private host key derives `{}`, not the machine's key",
        derived.trim()
    );
    let auth = b.ssh.run("cat /root/.ssh/authorized_keys")?;
    let admin = m.read("admin_authorized_keys")?;
    for k in admin.lines().filter(|l| !l.trim().is_empty()) {
        let blob = ssh::key_type_and_blob(k).with_context(|| {
            format!("admin_authorized_keys holds `{k}`, not an OpenSSH public key")
        })?;
        ensure!(
            auth.contains(&blob),
            "root's authorized_keys lacks the admin key `{blob}`:\n{auth}"
        );
    }
    eprintln!(
        "vm-tests: {}: real cloud-init applied the seedctl seed: hostname {}, instance-id {}, host key {}",
        m.name,
        host.trim(),
        iid.trim(),
        seen
    );
    b.poweroff()
}
