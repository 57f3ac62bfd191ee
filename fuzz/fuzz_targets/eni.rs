//! ConfigDrive2 inputs never panic: ENI text, network_data.json (rendered for no NIC and
//! for one whose MAC Nova uses) and meta_data.json.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = nixseed_core::network::parse_eni(&text, "content/0000") {
        let _ = nixseed_core::network::render_networkd(&cfg, &[]);
    }
    if let Ok(cfg) = nixseed_core::network::parse_network_data(data, "network_data.json") {
        let nic = nixseed_core::network::Link {
            name: "ens3".into(),
            mac: "fa:16:3e:00:00:01".into(),
        };
        let _ = nixseed_core::network::render_networkd(&cfg, &[]);
        let _ = nixseed_core::network::render_networkd(&cfg, &[nic]);
    }
    let _ = nixseed_core::configdrive::parse_meta_data(data, "meta_data.json");
});
