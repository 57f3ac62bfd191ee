//! `seedctl upgrade` keeps /var and swaps the base; `seedctl build` drives nix (here a
//! fake `nix` script that records its arguments, since the test host has no nix).
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{FakeQemu, Scratch, create_args, require_tool, stdout_of};

/// A fake `nix`, the shell `script`; the PATH that puts it before the real one.
fn fake_nix(s: &Scratch, script: &str) -> String {
    common::fake_tool(s, "nix", script)
}

#[test]
fn upgrade_swaps_the_base_and_keeps_var() {
    require_tool("qemu-img");
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    for b in ["base1.qcow2", "base2.qcow2"] {
        s.qcow2(b);
    }
    s.ok(&create_args("web1", "base1.qcow2", "32M"));
    let var_before = std::fs::read(s.state("web1").join("var.qcow2")).unwrap();
    let out: serde_json::Value =
        serde_json::from_str(&s.ok(&["--json", "upgrade", "web1", "--base", "base2.qcow2"]))
            .unwrap();
    assert_eq!(out["stopped"], false, "{out}");
    // The new overlay is the owner's only, as `create` made the old one.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.state("web1").join("boot.qcow2"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    let info = stdout_of(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(s.state("web1").join("boot.qcow2")),
    );
    assert!(info.contains("base2.qcow2"), "{info}");
    assert_eq!(
        std::fs::read(s.state("web1").join("var.qcow2")).unwrap(),
        var_before
    );
    let err = s.fails(&["upgrade", "web1", "--base", "nope.qcow2"]);
    assert!(err.contains("nope.qcow2"), "{err}");

    // An upgrade that fails after its overlay is made (here: the seed cannot be signed)
    // leaves the machine on the base it had, and its state saying so.
    let bad_key = s.path().join("bad-key");
    std::fs::write(&bad_key, "not a key\n").unwrap();
    let out = s
        .cmd(&["upgrade", "web1", "--base", "base1.qcow2"])
        .env("SEEDCTL_SIGNING_KEY", &bad_key)
        .output()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    let info = stdout_of(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(s.state("web1").join("boot.qcow2")),
    );
    assert!(info.contains("base2.qcow2"), "{info}");
    let list = s.ok(&["list"]);
    assert!(list.contains("base2.qcow2"), "{list}");
    assert!(
        std::fs::read_dir(s.state("web1")).unwrap().all(|e| !e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with('.')),
        "staging left behind"
    );

    // A libvirt that cannot be reached may be running the machine: refused.
    require_tool("virsh");
    let err = s.fails(&[
        "upgrade",
        "web1",
        "--base",
        "base1.qcow2",
        "--connect",
        "qemu+unix:///system?socket=/nonexistent/libvirt-sock",
    ]);
    assert!(
        err.contains("cannot tell whether libvirt runs machine `web1`"),
        "{err}"
    );
}

#[test]
fn build_records_the_image_as_default_base() {
    let s = Scratch::new();
    let out = s.path().join("store-result");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("nixos.qcow2"), b"").unwrap();
    // Fake nix: records its arguments, prints the output path, or fails on request.
    let path = fake_nix(
        &s,
        &format!(
            "#!/bin/sh\necho \"$@\" > {args}\nif [ -n \"$FAKE_NIX_FAIL\" ]; then echo 'error: builder failed' >&2; exit 1; fi\necho {out}\n",
            args = s.path().join("nix-args").display(),
            out = out.display()
        ),
    );

    let o = s
        .cmd(&["build", ".#web-image"])
        .env("PATH", &path)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let args = std::fs::read_to_string(s.path().join("nix-args")).unwrap();
    // A default Nix install has flakes and the `nix` command off: they are turned on.
    assert!(
        args.starts_with("--extra-experimental-features nix-command flakes build ")
            && args.contains("--print-out-paths")
            && args.contains(".#web-image")
            && !args.contains("--no-link")
            && args.contains(&format!(
                "--out-link {}/.seedctl/bases/result-",
                s.path().display()
            )),
        "{args}"
    );
    let base = std::fs::read_to_string(s.path().join(".seedctl/default-base")).unwrap();
    assert_eq!(base.trim(), out.join("nixos.qcow2").to_str().unwrap());

    let o = s
        .cmd(&["build"])
        .env("PATH", &path)
        .env("FAKE_NIX_FAIL", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("builder failed"));
}

