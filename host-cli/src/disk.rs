//! Disk images with qemu-img: inspecting a base image, creating the boot overlay on it,
//! and making the ext4 `/var` disk.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;

use crate::tools;

#[derive(Debug, Deserialize)]
pub struct ImageInfo {
    pub format: String,
    #[serde(rename = "virtual-size", default)]
    pub virtual_size: u64,
    #[serde(rename = "backing-filename", default)]
    pub backing_filename: Option<String>,
}

pub fn info(image: &Path) -> Result<ImageInfo> {
    let out = tools::run(
        tools::cmd("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(image),
    )?;
    serde_json::from_str(&out)
        .with_context(|| format!("reading `qemu-img info` for {}", image.display()))
}

/// Check that `base` can back an overlay: it exists and is not itself an overlay.
/// Returns its absolute path and format.
pub fn check_base(base: &Path) -> Result<(PathBuf, String)> {
    let abs = std::fs::canonicalize(base).with_context(|| {
        format!(
            "base image {} does not exist; build one with `seedctl build` or pass --base IMAGE",
            base.display()
        )
    })?;
    let info = info(&abs)?;
    if let Some(backing) = info.backing_filename {
        bail!(
            "base image {} is itself an overlay on {backing}; pass a standalone image, e.g. flatten it with `qemu-img convert -O qcow2 {} flat.qcow2`",
            abs.display(),
            abs.display()
        );
    }
    Ok((abs, info.format))
}

/// A copy-on-write overlay `overlay` on `base`.
pub fn create_overlay(base: &Path, format: &str, overlay: &Path) -> Result<()> {
    tools::run(
        tools::cmd("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(base)
            .args(["-F", format])
            .arg(overlay),
    )?;
    Ok(())
}

/// `2G`, `512M`, `1024K` or plain bytes.
pub fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (num, mult) = match s.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M') => (&s[..s.len() - 1], 1 << 20),
        Some('G') => (&s[..s.len() - 1], 1 << 30),
        Some('T') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .with_context(|| format!("size `{s}` is not a number with an optional K/M/G/T suffix"))?;
    let bytes = n
        .checked_mul(mult)
        .with_context(|| format!("size `{s}` is too large"))?;
    if bytes < 16 << 20 {
        bail!("size `{s}` is below the 16M an ext4 /var needs");
    }
    Ok(bytes)
}

/// A qcow2 disk holding an empty ext4 filesystem labelled `nixseed-var`.
pub fn create_var_disk(out: &Path, size: u64, scratch: &Path) -> Result<()> {
    let raw = scratch.join("var.raw");
    let f = std::fs::File::create(&raw).with_context(|| format!("creating {}", raw.display()))?;
    f.set_len(size)
        .with_context(|| format!("sizing {}", raw.display()))?;
    drop(f);
    tools::run(
        tools::cmd("mkfs.ext4")
            .args(["-q", "-F", "-L", "nixseed-var"])
            .arg(&raw),
    )?;
    tools::run(
        tools::cmd("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(out),
    )?;
    std::fs::remove_file(&raw).with_context(|| format!("removing {}", raw.display()))?;
    Ok(())
}

/// Copy an existing `/var` disk (raw or qcow2) into a standalone qcow2.
pub fn copy_var_disk(from: &Path, out: &Path) -> Result<()> {
    if !from.exists() {
        bail!("/var disk {} does not exist", from.display());
    }
    tools::run(
        tools::cmd("qemu-img")
            .args(["convert", "-q", "-O", "qcow2"])
            .arg(from)
            .arg(out),
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert!(parse_size("1M").is_err());
        assert!(parse_size("lots").is_err());
    }
}
