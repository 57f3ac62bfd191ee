//! `seedctl create`: the boot overlay on a base image, the `/var` disk and the seed ISO,
//! under `.seedctl/<name>/`.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use crate::cmd::seed::{self, SeedFormat};
use crate::disk;
use crate::fsutil::sync_dir;
use crate::machine::{Identity, Paths};
use crate::output::Report;
use crate::state::{BOOT_DISK, DEFAULT_BASE, SEED_ISO, StateDir, VAR_DISK};

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl create web1                            # the image `seedctl build` recorded
  seedctl create web1 --base base.qcow2 --var-size 10G
  seedctl create web2 --base base.qcow2 --var-from old-var.qcow2
Without --base, the image recorded by `seedctl build` is used.")]
pub struct CreateArgs {
    /// Machine name
    pub name: String,
    /// Base image the boot overlay is backed by (read-only, shared by many machines)
    #[arg(long, value_name = "IMAGE")]
    pub base: Option<PathBuf>,
    /// Size of a new /var disk
    #[arg(long, default_value = "2G", value_name = "SIZE", value_parser = var_size)]
    pub var_size: String,
    /// Copy this existing /var disk (raw or qcow2) instead of making an empty one
    #[arg(long, value_name = "DISK", conflicts_with = "var_size")]
    pub var_from: Option<PathBuf>,
}

/// The base image: `--base`, else the one `seedctl build` recorded.
pub fn resolve_base(paths: &Paths, base: Option<&Path>, name: &str) -> Result<PathBuf> {
    if let Some(b) = base {
        return Ok(b.to_owned());
    }
    let rec = paths.state.join(DEFAULT_BASE);
    match std::fs::read_to_string(&rec) {
        Ok(s) if !s.trim().is_empty() => Ok(PathBuf::from(s.trim())),
        _ => bail!(
            "machine `{name}`: no base image given and none recorded in {}; pass --base IMAGE or run `seedctl build`",
            rec.display()
        ),
    }
}

/// Move every file of `staging` into `target` (same filesystem), creating `target`. The
/// disks and the seed hold the machine's private host key: they become the owner's only
/// (0600; libvirt hands them to its QEMU user when the domain starts) while still in
/// `staging`, so a move that fails part-way leaves none that others can read, and
/// `target` is not listable by others (0711).
pub fn move_into(staging: &Path, target: &Path) -> Result<()> {
    for entry in
        std::fs::read_dir(staging).with_context(|| format!("listing {}", staging.display()))?
    {
        let entry = entry.with_context(|| format!("listing {}", staging.display()))?;
        if entry.file_type().is_ok_and(|t| t.is_file()) {
            std::fs::set_permissions(entry.path(), std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} the owner's only", entry.path().display()))?;
        }
    }
    crate::state::create_private_dir(target)?;
    // The disks first, both or neither: each is linked in, which fails on an existing name
    // (a `create` run at the same time made one since the check), so nothing there is
    // replaced and the machine never has a boot disk of one run and a /var of another.
    let mut linked: Vec<std::path::PathBuf> = Vec::new();
    for disk in [BOOT_DISK, VAR_DISK] {
        let (from, to) = (staging.join(disk), target.join(disk));
        if !from.exists() {
            continue;
        }
        if let Err(e) = std::fs::hard_link(&from, &to) {
            for l in &linked {
                let _ = std::fs::remove_file(l);
            }
            return Err(e).with_context(|| {
                format!("moving into {} (nothing there is replaced)", to.display())
            });
        }
        linked.push(to);
    }
    for entry in
        std::fs::read_dir(staging).with_context(|| format!("listing {}", staging.display()))?
    {
        let entry = entry.with_context(|| format!("listing {}", staging.display()))?;
        if entry.file_name() == BOOT_DISK || entry.file_name() == VAR_DISK {
            // Linked above: the staging name goes.
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
        } else {
            let to = target.join(entry.file_name());
            std::fs::rename(entry.path(), &to)
                .with_context(|| format!("moving into {}", to.display()))?;
        }
    }
    sync_dir(target)
}

