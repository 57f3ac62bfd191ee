//! Running host tools (qemu-img, mkfs.ext4, virsh, nix, ...) with errors that say which
//! command failed, what it printed, and what to install when it is missing.

use std::ffi::OsStr;
use std::process::{Command, Output};

use anyhow::{Result, bail};

fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// The Debian package that ships a tool, for the "install it" hint.
fn package_of(tool: &str) -> &'static str {
    match tool {
        "qemu-img" => "qemu-utils",
        "qemu-system-x86_64" => "qemu-system-x86",
        "mkfs.ext4" => "e2fsprogs",
        "virsh" => "libvirt-clients",
        "ssh" => "openssh-client",
        "nix" => "nix (https://nixos.org/download)",
        _ => "the package that provides it",
    }
}

/// Spawn and collect output; a missing program gets an install hint.
pub fn output(cmd: &mut Command) -> Result<Output> {
    let prog = cmd.get_program().to_string_lossy().into_owned();
    match cmd.output() {
        Ok(o) => Ok(o),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "`{prog}` was not found on PATH; install {}",
                package_of(&prog)
            )
        }
        Err(e) => bail!("running `{}`: {e}", describe(cmd)),
    }
}

/// Run to completion; on failure the error carries the command line and its stderr.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = output(cmd)?;
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        let err = if err.trim().is_empty() {
            String::from_utf8_lossy(&out.stdout)
        } else {
            err
        };
        bail!(
            "`{}` failed ({}): {}",
            describe(cmd),
            out.status,
            err.trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether `prog` is an executable file in a directory of PATH.
pub fn on_path(prog: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(prog))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

pub fn cmd<S: AsRef<OsStr>>(prog: S) -> Command {
    Command::new(prog)
}
