//! `seedctl list`: every machine with its hostname, base image, last seed, whether it
//! runs (under `seedctl run`, or in libvirt with --connect), and for a running machine the
//! identity generation its guest reports over the control channel.

use anyhow::Result;
use clap::Args;
use serde_json::json;

use crate::libvirt;
use crate::machine::{Identity, Paths};
use crate::output::Report;
use crate::state::StateDir;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl list
  seedctl list --connect qemu:///system --json")]
pub struct ListArgs {
    /// Also ask libvirt at this URI for each domain's state
    #[arg(long, short = 'c', value_name = "URI")]
    pub connect: Option<String>,
}

pub fn run(paths: &Paths, a: &ListArgs) -> Result<Report> {
    let mut rows = Vec::new();
    let mut text = format!(
        "{:<16} {:<28} {:<10} {:<15} {:<4} {}",
        "NAME", "HOSTNAME", "STATE", "SSH", "GEN", "BASE"
    );
    for name in paths.machine_names()? {
        // One broken machine is listed as such; the others are still listed.
        let loaded = Identity::load(paths, &name).and_then(|id| {
            let st = StateDir::new(paths, &name).load()?;
            Ok((id, st))
        });
        let (id, st) = match loaded {
            Ok(v) => v,
            Err(e) => {
                let reason = format!("{e:#}");
                text.push_str(&format!("\n{name:<16} broken: {reason}"));
                rows.push(json!({ "name": name, "state": "broken", "error": reason }));
                continue;
            }
        };
        let sd = StateDir::new(paths, &name);
        let mut state = match sd.running_pid() {
            Some(_) => "running".to_owned(),
            // The disk itself, not the state file's word for it.
            None if sd.file(crate::state::BOOT_DISK).exists() => "stopped".to_owned(),
            None => "no disks".to_owned(),
        };
        if let Some(uri) = &a.connect {
            state = libvirt::domstate(uri, &name)?.unwrap_or_else(|| "undefined".to_owned());
        }
        let base = st
            .base
            .as_ref()
            .map(|b| b.display().to_string())
            .unwrap_or_else(|| "-".into());
        let ssh = st
            .ssh_port
            .map(|p| format!("127.0.0.1:{p}"))
            .unwrap_or_else(|| "-".into());
        let generation = if state == "running" {
            guest_generation(paths, &name, a.connect.as_deref())
        } else {
            None
        };
        let gen_text = generation
            .map(|g| g.to_string())
            .unwrap_or_else(|| "-".into());
        text.push_str(&format!(
            "\n{name:<16} {:<28} {state:<10} {ssh:<15} {gen_text:<4} {base}",
            id.hostname
        ));
        rows.push(json!({
            "name": name,
            "hostname": id.hostname,
            "state": state,
            "base": st.base,
            "ssh_port": st.ssh_port,
            "instance_id": st.instance_id,
            "product_uuid": id.product_uuid,
            "mac": id.mac(),
            "generation": generation,
        }));
    }
    Ok(Report::new(text, json!({ "machines": rows })))
}

/// The guest's current generation, asked briefly over the control channel; `None` when
/// nothing answers (booting, no agent, or another client holds the socket).
fn guest_generation(paths: &Paths, name: &str, connect: Option<&str>) -> Option<u64> {
    let sock = crate::channel::socket_path(paths, name, None, connect).ok()?;
    let mut chan = crate::channel::Channel::connect(name, &sock).ok()?;
    crate::channel::status(&mut chan, std::time::Duration::from_secs(1))
        .ok()?
        .generation
}
