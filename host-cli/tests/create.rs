//! `seedctl create`: a qcow2 overlay on the base, an ext4 /var disk real tools recognise,
//! and clear refusals for missing or overlay bases.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{Scratch, create_args, require_tool, stdout_of};

/// A qcow2 `file` in the scratch directory that reads through to `backing` (an image of
/// `backing_format`), of `size` or, without one, of the backing image's size.
fn overlay(s: &Scratch, file: &str, backing: &Path, backing_format: &str, size: Option<&str>) {
    let st = Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-b"])
        .arg(backing)
        .args(["-F", backing_format, file])
        .args(size)
        .current_dir(s.path())
        .status()
        .unwrap();
    assert!(
        st.success(),
        "qemu-img create {file} on {}",
        backing.display()
    );
}

/// Converts the qcow2 `disk` to the raw image `raw`, to read its bytes.
fn to_raw(disk: &Path, raw: &Path) {
    stdout_of(
        Command::new("qemu-img")
            .args(["convert", "-O", "raw"])
            .arg(disk)
            .arg(raw),
    );
}

/// The arguments of `seedctl create NAME` on `base.qcow2` with its /var disk copied
/// from `from`.
fn create_var_from_args<'a>(name: &'a str, from: &'a str) -> [&'a str; 6] {
    ["create", name, "--base", "base.qcow2", "--var-from", from]
}

/// Machine `web1` and a base image `base.qcow2`, before `create`.
fn new_web1_and_base() -> Scratch {
    require_tool("qemu-img");
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    s.qcow2("base.qcow2");
    s
}

/// Machine `web1` created with a 64 MiB /var disk; the scratch and web1's state directory.
fn created_web1() -> (Scratch, PathBuf) {
    require_tool("qemu-img");
    require_tool("mkfs.ext4");
    let s = Scratch::new();
    s.created("web1", "64M");
    let sd = s.state("web1");
    (s, sd)
}

fn state_entries(s: &Scratch) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(s.path().join(".seedctl"))
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn create_makes_overlay_var_and_seed() {
    require_tool("qemu-img");
    require_tool("mkfs.ext4");
    require_tool("blkid");
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    s.qcow2("base.qcow2");
    let out = s.ok(&[&["--json"][..], &create_args("web1", "base.qcow2", "64M")].concat());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let base_abs = std::fs::canonicalize(s.path().join("base.qcow2")).unwrap();
    assert_eq!(v["base"].as_str().unwrap(), base_abs.to_str().unwrap());

    let sd = s.state("web1");
    // The disks and the seed hold the private host key: the owner's only.
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&sd), 0o711);
        for f in ["boot.qcow2", "var.qcow2", "seed.iso"] {
            assert_eq!(mode(&sd.join(f)), 0o600, "{f}");
        }
    }
    let info = stdout_of(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(sd.join("boot.qcow2")),
    );
    let info: serde_json::Value = serde_json::from_str(&info).unwrap();
    assert_eq!(
        info["backing-filename"].as_str().unwrap(),
        base_abs.to_str().unwrap()
    );
    assert_eq!(info["format"], "qcow2");

    // The /var disk carries an ext4 filesystem the guest can mount by label.
    let raw = s.path().join("var.raw");
    to_raw(&sd.join("var.qcow2"), &raw);
    let blkid = stdout_of(Command::new("blkid").arg(&raw));
    assert!(
        blkid.contains("LABEL=\"nixseed-var\"") && blkid.contains("TYPE=\"ext4\""),
        "{blkid}"
    );
    assert!(sd.join("seed.iso").is_file());
    assert_eq!(state_entries(&s), vec!["web1"]);

    // A second create is refused and points at upgrade.
    let err = s.fails(&["create", "web1", "--base", "base.qcow2"]);
    assert!(err.contains("upgrade web1"), "{err}");

    // --var-from copies an existing disk (here web1's) for a second machine.
    s.ok(&["new", "web2"]);
    let from = sd.join("var.qcow2");
    s.ok(&create_var_from_args("web2", from.to_str().unwrap()));
    let raw2 = s.path().join("var2.raw");
    to_raw(&s.state("web2").join("var.qcow2"), &raw2);
    assert_eq!(std::fs::read(&raw).unwrap(), std::fs::read(&raw2).unwrap());
}

