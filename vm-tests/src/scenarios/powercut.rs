//! Power cuts: QEMU is SIGKILLed while the agent writes a new generation — at delay points
//! in the initrd stage (first boot of a new identity) and during a live `seedctl push` —
//! enabled only by the test-only kernel flag `nixseed.test_delay=POINT:MS`. The `/var` disk
//! honours the guest's flushes (QEMU `cache=writeback`, where each flush ends in an fsync
//! on the host; the other scenarios use `unsafe`, which skips that fsync for speed). After every cut the disk is read
//! offline as the next boot would see it (e2fsck replays the journal, debugfs reads, no
//! mount): `/var/identity` must read (as the next boot reads it) as exactly
//! the old or exactly the new generation, every file matching its manifest's sha256, the
//! host key pair consistent. The machine then boots to sshd with its key, and a file
//! written to `/var` before the first cut is intact.

use super::*;

/// Every guest flush reaches the host's disk before it completes, as on real hardware.
const VAR_CACHE: &str = "writeback";

/// A full boot of the machine with the `/var` cache mode of this scenario.
fn boot(h: &Harness, m: &Machine) -> Result<Booted> {
    let expected = m.host_key_pub()?;
    h.boot_with(m, Some(&expected), |cfg| cfg.var_cache = VAR_CACHE)
}
use crate::cmd;
use std::fs;
use std::process::Command;

/// Delay points the initrd stage passes while applying a new identity (agent/src). Of the
/// files written into the new generation's directory, the first, the private host key and
/// the last are cut here: a cut at any of them leaves the same shape on the disk (a
/// directory nothing points at, holding a prefix of the files), and the host test
/// `killed_at_every_point_the_store_holds_one_whole_generation` kills the stage at every
/// file.
const INITRD_POINTS: &[&str] = &[
    "composed",
    "store-file-admin_authorized_keys",
    "store-file-ssh_host_ed25519_key",
    "store-file-user_authorized_keys",
    "store-before-rename",
    "store-before-swap",
    "store-after-swap",
    "store-after-links",
    "store-after-prune",
    "bind-hostname",
];

/// Points a live push passes in the running guest's `serve`.
const PUSH_POINTS: &[&str] = &[
    "store-file-hostname",
    "store-before-swap",
    "store-after-swap",
];

const DELAY_MS: u64 = 600_000;

/// Seconds between reaching a point and the cut for the "names committed, data not" case.
const TORN_AFTER_S: u64 = 12;

/// What the `/var` disk holds, read offline.
struct OnDisk {
    generation: u64,
    hostname: String,
}

