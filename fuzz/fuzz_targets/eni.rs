//! ConfigDrive2 ENI text and meta_data.json never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    if let Ok(cfg) = nixseed_core::network::parse_eni(&text, "content/0000") {
        let _ = nixseed_core::network::render_networkd(&cfg, &[]);
    }
    let _ = nixseed_core::configdrive::parse_meta_data(data, "meta_data.json");
});
