//! `manifest.json`: what a generation is and the sha256 of every file in it. The agent
//! checks it on every boot; `seedctl status` compares it with the host's files.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::identity::IdentityTree;
use crate::seed::hex;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub generation: u64,
    pub instance_id: String,
    /// `nocloud:/dev/sr0`, `configdrive:/dev/sr1`, `channel`, `credentials:smbios`, ...
    pub source: String,
    /// The DMI product_uuid of the VM that applied this generation (clone detection).
    pub product_uuid: Option<String>,
    /// sha256 of the seed's files as read ([`crate::seed::SeedFiles::digest`]).
    pub seed_digest: String,
    /// Relative path → sha256 hex.
    pub files: BTreeMap<String, String>,
    /// The signed seed manifest's generation, when the seed was signed (rollback guard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed_generation: Option<u64>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("{origin}: malformed manifest: {detail}")]
    Malformed { origin: String, detail: String },
    #[error("{origin}: {file}: sha256 {found} does not match the manifest's {expected}")]
    Mismatch {
        origin: String,
        file: String,
        expected: String,
        found: String,
    },
    #[error("{origin}: {file}: listed in the manifest but missing")]
    Missing { origin: String, file: String },
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

impl Manifest {
    pub fn files_of(tree: &IdentityTree) -> BTreeMap<String, String> {
        tree.iter()
            .map(|(k, f)| (k.clone(), sha256_hex(&f.bytes)))
            .collect()
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = serde_json::to_vec_pretty(self).unwrap_or_default();
        v.push(b'\n');
        v
    }

    pub fn parse(bytes: &[u8], origin: &str) -> Result<Manifest, ManifestError> {
        serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed {
            origin: origin.to_string(),
            detail: e.to_string(),
        })
    }

    /// Checks that `tree` holds exactly the bytes the manifest names.
    pub fn verify(&self, tree: &IdentityTree, origin: &str) -> Result<(), ManifestError> {
        for (file, expected) in &self.files {
            let Some(f) = tree.get(file) else {
                return Err(ManifestError::Missing {
                    origin: origin.into(),
                    file: file.clone(),
                });
            };
            let found = sha256_hex(&f.bytes);
            if &found != expected {
                return Err(ManifestError::Mismatch {
                    origin: origin.into(),
                    file: file.clone(),
                    expected: expected.clone(),
                    found,
                });
            }
        }
        Ok(())
    }
}
