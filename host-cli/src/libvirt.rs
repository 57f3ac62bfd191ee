//! Driving libvirt through `virsh -c URI`, so remote URIs (`qemu+ssh://host/system`)
//! work exactly as they do for virsh itself.

use std::path::{Path, PathBuf};
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

/// The host a libvirt URI names (`qemu+ssh://root@hv1/system` → `root@hv1`), `None` for
/// one on this machine (`qemu:///system`, `test:///default`).
pub fn remote_host(uri: &str) -> Option<&str> {
    let rest = uri.split_once("://")?.1;
    let host = rest.split(['/', '?']).next().unwrap_or("");
    (!host.is_empty()).then_some(host)
}

/// Refuses the control channel through a libvirt on another host: the channel is a unix
/// socket on the machine that runs the domain, which no socket here can reach.
pub fn refuse_remote_channel(uri: &str, name: &str, what: &str) -> Result<()> {
    if let Some(host) = remote_host(uri) {
        bail!(
            "machine `{name}`: {what} needs the domain's control channel, a unix socket on {host}, the host that runs it ({uri}); run seedctl on {host}, or use the seed ISO (`seedctl start {name} --connect {uri}`, `seedctl seed {name}` and a reboot)"
        );
    }
    Ok(())
}

/// Where a local libvirt QEMU driver keeps a running domain's pidfile: `qemu:///system`
/// in `/run/libvirt/qemu`, `qemu:///session` under `$XDG_RUNTIME_DIR`. Remote and other
/// URIs have none on this host.
pub fn qemu_pidfile(uri: &str, name: &str, runtime_dir: Option<&Path>) -> Option<PathBuf> {
    let file = format!("{name}.pid");
    match uri.trim_end_matches('/') {
        "qemu:///system" => Some(Path::new("/run/libvirt/qemu").join(file)),
        "qemu:///session" => Some(runtime_dir?.join("libvirt/qemu/run").join(file)),
        _ => None,
    }
}

/// The pid of a running domain's QEMU when libvirt runs it on this host.
pub fn local_qemu_pid(uri: &str, name: &str) -> Option<i32> {
    let runtime = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from);
    let file = qemu_pidfile(uri, name, runtime.as_deref())?;
    let pid: i32 = std::fs::read_to_string(file).ok()?.trim().parse().ok()?;
    crate::state::pid_alive(pid).then_some(pid)
}

/// Run `virsh -c URI ARGS...` for machine `name`; errors say whether libvirt itself was
/// unreachable or the domain operation failed.
pub fn virsh(uri: &str, name: &str, args: &[&str]) -> Result<String> {
    let mut cmd = Command::new("virsh");
    // Its words are read (`Managed save: yes`, `failed to get domain`): untranslated.
    cmd.env("LC_ALL", "C").args(["-q", "-c", uri]).args(args);
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

/// The domain state (`running`, `shut off`, ...) or None when it is not defined. Any
/// other failure of `virsh domstate` (libvirtd restarting, a broken `qemu+ssh` link) is
/// an error, not an absent domain.
pub fn domstate(uri: &str, name: &str) -> Result<Option<String>> {
    match virsh(uri, name, &["domstate", name]) {
        Ok(s) => Ok(Some(s.trim().to_owned())),
        Err(e) if no_such_domain(&format!("{e}")) => Ok(None),
        Err(e) => Err(e),
    }
}

/// Whether virsh's error says the domain does not exist (`failed to get domain 'web1'`,
/// `Domain not found`).
fn no_such_domain(err: &str) -> bool {
    err.contains("failed to get domain") || err.contains("Domain not found")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_uris_name_their_host() {
        assert_eq!(remote_host("qemu+ssh://root@hv1/system"), Some("root@hv1"));
        assert_eq!(
            remote_host("qemu+tcp://hv2:16509/system?x=1"),
            Some("hv2:16509")
        );
        assert_eq!(remote_host("qemu:///system"), None);
        assert_eq!(remote_host("qemu:///session"), None);
        assert_eq!(remote_host("test:///default"), None);
    }

    #[test]
    fn only_a_missing_domain_reads_as_no_domain() {
        assert!(no_such_domain(
            "machine `web1`: `virsh -c qemu:///system domstate web1` failed: error: failed to get domain 'web1'"
        ));
        assert!(!no_such_domain(
            "machine `web1`: `virsh -c qemu+ssh://hv1/system domstate web1` failed: error: End of file while reading data: Input/output error"
        ));
    }

    #[test]
    fn pidfiles_of_the_local_qemu_drivers() {
        let run = Path::new("/run/user/1000");
        assert_eq!(
            qemu_pidfile("qemu:///system", "web1", Some(run)),
            Some(PathBuf::from("/run/libvirt/qemu/web1.pid"))
        );
        assert_eq!(
            qemu_pidfile("qemu:///session", "web1", Some(run)),
            Some(PathBuf::from("/run/user/1000/libvirt/qemu/run/web1.pid"))
        );
        assert_eq!(qemu_pidfile("qemu:///session", "web1", None), None);
        assert_eq!(
            qemu_pidfile("qemu+ssh://root@hv1/system", "web1", Some(run)),
            None
        );
        assert_eq!(qemu_pidfile("test:///default", "web1", Some(run)), None);
    }
}
