//! Benchmark: the initrd stage applying a Proxmox-shaped seed (first boot, and a later
//! boot of the same instance) to a tmpfs sysroot, through the real binary with real bind
//! mounts. Prints a markdown table. Usage: apply-bench [AGENT_BINARY] [RUNS]
//! Runs itself inside `unshare -m` so the mounts stay private.

use nixseed_test_support::stats::{median, percentile};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

const USER_DATA: &str = "#cloud-config\nhostname: web1\nmanage_etc_hosts: true\nfqdn: web1.example.com\nuser: admin\npassword: $5$abc$def\nssh_authorized_keys:\n  - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA0 admin@host\nchpasswd:\n  expire: False\nusers:\n  - default\npackage_upgrade: true\n";
const NETWORK: &str = "version: 1\nconfig:\n    - type: physical\n      name: eth0\n      mac_address: '52:54:00:12:34:56'\n      subnets:\n      - type: static\n        address: '192.168.1.10'\n        netmask: '255.255.255.0'\n        gateway: '192.168.1.1'\n    - type: nameserver\n      address:\n      - '192.168.1.1'\n      search:\n      - 'example.com'\n";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let agent = args.get(1).cloned().unwrap_or_else(|| {
        let me = std::env::current_exe().unwrap_or_default();
        me.parent()
            .and_then(Path::parent)
            .map(|d| d.join("nixseed-agent").display().to_string())
            .unwrap_or_default()
    });
    let runs: usize = args.get(2).and_then(|r| r.parse().ok()).unwrap_or(25);
    if std::env::var_os("APPLY_BENCH_IN_NS").is_none() {
        let status = Command::new("unshare")
            .args(["-m", "--propagation", "private"])
            .arg(std::env::current_exe()?)
            .arg(&agent)
            .arg(runs.to_string())
            .env("APPLY_BENCH_IN_NS", "1")
            .status()?;
        std::process::exit(status.code().unwrap_or(1));
    }
    let root = tempfile::Builder::new()
        .prefix("nixseed-bench")
        .tempdir_in("/dev/shm")?;
    let r = root.path();
    nixseed_test_support::Guest {
        nic: Some(("ens18", "52:54:00:12:34:56")),
        hosts: "127.0.0.1 localhost\n",
        ..nixseed_test_support::Guest::default()
    }
    .lay_out(r)?;
    nixseed_test_support::write_seed(
        r,
        "instance-id: 5e1ba3ac93d2c9e8b2b0b7b7f0e5c1a4d7f3e2b1\n",
        USER_DATA,
        Some(NETWORK),
    )?;

    let run_once = || -> Result<f64, Box<dyn std::error::Error>> {
        let t = Instant::now();
        let out = Command::new(&agent)
            .args(["initrd", "--sysroot"])
            .arg(r.join("sysroot"))
            .arg("--root")
            .arg(r.join("host"))
            .arg("--run")
            .arg(r.join("run"))
            .output()?;
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        if !out.status.success() {
            return Err(format!("agent failed: {}", String::from_utf8_lossy(&out.stderr)).into());
        }
        Ok(ms)
    };
    let mut first = Vec::new();
    let mut same = Vec::new();
    for _ in 0..runs {
        let _ = std::fs::remove_dir_all(r.join("sysroot/var/identity"));
        let _ = std::fs::remove_dir_all(r.join("run/nixseed"));
        first.push(run_once()?);
        same.push(run_once()?);
    }
    let stat = |v: &mut Vec<f64>| {
        (
            median(v).unwrap_or(f64::NAN),
            percentile(v, 90.0).unwrap_or(f64::NAN),
        )
    };
    let (fm, f90) = stat(&mut first);
    let (sm, s90) = stat(&mut same);
    let size = std::fs::metadata(&agent)?.len();
    println!(
        "| initrd stage, Proxmox-shaped seed, tmpfs sysroot ({runs} runs) | median ms | p90 ms | budget |"
    );
    println!("|---|---|---|---|");
    println!(
        "| first boot (parse, compose, new host key, write generation, bind mounts) | {fm:.1} | {f90:.1} | 20 ms |"
    );
    println!("| later boot, same instance (verify, bind mounts) | {sm:.1} | {s90:.1} | |");
    println!();
    println!(
        "agent binary: {agent} — {size} bytes ({:.2} MiB; budget 2.50 MiB)",
        size as f64 / 1048576.0
    );
    println!(
        "anchor: cloud-init needs 15.8 s for the same work in a TCG guest (the design's reference figure; the VM table above measures it in this run); ratio at the median: {:.0}x",
        15800.0 / fm
    );
    Ok(())
}
