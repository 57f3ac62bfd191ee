//! Seed sources, tried in order (docs/identity.md) until one yields a seed. Each source is one
//! module behind [`Source`]; adding a source touches one file and the [`ORDER`] table.

mod block;
pub mod channel;
mod cmdline;
mod configdrive;
mod credentials;
mod nocloud;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Result;
use nixseed_core::label;
use nixseed_core::nocloud::{DsToken, parse_ds_token};
use nixseed_core::seed::{Seed, SeedFiles};

pub use block::BlockDevice;

/// Where the system's pseudo-filesystems and the target root are. In production `/` and
/// `/sysroot` (initrd) or `/` (stage 2); `--root DIR` points both into a test tree.
pub struct Env {
    /// Root of `/sys`, `/proc`, `/dev`.
    pub host: PathBuf,
    /// The target system root (`/var/lib/cloud/seed/nocloud` lives there).
    pub sysroot: PathBuf,
    /// Where seed media are mounted (a private directory under /run).
    pub run: PathBuf,
    /// How long the control channel waits for the host at boot; zero disables it.
    pub channel_wait: std::time::Duration,
    /// How long a boot that found no seed waits for udev's queue to empty, while udevd is
    /// still adding devices, before it probes the block devices again; zero disables it.
    pub udev_wait: std::time::Duration,
    /// The identity store, for what `hello` reports.
    pub identity: PathBuf,
    blocks: OnceLock<Vec<BlockDevice>>,
    blocks_again: OnceLock<Vec<BlockDevice>>,
}

impl Env {
    pub fn new(host: PathBuf, sysroot: PathBuf, run: PathBuf) -> Env {
        let identity = sysroot.join("var/identity");
        Env {
            host,
            sysroot,
            run,
            channel_wait: std::time::Duration::ZERO,
            udev_wait: std::time::Duration::ZERO,
            identity,
            blocks: OnceLock::new(),
            blocks_again: OnceLock::new(),
        }
    }

    /// The current generation number and instance-id, if an identity exists.
    pub fn current_identity(&self) -> (Option<u64>, Option<String>) {
        let Ok(store) = crate::store::Store::open(&self.identity, false) else {
            return (None, None);
        };
        match store.current() {
            Ok(Some(g)) => (Some(g.number), Some(g.manifest.instance_id)),
            _ => (None, None),
        }
    }

    pub fn host_path(&self, abs: &str) -> PathBuf {
        self.host.join(abs.trim_start_matches('/'))
    }

    pub fn sysroot_path(&self, abs: &str) -> PathBuf {
        self.sysroot.join(abs.trim_start_matches('/'))
    }

    /// Block devices with a recognised filesystem label, probed once, or again after
    /// [`Env::wait_for_udev_and_probe_again`].
    pub fn block_devices(&self) -> &[BlockDevice] {
        match self.blocks_again.get() {
            Some(again) => again,
            None => self.blocks.get_or_init(|| block::scan(self)),
        }
    }

    /// When the probe found no seed volume and udevd is still loading drivers and adding
    /// devices (a seed disk may be on its way), waits for udev's queue to empty, at most
    /// `udev_wait`, and probes again. Returns whether it probed again.
    fn wait_for_udev_and_probe_again(&self) -> bool {
        let seed_volume = self
            .block_devices()
            .iter()
            .any(|d| label::is_nocloud_label(&d.label) || label::is_configdrive_label(&d.label));
        if seed_volume || self.blocks_again.get().is_some() || !self.wait_for_udev() {
            return false;
        }
        self.blocks_again.set(block::scan(self)).is_ok()
    }

