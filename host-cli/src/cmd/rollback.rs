//! `seedctl rollback`: make the guest's previous identity generation current again, over
//! the control channel; the agent re-binds /etc and reloads what differs.

use anyhow::Result;
use clap::Args;
use nixseed_core::channel::Message;

use crate::channel;
use crate::cmd::push::{ChannelArgs, applied_report};
use crate::machine::Paths;
use crate::output::Report;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl rollback web1
  seedctl rollback web1 --connect qemu:///system
Each rollback steps back to the next older generation the guest keeps; `seedctl push`
moves forward again. machines/NAME is not touched: `seedctl status` then reports the
difference, and the next boot applies machines/NAME's seed again; to keep the rollback,
make machines/NAME say the same and push.")]
pub struct RollbackArgs {
    #[command(flatten)]
    pub channel: ChannelArgs,
}

pub fn run(paths: &Paths, a: &RollbackArgs) -> Result<Report> {
    let mut chan = a.channel.open(paths)?;
    let outcome = channel::apply(&mut chan, &Message::Rollback, a.channel.timeout(), None)?;
    let mut report = applied_report("rolled back", &a.channel.name, &chan.socket, None, &outcome);
    // The seed disk still carries machines/NAME, and the seed wins at boot.
    if paths
        .state_dir(&a.channel.name)
        .join(crate::state::SEED_ISO)
        .exists()
    {
        report.human.push_str(&format!(
            "\n  until the next boot: the seed disk still carries machines/{0}, which the next boot applies again; to keep this generation, make machines/{0} say the same (`seedctl status {0}` shows the difference) and push",
            a.channel.name
        ));
    }
    Ok(report)
}
