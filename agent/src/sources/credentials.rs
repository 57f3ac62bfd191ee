//! systemd credentials from SMBIOS type 11 OEM strings (`/sys/firmware/dmi/entries/11-*/raw`).

use anyhow::Result;
use nixseed_core::credentials::{Credentials, parse_smbios_type11, smbios_entry_index};
use nixseed_core::seed::Seed;

use super::{Env, Source};

pub struct SmbiosCredentials;

impl Source for SmbiosCredentials {
    fn name(&self) -> &'static str {
        "credentials"
    }

    fn looks_at(&self) -> &'static str {
        "systemd credentials in SMBIOS type 11 OEM strings"
    }

    fn find(&self, env: &Env) -> Result<Option<Seed>> {
        let dir = env.host_path("/sys/firmware/dmi/entries");
        let Ok(rd) = std::fs::read_dir(&dir) else {
            return Ok(None);
        };
        let mut entries: Vec<(u32, std::path::PathBuf)> = rd
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let index = smbios_entry_index(&e.file_name().to_string_lossy())?;
                Some((index, e.path().join("raw")))
            })
            .collect();
        entries.sort();
        let mut creds = Credentials::default();
        // systemd reads 11-0, 11-1, ... and stops at the first number missing.
        let contiguous = entries
            .iter()
            .enumerate()
            .take_while(|(i, (index, _))| *i as u32 == *index)
            .count();
        entries.truncate(contiguous);
        for (_, raw) in entries {
            match std::fs::read(&raw) {
                Ok(bytes) => creds.add(parse_smbios_type11(&bytes), &raw.display().to_string()),
                Err(e) => tracing::warn!("cannot read {}: {e}", raw.display()),
            }
        }
        let (seed, warnings) =
            Seed::from_credentials(&creds, "credentials:smbios", env.product_uuid().as_deref());
        for w in warnings {
            tracing::warn!("{w}");
        }
        Ok(seed)
    }
}
