//! The guest-agent half of `nixseed-agent serve`: one [`Agent`] holds the protocol
//! session and the command state (frozen filesystems, open files, spawned processes)
//! and answers requests through the registry. Transports live in `serve.rs`.

mod exec;
mod file;
mod fs;
mod fsfreeze;
pub use fsfreeze::{frozen, logging_allowed};
mod network;
mod password;
mod registry;
mod shutdown;
mod ssh_keys;
mod sync;
mod system;

use std::collections::VecDeque;
use std::path::PathBuf;

use nixseed_core::qga::commands::{self, CommandPolicy, FROZEN_REASON};
use nixseed_core::qga::envelope::parse_request;
use nixseed_core::qga::framer::Framed;
use nixseed_core::qga::{Args, QgaError, Reply, Session};
use serde_json::Value;

/// What `serve` was told on the command line or in qemu-ga.conf.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub policy: CommandPolicy,
    /// `-t`: where the frozen marker and the file-handle counter live.
    pub state_dir: PathBuf,
    /// `-F`: run with `freeze` before freezing and `thaw` after thawing.
    pub fsfreeze_hook: Option<PathBuf>,
    /// Where `guest-ssh-*-authorized-keys` read and write.
    pub identity_dir: PathBuf,
    /// The account whose keys are `admin_authorized_keys` (sshd's match for that file).
    pub admin_user: String,
    /// The account whose keys are `user_authorized_keys`, if any.
    pub ssh_user: Option<String>,
    /// When not empty, `guest-file-open` only opens files under these directories.
    pub file_dirs: Vec<PathBuf>,
}

/// A command's result: `Ok(None)` sends nothing (success-less commands).
pub type CmdResult = Result<Option<Value>, QgaError>;

pub struct Agent {
    pub session: Session,
    pub config: AgentConfig,
    frozen: bool,
    exec: exec::Processes,
    files: file::Handles,
    /// Requests read but not answered yet: each is answered, and its reply written,
    /// before the next, so one read's replies are never all held at once.
    pending: VecDeque<Framed>,
    /// Requests other than the always-allowed ones (sync, ping, info, freeze status and
    /// thaw) draw from this bucket.
    limit: nixseed_core::qga::limit::TokenBucket,
    /// The identity lock, held from a freeze to its thaw (see `fsfreeze::freeze_holding`).
    freeze_lock: Option<crate::identity_lock::IdentityLock>,
    /// Whether the last limited request had to wait (the warning is logged once a run).
    paced: bool,
    started: std::time::Instant,
}

/// Burst and sustained rate for commands that do real work (past the burst they are
/// paced, not refused). Proxmox polls guest-network-get-interfaces every 10 s; a backup
/// makes a handful of calls.
const RATE_BURST: u32 = 200;
const RATE_PER_SECOND: u32 = 50;

impl Agent {
    pub fn new(config: AgentConfig) -> anyhow::Result<Self> {
        use anyhow::Context;
        std::fs::create_dir_all(&config.state_dir).with_context(|| {
            format!(
                "cannot create the state directory {}",
                config.state_dir.display()
            )
        })?;
        // A marker left by a crashed agent means filesystems may still be frozen:
        // start restricted, as qemu-ga does, until the host sends guest-fsfreeze-thaw.
        let frozen = fsfreeze::marker(&config.state_dir).exists();
        if frozen {
            tracing::warn!(
                "{} exists: starting in frozen state until guest-fsfreeze-thaw",
                fsfreeze::marker(&config.state_dir).display()
            );
            fsfreeze::note_frozen(true);
        }
        let files = file::Handles::load(&config.state_dir);
        Ok(Agent {
            session: Session::new(),
            config,
            frozen,
            exec: exec::Processes::default(),
            files,
            pending: VecDeque::new(),
            limit: nixseed_core::qga::limit::TokenBucket::new(RATE_BURST, RATE_PER_SECOND),
            freeze_lock: None,
            paced: false,
            started: std::time::Instant::now(),
        })
    }

