//! A machine booted the way an operator boots one: `seedctl run --detach`, which writes
//! the seed and starts QEMU itself. The harness gives it only the test kernel, initramfs
//! and command line (`--kernel`, `--initrd`, `--append`); QEMU's arguments, the seed and
//! the pinned known_hosts are all seedctl's.

use super::*;
use std::fs;

/// QEMU started by `seedctl run --detach`: it belongs to seedctl (its pidfile in the
/// machine's state directory), so the harness watches and, when a check fails, kills it
/// by pid.
pub struct OperatorBoot {
    pid: u32,
    console: PathBuf,
    /// The `known_hosts` `seedctl run` pinned for the forwarded port.
    pub known_hosts: PathBuf,
    pub ssh: Ssh,
    pub boot_to_sshd: Duration,
}

/// A process that exists and is not a zombie: a daemonized QEMU that exited may linger
/// as one until something reaps it.
fn running(pid: u32) -> bool {
    fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z")
    })
}

impl OperatorBoot {
    /// `seedctl --json run NAME --detach` with the test kernel, then waits until sshd
    /// presents exactly the machine's host key.
    pub fn start(h: &Harness, m: &Machine) -> Result<OperatorBoot> {
        let expected = m.host_key_pub()?;
        // The harness's own sessions pin the key in a file of their own, beside seedctl's.
        let own = m.state.join("harness");
        fs::create_dir_all(&own).with_context(|| format!("creating {}", own.display()))?;
        let started = Instant::now();
        let out = cmd::stdout(
            m.seedctl(h.seedctl.as_ref())?
                .args(["--json", "run", &m.name, "--detach", "--accel"])
                .arg(h.accel.as_str())
                .arg("--kernel")
                .arg(&h.image.kernel)
                .arg("--initrd")
                .arg(&h.image.initramfs)
                .arg("--append")
                .arg(machine::kernel_cmdline(&h.image)),
        )?;
        // QEMU runs from here: a failure before the boot's own guard exists (below) kills
        // it by the pidfile seedctl wrote.
        Self::watch(h, m, &out, started, &expected, &own)
            .inspect_err(|_| machine::kill_recorded_qemu(&m.state))
    }

    /// What `start` does once `seedctl run` has printed `out`.
    fn watch(
        h: &Harness,
        m: &Machine,
        out: &str,
        started: Instant,
        expected: &str,
        own: &std::path::Path,
    ) -> Result<OperatorBoot> {
        let v: serde_json::Value = serde_json::from_str(out.trim())
            .with_context(|| format!("parsing `seedctl --json run {}`: {out}", m.name))?;
        let field = |k: &str| {
            v.get(k)
                .with_context(|| format!("`seedctl --json run {}` printed no `{k}`: {out}", m.name))
        };
        let port = field("ssh_port")?
            .as_u64()
            .and_then(|p| u16::try_from(p).ok())
            .with_context(|| format!("`seedctl run {}`: ssh_port is not a port: {out}", m.name))?;
        let path = |k: &str| -> Result<PathBuf> {
            field(k)?
                .as_str()
                .map(PathBuf::from)
                .with_context(|| format!("`seedctl run {}`: {k} is not a path: {out}", m.name))
        };
        let pidfile = path("pidfile")?;
        let pid: u32 = fs::read_to_string(&pidfile)
            .with_context(|| format!("reading QEMU's pidfile {}", pidfile.display()))?
            .trim()
            .parse()
            .with_context(|| format!("{} holds no pid", pidfile.display()))?;
        let console = path("console")?;
        let known_hosts = path("known_hosts")?;
        // From here on, a failed check kills the VM (Drop).
        let mut boot = OperatorBoot {
            pid,
            console,
            known_hosts,
            ssh: Ssh::pinned(port, h.key.clone(), expected, own)?,
            boot_to_sshd: Duration::ZERO,
        };
        let seen = ssh::wait_for_host_key_via(port, None, Some(expected), ssh_timeout(), || {
            ensure!(running(pid), "QEMU (pid {pid}) exited");
            Ok(())
        });
        if let Err(e) = seen {
            bail!("{e:#}\n{}", boot.diagnostics());
        }
        boot.boot_to_sshd = started.elapsed();
        eprintln!(
            "vm-tests: {}: `seedctl run`: sshd answered with the pinned key after {:.1} s",
            m.name,
            boot.boot_to_sshd.as_secs_f64()
        );
        Ok(boot)
    }

    /// The serial console's last lines, which `seedctl run` writes to a file.
    pub fn diagnostics(&self) -> String {
        format!(
            "--- serial console ({}), last lines ---\n{}",
            self.console.display(),
            cmd::log_tail(&self.console, 40)
        )
    }

    /// `seedctl agent NAME shutdown`, with the guest-agent socket `seedctl run` made: it
    /// must succeed and QEMU must exit.
    pub fn shutdown_via_agent(self, h: &Harness, m: &Machine) -> Result<Duration> {
        let t = Instant::now();
        cmd::run(
            m.seedctl(h.seedctl.as_ref())?
                .args(["agent", &m.name, "shutdown"]),
        )?;
        let deadline = t + Duration::from_secs(180);
        while running(self.pid) {
            if Instant::now() >= deadline {
                bail!(
                    "QEMU (pid {}) still runs 180 s after the guest agent's shutdown\n{}",
                    self.pid,
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let took = t.elapsed();
        eprintln!(
            "vm-tests: {}: shut down through the guest agent in {:.1} s",
            m.name,
            took.as_secs_f64()
        );
        Ok(took)
    }
}

impl Drop for OperatorBoot {
    fn drop(&mut self) {
        if running(self.pid) {
            let _ = std::process::Command::new("kill")
                .args(["-KILL", &self.pid.to_string()])
                .status();
        }
    }
}
