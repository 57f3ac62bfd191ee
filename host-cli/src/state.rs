//! Host-side runtime state of one machine under `.seedctl/<name>/`: its disks, seed,
//! QEMU sockets and a small `state.json` recording the base image and SSH port forward.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::{Deserialize, Serialize};

use crate::fsutil::write_atomic;
use crate::machine::Paths;

pub const BOOT_DISK: &str = "boot.qcow2";
pub const VAR_DISK: &str = "var.qcow2";
pub const SEED_ISO: &str = "seed.iso";
pub const STATE_FILE: &str = "state.json";
pub const PIDFILE: &str = "qemu.pid";
pub const CONSOLE_LOG: &str = "console.log";
pub const QGA_SOCK: &str = "qga.sock";
pub const CHANNEL_SOCK: &str = "channel.sock";
pub const QMP_SOCK: &str = "qmp.sock";
pub const KNOWN_HOSTS: &str = "known_hosts";
pub const OVMF_VARS: &str = "OVMF_VARS.fd";
/// Default base image recorded by `seedctl build`, in the state root.
pub const DEFAULT_BASE: &str = "default-base";
/// `seedctl build`'s garbage-collector roots, one `result-<unix time>` link per build.
pub const BASE_ROOTS: &str = "bases";

/// What `state.json` records.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MachineState {
    /// Absolute path of the base image the boot overlay is backed by.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<PathBuf>,
    /// Host port forwarded to the guest's port 22 by `seedctl run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ssh_port: Option<u16>,
    /// instance-id of the seed last written for this machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance_id: Option<String>,
}

/// See [`StateDir::lock`].
pub struct MachineLock {
    _hold: nix::fcntl::Flock<std::fs::File>,
}

/// The libvirt definition `seedctl define` gave libvirt, kept while the domain is defined.
pub const DOMAIN_XML: &str = "domain.xml";
/// The libvirt URI `define` gave the domain to, beside its `domain.xml`.
pub const DOMAIN_URI: &str = "domain.uri";

/// The file [`StateDir::lock`] locks.
pub const LOCK_FILE: &str = "lock";

/// The state directory of one machine.
#[derive(Debug, Clone)]
pub struct StateDir {
    pub name: String,
    pub dir: PathBuf,
}

impl StateDir {
    pub fn new(paths: &Paths, name: &str) -> StateDir {
        StateDir {
            name: name.to_owned(),
            dir: paths.state_dir(name),
        }
    }

    pub fn file(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }

    /// The unix sockets QEMU or libvirt makes here must fit a socket address (107 bytes
    /// and the terminating NUL): checked before a VM starts, with the way out named, not
    /// left to QEMU or to a client that can never connect.
    /// [`StateDir::check_socket_paths`] for every socket `run` and libvirt put there.
    pub fn check_all_socket_paths(&self) -> Result<()> {
        self.check_socket_paths(&[
            QGA_SOCK,
            CHANNEL_SOCK,
            QMP_SOCK,
            &format!("libvirt-{QGA_SOCK}"),
            &format!("libvirt-{CHANNEL_SOCK}"),
        ])
    }

    pub fn check_socket_paths(&self, socks: &[&str]) -> Result<()> {
        const MAX: usize = 107;
        for sock in socks {
            let p = std::path::absolute(self.file(sock)).unwrap_or_else(|_| self.file(sock));
            let len = p.as_os_str().len();
            if len > MAX {
                bail!(
                    "machine `{}`: the socket {} would be {len} bytes long, more than the {MAX} a unix socket address holds; use a shorter state directory (--state or SEEDCTL_STATE) or machine name",
                    self.name,
                    p.display()
                );
            }
        }
        Ok(())
    }

