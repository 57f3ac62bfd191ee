//! `seedctl seed`: the ISO and vfat volumes read back with real tools (xorriso, isoinfo,
//! fsck.vfat, mtools), byte-for-byte reproducible.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{Scratch, require_tool, stdout_of};

fn machine_with_keys(s: &Scratch) {
    let key = s.client_key();
    s.ok(&[
        "new",
        "web1",
        "--hostname",
        "web1.example.org",
        "--admin-key",
        &format!("@{}", key.display()),
        "--user-key",
        &format!("@{}", key.display()),
        "--tcp-port",
        "22",
        "--tcp-port",
        "8000-8080",
        "--nameserver",
        "192.0.2.53",
        "--search",
        "example.org",
    ]);
}

#[test]
fn iso_reads_back_with_long_names_label_and_content() {
    require_tool("xorriso");
    require_tool("isoinfo");
    let s = Scratch::new();
    machine_with_keys(&s);
    let out = s.ok(&["--json", "seed", "web1", "-o", "seed.iso"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let iid = v["instance_id"].as_str().unwrap().to_owned();
    let iso = s.path().join("seed.iso");

    let ls = stdout_of(Command::new("xorriso").arg("-indev").arg(&iso).arg("-ls"));
    for name in ["'meta-data'", "'user-data'", "'network-config'"] {
        assert!(ls.contains(name), "{name} not listed:\n{ls}");
    }
    let pvd = Command::new("xorriso")
        .arg("-indev")
        .arg(&iso)
        .arg("-pvd_info")
        .output()
        .unwrap();
    let pvd =
        String::from_utf8_lossy(&pvd.stdout).into_owned() + &String::from_utf8_lossy(&pvd.stderr);
    assert!(pvd.contains("Volume id    : 'cidata'"), "{pvd}");
    let d = stdout_of(Command::new("isoinfo").arg("-d").arg("-i").arg(&iso));
    assert!(d.contains("Volume id: cidata"), "{d}");
    assert!(d.contains("Joliet"), "{d}");
    assert!(d.contains("Rock Ridge"), "{d}");
    // Joliet alone also gives the long names.
    let j = stdout_of(
        Command::new("isoinfo")
            .arg("-J")
            .arg("-f")
            .arg("-i")
            .arg(&iso),
    );
    assert!(
        j.contains("/user-data") && j.contains("/network-config"),
        "{j}"
    );

    let ex = s.path().join("extracted");
    stdout_of(
        Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(&iso)
            .args(["-extract", "/"])
            .arg(&ex),
    );
    let meta = std::fs::read_to_string(ex.join("meta-data")).unwrap();
    assert!(meta.contains(&format!("instance-id: \"{iid}\"")), "{meta}");
    assert!(
        meta.contains("local-hostname: \"web1.example.org\""),
        "{meta}"
    );
    let user = std::fs::read_to_string(ex.join("user-data")).unwrap();
    assert!(user.starts_with("#cloud-config\n"));
    assert!(user.contains("fqdn: \"web1.example.org\""));
    let host_pub =
        std::fs::read_to_string(s.machine("web1").join("ssh_host_ed25519_key.pub")).unwrap();
    assert!(user.contains(host_pub.trim()), "host key missing");
    let host_priv =
        std::fs::read_to_string(s.machine("web1").join("ssh_host_ed25519_key")).unwrap();
    for line in host_priv.lines() {
        assert!(
            user.contains(&format!("    {line}\n")),
            "private key line {line} missing"
        );
    }
    let mid = std::fs::read_to_string(s.machine("web1").join("machine-id")).unwrap();
    assert!(user.contains(&format!("  machine-id: \"{}\"", mid.trim())));
    assert!(
        user.contains("  tcp_ports:\n    - 22\n    - 8000-8080\n"),
        "{user}"
    );
    assert!(
        user.contains("  resolv_conf: \"nameserver 192.0.2.53\\nsearch example.org\\n\""),
        "{user}"
    );
    let net = std::fs::read_to_string(ex.join("network-config")).unwrap();
    let list: serde_json::Value = serde_json::from_str(&s.ok(&["list", "--json"])).unwrap();
    let mac = list["machines"][0]["mac"].as_str().unwrap().to_owned();
    assert!(mac.starts_with("52:54:00:"), "{mac}");
    assert_eq!(
        net,
        format!(
            "version: 2\nethernets:\n  eth0:\n    match:\n      macaddress: \"{mac}\"\n    dhcp4: true\n"
        )
    );
}

#[test]
fn same_identity_gives_identical_bytes_and_a_change_gives_a_new_instance_id() {
    let s = Scratch::new();
    machine_with_keys(&s);
    s.ok(&["seed", "web1", "-o", "a.iso"]);
    s.ok(&["seed", "web1", "-o", "b.iso"]);
    s.ok(&["seed", "web1", "--format", "vfat", "-o", "a.img"]);
    s.ok(&["seed", "web1", "--format", "vfat", "-o", "b.img"]);
    let read = |f: &str| std::fs::read(s.path().join(f)).unwrap();
    assert_eq!(read("a.iso"), read("b.iso"));
    assert_eq!(read("a.img"), read("b.img"));

    let iid = |out: String| {
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["instance_id"].clone()
    };
    let before = iid(s.ok(&["--json", "seed", "web1", "-o", "c.iso"]));
    std::fs::write(s.machine("web1").join("tcp_ports"), "22\n443\n").unwrap();
    let after = iid(s.ok(&["--json", "seed", "web1", "-o", "c.iso"]));
    assert_ne!(before, after);
}

#[test]
fn vfat_passes_fsck_and_mtools_reads_the_same_user_data() {
    require_tool("fsck.vfat");
    require_tool("mcopy");
    require_tool("xorriso");
    let s = Scratch::new();
    machine_with_keys(&s);
    s.ok(&["seed", "web1", "--format", "vfat", "-o", "seed.img"]);
    s.ok(&["seed", "web1", "-o", "seed.iso"]);
    let img = s.path().join("seed.img");
    let fsck = Command::new("fsck.vfat")
        .arg("-n")
        .arg(&img)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "{}",
        String::from_utf8_lossy(&fsck.stdout)
    );
    let label = stdout_of(
        Command::new("mlabel")
            .arg("-s")
            .arg("-i")
            .arg(&img)
            .arg("::"),
    );
    assert!(label.contains("CIDATA"), "{label}");
    let from_fat = stdout_of(
        Command::new("mcopy")
            .arg("-i")
            .arg(&img)
            .args(["::user-data", "-"]),
    );
    let ex = s.path().join("ex");
    stdout_of(
        Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(s.path().join("seed.iso"))
            .args(["-extract", "/"])
            .arg(&ex),
    );
    assert_eq!(
        from_fat,
        std::fs::read_to_string(ex.join("user-data")).unwrap()
    );
}

#[test]
fn malformed_identity_files_are_named_and_no_seed_is_written() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let cases: [(&str, &str); 4] = [
        ("machine-id", "not-a-machine-id\n"),
        ("admin_authorized_keys", "ssh-ed25519 AAAA!!!broken\n"),
        ("ssh_host_ed25519_key", "garbage\n"),
        ("tcp_ports", "22\nhttp\n"),
    ];
    for (file, bad) in cases {
        let path = s.machine("web1").join(file);
        let good = std::fs::read(&path).unwrap();
        std::fs::write(&path, bad).unwrap();
        let err = s.fails(&["seed", "web1", "-o", "out.iso"]);
        assert!(
            err.contains("machine `web1`") && err.contains(&format!("machines/web1/{file}")),
            "{file}: {err}"
        );
        assert!(err.contains("seedctl new web1 --force"), "{err}");
        assert!(!s.path().join("out.iso").exists());
        std::fs::write(&path, good).unwrap();
    }
    let err = s.fails(&["seed", "ghost"]);
    assert!(
        err.contains("machine `ghost` not found") && err.contains("seedctl new ghost"),
        "{err}"
    );
}

