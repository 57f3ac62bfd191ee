//! NoCloud from a `cidata`/`CIDATA` volume (an ISO read in place, a FAT volume mounted) or from `/var/lib/cloud/seed/nocloud/`.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Result;
use nixseed_core::iso9660;
use nixseed_core::label::{self, FsType};
use nixseed_core::nocloud::parse_ds_token;
use nixseed_core::seed::{Seed, SeedFiles};
use nixseed_core::userdata::MAX_USER_DATA;

use super::block::{BlockDevice, Media};
use super::{Env, Source, read_seed_files};

use nixseed_core::nocloud::SEED_FILES as FILES;

/// Reads a NoCloud directory; `None` when it holds neither meta-data nor user-data.
pub fn from_dir(env: &Env, dir: &Path, source: &str) -> Result<Option<Seed>> {
    let files = read_seed_files(dir, FILES)?;
    if files.get("meta-data").is_none() && files.get("user-data").is_none() {
        return Ok(None);
    }
    let ds = parse_ds_token(&env.cmdline());
    Ok(Some(Seed::from_nocloud(&files, source, ds.as_ref())?))
}

pub struct BlockNoCloud;

impl Source for BlockNoCloud {
    fn name(&self) -> &'static str {
        "nocloud-volume"
    }

    fn find(&self, env: &Env) -> Result<Option<Seed>> {
        let Some(dev) = env
            .block_devices()
            .iter()
            .find(|d| label::is_nocloud_label(&d.label))
        else {
            return Ok(None);
        };
        let source = format!("nocloud:{}", dev.node.display());
        if dev.fstype == FsType::Iso9660 {
            return from_iso(env, dev, &source);
        }
        let media = Media::mount(dev, &env.run)?;
        from_dir(env, &media.dir, &source)
    }
}

/// Reads the seed files of an ISO 9660 volume through the device opened by the probe:
/// no mount, so no filesystem driver and no cdrom open/release in the boot's path.
fn from_iso(env: &Env, dev: &BlockDevice, source: &str) -> Result<Option<Seed>> {
    let root = iso9660::read_root(&*dev.file).map_err(|e| {
        anyhow::anyhow!(
            "{}: cannot read the ISO 9660 volume: {e}",
            dev.node.display()
        )
    })?;
    let mut files = BTreeMap::new();
    for name in FILES {
        if let Some(e) = root.get(name) {
            let origin = format!("{source}/{name}");
            let bytes = iso9660::read_file(&*dev.file, e, MAX_USER_DATA as u64, &origin)
                .map_err(anyhow::Error::msg)?;
            files.insert(name.to_string(), bytes);
        }
    }
    if !files.contains_key("meta-data") && !files.contains_key("user-data") {
        let seen: Vec<&str> = root.entries.iter().map(|e| e.name.as_str()).collect();
        tracing::warn!(
            "{}: labelled {} but holds neither meta-data nor user-data ({:?} names: {})",
            dev.node.display(),
            dev.label,
            root.names,
            seen.join(", ")
        );
        return Ok(None);
    }
    let ds = parse_ds_token(&env.cmdline());
    Ok(Some(Seed::from_nocloud(
        &SeedFiles(files),
        source,
        ds.as_ref(),
    )?))
}

pub struct SeedDirNoCloud;

impl Source for SeedDirNoCloud {
    fn name(&self) -> &'static str {
        "nocloud-dir"
    }

    fn find(&self, env: &Env) -> Result<Option<Seed>> {
        let dir = env.sysroot_path("/var/lib/cloud/seed/nocloud");
        from_dir(env, &dir, &format!("nocloud:{}", dir.display()))
    }
}
