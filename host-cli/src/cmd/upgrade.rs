//! `seedctl upgrade`: move a machine to a new base image. The boot overlay is recreated
//! on the new base; the `/var` disk, and with it the identity the guest keeps, is kept.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use crate::cmd::power::{PowerArgs, stop};
use crate::cmd::seed::{self, SeedFormat};
use crate::disk;
use crate::machine::{Identity, Paths};
use crate::output::Report;
use crate::state::{BOOT_DISK, SEED_ISO, StateDir, VAR_DISK};

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl upgrade web1 --base /srv/images/nixseed-base-2.qcow2
  seedctl upgrade web1 --base new.qcow2 --restart   # shuts a running `seedctl run` VM down first")]
pub struct UpgradeArgs {
    /// Machine name
    pub name: String,
    /// The new base image
    #[arg(long, value_name = "IMAGE")]
    pub base: PathBuf,
    /// Shut a running machine down first, as `seedctl stop` (it is not started again)
    #[arg(long)]
    pub restart: bool,
    /// libvirt URI to check for a running domain of this name [checked without it only
    /// when `seedctl define` wrote its domain.xml; default the URI `define` used, else
    /// LIBVIRT_DEFAULT_URI or qemu:///system]
    #[arg(long, short = 'c', value_name = "URI")]
    pub connect: Option<String>,
}

/// Refuses when libvirt runs the machine: its QEMU keeps the old boot overlay open, and the
/// new one would only take effect, unannounced, at its next start. A domain libvirt does
/// not know, or no libvirt installed, does not stop the upgrade; a libvirt that cannot be
/// reached does, since it may be running the machine.
fn refuse_running_domain(sd: &StateDir, a: &UpgradeArgs) -> Result<()> {
    if a.connect.is_none()
        && (!sd.file(crate::state::DOMAIN_XML).exists() || !crate::tools::on_path("virsh"))
    {
        return Ok(());
    }
    // The URI `define` used, when it was not the default one (a recorded one that
    // cannot be read falls back to the default, which is asked as before).
    let recorded = std::fs::read_to_string(sd.file(crate::state::DOMAIN_URI))
        .ok()
        .map(|u| u.trim().to_owned())
        .filter(|u| !u.is_empty());
    let uri = crate::libvirt::uri(a.connect.as_deref().or(recorded.as_deref()));
    let state = crate::libvirt::domstate(&uri, &a.name).with_context(|| {
        format!(
            "cannot tell whether libvirt runs machine `{}`; pass --connect with the URI it was defined under",
            a.name
        )
    })?;
    let Some(state) = state else {
        return Ok(());
    };
    if !matches!(state.as_str(), "shut off" | "crashed") {
        bail!(
            "machine `{}` is {state} under libvirt ({uri}); shut it down first (`seedctl stop {} --connect {uri}`), then upgrade",
            a.name,
            a.name
        );
    }
    // A domain shut off with its memory saved resumes that memory on the next start,
    // with the old root's blocks cached, over whatever disk is there then; a snapshot
    // names the old overlay (an external one keeps it as its backing file).
    let info = crate::libvirt::virsh(&uri, &a.name, &["dominfo", &a.name])?;
    if managed_save(&info) {
        bail!(
            "machine `{}` has a managed save under libvirt ({uri}): its next start would resume memory that belongs to the old boot disk; start it and shut it down (or `virsh managedsave-remove {}`), then upgrade",
            a.name,
            a.name
        );
    }
    let snapshots = crate::libvirt::virsh(&uri, &a.name, &["snapshot-list", &a.name, "--name"])?;
    let snapshots: Vec<&str> = snapshots.split_whitespace().collect();
    if !snapshots.is_empty() {
        bail!(
            "machine `{}` has libvirt snapshots ({}) of its current boot disk; an upgrade would leave them naming a disk that is gone: delete them (`virsh snapshot-delete {} NAME`), then upgrade",
            a.name,
            snapshots.join(", "),
            a.name
        );
    }
    Ok(())
}

/// What `--restart` leaves: the machine stopped, and how to start it.
fn not_restarted(name: &str) -> String {
    format!(
        "the machine was stopped for the upgrade and not started again; `seedctl run {name} --detach` starts it"
    )
}

/// Whether `virsh dominfo` says the domain has a managed save image.
fn managed_save(dominfo: &str) -> bool {
    dominfo.lines().any(|l| {
        l.split_once(':')
            .is_some_and(|(k, v)| k.trim() == "Managed save" && v.trim() == "yes")
    })
}