/// The seed holds the private host key, so its file is the owner's only; a seed the
/// guest would refuse (a control character in `hosts`) is refused here, and nothing is
/// written.
#[test]
fn seeds_are_private_and_checked_as_the_guest_reads_them() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    s.ok(&["seed", "web1", "-o", "out.iso"]);
    let mode = std::fs::metadata(s.path().join("out.iso"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    std::fs::write(
        s.machine("web1").join("network-config"),
        "version: 2\nethernets: [\n",
    )
    .unwrap();
    let err = s.fails(&["seed", "web1", "-o", "bad.iso"]);
    assert!(
        err.contains("the guest would reject this seed") && err.contains("network-config"),
        "{err}"
    );
    assert!(!s.path().join("bad.iso").exists());
}

/// A character YAML does not allow raw (DEL) in an identity file is escaped in the seed,
/// so the guest reads back exactly what the operator wrote.
#[test]
fn characters_yaml_does_not_allow_raw_survive_the_seed() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    // In a comment: a name holding it would be refused as no hostname.
    std::fs::write(s.machine("web1").join("hosts"), "10.0.0.5 db # n\x7f\n").unwrap();
    s.ok(&["seed", "web1", "-o", "out.iso"]);
    s.ok(&["render", "web1", "--out", "tree"]);
    let hosts = std::fs::read_to_string(s.path().join("tree/hosts")).unwrap();
    assert!(hosts.contains("10.0.0.5 db # n\x7f\n"), "{hosts:?}");
}

