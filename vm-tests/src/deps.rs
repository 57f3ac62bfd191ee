//! Host prerequisites: Debian packages (installed with apt-get when missing), the musl
//! target, and the static `nixseed-agent` binary that goes into the initramfs and image.

use crate::cmd::{self, describe};
use crate::paths::workspace_root;
use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// What the QEMU harness needs: image building, seeds, booting, ssh.
pub const QEMU_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "qemu-utils",
    "debootstrap",
    "busybox-static",
    "xorriso",
    "genisoimage",
    "mtools",
    "dosfstools",
    "e2fsprogs",
    "ovmf",
    "openssh-client",
    "cpio",
    "zstd",
    "xz-utils",
];

/// libvirt scenarios and the qemu-ga comparison (which loop-mounts a btrfs).
pub const LIBVIRT_PACKAGES: &[&str] = &[
    "libvirt-daemon",
    "libvirt-daemon-driver-qemu",
    "libvirt-clients",
    "qemu-guest-agent",
    "btrfs-progs",
];

fn installed_version(pkg: &str) -> Option<String> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}\t${Version}", pkg])
        .stdin(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let (status, version) = text.split_once('\t')?;
    status.ends_with(" installed").then(|| version.to_string())
}

fn candidate_version(pkg: &str) -> Result<Option<String>> {
    let text = cmd::stdout(Command::new("apt-cache").args(["policy", pkg]))?;
    Ok(text
        .lines()
        .find_map(|l| l.trim().strip_prefix("Candidate:"))
        .map(|v| v.trim().to_string())
        .filter(|v| v != "(none)"))
}

fn apt_update() -> Result<()> {
    cmd::run_visible(
        Command::new("apt-get")
            .args(["update", "-q"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
}

/// Installs whichever of `packages` are missing. Runs `apt-get update` once first.
pub fn ensure_packages(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| installed_version(p).is_none())
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("vm-tests: installing {}", missing.join(" "));
    apt_update()?;
    let mut args: Vec<String> = missing.iter().map(|s| s.to_string()).collect();
    let mut allow_downgrades = false;
    // qemu-system-x86 breaks with a newer qemu-utils than its own release (a backported
    // qemu-img): pin the QEMU family to the emulator's version so apt can solve it.
    let want = if missing.contains(&"qemu-system-x86") {
        candidate_version("qemu-system-x86")?
    } else {
        None
    };
    if let Some(want) = want {
        for sib in ["qemu-utils", "qemu-block-extra"] {
            if installed_version(sib).is_some_and(|v| v != want) {
                args.retain(|a| a != sib);
                args.push(format!("{sib}={want}"));
                allow_downgrades = true;
            }
        }
    }
    let mut apt = Command::new("apt-get");
    apt.args(["install", "-y", "-q", "--no-install-recommends"])
        .env("DEBIAN_FRONTEND", "noninteractive");
    if allow_downgrades {
        apt.arg("--allow-downgrades");
    }
    apt.args(&args);
    cmd::run_visible(&mut apt).context("installing host packages for vm-tests")
}

/// Adds the musl target so the agent links statically.
pub fn ensure_musl_target() -> Result<()> {
    let list = cmd::stdout(Command::new("rustup").args(["target", "list", "--installed"]))?;
    if list.lines().any(|l| l.trim() == MUSL) {
        return Ok(());
    }
    cmd::run_visible(Command::new("rustup").args(["target", "add", MUSL]))
}

/// The musl target and `musl-tools`, tried once per process: without rustup's server or
/// the mirror, each try would wait for its network timeout again.
fn musl_toolchain() -> Result<()> {
    static TRIED: std::sync::OnceLock<Result<(), String>> = std::sync::OnceLock::new();
    TRIED
        .get_or_init(|| {
            ensure_musl_target()
                .and_then(|()| ensure_packages(&["musl-tools"]))
                .map_err(|e| format!("{e:#}"))
        })
        .clone()
        .map_err(anyhow::Error::msg)
}

pub const MUSL: &str = "x86_64-unknown-linux-musl";
const GNU: &str = "x86_64-unknown-linux-gnu";

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// What [`build_agent`] returned, for reports: its target, or that it was given.
pub fn agent_build_kind(agent: &Path) -> &'static str {
    if std::env::var_os("NIXSEED_AGENT_BIN").is_some() {
        "given by `NIXSEED_AGENT_BIN`"
    } else if agent.components().any(|c| c.as_os_str() == MUSL) {
        "static musl"
    } else {
        "static glibc"
    }
}

/// Builds the static guest binary and returns its path. musl first; a static glibc
/// build when the musl toolchain is not usable here.
pub fn build_agent() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("NIXSEED_AGENT_BIN") {
        return Ok(PathBuf::from(p));
    }
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let musl = musl_toolchain().and_then(|()| {
        let mut c = Command::new(&cargo);
        c.current_dir(workspace_root()).args([
            "build",
            "--release",
            "-p",
            "nixseed-agent",
            "--target",
            MUSL,
        ]);
        cmd::run_visible(&mut c)
    });
    let (triple, result) = match musl {
        Ok(()) => (MUSL, Ok(())),
        Err(e) => {
            eprintln!("vm-tests: musl build failed ({e:#}); trying static glibc");
            let mut c = Command::new(&cargo);
            c.current_dir(workspace_root())
                .env("RUSTFLAGS", "-C target-feature=+crt-static")
                .args(["build", "--release", "-p", "nixseed-agent", "--target", GNU]);
            let line = describe(&c);
            (
                GNU,
                cmd::run_visible(&mut c).with_context(|| format!("`{line}`")),
            )
        }
    };
    result?;
    let bin = target_dir().join(triple).join("release/nixseed-agent");
    if !bin.is_file() {
        bail!("{} missing after the agent build", bin.display());
    }
    Ok(bin)
}

