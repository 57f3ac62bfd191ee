//! Pure parsers for the system files guest-agent commands read: os-release, utmp,
//! TZif, /proc/net/{dev,route,ipv6_route,tcp}, mountinfo and qemu-ga.conf. The agent
//! reads the bytes; these functions decide what they mean.

use std::collections::BTreeMap;

/// `KEY=value` lines of os-release, quotes removed.
pub fn os_release(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|x| x.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
                .unwrap_or(v);
            out.insert(
                k.trim().to_string(),
                v.replace("\\\"", "\"").replace("\\\\", "\\"),
            );
        }
    }
    out
}

/// A logged-in user from utmp.
#[derive(Debug, Clone, PartialEq)]
pub struct UtmpUser {
    pub user: String,
    /// Seconds since the epoch, with microseconds.
    pub login_time: f64,
}

const UTMP_RECORD: usize = 384;
const USER_PROCESS: i16 = 7;

fn cstr(b: &[u8]) -> String {
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}

/// Users with a USER_PROCESS record (x86_64/aarch64 glibc layout), each once, with
/// the earliest login time, in order of first appearance.
pub fn utmp_users(data: &[u8]) -> Vec<UtmpUser> {
    let mut out: Vec<UtmpUser> = Vec::new();
    for rec in data.chunks_exact(UTMP_RECORD) {
        let kind = i16::from_le_bytes([rec[0], rec[1]]);
        if kind != USER_PROCESS {
            continue;
        }
        let user = cstr(&rec[44..76]);
        if user.is_empty() {
            continue;
        }
        let sec = i32::from_le_bytes([rec[340], rec[341], rec[342], rec[343]]);
        let usec = i32::from_le_bytes([rec[344], rec[345], rec[346], rec[347]]);
        let t = f64::from(sec) + f64::from(usec) / 1_000_000.0;
        match out.iter_mut().find(|u| u.user == user) {
            Some(u) if t < u.login_time => u.login_time = t,
            Some(_) => {}
            None => out.push(UtmpUser {
                user,
                login_time: t,
            }),
        }
    }
    out
}

/// The zone abbreviation and UTC offset (seconds east) in force at `now` according to
/// a TZif file; `None` when the data is not TZif. After the last transition a version 2+
/// file's footer (a POSIX TZ string such as `AEST-10AEDT,M10.1.0,M4.1.0/3`) decides, as
/// glib (and so qemu-ga) reads it: "slim" files, zic's default, list no transitions
/// beyond the year they were built.
pub fn tzif_zone_at(data: &[u8], now: i64) -> Option<(String, i32)> {
    fn be32(b: &[u8], at: usize) -> Option<i32> {
        Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
    }
    fn be64(b: &[u8], at: usize) -> Option<i64> {
        Some(i64::from_be_bytes(b.get(at..at + 8)?.try_into().ok()?))
    }
    fn counts(b: &[u8]) -> Option<[usize; 6]> {
        if b.get(..4)? != b"TZif" {
            return None;
        }
        let mut c = [0usize; 6];
        for (i, slot) in c.iter_mut().enumerate() {
            *slot = usize::try_from(be32(b, 20 + 4 * i)?).ok()?;
        }
        Some(c)
    }
    let [isutc, isstd, leap, timecnt, typecnt, charcnt] = counts(data)?;
    let v1_len = 44 + timecnt * 5 + typecnt * 6 + charcnt + leap * 8 + isstd + isutc;
    // Version 2+ files repeat the data with 64-bit times; prefer it.
    let (block, tsize) = match data.get(4) {
        Some(b'2'..=b'9') if data.len() > v1_len + 44 => (&data[v1_len..], 8),
        _ => (data, 4),
    };
    let [isutc, isstd, leap, timecnt, typecnt, charcnt] = counts(block)?;
    let footer = (tsize == 8)
        .then(|| {
            let at = 44 + timecnt * 9 + typecnt * 6 + charcnt + leap * 12 + isstd + isutc;
            let rest = block.get(at..)?.strip_prefix(b"\n")?;
            let end = rest.iter().position(|&b| b == b'\n')?;
            std::str::from_utf8(&rest[..end]).ok()
        })
        .flatten()
        .filter(|f| !f.is_empty());
    let times_at = 44;
    let idx_at = times_at + timecnt * tsize;
    let types_at = idx_at + timecnt;
    let chars_at = types_at + typecnt * 6;
    let mut ty = 0usize;
    // Before the first transition (or with none) the first non-DST type applies.
    for t in 0..typecnt {
        if block.get(types_at + t * 6 + 4) == Some(&0) {
            ty = t;
            break;
        }
    }
    for i in 0..timecnt {
        let at = if tsize == 8 {
            be64(block, times_at + i * 8)?
        } else {
            i64::from(be32(block, times_at + i * 4)?)
        };
        if at > now {
            break;
        }
        ty = usize::from(*block.get(idx_at + i)?);
    }
    let last = match timecnt {
        0 => None,
        n => Some(be64(block, times_at + (n - 1) * 8)?),
    };
    if let Some(rule) = footer
        && last.is_none_or(|last| now >= last)
        && let Some(zone) = posix_tz_at(rule, now)
    {
        return Some(zone);
    }
    let rec = types_at + ty * 6;
    let offset = be32(block, rec)?;
    let abbr_idx = usize::from(*block.get(rec + 5)?);
    let abbr = cstr(block.get(chars_at + abbr_idx..)?);
    Some((abbr, offset))
}

