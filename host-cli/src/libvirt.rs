//! Driving libvirt through `virsh -c URI`, so remote URIs (`qemu+ssh://host/system`)
//! work exactly as they do for virsh itself.

use std::process::Command;

use anyhow::{Result, bail};

use crate::tools;

pub const DEFAULT_URI: &str = "qemu:///system";

/// `--connect`, else LIBVIRT_DEFAULT_URI, else qemu:///system.
pub fn uri(connect: Option<&str>) -> String {
    connect
        .map(str::to_owned)
        .or_else(|| std::env::var("LIBVIRT_DEFAULT_URI").ok())
        .unwrap_or_else(|| DEFAULT_URI.to_owned())
}

/// Run `virsh -c URI ARGS...` for machine `name`; errors say whether libvirt itself was
/// unreachable or the domain operation failed.
pub fn virsh(uri: &str, name: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("virsh");
    cmd.args(["-q", "-c", uri]).args(args);
    let out = tools::output(&mut cmd)?;
    if out.status.success() {
        return Ok(String::from_utf8_lossy(&out.stdout).into_owned());
    }
    let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    if err.contains("failed to connect")
        || err.contains("Failed to connect")
        || err.contains("no connection driver")
    {
        bail!(
            "machine `{name}`: libvirt at `{uri}` is unreachable ({}); check that libvirtd runs there and the URI is right, or use `seedctl run` without libvirt",
            err.replace('\n', " ")
        );
    }
    bail!(
        "machine `{name}`: `virsh -c {uri} {}` failed: {}",
        args.join(" "),
        err.replace('\n', " ")
    )
}

/// The domain state (`running`, `shut off`, ...) or None when it is not defined.
pub fn domstate(uri: &str, name: &str) -> Result<Option<String>> {
    match virsh(uri, name, &["domstate", name]) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(e) if format!("{e}").contains("unreachable") => Err(e),
        Err(_) => Ok(None),
    }
}
