//! The Nix package builds from a filtered copy of the tree; Cargo refuses a workspace with
//! a member missing, so every member in Cargo.toml must be in nix/package.nix's fileset.

use std::path::Path;

fn read(rel: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()))
}

/// The quoted names in the workspace's `members = [...]` list.
fn workspace_members(cargo_toml: &str) -> Vec<String> {
    let start = cargo_toml
        .find("members = [")
        .expect("Cargo.toml has no `members = [` line");
    let list = &cargo_toml[start + "members = [".len()..];
    let end = list.find(']').expect("the members list is not closed");
    list[..end]
        .split(',')
        .map(|m| m.trim().trim_matches('"').to_string())
        .filter(|m| !m.is_empty())
        .collect()
}

#[test]
fn every_workspace_member_is_in_the_nix_package_source() {
    let members = workspace_members(&read("Cargo.toml"));
    assert!(
        members.len() >= 5,
        "read too few members from Cargo.toml: {members:?}"
    );
    let package = read("nix/package.nix");
    let fileset = &package[package
        .find("fileset = lib.fileset.unions [")
        .expect("nix/package.nix has no fileset union")..];
    let fileset = &fileset[..fileset.find("];").expect("the fileset union is not closed")];
    let missing: Vec<&String> = members
        .iter()
        .filter(|m| !fileset.lines().any(|l| l.trim() == format!("../{m}")))
        .collect();
    assert!(
        missing.is_empty(),
        "nix/package.nix's source leaves out workspace members {missing:?}: Cargo cannot read the workspace in the Nix build"
    );
}
