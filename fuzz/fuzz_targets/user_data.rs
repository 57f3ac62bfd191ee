//! user-data (cloud-config, MIME multipart, gzip) never panics, whatever the bytes.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nixseed_core::userdata::parse(data, "user-data");
});
