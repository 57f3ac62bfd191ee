//! Signed seeds: `seedctl keygen` + `seed` produce a manifest that OpenSSH's own verifier
//! (`ssh-keygen -Y verify`) accepts, read back from the ISO with xorriso; the generation
//! counter moves only when the identity does.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{Scratch, require_tool, stdout_of};

fn extract(s: &Scratch, iso: &str, dir: &str) -> std::path::PathBuf {
    let ex = s.path().join(dir);
    stdout_of(
        Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(s.path().join(iso))
            .args(["-extract", "/"])
            .arg(&ex),
    );
    ex
}

#[test]
fn signed_seed_verifies_with_ssh_keygen_and_counts_generations() {
    require_tool("xorriso");
    require_tool("ssh-keygen");
    let s = Scratch::new();
    let key = s.path().join("keys/signing_key");
    let out = s.ok(&["keygen", "-o", key.to_str().unwrap()]);
    assert!(out.contains("ssh-ed25519 "), "{out}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert!(
        s.fails(&["keygen", "-o", key.to_str().unwrap()])
            .contains("--force")
    );

    s.ok(&["new", "web1"]);
    // A key named but missing is an error, not an unsigned seed that guests trusting
    // the key would refuse.
    let missing = s
        .cmd(&["seed", "web1", "-o", "unsigned.iso"])
        .env("SEEDCTL_SIGNING_KEY", s.path().join("keys/none"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&missing.stderr);
    assert!(
        !missing.status.success() && err.contains("keys/none"),
        "{err}"
    );
    assert!(!s.path().join("unsigned.iso").exists());
    let seed = |iso: &str| {
        let o = s
            .cmd(&["seed", "web1", "-o", iso])
            .env("SEEDCTL_SIGNING_KEY", &key)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    };
    seed("a.iso");
    seed("b.iso");
    assert_eq!(
        std::fs::read(s.path().join("a.iso")).unwrap(),
        std::fs::read(s.path().join("b.iso")).unwrap(),
        "same identity, same signed bytes"
    );
    let ex = extract(&s, "a.iso", "a");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ex.join("nixseed-manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["machine"], "web1");
    assert_eq!(manifest["generation"], 1);
    let uuid = std::fs::read_to_string(s.machine("web1").join("product_uuid")).unwrap();
    assert_eq!(manifest["product_uuid"], uuid.trim());

    // OpenSSH verifies it: allowed signers "web1 <pubkey>", namespace nixseed-seed.
    let pubkey = std::fs::read_to_string(format!("{}.pub", key.display())).unwrap();
    let signers = s.path().join("allowed_signers");
    std::fs::write(&signers, format!("nixseed {pubkey}")).unwrap();
    let verify = Command::new("ssh-keygen")
        .args(["-Y", "verify", "-n", "nixseed-seed", "-I", "nixseed", "-f"])
        .arg(&signers)
        .arg("-s")
        .arg(ex.join("nixseed-manifest.sig"))
        .stdin(std::fs::File::open(ex.join("nixseed-manifest.json")).unwrap())
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // A changed identity raises the generation.
    std::fs::write(s.machine("web1").join("hostname"), "web2\n").unwrap();
    seed("c.iso");
    let ex = extract(&s, "c.iso", "c");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(ex.join("nixseed-manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["generation"], 2);

    // Signing turned off (SEEDCTL_SIGNING_KEY empty): seeds are unsigned.
    let o = s
        .cmd(&["seed", "web1", "-o", "d.iso"])
        .env("SEEDCTL_SIGNING_KEY", "")
        .output()
        .unwrap();
    assert!(o.status.success());
    let ex = extract(&s, "d.iso", "d");
    assert!(!ex.join("nixseed-manifest.json").exists());
}
