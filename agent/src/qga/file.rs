//! guest-file-* (unsafe: off unless allow-listed): open files on the host's behalf.
//! Handles count up from qemu-ga's 1000 and the counter is kept in the state directory
//! (`qga.state`, qemu-ga's format) so a restarted agent never reuses a handle.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use nixseed_core::channel::base64_encode;
use nixseed_core::qga::{Args, QgaError, base64};
use rustix::fs::{Mode, OFlags, ResolveFlags};
use serde_json::{Value, json};

use super::{Agent, CmdResult, io_text};

/// The files guest-file-open opened, by handle.
pub struct Handles {
    open: HashMap<i64, File>,
    next: i64,
    state: PathBuf,
    /// The most files kept open at once (see [`handle_limit`]).
    limit: usize,
}

/// How many guest-file handles may be open at once: 512, or half the soft descriptor
/// limit when that is lower, so the host can never take every descriptor the agent needs
/// for its ports, its connections and guest-exec's pipes.
pub(super) fn handle_limit(soft_nofile: Option<u64>) -> usize {
    const MOST: u64 = 512;
    let half = soft_nofile.map_or(MOST, |n| n / 2);
    usize::try_from(half.clamp(1, MOST)).unwrap_or(1)
}

impl Handles {
    /// Closes every open handle.
    pub fn close_all(&mut self) {
        self.open.clear();
    }

