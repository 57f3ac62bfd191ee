//! `seedctl render` runs the guest's own seed parser and identity composition on the
//! machine's seed: the tree must carry the identity seedctl generated.
#![allow(clippy::unwrap_used)]

mod common;

use common::Scratch;

#[test]
fn rendered_tree_carries_the_machine_identity() {
    let s = Scratch::new();
    let key = s.client_key();
    s.ok(&[
        "new",
        "web1",
        "--admin-key",
        &format!("@{}", key.display()),
        "--tcp-port",
        "22",
        "--tcp-port",
        "443",
        "--udp-port",
        "53",
    ]);
    s.ok(&["render", "web1", "--out", "tree"]);
    let t = s.path().join("tree");
    let m = s.machine("web1");
    for f in [
        "machine-id",
        "ssh_host_ed25519_key",
        "tcp_ports",
        "udp_ports",
        "admin_authorized_keys",
    ] {
        assert_eq!(
            std::fs::read_to_string(t.join(f)).unwrap(),
            std::fs::read_to_string(m.join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(t.join("hostname")).unwrap().trim(),
        "web1"
    );
    assert!(std::fs::read_dir(t.join("network")).unwrap().count() >= 1);
}

/// The default network-config must give the guest a working DHCP config whatever its NIC
/// is called: the agent's own renderer, told the guest has `ens3` with the machine's MAC
/// (the MAC `seedctl xml` gives the domain), writes `Name=ens3` and `MACAddress=`.
#[test]
fn default_network_config_matches_the_vm_nic_by_mac() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let xml = s.ok(&["xml", "web1", "--kernel", "/dev/null"]);
    let mac = xml
        .split("<mac address='")
        .nth(1)
        .and_then(|r| r.split('\'').next())
        .unwrap()
        .to_owned();
    s.ok(&["seed", "web1", "--format", "vfat", "-o", "seed.img"]);
    let seed = s.path().join("seed");
    std::fs::create_dir(&seed).unwrap();
    for f in ["meta-data", "user-data", "network-config"] {
        let out = std::process::Command::new("mcopy")
            .args(["-n", "-i"])
            .arg(s.path().join("seed.img"))
            .arg(format!("::{f}"))
            .arg(seed.join(f))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
    }
    let agent = common::agent_binary();
    let out = std::process::Command::new(agent)
        .args(["render", "--seed"])
        .arg(&seed)
        .arg("--out")
        .arg(s.path().join("tree"))
        .args(["--link", &format!("ens3={mac}")])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let network =
        std::fs::read_to_string(s.path().join("tree/network/10-cloud-init-ens3.network")).unwrap();
    assert!(network.contains("Name=ens3\n"), "{network}");
    assert!(
        network.contains(&format!("MACAddress={mac}\n")),
        "{network}"
    );
    assert!(network.contains("DHCP=ipv4\n"), "{network}");
}
