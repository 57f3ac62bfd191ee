//! `vm-tests bench`: nixseed against cloud-init + qemu-ga in real VMs, same emulator, same
//! base, same seed, same run. Boots alternate between the two images so that load from
//! anything else on the host falls on both alike. Prints markdown tables and rewrites
//! `docs/benchmarks.md` with them, the date and the machine.
//!
//! Per boot (every boot is a first boot: fresh overlay, and for nixseed a fresh `/var`):
//! - boot to sshd answering with the machine's pinned host key;
//! - nixseed: the initrd stage's own timing line; cloud-init: `cloud-init analyze show`;
//! - the guest agents' RSS (`smaps_rollup`) once idle and after a management poll (`nixseed-agent serve` vs `qemu-ga`);
//! - guest-ping round trips from the host over the virtio-serial socket QEMU exposes.

use crate::cmd;
use crate::deps;
use crate::image::Variant;
use crate::machine::{self, Machine};
use crate::paths::workspace_root;
use crate::qga_client;
use crate::scenarios::{Booted, Harness, WAKEUPS, agent_timing_lines, unit_counter_delta};
use anyhow::{Context, Result, bail};
use nixseed_test_support::memory::rollup_rss_kib;
use nixseed_test_support::stats::{median, percentile};
use std::fmt::Write as _;
use std::fs;
use std::process::Command;
use std::time::{Duration, Instant};

pub struct BenchOpts {
    /// Boots per image (at least 3 for a median).
    pub boots: usize,
    /// guest-ping round trips per boot.
    pub pings: usize,
    /// Also run the host-side benchmarks (apply, qga, seed) and include their tables.
    pub host: bool,
    /// Rewrite docs/benchmarks.md.
    pub write_doc: bool,
    /// A second series of boots with this many vCPUs (boot to sshd only); 0 skips it.
    pub wide_cpus: u32,
}

/// What one boot measured.
#[derive(Default)]
struct Boot {
    to_sshd: Duration,
    /// The guest's clock when sshd said "Server listening", in s since the kernel started.
    listen_s: Option<f64>,
    /// nixseed: initrd stage ms; cloud-init: `analyze show` total, in ms.
    provision_ms: Option<f64>,
    /// cloud-init: first to last event of `analyze show`, in ms.
    span_ms: Option<f64>,
    /// The guest agent's resident set once idle after its start, in KiB.
    rss_kib: Option<u64>,
    /// The same after one [`POLL`] of management requests, in KiB.
    rss_polled_kib: Option<u64>,
    /// nixseed: its own time before sshd in its parts, in ms (see [`own_time`]): the
    /// initrd process, `nixseed-apply.service`, the guest agent's CPU before sshd.
    own_parts: Option<[f64; 3]>,
    /// nixseed: the initrd stage run again in the booted guest, in ms: the first run,
    /// then runs at the same addresses (code the emulator has already translated).
    reruns_ms: Vec<f64>,
    pings: Vec<Duration>,
    /// guest-ping round trips, each on a new connection (see [`qga_client::ping_new_connection`]).
    call_pings: Vec<Duration>,
    /// The guest agent's wake-ups in [`QUIET`] with no host on its port.
    idle_wakeups: Option<u64>,
}

#[derive(Default)]
struct Side {
    boots: Vec<Boot>,
    /// Boot to sshd in the series with `BenchOpts::wide_cpus` vCPUs.
    wide_boots: Vec<Duration>,
    binary_bytes: Option<u64>,
    /// The program the resident guest agent runs, when it is not `binary_bytes`'s
    /// (`nixseed-guest-agent`, which `nixseed-agent serve` becomes).
    guest_agent_bytes: Option<u64>,
    /// How the agent binary was built ([`deps::agent_build_kind`]).
    binary_kind: &'static str,
    blame: String,
    analyze: String,
    timing_line: String,
    /// `systemd-analyze critical-chain ssh.service` of the last boot.
    chain: String,
}

/// The guest's clock, in s since the kernel started, when sshd first said it listens.
fn sshd_listening_s(b: &Booted) -> Result<Option<f64>> {
    let line = b.ssh.run(
        "journalctl -b -o short-monotonic --no-pager -t sshd | grep -m1 'Server listening' || true",
    )?;
    Ok(monotonic_s(&line))
}

/// The timestamp of a `journalctl -o short-monotonic` line: `[   12.345678] host …`.
fn monotonic_s(line: &str) -> Option<f64> {
    let (stamp, _) = line.trim_start().strip_prefix('[')?.split_once(']')?;
    stamp.trim().parse().ok()
}

/// Numeric properties of a unit by name (`systemctl show -p A -p B` prints `A=…` lines
/// in systemd's order, not the order asked for).
fn unit_numbers(b: &Booted, unit: &str, names: &[&str]) -> Result<Vec<Option<f64>>> {
    let args: String = names.iter().map(|n| format!(" -p {n}")).collect();
    let out = b.ssh.run(&format!("systemctl show{args} {unit}"))?;
    Ok(names
        .iter()
        .map(|name| {
            out.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix('='))
                .and_then(|v| v.trim().parse().ok())
        })
        .collect())
}

/// nixseed's CPU or wall time before sshd starts, in ms, an upper bound of what nixseed
/// itself adds to the way to sshd: the initrd process (the initramfs's "nixseed-agent
/// initrd exited N after M ms"), `nixseed-apply.service` from leaving inactive to active,
/// and the guest agent's CPU time so far when it started before sshd (with one vCPU, its
/// start competes with the units sshd waits for).
fn own_time(b: &Booted) -> Result<Option<[f64; 3]>> {
    let initrd = b.ssh.run(
        "journalctl -b --no-pager -o cat | grep -o 'nixseed-agent initrd exited [0-9]* after [0-9]* ms' | tail -1",
    )?;
    let initrd_ms = initrd
        .split_whitespace()
        .rev()
        .nth(1)
        .and_then(|v| v.parse::<f64>().ok());
    let apply = unit_numbers(
        b,
        "nixseed-apply.service",
        &[
            "InactiveExitTimestampMonotonic",
            "ActiveEnterTimestampMonotonic",
        ],
    )?;
    let apply_ms = match apply.as_slice() {
        &[Some(start), Some(active)] if active >= start && start > 0.0 => {
            Some((active - start) / 1000.0)
        }
        _ => None,
    };
    const START: &str = "ExecMainStartTimestampMonotonic";
    let agent = unit_numbers(b, "nixseed-agent.service", &[START, "CPUUsageNSec"])?;
    let sshd = unit_numbers(b, "ssh.service", &[START])?;
    let agent_ms = match (agent.as_slice(), sshd.as_slice()) {
        // Started after sshd, or not at all: none of its time came before.
        (&[Some(start), _], &[Some(sshd)]) if start == 0.0 || start >= sshd => Some(0.0),
        (&[Some(_), Some(cpu_ns)], &[Some(_)]) => Some(cpu_ns / 1e6),
        // Its CPU time or sshd's start unreadable: the sum would be too small, so none.
        _ => None,
    };
    Ok(initrd_ms
        .zip(apply_ms)
        .zip(agent_ms)
        .map(|((i, a), g)| [i, a, g]))
}

