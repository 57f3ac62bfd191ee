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

/// Bind-mounts `src` read-only over `dst`, replacing an earlier nixseed bind there.
/// Straight mount(2) calls: a bind names no filesystem type, so nothing is looked up.
pub fn bind_readonly(src: &Path, dst: &Path, mounted: &[PathBuf]) -> Result<()> {
    if mounted.iter().any(|m| m == dst) {
        unmount(dst, UnmountFlags::DETACH)
            .with_context(|| format!("cannot unmount the old bind at {}", dst.display()))?;
    }
    if !dst.exists() {
        anyhow::bail!(
            "{}: placeholder missing in the image (the read-only root needs an empty file there)",
            dst.display()
        );
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
