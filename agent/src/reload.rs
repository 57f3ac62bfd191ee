//! After a live change (a push or a rollback): tell the running services. hostname via
//! sethostname(2), sshd and networkd through systemd's D-Bus API, the firewall through
//! `nft -f`. machine-id cannot change under a running systemd: the bind keeps it until
//! the reboot (`stage::BindTime`).

use std::path::Path;

use anyhow::{Context, Result};
use nixseed_core::identity;

/// What a live change told the running services.
#[derive(Debug, Default)]
pub struct Effects {
    /// Told and done: `hostname`, `sshd`, `systemd-networkd`, `nftables`.
    pub reloaded: Vec<String>,
    /// What was to be told and did not take it, each as "what: why".
    pub failed: Vec<String>,
}

impl Effects {
    fn record(&mut self, what: &str, result: Result<()>) {
        match result {
            Ok(()) => self.reloaded.push(what.into()),
            Err(e) => {
                tracing::warn!("{what} did not take the new identity: {e:#}");
                self.failed.push(format!("{what}: {e:#}"));
            }
        }
    }
}

/// How long telling the services may take in all before what is left is reported as
/// not finished: below the 30 s the host's `seedctl push` waits by default (a restart of
/// sshd takes a few seconds in a TCG guest).
const LIVE_BUDGET: std::time::Duration = std::time::Duration::from_secs(20);

/// Runs one step of telling the services, within what is left of the budget.
async fn within<T>(
    deadline: tokio::time::Instant,
    fut: impl std::future::Future<Output = Result<T>>,
) -> Result<T> {
    tokio::time::timeout_at(deadline, fut).await.map_err(|_| {
        anyhow::anyhow!("did not finish within the {LIVE_BUDGET:?} a live change may take")
    })?
}

/// Applies the effects of the changed files (names relative to a generation); returns
/// what was told, and what failed.
/// `first_identity`: there was no generation before this one (a boot that found no seed),
/// or this retries the reloads of the push that brought the first, so sshd, which has no
/// host key without one (the NixOS module skips it by condition), is started rather than
/// only restarted when running.
pub async fn after_change(
    changed: &[String],
    identity_dir: &Path,
    firewall: bool,
    first_identity: bool,
) -> Effects {
    let mut out = Effects::default();
    let deadline = tokio::time::Instant::now() + LIVE_BUDGET;
    let has = |p: &str| {
        changed
            .iter()
            .any(|c| c == p || c.starts_with(&format!("{p}/")))
    };
    if has(identity::HOSTNAME) {
        out.record(
            "hostname",
            set_hostname(&identity_dir.join(identity::HOSTNAME)),
        );
    }
    // sshd and networkd are told at the same time, so a slow restart of one does not
    // use up the other's time.
    let sshd = async {
        // users.json holds ssh_pwauth, which sshd reads only when it starts.
        if !(has(identity::SSH_HOST_KEY) || has(identity::SSH_HOST_KEY_PUB) || has(identity::USERS))
        {
            return None;
        }
        let how = if first_identity {
            "RestartUnit"
        } else {
            "TryRestartUnit"
        };
        Some(within(deadline, restart_sshd(how, deadline)).await)
    };
    let networkd = async {
        if !has(identity::NETWORK_DIR) {
            return None;
        }
        Some(within(deadline, networkd_reload()).await)
    };
    let (sshd, networkd) = tokio::join!(sshd, networkd);
    if let Some(r) = sshd {
        out.record("sshd", r);
    }
    if let Some(r) = networkd {
        out.record("systemd-networkd", r);
    }
    if firewall && (has(identity::TCP_PORTS) || has(identity::UDP_PORTS)) {
        out.record("nftables", load_firewall(identity_dir));
    }
    out
}

/// How long a ruleset load may take before `nft` is stopped and the reload reported
/// failed.
const NFT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub(crate) fn set_hostname(file: &Path) -> Result<()> {
    let name =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let name = name.trim();
    if !name.is_empty() {
        nix::unistd::sethostname(name)
            .with_context(|| format!("cannot set the hostname to {name}"))?;
    }
    Ok(())
}

/// The units sshd runs as: ssh.service on Debian (sshd.service is its alias there),
/// sshd.service on NixOS.
const SSHD_UNITS: [&str; 2] = ["ssh.service", "sshd.service"];
/// The sockets that start sshd on a connection (NixOS `startWhenNeeded`, Debian's and
/// Ubuntu's ssh.socket): an sshd started that way reads the host key at that start.
const SSHD_SOCKETS: [&str; 2] = ["ssh.socket", "sshd.socket"];

/// The socket of the same name as an sshd unit (`ssh.socket` for `ssh.service`): the one
/// that starts this sshd (`Accept=no`) or its per-connection instances (`Accept=yes`).
fn paired_socket(unit: &str) -> String {
    format!("{}.socket", unit.trim_end_matches(".service"))
}

