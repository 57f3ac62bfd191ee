//! guest-shutdown and guest-suspend-*: asked of systemd-logind over the D-Bus system
//! bus, so the guest's own shutdown ordering (and inhibitors) apply. Nothing is sent
//! back on success, as in qemu-ga; every failure is an error reply.

use nixseed_core::qga::{Args, QgaError};

use super::registry::BoxFuture;
use super::{Agent, CmdResult};

async fn logind(method: &str) -> Result<(), QgaError> {
    use crate::dbus::{Arg, DbusError, call};
    call(
        "org.freedesktop.login1",
        "/org/freedesktop/login1",
        "org.freedesktop.login1.Manager",
        method,
        &[Arg::Bool(false)],
    )
    .await
    .map_err(|e| match e {
        DbusError::Connect { .. } => {
            QgaError::generic(format!("{e}: cannot ask systemd-logind for {method}"))
        }
        e => QgaError::generic(format!("systemd-logind refused {method}: {e}")),
    })
}

pub fn shutdown(_: &mut Agent, mut args: Args) -> BoxFuture<'_> {
    Box::pin(async move {
        let mode = args.opt_str("mode")?;
        args.finish()?;
        let method = match mode.as_deref().unwrap_or("powerdown") {
            "powerdown" => "PowerOff",
            "halt" => "Halt",
            "reboot" => "Reboot",
            _ => {
                return Err(QgaError::generic(
                    "mode is invalid (valid values are: halt|powerdown|reboot",
                ));
            }
        };
        tracing::info!("guest-shutdown: asking systemd-logind for {method}");
        logind(method).await?;
        CmdResult::Ok(None)
    })
}

fn suspend(args: Args, method: &'static str) -> BoxFuture<'static> {
    Box::pin(async move {
        args.finish()?;
        logind(method).await?;
        CmdResult::Ok(None)
    })
}

pub fn suspend_disk(_: &mut Agent, args: Args) -> BoxFuture<'_> {
    suspend(args, "Hibernate")
}

pub fn suspend_ram(_: &mut Agent, args: Args) -> BoxFuture<'_> {
    suspend(args, "Suspend")
}

pub fn suspend_hybrid(_: &mut Agent, args: Args) -> BoxFuture<'_> {
    suspend(args, "HybridSleep")
}
