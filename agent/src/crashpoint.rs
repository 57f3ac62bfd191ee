//! Test-only delay points for the power-cut scenarios: with `nixseed.test_delay=NAME:MS`
//! on the kernel command line (or NIXSEED_TEST_DELAY in the environment), the agent
//! sleeps at the point NAME so a test can kill the VM there. Without the flag, nothing.

use std::sync::OnceLock;
use std::time::Duration;

fn configured() -> &'static Option<(String, u64)> {
    static DELAY: OnceLock<Option<(String, u64)>> = OnceLock::new();
    DELAY.get_or_init(|| {
        let from_env = std::env::var("NIXSEED_TEST_DELAY").ok();
        let from_cmdline = std::fs::read_to_string("/proc/cmdline").ok().and_then(|c| {
            c.split_whitespace()
                .find_map(|w| w.strip_prefix("nixseed.test_delay=").map(str::to_string))
        });
        let spec = from_env.or(from_cmdline)?;
        let (name, ms) = spec.split_once(':')?;
        Some((name.to_string(), ms.parse().ok()?))
    })
}

pub fn hit(name: &str) {
    if let Some((want, ms)) = configured()
        && want == name
    {
        // The point's name is in the message itself: journald keeps structured fields
        // apart from MESSAGE, and the tests read the message.
        tracing::warn!("test delay point reached: {name}, sleeping {ms} ms");
        std::thread::sleep(Duration::from_millis(*ms));
    }
}