#[test]
fn missing_and_overlay_bases_are_refused_without_leftovers() {
    require_tool("qemu-img");
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let err = s.fails(&["create", "web1", "--base", "missing.qcow2"]);
    assert!(
        err.contains("machine `web1`")
            && err.contains("missing.qcow2")
            && err.contains("does not exist"),
        "{err}"
    );

    s.qcow2("base.qcow2");
    let base = s.path().join("base.qcow2");
    overlay(&s, "overlay.qcow2", &base, "qcow2", None);
    let err = s.fails(&["create", "web1", "--base", "overlay.qcow2"]);
    assert!(
        err.contains("overlay.qcow2") && err.contains("itself an overlay"),
        "{err}"
    );

    let err = s.fails(&["create", "web1"]);
    assert!(err.contains("--base IMAGE"), "{err}");
    let err = s.fails(&["create", "ghost", "--base", "base.qcow2"]);
    assert!(err.contains("machine `ghost` not found"), "{err}");
    assert!(!s.state("web1").join("boot.qcow2").exists());
    assert!(
        state_entries(&s).iter().all(|e| !e.starts_with('.')),
        "staging left: {:?}",
        state_entries(&s)
    );
}

#[test]
fn a_machine_whose_overlay_is_gone_keeps_its_var_disk() {
    let (s, sd) = created_web1();
    let var = std::fs::read(sd.join("var.qcow2")).unwrap();
    // The overlay is thrown away (to reset the root); /var holds the machine's data.
    std::fs::remove_file(sd.join("boot.qcow2")).unwrap();
    let err = s.fails(&["run", "web1", "--detach"]);
    assert!(err.contains("seedctl upgrade web1"), "{err}");
    let err = s.fails(&["create", "web1", "--base", "base.qcow2"]);
    assert!(
        err.contains("var.qcow2") && err.contains("seedctl upgrade web1"),
        "{err}"
    );
    assert_eq!(std::fs::read(sd.join("var.qcow2")).unwrap(), var);
    // What the messages point at works and keeps the disk.
    s.ok(&["upgrade", "web1", "--base", "base.qcow2"]);
    assert!(sd.join("boot.qcow2").exists());
    assert_eq!(std::fs::read(sd.join("var.qcow2")).unwrap(), var);
}

/// A /var disk kept on another volume through a symlink, with that volume not mounted:
/// the link points at nothing. Neither `create` nor `upgrade` nor `run` takes it for a
/// missing disk; each names the link, and the link survives.
#[test]
fn a_var_disk_link_to_nothing_is_not_replaced() {
    let (s, sd) = created_web1();
    std::fs::remove_file(sd.join("var.qcow2")).unwrap();
    std::fs::remove_file(sd.join("boot.qcow2")).unwrap();
    let gone = s.path().join("unmounted/web1-var.qcow2");
    std::os::unix::fs::symlink(&gone, sd.join("var.qcow2")).unwrap();
    for args in [
        &["create", "web1", "--base", "base.qcow2"][..],
        &["upgrade", "web1", "--base", "base.qcow2"],
        &["run", "web1", "--detach"],
    ] {
        let err = s.fails(args);
        assert!(
            err.contains("var.qcow2")
                && err.contains("not there")
                && err.contains("web1-var.qcow2"),
            "{args:?}: {err}"
        );
        assert_eq!(std::fs::read_link(sd.join("var.qcow2")).unwrap(), gone);
        assert!(!sd.join("boot.qcow2").exists(), "{args:?} made a boot disk");
    }
}

