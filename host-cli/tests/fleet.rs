//! `seedctl known-hosts` and `list` across several machines.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::Scratch;

/// `ssh-keygen -F HOST` on a known_hosts file: how ssh itself finds a host's line.
fn lookup(known_hosts: &std::path::Path, host: &str) -> std::process::Output {
    Command::new("ssh-keygen")
        .args(["-F", host, "-f"])
        .arg(known_hosts)
        .output()
        .unwrap()
}

#[test]
fn known_hosts_lines_are_found_by_ssh_keygen() {
    let s = Scratch::new();
    s.ok(&["new", "web1", "--hostname", "web1.example.org"]);
    s.ok(&["new", "db1"]);
    let kh = s.path().join("kh");
    std::fs::write(&kh, s.ok(&["known-hosts"])).unwrap();
    for (host, machine) in [
        ("web1.example.org", "web1"),
        ("web1", "web1"),
        ("db1", "db1"),
    ] {
        let out = lookup(&kh, host);
        assert!(out.status.success(), "{host} not in known_hosts");
        let key =
            std::fs::read_to_string(s.machine(machine).join("ssh_host_ed25519_key.pub")).unwrap();
        let b64 = key.split_whitespace().nth(1).unwrap();
        assert!(
            String::from_utf8_lossy(&out.stdout).contains(b64),
            "{host} pinned to the wrong key"
        );
    }
}

#[test]
fn list_shows_every_machine() {
    let s = Scratch::new();
    s.ok(&["new", "a"]);
    s.ok(&["new", "b", "--hostname", "b.example.org"]);
    let v: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "list"])).unwrap();
    let m = v["machines"].as_array().unwrap();
    assert_eq!(m.len(), 2);
    assert_eq!(m[1]["hostname"], "b.example.org");
    assert_eq!(m[0]["state"], "no disks");
}

/// One broken machine is listed as broken, and known-hosts still prints the others.
#[test]
fn a_broken_machine_does_not_hide_the_others() {
    let s = Scratch::new();
    s.ok(&["new", "a"]);
    s.ok(&["new", "b"]);
    std::fs::remove_file(s.machine("a").join("hostname")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "list"])).unwrap();
    let m = v["machines"].as_array().unwrap();
    assert_eq!(m.len(), 2);
    assert_eq!(m[0]["state"], "broken");
    assert!(
        m[0]["error"]
            .as_str()
            .unwrap()
            .contains("machines/a/hostname")
    );
    assert_eq!(m[1]["state"], "no disks");
    let kh = s.ok(&["known-hosts"]);
    let key = std::fs::read_to_string(s.machine("b").join("ssh_host_ed25519_key.pub")).unwrap();
    assert!(kh.contains(key.split_whitespace().nth(1).unwrap()), "{kh}");
}

/// A directory in machines/ that holds any identity file is a machine: one without a
/// machine-id and one whose name is not a valid machine name are listed as broken and
/// named by known-hosts, not skipped without a word; a directory of shared files is not
/// a machine.
#[test]
fn no_machine_directory_is_skipped_silently() {
    let s = Scratch::new();
    s.ok(&["new", "a"]);
    s.ok(&["new", "b"]);
    std::fs::remove_file(s.machine("b").join("machine-id")).unwrap();
    std::fs::create_dir(s.machine("c_1")).unwrap();
    std::fs::write(s.machine("c_1").join("hostname"), "c1\n").unwrap();
    // A directory of shared files that identity files link to is no machine.
    std::fs::create_dir(s.machine("shared")).unwrap();
    std::fs::write(
        s.machine("shared").join("dc1.resolv.conf"),
        "nameserver 192.0.2.1\n",
    )
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&s.ok(&["--json", "list"])).unwrap();
    let m = v["machines"].as_array().unwrap();
    let states: Vec<(&str, &str)> = m
        .iter()
        .map(|r| (r["name"].as_str().unwrap(), r["state"].as_str().unwrap()))
        .collect();
    assert_eq!(
        states,
        [("a", "no disks"), ("b", "broken"), ("c_1", "broken")]
    );
    assert!(
        m[1]["error"]
            .as_str()
            .unwrap()
            .contains("machines/b/machine-id: missing"),
        "{}",
        m[1]
    );
    let out = s.run(&["known-hosts"]);
    assert!(out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("machines/b/machine-id") && err.contains("c_1"),
        "{err}"
    );
}

/// A machine forwarded on port 22 is pinned as plain `127.0.0.1`, the name ssh looks up
/// for that port; any other port as `[127.0.0.1]:PORT`.
#[test]
fn a_forward_on_port_22_is_pinned_as_ssh_looks_it_up() {
    let s = Scratch::new();
    for (name, port) in [("a", 22), ("b", 2222)] {
        s.ok(&["new", name]);
        std::fs::create_dir_all(s.state(name)).unwrap();
        std::fs::write(
            s.state(name).join("state.json"),
            format!("{{\"ssh_port\": {port}}}"),
        )
        .unwrap();
    }
    let kh = s.path().join("kh");
    std::fs::write(&kh, s.ok(&["known-hosts"])).unwrap();
    for host in ["127.0.0.1", "[127.0.0.1]:2222"] {
        assert!(
            lookup(&kh, host).status.success(),
            "{host} not in known_hosts"
        );
    }
}

/// Under --json, a usage error is a JSON object on stdout too.
#[test]
fn json_usage_errors_are_json() {
    let s = Scratch::new();
    let out = s.run(&["--json", "seed"]);
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["error"].as_str().unwrap().contains("<NAME>"), "{v}");
}
