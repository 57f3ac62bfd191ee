//! Where the harness keeps things: the image cache (shared by every run) and the work
//! directory for machines under test (inside the workspace's `target/`).

use std::path::PathBuf;

/// The workspace root (parent of this crate).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// `$NIXSEED_CACHE`, else `$XDG_CACHE_HOME/nixseed`, else `~/.cache/nixseed`.
pub fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("NIXSEED_CACHE") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("nixseed");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".cache/nixseed")
}

/// Per-run state: machine directories, overlays, sockets, serial logs.
pub fn work_root() -> PathBuf {
    if let Some(p) = std::env::var_os("NIXSEED_VM_WORK") {
        return PathBuf::from(p);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target.join("vm-tests")
}
