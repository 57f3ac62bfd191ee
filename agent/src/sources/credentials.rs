//! systemd credentials from SMBIOS type 11 OEM strings (`/sys/firmware/dmi/entries/11-*/raw`).

use std::collections::BTreeMap;

use anyhow::Result;
use nixseed_core::credentials::parse_smbios_type11;
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
        let mut entries: Vec<_> = rd
            .filter_map(|e| e.ok())
            .filter(|e| e.file_name().to_string_lossy().starts_with("11-"))
            .map(|e| e.path().join("raw"))
            .collect();
        entries.sort();
        let mut creds = BTreeMap::new();
        for raw in entries {
            match std::fs::read(&raw) {
                Ok(bytes) => creds.extend(parse_smbios_type11(&bytes)),
                Err(e) => tracing::warn!("cannot read {}: {e}", raw.display()),
            }
        }
        Ok(Seed::from_credentials(&creds, "credentials:smbios"))
    }
}
