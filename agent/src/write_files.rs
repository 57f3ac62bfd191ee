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

/// Writes every entry: `/var/…` under `sysroot`, `/run/…` under `run` (the `/run` the
/// booted system will have; in the initrd it moves along with the switch to the new root).
/// `identity_dir` is the store's path in the target root, refused like the default one.
/// Entries are written in order up to the first that fails, as cloud-init's module stops:
/// the run says which were written and why it stopped, so that a retry starts at the
/// failed entry and does not append twice to the ones before it.
pub fn apply(sysroot: &Path, run: &Path, identity_dir: &str, files: &[WriteFile]) -> Run {
    let mut written = Vec::new();
    for f in files {
        if let Err(e) = write_checked(sysroot, run, identity_dir, f) {
            return Run {
                written,
                stopped: Some(e),
            };
        }
        written.push(f.path.clone());
    }
    Run {
        written,
        stopped: None,
    }
}

/// What [`apply`] did: the paths written, in order, and the error of the entry it stopped
/// at (the entry after the last one written).
pub struct Run {
    pub written: Vec<String>,
    pub stopped: Option<anyhow::Error>,
}

#[cfg(test)]
impl Run {
    /// The paths written, or the error the run stopped at.
    pub fn result(self) -> Result<Vec<String>> {
        match self.stopped {
            Some(e) => Err(e),
            None => Ok(self.written),
        }
    }
}

fn write_checked(sysroot: &Path, run: &Path, identity_dir: &str, f: &WriteFile) -> Result<()> {
    check_write_path(&f.path).map_err(|e| anyhow::anyhow!("write_files: {}: {e}", f.path))?;
    if is_within(&f.path, identity_dir) {
        bail!(
            "write_files: {}: not into the identity store {identity_dir}",
            f.path
        );
    }
    write_one(sysroot, run, f).with_context(|| format!("write_files: cannot write {}", f.path))
}

