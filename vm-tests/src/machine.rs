//! A machine under test: its identity in `machines/<name>/` (made by `seedctl new` when
//! seedctl has it), its seed ISO, and its disks (root overlay on the base image plus an
//! ext4 `/var` disk labelled `nixseed-var`).

use crate::cmd;
use crate::image::GuestImage;
use crate::paths::workspace_root;
use crate::qemu::{Accel, VmConfig};
use crate::ssh::ClientKey;
use anyhow::{Context, Result};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Clone, Debug)]
pub struct Machine {
    pub name: String,
    /// `machines/<name>/`: the identity on the host.
    pub dir: PathBuf,
    /// Disks, seed and runtime files.
    pub state: PathBuf,
    pub seed_iso: PathBuf,
    pub boot_disk: PathBuf,
    pub var_disk: PathBuf,
}

impl Machine {
    pub fn read(&self, file: &str) -> Result<String> {
        let p = self.dir.join(file);
        Ok(fs::read_to_string(&p)
            .with_context(|| format!("reading {} of machine {}", p.display(), self.name))?
            .trim()
            .to_string())
    }
    pub fn machine_id(&self) -> Result<String> {
        self.read("machine-id")
    }
    pub fn host_key_pub(&self) -> Result<String> {
        self.read("ssh_host_ed25519_key.pub")
    }
    pub fn product_uuid(&self) -> Result<String> {
        self.read("product_uuid")
    }
    /// The NIC's MAC as seedctl derives it (`52:54:00` + the first three bytes of
    /// sha256(product_uuid)): the address the seed's default network-config matches and
    /// what `seedctl run`/`xml` give the VM.
    pub fn mac(&self) -> Result<String> {
        use sha2::{Digest, Sha256};
        let uuid = self.product_uuid()?;
        let d = Sha256::digest(uuid.to_ascii_lowercase().as_bytes());
        Ok(format!("52:54:00:{:02x}:{:02x}:{:02x}", d[0], d[1], d[2]))
    }

    pub fn vm_config(&self, image: &GuestImage, accel: Accel, ssh_port: u16) -> Result<VmConfig> {
        Ok(VmConfig {
            var_cache: "unsafe",
            name: self.name.clone(),
            kernel: image.kernel.clone(),
            initrd: image.initramfs.clone(),
            append: kernel_cmdline(image),
            boot_disk: self.boot_disk.clone(),
            // The cloud-init image keeps /var on its writable root, like a stock cloud image.
            var_disk: (image.variant == crate::image::Variant::Nixseed)
                .then(|| self.var_disk.clone()),
            seed_iso: Some(self.seed_iso.clone()),
            product_uuid: self.product_uuid()?,
            mac: self.mac()?,
            memory_mib: vm_memory_mib(),
            cpus: vm_cpus(),
            ssh_port,
            reach_port: None,
            extra_nic: None,
            extra_args: Vec::new(),
            runtime_dir: self.state.join("run"),
            accel,
        })
    }
}

/// Memory of every VM the harness boots: `NIXSEED_VM_MEMORY` MiB, 1024 by default.
pub fn vm_memory_mib() -> u32 {
    env_u32("NIXSEED_VM_MEMORY", 1024)
}

/// vCPUs of every VM the harness boots: `NIXSEED_VM_CPUS`, 1 by default.
pub fn vm_cpus() -> u32 {
    env_u32("NIXSEED_VM_CPUS", 1)
}

fn env_u32(name: &str, default: u32) -> u32 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Kernel command line for direct boot of the test initramfs, the same for both images.
/// `cryptomgr.notests=1` skips the kernel's self-tests of every crypto algorithm it
/// registers, which under TCG took about 0.7 s of the kernel's start (`crypto_algapi_init`
/// alone 0.65 s with `initcall_debug`); they guard against a broken implementation on
/// real hardware, and FIPS mode, where they matter, ignores the flag.
/// `libata.force=nodbdelay` drops libata's 200 ms wait after it wakes a SATA link ("some
/// PHYs react badly if SStatus is pounded immediately after resuming"): the seed CD-ROM
/// sits on QEMU's emulated AHCI, whose links have no PHY, and loading `ahci` waited for
/// it on each of its six ports (the initramfs's modprobe passes the option on, as
/// modprobe does).
pub fn kernel_cmdline(image: &GuestImage) -> String {
    let mode = match image.variant {
        crate::image::Variant::Nixseed => "ro",
        crate::image::Variant::CloudInit => "rw nixseed.agent=0 nixseed.var=none",
    };
    format!(
        "console=ttyS0,115200 root=LABEL={} {mode} quiet loglevel=4 panic=-1 systemd.show_status=false cryptomgr.notests=1 libata.force=nodbdelay",
        crate::image::ROOT_LABEL
    )
}

/// The seedctl binary of this workspace, when it builds and has the subcommands we use.
pub struct Seedctl {
    pub bin: PathBuf,
    help: String,
}

impl Seedctl {
    pub fn locate() -> Option<Seedctl> {
        let bin = match std::env::var_os("NIXSEED_SEEDCTL_BIN") {
            Some(b) => PathBuf::from(b),
            None => {
                let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
                let ok = Command::new(cargo)
                    .current_dir(workspace_root())
                    .args(["build", "-q", "-p", "seedctl"])
                    .stdin(std::process::Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                if !ok {
                    eprintln!(
                        "vm-tests: seedctl does not build; scenarios that make machines will fail"
                    );
                    return None;
                }
                let target = std::env::var_os("CARGO_TARGET_DIR")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| workspace_root().join("target"));
                target.join("debug/seedctl")
            }
        };
        match cmd::stdout(Command::new(&bin).arg("--help")) {
            Ok(help) => Some(Seedctl { bin, help }),
            Err(e) => {
                eprintln!(
                    "vm-tests: {} does not run ({e:#}); scenarios that make machines will fail",
                    bin.display()
                );
                None
            }
        }
    }

