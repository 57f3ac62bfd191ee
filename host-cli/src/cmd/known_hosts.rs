//! `seedctl known-hosts`: pinned known_hosts lines for every machine, so `ssh` never has
//! to trust a first connection.

use anyhow::Result;
use clap::Args;
use serde_json::json;

use crate::machine::{Identity, Paths};
use crate::output::Report;
use crate::state::StateDir;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl known-hosts >> ~/.ssh/known_hosts
  ssh -o UserKnownHostsFile=<(seedctl known-hosts) root@web1.example.org")]
pub struct KnownHostsArgs {}

pub fn run(paths: &Paths, _a: &KnownHostsArgs) -> Result<Report> {
    let mut lines = Vec::new();
    for name in paths.machine_names()? {
        let id = Identity::load(paths, &name)?;
        let mut hosts = vec![id.hostname.clone()];
        if let Some(f) = id.fqdn().filter(|f| *f != id.hostname) {
            hosts.push(f);
        }
        if id.short_hostname() != id.hostname {
            hosts.push(id.short_hostname().to_owned());
        }
        lines.push(id.known_hosts_line(&hosts.join(",")));
        if let Some(port) = StateDir::new(paths, &name).load()?.ssh_port {
            lines.push(id.known_hosts_line(&format!("[127.0.0.1]:{port}")));
        }
    }
    Ok(Report::new(lines.join("\n"), json!({ "lines": lines })))
}
