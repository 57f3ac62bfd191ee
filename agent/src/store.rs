//! The identity store under `/var/identity`: one directory per generation, a `current`
//! symlink swapped with one rename(2), and flat names that always point through
//! `current`. Every access is relative to a directory fd and refuses symlinks, so a link
//! planted under `/var/identity` cannot redirect a write.

use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use nixseed_core::identity::{self, IdentityFile, IdentityTree};
use nixseed_core::manifest::{Manifest, sha256_hex};
use rustix::fs::{self as rfs, AtFlags, Mode, OFlags};

const CURRENT: &str = "current";
const GEN_PREFIX: &str = "gen-";
/// A generation's files are small; anything bigger was not written by nixseed.
const MAX_FILE: u64 = 4 * 1024 * 1024;

/// Names linked flat into the store root, beside `current`.
fn flat_names(tree: &IdentityTree) -> Vec<String> {
    let mut names: Vec<String> = [
        identity::MACHINE_ID,
        identity::HOSTNAME,
        identity::SSH_HOST_KEY,
        identity::SSH_HOST_KEY_PUB,
        identity::RESOLV_CONF,
        identity::HOSTS,
        identity::TCP_PORTS,
        identity::UDP_PORTS,
        identity::ADMIN_KEYS,
        identity::USER_KEYS,
        identity::NETWORK_DIR,
        identity::MANIFEST,
        identity::USERS,
        identity::BOOTCMD,
        identity::RUNCMD,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    names.extend(tree.keys().filter(|k| !k.contains('/')).cloned());
    names.sort();
    names.dedup();
    names
}

/// When a new generation reaches the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Before `write_generation` returns: the files with one syncfs before `current` moves,
    /// the move with an fsync after (a live push, stage 2 doing the whole job).
    Now,
    /// Later, by [`Store::sync`] in stage 2, which runs before sshd and the network start,
    /// so nothing has used the identity yet. The initrd stage writes this way and waits
    /// for the disk once instead of twice. A power cut in between can leave the new
    /// generation incomplete (ext4 commits the names before delayed-allocation data);
    /// [`Store::recover`] finds that at the next boot and makes the previous one current.
    Deferred,
}

/// An open identity store.
pub struct Store {
    dir: OwnedFd,
    path: PathBuf,
}

/// One generation read back from disk.
pub struct Generation {
    pub number: u64,
    pub manifest: Manifest,
    pub tree: IdentityTree,
}

fn gen_name(n: u64) -> String {
    format!("{GEN_PREFIX}{n}")
}

fn parse_gen(name: &str) -> Option<u64> {
    name.strip_prefix(GEN_PREFIX)?.parse().ok()
}