pub fn run(paths: &Paths, a: &CreateArgs) -> Result<Report> {
    let id = Identity::load(paths, &a.name)?;
    let sd = StateDir::new(paths, &a.name);
    sd.no_dangling_disk_link()?;
    if sd.file(BOOT_DISK).exists() {
        bail!(
            "machine `{}` already has a boot disk at {}; use `seedctl upgrade {} --base IMAGE` to change its base, or remove {} to start over",
            a.name,
            sd.file(BOOT_DISK).display(),
            a.name,
            sd.dir.display()
        );
    }
    // The /var disk is the one disk a machine keeps: never made over an existing one.
    if sd.file(VAR_DISK).exists() {
        bail!(
            "machine `{}` already has a /var disk at {} (its data and identity); `seedctl upgrade {} --base IMAGE` gives it a new boot disk and keeps it, or remove {} to start over",
            a.name,
            sd.file(VAR_DISK).display(),
            a.name,
            sd.dir.display()
        );
    }
    // A machine whose sockets cannot be bound would never run or be defined: said before
    // any disk is made.
    sd.check_all_socket_paths()?;
    let base = resolve_base(paths, a.base.as_deref(), &a.name)?;
    let (base, format) =
        disk::check_base(&base, &paths.state).with_context(|| format!("machine `{}`", a.name))?;
    if let Some(w) = disk::unrooted_store_base(&base, &paths.state) {
        eprintln!("seedctl: warning: machine `{}`: {w}", a.name);
    }
    // Read before anything is made: a state file that cannot be read stops the command
    // with no disk in place.
    let mut st = sd.load()?;

    std::fs::create_dir_all(&paths.state)
        .with_context(|| format!("creating {}", paths.state.display()))?;
    // On the filesystem the disks end up on, so that they are linked in, not copied: in
    // the machine's directory when it is there already (it may be a link to another
    // volume), else beside it.
    let stage_in = if sd.dir.is_dir() {
        &sd.dir
    } else {
        &paths.state
    };
    let staging = crate::fsutil::staging_dir(stage_in, &a.name, "create")?;
    let ctx = || format!("machine `{}`", a.name);
    disk::create_overlay(&base, &format, &staging.path().join(BOOT_DISK)).with_context(ctx)?;
    match &a.var_from {
        Some(from) => {
            disk::copy_var_disk(from, &staging.path().join(VAR_DISK)).with_context(ctx)?
        }
        None => {
            let size = disk::parse_size(&a.var_size).context("--var-size")?;
            disk::create_var_disk(&staging.path().join(VAR_DISK), size, staging.path())
                .with_context(ctx)?;
        }
    }
    let instance_id = seed::write(&id, SeedFormat::Iso, &staging.path().join(SEED_ISO))?;
    move_into(staging.path(), &sd.dir)?;

    st.base = Some(base.clone());
    st.instance_id = Some(instance_id.clone());
    sd.save(&st).with_context(|| {
        format!(
            "machine `{}`: its disks are in {}",
            a.name,
            sd.dir.display()
        )
    })?;
    Ok(Report::new(
        format!(
            "created machine `{}` in {}\n  boot  {} (overlay on {})\n  var   {}\n  seed  {} (instance-id {instance_id})",
            a.name,
            sd.dir.display(),
            BOOT_DISK,
            base.display(),
            VAR_DISK,
            SEED_ISO
        ),
        json!({
            "machine": a.name,
            "dir": sd.dir,
            "base": base,
            "boot": sd.file(BOOT_DISK),
            "var": sd.file(VAR_DISK),
            "seed": sd.file(SEED_ISO),
            "instance_id": instance_id,
        }),
    ))
}

/// `--var-size` checked as the command line is read, so a size out of range is a usage
/// error (exit status 2) like any other value.
fn var_size(s: &str) -> Result<String, String> {
    disk::parse_size(s)
        .map(|_| s.to_string())
        .map_err(|e| format!("{e:#}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `create` that finds one of the disks already made (by a run at the same time)
    /// moves neither: the machine never holds a boot disk of one run and a /var of
    /// another, and the disk that was there is not replaced.
    #[test]
    fn disks_move_in_both_or_neither() {
        let staging = tempfile::tempdir().unwrap();
        let target = tempfile::tempdir().unwrap();
        for f in [BOOT_DISK, VAR_DISK, SEED_ISO] {
            std::fs::write(staging.path().join(f), "new").unwrap();
        }
        std::fs::write(target.path().join(VAR_DISK), "theirs").unwrap();
        let err = move_into(staging.path(), target.path()).unwrap_err();
        assert!(format!("{err:#}").contains(VAR_DISK), "{err:#}");
        assert!(!target.path().join(BOOT_DISK).exists());
        assert_eq!(
            std::fs::read_to_string(target.path().join(VAR_DISK)).unwrap(),
            "theirs"
        );
        std::fs::remove_file(target.path().join(VAR_DISK)).unwrap();
        move_into(staging.path(), target.path()).unwrap();
        for f in [BOOT_DISK, VAR_DISK, SEED_ISO] {
            assert_eq!(
                std::fs::read_to_string(target.path().join(f)).unwrap(),
                "new"
            );
            assert!(!staging.path().join(f).exists());
        }
    }
}
