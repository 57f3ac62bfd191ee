//! Two machines from one base image: each boots with its own identity (machine-id, host
//! key, hostname, DHCP client id), and the shared base image is never written.

use super::*;
use crate::image::sha256_file;
use crate::machine::Machine;

/// What an operator sees of one machine from the outside and over ssh.
struct Seen {
    machine_id: String,
    host_key: String,
    hostname: String,
    client_id: String,
}

/// The CLIENTID networkd sent in its DHCP request, from its lease file.
fn dhcp_client_id(ssh: &Ssh) -> Result<String> {
    // networkd writes the lease a moment after sshd may already answer: poll briefly.
    let out = ssh.run(
        "for i in $(seq 1 90); do \
           c=$(grep -h '^CLIENTID=' /run/systemd/netif/leases/* 2>/dev/null | head -n1); \
           [ -n \"$c\" ] && { echo \"$c\"; exit 0; }; sleep 1; \
         done; ls -la /run/systemd/netif/leases/ >&2; exit 1",
    )?;
    let id = out.trim().trim_start_matches("CLIENTID=").to_string();
    ensure!(!id.is_empty(), "no CLIENTID in networkd's lease file");
    Ok(id)
}

fn observe(h: &Harness, m: &Machine) -> Result<Seen> {
    // `boot` refuses any host key but machines/NAME's.
    let b = h.boot(m)?;
    let host_key = ssh::keyscan(b.ssh.port)
        .with_context(|| format!("ssh-keyscan of {} found no ed25519 key", m.name))?;
    let machine_id = b.ssh.run("cat /etc/machine-id")?.trim().to_string();
    let hostname = b.ssh.run("hostname")?.trim().to_string();
    let client_id = dhcp_client_id(&b.ssh)?;
    let link = b
        .ssh
        .run("networkctl status --no-pager 2>&1 | head -n 20 || true")?;
    eprintln!(
        "vm-tests: {}: machine-id {machine_id}, hostname {hostname}, DHCP client id {client_id}\n{}",
        m.name,
        link.trim_end()
    );
    ensure!(
        machine_id == m.machine_id()?,
        "{}: /etc/machine-id is {machine_id}, machines/{}/machine-id says {}",
        m.name,
        m.name,
        m.machine_id()?
    );
    let want_host = m.read("hostname")?;
    let want_short = want_host.split('.').next().unwrap_or_default();
    ensure!(
        hostname == want_short,
        "{}: hostname is '{hostname}', machines/{}/hostname says '{want_host}'",
        m.name,
        m.name
    );
    b.discard()?;
    Ok(Seen {
        machine_id,
        host_key,
        hostname,
        client_id,
    })
}

/// The backing file `qemu-img info` reports for an overlay.
fn backing_file(overlay: &std::path::Path) -> Result<PathBuf> {
    let out = crate::cmd::stdout(
        std::process::Command::new("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(overlay),
    )?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("parsing `qemu-img info` of {}", overlay.display()))?;
    let b = v
        .get("full-backing-filename")
        .or_else(|| v.get("backing-filename"))
        .and_then(|b| b.as_str())
        .with_context(|| format!("{} has no backing file", overlay.display()))?;
    Ok(PathBuf::from(b))
}

pub fn clones(h: &Harness) -> Result<()> {
    let base = &h.image.base_qcow2;
    let before = sha256_file(base)?;
    let a = h.new_machine("clone-a")?;
    let b = h.new_machine("clone-b")?;
    for m in [&a, &b] {
        let backing = backing_file(&m.boot_disk)?;
        ensure!(
            backing.canonicalize().ok() == base.canonicalize().ok(),
            "{}: boot overlay {} is backed by {}, not the shared base {}",
            m.name,
            m.boot_disk.display(),
            backing.display(),
            base.display()
        );
    }
    // One after the other: one VM at a time on a small host.
    let sa = observe(h, &a)?;
    let sb = observe(h, &b)?;
    ensure!(
        sa.machine_id != sb.machine_id,
        "both clones have machine-id {}",
        sa.machine_id
    );
    ensure!(
        sa.host_key != sb.host_key,
        "both clones present host key {}",
        sa.host_key
    );
    ensure!(
        sa.hostname != sb.hostname,
        "both clones are called {}",
        sa.hostname
    );
    ensure!(
        sa.client_id != sb.client_id,
        "both clones asked DHCP with client id {}",
        sa.client_id
    );
    let after = sha256_file(base)?;
    ensure!(
        before == after,
        "the shared base image {} changed while its clones ran",
        base.display()
    );
    Ok(())
}
