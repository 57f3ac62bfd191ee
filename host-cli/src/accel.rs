//! Choosing KVM or TCG. `/dev/kvm` can exist and still hang, so KVM counts as working
//! only when a probe guest on the same q35 machine type (a 512-byte boot sector that
//! writes to the isa-debug-exit port) runs to its exit within a few seconds. The answer
//! is cached in the state root.
//! (On some hosts a `pc` guest runs under KVM while every q35 guest hangs.)

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::fsutil::write_atomic;

pub const CACHE: &str = "accel";

/// `mov al, 1; out 0xf4, al; hlt` then the boot signature.
fn probe_sector() -> Vec<u8> {
    let mut s = vec![0u8; 512];
    s[..5].copy_from_slice(&[0xb0, 0x01, 0xe6, 0xf4, 0xf4]);
    s[510] = 0x55;
    s[511] = 0xaa;
    s
}

/// Run the probe guest under KVM: `Some(true)` when it reached the exit port in time,
/// `Some(false)` when QEMU ran and did not (no KVM, or a KVM that hangs), `None` when
/// the probe could not run at all (no QEMU installed yet, no room for its image), which
/// says nothing about KVM.
pub fn kvm_works(qemu: &str, scratch: &Path, timeout: Duration) -> Option<bool> {
    let img = scratch.join("kvm-probe.img");
    std::fs::write(&img, probe_sector()).ok()?;
    let child = Command::new(qemu)
        .args([
            "-accel",
            "kvm",
            "-machine",
            "q35",
            "-display",
            "none",
            "-nodefaults",
            "-no-reboot",
            "-m",
            "16",
        ])
        .args([
            "-device",
            "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-drive",
        ])
        .arg(format!(
            "file={},format=raw,if=ide",
            crate::cmd::run::opt_value(&img.display().to_string())
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else {
        let _ = std::fs::remove_file(&img);
        return None;
    };
    let start = Instant::now();
    let ok = loop {
        match child.try_wait() {
            // isa-debug-exit exits with (1 << 1) | 1.
            Ok(Some(st)) => break Some(st.code() == Some(3)),
            Ok(None) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                break Some(false);
            }
            Err(_) => {
                let _ = child.kill();
                break None;
            }
        }
    };
    // A process stuck in the KVM ioctl may not die at once; reap it without waiting here.
    std::thread::spawn(move || {
        let _ = child.wait();
    });
    let _ = std::fs::remove_file(&img);
    ok
}

/// `kvm` or `tcg`, probed once and cached in `state_root/accel`.
pub fn choose(qemu: &str, state_root: &Path) -> Result<&'static str> {
    let cache = state_root.join(CACHE);
    if let Ok(s) = std::fs::read_to_string(&cache) {
        match s.trim() {
            "kvm" => return Ok("kvm"),
            "tcg" => return Ok("tcg"),
            _ => {}
        }
    }
    std::fs::create_dir_all(state_root)
        .with_context(|| format!("creating {}", state_root.display()))?;
    match kvm_works(qemu, state_root, Duration::from_secs(3)) {
        Some(works) => {
            let accel = if works { "kvm" } else { "tcg" };
            write_atomic(&cache, format!("{accel}\n").as_bytes(), 0o644)?;
            Ok(accel)
        }
        // Not cached: the next run probes again (once QEMU is installed, say).
        None => {
            eprintln!("seedctl: the KVM probe could not start {qemu}; using TCG for this run");
            Ok("tcg")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    /// A stand-in QEMU (FAKE: a shell script) that exits with `code` once its `-drive`
    /// value names the probe image with any comma doubled, as QEMU's option parser needs.
    fn fake_qemu(dir: &Path, code: i32) -> String {
        let p = dir.join("fake-qemu");
        std::fs::write(
            &p,
            format!(
                "#!/bin/sh\nfor a; do case \"$a\" in file=*) printf '%s' \"$a\" > \"{}\";; esac; done\nexit {code}\n",
                dir.join("drive-arg").display()
            ),
        )
        .expect("writing the fake qemu");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755))
            .expect("making it executable");
        p.display().to_string()
    }

    /// Only an answer from a probe that ran is kept: a QEMU that cannot be started says
    /// nothing about KVM, and the next run asks again.
    #[test]
    fn only_a_probe_that_ran_is_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path().join("state, with a comma");
        assert_eq!(choose("/nonexistent/qemu", &root).ok(), Some("tcg"));
        assert!(!root.join(CACHE).exists());

        let qemu = fake_qemu(dir.path(), 3);
        assert_eq!(choose(&qemu, &root).ok(), Some("kvm"));
        let drive = std::fs::read_to_string(dir.path().join("drive-arg")).expect("drive arg");
        assert!(
            drive.contains("state,, with a comma/kvm-probe.img"),
            "{drive}"
        );
        assert_eq!(
            std::fs::read_to_string(root.join(CACHE)).ok().as_deref(),
            Some("kvm\n")
        );

        let other = dir.path().join("other");
        let qemu = fake_qemu(dir.path(), 1);
        assert_eq!(choose(&qemu, &other).ok(), Some("tcg"));
        assert_eq!(
            std::fs::read_to_string(other.join(CACHE)).ok().as_deref(),
            Some("tcg\n")
        );
    }
}
