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

/// Run the probe guest under KVM; true when it reached the exit port in time.
pub fn kvm_works(qemu: &str, scratch: &Path, timeout: Duration) -> bool {
    let img = scratch.join("kvm-probe.img");
    if std::fs::write(&img, probe_sector()).is_err() {
        return false;
    }
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
        .arg(format!("file={},format=raw,if=ide", img.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    let start = Instant::now();
    let ok = loop {
        match child.try_wait() {
            // isa-debug-exit exits with (1 << 1) | 1.
            Ok(Some(st)) => break st.code() == Some(3),
            Ok(None) if start.elapsed() < timeout => std::thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                break false;
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
    let accel = if kvm_works(qemu, state_root, Duration::from_secs(3)) {
        "kvm"
    } else {
        "tcg"
    };
    write_atomic(&cache, format!("{accel}\n").as_bytes(), 0o644)?;
    Ok(accel)
}
