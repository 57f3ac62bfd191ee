//! Seed-writing benchmark: times `seedctl seed` for 1 and N machines (in process and as
//! one process per seed) and genisoimage / cloud-localds on the very same seed files,
//! then prints a markdown table. Run: `cargo run --release -p seedctl --example seed-bench [N]`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use seedctl::cmd::new::{NewArgs, run as new_machine};
use seedctl::cmd::seed::{SeedArgs, SeedFormat, run as seed_machine};
use seedctl::machine::{Identity, Paths};
use seedctl::nocloud;

fn new_args(name: String) -> NewArgs {
    NewArgs {
        name,
        hostname: None,
        machine_id: None,
        admin_keys: vec![],
        user_keys: vec![],
        tcp_ports: vec!["22".into(), "443".into()],
        udp_ports: vec![],
        nameservers: vec![],
        search: None,
        hosts_lines: vec![],
        force: false,
    }
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

fn time<F: FnMut(usize) -> Result<()>>(n: usize, mut f: F) -> Result<Duration> {
    let start = Instant::now();
    for i in 0..n {
        f(i)?;
    }
    Ok(start.elapsed())
}

fn spawn(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn main() -> Result<()> {
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(1000);
    let tmp = tempfile::tempdir()?;
    let paths = Paths {
        machines: tmp.path().join("machines"),
        state: tmp.path().join(".seedctl"),
    };
    let names: Vec<String> = (0..n).map(|i| format!("m{i:04}")).collect();
    eprintln!("creating {n} identities (not timed)...");
    for name in &names {
        new_machine(&paths, &new_args(name.clone()))?;
    }
    // The plain seed files, for the other tools.
    let files_dir = tmp.path().join("files");
    for name in &names {
        let id = Identity::load(&paths, name)?;
        let d = files_dir.join(name);
        std::fs::create_dir_all(&d)?;
        for (f, bytes) in nocloud::seed_files(&id).as_list() {
            std::fs::write(d.join(f), bytes)?;
        }
    }
    let out_dir = tmp.path().join("out");
    std::fs::create_dir_all(&out_dir)?;
    let out = |tool: &str, i: usize| -> PathBuf { out_dir.join(format!("{tool}-{i}.iso")) };
    let seedctl_bin = std::env::current_exe()?
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join("seedctl"))
        .context("locating the seedctl binary beside the example")?;

    let mut rows: Vec<(String, Duration, Duration)> = Vec::new();
    let in_process = |i: usize| -> Result<()> {
        seed_machine(
            &paths,
            &SeedArgs {
                name: names[i].clone(),
                output: Some(out("lib", i)),
                format: SeedFormat::Iso,
                connect: None,
            },
        )
        .map(|_| ())
    };
    rows.push((
        "seedctl seed (in process: load, build, write)".into(),
        time(1, in_process)?,
        time(n, in_process)?,
    ));
    if seedctl_bin.is_file() {
        let per_process = |i: usize| {
            spawn(
                Command::new(&seedctl_bin)
                    .arg("--machines")
                    .arg(&paths.machines)
                    .arg("--state")
                    .arg(&paths.state)
                    .args(["seed", &names[i], "-o"])
                    .arg(out("bin", i)),
            )
        };
        rows.push((
            "`seedctl seed` (one process per seed)".into(),
            time(1, per_process)?,
            time(n, per_process)?,
        ));
    } else {
        eprintln!(
            "{} not built; run `cargo build --release -p seedctl` for the per-process row",
            seedctl_bin.display()
        );
    }
    let files = ["user-data", "meta-data", "network-config"];
    if have("genisoimage") {
        let geniso = |i: usize| {
            spawn(
                Command::new("genisoimage")
                    .args([
                        "-quiet",
                        "-volid",
                        "cidata",
                        "-joliet",
                        "-rock",
                        "-iso-level",
                        "3",
                        "-output",
                    ])
                    .arg(out("genisoimage", i))
                    .current_dir(files_dir.join(&names[i]))
                    .args(files),
            )
        };
        rows.push((
            "genisoimage -J -R (one process per seed)".into(),
            time(1, geniso)?,
            time(n, geniso)?,
        ));
    } else {
        eprintln!("genisoimage missing (apt-get install genisoimage); row skipped");
    }
    if have("cloud-localds") {
        let localds = |i: usize| {
            let d = files_dir.join(&names[i]);
            spawn(
                Command::new("cloud-localds")
                    .arg("-N")
                    .arg(d.join("network-config"))
                    .arg(out("localds", i))
                    .arg(d.join("user-data"))
                    .arg(d.join("meta-data")),
            )
        };
        rows.push((
            "cloud-localds (one process per seed)".into(),
            time(1, localds)?,
            time(n, localds)?,
        ));
    } else {
        eprintln!("cloud-localds missing (apt-get install cloud-image-utils); row skipped");
    }

    let base = rows[0].2.as_secs_f64();
    println!("| tool | 1 seed | {n} seeds | per seed | vs seedctl ({n}) |");
    println!("|---|---:|---:|---:|---:|");
    for (tool, one, many) in &rows {
        println!(
            "| {tool} | {:.2} ms | {:.3} s | {:.3} ms | {:.1}x |",
            one.as_secs_f64() * 1e3,
            many.as_secs_f64(),
            many.as_secs_f64() * 1e3 / n as f64,
            many.as_secs_f64() / base
        );
    }
    let budget = Duration::from_secs(5).mul_f64(n as f64 / 1000.0);
    println!(
        "\nbudget: {n} seeds in < {:.1} s — {}",
        budget.as_secs_f64(),
        if rows[0].2 < budget { "met" } else { "MISSED" }
    );
    Ok(())
}