    /// The handle counter as a previous agent left it in `state_dir` (1000 when none).
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
        let soft = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
        Handles {
            open: HashMap::new(),
            next,
            state,
            limit: handle_limit(soft),
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
    let Some(access) = mode_flags(&mode) else {
        return Err(QgaError::generic(format!(
            "invalid file open mode '{mode}'"
        )));
    };
    if agent.files.open.len() >= agent.files.limit {
        return Err(QgaError::generic(format!(
            "failed to open file '{path}': {} guest-file handles are open, the most \
             guest-file-open keeps; close one with guest-file-close first",
            agent.files.limit
        )));
    }
    // As qemu-ga opens: non-blocking, so a named pipe or a terminal with nothing to read
    // (or no writer yet) never stalls the agent, whose every request, thaw included, waits
    // on it; and never the agent's controlling terminal. Not inherited by guest-exec.
    let flags = access | OFlags::NOCTTY | OFlags::NONBLOCK | OFlags::CLOEXEC;
    let fd = if agent.config.file_dirs.is_empty() {
        rustix::fs::open(path.as_str(), flags, NEW_FILE_MODE)
            .map_err(|e| open_failed(&path, &mode, e))?
    } else {
        open_confined(&agent.config.file_dirs, &path, &mode, flags)?
    };
    let h = agent.files.allocate();
    agent.files.open.insert(h, File::from(fd));
    Ok(Some(Value::from(h)))
}

/// Permissions of a file guest-file-open creates, before the umask.
const NEW_FILE_MODE: Mode = Mode::from_bits_truncate(0o666);

/// The access flags of one of qemu-ga's (fopen's) open modes; None for any other text.
fn mode_flags(mode: &str) -> Option<OFlags> {
    Some(match mode {
        "r" | "rb" => OFlags::RDONLY,
        "r+" | "rb+" | "r+b" => OFlags::RDWR,
        "w" | "wb" => OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC,
        "w+" | "wb+" | "w+b" => OFlags::RDWR | OFlags::CREATE | OFlags::TRUNC,
        "a" | "ab" => OFlags::WRONLY | OFlags::CREATE | OFlags::APPEND,
        "a+" | "ab+" | "a+b" => OFlags::RDWR | OFlags::CREATE | OFlags::APPEND,
        _ => return None,
    })
}

fn open_failed(path: &str, mode: &str, e: rustix::io::Errno) -> QgaError {
    QgaError::generic(format!(
        "failed to open file '{path}' (mode: '{mode}'): {}",
        io_text(&std::io::Error::from(e))
    ))
}

fn outside(dirs: &[PathBuf], path: &str) -> QgaError {
    let allowed: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    QgaError::generic(format!(
        "failed to open file '{path}': outside the directories guest-file-* may use ({})",
        allowed.join(", ")
    ))
}

/// With `--file-dirs`: opens `path` from inside the allowed directory that holds it. The
/// path is resolved (links followed, `..` removed) to find that directory; the open then
/// starts at the directory and the kernel keeps every step of it, links included, beneath
/// the directory (openat2 `RESOLVE_BENEATH`). So a dangling link to a file outside, or a
/// link swapped in after the path was resolved, is refused instead of followed, and
/// nothing is ever created outside. Links that stay inside work.
fn open_confined(
    dirs: &[PathBuf],
    path: &str,
    mode: &str,
    flags: OFlags,
) -> Result<std::os::fd::OwnedFd, QgaError> {
    let Some((dir, rel)) = locate(dirs, Path::new(path)) else {
        return Err(outside(dirs, path));
    };
    let dirfd = rustix::fs::open(
        &dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| open_failed(path, mode, e))?;
    let rel = if rel.as_os_str().is_empty() {
        Path::new(".")
    } else {
        rel.as_path()
    };
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
    // openat2 refuses a mode (EINVAL) unless the open may create.
    let create_mode = if flags.contains(OFlags::CREATE) {
        NEW_FILE_MODE
    } else {
        Mode::empty()
    };
    // EAGAIN: a rename raced with the walk and the kernel could not vouch for a `..`;
    // trying again is what openat2(2) advises.
    let mut tries = 0;
    loop {
        match rustix::fs::openat2(&dirfd, rel, flags, create_mode, resolve) {
            Ok(fd) => return Ok(fd),
            Err(rustix::io::Errno::AGAIN) if tries < 3 => tries += 1,
            Err(rustix::io::Errno::XDEV) => return Err(outside(dirs, path)),
            Err(rustix::io::Errno::NOSYS) => {
                return Err(QgaError::generic(format!(
                    "failed to open file '{path}': file-dirs needs openat2, which this \
                     kernel lacks (Linux 5.6 or later)"
                )));
            }
            Err(e) => return Err(open_failed(path, mode, e)),
        }
    }
}

/// The allowed directory (resolved) that holds `path` once resolved, and the rest of
/// the resolved path below it; None when no allowed directory holds it. A last component
/// that does not resolve (a file still to be made, or a dangling link) is kept as it is,
/// for the open beneath the directory to create or refuse.
fn locate(dirs: &[PathBuf], p: &Path) -> Option<(PathBuf, PathBuf)> {
    let resolved = match (p.parent(), p.file_name()) {
        (Some(parent), Some(name)) if !p.exists() => {
            std::fs::canonicalize(parent).map(|d| d.join(name))
        }
        _ => std::fs::canonicalize(p),
    }
    .ok()?;
    dirs.iter().find_map(|d| {
        let d = std::fs::canonicalize(d).ok()?;
        let rel = resolved.strip_prefix(&d).ok()?.to_path_buf();
        Some((d, rel))
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    /// qemu-ga's mode names and no others (`br` and `rbb` are refused, as in qemu-ga).
    #[test]
    fn open_modes_are_qemu_gas() {
        assert_eq!(mode_flags("rb"), Some(OFlags::RDONLY));
        assert_eq!(mode_flags("r+b"), mode_flags("rb+"));
        assert_eq!(
            mode_flags("a"),
            Some(OFlags::WRONLY | OFlags::CREATE | OFlags::APPEND)
        );
        assert_eq!(
            mode_flags("w+b"),
            Some(OFlags::RDWR | OFlags::CREATE | OFlags::TRUNC)
        );
        for bad in ["br", "rbb", "x", "", "R"] {
            assert_eq!(mode_flags(bad), None, "{bad}");
        }
    }

    #[test]
    fn handles_stay_below_the_descriptor_limit() {
        assert_eq!(handle_limit(Some(1024)), 512);
        assert_eq!(handle_limit(Some(524_288)), 512);
        assert_eq!(handle_limit(None), 512);
        assert_eq!(handle_limit(Some(64)), 32);
        assert_eq!(handle_limit(Some(1)), 1);
    }
}
