//! Guest-agent benchmark: idle RSS and guest-ping round trips of `nixseed-agent serve`
//! against Debian's qemu-ga, both on unix-listen in the same run. Prints a markdown
//! table. Build the agent first:
//! `cargo build --release -p nixseed-agent && cargo run --release -p nixseed-agent --example qga-bench`

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nixseed_test_support::memory::rollup_rss_kib;
use nixseed_test_support::stats::{median, percentile};

const ROUNDS: usize = 20_000;
const QEMU_GA: &str = "/usr/sbin/qemu-ga";

struct Agent {
    name: &'static str,
    child: Child,
    sock: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(name: &'static str, exe: &Path, pre: &[&str], dir: &Path) -> Result<Agent> {
    let sock = dir.join(format!("{name}.sock"));
    let state = dir.join(format!("{name}.state"));
    std::fs::create_dir_all(&state)?;
    let child = Command::new(exe)
        .args(pre)
        .arg("-m")
        .arg("unix-listen")
        .arg("-p")
        .arg(&sock)
        .arg("-t")
        .arg(&state)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("cannot start {}", exe.display()))?;
    if !nixseed_test_support::wait_for(Duration::from_secs(10), || {
        nixseed_test_support::listening(&sock)
    }) {
        bail!("{name} did not listen on {}", sock.display());
    }
    Ok(Agent { name, child, sock })
}

fn rss_kib(pid: u32) -> Result<u64> {
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))?;
    rollup_rss_kib(&rollup).context("no Rss in smaps_rollup")
}

fn pings(a: &Agent, n: usize, out: &mut Vec<Duration>) -> Result<()> {
    let s = UnixStream::connect(&a.sock)?;
    let mut w = s.try_clone()?;
    let mut r = BufReader::new(s);
    let mut line = String::new();
    for _ in 0..n {
        let t = Instant::now();
        w.write_all(b"{\"execute\":\"guest-ping\"}")?;
        line.clear();
        r.read_line(&mut line)?;
        out.push(t.elapsed());
        if line != "{\"return\": {}}\n" {
            bail!("{}: unexpected reply {line:?}", a.name);
        }
    }
    Ok(())
}

/// The median and the 99th percentile (nearest rank) of `v`, in µs.
fn median_p99(v: &[Duration]) -> (f64, f64) {
    let mut us: Vec<f64> = v.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    (
        median(&mut us).unwrap_or(f64::NAN),
        percentile(&mut us, 99.0).unwrap_or(f64::NAN),
    )
}

fn main() -> Result<()> {
    let me = std::env::current_exe()?;
    let ours = me
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("nixseed-agent"))
        .context("cannot locate the target directory")?;
    if !ours.exists() {
        bail!(
            "{} is missing: run `cargo build --release -p nixseed-agent` first",
            ours.display()
        );
    }
    if !Path::new(QEMU_GA).exists() {
        bail!("{QEMU_GA} is missing: apt-get install -y qemu-guest-agent");
    }
    let dir = tempfile::tempdir()?;
    let agents = [
        start("nixseed", &ours, &["serve"], dir.path())?,
        start("qemu-ga", Path::new(QEMU_GA), &[], dir.path())?,
    ];
    // Warm up both, then let them go idle before measuring memory.
    let mut scratch = Vec::new();
    for a in &agents {
        pings(a, 200, &mut scratch)?;
    }
    std::thread::sleep(Duration::from_secs(1));
    let rss: Vec<u64> = agents
        .iter()
        .map(|a| rss_kib(a.child.id()))
        .collect::<Result<_>>()?;
    // Interleave batches so both see the same machine load.
    let mut times = [Vec::new(), Vec::new()];
    for _ in 0..(ROUNDS / 1000) {
        for (a, t) in agents.iter().zip(times.iter_mut()) {
            pings(a, 1000, t)?;
        }
    }
    let [ns, qg] = times;
    let (ns_med, ns_p99) = median_p99(&ns);
    let (qg_med, qg_p99) = median_p99(&qg);
    let size = std::fs::metadata(&ours)?.len();
    println!("| measure | nixseed-agent serve | qemu-ga 7.2 | nixseed / qemu-ga |");
    println!("|---|---|---|---|");
    println!(
        "| idle RSS (`smaps_rollup`) | {:.2} MiB | {:.2} MiB | {:.2} |",
        rss[0] as f64 / 1024.0,
        rss[1] as f64 / 1024.0,
        rss[0] as f64 / rss[1] as f64
    );
    println!(
        "| guest-ping round trip, median ({ROUNDS} over unix-listen) | {ns_med:.1} µs | {qg_med:.1} µs | {:.2} |",
        ns_med / qg_med
    );
    println!(
        "| guest-ping round trip, p99 | {ns_p99:.1} µs | {qg_p99:.1} µs | {:.2} |",
        ns_p99 / qg_p99
    );
    println!(
        "| binary size | {:.2} MiB (whole agent) | | |",
        size as f64 / (1024.0 * 1024.0)
    );
    Ok(())
}
