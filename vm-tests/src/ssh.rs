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

/// `ssh-keyscan` for the ed25519 host key on `127.0.0.1:port`, output piped.
fn keyscan_command(port: u16) -> Command {
    let mut c = Command::new("ssh-keyscan");
    c.args([
        "-T",
        "5",
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
    let out = keyscan_command(port).output().ok()?;
    scanned_key(&out.stdout)
}

/// A pinned ssh session to one VM.
pub struct Ssh {
    pub port: u16,
    pub key: ClientKey,
    pub known_hosts: PathBuf,
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
        })
    }

    fn command(&self, remote: &str) -> Command {
        let mut c = Command::new("ssh");
        c.args(["-p", &self.port.to_string(), "-i"])
            .arg(&self.key.private)
            .arg("-o")
            .arg(format!("UserKnownHostsFile={}", self.known_hosts.display()))
            .args([
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
        self.command(remote)
            .output()
            .with_context(|| format!("running ssh for `{remote}`"))
    }

    /// Runs `remote`; fails unless it exits 0. Returns stdout.
    pub fn run(&self, remote: &str) -> Result<String> {
        let out = self.output(remote)?;
        if !out.status.success() {
            bail!(
                "`{remote}` in the guest (ssh port {}) failed ({}): {}{}",
                self.port,
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
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
/// A new scan starts every `POLL` (0.5 s) while an earlier one is still waiting: before the
/// guest has its address, QEMU's user network accepts the connection on the host side and
/// the scan then hangs until its own 5 s timeout. At most `IN_FLIGHT` (2) run at once:
/// QEMU's user network keeps trying to deliver a connection even after the host closed
/// it, so they all reach sshd together once the guest and sshd are up, and sshd drops new
/// ones (its `MaxStartups`) while many are unauthenticated.
///
/// The scans alone would see sshd up to 5 s late, when the address comes up while two
/// scans hang. So plain connections to `reach` go too, one every [`Reach::EVERY`]
/// (0.25 s), each dropped after [`Reach::LIFE`] (3 s); they cost sshd nothing. The first
/// that the guest's kernel resets shows the address is up; from then on a scan either
/// reaches sshd or is refused at once, so scans start that often, past the hung ones.
/// A guest whose firewall drops the probes is polled by the scans alone.
pub fn wait_for_host_key_via(
    port: u16,
    reach: Option<u16>,
    expected: Option<&str>,
    timeout: Duration,
    mut alive: impl FnMut() -> Result<()>,
) -> Result<String> {
    const POLL: Duration = Duration::from_millis(500);
    const IN_FLIGHT: usize = 2;
    let deadline = Instant::now() + timeout;
    let expected = expected.and_then(key_type_and_blob);
    let mut scans = Scans(Vec::new());
    let mut probes = reach.map(Reach::new);
    let mut up = false;
    let mut next = Instant::now();
    loop {
        alive()?;
        if !up && probes.as_mut().is_some_and(Reach::answered) {
            up = true;
            probes = None;
            next = Instant::now();
        }
        let (every, cap) = if up {
            (Reach::EVERY, IN_FLIGHT + 2)
        } else {
            (POLL, IN_FLIGHT)
        };
        if Instant::now() >= next && scans.0.len() < cap {
            // A scan that cannot even start (no ssh-keyscan) is retried at the next poll.
            if let Ok(child) = keyscan_command(port).spawn() {
                scans.0.push(child);
            }
            next = Instant::now() + every;
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
struct Scans(Vec<std::process::Child>);

impl Scans {
    /// Reaps finished scans; the key of the first that found one.
    fn first_answer(&mut self) -> Option<String> {
        let mut i = 0;
        while i < self.0.len() {
            match self.0[i].try_wait() {
                Ok(None) => i += 1,
                Ok(Some(_)) => {
                    let child = self.0.swap_remove(i);
                    if let Some(key) = child
                        .wait_with_output()
                        .ok()
                        .and_then(|o| scanned_key(&o.stdout))
                    {
                        return Some(key);
                    }
                }
                Err(_) => {
                    let mut child = self.0.swap_remove(i);
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
        for c in &mut self.0 {
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
