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
/// replaced, and a device, FIFO, socket or directory is refused.
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
        _ => write_atomic(&target, bytes, mode),
    }
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
