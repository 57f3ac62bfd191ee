//! `seedctl render`: the identity tree a guest writes for this machine's seed, computed by
//! the same nixseed-core code the agent runs (seed parsing, then identity composition).

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
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
    /// Directory to write the tree into (created)
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

pub fn run(paths: &Paths, a: &RenderArgs) -> Result<Report> {
    let id = Identity::load(paths, &a.name)?;
    let seed = expected_seed(&id)?;
    let tree = expected_tree(&id, &seed, &a.links)?;
    std::fs::create_dir_all(&a.out).with_context(|| format!("creating {}", a.out.display()))?;
    for (name, file) in &tree {
        let path = a.out.join(name);
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        write_atomic(&path, &file.bytes, file.mode)?;
    }
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