/// Bases that cannot back an overlay for long are refused by name: an empty image, a
/// device, and a machine's own disk (another machine's /var changes under any overlay
/// on it). An image of its own kept under the state directory is a base like any other.
#[test]
fn empty_device_and_machine_disk_bases_are_refused() {
    require_tool("qemu-img");
    let s = Scratch::new();
    s.created("web1", "32M");
    s.ok(&["new", "web2"]);
    std::fs::write(s.path().join("empty.img"), b"").unwrap();
    let var = s.state("web1").join("var.qcow2").display().to_string();
    for (base, why) in [
        ("empty.img", "is empty"),
        ("/dev/null", "not a regular file"),
        (var.as_str(), "is a disk of machine `web1`"),
    ] {
        let err = s.fails(&["create", "web2", "--base", base]);
        assert!(
            err.contains(why) && err.contains("machine `web2`"),
            "{base}: {err}"
        );
        let err = s.fails(&["upgrade", "web1", "--base", base]);
        assert!(err.contains(why), "{base}: {err}");
    }
    assert!(!s.state("web2").join("boot.qcow2").exists());
    // web1's /var disk kept on another volume through a link, as docs/seedctl.md shows:
    // the disk is found by what it is, not by its name.
    let volume = s.path().join("volume");
    std::fs::create_dir(&volume).unwrap();
    std::fs::rename(
        s.state("web1").join("var.qcow2"),
        volume.join("web1-var.qcow2"),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        volume.join("web1-var.qcow2"),
        s.state("web1").join("var.qcow2"),
    )
    .unwrap();
    for base in [
        volume.join("web1-var.qcow2").display().to_string(),
        var.clone(),
    ] {
        let err = s.fails(&["create", "web2", "--base", &base]);
        assert!(err.contains("is a disk of machine `web1`"), "{base}: {err}");
        let err = s.fails(&["upgrade", "web1", "--base", &base]);
        assert!(err.contains("is a disk of machine `web1`"), "{base}: {err}");
    }
    let kept = s.state("web1").join("bases/next.qcow2");
    std::fs::create_dir_all(kept.parent().unwrap()).unwrap();
    std::fs::copy(s.path().join("base.qcow2"), &kept).unwrap();
    s.ok(&["create", "web2", "--base", &kept.display().to_string()]);
}

/// A /var disk to copy comes from a guest, which wrote every byte of it: one whose qcow2
/// header names a host file to read (a backing file here) is refused, and no byte of
/// that file reaches the new disk.
#[test]
fn a_var_disk_that_reads_a_host_file_is_refused() {
    let s = new_web1_and_base();
    let secret = s.path().join("secret.raw");
    std::fs::write(&secret, [b"HOST-SECRET".as_slice(), &[0u8; 4096]].concat()).unwrap();
    overlay(&s, "guest-var.raw", &secret, "raw", Some("1M"));
    let err = s.fails(&create_var_from_args("web1", "guest-var.raw"));
    assert!(
        err.contains("guest-var.raw")
            && err.contains("reads another file")
            && err.contains("secret.raw"),
        "{err}"
    );
    // A VMDK descriptor, which names its extents by path, in what would be a raw disk.
    let descriptor = format!(
        "# Disk DescriptorFile\nversion=1\nCID=fffffffe\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 8 FLAT \"{}\" 0\n\nddb.virtualHWVersion = \"4\"\n",
        secret.display()
    );
    std::fs::write(s.path().join("guest-var2.raw"), descriptor).unwrap();
    let err = s.fails(&create_var_from_args("web1", "guest-var2.raw"));
    assert!(
        err.contains("guest-var2.raw") && err.contains("reads as vmdk, not raw or qcow2"),
        "{err}"
    );
    assert!(!s.state("web1").join("var.qcow2").exists());
    // The same descriptor as a base: every overlay on it would read the host file.
    let err = s.fails(&["create", "web1", "--base", "guest-var2.raw"]);
    assert!(
        err.contains("base image") && err.contains("reads as vmdk, not raw or qcow2"),
        "{err}"
    );
    assert!(!s.state("web1").join("boot.qcow2").exists());
}

/// A state file that cannot be read stops `create` before any disk is made, so deleting
/// it, as the error says, leaves a machine `create` can make; `list` goes by the disks.
#[test]
fn an_unreadable_state_file_leaves_no_disks() {
    let s = new_web1_and_base();
    std::fs::create_dir_all(s.state("web1")).unwrap();
    std::fs::write(s.state("web1").join("state.json"), "{\"base\": \"/x").unwrap();
    let err = s.fails(&create_args("web1", "base.qcow2", "32M"));
    assert!(err.contains("state.json"), "{err}");
    for disk in ["boot.qcow2", "var.qcow2", "seed.iso"] {
        assert!(!s.state("web1").join(disk).exists(), "{disk} made");
    }
    std::fs::remove_file(s.state("web1").join("state.json")).unwrap();
    s.ok(&create_args("web1", "base.qcow2", "32M"));
    let list = s.ok(&["list"]);
    assert!(list.contains("stopped"), "{list}");
    // A state file that names a base but no boot disk: not `stopped`.
    std::fs::remove_file(s.state("web1").join("boot.qcow2")).unwrap();
    let list = s.ok(&["list"]);
    assert!(list.contains("no disks"), "{list}");
}

