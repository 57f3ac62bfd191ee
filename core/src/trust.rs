//! Signed seeds. `seedctl` adds two files to a seed: `nixseed-manifest.json` (machine name,
//! product UUID, a generation counter and the sha256 of every other seed file) and
//! `nixseed-manifest.sig`, an SSHSIG signature over it (namespace `nixseed-seed`, so
//! `ssh-keygen -Y verify` checks it too). An agent configured with trusted keys refuses an
//! unsigned seed, a bad signature, a manifest for another VM and a rollback.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use ssh_key::{HashAlg, PrivateKey, PublicKey, SshSig};

use crate::manifest::sha256_hex;
use crate::seed::SeedFiles;

pub const MANIFEST_FILE: &str = "nixseed-manifest.json";
pub const SIGNATURE_FILE: &str = "nixseed-manifest.sig";
pub const NAMESPACE: &str = "nixseed-seed";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeedManifest {
    pub machine: String,
    pub product_uuid: Option<String>,
    /// Raised by the host whenever the identity changes; the agent refuses lower ones.
    pub generation: u64,
    /// Seed file name → sha256 hex, for every file but the manifest and its signature.
    pub files: BTreeMap<String, String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TrustError {
    #[error(
        "{origin}: unsigned seed refused ({MANIFEST_FILE} or {SIGNATURE_FILE} missing) while trusted keys are configured"
    )]
    Unsigned { origin: String },
    #[error("{origin}: {MANIFEST_FILE}: {detail}")]
    Malformed { origin: String, detail: String },
    #[error("{origin}: the signature on {MANIFEST_FILE} is not from a trusted key ({detail})")]
    BadSignature { origin: String, detail: String },
    #[error(
        "{origin}: the seed was signed for machine {machine} with product_uuid {expected}, but this VM is {found}"
    )]
    OtherMachine {
        origin: String,
        machine: String,
        expected: String,
        found: String,
    },
    #[error(
        "{origin}: seed generation {seed} is lower than the applied {applied}: rollback refused"
    )]
    Rollback {
        origin: String,
        seed: u64,
        applied: u64,
    },
    #[error("{origin}: {file}: sha256 does not match the signed manifest")]
    FileMismatch { origin: String, file: String },
    #[error("{origin}: {file} is not listed in the signed manifest")]
    Unlisted { origin: String, file: String },
}

impl SeedManifest {
    pub fn for_files(
        machine: &str,
        product_uuid: Option<&str>,
        generation: u64,
        files: &SeedFiles,
    ) -> SeedManifest {
        SeedManifest {
            machine: machine.to_string(),
            product_uuid: product_uuid.map(str::to_string),
            generation,
            files: files
                .0
                .iter()
                .filter(|(k, _)| k.as_str() != MANIFEST_FILE && k.as_str() != SIGNATURE_FILE)
                .map(|(k, v)| (k.clone(), sha256_hex(v)))
                .collect(),
        }
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    /// Signs; returns the two files to add to the seed.
    pub fn sign(&self, key: &PrivateKey) -> Result<[(String, Vec<u8>); 2], String> {
        let bytes = self.to_bytes();
        let sig = key
            .sign(NAMESPACE, HashAlg::Sha512, &bytes)
            .map_err(|e| format!("cannot sign the seed manifest: {e}"))?;
        let pem = sig
            .to_pem(ssh_key::LineEnding::LF)
            .map_err(|e| format!("cannot encode the signature: {e}"))?;
        Ok([
            (MANIFEST_FILE.to_string(), bytes),
            (SIGNATURE_FILE.to_string(), pem.into_bytes()),
        ])
    }
}

/// The keys an agent trusts, from an authorized_keys-style file.
#[derive(Debug, Clone)]
pub struct Trust {
    keys: Vec<PublicKey>,
    /// Why no key is trusted, when the keys meant could not be read.
    unreadable: Option<String>,
}

impl Trust {
    /// Trusts no key, because the keys meant could not be read (`why`): every seed is
    /// refused, and each refusal says why.
    pub fn unreadable(why: String) -> Trust {
        Trust {
            keys: Vec::new(),
            unreadable: Some(why),
        }
    }

    pub fn parse(text: &str, origin: &str) -> Result<Trust, String> {
        let mut keys = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            keys.push(PublicKey::from_openssh(line).map_err(|e| {
                format!("{origin}: line {}: not an OpenSSH public key: {e}", i + 1)
            })?);
        }
        if keys.is_empty() {
            return Err(format!("{origin}: no trusted key in the file"));
        }
        Ok(Trust {
            keys,
            unreadable: None,
        })
    }

