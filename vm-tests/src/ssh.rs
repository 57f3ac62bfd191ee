//! SSH into a guest with a pinned host key: `ssh-keyscan` decides when sshd is up (and
//! that it presents exactly the machine's key), then `ssh` runs with a known_hosts file
//! holding only that key.

use crate::cmd;
use anyhow::{Context, Result, bail};
use std::fs;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The harness's client key pair (the machines' admin key), made once per work dir.
#[derive(Clone, Debug)]
pub struct ClientKey {
    pub private: PathBuf,
    pub public: PathBuf,
}

impl ClientKey {
    pub fn ensure(dir: &Path) -> Result<ClientKey> {
        fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let private = dir.join("admin_ed25519");
        let public = dir.join("admin_ed25519.pub");
        if !private.exists() || !public.exists() {
            let _ = fs::remove_file(&private);
            let _ = fs::remove_file(&public);
            cmd::run(
                Command::new("ssh-keygen")
                    .args([
                        "-q",
                        "-t",
                        "ed25519",
                        "-N",
                        "",
                        "-C",
                        "nixseed-vm-tests",
                        "-f",
                    ])
                    .arg(&private),
            )?;
        }
        Ok(ClientKey { private, public })
    }

    pub fn public_line(&self) -> Result<String> {
        Ok(fs::read_to_string(&self.public)
            .with_context(|| format!("reading {}", self.public.display()))?
            .trim()
            .to_string())
    }
}

/// `ssh-ed25519 AAAA…` without the comment.
pub fn key_type_and_blob(line: &str) -> Option<String> {
    let mut w = line.split_whitespace();
    let (t, b) = (w.next()?, w.next()?);
    Some(format!("{t} {b}"))
}

/// Every host key sshd on `127.0.0.1:port` offers, of any type (`type blob` each, sorted):
/// a machine whose only key is its identity's shows exactly one.
pub fn all_host_keys(port: u16) -> Result<Vec<String>> {
    let out = cmd::stdout(Command::new("ssh-keyscan").args([
        "-T",
        "10",
        "-t",
        "rsa,ecdsa,ed25519",
        "-p",
        &port.to_string(),
        "127.0.0.1",
    ]))?;
    let mut keys: Vec<String> = out
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            l.split_once(' ')
                .and_then(|(_, key)| key_type_and_blob(key))
        })
        .collect();
    keys.sort();
    Ok(keys)
}

/// `ssh-keyscan -T timeout_s` for the ed25519 host key on `127.0.0.1:port`, output piped.
fn keyscan_command(port: u16, timeout_s: u32) -> Command {
    let mut c = Command::new("ssh-keyscan");
    c.args([
        "-T",
        &timeout_s.to_string(),
        "-t",
        "ed25519",
        "-p",
        &port.to_string(),
        "127.0.0.1",
    ])
    .stdin(Stdio::null())
    .stdout(Stdio::piped())
    .stderr(Stdio::null());
    c
}

/// The key in `ssh-keyscan`'s output, if it printed one.
fn scanned_key(stdout: &[u8]) -> Option<String> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let mut w = l.split_whitespace();
            let _host = w.next()?;
            let rest: Vec<&str> = w.collect();
            key_type_and_blob(&rest.join(" "))
        })
}

/// The ed25519 host key sshd on `127.0.0.1:port` presents, if it answers.
pub fn keyscan(port: u16) -> Option<String> {
    let out = keyscan_command(port, SCAN_TIMEOUT).output().ok()?;
    scanned_key(&out.stdout)
}

/// A pinned ssh session to one VM.
///
/// A session made by [`Ssh::pinned`] runs its commands over one connection of its own
/// (OpenSSH's `ControlMaster`, made by the first command and kept while the session
/// lives): under TCG a new connection costs about 2 s of the guest's CPU (key exchange,
/// sshd's re-exec, a PAM session through logind), a command over the kept one about
/// 0.2 s. A check whose subject is the login itself (a key revoked or added, sshd
/// restarted) uses [`Ssh::login`] or a session of [`Ssh::fresh_only`], which connect
/// anew every time. A new session's first command is a login too (host key checked
/// against the pin, key authenticated), unless the kept connection was idle for a
/// minute, when any command may be one.
pub struct Ssh {
    pub port: u16,
    pub key: ClientKey,
    pub known_hosts: PathBuf,
    /// The kept connection's control socket; `None`: a new connection per command.
    control: Option<PathBuf>,
}

