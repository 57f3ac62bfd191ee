//! Host-side runtime state of one machine under `.seedctl/<name>/`: its disks, seed,
//! QEMU sockets and a small `state.json` recording the base image and SSH port forward.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
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
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("creating {}", self.dir.display()))?;
        let bytes = serde_json::to_vec_pretty(st).context("encoding state.json")?;
        write_atomic(&self.file(STATE_FILE), &bytes, 0o644)
    }

    /// PID of the `seedctl run` QEMU when it is alive.
    pub fn running_pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.file(PIDFILE)).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        pid_alive(pid).then_some(pid)
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