/// A state directory so deep that a VM's sockets would not fit a unix socket address is
/// named before libvirt or QEMU is asked, with the way out.
#[test]
fn socket_paths_too_long_for_unix_sockets_are_refused_up_front() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let deep = s.path().join("x".repeat(110));
    let err = s.fails(&["--state", deep.to_str().unwrap(), "xml", "web1"]);
    assert!(
        err.contains("libvirt-qga.sock") && err.contains("a unix socket address holds"),
        "{err}"
    );
    s.ok(&["xml", "web1"]);
}

/// A relative name with a colon (a timestamp in a /var disk's name, a state directory
/// named so) is a file to qemu-img, not a `PROTOCOL:` prefix: seedctl gives it absolute
/// paths.
#[test]
fn names_with_a_colon_are_files_to_qemu_img() {
    let s = new_web1_and_base();
    require_tool("mkfs.ext4");
    let var = "var-2024-05-01T12:00.qcow2";
    s.qcow2(&format!("./{var}"));
    s.ok(&create_var_from_args("web1", var));
    let info = stdout_of(
        Command::new("qemu-img")
            .args(["info", "--output=json"])
            .arg(s.state("web1").join("var.qcow2")),
    );
    assert!(info.contains("\"format\": \"qcow2\""), "{info}");

    s.ok(&["new", "web2"]);
    s.ok(&[
        &["--state", "vm:state"][..],
        &create_args("web2", "base.qcow2", "32M"),
    ]
    .concat());
    assert!(s.path().join("vm:state/web2/boot.qcow2").is_file());
    assert!(s.path().join("vm:state/web2/var.qcow2").is_file());
}

/// The disks are the owner's only before they are in place: a create that fails part-way
/// (here the seed cannot be moved in, as a directory holds its name) leaves no disk that
/// others can read, under a umask that lets qemu-img make them readable to all.
#[test]
fn a_create_that_fails_part_way_leaves_no_disk_others_can_read() {
    use std::os::unix::fs::PermissionsExt;
    let s = new_web1_and_base();
    require_tool("mkfs.ext4");
    let sd = s.state("web1");
    std::fs::create_dir_all(sd.join("seed.iso/in-the-way")).unwrap();
    let seedctl = s.cmd(&create_args("web1", "base.qcow2", "32M"));
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "umask 022 && exec \"$@\"", "sh"])
        .arg(seedctl.get_program())
        .args(seedctl.get_args())
        .current_dir(s.path());
    for (k, v) in seedctl.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "create succeeded: {err}");
    assert!(err.contains("seed.iso"), "{err}");
    // Each disk the failed create left in place (both, as the seed moves in last).
    for disk in ["boot.qcow2", "var.qcow2"] {
        if let Ok(m) = std::fs::metadata(sd.join(disk)) {
            let mode = m.permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{disk} is left {mode:o}");
        }
    }
}

/// Commands that change or boot a machine's disks take turns: an `upgrade` started while
/// another command holds the machine (here `flock` on its lock file, for 2 s) waits for
/// it, rather than renaming disks under a `run` that is starting the machine.
#[test]
fn an_upgrade_waits_for_another_command_on_the_machine() {
    require_tool("flock");
    let (s, sd) = created_web1();
    s.qcow2("new.qcow2");
    let mut holder = Command::new("flock")
        .arg(sd.join("lock"))
        .args(["sleep", "2"])
        .spawn()
        .unwrap();
    // The holder has its lock once `flock -n` is refused.
    assert!(nixseed_test_support::wait_for(
        Duration::from_secs(5),
        || {
            !Command::new("flock")
                .args(["-n"])
                .arg(sd.join("lock"))
                .arg("true")
                .status()
                .unwrap()
                .success()
        }
    ));
    let t = std::time::Instant::now();
    s.ok(&["upgrade", "web1", "--base", "new.qcow2"]);
    assert!(
        t.elapsed() >= Duration::from_millis(1200),
        "upgrade did not wait for the machine's lock ({:?})",
        t.elapsed()
    );
    assert!(holder.wait().unwrap().success());
}

