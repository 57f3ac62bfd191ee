//! guest-exec and guest-exec-status (unsafe: off unless allow-listed). A process runs
//! detached from the request; its output is collected by two reader threads and
//! handed over, base64, when the host asks for its status after it exits. As in
//! qemu-ga, each stream keeps at most 16 MiB; the rest is read and dropped, and a
//! process is reaped as soon as it exits (a third thread waits for it), so no zombie is
//! left for a host that never asks.

use std::collections::HashMap;
use std::io::{Read, Write};
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

fn reader(mut r: impl Read + Send + 'static) -> (Buf, JoinHandle<()>) {
    let buf: Buf = Arc::default();
    let b = buf.clone();
    let h = std::thread::spawn(move || {
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
    });
    (buf, h)
}

pub fn exec(agent: &mut Agent, mut args: Args) -> CmdResult {
    let path = args.str("path")?;
    let argv = args.opt_str_list("arg")?.unwrap_or_default();
    let env = args.opt_str_list("env")?;
    let input = args.opt_str("input-data")?;
    let capture = args.opt_bool("capture-output")?.unwrap_or(false);
    args.finish()?;
    let input = input.map(|b64| base64::decode(&b64)).transpose()?;
    let mut cmd = Command::new(&path);
    cmd.args(&argv);
    if let Some(env) = env {
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
    let mut child = cmd.spawn().map_err(|e| {
        QgaError::generic(format!(
            "Guest agent command failed, error was '{path}: {e}'"
        ))
    })?;
    if let (Some(data), Some(mut stdin)) = (input, child.stdin.take()) {
        std::thread::spawn(move || {
            let _ = stdin.write_all(&data);
        });
    }
    let mut readers = Vec::new();
    if let Some(o) = child.stdout.take() {
        let (b, h) = reader(o);
        readers.push((b, h, "out"));
    }
    if let Some(e) = child.stderr.take() {
        let (b, h) = reader(e);
        readers.push((b, h, "err"));
    }
    let pid = i64::from(child.id());
    let waiter = std::thread::Builder::new()
        .name(format!("guest-exec {pid}"))
        .spawn(move || child.wait())
        .map_err(|e| QgaError::generic(format!("cannot wait for pid {pid} ({path}): {e}")))?;
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
