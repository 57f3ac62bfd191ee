//! First boot and reboot: the identity arrives from the seed in the initrd and survives a
//! reboot byte for byte.

use super::*;

pub fn first_boot(h: &Harness) -> Result<()> {
    let m = h.new_machine("first-boot")?;
    let b = h.boot(&m)?;
    // wait_for_host_key already refused any key but the machine's; now log in with it pinned.
    let id = b.ssh.run("cat /etc/machine-id")?;
    ensure!(
        id.trim() == m.machine_id()?,
        "/etc/machine-id in the guest is '{}', machines/{}/machine-id says '{}'",
        id.trim(),
        m.name,
        m.machine_id()?
    );
    let failed = failed_units(&b.ssh)?;
    ensure!(
        failed.is_empty(),
        "failed units after first boot:\n{}",
        failed.join("\n")
    );
    ensure!(root_is_read_only(&b.ssh)?, "/ is not mounted read-only");
    // The read-only root needs a writable /tmp of its own.
    let tmp = b.ssh.run(
        "findmnt -no FSTYPE /tmp; f=$(mktemp /tmp/nixseed.XXXXXX) && echo ok > \"$f\" && cat \"$f\" && rm \"$f\"",
    )?;
    ensure!(
        tmp.split_whitespace().eq(["tmpfs", "ok"]),
        "/tmp is not a writable tmpfs: {tmp:?}"
    );
    let modules = b.ssh.run("cut -d' ' -f1 /proc/modules")?;
    let unwanted: Vec<&str> = modules
        .lines()
        .filter(|m| crate::image::LEAN_MODULES.contains(m))
        .collect();
    ensure!(
        unwanted.is_empty(),
        "the base blacklists these drivers, yet they were loaded: {}",
        unwanted.join(", ")
    );
    // The base ships the static device nodes kmod would list at boot: kmod is the oracle.
    let kmod = b
        .ssh
        .run("kmod static-nodes --format=tmpfiles --output=/dev/stdout")?;
    let shipped = b.ssh.run(&format!("cat /{}", crate::image::STATIC_NODES))?;
    ensure!(
        kmod == shipped,
        "/{} differs from what `kmod static-nodes` lists in the guest:\n{shipped}\nkmod:\n{kmod}",
        crate::image::STATIC_NODES
    );
    let fuse = b.ssh.run("stat -c '%F %t:%T' /dev/fuse")?;
    ensure!(
        fuse.trim() == "character special file a:e5",
        "/dev/fuse is '{}', not the static node 10:229",
        fuse.trim()
    );
    let timing = agent_timing_lines(&b.ssh)?;
    ensure!(
        !timing.is_empty(),
        "the journal has no nixseed timing line (\"nixseed <stage>: … in N ms\")"
    );
    b.shutdown_via_agent(h, &m).map(|_| ())
}

/// Generation name and `sha256sum` of every identity file.
fn identity_snapshot(ssh: &Ssh) -> Result<(String, String)> {
    let generation = ssh
        .run("readlink /var/identity/current")?
        .trim()
        .to_string();
    let sums =
        ssh.run("cd /var/identity/current && find . -type f | LC_ALL=C sort | xargs sha256sum")?;
    ensure!(
        !sums.trim().is_empty(),
        "/var/identity/current holds no files"
    );
    ensure!(
        sums.contains("./manifest.json"),
        "/var/identity/current has no manifest.json"
    );
    Ok((generation, sums))
}

pub fn reboot(h: &Harness) -> Result<()> {
    let m = h.new_machine("reboot")?;
    let b = h.boot(&m)?;
    let (gen1, sums1) = identity_snapshot(&b.ssh)?;
    let manifest1 = b.ssh.run("cat /var/identity/manifest.json")?;
    let boot1 = b.ssh.run("cat /proc/sys/kernel/random/boot_id")?;
    b.poweroff()?;
    let b = h.boot(&m)?;
    let (gen2, sums2) = identity_snapshot(&b.ssh)?;
    let manifest2 = b.ssh.run("cat /var/identity/manifest.json")?;
    let boot2 = b.ssh.run("cat /proc/sys/kernel/random/boot_id")?;
    ensure!(
        boot1 != boot2,
        "boot_id unchanged: the second boot did not happen"
    );
    ensure!(
        gen1 == gen2,
        "generation changed across reboot: {gen1} -> {gen2}"
    );
    ensure!(
        manifest1 == manifest2,
        "manifest.json changed across reboot"
    );
    ensure!(
        sums1 == sums2,
        "identity files changed across reboot:\nbefore:\n{sums1}\nafter:\n{sums2}"
    );
    let id = b.ssh.run("cat /etc/machine-id")?;
    ensure!(
        id.trim() == m.machine_id()?,
        "machine-id changed across reboot"
    );
    b.poweroff()
}
