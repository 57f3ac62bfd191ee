//! A scratch guest root for tests and benchmarks that run the real `nixseed-agent` with
//! `--sysroot ROOT/sysroot --root ROOT/host --run ROOT/run`: a target system with the
//! read-only image's placeholders in `etc/`, a stand-in for `/proc` and `/sys` (kernel
//! command line, product_uuid, optionally one NIC), and a NoCloud seed directory that the
//! command line names (`ds=nocloud;s=/seed/`).

pub mod memory;
pub mod stats;

use std::io;
use std::path::Path;

/// What the scratch guest looks like.
pub struct Guest<'a> {
    /// DMI product_uuid.
    pub product_uuid: &'a str,
    /// One NIC in the fake sysfs: (name, MAC).
    pub nic: Option<(&'a str, &'a str)>,
    /// The image's own `/etc/hosts` (empty, or a base the identity's lines are added to).
    pub hosts: &'a str,
    /// The image's own `/etc/resolv.conf` (the NixOS module's resolved stub, or empty).
    pub resolv_conf: &'a str,
    /// `/proc/cmdline`; it must name the seed directory for the agent to find it.
    pub cmdline: &'a str,
}

impl Default for Guest<'_> {
    fn default() -> Self {
        Guest {
            product_uuid: "11111111-2222-3333-4444-555555555555",
            nic: None,
            hosts: "",
            resolv_conf: "",
            cmdline: "ds=nocloud;s=/seed/\n",
        }
    }
}

impl Guest<'_> {
    /// Lays the guest out under `root` (which must exist).
    pub fn lay_out(&self, root: &Path) -> io::Result<()> {
        for d in [
            "sysroot/etc",
            "sysroot/var",
            "sysroot/seed",
            "run",
            "host/proc",
            "host/sys/class/dmi/id",
            "host/sys/class/block",
        ] {
            std::fs::create_dir_all(root.join(d))?;
        }
        for f in ["machine-id", "hostname"] {
            std::fs::write(root.join("sysroot/etc").join(f), "")?;
        }
        std::fs::write(root.join("sysroot/etc/resolv.conf"), self.resolv_conf)?;
        std::fs::write(root.join("sysroot/etc/hosts"), self.hosts)?;
        if let Some((name, mac)) = self.nic {
            let dir = root.join("host/sys/class/net").join(name);
            std::fs::create_dir_all(&dir)?;
            std::fs::write(dir.join("address"), format!("{mac}\n"))?;
        }
        set_product_uuid(root, self.product_uuid)?;
        std::fs::write(root.join("host/proc/cmdline"), self.cmdline)
    }
}

/// Replaces the product_uuid the agent reads (a clone, a moved disk).
pub fn set_product_uuid(root: &Path, uuid: &str) -> io::Result<()> {
    std::fs::write(
        root.join("host/sys/class/dmi/id/product_uuid"),
        format!("{uuid}\n"),
    )
}

/// Writes the NoCloud seed; `network: None` removes an earlier network-config.
pub fn write_seed(
    root: &Path,
    meta: &str,
    user: impl AsRef<[u8]>,
    network: Option<&str>,
) -> io::Result<()> {
    let seed = root.join("sysroot/seed");
    std::fs::write(seed.join("meta-data"), meta)?;
    std::fs::write(seed.join("user-data"), user)?;
    match network {
        Some(n) => std::fs::write(seed.join("network-config"), n),
        None => match std::fs::remove_file(seed.join("network-config")) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        },
    }
}

/// The agent's arguments that point it at the scratch guest.
fn agent_args(root: &Path) -> String {
    format!(
        "--sysroot {d}/sysroot --root {d}/host --run {d}/run",
        d = root.display()
    )
}

/// Runs the agent's first boot from the scratch guest's seed, then its control channel
/// on the unix socket `sock`, in private mount and UTS namespaces (`unshare -m -u`: the
/// agent bind-mounts over `etc/` and sets the hostname). Returns once the socket accepts
/// connections.
/// `sh -c ... exec` keeps the pid: the child's pid is the agent's.
pub fn spawn_channel_guest(
    agent: &Path,
    root: &Path,
    sock: &Path,
    stderr: std::process::Stdio,
) -> io::Result<std::process::Child> {
    spawn_channel_guest_with(agent, root, sock, stderr, "", &[])
}

