//! `seedctl render`: the identity tree a guest writes for this machine's seed, computed by
//! the same nixseed-core code the agent runs (seed parsing, then identity composition).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use clap::Args;
use nixseed_core::identity::{ComposeContext, IdentityTree, compose};
use nixseed_core::network::Link;
use nixseed_core::seed::Seed;
use serde_json::json;

use crate::fsutil::write_atomic;
use crate::machine::{Identity, Paths};
use crate::nocloud;
use crate::output::Report;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl render web1 --out /tmp/web1-identity
  seedctl render web1 --out /tmp/web1-identity --link enp0s1=52:54:00:12:34:56
  diff /tmp/web1-identity/hostname <(seedctl ssh web1 -- cat /etc/hostname)
Without --link, a network-config entry that matches by MAC finds no NIC and its file is
named after the entry (network/10-cloud-init-eth0.network); with the guest's NICs given,
the network files are the ones the guest writes.")]
pub struct RenderArgs {
    /// Machine name
    pub name: String,
    /// Directory to write the tree into (created; it must not exist yet or be empty)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// A NIC the guest has, as NAME=MAC, so network-config entries that match by MAC are
    /// named as the guest names them (repeatable)
    #[arg(long = "link", value_name = "NAME=MAC")]
    pub links: Vec<Link>,
}

/// The seed a guest reads for this machine, parsed by nixseed-core's own code.
pub fn expected_seed(id: &Identity) -> Result<Seed> {
    let files = nocloud::seed_files(id).to_core();
    let source = format!("seedctl:{}", id.dir.display());
    Seed::from_nocloud(&files, &source, None).map_err(|e| {
        anyhow!(
            "machine `{}`: the guest would reject this seed: {e}",
            id.name
        )
    })
}

/// The identity tree a guest with these NICs composes from the machine's seed, by
/// nixseed-core's own code. `seedctl status` compares a guest against this tree.
pub fn expected_tree(id: &Identity, seed: &Seed, links: &[Link]) -> Result<IdentityTree> {
    let ctx = ComposeContext {
        links: links.to_vec(),
        regenerate: false,
    };
    compose(seed, None, &ctx, &mut nixseed_core::fresh::OsFresh)
        .map_err(|e| anyhow!("machine `{}`: composing the identity: {e}", id.name))
}

/// Writes `tree` as the directory `out`, whole or not at all: the files go into a
/// directory beside it, which then takes the place of `out`. `out` must not exist yet or
/// be empty, so a tree from an earlier render never mixes with this one.
fn write_tree(out: &Path, tree: &IdentityTree) -> Result<()> {
    match std::fs::read_dir(out) {
        Ok(mut entries) => {
            if entries.next().is_some() {
                bail!(
                    "{} is not empty; render writes a whole identity tree into a new or empty directory (remove it first, or give another)",
                    out.display()
                );
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(e).with_context(|| format!("reading {}", out.display())),
    }
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".seedctl-render-")
        .tempdir_in(parent)
        .with_context(|| format!("creating a directory in {}", parent.display()))?;
    for (name, file) in tree {
        let path = staging.path().join(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write_atomic(&path, &file.bytes, file.mode)
            .with_context(|| format!("writing {name} of the tree for {}", out.display()))?;
    }
    std::fs::set_permissions(staging.path(), std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("setting the mode of {}", out.display()))?;
    // rename(2) puts a directory in place of a missing or empty one.
    std::fs::rename(staging.path(), out)
        .with_context(|| format!("renaming into {}", out.display()))?;
    let _ = staging.keep();
    Ok(())
}

pub fn run(paths: &Paths, a: &RenderArgs) -> Result<Report> {
    let id = Identity::load(paths, &a.name)?;
    let seed = expected_seed(&id)?;
    let tree = expected_tree(&id, &seed, &a.links)?;
    write_tree(&a.out, &tree)?;
    let names: Vec<&String> = tree.keys().collect();
    let mut human = format!(
        "wrote {} files to {} (instance-id {})",
        tree.len(),
        a.out.display(),
        seed.instance_id
    );
    for w in &seed.warnings {
        human.push_str(&format!("\nwarning: {w}"));
    }
    Ok(Report::new(
        human,
        json!({ "machine": a.name, "out": a.out, "files": names, "instance_id": seed.instance_id, "warnings": seed.warnings }),
    ))
}
