//! ConfigDrive2 from a `config-2` volume (Proxmox `citype: configdrive2`, OpenStack Nova):
//! an ISO read in place, a FAT drive mounted read-only.

use anyhow::Result;
use nixseed_core::configdrive::parse_meta_data;
use nixseed_core::label::{self, FsType};
use nixseed_core::seed::{
    CONFIGDRIVE_FILES, META_DATA, NETWORK_DATA, Seed, SeedFiles, configdrive_file,
    configdrive_version,
};

use super::block::{BlockDevice, Media};
use super::{Env, Source, read_seed_files};

pub struct BlockConfigDrive;

impl Source for BlockConfigDrive {
    fn name(&self) -> &'static str {
        "configdrive"
    }

    fn looks_at(&self) -> &'static str {
        "a filesystem labelled config-2 (ConfigDrive2)"
    }

    fn reads_block_devices(&self) -> bool {
        true
    }

    /// Every `config-2` device in turn; one without `meta_data.json` in the version it is
    /// read from, or one that cannot be read, does not hide the next one (cloud-init logs
    /// a broken drive and tries the next). When no device gives a seed, the first failure
    /// is the answer: a broken drive is not "no seed".
    fn find(&self, env: &Env) -> Result<Option<Seed>> {
        let mut failed: Option<anyhow::Error> = None;
        for dev in env
            .block_devices()
            .iter()
            .filter(|d| label::is_configdrive_label(&d.label))
        {
            match from_device(env, dev) {
                Ok(Ok(seed)) => return Ok(Some(seed)),
                Ok(Err(version)) => tracing::warn!(
                    "{}: labelled {} but holds no openstack/{version}/meta_data.json",
                    dev.node.display(),
                    dev.label
                ),
                Err(e) => {
                    tracing::warn!("{e:#}; trying the next config-2 device");
                    failed.get_or_insert(e);
                }
            }
        }
        match failed {
            Some(e) => Err(e),
            None => Ok(None),
        }
    }
}

/// The drive's seed, or the version directory it was read from when that has no
/// `meta_data.json`.
fn from_device(env: &Env, dev: &BlockDevice) -> Result<Result<Seed, &'static str>> {
    let source = format!("configdrive:{}", dev.node.display());
    // An ISO is read in place, a FAT drive mounted; either way through one reader.
    enum Drive {
        Iso(nixseed_core::iso9660::Root),
        Mounted(Media),
    }
    let drive = match dev.fstype {
        FsType::Iso9660 => Drive::Iso(dev.iso_root()?),
        _ => Drive::Mounted(Media::mount(dev, &env.run)?),
    };
    let version = match &drive {
        Drive::Iso(root) => configdrive_version(|v| {
            matches!(
                root.lookup(&*dev.file, &format!("openstack/{v}")),
                Ok(Some(_))
            )
        }),
        Drive::Mounted(m) => {
            let dir = m.dir.join("openstack");
            configdrive_version(|v| std::fs::symlink_metadata(dir.join(v)).is_ok())
        }
    };
    let read = |names: &[&str]| -> Result<SeedFiles> {
        match &drive {
            Drive::Iso(root) => dev.read_iso_in(root, &source, "openstack/", names),
            Drive::Mounted(m) => read_seed_files(&m.dir.join("openstack"), names),
        }
    };
    let names = CONFIGDRIVE_FILES.map(|f| configdrive_file(version, f));
    let mut files = read(&names.each_ref().map(String::as_str))?;
    let meta_name = configdrive_file(version, META_DATA);
    let Some(meta) = files.get(&meta_name) else {
        return Ok(Err(version));
    };
    // network_data.json is the network when present (as in cloud-init); otherwise the ENI
    // file whose path comes from meta_data.json, validated to stay inside.
    let origin = format!("{source}/{meta_name}");
    if let Some(path) = parse_meta_data(meta, &origin)?.network_path
        && files
            .get(&configdrive_file(version, NETWORK_DATA))
            .is_none()
    {
        files.0.extend(read(&[path.as_str()])?.0);
    }
    Ok(Ok(Seed::from_configdrive(&files, &source)?))
}
