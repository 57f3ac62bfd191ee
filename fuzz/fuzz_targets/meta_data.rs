//! meta-data and the `ds=nocloud` token never panic.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nixseed_core::nocloud::parse_meta_data(data, "meta-data");
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = nixseed_core::nocloud::parse_ds_token(text);
    }
});
