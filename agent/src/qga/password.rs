//! guest-set-user-password (unsafe: off unless allow-listed), through chpasswd so the
//! system's own password hashing and shadow locking apply.

use std::io::Write;
use std::process::{Command, Stdio};

use nixseed_core::credentials::base64_decode;
use nixseed_core::qga::{Args, QgaError};
use serde_json::json;

use super::{Agent, CmdResult};

pub fn set_user_password(_: &mut Agent, mut args: Args) -> CmdResult {
    let username = args.str("username")?;
    let password = args.str("password")?;
    let crypted = args.bool("crypted")?;
    args.finish()?;
    // Proxmox sends base64 with line breaks; the decoder skips whitespace.
    let raw = base64_decode(&password)
        .ok_or_else(|| QgaError::generic("password is not valid base64"))?;
    let raw =
        String::from_utf8(raw).map_err(|_| QgaError::generic("password is not valid UTF-8"))?;
    if raw.contains(['\n', '\r']) || username.contains([':', '\n']) {
        return Err(QgaError::generic(
            "username or password contains characters chpasswd cannot take",
        ));
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
        .map_err(|e| QgaError::generic(format!("cannot run chpasswd: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(format!("{username}:{raw}\n").as_bytes())
            .map_err(|e| QgaError::generic(format!("cannot write to chpasswd: {e}")))?;
    }
    let st = child
        .wait()
        .map_err(|e| QgaError::generic(format!("chpasswd: {e}")))?;
    if !st.success() {
        return Err(QgaError::generic(
            "child process has failed to set user password",
        ));
    }
    tracing::info!("guest-set-user-password: password set for {username}");
    Ok(Some(json!({})))
}
