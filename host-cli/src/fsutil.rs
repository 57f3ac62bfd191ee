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

/// Writes a file the operator named (`-o FILE`) as [`write_atomic`] does, without
/// replacing what is not a regular file there: a symlink is followed and its target
/// replaced, and a device, FIFO, socket or directory is refused. A disk image is refused
/// too (see [`refuse_disk`]): a slip of `-o` must not cost a machine its disk.
pub fn write_output(path: &Path, bytes: &[u8], mode: u32) -> Result<()> {
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
        Ok(_) => {
            refuse_disk(&target)?;
            write_atomic(&target, bytes, mode)
        }
        Err(_) => {
            refuse_machine_disk_name(&target)?;
            write_atomic(&target, bytes, mode)
        }
    }
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