/// The job that makes sshd take a new key. `RestartUnit` becomes `TryRestartUnit` while
/// the unit's own socket listens: a start of the service would fail on the port the
/// socket holds, or stop a socket that conflicts with it, and the sshd the socket starts
/// reads the new key anyway; a service that runs is still restarted.
fn sshd_job(method: &'static str, paired_socket_listens: bool) -> &'static str {
    if method == "RestartUnit" && paired_socket_listens {
        "TryRestartUnit"
    } else {
        method
    }
}

/// `method`: `TryRestartUnit` (leaves a unit that is not running alone) or `RestartUnit`
/// (starts it), on the first of [`SSHD_UNITS`] the image has. Before `RestartUnit` the
/// unit's failed state is reset: an sshd that kept failing without a host key until
/// systemd's start limit would refuse the start. The job is the one [`sshd_job`] picks.
/// It is followed to its end, and the unit must then be active, or its own socket
/// ([`paired_socket`]) listening, or, with no sshd service at all, one of
/// [`SSHD_SOCKETS`]: any refusal but "no such unit", any job result but `done`, and an
/// sshd left down (a try-restart of an sshd that was not running, a start its condition
/// skipped) is an error. An sshd that systemd calls started when its process runs
/// (`Type=simple`, as older NixOS releases' sshd.service is) is then watched until it
/// listens: see [`stays_up`].
async fn restart_sshd(method: &'static str, deadline: tokio::time::Instant) -> Result<()> {
    use crate::dbus::{Arg, DbusError, call, run_job, unit_active_state, unit_state};
    let no_such_unit = |e: &DbusError| matches!(e, DbusError::Remote { name, .. } if name == "org.freedesktop.systemd1.NoSuchUnit");
    let socket_active =
        async |socket: &str| unit_active_state(socket).await.is_ok_and(|s| s == "active");
    for unit in SSHD_UNITS {
        if method == "RestartUnit" {
            match call(
                "org.freedesktop.systemd1",
                "/org/freedesktop/systemd1",
                "org.freedesktop.systemd1.Manager",
                "ResetFailedUnit",
                &[Arg::Str(unit)],
            )
            .await
            {
                Ok(()) => {}
                Err(e) if no_such_unit(&e) => {}
                Err(e) => return Err(e).context(format!("resetting {unit}'s failed state")),
            }
        }
        let socket = paired_socket(unit);
        let job = sshd_job(
            method,
            method == "RestartUnit" && socket_active(&socket).await,
        );
        match run_job(job, &[Arg::Str(unit), Arg::Str("replace")], LIVE_BUDGET).await {
            Ok(result) if result == "done" => {
                let state = unit_state(unit)
                    .await
                    .with_context(|| format!("{unit}'s state after {job}"))?;
                return match after_done(&state) {
                    AfterJob::Up => Ok(()),
                    AfterJob::Watch => stays_up(unit, job, &state, deadline).await,
                    AfterJob::Restarting => anyhow::bail!(
                        "{unit}'s main process exited right after {job} and systemd is \
                         restarting it (journalctl -u {unit} says why)"
                    ),
                    AfterJob::Down if socket_active(&socket).await => Ok(()),
                    AfterJob::Down => anyhow::bail!(
                        "{unit} is {} after {job} (journalctl -u {unit} says why)",
                        state.active
                    ),
                };
            }
            Ok(result) => anyhow::bail!(
                "{job} {unit}: the job ended '{result}' (journalctl -u {unit} says why)"
            ),
            Err(e) if no_such_unit(&e) => {}
            Err(e) => return Err(e).context(format!("{job} {unit}")),
        }
    }
    for socket in SSHD_SOCKETS {
        if socket_active(socket).await {
            return Ok(());
        }
    }
    anyhow::bail!(
        "none of {} is a unit here, and none of {} listens",
        SSHD_UNITS.join(", "),
        SSHD_SOCKETS.join(", ")
    )
}

/// Service types systemd calls started as soon as the process runs, before it has read
/// its configuration.
const STARTED_AT_FORK: [&str; 3] = ["simple", "exec", "idle"];

/// How long an sshd that systemd called started at fork is watched for listening.
const SETTLE: std::time::Duration = std::time::Duration::from_secs(5);

/// What a restart job that ended `done` left.
#[derive(Debug, PartialEq, Eq)]
enum AfterJob {
    /// Up, and systemd calls it started only once it is ready.
    Up,
    /// Up, but started at fork: to be watched until it listens ([`stays_up`]).
    Watch,
    /// Its process has already exited, and systemd's automatic restart is pending.
    Restarting,
    /// Not running (a socket may still start it on a connection).
    Down,
}

fn after_done(state: &crate::dbus::UnitState) -> AfterJob {
    if state.sub.starts_with("auto-restart") {
        AfterJob::Restarting
    } else if !state.is_up() {
        AfterJob::Down
    } else if STARTED_AT_FORK.contains(&state.service_type.as_str()) {
        AfterJob::Watch
    } else {
        AfterJob::Up
    }
}

/// Watches an sshd systemd has just called started at fork: it has taken the new host
/// key once its main process listens (sshd exits before listening when it has no usable
/// host key). Its main process exiting, or systemd restarting it, first is an error; a
/// new main process started by someone else (a second restart) is watched in its place.
/// An sshd still up but not seen listening after [`SETTLE`] (or when the live change's
/// `deadline` is near) counts as taken, with a warning.
async fn stays_up(
    unit: &str,
    method: &str,
    started: &crate::dbus::UnitState,
    deadline: tokio::time::Instant,
) -> Result<()> {
    let since = std::time::Instant::now();
    let give_up = (tokio::time::Instant::now() + SETTLE)
        .min(deadline - std::time::Duration::from_millis(500));
    // Opened at the first reading: an sshd already listening needs none.
    let mut reader: Option<crate::dbus::UnitReader> = None;
    let mut watched = started.clone();
    let mut now = started.clone();
    loop {
        if let Some(why) = went_down(&watched, &now) {
            anyhow::bail!(
                "{unit}'s main process {why} {:.1} s after {method} ended, before it was seen \
                 listening (journalctl -u {unit} says why)",
                since.elapsed().as_secs_f64()
            );
        }
        watched = now;
        if listens(watched.main_pid) {
            return Ok(());
        }
        if tokio::time::Instant::now() >= give_up {
            tracing::warn!(
                "{unit} is up but its main process {} was not seen listening {:.1} s after \
                 {method}: counted as having taken the new host key",
                watched.main_pid,
                since.elapsed().as_secs_f64()
            );
            return Ok(());
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        let r = match &mut reader {
            Some(r) => r,
            None => reader.insert(
                crate::dbus::UnitReader::open()
                    .await
                    .with_context(|| format!("watching {unit} after {method}"))?,
            ),
        };
        now = r
            .read(unit)
            .await
            .with_context(|| format!("{unit}'s state after {method}"))?;
    }
}

/// How a service whose main process ran at `before` has gone down by `now`, if it has.
/// Another main process, up, without an automatic restart, is a restart by someone else
/// and not a failure.
fn went_down(before: &crate::dbus::UnitState, now: &crate::dbus::UnitState) -> Option<String> {
    if now.sub.starts_with("auto-restart") {
        Some("exited and systemd is restarting it".into())
    } else if now.restarts != before.restarts {
        Some("exited and systemd restarted it".into())
    } else if !now.is_up() {
        Some(format!(
            "exited (the unit is now {}/{})",
            now.active, now.sub
        ))
    } else if now.main_pid == 0 {
        Some(format!(
            "is gone (the unit is {}/{} without one)",
            now.active, now.sub
        ))
    } else {
        None
    }
}

/// Whether process `pid` holds a listening TCP socket of its own: its socket inodes (from
/// `/proc/PID/fd`) against the listening entries of its network namespace's TCP tables.
/// Sockets PID 1 holds too (a `.socket` unit's, passed to the service) do not count: the
/// service has them before it has read anything.
fn listens(pid: u32) -> bool {
    if pid == 0 {
        return false;
    }
    let sockets = |pid: u32| -> std::io::Result<Vec<u64>> {
        Ok(std::fs::read_dir(format!("/proc/{pid}/fd"))?
            .filter_map(|fd| std::fs::read_link(fd.ok()?.path()).ok())
            .filter_map(|target| {
                let t = target.to_str()?;
                t.strip_prefix("socket:[")?.strip_suffix(']')?.parse().ok()
            })
            .collect())
    };
    let own = match sockets(pid) {
        Ok(own) => own,
        Err(e) => {
            tracing::debug!("cannot read /proc/{pid}/fd: {e}");
            return false;
        }
    };
    let inherited = sockets(1).unwrap_or_default();
    ["tcp", "tcp6"].iter().any(|table| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{table}")).is_ok_and(|text| {
            nixseed_core::qga::sysparse::proc_net_tcp_listening(&text)
                .iter()
                .any(|inode| own.contains(inode) && !inherited.contains(inode))
        })
    })
}

