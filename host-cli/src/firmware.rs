//! Where UEFI firmware (OVMF) lives on the common distributions, for `run` and `xml`.

use std::path::{Path, PathBuf};

use anyhow::{Result, bail};

/// (code, vars template) pairs, most specific first.
const CANDIDATES: &[(&str, &str)] = &[
    (
        "/usr/share/OVMF/OVMF_CODE_4M.fd",
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
    ),
    (
        "/usr/share/OVMF/OVMF_CODE.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ),
    (
        "/usr/share/edk2/ovmf/OVMF_CODE.fd",
        "/usr/share/edk2/ovmf/OVMF_VARS.fd",
    ),
    (
        "/usr/share/edk2/x64/OVMF_CODE.fd",
        "/usr/share/edk2/x64/OVMF_VARS.fd",
    ),
    (
        "/run/libvirt/nix-ovmf/OVMF_CODE.fd",
        "/run/libvirt/nix-ovmf/OVMF_VARS.fd",
    ),
];

#[derive(Debug, Clone)]
pub struct Ovmf {
    pub code: PathBuf,
    pub vars: PathBuf,
}

/// `--ovmf-code`/`--ovmf-vars`, shared by `run` and `xml`/`define`.
#[derive(Debug, Clone, clap::Args)]
pub struct FirmwareArgs {
    /// UEFI firmware code file [default: probed]
    #[arg(long, value_name = "FILE")]
    pub ovmf_code: Option<std::path::PathBuf>,
    /// UEFI variable store template [default: probed]
    #[arg(long, value_name = "FILE")]
    pub ovmf_vars: Option<std::path::PathBuf>,
}

impl FirmwareArgs {
    pub fn find(&self) -> Result<Ovmf> {
        find(self.ovmf_code.as_deref(), self.ovmf_vars.as_deref())
    }
}

/// The given paths, or the first installed pair.
pub fn find(code: Option<&Path>, vars: Option<&Path>) -> Result<Ovmf> {
    if let (Some(c), Some(v)) = (code, vars) {
        for p in [c, v] {
            if !p.is_file() {
                bail!("UEFI firmware file {} does not exist", p.display());
            }
        }
        return Ok(Ovmf {
            code: c.to_owned(),
            vars: v.to_owned(),
        });
    }
    for (c, v) in CANDIDATES {
        let (c, v) = (Path::new(c), Path::new(v));
        if c.is_file() && v.is_file() {
            return Ok(Ovmf {
                code: code.unwrap_or(c).to_owned(),
                vars: vars.unwrap_or(v).to_owned(),
            });
        }
    }
    bail!(
        "no UEFI firmware found (looked for OVMF_CODE in /usr/share/OVMF, /usr/share/edk2, /run/libvirt/nix-ovmf); install ovmf, pass --ovmf-code/--ovmf-vars, or boot a kernel directly with --kernel/--initrd"
    )
}