/// The workspace's own tests: real peers and readers (D-Bus daemon for the agent's
/// client, libxml2's validator behind virt-xml-validate, OpenSSH's signer, the seed tools
/// the benchmark compares with), the C++ compiler libFuzzer is built with, and Nix, which
/// reads the flake, the package and the NixOS module.
pub const TEST_PACKAGES: &[&str] = &[
    "g++",
    "nix-bin",
    "dbus",
    "libxml2-utils",
    "openssh-client",
    "cloud-image-utils",
    "nftables",
    "util-linux",
    // `ip` (a tun device in the qemu-ga comparison) and `kill` (seedctl's destroy and the
    // tests' stand-in QEMU): "important" packages that minimal images and containers lack.
    "iproute2",
    "procps",
];

/// Everything `vm-tests deps` promises.
pub fn ensure_all() -> Result<()> {
    ensure_packages(QEMU_PACKAGES)?;
    ensure_packages(LIBVIRT_PACKAGES)?;
    ensure_libvirt_log_daemon()?;
    ensure_packages(TEST_PACKAGES)?;
    ensure_rust_components()?;
    // Without the musl target (rustup's server out of reach, say) the agent is built
    // static against glibc instead (`build_agent`), so this is a warning, not a stop.
    if let Err(e) = musl_toolchain() {
        eprintln!(
            "vm-tests: no musl toolchain ({e:#}); the agent will be linked static against glibc"
        );
    }
    Ok(())
}

/// `virtlogd`, which libvirtd's QEMU driver needs, is in `libvirt-daemon` up to bookworm
/// and in its own `libvirt-daemon-log` from trixie on: when it is still missing, that
/// package is added (`ensure_packages` refreshes the package lists first).
fn ensure_libvirt_log_daemon() -> Result<()> {
    if Path::new("/usr/sbin/virtlogd").exists() {
        return Ok(());
    }
    ensure_packages(&["libvirt-daemon-log"])
        .context("/usr/sbin/virtlogd is missing after installing libvirt-daemon")
}

/// rustfmt and clippy, which `cargo xtask test` runs, when rustup's profile left them out.
pub fn ensure_rust_components() -> Result<()> {
    let list = cmd::stdout(Command::new("rustup").args(["component", "list", "--installed"]))?;
    let missing: Vec<&str> = ["rustfmt", "clippy"]
        .into_iter()
        .filter(|c| !list.lines().any(|l| l.starts_with(&format!("{c}-"))))
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    cmd::run_visible(
        Command::new("rustup")
            .args(["component", "add"])
            .args(&missing),
    )
    .with_context(|| {
        format!(
            "adding {} with rustup (`cargo xtask test` runs rustfmt and clippy)",
            missing.join(" and ")
        )
    })
}
