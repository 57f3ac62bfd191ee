//! Running host tools: every failure names the command line and shows its stderr.

use anyhow::{Context, Result, bail};
use std::process::{Command, Output, Stdio};

/// A child process that is killed and reaped when dropped (a background `seedctl`
/// that a failing step must not leave running); one already waited for is left alone.
pub struct Reaped(pub std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A log file's text, invalid UTF-8 replaced; empty when it cannot be read.
pub fn read_lossy(path: &std::path::Path) -> String {
    std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

/// The last `lines` lines of a log file (as [`read_lossy`] reads it), for error messages.
pub fn log_tail(path: &std::path::Path, lines: usize) -> String {
    let text = read_lossy(path);
    let mut last: Vec<&str> = text.lines().rev().take(lines).collect();
    last.reverse();
    last.join("\n")
}

/// Renders a command line for error messages and logs.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

/// Runs a command with stdin closed, capturing output; fails on a non-zero exit.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let line = describe(cmd);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot start `{line}` (is it installed? try `vm-tests deps`)"))?;
    if !out.status.success() {
        bail!(
            "`{line}` failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

/// Runs a command and returns its stdout as text.
pub fn stdout(cmd: &mut Command) -> Result<String> {
    let out = run(cmd)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs a command with stdout/stderr passed through (long builds show progress).
pub fn run_visible(cmd: &mut Command) -> Result<()> {
    let line = describe(cmd);
    let status = cmd
        .stdin(Stdio::null())
        .status()
        .with_context(|| format!("cannot start `{line}` (is it installed? try `vm-tests deps`)"))?;
    if !status.success() {
        bail!("`{line}` failed ({status})");
    }
    Ok(())
}

/// Lower-case hex of bytes.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::log_tail;

    #[test]
    fn log_tail_keeps_the_last_lines_in_order() {
        let dir = std::env::temp_dir().join(format!("vm-tests-log-tail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let log = dir.join("a.log");
        std::fs::write(&log, b"one\ntwo\nthree\nfour\xff\n").expect("writing the log");
        assert_eq!(log_tail(&log, 2), "three\nfour\u{fffd}");
        assert_eq!(log_tail(&log, 10), "one\ntwo\nthree\nfour\u{fffd}");
        assert_eq!(log_tail(&dir.join("missing.log"), 3), "");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