pub fn run(paths: &Paths, a: &UpgradeArgs) -> Result<Report> {
    let id = Identity::load(paths, &a.name)?;
    let sd = StateDir::new(paths, &a.name);
    sd.no_dangling_disk_link()?;
    if !sd.file(VAR_DISK).exists() {
        bail!(
            "machine `{}` has no {} in {}; use `seedctl create` for a new machine",
            a.name,
            VAR_DISK,
            sd.dir.display()
        );
    }
    let _lock = sd.lock("upgrade")?;
    let (base, format) =
        disk::check_base(&a.base, &paths.state).with_context(|| format!("machine `{}`", a.name))?;
    if let Some(w) = disk::unrooted_store_base(&base, &paths.state) {
        eprintln!("seedctl: warning: machine `{}`: {w}", a.name);
    }
    refuse_running_domain(&sd, a)?;
    // Read before the machine is stopped: a state file that cannot be read stops the
    // upgrade with the machine as it was.
    let mut st = sd.load()?;
    let stopped = sd.running_pid().is_some();
    if stopped && !a.restart {
        bail!(
            "machine `{}` is running; pass --restart to stop it for the upgrade, or `seedctl stop {}` first",
            a.name,
            a.name
        );
    }
    let staging = crate::fsutil::staging_dir(&sd.dir, &a.name, "upgrade")?;
    // Everything that can fail is done before the machine is stopped and the old overlay
    // replaced: a failed upgrade leaves the machine on its old base, running if it ran,
    // and its state saying so.
    let overlay = staging.path().join(BOOT_DISK);
    disk::create_overlay(&base, &format, &overlay)
        .with_context(|| format!("machine `{}`", a.name))?;
    let seed_iso = staging.path().join(SEED_ISO);
    let instance_id = seed::write(&id, SeedFormat::Iso, &seed_iso)?;
    st.base = Some(base.clone());
    st.instance_id = Some(instance_id);
    // The overlay holds the guest's root and, in its first boot's writes, its identity:
    // the owner's only, as `create` makes it.
    std::fs::set_permissions(&overlay, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("machine `{}`: making the new overlay private", a.name))?;
    if stopped {
        // An orderly shutdown (ACPI), as `seedctl stop`: the guest flushes /var first.
        stop(
            paths,
            &PowerArgs {
                name: a.name.clone(),
                connect: None,
                timeout: 60,
            },
        )?;
    }
    let replace = || -> Result<()> {
        // Whatever runs it (a domain under another libvirt URI, a QEMU started by hand):
        // the old overlay must not be replaced under a running VM.
        if disk::in_use(&sd.file(BOOT_DISK)).with_context(|| format!("machine `{}`", a.name))? {
            bail!(
                "machine `{}`: {} is open in a running QEMU (a libvirt domain under another URI, such as qemu:///session, or one started by hand); shut that VM down first",
                a.name,
                sd.file(BOOT_DISK).display()
            );
        }
        // The seed first: until the overlay moves, the machine boots its old base with a
        // seed for the same identity.
        std::fs::rename(&seed_iso, sd.file(SEED_ISO)).with_context(|| {
            format!(
                "machine `{}`: replacing {} (it still boots its old base)",
                a.name,
                sd.file(SEED_ISO).display()
            )
        })?;
        std::fs::rename(&overlay, sd.file(BOOT_DISK)).with_context(|| {
            format!(
                "machine `{}`: replacing {} (it still boots its old base)",
                a.name,
                sd.file(BOOT_DISK).display()
            )
        })?;
        sd.save(&st).with_context(|| {
            format!(
                "machine `{}` boots {} now, but its state file still names the old base",
                a.name,
                base.display()
            )
        })
    };
    replace().map_err(|e| match stopped {
        true => anyhow::anyhow!("{e:#}; {}", not_restarted(&a.name)),
        false => e,
    })?;
    Ok(Report::new(
        format!(
            "machine `{}` now boots {} ({} kept){}",
            a.name,
            base.display(),
            VAR_DISK,
            match stopped {
                true => format!("; {}", not_restarted(&a.name)),
                false => String::new(),
            }
        ),
        json!({ "machine": a.name, "base": base, "stopped": stopped }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_managed_save_is_read_from_dominfo() {
        let info = |saved: &str| {
            format!(
                "Id:             -\nName:           web1\nState:          shut off\nPersistent:     yes\nManaged save:   {saved}\nSecurity model: none\n"
            )
        };
        assert!(managed_save(&info("yes")));
        assert!(!managed_save(&info("no")));
        assert!(!managed_save("Name: web1\n"));
    }
}