/// An identity file may be a symlink to a file shared inside the machines directory, but
/// not to one outside it, and a FIFO, an oversized file or non-UTF-8 bytes are named
/// instead of blocking, filling memory or being read as garbage. No seed is written.
#[test]
fn identity_files_are_read_only_from_inside_the_machines_directory() {
    use std::os::unix::fs::symlink;
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let dir = s.machine("web1");
    let shared = s.path().join("machines/resolv.shared");
    std::fs::write(&shared, "nameserver 192.0.2.99\n").unwrap();
    std::fs::remove_file(dir.join("resolv.conf")).unwrap();
    symlink("../resolv.shared", dir.join("resolv.conf")).unwrap();
    s.ok(&["render", "web1", "--out", "tree"]);
    let resolv = std::fs::read_to_string(s.path().join("tree/resolv.conf")).unwrap();
    assert_eq!(resolv, "nameserver 192.0.2.99\n");

    let outside = s.path().join("secret");
    std::fs::write(&outside, "root:$6$hash:19000::::::\n").unwrap();
    let fifo = s.path().join("machines/web1/hosts.fifo");
    let mkfifo = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(mkfifo.success());
    type Make<'a> = &'a dyn Fn(&std::path::Path);
    let cases: [(&str, Make, &str); 4] = [
        ("resolv.conf", &|p| symlink(&outside, p).unwrap(), "outside"),
        (
            "hosts",
            &|p| symlink("hosts.fifo", p).unwrap(),
            "not a regular file",
        ),
        (
            "tcp_ports",
            &|p| std::fs::write(p, vec![b'#'; 2 << 20]).unwrap(),
            "larger than",
        ),
        (
            "hostname",
            &|p| std::fs::write(p, b"web\xff1\n").unwrap(),
            "not UTF-8",
        ),
    ];
    for (file, make, why) in cases {
        let path = dir.join(file);
        let saved = s.path().join("saved");
        std::fs::rename(&path, &saved).unwrap();
        make(&path);
        let err = s.fails(&["seed", "web1", "-o", "out.iso"]);
        assert!(
            err.contains(&format!("machines/web1/{file}")) && err.contains(why),
            "{file}: {err}"
        );
        assert!(!err.contains("$6$hash"), "{err}");
        assert!(!s.path().join("out.iso").exists());
        std::fs::remove_file(&path).unwrap();
        std::fs::rename(&saved, &path).unwrap();
    }
}

/// A host key the guest's sshd could not load unattended (a passphrase) or that is not
/// the ed25519 key the file is named for is refused with the file named, and no seed is
/// written.
#[test]
fn a_host_key_sshd_could_not_use_is_refused() {
    require_tool("ssh-keygen");
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    for (args, says) in [
        (&["-t", "ed25519", "-N", "secretpass"][..], "passphrase"),
        (&["-t", "rsa", "-b", "2048", "-N", ""][..], "rsa"),
    ] {
        let key = s.path().join("k");
        let _ = std::fs::remove_file(&key);
        let _ = std::fs::remove_file(s.path().join("k.pub"));
        let st = Command::new("ssh-keygen")
            .args(["-q", "-C", "x", "-f"])
            .arg(&key)
            .args(args)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::copy(&key, s.machine("web1").join("ssh_host_ed25519_key")).unwrap();
        std::fs::copy(
            s.path().join("k.pub"),
            s.machine("web1").join("ssh_host_ed25519_key.pub"),
        )
        .unwrap();
        let out = s.path().join("web1.iso");
        let err = s.fails(&["seed", "web1", "-o", "web1.iso"]);
        assert!(
            err.contains("machines/web1/ssh_host_ed25519_key:")
                && err.to_lowercase().contains(says),
            "{err}"
        );
        assert!(!out.exists());
    }
}

