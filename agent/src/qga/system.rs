//! Facts about the guest: time, OS, host name, time zone, users, vCPUs, load, memory
//! blocks. Each reads one kernel or /etc source; the parsing is in nixseed-core.

use std::time::{SystemTime, UNIX_EPOCH};

use nix::time::{ClockId, clock_settime};
use nixseed_core::qga::sysparse::{os_release, tzif_zone_at, utmp_users};
use nixseed_core::qga::{Args, QgaError};
use serde_json::{Map, Value, json};

use super::{Agent, CmdResult, errno_text};

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() as i64)
        .unwrap_or(0)
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

pub fn get_load(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    let text = std::fs::read_to_string("/proc/loadavg")
        .map_err(|e| QgaError::generic(format!("cannot read /proc/loadavg: {e}")))?;
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
    let text = std::fs::read_to_string(path)
        .map_err(|e| QgaError::generic(format!("cannot read {path}: {e}")))?;
    let size = u64::from_str_radix(text.trim(), 16)
        .map_err(|_| QgaError::generic(format!("{path}: not a hex number")))?;
    Ok(Some(json!({"size": size})))
}