/// One side of a POSIX TZ string: its abbreviation and UTC offset (seconds east).
struct TzPart {
    abbr: String,
    east: i32,
}

/// A transition rule of a POSIX TZ string: the day, and the local time of day in
/// seconds (which may be negative or past 24 h, as RFC 8536 allows).
enum TzDay {
    /// `Jn`: day 1-365, February 29 never counted.
    Julian(i64),
    /// `n`: day 0-365, counting February 29.
    Zero(i64),
    /// `Mm.w.d`: weekday d (0 = Sunday) of week w (5 = the last) of month m.
    Month(i64, i64, i64),
}

/// The abbreviation and offset in force at `now` by a POSIX TZ string; `None` when it
/// cannot be read.
fn posix_tz_at(rule: &str, now: i64) -> Option<(String, i32)> {
    let mut p = rule.as_bytes();
    let std = tz_part(&mut p, None)?;
    if p.is_empty() {
        return Some((std.abbr, std.east));
    }
    let dst = tz_part(&mut p, Some(std.east + 3600))?;
    // No rules given: the US rules, as POSIX implementations take them.
    let rules = match p.strip_prefix(b",") {
        Some(r) => r,
        None if p.is_empty() => b"M3.2.0,M11.1.0".as_slice(),
        None => return None,
    };
    let mut r = rules;
    let (start, start_at) = tz_rule(&mut r)?;
    r = r.strip_prefix(b",")?;
    let (end, end_at) = tz_rule(&mut r)?;
    if !r.is_empty() {
        return None;
    }
    let year = crate::civil::civil_from_days((now + i64::from(std.east)).div_euclid(86400)).0;
    let start = tz_day(year, &start)? * 86400 + start_at - i64::from(std.east);
    let end = tz_day(year, &end)? * 86400 + end_at - i64::from(dst.east);
    let in_dst = if start < end {
        start <= now && now < end
    } else {
        !(end <= now && now < start)
    };
    let zone = if in_dst { dst } else { std };
    Some((zone.abbr, zone.east))
}

/// An abbreviation (`AEST` or `<+0530>`) and its offset (`-10`, POSIX's west of UTC);
/// `default` for a DST part that gives no offset.
fn tz_part(p: &mut &[u8], default: Option<i32>) -> Option<TzPart> {
    let abbr = if let Some(rest) = p.strip_prefix(b"<") {
        let end = rest.iter().position(|&b| b == b'>')?;
        let abbr = &rest[..end];
        *p = &rest[end + 1..];
        abbr
    } else {
        let end = p
            .iter()
            .position(|b| !b.is_ascii_alphabetic())
            .unwrap_or(p.len());
        let abbr = &p[..end];
        *p = &p[end..];
        abbr
    };
    if abbr.len() < 3 {
        return None;
    }
    let abbr = String::from_utf8_lossy(abbr).into_owned();
    let starts_offset = p
        .first()
        .is_some_and(|b| b.is_ascii_digit() || matches!(b, b'+' | b'-'));
    let east = match (starts_offset, default) {
        (true, _) => -i32::try_from(tz_time(p)?).ok()?,
        (false, Some(d)) => d,
        (false, None) => return None,
    };
    Some(TzPart { abbr, east })
}

