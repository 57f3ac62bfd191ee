//! Where UEFI firmware (OVMF) lives on the common distributions, for `run` and `xml`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

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
        "/usr/share/edk2/x64/OVMF_CODE.4m.fd",
        "/usr/share/edk2/x64/OVMF_VARS.4m.fd",
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
    // The code and its variable store come in pairs of matching size (a 4 MiB build's
    // store does not fit a 2 MiB build): one given alone is paired with the file beside
    // it whose name says VARS for CODE (or CODE for VARS), never with a probed pair.
    let sibling = |p: &Path, from: &str, to: &str| {
        let name = p.file_name()?.to_str()?;
        let other = p.with_file_name(name.replacen(from, to, 1));
        (name.contains(from) && other.is_file()).then_some(other)
    };
    let pair = match (code, vars) {
        (Some(c), Some(v)) => Some((c.to_owned(), v.to_owned())),
        (Some(c), None) => Some((
            c.to_owned(),
            sibling(c, "CODE", "VARS").with_context(|| {
                format!(
                    "--ovmf-code {} has no VARS file beside it; give the variable store template built with it (--ovmf-vars)",
                    c.display()
                )
            })?,
        )),
        (None, Some(v)) => Some((
            sibling(v, "VARS", "CODE").with_context(|| {
                format!(
                    "--ovmf-vars {} has no CODE file beside it; give the firmware it was built with (--ovmf-code)",
                    v.display()
                )
            })?,
            v.to_owned(),
        )),
        (None, None) => None,
    };
    if let Some((c, v)) = pair {
        return Ok(Ovmf {
            code: abs(&c),
            vars: abs(&v),
        });
    }
    for (c, v) in CANDIDATES {
        let (c, v) = (Path::new(c), Path::new(v));
        if c.is_file() && v.is_file() {
            return Ok(Ovmf {
                code: abs(c),
                vars: abs(v),
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

    /// One file given alone is paired with its sibling (`OVMF_CODE_4M.fd` with
    /// `OVMF_VARS_4M.fd`), never with a probed pair of another size; with no sibling, the
    /// other option is asked for.
    #[test]
    fn one_file_given_is_paired_with_its_sibling() {
        let dir = tempfile::tempdir().unwrap();
        let (code, vars) = (
            dir.path().join("OVMF_CODE_4M.fd"),
            dir.path().join("OVMF_VARS_4M.fd"),
        );
        std::fs::write(&code, b"c").unwrap();
        std::fs::write(&vars, b"v").unwrap();
        assert_eq!(find(Some(&code), None).unwrap().vars, vars);
        assert_eq!(find(None, Some(&vars)).unwrap().code, code);
        let lone = dir.path().join("custom-firmware.fd");
        std::fs::write(&lone, b"c").unwrap();
        let err = find(Some(&lone), None).unwrap_err().to_string();
        assert!(
            err.contains("custom-firmware.fd") && err.contains("--ovmf-vars"),
            "{err}"
        );
    }
}
