//! Filesystem freeze and thaw (FIFREEZE/FITHAW) for consistent host snapshots, plus
//! FITRIM for guest-fstrim. The only module with ioctls: each call is one nix ioctl
//! wrapper on a directory fd we opened and still own.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use nix::errno::Errno;
use nixseed_core::qga::sysparse::{Mount, mountinfo};
use nixseed_core::qga::{Args, QgaError};
use serde_json::Value;

use super::registry::BoxFuture;
use super::{Agent, CmdResult, errno_text};
use crate::identity_lock::IdentityLock;

/// The three ioctls, each wrapped once; the only unsafe code in the agent.
#[allow(unsafe_code)]
mod ioctl {
    use std::os::fd::AsRawFd;

    use nix::errno::Errno;

    nix::ioctl_readwrite!(fifreeze, b'X', 119, nix::libc::c_int);
    nix::ioctl_readwrite!(fithaw, b'X', 120, nix::libc::c_int);
    nix::ioctl_readwrite!(fitrim_raw, b'X', 121, FstrimRange);

    #[repr(C)]
    pub struct FstrimRange {
        pub start: u64,
        pub len: u64,
        pub minlen: u64,
    }

    pub fn freeze_fd(f: &std::fs::File) -> Result<(), Errno> {
        let mut arg: nix::libc::c_int = 0;
        // SAFETY: `f` is an open fd we own for the duration of the call; the kernel
        // ignores the int argument of FIFREEZE and we pass a valid pointer anyway.
        unsafe { fifreeze(f.as_raw_fd(), &mut arg) }.map(|_| ())
    }

    pub fn thaw_fd(f: &std::fs::File) -> Result<(), Errno> {
        let mut arg: nix::libc::c_int = 0;
        // SAFETY: as for freeze_fd; FITHAW ignores its argument.
        unsafe { fithaw(f.as_raw_fd(), &mut arg) }.map(|_| ())
    }

    /// FITRIM over the whole filesystem of `f`; returns bytes trimmed and the minimum
    /// extent the filesystem used (btrfs raises it to the device's discard granularity).
    pub fn fitrim_fd(f: &std::fs::File, minimum: u64) -> Result<(u64, u64), Errno> {
        let mut range = FstrimRange {
            start: 0,
            len: u64::MAX,
            minlen: minimum,
        };
        // SAFETY: `range` is a live, correctly laid out fstrim_range the kernel fills in.
        unsafe { fitrim_raw(f.as_raw_fd(), &mut range) }?;
        Ok((range.len, range.minlen))
    }
}

use ioctl::{freeze_fd, thaw_fd};

/// Opens a mountpoint for an ioctl. Non-blocking and without a controlling terminal: the
/// mountpoint of a bind-mounted file can be a named pipe or a terminal.
fn open_mountpoint(path: &Path) -> Result<std::fs::File, Errno> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(0)))
}

/// Discards unused blocks of the filesystem mounted at `path`; returns bytes trimmed and
/// the minimum extent the kernel used, which qemu-ga reports as `minimum`, or the text
/// qemu-ga gives for the path's `error`.
pub fn fitrim(path: &Path, minimum: u64) -> Result<(u64, u64), String> {
    let f = open_mountpoint(path).map_err(|e| trim_error(TrimStep::Open, e))?;
    ioctl::fitrim_fd(&f, minimum).map_err(|e| trim_error(TrimStep::Trim, e))
}

/// Where guest-fstrim failed for one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TrimStep {
    Open,
    Trim,
}

/// qemu-ga's per-path texts: a filesystem without FITRIM (ENOTTY, as on a CD-ROM, or
/// EOPNOTSUPP) is `trim not supported`; other failures name the step and the errno.
fn trim_error(step: TrimStep, e: Errno) -> String {
    match (step, e) {
        (TrimStep::Open, e) => format!("failed to open: {}", errno_text(e)),
        (TrimStep::Trim, Errno::ENOTTY | Errno::EOPNOTSUPP) => "trim not supported".into(),
        (TrimStep::Trim, e) => format!("failed to trim: {}", errno_text(e)),
    }
}

pub fn marker(state_dir: &Path) -> PathBuf {
    state_dir.join("qga.state.isfrozen")
}

/// Every mount of a block device, in mount order: as qemu-ga lists them, one entry per
/// mount, so a bind mount or a second btrfs subvolume of a device is an entry of its own.
pub fn block_mounts() -> Vec<Mount> {
    // Bytes: a mount point that is not UTF-8 must not hide every mount.
    let text = std::fs::read("/proc/self/mountinfo").unwrap_or_default();
    mountinfo(&text)
        .into_iter()
        .filter_map(on_block_device)
        .collect()
}