/// `[+-]hh[:mm[:ss]]` in seconds.
fn tz_time(p: &mut &[u8]) -> Option<i64> {
    let sign = match p.first() {
        Some(b'-') => {
            *p = &p[1..];
            -1
        }
        Some(b'+') => {
            *p = &p[1..];
            1
        }
        _ => 1,
    };
    let mut total = 0i64;
    for (i, unit) in [3600i64, 60, 1].into_iter().enumerate() {
        if i > 0 {
            match p.strip_prefix(b":") {
                Some(rest) => *p = rest,
                None => break,
            }
        }
        let n = tz_number(p)?;
        total += n * unit;
    }
    Some(sign * total)
}

fn tz_number(p: &mut &[u8]) -> Option<i64> {
    let end = p
        .iter()
        .position(|b| !b.is_ascii_digit())
        .unwrap_or(p.len());
    if end == 0 || end > 3 {
        return None;
    }
    let n = std::str::from_utf8(&p[..end]).ok()?.parse().ok()?;
    *p = &p[end..];
    Some(n)
}

/// One rule: its day and local time of day (02:00 when not given).
fn tz_rule(p: &mut &[u8]) -> Option<(TzDay, i64)> {
    let day = match p.first()? {
        b'J' => {
            *p = &p[1..];
            TzDay::Julian(tz_number(p)?)
        }
        b'M' => {
            *p = &p[1..];
            let m = tz_number(p)?;
            *p = p.strip_prefix(b".")?;
            let w = tz_number(p)?;
            *p = p.strip_prefix(b".")?;
            let d = tz_number(p)?;
            if !(1..=12).contains(&m) || !(1..=5).contains(&w) || d > 6 {
                return None;
            }
            TzDay::Month(m, w, d)
        }
        _ => TzDay::Zero(tz_number(p)?),
    };
    let at = match p.strip_prefix(b"/") {
        Some(rest) => {
            *p = rest;
            tz_time(p)?
        }
        None => 7200,
    };
    Some((day, at))
}

/// The day (since 1970-01-01) a rule names in `year`.
fn tz_day(year: i64, day: &TzDay) -> Option<i64> {
    use crate::civil::days_from_civil;
    let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
    let jan1 = days_from_civil(year, 1, 1);
    match *day {
        TzDay::Julian(n) if (1..=365).contains(&n) => {
            Some(jan1 + n - 1 + i64::from(leap && n >= 60))
        }
        TzDay::Zero(n) if (0..=365).contains(&n) => Some(jan1 + n),
        TzDay::Month(m, w, d) => {
            let first = days_from_civil(year, m, 1);
            // 1970-01-01 was a Thursday (4).
            let wday = (first + 4).rem_euclid(7);
            let mut day = first + (d - wday).rem_euclid(7) + (w - 1) * 7;
            let next = if m == 12 {
                days_from_civil(year + 1, 1, 1)
            } else {
                days_from_civil(year, m + 1, 1)
            };
            while day >= next {
                day -= 7;
            }
            Some(day)
        }
        _ => None,
    }
}

/// Per-interface counters from /proc/net/dev, in the order of
/// `rx-bytes rx-packets rx-errs rx-dropped tx-bytes tx-packets tx-errs tx-dropped`.
pub fn proc_net_dev(text: &str) -> BTreeMap<String, [u64; 8]> {
    let mut out = BTreeMap::new();
    for line in text.lines().skip(2) {
        let Some((name, rest)) = line.split_once(':') else {
            continue;
        };
        let f: Vec<u64> = rest
            .split_whitespace()
            .map(|x| x.parse().unwrap_or(0))
            .collect();
        if f.len() >= 12 {
            out.insert(
                name.trim().to_string(),
                [f[0], f[1], f[2], f[3], f[8], f[9], f[10], f[11]],
            );
        }
    }
    out
}

/// One row of the kernel routing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub iface: String,
    pub destination: String,
    pub gateway: String,
    pub mask: Option<String>,
    pub prefix_len: Option<u32>,
    pub source: Option<String>,
    pub source_prefix_len: Option<u32>,
    pub metric: u32,
    pub flags: u32,
    pub refcnt: u32,
    pub use_count: u32,
    pub mtu: u32,
    pub window: u32,
    pub irtt: u32,
    pub version: u8,
}

