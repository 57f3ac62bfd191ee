//! The test initramfs: busybox, the few kernel modules the VM's disks need, and the
//! static `nixseed-agent`. Its `/init` follows the NixOS systemd initrd's order: mount
//! root read-only at /sysroot, mount /var, run `nixseed-agent initrd`, move /run, and
//! switch root.

use crate::cmd;
use anyhow::{Context, Result, bail};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Bump when the init script or the module list changes.
pub const INITRAMFS_CODE_VERSION: u32 = 7;

/// Modules for virtio disks/NICs/serial, ext4, the seed media (a SATA/IDE cdrom or a
/// virtio disk; vfat for FAT seeds, while ISO seeds are read by the agent in place, so
/// iso9660 is not needed). Dependencies come from `modules.dep`.
pub const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    "virtio_console",
    "virtio_rng",
    "crc32c_generic",
    "ext4",
    "vfat",
    "nls_cp437",
    "nls_iso8859_1",
    "nls_utf8",
    "sd_mod",
    "sr_mod",
    "cdrom",
    "ahci",
    "ata_piix",
    // systemd credentials given through QEMU's fw_cfg (`/sys/firmware/qemu_fw_cfg`).
    "qemu_fw_cfg",
];

pub const BUSYBOX: &str = "/bin/busybox";

pub const INIT: &str = include_str!("init.sh");

/// Kernel module names compare with `-` and `_` as equals.
fn norm(name: &str) -> String {
    name.replace('-', "_")
}

fn module_name(path: &str) -> String {
    let file = path.rsplit('/').next().unwrap_or(path);
    let stem = file.split(".ko").next().unwrap_or(file);
    norm(stem)
}

/// Parsed `modules.dep`: module name -> (relative path, direct dependencies' paths).
pub struct ModuleIndex {
    by_name: BTreeMap<String, (String, Vec<String>)>,
    builtin: BTreeSet<String>,
}

impl ModuleIndex {
    pub fn parse(modules_dep: &str, modules_builtin: &str) -> Self {
        let mut by_name = BTreeMap::new();
        for line in modules_dep.lines() {
            let Some((path, deps)) = line.split_once(':') else {
                continue;
            };
            let deps = deps.split_whitespace().map(String::from).collect();
            by_name.insert(module_name(path), (path.to_string(), deps));
        }
        let builtin = modules_builtin.lines().map(module_name).collect();
        ModuleIndex { by_name, builtin }
    }

    /// Module paths in load order (dependencies first), skipping built-ins. Names that
    /// are neither a module nor built in are returned in the second list.
    pub fn load_order(&self, wanted: &[&str]) -> (Vec<String>, Vec<String>) {
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        let mut missing = Vec::new();
        for w in wanted {
            let n = norm(w);
            match self.by_name.get(&n) {
                Some((path, _)) => self.visit(path, &mut seen, &mut order),
                None if self.builtin.contains(&n) => {}
                None => missing.push(n),
            }
        }
        (order, missing)
    }

    /// The names of `wanted` that are modules of this kernel (not built in, not missing),
    /// in the order given: what the initramfs's one `modprobe -a` loads.
    pub fn loadable(&self, wanted: &[&str]) -> Vec<String> {
        wanted
            .iter()
            .map(|w| norm(w))
            .filter(|n| self.by_name.contains_key(n))
            .collect()
    }

    /// A `modules.dep` for the initramfs, where the modules of `order` lie flat in one
    /// directory as `<name>.ko`, uncompressed.
    pub fn flat_dep(&self, order: &[String]) -> String {
        let flat = |path: &str| format!("{}.ko", module_name(path));
        let mut out = String::new();
        for path in order {
            out.push_str(&flat(path));
            out.push(':');
            if let Some((_, deps)) = self.by_name.get(&module_name(path)) {
                for d in deps {
                    out.push(' ');
                    out.push_str(&flat(d));
                }
            }
            out.push('\n');
        }
        out
    }

    fn visit(&self, path: &str, seen: &mut BTreeSet<String>, order: &mut Vec<String>) {
        if !seen.insert(path.to_string()) {
            return;
        }
        if let Some((_, deps)) = self.by_name.get(&module_name(path)) {
            for d in deps {
                self.visit(d, seen, order);
            }
        }
        order.push(path.to_string());
    }
}

