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

/// The virsh command that asks libvirt to have the guest agent do `command` (one that
/// answers only when it fails): `shutdown`/`reboot --mode agent`, `dompmsuspend`.
fn libvirt_power_verb(command: &str, args: Option<&Value>) -> Result<&'static [&'static str]> {
    let arg = |k: &str| args.and_then(|a| a.get(k)).and_then(Value::as_str);
    Ok(match (command, arg("mode")) {
        ("guest-shutdown", None | Some("powerdown")) => &["shutdown", "--mode", "agent"],
        ("guest-shutdown", Some("reboot")) => &["reboot", "--mode", "agent"],
        ("guest-shutdown", Some(m)) => anyhow::bail!(
            "guest-shutdown mode '{m}' has no libvirt verb (libvirt's agent shutdown powers down or reboots), and libvirt holds the agent's socket of its domains; use --mode powerdown or --mode reboot"
        ),
        ("guest-suspend-disk", _) => &["dompmsuspend", "--target", "disk"],
        ("guest-suspend-ram", _) => &["dompmsuspend", "--target", "mem"],
        _ => &["dompmsuspend", "--target", "hybrid"],
    })
}

fn human(c: &AgentCommand, v: &Value) -> String {
    match (c, v) {
        (AgentCommand::Ping, _) => "pong".into(),
        (AgentCommand::Hostname, v) => v["host-name"].as_str().unwrap_or_default().to_owned(),
        (AgentCommand::Time, v) => v.to_string(),
        (AgentCommand::Info, v) => {
            let commands = v["supported_commands"].as_array().map(|list| {
                list.iter()
                    .filter_map(|c| {
                        let name = c["name"].as_str()?;
                        Some(if c["enabled"] == Value::Bool(false) {
                            format!("  {name} (disabled)")
                        } else {
                            format!("  {name}")
                        })
                    })
                    .collect::<Vec<_>>()
                    .join("\n")
            });
            format!(
                "agent version {}\ncommands:\n{}",
                v["version"].as_str().unwrap_or("?"),
                commands.unwrap_or_default()
            )
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
        if answers_only_on_failure(&cmd) {
            // `qemu-agent-command` waits for a reply these never send, and fails once the
            // agent goes away with the guest; libvirt's own verbs expect exactly that.
            let verb = libvirt_power_verb(&cmd, args.as_ref()).with_context(ctx)?;
            let mut argv: Vec<&str> = verb.to_vec();
            argv.push(&a.name);
            libvirt::virsh(uri, &a.name, &argv)?;
            Value::Null
        } else {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_without_a_reply_go_through_libvirts_own_verbs() {
        let verb =
            |c: &str, a: Option<Value>| libvirt_power_verb(c, a.as_ref()).map(|v| v.join(" "));
        assert_eq!(
            verb("guest-shutdown", None).unwrap(),
            "shutdown --mode agent"
        );
        assert_eq!(
            verb("guest-shutdown", Some(json!({"mode": "reboot"}))).unwrap(),
            "reboot --mode agent"
        );
        assert_eq!(
            verb("guest-suspend-ram", None).unwrap(),
            "dompmsuspend --target mem"
        );
        let err = verb("guest-shutdown", Some(json!({"mode": "halt"})))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("halt") && err.contains("--mode powerdown"),
            "{err}"
        );
        for c in [
            "guest-shutdown",
            "guest-suspend-disk",
            "guest-suspend-ram",
            "guest-suspend-hybrid",
        ] {
            assert!(answers_only_on_failure(c), "{c}");
        }
    }
}
