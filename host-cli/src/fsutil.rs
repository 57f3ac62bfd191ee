//! File writes that never leave a half-written file behind: write a temporary file in the
//! target directory, fsync, set the mode, rename over the target.

use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use anyhow::{Context, Result};

/// Atomically replace `path` with `bytes` and give it `mode`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut tmp = tempfile::Builder::new()
        .prefix(".seedctl-tmp-")
        .tempfile_in(dir)
        .with_context(|| format!("creating a temporary file in {}", dir.display()))?;
    tmp.write_all(bytes)
        .with_context(|| format!("writing {}", path.display()))?;
    tmp.as_file()
        .sync_all()
        .with_context(|| format!("syncing {}", path.display()))?;
    tmp.as_file()
        .set_permissions(fs::Permissions::from_mode(mode))
        .with_context(|| format!("setting mode {mode:o} on {}", path.display()))?;
    // The persist error repeats its cause in its own text: keep the cause only.
    tmp.persist(path)
        .map_err(|e| e.error)
        .with_context(|| format!("renaming into {}", path.display()))?;
    Ok(())
}

/// A directory in `dir` where `verb` (`create`, `upgrade`) makes machine `name`'s disks
/// before they move into place: the owner's only (0700), so a disk qemu-img is still
/// writing (with the umask's mode) is not readable by others. Its name carries the
/// process id, and a run first removes what a run of the same machine that was killed
/// (Ctrl-C during a long `--var-from` copy) left in `dir`.
pub fn staging_dir(dir: &Path, name: &str, verb: &str) -> Result<tempfile::TempDir> {
    remove_stale_staging(dir, name);
    tempfile::Builder::new()
        .prefix(&format!(".{name}.{verb}-{}-", std::process::id()))
        .permissions(fs::Permissions::from_mode(0o700))
        .tempdir_in(dir)
        .with_context(|| format!("creating a staging directory in {}", dir.display()))
}

/// The staging verbs whose leftovers [`remove_stale_staging`] removes.
const STAGING_VERBS: [&str; 2] = ["create", "upgrade"];

/// Removes the staging directories of machine `name` in `dir` whose process is gone,
/// saying so; one whose process still runs (another `create` of the same name) stays.
fn remove_stale_staging(dir: &Path, name: &str) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(rest) = file
            .to_str()
            .and_then(|f| f.strip_prefix('.'))
            .and_then(|f| f.strip_prefix(name))
            .and_then(|f| f.strip_prefix('.'))
        else {
            continue;
        };
        let pid = STAGING_VERBS.iter().find_map(|verb| {
            let (pid, _) = rest
                .strip_prefix(verb)?
                .strip_prefix('-')?
                .split_once('-')?;
            pid.parse::<u32>().ok()
        });
        let Some(pid) = pid else { continue };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        match fs::remove_dir_all(entry.path()) {
            Ok(()) => eprintln!(
                "seedctl: removed {}, left by an interrupted run",
                entry.path().display()
            ),
            Err(e) => eprintln!(
                "seedctl: warning: cannot remove {}, left by an interrupted run: {e}",
                entry.path().display()
            ),
        }
    }
}

/// Writes a file the operator named (`-o FILE`) as [`write_atomic`] does, without
/// replacing what is not a regular file there: a symlink is followed and its target
/// replaced, and a device, FIFO, socket or directory is refused. A disk image is refused
/// too (see [`refuse_disk`]): a slip of `-o` must not cost a machine its disk. An existing
/// file is replaced only when it is empty or already an output of the same `kind`: a raw
/// disk, a state file or an identity file has no magic to know it by, but it is not a
/// seed volume or a domain XML.
pub fn write_output(path: &Path, bytes: &[u8], mode: u32, kind: Output) -> Result<()> {
    let target = match fs::symlink_metadata(path) {
        // A link to a file not made yet is followed too, as a shell's `>` would.
        Ok(m) if m.file_type().is_symlink() => match fs::canonicalize(path) {
            Ok(t) => t,
            Err(_) => {
                let to = fs::read_link(path)
                    .with_context(|| format!("reading the link {}", path.display()))?;
                path.parent().unwrap_or(Path::new(".")).join(to)
            }
        },
        Ok(_) | Err(_) => path.to_path_buf(),
    };
    match fs::metadata(&target) {
        Ok(m) if !m.is_file() => anyhow::bail!(
            "{} is not a regular file; seedctl writes its output only as a regular file, which it replaces whole",
            target.display()
        ),
        // A machine's own seed is replaced unread: while libvirt runs the domain it owns
        // the file (`dynamic_ownership`), and an operator in the libvirt group could not
        // open it to look, though replacing it in its directory works.
        Ok(_) if kind == Output::MachineSeed => {
            refuse_machine_disk_name(&target)?;
            write_atomic(&target, bytes, mode)
        }
        Ok(_) => {
            refuse_disk(&target)?;
            refuse_other_kind(&target, kind)?;
            write_atomic(&target, bytes, mode)
        }
        Err(_) => {
            refuse_machine_disk_name(&target)?;
            write_atomic(&target, bytes, mode)
        }
    }
}

