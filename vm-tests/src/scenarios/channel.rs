//! First boot over virtio-serial: no seed disk at all; the host side (`seedctl serve`)
//! answers the guest's hello on `org.nixseed.channel.0`. A later boot with the host
//! silent keeps the identity.

use super::*;
use crate::machine::Machine;
use std::process::Stdio;

/// `seedctl serve NAME --socket SOCK --once` in the background; killed when dropped.
struct Answerer(crate::cmd::Reaped);

impl Answerer {
    fn start(h: &Harness, m: &Machine, socket: &std::path::Path) -> Result<Answerer> {
        let log = m.state.join("serve.log");
        let logf =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let child = m
            .seedctl(h.seedctl.as_ref())?
            .args(["serve", &m.name, "--once", "--socket"])
            .arg(socket)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()
            .context("starting seedctl serve")?;
        Ok(Answerer(crate::cmd::Reaped(child)))
    }

    /// Waits for `--once` to finish after the guest was answered.
    fn finish(mut self, m: &Machine) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(s) = self.0.0.try_wait().context("waiting for seedctl serve")? {
                let log = std::fs::read_to_string(m.state.join("serve.log")).unwrap_or_default();
                ensure!(s.success(), "seedctl serve exited {s}:\n{log}");
                eprintln!("vm-tests: {}: seedctl serve: {}", m.name, log.trim_end());
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "seedctl serve --once still runs after the guest booted"
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// Milliseconds from the agent's line "identity for X received N ms after hello".
fn hello_ms(ssh: &Ssh) -> Result<Option<f64>> {
    let out = ssh.run("journalctl -b --no-pager -o cat | grep -F 'ms after hello' || true")?;
    Ok(out.lines().find_map(|l| {
        let head = l.split(" ms after hello").next()?;
        head.rsplit(' ').next()?.parse().ok()
    }))
}

/// The initrd stage's summary line ("nixseed initrd: … in N ms").
fn initrd_line(ssh: &Ssh) -> Result<String> {
    Ok(ssh
        .run("journalctl -b --no-pager -o cat | grep -E 'nixseed initrd: .* in [0-9.]+ ms' | tail -n1 || true")?
        .trim()
        .to_string())
}

fn answered_boot(h: &Harness, m: &Machine) -> Result<(Booted, f64)> {
    // Where the harness's QEMU puts the channel (`VmConfig::channel_socket`); the
    // answerer retries until QEMU has made it.
    let socket = m.state.join("run").join("nixseed-channel.sock");
    let answerer = Answerer::start(h, m, &socket)?;
    let b = h.boot_with(m, Some(&m.host_key_pub()?), |c| c.seed_iso = None)?;
    answerer.finish(m)?;
    let ms = hello_ms(&b.ssh)?.context(
        "the journal has no \"identity for … received N ms after hello\" line from the agent",
    )?;
    eprintln!(
        "vm-tests: {}: identity received {ms:.0} ms after hello; {}",
        m.name,
        initrd_line(&b.ssh)?
    );
    Ok((b, ms))
}

fn check_identity(b: &Booted, m: &Machine) -> Result<()> {
    let id = b.ssh.run("cat /etc/machine-id")?;
    ensure!(
        id.trim() == m.machine_id()?,
        "/etc/machine-id is {}, machines/{}/machine-id says {}",
        id.trim(),
        m.name,
        m.machine_id()?
    );
    hostname_matches(&b.ssh, m, "on this boot")?;
    Ok(())
}

pub fn channel(h: &Harness) -> Result<()> {
    let m = h.new_machine("channel")?;
    // First boot: no cdrom; the identity comes only from the host's answer.
    let (b, ms1) = answered_boot(h, &m)?;
    check_identity(&b, &m)?;
    let src = b.ssh.run("cat /var/identity/manifest.json")?;
    ensure!(
        src.contains("channel:"),
        "manifest.json does not name the control channel as the source: {src}"
    );
    let generation = b.ssh.run("readlink /var/identity/current")?;
    b.poweroff()?;

    // Host silent: the agent gives up after its bounded wait and keeps the identity.
    let b = h.boot_with(&m, Some(&m.host_key_pub()?), |c| c.seed_iso = None)?;
    check_identity(&b, &m)?;
    let g = b.ssh.run("readlink /var/identity/current")?;
    ensure!(
        g == generation,
        "with the host silent the generation moved: {} -> {}",
        generation.trim(),
        g.trim()
    );
    ensure!(
        hello_ms(&b.ssh)?.is_none(),
        "an identity arrived although nothing answered"
    );
    b.poweroff()?;

    // Answered again: the same identity, nothing rewritten.
    let (b, ms2) = answered_boot(h, &m)?;
    check_identity(&b, &m)?;
    let g = b.ssh.run("readlink /var/identity/current")?;
    ensure!(
        g == generation,
        "the same identity pushed again moved the generation: {} -> {}",
        generation.trim(),
        g.trim()
    );
    let line = initrd_line(&b.ssh)?;
    ensure!(
        line.contains("nixseed initrd: Same -> "),
        "the same identity pushed again was not decided `Same` in the initrd: {line}"
    );
    b.discard()?;
    eprintln!(
        "vm-tests: {}: hello to identity: {ms1:.0} ms (first boot), {ms2:.0} ms (same identity)",
        m.name
    );
    Ok(())
}
