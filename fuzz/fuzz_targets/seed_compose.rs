//! A whole NoCloud seed, split from the input, through parsing and identity composition.
#![no_main]
use nixseed_core::identity::{ComposeContext, Fresh, compose};
use nixseed_core::seed::{Seed, SeedFiles};

/// A fake entropy source: fixed values, so runs are reproducible.
struct FakeFresh;
impl Fresh for FakeFresh {
    fn machine_id(&mut self) -> String {
        "0123456789abcdef0123456789abcdef".into()
    }
    fn host_key(&mut self, _: &str) -> Result<(String, String), String> {
        Ok(("-----BEGIN OPENSSH PRIVATE KEY-----\n".into(), "ssh-ed25519 AAAA".into()))
    }
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let mut parts = data.splitn(3, |b| *b == 0);
    let meta = parts.next().unwrap_or_default().to_vec();
    let user = parts.next().unwrap_or_default().to_vec();
    let net = parts.next().map(<[u8]>::to_vec);
    let mut files = SeedFiles::default();
    files.0.insert("meta-data".into(), meta);
    files.0.insert("user-data".into(), user);
    if let Some(n) = net {
        files.0.insert("network-config".into(), n);
    }
    if let Ok(seed) = Seed::from_nocloud(&files, "fuzz", None) {
        let _ = compose(&seed, None, &ComposeContext::default(), &mut FakeFresh);
    }
});