    pub fn has(&self, sub: &str) -> bool {
        self.help
            .lines()
            .any(|l| l.split_whitespace().next() == Some(sub))
    }

    pub fn command(&self, machines: &Path, state: &Path) -> Command {
        let mut c = Command::new(&self.bin);
        c.env("SEEDCTL_MACHINES", machines)
            .env("SEEDCTL_STATE", state);
        c
    }
}

/// Makes machine `name` from scratch (identity, seed, disks) under `work`.
/// Kills the QEMU that `seedctl run` recorded in the machine's state directory `state`
/// (`qemu.pid`), when that pid is still a QEMU: the project's own process, never another.
pub fn kill_recorded_qemu(state: &Path) {
    let Some(pid) = fs::read_to_string(state.join("qemu.pid"))
        .ok()
        .and_then(|p| p.trim().parse::<u32>().ok())
    else {
        return;
    };
    let is_qemu = fs::read(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| String::from_utf8_lossy(&c).contains("qemu-system"));
    if is_qemu {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
    }
}

pub fn create(
    work: &Path,
    name: &str,
    image: &GuestImage,
    key: &ClientKey,
    seedctl: Option<&Seedctl>,
) -> Result<Machine> {
    let machines = work.join("machines");
    let state_root = work.join("state");
    let dir = machines.join(name);
    let state = state_root.join(name);
    if state.exists() {
        // A QEMU that `seedctl run --detach` left from an interrupted run would go on
        // spinning on a core, and holding the disks removed below.
        kill_recorded_qemu(&state);
        fs::remove_dir_all(&state)
            .with_context(|| format!("removing old state {}", state.display()))?;
    }
    fs::create_dir_all(&state).with_context(|| format!("creating {}", state.display()))?;
    fs::create_dir_all(&machines).with_context(|| format!("creating {}", machines.display()))?;
    let s = seedctl.context(
        "vm-tests provisions machines with this workspace's seedctl, which did not build or run (see the start of the log)",
    )?;
    cmd::run(
        s.command(&machines, &state_root)
            // 22, and 9 for the harness's reach probes (`ssh::wait_for_key`): nothing
            // listens there, so the guest's kernel resets them once it has its address,
            // which the nixseed firewall's drop policy would otherwise hide.
            .args([
                "new",
                name,
                "--force",
                "--tcp-port",
                "22",
                "--tcp-port",
                "9",
            ])
            .arg("--admin-key")
            .arg(format!("@{}", key.public.display())),
    )?;
    let out = cmd::stdout(
        s.command(&machines, &state_root)
            .args(["--json", "create", name, "--base"])
            .arg(&image.base_qcow2),
    )?;
    let v: serde_json::Value = serde_json::from_str(out.trim())
        .with_context(|| format!("parsing `seedctl --json create {name}` output: {out}"))?;
    let path = |k: &str| {
        v.get(k)
            .and_then(|p| p.as_str())
            .map(PathBuf::from)
            .with_context(|| format!("`seedctl --json create {name}` printed no `{k}`: {out}"))
    };
    let (boot_disk, var_disk, seed_iso) = (path("boot")?, path("var")?, path("seed")?);
    Ok(Machine {
        name: name.into(),
        dir,
        state,
        seed_iso,
        boot_disk,
        var_disk,
    })
}

pub fn make_overlay(base: &Path, overlay: &Path) -> Result<()> {
    let _ = fs::remove_file(overlay);
    cmd::run(
        Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
            .arg(base)
            .arg(overlay),
    )
    .map(|_| ())
}

impl Machine {
    /// `seedctl` with this machine's machines/ and state directories.
    pub fn seedctl(&self, seedctl: Option<&Seedctl>) -> Result<Command> {
        let s = seedctl.context(
            "this scenario drives seedctl, which does not build here (see the start of the log)",
        )?;
        let machines = self.dir.parent().unwrap_or(Path::new("."));
        let state = self.state.parent().unwrap_or(Path::new("."));
        Ok(s.command(machines, state))
    }
}

/// Writes `files` (paths relative to `stage`, which is emptied first) and packs them into
/// `out` with `genisoimage -iso-level 3 -R -V LABEL`: exactly the command Proxmox VE runs
/// for its cloud-init drive (Rock Ridge names, no Joliet).
pub fn genisoimage(stage: &Path, files: &[(&str, &[u8])], label: &str, out: &Path) -> Result<()> {
    if stage.exists() {
        fs::remove_dir_all(stage).with_context(|| format!("removing {}", stage.display()))?;
    }
    for (rel, bytes) in files {
        let p = stage.join(rel);
        if let Some(parent) = p.parent() {
            fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
        fs::write(&p, bytes).with_context(|| format!("writing {}", p.display()))?;
    }
    fs::create_dir_all(stage).with_context(|| format!("creating {}", stage.display()))?;
    let _ = fs::remove_file(out);
    cmd::run(
        Command::new("genisoimage")
            .args(["-quiet", "-iso-level", "3", "-R", "-V", label, "-o"])
            .arg(out)
            .arg(stage),
    )?;
    Ok(())
}
