//! `seedctl render` runs the guest's own seed parser and identity composition on the
//! machine's seed: the tree must carry the identity seedctl generated.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeMap;

use common::Scratch;

#[test]
fn rendered_tree_carries_the_machine_identity() {
    let s = Scratch::new();
    s.new_with_admin_key(
        "web1",
        &["--tcp-port", "22", "--tcp-port", "443", "--udp-port", "53"],
    );
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

/// The machine's own hosts line is made from its hostname when the seed is written, so an
/// edit of machines/NAME/hostname is all a rename takes; a `127.0.1.1` line left in
/// machines/NAME/hosts from an earlier name stays, with a warning naming it.
#[test]
fn the_own_hosts_line_follows_a_hostname_edit() {
    let s = Scratch::new();
    s.ok(&[
        "new",
        "web1",
        "--hostname",
        "e1.example.org",
        "--hosts-line",
        "192.0.2.5 db1",
    ]);
    let m = s.machine("web1");
    assert_eq!(
        std::fs::read_to_string(m.join("hosts")).unwrap(),
        "192.0.2.5 db1\n"
    );
    std::fs::write(m.join("hostname"), "e2.example.org\n").unwrap();
    s.ok(&["render", "web1", "--out", "tree"]);
    assert_eq!(
        std::fs::read_to_string(s.path().join("tree/hosts")).unwrap(),
        "127.0.1.1 e2.example.org e2\n192.0.2.5 db1\n"
    );
    let seed = s.run(&["seed", "web1"]);
    assert!(seed.status.success());
    assert_eq!(String::from_utf8_lossy(&seed.stderr), "");
    // What an earlier `seedctl new` wrote for the old name.
    std::fs::write(
        m.join("hosts"),
        "127.0.1.1 e1.example.org e1\n192.0.2.5 db1\n",
    )
    .unwrap();
    let seed = s.run(&["seed", "web1"]);
    assert!(seed.status.success());
    let warning = String::from_utf8_lossy(&seed.stderr);
    assert!(
        warning.contains(
            "machines/web1/hosts: `127.0.1.1 e1.example.org e1` names an earlier hostname"
        ),
        "{warning}"
    );
    // The same short name in another domain is an earlier FQDN too.
    std::fs::write(m.join("hostname"), "e1.new.example\n").unwrap();
    let seed = s.run(&["seed", "web1"]);
    let warning = String::from_utf8_lossy(&seed.stderr);
    assert!(
        warning.contains("`127.0.1.1 e1.example.org e1` names an earlier hostname"),
        "{warning}"
    );
}

/// The default network-config must give the guest a working DHCP config whatever its NIC
/// is called: the agent's own renderer, told the guest has `ens3` with the machine's MAC
/// (the MAC `seedctl xml` gives the domain), writes `Name=ens3` and `MACAddress=`.
#[test]
fn default_network_config_matches_the_vm_nic_by_mac() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let mac = s.domain_mac("web1");
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

    // `seedctl render` told of the same NIC writes the agent's generation, file for file
    // and mode for mode, less the generation's manifest.
    s.ok(&[
        "render",
        "web1",
        "--out",
        "rendered",
        "--link",
        &format!("ens3={}", mac.to_ascii_uppercase()),
    ]);
    let mut guest = files_under(&s.path().join("tree/gen-1"));
    assert!(guest.remove("manifest.json").is_some());
    let host = files_under(&s.path().join("rendered"));
    assert_eq!(
        host.keys().collect::<Vec<_>>(),
        guest.keys().collect::<Vec<_>>()
    );
    for (name, file) in &guest {
        assert!(host[name] == *file, "{name} differs");
    }
}

#[test]
fn render_without_links_names_the_network_file_after_the_entry() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    s.ok(&["render", "web1", "--out", "tree"]);
    let files = files_under(&s.path().join("tree"));
    let network: Vec<&String> = files.keys().filter(|k| k.starts_with("network/")).collect();
    assert_eq!(network, ["network/10-cloud-init-eth0.network"]);
}

#[test]
fn a_malformed_link_is_refused_with_its_value() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    for (link, says) in [
        ("ens3", "expected NAME=MAC"),
        ("ens3=52:54:00:zz:00:01", "is not a MAC address"),
        ("=52:54:00:12:34:56", "is not an interface name"),
        ("a/b=52:54:00:12:34:56", "is not an interface name"),
    ] {
        let err = s.fails(&["render", "web1", "--out", "tree", "--link", link]);
        assert!(err.contains(says) && err.contains(link), "{link}: {err}");
    }
    assert!(!s.path().join("tree").exists());
}

/// The tree is written whole into a new or empty directory: a second render into the
/// same one is refused (its files would mix with the first's), and nothing is left
/// beside it.
#[test]
fn a_tree_never_mixes_with_an_earlier_one() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    std::fs::create_dir(s.path().join("empty")).unwrap();
    s.ok(&["render", "web1", "--out", "empty"]);
    assert!(s.path().join("empty/machine-id").is_file());
    let before = files_under(&s.path().join("empty"));
    let err = s.fails(&[
        "render",
        "web1",
        "--out",
        "empty",
        "--link",
        "enp0s1=52:54:00:12:34:56",
    ]);
    assert!(
        err.contains("is not empty") && err.contains("empty"),
        "{err}"
    );
    assert_eq!(files_under(&s.path().join("empty")), before);
    let left: Vec<_> = std::fs::read_dir(s.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".seedctl-render"))
        .collect();
    assert!(left.is_empty(), "{left:?}");
}