fn write_one(sysroot: &Path, run: &Path, f: &WriteFile) -> Result<()> {
    let owner = match &f.owner {
        Some(o) => Some(resolve_owner(sysroot, o)?),
        None => None,
    };
    let parts: Vec<&str> = f.path.split('/').filter(|c| !c.is_empty()).collect();
    // Under `/run` every directory may be made; under the root, the first component (var)
    // must already exist: it is a mount point.
    let (base, parts, made_from) = match parts.split_first() {
        Some((&"run", rest)) => (run, rest, 0),
        _ => (sysroot, &parts[..], 1),
    };
    let mut dir = rfs::open(
        base,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .with_context(|| format!("cannot open {}", base.display()))?;
    let Some((leaf, dirs)) = parts.split_last() else {
        bail!("no file name");
    };
    for (i, component) in dirs.iter().enumerate() {
        if i >= made_from {
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
    let mode = Mode::from_raw_mode(f.permissions & 0o7777);
    if f.append {
        // Added to the file in place, as cloud-init opens it for appending; a symlink as
        // the file itself is refused.
        let fd = rfs::openat(
            &dir,
            *leaf,
            OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            mode,
        )
        .with_context(|| format!("cannot open {leaf} to append (a symlink is refused)"))?;
        let mut file = std::fs::File::from(fd);
        file.write_all(&f.content)?;
        finish(&file, mode, owner)?;
        return Ok(());
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
    finish(&file, mode, owner)?;
    rfs::renameat(&dir, tmp.as_str(), &dir, *leaf)?;
    Ok(())
}

/// Owner first (a chown clears set-ID bits), then the mode, then the data to disk.
fn finish(file: &std::fs::File, mode: Mode, owner: Option<(u32, Option<u32>)>) -> Result<()> {
    if let Some((uid, gid)) = owner {
        rfs::fchown(
            file,
            Some(rfs::Uid::from_raw(uid)),
            gid.map(rfs::Gid::from_raw),
        )?;
    }
    rfs::fchmod(file, mode)?;
    file.sync_all()?;
    Ok(())
}

/// `user`, `user:group` or numeric IDs, names looked up in the target root's
/// `/etc/passwd` and `/etc/group`. Without a group the file keeps root's group, as
/// cloud-init leaves it.
fn resolve_owner(sysroot: &Path, owner: &str) -> Result<(u32, Option<u32>)> {
    let (user, group) = match owner.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (owner, None),
    };
    let lookup = |file: &str, name: &str| -> Result<u32> {
        if let Ok(id) = name.parse::<u32>() {
            return Ok(id);
        }
        let path = sysroot.join("etc").join(file);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("owner '{owner}': cannot read {}", path.display()))?;
        text.lines()
            .filter_map(|l| {
                let mut fields = l.split(':');
                let n = fields.next()?;
                let id = fields.nth(1)?.parse::<u32>().ok()?;
                (n == name).then_some(id)
            })
            .next()
            .ok_or_else(|| anyhow::anyhow!("owner '{owner}': no '{name}' in /etc/{file}"))
    };
    let uid = lookup("passwd", user)?;
    let gid = match group {
        Some(g) => Some(lookup("group", g)?),
        None => None,
    };
    Ok((uid, gid))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wf(path: &str) -> WriteFile {
        WriteFile {
            path: path.into(),
            content: b"hello\n".to_vec(),
            permissions: 0o640,
            append: false,
            owner: None,
        }
    }

    #[test]
    fn writes_under_var_and_refuses_symlinked_directories() -> Result<()> {
        let root = tempfile::tempdir()?;
        std::fs::create_dir_all(root.path().join("var"))?;
        std::fs::create_dir_all(root.path().join("outside"))?;
        apply(
            root.path(),
            &root.path().join("run"),
            "/var/identity",
            &[wf("/var/lib/app/conf")],
        )
        .result()?;
        assert_eq!(
            std::fs::read(root.path().join("var/lib/app/conf"))?,
            b"hello\n"
        );
        std::os::unix::fs::symlink(root.path().join("outside"), root.path().join("var/evil"))?;
        let err = apply(
            root.path(),
            &root.path().join("run"),
            "/var/identity",
            &[wf("/var/evil/x")],
        )
        .result()
        .unwrap_err();
        assert!(format!("{err:#}").contains("/var/evil/x"), "{err:#}");
        assert!(!root.path().join("outside/x").exists());
        let err = apply(
            root.path(),
            &root.path().join("run"),
            "/var/identity",
            &[wf("/etc/shadow")],
        )
        .result()
        .unwrap_err();
        assert!(format!("{err:#}").contains("only write under /var or /run"));
        Ok(())
    }

    #[test]
    fn run_paths_go_to_the_live_run_not_the_images() -> Result<()> {
        let root = tempfile::tempdir()?;
        std::fs::create_dir_all(root.path().join("sysroot/var"))?;
        std::fs::create_dir_all(root.path().join("run"))?;
        let written = apply(
            &root.path().join("sysroot"),
            &root.path().join("run"),
            "/var/identity",
            &[wf("/run/app/flag")],
        )
        .result()?;
        assert_eq!(written, ["/run/app/flag"]);
        assert_eq!(std::fs::read(root.path().join("run/app/flag"))?, b"hello\n");
        assert!(!root.path().join("sysroot/run").exists());
        Ok(())
    }

    #[test]
    fn append_adds_to_the_file_and_owner_is_looked_up_in_the_target_root() -> Result<()> {
        use std::os::unix::fs::MetadataExt;
        let root = tempfile::tempdir()?;
        std::fs::create_dir_all(root.path().join("var/lib"))?;
        std::fs::create_dir_all(root.path().join("etc"))?;
        std::fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\napp:x:4242:4243::/var/lib/app:/bin/false\n",
        )?;
        std::fs::write(root.path().join("etc/group"), "root:x:0:\napps:x:4300:\n")?;
        std::fs::write(root.path().join("var/lib/log"), "first\n")?;
        let run = root.path().join("run");
        let mut f = wf("/var/lib/log");
        f.append = true;
        f.owner = Some("app:apps".into());
        apply(root.path(), &run, "/var/identity", &[f]).result()?;
        let path = root.path().join("var/lib/log");
        assert_eq!(std::fs::read(&path)?, b"first\nhello\n");
        let meta = std::fs::metadata(&path)?;
        assert_eq!(
            (meta.uid(), meta.gid(), meta.mode() & 0o7777),
            (4242, 4300, 0o640)
        );
        let mut f = wf("/var/lib/other");
        f.owner = Some("nobody".into());
        let err = apply(root.path(), &run, "/var/identity", &[f])
            .result()
            .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("/var/lib/other") && msg.contains("no 'nobody' in /etc/passwd"),
            "{msg}"
        );
        assert!(!root.path().join("var/lib/other").exists());
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
            let err = apply(
                root.path(),
                &root.path().join("run"),
                "/var/lib/nixseed",
                &[wf(path)],
            )
            .result()
            .unwrap_err();
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