/// A control socket path no other session uses: a session never rides on a connection
/// another one (with another key, say) authenticated. The sockets sit in a directory of
/// this process's own, mode 0700 (left behind, empty, when it ends). `None` if none can
/// be made: the session then connects anew for every command.
fn control_path() -> Option<PathBuf> {
    use std::os::unix::fs::DirBuilderExt;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    static NEXT: AtomicU32 = AtomicU32::new(0);
    // Short: a unix socket path has about 100 bytes, and ssh adds a 17-byte suffix while
    // it binds; so /tmp itself, not a `TMPDIR` that may be long.
    let dir = DIR.get_or_init(|| {
        // One this process made, so it is its own and private, whatever was in /tmp.
        (0..100).find_map(|k| {
            let dir = Path::new("/tmp").join(format!("nixseed-ssh-{}-{k}", std::process::id()));
            fs::DirBuilder::new()
                .mode(0o700)
                .create(&dir)
                .ok()
                .map(|()| dir)
        })
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    dir.as_ref().map(|d| d.join(n.to_string()))
}

impl Ssh {
    /// Writes a known_hosts file pinning `host_key` (`ssh-ed25519 AAAA…`) for the port.
    pub fn pinned(port: u16, key: ClientKey, host_key: &str, dir: &Path) -> Result<Ssh> {
        let known_hosts = dir.join("known_hosts");
        let blob = key_type_and_blob(host_key)
            .with_context(|| format!("bad host key line '{host_key}'"))?;
        fs::write(&known_hosts, format!("[127.0.0.1]:{port} {blob}\n"))
            .with_context(|| format!("writing {}", known_hosts.display()))?;
        Ok(Ssh {
            port,
            key,
            known_hosts,
            control: control_path(),
        })
    }

    /// A session that connects anew for every command: for a key whose login is what
    /// is checked (it must log in, or be turned away, each time it is tried).
    pub fn fresh_only(port: u16, key: ClientKey, known_hosts: PathBuf) -> Ssh {
        Ssh {
            port,
            key,
            known_hosts,
            control: None,
        }
    }

    fn command_over(&self, remote: &str, control: Option<&Path>) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-p", &self.port.to_string(), "-i"])
            .arg(&self.key.private)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()));
        match control {
            // The first command makes the connection and leaves it in the background
            // (its stdio closed); it ends when idle for a minute, with the VM, or at drop.
            // If it is gone, ssh connects anew.
            Some(path) => c
                .arg("-o")
                .arg(format!("ControlPath={}", path.display()))
                .args(["-o", "ControlMaster=auto", "-o", "ControlPersist=60"])
                // A guest that stops answering fails the command within a minute, as a
                // new connection's ConnectTimeout would.
                .args([
                    "-o",
                    "ServerAliveInterval=15",
                    "-o",
                    "ServerAliveCountMax=4",
                ]),
            None => c.args(["-o", "ControlPath=none", "-o", "ControlMaster=no"]),
        };
        c.args([
            "-o",
            "StrictHostKeyChecking=yes",
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "HostKeyAlgorithms=ssh-ed25519",
            "-o",
            "BatchMode=yes",
            "-o",
            "IdentitiesOnly=yes",
            "-o",
            "ConnectTimeout=20",
            "-o",
            "LogLevel=ERROR",
            "root@127.0.0.1",
            "--",
            remote,
        ])
        .stdin(Stdio::null());
        c
    }

    /// Runs `remote` and returns its output whatever the exit status.
    pub fn output(&self, remote: &str) -> Result<Output> {
        self.output_over(remote, self.control.as_deref())
    }

    /// Runs `remote` over a new connection, so that the login itself is what is tried
    /// (the key still authorized, sshd still accepting), and returns its output whatever
    /// the exit status.
    pub fn login_output(&self, remote: &str) -> Result<Output> {
        self.output_over(remote, None)
    }

    fn output_over(&self, remote: &str, control: Option<&Path>) -> Result<Output> {
        self.command_over(remote, control)
            .output()
            .with_context(|| format!("running ssh for `{remote}`"))
    }

    /// [`Ssh::login_output`] that fails unless `remote` exits 0. Returns stdout.
    pub fn login(&self, remote: &str) -> Result<String> {
        let out = self.login_output(remote)?;
        checked(self.port, remote, out)
    }

    /// Runs `remote`; fails unless it exits 0. Returns stdout.
    pub fn run(&self, remote: &str) -> Result<String> {
        let out = self.output(remote)?;
        checked(self.port, remote, out)
    }
}