fn hex_ipv4(s: &str) -> Option<String> {
    let v = u32::from_str_radix(s, 16).ok()?;
    Some(std::net::Ipv4Addr::from(v.to_le_bytes()).to_string())
}

fn hex_ipv6(s: &str) -> Option<String> {
    Some(std::net::Ipv6Addr::from(u128::from_str_radix(s, 16).ok()?).to_string())
}

/// The inodes of the listening sockets (state `0A`) in a `/proc/net/tcp` or `tcp6`
/// table; a line that does not parse is skipped.
pub fn proc_net_tcp_listening(text: &str) -> Vec<u64> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            match (f.get(3), f.get(9)) {
                (Some(&"0A"), Some(inode)) => inode.parse().ok(),
                _ => None,
            }
        })
        .collect()
}

/// IPv4 routes from /proc/net/route.
pub fn proc_net_route(text: &str) -> Vec<Route> {
    let mut out = Vec::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 11 {
            continue;
        }
        let num = |i: usize| f[i].parse::<u32>().unwrap_or(0);
        let (Some(dest), Some(gw), Some(mask)) = (hex_ipv4(f[1]), hex_ipv4(f[2]), hex_ipv4(f[7]))
        else {
            continue;
        };
        out.push(Route {
            iface: f[0].to_string(),
            destination: dest,
            gateway: gw,
            mask: Some(mask),
            prefix_len: None,
            source: None,
            source_prefix_len: None,
            flags: u32::from_str_radix(f[3], 16).unwrap_or(0),
            refcnt: num(4),
            use_count: num(5),
            metric: num(6),
            mtu: num(8),
            window: num(9),
            irtt: num(10),
            version: 4,
        });
    }
    out
}

/// IPv6 routes from /proc/net/ipv6_route.
pub fn proc_net_ipv6_route(text: &str) -> Vec<Route> {
    let mut out = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 10 {
            continue;
        }
        let hex = |i: usize| u32::from_str_radix(f[i], 16).unwrap_or(0);
        let (Some(dest), Some(src), Some(gw)) = (hex_ipv6(f[0]), hex_ipv6(f[2]), hex_ipv6(f[4]))
        else {
            continue;
        };
        out.push(Route {
            iface: f[9].to_string(),
            destination: dest,
            prefix_len: Some(hex(1)),
            source: Some(src),
            source_prefix_len: Some(hex(3)),
            gateway: gw,
            mask: None,
            metric: hex(5),
            refcnt: hex(6),
            use_count: hex(7),
            flags: hex(8),
            mtu: 0,
            window: 0,
            irtt: 0,
            version: 6,
        });
    }
    out
}

/// One line of /proc/self/mountinfo.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    pub major: u32,
    pub minor: u32,
    /// The mount point as text for answers (a byte that is not UTF-8 shown as U+FFFD).
    pub mountpoint: String,
    /// The mount point byte for byte, to open.
    pub path: std::path::PathBuf,
    pub fstype: String,
    pub source: String,
}

/// Undoes the kernel's `\ooo` escapes in /proc/self/mountinfo and /proc/mounts fields.
/// Only escapes that fit a byte (`\000`..`\377`) are decoded; anything else is kept as is.
pub fn unescape_octal(s: &str) -> String {
    String::from_utf8_lossy(&unescape_octal_bytes(s.as_bytes())).into_owned()
}

