//! `ds=nocloud;…` from the kernel command line or the SMBIOS system serial. A local
//! `s=` directory is read as a NoCloud seed; without one, the image's
//! `/var/lib/cloud/seed/nocloud`, as cloud-init merges the token over that directory;
//! without either, the token's own `i=`/`h=` make a seed with empty user-data.

use anyhow::Result;
use nixseed_core::nocloud::DsToken;
use nixseed_core::seed::{Seed, SeedFiles};

use super::{Env, Source, nocloud};

fn from_token(env: &Env, tok: &DsToken, source: &str) -> Result<Option<Seed>> {
    // cloud-init's NoCloudNet fetches a URL; nixseed reads no network at boot, and says
    // so rather than booting as if the token had named nothing.
    if let Some(url) = tok
        .seedfrom
        .as_deref()
        .filter(|_| tok.local_seed_dir().is_none())
    {
        tracing::warn!(
            "{source}: seedfrom {url:?} is not read: nixseed reads only a local directory (s=/path/ or s=file:///path/); the seed at that address, its user-data and keys, is not applied"
        );
    }
    if let Some(dir) = tok.local_seed_dir() {
        let dir = env.sysroot_path(dir);
        let named = format!("{source}:{}", dir.display());
        if let Some(seed) = nocloud::from_dir(&dir, &named, Some(tok))? {
            return Ok(Some(seed));
        }
    }
    if let Some(seed) = nocloud::from_seed_dir(env, Some(tok))? {
        return Ok(Some(seed));
    }
    if tok.instance_id.is_none() && tok.local_hostname.is_none() {
        return Ok(None);
    }
    let files = SeedFiles(
        [("meta-data", ""), ("user-data", "")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
    );
    let mut seed = Seed::from_nocloud(&files, source, Some(tok))?;
    // The digest must change when the token does.
    seed.digest = nixseed_core::manifest::sha256_hex(format!("{tok:?}").as_bytes());
    Ok(Some(seed))
}

pub struct CmdlineNoCloud;

impl Source for CmdlineNoCloud {
    fn name(&self) -> &'static str {
        "nocloud-cmdline"
    }

    fn looks_at(&self) -> &'static str {
        "ds=nocloud on the kernel command line (/proc/cmdline)"
    }

    fn find(&self, env: &Env) -> Result<Option<Seed>> {
        match (env.cmdline_ds_token(), env.ds_token()) {
            (Some(_), Some(tok)) => from_token(env, &tok, "nocloud:cmdline"),
            _ => Ok(None),
        }
    }
}

pub struct SmbiosSerialNoCloud;

impl Source for SmbiosSerialNoCloud {
    fn name(&self) -> &'static str {
        "nocloud-smbios"
    }

    fn looks_at(&self) -> &'static str {
        "ds=nocloud in the SMBIOS system serial"
    }

    fn find(&self, env: &Env) -> Result<Option<Seed>> {
        match (env.serial_ds_token(), env.ds_token()) {
            (Some(_), Some(tok)) => from_token(env, &tok, "nocloud:smbios-serial"),
            _ => Ok(None),
        }
    }
}