impl Boot {
    /// nixseed's own time before sshd, in ms: the sum of its parts.
    fn own_ms(&self) -> Option<f64> {
        self.own_parts.map(|p| p.iter().sum())
    }
}

/// KiB as MiB.
fn mib(kib: Option<u64>) -> Option<f64> {
    kib.map(|k| k as f64 / 1024.0)
}

/// A boot's agent RSS as the per-boot table shows it: idle, then after the poll.
fn rss_cell(b: Option<&Boot>) -> String {
    let kib = |k: Option<u64>| k.map_or("–".to_string(), |k| k.to_string());
    match b {
        Some(b) => format!("{} / {} KiB", kib(b.rss_kib), kib(b.rss_polled_kib)),
        None => "–".into(),
    }
}

/// A boot's own time as the per-boot table shows it: the sum, then its parts.
fn own_cell(parts: Option<[f64; 3]>) -> String {
    match parts {
        Some([i, a, g]) => format!(
            "{:.2} s ({:.2} + {:.2} + {:.2})",
            (i + a + g) / 1000.0,
            i / 1000.0,
            a / 1000.0,
            g / 1000.0
        ),
        None => "–".into(),
    }
}

/// Runs the initrd stage [`RERUNS`] times more in the booted guest, each from the same
/// seed into a fresh identity store on a scratch ext4, in a private mount namespace and
/// with address randomisation off, and returns each run's stage time in ms.
///
/// Under TCG the first execution of any code pays for its translation; the boot's stage
/// is such a first run. From the second run on the same addresses are translated already,
/// so the difference is the emulator's share and the rest is the stage's own work.
fn stage_reruns(b: &Booted) -> Result<Vec<f64>> {
    let script = format!(
        "set -e; d=$(mktemp -d /run/nixseed-rerun.XXXXXX); img=/var/tmp/nixseed-rerun.img\n\
         {SCRATCH_ROOT}\n\
         for i in $(seq {RERUNS}); do rm -rf $d/s/var/identity; mkdir $d/r$i\n\
         {} | grep 'nixseed initrd: '\n\
         done; umount $d/s/var; rm -rf $d $img",
        stage_rerun("$d/s", "$d/r$i")
    );
    let out = b
        .ssh
        .run(&script)
        .context("running the initrd stage again in the guest")?;
    let ms: Vec<f64> = out.lines().filter_map(stage_ms).collect();
    if ms.len() != RERUNS {
        bail!("expected {RERUNS} timing lines from the re-runs, got:\n{out}");
    }
    Ok(ms)
}

/// Shell lines that lay out a scratch root at `$d/s` the way the initrd finds the real
/// one: empty placeholders in `etc`, and a fresh ext4 (the file `$img`) as `var`.
pub const SCRATCH_ROOT: &str = "mkdir -p $d/s/etc $d/s/var; for f in machine-id hostname resolv.conf hosts; do : > $d/s/etc/$f; done\n\
     truncate -s 64M $img; mkfs.ext4 -q -F $img; mount -o loop $img $d/s/var";

/// The initrd stage run again in the booted guest on `sysroot`: in a private mount
/// namespace, and with address randomisation off so that each run meets the code at the
/// same addresses. Its output is its log.
pub fn stage_rerun(sysroot: &str, run: &str) -> String {
    format!(
        "unshare -m setarch x86_64 -R {} initrd --sysroot {sysroot} --run {run} --channel-wait 0 2>&1",
        crate::image::AGENT_PATH_IN_IMAGE
    )
}

/// Re-runs of the initrd stage per boot (the first one, then the warm ones).
const RERUNS: usize = 4;

/// "nixseed initrd: … in 12.3 ms [...]" → 12.3
pub fn initrd_ms(lines: &[String]) -> Option<f64> {
    lines.iter().find_map(|l| stage_ms(l))
}

fn stage_ms(line: &str) -> Option<f64> {
    let rest = &line[line.find("nixseed initrd: ")?..];
    let before = &rest[..rest.find(" ms")?];
    before.rsplit(' ').next()?.parse().ok()
}

/// `cloud-init analyze show` → the boot's "Total Time: N seconds", in ms.
pub fn analyze_total_ms(text: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let v = l.trim().strip_prefix("Total Time:")?;
        let secs: f64 = v.split_whitespace().next()?.parse().ok()?;
        Some(secs * 1000.0)
    })
}

/// `cloud-init analyze show` → ms from its first event to the end of its last one (the
/// stages' own "Total Time" leaves out the waits between them).
pub fn analyze_span_ms(text: &str) -> Option<f64> {
    text.lines()
        .filter_map(|l| {
            let (_, at) = l.rsplit_once('@')?;
            let (start, dur) = at.split_once(" +")?;
            let start: f64 = start.trim().trim_end_matches('s').parse().ok()?;
            let dur: f64 = dur.trim().trim_end_matches('s').parse().ok()?;
            Some((start + dur) * 1000.0)
        })
        .max_by(f64::total_cmp)
}

