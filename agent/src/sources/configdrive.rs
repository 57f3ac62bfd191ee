//! ConfigDrive2 from a `config-2` volume (Proxmox `citype: configdrive2`).

use anyhow::Result;
use nixseed_core::configdrive::parse_meta_data;
use nixseed_core::label;
use nixseed_core::seed::Seed;

use super::block::Media;
use super::{Env, Source, read_seed_files};

pub struct BlockConfigDrive;

impl Source for BlockConfigDrive {
    fn name(&self) -> &'static str {
        "configdrive"
    }

    fn find(&self, env: &Env) -> Result<Option<Seed>> {
        let Some(dev) = env
            .block_devices()
            .iter()
            .find(|d| label::is_configdrive_label(&d.label))
        else {
            return Ok(None);
        };
        let media = Media::mount(dev, &env.run)?;
        let source = format!("configdrive:{}", dev.node.display());
        let root = media.dir.join("openstack");
        let mut files = read_seed_files(&root, &["latest/meta_data.json", "latest/user_data"])?;
        if let Some(meta) = files.get("latest/meta_data.json") {
            // The network file's path comes from meta_data.json, validated to stay inside.
            let origin = format!("{source}/latest/meta_data.json");
            if let Some(path) = parse_meta_data(meta, &origin)?.network_path {
                let more = read_seed_files(&root, &[path.as_str()])?;
                files.0.extend(more.0);
            }
        } else {
            return Ok(None);
        }
        Ok(Some(Seed::from_configdrive(&files, &source)?))
    }
}
