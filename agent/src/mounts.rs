//! Bind mounts of identity files over the read-only placeholders in `/etc`, and the
//! mount table checks that make stage 2 a few-millisecond verification.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::mount::{MountFlags, UnmountFlags, mount_bind, mount_remount, unmount};

/// Mount points listed in `/proc/self/mountinfo` (octal escapes decoded).
pub fn mount_points() -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string("/proc/self/mountinfo")
        .context("cannot read /proc/self/mountinfo")?;
    Ok(text
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape(p)))
        .collect())
}

fn unescape(s: &str) -> String {
    let mut out = Vec::new();
    let b = s.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = (b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0');
            out.push(v);
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
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

#[cfg(test)]
mod tests {
    #[test]
    fn mountinfo_escapes() {
        assert_eq!(super::unescape("/a\\040b"), "/a b");
        assert_eq!(super::unescape("/plain"), "/plain");
    }
}