pub fn powercut(h: &Harness) -> Result<()> {
    let m = h.new_machine("powercut")?;
    let agent = deps::build_agent()?;
    let b = boot(h, &m)?;
    b.ssh
        .run("mkdir -p /var/lib/test && echo precious > /var/lib/test/before && sync")?;
    b.poweroff()?;
    let mut state = read_offline(&m, &agent)?;
    let mut cuts = 0;

    // Each point is cut at once; the swap once more after ext4 has committed the new
    // names (every 5 s). The initrd stage leaves durability to stage 2, so nothing of the
    // new generation was flushed by the agent: the disk must still read whole, as the old
    // generation (an incomplete new one is rolled back) or as the new.
    let cuts_at = INITRD_POINTS
        .iter()
        .map(|p| (*p, 0))
        .chain([("store-after-swap", TORN_AFTER_S)]);
    for (i, (point, linger)) in cuts_at.enumerate() {
        let hostname = format!("cut{i}");
        set_identity(h, &m, &hostname)?;
        let port = qemu::free_port()?;
        let mut cfg = m.vm_config(&h.image, h.accel, port)?;
        cfg.var_cache = VAR_CACHE;
        cfg.append
            .push_str(&format!(" nixseed.test_delay={point}:{DELAY_MS}"));
        let mut vm = Vm::start(cfg)?;
        wait_until(&mut vm, point, |vm| Ok(vm.serial_text()))?;
        std::thread::sleep(Duration::from_secs(linger));
        vm.kill();
        let what = format!("{point} (+{linger} s)");
        state = check_cut(&m, &agent, &what, &state, &hostname)?;
        cuts += 1;
    }

    // A full boot after the last cut: the pending identity is applied and sshd answers
    // with the machine's key.
    let b = boot(h, &m)?;
    verify_running(&b, &m)?;
    b.poweroff()?;
    state = read_offline(&m, &agent)?;

    // A push cut by the power rewrites the seed disk all the same once it has failed: the
    // next boot applies machines/NAME, the identity the push carried.
    for (i, point) in PUSH_POINTS.iter().enumerate() {
        let expected = m.host_key_pub()?;
        let b = h.boot_with(&m, Some(&expected), |cfg| {
            cfg.var_cache = VAR_CACHE;
            cfg.append
                .push_str(&format!(" nixseed.test_delay={point}:{DELAY_MS}"));
        })?;
        let hostname = format!("pushcut{i}");
        fs::write(m.dir.join("hostname"), format!("{hostname}\n"))?;
        let chan = b.vm.config.channel_socket();
        // Killed and reaped however this round ends.
        let mut push = crate::cmd::Reaped(
            m.seedctl(h.seedctl.as_ref())?
                .args(["push", &m.name, "--timeout", "300", "--socket"])
                .arg(&chan)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .context("starting seedctl push")?,
        );
        let Booted { mut vm, ssh, .. } = b;
        wait_until(&mut vm, point, |_| {
            ssh.run("journalctl -b -u nixseed-agent --no-pager -o cat || true")
        })?;
        vm.kill();
        // With the VM gone the push fails on its own, and then writes the seed disk.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let ended = loop {
            match push.0.try_wait().context("waiting for seedctl push")? {
                Some(status) => break Some(status),
                None if std::time::Instant::now() > deadline => break None,
                None => std::thread::sleep(std::time::Duration::from_millis(200)),
            }
        };
        if ended.is_none() {
            drop(push);
            bail!("`seedctl push` was still running 60 s after the VM was killed at {point}");
        }
        check_cut(&m, &agent, &format!("push at {point}"), &state, &hostname)?;
        // The next boot applies the seed disk the failed push wrote: `hostname`.
        let b = boot(h, &m)?;
        verify_running(&b, &m)?;
        b.poweroff()?;
        state = read_offline(&m, &agent)?;
        cuts += 1;
    }
    eprintln!(
        "vm-tests: powercut: {cuts} cuts, every one left a whole generation (now generation {})",
        state.generation
    );
    Ok(())
}

/// Changes the machine's hostname and writes a fresh seed (a new instance-id).
fn set_identity(h: &Harness, m: &Machine, hostname: &str) -> Result<()> {
    fs::write(m.dir.join("hostname"), format!("{hostname}\n"))?;
    cmd::run(
        m.seedctl(h.seedctl.as_ref())?
            .args(["seed", &m.name, "-o"])
            .arg(&m.seed_iso),
    )?;
    Ok(())
}

