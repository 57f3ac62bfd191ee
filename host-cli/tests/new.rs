//! `seedctl new`: identities that real tools accept, and refusals that leave nothing behind.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use common::{Scratch, stdout_of};

#[test]
fn new_writes_a_complete_identity_real_tools_accept() {
    let s = Scratch::new();
    let key = s.client_key();
    let admin = format!("@{}", key.display());
    s.ok(&[
        "new",
        "web1",
        "--admin-key",
        &admin,
        "--tcp-port",
        "22",
        "--tcp-port",
        "8000-8080",
        "--udp-port",
        "53",
    ]);
    let m = s.machine("web1");
    for f in [
        "machine-id",
        "hostname",
        "ssh_host_ed25519_key",
        "ssh_host_ed25519_key.pub",
        "resolv.conf",
        "hosts",
        "tcp_ports",
        "udp_ports",
        "admin_authorized_keys",
        "user_authorized_keys",
        "product_uuid",
        "meta.nix",
        "default.nix",
    ] {
        assert!(m.join(f).is_file(), "{f} missing");
    }
    let id = std::fs::read_to_string(m.join("machine-id")).unwrap();
    assert_eq!(id.len(), 33);
    assert!(id.ends_with('\n'));
    assert!(
        id.trim()
            .bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
    );
    assert_eq!(
        std::fs::read_to_string(m.join("tcp_ports")).unwrap(),
        "22\n8000-8080\n"
    );
    assert_eq!(
        std::fs::read_to_string(m.join("hostname")).unwrap(),
        "web1\n"
    );
    let mode = std::fs::metadata(m.join("ssh_host_ed25519_key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    // The real ssh-keygen reads both halves, and they have the same fingerprint.
    let fp_priv = stdout_of(
        Command::new("ssh-keygen")
            .arg("-l")
            .arg("-f")
            .arg(m.join("ssh_host_ed25519_key")),
    );
    let fp_pub = stdout_of(
        Command::new("ssh-keygen")
            .arg("-l")
            .arg("-f")
            .arg(m.join("ssh_host_ed25519_key.pub")),
    );
    assert!(fp_priv.contains("ED25519"), "{fp_priv}");
    assert_eq!(
        fp_priv.split_whitespace().nth(1),
        fp_pub.split_whitespace().nth(1)
    );

    let admin_keys = std::fs::read_to_string(m.join("admin_authorized_keys")).unwrap();
    assert_eq!(
        admin_keys.trim(),
        std::fs::read_to_string(&key).unwrap().trim()
    );

    let uuid = std::fs::read_to_string(m.join("product_uuid")).unwrap();
    assert_eq!(uuid.trim().len(), 36);
    assert_eq!(&uuid[14..15], "4");
    let nix = std::fs::read_to_string(m.join("default.nix")).unwrap();
    assert!(
        nix.contains("services.nixseed.enable = true;")
            && nix.contains("networking.hostName = \"web1\";")
    );
}

#[test]
fn two_machines_get_different_identities() {
    let s = Scratch::new();
    s.ok(&["new", "a"]);
    s.ok(&["new", "b"]);
    for f in ["machine-id", "product_uuid", "ssh_host_ed25519_key.pub"] {
        let a = std::fs::read(s.machine("a").join(f)).unwrap();
        let b = std::fs::read(s.machine("b").join(f)).unwrap();
        assert_ne!(a, b, "{f}");
    }
}

#[test]
fn existing_identity_is_kept_without_force() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let before = std::fs::read(s.machine("web1").join("machine-id")).unwrap();
    let err = s.fails(&["new", "web1"]);
    assert!(err.contains("web1") && err.contains("--force"), "{err}");
    assert_eq!(
        std::fs::read(s.machine("web1").join("machine-id")).unwrap(),
        before
    );
    let uuid = std::fs::read(s.machine("web1").join("product_uuid")).unwrap();
    // What the identity does not write stays: the signed-seed counter the guest checks
    // (a seed numbered below the applied one is refused) and the operator's network-config.
    let network = "version: 2\nethernets:\n  eth0:\n    dhcp4: false\n";
    std::fs::write(s.machine("web1").join("seed_generation"), "3 abc\n").unwrap();
    std::fs::write(s.machine("web1").join("network-config"), network).unwrap();
    // And the NixOS stub, once the operator has made it theirs.
    let module =
        "{ ... }:\n{\n  services.nixseed.enable = true;\n  services.nginx.enable = true;\n}\n";
    std::fs::write(s.machine("web1").join("default.nix"), module).unwrap();
    let out = s.ok(&["new", "web1", "--force"]);
    assert_eq!(
        std::fs::read_to_string(s.machine("web1").join("default.nix")).unwrap(),
        module
    );
    assert!(
        out.contains("kept") && out.contains("seed_generation"),
        "{out}"
    );
    assert_eq!(
        std::fs::read_to_string(s.machine("web1").join("seed_generation")).unwrap(),
        "3 abc\n"
    );
    assert_eq!(
        std::fs::read_to_string(s.machine("web1").join("network-config")).unwrap(),
        network
    );
    assert_ne!(
        std::fs::read(s.machine("web1").join("machine-id")).unwrap(),
        before
    );
    // The VM's own UUID (and the MAC derived from it) stays, so its domain still matches.
    assert_eq!(
        std::fs::read(s.machine("web1").join("product_uuid")).unwrap(),
        uuid
    );
    // No staging or backup directory is left beside it.
    let left: Vec<_> = std::fs::read_dir(s.path().join("machines"))
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(left, vec![std::ffi::OsString::from("web1")]);
}

#[test]
fn bad_names_are_refused_and_leave_nothing() {
    let s = Scratch::new();
    // All digits or a UUID: virsh would take them for a domain ID or UUID. The others
    // are entries of the state directory itself.
    for bad in [
        "a/b",
        "a b",
        "..",
        "-x",
        "",
        "x_y",
        "1",
        "0123",
        "0b9f6f1e-3c0a-4c47-9a4e-2f1d5b7c8e90",
        // An IPv4 literal: `known-hosts` would pin the key for that address.
        "1.2.3.4",
        "default-base",
        "bases",
        "accel",
    ] {
        let err = s.fails(&["new", "--", bad]);
        assert!(err.contains("machine name"), "{bad}: {err}");
    }
    assert!(
        !s.path().join("machines").exists()
            || std::fs::read_dir(s.path().join("machines"))
                .unwrap()
                .next()
                .is_none()
    );
}

#[test]
fn bad_inputs_are_refused_before_anything_is_written() {
    let s = Scratch::new();
    let err = s.fails(&["new", "web1", "--admin-key", "ssh-ed25519 notbase64 x"]);
    assert!(err.contains("admin key"), "{err}");
    let err = s.fails(&[
        "new",
        "web1",
        "--machine-id",
        "00000000000000000000000000000000",
    ]);
    assert!(err.contains("machine-id"), "{err}");
    let err = s.fails(&["new", "web1", "--tcp-port", "80-22"]);
    assert!(err.contains("80-22"), "{err}");
    let err = s.fails(&["new", "web1", "--admin-key", "@/nonexistent/key.pub"]);
    assert!(err.contains("/nonexistent/key.pub"), "{err}");
    let err = s.fails(&["new", "web1", "--hostname", "10.0.0.1"]);
    assert!(err.contains("all-digit label"), "{err}");
    assert!(!s.machine("web1").exists());
}

/// An empty `SEEDCTL_MACHINES` or `SEEDCTL_STATE` (`VAR=` in a script) is unset: the
/// defaults are used, not the current directory.
#[test]
fn empty_path_variables_are_unset() {
    let s = Scratch::new();
    let out = s
        .cmd(&["new", "web1"])
        .env("SEEDCTL_MACHINES", "")
        .env("SEEDCTL_STATE", "")
        .output()
        .unwrap();
    common::assert_success(&out);
    assert!(s.machine("web1").join("hostname").is_file());
    assert!(!s.path().join("web1").exists());
    // A machines directory that is not there is said, not passed over in silence.
    let out = s.run(&["--machines", "nowhere", "list"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no machines directory at nowhere"), "{err}");
}

#[test]
fn json_output_carries_the_identity() {
    let s = Scratch::new();
    let out = s.ok(&[
        "--json",
        "new",
        "db1",
        "--hostname",
        "db1.example.org",
        "--machine-id",
        "0123456789abcdef0123456789abcdef",
    ]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["machine_id"], "0123456789abcdef0123456789abcdef");
    assert_eq!(v["hostname"], "db1.example.org");
}

/// A leftover from an interrupted `new --force` does not block the next one, and a failed
/// `new --force` leaves no staging directory behind.
#[test]
fn new_force_is_not_blocked_by_a_leftover_backup() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let old_id = std::fs::read_to_string(s.machine("web1").join("machine-id")).unwrap();
    let leftover = s.path().join("machines/.web1.old");
    std::fs::create_dir_all(&leftover).unwrap();
    std::fs::write(leftover.join("x"), "stale").unwrap();
    s.ok(&["new", "web1", "--force"]);
    let new_id = std::fs::read_to_string(s.machine("web1").join("machine-id")).unwrap();
    assert_ne!(old_id, new_id);
    let names: Vec<String> = std::fs::read_dir(s.path().join("machines"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.iter().all(|n| n == "web1" || n == ".web1.old"),
        "left behind: {names:?}"
    );
}

/// A reader that closed its end (`seedctl new web1 | head -0`) does not make seedctl
/// panic: the identity is made and the exit status is the command's own.
#[test]
fn a_closed_stdout_is_not_a_crash() {
    use std::os::fd::OwnedFd;
    let s = Scratch::new();
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = s
        .cmd(&["new", "web1"])
        .stdout(OwnedFd::from(writer))
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert!(s.machine("web1").join("machine-id").exists());
}

/// A key value that holds a bad line besides a good one is refused before anything is
/// written, and under --force the old identity is still whole afterwards.
#[test]
fn a_bad_key_line_changes_nothing_even_with_force() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let good = std::fs::read_to_string(s.machine("web1").join("ssh_host_ed25519_key.pub"))
        .unwrap()
        .trim()
        .to_owned();
    let bad = format!("{good}\ngarbage");
    let err = s.fails(&["new", "db1", "--admin-key", &bad]);
    assert!(err.contains("garbage"), "{err}");
    assert!(!s.machine("db1").exists());

    let before: Vec<_> = ["machine-id", "ssh_host_ed25519_key", "hostname"]
        .iter()
        .map(|f| std::fs::read(s.machine("web1").join(f)).unwrap())
        .collect();
    let err = s.fails(&["new", "web1", "--force", "--admin-key", &bad]);
    assert!(err.contains("garbage"), "{err}");
    let after: Vec<_> = ["machine-id", "ssh_host_ed25519_key", "hostname"]
        .iter()
        .map(|f| std::fs::read(s.machine("web1").join(f)).unwrap())
        .collect();
    assert_eq!(before, after);
    // Two good keys in one value are both taken.
    let two = format!("{good}\n{good} second");
    s.ok(&["new", "db1", "--admin-key", &two]);
    let keys = std::fs::read_to_string(s.machine("db1").join("admin_authorized_keys")).unwrap();
    assert_eq!(keys.lines().count(), 2, "{keys}");
}

/// --force keeps the VM's product UUID; one it cannot use is an error naming the file,
/// not a silent new UUID (and MAC).
#[test]
fn force_refuses_a_product_uuid_it_would_have_to_replace() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let id = std::fs::read(s.machine("web1").join("machine-id")).unwrap();
    std::fs::write(
        s.machine("web1").join("product_uuid"),
        "0B9F6F1E-3C0A-4C47-9A4E-2F1D5B7C8E90\n",
    )
    .unwrap();
    let err = s.fails(&["new", "web1", "--force"]);
    assert!(err.contains("machines/web1/product_uuid"), "{err}");
    assert_eq!(
        std::fs::read(s.machine("web1").join("machine-id")).unwrap(),
        id
    );
    // Without the file, --force makes a new one.
    std::fs::remove_file(s.machine("web1").join("product_uuid")).unwrap();
    s.ok(&["new", "web1", "--force"]);
    assert!(s.machine("web1").join("product_uuid").is_file());
}

/// A network-config shared through a symlink (docs/seedctl.md) stays the same link.
#[test]
fn force_keeps_a_symlinked_network_config() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    std::fs::write(
        s.path().join("machines/dc1.network-config"),
        "version: 2\nethernets:\n  eth0:\n    dhcp4: true\n",
    )
    .unwrap();
    std::os::unix::fs::symlink(
        "../dc1.network-config",
        s.machine("web1").join("network-config"),
    )
    .unwrap();
    s.ok(&["seed", "web1"]);
    s.ok(&["new", "web1", "--force"]);
    assert_eq!(
        std::fs::read_link(s.machine("web1").join("network-config")).unwrap(),
        std::path::PathBuf::from("../dc1.network-config")
    );
    s.ok(&["seed", "web1"]);
}

