//! After a live change (a push or a rollback): tell the running services. hostname via
//! sethostname(2), sshd and networkd through systemd's D-Bus API, the firewall through
//! `nft -f`. machine-id cannot change under a running systemd: the bind keeps it until
//! the reboot (`stage::BindTime`).

use std::path::Path;

use anyhow::{Context, Result};
use nixseed_core::identity;

/// Applies the effects of the changed files (names relative to a generation); returns
/// what was told.
/// `first_identity`: there was no generation before this one (a boot that found no seed),
/// so sshd, which has no host key without one (the NixOS module skips it by condition),
/// is started rather than only restarted when running.
pub async fn after_change(
    changed: &[String],
    identity_dir: &Path,
    firewall: bool,
    first_identity: bool,
) -> Vec<String> {
    let mut out = Vec::new();
    let has = |p: &str| {
        changed
            .iter()
            .any(|c| c == p || c.starts_with(&format!("{p}/")))
    };
    if has(identity::HOSTNAME) {
        match set_hostname(&identity_dir.join(identity::HOSTNAME)) {
            Ok(()) => out.push("hostname".into()),
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
    if has(identity::SSH_HOST_KEY) || has(identity::SSH_HOST_KEY_PUB) {
        let how = if first_identity {
            "RestartUnit"
        } else {
            "TryRestartUnit"
        };
        match restart_units(&["ssh.service", "sshd.service"], how).await {
            Ok(()) => out.push("sshd".into()),
            Err(e) => tracing::warn!("cannot restart sshd for its new host key: {e:#}"),
        }
    }
    if has(identity::NETWORK_DIR) {
        match networkd_reload().await {
            Ok(()) => out.push("systemd-networkd".into()),
            Err(e) => tracing::warn!("cannot reload systemd-networkd: {e:#}"),
        }
    }
    if firewall && (has(identity::TCP_PORTS) || has(identity::UDP_PORTS)) {
        match load_firewall(identity_dir) {
            Ok(()) => out.push("nftables".into()),
            Err(e) => tracing::warn!("{e:#}"),
        }
    }
    out
}

fn set_hostname(file: &Path) -> Result<()> {
    let name =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let name = name.trim();
    if !name.is_empty() {
        nix::unistd::sethostname(name)
            .with_context(|| format!("cannot set the hostname to {name}"))?;
    }
    Ok(())
}

/// `method`: `TryRestartUnit` (leaves a unit that is not running alone) or `RestartUnit`
/// (starts it), on the first of `units` the image has (ssh.service on Debian, where
/// sshd.service is its alias; sshd.service on NixOS). Before `RestartUnit` the unit's
/// failed state is reset: an sshd that kept failing without a host key until systemd's
/// start limit would refuse the start. Any refusal but "no such unit" is an error, so
/// sshd is never reported restarted when systemd did not restart it.
async fn restart_units(units: &[&str], method: &str) -> Result<()> {
    use crate::dbus::{Arg, DbusError, call};
    let no_such_unit = |e: &DbusError| matches!(e, DbusError::Remote { name, .. } if name == "org.freedesktop.systemd1.NoSuchUnit");
    for unit in units {
        if method == "RestartUnit" {
            match call(
                "org.freedesktop.systemd1",
                "/org/freedesktop/systemd1",
                "org.freedesktop.systemd1.Manager",
                "ResetFailedUnit",
                &[Arg::Str(unit)],
            )
            .await
            {
                Ok(()) => {}
                Err(e) if no_such_unit(&e) => {}
                Err(e) => return Err(e).context(format!("resetting {unit}'s failed state")),
            }
        }
        match call(
            "org.freedesktop.systemd1",
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            method,
            &[Arg::Str(unit), Arg::Str("replace")],
        )
        .await
        {
            Ok(()) => return Ok(()),
            Err(e) if no_such_unit(&e) => {}
            Err(e) => return Err(e).context(format!("{method} {unit}")),
        }
    }
    anyhow::bail!("none of {} is a unit here", units.join(", "))
}

async fn networkd_reload() -> Result<()> {
    crate::dbus::call(
        "org.freedesktop.network1",
        "/org/freedesktop/network1",
        "org.freedesktop.network1.Manager",
        "Reload",
        &[],
    )
    .await
    .context("org.freedesktop.network1.Manager.Reload")
}

/// Loads the `inet nixseed` table from the identity's port files with `nft -f -`.
pub fn load_firewall(identity_dir: &Path) -> Result<()> {
    use std::io::Write;
    let read = |name: &str| -> Result<Vec<String>> {
        let path = identity_dir.join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        nixseed_core::firewall::parse_ports(&text, &path.display().to_string())
            .map_err(anyhow::Error::msg)
    };
    let rules =
        nixseed_core::firewall::render(&read(identity::TCP_PORTS)?, &read(identity::UDP_PORTS)?);
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run nft (is nftables installed?)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .context("cannot send the ruleset to nft")?;
    }
    let out = child.wait_with_output().context("nft did not finish")?;
    if !out.status.success() {
        anyhow::bail!(
            "nft refused the nixseed ruleset from {}: {}",
            identity_dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}