/// Every file under `dir`, by its path relative to `dir`, with its mode and contents.
fn files_under(dir: &std::path::Path) -> BTreeMap<String, (u32, Vec<u8>)> {
    use std::os::unix::fs::PermissionsExt;
    let mut out = BTreeMap::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let meta = std::fs::symlink_metadata(&p).unwrap();
            if meta.is_dir() {
                todo.push(p);
            } else {
                let rel = p.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                let mode = meta.permissions().mode() & 0o7777;
                out.insert(rel, (mode, std::fs::read(&p).unwrap()));
            }
        }
    }
    out
}

/// Files edited on another system: a `resolv.conf` with CRLF line ends and a BOM, and a
/// host key with CRLF and blank lines around it, reach the guest as glibc and sshd read
/// them (plain LF text, the PEM block alone).
#[test]
fn crlf_and_blank_lines_in_edited_files_do_not_reach_the_guest() {
    let s = Scratch::new();
    s.ok(&[
        "new",
        "web1",
        "--nameserver",
        "192.0.2.53",
        "--search",
        "example.org",
    ]);
    let m = s.machine("web1");
    s.ok(&["render", "web1", "--out", "before"]);
    let key = std::fs::read_to_string(m.join("ssh_host_ed25519_key")).unwrap();
    let resolv = std::fs::read_to_string(m.join("resolv.conf")).unwrap();
    std::fs::write(
        m.join("ssh_host_ed25519_key"),
        format!("\r\n{}\r\n\r\n", key.replace('\n', "\r\n")),
    )
    .unwrap();
    std::fs::write(
        m.join("resolv.conf"),
        format!("\u{feff}{}", resolv.replace('\n', "\r\n")),
    )
    .unwrap();
    s.ok(&["render", "web1", "--out", "after"]);
    for f in ["ssh_host_ed25519_key", "resolv.conf"] {
        let after = std::fs::read(s.path().join("after").join(f)).unwrap();
        assert_eq!(
            after,
            std::fs::read(s.path().join("before").join(f)).unwrap(),
            "{f}: {}",
            String::from_utf8_lossy(&after)
        );
    }
    assert_eq!(
        std::fs::read_to_string(s.path().join("after/resolv.conf")).unwrap(),
        "nameserver 192.0.2.53\nsearch example.org\n"
    );
}

/// What the guest would silently not use is refused by name: a known_hosts line pasted
/// as an admin key (sshd ignores a line whose words before the key are no options), and
/// a hosts line without an address.
#[test]
fn a_known_hosts_line_as_a_key_and_a_bad_hosts_line_are_refused() {
    let s = Scratch::new();
    s.new_with_admin_key("web1", &[]);
    let m = s.machine("web1");
    let key = std::fs::read_to_string(m.join("admin_authorized_keys")).unwrap();
    let key = key.trim();
    std::fs::write(
        m.join("admin_authorized_keys"),
        format!("web1.example.org {key}\n"),
    )
    .unwrap();
    let err = s.fails(&["render", "web1", "--out", "t1"]);
    assert!(
        err.contains("admin_authorized_keys")
            && err.contains("`web1.example.org` before the key type"),
        "{err}"
    );
    std::fs::write(
        m.join("admin_authorized_keys"),
        format!(
            "from=\"10.0.0.0/8\",no-pty,command=\"echo a b\" {key}\ntouch-required,command=\"echo \\\"a b\\\"\" {key}\n"
        ),
    )
    .unwrap();
    s.ok(&["render", "web1", "--out", "t2"]);
    // What glibc takes as names is taken: underscores, a trailing dot, a comment glued on.
    std::fs::write(m.join("hosts"), "192.0.2.5 db_1 db.example.org.#primary\n").unwrap();
    s.ok(&["render", "web1", "--out", "t4"]);
    std::fs::write(m.join("hosts"), "192.0.2.5 db1 # primary\ndb2 192.0.2.6\n").unwrap();
    let err = s.fails(&["render", "web1", "--out", "t3"]);
    assert!(
        err.contains("hosts")
            && err.contains("`db2 192.0.2.6`")
            && err.contains("not an IP address"),
        "{err}"
    );
    // A nameserver glibc cannot use (a name, not an address) is refused by name too; a
    // link-local one with its zone is taken.
    std::fs::write(m.join("hosts"), "192.0.2.5 db1\n").unwrap();
    std::fs::write(m.join("resolv.conf"), "nameserver fe80::1%eth0\n").unwrap();
    s.ok(&["render", "web1", "--out", "t5"]);
    std::fs::write(
        m.join("resolv.conf"),
        "search example.org\nnameserver dns1.example.org\n",
    )
    .unwrap();
    let err = s.fails(&["render", "web1", "--out", "t6"]);
    assert!(
        err.contains("resolv.conf")
            && err.contains("`nameserver dns1.example.org`")
            && err.contains("not an IP address"),
        "{err}"
    );
}
