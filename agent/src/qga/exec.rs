//! guest-exec and guest-exec-status (unsafe: off unless allow-listed). A process runs
//! detached from the request; its output is collected by two reader threads and
//! handed over, base64, when the host asks for its status after it exits. As in
//! qemu-ga, each stream keeps at most 16 MiB; the rest is read and dropped, and a
//! process is reaped as soon as it exits (a third thread waits for it), so no zombie is
//! left for a host that never asks.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use nixseed_core::channel::base64_encode;
use nixseed_core::qga::{Args, QgaError, base64};
use serde_json::{Map, Value, json};

use super::{Agent, CmdResult};

/// qemu-ga's cap on each captured stream. A process that writes more (`yes`) keeps
/// running: its output is read and dropped, so it never blocks on a full pipe.
const MAX_OUTPUT: usize = 16 << 20;

#[derive(Default)]
struct Captured {
    data: Vec<u8>,
    /// Output was dropped (exactly 16 MiB is not truncated).
    truncated: bool,
}

type Buf = Arc<Mutex<Captured>>;

struct Running {
    /// Waits for the process, and so reaps it the moment it exits.
    waiter: JoinHandle<std::io::Result<ExitStatus>>,
    /// Each stream's buffer, reader, and the prefix of its members (`out`, `err`).
    readers: Vec<(Buf, JoinHandle<()>, &'static str)>,
}

#[derive(Default)]
pub struct Processes {
    running: HashMap<i64, Running>,
}

/// A named thread, or the reason the system gave none (a task limit reached), as an
/// error reply: the agent keeps serving.
fn spawn<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<JoinHandle<T>, QgaError> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(f)
        .map_err(|e| QgaError::generic(format!("cannot start a thread for {name}: {e}")))
}

fn reader(
    name: String,
    mut r: impl Read + Send + 'static,
) -> Result<(Buf, JoinHandle<()>), QgaError> {
    let buf: Buf = Arc::default();
    let b = buf.clone();
    let h = spawn(name, move || {
        let mut chunk = [0u8; 4096];
        loop {
            let n = match r.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if let Ok(mut c) = b.lock() {
                let keep = n.min(MAX_OUTPUT.saturating_sub(c.data.len()));
                c.data.extend_from_slice(&chunk[..keep]);
                c.truncated |= keep < n;
            }
        }
    })?;
    Ok((buf, h))
}

/// Kills a process whose request failed after it started, so it does not run on
/// unseen; `reap` when no waiter thread will (so it does not stay a zombie either).
fn abandon(pid: u32, reap: bool) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
    if reap {
        let _ = nix::sys::wait::waitpid(pid, None);
    }
}

