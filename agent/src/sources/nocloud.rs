//! NoCloud from a `cidata`/`CIDATA` volume (an ISO read in place, a FAT volume mounted) or from `/var/lib/cloud/seed/nocloud/`.

use std::path::Path;

use anyhow::Result;
use nixseed_core::label::{self, FsType};
use nixseed_core::nocloud::DsToken;
use nixseed_core::seed::Seed;

use super::block::{BlockDevice, Media};
use super::{Env, Source, read_seed_files};

use nixseed_core::nocloud::SEED_FILES as FILES;

/// Reads a NoCloud directory; `None` when it holds neither meta-data nor user-data.
/// `ds` is the `ds=nocloud` token whose `i=`/`h=` apply: the one that named the directory,
/// or the kernel command line's for a volume or the seed directory.
pub fn from_dir(dir: &Path, source: &str, ds: Option<&DsToken>) -> Result<Option<Seed>> {
    let files = read_seed_files(dir, FILES)?;
    if files.get("meta-data").is_none() && files.get("user-data").is_none() {
        return Ok(None);
    }
    Ok(Some(Seed::from_nocloud(&files, source, ds)?))
}

pub struct BlockNoCloud;

impl Source for BlockNoCloud {
    fn name(&self) -> &'static str {
        "nocloud-volume"
    }

    fn looks_at(&self) -> &'static str {
        "a filesystem labelled cidata or CIDATA (NoCloud)"
    }

    fn reads_block_devices(&self) -> bool {
        true
    }

    /// Every labelled device in turn, as cloud-init tries them: one that holds neither
    /// meta-data nor user-data (a stray `cidata` disk) does not hide the next one. A seed
    /// that is there but malformed is an error, not a reason to look further.
    fn find(&self, env: &Env) -> Result<Option<Seed>> {
        for dev in env
            .block_devices()
            .iter()
            .filter(|d| label::is_nocloud_label(&d.label))
        {
            let source = format!("nocloud:{}", dev.node.display());
            let seed = if dev.fstype == FsType::Iso9660 {
                from_iso(env, dev, &source)?
            } else {
                let media = Media::mount(dev, &env.run)?;
                let seed = from_dir(&media.dir, &source, env.ds_token().as_ref())?;
                if seed.is_none() {
                    tracing::warn!(
                        "{}: labelled {} but holds neither meta-data nor user-data",
                        dev.node.display(),
                        dev.label
                    );
                }
                seed
            };
            if seed.is_some() {
                return Ok(seed);
            }
        }
        Ok(None)
    }
}

/// The NoCloud files of an ISO 9660 volume, read in place ([`BlockDevice::read_iso`]).
fn from_iso(env: &Env, dev: &BlockDevice, source: &str) -> Result<Option<Seed>> {
    let (files, root) = dev.read_iso(source, "", FILES)?;
    if files.get("meta-data").is_none() && files.get("user-data").is_none() {
        // A hostile volume may hold thousands of names: a few are enough to recognise it.
        const SHOWN: usize = 16;
        let seen: Vec<&str> = root
            .entries
            .iter()
            .take(SHOWN)
            .map(|e| e.name.as_str())
            .collect();
        let more = root.entries.len().saturating_sub(SHOWN);
        let more = if more > 0 {
            format!(" and {more} more")
        } else {
            String::new()
        };
        // Records isofs would show with no name either (their Rock Ridge entries cannot
        // be read): the file the host meant may be one of them.
        let broken = if root.broken.is_empty() {
            String::new()
        } else {
            format!(
                "; left out, as Linux shows them with no name: {}",
                root.broken
                    .iter()
                    .take(4)
                    .cloned()
                    .collect::<Vec<_>>()
                    .join("; ")
            )
        };
        tracing::warn!(
            "{}: labelled {} but holds neither meta-data nor user-data ({:?} names: {}{more}{broken})",
            dev.node.display(),
            dev.label,
            root.names,
            seen.join(", ")
        );
        return Ok(None);
    }
    let ds = env.ds_token();
    Ok(Some(Seed::from_nocloud(&files, source, ds.as_ref())?))
}

pub struct SeedDirNoCloud;

impl Source for SeedDirNoCloud {
    fn name(&self) -> &'static str {
        "nocloud-dir"
    }

    fn looks_at(&self) -> &'static str {
        "/var/lib/cloud/seed/nocloud on the root"
    }

    fn find(&self, env: &Env) -> Result<Option<Seed>> {
        from_seed_dir(env, env.ds_token().as_ref())
    }
}

/// The image's `/var/lib/cloud/seed/nocloud`, with the `ds=nocloud` token over its
/// meta-data when there is one.
pub fn from_seed_dir(env: &Env, ds: Option<&DsToken>) -> Result<Option<Seed>> {
    let dir = env.sysroot_path("/var/lib/cloud/seed/nocloud");
    from_dir(&dir, &format!("nocloud:{}", dir.display()), ds)
}
