//! Shared helpers for the seedctl integration tests: a scratch directory with a
//! `machines/` tree and a way to run the real binary in it.
#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub struct Scratch {
    pub dir: tempfile::TempDir,
}

/// A test that fails half-way must not leave a detached QEMU running: every pidfile under
/// the scratch state directory is killed when the scratch goes away.
impl Drop for Scratch {
    fn drop(&mut self) {
        let Ok(machines) = std::fs::read_dir(self.path().join(".seedctl")) else {
            return;
        };
        for m in machines.flatten() {
            if let Ok(pid) = std::fs::read_to_string(m.path().join("qemu.pid")) {
                let _ = Command::new("kill")
                    .args(["-9", pid.trim()])
                    .stderr(std::process::Stdio::null())
                    .status();
            }
        }
    }
}

impl Scratch {
    pub fn new() -> Scratch {
        Scratch {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn machine(&self, name: &str) -> PathBuf {
        self.path().join("machines").join(name)
    }

    pub fn state(&self, name: &str) -> PathBuf {
        self.path().join(".seedctl").join(name)
    }

    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_seedctl"));
        c.current_dir(self.path())
            .args(args)
            .env_remove("SEEDCTL_MACHINES")
            .env_remove("SEEDCTL_STATE")
            // Hermetic: an operator's own signing key must not sign the tests' seeds.
            .env("SEEDCTL_SIGNING_KEY", "");
        c
    }

    /// An empty 64 MiB qcow2 `file` in the scratch directory: a stand-in base image.
    pub fn qcow2(&self, file: &str) {
        let st = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", file, "64M"])
            .current_dir(self.path())
            .status()
            .unwrap();
        assert!(st.success(), "qemu-img create {file}");
    }

    /// `seedctl new NAME`, then `seedctl create NAME` on a fresh `base.qcow2` with a
    /// /var disk of `var_size`.
    pub fn created(&self, name: &str, var_size: &str) {
        self.ok(&["new", name]);
        self.qcow2("base.qcow2");
        self.ok(&create_args(name, "base.qcow2", var_size));
    }

    /// `seedctl new NAME --admin-key @KEY` with the scratch's client key (see
    /// [`Scratch::client_key`]) and `extra` options after it.
    pub fn new_with_admin_key(&self, name: &str, extra: &[&str]) {
        let key = format!("@{}", self.client_key().display());
        self.ok(&[&["new", name, "--admin-key", &key][..], extra].concat());
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.cmd(args).output().unwrap()
    }

    /// Run and require success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "seedctl {args:?} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Run and require failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "seedctl {args:?} unexpectedly succeeded"
        );
        String::from_utf8(out.stderr).unwrap()
    }

    /// The NIC's MAC the machine's libvirt domain gives it (`<mac address=…>`), which
    /// the default network-config matches.
    pub fn domain_mac(&self, name: &str) -> String {
        let xml = self.ok(&["xml", name, "--kernel", "/dev/null"]);
        xml.split("<mac address='")
            .nth(1)
            .and_then(|r| r.split('\'').next())
            .expect("the domain XML names a MAC")
            .to_owned()
    }

    /// A fresh client key pair made by the real ssh-keygen; returns the .pub path.
    pub fn client_key(&self) -> PathBuf {
        let key = self.path().join("client_key");
        if !key.exists() {
            let st = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-C", "operator@test", "-f"])
                .arg(&key)
                .status()
                .unwrap();
            assert!(st.success());
        }
        key.with_extension("pub")
    }
}

/// The arguments of `seedctl create NAME` on `base` with a new /var disk of `var_size`.
pub fn create_args<'a>(name: &'a str, base: &'a str, var_size: &'a str) -> [&'a str; 6] {
    ["create", name, "--base", base, "--var-size", var_size]
}