/// Polls `text` until the agent reports the delay point, then returns (the caller kills).
fn wait_until(vm: &mut Vm, point: &str, text: impl Fn(&Vm) -> Result<String>) -> Result<()> {
    let t = Instant::now();
    loop {
        vm.ensure_running()?;
        let seen = text(vm).unwrap_or_default();
        if seen
            .lines()
            .any(|l| l.contains("test delay point reached") && l.contains(point))
        {
            return Ok(());
        }
        if t.elapsed() > ssh_timeout() {
            bail!(
                "the agent never reached delay point {point}\n{}",
                vm.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Reads `/var/identity` from the machine's `/var` disk without mounting it, and checks it
/// with the agent's own verifier (`nixseed-agent status` refuses a generation whose files
/// differ from its manifest).
fn read_offline(m: &Machine, agent: &std::path::Path) -> Result<OnDisk> {
    let scratch = m.state.join("offline");
    if scratch.exists() {
        fs::remove_dir_all(&scratch)?;
    }
    fs::create_dir_all(&scratch)?;
    let raw = scratch.join("var.raw");
    cmd::run(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(&m.var_disk)
            .arg(&raw),
    )?;
    // What the next boot sees: the kernel replays the ext4 journal first. e2fsck does the
    // same on the copy (exit 1: "errors corrected" is what a replay reports).
    let fsck = Command::new("e2fsck")
        .args(["-fy"])
        .arg(&raw)
        .output()
        .context("running e2fsck on the copy of /var")?;
    ensure!(
        matches!(fsck.status.code(), Some(0) | Some(1)),
        "e2fsck found /var damaged beyond a journal replay: {}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    cmd::run(
        Command::new("debugfs")
            .arg("-R")
            .arg(format!("rdump /identity {}", scratch.display()))
            .arg(&raw),
    )?;
    fs::remove_file(&raw)?;
    let ids = scratch.join("identity");
    let status = cmd::run(
        Command::new(agent)
            .args(["status", "--identity-dir"])
            .arg(&ids),
    )
    .context("the identity on the /var disk does not verify against its manifest")?;
    let said = String::from_utf8_lossy(&status.stderr);
    if !said.trim().is_empty() {
        eprintln!("vm-tests: powercut: nixseed-agent status: {}", said.trim());
    }
    let manifest: serde_json::Value = serde_json::from_slice(&status.stdout)
        .with_context(|| format!("status output: {}", String::from_utf8_lossy(&status.stdout)))?;
    let generation = manifest["generation"]
        .as_u64()
        .context("manifest without generation")?;
    // The host key pair is consistent: the public key derives from the private one.
    let derived = cmd::stdout(
        Command::new("ssh-keygen")
            .arg("-y")
            .arg("-f")
            .arg(ids.join("current/ssh_host_ed25519_key")),
    )?;
    let public = fs::read_to_string(ids.join("current/ssh_host_ed25519_key.pub"))?;
    ensure!(
        ssh::key_type_and_blob(&derived) == ssh::key_type_and_blob(&public),
        "generation {generation}: the host public key does not match the private key"
    );
    let hostname = fs::read_to_string(ids.join("current/hostname"))?
        .trim()
        .to_string();
    Ok(OnDisk {
        generation,
        hostname,
    })
}

/// After a cut: exactly the old generation, or exactly the new one.
fn check_cut(
    m: &Machine,
    agent: &std::path::Path,
    what: &str,
    before: &OnDisk,
    new_hostname: &str,
) -> Result<OnDisk> {
    let now = read_offline(m, agent).with_context(|| format!("after the cut at {what}"))?;
    let old_whole = now.generation == before.generation && now.hostname == before.hostname;
    // A new generation is numbered past every kept one: an earlier cut may have left one
    // that never became current, so the new number is higher, not always the next.
    let new_whole = now.generation > before.generation && now.hostname == new_hostname;
    ensure!(
        old_whole || new_whole,
        "after the cut at {what}: generation {} with hostname {} is neither the old ({}, {}) nor a new one (after {}, {new_hostname})",
        now.generation,
        now.hostname,
        before.generation,
        before.hostname,
        before.generation
    );
    eprintln!(
        "vm-tests: powercut at {what}: {} generation {} whole",
        if new_whole { "new" } else { "old" },
        now.generation
    );
    Ok(now)
}

/// The booted machine: sshd with its key (checked by boot), the /var file intact, the
/// identity's hostname live.
fn verify_running(b: &Booted, m: &Machine) -> Result<()> {
    let before = b.ssh.run("cat /var/lib/test/before")?;
    ensure!(
        before.trim() == "precious",
        "/var/lib/test/before is {before:?} after the cuts"
    );
    hostname_matches(&b.ssh, m, "after the cuts")?;
    Ok(())
}