    /// Takes bytes read from the port; the requests they complete wait for
    /// [`Agent::answer_next`].
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut framed = Vec::new();
        self.session.framer.feed(bytes, &mut framed);
        self.pending.extend(framed);
    }

    /// Answers the oldest request read, appending its reply (if it has one) to `out`;
    /// false when none is waiting.
    pub async fn answer_next(&mut self, out: &mut Vec<u8>) -> bool {
        let Some(f) = self.pending.pop_front() else {
            return false;
        };
        if let Some(reply) = self.dispatch(f).await {
            self.session.encode(&reply, out);
        }
        true
    }

    async fn dispatch(&mut self, framed: Framed) -> Option<Reply> {
        let value = match framed {
            Ok(v) => v,
            Err(error) => {
                if nixseed_core::qga::framer::is_resync(&error) {
                    tracing::debug!("parser reset by the host (0xFF)");
                } else {
                    tracing::warn!("failed to parse request: {}", error.desc);
                }
                return Some(Reply::Error { error, id: None });
            }
        };
        let req = match parse_request(value) {
            Ok(r) => r,
            Err((error, id)) => return Some(Reply::Error { error, id }),
        };
        let id = req.id.clone();
        let result = self.run(&req.execute, Args::new(req.arguments)).await;
        match result {
            Ok(Some(value)) => Some(Reply::Return { value, id }),
            Ok(None) => None,
            Err(error) => {
                tracing::debug!("{}: {}", req.execute, error.desc);
                Some(Reply::Error { error, id })
            }
        }
    }

    /// Whether `name` would run now (for `guest-info` and dispatch).
    pub fn enabled(&self, info: &commands::CommandInfo) -> bool {
        (!self.frozen || info.allowed_while_frozen) && self.config.policy.enabled(info)
    }

    async fn run(&mut self, name: &str, args: Args) -> CmdResult {
        let (Some(info), Some(handler)) = (commands::lookup(name), registry::handler(name)) else {
            return Err(QgaError::not_found(name));
        };
        if self.frozen && !info.allowed_while_frozen {
            return Err(QgaError::disabled(name, Some(FROZEN_REASON)));
        }
        if !self.config.policy.enabled(info) {
            return Err(QgaError::disabled(
                name,
                refusal_reason(&self.config.policy, info),
            ));
        }
        // sync, ping, info, freeze status and thaw are never limited: a client must always
        // be able to resynchronise and to thaw. The rest wait their turn past the burst.
        if !info.allowed_while_frozen {
            let wait = self.limit.take(self.started.elapsed().as_secs_f64());
            if wait > 0.0 {
                if !self.paced {
                    tracing::warn!(
                        "guest agent: more than {RATE_BURST} requests at over {RATE_PER_SECOND}/s: pacing them from {name} on"
                    );
                }
                self.paced = true;
                tokio::time::sleep(std::time::Duration::from_secs_f64(wait)).await;
            } else {
                self.paced = false;
            }
        }
        if info.unsafe_by_default {
            tracing::warn!(
                "AUDIT guest agent: running {name} (enabled by the allow-list) with arguments [{}]",
                args.names().join(", ")
            );
        } else {
            tracing::debug!("running {name}");
        }
        match handler {
            registry::Handler::Sync(f) => f(self, args),
            registry::Handler::Async(f) => f(self, args).await,
        }
    }

    /// Thaws filesystems this agent (or a crashed predecessor) froze; used on exit.
    pub fn thaw_for_exit(&mut self) {
        self.thaw_because("before exiting");
    }

    /// The port went away (the host detached the channel): the host that could thaw is
    /// gone with it, so frozen filesystems are thawed as on exit, what the host had half
    /// sent, or sent and not seen answered, is dropped, and its guest-file handles are
    /// closed. guest-exec's processes run on, as they would after a new connection.
    pub fn port_gone(&mut self) {
        self.thaw_because("as the guest agent's port went away");
        self.session = Session::new();
        self.pending.clear();
        // No host that comes with the port again knows its handles (their numbers are
        // never given out again either way).
        self.files.close_all();
    }

    fn thaw_because(&mut self, why: &str) {
        if self.frozen {
            match fsfreeze::thaw_all(self) {
                Ok(n) => tracing::info!("thawed {n} filesystem(s) {why}"),
                Err(e) => tracing::error!("thaw {why} failed: {}", e.desc),
            }
        }
    }
}

