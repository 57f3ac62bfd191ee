//! Logs go to journald when it is there, to stderr otherwise (the initrd, tests).

use tracing_subscriber::filter::{DynFilterFn, dynamic_filter_fn};
use tracing_subscriber::layer::Context;
use tracing_subscriber::prelude::*;

/// Nothing is logged while the guest agent holds filesystems frozen (journald, and a
/// stderr that leads to it, would stall on a frozen /var and block the agent). Asked at
/// every event (a dynamic filter): a static one's answer is cached per log statement, so
/// a line first reached while frozen would stay silent after the thaw, and one first
/// reached before a freeze would still be written during it.
type Thawed<S> = DynFilterFn<S, fn(&tracing::Metadata<'_>, &Context<'_, S>) -> bool>;

fn thawed<S>() -> Thawed<S> {
    dynamic_filter_fn(|meta, _| crate::qga::logging_allowed(meta))
}

pub fn init(verbose: bool) {
    let level = if verbose {
        tracing::level_filters::LevelFilter::DEBUG
    } else {
        tracing::level_filters::LevelFilter::INFO
    };
    let journald = std::path::Path::new("/run/systemd/journal/socket").exists()
        && std::env::var_os("NIXSEED_LOG_STDERR").is_none()
        && std::env::var_os("JOURNAL_STREAM").is_some();
    if journald && let Ok(layer) = tracing_journald::layer() {
        let _ = tracing_subscriber::registry()
            .with(layer.with_syslog_identifier("nixseed-agent".into()))
            .with(level)
            .with(thawed())
            .try_init();
        return;
    }
    let _ = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_max_level(level)
        .with_target(false)
        .without_time()
        .with_ansi(false)
        .finish()
        .with(thawed())
        .try_init();
}