/// The first executable file called `name` in the agent's PATH.
fn in_agent_path(name: &str) -> Option<std::path::PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let dirs = std::env::var_os("PATH")?;
    std::env::split_paths(&dirs)
        .map(|d| d.join(name))
        .find(|p| {
            std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
}

pub fn exec(agent: &mut Agent, mut args: Args) -> CmdResult {
    let path = args.str("path")?;
    let argv = args.opt_str_list("arg")?.unwrap_or_default();
    let env = args.opt_str_list("env")?;
    let input = args.opt_str("input-data")?;
    let capture = args.opt_bool("capture-output")?.unwrap_or(false);
    args.finish()?;
    let input = input.map(|b64| base64::decode(&b64)).transpose()?;
    // glib's spawn (and so qemu-ga) looks a bare name up in the agent's own PATH, also
    // when `env` gives the child another environment; Rust's would search the child's,
    // which has no PATH unless `env` names one.
    let found = match &env {
        Some(_) if !path.contains('/') => in_agent_path(&path),
        _ => None,
    };
    let command = |program: &str, first: Option<&str>| {
        let mut cmd = match &found {
            Some(full) if program == path => {
                let mut c = Command::new(full);
                c.arg0(program);
                c
            }
            _ => Command::new(program),
        };
        cmd.args(first).args(&argv);
        if let Some(env) = &env {
            cmd.env_clear();
            for kv in env {
                if let Some((k, v)) = kv.split_once('=') {
                    cmd.env(k, v);
                }
            }
        }
        cmd.stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
        let out = if capture { Stdio::piped } else { Stdio::null };
        cmd.stdout(out()).stderr(out());
        cmd
    };
    // A file the kernel cannot execute (a script without `#!`) runs through /bin/sh, as
    // glib's spawn (and so qemu-ga) runs it; the error text is glib's too.
    let spawned = match command(&path, None).spawn() {
        Err(e) if e.raw_os_error() == Some(nix::libc::ENOEXEC) => {
            command("/bin/sh", Some(&path)).spawn()
        }
        other => other,
    };
    let mut child = spawned.map_err(|e| {
        let why = match e.raw_os_error() {
            Some(n) => super::errno_text(nix::errno::Errno::from_raw(n)),
            // Refused before any exec (a NUL byte in the path, an argument or `env`).
            None => e.to_string(),
        };
        QgaError::generic(format!(
            "Guest agent command failed, error was 'Failed to execute child process \u{201c}{path}\u{201d} ({why})'"
        ))
    })?;
    let id = child.id();
    let pid = i64::from(id);
    let stdin = child.stdin.take();
    let (stdout, stderr) = (child.stdout.take(), child.stderr.take());
    // The waiter first: from then on the process is reaped whatever else fails.
    let waiter = spawn(format!("guest-exec {pid}"), move || child.wait())
        .inspect_err(|_| abandon(id, true))?;
    let started = (|| {
        if let (Some(data), Some(mut stdin)) = (input, stdin) {
            spawn(format!("guest-exec {pid} stdin"), move || {
                let _ = stdin.write_all(&data);
            })?;
        }
        let mut readers = Vec::new();
        if let Some(o) = stdout {
            let (b, h) = reader(format!("guest-exec {pid} stdout"), o)?;
            readers.push((b, h, "out"));
        }
        if let Some(e) = stderr {
            let (b, h) = reader(format!("guest-exec {pid} stderr"), e)?;
            readers.push((b, h, "err"));
        }
        Ok(readers)
    })();
    let readers = match started {
        Ok(r) => r,
        Err(e) => {
            // The waiter reaps it; the readers already started end with its pipes.
            abandon(id, false);
            return Err(e);
        }
    };
    tracing::info!("guest-exec: started {path} as pid {pid}");
    agent.exec.running.insert(pid, Running { waiter, readers });
    Ok(Some(json!({ "pid": pid })))
}

pub fn status(agent: &mut Agent, mut args: Args) -> CmdResult {
    let pid = args.i64("pid")?;
    args.finish()?;
    let invalid = || QgaError::generic("Invalid parameter 'pid'");
    let r = agent.exec.running.get(&pid).ok_or_else(invalid)?;
    // As qemu-ga: not finished until the output pipes are closed too. A background
    // grandchild can hold them open long after the child exited; joining its readers here
    // would stall every later request.
    if !r.waiter.is_finished() || !r.readers.iter().all(|(_, h, _)| h.is_finished()) {
        return Ok(Some(json!({ "exited": false })));
    }
    let done = agent.exec.running.remove(&pid).ok_or_else(invalid)?;
    let st = done
        .waiter
        .join()
        .map_err(|_| QgaError::generic(format!("pid {pid}: the wait for it failed")))?
        .map_err(|e| QgaError::generic(format!("pid {pid}: {e}")))?;
    let mut m = Map::new();
    m.insert("exited".into(), true.into());
    use std::os::unix::process::ExitStatusExt;
    if let Some(code) = st.code() {
        m.insert("exitcode".into(), code.into());
    } else if let Some(sig) = st.signal() {
        m.insert("signal".into(), sig.into());
    }
    // As qemu-ga: a stream's members only when it wrote something.
    for (buf, h, stream) in done.readers {
        let _ = h.join();
        let c = buf
            .lock()
            .map(|mut c| std::mem::take(&mut *c))
            .unwrap_or_default();
        if !c.data.is_empty() {
            m.insert(format!("{stream}-data"), base64_encode(&c.data).into());
            m.insert(format!("{stream}-truncated"), c.truncated.into());
        }
    }
    Ok(Some(Value::Object(m)))
}
