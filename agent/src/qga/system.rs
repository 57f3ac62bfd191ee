//! Facts about the guest: time, OS, host name, time zone, users, vCPUs, load, memory
//! blocks, CPU and disk counters. Each reads one kernel or /etc source; the parsing is
//! in nixseed-core. Two setters: the clock and the vCPUs' online state.

use std::time::{SystemTime, UNIX_EPOCH};

use nix::time::{ClockId, clock_settime};
use nixseed_core::qga::sysparse::{
    os_release, proc_diskstats, proc_stat_cpus, tzif_zone_at, utmp_users,
};
use nixseed_core::qga::{Args, QgaError};
use serde_json::{Map, Value, json};

use super::registry::BoxFuture;
use super::{Agent, CmdResult, errno_text};

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
}

/// A kernel file's text, or the command's error naming it.
fn read_text(path: &str) -> Result<String, QgaError> {
    std::fs::read_to_string(path).map_err(|e| QgaError::generic(format!("cannot read {path}: {e}")))
}

pub fn get_time(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    Ok(Some(Value::from(now_ns())))
}

/// 2070-01-01T00:00:00Z: qemu-ga refuses times outside [1970, 2070).
const YEAR_2070: i64 = 3_155_760_000;

pub fn set_time(_: &mut Agent, mut args: Args) -> CmdResult {
    let time = args.opt_i64("time")?;
    args.finish()?;
    match time {
        Some(ns) => {
            let sec = ns / 1_000_000_000;
            if !(0..YEAR_2070).contains(&sec) {
                return Err(QgaError::generic("Invalid time"));
            }
            let usec = (ns % 1_000_000_000) / 1000;
            if usec < 0 {
                return Err(QgaError::generic(
                    "Failed to set time to guest: Invalid argument",
                ));
            }
            let ts = nix::sys::time::TimeSpec::new(sec, usec * 1000);
            clock_settime(ClockId::CLOCK_REALTIME, ts).map_err(|e| {
                QgaError::generic(format!("Failed to set time to guest: {}", errno_text(e)))
            })?;
            // Keep the RTC in step, as qemu-ga does; a guest without hwclock still
            // has the right system time.
            run_hwclock("-w").ok();
        }
        None => run_hwclock("-s")?,
    }
    Ok(Some(json!({})))
}

fn run_hwclock(flag: &str) -> Result<(), QgaError> {
    let status = std::process::Command::new("hwclock")
        .arg(flag)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .map_err(|e| QgaError::generic(format!("cannot run hwclock {flag}: {e}")))?;
    if status.success() {
        Ok(())
    } else {
        Err(QgaError::generic(format!(
            "hwclock {flag} failed: {status}"
        )))
    }
}

pub fn get_osinfo(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    let text = std::fs::read_to_string("/etc/os-release")
        .or_else(|_| std::fs::read_to_string("/usr/lib/os-release"))
        .unwrap_or_default();
    let rel = os_release(&text);
    let uts = nix::sys::utsname::uname()
        .map_err(|e| QgaError::generic(format!("uname failed: {}", errno_text(e))))?;
    let mut m = Map::new();
    let s = |o: &std::ffi::OsStr| Value::String(o.to_string_lossy().into_owned());
    m.insert("kernel-release".into(), s(uts.release()));
    m.insert("kernel-version".into(), s(uts.version()));
    m.insert("machine".into(), s(uts.machine()));
    for (key, field) in [
        ("ID", "id"),
        ("NAME", "name"),
        ("PRETTY_NAME", "pretty-name"),
        ("VERSION", "version"),
        ("VERSION_ID", "version-id"),
        ("VARIANT", "variant"),
        ("VARIANT_ID", "variant-id"),
    ] {
        if let Some(v) = rel.get(key) {
            m.insert(field.into(), Value::String(v.clone()));
        }
    }
    Ok(Some(Value::Object(m)))
}

pub fn get_host_name(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    let h = nix::unistd::gethostname()
        .map_err(|e| QgaError::generic(format!("gethostname failed: {}", errno_text(e))))?;
    Ok(Some(json!({"host-name": h.to_string_lossy()})))
}

pub fn get_timezone(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    let now = now_ns() / 1_000_000_000;
    let data = match std::env::var("TZ") {
        Ok(tz) if !tz.is_empty() => {
            let name = tz.trim_start_matches(':');
            let path = if name.starts_with('/') {
                name.to_string()
            } else {
                format!("/usr/share/zoneinfo/{name}")
            };
            std::fs::read(path).ok()
        }
        _ => std::fs::read("/etc/localtime").ok(),
    };
    let (zone, offset) = data
        .and_then(|d| tzif_zone_at(&d, now))
        .unwrap_or_else(|| ("UTC".into(), 0));
    Ok(Some(json!({"zone": zone, "offset": offset})))
}

