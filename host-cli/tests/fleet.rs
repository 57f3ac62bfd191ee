//! `seedctl known-hosts` and `list` across several machines.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::Scratch;

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
        let out = Command::new("ssh-keygen")
            .args(["-F", host, "-f"])
            .arg(&kh)
            .output()
            .unwrap();
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
