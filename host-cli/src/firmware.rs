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

/// The given paths, or the first installed pair, as absolute paths: libvirt reads them
/// on its own side, from its own working directory.
pub fn find(code: Option<&Path>, vars: Option<&Path>) -> Result<Ovmf> {
    for p in [code, vars].into_iter().flatten() {
        if !p.is_file() {
            bail!("UEFI firmware file {} does not exist", p.display());
        }
    }
    let abs = |p: &Path| std::path::absolute(p).unwrap_or_else(|_| p.to_owned());
    if let (Some(c), Some(v)) = (code, vars) {
        return Ok(Ovmf {
            code: abs(c),
            vars: abs(v),
        });
    }
    for (c, v) in CANDIDATES {
        let (c, v) = (Path::new(c), Path::new(v));
        if c.is_file() && v.is_file() {
            return Ok(Ovmf {
                code: abs(code.unwrap_or(c)),
                vars: abs(vars.unwrap_or(v)),
            });
        }
    }
    bail!(
        "no UEFI firmware found (looked for OVMF_CODE in /usr/share/OVMF, /usr/share/edk2, /run/libvirt/nix-ovmf); install ovmf, pass --ovmf-code/--ovmf-vars, or boot a kernel directly with --kernel/--initrd"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn given_paths_come_back_absolute() {
        // The crate's own manifest stands in for a firmware file: any existing file does.
        let rel = Path::new("Cargo.toml");
        let fw = find(Some(rel), Some(rel)).expect("an existing file is accepted");
        assert!(fw.code.is_absolute(), "{}", fw.code.display());
        assert_eq!(fw.code, std::env::current_dir().unwrap().join(rel));
        assert!(fw.vars.is_absolute(), "{}", fw.vars.display());
    }

    #[test]
    fn a_missing_file_is_named_even_when_only_one_is_given() {
        for (code, vars) in [
            (Some("no-such-code.fd"), None),
            (None, Some("no-such-vars.fd")),
        ] {
            let err = find(code.map(Path::new), vars.map(Path::new))
                .expect_err("a missing firmware file is refused")
                .to_string();
            let named = code.or(vars).unwrap_or_default();
            assert!(err.contains(named), "{err}");
        }
    }
}
