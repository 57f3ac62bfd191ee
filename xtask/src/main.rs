//! `cargo xtask`: the README's commands. `demo` boots a VM with its identity; `test` runs
//! every test (unit, integration, real VMs, and the demo itself); `bench` prints the
//! benchmark tables; `dist` builds the static guest binary; `deps` installs host packages.

use std::path::PathBuf;
use std::process::{Command, ExitCode};

use anyhow::{Context, Result, bail};

const USAGE: &str = "usage: cargo xtask <deps|demo|test|bench|dist|man|fuzz> [args]
  deps          install host packages (apt-get) and the musl target (rustup)
  demo          build the guest image, boot a VM with its identity, show it, shut it down
  test [--no-vm] [--no-fuzz] [SCENARIO...]
                fmt + clippy + unit/integration tests + fuzz smoke + real-VM scenarios,
                then the demo (when no SCENARIO is named)
  bench         benchmarks against cloud-init and qemu-ga; markdown tables
  dist          build the static, stripped nixseed-agent (and nixseed-guest-agent) and print their sizes
  man           write seedctl's man pages and shell completions to target/assets
  fuzz [--minutes N] [TARGET...]
                run the cargo-fuzz targets (default: every target, 20 s each)";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let result = match args.first().map(String::as_str) {
        Some("deps") => vm_tests::deps::ensure_all(),
        Some("demo") => preflight().and_then(|()| harness(&["demo"])),
        Some("test") => test(&args[1..]),
        Some("bench") => bench(),
        Some("dist") => dist().map(|_| ()),
        Some("fuzz") => fuzz(&args[1..]),
        Some("man") => man(),
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn root() -> PathBuf {
    vm_tests::paths::workspace_root()
}

fn cargo() -> Command {
    let mut c = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

fn run(mut c: Command, what: &str) -> Result<()> {
    eprintln!("xtask: {what}");
    let status = c
        .status()
        .with_context(|| format!("cannot start: {what}"))?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Runs the vm-tests harness binary (release: TCG boots are slow enough).
fn harness(args: &[&str]) -> Result<()> {
    let mut c = cargo();
    c.args(["run", "--quiet", "--release", "-p", "vm-tests", "--"])
        .args(args);
    run(c, &format!("vm-tests {}", args.join(" ")))
}

/// Stops at once, with one message, where the commands cannot work: they install
/// packages, build a root filesystem in a chroot, and the tests make mount namespaces,
/// loop devices and tun devices. An unprivileged container has none of that, and would
/// otherwise fail minutes later in an assertion that names none of it.
fn preflight() -> Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    const NEEDS: &str = "the demo, the tests and the benchmark need root on a VM or a \
         privileged container (`docker run --privileged`)";
    // The owner of /proc/self is this process's user; no program or libc call needed.
    if std::fs::metadata("/proc/self").map(|m| m.uid()).ok() != Some(0) {
        bail!("{NEEDS}: this user is not root");
    }
    // debootstrap, mkfs.ext4, libvirtd and the like are called by name from there.
    let path = std::env::var("PATH").unwrap_or_default();
    let sbin = ["/usr/sbin", "/sbin"].map(std::path::Path::new);
    if !std::env::split_paths(&path).any(|d| sbin.contains(&d.as_path())) {
        bail!(
            "neither /usr/sbin nor /sbin is on PATH ({path}), and the image build and libvirt run programs from it: \
             use a login shell (`su -`), or add /usr/sbin and /sbin to PATH"
        );
    }
    match Command::new("unshare")
        .args(["--mount", "true"])
        .stderr(std::process::Stdio::null())
        .status()
    {
        Err(e) => bail!("cannot run `unshare` (util-linux): {e}"),
        Ok(s) if !s.success() => {
            bail!("{NEEDS}: `unshare --mount true` failed here, so no mount namespace can be made")
        }
        Ok(_) => {}
    }
    if !std::path::Path::new("/dev/loop-control").exists() {
        bail!("{NEEDS}: there is no /dev/loop-control, so no loop device can be set up");
    }
    Ok(())
}

fn test(args: &[String]) -> Result<()> {
    let no_vm = args.iter().any(|a| a == "--no-vm");
    // Typos fail now, not after the minutes of checks that come before the VMs.
    if let Some(f) = args
        .iter()
        .find(|a| a.starts_with("--") && *a != "--no-vm" && *a != "--no-fuzz")
    {
        bail!("unknown flag {f}\n{USAGE}");
    }
    let scenarios: Vec<&str> = args
        .iter()
        .filter(|a| !a.starts_with("--"))
        .map(String::as_str)
        .collect();
    let known: Vec<&str> = vm_tests::scenarios::SCENARIOS
        .iter()
        .map(|s| s.name)
        .collect();
    if let Some(s) = scenarios.iter().find(|s| !known.contains(s)) {
        bail!(
            "unknown scenario {s}; the scenarios are: {}",
            known.join(", ")
        );
    }
    preflight()?;
    vm_tests::deps::ensure_all()?;
    let mut fmt = cargo();
    fmt.args(["fmt", "--all", "--", "--check"]);
    run(fmt, "cargo fmt --check")?;
    let mut clippy = cargo();
    clippy.args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]);
    run(clippy, "cargo clippy -D warnings")?;
    let mut unit = cargo();
    unit.args(["test", "--workspace"]);
    run(unit, "cargo test --workspace")?;
    nix_checks()?;
    if !args.iter().any(|a| a == "--no-fuzz") {
        // A smoke pass over the committed seeds: about 15 s per target.
        fuzz(&["--minutes".to_string(), "2".to_string()])?;
    }
    if no_vm {
        return Ok(());
    }
    let every = scenarios.is_empty();
    let mut h = vec!["test"];
    h.extend(scenarios);
    harness(&h)?;
    if every {
        // The README's main command, as a user runs it: it asserts the host key, the
        // guest agent's hostname, the pushed change and the shutdown through the agent.
        harness(&["demo"])?;
    }
    Ok(())
}

