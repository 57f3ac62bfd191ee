//! First boot and reboot: the identity arrives from the seed in the initrd and survives a
//! reboot byte for byte.

use super::operator::OperatorBoot;
use super::*;

pub fn first_boot(h: &Harness) -> Result<()> {
    let m = h.new_machine("first-boot")?;
    // `seedctl seed` first, as for a seed attached by other means; `seedctl run` writes the
    // seed again at every start, and must write the same bytes (the same instance-id).
    let out = cmd::stdout(
        m.seedctl(h.seedctl.as_ref())?
            .args(["--json", "seed", &m.name]),
    )?;
    let seeded: serde_json::Value = serde_json::from_str(out.trim())
        .with_context(|| format!("parsing `seedctl --json seed {}`: {out}", m.name))?;
    let (iso, seed_iid) = match (seeded["output"].as_str(), seeded["instance_id"].as_str()) {
        (Some(o), Some(i)) => (PathBuf::from(o), i.to_string()),
        _ => bail!(
            "`seedctl --json seed {}` names no output or instance_id: {out}",
            m.name
        ),
    };
    let seed_sum = crate::image::sha256_file(&iso)?;
    // `seedctl run` writes the seed again at every start: moved aside here, it must be
    // there again afterwards, byte for byte what `seedctl seed` wrote.
    let aside = iso.with_extension("iso.seeded");
    std::fs::rename(&iso, &aside).with_context(|| format!("moving {} aside", iso.display()))?;
    // Booted by `seedctl run`, as an operator boots it: sshd presented only the machine's
    // key, or the wait failed.
    let b = OperatorBoot::start(h, &m)?;
    ensure!(
        iso.exists(),
        "`seedctl run` did not write the seed {} again",
        iso.display()
    );
    ensure!(
        crate::image::sha256_file(&iso)? == seed_sum,
        "`seedctl run` rewrote {} with other bytes than `seedctl seed` wrote",
        iso.display()
    );
    let _ = std::fs::remove_file(&aside);
    let manifest = b.ssh.run("cat /var/identity/manifest.json")?;
    let guest_iid = serde_json::from_str::<serde_json::Value>(&manifest)
        .ok()
        .and_then(|v| v["instance_id"].as_str().map(String::from));
    ensure!(
        guest_iid.as_deref() == Some(seed_iid.as_str()),
        "the guest recorded instance-id {guest_iid:?}, `seedctl seed` wrote {seed_iid}:\n{manifest}"
    );
    let offered = ssh::all_host_keys(b.ssh.port)?;
    let expected = ssh::key_type_and_blob(&m.host_key_pub()?).unwrap_or_default();
    ensure!(
        offered == [expected.clone()],
        "sshd offers these host keys, not exactly the machine's `{expected}`:\n{}",
        offered.join("\n")
    );
    let id = b.ssh.run("cat /etc/machine-id")?;
    ensure!(
        id.trim() == m.machine_id()?,
        "/etc/machine-id in the guest is '{}', machines/{}/machine-id says '{}'",
        id.trim(),
        m.name,
        m.machine_id()?
    );
    // The operator's own login: `seedctl ssh` with the known_hosts `seedctl run` pinned.
    let via = cmd::stdout(
        m.seedctl(h.seedctl.as_ref())?
            .args(["ssh", &m.name, "-i"])
            .arg(&h.key.private)
            .args(["--", "cat", "/etc/machine-id"]),
    )?;
    ensure!(
        via.trim() == id.trim(),
        "`seedctl ssh {} -- cat /etc/machine-id` printed '{}' (known_hosts {})",
        m.name,
        via.trim(),
        b.known_hosts.display()
    );
    // Set in the initrd: systemd and journald started with it, so the boot's first journal
    // entry already carries it, and stage 2 found the initrd stage's work done.
    let first = b
        .ssh
        .run("journalctl -b -o export | grep -a -m1 '^_MACHINE_ID='")?;
    ensure!(
        first.trim() == format!("_MACHINE_ID={}", id.trim()),
        "this boot's first journal entry has {}, not the identity's machine-id: it was not set in the initrd",
        first.trim()
    );
    // /var was writable before systemd started, so journald wrote there from its own
    // start: no runtime journal in /run to lose in a crash and to copy over later, and the
    // machine's journal on /var holds the boot from the kernel's first line.
    let journal = b.ssh.run(
        "test -e /run/log/journal && echo runtime; journalctl -D /var/log/journal -b -o cat | head -n1",
    )?;
    ensure!(
        !journal.starts_with("runtime") && journal.starts_with("Linux version"),
        "the boot's journal was not written to /var from journald's start (a runtime journal in /run/log/journal, or /var's journal starts elsewhere): {journal:?}"
    );
    let timing = agent_timing_lines(&b.ssh)?;
    ensure!(
        timing.iter().any(|l| l.contains("nixseed initrd: ")),
        "the journal has no timing line of the initrd stage (\"nixseed initrd: … in N ms\"); it has:\n{}",
        timing.join("\n")
    );
    let stage2 = b.ssh.run("journalctl -b -o cat -u nixseed-apply.service")?;
    ensure!(
        stage2.contains("initrd stage already applied generation")
            && !stage2.contains("machine-id was set late"),
        "nixseed-apply.service did not find the initrd stage's work done:\n{stage2}"
    );
    // Every unit has started, and none failed.
    let state = b.ssh.run("systemctl is-system-running --wait || true")?;
    if state.trim() != "running" {
        let failed = failed_units(&b.ssh)?;
        bail!(
            "the system is '{}' after first boot; failed units:\n{}",
            state.trim(),
            failed.join("\n")
        );
    }
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
    // The subsystems coldplug leaves out: none of their devices has a module alias or a
    // node, for udev to load or make.
    let matches =
        crate::image::udevadm_flags("subsystem-match", crate::image::SUBSYSTEMS_WITHOUT_RULES);
    let devices = b.ssh.run(&format!(
        "udevadm trigger --dry-run --verbose --type=devices{matches}"
    ))?;
    ensure!(
        devices.lines().any(|l| l.starts_with("/sys/")),
        "the guest has no device of the subsystems the base's coldplug leaves out: {devices:?}"
    );
    let left_out = b.ssh.run(&format!(
        "for p in {}; do grep -HE '^(MODALIAS|DEVNAME)=' \"$p/uevent\" || true; done",
        devices.split_whitespace().collect::<Vec<_>>().join(" ")
    ))?;
    ensure!(
        left_out.trim().is_empty(),
        "a device of a subsystem the base's coldplug leaves out has a module alias or a node:\n{left_out}"
    );
    let fuse = b.ssh.run("stat -c '%F %t:%T' /dev/fuse")?;
    ensure!(
        fuse.trim() == "character special file a:e5",
        "/dev/fuse is '{}', not the static node 10:229",
        fuse.trim()
    );
    b.shutdown_via_agent(h, &m).map(|_| ())
}

/// Generation name, and `sha256sum`, inode and mtime of every identity file.
fn identity_snapshot(ssh: &Ssh) -> Result<(String, String)> {
    let generation = ssh
        .run("readlink /var/identity/current")?
        .trim()
        .to_string();
    // Contents, and inode and modification time of each file, of `current` and of every
    // flat link: a file rewritten with the same bytes, or a link made again, is a rewrite.
    let sums = ssh.run(
        "cd /var/identity/current && find . -type f | LC_ALL=C sort | xargs sha256sum && \
         find . -type f | LC_ALL=C sort | xargs stat -c '%n inode %i mtime %y' && \
         find /var/identity -mindepth 1 -maxdepth 1 | LC_ALL=C sort | xargs stat -c '%n %F inode %i mtime %y'",
    )?;
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
        "identity files changed or were rewritten across reboot:\nbefore:\n{sums1}\nafter:\n{sums2}"
    );
    let id = b.ssh.run("cat /etc/machine-id")?;
    ensure!(
        id.trim() == m.machine_id()?,
        "machine-id changed across reboot"
    );
    b.discard()
}