/// Fail loudly when a host tool the test needs is missing.
pub fn require_tool(tool: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{tool}` is not installed; run `cargo xtask deps` (or apt-get install the package providing it)"
    );
}

pub fn stdout_of(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The guest agent binary of this workspace (`cargo build -p nixseed-agent` puts it in
/// the target directory beside seedctl's).
pub fn agent_binary() -> PathBuf {
    let seedctl = PathBuf::from(env!("CARGO_BIN_EXE_seedctl"));
    let agent = seedctl.with_file_name("nixseed-agent");
    assert!(
        agent.is_file(),
        "{} is missing; build it first with `cargo build -p nixseed-agent`",
        agent.display()
    );
    agent
}

/// A fake host tool `name`, the shell `script`, in a `fakebin` directory of the scratch;
/// the PATH that puts it before the real ones.
pub fn fake_tool(s: &Scratch, name: &str, script: &str) -> String {
    use std::os::unix::fs::PermissionsExt;
    let bin = s.path().join("fakebin");
    std::fs::create_dir_all(&bin).unwrap();
    let fake = bin.join(name);
    std::fs::write(&fake, script).unwrap();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!("{}:{}", bin.display(), std::env::var("PATH").unwrap())
}

/// A stand-in for the `seedctl run` QEMU of a machine: a `sleep` that holds the machine's
/// `qemu.pid` open, as QEMU does (so seedctl counts it as that machine's QEMU), and, when
/// asked for, a QMP monitor on `qmp.sock` on which `system_powerdown` and `quit` end it.
pub struct FakeQemu {
    child: std::process::Child,
    pidfile: PathBuf,
    pub pid: i32,
}

impl FakeQemu {
    pub fn start(s: &Scratch, name: &str, monitor: bool) -> FakeQemu {
        let sd = s.state(name);
        std::fs::create_dir_all(&sd).unwrap();
        let pidfile = sd.join("qemu.pid");
        std::fs::write(&pidfile, "").unwrap();
        let child = Command::new("sleep")
            .arg("600")
            .stdin(std::fs::File::open(&pidfile).unwrap())
            .spawn()
            .unwrap();
        let pid = child.id() as i32;
        std::fs::write(&pidfile, format!("{pid}\n")).unwrap();
        if monitor {
            let listener = std::os::unix::net::UnixListener::bind(sd.join("qmp.sock")).unwrap();
            std::thread::spawn(move || qmp_monitor(listener, pid));
        }
        FakeQemu {
            child,
            pidfile,
            pid,
        }
    }

    /// Whether the stand-in still runs (not gone, not a zombie).
    pub fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

/// Ends the stand-in, and takes away a pidfile that still names it, so that the
/// scratch's own clean-up signals no process that reuses its number.
impl Drop for FakeQemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::fs::read_to_string(&self.pidfile).is_ok_and(|p| p.trim() == self.pid.to_string()) {
            let _ = std::fs::remove_file(&self.pidfile);
        }
    }
}

/// Answers every QMP command with an empty return; `system_powerdown` and `quit` kill
/// `pid` once answered.
fn qmp_monitor(listener: std::os::unix::net::UnixListener, pid: i32) {
    use std::io::{BufRead, BufReader, Write};
    for conn in listener.incoming() {
        let Ok(mut conn) = conn else { continue };
        let _ = writeln!(conn, r#"{{"QMP":{{"version":{{}},"capabilities":[]}}}}"#);
        let Ok(read) = conn.try_clone() else { continue };
        for line in BufReader::new(read).lines() {
            let Ok(line) = line else { break };
            let _ = writeln!(conn, r#"{{"return":{{}}}}"#);
            if line.contains("system_powerdown") || line.contains("\"quit\"") {
                let _ = Command::new("kill")
                    .args(["-KILL", &pid.to_string()])
                    .status();
            }
        }
    }
}

/// Requires that a command run by hand (`seedctl` with its own environment, or under
/// another user) exited 0, showing its stderr when it did not.
pub fn assert_success(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