/// [`unescape_octal`] on bytes, giving bytes: a path that is not UTF-8 stays openable.
pub fn unescape_octal_bytes(b: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && (b'0'..=b'3').contains(&b[i + 1])
            && b[i + 2..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

pub fn mountinfo(text: &[u8]) -> Vec<Mount> {
    use std::os::unix::ffi::OsStringExt;
    let mut out = Vec::new();
    for line in text.split(|b| *b == b'\n') {
        let f: Vec<&[u8]> = line.split(|b| *b == b' ').collect();
        let Some(sep) = f.iter().position(|x| *x == b"-") else {
            continue;
        };
        if f.len() < sep + 3 || sep < 5 {
            continue;
        }
        let text = |field: &[u8]| String::from_utf8_lossy(field).into_owned();
        let Some((maj, min)) = text(f[2])
            .split_once(':')
            .map(|(a, b)| (a.to_owned(), b.to_owned()))
        else {
            continue;
        };
        let (Ok(major), Ok(minor)) = (maj.parse(), min.parse()) else {
            continue;
        };
        let path = unescape_octal_bytes(f[4]);
        out.push(Mount {
            major,
            minor,
            mountpoint: text(&path),
            path: std::ffi::OsString::from_vec(path).into(),
            fstype: text(f[sep + 1]),
            source: text(&unescape_octal_bytes(f[sep + 2])),
        });
    }
    out
}

/// The unsigned numbers at the start of `tokens`, up to `max`: the fields a C `%lu`
/// scan would have filled before the first one that is not a number.
fn leading_numbers<'a>(tokens: impl Iterator<Item = &'a str>, max: usize) -> Vec<u64> {
    tokens.map_while(|t| t.parse().ok()).take(max).collect()
}

/// One `cpuN` line of /proc/stat: the CPU number and its times in clock ticks, in the
/// kernel's order (user, nice, system, idle, iowait, irq, softirq, steal, guest,
/// guest_nice), as many as the kernel prints (at least four).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuTimes {
    pub cpu: u64,
    pub ticks: Vec<u64>,
}

/// The per-CPU lines of /proc/stat (the `cpu` total line is left out). A `cpuN` line
/// with fewer than four numbers ends the list, as it does in qemu-ga.
pub fn proc_stat_cpus(text: &str) -> Vec<CpuTimes> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut tokens = line.split_whitespace();
        let Some(rest) = tokens.next().and_then(|name| name.strip_prefix("cpu")) else {
            continue;
        };
        if rest.is_empty() {
            continue;
        }
        let ticks = leading_numbers(tokens, 10);
        if ticks.len() < 4 {
            break;
        }
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        out.push(CpuTimes {
            cpu: digits.parse().unwrap_or(0),
            ticks,
        });
    }
    out
}

/// One line of /proc/diskstats: the device and its counters in the kernel's order, as
/// many as it prints (4 for an old-style partition line, 11, 15 or 17 otherwise).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskCounters {
    pub major: u32,
    pub minor: u32,
    pub name: String,
    pub counters: Vec<u64>,
}

/// Every device line of /proc/diskstats with at least four counters.
pub fn proc_diskstats(text: &str) -> Vec<DiskCounters> {
    let mut out = Vec::new();
    for line in text.lines() {
        let mut tokens = line.split_whitespace();
        let (Some(major), Some(minor), Some(name)) = (
            tokens.next().and_then(|t| t.parse().ok()),
            tokens.next().and_then(|t| t.parse().ok()),
            tokens.next(),
        ) else {
            continue;
        };
        let counters = leading_numbers(tokens, 17);
        if counters.len() >= 4 {
            out.push(DiskCounters {
                major,
                minor,
                name: name.to_string(),
                counters,
            });
        }
    }
    out
}

/// The `[general]` group of a qemu-ga.conf key file (GKeyFile syntax).
pub fn qga_conf(text: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut general = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(group) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            general = group == "general";
            continue;
        }
        if general && let Some((k, v)) = line.split_once('=') {
            out.insert(k.trim().to_string(), v.trim().to_string());
        }
    }
    out
}