/// stdout of `remote` if it exited 0.
fn checked(port: u16, remote: &str, out: Output) -> Result<String> {
    if !out.status.success() {
        bail!(
            "`{remote}` in the guest (ssh port {port}) failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

impl Drop for Ssh {
    /// Ends the kept connection (a VM already gone has ended it).
    fn drop(&mut self) {
        if let Some(path) = self.control.as_deref().filter(|p| p.exists()) {
            let _ = Command::new("ssh")
                .arg("-o")
                .arg(format!("ControlPath={}", path.display()))
                .args(["-O", "exit", "-p", &self.port.to_string(), "root@127.0.0.1"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Polls `ssh-keyscan` until sshd answers; fails at once on a different host key.
/// `alive` is checked between polls (QEMU still running). Returns the key seen.
pub fn wait_for_host_key(
    port: u16,
    expected: Option<&str>,
    timeout: Duration,
    alive: impl FnMut() -> Result<()>,
) -> Result<String> {
    wait_for_host_key_via(port, None, expected, timeout, alive)
}

/// [`wait_for_host_key`], told by `reach` (a forwarded port to a guest port where nothing
/// listens) when the guest has its address.
///
/// Before the guest has its address, QEMU's user network accepts a connection on the host
/// side and holds it: a scan started then hangs until its own timeout, and QEMU delivers
/// the connection to the guest once the address is up, whether or not the host still
/// wants it, so each such scan can cost sshd a handshake later, while the guest is still
/// booting. So plain connections to `reach` go first, one every [`Reach::EVERY`] (0.25 s),
/// each dropped after [`Reach::LIFE`] (3 s); they cost sshd nothing. The first that the
/// guest's kernel resets shows the address is up.
///
/// From then on one scan runs at a time, as one operator's client would: one is refused
/// at once while sshd does not listen yet, and the next starts 0.25 s after it began; one
/// that sshd accepted is waited for (up to [`SCAN_TIMEOUT_UP`]). Scans started before the
/// address was up are not waited for. With up to four scans in flight after the address
/// (as before 2026-12-04), the guest's sshd handled several handshakes at once on a vCPU
/// still busy with the boot, which delayed the first answer for both images.
///
/// A guest whose firewall drops the probes never resets one: after [`SCANS_AFTER`] the
/// scans start anyway, one every `POLL` (0.5 s) and at most `IN_FLIGHT` (2) at once, and
/// that guest is polled by the scans alone.
pub fn wait_for_host_key_via(
    port: u16,
    reach: Option<u16>,
    expected: Option<&str>,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<String> {
    const POLL: Duration = Duration::from_millis(500);
    const IN_FLIGHT: usize = 2;
    let started = Instant::now();
    let deadline = started + timeout;
    // An expected key that does not parse must not become "any key".
    let expected = expected
        .map(|e| {
            key_type_and_blob(e)
                .with_context(|| format!("the expected host key '{e}' is not `TYPE BLOB`"))
        })
        .transpose()?;
    let mut scans = Scans(Vec::new());
    let mut probes = reach.map(Reach::new);
    let mut up: Option<Instant> = None;
    let mut next = Instant::now();
    loop {
        alive()?;
        if up.is_none() && probes.as_mut().is_some_and(Reach::answered) {
            up = Some(Instant::now());
            probes = None;
            next = Instant::now();
        }
        let due = Instant::now() >= next;
        let scan_timeout = match up {
            Some(at) => (due && scans.started_since(at) == 0).then_some(SCAN_TIMEOUT_UP),
            None if probes.is_some() && started.elapsed() < SCANS_AFTER => None,
            None => (due && scans.0.len() < IN_FLIGHT).then_some(SCAN_TIMEOUT),
        };
        if let Some(t) = scan_timeout {
            // A scan that cannot even start (no ssh-keyscan) is retried when next due.
            if let Ok(child) = keyscan_command(port, t).spawn() {
                scans.0.push((Instant::now(), child));
            }
            next = Instant::now() + if up.is_some() { Reach::EVERY } else { POLL };
        }
        if let Some(seen) = scans.first_answer() {
            if let Some(want) = &expected
                && &seen != want
            {
                bail!(
                    "sshd on port {port} presents host key `{seen}`, expected the machine's `{want}`"
                );
            }
            return Ok(seen);
        }
        if Instant::now() > deadline {
            bail!(
                "sshd on port {port} did not answer within {} s",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How long the probes alone may look for the guest's address before the scans start
/// too (a guest whose firewall drops the probes). Under TCG the address comes 11–17 s
/// after QEMU's start with one vCPU.
const SCANS_AFTER: Duration = Duration::from_secs(20);
/// `ssh-keyscan -T` before the address is known: such a scan may hang in QEMU's user
/// network until then.
const SCAN_TIMEOUT: u32 = 5;
/// `ssh-keyscan -T` once the address is up: a scan still running has reached sshd, whose
/// first handshake under TCG takes seconds while the guest is booting.
const SCAN_TIMEOUT_UP: u32 = 20;

/// Connections to a forwarded port where nothing in the guest listens.
struct Reach {
    port: u16,
    open: Vec<(Instant, TcpStream)>,
    next: Instant,
}

impl Reach {
    const EVERY: Duration = Duration::from_millis(250);
    const LIFE: Duration = Duration::from_secs(3);

    fn new(port: u16) -> Reach {
        Reach {
            port,
            open: Vec::new(),
            next: Instant::now(),
        }
    }

    /// Opens the next probe when due; whether the guest has reset one.
    fn answered(&mut self) -> bool {
        let now = Instant::now();
        if now >= self.next {
            // Refused while QEMU has not opened the port yet: tried again.
            if let Ok(s) = TcpStream::connect(("127.0.0.1", self.port))
                && s.set_nonblocking(true).is_ok()
            {
                self.open.push((now, s));
            }
            self.next = now + Self::EVERY;
        }
        let mut reset = false;
        self.open
            .retain_mut(|(born, s)| match s.read(&mut [0u8; 16]) {
                Ok(0) => {
                    reset = true;
                    false
                }
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    reset = true;
                    false
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => born.elapsed() < Self::LIFE,
                // Something answered on a port nothing should serve: not a sign either way.
                Ok(_) | Err(_) => false,
            });
        reset
    }
}

/// The `ssh-keyscan` processes in flight; those left are killed when dropped.
struct Scans(Vec<(Instant, std::process::Child)>);

impl Scans {
    /// How many of the scans in flight started at or after `at`.
    fn started_since(&self, at: Instant) -> usize {
        self.0.iter().filter(|(t, _)| *t >= at).count()
    }

    /// Reaps finished scans; the key of the first that found one.
    fn first_answer(&mut self) -> Option<String> {
        let mut i = 0;
        while i < self.0.len() {
            match self.0[i].1.try_wait() {
                Ok(None) => i += 1,
                Ok(Some(_)) => {
                    let (_, child) = self.0.swap_remove(i);
                    if let Some(key) = child
                        .wait_with_output()
                        .ok()
                        .and_then(|o| scanned_key(&o.stdout))
                    {
                        return Some(key);
                    }
                }
                Err(_) => {
                    let (_, mut child) = self.0.swap_remove(i);
                    let _ = child.kill();
                    let _ = child.wait();
                }
            }
        }
        None
    }
}

impl Drop for Scans {
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comment_is_dropped_from_keys() {
        assert_eq!(
            key_type_and_blob("ssh-ed25519 AAAAC3Nz root@web1\n").as_deref(),
            Some("ssh-ed25519 AAAAC3Nz")
        );
        assert_eq!(key_type_and_blob("ssh-ed25519"), None);
    }
}
