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
