//! Bind mounts of identity files over the read-only placeholders in `/etc`, and the
//! mount table checks that make stage 2 a few-millisecond verification.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nixseed_core::qga::sysparse::unescape_octal;
use rustix::mount::{MountFlags, UnmountFlags, mount_bind, mount_remount, unmount};

/// Mount points listed in `/proc/self/mountinfo` (octal escapes decoded).
pub fn mount_points() -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_octal(p)))
        .collect())
}

/// A placeholder nixseed can bind over: a file there, itself, not a symlink. mount(2)
/// follows a link, so a bind over `/etc/resolv.conf -> /run/…/stub-resolv.conf` would
/// land on the link's target, where the next bind never finds it to replace (binds
/// stacking up), or fail while the target does not exist yet.
pub fn check_placeholder(dst: &Path) -> Result<()> {
    match std::fs::symlink_metadata(dst) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => anyhow::bail!(
            "{}: placeholder missing in the image (the read-only root needs an empty file there)",
            dst.display()
        ),
        Err(e) => Err(e).with_context(|| format!("cannot look at {}", dst.display())),
        Ok(m) if m.file_type().is_symlink() => anyhow::bail!(
            "{}: the placeholder is a symlink (to {}); nixseed binds over a plain file, so the image needs an empty file there",
            dst.display(),
            std::fs::read_link(dst)
                .map(|t| t.display().to_string())
                .unwrap_or_else(|_| "?".into())
        ),
        Ok(m) if !m.is_file() => anyhow::bail!(
            "{}: the placeholder is not a file; the image needs an empty file there",
            dst.display()
        ),
        Ok(_) => Ok(()),
    }
}

/// Bind-mounts `src` read-only over `dst`, replacing an earlier nixseed bind there.
/// Straight mount(2) calls: a bind names no filesystem type, so nothing is looked up.
pub fn bind_readonly(src: &Path, dst: &Path, mounted: &[PathBuf]) -> Result<()> {
    check_placeholder(dst)?;
    if mounted.iter().any(|m| m == dst) {
        unmount(dst, UnmountFlags::DETACH)
            .with_context(|| format!("cannot unmount the old bind at {}", dst.display()))?;
    }
    mount_bind(src, dst)
        .with_context(|| format!("cannot bind {} over {}", src.display(), dst.display()))?;
    mount_remount(
        dst,
        MountFlags::BIND | MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV,
        "",
    )
    .with_context(|| format!("cannot make the bind at {} read-only", dst.display()))?;
    Ok(())
}