async fn networkd_reload() -> Result<()> {
    crate::dbus::call(
        "org.freedesktop.network1",
        "/org/freedesktop/network1",
        "org.freedesktop.network1.Manager",
        "Reload",
        &[],
    )
    .await
    .context("org.freedesktop.network1.Manager.Reload")
}

/// Loads the `inet nixseed` table from the identity's port files with `nft -f -`.
pub fn load_firewall(identity_dir: &Path) -> Result<()> {
    use std::io::Write;
    let read = |name: &str| -> Result<Vec<String>> {
        let path = identity_dir.join(name);
        // No file: no ports. One that cannot be read must not load a ruleset without them.
        let text = match std::fs::read_to_string(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            read => read.with_context(|| format!("cannot read {}", path.display()))?,
        };
        nixseed_core::firewall::parse_ports(&text, &path.display().to_string())
            .map_err(anyhow::Error::msg)
    };
    let rules =
        nixseed_core::firewall::render(&read(identity::TCP_PORTS)?, &read(identity::UDP_PORTS)?);
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        // Not this process's stdout: in `nixseed-agent request` that carries the reply.
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("cannot run nft (is nftables installed?)")?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(rules.as_bytes())
            .context("cannot send the ruleset to nft")?;
    }
    // The agent answers the guest agent's port on the same thread: an `nft` that hangs
    // (a netlink lock held elsewhere) must not stop the thaw of a backup.
    let deadline = std::time::Instant::now() + NFT_TIMEOUT;
    while child.try_wait().context("nft did not finish")?.is_none() {
        if std::time::Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!(
                "nft did not load the nixseed ruleset from {} within {} s and was stopped",
                identity_dir.display(),
                NFT_TIMEOUT.as_secs()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let out = child.wait_with_output().context("nft did not finish")?;
    if !out.status.success() {
        anyhow::bail!(
            "nft refused the nixseed ruleset from {}: {}",
            identity_dir.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dbus::UnitState;

    #[test]
    fn a_listening_socket_is_found_by_inode() {
        // This process, while it holds a listening socket, and a child that holds none.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(listens(std::process::id()));
        drop(listener);
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        assert!(!listens(child.id()));
        let _ = child.kill();
        let _ = child.wait();
        assert!(!listens(0));
    }

    fn state(active: &str, sub: &str, main_pid: u32, restarts: u32) -> UnitState {
        UnitState {
            active: active.into(),
            sub: sub.into(),
            service_type: "simple".into(),
            main_pid,
            restarts,
        }
    }

    #[test]
    fn a_first_identity_starts_sshd_unless_its_own_socket_listens() {
        assert_eq!(paired_socket("ssh.service"), "ssh.socket");
        assert_eq!(paired_socket("sshd.service"), "sshd.socket");
        assert_eq!(sshd_job("RestartUnit", false), "RestartUnit");
        assert_eq!(sshd_job("RestartUnit", true), "TryRestartUnit");
        assert_eq!(sshd_job("TryRestartUnit", false), "TryRestartUnit");
        assert_eq!(sshd_job("TryRestartUnit", true), "TryRestartUnit");
    }

    #[test]
    fn a_done_restart_is_judged_by_the_state_it_left() {
        let notify = UnitState {
            service_type: "notify".into(),
            ..state("active", "running", 100, 0)
        };
        assert_eq!(after_done(&notify), AfterJob::Up);
        assert_eq!(
            after_done(&state("active", "running", 100, 0)),
            AfterJob::Watch
        );
        assert_eq!(
            after_done(&state("reloading", "reload", 100, 0)),
            AfterJob::Watch
        );
        assert_eq!(
            after_done(&state("activating", "auto-restart", 0, 0)),
            AfterJob::Restarting
        );
        assert_eq!(
            after_done(&state("activating", "auto-restart-queued", 0, 0)),
            AfterJob::Restarting
        );
        assert_eq!(after_done(&state("failed", "failed", 0, 0)), AfterJob::Down);
        assert_eq!(after_done(&state("inactive", "dead", 0, 0)), AfterJob::Down);
    }

    #[test]
    fn a_service_went_down_when_its_main_process_exited() {
        let up = state("active", "running", 100, 0);
        assert_eq!(went_down(&up, &up.clone()), None);
        assert_eq!(
            went_down(&up, &state("failed", "failed", 0, 0)).as_deref(),
            Some("exited (the unit is now failed/failed)")
        );
        assert_eq!(
            went_down(&up, &state("activating", "auto-restart", 0, 0)).as_deref(),
            Some("exited and systemd is restarting it")
        );
        assert_eq!(
            went_down(&up, &state("activating", "auto-restart-queued", 0, 0)).as_deref(),
            Some("exited and systemd is restarting it")
        );
        assert_eq!(
            went_down(&up, &state("active", "running", 200, 1)).as_deref(),
            Some("exited and systemd restarted it")
        );
        assert_eq!(
            went_down(&up, &state("active", "exited", 0, 0)).as_deref(),
            Some("is gone (the unit is active/exited without one)")
        );
        // Restarted by someone else: the new process is watched instead.
        assert_eq!(went_down(&up, &state("active", "running", 300, 0)), None);
    }
}
