//! Signed seeds. With a signing key (`seedctl keygen`; found at `SEEDCTL_SIGNING_KEY`, else
//! `$XDG_CONFIG_HOME/nixseed/signing_key`, else `~/.config/nixseed/signing_key`), every
//! seed and push carries `nixseed-manifest.json` and its SSHSIG signature. The manifest's
//! generation counter lives in `machines/NAME/seed_generation` beside the identity it
//! counts, so it follows the machine: it goes up by one whenever the seed files change,
//! and stays put (byte-identical seeds) when they do not.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use nixseed_core::trust::SeedManifest;
use ssh_key::PrivateKey;

use crate::fsutil::write_atomic;
use crate::machine::Identity;
use crate::nocloud::{self, SeedFiles};

pub const GENERATION_FILE: &str = "seed_generation";

/// Where the signing key is looked for; `None` when `SEEDCTL_SIGNING_KEY` is set empty
/// (seeds unsigned on purpose) or there is no home to look in.
pub fn key_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SEEDCTL_SIGNING_KEY") {
        return (!p.is_empty()).then(|| PathBuf::from(p));
    }
    let config = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(config.join("nixseed/signing_key"))
}

fn load_key(path: &Path) -> Result<PrivateKey> {
    let text = std::fs::read_to_string(path).with_context(|| {
        format!(
            "cannot read the signing key {} (SEEDCTL_SIGNING_KEY, or the default path); make it with `seedctl keygen`, or set SEEDCTL_SIGNING_KEY empty to write unsigned seeds",
            path.display()
        )
    })?;
    // The key parser's error repeats its cause in its own text: its message only.
    PrivateKey::from_openssh(&text).map_err(|e| {
        anyhow::anyhow!(
            "{} is not an OpenSSH private key ({e}); make one with `seedctl keygen`",
            path.display()
        )
    })
}

/// The machine's seed files, signed when a signing key exists.
pub fn seed_files(id: &Identity) -> Result<SeedFiles> {
    let mut files = nocloud::seed_files(id);
    // A key named in SEEDCTL_SIGNING_KEY must be there: a seed left unsigned by a typo
    // would be refused by every guest that trusts the key.
    let named = std::env::var_os("SEEDCTL_SIGNING_KEY").is_some();
    let Some(path) = key_path().filter(|p| named || p.exists()) else {
        return Ok(files);
    };
    let key = load_key(&path)?;
    let unsigned = files.to_core();
    let generation = next_generation(id, &unsigned.digest())?;
    let manifest = SeedManifest::for_files(&id.name, Some(&id.product_uuid), generation, &unsigned);
    let signed = manifest
        .sign(&key)
        .map_err(|e| anyhow::anyhow!("machine `{}`: {e}", id.name))?;
    files.extra = signed.into_iter().collect();
    Ok(files)
}

/// `machines/NAME/seed_generation` holds `N DIGEST`: N is raised when the digest changes.
fn next_generation(id: &Identity, digest: &str) -> Result<u64> {
    let path = id.dir.join(GENERATION_FILE);
    let (n, last) = match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut parts = text.split_whitespace();
            let n = parts
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .with_context(|| {
                    format!(
                        "machine `{}`: {}: expected `GENERATION DIGEST`",
                        id.name,
                        path.display()
                    )
                })?;
            (n, parts.next().unwrap_or_default().to_string())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => (0, String::new()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("machine `{}`: cannot read {}", id.name, path.display()));
        }
    };
    if last == digest {
        return Ok(n);
    }
    let next = n.checked_add(1).with_context(|| {
        format!(
            "machine `{}`: {}: the generation cannot go higher",
            id.name,
            path.display()
        )
    })?;
    write_atomic(&path, format!("{next} {digest}\n").as_bytes(), 0o644)
        .with_context(|| format!("machine `{}`: recording the seed generation", id.name))?;
    Ok(next)
}

/// `seedctl keygen`: a new ed25519 signing key (0600) and its `.pub`.
pub fn keygen(out: &Path, force: bool) -> Result<String> {
    use nixseed_core::identity::Fresh;
    if out.exists() && !force {
        bail!(
            "{} exists; pass --force to replace it (seeds signed with the old key will no longer verify)",
            out.display()
        );
    }
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let (private, public) = nixseed_core::fresh::OsFresh
        .host_key("nixseed-seed-signing")
        .map_err(|e| anyhow::anyhow!("generating the signing key: {e}"))?;
    // The public half first: a failure leaves no private key without it.
    let pub_path = PathBuf::from(format!("{}.pub", out.display()));
    write_atomic(
        &pub_path,
        format!("{}\n", public.trim_end()).as_bytes(),
        0o644,
    )?;
    if let Err(e) = write_atomic(out, private.as_bytes(), 0o600) {
        let _ = std::fs::remove_file(&pub_path);
        return Err(e);
    }
    Ok(public.trim_end().to_string())
}
