//! `seedctl serve`: provision booting guests over their control channels. A guest with no
//! seed disk says `hello` on `org.nixseed.channel.0` at first boot; this answers each with
//! its machine's identity (or `refuse` when the DMI product_uuid is not the machine's).
//! One thread per machine; `seedctl run/start --seed-via channel` use the same code.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::channel::{self, Answer, HelloTarget};
use crate::libvirt::{self, virsh};
use crate::machine::Paths;
use crate::output::Report;
use crate::state::{CHANNEL_SOCK, StateDir};

/// Where a machine's identity reaches it at boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum SeedVia {
    /// A NoCloud seed ISO attached as a cdrom (also read by plain cloud-init)
    #[default]
    Iso,
    /// No seed disk: the host answers the guest's hello on the control channel
    Channel,
}

/// The log file of a background answerer in the machine's state directory.
pub const CHANNEL_LOG: &str = "channel.log";

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl serve                                # every running libvirt domain with a nixseed channel
  seedctl serve web1 web2 --connect qemu:///system --once
  seedctl serve --local                        # every machine running under `seedctl run`
  seedctl serve web1 --socket /run/vm/web1-channel.sock --once
Runs until interrupted; --once exits when every machine was answered, and fails for a
machine whose QEMU exits before its guest says hello. While it holds a machine's
channel, `seedctl push/status` on that machine get no answer and fail after their
--timeout (QEMU serves one client per channel socket).")]
pub struct ServeArgs {
    /// Machines to serve [default: all running libvirt domains with a nixseed channel and a
    /// machines/NAME directory; with --local, all machines running under `seedctl run`]
    pub names: Vec<String>,
    /// libvirt URI [default: LIBVIRT_DEFAULT_URI or qemu:///system]
    #[arg(long, short = 'c', value_name = "URI")]
    pub connect: Option<String>,
    /// Serve `seedctl run` machines (sockets in the state directory) instead of libvirt domains
    #[arg(long, conflicts_with = "connect")]
    pub local: bool,
    /// The channel socket (with exactly one NAME)
    #[arg(long, value_name = "PATH", conflicts_with_all = ["connect", "local"])]
    pub socket: Option<PathBuf>,
    /// Exit once every machine was answered (a machine whose QEMU exits first is an error)
    #[arg(long)]
    pub once: bool,
    /// Stop serving when this process (the machine's QEMU) is gone
    #[arg(long, value_name = "PID", hide = true)]
    pub qemu_pid: Option<i32>,
}

/// The machines to serve and their sockets.
fn targets(paths: &Paths, a: &ServeArgs, log: &dyn Fn(&str)) -> Result<Vec<HelloTarget>> {
    let target = |name: &str, socket: PathBuf, qemu_pid: Option<i32>| HelloTarget {
        paths: paths.clone(),
        name: name.to_owned(),
        socket,
        qemu_pid,
    };
    if let Some(socket) = &a.socket {
        let [name] = a.names.as_slice() else {
            bail!(
                "--socket serves exactly one machine; name it: `seedctl serve NAME --socket PATH`"
            );
        };
        crate::names::check_machine_name(name)?;
        return Ok(vec![target(name, socket.clone(), a.qemu_pid)]);
    }
    if a.local {
        let names = if a.names.is_empty() {
            paths
                .machine_names()?
                .into_iter()
                .filter(|n| crate::names::check_machine_name(n).is_ok())
                .filter(|n| StateDir::new(paths, n).running_pid().is_some())
                .collect()
        } else {
            a.names.clone()
        };
        let mut out = Vec::new();
        for name in names {
            crate::names::check_machine_name(&name)?;
            let sd = StateDir::new(paths, &name);
            let pid = a.qemu_pid.or_else(|| sd.running_pid());
            out.push(target(&name, sd.file(CHANNEL_SOCK), pid));
        }
        return Ok(out);
    }
    let uri = libvirt::uri(a.connect.as_deref());
    let explicit = !a.names.is_empty();
    let names: Vec<String> = if explicit {
        a.names.clone()
    } else {
        virsh(&uri, "(all)", &["list", "--name"])?
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_owned)
            .collect()
    };
    let mut out = Vec::new();
    for name in names {
        let have_identity =
            crate::names::check_machine_name(&name).is_ok() && paths.machine_dir(&name).is_dir();
        if !have_identity {
            if explicit {
                bail!(
                    "machine `{name}` not found: {} does not exist; create it with `seedctl new {name}` or pass --machines DIR",
                    paths.machine_dir(&name).display()
                );
            }
            log(&format!(
                "{name}: skipped (no {} for this domain)",
                paths.machine_dir(&name).display()
            ));
            continue;
        }
        // With --once the answerer stops when the domain's QEMU does (a domain destroyed
        // before its hello would otherwise keep it, and the socket, forever); a long-running
        // serve stays to answer the domain again when it restarts.
        let qemu_pid = match a.once {
            true => a.qemu_pid.or_else(|| libvirt::local_qemu_pid(&uri, &name)),
            false => a.qemu_pid,
        };
        match channel::libvirt_socket(&uri, &name) {
            Ok(socket) => out.push(target(&name, socket, qemu_pid)),
            Err(e) if explicit => return Err(e),
            Err(e) => log(&format!("{e:#}; skipped")),
        }
    }
    Ok(out)
}

