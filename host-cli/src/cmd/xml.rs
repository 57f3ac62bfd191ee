//! `seedctl xml`: the libvirt domain for a machine, with the same devices as `seedctl run`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::cmd::serve::SeedVia;
use crate::machine::{Identity, Paths};
use crate::output::Report;
use crate::state::{
    BOOT_DISK, CHANNEL_SOCK, CONSOLE_LOG, OVMF_VARS, QGA_SOCK, SEED_ISO, StateDir, VAR_DISK,
};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DomainType {
    /// TCG emulation: works everywhere
    Qemu,
    /// Hardware virtualisation
    Kvm,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetMode {
    /// User-mode networking (no host bridge needed)
    User,
    /// libvirt's `default` NAT network
    Default,
}

#[derive(Debug, Clone, Args)]
pub struct DomainArgs {
    /// Domain type
    #[arg(long = "type", value_enum, default_value_t = DomainType::Qemu)]
    pub domain_type: DomainType,
    /// Network attachment
    #[arg(long, value_enum, default_value_t = NetMode::User)]
    pub net: NetMode,
    /// Memory in MiB (at least 64)
    #[arg(long, default_value_t = 1024, value_parser = clap::value_parser!(u32).range(64..))]
    pub memory: u32,
    /// Virtual CPUs (1 to 255)
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=255))]
    pub cpus: u32,
    /// Boot this kernel directly instead of UEFI firmware
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// initramfs for --kernel
    #[arg(long, value_name = "FILE", requires = "kernel")]
    pub initrd: Option<PathBuf>,
    /// Kernel command line for --kernel (also spelt --append, as for `run`)
    #[arg(
        long,
        visible_alias = "append",
        value_name = "CMDLINE",
        requires = "kernel"
    )]
    pub cmdline: Option<String>,
    #[command(flatten)]
    pub firmware: crate::firmware::FirmwareArgs,
    /// How the identity reaches the guest at boot: the seed ISO as a cdrom, or the control
    /// channel (no cdrom; `seedctl start --seed-via channel` or `seedctl serve` answers)
    #[arg(long, value_enum, default_value_t = SeedVia::Iso)]
    pub seed_via: SeedVia,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl xml web1 > web1.xml
  seedctl xml web1 --type kvm --net default -o web1.xml
  seedctl xml web1 --kernel bzImage --initrd initrd.img --cmdline 'console=ttyS0'")]
pub struct XmlArgs {
    /// Machine name
    pub name: String,
    /// Write to FILE instead of standard output
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    #[command(flatten)]
    pub domain: DomainArgs,
}

/// Escapes text for an XML attribute or element, as libvirt escapes what it writes.
pub(crate) fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('\'', "&apos;")
        .replace('"', "&quot;")
}

fn p(path: &Path) -> String {
    esc(&path.display().to_string())
}

/// Absolute form of a state path: libvirt resolves paths on its own side.
fn abs(path: PathBuf) -> PathBuf {
    std::path::absolute(&path).unwrap_or(path)
}

