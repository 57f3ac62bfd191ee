//! Superblock probing of arbitrary device heads never panics.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = nixseed_core::label::probe(data);
    let mut padded = vec![0u8; nixseed_core::label::PROBE_LEN];
    let n = data.len().min(padded.len());
    // Place the input where the iso9660 PVD lives too, so both probes see it.
    padded[32768..32768 + n.min(2048)].copy_from_slice(&data[..n.min(2048)]);
    let _ = nixseed_core::label::probe(&padded);
    let _ = nixseed_core::credentials::parse_smbios_type11(data);
});