pub fn get_users(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    let data = std::fs::read("/run/utmp")
        .or_else(|_| std::fs::read("/var/run/utmp"))
        .unwrap_or_default();
    let users: Vec<Value> = utmp_users(&data)
        .into_iter()
        .map(|u| json!({"user": u.user, "login-time": u.login_time}))
        .collect();
    Ok(Some(Value::Array(users)))
}

pub fn get_vcpus(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    let mut ids: Vec<u64> = std::fs::read_dir("/sys/devices/system/cpu")
        .map_err(|e| QgaError::generic(format!("/sys/devices/system/cpu: {e}")))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("cpu"))
                .and_then(|n| n.parse().ok())
        })
        .collect();
    // Highest first, the order qemu-ga reports.
    ids.sort_unstable_by(|a, b| b.cmp(a));
    let cpus: Vec<Value> = ids
        .into_iter()
        .map(|id| {
            let online = std::fs::read_to_string(format!("/sys/devices/system/cpu/cpu{id}/online"));
            json!({
                "logical-id": id,
                "online": online.as_deref().map(|s| s.trim() == "1").unwrap_or(true),
                "can-offline": online.is_ok(),
            })
        })
        .collect();
    Ok(Some(Value::Array(cpus)))
}

const CPU_DIR: &str = "/sys/devices/system/cpu";

/// guest-set-vcpus (what `virsh guestvcpus --enable/--disable` and `virsh setvcpus
/// --guest` send): takes logical CPUs on or off line through sysfs, as qemu-ga does. The
/// whole request is checked first; then the CPUs in order, stopping at the first that
/// fails. The answer is how many were done; the error only when none was.
pub fn set_vcpus(_: &mut Agent, mut args: Args) -> CmdResult {
    let wanted = wanted_states(&mut args, "vcpus", |cpu| cpu.i64("logical-id"))?;
    args.finish()?;
    let mut done = 0u64;
    for (id, online) in wanted {
        match set_vcpu(std::path::Path::new(CPU_DIR), id, online) {
            Ok(()) => done += 1,
            Err(e) if done == 0 => return Err(e),
            Err(e) => {
                tracing::warn!("guest-set-vcpus: stopped after {done}: {}", e.desc);
                break;
            }
        }
    }
    Ok(Some(json!(done)))
}

/// The `(id, online)` pairs of a guest-set-vcpus or guest-set-memory-blocks request
/// (`GuestLogicalProcessor`, `GuestMemoryBlock`: an id, `online`, an ignored
/// `can-offline`), checked element by element in the order of qemu's visitor.
fn wanted_states<T>(
    args: &mut Args,
    list: &str,
    id: impl Fn(&mut Args) -> Result<T, QgaError>,
) -> Result<Vec<(T, bool)>, QgaError> {
    let mut wanted = Vec::new();
    for item in args.object_list(list)? {
        let mut item = item?;
        let id = id(&mut item)?;
        let online = item.bool("online")?;
        item.opt_bool("can-offline")?;
        item.finish()?;
        wanted.push((id, online));
    }
    Ok(wanted)
}

/// One CPU's `online` file brought to `online`; the error texts are qemu-ga's. A CPU with
/// no such file (the boot CPU) is always on line: asking for that is a success, taking
/// it off line an error.
fn set_vcpu(root: &std::path::Path, id: i64, online: bool) -> Result<(), QgaError> {
    use std::os::unix::fs::FileExt;
    let os =
        |e: &std::io::Error| errno_text(nix::errno::Errno::from_raw(e.raw_os_error().unwrap_or(0)));
    let dir = format!("{}/cpu{id}/", root.display());
    match std::fs::metadata(&dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(QgaError::generic(format!(
                "open(\"{dir}\"): Not a directory"
            )));
        }
        Err(e) => return Err(QgaError::generic(format!("open(\"{dir}\"): {}", os(&e)))),
    }
    let file = format!("{dir}/online");
    let f = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&file)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return if online {
                Ok(())
            } else {
                Err(QgaError::generic(format!(
                    "logical processor #{id} can't be offlined"
                )))
            };
        }
        Err(e) => return Err(QgaError::generic(format!("open(\"{file}\"): {}", os(&e)))),
    };
    let mut status = [0u8; 1];
    match f.read_at(&mut status, 0) {
        Ok(0) => {
            return Err(QgaError::generic(format!(
                "pread(\"{file}\"): unexpected EOF"
            )));
        }
        Ok(_) => {}
        Err(e) => return Err(QgaError::generic(format!("pread(\"{file}\"): {}", os(&e)))),
    }
    if (status[0] != b'0') != online {
        let value: &[u8] = if online { b"1" } else { b"0" };
        f.write_at(value, 0)
            .map_err(|e| QgaError::generic(format!("pwrite(\"{file}\"): {}", os(&e))))?;
        tracing::info!(
            "guest-set-vcpus: CPU {id} {}",
            if online { "on line" } else { "off line" }
        );
    }
    Ok(())
}