    pub fn load(&self) -> Result<MachineState> {
        let path = self.file(STATE_FILE);
        match std::fs::read(&path) {
            Ok(b) => serde_json::from_slice(&b).with_context(|| {
                format!(
                    "machine `{}`: {} is not valid state JSON; fix or delete it",
                    self.name,
                    path.display()
                )
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(MachineState::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn save(&self, st: &MachineState) -> Result<()> {
        create_private_dir(&self.dir)?;
        let bytes = serde_json::to_vec_pretty(st).context("encoding state.json")?;
        write_atomic(&self.file(STATE_FILE), &bytes, 0o644)
    }

    /// An exclusive hold on the machine while a command changes or boots its disks
    /// (`upgrade`; `run` and `start` until the VM is started): without it, a `run`
    /// started during an `upgrade` could boot the overlay the upgrade then replaces, or
    /// record the base the upgrade has just changed. A hold taken by another command is
    /// waited for up to 30 s, then named as the reason. Released when dropped.
    pub fn lock(&self, what: &str) -> Result<MachineLock> {
        use nix::fcntl::{Flock, FlockArg};
        let path = self.file(LOCK_FILE);
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .with_context(|| format!("machine `{}`: cannot open {}", self.name, path.display()))?;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
                Ok(hold) => return Ok(MachineLock { _hold: hold }),
                Err((back, nix::errno::Errno::EWOULDBLOCK))
                    if std::time::Instant::now() < deadline =>
                {
                    file = back;
                    std::thread::sleep(std::time::Duration::from_millis(200));
                }
                Err((_, e)) => bail!(
                    "machine `{}`: cannot {what}: another seedctl command is changing or starting this machine ({} is locked: {e}); try again when it has finished",
                    self.name,
                    path.display()
                ),
            }
        }
    }

    /// A disk that is a symlink to nothing (a volume not mounted yet, say) is an error
    /// naming the link and where it points: it is not a missing disk, and nothing may be
    /// made in its place.
    pub fn no_dangling_disk_link(&self) -> Result<()> {
        for disk in [BOOT_DISK, VAR_DISK] {
            let path = self.file(disk);
            if let Ok(to) = std::fs::read_link(&path)
                && !path.exists()
            {
                anyhow::bail!(
                    "machine `{}`: {} is a link to {}, which is not there (a volume not mounted?); mount it, or remove the link",
                    self.name,
                    path.display(),
                    to.display()
                );
            }
        }
        Ok(())
    }

    /// Both disks are there; a missing one is named with the command that makes it
    /// (`upgrade` when only the boot overlay is gone, so that `/var` is kept).
    pub fn ensure_disks(&self) -> Result<()> {
        self.no_dangling_disk_link()?;
        let (boot, var) = (self.file(BOOT_DISK).exists(), self.file(VAR_DISK).exists());
        let fix = match (boot, var) {
            (true, true) => return Ok(()),
            (false, true) => format!(
                "`seedctl upgrade {} --base IMAGE` makes a new boot overlay and keeps {VAR_DISK}",
                self.name
            ),
            (true, false) => format!(
                "its data disk is gone; remove {} and run `seedctl create {} --base IMAGE` to start over",
                self.file(BOOT_DISK).display(),
                self.name
            ),
            (false, false) => format!("run `seedctl create {} --base IMAGE` first", self.name),
        };
        let missing: Vec<&str> = [(BOOT_DISK, boot), (VAR_DISK, var)]
            .into_iter()
            .filter(|(_, there)| !there)
            .map(|(f, _)| f)
            .collect();
        anyhow::bail!(
            "machine `{}` has no {} in {}; {fix}",
            self.name,
            missing.join(" or "),
            self.dir.display()
        )
    }

    /// PID of the `seedctl run` QEMU when it is alive. A pidfile left behind by a QEMU that
    /// was killed names whatever process gets that number later, so the process counts
    /// only when it is the one that wrote this very file (see `writes_pidfile`).
    pub fn running_pid(&self) -> Option<i32> {
        let pidfile = self.file(PIDFILE);
        let text = std::fs::read_to_string(&pidfile).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        (pid_alive(pid) && writes_pidfile(pid, &pidfile)).then_some(pid)
    }
}

/// Whether a process exists (signal 0), without unsafe code.
pub fn pid_alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| {
                !s.rsplit(')')
                    .next()
                    .unwrap_or("")
                    .trim_start()
                    .starts_with('Z')
            })
            .unwrap_or(false)
}

/// Whether process `pid` is the one that wrote `pidfile`: it holds the file open (QEMU
/// keeps its pidfile open and locked while it runs), or it has `-pidfile FILE` in its
/// arguments with FILE this file (a relative FILE taken from the process's working
/// directory). Files are compared by device and inode, not by name.
fn writes_pidfile(pid: i32, pidfile: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(want) = std::fs::metadata(pidfile).map(|m| (m.dev(), m.ino())) else {
        return false;
    };
    let is_it = |p: &Path| std::fs::metadata(p).is_ok_and(|m| (m.dev(), m.ino()) == want);
    let holds_open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .is_ok_and(|fds| fds.flatten().any(|fd| is_it(&fd.path())));
    holds_open || pidfile_argument(pid).is_some_and(|p| is_it(&p))
}

/// The `-pidfile` argument of process `pid`, made absolute with its working directory.
fn pidfile_argument(pid: i32) -> Option<PathBuf> {
    use std::os::unix::ffi::OsStrExt;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let arg = cmdline
        .split(|b| *b == 0)
        .skip_while(|a| *a != b"-pidfile")
        .nth(1)?;
    let named = Path::new(std::ffi::OsStr::from_bytes(arg));
    if named.is_absolute() {
        return Some(named.to_owned());
    }
    Some(
        std::fs::read_link(format!("/proc/{pid}/cwd"))
            .ok()?
            .join(named),
    )
}

/// A machine's state directory: made with its parents if missing, and set to 0711 (its
/// files, which hold the host key, are reached by path only, not listed, by others).
pub fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o711))
        .with_context(|| format!("setting the mode of {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command};

    /// A `sleep` under `sh` whose arguments carry `-pidfile FILE`, started in `cwd`.
    fn sleeper(cwd: &Path, pidfile_arg: Option<&str>) -> Child {
        let mut c = Command::new("sh");
        // A second command keeps sh from replacing itself with sleep.
        c.args(["-c", "sleep 30; exit 0", "sh"]).current_dir(cwd);
        if let Some(f) = pidfile_arg {
            c.args(["-pidfile", f]);
        }
        let child = c.spawn().expect("spawning sh");
        // Until sh has started, the child's arguments are still this test's.
        let cmdline = format!("/proc/{}/cmdline", child.id());
        for _ in 0..200 {
            if std::fs::read(&cmdline).is_ok_and(|c| c.starts_with(b"sh\0")) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        child
    }

    fn state_with_pid(dir: &Path, pid: u32) -> StateDir {
        std::fs::write(dir.join(PIDFILE), format!("{pid}\n")).expect("writing the pidfile");
        StateDir {
            name: "web1".into(),
            dir: dir.to_owned(),
        }
    }

    #[test]
    fn a_live_process_that_did_not_write_the_pidfile_is_not_the_machine() {
        let dir = tempfile::tempdir().expect("tempdir");
        let other = tempfile::tempdir().expect("tempdir");
        let mut unrelated = sleeper(dir.path(), None);
        let mut elsewhere = sleeper(
            dir.path(),
            Some(&other.path().join(PIDFILE).display().to_string()),
        );
        std::fs::write(other.path().join(PIDFILE), "1\n").expect("writing");
        for child in [&unrelated, &elsewhere] {
            let sd = state_with_pid(dir.path(), child.id());
            assert_eq!(
                sd.running_pid(),
                None,
                "pid {} is not this machine's QEMU",
                child.id()
            );
        }
        for child in [&mut unrelated, &mut elsewhere] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    #[test]
    fn a_process_holding_the_pidfile_open_is_running_whatever_its_arguments() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(PIDFILE), "").expect("writing");
        // As QEMU does: the pidfile stays open (and locked) while it runs.
        let mut qemu = Command::new("sh")
            .args(["-c", "exec 3>>qemu.pid; sleep 30; exit 0"])
            .current_dir(dir.path())
            .spawn()
            .expect("spawning sh");
        let sd = state_with_pid(dir.path(), qemu.id());
        let mut seen = None;
        for _ in 0..200 {
            seen = sd.running_pid();
            if seen.is_some() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(seen, Some(qemu.id() as i32));
        let _ = qemu.kill();
        let _ = qemu.wait();
        assert_eq!(sd.running_pid(), None, "after the process exited");
    }

    #[test]
    fn the_process_started_with_this_pidfile_is_running_by_absolute_or_relative_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        let absolute = dir.path().join(PIDFILE).display().to_string();
        for arg in [absolute.as_str(), PIDFILE] {
            let mut qemu = sleeper(dir.path(), Some(arg));
            let sd = state_with_pid(dir.path(), qemu.id());
            assert_eq!(sd.running_pid(), Some(qemu.id() as i32), "-pidfile {arg}");
            let _ = qemu.kill();
            let _ = qemu.wait();
            assert_eq!(sd.running_pid(), None, "after the process exited");
        }
    }
}