/// The `MainPID` of `unit` once it runs (polled up to 60 s), then its resident set in KiB
/// after `idle` of quiet (see [`rollup_rss_kib`]).
fn unit_rss_kib(b: &Booted, unit: &str, idle: Duration) -> Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    let pid = loop {
        let out = b
            .ssh
            .run(&format!("systemctl show -p MainPID --value {unit}"))?;
        let pid: u32 = out.trim().parse().unwrap_or(0);
        if pid != 0 {
            break pid;
        }
        if Instant::now() > deadline {
            bail!("{unit} has no main process 60 s after sshd answered");
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    std::thread::sleep(idle);
    let rollup = b.ssh.run(&format!("cat /proc/{pid}/smaps_rollup"))?;
    rollup_rss_kib(&rollup).with_context(|| format!("no Rss in /proc/{pid}/smaps_rollup of {unit}"))
}

/// What a management host asks a guest agent, beyond `guest-ping`: Proxmox VE's summary
/// and backups (addresses, OS, host name, file systems, freeze state, the agent's
/// command list) and libvirt's `virsh guestinfo` (users, time zone, vCPUs, disks). The
/// RSS a host sees is the RSS after these, when the code that answers them has run.
const POLL: &[&str] = &[
    "guest-info",
    "guest-get-osinfo",
    "guest-get-host-name",
    "guest-network-get-interfaces",
    "guest-get-fsinfo",
    "guest-fsfreeze-status",
    "guest-get-time",
    "guest-get-users",
    "guest-get-timezone",
    "guest-get-vcpus",
    "guest-get-disks",
];

/// Each [`POLL`] request once on one connection; every one must be answered (a command
/// the agent lacks is answered with an error, which counts as an answer).
fn poll(b: &Booted) -> Result<()> {
    let mut q = qga_client::Qga::connect(&b.vm.config.qga_socket(), Duration::from_secs(90))?;
    for name in POLL {
        let reply = q.execute(&serde_json::json!({ "execute": name }))?;
        if reply.get("return").is_none() && reply.get("error").is_none() {
            bail!("{name} answered `{reply}`");
        }
    }
    Ok(())
}

/// How long the guest agent's wake-ups are counted with no host on its port.
const QUIET: Duration = Duration::from_secs(3);

/// How often `unit`'s threads woke from a wait over [`QUIET`], after 2 s without a host
/// on the agent's port (what its last host may still have to finish). Nothing on the
/// host is connected to the port meanwhile: a port without a host reads as hung up, so
/// this is the agent's cost of waiting for one.
fn idle_wakeups(b: &Booted, unit: &str) -> Result<u64> {
    std::thread::sleep(Duration::from_secs(2));
    unit_counter_delta(b, unit, QUIET.as_secs(), WAKEUPS, "count of wake-ups")
}

/// Calls per boot in [`call_pings`].
const CALLS: u64 = 20;

/// [`CALLS`] guest-pings, each on a new connection as Proxmox VE calls the agent.
fn call_pings(b: &Booted) -> Result<Vec<Duration>> {
    qga_client::calls(&b.vm.config.qga_socket(), CALLS, 0x6e79_0000)
}

fn pings(b: &Booted, n: usize) -> Result<Vec<Duration>> {
    let mut q = qga_client::Qga::connect(&b.vm.config.qga_socket(), Duration::from_secs(90))?;
    for _ in 0..10 {
        q.ping()?; // warm-up
    }
    (0..n).map(|_| q.ping()).collect()
}

/// The nixseed firewall is an option (NixOS: services.nixseed.firewall.enable, off by
/// default) that the cloud-init image has no counterpart for; the test image enables it
/// for the push scenario. The boot race compares like with like: it is masked here.
fn like_for_like(h: &Harness, cfg: &mut crate::qemu::VmConfig) {
    if h.image.variant == Variant::Nixseed {
        cfg.append
            .push_str(" systemd.mask=nixseed-firewall.service");
    }
}

/// A boot of the series with more vCPUs: the time to sshd only.
fn wide_boot(h: &Harness, m: &Machine, cpus: u32, side: &mut Side) -> Result<()> {
    let expected = m.host_key_pub()?;
    let b = h.boot_with(m, Some(&expected), |cfg| {
        like_for_like(h, cfg);
        cfg.cpus = cpus;
    })?;
    eprintln!(
        "vm-tests bench: {} boot {} with {cpus} vCPUs: sshd {:.1} s",
        h.image.variant.name(),
        side.wide_boots.len() + 1,
        b.boot_to_sshd.as_secs_f64()
    );
    side.wide_boots.push(b.boot_to_sshd);
    b.poweroff()
}

fn one_boot(h: &Harness, m: &Machine, o: &BenchOpts, side: &mut Side) -> Result<()> {
    let expected = m.host_key_pub()?;
    let b = h.boot_with(m, Some(&expected), |cfg| like_for_like(h, cfg))?;
    let mut boot = Boot {
        to_sshd: b.boot_to_sshd,
        listen_s: sshd_listening_s(&b)?,
        ..Default::default()
    };
    let agent_unit = match h.image.variant {
        Variant::Nixseed => "nixseed-agent.service",
        Variant::CloudInit => "qemu-guest-agent.service",
    };
    match h.image.variant {
        Variant::Nixseed => {
            let lines = agent_timing_lines(&b.ssh)?;
            boot.provision_ms = initrd_ms(&lines);
            if let Some(l) = lines.iter().find(|l| l.contains("nixseed initrd: ")) {
                side.timing_line = l.trim().to_string();
            }
            boot.own_parts = own_time(&b)?;
            boot.rss_kib = Some(unit_rss_kib(&b, agent_unit, Duration::from_secs(3))?);
        }
        Variant::CloudInit => {
            // analyze needs the finished run.
            b.wait_for_cloud_init()?;
            let show = b.ssh.run("cloud-init analyze show")?;
            boot.provision_ms = analyze_total_ms(&show);
            boot.span_ms = analyze_span_ms(&show);
            side.analyze = show;
            side.blame = b.ssh.run("cloud-init analyze blame | head -12")?;
            boot.rss_kib = Some(unit_rss_kib(&b, agent_unit, Duration::from_secs(3))?);
            if side.binary_bytes.is_none() {
                side.binary_bytes = b
                    .ssh
                    .run("stat -c %s /usr/sbin/qemu-ga")?
                    .trim()
                    .parse()
                    .ok();
            }
        }
    }
    side.chain = b
        .ssh
        .output("systemd-analyze critical-chain ssh.service --no-pager")
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    boot.idle_wakeups = Some(idle_wakeups(&b, agent_unit)?);
    boot.call_pings = call_pings(&b)?;
    boot.pings = pings(&b, o.pings)?;
    poll(&b)?;
    boot.rss_polled_kib = Some(unit_rss_kib(&b, agent_unit, Duration::from_secs(1))?);
    // Last: the re-runs load the guest, and RSS and pings are measured idle.
    if h.image.variant == Variant::Nixseed {
        boot.reruns_ms = stage_reruns(&b)?;
        eprintln!(
            "vm-tests bench: initrd stage re-runs {:?} ms",
            boot.reruns_ms
        );
    }
    eprintln!(
        "vm-tests bench: {} boot {}: sshd {:.1} s, provisioning {}, agent RSS {} KiB ({} KiB polled), guest-ping median {:.2} ms",
        h.image.variant.name(),
        side.boots.len() + 1,
        boot.to_sshd.as_secs_f64(),
        boot.provision_ms
            .map_or("?".into(), |ms| format!("{ms:.1} ms")),
        boot.rss_kib.unwrap_or(0),
        boot.rss_polled_kib.unwrap_or(0),
        median(
            &mut boot
                .pings
                .iter()
                .map(|d| d.as_secs_f64() * 1e3)
                .collect::<Vec<_>>()
        )
        .unwrap_or(0.0)
    );
    side.boots.push(boot);
    b.poweroff()
}

fn host_info() -> (String, String) {
    let date = cmd::stdout(Command::new("date").args(["-u", "+%Y-%m-%d %H:%M UTC"]))
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|v| v.trim_start_matches([' ', '\t', ':']).trim().to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let qemu = cmd::stdout(Command::new("qemu-system-x86_64").arg("--version"))
        .ok()
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    (date, format!("{cpus} CPUs ({model}), {qemu}"))
}

/// Runs a host-side benchmark example and returns its stdout (its markdown table).
fn host_bench(what: &str, args: &[&str]) -> String {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let t = Instant::now();
    let out = cmd::stdout(
        Command::new(cargo)
            .current_dir(workspace_root())
            .args(["run", "--quiet", "--release"])
            .args(args),
    );
    eprintln!(
        "vm-tests bench: {what} took {:.1} s",
        t.elapsed().as_secs_f64()
    );
    match out {
        Ok(s) => s.trim().to_string(),
        Err(e) => format!("(not measured: {e:#})"),
    }
}

fn fmt_opt(v: Option<f64>, unit: &str, prec: usize) -> String {
    v.map_or("–".into(), |x| format!("{x:.prec$} {unit}"))
}

/// `a / b` as "0.53×"; below 0.1 with two significant digits ("0.0088×"), so that a
/// small ratio does not print as "0.00×".
fn fmt_ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => {
            let r = a / b;
            let prec = if r > 0.0 && r < 0.1 {
                (1 - r.log10().floor() as i32) as usize
            } else {
                2
            };
            format!("{r:.prec$}×")
        }
        _ => "–".into(),
    }
}