/// Two builds in the same second each keep a garbage-collector root of their own: nix
/// replaces an existing out-link, which would leave the first base unprotected.
#[test]
fn every_build_keeps_its_own_root() {
    let s = Scratch::new();
    // Fake nix: makes the out-link as nix does, to a result holding one image.
    let path = fake_nix(
        &s,
        &format!(
            "#!/bin/sh\nwhile [ \"$1\" != --out-link ]; do shift; done\nout={}/r$$\nmkdir -p $out && : > $out/nixos.qcow2\nln -sfn $out \"$2\"\necho $out\n",
            s.path().display()
        ),
    );
    // Roots already taken for this second and the next few: each build must find a name
    // of its own beside them (the same-second case, whenever the builds run).
    let bases = s.path().join(".seedctl/bases");
    std::fs::create_dir_all(&bases).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for t in now..now + 30 {
        std::os::unix::fs::symlink("/nonexistent", bases.join(format!("result-{t}"))).unwrap();
    }
    for _ in 0..2 {
        let o = s.cmd(&["build"]).env("PATH", &path).output().unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
    let roots: Vec<_> = std::fs::read_dir(&bases)
        .unwrap()
        .map(|e| std::fs::read_link(e.unwrap().path()).unwrap())
        .filter(|t| t != std::path::Path::new("/nonexistent"))
        .collect();
    assert_eq!(roots.len(), 2, "{roots:?}");
    assert_ne!(roots[0], roots[1]);
    assert_eq!(
        std::fs::read_dir(&bases).unwrap().count(),
        32,
        "a taken root was replaced"
    );
}

/// Whether some process holds QEMU's write-permission lock byte (101) of `disk`, read
/// from /proc/locks (`1: OFDLCK ADVISORY READ -1 fd:01:1835027 100 101`). Only looked
/// at: a probe that took a lock itself (`qemu-img info` without `-U`) could make the
/// QEMU starting on the disk fail to get its own.
fn write_lock_held(disk: &std::path::Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let ino = std::fs::metadata(disk).unwrap().ino().to_string();
    std::fs::read_to_string("/proc/locks")
        .unwrap()
        .lines()
        .any(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [.., id, start, end] = f[..] else {
                return false;
            };
            let range = |v: &str| v.parse::<u64>().ok();
            id.rsplit(':').next() == Some(ino.as_str())
                && range(start).is_some_and(|s| s <= 101)
                && (end == "EOF" || range(end).is_some_and(|e| e >= 101))
        })
}

/// A paused QEMU with `disk` as its virtio disk, and whether it took the disk's write
/// lock within 20 s.
fn paused_qemu_on(disk: &std::path::Path) -> (std::process::Child, bool) {
    let mut qemu = Command::new("qemu-system-x86_64")
        .args(["-S", "-display", "none", "-nodefaults", "-accel", "tcg"])
        .arg("-drive")
        .arg(format!("file={},if=virtio", disk.display()))
        .spawn()
        .unwrap();
    let locked = nixseed_test_support::wait_for(std::time::Duration::from_secs(20), || {
        write_lock_held(disk) || !matches!(qemu.try_wait(), Ok(None))
    }) && matches!(qemu.try_wait(), Ok(None));
    if !locked {
        // Who holds it, for the failure's message.
        let _ = Command::new("sh")
            .args(["-c", "grep -l qemu /proc/[0-9]*/comm 2>/dev/null | while read f; do d=${f%/comm}; ls -l $d/fd 2>/dev/null | grep -q \"$0\" && echo \"held by $(cat $d/cmdline | tr '\\0' ' ')\"; done"])
            .arg(disk)
            .status();
    }
    (qemu, locked)
}

/// A QEMU seedctl did not start (a domain under another libvirt URI, one started by
/// hand) still holds the boot overlay's lock: the upgrade is refused while it runs.
#[test]
fn an_overlay_open_in_any_running_qemu_is_not_replaced() {
    require_tool("qemu-img");
    require_tool("qemu-system-x86_64");
    let s = Scratch::new();
    s.created("web1", "32M");
    s.qcow2("base2.qcow2");
    let boot = s.state("web1").join("boot.qcow2");
    let (mut qemu, locked) = paused_qemu_on(&boot);
    let refused = s.run(&["upgrade", "web1", "--base", "base2.qcow2"]);
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert!(locked, "QEMU never took the overlay's lock");
    assert!(!refused.status.success(), "upgraded under a running QEMU");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("open in a running QEMU"), "{err}");
    s.ok(&["upgrade", "web1", "--base", "base2.qcow2"]);
}

/// A `qemu-nbd` serving `image` read-write in the background, as a writer of the image
/// other than a VM; [`NbdWriter::stop`] ends it and waits until it is gone.
struct NbdWriter(String);

impl NbdWriter {
    fn start(s: &Scratch, image: &std::path::Path, format: &str) -> NbdWriter {
        let stem = image.file_name().unwrap().to_string_lossy().into_owned();
        let pidfile = s.path().join(format!("{stem}.nbd.pid"));
        let started = Command::new("qemu-nbd")
            .args(["--fork", "-f", format, "--persistent"])
            .arg("--pid-file")
            .arg(&pidfile)
            .arg("-k")
            .arg(s.path().join(format!("{stem}.nbd.sock")))
            .arg(image)
            .status()
            .unwrap();
        assert!(started.success());
        NbdWriter(std::fs::read_to_string(&pidfile).unwrap().trim().to_owned())
    }

    fn stop(self) {
        let _ = Command::new("kill").arg(&self.0).status();
        let proc_dir = std::path::Path::new("/proc").join(&self.0);
        nixseed_test_support::wait_for(std::time::Duration::from_secs(20), || !proc_dir.exists());
    }
}

