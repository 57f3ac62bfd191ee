//! `seedctl ssh`: log in to a `seedctl run` machine as root with its host key pinned
//! (no trust-on-first-use).

use std::os::unix::process::CommandExt;
use std::process::Command;

use anyhow::{Result, bail};
use clap::Args;

use crate::cmd::run::write_known_hosts;
use crate::machine::{Identity, Paths};
use crate::output::Report;
use crate::state::StateDir;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl ssh web1
  seedctl ssh web1 -- systemctl status nixseed-apply
  seedctl ssh web1 --user alice -i ~/.ssh/id_ed25519")]
pub struct SshArgs {
    /// Machine name
    pub name: String,
    /// Remote user
    #[arg(long, default_value = "root")]
    pub user: String,
    /// Identity file passed to ssh -i
    #[arg(short = 'i', long, value_name = "FILE")]
    pub identity: Option<std::path::PathBuf>,
    /// Command to run instead of a login shell
    #[arg(last = true)]
    pub command: Vec<String>,
}

pub fn ssh_command(paths: &Paths, a: &SshArgs) -> Result<Command> {
    let id = Identity::load(paths, &a.name)?;
    let sd = StateDir::new(paths, &a.name);
    let Some(port) = sd.load()?.ssh_port else {
        bail!(
            "machine `{}` has no SSH port forward recorded in {}; start it with `seedctl run {}`",
            a.name,
            sd.file(crate::state::STATE_FILE).display(),
            a.name
        );
    };
    let known_hosts = write_known_hosts(&id, &sd, port)?;
    let mut cmd = Command::new("ssh");
    cmd.args(["-p", &port.to_string()])
        .args(["-o", "StrictHostKeyChecking=yes"])
        .arg("-o")
        .arg(format!(
            "UserKnownHostsFile={}",
            ssh_option_path(
                &known_hosts,
                known_hosts.to_string_lossy().contains('%') && ssh_expands_percent()
            )?
        ))
        .args([
            "-o",
            "GlobalKnownHostsFile=/dev/null",
            "-o",
            "HostKeyAlgorithms=ssh-ed25519",
        ]);
    if let Some(i) = &a.identity {
        cmd.arg("-i").arg(i);
    }
    cmd.arg(format!("{}@127.0.0.1", a.user));
    if !a.command.is_empty() {
        cmd.arg("--").args(&a.command);
    }
    Ok(cmd)
}

/// A path as one ssh_config argument: in double quotes, so that a space does not split it
/// into two files, and with `%` doubled where ssh expands `%` tokens in the option
/// (OpenSSH 8.4 and later: `percent_tokens`); earlier releases take it as written.
fn ssh_option_path(path: &std::path::Path, percent_tokens: bool) -> Result<String> {
    let text = path.display().to_string();
    if text.contains('"') {
        bail!(
            "{text}: ssh cannot be given a file whose path holds a double quote; use a state directory without one"
        );
    }
    let text = if percent_tokens {
        text.replace('%', "%%")
    } else {
        text
    };
    Ok(format!("\"{text}\""))
}

/// Whether the installed ssh expands `%` tokens in `UserKnownHostsFile` (OpenSSH 8.4 and
/// later), from `ssh -V`.
fn ssh_expands_percent() -> bool {
    Command::new("ssh").arg("-V").output().map_or(true, |out| {
        percent_tokens_in(&String::from_utf8_lossy(&out.stderr))
    })
}

/// Whether the OpenSSH that printed `version` (`OpenSSH_9.2p1 Debian-2`) expands `%`
/// tokens in `UserKnownHostsFile`. A version it cannot read counts as a current one.
fn percent_tokens_in(version: &str) -> bool {
    let parsed = version.split_once("OpenSSH_").and_then(|(_, v)| {
        let mut parts = v.split(|c: char| !c.is_ascii_digit());
        Some((
            parts.next()?.parse::<u32>().ok()?,
            parts.next()?.parse::<u32>().ok()?,
        ))
    });
    parsed.is_none_or(|v| v >= (8, 4))
}

pub fn run(paths: &Paths, a: &SshArgs) -> Result<Report> {
    let mut cmd = ssh_command(paths, a)?;
    let err = cmd.exec();
    bail!(
        "machine `{}`: running ssh: {err}; install openssh-client",
        a.name
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The real ssh (`ssh -G` prints the configuration it would use) reads the quoted
    /// argument back as the one path, spaces, commas and `%` included.
    #[test]
    fn ssh_reads_a_state_path_with_spaces_and_percent_as_one_file() {
        let path = std::path::Path::new("/srv/vm state, one/100%/.seedctl/web1/known_hosts");
        let opt = format!(
            "UserKnownHostsFile={}",
            ssh_option_path(path, ssh_expands_percent()).unwrap()
        );
        let out = Command::new("ssh")
            .args(["-G", "-o", &opt, "127.0.0.1"])
            .output()
            .expect("ssh (openssh-client) runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("userknownhostsfile "))
            .unwrap_or_default();
        assert_eq!(line, path.display().to_string(), "ssh -G said:\n{text}");
        // As it was passed before: ssh does not read that path back.
        let bare = format!("UserKnownHostsFile={}", path.display());
        let out = Command::new("ssh")
            .args(["-G", "-o", &bare, "127.0.0.1"])
            .output()
            .expect("ssh (openssh-client) runs");
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("userknownhostsfile "));
        assert_ne!(line, Some(path.display().to_string().as_str()));
    }

    #[test]
    fn percent_is_doubled_only_for_an_ssh_that_expands_it() {
        assert!(percent_tokens_in(
            "OpenSSH_9.2p1 Debian-2+deb12u6, OpenSSL 3.0.19"
        ));
        assert!(percent_tokens_in("OpenSSH_8.4p1"));
        assert!(!percent_tokens_in(
            "OpenSSH_8.2p1 Ubuntu-4ubuntu0.11, OpenSSL 1.1.1f"
        ));
        assert!(!percent_tokens_in("OpenSSH_7.4p1, OpenSSL 1.0.2k-fips"));
        assert!(percent_tokens_in("something else"));
        let p = std::path::Path::new("/srv/100%/known_hosts");
        assert_eq!(
            ssh_option_path(p, false).unwrap(),
            "\"/srv/100%/known_hosts\""
        );
        assert_eq!(
            ssh_option_path(p, true).unwrap(),
            "\"/srv/100%%/known_hosts\""
        );
    }

    #[test]
    fn a_path_with_a_double_quote_is_refused_with_its_name() {
        let err = ssh_option_path(std::path::Path::new("/srv/a\"b/known_hosts"), true)
            .unwrap_err()
            .to_string();
        assert!(err.contains("/srv/a\"b/known_hosts"), "{err}");
    }
}