pub fn get_load(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    let text = read_text("/proc/loadavg")?;
    let f: Vec<f64> = text
        .split_whitespace()
        .take(3)
        .filter_map(|x| x.parse().ok())
        .collect();
    if f.len() < 3 {
        return Err(QgaError::generic("/proc/loadavg: unexpected format"));
    }
    // QEMU's GuestLoadAverage (10.0): load1m, load5m, load15m.
    Ok(Some(
        json!({"load1m": f[0], "load5m": f[1], "load15m": f[2]}),
    ))
}

pub fn get_memory_block_info(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    let path = "/sys/devices/system/memory/block_size_bytes";
    let text = read_text(path)?;
    let size = u64::from_str_radix(text.trim(), 16)
        .map_err(|_| QgaError::generic(format!("{path}: not a hex number")))?;
    Ok(Some(json!({"size": size})))
}

const MEMORY_DIR: &str = "/sys/devices/system/memory";

/// Every `memoryN` block in sysfs, in directory order as qemu-ga lists them: online when
/// its `state` says so, offlinable when `removable` is not 0. A kernel without `state`
/// (memory that cannot be hot-plugged) has its blocks online and fixed; a system without
/// the directory has no blocks to list.
pub fn get_memory_blocks(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    let entries = match std::fs::read_dir(MEMORY_DIR) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(json!([]))),
        Err(e) => return Err(QgaError::generic(format!("cannot list {MEMORY_DIR}: {e}"))),
    };
    let read = |path: std::path::PathBuf| match std::fs::read_to_string(&path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(QgaError::generic(format!(
            "cannot read {}: {e}",
            path.display()
        ))),
    };
    let mut blocks = Vec::new();
    for entry in entries {
        let entry =
            entry.map_err(|e| QgaError::generic(format!("cannot list {MEMORY_DIR}: {e}")))?;
        let name = entry.file_name();
        let Some(index) = name.to_str().and_then(|n| n.strip_prefix("memory")) else {
            continue;
        };
        if !entry.file_type().is_ok_and(|t| t.is_dir()) {
            continue;
        }
        let digits: String = index.chars().take_while(char::is_ascii_digit).collect();
        let dir = entry.path();
        let (online, can_offline) = match read(dir.join("state"))? {
            None => (true, false),
            Some(state) => (
                state.starts_with("online"),
                read(dir.join("removable"))?.is_some_and(|r| !r.starts_with('0')),
            ),
        };
        blocks.push(json!({
            "phys-index": digits.parse::<u64>().unwrap_or(0),
            "online": online,
            "can-offline": can_offline,
        }));
    }
    if blocks.is_empty() {
        return Err(QgaError::generic("guest reported zero memory blocks!"));
    }
    Ok(Some(Value::Array(blocks)))
}

/// guest-set-memory-blocks: brings each listed block's `state` on or off line, as
/// qemu-ga does, and answers block by block: `success`, `not-found`,
/// `operation-not-supported` or `operation-failed`, with the errno as `error-code` where
/// qemu-ga gives one. The whole request is checked first. Taking memory off line makes
/// the kernel migrate its pages first, which can take long, so the writes run off the
/// agent's thread and the control channel keeps answering meanwhile.
pub fn set_memory_blocks(_: &mut Agent, mut args: Args) -> BoxFuture<'_> {
    Box::pin(async move {
        let wanted = wanted_states(&mut args, "mem-blks", |block| block.u64("phys-index"))?;
        args.finish()?;
        let answers = tokio::task::spawn_blocking(move || {
            let root = std::path::Path::new(MEMORY_DIR);
            wanted
                .into_iter()
                .map(|(index, online)| {
                    let (response, code) = set_memory_block(root, index, online);
                    let mut answer = json!({"phys-index": index, "response": response});
                    if let Some(code) = code {
                        answer["error-code"] = json!(code);
                    }
                    answer
                })
                .collect::<Vec<_>>()
        })
        .await
        .map_err(|e| QgaError::generic(format!("guest-set-memory-blocks: {e}")))?;
        Ok(Some(Value::Array(answers)))
    })
}

