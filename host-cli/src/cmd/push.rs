//! `seedctl push`: send a machine's identity to its running guest over the control
//! channel. The bundle holds exactly the seed files `seedctl seed` writes, and the agent
//! applies it through the same code path as a seed ISO, then reloads what changed.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Args;
use nixseed_core::channel::Message;
use serde_json::json;

use crate::channel::{self, Channel, Outcome};
use crate::machine::{Identity, Paths};
use crate::nocloud;
use crate::output::Report;

/// How to reach a machine's control channel; shared by push, status and rollback.
#[derive(Debug, Clone, Args)]
pub struct ChannelArgs {
    /// Machine name
    pub name: String,
    /// The channel's unix socket [default: STATE/NAME/channel.sock, or the libvirt domain's with --connect]
    #[arg(long, value_name = "PATH", conflicts_with = "connect")]
    pub socket: Option<PathBuf>,
    /// libvirt URI: find the socket in the running domain's XML
    #[arg(long, short = 'c', value_name = "URI")]
    pub connect: Option<String>,
    /// Seconds to wait for the guest's answer (a push's answer waits for sshd's restart)
    #[arg(long, default_value_t = 30.0, value_name = "S", value_parser = seconds)]
    pub timeout: f64,
}

/// A positive, finite number of seconds, at most a day.
fn seconds(s: &str) -> Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() && v > 0.0 && v <= 86_400.0 => Ok(v),
        _ => Err(format!(
            "'{s}' is not a number of seconds above 0 and at most 86400 (fractions allowed)"
        )),
    }
}

impl ChannelArgs {
    pub fn open(&self, paths: &Paths) -> Result<Channel> {
        let socket = channel::socket_path(
            paths,
            &self.name,
            self.socket.as_deref(),
            self.connect.as_deref(),
        )?;
        Channel::connect(&self.name, &socket)
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs_f64(self.timeout.max(0.001))
    }
}

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl push web1                               # a `seedctl run` machine
  seedctl push web1 --connect qemu:///system      # a libvirt domain
  seedctl push web1 --json
Edit machines/NAME/ (hostname, keys, ports, ...) and push: the guest writes a new
generation, re-binds /etc and reloads what the change touches; a new machine-id needs a
reboot and is reported as such. `seedctl rollback NAME` undoes it.")]
pub struct PushArgs {
    #[command(flatten)]
    pub channel: ChannelArgs,
}

/// Exit status when the guest applied the identity but a service did not take it (sshd
/// did not come back up with its new host key), or the machine's seed disk could not be
/// rewritten with it: the change is in place, and not working or not lasting.
pub const EXIT_NOT_TAKEN: u8 = 4;

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".to_owned()
    } else {
        items.join(", ")
    }
}

