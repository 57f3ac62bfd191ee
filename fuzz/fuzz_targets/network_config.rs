//! network-config parsing and networkd rendering never panic.
#![no_main]
use nixseed_core::network::{self, Link, NetworkSetting};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(NetworkSetting::Config(cfg)) = network::parse(data, "network-config") {
        let links = [Link { name: "ens18".into(), mac: "52:54:00:12:34:56".into() }];
        let _ = network::render_networkd(&cfg, &links);
    }
});