impl Store {
    /// Opens (and with `create`, makes) the store directory. A symlink at the path, a
    /// directory owned by someone else, or one writable by group/others is refused.
    pub fn open(path: &Path, create: bool) -> Result<Store> {
        if create {
            match rfs::mkdir(path, Mode::from_raw_mode(0o755)) {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot create {}", path.display()));
                }
            }
        }
        let dir = rfs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
            Mode::empty(),
        )
        .with_context(|| {
            format!(
                "cannot open {} as a directory (a symlink there is refused)",
                path.display()
            )
        })?;
        let st = rfs::fstat(&dir).with_context(|| format!("cannot stat {}", path.display()))?;
        let me = rustix::process::geteuid().as_raw();
        if st.st_uid != me {
            bail!(
                "{} is owned by uid {}, not by uid {me}: refusing to trust it",
                path.display(),
                st.st_uid
            );
        }
        if st.st_mode & 0o022 != 0 {
            bail!(
                "{} is writable by group or others (mode {:o}): refusing to trust it",
                path.display(),
                st.st_mode & 0o7777
            );
        }
        Ok(Store {
            dir,
            path: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The on-disk path of a generation, for bind mounts.
    pub fn generation_path(&self, n: u64) -> PathBuf {
        self.path.join(gen_name(n))
    }

    /// The generation `current` points to, if any. A `current` that is not a symlink to a
    /// `gen-N` directory is refused, never followed.
    pub fn current_number(&self) -> Result<Option<u64>> {
        match rfs::readlinkat(&self.dir, CURRENT, Vec::new()) {
            Ok(target) => {
                let target = target.to_string_lossy().into_owned();
                match parse_gen(&target) {
                    Some(n) => Ok(Some(n)),
                    None => bail!(
                        "{}/{CURRENT} points to {target:?}, not to a generation: refusing it (remove the link to start over)",
                        self.path.display()
                    ),
                }
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(e) if e.raw_os_error() == rustix::io::Errno::INVAL.raw_os_error() => bail!(
                "{}/{CURRENT} is not a symlink: refusing it",
                self.path.display()
            ),
            Err(e) => {
                Err(e).with_context(|| format!("cannot read {}/{CURRENT}", self.path.display()))
            }
        }
    }

    /// Reads the current generation and verifies it against its manifest.
    /// A generation a power cut left incomplete is passed over (with a warning) for the
    /// newest whole one before it, as [`Store::recover`] will make it at the next boot.
    pub fn current(&self) -> Result<Option<Generation>> {
        let Some(n) = self.current_number()? else {
            return Ok(None);
        };
        match self.read_generation(n) {
            Ok(g) => Ok(Some(g)),
            Err(e) if self.is_incomplete(n) => {
                let older = self.newest_whole_before(n)?;
                tracing::warn!(
                    "{}/{}: incomplete ({e:#}): generation {} stands in for it",
                    self.path.display(),
                    gen_name(n),
                    older
                        .as_ref()
                        .map_or_else(|| "none".to_string(), |g| g.number.to_string())
                );
                Ok(older)
            }
            Err(e) => Err(e),
        }
    }

    /// The newest generation below `n` that reads back whole, passing over those a power
    /// cut left incomplete. One that exists but cannot be read for another reason (an I/O
    /// error, a changed file) is an error: falling back past it, or to a first boot, would
    /// make a new machine-id and host key while the machine's own may still be there.
    fn newest_whole_before(&self, n: u64) -> Result<Option<Generation>> {
        let mut older: Vec<u64> = list_dir(&self.dir)
            .with_context(|| format!("cannot list {}", self.path.display()))?
            .iter()
            .filter_map(|e| parse_gen(e))
            .filter(|m| *m < n)
            .collect();
        older.sort_unstable();
        for m in older.into_iter().rev() {
            match self.read_generation(m) {
                Ok(g) => return Ok(Some(g)),
                Err(_) if self.is_incomplete(m) => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    pub fn read_generation(&self, n: u64) -> Result<Generation> {
        let name = gen_name(n);
        let origin = format!("{}/{name}", self.path.display());
        let gdir =
            open_dir_at(&self.dir, &name).with_context(|| format!("cannot open {origin}"))?;
        let mut tree = IdentityTree::new();
        let mut manifest_bytes = None;
        read_tree(&gdir, "", &mut tree, &origin)?;
        if let Some(f) = tree.remove(identity::MANIFEST) {
            manifest_bytes = Some(f.bytes);
        }
        let manifest_bytes =
            manifest_bytes.with_context(|| format!("{origin}/{}: missing", identity::MANIFEST))?;
        let manifest =
            Manifest::parse(&manifest_bytes, &format!("{origin}/{}", identity::MANIFEST))?;
        manifest.verify(&tree, &origin)?;
        Ok(Generation {
            number: n,
            manifest,
            tree,
        })
    }

    /// Writes `tree` as a new generation and makes it current. The manifest's `files` and
    /// `generation` are filled in here. A crash at any point leaves either the old
    /// `current` or the new one whole.
    pub fn write_generation(
        &self,
        tree: &IdentityTree,
        manifest: Manifest,
        durability: Durability,
    ) -> Result<u64> {
        self.write_generation_keeping(tree, manifest, durability, None)
    }

    /// [`Store::write_generation`] that also spares generation `bound` from the prune: the
    /// one `/etc` is bind-mounted from when the new generation does not move the binds
    /// (a guest-agent key change), so those binds never show files of a removed one.
    pub fn write_generation_keeping(
        &self,
        tree: &IdentityTree,
        mut manifest: Manifest,
        durability: Durability,
        bound: Option<u64>,
    ) -> Result<u64> {
        let previous = self.current_number()?;
        // Past every generation kept, not only the current one: after a rollback the
        // newer ones are still there, and a number names one identity only, so `status`
        // and the logs never show two different identities as the same generation.
        let highest = list_dir(&self.dir)?
            .iter()
            .filter_map(|e| parse_gen(e))
            .chain(previous)
            .max();
        let n = highest.unwrap_or(0).checked_add(1).ok_or_else(|| {
            anyhow!(
                "{}: the highest generation number kept is the largest there is; no new generation can follow it",
                self.path.display()
            )
        })?;
        manifest.generation = n;
        manifest.files = Manifest::files_of(tree);
        let name = gen_name(n);
        let tmp = format!(".tmp-{name}");
        let at = |what: &str| format!("{}/{what}", self.path.display());
        // What the store would refuse to read back is refused before anything is written,
        // or the machine would boot on into a generation none of its readers can open.
        if let Some((rel, f)) = tree.iter().find(|(_, f)| f.bytes.len() as u64 > MAX_FILE) {
            bail!(
                "{}/{rel}: {} bytes is more than the {} MiB an identity file may hold",
                at(&name),
                f.bytes.len(),
                MAX_FILE >> 20
            );
        }

        // Leftovers of an interrupted write are never current: clear them.
        remove_tree_at(&self.dir, &tmp).with_context(|| format!("cannot clear {}", at(&tmp)))?;
        remove_tree_at(&self.dir, &name).with_context(|| format!("cannot clear {}", at(&name)))?;

        let result = (|| -> Result<()> {
            rfs::mkdirat(&self.dir, tmp.as_str(), Mode::from_raw_mode(0o755))
                .with_context(|| format!("cannot create {}", at(&tmp)))?;
            let gdir = open_dir_at(&self.dir, &tmp)?;
            let mut all = tree.clone();
            all.insert(
                identity::MANIFEST.to_string(),
                IdentityFile {
                    mode: identity::mode_of(identity::MANIFEST),
                    bytes: manifest.to_bytes(),
                },
            );
            let mut subdirs: Vec<(String, OwnedFd)> = Vec::new();
            for (rel, file) in &all {
                let (parent, leaf) = match rel.rsplit_once('/') {
                    Some((p, l)) => (Some(p), l),
                    None => (None, rel.as_str()),
                };
                let target_dir = match parent {
                    None => &gdir,
                    Some(p) => {
                        if !subdirs.iter().any(|(n, _)| n == p) {
                            if p.contains('/') || p.starts_with('.') {
                                bail!("{}: nested path {rel} is not allowed", at(&tmp));
                            }
                            rfs::mkdirat(&gdir, p, Mode::from_raw_mode(0o755))
                                .with_context(|| format!("cannot create {}/{p}", at(&tmp)))?;
                            subdirs.push((p.to_string(), open_dir_at(&gdir, p)?));
                        }
                        &subdirs.iter().find(|(n, _)| n == p).context("subdir")?.1
                    }
                };
                write_file_at(target_dir, leaf, file)
                    .with_context(|| format!("cannot write {}/{rel}", at(&tmp)))?;
                crate::crashpoint::hit(&format!("store-file-{rel}"));
            }
            crate::crashpoint::hit("store-before-rename");
            rfs::renameat(&self.dir, tmp.as_str(), &self.dir, name.as_str())
                .with_context(|| format!("cannot rename {} to {name}", at(&tmp)))?;
            // The flat names point through `current`, whichever generation that is.
            self.link_flat_names(tree)?;
            crate::crashpoint::hit("store-after-links");
            // A generation rolled back from goes now that the new one is whole, and
            // before `current` moves: recovery from a power cut, and a later rollback,
            // fall back to the newest whole generation below the new one, which must be
            // the one current until now.
            for g in list_dir(&self.dir)?.iter().filter_map(|e| parse_gen(e)) {
                if g > previous.unwrap_or(0) && g != n && Some(g) != bound {
                    remove_tree_at(&self.dir, &gen_name(g)).with_context(|| {
                        format!("cannot remove {}, rolled back from", at(&gen_name(g)))
                    })?;
                }
            }
            let pending = self.prepare_link(CURRENT, &name)?;
            // One syncfs makes every file, its mode, the directories, the flat names and
            // the new `current` link durable in one journal commit; a flush per file costs
            // a host disk flush each under QEMU. Nothing points at the new generation
            // until the rename below.
            if durability == Durability::Now {
                rfs::syncfs(&gdir).with_context(|| format!("cannot sync {}", at(&name)))?;
            }
            crate::crashpoint::hit("store-before-swap");
            rfs::renameat(&self.dir, pending.as_str(), &self.dir, CURRENT)
                .with_context(|| format!("cannot replace {}", at(CURRENT)))
        })();
        if let Err(e) = result {
            let _ = remove_tree_at(&self.dir, &tmp);
            if self.current_number().ok().flatten() != Some(n) {
                let _ = remove_tree_at(&self.dir, &name);
            }
            return Err(e);
        }
        // From here the new generation is current: what fails now is reported and the
        // generation stands, so its caller goes on to bind it and run its write_files.
        if durability == Durability::Now
            && let Err(e) = rfs::fsync(&self.dir)
        {
            tracing::warn!(
                "{name} is current, but syncing {} failed ({e}): a power cut before the next sync may bring the previous generation back",
                self.path.display()
            );
        }
        crate::crashpoint::hit("store-after-swap");
        if let Err(e) = self.prune(&[Some(n), previous, bound]) {
            tracing::warn!("{name} is current; {e:#}");
        }
        crate::crashpoint::hit("store-after-prune");
        Ok(n)
    }

    /// Makes everything written to the store durable (stage 2, after a deferred write).
    pub fn sync(&self) -> Result<()> {
        rfs::syncfs(&self.dir).with_context(|| format!("cannot sync {}", self.path.display()))
    }

    /// Run at boot before the store is read: when `current` names a generation that a
    /// power cut left incomplete (its manifest missing or empty, or files that should hold
    /// bytes empty or missing: what ext4 shows when the names were committed before the
    /// data), the newest whole generation before it becomes current again, or, with none,
    /// `current` is removed so the seed is applied as on a first boot. Any other mismatch
    /// is not a power cut and is left for the caller to report. Returns what was done.
    pub fn recover(&self) -> Result<Option<String>> {
        let Some(n) = self.current_number()? else {
            return Ok(None);
        };
        let why = match self.read_generation(n) {
            Ok(_) => return Ok(None),
            Err(e) => e,
        };
        if !self.is_incomplete(n) {
            return Ok(None);
        }
        let done = match self.newest_whole_before(n)? {
            Some(g) => {
                self.swap_link(CURRENT, &gen_name(g.number))?;
                self.link_flat_names(&g.tree)?;
                format!("generation {} is current again", g.number)
            }
            None => {
                rfs::unlinkat(&self.dir, CURRENT, AtFlags::empty())
                    .with_context(|| format!("cannot remove {}/{CURRENT}", self.path.display()))?;
                "no earlier generation is whole: the seed is applied as on a first boot".into()
            }
        };
        // `current` has moved: what fails from here leaves a stray directory, which the
        // next write clears, not a machine without its identity.
        let left = remove_tree_at(&self.dir, &gen_name(n))
            .and_then(|()| Ok(rfs::fsync(&self.dir)?))
            .err()
            .map_or_else(String::new, |e| {
                format!(" (removing it or syncing the store failed: {e:#})")
            });
        Ok(Some(format!(
            "{}/{} was left incomplete by a power cut before it reached the disk ({why:#}); {done}{left}",
            self.path.display(),
            gen_name(n)
        )))
    }

    /// Whether generation `n` looks like a write cut short rather than a changed file.
    /// Only a directory that is not there counts, not one that cannot be opened: an I/O
    /// error is not a power cut, and the generation may read whole at the next try.
    fn is_incomplete(&self, n: u64) -> bool {
        let gdir = match open_dir_raw(&self.dir, &gen_name(n)) {
            Ok(fd) => fd,
            Err(e) => return e.kind() == ErrorKind::NotFound,
        };
        let mut tree = IdentityTree::new();
        if read_tree(&gdir, "", &mut tree, "").is_err() {
            return false;
        }
        let manifest = match tree.remove(identity::MANIFEST) {
            None => return true,
            Some(f) if f.bytes.is_empty() => return true,
            Some(f) => match Manifest::parse(&f.bytes, "") {
                Ok(m) => m,
                Err(_) => return false,
            },
        };
        manifest
            .files
            .iter()
            .all(|(file, digest)| match tree.get(file) {
                None => true,
                Some(f) => f.bytes.is_empty() || sha256_hex(&f.bytes) == *digest,
            })
    }

    /// Points `name` at `target` atomically (symlink to a temporary name, then rename).
    fn swap_link(&self, name: &str, target: &str) -> Result<()> {
        let tmp = self.prepare_link(name, target)?;
        rfs::renameat(&self.dir, tmp.as_str(), &self.dir, name)
            .with_context(|| format!("cannot replace {}/{name}", self.path.display()))?;
        Ok(())
    }

    /// A symlink to `target` under a temporary name, ready to be renamed over `name`.
    fn prepare_link(&self, name: &str, target: &str) -> Result<String> {
        let tmp = format!(".tmp-link-{name}");
        match rfs::unlinkat(&self.dir, tmp.as_str(), AtFlags::empty()) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("cannot remove stale {tmp}")),
        }
        rfs::symlinkat(target, &self.dir, tmp.as_str())
            .with_context(|| format!("cannot create link {}/{tmp}", self.path.display()))?;
        Ok(tmp)
    }

    /// Keeps the stable flat names (`/var/identity/hostname`, ...) pointing via `current`.
    fn link_flat_names(&self, tree: &IdentityTree) -> Result<()> {
        for name in flat_names(tree) {
            let target = format!("{CURRENT}/{name}");
            match rfs::readlinkat(&self.dir, name.as_str(), Vec::new()) {
                Ok(t) if t.to_string_lossy() == target => continue,
                Ok(_) => {}
                // A new name is created in place: symlinkat(2) is atomic by itself.
                Err(e) if e.kind() == ErrorKind::NotFound => {
                    match rfs::symlinkat(target.as_str(), &self.dir, name.as_str()) {
                        Ok(()) => continue,
                        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                        Err(e) => {
                            return Err(e).with_context(|| {
                                format!("cannot create link {}/{name}", self.path.display())
                            });
                        }
                    }
                }
                Err(e) if e.raw_os_error() == rustix::io::Errno::INVAL.raw_os_error() => {
                    // A regular file or directory where a link belongs: replaced by the rename
                    // only if it is a file; a directory is refused.
                    let st = rfs::statat(&self.dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)?;
                    if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory {
                        bail!(
                            "{}/{name} is a directory where a link belongs: refusing it",
                            self.path.display()
                        );
                    }
                }
                Err(e) => {
                    return Err(e)
                        .with_context(|| format!("cannot read {}/{name}", self.path.display()));
                }
            }
            self.swap_link(&name, &target)?;
        }
        Ok(())
    }

    /// Keeps the new generation, the one before it (for rollback) and any other named in
    /// `keep`; removes the rest.
    fn prune(&self, keep: &[Option<u64>]) -> Result<()> {
        for entry in list_dir(&self.dir)? {
            let Some(n) = parse_gen(&entry) else {
                continue;
            };
            if !keep.contains(&Some(n)) {
                remove_tree_at(&self.dir, &entry).with_context(|| {
                    format!("cannot remove old {}/{entry}", self.path.display())
                })?;
            }
        }
        Ok(())
    }

    /// Makes an older generation current again (the control channel's `rollback`).
    pub fn rollback(&self) -> Result<u64> {
        let current = self
            .current_number()?
            .context("no identity to roll back from")?;
        let older = list_dir(&self.dir)?
            .iter()
            .filter_map(|e| parse_gen(e))
            .filter(|n| *n < current)
            .max()
            .with_context(|| format!("{}: no older generation is kept", self.path.display()))?;
        let g = self.read_generation(older)?;
        self.swap_link(CURRENT, &gen_name(older))?;
        rfs::fsync(&self.dir).with_context(|| format!("cannot sync {}", self.path.display()))?;
        self.link_flat_names(&g.tree)?;
        Ok(older)
    }
}

fn open_dir_at(dir: &impl AsFd, name: &str) -> Result<OwnedFd> {
    Ok(open_dir_raw(dir, name)?)
}

/// A directory under `dir`, never through a link, with the system's own error.
fn open_dir_raw(dir: &impl AsFd, name: &str) -> rustix::io::Result<OwnedFd> {
    rfs::openat(
        dir,
        name,
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )
}

/// The process umask from `/proc/self/status` (read once; umask(2) cannot be read without
/// setting it, which would race with other threads creating files).
fn umask() -> Option<u32> {
    static UMASK: std::sync::OnceLock<Option<u32>> = std::sync::OnceLock::new();
    *UMASK.get_or_init(|| {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find_map(|l| l.strip_prefix("Umask:"))?;
        u32::from_str_radix(line.trim(), 8).ok()
    })
}

/// Creates `name` with its final mode (nothing is ever more open than it will be), and
/// fchmods only when the umask would have narrowed that mode.
fn write_file_at(dir: &impl AsFd, name: &str, file: &IdentityFile) -> Result<()> {
    let fd = rfs::openat(
        dir,
        name,
        OFlags::WRONLY | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::from_raw_mode(file.mode & 0o777),
    )?;
    let mut f = std::fs::File::from(fd);
    f.write_all(&file.bytes)?;
    if umask().is_none_or(|u| file.mode & u != 0 || file.mode & !0o777 != 0) {
        rfs::fchmod(&f, Mode::from_raw_mode(file.mode))?;
    }
    Ok(())
}

fn list_dir(dir: &impl AsFd) -> Result<Vec<String>> {
    let fd = rfs::openat(
        dir,
        ".",
        OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?;
    let mut out = Vec::new();
    for entry in rfs::Dir::read_from(&fd)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name != "." && name != ".." {
            out.push(name);
        }
    }
    Ok(out)
}

/// Reads a generation directory (one level of subdirectories) without following links.
fn read_tree(dir: &OwnedFd, prefix: &str, tree: &mut IdentityTree, origin: &str) -> Result<()> {
    let listed = list_dir(dir).with_context(|| match prefix.strip_suffix('/') {
        Some(sub) => format!("cannot list {origin}/{sub}"),
        None => format!("cannot list {origin}"),
    })?;
    for name in listed {
        let rel = format!("{prefix}{name}");
        let st = rfs::statat(dir, name.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            .with_context(|| format!("cannot stat {origin}/{rel}"))?;
        match rfs::FileType::from_raw_mode(st.st_mode) {
            rfs::FileType::RegularFile => {
                if st.st_size as u64 > MAX_FILE {
                    bail!(
                        "{origin}/{rel}: {} bytes is too large for an identity file",
                        st.st_size
                    );
                }
                let fd = rfs::openat(
                    dir,
                    name.as_str(),
                    OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC,
                    Mode::empty(),
                )
                .with_context(|| format!("cannot open {origin}/{rel}"))?;
                let mut bytes = Vec::new();
                std::fs::File::from(fd)
                    .take(MAX_FILE)
                    .read_to_end(&mut bytes)
                    .with_context(|| format!("cannot read {origin}/{rel}"))?;
                tree.insert(
                    rel,
                    IdentityFile {
                        mode: st.st_mode & 0o7777,
                        bytes,
                    },
                );
            }
            rfs::FileType::Directory if prefix.is_empty() => {
                let sub = open_dir_at(dir, &name)
                    .with_context(|| format!("cannot open {origin}/{rel}"))?;
                read_tree(&sub, &format!("{rel}/"), tree, origin)?;
            }
            _ => bail!(
                "{origin}/{rel}: unexpected file type (a planted link?): refusing the generation"
            ),
        }
    }
    Ok(())
}

/// Removes a file or directory tree relative to `dir`, never following links.
fn remove_tree_at(dir: &impl AsFd, name: &str) -> Result<()> {
    let st = match rfs::statat(dir, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) => st,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e.into()),
    };
    if rfs::FileType::from_raw_mode(st.st_mode) == rfs::FileType::Directory {
        let sub = open_dir_at(dir, name)?;
        for entry in list_dir(&sub)? {
            remove_tree_at(&sub, &entry)?;
        }
        rfs::unlinkat(dir, name, AtFlags::REMOVEDIR)?;
    } else {
        rfs::unlinkat(dir, name, AtFlags::empty())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn manifest() -> Manifest {
        Manifest {
            generation: 0,
            instance_id: "i-1".into(),
            source: "test".into(),
            product_uuid: None,
            seed_digest: String::new(),
            files: Default::default(),
            seed_generation: None,
        }
    }

    #[test]
    fn a_generation_number_that_cannot_grow_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("identity");
        let store = Store::open(&path, true).unwrap();
        std::os::unix::fs::symlink(gen_name(u64::MAX), path.join(CURRENT)).unwrap();
        let err = store
            .write_generation(&IdentityTree::new(), manifest(), Durability::Deferred)
            .unwrap_err();
        assert!(format!("{err:#}").contains("largest there is"), "{err:#}");
    }

    /// A file the store would refuse to read back is refused before anything is written:
    /// the current generation stays, and nothing of the new one is left.
    #[test]
    fn a_file_too_large_to_read_back_is_refused_before_the_write() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("identity"), true).unwrap();
        let file = |n: usize| IdentityFile {
            mode: 0o644,
            bytes: vec![b'#'; n],
        };
        let small: IdentityTree = [("runcmd".to_string(), file(10))].into();
        store
            .write_generation(&small, manifest(), Durability::Now)
            .unwrap();
        let big: IdentityTree = [("runcmd".to_string(), file(MAX_FILE as usize + 1))].into();
        let err = store
            .write_generation(&big, manifest(), Durability::Now)
            .unwrap_err();
        assert!(
            format!("{err:#}").contains("gen-2/runcmd: 4194305 bytes is more than the 4 MiB"),
            "{err:#}"
        );
        assert_eq!(store.current().unwrap().unwrap().tree, small);
        let mut left = list_dir(&store.dir).unwrap();
        left.retain(|e| e.starts_with(GEN_PREFIX) || e.starts_with(".tmp"));
        assert_eq!(left, ["gen-1"]);
    }

    /// Key changes do not move the /etc binds: the generation they show survives any
    /// number of them, and the next ordinary write prunes it again.
    #[test]
    fn the_bound_generation_survives_the_prune() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("identity"), true).unwrap();
        let tree: IdentityTree = [(
            "hostname".to_string(),
            IdentityFile {
                mode: 0o644,
                bytes: b"web1\n".to_vec(),
            },
        )]
        .into();
        let write = |bound| {
            store
                .write_generation_keeping(&tree, manifest(), Durability::Deferred, bound)
                .unwrap()
        };
        let gens = || {
            let mut g: Vec<u64> = list_dir(&store.dir)
                .unwrap()
                .iter()
                .filter_map(|e| parse_gen(e))
                .collect();
            g.sort();
            g
        };
        assert_eq!(write(None), 1);
        assert_eq!((write(Some(1)), write(Some(1)), write(Some(1))), (2, 3, 4));
        assert_eq!(gens(), [1, 3, 4]);
        assert_eq!(store.read_generation(1).unwrap().tree, tree);
        assert_eq!(write(None), 5);
        assert_eq!(gens(), [4, 5]);

        // After a rollback the next generation gets a number of its own, not the one of
        // the generation rolled back from, which stays until the new one is written.
        assert_eq!(store.rollback().unwrap(), 4);
        assert_eq!(gens(), [4, 5]);
        assert_eq!(write(None), 6);
        assert_eq!(gens(), [4, 6]);
        // And it is gone before `current` moves, so that recovery and rollback, which
        // fall back to the newest whole generation below the new one, find the one that
        // was current: here the move itself fails, and 5 is already gone.
        assert_eq!(store.rollback().unwrap(), 4);
        std::fs::create_dir_all(store.path().join(".tmp-link-current/in-the-way")).unwrap();
        assert!(
            store
                .write_generation(&tree, manifest(), Durability::Deferred)
                .is_err()
        );
        assert_eq!(gens(), [4]);
        assert_eq!(store.current_number().unwrap(), Some(4));
    }
}
