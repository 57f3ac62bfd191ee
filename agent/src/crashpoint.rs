//! Test-only delay points for the power-cut scenarios: with `nixseed.test_delay=NAME:MS`
//! on the kernel command line (or NIXSEED_TEST_DELAY in the environment), the agent
//! sleeps at the point NAME so a test can kill the VM there. With `NAME:exit` the agent
//! exits there instead, once per boot (as a killed agent would, which systemd restarts).
//! Without the flag, nothing.

use std::sync::OnceLock;
use std::time::Duration;

/// What the agent does at the point.
enum Action {
    Sleep(u64),
    Exit,
}

fn configured() -> &'static Option<(String, Action)> {
    static DELAY: OnceLock<Option<(String, Action)>> = OnceLock::new();
    DELAY.get_or_init(|| {
        let from_env = std::env::var("NIXSEED_TEST_DELAY").ok();
        let from_cmdline = std::fs::read_to_string("/proc/cmdline").ok().and_then(|c| {
            c.split_whitespace()
                .find_map(|w| w.strip_prefix("nixseed.test_delay=").map(str::to_string))
        });
        let spec = from_env.or(from_cmdline)?;
        let (name, what) = spec.split_once(':')?;
        let action = match what {
            "exit" => Action::Exit,
            ms => Action::Sleep(ms.parse().ok()?),
        };
        Some((name.to_string(), action))
    })
}

/// Where a point that exits records that it did, so the restarted agent goes on.
fn exited_record(name: &str) -> String {
    format!("/run/nixseed-test-exited-{name}")
}

/// [`hit`] in async code: a sleep there lets the runtime go on (the signals, the other
/// port), as a slow step at that point would.
pub async fn hit_async(name: &str) {
    match configured() {
        Some((want, Action::Sleep(ms))) if want == name => {
            tracing::warn!("test delay point reached: {name}, sleeping {ms} ms");
            tokio::time::sleep(Duration::from_millis(*ms)).await;
        }
        _ => hit(name),
    }
}

pub fn hit(name: &str) {
    let Some((want, action)) = configured() else {
        return;
    };
    if want != name {
        return;
    }
    // The point's name is in the message itself: journald keeps structured fields apart
    // from MESSAGE, and the tests read the message.
    match action {
        Action::Sleep(ms) => {
            tracing::warn!("test delay point reached: {name}, sleeping {ms} ms");
            std::thread::sleep(Duration::from_millis(*ms));
        }
        Action::Exit => {
            let first = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(exited_record(name))
                .is_ok();
            if first {
                tracing::warn!("test delay point reached: {name}, exiting");
                std::process::exit(70);
            }
        }
    }
}
