//! `seedctl define|start|stop|destroy|undefine`: the machine's lifecycle. Under libvirt
//! (with `--connect URI`, or for define/start/undefine always) through virsh; for a
//! machine started by `seedctl run`, stop and destroy talk to its QEMU directly.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use crate::cmd::seed::{self, SeedFormat};
use crate::cmd::serve::{Background, SeedVia, spawn_background};
use crate::cmd::xml::{DomainArgs, domain_xml};
use crate::libvirt::{self, virsh};
use crate::machine::{Identity, Paths};
use crate::output::Report;
use crate::qmp::Qmp;
use crate::state::{
    BOOT_DISK, DOMAIN_URI, DOMAIN_XML, PIDFILE, QMP_SOCK, SEED_ISO, StateDir, pid_alive,
};

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl define web1
  seedctl define web1 --connect qemu+ssh://root@hv1/system --type kvm --net default")]
pub struct DefineArgs {
    /// Machine name
    pub name: String,
    /// libvirt URI [default: LIBVIRT_DEFAULT_URI or qemu:///system]
    #[arg(long, short = 'c', value_name = "URI")]
    pub connect: Option<String>,
    #[command(flatten)]
    pub domain: DomainArgs,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl stop web1                     # a machine started by `seedctl run`
  seedctl stop web1 --connect qemu:///system")]
pub struct PowerArgs {
    /// Machine name
    pub name: String,
    /// libvirt URI; without it, the `seedctl run` QEMU is stopped
    #[arg(long, short = 'c', value_name = "URI")]
    pub connect: Option<String>,
    /// Seconds to wait for a clean power-off
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl destroy web1                  # a machine started by `seedctl run`
  seedctl destroy web1 --connect qemu:///system")]
pub struct DestroyArgs {
    /// Machine name
    pub name: String,
    /// libvirt URI; without it, the `seedctl run` QEMU is ended
    #[arg(long, short = 'c', value_name = "URI")]
    pub connect: Option<String>,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl undefine web1
  seedctl undefine web1 --connect qemu+ssh://root@hv1/system")]
pub struct UndefineArgs {
    /// Machine name
    pub name: String,
    /// libvirt URI [default: LIBVIRT_DEFAULT_URI or qemu:///system]
    #[arg(long, short = 'c', value_name = "URI")]
    pub connect: Option<String>,
}

pub fn define(paths: &Paths, a: &DefineArgs) -> Result<Report> {
    let id = Identity::load(paths, &a.name)?;
    let sd = StateDir::new(paths, &a.name);
    sd.ensure_disks()?;
    seed::write(&id, SeedFormat::Iso, &sd.file(SEED_ISO))?;
    let xml = domain_xml(&id, &sd, &a.domain)?;
    // `domain.xml` says the machine is a libvirt domain (`upgrade` asks libvirt about it
    // then): it is put in place only once libvirt has taken the definition.
    let file = sd.file(DOMAIN_XML);
    let new = sd.file(&format!("{DOMAIN_XML}.new"));
    crate::fsutil::write_atomic(&new, xml.as_bytes(), 0o644)?;
    let uri = libvirt::uri(a.connect.as_deref());
    if let Err(e) = virsh(&uri, &a.name, &["define", &new.display().to_string()]) {
        let _ = std::fs::remove_file(&new);
        return Err(e);
    }
    std::fs::rename(&new, &file)
        .with_context(|| format!("moving {} to {}", new.display(), file.display()))?;
    // And where: `upgrade` asks that libvirt, not the default one, whether it runs.
    crate::fsutil::write_atomic(&sd.file(DOMAIN_URI), format!("{uri}\n").as_bytes(), 0o644)?;
    if uri.starts_with("qemu:///system")
        && let Some(dir) = unsearchable_ancestor(&sd.file(BOOT_DISK))
    {
        eprintln!(
            "seedctl: warning: {} is not searchable by other users; under {uri} QEMU runs as its own user (libvirt-qemu on Debian, qemu on Fedora) and cannot open the machine's disks below it. Keep the state directory (--state) where that user can reach it, e.g. under /var/lib/libvirt/images, or use qemu:///session",
            dir.display()
        );
    }
    Ok(Report::new(
        format!("defined `{}` on {uri} from {}", a.name, file.display()),
        json!({ "machine": a.name, "uri": uri, "xml": file }),
    ))
}

/// The first directory above `file` that other users cannot search (no `o+x`), where a
/// QEMU running as libvirt's own user stops on its way to the file.
fn unsearchable_ancestor(file: &Path) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let file = std::path::absolute(file).ok()?;
    file.ancestors().skip(1).find_map(|dir| {
        let mode = std::fs::metadata(dir).ok()?.permissions().mode();
        (mode & 0o001 == 0).then(|| dir.to_path_buf())
    })
}

fn virsh_op(name: &str, connect: Option<&str>, args: &[&str], done: &str) -> Result<Report> {
    crate::names::check_machine_name(name)?;
    let uri = libvirt::uri(connect);
    virsh(&uri, name, args)?;
    Ok(Report::new(
        format!("{done} `{name}` on {uri}"),
        json!({ "machine": name, "uri": uri, "action": args[0] }),
    ))
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl start web1
  seedctl start web1 --seed-via channel
  seedctl start web1 --connect qemu+ssh://root@hv1/system")]
pub struct StartArgs {
    /// Machine name
    pub name: String,
    /// libvirt URI [default: LIBVIRT_DEFAULT_URI or qemu:///system]
    #[arg(long, short = 'c', value_name = "URI")]
    pub connect: Option<String>,
    /// How the identity reaches the guest at boot: the seed ISO as a cdrom, or the control
    /// channel (the cdrom is ejected; a background `seedctl serve NAME --once` answers)
    #[arg(long, value_enum, default_value_t = SeedVia::Iso)]
    pub seed_via: SeedVia,
}

/// Whether `dumpxml` output shows `seed` as a disk's source file. libvirt escapes the
/// path as it writes any attribute (`&amp;`, `&apos;`), so the path is escaped the same
/// way before it is looked for.
fn seed_attached(xml: &str, seed: &str) -> bool {
    xml.contains(&format!("file='{}'", crate::cmd::xml::esc(seed)))
}

/// Makes the domain's persistent seed cdrom hold the seed ISO (`iso`) or nothing
/// (`channel`): a guest that finds a seed disk never asks over the channel.
fn set_seed_media(uri: &str, name: &str, seed: &std::path::Path, via: SeedVia) -> Result<()> {
    let xml = virsh(uri, name, &["dumpxml", "--inactive", name])?;
    if !xml.contains("device='cdrom'") {
        if via == SeedVia::Iso {
            bail!(
                "machine `{name}`: the libvirt domain on {uri} has no seed cdrom (it was defined with --seed-via channel), so it would boot without its identity; start it with `seedctl start {name} --seed-via channel`, or `seedctl define {name}` again to give it one"
            );
        }
        return Ok(());
    }
    let seed = std::path::absolute(seed).unwrap_or_else(|_| seed.to_path_buf());
    let seed = seed.display().to_string();
    let attached = seed_attached(&xml, &seed);
    match via {
        SeedVia::Channel if attached => {
            virsh(
                uri,
                name,
                &["change-media", name, &seed, "--eject", "--config"],
            )?;
        }
        SeedVia::Iso if !attached => {
            virsh(
                uri,
                name,
                // `--update`, not `--insert`: virsh refuses to insert into a drive that
                // holds a medium already (the same seed spelt through another path, or a
                // domain defined by hand from `seedctl xml`).
                &["change-media", name, "sda", &seed, "--update", "--config"],
            )?;
        }
        _ => {}
    }
    Ok(())
}

/// Gives a running libvirt domain's seed cdrom the seed ISO at `seed` anew, as
/// `insert_seed_into_running_qemu` does for a `seedctl run` QEMU: the domain's QEMU keeps
/// the file it opened at start, and a seed rewritten since would reach the guest only
/// after QEMU restarts. libvirt leaves a medium alone when asked to change it to the path
/// it already has, so the cdrom is emptied and filled again (`--live` only: the
/// persistent config names the same file). Returns whether the domain took it; a domain
/// not running, or with no cdrom holding that file, has nothing to give it to.
pub fn insert_seed_into_running_domain(
    uri: &str,
    name: &str,
    seed: &std::path::Path,
) -> Result<bool> {
    if !matches!(
        libvirt::domstate(uri, name)?.as_deref(),
        Some("running" | "paused")
    ) {
        return Ok(false);
    }
    let seed = std::path::absolute(seed).unwrap_or_else(|_| seed.to_path_buf());
    let seed = seed.display().to_string();
    let xml = virsh(uri, name, &["dumpxml", name])?;
    if seed_attached(&xml, &seed) {
        virsh(
            uri,
            name,
            &["change-media", name, &seed, "--eject", "--live", "--force"],
        )?;
    } else if !empty_seed_slot(&xml) {
        // Another file in the cdrom, or none at all: not this machine's seed to replace.
        return Ok(false);
    }
    // An insert that fails once (libvirt busy) is tried again: the cdrom is empty now.
    let insert = ["change-media", name, "sda", &seed, "--insert", "--live"];
    virsh(uri, name, &insert)
        .or_else(|_| {
            std::thread::sleep(std::time::Duration::from_secs(1));
            virsh(uri, name, &insert)
        })
        .with_context(|| {
            format!(
                "machine `{name}`: the seed cdrom is left empty (the next `seedctl push` or `seed --connect` fills it)"
            )
        })?;
    Ok(true)
}

/// Whether the domain's seed cdrom (target `sda`, as `seedctl xml` writes it) is there
/// and holds no medium: one an earlier eject left empty is filled again.
fn empty_seed_slot(xml: &str) -> bool {
    xml.split("<disk ").skip(1).any(|disk| {
        let disk = disk.split("</disk>").next().unwrap_or_default();
        disk.contains("device='cdrom'")
            && disk.contains("<target dev='sda'")
            && !disk.contains("<source ")
    })
}

pub fn start(paths: &Paths, a: &StartArgs) -> Result<Report> {
    let name = &a.name;
    let id = Identity::load(paths, name)?;
    let sd = StateDir::new(paths, name);
    let uri = libvirt::uri(a.connect.as_deref());
    if a.seed_via == SeedVia::Channel {
        // Before anything is ejected: the domain would boot with no seed and no answer.
        libvirt::refuse_remote_channel(&uri, name, "`--seed-via channel`")?;
    }
    let seed_iso = sd.file(SEED_ISO);
    // A domain whose disks seedctl did not make has no state directory to hold.
    let lock = sd.dir.is_dir().then(|| sd.lock("start it")).transpose()?;
    // Regenerate the seed so the domain boots with the current identity.
    if a.seed_via == SeedVia::Iso {
        seed::write(&id, SeedFormat::Iso, &seed_iso)?;
    }
    set_seed_media(&uri, name, &seed_iso, a.seed_via)?;
    let report = virsh_op(name, a.connect.as_deref(), &["start", name], "started")?;
    drop(lock);
    if a.seed_via == SeedVia::Iso {
        return Ok(report);
    }
    let qemu_pid = libvirt::local_qemu_pid(&uri, name);
    // Without a pid to stop with (a remote URI, or QEMU already gone), a domain that is
    // not running would leave the answerer waiting forever.
    if qemu_pid.is_none() {
        let state = libvirt::domstate(&uri, name)?.unwrap_or_default();
        if state != "running" {
            let log = match uri.trim_end_matches('/') {
                "qemu:///system" => format!(" (see /var/log/libvirt/qemu/{name}.log)"),
                _ => String::new(),
            };
            bail!(
                "machine `{name}`: the domain is '{state}' right after `virsh start`; no answerer was started{log}"
            );
        }
    }
    let (pid, log) = spawn_background(
        paths,
        name,
        Background::Libvirt {
            uri: &uri,
            qemu_pid,
        },
    )?;
    let mut json = report.json;
    json["answerer_pid"] = json!(pid);
    json["answerer_log"] = json!(log);
    Ok(Report::new(
        format!(
            "{}\n  identity answers the guest's hello over the control channel (pid {pid}, log {})",
            report.human,
            log.display()
        ),
        json,
    ))
}

/// Removes the domain and keeps what is the machine's own: its disks, its identity and its
/// UEFI variables (`OVMF_VARS.fd` in the state directory, which `seedctl run` boots with
/// too), so a later `define` or `run` finds the machine as it was.
/// Its `domain.xml` goes with the domain: the machine is no longer libvirt's, and
/// `upgrade` no longer asks libvirt about it.
pub fn undefine(paths: &Paths, a: &UndefineArgs) -> Result<Report> {
    let report = virsh_op(
        &a.name,
        a.connect.as_deref(),
        &["undefine", "--keep-nvram", &a.name],
        "undefined",
    )?;
    let sd = StateDir::new(paths, &a.name);
    for file in [sd.file(DOMAIN_XML), sd.file(DOMAIN_URI)] {
        match std::fs::remove_file(&file) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => eprintln!(
                "seedctl: warning: machine `{}`: cannot remove {}: {e}; `seedctl upgrade` still asks libvirt about the machine",
                a.name,
                file.display()
            ),
            _ => {}
        }
    }
    Ok(report)
}

/// The live `seedctl run` QEMU of a machine, or a message pointing at --connect.
fn local_qemu(paths: &Paths, name: &str) -> Result<(StateDir, i32)> {
    crate::names::check_machine_name(name)?;
    let sd = StateDir::new(paths, name);
    match sd.running_pid() {
        Some(pid) => Ok((sd, pid)),
        None => bail!(
            "machine `{name}` is not running under `seedctl run` (no live pid in {}); for a libvirt domain pass --connect URI",
            sd.file(PIDFILE).display()
        ),
    }
}

fn wait_exit(pid: i32, timeout: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if !pid_alive(pid) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    !pid_alive(pid)
}

pub fn stop(paths: &Paths, a: &PowerArgs) -> Result<Report> {
    if a.connect.is_some() {
        virsh_op(
            &a.name,
            a.connect.as_deref(),
            &["shutdown", &a.name],
            "asked to shut down",
        )?;
        let uri = libvirt::uri(a.connect.as_deref());
        let deadline = std::time::Instant::now().checked_add(Duration::from_secs(a.timeout));
        loop {
            // A transient domain is gone once it is off.
            let state = libvirt::domstate(&uri, &a.name)?;
            if matches!(state.as_deref(), None | Some("shut off")) {
                return Ok(Report::new(
                    format!("machine `{}` powered off on {uri}", a.name),
                    json!({ "machine": a.name, "uri": uri, "action": "shutdown" }),
                ));
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                bail!(
                    "machine `{}` on {uri} is still {} {} s after the shutdown request (the guest may ignore it); `seedctl destroy {} --connect {uri}` ends it",
                    a.name,
                    state.unwrap_or_default(),
                    a.timeout,
                    a.name
                );
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let (sd, pid) = local_qemu(paths, &a.name)?;
    let mut qmp =
        Qmp::connect(&sd.file(QMP_SOCK)).with_context(|| format!("machine `{}`", a.name))?;
    qmp.execute("system_powerdown", None)
        .with_context(|| format!("machine `{}`", a.name))?;
    if !wait_exit(pid, Duration::from_secs(a.timeout)) {
        bail!(
            "machine `{}` did not power off within {} s (the guest may ignore ACPI); `seedctl destroy {}` ends it",
            a.name,
            a.timeout,
            a.name
        );
    }
    let _ = std::fs::remove_file(sd.file(PIDFILE));
    Ok(Report::new(
        format!("machine `{}` powered off", a.name),
        json!({ "machine": a.name, "action": "stop" }),
    ))
}

pub fn destroy(paths: &Paths, a: &DestroyArgs) -> Result<Report> {
    if a.connect.is_some() {
        return virsh_op(
            &a.name,
            a.connect.as_deref(),
            &["destroy", &a.name],
            "destroyed",
        );
    }
    let (sd, pid) = local_qemu(paths, &a.name)?;
    let quit = Qmp::connect(&sd.file(QMP_SOCK)).and_then(|mut q| q.execute("quit", None));
    if quit.is_err() || !wait_exit(pid, Duration::from_secs(5)) {
        let kill =
            crate::tools::run(std::process::Command::new("kill").args(["-KILL", &pid.to_string()]));
        // A kill that fails because QEMU exited since the quit is what was asked for; the
        // pidfile goes only once the process is gone.
        if !wait_exit(pid, Duration::from_secs(5)) {
            let why = match kill {
                Err(e) => format!("killing it failed: {e:#}"),
                Ok(_) => "it is still there 5 s after `kill -KILL`".to_owned(),
            };
            bail!(
                "machine `{}`: QEMU pid {pid} did not end: {why}; its pidfile {} is kept (see `ps -o pid,stat,cmd -p {pid}`)",
                a.name,
                sd.file(PIDFILE).display()
            );
        }
    }
    let _ = std::fs::remove_file(sd.file(PIDFILE));
    Ok(Report::new(
        format!("machine `{}` destroyed", a.name),
        json!({ "machine": a.name, "action": "destroy" }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A 0700 directory on the way (a home directory) is found; a 0711 one is not.
    #[test]
    fn a_directory_others_cannot_search_is_found() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let (home, state) = (
            dir.path().join("home"),
            dir.path().join("home/.seedctl/web1"),
        );
        std::fs::create_dir_all(&state).unwrap();
        let mode = |p: &Path, m: u32| {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(m)).unwrap()
        };
        mode(dir.path(), 0o755);
        mode(&home, 0o711);
        assert_eq!(unsearchable_ancestor(&state.join("boot.qcow2")), None);
        mode(&home, 0o700);
        assert_eq!(
            unsearchable_ancestor(&state.join("boot.qcow2")),
            Some(home.clone())
        );
        mode(&home, 0o755);
    }

    #[test]
    fn an_emptied_seed_cdrom_is_found_as_the_seed_slot() {
        let disk = |source: &str| {
            format!(
                "<domain><devices><disk type='file' device='disk'><source file='/s/boot.qcow2'/><target dev='vda' bus='virtio'/></disk><disk type='file' device='cdrom'><driver name='qemu' type='raw'/>{source}<target dev='sda' bus='sata'/><readonly/></disk></devices></domain>"
            )
        };
        assert!(empty_seed_slot(&disk("")));
        assert!(!empty_seed_slot(&disk("<source file='/s/seed.iso'/>")));
        assert!(!empty_seed_slot(
            "<domain><devices><disk type='file' device='disk'><target dev='vda'/></disk></devices></domain>"
        ));
    }

    #[test]
    fn an_escaped_seed_path_in_dumpxml_counts_as_attached() {
        let seed = "/srv/web1 & co's/.seedctl/web1/seed.iso";
        let xml = "<disk type='file' device='cdrom'>\n  <source file='/srv/web1 &amp; co&apos;s/.seedctl/web1/seed.iso'/>\n</disk>";
        assert!(seed_attached(xml, seed));
        assert!(!seed_attached(xml, "/srv/web2/.seedctl/web2/seed.iso"));
        let ejected =
            "<disk type='file' device='cdrom'>\n  <target dev='sda' bus='sata'/>\n</disk>";
        assert!(!seed_attached(ejected, seed));
    }
}