/// A key-file list value (`a;b;c` or `a,b,c`).
pub fn conf_list(v: &str) -> Vec<String> {
    v.split([';', ','])
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn octal_escapes_that_fit_a_byte_are_decoded() {
        assert_eq!(unescape_octal("/a\\040b"), "/a b");
        assert_eq!(unescape_octal("/plain"), "/plain");
        assert_eq!(unescape_octal("/end\\011"), "/end\t");
        // \777 would overflow a byte: kept as written, never a panic.
        assert_eq!(unescape_octal("/x\\777y"), "/x\\777y");
        assert_eq!(unescape_octal("/short\\04"), "/short\\04");
    }

    #[test]
    fn os_release_quotes() {
        let m = os_release("NAME=\"NixOS\"\nID=nixos\n# c\nPRETTY_NAME='N 1'\n");
        assert_eq!(m["NAME"], "NixOS");
        assert_eq!(m["ID"], "nixos");
        assert_eq!(m["PRETTY_NAME"], "N 1");
    }

    #[test]
    fn utmp_keeps_earliest_login() {
        let rec = |user: &str, sec: i32| {
            let mut r = vec![0u8; UTMP_RECORD];
            r[0..2].copy_from_slice(&USER_PROCESS.to_le_bytes());
            r[44..44 + user.len()].copy_from_slice(user.as_bytes());
            r[340..344].copy_from_slice(&sec.to_le_bytes());
            r[344..348].copy_from_slice(&500_000i32.to_le_bytes());
            r
        };
        let mut data = rec("alice", 200);
        data.extend(rec("alice", 100));
        data.extend(rec("bob", 300));
        let u = utmp_users(&data);
        assert_eq!(u.len(), 2);
        assert_eq!(u[0].login_time, 100.5);
        assert_eq!(u[1].user, "bob");
    }

    #[test]
    fn net_dev_and_routes() {
        let dev = "Inter-|   Receive\n face |bytes\n    lo: 10 2 0 0 0 0 0 0 10 2 0 0 0 0 0 0\n";
        assert_eq!(proc_net_dev(dev)["lo"], [10, 2, 0, 0, 10, 2, 0, 0]);
        let r = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                 eth0\t00000000\t0102A8C0\t0003\t0\t0\t100\t00000000\t0\t0\t0\n";
        let routes = proc_net_route(r);
        assert_eq!(routes[0].gateway, "192.168.2.1");
        assert_eq!(routes[0].metric, 100);
        let r6 = "fe800000000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001     eth0\n";
        let routes = proc_net_ipv6_route(r6);
        assert_eq!(routes[0].destination, "fe80::");
        assert_eq!(routes[0].prefix_len, Some(64));
        assert_eq!(routes[0].metric, 256);
    }

    #[test]
    fn mountinfo_fields() {
        let m = mountinfo(
            b"27 1 254:0 / / rw,relatime - ext4 /dev/vda rw\n42 27 7:0 / /mnt/a\\040b rw - ext4 /dev/loop0 rw\n43 27 7:1 / /mnt/caf\xe9 rw - ext4 /dev/loop1 rw\n",
        );
        assert_eq!(m[0].major, 254);
        assert_eq!(m[1].mountpoint, "/mnt/a b");
        assert_eq!(m[1].fstype, "ext4");
        // A mount point that is not UTF-8 neither hides the others nor loses its bytes.
        use std::os::unix::ffi::OsStrExt;
        assert_eq!(m[2].path.as_os_str().as_bytes(), b"/mnt/caf\xe9");
        assert_eq!(m[2].mountpoint, "/mnt/caf\u{fffd}");
    }

    #[test]
    fn conf_general_group() {
        let c = qga_conf(
            "[general]\nmethod=unix-listen\nblock-rpcs=guest-exec;guest-file-open\n[other]\nx=1\n",
        );
        assert_eq!(c["method"], "unix-listen");
        assert!(!c.contains_key("x"));
        assert_eq!(
            conf_list(&c["block-rpcs"]),
            ["guest-exec", "guest-file-open"]
        );
    }

    /// One TZif data block of `version` with no transitions and one standard type
    /// (`offset`, `abbr`).
    fn tzif_block(version: u8, offset: i32, abbr: &str) -> Vec<u8> {
        let mut d = b"TZif".to_vec();
        d.push(version);
        d.extend([0u8; 15]);
        for c in [0u32, 0, 0, 0, 1, abbr.len() as u32 + 1] {
            d.extend(c.to_be_bytes());
        }
        d.extend(offset.to_be_bytes());
        d.extend([0, 0]);
        d.extend(abbr.as_bytes());
        d.push(0);
        d
    }

    #[test]
    fn tzif_utc_fallback_type() {
        // A minimal v1 TZif with no transitions and one type: UTC, offset 0.
        let d = tzif_block(0, 0, "UTC");
        assert_eq!(tzif_zone_at(&d, 0), Some(("UTC".into(), 0)));
    }

    /// A version 2 TZif with no transitions, one standard type and `footer`.
    fn slim_tzif(footer: &str) -> Vec<u8> {
        let block = |v: u8| tzif_block(v, 36000, "AEST");
        let mut d = block(b'2');
        d.extend(block(b'2'));
        d.extend(format!("\n{footer}\n").as_bytes());
        d
    }

    /// Seconds since the epoch of a UTC date and time.
    fn utc(y: i64, m: i64, d: i64, h: i64, min: i64) -> i64 {
        crate::civil::days_from_civil(y, m, d) * 86400 + h * 3600 + min * 60
    }

    #[test]
    fn the_footer_rule_decides_after_the_last_transition() {
        let syd = slim_tzif("AEST-10AEDT,M10.1.0,M4.1.0/3");
        let at = |t| tzif_zone_at(&syd, t);
        assert_eq!(at(utc(2026, 12, 6, 0, 0)), Some(("AEDT".into(), 39600)));
        assert_eq!(at(utc(2026, 7, 1, 0, 0)), Some(("AEST".into(), 36000)));
        // 2026: DST ends Sunday 5 April at 03:00 AEDT (16:00 UTC on the 4th), starts
        // Sunday 4 October at 02:00 AEST (16:00 UTC on the 3rd).
        assert_eq!(at(utc(2026, 4, 4, 15, 59)).unwrap().0, "AEDT");
        assert_eq!(at(utc(2026, 4, 4, 16, 0)).unwrap().0, "AEST");
        assert_eq!(at(utc(2026, 10, 3, 15, 59)).unwrap().0, "AEST");
        assert_eq!(at(utc(2026, 10, 3, 16, 0)).unwrap().0, "AEDT");
        // Northern rules, the last week of a month, and an offset with minutes.
        let cet = slim_tzif("CET-1CEST,M3.5.0,M10.5.0/3");
        assert_eq!(
            tzif_zone_at(&cet, utc(2026, 3, 29, 0, 59)).unwrap(),
            ("CET".into(), 3600)
        );
        assert_eq!(
            tzif_zone_at(&cet, utc(2026, 3, 29, 1, 0)).unwrap(),
            ("CEST".into(), 7200)
        );
        let ist = slim_tzif("IST-5:30");
        assert_eq!(tzif_zone_at(&ist, 0).unwrap(), ("IST".into(), 19800));
        let quoted = slim_tzif("<-03>3");
        assert_eq!(tzif_zone_at(&quoted, 0).unwrap(), ("-03".into(), -10800));
        // A footer that cannot be read leaves the file's own types.
        let bad = slim_tzif("A");
        assert_eq!(tzif_zone_at(&bad, 0).unwrap(), ("AEST".into(), 36000));
    }

    #[test]
    fn proc_stat_keeps_per_cpu_lines_only() {
        let text = "cpu  10 20 30 40 50 60 70 80 90 100\n\
                    cpu0 1 2 3 4 5 6 7 8 9 10\n\
                    cpu1 5 6 7 8\n\
                    intr 1 2 3\n\
                    ctxt 99\n";
        let c = proc_stat_cpus(text);
        assert_eq!(c.len(), 2);
        assert_eq!(
            c[0],
            CpuTimes {
                cpu: 0,
                ticks: (1..=10).collect()
            }
        );
        assert_eq!(
            c[1],
            CpuTimes {
                cpu: 1,
                ticks: vec![5, 6, 7, 8]
            }
        );
    }

    #[test]
    fn proc_stat_stops_at_a_short_cpu_line() {
        let c = proc_stat_cpus("cpu0 1 2 3 4\ncpu1 1 2 x\ncpu2 1 2 3 4\n");
        assert_eq!(c.len(), 1);
    }

    #[test]
    fn diskstats_lines_of_every_kernel_shape() {
        let text = "   8       0 sda 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17\n\
                    \x20  8       1 sda1 1 2 3 4 5 6 7 8 9 10 11\n\
                    \x20  8       2 sda2 7 8 9 10\n\
                    \x20  8       3 sda3 7 8\n\
                    garbage\n";
        let d = proc_diskstats(text);
        assert_eq!(d.len(), 3);
        assert_eq!((d[0].major, d[0].minor, d[0].name.as_str()), (8, 0, "sda"));
        assert_eq!(d[0].counters.len(), 17);
        assert_eq!(d[1].counters.len(), 11);
        assert_eq!(d[2].counters, vec![7, 8, 9, 10]);
    }

    #[test]
    fn listening_tcp_sockets_by_inode() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n\
            0: 00000000:0016 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 17581 1 0000000000000000 100 0 0 10 0\n\
            1: 0F02000A:0016 0202000A:C3B4 01 00000000:00000000 02:0009F4E0 00000000     0        0 20115 4 0000000000000000 20 4 29 10 -1\n\
            2: garbage\n";
        assert_eq!(proc_net_tcp_listening(table), vec![17581]);
        assert!(proc_net_tcp_listening("").is_empty());
    }
}