/// The mount with its block device's numbers, or None for a mount with no block device
/// (proc, tmpfs, overlay, ...). btrfs gives an anonymous device (major 0) in mountinfo
/// for every mount; its block device is the mount's source, as qemu-ga reads it, so a
/// btrfs root is listed, trimmed and frozen too.
fn on_block_device(mut m: Mount) -> Option<Mount> {
    if m.major != 0 {
        return Some(m);
    }
    if m.fstype != "btrfs" {
        return None;
    }
    let st = nix::sys::stat::stat(m.source.as_str()).ok()?;
    let kind =
        nix::sys::stat::SFlag::from_bits_truncate(st.st_mode) & nix::sys::stat::SFlag::S_IFMT;
    if kind != nix::sys::stat::SFlag::S_IFBLK {
        return None;
    }
    m.major = u32::try_from(nix::sys::stat::major(st.st_rdev)).ok()?;
    m.minor = u32::try_from(nix::sys::stat::minor(st.st_rdev)).ok()?;
    Some(m)
}

fn run_hook(agent: &Agent, arg: &str) -> Result<(), QgaError> {
    let Some(hook) = &agent.config.fsfreeze_hook else {
        return Ok(());
    };
    if let Err(e) = nix::unistd::access(hook, nix::unistd::AccessFlags::X_OK) {
        return Err(QgaError::generic(format!(
            "can't access fsfreeze hook '{}': {}",
            hook.display(),
            errno_text(e)
        )));
    }
    let status = std::process::Command::new(hook)
        .arg(arg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| {
            QgaError::generic(format!(
                "cannot run fsfreeze hook '{}': {e}",
                hook.display()
            ))
        })?;
    match status.code() {
        Some(0) => Ok(()),
        Some(n) => Err(QgaError::generic(format!(
            "fsfreeze hook has failed with status {n}"
        ))),
        None => Err(QgaError::generic("fsfreeze hook has terminated abnormally")),
    }
}

/// Whether this process holds filesystems frozen. Whatever could write to them waits
/// for the thaw, and in a single-threaded agent that wait would keep the thaw itself from
/// being answered: logging is off (a journald stalled on a frozen `/var` would block the
/// agent's next log line), as qemu-ga turns its log off. The control channel refuses
/// pushes meanwhile: run by `nixseed-agent request`, a push would not block this
/// process, but it would stall until the thaw and its host with it.
static FROZEN: AtomicBool = AtomicBool::new(false);
/// Log events dropped while frozen, counted for the thaw's log line.
static DROPPED: AtomicU64 = AtomicU64::new(0);

pub fn frozen() -> bool {
    FROZEN.load(Ordering::Relaxed)
}

/// The logging filter's question: false while frozen, counting what it drops.
pub fn logging_allowed(meta: &tracing::Metadata<'_>) -> bool {
    if !frozen() {
        return true;
    }
    if meta.is_event() {
        DROPPED.fetch_add(1, Ordering::Relaxed);
    }
    false
}

pub(super) fn note_frozen(frozen: bool) {
    if frozen {
        tracing::info!("filesystems frozen: logging is off until the thaw");
    }
    FROZEN.store(frozen, Ordering::Relaxed);
    if !frozen {
        let dropped = DROPPED.swap(0, Ordering::Relaxed);
        if dropped > 0 {
            tracing::info!("logging is on again; {dropped} message(s) dropped while frozen");
        }
    }
}

fn set_frozen(agent: &mut Agent, frozen: bool) {
    if agent.frozen != frozen {
        note_frozen(frozen);
    }
    agent.frozen = frozen;
    if !frozen {
        agent.freeze_lock = None;
    }
    let m = marker(&agent.config.state_dir);
    let r = if frozen {
        std::fs::write(&m, b"").map(|_| ())
    } else {
        std::fs::remove_file(&m).or_else(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Ok(())
            } else {
                Err(e)
            }
        })
    };
    if let Err(e) = r {
        tracing::warn!(
            "{}: {e}; a restart may not know the freeze state",
            m.display()
        );
    }
}

pub fn status(agent: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    Ok(Some(Value::from(if agent.frozen {
        "frozen"
    } else {
        "thawed"
    })))
}

pub fn freeze(agent: &mut Agent, args: Args) -> BoxFuture<'_> {
    Box::pin(async move {
        args.finish()?;
        let held = after_identity_change().await?;
        freeze_holding(agent, None, held)
    })
}

pub fn freeze_list(agent: &mut Agent, mut args: Args) -> BoxFuture<'_> {
    Box::pin(async move {
        let list = args.opt_str_list("mountpoints")?;
        args.finish()?;
        let held = after_identity_change().await?;
        freeze_holding(agent, list, held)
    })
}