/// One block brought to `online`: the response and the errno qemu-ga reports with it.
/// qemu-ga's answers where a file is missing are kept as they are: a kernel without the
/// `state` file cannot change the block, so on line is a success (with ENOENT) and off
/// line is not supported; a block already in the wanted state is a success without a
/// write.
fn set_memory_block(
    root: &std::path::Path,
    index: u64,
    online: bool,
) -> (&'static str, Option<i32>) {
    use std::io::ErrorKind::NotFound;
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let code = |e: &std::io::Error| Some(e.raw_os_error().unwrap_or(0));
    if let Err(e) = std::fs::read_dir(root) {
        let response = if e.kind() == NotFound {
            "operation-not-supported"
        } else {
            "success"
        };
        return (response, code(&e));
    }
    // qemu-ga prints the index as a signed number into the path.
    let dir = root.join(format!("memory{}", index as i64));
    if let Err(e) = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY)
        .open(&dir)
    {
        let response = if e.kind() == NotFound {
            "not-found"
        } else {
            "operation-failed"
        };
        return (response, code(&e));
    }
    let state = dir.join("state");
    let mut status = [0u8; 10];
    let read = std::fs::File::open(&state).and_then(|f| f.read_at(&mut status, 0));
    let current_online = match read {
        Ok(0) => return ("operation-failed", Some(0)),
        Ok(n) => status[..n].starts_with(b"online"),
        Err(e) if e.kind() == NotFound => {
            let response = if online {
                "success"
            } else {
                "operation-not-supported"
            };
            return (response, code(&e));
        }
        Err(e) => return ("operation-failed", code(&e)),
    };
    if current_online != online {
        let new_state = if online { "online" } else { "offline" };
        let written = std::fs::OpenOptions::new()
            .write(true)
            .open(&state)
            .and_then(|f| f.write_at(new_state.as_bytes(), 0));
        if let Err(e) = written {
            tracing::warn!("guest-set-memory-blocks: memory block {index} not {new_state}: {e}");
            return ("operation-failed", code(&e));
        }
        tracing::info!("guest-set-memory-blocks: memory block {index} {new_state}");
    }
    ("success", None)
}

/// Per-CPU times from /proc/stat in milliseconds (QEMU's GuestLinuxCpuStats). Members
/// the kernel does not print are left out.
pub fn get_cpustats(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    const NAMES: [&str; 10] = [
        "user",
        "nice",
        "system",
        "idle",
        "iowait",
        "irq",
        "softirq",
        "steal",
        "guest",
        "guestnice",
    ];
    let text = read_text("/proc/stat")?;
    let hz = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .and_then(|v| u64::try_from(v).ok())
        .filter(|v| *v > 0)
        .unwrap_or(100);
    let cpus: Vec<Value> = proc_stat_cpus(&text)
        .into_iter()
        .map(|c| {
            let mut m = Map::new();
            m.insert("type".into(), json!("linux"));
            m.insert("cpu".into(), json!(c.cpu));
            for (name, ticks) in NAMES.iter().zip(&c.ticks) {
                m.insert((*name).into(), json!(ticks.saturating_mul(1000) / hz));
            }
            Value::Object(m)
        })
        .collect();
    Ok(Some(Value::Array(cpus)))
}