    /// Checks a seed's files; on success returns its manifest.
    pub fn verify(
        &self,
        files: &SeedFiles,
        source: &str,
        product_uuid: Option<&str>,
        applied_generation: Option<u64>,
    ) -> Result<SeedManifest, TrustError> {
        let src = || source.to_string();
        let (Some(manifest_bytes), Some(sig_bytes)) =
            (files.get(MANIFEST_FILE), files.get(SIGNATURE_FILE))
        else {
            return Err(TrustError::Unsigned { origin: src() });
        };
        let sig = SshSig::from_pem(sig_bytes).map_err(|e| TrustError::BadSignature {
            origin: src(),
            detail: format!("{SIGNATURE_FILE} is not an SSH signature: {e}"),
        })?;
        if !self
            .keys
            .iter()
            .any(|k| k.verify(NAMESPACE, manifest_bytes, &sig).is_ok())
        {
            let signer = sig.public_key().fingerprint(HashAlg::Sha256);
            return Err(TrustError::BadSignature {
                origin: src(),
                detail: match &self.unreadable {
                    Some(why) => format!("signed by {signer}; no key is trusted: {why}"),
                    None => format!("signed by {signer}"),
                },
            });
        }
        let manifest: SeedManifest =
            serde_json::from_slice(manifest_bytes).map_err(|e| TrustError::Malformed {
                origin: src(),
                detail: e.to_string(),
            })?;
        if let (Some(expected), Some(found)) = (&manifest.product_uuid, product_uuid)
            && !expected.eq_ignore_ascii_case(found)
        {
            return Err(TrustError::OtherMachine {
                origin: src(),
                machine: manifest.machine.clone(),
                expected: expected.clone(),
                found: found.to_string(),
            });
        }
        if let Some(applied) = applied_generation
            && manifest.generation < applied
        {
            return Err(TrustError::Rollback {
                origin: src(),
                seed: manifest.generation,
                applied,
            });
        }
        for (name, bytes) in &files.0 {
            if name == MANIFEST_FILE || name == SIGNATURE_FILE {
                continue;
            }
            match manifest.files.get(name) {
                None => {
                    return Err(TrustError::Unlisted {
                        origin: src(),
                        file: name.clone(),
                    });
                }
                Some(d) if *d != sha256_hex(bytes) => {
                    return Err(TrustError::FileMismatch {
                        origin: src(),
                        file: name.clone(),
                    });
                }
                Some(_) => {}
            }
        }
        for name in manifest.files.keys() {
            if files.get(name).is_none() {
                return Err(TrustError::FileMismatch {
                    origin: src(),
                    file: name.clone(),
                });
            }
        }
        Ok(manifest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed test key: the signing tests must not depend on an RNG.
    fn key() -> PrivateKey {
        PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[7u8; 32]))
    }

    fn seed(user: &str) -> SeedFiles {
        SeedFiles(
            [("meta-data", "instance-id: a\n"), ("user-data", user)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    fn signed(files: &SeedFiles, uuid: &str, generation: u64) -> SeedFiles {
        let mut out = files.clone();
        let m = SeedManifest::for_files("web1", Some(uuid), generation, files);
        for (k, v) in m.sign(&key()).unwrap() {
            out.0.insert(k, v);
        }
        out
    }

    fn trust() -> Trust {
        let line = key().public_key().to_openssh().unwrap();
        Trust::parse(&format!("# trusted\n{line}\n"), "trusted_keys").unwrap()
    }

    #[test]
    fn signed_seed_verifies_and_every_refusal_is_named() {
        let files = signed(&seed("#cloud-config\n"), "U1", 5);
        let t = trust();
        assert_eq!(
            t.verify(&files, "s", Some("u1"), Some(5))
                .unwrap()
                .generation,
            5
        );
        assert!(matches!(
            t.verify(&seed(""), "s", None, None),
            Err(TrustError::Unsigned { .. })
        ));
        assert!(matches!(
            t.verify(&files, "s", Some("U2"), None),
            Err(TrustError::OtherMachine { .. })
        ));
        assert!(matches!(
            t.verify(&files, "s", Some("U1"), Some(6)),
            Err(TrustError::Rollback {
                seed: 5,
                applied: 6,
                ..
            })
        ));
        let mut tampered = files.clone();
        tampered.0.insert(
            "user-data".into(),
            b"#cloud-config\nhostname: evil\n".to_vec(),
        );
        assert!(matches!(
            t.verify(&tampered, "s", None, None),
            Err(TrustError::FileMismatch { .. })
        ));
        let mut extra = files.clone();
        extra
            .0
            .insert("network-config".into(), b"version: 2\n".to_vec());
        assert!(matches!(
            t.verify(&extra, "s", None, None),
            Err(TrustError::Unlisted { .. })
        ));
        let other = PrivateKey::from(ssh_key::private::Ed25519Keypair::from_seed(&[9u8; 32]));
        let mut foreign = seed("#cloud-config\n");
        let m = SeedManifest::for_files("web1", None, 1, &foreign);
        for (k, v) in m.sign(&other).unwrap() {
            foreign.0.insert(k, v);
        }
        let e = t
            .verify(&foreign, "nocloud:/dev/sr0", None, None)
            .unwrap_err();
        assert!(
            e.to_string().starts_with("nocloud:/dev/sr0: the signature"),
            "{e}"
        );
    }

    /// Keys that could not be read trust nothing, and the refusal says why, rather than
    /// suggesting the seed was signed by the wrong key.
    #[test]
    fn unreadable_keys_refuse_every_seed_saying_why() {
        let files = signed(&seed("#cloud-config\n"), "U1", 5);
        let t = Trust::unreadable("cannot read trusted keys /etc/k: Permission denied".into());
        let e = t.verify(&files, "channel:web1", None, None).unwrap_err();
        assert!(matches!(e, TrustError::BadSignature { .. }), "{e}");
        assert!(
            e.to_string().ends_with(
                "no key is trusted: cannot read trusted keys /etc/k: Permission denied)"
            ),
            "{e}"
        );
    }
}