/// Human and JSON lines for an `applied` answer (push and rollback).
pub fn applied_report(
    verb: &str,
    machine: &str,
    socket: &std::path::Path,
    instance_id: Option<&str>,
    outcome: &Outcome,
) -> Report {
    match outcome {
        Outcome::Applied(Message::Applied {
            decision,
            generation,
            changed,
            reboot_required,
            reloaded,
            failed,
        }) => {
            let gen_text = generation.map_or_else(|| "none".to_owned(), |g| g.to_string());
            let mut human = format!(
                "{verb} `{machine}` over {}: {decision}; generation {gen_text}",
                socket.display()
            );
            if let Some(iid) = instance_id {
                human.push_str(&format!(" (instance-id {iid})"));
            }
            if changed.is_empty() {
                human.push_str("\n  nothing changed: the guest already had this identity");
                // What an earlier push left unbound or not reloaded is retried.
                if !reloaded.is_empty() {
                    human.push_str(&format!(
                        "\n  reloaded       {} (had not taken the identity yet)",
                        list(reloaded)
                    ));
                }
                for f in failed {
                    human.push_str(&format!("\n  FAILED         {f}"));
                }
                if !reboot_required.is_empty() {
                    human.push_str(&format!(
                        "\n  needs reboot   {} (takes effect at the next boot)",
                        list(reboot_required)
                    ));
                }
            } else {
                human.push_str(&format!("\n  changed        {}", list(changed)));
                human.push_str(&format!("\n  reloaded       {}", list(reloaded)));
                for f in failed {
                    human.push_str(&format!("\n  FAILED         {f}"));
                }
                human.push_str(&format!(
                    "\n  needs reboot   {}",
                    if reboot_required.is_empty() {
                        "nothing".to_owned()
                    } else {
                        format!("{} (takes effect at the next boot)", list(reboot_required))
                    }
                ));
            }
            Report::new(
                human,
                json!({
                    "machine": machine,
                    "socket": socket,
                    "action": verb,
                    "instance_id": instance_id,
                    "decision": decision,
                    "generation": generation,
                    "changed": changed,
                    "reloaded": reloaded,
                    "failed": failed,
                    "reboot_required": reboot_required,
                }),
            )
            .with_exit(if failed.is_empty() { 0 } else { EXIT_NOT_TAKEN })
        }
        Outcome::AtBoot {
            instance_id: guest_iid,
        } => Report::new(
            format!(
                "{verb} `{machine}` over {}: the guest was booting and waiting for an identity (it had {}); it applies this one as its boot seed",
                socket.display(),
                guest_iid.as_deref().unwrap_or("none")
            ),
            json!({
                "machine": machine,
                "socket": socket,
                "action": verb,
                "instance_id": instance_id,
                "at_boot": true,
                "guest_instance_id": guest_iid,
            }),
        ),
        Outcome::Applied(other) => Report::new(
            format!("{verb} `{machine}`: unexpected answer {other:?}"),
            json!({ "machine": machine, "answer": other.kind() }),
        ),
    }
}

/// After a push, the machine's seed disk in the state directory (if it has one) is
/// rewritten too, and given to the QEMU that runs the machine now (its `seedctl run`
/// QEMU, or the libvirt domain's with `--connect`): otherwise the next boot, a reboot
/// inside that QEMU included, would apply the older seed over the pushed identity, since
/// the seed disk wins at boot.
fn refresh_seed(paths: &Paths, id: &Identity, connect: Option<&str>) -> Result<()> {
    let iso = paths.state_dir(&id.name).join(crate::state::SEED_ISO);
    if iso.exists() {
        crate::cmd::seed::write(id, crate::cmd::seed::SeedFormat::Iso, &iso)?;
        let given = crate::cmd::run::insert_seed_into_running(paths, &id.name, &iso, connect);
        // The guest has the identity by now: a QEMU that cannot take the new file is
        // said, not made the push's failure.
        if let Err(e) = given {
            eprintln!(
                "seedctl: warning: {e:#}; a reboot inside this QEMU does not get the new seed, so stop and start the machine"
            );
        }
    }
    Ok(())
}

pub fn run(paths: &Paths, a: &PushArgs) -> Result<Report> {
    let id = Identity::load(paths, &a.channel.name)?;
    id.warn_stale_host_lines();
    let mut chan = a.channel.open(paths)?;
    let request = Message::Push {
        bundle: channel::bundle(&id)?,
    };
    let outcome = channel::apply(&mut chan, &request, a.channel.timeout(), Some(&id));
    // Whatever the answer (none in time included: the guest may still apply it), the
    // seed disk carries machines/NAME from now on, as the machine's next start would
    // write it: a reboot inside the running QEMU must not bring an older identity back.
    let refreshed = refresh_seed(paths, &id, a.channel.connect.as_deref());
    let stale_seed = |e: &anyhow::Error| {
        eprintln!(
            "seedctl: error: {e:#}; the seed disk still carries the older identity, and the machine's next boot applies it"
        );
    };
    let outcome = match (outcome, refreshed) {
        (Err(e), Err(seed)) => {
            stale_seed(&seed);
            return Err(e);
        }
        (outcome, refreshed) => (outcome?, refreshed.err()),
    };
    let iid = nocloud::instance_id(&id);
    let report = applied_report("pushed", &id.name, &chan.socket, Some(&iid), &outcome.0);
    // What the guest did is reported whole; a seed disk left behind is not success.
    Ok(match outcome.1 {
        None => report,
        Some(seed) => {
            stale_seed(&seed);
            report.with_exit(EXIT_NOT_TAKEN)
        }
    })
}
