//! guest-file-* (unsafe: off unless allow-listed): open files on the host's behalf.
//! Handles count up from qemu-ga's 1000 and the counter is kept in the state directory
//! (`qga.state`, qemu-ga's format) so a restarted agent never reuses a handle.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use nixseed_core::channel::base64_encode;
use nixseed_core::qga::{Args, QgaError, base64};
use serde_json::{Value, json};

use super::{Agent, CmdResult, io_text};

pub struct Handles {
    open: HashMap<i64, File>,
    next: i64,
    state: PathBuf,
}

impl Handles {
    pub fn load(state_dir: &std::path::Path) -> Self {
        let state = state_dir.join("qga.state");
        let next = std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| {
                t.lines().find_map(|l| {
                    l.strip_prefix("fd_counter=")
                        .and_then(|v| v.trim().parse().ok())
                })
            })
            .unwrap_or(1000);
        Handles {
            open: HashMap::new(),
            next,
            state,
        }
    }

    fn allocate(&mut self) -> i64 {
        let h = self.next;
        self.next += 1;
        if let Err(e) = std::fs::write(&self.state, format!("[global]\nfd_counter={}\n", self.next))
        {
            tracing::warn!("{}: {e}", self.state.display());
        }
        h
    }
}

fn not_found(h: i64) -> QgaError {
    QgaError::generic(format!("handle '{h}' has not been found"))
}

fn file(agent: &mut Agent, h: i64) -> Result<&mut File, QgaError> {
    agent.files.open.get_mut(&h).ok_or_else(|| not_found(h))
}

pub fn open(agent: &mut Agent, mut args: Args) -> CmdResult {
    let path = args.str("path")?;
    let mode = args.opt_str("mode")?.unwrap_or_else(|| "r".into());
    args.finish()?;
    let mut o = OpenOptions::new();
    match mode.replace('b', "").as_str() {
        "r" => o.read(true),
        "r+" => o.read(true).write(true),
        "w" => o.write(true).create(true).truncate(true),
        "w+" => o.read(true).write(true).create(true).truncate(true),
        "a" => o.append(true).create(true),
        "a+" => o.read(true).append(true).create(true),
        _ => {
            return Err(QgaError::generic(format!(
                "invalid file open mode '{mode}'"
            )));
        }
    };
    confine(&agent.config.file_dirs, &path)?;
    // Non-blocking, as qemu-ga sets its descriptor: a named pipe or a terminal with nothing
    // to read must not stall the agent (every request, freeze and thaw included, waits on
    // it). Here the open itself does not wait either: a FIFO without a writer opens at once.
    o.custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits());
    let f = o.open(&path).map_err(|e| {
        QgaError::generic(format!(
            "failed to open file '{path}' (mode: '{mode}'): {}",
            io_text(&e)
        ))
    })?;
    let h = agent.files.allocate();
    agent.files.open.insert(h, f);
    Ok(Some(Value::from(h)))
}

/// With `--file-dirs`, a path must resolve (links followed, `..` removed) to a place
/// under one of the directories; the file itself may not exist yet.
fn confine(dirs: &[std::path::PathBuf], path: &str) -> Result<(), QgaError> {
    if dirs.is_empty() {
        return Ok(());
    }
    let p = std::path::Path::new(path);
    let resolved = match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) if !p.exists() => {
            std::fs::canonicalize(parent).map(|d| d.join(name))
        }
        _ => std::fs::canonicalize(p),
    };
    let inside = resolved.as_ref().is_ok_and(|r| {
        dirs.iter()
            .any(|d| std::fs::canonicalize(d).is_ok_and(|d| r.starts_with(d)))
    });
    if inside {
        Ok(())
    } else {
        let allowed: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
        Err(QgaError::generic(format!(
            "failed to open file '{path}': outside the directories guest-file-* may use ({})",
            allowed.join(", ")
        )))
    }
}

pub fn close(agent: &mut Agent, mut args: Args) -> CmdResult {
    let h = args.i64("handle")?;
    args.finish()?;
    agent.files.open.remove(&h).ok_or_else(|| not_found(h))?;
    Ok(Some(json!({})))
}