/// The Nix files, read by Debian's Nix (`nix-bin`): each must parse, and the NixOS module's
/// evaluation test runs when a nixpkgs `lib` directory is at hand (`NIXSEED_NIXPKGS_LIB`;
/// nixpkgs itself is not packaged in Debian).
fn nix_checks() -> Result<()> {
    let mut files = Vec::new();
    nix_files(&root(), &mut files)?;
    files.sort();
    let mut parse = Command::new("nix-instantiate");
    parse
        .arg("--parse")
        .args(&files)
        .stdout(std::process::Stdio::null());
    run(
        parse,
        &format!("nix-instantiate --parse ({} .nix files)", files.len()),
    )?;
    let what = "the NixOS module's evaluation test (nixos-module/tests/stub-eval.nix)";
    let Some(lib) = std::env::var_os("NIXSEED_NIXPKGS_LIB") else {
        eprintln!(
            "xtask: {what} skipped: set NIXSEED_NIXPKGS_LIB to the lib directory of a nixpkgs checkout"
        );
        return Ok(());
    };
    let lib = std::fs::canonicalize(&lib)
        .with_context(|| format!("NIXSEED_NIXPKGS_LIB: cannot find {}", lib.to_string_lossy()))?;
    let mut eval = Command::new("nix-instantiate");
    // The path reaches Nix as a string, so no character in it needs quoting.
    eval.current_dir(root())
        .env("NIXSEED_NIXPKGS_LIB", &lib)
        .args([
            "--eval",
            "--strict",
            "--json",
            "nixos-module/tests/stub-eval.nix",
        ])
        .args([
            "--arg",
            "lib",
            "import (builtins.getEnv \"NIXSEED_NIXPKGS_LIB\")",
        ])
        .stdout(std::process::Stdio::null());
    run(eval, what)
}

/// Every `.nix` file under `dir`, leaving out build output and version control.
fn nix_files(dir: &std::path::Path, out: &mut Vec<PathBuf>) -> Result<()> {
    for entry in std::fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))? {
        let entry = entry.with_context(|| format!("cannot list {}", dir.display()))?;
        let path = entry.path();
        let name = path.file_name().unwrap_or_default().to_string_lossy();
        // Links are not followed: `nix build` leaves `result` pointing into the store.
        let kind = entry
            .file_type()
            .with_context(|| format!("cannot stat {}", path.display()))?;
        if kind.is_symlink() {
            continue;
        }
        if kind.is_dir() {
            if !name.starts_with('.') && name != "target" && name != "corpus" {
                nix_files(&path, out)?;
            }
        } else if name.ends_with(".nix") {
            out.push(path);
        }
    }
    Ok(())
}

