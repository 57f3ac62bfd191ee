//! Block devices found through sysfs and identified by their superblock labels (no udev,
//! no blkid in the initrd) and kept open for reading, and [`Media`]: a seed volume mounted read-only in a private
//! directory for as long as the value lives.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use nixseed_core::iso9660;
use nixseed_core::label::{self, FsType};
use nixseed_core::seed::SeedFiles;
use nixseed_core::userdata::MAX_USER_DATA;
use sys_mount::{Mount, MountFlags, Unmount, UnmountDrop, UnmountFlags};

use super::Env;

#[derive(Debug, Clone)]
pub struct BlockDevice {
    /// `/dev/sr0` (under the env's host root).
    pub node: PathBuf,
    pub fstype: FsType,
    pub label: String,
    /// The device, open for reading since the probe (an ISO seed is read through it).
    pub file: Arc<File>,
}

/// Probes the block devices in `/sys/class/block` other than those holding the root and
/// `/var` (never seeds), in reverse-sorted name order (cloud-init's rule for several
/// matching volumes).
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
    let system = system_devices(env);
    let mut out = Vec::new();
    for name in names {
        if name.starts_with("loop") || name.starts_with("ram") || name.starts_with("zram") {
            continue;
        }
        let node = env.host_path(&format!("/dev/{name}"));
        if let Ok(st) = std::fs::metadata(&node)
            && st.rdev() != 0
            && system.contains(&st.rdev())
        {
            continue;
        }
        let mut head = vec![0u8; label::PROBE_LEN];
        // O_NONBLOCK: a cdrom opened this way skips the tray and disc checks and the door
        // lock (and the unlock at close), several emulated ATAPI commands each boot; reads
        // of a block device do not depend on it.
        let read = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(rustix::fs::OFlags::NONBLOCK.bits() as i32)
            .open(&node)
            .and_then(|f| {
                let mut n = 0;
                let mut r = (&f).take(label::PROBE_LEN as u64);
                loop {
                    match r.read(&mut head[n..])? {
                        0 => break,
                        k => n += k,
                    }
                }
                Ok((f, n))
            });
        match read {
            Ok((file, n)) => {
                if let Some((fstype, mut label)) = label::probe(&head[..n]) {
                    if fstype == label::FsType::Vfat {
                        label =
                            label::fat_label(&label, fat_root_label(&file, &head[..n]).as_deref());
                    }
                    tracing::debug!(device = %node.display(), %label, fs = fstype.mount_name(), "labelled volume");
                    out.push(BlockDevice {
                        node,
                        fstype,
                        label,
                        file: Arc::new(file),
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

/// The volume label entry of a FAT root directory, read where the boot sector puts it.
fn fat_root_label(file: &std::fs::File, head: &[u8]) -> Option<String> {
    use std::os::unix::fs::FileExt;
    label::fat_root_label(head, |at, buf| file.read_exact_at(buf, at).is_ok())
}

impl BlockDevice {
    /// Reads `names` (paths relative to `dir` on the volume) from an ISO 9660 volume in
    /// place, through the device the probe opened: no mount, so no filesystem driver and
    /// no cdrom open/release in the boot's path. Absent files are left out; a link, a
    /// directory or a file over the seed size limit is refused, named as `source/name`.
    pub fn read_iso(
        &self,
        source: &str,
        dir: &str,
        names: &[&str],
    ) -> Result<(SeedFiles, iso9660::Root)> {
        let root = self.iso_root()?;
        Ok((self.read_iso_in(&root, source, dir, names)?, root))
    }

    /// The root directory of the ISO 9660 volume on the device.
    pub fn iso_root(&self) -> Result<iso9660::Root> {
        iso9660::read_root(&*self.file).map_err(|e| {
            anyhow::anyhow!(
                "{}: cannot read the ISO 9660 volume: {e}",
                self.node.display()
            )
        })
    }

    /// [`BlockDevice::read_iso`] from a root directory already read.
    pub fn read_iso_in(
        &self,
        root: &iso9660::Root,
        source: &str,
        dir: &str,
        names: &[&str],
    ) -> Result<SeedFiles> {
        let volume = &*self.file;
        let mut files = BTreeMap::new();
        for name in names {
            let origin = format!("{source}/{name}");
            let found = root
                .lookup(volume, &format!("{dir}{name}"))
                .map_err(|e| anyhow::anyhow!("{origin}: {e}"))?;
            if let Some(e) = found {
                let bytes = iso9660::read_file(volume, &e, MAX_USER_DATA as u64, &origin)
                    .map_err(anyhow::Error::msg)?;
                files.insert(name.to_string(), bytes);
            }
        }
        Ok(SeedFiles(files))
    }
}

/// The devices holding the target root and its `/var`: never seeds, so never opened.
fn system_devices(env: &Env) -> Vec<u64> {
    [env.sysroot.clone(), env.sysroot.join("var")]
        .iter()
        .filter_map(|p| std::fs::metadata(p).ok())
        .map(|m| m.dev())
        .collect()
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
        let mut builder = Mount::builder()
            .fstype(dev.fstype.mount_name())
            // nosymfollow: no path into the seed (`openstack/latest/…`) follows a symlink on
            // the volume to somewhere off it; the files' own last components are refused by
            // `read_seed_files` as well.
            .flags(
                MountFlags::RDONLY
                    | MountFlags::NOSUID
                    | MountFlags::NODEV
                    | MountFlags::NOEXEC
                    | MountFlags::from_bits_retain(nix::libc::MS_NOSYMFOLLOW),
            );
        if matches!(dev.fstype, FsType::Ext4) {
            // Without its journal: a read-only mount would still replay a dirty journal,
            // writing to the operator's seed disk.
            builder = builder.data("noload");
        }
        let mount = builder.mount(&dev.node, &dir).with_context(|| {
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
