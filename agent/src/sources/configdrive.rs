//! ConfigDrive2 from a `config-2` volume (Proxmox `citype: configdrive2`, OpenStack Nova):
//! an ISO read in place, a FAT drive mounted read-only.

use anyhow::Result;
use nixseed_core::configdrive::parse_meta_data;
use nixseed_core::label::{self, FsType};
use nixseed_core::seed::{NETWORK_DATA, Seed, SeedFiles, VENDOR_DATA, VENDOR_DATA2};

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

    /// Every `config-2` device in turn; one without `openstack/latest/meta_data.json`, or
    /// one that cannot be read, does not hide the next one (cloud-init logs a broken drive
    /// and tries the next). When no device gives a seed, the first failure is the answer:
    /// a broken drive is not "no seed".
    fn find(&self, env: &Env) -> Result<Option<Seed>> {
        let mut failed: Option<anyhow::Error> = None;
        for dev in env
            .block_devices()
            .iter()
            .filter(|d| label::is_configdrive_label(&d.label))
        {
            match from_device(env, dev) {
                Ok(Some(seed)) => return Ok(Some(seed)),
                Ok(None) => tracing::warn!(
                    "{}: labelled {} but holds no openstack/latest/meta_data.json",
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

fn from_device(env: &Env, dev: &BlockDevice) -> Result<Option<Seed>> {
    let source = format!("configdrive:{}", dev.node.display());
    // An ISO is read in place, a FAT drive mounted; either way through one reader.
    let media = match dev.fstype {
        FsType::Iso9660 => None,
        _ => Some(Media::mount(dev, &env.run)?),
    };
    let read = |names: &[&str]| -> Result<SeedFiles> {
        match &media {
            None => Ok(dev.read_iso(&source, "openstack/", names)?.0),
            Some(m) => read_seed_files(&m.dir.join("openstack"), names),
        }
    };
    let mut files = read(&[
        "latest/meta_data.json",
        "latest/user_data",
        NETWORK_DATA,
        VENDOR_DATA,
        VENDOR_DATA2,
    ])?;
    let Some(meta) = files.get("latest/meta_data.json") else {
        return Ok(None);
    };
    // network_data.json is the network when present (as in cloud-init); otherwise the ENI
    // file whose path comes from meta_data.json, validated to stay inside.
    let origin = format!("{source}/latest/meta_data.json");
    if let Some(path) = parse_meta_data(meta, &origin)?.network_path
        && files.get(NETWORK_DATA).is_none()
    {
        files.0.extend(read(&[path.as_str()])?.0);
    }
    Ok(Some(Seed::from_configdrive(&files, &source)?))
}