/// A machine directory that is a link to another filesystem (here a directory on
/// /dev/shm, a tmpfs) gets its disks there: they are made on that filesystem and linked
/// in, not refused as a link across filesystems.
#[test]
fn a_machine_directory_on_another_filesystem_gets_its_disks() {
    let shm = std::path::Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("skipped: no /dev/shm");
        return;
    }
    let s = new_web1_and_base();
    let elsewhere = tempfile::tempdir_in(shm).unwrap();
    std::fs::create_dir_all(s.path().join(".seedctl")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), s.state("web1")).unwrap();
    s.ok(&create_args("web1", "base.qcow2", "32M"));
    for disk in ["boot.qcow2", "var.qcow2", "seed.iso"] {
        assert!(elsewhere.path().join(disk).is_file(), "{disk} is not there");
    }
}

/// A file that reads as raw but is no disk (a compressed download, a text file picked by
/// mistake) is refused as a base with what it is named, rather than made into a machine
/// whose boot disk holds a few bytes.
#[test]
fn compressed_and_tiny_files_are_refused_as_bases() {
    require_tool("qemu-img");
    require_tool("gzip");
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    s.qcow2("base.qcow2");
    let gz = Command::new("gzip")
        .args(["-k", "base.qcow2"])
        .current_dir(s.path())
        .status()
        .unwrap();
    assert!(gz.success());
    std::fs::write(s.path().join("notes.txt"), b"not a disk\n").unwrap();
    for (base, why) in [
        ("base.qcow2.gz", "is gzip-compressed"),
        ("notes.txt", "too small"),
    ] {
        let err = s.fails(&["create", "web1", "--base", base]);
        assert!(err.contains(why) && err.contains(base), "{base}: {err}");
    }
    // The same files, and the null device, as the /var disk to copy.
    for (var, why) in [
        ("base.qcow2.gz", "is gzip-compressed"),
        ("notes.txt", "too small"),
        ("/dev/null", "not a regular file or a block device"),
    ] {
        let err = s.fails(&["create", "web1", "--base", "base.qcow2", "--var-from", var]);
        assert!(err.contains(why) && err.contains(var), "{var}: {err}");
    }
    assert!(!s.state("web1").join("boot.qcow2").exists());
    // A raw disk of a real size is taken.
    let raw = Command::new("qemu-img")
        .args(["create", "-q", "-f", "raw", "base.raw", "8M"])
        .current_dir(s.path())
        .status()
        .unwrap();
    assert!(raw.success());
    s.ok(&create_args("web1", "base.raw", "32M"));
}

/// What a `create` that was killed left (a staging directory with a partial disk) is
/// removed by the next `create` of that machine; another machine's is not touched.
#[test]
fn a_killed_create_s_leftovers_go_with_the_next_create() {
    let s = new_web1_and_base();
    require_tool("mkfs.ext4");
    let state = s.path().join(".seedctl");
    // No process has this id (above the kernel's pid_max).
    let gone = state.join(".web1.create-999999999-abcdef");
    let other = state.join(".web2.create-999999999-abcdef");
    for d in [&gone, &other] {
        std::fs::create_dir_all(d).unwrap();
        std::fs::write(d.join("var.qcow2"), b"partial").unwrap();
    }
    let out = s
        .cmd(&create_args("web1", "base.qcow2", "32M"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("left by an interrupted run"), "{err}");
    assert!(
        !gone.exists(),
        "the leftover of web1's killed create stayed"
    );
    assert!(other.join("var.qcow2").exists(), "web2's staging went");
}

/// A name so long that the machine's sockets cannot be bound under the state directory
/// is warned about by `new` and refused by `create` before any disk is made.
#[test]
fn a_name_too_long_for_its_sockets_is_refused_before_disks() {
    require_tool("qemu-img");
    let s = Scratch::new();
    let name = format!("{}.{}", "a".repeat(60), "b".repeat(60));
    let out = s.run(&["new", &name]);
    assert!(out.status.success());
    let warn = String::from_utf8_lossy(&out.stderr);
    assert!(
        warn.contains("warning") && warn.contains("unix socket"),
        "{warn}"
    );
    s.qcow2("base.qcow2");
    let err = s.fails(&["create", &name, "--base", "base.qcow2"]);
    assert!(err.contains("more than the 107"), "{err}");
    assert!(!s.state(&name).join("boot.qcow2").exists());
    assert!(!s.state(&name).join("var.qcow2").exists());
}

/// A /var size out of range is a usage error, as any value out of range is.
#[test]
fn a_var_size_out_of_range_is_a_usage_error() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    for bad in ["0", "1M", "lots"] {
        let out = s.run(&["create", "web1", "--var-size", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("--var-size"), "{bad}: {err}");
    }
    assert!(!s.state("web1").join("var.qcow2").exists());
}
