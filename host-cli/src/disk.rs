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
    /// qcow2's own details; an external data file (`data-file`) shows here.
    #[serde(rename = "format-specific", default)]
    pub format_specific: Option<serde_json::Value>,
}

impl ImageInfo {
    /// A file the image reads besides itself: its backing file or a qcow2 external data
    /// file.
    fn other_file(&self) -> Option<String> {
        self.backing_filename.clone().or_else(|| {
            self.format_specific
                .as_ref()?
                .pointer("/data/data-file")?
                .as_str()
                .map(str::to_owned)
        })
    }
}

/// `path` as qemu-img is given it: absolute. qemu-img reads a name with a colon before
/// its first slash (`var-2024-05-01T12:00.qcow2`) as `PROTOCOL:…`, and an absolute path
/// never has one there.
fn for_qemu_img(path: &Path) -> Result<PathBuf> {
    std::path::absolute(path)
        .with_context(|| format!("making {} an absolute path for qemu-img", path.display()))
}

pub fn info(image: &Path) -> Result<ImageInfo> {
    let out = tools::run(
        tools::cmd("qemu-img")
            .args(["info", "--output=json", "-U"])
            .arg(for_qemu_img(image)?),
    )?;
    serde_json::from_str(&out)
        .with_context(|| format!("reading `qemu-img info` for {}", image.display()))
}

/// Whether a running QEMU holds `image` open for writing, by any route (`seedctl run`,
/// libvirt under whatever URI, `qemu-nbd`, by hand): every QEMU block user that may write
/// an image holds its write-permission lock byte, whatever the format. The byte is only
/// looked at (`F_OFD_GETLK`), never locked: `qemu-img info` without `-U` would take a
/// lock of its own for a moment, and a QEMU starting on the image in that moment fails
/// with "Failed to get "write" lock". An image that cannot be opened for reading (no
/// permission, say, once libvirt has handed it to its QEMU user) or is not a file or a
/// block device is an error: it may well be in use, and the caller must not take it as
/// free.
pub fn in_use(image: &Path) -> Result<bool> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match std::fs::metadata(image) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // A dangling link is a disk not there yet, not a free one to write.
            if std::fs::symlink_metadata(image).is_ok() {
                bail!(
                    "cannot tell whether a QEMU holds {} open: it is a link to nothing",
                    image.display()
                );
            }
            return Ok(false);
        }
        Err(e) => {
            return Err(anyhow::Error::new(e).context(format!(
                "cannot tell whether a QEMU holds {} open",
                image.display()
            )));
        }
    };
    if !meta.is_file() && !meta.file_type().is_block_device() {
        bail!(
            "cannot tell whether a QEMU holds {} open: it is not a disk image or a block device",
            image.display()
        );
    }
    write_permission_held(image)
        .with_context(|| format!("cannot tell whether a QEMU holds {} open", image.display()))
}

/// QEMU's lock byte for the write permission: every QEMU block user that may write an
/// image (QEMU, `qemu-nbd`, `qemu-img`, `qemu-storage-daemon`) holds a shared OFD lock on
/// byte 100 + the permission's bit (write: bit 1) for as long as it may write.
const QEMU_WRITE_LOCK_BYTE: i64 = 101;

/// Whether another process holds `image`'s write-permission lock byte.
fn write_permission_held(image: &Path) -> Result<bool> {
    use nix::fcntl::{FcntlArg, fcntl};
    use nix::libc;
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(image)
        .with_context(|| format!("cannot open {} to look at its locks", image.display()))?;
    let mut probe = libc::flock {
        l_type: libc::F_WRLCK as libc::c_short,
        l_whence: libc::SEEK_SET as libc::c_short,
        l_start: QEMU_WRITE_LOCK_BYTE,
        l_len: 1,
        l_pid: 0,
    };
    match fcntl(f.as_raw_fd(), FcntlArg::F_OFD_GETLK(&mut probe)) {
        Ok(_) => Ok(probe.l_type != libc::F_UNLCK as libc::c_short),
        // A filesystem without OFD locks (some network ones): QEMU cannot lock there
        // either, and runs without locks.
        Err(
            nix::errno::Errno::EINVAL | nix::errno::Errno::ENOLCK | nix::errno::Errno::EOPNOTSUPP,
        ) => Ok(false),
        Err(e) => Err(anyhow::Error::new(e)
            .context(format!("cannot look at the locks on {}", image.display()))),
    }
}

