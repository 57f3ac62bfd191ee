//! `seedctl agent`: guest-agent commands against a running machine.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::{Value, json};

use crate::libvirt;
use crate::machine::Paths;
use crate::output::Report;
use crate::qga::{QgaClient, reply};
use crate::state::{QGA_SOCK, StateDir};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShutdownMode {
    Powerdown,
    Reboot,
    Halt,
}

#[derive(Debug, Subcommand)]
pub enum AgentCommand {
    /// guest-ping
    Ping,
    /// guest-info: agent version and supported commands
    Info,
    /// guest-get-osinfo
    Osinfo,
    /// guest-get-host-name
    Hostname,
    /// guest-network-get-interfaces
    Ifaddr,
    /// guest-get-fsinfo
    Fsinfo,
    /// guest-fsfreeze-freeze
    Freeze,
    /// guest-fsfreeze-thaw
    Thaw,
    /// guest-shutdown
    Shutdown {
        #[arg(long, value_enum, default_value_t = ShutdownMode::Powerdown)]
        mode: ShutdownMode,
    },
    /// guest-get-time (nanoseconds since the epoch)
    Time,
    /// Any command, as JSON: '{"execute":"guest-get-users"}'
    Cmd {
        #[arg(value_name = "JSON")]
        request: String,
    },
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl agent web1 ping
  seedctl agent web1 ifaddr --json
  seedctl agent web1 cmd '{\"execute\":\"guest-get-users\"}'
  seedctl agent web1 shutdown --mode reboot
  seedctl agent web1 --connect qemu:///system osinfo     # through libvirt
  seedctl agent x --socket /tmp/qga.sock ping")]
pub struct AgentArgs {
    /// Machine name
    pub name: String,
    #[command(subcommand)]
    pub command: AgentCommand,
    /// Talk to this socket instead of STATE/NAME/qga.sock
    #[arg(long, global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Go through libvirt (virsh qemu-agent-command) at this URI
    #[arg(
        long,
        short = 'c',
        global = true,
        value_name = "URI",
        conflicts_with = "socket"
    )]
    pub connect: Option<String>,
    /// Seconds to wait for each exchange (the sync, then the command), however the agent talks meanwhile
    #[arg(long, global = true, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    pub timeout: u64,
}

fn request(c: &AgentCommand) -> Result<(String, Option<Value>)> {
    Ok(match c {
        AgentCommand::Ping => ("guest-ping".into(), None),
        AgentCommand::Info => ("guest-info".into(), None),
        AgentCommand::Osinfo => ("guest-get-osinfo".into(), None),
        AgentCommand::Hostname => ("guest-get-host-name".into(), None),
        AgentCommand::Ifaddr => ("guest-network-get-interfaces".into(), None),
        AgentCommand::Fsinfo => ("guest-get-fsinfo".into(), None),
        AgentCommand::Freeze => ("guest-fsfreeze-freeze".into(), None),
        AgentCommand::Thaw => ("guest-fsfreeze-thaw".into(), None),
        AgentCommand::Time => ("guest-get-time".into(), None),
        AgentCommand::Shutdown { mode } => {
            let m = match mode {
                ShutdownMode::Powerdown => "powerdown",
                ShutdownMode::Reboot => "reboot",
                ShutdownMode::Halt => "halt",
            };
            ("guest-shutdown".into(), Some(json!({ "mode": m })))
        }
        AgentCommand::Cmd { request: json } => {
            let v: Value =
                serde_json::from_str(json).with_context(|| format!("`{json}` is not JSON"))?;
            let exec = v
                .get("execute")
                .and_then(Value::as_str)
                .with_context(|| format!("`{json}` has no \"execute\" member"))?;
            (exec.to_owned(), v.get("arguments").cloned())
        }
    })
}

/// Commands the agent answers only when they fail: on success the guest goes down, as
/// with qemu-ga, whether asked by name (`shutdown`) or through `cmd`.
fn answers_only_on_failure(command: &str) -> bool {
    matches!(
        command,
        "guest-shutdown" | "guest-suspend-disk" | "guest-suspend-ram" | "guest-suspend-hybrid"
    )
}

fn human(c: &AgentCommand, v: &Value) -> String {
    match (c, v) {
        (AgentCommand::Ping, _) => "pong".into(),
        (AgentCommand::Hostname, v) => v["host-name"].as_str().unwrap_or_default().to_owned(),
        (AgentCommand::Time, v) => v.to_string(),
        (AgentCommand::Info, v) => {
            format!("agent version {}", v["version"].as_str().unwrap_or("?"))
        }
        (AgentCommand::Shutdown { .. }, _) => "shutdown requested".into(),
        (_, v) => serde_json::to_string_pretty(v).unwrap_or_default(),
    }
}

pub fn run(paths: &Paths, a: &AgentArgs) -> Result<Report> {
    crate::names::check_machine_name(&a.name)?;
    let (cmd, args) = request(&a.command)?;
    let ctx = || format!("machine `{}`", a.name);
    let value = if let Some(uri) = &a.connect {
        let mut req = json!({ "execute": cmd });
        if let Some(ar) = &args {
            req["arguments"] = ar.clone();
        }
        let out = libvirt::virsh(
            uri,
            &a.name,
            &[
                "qemu-agent-command",
                &a.name,
                &req.to_string(),
                "--timeout",
                &a.timeout.to_string(),
            ],
        )?;
        if answers_only_on_failure(&cmd) && out.trim().is_empty() {
            Value::Null
        } else {
            let v: Value = serde_json::from_str(out.trim())
                .with_context(|| format!("parsing virsh output `{}`", out.trim()))?;
            reply(&cmd, v).with_context(ctx)?
        }
    } else {
        let sock = a
            .socket
            .clone()
            .unwrap_or_else(|| StateDir::new(paths, &a.name).file(QGA_SOCK));
        let mut c = QgaClient::connect(&sock, Duration::from_secs(a.timeout)).with_context(ctx)?;
        c.sync().with_context(ctx)?;
        if answers_only_on_failure(&cmd) {
            c.execute_no_reply(&cmd, args).with_context(ctx)?;
            Value::Null
        } else {
            c.execute(&cmd, args).with_context(ctx)?
        }
    };
    Ok(Report::new(
        human(&a.command, &value),
        json!({ "machine": a.name, "command": cmd, "return": value }),
    ))
}