pub fn read(agent: &mut Agent, mut args: Args) -> CmdResult {
    let h = args.i64("handle")?;
    let count = args.opt_i64("count")?.unwrap_or(4096);
    args.finish()?;
    // As qemu-ga: an unknown handle is reported before a bad count.
    let f = file(agent, h)?;
    if !(0..=48 << 20).contains(&count) {
        return Err(QgaError::generic(format!(
            "value '{count}' is invalid for argument count"
        )));
    }
    let mut buf = vec![0u8; count as usize];
    let mut got = 0;
    let mut eof = false;
    while got < buf.len() {
        match f.read(&mut buf[got..]) {
            Ok(0) => {
                eof = true;
                break;
            }
            Ok(n) => got += n,
            // Nothing more to read now (a pipe or terminal): what came so far, not at EOF.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => {
                return Err(QgaError::generic(format!(
                    "failed to read file: {}",
                    io_text(&e)
                )));
            }
        }
    }
    Ok(Some(json!({
        "count": got,
        "buf-b64": base64_encode(&buf[..got]),
        "eof": eof,
    })))
}

pub fn write(agent: &mut Agent, mut args: Args) -> CmdResult {
    let h = args.i64("handle")?;
    let b64 = args.str("buf-b64")?;
    let count = args.opt_i64("count")?;
    args.finish()?;
    // As qemu-ga: the handle, then the data, then the count.
    let f = file(agent, h)?;
    let data = base64::decode(&b64)?;
    let n = match count {
        Some(c) if c < 0 || c as usize > data.len() => {
            return Err(QgaError::generic(format!(
                "value '{c}' is invalid for argument count"
            )));
        }
        Some(c) => c as usize,
        None => data.len(),
    };
    // The descriptor is non-blocking: a full pipe or terminal takes part of the data, and
    // the count says how much, so the host sends only the rest again.
    let mut written = 0;
    while written < n {
        match f.write(&data[written..n]) {
            Ok(0) => break,
            Ok(k) => written += k,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(QgaError::generic(format!(
                    "failed to write to file: {}",
                    io_text(&e)
                )));
            }
        }
    }
    Ok(Some(json!({ "count": written, "eof": false })))
}

/// qemu-ga's `GuestFileWhence`: an integer code, or `set`, `cur`, `end`.
fn whence_code(v: Value) -> Result<i64, QgaError> {
    match v {
        Value::String(s) => match s.as_str() {
            "set" => Ok(0),
            "cur" => Ok(1),
            "end" => Ok(2),
            _ => Err(QgaError::generic(format!(
                "Parameter 'whence' does not accept value '{s}'"
            ))),
        },
        Value::Number(n) => n.as_i64().ok_or_else(|| {
            QgaError::generic("Invalid parameter type for 'whence', expected: integer")
        }),
        _ => Err(QgaError::generic(
            "Invalid parameter type for 'whence', expected: GuestFileWhence",
        )),
    }
}

pub fn seek(agent: &mut Agent, mut args: Args) -> CmdResult {
    let h = args.i64("handle")?;
    let offset = args.i64("offset")?;
    let whence = whence_code(args.value("whence")?)?;
    args.finish()?;
    // As qemu-ga: the type of `whence` is checked with the arguments, its value after the
    // handle is found.
    let f = file(agent, h)?;
    // A negative absolute offset is what lseek(2) refuses with EINVAL, as qemu-ga reports.
    let invalid = || QgaError::generic("failed to seek file: Invalid argument");
    let pos = match whence {
        0 => SeekFrom::Start(u64::try_from(offset).map_err(|_| invalid())?),
        1 => SeekFrom::Current(offset),
        2 => SeekFrom::End(offset),
        _ => return Err(QgaError::generic(format!("invalid whence code {whence}"))),
    };
    let p = f
        .seek(pos)
        .map_err(|e| QgaError::generic(format!("failed to seek file: {}", io_text(&e))))?;
    Ok(Some(json!({ "position": p, "eof": false })))
}

pub fn flush(agent: &mut Agent, mut args: Args) -> CmdResult {
    let h = args.i64("handle")?;
    args.finish()?;
    file(agent, h)?
        .flush()
        .map_err(|e| QgaError::generic(format!("failed to flush file: {}", io_text(&e))))?;
    Ok(Some(json!({})))
}