/// The domain XML text.
pub fn domain_xml(id: &Identity, sd: &StateDir, d: &DomainArgs) -> Result<String> {
    sd.check_socket_paths(&[
        &format!("libvirt-{QGA_SOCK}"),
        &format!("libvirt-{CHANNEL_SOCK}"),
    ])?;
    let f = |name: &str| abs(sd.file(name));
    let dtype = match d.domain_type {
        DomainType::Qemu => "qemu",
        DomainType::Kvm => "kvm",
    };
    let mut x = String::new();
    let _ = writeln!(x, "<domain type='{dtype}'>");
    let _ = writeln!(x, "  <name>{}</name>", esc(&id.name));
    let _ = writeln!(x, "  <uuid>{}</uuid>", id.product_uuid);
    let _ = writeln!(x, "  <memory unit='MiB'>{}</memory>", d.memory);
    let _ = writeln!(x, "  <vcpu>{}</vcpu>", d.cpus);
    // Under KVM the guest gets the host's CPU (AES-NI, AVX, x86-64-v2 and on), not
    // libvirt's qemu64 default; under TCG the emulated default stays.
    if d.domain_type == DomainType::Kvm {
        let _ = writeln!(
            x,
            "  <cpu mode='host-passthrough' check='none' migratable='on'/>"
        );
    }
    let _ = writeln!(x, "  <os>");
    let _ = writeln!(x, "    <type arch='x86_64' machine='q35'>hvm</type>");
    match &d.kernel {
        Some(k) => {
            let _ = writeln!(x, "    <kernel>{}</kernel>", p(&abs(k.clone())));
            if let Some(i) = &d.initrd {
                let _ = writeln!(x, "    <initrd>{}</initrd>", p(&abs(i.clone())));
            }
            if let Some(c) = &d.cmdline {
                let _ = writeln!(x, "    <cmdline>{}</cmdline>", esc(c));
            }
        }
        None => {
            let fw = d
                .firmware
                .find()
                .with_context(|| format!("machine `{}`", id.name))?;
            let _ = writeln!(
                x,
                "    <loader readonly='yes' type='pflash'>{}</loader>",
                p(&fw.code)
            );
            let _ = writeln!(
                x,
                "    <nvram template='{}'>{}</nvram>",
                p(&fw.vars),
                p(&f(OVMF_VARS))
            );
            let _ = writeln!(x, "    <boot dev='hd'/>");
        }
    }
    let _ = writeln!(x, "  </os>");
    let _ = writeln!(x, "  <features>\n    <acpi/>\n  </features>");
    let _ = writeln!(
        x,
        "  <on_poweroff>destroy</on_poweroff>\n  <on_reboot>restart</on_reboot>\n  <on_crash>destroy</on_crash>"
    );
    let _ = writeln!(x, "  <devices>");
    for (file, dev) in [(BOOT_DISK, "vda"), (VAR_DISK, "vdb")] {
        let _ = writeln!(
            x,
            "    <disk type='file' device='disk'>\n      <driver name='qemu' type='qcow2' discard='unmap'/>\n      <source file='{}'/>\n      <target dev='{dev}' bus='virtio'/>\n    </disk>",
            p(&f(file))
        );
    }
    if d.seed_via == SeedVia::Iso {
        let _ = writeln!(
            x,
            "    <disk type='file' device='cdrom'>\n      <driver name='qemu' type='raw'/>\n      <source file='{}'/>\n      <target dev='sda' bus='sata'/>\n      <readonly/>\n    </disk>",
            p(&f(SEED_ISO))
        );
    }
    match d.net {
        NetMode::User => {
            let _ = writeln!(
                x,
                "    <interface type='user'>\n      <mac address='{}'/>\n      <model type='virtio'/>\n    </interface>",
                id.mac()
            );
        }
        NetMode::Default => {
            let _ = writeln!(
                x,
                "    <interface type='network'>\n      <mac address='{}'/>\n      <source network='default'/>\n      <model type='virtio'/>\n    </interface>",
                id.mac()
            );
        }
    }
    let _ = writeln!(x, "    <controller type='virtio-serial' index='0'/>");
    for (sock, name) in [
        (QGA_SOCK, "org.qemu.guest_agent.0"),
        (CHANNEL_SOCK, "org.nixseed.channel.0"),
    ] {
        let _ = writeln!(
            x,
            "    <channel type='unix'>\n      <source mode='bind' path='{}'/>\n      <target type='virtio' name='{name}'/>\n    </channel>",
            p(&f(&format!("libvirt-{sock}")))
        );
    }
    // A pty, so that `virsh console` attaches, with everything it shows kept in the log.
    let _ = writeln!(
        x,
        "    <serial type='pty'>\n      <log file='{}' append='on'/>\n      <target port='0'/>\n    </serial>",
        p(&f(&format!("libvirt-{CONSOLE_LOG}")))
    );
    let _ = writeln!(
        x,
        "    <rng model='virtio'>\n      <backend model='random'>/dev/urandom</backend>\n    </rng>"
    );
    let _ = writeln!(x, "  </devices>");
    let _ = writeln!(x, "</domain>");
    Ok(x)
}

pub fn run(paths: &Paths, a: &XmlArgs) -> Result<Report> {
    let id = Identity::load(paths, &a.name)?;
    let sd = StateDir::new(paths, &a.name);
    let xml = domain_xml(&id, &sd, &a.domain)?;
    match &a.output {
        Some(out) => {
            crate::fsutil::write_output(
                out,
                xml.as_bytes(),
                0o644,
                crate::fsutil::Output::DomainXml,
            )?;
            Ok(Report::new(
                format!("wrote {}", out.display()),
                json!({ "machine": a.name, "output": out }),
            ))
        }
        None => Ok(Report::new(
            xml.trim_end(),
            json!({ "machine": a.name, "xml": xml }),
        )),
    }
}