/// Builds `out` (an uncompressed newc cpio) from `modules_dir` (`/lib/modules/<release>` of the
/// image) and the optional agent binary; `scratch` holds the staging tree.
pub fn build(modules_dir: &Path, agent: Option<&Path>, out: &Path, scratch: &Path) -> Result<()> {
    let read = |n: &str| {
        let p = modules_dir.join(n);
        fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))
    };
    let index = ModuleIndex::parse(
        &read("modules.dep")?,
        &read("modules.builtin").unwrap_or_default(),
    );
    let (order, missing) = index.load_order(MODULES);
    let release = modules_dir
        .file_name()
        .and_then(|n| n.to_str())
        .with_context(|| format!("no kernel release in {}", modules_dir.display()))?;
    if !missing.is_empty() {
        eprintln!(
            "vm-tests: kernel in {} has no module {} (skipped)",
            modules_dir.display(),
            missing.join(", ")
        );
    }
    let stage = scratch.join("initramfs-root");
    if stage.exists() {
        fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    for d in [
        "bin", "sbin", "usr/bin", "usr/sbin", "dev", "proc", "sys", "run", "sysroot", "etc",
    ] {
        fs::create_dir_all(stage.join(d))
            .with_context(|| format!("creating {}/{d}", stage.display()))?;
    }
    copy_exec(Path::new(BUSYBOX), &stage.join("bin/busybox"))?;
    install_applets(&stage)?;
    let init = stage.join("init");
    fs::write(&init, INIT).with_context(|| format!("writing {}", init.display()))?;
    set_mode(&init, 0o755)?;
    let mods = stage.join("lib/modules").join(release);
    fs::create_dir_all(&mods).with_context(|| format!("creating {}", mods.display()))?;
    for rel in &order {
        // Stored uncompressed: busybox modprobe does not read .ko.xz / .ko.zst.
        let dst = mods.join(format!("{}.ko", module_name(rel)));
        decompress_module(&modules_dir.join(rel), &dst)?;
    }
    fs::write(mods.join("modules.dep"), index.flat_dep(&order))
        .context("writing the initramfs's modules.dep")?;
    let wanted = index.loadable(MODULES).join(" ");
    fs::write(stage.join("etc/nixseed-modules"), wanted + "\n")
        .context("writing the module list")?;
    if let Some(agent) = agent {
        copy_exec(agent, &stage.join("usr/bin/nixseed-agent"))?;
    }
    // The kernel opens /dev/console before /init runs; devtmpfs comes later.
    let console = stage.join("dev/console");
    cmd::run(Command::new("mknod").arg(&console).args(["c", "5", "1"]))?;
    let script = format!(
        "cd '{}' && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet > '{}'",
        stage.display(),
        out.display()
    );
    cmd::run(Command::new("sh").args(["-c", &script]))
        .with_context(|| format!("packing {}", out.display()))?;
    fs::remove_dir_all(&stage).with_context(|| format!("removing {}", stage.display()))?;
    Ok(())
}