/// [`spawn_channel_guest`] with `channel_args` (shell words) added to the `channel`
/// command only, such as `--trusted-keys FILE`, and `env` set for both commands.
pub fn spawn_channel_guest_with(
    agent: &Path,
    root: &Path,
    sock: &Path,
    stderr: std::process::Stdio,
    channel_args: &str,
    env: &[(&str, &str)],
) -> io::Result<std::process::Child> {
    let args = agent_args(root);
    let script = format!(
        "{a} initrd {args} 2>/dev/null && exec {a} channel -m unix-listen -p {} {args} {channel_args}",
        sock.display(),
        a = agent.display()
    );
    let mut child = std::process::Command::new("unshare")
        .args(["-m", "-u", "sh", "-c", &script])
        .envs(env.iter().copied())
        .stderr(stderr)
        .spawn()?;
    // Stop waiting as soon as the agent has exited.
    let up = wait_for(std::time::Duration::from_secs(20), || {
        listening(sock) || !matches!(child.try_wait(), Ok(None))
    });
    if !(up && listening(sock)) {
        let _ = child.kill();
        let _ = child.wait();
        return Err(io::Error::other(format!(
            "the agent's channel socket {} never appeared",
            sock.display()
        )));
    }
    Ok(child)
}

/// Polls `ready` every 10 ms until it holds (true) or `within` has passed (false): the
/// wait for an agent's socket after its start.
pub fn wait_for(within: std::time::Duration, mut ready: impl FnMut() -> bool) -> bool {
    let t0 = std::time::Instant::now();
    while !ready() {
        if t0.elapsed() > within {
            return false;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    true
}

/// Whether the unix socket `sock` accepts connections within `within`: the wait for an
/// agent that has just been started to listen.
pub fn listening_within(sock: &Path, within: std::time::Duration) -> bool {
    wait_for(within, || listening(sock))
}

/// Whether a unix socket accepts connections. Its file appears at bind(2), a moment before
/// listen(2), so waiting for the file alone races the first connection.
pub fn listening(sock: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(sock).is_ok()
}

/// A raw pty whose slave is linked at `link`, standing in for a virtio-serial port's node:
/// the agent opens `link` as it would `/dev/virtio-ports/NAME`, and the test plays the
/// host on the returned master. The slave fd comes back too: while the test holds it, the
/// master's reads wait for data rather than failing before the agent has opened the port.
pub fn raw_pty_at(link: &Path) -> io::Result<(std::fs::File, std::os::fd::OwnedFd)> {
    use nix::sys::termios::{SetArg, cfmakeraw, tcgetattr, tcsetattr};
    let pty = nix::pty::openpty(None, None)?;
    let mut t = tcgetattr(&pty.slave)?;
    cfmakeraw(&mut t);
    tcsetattr(&pty.slave, SetArg::TCSANOW, &t)?;
    let slave = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&pty.slave)
    ))?;
    std::os::unix::fs::symlink(&slave, link)?;
    Ok((std::fs::File::from(pty.master), pty.slave))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lays_out_placeholders_sysfs_and_seed() -> io::Result<()> {
        let dir = std::env::temp_dir().join(format!("nixseed-ts-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let g = Guest {
            nic: Some(("ens18", "52:54:00:12:34:56")),
            hosts: "127.0.0.1 localhost\n",
            ..Guest::default()
        };
        g.lay_out(&dir)?;
        write_seed(
            &dir,
            "instance-id: a\n",
            "#cloud-config\n",
            Some("version: 2\n"),
        )?;
        write_seed(&dir, "instance-id: b\n", "#cloud-config\n", None)?;
        let read = |p: &str| std::fs::read_to_string(dir.join(p));
        assert_eq!(read("sysroot/etc/machine-id")?, "");
        assert_eq!(read("sysroot/etc/hosts")?, "127.0.0.1 localhost\n");
        assert_eq!(
            read("host/sys/class/net/ens18/address")?,
            "52:54:00:12:34:56\n"
        );
        assert_eq!(read("sysroot/seed/meta-data")?, "instance-id: b\n");
        assert!(!dir.join("sysroot/seed/network-config").exists());
        assert!(agent_args(&dir).contains("/host --run "));
        std::fs::remove_dir_all(&dir)
    }
}