    /// Waits, at most `udev_wait`, until udevd has no event queued: it keeps
    /// `<run>/udev/queue` while it has. Returns whether there was anything to wait for.
    fn wait_for_udev(&self) -> bool {
        let udev = self.run.join("udev");
        let queue = udev.join("queue");
        if self.udev_wait.is_zero() || !udev.join("control").exists() || !queue.exists() {
            return false;
        }
        let start = std::time::Instant::now();
        while queue.exists() {
            if start.elapsed() >= self.udev_wait {
                tracing::warn!(
                    "no seed found, and udev still had events queued after {} s ({} exists): probing the block devices again without waiting longer",
                    self.udev_wait.as_secs_f64(),
                    queue.display()
                );
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        tracing::info!(
            "no seed found while udev had events queued: waited {:.0} ms for its queue to empty, probing the block devices again",
            start.elapsed().as_secs_f64() * 1000.0
        );
        true
    }

    /// The VM's DMI product_uuid, lowercase.
    pub fn product_uuid(&self) -> Option<String> {
        let p = self.host_path("/sys/class/dmi/id/product_uuid");
        std::fs::read_to_string(p)
            .ok()
            .map(|s| s.trim().to_ascii_lowercase())
            .filter(|s| !s.is_empty())
    }

    /// Refuses a channel bundle made for another VM: seedctl names the VM's product_uuid
    /// in it, and another VM's bundle would give this one that VM's host key and
    /// machine-id. A VM that cannot tell its own (no DMI) cannot show the bundle is its
    /// own, so it is refused too.
    pub fn check_bundle_is_mine(&self, seed: &Seed, machine: &str) -> Result<()> {
        let Some(wanted) = &seed.user.nixseed.product_uuid else {
            return Ok(());
        };
        match self.product_uuid() {
            Some(mine) if wanted.trim().eq_ignore_ascii_case(&mine) => Ok(()),
            Some(mine) => anyhow::bail!(
                "the identity of `{machine}` is for the VM with product_uuid {}, and this VM's is {mine}: refused",
                wanted.trim()
            ),
            None => anyhow::bail!(
                "the identity of `{machine}` is for the VM with product_uuid {}, and this VM has none to compare (no /sys/class/dmi/id/product_uuid): refused",
                wanted.trim()
            ),
        }
    }

    pub fn cmdline(&self) -> String {
        std::fs::read_to_string(self.host_path("/proc/cmdline")).unwrap_or_default()
    }

    /// The `ds=nocloud` token of the kernel command line, if it has one.
    pub fn cmdline_ds_token(&self) -> Option<DsToken> {
        parse_ds_token(&self.cmdline())
    }

    /// The `ds=nocloud` token of the SMBIOS system serial, if it has one.
    pub fn serial_ds_token(&self) -> Option<DsToken> {
        let serial = std::fs::read_to_string(self.host_path("/sys/class/dmi/id/product_serial"))
            .unwrap_or_default();
        parse_ds_token(&serial)
    }

    /// The `ds=nocloud` values that apply to any NoCloud seed: the SMBIOS serial's over
    /// the command line's, field by field, as cloud-init merges them.
    pub fn ds_token(&self) -> Option<DsToken> {
        match (self.serial_ds_token(), self.cmdline_ds_token()) {
            (Some(serial), Some(cmdline)) => Some(serial.over(&cmdline)),
            (serial, cmdline) => serial.or(cmdline),
        }
    }
}

/// One place a seed can come from.
pub trait Source: Sync {
    fn name(&self) -> &'static str;
    /// Where it looks, for the journal line of a boot that found no seed.
    fn looks_at(&self) -> &'static str;
    /// `Ok(None)`: nothing here. `Err`: a seed is here but unusable (the error names the file).
    fn find(&self, env: &Env) -> Result<Option<Seed>>;
    /// Whether it looks at the probed block devices (tried again after udev's queue).
    fn reads_block_devices(&self) -> bool {
        false
    }
    /// Whether it asks the host (the block devices are tried again before it).
    fn asks_the_host(&self) -> bool {
        false
    }
}

/// The documented order (docs/identity.md), except that the control channel comes last
/// by default: its bounded wait would delay every boot that has a seed disk. `--sources channel,...` puts it first.
pub static ORDER: &[&dyn Source] = &[
    &nocloud::BlockNoCloud,
    &cmdline::CmdlineNoCloud,
    &cmdline::SmbiosSerialNoCloud,
    &nocloud::SeedDirNoCloud,
    &configdrive::BlockConfigDrive,
    &credentials::SystemdCredentials,
    &channel::ControlChannel,
];

/// Names of the sources in order, for `--sources` validation and docs.
pub fn names() -> Vec<&'static str> {
    ORDER.iter().map(|s| s.name()).collect()
}

/// The sources in `order` (source names), or all in the default order.
fn chosen(order: Option<&[String]>) -> Vec<&'static dyn Source> {
    match order {
        None => ORDER.to_vec(),
        Some(names) => names
            .iter()
            .filter_map(|n| ORDER.iter().copied().find(|s| s.name() == n))
            .collect(),
    }
}