pub fn run(paths: &Paths, a: &ServeArgs) -> Result<Report> {
    let t0 = Instant::now();
    let stderr = Mutex::new(());
    let log = |line: &str| {
        let _guard = stderr.lock();
        eprintln!("[{:7.1}s] {line}", t0.elapsed().as_secs_f64());
    };
    let targets = targets(paths, a, &log)?;
    if targets.is_empty() {
        bail!(
            "no machine to serve: name them, or start some (`seedctl run NAME --seed-via channel`, `seedctl start NAME --seed-via channel`)"
        );
    }
    let results: Vec<(&HelloTarget, Result<Option<Answer>>)> = std::thread::scope(|s| {
        let handles: Vec<_> = targets
            .iter()
            .map(|t| {
                let log = &log;
                (t, s.spawn(move || channel::answer_hellos(t, a.once, log)))
            })
            .collect();
        handles
            .into_iter()
            .map(|(t, h)| {
                let r = h.join().unwrap_or_else(|_| {
                    Err(anyhow::anyhow!("machine `{}`: answerer crashed", t.name))
                });
                (t, r)
            })
            .collect()
    });
    let mut answers = Vec::new();
    let mut failures = Vec::new();
    for (t, r) in results {
        match r {
            Ok(Some(ans)) => answers.push(ans),
            // --once promises an answered machine: one whose QEMU went first was not.
            Ok(None) if a.once => failures.push(format!(
                "{}: its QEMU{} exited before the guest said hello on {}, so nothing was answered",
                t.name,
                t.qemu_pid
                    .map(|p| format!(" (pid {p})"))
                    .unwrap_or_default(),
                t.socket.display()
            )),
            Ok(None) => {}
            Err(e) => failures.push(format!("{}: {e:#}", t.name)),
        }
    }
    if !failures.is_empty() {
        bail!(
            "serving the control channel failed for {}",
            failures.join("; ")
        );
    }
    let human = answers
        .iter()
        .map(Answer::line)
        .collect::<Vec<_>>()
        .join("\n");
    Ok(Report::new(human, json!({ "answers": answers })))
}

/// How a background answerer finds the machine's channel.
pub enum Background<'a> {
    /// A `seedctl run` QEMU: its socket, and its pid to stop with it.
    Local { socket: &'a Path, qemu_pid: i32 },
    /// A libvirt domain, and its QEMU's pid when libvirt runs it on this host (read by
    /// the caller right after the start, so a domain destroyed before the answerer
    /// reads libvirt's pidfile still stops it).
    Libvirt { uri: &'a str, qemu_pid: Option<i32> },
}

/// Starts `seedctl serve NAME --once` in the background (its own process group, logging
/// to STATE/NAME/channel.log) for a machine that was just started without a seed disk.
/// Returns its pid and the log path.
pub fn spawn_background(paths: &Paths, name: &str, how: Background<'_>) -> Result<(u32, PathBuf)> {
    use std::os::unix::process::CommandExt;
    let sd = StateDir::new(paths, name);
    let log_path = sd.file(CHANNEL_LOG);
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("machine `{name}`: opening {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the seedctl executable")?;
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut cmd = Command::new(exe);
    cmd.arg("--machines")
        .arg(abs(&paths.machines))
        .arg("--state")
        .arg(abs(&paths.state))
        .args(["serve", name, "--once"]);
    match how {
        Background::Local { socket, qemu_pid } => {
            cmd.arg("--socket")
                .arg(abs(socket))
                .args(["--qemu-pid", &qemu_pid.to_string()]);
        }
        Background::Libvirt { uri, qemu_pid } => {
            cmd.args(["--connect", uri]);
            if let Some(pid) = qemu_pid {
                cmd.args(["--qemu-pid", &pid.to_string()]);
            }
        }
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(log))
        .process_group(0)
        .spawn()
        .with_context(|| format!("machine `{name}`: starting the background answerer"))?;
    Ok((child.id(), log_path))
}
