//! `seedctl keygen`: the ed25519 key that signs seeds and pushes.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use serde_json::json;

use crate::output::Report;
use crate::signing;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl keygen                         # $XDG_CONFIG_HOME or ~/.config: nixseed/signing_key
  seedctl keygen -o /srv/keys/fleet_signing_key
Put the printed public key in the guests' trusted keys (NixOS:
services.nixseed.trustedKeys; agent: --trusted-keys FILE). From then on `seedctl seed`
and `seedctl push` sign with the key (SEEDCTL_SIGNING_KEY names another path).")]
pub struct KeygenArgs {
    /// Where to write the key [default: SEEDCTL_SIGNING_KEY, else $XDG_CONFIG_HOME/nixseed/signing_key, else ~/.config/nixseed/signing_key]
    #[arg(short, long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Replace an existing key
    #[arg(long)]
    pub force: bool,
}

pub fn run(a: &KeygenArgs) -> Result<Report> {
    let out = a
        .output
        .clone()
        .or_else(signing::key_path)
        .context("no place for the signing key (SEEDCTL_SIGNING_KEY is empty, or there is no HOME or XDG_CONFIG_HOME); pass -o FILE")?;
    let public = signing::keygen(&out, a.force)?;
    Ok(Report::new(
        format!(
            "wrote the signing key {} (0600) and {}.pub\ntrusted key for the guests:\n{public}",
            out.display(),
            out.display()
        ),
        json!({ "key": out, "public_key": public }),
    ))
}