/// The base every overlay reads must not change under them: one open for writing
/// (`qemu-nbd` here) is refused by `create` and `upgrade`; one that running VMs only read
/// as their backing file is not.
#[test]
fn a_base_open_for_writing_is_refused_and_one_vms_read_is_not() {
    require_tool("qemu-img");
    require_tool("qemu-nbd");
    require_tool("qemu-system-x86_64");
    let s = Scratch::new();
    s.created("web1", "32M");
    s.ok(&["new", "web2"]);
    s.qcow2("base2.qcow2");
    let base2 = s.path().join("base2.qcow2");
    let nbd = NbdWriter::start(&s, &base2, "qcow2");
    let create = s.run(&create_args("web2", "base2.qcow2", "32M"));
    let upgrade = s.run(&["upgrade", "web1", "--base", "base2.qcow2"]);
    nbd.stop();
    for (verb, out) in [("create", &create), ("upgrade", &upgrade)] {
        assert!(!out.status.success(), "{verb} took a base open for writing");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("open for writing") && err.contains("base2.qcow2"),
            "{verb}: {err}"
        );
    }
    assert!(!s.state("web2").join("var.qcow2").exists());

    // A raw base: the raw driver lets `qemu-img info` read it while qemu-nbd writes it,
    // and the lock byte for writing still tells.
    let raw = s.path().join("base3.raw");
    let made = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw"])
        .arg(&raw)
        .arg("8M")
        .status()
        .unwrap();
    assert!(made.success());
    let nbd = NbdWriter::start(&s, &raw, "raw");
    let create = s.run(&create_args("web2", "base3.raw", "32M"));
    nbd.stop();
    let err = String::from_utf8_lossy(&create.stderr);
    assert!(
        !create.status.success() && err.contains("open for writing") && err.contains("base3.raw"),
        "create took a raw base qemu-nbd writes: {err}"
    );

    // A VM running on web1's overlay reads base2 as its backing file: web2 may still
    // be made on it.
    s.ok(&["upgrade", "web1", "--base", "base2.qcow2"]);
    let boot = s.state("web1").join("boot.qcow2");
    let (mut qemu, locked) = paused_qemu_on(&boot);
    let create = s.run(&create_args("web2", "base2.qcow2", "32M"));
    let _ = qemu.kill();
    let _ = qemu.wait();
    assert!(locked, "QEMU never took the overlay's lock");
    assert!(
        create.status.success(),
        "{}",
        String::from_utf8_lossy(&create.stderr)
    );
}

/// A machine `seedctl define` once wrote a domain.xml for, upgraded on a host with no
/// virsh at all: no libvirt runs it here, so the upgrade goes ahead.
#[test]
fn an_upgrade_without_virsh_installed_is_not_refused() {
    require_tool("qemu-img");
    let s = Scratch::new();
    s.created("web1", "32M");
    s.qcow2("base2.qcow2");
    std::fs::write(s.state("web1").join("domain.xml"), "<domain/>").unwrap();
    let bin = s.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let qemu_img = String::from_utf8(
        Command::new("sh")
            .args(["-c", "command -v qemu-img"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    std::os::unix::fs::symlink(qemu_img.trim(), bin.join("qemu-img")).unwrap();
    let out = s
        .cmd(&["upgrade", "web1", "--base", "base2.qcow2"])
        .env("PATH", &bin)
        .output()
        .unwrap();
    common::assert_success(&out);
}

/// `upgrade --restart` reads what it needs before it stops the machine: a state file that
/// cannot be read leaves it running. A failure after the stop says that the machine was
/// stopped and how to start it. The machine's QEMU is a stand-in whose monitor ends it on
/// the ACPI power button.
#[test]
fn upgrade_restart_stops_the_machine_only_when_it_must_and_says_so() {
    require_tool("qemu-img");
    let s = Scratch::new();
    s.created("web1", "32M");
    s.qcow2("base2.qcow2");
    let sd = s.state("web1");
    let upgrade = ["upgrade", "web1", "--base", "base2.qcow2", "--restart"];

    let state = std::fs::read(sd.join("state.json")).unwrap();
    std::fs::write(sd.join("state.json"), "{ not json").unwrap();
    let mut qemu = FakeQemu::start(&s, "web1", true);
    let err = s.fails(&upgrade);
    assert!(err.contains("state.json"), "{err}");
    assert!(qemu.alive(), "the machine was stopped: {err}");
    std::fs::write(sd.join("state.json"), &state).unwrap();

    // The seed's name is taken by a directory: the upgrade fails after the stop.
    std::fs::remove_file(sd.join("seed.iso")).unwrap();
    std::fs::create_dir_all(sd.join("seed.iso/in-the-way")).unwrap();
    let err = s.fails(&upgrade);
    assert!(!qemu.alive(), "the machine was not stopped: {err}");
    assert!(
        err.contains("seed.iso")
            && err.contains("stopped for the upgrade and not started again")
            && err.contains("`seedctl run web1 --detach` starts it"),
        "{err}"
    );
}
