//! `seedctl run`: boot a machine under plain QEMU, no libvirt. Same devices as the
//! libvirt domain: q35, virtio disks (boot overlay, /var), the seed as a SATA cdrom,
//! virtio-net with an SSH port forward, and the guest-agent and nixseed channels as unix
//! sockets in the state directory.

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use anyhow::{Context, Result, bail};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::channel::{self, HelloTarget};
use crate::cmd::seed::{self, SeedFormat};
use crate::cmd::serve::{Background, SeedVia, spawn_background};
use crate::machine::{Identity, Paths};
use crate::output::Report;
use crate::state::{
    BOOT_DISK, CHANNEL_SOCK, CONSOLE_LOG, KNOWN_HOSTS, OVMF_VARS, PIDFILE, QGA_SOCK, QMP_SOCK,
    SEED_ISO, StateDir, VAR_DISK,
};
use crate::{accel, fsutil, tools};

pub const QEMU: &str = "qemu-system-x86_64";

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// KVM when a short probe boot shows it works, TCG otherwise (cached)
    Auto,
    Kvm,
    Tcg,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl run web1 --detach            # UEFI boot of the boot overlay
  seedctl run web1 --kernel bzImage --initrd initrd.img --append 'console=ttyS0' --detach
  seedctl ssh web1
  seedctl stop web1
  seedctl run web1 --seed-via channel --detach   # no seed disk: identity over the channel
The serial console goes to STATE/NAME/console.log; the guest agent and the nixseed
channel listen on STATE/NAME/qga.sock and channel.sock.")]
pub struct RunArgs {
    /// Machine name
    pub name: String,
    /// Boot this kernel directly instead of UEFI firmware
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// initramfs for --kernel
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel (also spelt --cmdline, as for `xml` and `define`)
    #[arg(
        long,
        visible_alias = "cmdline",
        value_name = "CMDLINE",
        requires = "kernel"
    )]
    pub append: Option<String>,
    /// Memory in MiB (at least 64)
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(64..))]
    pub memory: u32,
    /// Virtual CPUs (1 to 255)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=255))]
    pub cpus: u32,
    /// Accelerator
    #[arg(long, value_enum, default_value_t = Accel::Auto)]
    pub accel: Accel,
    /// Return once QEMU runs in the background
    #[arg(long)]
    pub detach: bool,
    /// Host port forwarded to the guest's SSH port [default: a free port]
    #[arg(long, value_name = "PORT", value_parser = clap::value_parser!(u16).range(1..))]
    pub ssh_port: Option<u16>,
    #[command(flatten)]
    pub firmware: crate::firmware::FirmwareArgs,
    /// How the identity reaches the guest at boot: a seed ISO, or the control channel
    /// (no seed disk; seedctl answers the guest's hello, in the background with --detach)
    #[arg(long, value_enum, default_value_t = SeedVia::Iso)]
    pub seed_via: SeedVia,
}

fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("finding a free local port for SSH")?;
    Ok(l.local_addr()
        .context("finding a free local port for SSH")?
        .port())
}

/// How ssh names the host `127.0.0.1:port` in known_hosts: bare on port 22, else
/// `[127.0.0.1]:port`.
pub fn local_ssh_host(port: u16) -> String {
    if port == 22 {
        "127.0.0.1".to_owned()
    } else {
        format!("[127.0.0.1]:{port}")
    }
}

/// Write the pinned known_hosts for the machine's forwarded port.
pub fn write_known_hosts(id: &Identity, sd: &StateDir, port: u16) -> Result<PathBuf> {
    let path = sd.file(KNOWN_HOSTS);
    fsutil::write_atomic(
        &path,
        format!("{}\n", id.known_hosts_line(&local_ssh_host(port))).as_bytes(),
        0o644,
    )?;
    Ok(path)
}

/// The qdev id of the seed cdrom of a `seedctl run` QEMU, for QMP.
pub const SEED_CD: &str = "seedcd";

