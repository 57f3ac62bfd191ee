//! One change of the identity at a time, across processes. A control-channel push or
//! rollback (`nixseed-agent request`, or `nixseed-agent channel`) and the guest agent's
//! commands that write the identity store or bind `/etc/shadow` read what is current and
//! write the next generation from it: two at once would lose one of them. Stage 2
//! (`nixseed-agent apply`) may write a generation and binds the current one: run again
//! during a push, it could bind what the push is replacing. The guest agent's freeze
//! waits for a change in progress, so that a backup does not hold half of one. The lock
//! is `flock` on `RUN/nixseed/identity.lock`, let go when its holder ends.

use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rustix::fs::{FlockOperation, flock};

/// A held lock; dropping it lets go.
pub struct IdentityLock {
    _held: File,
}

/// The lock file under the run directory `run` (`/run` in a booted guest).
pub fn path(run: &Path) -> PathBuf {
    run.join("nixseed/identity.lock")
}

fn open(run: &Path) -> Result<File> {
    let p = path(run);
    if let Some(dir) = p.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    // Root's alone: `flock` needs only an open descriptor, so a lock file others could
    // open would let any account hold every change of the identity up.
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&p)
        .with_context(|| format!("cannot open the identity lock {}", p.display()))?;
    rustix::fs::fchmod(&f, rustix::fs::Mode::from_raw_mode(0o600))
        .with_context(|| format!("cannot make {} root's alone", p.display()))?;
    Ok(f)
}

impl IdentityLock {
    /// The lock once no change of the identity is in progress, waiting at most `wait`
    /// for one to end; `None` if it did not.
    pub fn take_within(run: &Path, wait: std::time::Duration) -> Result<Option<IdentityLock>> {
        let until = std::time::Instant::now() + wait;
        let f = open(run)?;
        while !locked_now(&f, run)? {
            if std::time::Instant::now() >= until {
                return Ok(None);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        Ok(Some(IdentityLock { _held: f }))
    }

    /// The lock if no change of the identity is in progress, `None` if one is.
    pub fn try_take(run: &Path) -> Result<Option<IdentityLock>> {
        let f = open(run)?;
        Ok(locked_now(&f, run)?.then_some(IdentityLock { _held: f }))
    }
}

/// Takes the lock on `f` if no other holder has it; `false` if one has.
fn locked_now(f: &File, run: &Path) -> Result<bool> {
    match flock(f, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
        Err(e) => Err(e).with_context(|| format!("cannot lock {}", path(run).display())),
    }
}

/// The guest agent's side: the lock, or the error a command that would change the
/// identity answers with while a push or rollback is changing it (the guest agent must
/// not wait: the change may itself wait for the guest agent's thaw).
pub fn for_guest_agent_command() -> std::result::Result<IdentityLock, String> {
    match IdentityLock::try_take(Path::new("/run")) {
        Ok(Some(lock)) => Ok(lock),
        Ok(None) => Err(
            "the identity is being changed (a control-channel push or rollback, or nixseed-apply); try again when it is done"
                .to_owned(),
        ),
        Err(e) => Err(format!("{e:#}")),
    }
}