/// The machine in `state` whose disk (boot overlay, `/var`, seed or firmware variables)
/// `file` is, by device and inode: a disk kept on another volume through a link, or a
/// machine directory that is one, is found too.
fn machine_disk_owner(file: &std::fs::Metadata, state: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let same = |m: &std::fs::Metadata| m.dev() == file.dev() && m.ino() == file.ino();
    std::fs::read_dir(state).ok()?.flatten().find_map(|entry| {
        let dir = entry.path();
        [
            crate::state::BOOT_DISK,
            crate::state::VAR_DISK,
            crate::state::SEED_ISO,
            crate::state::OVMF_VARS,
        ]
        .iter()
        .any(|f| std::fs::metadata(dir.join(f)).is_ok_and(|m| same(&m)))
        .then(|| entry.file_name().to_string_lossy().into_owned())
    })
}

/// What a file that reads as raw but is no disk starts with: a compressed download
/// (`.qcow2.gz`, `.img.xz`) is the usual slip.
fn compressed_as(head: &[u8]) -> Option<&'static str> {
    const MAGIC: [(&[u8], &str); 5] = [
        (b"\x1f\x8b", "gzip"),
        (b"\xfd7zXZ\x00", "xz"),
        (b"\x28\xb5\x2f\xfd", "zstd"),
        (b"BZh", "bzip2"),
        (b"PK\x03\x04", "zip"),
    ];
    MAGIC
        .iter()
        .find(|(m, _)| head.starts_with(m))
        .map(|(_, what)| *what)
}

/// The smallest `/var` disk: what an ext4 `/var` needs.
const MIN_VAR_SIZE: u64 = 16 << 20;

/// The smallest raw base taken: a bootable disk holds at least a partition table, a
/// boot loader and a filesystem.
const MIN_RAW_BASE: u64 = 1 << 20;

/// A raw disk (`what`: "base image", "/var disk") must look like a disk: not a
/// compressed file, not fewer than `min` bytes.
fn check_raw_disk(what: &str, abs: &Path, size: u64, min: u64) -> Result<()> {
    use std::io::Read;
    let mut head = [0u8; 8];
    let n = std::fs::File::open(abs)
        .and_then(|mut f| f.read(&mut head))
        .with_context(|| format!("cannot read {what} {}", abs.display()))?;
    if let Some(kind) = compressed_as(&head[..n]) {
        bail!(
            "{what} {} is {kind}-compressed, not a disk image; decompress it first",
            abs.display()
        );
    }
    if size < min {
        bail!(
            "{what} {} reads as a raw disk of {size} bytes, too small; pass a disk image (qcow2 or raw) of at least {} MiB",
            abs.display(),
            min >> 20
        );
    }
    Ok(())
}

/// Only the two formats a disk of a machine comes in: another (a VMDK descriptor, say)
/// can name any host file or device as its extents, which the guest would then read.
fn check_format(what: &str, abs: &Path, format: &str) -> Result<()> {
    if !matches!(format, "raw" | "qcow2") {
        bail!(
            "{what} {} reads as {format}, not raw or qcow2; convert it with `qemu-img convert -O qcow2`",
            abs.display()
        );
    }
    Ok(())
}

/// Check that `base` can back an overlay: a regular file with a UTF-8 path (it is
/// recorded in the machine's state), not empty, not itself an overlay, and not one of the
/// disks of a machine in `state` (those change under an overlay on them). Returns its
/// absolute path and format.
pub fn check_base(base: &Path, state: &Path) -> Result<(PathBuf, String)> {
    let abs = std::fs::canonicalize(base).with_context(|| {
        format!(
            "base image {} does not exist; build one with `seedctl build` or pass --base IMAGE",
            base.display()
        )
    })?;
    if abs.to_str().is_none() {
        bail!(
            "base image {}: the path is not UTF-8; rename it or link it from a UTF-8 path",
            abs.display()
        );
    }
    if !std::fs::metadata(&abs).is_ok_and(|m| m.is_file()) {
        bail!("base image {} is not a regular file", abs.display());
    }
    // A machine's own disk (`STATE/NAME/var.qcow2`, ...) changes under an overlay on it.
    if let Ok(meta) = std::fs::metadata(&abs)
        && let Some(machine) = machine_disk_owner(&meta, state)
    {
        bail!(
            "base image {} is a disk of machine `{machine}` in the state directory {}; pass a base image of its own",
            abs.display(),
            state.display()
        );
    }
    let info = info(&abs)?;
    check_format("base image", &abs, &info.format)?;
    // Every overlay reads the base as it is: one written meanwhile (open read-write in
    // a QEMU, `qemu-nbd` or `guestfish`) corrupts them all.
    if in_use(&abs)? {
        bail!(
            "base image {} is open for writing in another process (a VM, qemu-nbd, guestfish); an overlay needs a base nothing writes to: close it, or pass a copy",
            abs.display()
        );
    }
    if let Some(backing) = info.other_file() {
        bail!(
            "base image {} is itself an overlay on {backing}; pass a standalone image, e.g. flatten it with `qemu-img convert -O qcow2 {} flat.qcow2`",
            abs.display(),
            abs.display()
        );
    }
    if info.virtual_size == 0 {
        bail!("base image {} is empty (virtual size 0)", abs.display());
    }
    if info.format == "raw" {
        check_raw_disk("base image", &abs, info.virtual_size, MIN_RAW_BASE)?;
    }
    Ok((abs, info.format))
}