/// Why the command-line lists refuse `c`, for the `Command X has been disabled: REASON`
/// error (class CommandNotFound, as qemu-ga). `-b` gives no reason, as qemu-ga 7.2 and
/// 8.x; `-a` gives qemu-ga 8.x's `the command is not allowed`; an unsafe command nixseed
/// keeps off by default says how to enable it.
fn refusal_reason(policy: &CommandPolicy, c: &commands::CommandInfo) -> Option<&'static str> {
    let named = |list: &[String]| list.iter().any(|n| n == c.name);
    if named(&policy.block) {
        None
    } else if !policy.allow.is_empty() && !named(&policy.allow) {
        Some("the command is not allowed")
    } else if c.unsafe_by_default {
        Some(UNSAFE_REASON)
    } else {
        None
    }
}

/// The reason an unsafe command is refused when no list names it.
const UNSAFE_REASON: &str =
    "the command is unsafe and off by default; name it in --unsafe-rpcs (or -a) to enable it";

/// Capitalised strerror text (`No such file or directory`), as qemu-ga prints it.
pub(crate) fn errno_text(e: nix::errno::Errno) -> String {
    std::io::Error::from_raw_os_error(e as i32)
        .to_string()
        .split(" (os error")
        .next()
        .unwrap_or_default()
        .to_string()
}

pub(crate) fn io_text(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(n) => errno_text(nix::errno::Errno::from_raw(n)),
        None => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str], block: &[&str]) -> CommandPolicy {
        let list = |l: &[&str]| l.iter().map(|s| s.to_string()).collect();
        CommandPolicy {
            allow: list(allow),
            block: list(block),
            unsafe_allowed: Vec::new(),
        }
    }

    fn info(name: &str) -> &'static commands::CommandInfo {
        commands::lookup(name).expect("a command the agent implements")
    }

    /// A port that goes away takes what its host had half sent with it: the request of
    /// the host that comes with the port again is answered as it was sent, not read as
    /// the tail of the old half.
    #[test]
    fn a_port_gone_drops_what_the_host_half_sent() {
        let dir = tempfile::tempdir().unwrap();
        let mut agent = Agent::new(AgentConfig {
            policy: CommandPolicy::default(),
            state_dir: dir.path().join("state"),
            fsfreeze_hook: None,
            identity_dir: dir.path().join("identity"),
            admin_user: "root".into(),
            ssh_user: None,
            file_dirs: Vec::new(),
        })
        .unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let ping = b"{\"execute\":\"guest-ping\"}\n";
        let answer = |agent: &mut Agent| {
            let mut out = Vec::new();
            assert!(rt.block_on(agent.answer_next(&mut out)), "no request read");
            String::from_utf8(out).unwrap()
        };

        agent.feed(b"{\"execute\":\"guest-pi");
        agent.port_gone();
        agent.feed(ping);
        assert_eq!(answer(&mut agent).trim(), r#"{"return": {}}"#);

        // Kept across a mere reconnection of the host, as qemu-ga does: the same bytes
        // then make one bad request.
        agent.feed(b"{\"execute\":\"guest-pi");
        agent.feed(ping);
        assert!(answer(&mut agent).contains("\"error\""));
    }

    /// A refusal says which list refused it, as qemu-ga 8.x does for `-a`.
    #[test]
    fn refusals_give_their_reason() {
        let p = policy(&[], &["guest-ping"]);
        assert_eq!(
            refusal_reason(&p, info("guest-ping")),
            None,
            "-b: as qemu-ga"
        );
        let p = policy(&["guest-ping"], &[]);
        assert_eq!(
            refusal_reason(&p, info("guest-get-osinfo")),
            Some("the command is not allowed")
        );
        assert_eq!(
            refusal_reason(&p, info("guest-exec")),
            Some("the command is not allowed")
        );
        let p = policy(&[], &[]);
        assert_eq!(refusal_reason(&p, info("guest-exec")), Some(UNSAFE_REASON));
        assert_eq!(
            QgaError::disabled("guest-exec", refusal_reason(&p, info("guest-exec"))).desc,
            format!("Command guest-exec has been disabled: {UNSAFE_REASON}")
        );
    }
}
