//! `seedctl render`: the identity tree a guest writes for this machine's seed, computed by
//! the same nixseed-core code the agent runs (seed parsing, then identity composition).

use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use clap::Args;
use nixseed_core::identity::{ComposeContext, IdentityTree, compose};
use nixseed_core::seed::Seed;
use serde_json::json;

use crate::fsutil::write_atomic;
use crate::machine::{Identity, Paths};
use crate::nocloud;
use crate::output::Report;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl render web1 --out /tmp/web1-identity
  diff -r /tmp/web1-identity <(ssh web1 cat /var/identity/...)")]
pub struct RenderArgs {
    /// Machine name
    pub name: String,
    /// Directory to write the tree into (created)
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// The seed a guest reads for this machine and the identity tree it composes from it,
/// by nixseed-core's own code. `seedctl status` compares a guest against this tree.
pub fn expected_tree(id: &Identity) -> Result<(Seed, IdentityTree)> {
    let files = nocloud::seed_files(id).to_core();
    let source = format!("seedctl:{}", id.dir.display());
    let seed = Seed::from_nocloud(&files, &source, None).map_err(|e| {
        anyhow!(
            "machine `{}`: the guest would reject this seed: {e}",
            id.name
        )
    })?;
    let tree = compose(
        &seed,
        None,
        &ComposeContext::default(),
        &mut nixseed_core::fresh::OsFresh,
    )
    .map_err(|e| anyhow!("machine `{}`: composing the identity: {e}", id.name))?;
    Ok((seed, tree))
}

pub fn run(paths: &Paths, a: &RenderArgs) -> Result<Report> {
    let id = Identity::load(paths, &a.name)?;
    let (seed, tree) = expected_tree(&id)?;
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