/// A warning when the checked base `abs` lies in the Nix store and no link of
/// `seedctl build`'s under `STATE/bases/` keeps it there: an overlay uses its base as the
/// backing file, and `nix-collect-garbage` removes a store path that nothing roots once
/// `./result` points elsewhere.
pub fn unrooted_store_base(abs: &Path, state: &Path) -> Option<String> {
    let mut parts = abs.strip_prefix("/nix/store").ok()?.components();
    let top = Path::new("/nix/store").join(parts.next()?.as_os_str());
    let rooted = std::fs::read_dir(state.join(crate::state::BASE_ROOTS))
        .into_iter()
        .flatten()
        .flatten()
        .any(|e| std::fs::read_link(e.path()).is_ok_and(|t| t == top));
    (!rooted).then(|| {
        format!(
            "base image {} is in the Nix store, and no garbage-collector root under {} keeps {}; `seedctl build` makes one, or run `nix-store --add-root {}/<name> --realise {}`",
            abs.display(),
            state.join(crate::state::BASE_ROOTS).display(),
            top.display(),
            state.join(crate::state::BASE_ROOTS).display(),
            top.display()
        )
    })
}

/// A copy-on-write overlay `overlay` on `base`.
pub fn create_overlay(base: &Path, format: &str, overlay: &Path) -> Result<()> {
    tools::run(
        tools::cmd("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-b"])
            .arg(for_qemu_img(base)?)
            .args(["-F", format])
            .arg(for_qemu_img(overlay)?),
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
    if bytes < MIN_VAR_SIZE {
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
            .arg(for_qemu_img(&raw)?)
            .arg(for_qemu_img(out)?),
    )?;
    std::fs::remove_file(&raw).with_context(|| format!("removing {}", raw.display()))?;
    Ok(())
}

/// Copy an existing `/var` disk (raw or qcow2) into a standalone qcow2. A guest wrote
/// every byte of that disk: one that reads another file (a qcow2 header naming a backing
/// file or an external data file, such as a host file or device) is refused, so nothing
/// of the host is copied into it, and the format found is the one read.
pub fn copy_var_disk(from: &Path, out: &Path) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    let meta = std::fs::metadata(from)
        .with_context(|| format!("/var disk {} cannot be read", from.display()))?;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        bail!(
            "/var disk {} is not a regular file or a block device",
            from.display()
        );
    }
    let info = info(from)?;
    check_format("/var disk", from, &info.format)?;
    if info.format == "raw" {
        check_raw_disk("/var disk", from, info.virtual_size, MIN_VAR_SIZE)?;
    }
    if let Some(other) = info.other_file() {
        bail!(
            "/var disk {} reads another file, {other} (a backing or data file in its qcow2 header); copy the data out with `qemu-img convert` yourself if it is yours",
            from.display()
        );
    }
    tools::run(
        tools::cmd("qemu-img")
            .args(["convert", "-q", "-f", &info.format, "-O", "qcow2"])
            .arg(for_qemu_img(from)?)
            .arg(for_qemu_img(out)?),
    )?;
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn an_image_qemu_img_cannot_open_is_not_taken_as_free() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!in_use(&dir.path().join("absent.qcow2")).unwrap());
        let err = in_use(dir.path()).unwrap_err().to_string();
        assert!(err.contains("cannot tell whether a QEMU holds"), "{err}");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("2G").unwrap(), 2 << 30);
        assert_eq!(parse_size("512m").unwrap(), 512 << 20);
        assert!(parse_size("1M").is_err());
        assert!(parse_size("lots").is_err());
    }

    #[test]
    fn a_store_base_without_a_root_of_seedctl_build_is_named() {
        let state = tempfile::tempdir().unwrap();
        let base = Path::new("/nix/store/abc123-nixseed-image/nixseed-base.qcow2");
        let w = unrooted_store_base(base, state.path()).expect("no root yet");
        assert!(
            w.contains("/nix/store/abc123-nixseed-image") && w.contains("add-root"),
            "{w}"
        );
        let roots = state.path().join(crate::state::BASE_ROOTS);
        std::fs::create_dir_all(&roots).unwrap();
        std::os::unix::fs::symlink("/nix/store/abc123-nixseed-image", roots.join("result-1"))
            .unwrap();
        assert_eq!(unrooted_store_base(base, state.path()), None);
        assert_eq!(
            unrooted_store_base(Path::new("/srv/images/base.qcow2"), state.path()),
            None,
            "a base outside the store needs no root"
        );
    }
}
