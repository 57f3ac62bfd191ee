//! cloud-init's `write_files`, confined to `/var` and `/run` of the target root. Every
//! directory on the way is opened with O_NOFOLLOW relative to its parent, so a symlink
//! planted under `/var` cannot carry a write outside; each file is written to a temporary
//! name and renamed into place.

use std::io::{ErrorKind, Write};
use std::os::fd::OwnedFd;
use std::path::Path;

use anyhow::{Context, Result, bail};
use nixseed_core::userdata::{WriteFile, check_write_path, is_within};
use rustix::fs::{self as rfs, Mode, OFlags};

fn open_dir(parent: &OwnedFd, name: &str) -> rustix::io::Result<OwnedFd> {
    rfs::openat(
        parent,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// Writes every entry under `sysroot`; returns the paths written. `identity_dir` is the
/// store's path in the target root, refused like the default one.
pub fn apply(sysroot: &Path, identity_dir: &str, files: &[WriteFile]) -> Result<Vec<String>> {
    let mut written = Vec::new();
    for f in files {
        check_write_path(&f.path).map_err(|e| anyhow::anyhow!("write_files: {}: {e}", f.path))?;
        if is_within(&f.path, identity_dir) {
            bail!(
                "write_files: {}: not into the identity store {identity_dir}",
                f.path
            );
        }
        write_one(sysroot, f).with_context(|| format!("write_files: cannot write {}", f.path))?;
        written.push(f.path.clone());
    }
    Ok(written)
}

fn write_one(sysroot: &Path, f: &WriteFile) -> Result<()> {
    let mut dir = rfs::open(
        sysroot,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let parts: Vec<&str> = f.path.split('/').filter(|c| !c.is_empty()).collect();
    let Some((leaf, dirs)) = parts.split_last() else {
        bail!("no file name");
    };
    for (i, component) in dirs.iter().enumerate() {
        // The first component (var, run) must already exist: it is a mount point.
        if i > 0 {
            match rfs::mkdirat(&dir, *component, Mode::from_raw_mode(0o755)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create directory {component}"));
                }
            }
        }
        dir = open_dir(&dir, component)
            .map_err(|e| anyhow::anyhow!("{component}: {e} (a symlink on the way is refused)"))?;
    }
    let tmp = format!(".{leaf}.nixseed-tmp");
    let _ = rfs::unlinkat(&dir, tmp.as_str(), rfs::AtFlags::empty());
    let fd = rfs::openat(
        &dir,
        tmp.as_str(),
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(0o600),
    )?;
    let mut file = std::fs::File::from(fd);
    file.write_all(&f.content)?;
    rfs::fchmod(&file, Mode::from_raw_mode(f.permissions & 0o7777))?;
    file.sync_all()?;
    rfs::renameat(&dir, tmp.as_str(), &dir, *leaf)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wf(path: &str) -> WriteFile {
        WriteFile {
            path: path.into(),
            content: b"hello\n".to_vec(),
            permissions: 0o640,
        }
    }

    #[test]
    fn writes_under_var_and_refuses_symlinked_directories() -> Result<()> {
        let root = tempfile::tempdir()?;
        std::fs::create_dir_all(root.path().join("var"))?;
        std::fs::create_dir_all(root.path().join("outside"))?;
        apply(root.path(), "/var/identity", &[wf("/var/lib/app/conf")])?;
        assert_eq!(
            std::fs::read(root.path().join("var/lib/app/conf"))?,
            b"hello\n"
        );
        std::os::unix::fs::symlink(root.path().join("outside"), root.path().join("var/evil"))?;
        let err = apply(root.path(), "/var/identity", &[wf("/var/evil/x")]).unwrap_err();
        assert!(format!("{err:#}").contains("/var/evil/x"), "{err:#}");
        assert!(!root.path().join("outside/x").exists());
        let err = apply(root.path(), "/var/identity", &[wf("/etc/shadow")]).unwrap_err();
        assert!(format!("{err:#}").contains("only write under /var or /run"));
        Ok(())
    }

    #[test]
    fn the_identity_store_is_out_of_reach_however_the_path_is_spelt() -> Result<()> {
        let root = tempfile::tempdir()?;
        let store = root.path().join("var/lib/nixseed");
        std::fs::create_dir_all(&store)?;
        std::os::unix::fs::symlink("gen-1", store.join("current"))?;
        for path in [
            "/var//identity/current",
            "/var/lib/nixseed/current",
            "/var/lib//nixseed/current",
        ] {
            let err = apply(root.path(), "/var/lib/nixseed", &[wf(path)]).unwrap_err();
            assert!(format!("{err:#}").contains(path), "{err:#}");
        }
        assert_eq!(
            std::fs::read_link(store.join("current"))?,
            Path::new("gen-1")
        );
        assert!(!root.path().join("var/identity").exists());
        Ok(())
    }
}
