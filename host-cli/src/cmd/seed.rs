//! `seedctl seed`: write a machine's NoCloud seed volume.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde_json::json;

use crate::fsutil::{Output, write_output};
use crate::machine::{Identity, Paths};
use crate::names::hex;
use crate::output::Report;
use crate::{iso9660, nocloud, vfat};

/// Timestamp on every seed volume unless SOURCE_DATE_EPOCH says otherwise (2020-01-01).
pub const DEFAULT_EPOCH: i64 = 1_577_836_800;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SeedFormat {
    /// iso9660 with Rock Ridge and Joliet, label `cidata` (attach as a cdrom)
    Iso,
    /// FAT12 image, label `CIDATA` (attach as a disk)
    Vfat,
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl seed web1                       # .seedctl/web1/seed.iso
  seedctl seed web1 -o /tmp/web1.iso
  seedctl seed web1 --format vfat -o web1-seed.img
  seedctl seed web1 --connect qemu:///system  # and give it to the running domain
The machine's own seed ISO is given to the QEMU running it now (`seedctl run`'s, or
with --connect the libvirt domain's), so a reboot inside it applies the new seed.
The same identity always gives byte-identical output (ISO timestamps come from
SOURCE_DATE_EPOCH, default 2020-01-01; vfat always carries 2020-01-01).")]
pub struct SeedArgs {
    /// Machine name
    pub name: String,
    /// Output file [default: STATE/NAME/seed.iso or seed.img]
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Volume format
    #[arg(long, value_enum, default_value_t = SeedFormat::Iso)]
    pub format: SeedFormat,
    /// libvirt URI: give the new seed ISO to the running domain's cdrom
    #[arg(long, short = 'c', value_name = "URI", conflicts_with = "output")]
    pub connect: Option<String>,
}

/// SOURCE_DATE_EPOCH when set and valid, else [`DEFAULT_EPOCH`].
pub fn epoch() -> i64 {
    std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(DEFAULT_EPOCH)
}

/// The seed volume bytes for one identity.
pub fn image(id: &Identity, format: SeedFormat, epoch: i64) -> Result<Vec<u8>> {
    let files = crate::signing::seed_files(id)?;
    let list = files.as_list();
    match format {
        SeedFormat::Iso => iso9660::build(
            &list,
            &iso9660::IsoOptions {
                volume_id: "cidata",
                epoch,
            },
        ),
        SeedFormat::Vfat => {
            let d = id.digest();
            vfat::build(
                &list,
                "CIDATA",
                u32::from_be_bytes([d[0], d[1], d[2], d[3]]),
            )
        }
    }
    .with_context(|| format!("machine `{}`: building the seed volume", id.name))
}

pub fn default_output(paths: &Paths, name: &str, format: SeedFormat) -> PathBuf {
    paths.state_dir(name).join(match format {
        SeedFormat::Iso => "seed.iso",
        SeedFormat::Vfat => "seed.img",
    })
}

/// Write the seed for `name` to `out`; returns the instance-id.
/// Writes the seed image, after reading it back as the guest will: a seed the guest would
/// refuse is an error here, not at the VM's boot. The image holds the private host key,
/// so it is the owner's only (0600), as in `machines/NAME`.
pub fn write(id: &Identity, format: SeedFormat, out: &std::path::Path) -> Result<String> {
    write_as(id, format, out, Output::MachineSeed)
}

/// [`write`] to a file `kind` says what it may replace: the machine's own seed, or a
/// file named by `-o`.
fn write_as(
    id: &Identity,
    format: SeedFormat,
    out: &std::path::Path,
    kind: Output,
) -> Result<String> {
    let seed = crate::cmd::render::expected_seed(id)?;
    crate::cmd::render::expected_tree(id, &seed, &[])?;
    let bytes = image(id, format, epoch())?;
    if let Some(dir) = out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    write_output(out, &bytes, 0o600, kind)
        .with_context(|| format!("machine `{}`: writing the seed", id.name))?;
    Ok(nocloud::instance_id(id))
}

pub fn run(paths: &Paths, a: &SeedArgs) -> Result<Report> {
    let id = Identity::load(paths, &a.name)?;
    id.warn_stale_host_lines();
    if a.connect.is_some() && a.format != SeedFormat::Iso {
        anyhow::bail!(
            "machine `{}`: --connect gives the seed ISO to the domain's cdrom; a vfat seed has none to go to",
            a.name
        );
    }
    let out = match &a.output {
        Some(out) => out.clone(),
        None => {
            // The machine's state directory is 0711, as `seedctl create` makes it.
            crate::state::create_private_dir(&paths.state_dir(&a.name))?;
            default_output(paths, &a.name, a.format)
        }
    };
    let kind = match a.output {
        Some(_) => Output::Seed,
        None => Output::MachineSeed,
    };
    let instance_id = write_as(&id, a.format, &out, kind)?;
    // The machine's own seed ISO reaches a QEMU that runs it now, not only its next start.
    let own_iso = a.output.is_none() && a.format == SeedFormat::Iso;
    let running = own_iso
        && crate::cmd::run::insert_seed_into_running(paths, &a.name, &out, a.connect.as_deref())?;
    let digest = hex(&id.digest());
    Ok(Report::new(
        format!(
            "wrote {} (instance-id {instance_id}){}",
            out.display(),
            if running {
                "; the running QEMU's seed cdrom now holds it"
            } else {
                ""
            }
        ),
        json!({
            "machine": a.name,
            "output": out,
            "running_qemu": running,
            "format": format!("{:?}", a.format).to_lowercase(),
            "instance_id": instance_id,
            "identity_sha256": digest,
        }),
    ))
}