/// `-o` writes through a symlink to its target and refuses to replace what is not a
/// regular file (a FIFO here; a device node as root).
#[test]
fn output_is_written_through_links_and_never_over_special_files() {
    use std::os::unix::fs::FileTypeExt;
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    std::fs::create_dir(s.path().join("isos")).unwrap();
    std::os::unix::fs::symlink("isos/web1.iso", s.path().join("link.iso")).unwrap();
    s.ok(&["seed", "web1", "-o", "link.iso"]);
    assert!(
        s.path()
            .join("link.iso")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert!(
        std::fs::metadata(s.path().join("isos/web1.iso"))
            .unwrap()
            .len()
            > 0
    );

    nix::unistd::mkfifo(
        &s.path().join("fifo"),
        nix::sys::stat::Mode::from_bits_truncate(0o600),
    )
    .unwrap();
    for cmd in [
        &["seed", "web1", "-o", "fifo"][..],
        &["xml", "web1", "-o", "fifo"][..],
    ] {
        let err = s.fails(cmd);
        assert!(err.contains("not a regular file"), "{err}");
        assert!(
            std::fs::symlink_metadata(s.path().join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo(),
            "{cmd:?} replaced the FIFO"
        );
    }
}

/// `-o` never replaces a disk: a qcow2 image wherever it is (by its magic), and a
/// machine's own disks and UEFI variables in its state directory. An older seed ISO or
/// domain XML is still replaced.
#[test]
fn output_is_never_written_over_a_disk() {
    use std::os::unix::fs::MetadataExt;
    require_tool("qemu-img");
    let s = Scratch::new();
    s.created("web1", "32M");
    let sd = s.state("web1");
    std::fs::write(sd.join("OVMF_VARS.fd"), vec![0u8; 4096]).unwrap();
    std::os::unix::fs::symlink(".seedctl/web1/var.qcow2", s.path().join("link.qcow2")).unwrap();
    let inode = |f: &std::path::Path| std::fs::metadata(f).unwrap().ino();
    // The output, the file the error names (a link's target) and why it is kept.
    for (out, file, why) in [
        (".seedctl/web1/var.qcow2", "var.qcow2", "qcow2 disk image"),
        (".seedctl/web1/boot.qcow2", "boot.qcow2", "qcow2 disk image"),
        (
            ".seedctl/web1/OVMF_VARS.fd",
            "OVMF_VARS.fd",
            "disk of machine `web1`",
        ),
        ("link.qcow2", ".seedctl/web1/var.qcow2", "qcow2 disk image"),
        ("base.qcow2", "base.qcow2", "qcow2 disk image"),
    ] {
        let before = inode(&s.path().join(out));
        for cmd in [
            &["seed", "web1", "-o", out][..],
            &["xml", "web1", "-o", out],
        ] {
            let err = s.fails(cmd);
            assert!(
                err.contains(file) && err.contains(why) && err.contains("over a disk"),
                "{cmd:?}: {err}"
            );
            assert_eq!(inode(&s.path().join(out)), before, "{cmd:?} replaced {out}");
        }
    }
    // The names are the machine's even before the files exist: its next start would
    // take whatever is found there.
    std::fs::remove_file(sd.join("OVMF_VARS.fd")).unwrap();
    for cmd in [
        &["seed", "web1", "-o", ".seedctl/web1/OVMF_VARS.fd"][..],
        &["xml", "web1", "-o", ".seedctl/web1/OVMF_VARS.fd"],
    ] {
        let err = s.fails(cmd);
        assert!(err.contains("disk of machine `web1`"), "{cmd:?}: {err}");
        assert!(!sd.join("OVMF_VARS.fd").exists(), "{cmd:?} wrote it");
    }
    let head = std::fs::read(sd.join("var.qcow2")).unwrap();
    assert!(
        head.starts_with(b"QFI\xfb"),
        "var.qcow2 is still a qcow2 image"
    );

    // What seedctl wrote before is replaced as ever.
    for cmd in [
        &["seed", "web1", "-o", ".seedctl/web1/seed.iso"][..],
        &["seed", "web1", "-o", "web1.iso"],
        &["seed", "web1", "-o", "web1.iso"],
        &["xml", "web1", "-o", "web1.xml"],
        &["xml", "web1", "-o", "web1.xml"],
    ] {
        s.ok(cmd);
    }
}

/// A file with no magic to know it by (a raw disk, a machine's state file, an identity
/// file) is not replaced either: `-o` replaces only an empty file or its own kind of
/// output, so a seed does not go over a domain XML, nor the other way round.
#[test]
fn output_replaces_only_its_own_kind() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let mut raw = vec![0u8; 1 << 20];
    raw[510] = 0x55;
    raw[511] = 0xAA;
    std::fs::write(s.path().join("base.raw"), &raw).unwrap();
    s.ok(&["xml", "web1", "-o", "web1.xml"]);
    s.ok(&["seed", "web1", "-o", "web1.iso"]);
    std::fs::create_dir_all(s.state("web1")).unwrap();
    std::fs::write(s.state("web1").join("state.json"), b"{}\n").unwrap();
    for (cmd, out, what) in [
        (
            &["seed", "web1", "-o", "base.raw"][..],
            "base.raw",
            "a seed volume",
        ),
        (
            &["xml", "web1", "-o", "base.raw"],
            "base.raw",
            "a libvirt domain XML",
        ),
        (
            &["seed", "web1", "-o", "web1.xml"],
            "web1.xml",
            "a seed volume",
        ),
        (
            &["xml", "web1", "-o", "web1.iso"],
            "web1.iso",
            "a libvirt domain XML",
        ),
        (
            &["seed", "web1", "-o", ".seedctl/web1/state.json"],
            ".seedctl/web1/state.json",
            "a seed volume",
        ),
        (
            &["xml", "web1", "-o", "machines/web1/hostname"],
            "machines/web1/hostname",
            "a libvirt domain XML",
        ),
    ] {
        let before = std::fs::read(s.path().join(out)).unwrap();
        let err = s.fails(cmd);
        assert!(
            err.contains(out) && err.contains(&format!("is not {what}")),
            "{cmd:?}: {err}"
        );
        assert_eq!(
            std::fs::read(s.path().join(out)).unwrap(),
            before,
            "{cmd:?}"
        );
    }
    // An empty file is taken.
    std::fs::write(s.path().join("empty.iso"), b"").unwrap();
    s.ok(&["seed", "web1", "-o", "empty.iso"]);
}

/// While libvirt runs a domain it owns the domain's disks (`dynamic_ownership`: the seed
/// becomes `libvirt-qemu`'s, mode 0600), so an operator in the libvirt group cannot read
/// the machine's seed. `seedctl seed NAME` (and a push, which rewrites it) still
/// replaces it: the machine's own seed is replaced unread, in its directory.
#[test]
fn a_machine_seed_the_operator_cannot_read_is_still_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    s.ok(&["seed", "web1"]);
    let iso = s.state("web1").join("seed.iso");
    assert!(iso.is_file());
    let chown = |args: &[&str], path: &std::path::Path| {
        let st = Command::new("chown").args(args).arg(path).status().unwrap();
        assert!(st.success());
    };
    chown(&["-R", "65534:65534"], s.path());
    chown(&["0:0"], &iso);
    std::fs::set_permissions(&iso, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_seedctl"))
        .args(["seed", "web1"])
        .current_dir(s.path())
        .env("SEEDCTL_SIGNING_KEY", "")
        .env("HOME", s.path())
        .output()
        .unwrap();
    common::assert_success(&out);
    use std::os::unix::fs::MetadataExt;
    assert_eq!(std::fs::metadata(&iso).unwrap().uid(), 65534, "replaced");
}