/// busybox's applets as links at the paths it lists for itself (`--list-full`), made when
/// the image is built rather than by `busybox --install` at every boot.
fn install_applets(stage: &Path) -> Result<()> {
    let out = cmd::stdout(Command::new(BUSYBOX).arg("--list-full"))?;
    for rel in out.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let link = stage.join(rel);
        if fs::symlink_metadata(&link).is_ok() {
            continue;
        }
        if let Some(dir) = link.parent() {
            fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        std::os::unix::fs::symlink("/bin/busybox", &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    Ok(())
}

fn copy_exec(src: &Path, dst: &Path) -> Result<()> {
    fs::copy(src, dst)
        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
    set_mode(dst, 0o755)
}

fn set_mode(p: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(p, fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", p.display()))
}

fn decompress_module(src: &Path, dst: &Path) -> Result<()> {
    let s = src.to_string_lossy();
    let tool: Option<(&str, &[&str])> = if s.ends_with(".xz") {
        Some(("xz", &["-dc"]))
    } else if s.ends_with(".zst") {
        Some(("zstd", &["-dcq"]))
    } else if s.ends_with(".gz") {
        Some(("gzip", &["-dc"]))
    } else {
        None
    };
    match tool {
        None => fs::copy(src, dst)
            .map(|_| ())
            .with_context(|| format!("copying {}", src.display())),
        Some((prog, args)) => {
            let out = cmd::run(Command::new(prog).args(args).arg(src))?;
            if out.stdout.is_empty() {
                bail!("{prog} produced nothing for {}", src.display());
            }
            fs::write(dst, out.stdout).with_context(|| format!("writing {}", dst.display()))
        }
    }
}

/// For callers that want the list without building (tests, `vm-tests image --explain`).
pub fn resolved_modules(modules_dir: &Path) -> Result<Vec<PathBuf>> {
    let dep = modules_dir.join("modules.dep");
    let text = fs::read_to_string(&dep).with_context(|| format!("reading {}", dep.display()))?;
    let builtin = fs::read_to_string(modules_dir.join("modules.builtin")).unwrap_or_default();
    let (order, _) = ModuleIndex::parse(&text, &builtin).load_order(MODULES);
    Ok(order.into_iter().map(PathBuf::from).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    // A hand-written fake modules.dep in the kernel's format.
    const DEP: &str = "kernel/fs/ext4/ext4.ko.xz: kernel/lib/crc16.ko.xz kernel/fs/mbcache.ko.xz kernel/fs/jbd2/jbd2.ko.xz\n\
kernel/lib/crc16.ko.xz:\n\
kernel/fs/mbcache.ko.xz:\n\
kernel/fs/jbd2/jbd2.ko.xz:\n\
kernel/drivers/block/virtio_blk.ko.xz:\n\
kernel/fs/isofs/isofs.ko.xz:\n";

    #[test]
    fn dependencies_load_before_the_module_and_once() {
        let idx = ModuleIndex::parse(DEP, "kernel/drivers/virtio/virtio_pci.ko\n");
        let (order, missing) =
            idx.load_order(&["ext4", "virtio-blk", "virtio_pci", "jbd2", "nope"]);
        assert_eq!(
            order,
            vec![
                "kernel/lib/crc16.ko.xz",
                "kernel/fs/mbcache.ko.xz",
                "kernel/fs/jbd2/jbd2.ko.xz",
                "kernel/fs/ext4/ext4.ko.xz",
                "kernel/drivers/block/virtio_blk.ko.xz",
            ]
        );
        assert_eq!(missing, vec!["nope"]);
    }

    #[test]
    fn busybox_applets_are_linked_where_busybox_lists_them() {
        if !Path::new(BUSYBOX).exists() {
            eprintln!("no {BUSYBOX} on this host: skipped");
            return;
        }
        let stage = std::env::temp_dir().join(format!("vm-tests-applets-{}", std::process::id()));
        let _ = fs::remove_dir_all(&stage);
        fs::create_dir_all(stage.join("usr/bin")).unwrap();
        // A file already in place (the agent, in the real build) is left alone.
        fs::write(stage.join("usr/bin/env"), "kept").unwrap();
        install_applets(&stage).unwrap();
        for applet in ["sbin/modprobe", "bin/sh", "sbin/switch_root", "bin/mount"] {
            let target = fs::read_link(stage.join(applet));
            assert_eq!(target.ok().as_deref(), Some(Path::new(BUSYBOX)), "{applet}");
        }
        assert_eq!(
            fs::read_to_string(stage.join("usr/bin/env")).unwrap(),
            "kept"
        );
        fs::remove_dir_all(&stage).unwrap();
    }

    #[test]
    fn the_initramfs_modules_dep_names_the_flat_uncompressed_files() {
        let idx = ModuleIndex::parse(DEP, "kernel/drivers/virtio/virtio_pci.ko\n");
        let (order, _) = idx.load_order(&["ext4", "virtio_blk"]);
        assert_eq!(
            idx.flat_dep(&order),
            "crc16.ko:\nmbcache.ko:\njbd2.ko:\next4.ko: crc16.ko mbcache.ko jbd2.ko\nvirtio_blk.ko:\n"
        );
        // Built-ins and names the kernel lacks are not asked of modprobe.
        assert_eq!(
            idx.loadable(&["virtio-blk", "virtio_pci", "ext4", "nope"]),
            vec!["virtio_blk", "ext4"]
        );
    }
}
