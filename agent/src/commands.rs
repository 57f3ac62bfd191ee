//! cloud-init's `bootcmd` (every boot) and `runcmd` (once per instance), opt-in with
//! `apply --run-commands`. Each runs in a transient systemd unit, so its output and exit
//! status land in the journal under its own name: `nixseed-bootcmd` runs early and stage 2
//! waits for it; `nixseed-runcmd` is queued with default dependencies, so it runs once the
//! system is up, as cloud-init's runcmd does.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};
use nixseed_core::identity::{BOOTCMD, RUNCMD};

/// Where the once-per-instance marker for runcmd lives (on `/var`, so it survives reboots).
const RUNCMD_MARKER: &str = "var/lib/nixseed/runcmd-instance";

pub fn run(sysroot: &Path, identity: &Path, instance_id: &str) -> Result<()> {
    let bootcmd = identity.join(BOOTCMD);
    if bootcmd.exists() {
        let status = Command::new("systemd-run")
            .args([
                "--quiet",
                "--wait",
                "--collect",
                "--unit",
                "nixseed-bootcmd",
            ])
            .args(["-p", "DefaultDependencies=no", "/bin/sh"])
            .arg(&bootcmd)
            .status()
            .context("cannot run systemd-run for bootcmd")?;
        if !status.success() {
            bail!(
                "bootcmd from {} failed ({status}); see journalctl -u nixseed-bootcmd",
                bootcmd.display()
            );
        }
        tracing::info!("bootcmd: ran {}", bootcmd.display());
    }
    let runcmd = identity.join(RUNCMD);
    let marker = sysroot.join(RUNCMD_MARKER);
    let done = std::fs::read_to_string(&marker).unwrap_or_default();
    if runcmd.exists() && done.trim() != instance_id {
        let status = Command::new("systemd-run")
            .args([
                "--quiet",
                "--no-block",
                "--collect",
                "--unit",
                "nixseed-runcmd",
            ])
            .args(["-p", "After=multi-user.target", "/bin/sh"])
            .arg(&runcmd)
            .status()
            .context("cannot run systemd-run for runcmd")?;
        if !status.success() {
            bail!("cannot queue runcmd from {} ({status})", runcmd.display());
        }
        if let Some(dir) = marker.parent() {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
        }
        crate::stage::write_atomic(&marker, format!("{instance_id}\n").as_bytes())?;
        tracing::info!(
            "runcmd: queued {} for instance {instance_id}",
            runcmd.display()
        );
    }
    Ok(())
}