/// Gives the seed cdrom of the machine's running `seedctl run` QEMU the seed ISO at
/// `iso` anew. QEMU keeps the file it opened at start, so a seed written since (by
/// `seed`, or by `push`, which rewrites it) would otherwise reach the guest only after
/// QEMU restarts, and a guest rebooted inside the same QEMU would apply the older seed
/// again. Returns whether a running QEMU took it; a machine not running under `seedctl
/// run`, or one started with `--seed-via channel` (no cdrom), has nothing to give it to.
pub fn insert_seed_into_running_qemu(
    paths: &Paths,
    name: &str,
    iso: &std::path::Path,
) -> Result<bool> {
    let sd = StateDir::new(paths, name);
    if sd.running_pid().is_none() {
        return Ok(false);
    }
    let mut qmp = crate::qmp::Qmp::connect(&sd.file(QMP_SOCK))
        .with_context(|| format!("machine `{name}`"))?;
    // QEMU opens the file from its own working directory.
    let file = std::path::absolute(iso).unwrap_or_else(|_| iso.to_path_buf());
    let args = |target: (&str, &str)| {
        serde_json::json!({
            target.0: target.1,
            "filename": file.display().to_string(),
            "format": "raw",
            "read-only-mode": "read-only",
            "force": true,
        })
    };
    // By the device's id; a QEMU started before the cdrom had one, by its drive's name.
    let not_found = |e: &anyhow::Error| format!("{e}").contains("DeviceNotFound");
    let changed = match qmp.execute("blockdev-change-medium", Some(args(("id", SEED_CD)))) {
        Err(e) if not_found(&e) => {
            qmp.execute("blockdev-change-medium", Some(args(("device", "seed"))))
        }
        other => other,
    };
    match changed {
        Ok(_) => Ok(true),
        Err(e) if not_found(&e) => Ok(false),
        Err(e) => Err(e.context(format!(
            "machine `{name}`: giving the running QEMU the new seed {}",
            iso.display()
        ))),
    }
}

/// Gives the seed ISO at `iso` to the QEMU running machine `name` now: the libvirt
/// domain's with `connect` (a URI), else its `seedctl run` QEMU. Returns whether one took
/// it.
pub fn insert_seed_into_running(
    paths: &Paths,
    name: &str,
    iso: &std::path::Path,
    connect: Option<&str>,
) -> Result<bool> {
    match connect {
        Some(uri) => crate::cmd::power::insert_seed_into_running_domain(
            &crate::libvirt::uri(Some(uri)),
            name,
            iso,
        ),
        None => insert_seed_into_running_qemu(paths, name, iso),
    }
}

