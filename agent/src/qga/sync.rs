//! Liveness and channel synchronisation: guest-sync(-delimited), guest-ping, guest-info.

use nixseed_core::qga::Args;
use nixseed_core::qga::commands::COMMANDS;
use serde_json::{Value, json};

use super::{Agent, CmdResult};

pub fn sync(_: &mut Agent, mut args: Args) -> CmdResult {
    let id = args.i64("id")?;
    args.finish()?;
    Ok(Some(Value::from(id)))
}

pub fn sync_delimited(agent: &mut Agent, mut args: Args) -> CmdResult {
    let id = args.i64("id")?;
    args.finish()?;
    agent.session.delimit_next_reply();
    Ok(Some(Value::from(id)))
}

pub fn ping(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    Ok(Some(json!({})))
}

pub fn info(agent: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    let cmds: Vec<Value> = COMMANDS
        .iter()
        .map(|c| {
            json!({
                "name": c.name,
                "enabled": agent.enabled(c),
                "success-response": c.success_response,
            })
        })
        .collect();
    Ok(Some(json!({
        "version": env!("CARGO_PKG_VERSION"),
        "supported_commands": cmds,
    })))
}
