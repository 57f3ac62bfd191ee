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
difference.")]
pub struct RollbackArgs {
    #[command(flatten)]
    pub channel: ChannelArgs,
}

pub fn run(paths: &Paths, a: &RollbackArgs) -> Result<Report> {
    let mut chan = a.channel.open(paths)?;
    let outcome = channel::apply(&mut chan, &Message::Rollback, a.channel.timeout(), None)?;
    Ok(applied_report(
        "rolled back",
        &a.channel.name,
        &chan.socket,
        None,
        &outcome,
    ))
}