/// The cargo-fuzz targets (fuzz/fuzz_targets), each started from its committed corpus.
const FUZZ_TARGETS: &[&str] = &[
    "user_data",
    "meta_data",
    "network_config",
    "eni",
    "superblock_label",
    "channel_decoder",
    "seed_compose",
    "qga_framer",
    "iso_roundtrip",
];

fn fuzz(args: &[String]) -> Result<()> {
    let mut minutes: Option<f64> = None;
    let mut targets: Vec<String> = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--minutes" {
            minutes = Some(
                it.next()
                    .and_then(|m| m.parse().ok())
                    .context("--minutes takes a number")?,
            );
        } else {
            targets.push(a.clone());
        }
    }
    if targets.is_empty() {
        targets = FUZZ_TARGETS.iter().map(|t| t.to_string()).collect();
    }
    let seconds_each = match minutes {
        Some(m) => ((m * 60.0) / targets.len() as f64).max(5.0) as u64,
        None => 20,
    };
    let have = Command::new("cargo").args(["fuzz", "--version"]).output();
    if !have.map(|o| o.status.success()).unwrap_or(false) {
        let mut install = Command::new("cargo");
        install.args(["install", "cargo-fuzz", "--locked"]);
        run(install, "cargo install cargo-fuzz")?;
    }
    for t in &targets {
        // New inputs go to the working corpus (not committed); the reviewed seeds in
        // fuzz/seeds/<target> are read as a second corpus.
        let corpus = root().join("fuzz/corpus").join(t);
        let seeds = root().join("fuzz/seeds").join(t);
        std::fs::create_dir_all(&corpus)?;
        std::fs::create_dir_all(&seeds)?;
        let mut c = Command::new("cargo");
        // cargo-fuzz needs nightly flags; the stable toolchain accepts them with
        // RUSTC_BOOTSTRAP, so no second toolchain is needed.
        c.current_dir(root().join("fuzz"))
            .env("RUSTC_BOOTSTRAP", "1")
            .args(["fuzz", "run", "-O", t])
            .arg(&corpus)
            .arg(&seeds)
            .arg("--")
            .arg(format!("-max_total_time={seconds_each}"))
            .arg("-print_final_stats=1");
        run(c, &format!("fuzz {t} for {seconds_each} s"))?;
    }
    println!(
        "fuzz: {} targets, {seconds_each} s each, no crash",
        targets.len()
    );
    Ok(())
}

/// seedctl's man pages (one per subcommand) and bash/zsh/fish completions, from the same
/// clap definition the binary uses.
fn man() -> Result<()> {
    use clap::CommandFactory;
    let out = root().join("target/assets");
    let man_dir = out.join("man");
    let comp_dir = out.join("completions");
    std::fs::create_dir_all(&man_dir)?;
    std::fs::create_dir_all(&comp_dir)?;
    let cmd = seedctl::cli::Cli::command();
    clap_mangen::generate_to(cmd.clone(), &man_dir).context("writing man pages")?;
    for shell in [
        clap_complete::Shell::Bash,
        clap_complete::Shell::Zsh,
        clap_complete::Shell::Fish,
    ] {
        clap_complete::generate_to(shell, &mut cmd.clone(), "seedctl", &comp_dir)
            .with_context(|| format!("writing {shell} completions"))?;
    }
    println!(
        "man pages in {}, completions in {}",
        man_dir.display(),
        comp_dir.display()
    );
    Ok(())
}

fn dist() -> Result<PathBuf> {
    let bin = vm_tests::deps::build_agent()?;
    let size = std::fs::metadata(&bin)?.len();
    println!(
        "{}: {size} bytes ({:.2} MiB, budget 2.50 MiB)",
        bin.display(),
        size as f64 / 1048576.0
    );
    // Built beside it: the program the resident guest agent runs.
    let guest_agent = bin.with_file_name("nixseed-guest-agent");
    if let Ok(m) = std::fs::metadata(&guest_agent) {
        println!(
            "{}: {} bytes ({:.2} MiB, what `nixseed-agent serve` becomes)",
            guest_agent.display(),
            m.len(),
            m.len() as f64 / 1048576.0
        );
    }
    Ok(bin)
}

fn bench() -> Result<()> {
    preflight()?;
    // qemu-ga, cloud-localds and the rest of the peers the tables compare against.
    vm_tests::deps::ensure_all()?;
    dist()?;
    harness(&["bench"])
}
