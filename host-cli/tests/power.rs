//! `seedctl destroy` on a `seedctl run` machine, against a stand-in QEMU (a `sleep` that
//! holds the pidfile) and a fake `kill`, to reach the cases a real QEMU rarely shows.
#![allow(clippy::unwrap_used)]

mod common;

use common::{FakeQemu, Scratch, fake_tool};

/// A QEMU still there after `kill -KILL` (stuck in the kernel, say) is not reported
/// destroyed: destroy fails naming its pid, and the pidfile stays for a later try.
#[test]
fn destroy_fails_naming_the_pid_when_qemu_outlives_the_kill() {
    let s = Scratch::new();
    // No monitor: the quit fails at once and destroy goes on to kill.
    let mut qemu = FakeQemu::start(&s, "web1", false);
    let path = fake_tool(&s, "kill", "#!/bin/sh\nexit 0\n");
    let out = s
        .cmd(&["destroy", "web1"])
        .env("PATH", &path)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "destroy succeeded: {err}");
    assert!(
        err.contains("machine `web1`")
            && err.contains(&format!("QEMU pid {} did not end", qemu.pid)),
        "{err}"
    );
    assert!(qemu.alive());
    assert!(
        s.state("web1").join("qemu.pid").exists(),
        "the pidfile went"
    );
}

/// A QEMU that exits between the failed quit and the kill makes the kill fail; it is
/// gone all the same, which is what destroy was asked for.
#[test]
fn destroy_succeeds_when_qemu_exits_before_the_kill() {
    let s = Scratch::new();
    let mut qemu = FakeQemu::start(&s, "web1", false);
    // The process ends, and the kill reports it as not there.
    let path = fake_tool(
        &s,
        "kill",
        "#!/bin/sh\nkill -9 \"$2\"\necho \"kill: ($2) - No such process\" >&2\nexit 1\n",
    );
    let out = s
        .cmd(&["destroy", "web1"])
        .env("PATH", &path)
        .output()
        .unwrap();
    common::assert_success(&out);
    assert!(String::from_utf8_lossy(&out.stdout).contains("machine `web1` destroyed"));
    assert!(!qemu.alive());
    assert!(!s.state("web1").join("qemu.pid").exists());
}
