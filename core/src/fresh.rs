//! Fresh machine-ids and SSH host keys from the kernel's RNG (feature `os-fresh`): the
//! one impure corner of the core, shared so the agent and seedctl make identities alike.

use crate::identity::Fresh;
use ssh_key::{Algorithm, LineEnding, PrivateKey};

pub struct OsFresh;

impl Fresh for OsFresh {
    fn machine_id(&mut self) -> String {
        let mut b = [0u8; 16];
        if getrandom::getrandom(&mut b).is_err() || b.iter().all(|x| *x == 0) {
            // The kernel RNG cannot fail after boot; in the initrd getrandom blocks until
            // seeded. Mix the time in as a last resort rather than write zeros.
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(1);
            b = t.to_le_bytes();
        }
        // Version 4 bits, as systemd-machine-id-setup writes them.
        b[6] = (b[6] & 0x0f) | 0x40;
        b[8] = (b[8] & 0x3f) | 0x80;
        crate::seed::hex(&b)
    }

    fn host_key(&mut self, comment: &str) -> Result<(String, String), String> {
        let mut key = PrivateKey::random(&mut rand_core::OsRng, Algorithm::Ed25519)
            .map_err(|e| e.to_string())?;
        key.set_comment(comment);
        let private = key.to_openssh(LineEnding::LF).map_err(|e| e.to_string())?;
        let public = key.public_key().to_openssh().map_err(|e| e.to_string())?;
        Ok((private.to_string(), public))
    }
}

/// A random crypt(3) salt, for a password hashed on the machine.
pub fn crypt_salt() -> Result<String, String> {
    let mut b = [0u8; 16];
    getrandom::getrandom(&mut b).map_err(|e| format!("the kernel's RNG: {e}"))?;
    Ok(crate::shadow::salt_from(b))
}