/// What a command writes with `-o`, and so what it may replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// A seed volume: ISO 9660 or FAT labelled `cidata` or `config-2`.
    Seed,
    /// The seed in a machine's state directory, which seedctl alone writes: replaced
    /// whatever it holds.
    MachineSeed,
    /// A libvirt domain XML.
    DomainXml,
}

/// Refuses an existing, non-empty `file` that is not an output of `kind`.
fn refuse_other_kind(file: &Path, kind: Output) -> Result<()> {
    use nixseed_core::label;
    use std::io::Read;
    if kind == Output::MachineSeed {
        return Ok(());
    }
    let mut head = Vec::new();
    fs::File::open(file)
        .and_then(|f| f.take(label::PROBE_LEN as u64).read_to_end(&mut head))
        .with_context(|| format!("reading {} before it is replaced", file.display()))?;
    if head.is_empty() {
        return Ok(());
    }
    let (same, what) = match kind {
        Output::Seed | Output::MachineSeed => (
            label::probe(&head).is_some_and(|(_, l)| {
                label::is_nocloud_label(&l) || label::is_configdrive_label(&l)
            }),
            "a seed volume (ISO 9660 or FAT labelled cidata or config-2)",
        ),
        Output::DomainXml => (
            String::from_utf8_lossy(&head)
                .trim_start_matches('\u{feff}')
                .trim_start()
                .starts_with("<domain"),
            "a libvirt domain XML",
        ),
    };
    if !same {
        anyhow::bail!(
            "{} exists and is not {what}; seedctl replaces only an empty file or its own kind of output: name another file, or remove this one first if it is really not needed",
            file.display()
        );
    }
    Ok(())
}

/// The first bytes of every qcow2 image.
const QCOW2_MAGIC: &[u8; 4] = b"QFI\xfb";

const KEEP_DISK: &str = "seedctl does not write its output over a disk; name another file, or remove this one first if it is really not needed";

/// Refuses an existing `file` that is a disk: any qcow2 image (by its magic), and
/// [`refuse_machine_disk_name`].
fn refuse_disk(file: &Path) -> Result<()> {
    use std::io::Read;
    let mut head = Vec::with_capacity(QCOW2_MAGIC.len());
    fs::File::open(file)
        .and_then(|f| f.take(QCOW2_MAGIC.len() as u64).read_to_end(&mut head))
        .with_context(|| {
            format!(
                "reading {} to tell whether it is a disk image before it is replaced; remove it first or name another file",
                file.display()
            )
        })?;
    if head == QCOW2_MAGIC {
        anyhow::bail!(
            "{} is a qcow2 disk image (it starts with the qcow2 magic); {KEEP_DISK}",
            file.display()
        );
    }
    refuse_machine_disk_name(file)
}

/// Refuses the name of a machine's own disk or UEFI variables (`boot.qcow2`, `var.qcow2`,
/// `OVMF_VARS.fd` in a directory that holds a `state.json`, which every machine's state
/// directory does), whether the file is there yet or not: the machine's next start takes
/// whatever is found under that name.
fn refuse_machine_disk_name(file: &Path) -> Result<()> {
    use crate::state::{BOOT_DISK, OVMF_VARS, STATE_FILE, VAR_DISK};
    let dir = file
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if let Some(name) = file.file_name().and_then(|n| n.to_str())
        && [BOOT_DISK, VAR_DISK, OVMF_VARS].contains(&name)
        && dir.join(STATE_FILE).exists()
    {
        let machine = fs::canonicalize(dir)
            .ok()
            .and_then(|d| d.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_default();
        anyhow::bail!(
            "{} is a disk of machine `{machine}` ({name} in its state directory {}); {KEEP_DISK}",
            file.display(),
            dir.display()
        );
    }
    Ok(())
}

/// Read a text file, naming it in the error.
pub fn read_text(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Sync a directory so that renames inside it survive a crash.
pub fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|f| f.sync_all())
        .with_context(|| format!("syncing directory {}", dir.display()))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_staging_directory_is_the_owner_s_only_whatever_the_umask() {
        let dir = tempfile::tempdir().unwrap();
        let staging = staging_dir(dir.path(), "web1", "create").unwrap();
        let mode = fs::metadata(staging.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o700, "staging directory is {mode:o}");
        let name = staging
            .path()
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        assert!(
            name.starts_with(&format!(".web1.create-{}-", std::process::id())),
            "{name}"
        );
    }
}