/// --hosts-line lines are the hosts file (the machine's own line is made from the hostname
/// when the seed is written); --search is checked like --nameserver.
#[test]
fn hosts_lines_are_kept_and_search_is_checked() {
    let s = Scratch::new();
    s.ok(&[
        "new",
        "web1",
        "--hostname",
        "web1.example.org",
        "--hosts-line",
        "192.0.2.5 db1.example.org db1",
        "--search",
        "example.org corp.example",
    ]);
    let hosts = std::fs::read_to_string(s.machine("web1").join("hosts")).unwrap();
    assert_eq!(hosts, "192.0.2.5 db1.example.org db1\n");
    // No nameserver given: none written, and the guest keeps the image's resolver.
    let resolv = std::fs::read_to_string(s.machine("web1").join("resolv.conf")).unwrap();
    assert_eq!(resolv, "search example.org corp.example\n");
    let err = s.fails(&["new", "db1", "--search", "example.org\nnameserver 6.6.6.6"]);
    assert!(err.contains("--search"), "{err}");
    let err = s.fails(&["new", "db1", "--hosts-line", "db1"]);
    assert!(err.contains("--hosts-line"), "{err}");
    assert!(!s.machine("db1").exists());
}

/// A name too long for its staging directory is refused as a name, up front.
#[test]
fn an_overlong_name_is_refused_as_a_name() {
    let s = Scratch::new();
    let name = format!(
        "{}.{}.{}.{}",
        "a".repeat(60),
        "b".repeat(60),
        "c".repeat(60),
        "d".repeat(60)
    );
    let err = s.fails(&["new", &name]);
    assert!(err.contains("the most is 200"), "{err}");
}

