//! Live change: edit machines/NAME (hostname, ports, admin keys), `seedctl push` over the
//! VM's control channel, and see it applied without a reboot.

use super::*;
use crate::cmd;
use std::fs;

pub fn push(h: &Harness) -> Result<()> {
    let m = h.new_machine("push")?;
    let b = h.boot(&m)?;
    let boot_id = b.ssh.run("cat /proc/sys/kernel/random/boot_id")?;
    let before = b
        .ssh
        .run("nft list table inet nixseed 2>&1 || true")?
        .to_string();
    if !before.contains("tcp dport 22 accept") {
        let why = b.ssh.run(
            "cat /etc/default/nixseed; systemctl status --no-pager nixseed-firewall.service; \
             journalctl -b --no-pager -o cat -u nixseed-firewall.service | tail -n 20",
        )?;
        bail!(
            "the firewall from the seed is not loaded at boot (nixseed-firewall.service):\n{before}\n{why}"
        );
    }
    ensure!(
        !before.contains("8080"),
        "port 8080 is open before it was pushed:\n{before}"
    );

    // The operator's edits.
    let second = ClientKey::ensure(&m.state.join("second-admin"))?;
    fs::write(m.dir.join("hostname"), "push-renamed\n").context("editing hostname")?;
    fs::write(m.dir.join("tcp_ports"), "22\n8080\n").context("editing tcp_ports")?;
    let keys = format!("{}\n{}\n", h.key.public_line()?, second.public_line()?);
    fs::write(m.dir.join("admin_authorized_keys"), keys).context("editing admin keys")?;

    let chan = b.vm.config.channel_socket();
    let out = cmd::run(
        m.seedctl(h.seedctl.as_ref())?
            .args(["push", &m.name, "--timeout", "60", "--socket"])
            .arg(&chan),
    )?;
    eprintln!(
        "vm-tests: {}: seedctl push: {}",
        m.name,
        String::from_utf8_lossy(&out.stdout).trim()
    );

    let live = b.ssh.run("hostname")?;
    ensure!(
        live.trim() == "push-renamed",
        "hostname after push is '{}', not push-renamed",
        live.trim()
    );
    let etc = b.ssh.run("cat /etc/hostname")?;
    ensure!(
        etc.trim() == "push-renamed",
        "/etc/hostname after push is '{}'",
        etc.trim()
    );
    // sshd still presents the pinned key (a new connection through the pinned known_hosts).
    let seen = ssh::keyscan(b.ssh.port).context("sshd stopped answering after the push")?;
    ensure!(
        Some(seen.clone()) == ssh::key_type_and_blob(&m.host_key_pub()?),
        "sshd presents {seen} after the push, not the machine's key"
    );
    // The added admin key logs in.
    let with_second = Ssh {
        port: b.ssh.port,
        key: second,
        known_hosts: b.ssh.known_hosts.clone(),
    };
    let who = with_second.run("id -un")?;
    ensure!(
        who.trim() == "root",
        "the pushed admin key logs in as '{}'",
        who.trim()
    );
    let fw = b.ssh.run("nft list table inet nixseed")?;
    ensure!(
        fw.contains("8080"),
        "nftables does not open the pushed port 8080:\n{fw}"
    );
    cmd::run(
        m.seedctl(h.seedctl.as_ref())?
            .args(["status", &m.name, "--timeout", "60", "--socket"])
            .arg(&chan),
    )
    .context("seedctl status after the push")?;
    let boot_id2 = b.ssh.run("cat /proc/sys/kernel/random/boot_id")?;
    ensure!(boot_id == boot_id2, "the guest rebooted during the push");
    b.poweroff()
}