/// Freezes, and keeps the identity lock until the thaw: a push or rollback that was
/// about to take it then waits, and is refused after a while, instead of starting a
/// write to a frozen `/var` that would stall it mid-way with the lock held.
fn freeze_holding(
    agent: &mut Agent,
    only: Option<Vec<String>>,
    held: Option<IdentityLock>,
) -> CmdResult {
    let r = do_freeze(agent, only);
    if agent.frozen {
        agent.freeze_lock = held;
    }
    r
}

/// How long a freeze waits for a change of the identity in progress.
const IDENTITY_CHANGE_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A push or rollback changing the identity (in `nixseed-agent request`, while this
/// process goes on answering) is let finish first: frozen in its middle, the snapshot
/// would hold half of it and the push would stall until the thaw. The lock is returned
/// held, for the freeze to keep until the thaw; once frozen, new pushes are refused.
/// A lock that cannot be opened holds nothing up.
async fn after_identity_change() -> Result<Option<IdentityLock>, QgaError> {
    let began = std::time::Instant::now();
    loop {
        match IdentityLock::try_take(Path::new("/run")) {
            Ok(Some(held)) => return Ok(Some(held)),
            Err(_) => return Ok(None),
            Ok(None) if began.elapsed() >= IDENTITY_CHANGE_WAIT => {
                return Err(QgaError::generic(format!(
                    "not frozen: a control-channel push or rollback has been changing the identity for {} s; try again when it is done",
                    IDENTITY_CHANGE_WAIT.as_secs()
                )));
            }
            Ok(None) => tokio::time::sleep(std::time::Duration::from_millis(20)).await,
        }
    }
}

fn do_freeze(agent: &mut Agent, only: Option<Vec<String>>) -> CmdResult {
    run_hook(agent, "freeze")?;
    set_frozen(agent, true);
    let mounts: Vec<Mount> = block_mounts()
        .into_iter()
        .filter(|m| only.as_ref().is_none_or(|l| l.contains(&m.mountpoint)))
        .collect();
    let mut frozen = 0i64;
    // Submounts first: freezing a parent first could block reaching its children.
    for m in mounts.iter().rev() {
        let f = match open_mountpoint(&m.path) {
            Ok(f) => f,
            Err(e) => {
                let err = QgaError::generic(format!(
                    "failed to open {}: {}",
                    m.mountpoint,
                    errno_text(e)
                ));
                thaw_all(agent).ok();
                return Err(err);
            }
        };
        match freeze_fd(&f) {
            Ok(()) => frozen += 1,
            // Not counted, as in qemu-ga: a filesystem that cannot be frozen
            // (EOPNOTSUPP), and one frozen already (EBUSY): a second mount of a device
            // frozen through its first, or one frozen by someone else (`fsfreeze -f`).
            Err(Errno::EOPNOTSUPP | Errno::EBUSY) => {}
            Err(e) => {
                let err = QgaError::generic(format!(
                    "failed to freeze {}: {}",
                    m.mountpoint,
                    errno_text(e)
                ));
                thaw_all(agent).ok();
                return Err(err);
            }
        }
    }
    if frozen == 0 {
        set_frozen(agent, false);
    }
    tracing::info!("froze {frozen} filesystem(s)");
    Ok(Some(Value::from(frozen)))
}

pub fn thaw(agent: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    thaw_all(agent).map(|n| Some(Value::from(n)))
}

/// FITHAW every block-device mount until it refuses (a filesystem may be frozen more
/// than once); returns how many were thawed. A second mount of a device finds it thawed
/// already and is not counted.
pub fn thaw_all(agent: &mut Agent) -> Result<i64, QgaError> {
    let mut thawed = 0i64;
    for m in block_mounts() {
        let Ok(f) = open_mountpoint(&m.path) else {
            continue;
        };
        let mut once = false;
        while thaw_fd(&f).is_ok() {
            once = true;
        }
        if once {
            thawed += 1;
        }
    }
    set_frozen(agent, false);
    run_hook(agent, "thaw")?;
    tracing::info!("thawed {thawed} filesystem(s)");
    Ok(thawed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// qemu-ga 7.2's texts (`strings /usr/sbin/qemu-ga`): clients match on them.
    #[test]
    fn trim_errors_read_as_qemu_ga() {
        assert_eq!(
            trim_error(TrimStep::Open, Errno::ENOENT),
            "failed to open: No such file or directory"
        );
        assert_eq!(
            trim_error(TrimStep::Trim, Errno::ENOTTY),
            "trim not supported"
        );
        assert_eq!(
            trim_error(TrimStep::Trim, Errno::EOPNOTSUPP),
            "trim not supported"
        );
        assert_eq!(
            trim_error(TrimStep::Trim, Errno::EIO),
            "failed to trim: Input/output error"
        );
    }
}
