//! Block devices found through sysfs and identified by their superblock labels (no udev,
//! no blkid in the initrd), and [`Media`]: a seed volume mounted read-only in a private
//! directory for as long as the value lives.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nixseed_core::label::{self, FsType};
use sys_mount::{Mount, MountFlags, Unmount, UnmountDrop, UnmountFlags};

use super::Env;

#[derive(Debug, Clone)]
pub struct BlockDevice {
    /// `/dev/sr0` (under the env's host root).
    pub node: PathBuf,
    pub fstype: FsType,
    pub label: String,
}

/// Probes every block device in `/sys/class/block`, in reverse-sorted name order
/// (cloud-init's rule for several matching volumes).
pub fn scan(env: &Env) -> Vec<BlockDevice> {
    let class = env.host_path("/sys/class/block");
    let mut names: Vec<String> = match std::fs::read_dir(&class) {
        Ok(rd) => rd
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect(),
        Err(e) => {
            tracing::warn!("cannot list {}: {e}", class.display());
            return Vec::new();
        }
    };
    names.sort();
    names.reverse();
    let mut out = Vec::new();
    for name in names {
        if name.starts_with("loop") || name.starts_with("ram") || name.starts_with("zram") {
            continue;
        }
        let node = env.host_path(&format!("/dev/{name}"));
        let mut head = vec![0u8; label::PROBE_LEN];
        let read = std::fs::File::open(&node).and_then(|f| {
            let mut n = 0;
            let mut f = f.take(label::PROBE_LEN as u64);
            loop {
                match f.read(&mut head[n..])? {
                    0 => break,
                    k => n += k,
                }
            }
            Ok(n)
        });
        match read {
            Ok(n) => {
                if let Some((fstype, label)) = label::probe(&head[..n]) {
                    tracing::debug!(device = %node.display(), %label, fs = fstype.mount_name(), "labelled volume");
                    out.push(BlockDevice {
                        node,
                        fstype,
                        label,
                    });
                }
            }
            // No medium in a cdrom drive, or a node that does not exist: nothing to see.
            Err(e) if matches!(e.raw_os_error(), Some(123) | Some(6) | Some(2)) => {}
            Err(e) => {
                tracing::warn!(device = %node.display(), "cannot read the device to probe its label: {e}")
            }
        }
    }
    out
}

/// A seed volume mounted read-only, nosuid, nodev, noexec under a private directory;
/// unmounted and the directory removed when dropped.
pub struct Media {
    pub dir: PathBuf,
    _mount: UnmountDrop<Mount>,
}

impl Media {
    pub fn mount(dev: &BlockDevice, run: &Path) -> Result<Media> {
        let base = run.join("nixseed");
        std::fs::create_dir_all(&base)
            .with_context(|| format!("cannot create {}", base.display()))?;
        let dir = base.join(format!("media-{}", dev.label));
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("cannot create {}", dir.display())),
        }
        let mount = Mount::builder()
            .fstype(dev.fstype.mount_name())
            .flags(MountFlags::RDONLY | MountFlags::NOSUID | MountFlags::NODEV | MountFlags::NOEXEC)
            .mount(&dev.node, &dir)
            .with_context(|| {
                format!(
                    "cannot mount {} ({}, label {}) read-only at {}",
                    dev.node.display(),
                    dev.fstype.mount_name(),
                    dev.label,
                    dir.display()
                )
            })?;
        Ok(Media {
            dir,
            _mount: mount.into_unmount_drop(UnmountFlags::DETACH),
        })
    }
}