/// A ratio held against a budget of `share`: as [`fmt_ratio`], but with three decimals
/// when two would print the budget itself ("0.50×" for 0.503, which misses ≤ 0.5×).
fn fmt_budget_ratio(a: Option<f64>, b: Option<f64>, share: f64) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && (a / b - share).abs() < 0.005 => {
            format!("{:.3}×", a / b)
        }
        _ => fmt_ratio(a, b),
    }
}

/// A boot's time to sshd as the host saw it, with the guest's clock at sshd's listening.
fn sshd_cell(b: Option<&Boot>) -> String {
    match b {
        Some(b) => format!(
            "{:.1} s ({})",
            b.to_sshd.as_secs_f64(),
            fmt_opt(b.listen_s, "s", 1)
        ),
        None => "–".into(),
    }
}

/// One figure of a boot, when the boot gave it.
type Figure = fn(&Boot) -> Option<f64>;

/// The per-boot figures some boots could not give, as "the initrd stage: 4 of 5 boots".
fn missing_figures(nix: &Side, ci: &Side) -> Vec<String> {
    let figures: [(&str, &Side, Figure); 13] = [
        ("nixseed's sshd listening", nix, |b| b.listen_s),
        ("nixseed's own time", nix, Boot::own_ms),
        ("the initrd stage", nix, |b| b.provision_ms),
        ("the stage's first re-run", nix, |b| {
            b.reruns_ms.first().copied()
        }),
        ("the agent's RSS", nix, |b| b.rss_kib.map(|k| k as f64)),
        ("the agent's RSS after a poll", nix, |b| {
            b.rss_polled_kib.map(|k| k as f64)
        }),
        ("cloud-init's sshd listening", ci, |b| b.listen_s),
        ("cloud-init's total", ci, |b| b.provision_ms),
        ("cloud-init's first to last event", ci, |b| b.span_ms),
        ("qemu-ga's RSS", ci, |b| b.rss_kib.map(|k| k as f64)),
        ("qemu-ga's RSS after a poll", ci, |b| {
            b.rss_polled_kib.map(|k| k as f64)
        }),
        ("the agent's wake-ups without a host", nix, |b| {
            b.idle_wakeups.map(|n| n as f64)
        }),
        ("qemu-ga's wake-ups without a host", ci, |b| {
            b.idle_wakeups.map(|n| n as f64)
        }),
    ];
    figures
        .iter()
        .filter_map(|(what, side, f)| {
            let have = side.boots.iter().filter(|b| f(b).is_some()).count();
            (have < side.boots.len())
                .then(|| format!("{what}: {have} of {} boots", side.boots.len()))
        })
        .collect()
}

/// A nixseed boot's time to sshd less its own time before sshd, in s.
fn without_own(b: &Boot) -> Option<f64> {
    Some(b.to_sshd.as_secs_f64() - b.own_ms()? / 1000.0)
}

/// Whether `ours` is at most `share` of `theirs`, when both were measured.
fn at_most(ours: Option<f64>, theirs: Option<f64>, share: f64) -> Option<bool> {
    Some(ours? <= share * theirs?)
}

/// The verdict on the 1-vCPU boot ratio, with the spread of the pairs' own ratios: a
/// median near 0.5 can land on either side from one run to the next, and the reader
/// should see whether the line lies inside that spread.
fn boot_verdict(ok: Option<bool>, nix: &Side, ci: &Side) -> String {
    let pairs: Vec<f64> = nix
        .boots
        .iter()
        .zip(&ci.boots)
        .filter(|(_, c)| !c.to_sshd.is_zero())
        .map(|(n, c)| n.to_sshd.as_secs_f64() / c.to_sshd.as_secs_f64())
        .collect();
    if pairs.len() < 2 {
        return verdict(ok).to_string();
    }
    let lo = pairs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = pairs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let inside = if lo <= 0.5 && hi > 0.5 {
        ", the 0.5 line inside it"
    } else {
        ""
    };
    format!("{} (pairs {lo:.2}–{hi:.2}×{inside})", verdict(ok))
}

fn verdict(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "met",
        Some(false) => "**missed**",
        None => "not measured",
    }
}