pub fn run(paths: &Paths, a: &RunArgs) -> Result<Report> {
    let id = Identity::load(paths, &a.name)?;
    let sd = StateDir::new(paths, &a.name);
    sd.ensure_disks()?;
    // Held until QEMU has started with the disks and the state is recorded.
    let lock = sd.lock("start it")?;
    if let Some(pid) = sd.running_pid() {
        bail!(
            "machine `{}` is already running under QEMU (pid {pid}, {}); stop it with `seedctl stop {}`",
            a.name,
            sd.file(PIDFILE).display(),
            a.name
        );
    }
    // A QEMU with no pidfile (started by hand, or whose pidfile was lost) still holds the
    // disk's lock: its sockets must not be taken from it.
    if crate::disk::in_use(&sd.file(BOOT_DISK))? {
        bail!(
            "machine `{}`: {} is in use by another process (a QEMU this state directory has no pidfile for); stop that process first",
            a.name,
            sd.file(BOOT_DISK).display()
        );
    }
    // Like Proxmox, regenerate the seed at every start so identity edits take effect.
    let instance_id = match a.seed_via {
        SeedVia::Iso => seed::write(&id, SeedFormat::Iso, &sd.file(SEED_ISO))?,
        SeedVia::Channel => crate::nocloud::instance_id(&id),
    };
    let accel = match a.accel {
        Accel::Kvm => "kvm",
        Accel::Tcg => "tcg",
        Accel::Auto => accel::choose(QEMU, &paths.state)?,
    };
    let port = match a.ssh_port {
        Some(p) => p,
        None => free_port()?,
    };
    sd.check_socket_paths(&[QGA_SOCK, CHANNEL_SOCK, QMP_SOCK])?;
    for s in [QGA_SOCK, CHANNEL_SOCK, QMP_SOCK, PIDFILE] {
        let _ = std::fs::remove_file(sd.file(s));
    }
    // Absolute: with --detach QEMU daemonizes into `/`, and its own arguments (the pidfile's
    // above all) should still name these files.
    let path = |f: &str| {
        let p = sd.file(f);
        std::path::absolute(&p).unwrap_or(p).display().to_string()
    };
    // The same as a value inside QEMU's `key=value,...` options, where a comma is doubled
    // (a state directory may have one in its path).
    let opt = |f: &str| opt_value(&path(f));

    let mut cmd = Command::new(QEMU);
    cmd.args(["-name", &a.name, "-machine", "q35", "-accel", accel]);
    // Under KVM the guest gets the host's CPU, not QEMU's qemu64 default.
    if accel == "kvm" {
        cmd.args(["-cpu", "host"]);
    }
    cmd.args(["-m", &a.memory.to_string(), "-smp", &a.cpus.to_string()])
        .args(["-display", "none", "-nodefaults", "-no-user-config"])
        .args(["-smbios", &format!("type=1,uuid={}", id.product_uuid)])
        .args([
            "-chardev",
            &format!("file,id=console0,path={}", opt(CONSOLE_LOG)),
        ])
        .args(["-serial", "chardev:console0"])
        .args([
            "-qmp",
            &format!("unix:{},server=on,wait=off", opt(QMP_SOCK)),
        ])
        .args(["-pidfile", &path(PIDFILE)])
        .args([
            "-drive",
            &format!(
                "file={},if=virtio,format=qcow2,discard=unmap",
                opt(BOOT_DISK)
            ),
        ])
        .args([
            "-drive",
            &format!(
                "file={},if=virtio,format=qcow2,discard=unmap",
                opt(VAR_DISK)
            ),
        ])
        .args([
            "-netdev",
            &format!("user,id=net0,hostfwd=tcp:127.0.0.1:{port}-:22"),
        ])
        .args([
            "-device",
            &format!("virtio-net-pci,netdev=net0,mac={}", id.mac()),
        ])
        .args(["-device", "virtio-serial-pci,id=vser0"])
        .args([
            "-chardev",
            &format!("socket,id=qga0,path={},server=on,wait=off", opt(QGA_SOCK)),
        ])
        .args([
            "-device",
            "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
        ])
        .args([
            "-chardev",
            &format!(
                "socket,id=ch0,path={},server=on,wait=off",
                opt(CHANNEL_SOCK)
            ),
        ])
        .args([
            "-device",
            "virtserialport,bus=vser0.0,chardev=ch0,name=org.nixseed.channel.0",
        ])
        .args(["-device", "virtio-rng-pci"]);
    if a.seed_via == SeedVia::Iso {
        cmd.args([
            "-drive",
            &format!(
                "file={},if=none,id=seed,media=cdrom,readonly=on,format=raw",
                opt(SEED_ISO)
            ),
        ])
        .args([
            "-device",
            &format!("ide-cd,bus=ide.0,drive=seed,id={SEED_CD}"),
        ]);
    }
    match &a.kernel {
        Some(k) => {
            cmd.arg("-kernel").arg(k);
            if let Some(i) = &a.initrd {
                cmd.arg("-initrd").arg(i);
            }
            if let Some(ap) = &a.append {
                cmd.args(["-append", ap]);
            }
        }
        None => {
            let fw = a.firmware.find()?;
            let vars = sd.file(OVMF_VARS);
            if !vars.exists() {
                // The template may be read-only (a Nix store file); the copy is the
                // machine's own, which QEMU writes.
                std::fs::copy(&fw.vars, &vars)
                    .and_then(|_| {
                        std::fs::set_permissions(&vars, std::fs::Permissions::from_mode(0o600))
                    })
                    .with_context(|| {
                        format!(
                            "copying UEFI variables {} to {}",
                            fw.vars.display(),
                            vars.display()
                        )
                    })?;
            }
            cmd.args([
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=0,readonly=on,file={}",
                    opt_value(&fw.code.display().to_string())
                ),
            ])
            .args([
                "-drive",
                &format!(
                    "if=pflash,format=raw,unit=1,file={}",
                    opt_value(&vars.display().to_string())
                ),
            ]);
        }
    }

    // The port and its known_hosts line are recorded once QEMU has started (detached:
    // once it has daemonized; in the foreground: once it is spawned), so a QEMU that
    // cannot start (the port taken meanwhile) leaves `seedctl ssh` with the last run's.
    let known_hosts = sd.file(KNOWN_HOSTS);
    // Read now: a state file that cannot be read stops the command before QEMU starts,
    // not after, with a VM running that nothing recorded.
    let recorded = sd.load()?;
    let record = || -> Result<()> {
        write_known_hosts(&id, &sd, port)?;
        let mut st = recorded.clone();
        st.ssh_port = Some(port);
        st.instance_id = Some(instance_id.clone());
        sd.save(&st)
    };

    let mut summary = json!({
        "machine": a.name,
        "accel": accel,
        "ssh_port": port,
        "console": sd.file(CONSOLE_LOG),
        "qga_socket": sd.file(QGA_SOCK),
        "channel_socket": sd.file(CHANNEL_SOCK),
        "pidfile": sd.file(PIDFILE),
        "known_hosts": known_hosts,
        "instance_id": instance_id,
        "seed_via": format!("{:?}", a.seed_via).to_lowercase(),
    });
    let mut human = format!(
        "machine `{}` running under QEMU ({accel})\n  ssh      seedctl ssh {}   (127.0.0.1:{port}, host key pinned in {})\n  console  {}\n  agent    seedctl agent {} ping   ({})",
        a.name,
        a.name,
        known_hosts.display(),
        path(CONSOLE_LOG),
        a.name,
        path(QGA_SOCK)
    );
    let socket = channel::socket_path(paths, &a.name, None, None)?;
    if a.detach {
        cmd.arg("-daemonize").stdin(Stdio::null());
        tools::run(&mut cmd).with_context(|| format!("machine `{}`: starting QEMU", a.name))?;
        record()?;
        if a.seed_via == SeedVia::Channel {
            let qemu_pid = sd.running_pid().with_context(|| {
                format!(
                    "machine `{}`: QEMU left no live pid in {}",
                    a.name,
                    path(PIDFILE)
                )
            })?;
            let (pid, log) = spawn_background(
                paths,
                &a.name,
                Background::Local {
                    socket: &socket,
                    qemu_pid,
                },
            )?;
            human.push_str(&format!(
                "\n  identity answers the guest's hello on {} (pid {pid}, log {})",
                socket.display(),
                log.display()
            ));
            summary["answerer_pid"] = json!(pid);
            summary["answerer_log"] = json!(log);
        }
        Ok(Report::new(human, summary))
    } else {
        eprintln!(
            "{human}\n  (Ctrl-C or `seedctl stop {}` powers it off; a second Ctrl-C ends QEMU at once)",
            a.name
        );
        // A process group of its own: the terminal's Ctrl-C reaches seedctl only, which
        // asks the guest to power off (see `power_off_on_interrupt`).
        let mut child =
            std::os::unix::process::CommandExt::process_group(cmd.stdin(Stdio::null()), 0)
                .spawn()
                .with_context(|| {
                    format!(
                        "machine `{}`: starting {QEMU}; install qemu-system-x86",
                        a.name
                    )
                })?;
        power_off_on_interrupt(a.name.clone(), sd.file(QMP_SOCK))?;
        record()?;
        // The lock is held until QEMU's pidfile names it (QEMU writes it a moment after
        // starting): a second `run` in between would not see this one running and would
        // take its sockets and pidfile away.
        let own = i32::try_from(child.id()).ok();
        let waited = std::time::Instant::now();
        while sd.running_pid() != own
            && child.try_wait().ok().flatten().is_none()
            && waited.elapsed() < std::time::Duration::from_secs(10)
        {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        drop(lock);
        let answerer = (a.seed_via == SeedVia::Channel).then(|| {
            let target = HelloTarget {
                paths: paths.clone(),
                name: a.name.clone(),
                socket: socket.clone(),
                qemu_pid: i32::try_from(child.id()).ok(),
            };
            std::thread::spawn(move || {
                let log = |line: &str| eprintln!("seedctl: {line}");
                channel::answer_hellos(&target, true, &log)
            })
        });
        let status = child
            .wait()
            .with_context(|| format!("machine `{}`: waiting for QEMU", a.name))?;
        if let Some(h) = answerer {
            match h.join() {
                Ok(Ok(Some(ans))) => summary["answer"] = json!(ans),
                Ok(Ok(None)) => {}
                Ok(Err(e)) => eprintln!("seedctl: {e:#}"),
                Err(_) => eprintln!("seedctl: machine `{}`: the answerer crashed", a.name),
            }
        }
        // QEMU removes its pidfile when it exits cleanly; one it left behind goes, unless
        // a QEMU started since (another `seedctl run`) holds it.
        if sd.running_pid().is_none() {
            let _ = std::fs::remove_file(sd.file(PIDFILE));
        }
        if !status.success() {
            bail!(
                "machine `{}`: QEMU exited with {status}; see {}",
                a.name,
                path(CONSOLE_LOG)
            );
        }
        Ok(Report::new(
            format!("machine `{}` powered off", a.name),
            summary,
        ))
    }
}

