//! guest-set-user-password (unsafe: off unless allow-listed), through chpasswd so the
//! system's own password hashing and shadow locking apply.

use std::io::Write;
use std::process::{Command, Stdio};

use nixseed_core::qga::{Args, QgaError, base64};
use serde_json::json;

use super::{Agent, CmdResult};

pub fn set_user_password(_: &mut Agent, mut args: Args) -> CmdResult {
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