/// Per-device I/O counters from /proc/diskstats (QEMU's GuestDiskStatsInfo). The member
/// set follows the line's length: the four counters of an old-style partition line, or
/// the eleven of every kernel since 2.6, then discard (4.18) and flush (5.5) counters.
pub fn get_diskstats(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    const FULL: [&str; 17] = [
        "read-ios",
        "read-merges",
        "read-sectors",
        "read-ticks",
        "write-ios",
        "write-merges",
        "write-sectors",
        "write-ticks",
        "ios-pgr",
        "total-ticks",
        "weight-ticks",
        "discard-ios",
        "discard-merges",
        "discard-sectors",
        "discard-ticks",
        "flush-ios",
        "flush-ticks",
    ];
    const PARTITION: [&str; 4] = ["read-ios", "read-sectors", "write-ios", "write-sectors"];
    let text = read_text("/proc/diskstats")?;
    let disks: Vec<Value> = proc_diskstats(&text)
        .into_iter()
        .map(|d| {
            let n = d.counters.len();
            let names: &[&str] = match n {
                4 => &PARTITION,
                17.. => &FULL,
                15.. => &FULL[..15],
                11.. => &FULL[..11],
                _ => &[],
            };
            let stats: Map<String, Value> = names
                .iter()
                .zip(&d.counters)
                .map(|(k, v)| ((*k).to_string(), json!(v)))
                .collect();
            json!({"name": d.name, "major": d.major, "minor": d.minor, "stats": stats})
        })
        .collect();
    Ok(Some(Value::Array(disks)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake of a sysfs device directory: a temporary directory holding the empty
    /// directories `{prefix}0` to `{prefix}{count - 1}`.
    fn fake_sysfs(prefix: &str, count: u32) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for n in 0..count {
            std::fs::create_dir(root.path().join(format!("{prefix}{n}"))).unwrap();
        }
        root
    }

    /// A fake of sysfs's CPU directory (plain files in a temporary directory): the
    /// decisions and error texts of `set_vcpu`, without touching this machine's CPUs.
    #[test]
    fn set_vcpu_writes_only_a_change_and_refuses_the_boot_cpu() {
        let root = fake_sysfs("cpu", 3);
        let cpu = |n: u32| root.path().join(format!("cpu{n}"));
        std::fs::write(cpu(1).join("online"), "1\n").unwrap();
        std::fs::write(cpu(2).join("online"), "").unwrap();
        let state = || std::fs::read_to_string(cpu(1).join("online")).unwrap();

        set_vcpu(root.path(), 0, true).unwrap();
        let e = set_vcpu(root.path(), 0, false).unwrap_err();
        assert_eq!(e.desc, "logical processor #0 can't be offlined");

        set_vcpu(root.path(), 1, true).unwrap();
        assert_eq!(state(), "1\n", "a CPU already on line is left alone");
        set_vcpu(root.path(), 1, false).unwrap();
        assert_eq!(state(), "0\n");
        set_vcpu(root.path(), 1, true).unwrap();
        assert_eq!(state(), "1\n");

        let e = set_vcpu(root.path(), 2, true).unwrap_err();
        assert_eq!(
            e.desc,
            format!(
                "pread(\"{}/cpu2//online\"): unexpected EOF",
                root.path().display()
            )
        );
        let e = set_vcpu(root.path(), 3, true).unwrap_err();
        assert_eq!(
            e.desc,
            format!(
                "open(\"{}/cpu3/\"): No such file or directory",
                root.path().display()
            )
        );
    }

    /// A fake of sysfs's memory directory (plain files in a temporary directory): the
    /// answers `set_memory_block` gives for each shape qemu-ga distinguishes, without
    /// touching this machine's memory.
    #[test]
    fn set_memory_block_answers_as_qemu_ga_does() {
        let root = fake_sysfs("memory", 4);
        let block = |n: u32| root.path().join(format!("memory{n}"));
        std::fs::write(block(0).join("state"), "online\n").unwrap();
        std::fs::create_dir(block(2).join("state")).unwrap();
        std::os::unix::fs::symlink("/dev/full", block(3).join("state")).unwrap();
        let state = || std::fs::read_to_string(block(0).join("state")).unwrap();
        let set = |n: u64, online: bool| set_memory_block(root.path(), n, online);

        assert_eq!(set(0, true), ("success", None));
        assert_eq!(state(), "online\n", "a block already on line is left alone");
        assert_eq!(set(0, false), ("success", None));
        assert!(state().starts_with("offline"), "{}", state());
        assert_eq!(set(0, true), ("success", None));
        assert!(state().starts_with("online"), "{}", state());

        // No `state` file: the block cannot change.
        assert_eq!(set(1, true), ("success", Some(2)));
        assert_eq!(set(1, false), ("operation-not-supported", Some(2)));
        // `state` unreadable (EISDIR) and unwritable (/dev/full reads as zeros, so
        // off line, and refuses the write with ENOSPC).
        assert_eq!(set(2, true), ("operation-failed", Some(21)));
        assert_eq!(set(3, true), ("operation-failed", Some(28)));
        assert_eq!(set(3, false), ("success", None));

        assert_eq!(set(9, true), ("not-found", Some(2)));
        assert_eq!(set(u64::MAX, true), ("not-found", Some(2)));
        std::fs::write(block(1).join("x"), "").unwrap();
        let not_a_dir = root.path().join("memory1").join("x");
        assert_eq!(
            set_memory_block(&not_a_dir, 0, true),
            ("success", Some(20)),
            "qemu-ga's answer when the memory directory cannot be listed"
        );
        assert_eq!(
            set_memory_block(&root.path().join("none"), 0, true),
            ("operation-not-supported", Some(2))
        );
    }
}