/// Ctrl-C on a foreground `run`: the first asks the guest to power off through QEMU's
/// monitor (ACPI, as `seedctl stop`), so that it writes out `/var` and ends cleanly; a
/// second ends QEMU at once (`quit`, as `seedctl destroy`). QEMU runs in a process group
/// of its own: the terminal's interrupt would otherwise end it at once, whatever the
/// guest had not yet written. SIGINT is blocked in this thread (and those it starts) and
/// taken by a thread of its own.
fn power_off_on_interrupt(name: String, qmp: std::path::PathBuf) -> Result<()> {
    use nix::sys::signal::{SigSet, Signal};
    let mut interrupt = SigSet::empty();
    interrupt.add(Signal::SIGINT);
    interrupt
        .thread_block()
        .context("cannot take Ctrl-C over from the terminal (blocking SIGINT)")?;
    std::thread::spawn(move || {
        let mut count = 0;
        while interrupt.wait().is_ok() {
            count += 1;
            let (command, what) = if count == 1 {
                (
                    "system_powerdown",
                    "asking the guest to power off (ACPI); Ctrl-C again ends QEMU at once",
                )
            } else {
                ("quit", "ending QEMU at once")
            };
            eprintln!("seedctl: machine `{name}`: {what}");
            if let Err(e) =
                crate::qmp::Qmp::connect(&qmp).and_then(|mut q| q.execute(command, None))
            {
                eprintln!("seedctl: machine `{name}`: {e:#}");
            }
        }
    });
    Ok(())
}

/// `text` as a value in QEMU's `key=value,...` option syntax: a comma is written twice.
pub fn opt_value(text: &str) -> String {
    text.replace(',', ",,")
}