/// Eight `seedctl new` of one name at once: one makes the machine, the others say it
/// already exists, and the identity on disk is the one the winner reported.
#[test]
fn concurrent_news_of_one_name_leave_one_machine() {
    let s = Scratch::new();
    let children: Vec<_> = (0..8)
        .map(|_| {
            s.cmd(&["--json", "new", "race"])
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outs: Vec<_> = children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect();
    let won: Vec<_> = outs.iter().filter(|o| o.status.success()).collect();
    assert_eq!(won.len(), 1, "{} succeeded", won.len());
    for o in outs.iter().filter(|o| !o.status.success()) {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("already exists"), "{err}");
    }
    let report: serde_json::Value = serde_json::from_slice(&won[0].stdout).unwrap();
    let on_disk = std::fs::read_to_string(s.machine("race").join("machine-id")).unwrap();
    assert_eq!(report["machine_id"].as_str().unwrap(), on_disk.trim());
    let left: Vec<_> = std::fs::read_dir(s.path().join("machines"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["race"], "staging left behind");
}

/// A machine made with no key at all cannot be logged into (the seed turns password
/// login off): `new` says so; with a key it says nothing of the kind.
#[test]
fn a_machine_without_keys_is_warned_about() {
    let s = Scratch::new();
    let out = s.run(&["new", "web1"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("no admin or user key") && err.contains("admin_authorized_keys"),
        "{err}"
    );
    let key = format!("@{}", s.client_key().display());
    let out = s.run(&["new", "web2", "--user-key", &key]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stderr).contains("no admin or user key"));
}
