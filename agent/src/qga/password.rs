//! guest-set-user-password (unsafe: off unless allow-listed), through chpasswd so the
//! system's own password hashing and shadow locking apply; on a read-only `/etc`, where
//! chpasswd cannot write, through nixseed's own `/etc/shadow` bind (docs/identity.md,
//! "Passwords and `ssh_pwauth`").

use std::io::Write;
use std::process::{Command, Stdio};

use nixseed_core::qga::{Args, QgaError, base64};
use serde_json::json;

use super::{Agent, CmdResult};

pub fn set_user_password(agent: &mut Agent, mut args: Args) -> CmdResult {
    let username = args.str("username")?;
    let password = args.str("password")?;
    let crypted = args.bool("crypted")?;
    args.finish()?;
    // Proxmox sends base64 with line breaks; the decoder skips them.
    let raw = base64::decode(&password)?;
    let raw = chpasswd_password(&raw);
    // As qemu-ga, only what would break chpasswd's `user:password` line is refused; any
    // other bytes (not UTF-8, `\r`) are the password.
    if raw.contains(&b'\n') {
        return Err(QgaError::generic("forbidden characters in raw password"));
    }
    if username.contains([':', '\n']) {
        return Err(QgaError::generic("forbidden characters in username"));
    }
    if etc_shadow_read_only() {
        return set_on_read_only_etc(agent, &username, raw, crypted);
    }
    let mut cmd = Command::new("chpasswd");
    if crypted {
        cmd.arg("-e");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => {
                QgaError::generic("cannot find 'passwd' program in PATH")
            }
            _ => QgaError::generic(format!("cannot run chpasswd: {e}")),
        })?;
    if let Some(mut stdin) = child.stdin.take() {
        let mut line = Vec::with_capacity(username.len() + raw.len() + 2);
        line.extend_from_slice(username.as_bytes());
        line.push(b':');
        line.extend_from_slice(raw);
        line.push(b'\n');
        stdin
            .write_all(&line)
            .map_err(|e| QgaError::generic(format!("cannot write to chpasswd: {e}")))?;
    }
    let st = child
        .wait()
        .map_err(|e| QgaError::generic(format!("chpasswd: {e}")))?;
    if st.code().is_none() {
        return Err(QgaError::generic("child process has terminated abnormally"));
    }
    if !st.success() {
        return Err(QgaError::generic(
            "child process has failed to set user password",
        ));
    }
    tracing::info!("guest-set-user-password: password set for {username}");
    Ok(Some(json!({})))
}

/// Whether `/etc/shadow` cannot be written: a read-only root, or nixseed's read-only bind.
fn etc_shadow_read_only() -> bool {
    matches!(
        rustix::fs::access("/etc/shadow", rustix::fs::Access::WRITE_OK),
        Err(rustix::io::Errno::ROFS)
    )
}

/// The password hashed here (SHA-512 crypt, as chpasswd would) or taken as given
/// (`crypted`), kept on `/var` for this instance and bound into `/etc/shadow`. The
/// errors are qemu-ga's words for a chpasswd that failed; the journal has the reason.
fn set_on_read_only_etc(agent: &Agent, username: &str, raw: &[u8], crypted: bool) -> CmdResult {
    let failed = || QgaError::generic("child process has failed to set user password");
    let hash = if crypted {
        let hash = String::from_utf8_lossy(raw).into_owned();
        if !nixseed_core::shadow::hash_fits(&hash) {
            tracing::warn!(
                "guest-set-user-password: the hash for {username} holds ':' or a control character"
            );
            return Err(failed());
        }
        hash
    } else {
        let salt = nixseed_core::fresh::crypt_salt().map_err(|e| {
            tracing::warn!("guest-set-user-password: no salt: {e}");
            failed()
        })?;
        nixseed_core::shadow::sha512_crypt(raw, &salt).map_err(|e| {
            tracing::warn!("guest-set-user-password: {e}");
            failed()
        })?
    };
    // qemu-ga's words, and why: the host can try again.
    let _one = crate::identity_lock::for_guest_agent_command().map_err(|e| {
        QgaError::generic(format!(
            "child process has failed to set user password: {e}"
        ))
    })?;
    crate::accounts::set_agent_password(&agent.config.identity_dir, username, &hash).map_err(
        |e| {
            tracing::warn!("guest-set-user-password for {username} on a read-only /etc: {e:#}");
            failed()
        },
    )?;
    tracing::info!(
        "guest-set-user-password: password set for {username} (read-only /etc: kept on /var until the instance-id changes)"
    );
    Ok(Some(json!({})))
}

/// The password as qemu-ga hands it to chpasswd: a C string, so it ends at the first
/// NUL byte.
fn chpasswd_password(raw: &[u8]) -> &[u8] {
    raw.split(|&b| b == 0).next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::chpasswd_password;

    #[test]
    fn the_password_ends_at_a_nul_byte_as_in_qemu_ga() {
        assert_eq!(chpasswd_password(b"a\0b"), b"a");
        assert_eq!(chpasswd_password(b"r\xe4s\r"), b"r\xe4s\r");
        assert_eq!(chpasswd_password(b""), b"");
    }
}