pub fn run(o: &BenchOpts) -> Result<()> {
    if o.boots < 3 {
        bail!("--boots must be at least 3 for a median (got {})", o.boots);
    }
    let started = Instant::now();
    let nix = Harness::setup(Variant::Nixseed)?;
    let ci = Harness::setup(Variant::CloudInit)?;
    let agent = deps::build_agent()?;
    let size = |p: &std::path::Path| {
        fs::metadata(p)
            .with_context(|| format!("reading the size of {}", p.display()))
            .map(|m| m.len())
    };
    let agent_bytes = size(&agent)?;
    let guest_agent = agent.with_file_name("nixseed-guest-agent");
    let guest_agent_bytes = guest_agent
        .is_file()
        .then(|| size(&guest_agent))
        .transpose()?;

    // One identity and one seed ISO for both images; each boot gets fresh disks.
    let m = nix.new_machine("bench")?;
    let pristine_var = m.state.join("var-pristine.qcow2");
    fs::copy(&m.var_disk, &pristine_var)
        .with_context(|| format!("copying {}", m.var_disk.display()))?;
    let mut nix_side = Side {
        binary_bytes: Some(agent_bytes),
        guest_agent_bytes,
        binary_kind: deps::agent_build_kind(&agent),
        ..Default::default()
    };
    let mut ci_side = Side::default();
    let fresh = |h: &Harness| -> Result<Machine> {
        let mut mm = m.clone();
        mm.boot_disk = m
            .state
            .join(format!("boot-{}.qcow2", h.image.variant.name()));
        machine::make_overlay(&h.image.base_qcow2, &mm.boot_disk)?;
        fs::copy(&pristine_var, &mm.var_disk)
            .with_context(|| format!("resetting {}", mm.var_disk.display()))?;
        Ok(mm)
    };
    // One boot of each image first, not counted. The run's first QEMU process (nixseed
    // goes first in each pair) was its slowest nixseed boot, or tied for it, in seven of
    // the nine runs before this warm-up; the second process, cloud-init's first, never
    // stood out.
    let mut warm_up = Side::default();
    for h in [&nix, &ci] {
        eprintln!(
            "vm-tests bench: warm-up boot of the {} image (not counted)",
            h.image.variant.name()
        );
        wide_boot(h, &fresh(h)?, machine::vm_cpus(), &mut warm_up)
            .with_context(|| format!("warm-up boot of the {} image", h.image.variant.name()))?;
    }
    for _ in 0..o.boots {
        for (h, side) in [(&nix, &mut nix_side), (&ci, &mut ci_side)] {
            one_boot(h, &fresh(h)?, o, side).with_context(|| {
                format!("benchmark boot of the {} image", h.image.variant.name())
            })?;
        }
    }
    if o.wide_cpus > 0 {
        for _ in 0..o.boots {
            for (h, side) in [(&nix, &mut nix_side), (&ci, &mut ci_side)] {
                wide_boot(h, &fresh(h)?, o.wide_cpus, side).with_context(|| {
                    format!(
                        "benchmark boot of the {} image with {} vCPUs",
                        h.image.variant.name(),
                        o.wide_cpus
                    )
                })?;
            }
        }
    }
    let vm_time = started.elapsed();

    let host = if o.host {
        let agent_arg = agent.display().to_string();
        // seed-bench times `seedctl seed` as a process, and qga-bench runs the host build
        // of the agent beside qemu-ga: both need the release binaries.
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        cmd::run(Command::new(cargo).current_dir(workspace_root()).args([
            "build",
            "--quiet",
            "--release",
            "-p",
            "seedctl",
            "-p",
            "nixseed-agent",
        ]))?;
        vec![
            (
                "Initrd stage apply (host, tmpfs sysroot)",
                format!(
                    "cargo run --release -p nixseed-agent --example apply-bench -- {}",
                    agent
                        .strip_prefix(workspace_root())
                        .unwrap_or(&agent)
                        .display()
                ),
                host_bench(
                    "apply-bench",
                    &[
                        "-p",
                        "nixseed-agent",
                        "--example",
                        "apply-bench",
                        "--",
                        &agent_arg,
                    ],
                ),
            ),
            (
                "Guest agent on the host (unix-listen, against qemu-ga; the host build is glibc and dynamically linked, so its RSS and size are not the guest's — see the VM table for the static binary)",
                "cargo run --release -p nixseed-agent --example qga-bench".to_string(),
                host_bench(
                    "qga-bench",
                    &["-p", "nixseed-agent", "--example", "qga-bench"],
                ),
            ),
            (
                "Seeds",
                "cargo run --release -p seedctl --example seed-bench -- 1000".to_string(),
                host_bench(
                    "seed-bench",
                    &["-p", "seedctl", "--example", "seed-bench", "--", "1000"],
                ),
            ),
        ]
    } else {
        Vec::new()
    };

    let report = render(o, &nix, &nix_side, &ci_side, &host, vm_time);
    println!("{report}");
    if o.write_doc {
        let doc = workspace_root().join("docs/benchmarks.md");
        fs::write(&doc, &report).with_context(|| format!("writing {}", doc.display()))?;
        eprintln!("vm-tests bench: wrote {}", doc.display());
    }
    eprintln!(
        "vm-tests bench: done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn render(
    o: &BenchOpts,
    h: &Harness,
    nix: &Side,
    ci: &Side,
    host: &[(&str, String, String)],
    vm_time: Duration,
) -> String {
    let (date, machine) = host_info();
    let secs = |s: &Side| -> Vec<f64> { s.boots.iter().map(|b| b.to_sshd.as_secs_f64()).collect() };
    let prov = |s: &Side| -> Vec<f64> { s.boots.iter().filter_map(|b| b.provision_ms).collect() };
    let rtt = |s: &Side| -> Vec<f64> {
        s.boots
            .iter()
            .flat_map(|b| b.pings.iter().map(|d| d.as_secs_f64() * 1e3))
            .collect()
    };
    let (boot_n, boot_c) = (median(&mut secs(nix)), median(&mut secs(ci)));
    let (prov_n, prov_c) = (median(&mut prov(nix)), median(&mut prov(ci)));
    let median_of =
        |s: &Side, f: Figure| median(&mut s.boots.iter().filter_map(f).collect::<Vec<_>>());
    let span_c = median_of(ci, |b| b.span_ms);
    let (rss_n, rss_c) = (
        median_of(nix, |b| mib(b.rss_kib)),
        median_of(ci, |b| mib(b.rss_kib)),
    );
    let (polled_n, polled_c) = (
        median_of(nix, |b| mib(b.rss_polled_kib)),
        median_of(ci, |b| mib(b.rss_polled_kib)),
    );
    let own_n = median_of(nix, Boot::own_ms);
    let (ping_n, ping_c) = (median(&mut rtt(nix)), median(&mut rtt(ci)));
    let (p99_n, p99_c) = (
        percentile(&mut rtt(nix), 99.0),
        percentile(&mut rtt(ci), 99.0),
    );
    let calls = |s: &Side| -> Vec<f64> {
        s.boots
            .iter()
            .flat_map(|b| b.call_pings.iter().map(|d| d.as_secs_f64() * 1e3))
            .collect()
    };
    let (call_n, call_c) = (median(&mut calls(nix)), median(&mut calls(ci)));
    let (call_p90_n, call_p90_c) = (
        percentile(&mut calls(nix), 90.0),
        percentile(&mut calls(ci), 90.0),
    );
    let (call_max_n, call_max_c) = (
        percentile(&mut calls(nix), 100.0),
        percentile(&mut calls(ci), 100.0),
    );
    let wakeups = |b: &Boot| b.idle_wakeups.map(|n| n as f64);
    let (woke_n, woke_c) = (median_of(nix, wakeups), median_of(ci, wakeups));
    let mib = |b: Option<u64>| b.map(|b| b as f64 / 1048576.0);
    let ratio = fmt_ratio;
    let accel = h.accel.as_str().to_uppercase();

    let mut d = String::new();
    let _ = writeln!(d, "# Benchmarks\n");
    let _ = writeln!(
        d,
        "Generated by `cargo xtask bench` (`cargo run -p vm-tests --release -- bench`): every figure \
         below comes from one run on one machine. Budgets are from the design; the anchors are \
         Debian bookworm's cloud-init and qemu-guest-agent on the same base image.\n"
    );
    let _ = writeln!(d, "- Date: {date}");
    let _ = writeln!(d, "- Host: {machine}, accelerator {accel}");
    let _ = writeln!(
        d,
        "- Guest: Debian bookworm, kernel {} (`{}`, direct boot), {} MiB, {} vCPU; {} boots per image, alternating, each a first boot (fresh overlay and `/var`) from the same `seedctl seed` ISO, after one warm-up boot of each image that is not counted",
        h.image.kernel_release,
        h.image
            .kernel
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        machine::vm_memory_mib(),
        machine::vm_cpus(),
        o.boots
    );
    let _ = writeln!(
        d,
        "- The nixseed guest boots with `systemd.mask=nixseed-firewall.service`: the firewall is an option (off by default in the NixOS module) with no counterpart in the cloud-init image; loading nftables costs about 4 s under TCG (docs/vm-tests.md)"
    );
    let _ = writeln!(
        d,
        "- VM part took {:.0} s; the host is shared with other work, so absolute times are noisy and the ratios are what counts\n",
        vm_time.as_secs_f64()
    );

    let _ = writeln!(d, "## In the VM (nixseed image vs cloud-init image)\n");
    let _ = writeln!(
        d,
        "| measure | nixseed | cloud-init / qemu-ga | ratio | budget | |"
    );
    let _ = writeln!(d, "|---|---:|---:|---:|---|---|");
    let boot_ok = at_most(boot_n, boot_c, 0.5);
    let _ = writeln!(
        d,
        "| boot to sshd with the pinned host key (QEMU start → `ssh-keyscan` match), median | {} | {} | {} | ≤ 0.5× | {} |",
        fmt_opt(boot_n, "s", 1),
        fmt_opt(boot_c, "s", 1),
        fmt_budget_ratio(boot_n, boot_c, 0.5),
        boot_verdict(boot_ok, nix, ci)
    );
    let (listen_n, listen_c) = (
        median_of(nix, |b| b.listen_s),
        median_of(ci, |b| b.listen_s),
    );
    let _ = writeln!(
        d,
        "| sshd listening by the guest's clock (kernel start → sshd's `Server listening` in the journal), median | {} | {} | {} | | the boot without QEMU's start, the address and the scan |",
        fmt_opt(listen_n, "s", 1),
        fmt_opt(listen_c, "s", 1),
        ratio(listen_n, listen_c),
    );
    if o.wide_cpus > 0 {
        let wide =
            |s: &Side| -> Vec<f64> { s.wide_boots.iter().map(Duration::as_secs_f64).collect() };
        let (wide_n, wide_c) = (median(&mut wide(nix)), median(&mut wide(ci)));
        let wide_ok = at_most(wide_n, wide_c, 0.5);
        let _ = writeln!(
            d,
            "| the same with {} vCPUs (a second series of fresh first boots, alternating), median | {} | {} | {} | ≤ 0.5× | {} |",
            o.wide_cpus,
            fmt_opt(wide_n, "s", 1),
            fmt_opt(wide_c, "s", 1),
            fmt_budget_ratio(wide_n, wide_c, 0.5),
            verdict(wide_ok)
        );
    }
    let _ = writeln!(
        d,
        "| nixseed's own time before sshd (initrd process + `nixseed-apply.service` start + the guest agent's CPU so far when it started before sshd), median; each boot less it, median, vs cloud-init's | {} | | {} | | the ratio if nixseed took no time at all |",
        fmt_opt(own_n.map(|ms| ms / 1000.0), "s", 2),
        ratio(median_of(nix, without_own), boot_c),
    );
    let _ = writeln!(
        d,
        "| provisioning: initrd stage (its journal timing line) vs `cloud-init analyze show` total, median | {} | {} | {} | ≤ 50 ms | {} |",
        fmt_opt(prov_n, "ms", 1),
        fmt_opt(prov_c.map(|ms| ms / 1000.0), "s", 2),
        ratio(prov_n, prov_c),
        verdict(prov_n.map(|v| v <= 50.0))
    );
    let first_rerun = median_of(nix, |b| b.reruns_ms.first().copied());
    let warm_rerun = median(
        &mut nix
            .boots
            .iter()
            .flat_map(|b| b.reruns_ms.iter().skip(1).copied())
            .collect::<Vec<_>>(),
    );
    let _ = writeln!(
        d,
        "| the same stage run again in the booted guest on a scratch `/var` (same seed, fresh store), median: first run / later runs at the same addresses (code already translated by the emulator) | {} / {} | | | | the rest of the boot's figure is TCG translating code on first use |",
        fmt_opt(first_rerun, "ms", 1),
        fmt_opt(warm_rerun, "ms", 1),
    );
    let _ = writeln!(
        d,
        "| provisioning wall clock: the same vs cloud-init's first to last event (`@` + `+` of its last line), median | {} | {} | {} | | |",
        fmt_opt(prov_n, "ms", 1),
        fmt_opt(span_c.map(|ms| ms / 1000.0), "s", 2),
        ratio(prov_n, span_c)
    );
    let _ = writeln!(
        d,
        "| guest agent idle RSS (`Rss` of `/proc/PID/smaps_rollup`), median | {} | {} | {} | ≤ 2 MiB | {} |",
        fmt_opt(rss_n, "MiB", 2),
        fmt_opt(rss_c, "MiB", 2),
        ratio(rss_n, rss_c),
        verdict(rss_n.map(|v| v <= 2.0))
    );
    let _ = writeln!(
        d,
        "| the same after one management poll ({} requests: what Proxmox VE and `virsh guestinfo` ask), median | {} | {} | {} | ≤ 2 MiB | {} |",
        POLL.len(),
        fmt_opt(polled_n, "MiB", 2),
        fmt_opt(polled_c, "MiB", 2),
        ratio(polled_n, polled_c),
        verdict(polled_n.map(|v| v <= 2.0))
    );
    let ping_ok = at_most(ping_n, ping_c, 1.0);
    let _ = writeln!(
        d,
        "| guest-ping round trip from the host over virtio-serial, median ({} per boot) | {} | {} | {} | ≤ qemu-ga | {} |",
        o.pings,
        fmt_opt(ping_n, "ms", 3),
        fmt_opt(ping_c, "ms", 3),
        ratio(ping_n, ping_c),
        verdict(ping_ok)
    );
    let _ = writeln!(
        d,
        "| guest-ping round trip, p99 | {} | {} | {} | | |",
        fmt_opt(p99_n, "ms", 3),
        fmt_opt(p99_c, "ms", 3),
        ratio(p99_n, p99_c)
    );
    let _ = writeln!(
        d,
        "| guest-ping on a new connection per call, as Proxmox VE calls (`guest-sync-delimited` and the command in one write), median / p90 / slowest ({CALLS} per boot) | {} / {} / {} | {} / {} / {} | {} | | the agent's wait for a host, below |",
        fmt_opt(call_n, "ms", 1),
        fmt_opt(call_p90_n, "ms", 1),
        fmt_opt(call_max_n, "ms", 1),
        fmt_opt(call_c, "ms", 1),
        fmt_opt(call_p90_c, "ms", 1),
        fmt_opt(call_max_c, "ms", 1),
        ratio(call_n, call_c)
    );
    let _ = writeln!(
        d,
        "| guest agent wake-ups in {} s with no host on its port (voluntary context switches of its threads), median | {} | {} | {} | | |",
        QUIET.as_secs(),
        fmt_opt(woke_n, "", 0).trim_end(),
        fmt_opt(woke_c, "", 0).trim_end(),
        ratio(woke_n, woke_c)
    );
    let _ = writeln!(
        d,
        "| agent binary (`nixseed-agent` as injected, {}, vs `/usr/sbin/qemu-ga`, which also needs glib) | {} | {} | {} | ≤ 2.5 MiB | {} |",
        nix.binary_kind,
        fmt_opt(mib(nix.binary_bytes), "MiB", 2),
        fmt_opt(mib(ci.binary_bytes), "MiB", 2),
        ratio(mib(nix.binary_bytes), mib(ci.binary_bytes)),
        verdict(mib(nix.binary_bytes).map(|v| v <= 2.5))
    );
    if nix.guest_agent_bytes.is_some() {
        let _ = writeln!(
            d,
            "| guest agent binary (`nixseed-guest-agent`, which `nixseed-agent serve` becomes: the resident process, vs `/usr/sbin/qemu-ga`) | {} | {} | {} | | installed beside `nixseed-agent` |",
            fmt_opt(mib(nix.guest_agent_bytes), "MiB", 2),
            fmt_opt(mib(ci.binary_bytes), "MiB", 2),
            ratio(mib(nix.guest_agent_bytes), mib(ci.binary_bytes)),
        );
    }

    let _ = writeln!(
        d,
        "\nA budget marked missed is missed in this run; nothing here is adjusted. Under TCG \
         every instruction in the guest is emulated, so in-guest times are many times the \
         host's (compare the initrd stage with the host-side apply benchmark below); its split \
         into probe, decide, compose, write and mount is in the timing line below. The stage \
         is the first execution of the agent's code in the guest, so QEMU translates every \
         basic block it reaches before running it; the re-run row runs the same stage again \
         in the booted guest (`setarch -R`, so later runs hit already translated code) and \
         separates that translation from the stage's own work. Both images share the kernel, \
         initramfs and systemd, so the boot ratio is bounded by that common part."
    );
    if o.wide_cpus > 0 {
        let _ = writeln!(
            d,
            "\nThe main series runs each guest on {} vCPU, where the guest is busy from systemd's \
             start until sshd and the part both images share dominates. The series with {} vCPUs \
             (MTTCG: one host thread per vCPU) lets systemd start units in parallel in both \
             images; it shows whether the ratio holds when the guest is not bound to one \
             emulated CPU. On a host shared with other work, this series is the noisier \
             one.",
            machine::vm_cpus(),
            o.wide_cpus
        );
    }
    let _ = writeln!(d, "\nPer boot:\n");
    let _ = writeln!(
        d,
        "| boot | nixseed: sshd (listening, guest clock) | nixseed's own time (initrd process + `nixseed-apply` + guest agent) | initrd stage | its re-runs in the booted guest | agent RSS (idle / polled) | cloud-init: sshd (listening) | cloud-init total / first to last event | qemu-ga RSS (idle / polled) | boot ratio |"
    );
    let _ = writeln!(d, "|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|");
    for i in 0..nix.boots.len().max(ci.boots.len()) {
        let n = nix.boots.get(i);
        let c = ci.boots.get(i);
        let _ = writeln!(
            d,
            "| {} | {} | {} | {} | {} | {} | {} | {} / {} | {} | {} |",
            i + 1,
            sshd_cell(n),
            own_cell(n.and_then(|b| b.own_parts)),
            fmt_opt(n.and_then(|b| b.provision_ms), "ms", 1),
            n.map_or("–".into(), |b| b
                .reruns_ms
                .iter()
                .map(|ms| format!("{ms:.1}"))
                .collect::<Vec<_>>()
                .join(" / ")
                + " ms"),
            rss_cell(n),
            sshd_cell(c),
            fmt_opt(c.and_then(|b| b.provision_ms).map(|ms| ms / 1000.0), "s", 2),
            fmt_opt(c.and_then(|b| b.span_ms).map(|ms| ms / 1000.0), "s", 2),
            rss_cell(c),
            ratio(
                n.map(|b| b.to_sshd.as_secs_f64()),
                c.map(|b| b.to_sshd.as_secs_f64())
            ),
        );
    }
    let gaps = missing_figures(nix, ci);
    if !gaps.is_empty() {
        let _ = writeln!(
            d,
            "\nNot every boot gave every figure; the medians above are over the boots that did: {}.",
            gaps.join("; ")
        );
    }
    if o.wide_cpus > 0 {
        let list = |s: &Side| {
            s.wide_boots
                .iter()
                .map(|t| format!("{:.1}", t.as_secs_f64()))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        let _ = writeln!(
            d,
            "\nWith {} vCPUs, boot to sshd per boot: nixseed {} s; cloud-init {} s.",
            o.wide_cpus,
            list(nix),
            list(ci)
        );
    }
    if !nix.timing_line.is_empty() {
        let _ = writeln!(
            d,
            "\nThe agent's timing line (last nixseed boot):\n\n```\n{}\n```",
            nix.timing_line
        );
    }
    for (name, side) in [("nixseed", nix), ("cloud-init", ci)] {
        if !side.chain.trim().is_empty() {
            let _ = writeln!(
                d,
                "\n`systemd-analyze critical-chain ssh.service` (last {name} boot):\n\n```\n{}\n```",
                side.chain.trim()
            );
        }
    }
    if !ci.analyze.is_empty() {
        let _ = writeln!(
            d,
            "\n`cloud-init analyze show` (last cloud-init boot):\n\n```\n{}\n```",
            ci.analyze.trim()
        );
        let _ = writeln!(
            d,
            "\n`cloud-init analyze blame | head -12`:\n\n```\n{}\n```",
            ci.blame.trim()
        );
    }
    let _ = writeln!(
        d,
        "\nHow it is measured: `vm-tests/src/bench.rs`. Boot time runs from QEMU's start to the \
         first `ssh-keyscan` answer carrying `machines/bench/ssh_host_ed25519_key.pub`. \
         Connections to a forwarded port where nothing in the guest listens (one every \
         0.25 s) wait for the guest's kernel to reset one; from then on the guest has its \
         address, and one scan runs at a time, as one operator's client would: a refused one \
         is followed by the next 0.25 s after it began, one that sshd accepted is waited for \
         (`vm-tests/src/ssh.rs`). The RSS is read 3 s after the agent's unit has a main process, \
         and again 1 s after one management poll, made after the round trips below: each \
         of the poll's requests once, on one connection. Round trips \
         go through QEMU's chardev socket and the guest's virtio-serial port, after a \
         `guest-sync-delimited` and 10 warm-up pings, one request in flight at a time. \
         The calls on a new connection each are made first, 150–249 ms apart. A \
         virtio-serial port with no host reads as hung up: qemu-ga looks again every \
         100 ms, so a new connection waits up to that long for its answer, and the look \
         costs wake-ups while no host is there; nixseed's agent sleeps until the kernel \
         reports the port changed (`agent/src/port_events.rs`). The wake-ups are counted \
         before any of those, from 2 s after the agent's RSS was read, with no \
         connection open."
    );
    for (title, how, table) in host {
        let _ = writeln!(d, "\n## {title}\n\n`{how}`\n\n{table}");
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_timing_line_and_analyze_total() {
        let l = vec![
            "nixseed initrd: new instance -> generation 1 (instance-id nixseed-ab, source cidata) in 23.4 ms [find 1.0 write 3.2]".to_string(),
        ];
        assert_eq!(initrd_ms(&l), Some(23.4));
        assert_eq!(initrd_ms(&["nixseed apply: ok in 2 ms".to_string()]), None);
        let show = "-- Boot Record 01 --\nThe total time elapsed since completing an event is printed after the \"@\" character.\nTotal Time: 15.81200 seconds\n\n1 boot records analyzed\n";
        assert_eq!(analyze_total_ms(show), Some(15812.0));
        let show = "Starting stage: init-local\n|`->no cache found @00.12700s +00.00300s\nFinished stage: (init-local) 01.28400 seconds\n|`->config-final-message ran successfully @26.76700s +00.04500s\nTotal Time: 9.20100 seconds\n";
        let span = analyze_span_ms(show).unwrap();
        assert!((span - 26812.0).abs() < 0.01, "{span}");
        let at_in_name = "|`->config-users-groups ran for admin@host @30.00000s +01.50000s\n";
        assert_eq!(analyze_span_ms(at_in_name), Some(31500.0));
    }

    #[test]
    fn journal_monotonic_stamp() {
        let line = "[   19.729874] smoke sshd[245]: Server listening on :: port 22.\n";
        assert_eq!(monotonic_s(line), Some(19.729874));
        assert_eq!(monotonic_s(""), None);
        assert_eq!(monotonic_s("-- No entries --"), None);
    }

    #[test]
    fn small_ratios_keep_two_significant_digits() {
        assert_eq!(fmt_ratio(Some(22.0), Some(41.2)), "0.53×");
        assert_eq!(fmt_ratio(Some(159.7), Some(18140.0)), "0.0088×");
        assert_eq!(fmt_ratio(Some(159.7), Some(48650.0)), "0.0033×");
        assert_eq!(fmt_ratio(Some(2.13), Some(0.96)), "2.22×");
        assert_eq!(fmt_ratio(Some(1.0), Some(0.0)), "–");
        assert_eq!(fmt_ratio(None, Some(1.0)), "–");
    }

    #[test]
    fn a_ratio_at_its_budget_shows_which_side_it_is_on() {
        assert_eq!(fmt_budget_ratio(Some(10.9), Some(21.6), 0.5), "0.505×");
        assert_eq!(fmt_budget_ratio(Some(10.7), Some(21.5), 0.5), "0.498×");
        assert_eq!(fmt_budget_ratio(Some(10.7), Some(20.7), 0.5), "0.52×");
        assert_eq!(fmt_budget_ratio(None, Some(20.7), 0.5), "–");
    }

    #[test]
    fn boot_verdict_shows_the_pairs_spread() {
        let side = |secs: &[u64]| Side {
            boots: secs
                .iter()
                .map(|&s| Boot {
                    to_sshd: Duration::from_secs(s),
                    ..Boot::default()
                })
                .collect(),
            ..Side::default()
        };
        assert_eq!(
            boot_verdict(Some(true), &side(&[11, 12, 10]), &side(&[22, 22, 21])),
            "met (pairs 0.48–0.55×, the 0.5 line inside it)"
        );
        assert_eq!(
            boot_verdict(Some(false), &side(&[12, 13]), &side(&[22, 22])),
            "**missed** (pairs 0.55–0.59×)"
        );
        assert_eq!(boot_verdict(Some(true), &side(&[9]), &side(&[22])), "met");
        assert_eq!(boot_verdict(None, &side(&[]), &side(&[])), "not measured");
    }

    #[test]
    fn own_time_cell_shows_the_sum_and_its_parts() {
        assert_eq!(
            own_cell(Some([220.0, 383.0, 86.8])),
            "0.69 s (0.22 + 0.38 + 0.09)"
        );
        assert_eq!(own_cell(None), "–");
    }

    #[test]
    fn own_time_comes_off_each_boot_and_gaps_are_named() {
        let boot = |s: u64, own: Option<f64>| Boot {
            to_sshd: Duration::from_secs(s),
            own_parts: own.map(|ms| [ms, 0.0, 0.0]),
            ..Boot::default()
        };
        assert_eq!(without_own(&boot(20, Some(1500.0))), Some(18.5));
        assert_eq!(without_own(&boot(20, None)), None);
        let nix = Side {
            boots: vec![
                boot(20, Some(1000.0)),
                boot(21, None),
                boot(22, Some(900.0)),
            ],
            ..Side::default()
        };
        let gaps = missing_figures(&nix, &Side::default());
        assert!(
            gaps.contains(&"nixseed's own time: 2 of 3 boots".to_string()),
            "{gaps:?}"
        );
        assert!(
            gaps.contains(&"the initrd stage: 0 of 3 boots".to_string()),
            "{gaps:?}"
        );
    }
}