/// Where the sources in `order` look, for a boot that found no seed.
pub fn looked_at(order: Option<&[String]>) -> String {
    chosen(order)
        .iter()
        .map(|s| s.looks_at())
        .collect::<Vec<_>>()
        .join("; ")
}

/// The first seed found, in `order` (source names) or the default order. The block devices
/// get a second look once the sources that need no wait have missed: before the first
/// source that asks the host, or at the end.
pub fn find_seed(env: &Env, order: Option<&[String]>) -> Result<Option<Seed>> {
    let sources = chosen(order);
    let host_first = sources
        .iter()
        .position(|s| s.asks_the_host())
        .unwrap_or(sources.len());
    let (no_wait, asking) = sources.split_at(host_first);
    if let Some(seed) = first_found(env, no_wait)? {
        return Ok(Some(seed));
    }
    if let Some(seed) = block_sources_again(env, &sources)? {
        return Ok(Some(seed));
    }
    first_found(env, asking)
}

fn first_found<'a>(
    env: &Env,
    sources: impl IntoIterator<Item = &'a &'static dyn Source>,
) -> Result<Option<Seed>> {
    for source in sources {
        let _span = tracing::debug_span!("source", name = source.name()).entered();
        match source.find(env)? {
            Some(seed) if seed.disabled => tracing::warn!(
                "{}: meta-data says dsmode: disabled: this seed is passed over, as cloud-init passes it over",
                seed.source
            ),
            Some(seed) => return Ok(Some(seed)),
            None => {}
        }
    }
    Ok(None)
}

/// The block sources again, after udev has added the devices it was still adding (nothing
/// when it was not, or when no block source is chosen).
fn block_sources_again(env: &Env, sources: &[&'static dyn Source]) -> Result<Option<Seed>> {
    if !sources.iter().any(|s| s.reads_block_devices()) || !env.wait_for_udev_and_probe_again() {
        return Ok(None);
    }
    first_found(env, sources.iter().filter(|s| s.reads_block_devices()))
}

/// Reads the named files of a seed directory; files that are absent are left out.
/// Each read is capped so a hostile seed cannot exhaust memory.
pub fn read_seed_files(dir: &Path, names: &[&str]) -> Result<SeedFiles> {
    use std::io::Read;
    let mut out = BTreeMap::new();
    for name in names {
        let path = dir.join(name);
        let meta = match std::fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(anyhow::anyhow!("{}: cannot stat: {e}", path.display())),
        };
        if !meta.is_file() {
            anyhow::bail!("{}: not a regular file (links are refused)", path.display());
        }
        let cap = nixseed_core::userdata::MAX_USER_DATA as u64;
        if meta.len() > cap {
            anyhow::bail!(
                "{}: {} bytes exceed the {cap} byte limit for a seed file",
                path.display(),
                meta.len()
            );
        }
        let mut bytes = Vec::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(cap + 1).read_to_end(&mut bytes))
            .map_err(|e| anyhow::anyhow!("{}: cannot read: {e}", path.display()))?;
        out.insert(name.to_string(), bytes);
    }
    Ok(SeedFiles(out))
}
