//! Logs go to journald when it is there, to stderr otherwise (the initrd, tests).

use tracing_subscriber::prelude::*;

pub fn init(verbose: bool) {
    let level = if verbose {
        tracing::level_filters::LevelFilter::DEBUG
    } else {
        tracing::level_filters::LevelFilter::INFO
    };
    let journald = std::path::Path::new("/run/systemd/journal/socket").exists()
        && std::env::var_os("NIXSEED_LOG_STDERR").is_none()
        && std::env::var_os("JOURNAL_STREAM").is_some();
    // Nothing is logged while the guest agent holds filesystems frozen (journald, and a
    // stderr that leads to it, would stall on a frozen /var and block the agent).
    let thawed = tracing_subscriber::filter::filter_fn(crate::qga::logging_allowed);
    if journald && let Ok(layer) = tracing_journald::layer() {
        let _ = tracing_subscriber::registry()
            .with(layer.with_syslog_identifier("nixseed-agent".into()))
            .with(level)
            .with(thawed)
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
        .with(thawed)
        .try_init();
}
