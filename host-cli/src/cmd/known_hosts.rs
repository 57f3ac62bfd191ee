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
    let mut broken = Vec::new();
    for name in paths.machine_names()? {
        // A broken machine is left out and named on stderr; the others' lines still print.
        let id = match Identity::load(paths, &name) {
            Ok(id) => id,
            Err(e) => {
                eprintln!("seedctl known-hosts: left out: {e:#}");
                broken.push(name);
                continue;
            }
        };
        let mut hosts = vec![id.hostname.clone()];
        if let Some(f) = id.fqdn().filter(|f| *f != id.hostname) {
            hosts.push(f);
        }
        if id.short_hostname() != id.hostname {
            hosts.push(id.short_hostname().to_owned());
        }
        lines.push(id.known_hosts_line(&hosts.join(",")));
        match StateDir::new(paths, &name).load() {
            Ok(st) => {
                if let Some(port) = st.ssh_port {
                    lines.push(id.known_hosts_line(&crate::cmd::run::local_ssh_host(port)));
                }
            }
            Err(e) => eprintln!("seedctl known-hosts: {name}'s forwarded port left out: {e:#}"),
        }
    }
    Ok(Report::new(
        lines.join("\n"),
        json!({ "lines": lines, "left_out": broken }),
    ))
}
