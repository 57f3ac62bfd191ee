//! systemd credentials the host gives the VM, gathered as systemd's PID 1 imports them:
//! QEMU fw_cfg (`/sys/firmware/qemu_fw_cfg/by_name/opt/io.systemd.credentials/NAME/raw`),
//! then SMBIOS type 11 OEM strings (`/sys/firmware/dmi/entries/11-*/raw`), then the
//! kernel command line (`systemd.set_credential=`); a name already read keeps its value.

use anyhow::Result;
use nixseed_core::credentials::{
    Credentials, parse_cmdline, parse_smbios_type11, smbios_entry_index,
};
use nixseed_core::seed::Seed;

use super::{Env, Source};

pub struct SystemdCredentials;

/// Where the fw_cfg driver (`qemu_fw_cfg`) shows systemd's credentials.
const FW_CFG_DIR: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/io.systemd.credentials";

impl Source for SystemdCredentials {
    fn name(&self) -> &'static str {
        "credentials"
    }

    fn looks_at(&self) -> &'static str {
        "systemd credentials in QEMU fw_cfg, SMBIOS type 11 OEM strings or the kernel command line"
    }

    fn find(&self, env: &Env) -> Result<Option<Seed>> {
        let mut creds = Credentials::default();
        let mut from = Vec::new();
        if fw_cfg(env, &mut creds) {
            from.push("fw_cfg");
        }
        if smbios(env, &mut creds) {
            from.push("smbios");
        }
        let cmdline = parse_cmdline(&env.cmdline());
        if !cmdline.is_empty() {
            creds.add(cmdline, "/proc/cmdline");
            from.push("cmdline");
        }
        if from.is_empty() {
            return Ok(None);
        }
        let source = format!("credentials:{}", from.join("+"));
        let (seed, warnings) =
            Seed::from_credentials(&creds, &source, env.product_uuid().as_deref());
        for w in warnings {
            tracing::warn!("{w}");
        }
        Ok(seed)
    }
}

/// The fw_cfg entries, in name order; whether there were any.
fn fw_cfg(env: &Env, creds: &mut Credentials) -> bool {
    let Ok(rd) = std::fs::read_dir(env.host_path(FW_CFG_DIR)) else {
        return false;
    };
    let mut entries: Vec<(String, std::path::PathBuf)> = rd
        .filter_map(|e| e.ok())
        .map(|e| {
            (
                e.file_name().to_string_lossy().into_owned(),
                e.path().join("raw"),
            )
        })
        .collect();
    entries.sort();
    let mut any = false;
    for (name, raw) in entries {
        match std::fs::read(&raw) {
            Ok(bytes) => {
                creds.add(vec![(name, bytes)], &raw.display().to_string());
                any = true;
            }
            Err(e) => tracing::warn!("cannot read {}: {e}", raw.display()),
        }
    }
    any
}

/// The SMBIOS type 11 entries; whether there were any.
fn smbios(env: &Env, creds: &mut Credentials) -> bool {
    let dir = env.host_path("/sys/firmware/dmi/entries");
    let Ok(rd) = std::fs::read_dir(&dir) else {
        return false;
    };
    let mut entries: Vec<(u32, std::path::PathBuf)> = rd
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let index = smbios_entry_index(&e.file_name().to_string_lossy())?;
            Some((index, e.path().join("raw")))
        })
        .collect();
    entries.sort();
    // systemd reads 11-0, 11-1, ... and stops at the first number missing.
    let contiguous = entries
        .iter()
        .enumerate()
        .take_while(|(i, (index, _))| *i as u32 == *index)
        .count();
    entries.truncate(contiguous);
    let mut any = false;
    for (_, raw) in entries {
        match std::fs::read(&raw) {
            Ok(bytes) => {
                let found = parse_smbios_type11(&bytes);
                any |= !found.is_empty();
                creds.add(found, &raw.display().to_string());
            }
            Err(e) => tracing::warn!("cannot read {}: {e}", raw.display()),
        }
    }
    any
}
