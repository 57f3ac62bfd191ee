//! The nixseed control channel in the running guest: `status`, `push` (a bundle applied
//! through the same code path as a seed ISO, then the affected services reloaded) and
//! `rollback`, served on the same transports as the guest agent ([`ChannelService`]).

use std::path::PathBuf;

use anyhow::{Context, Result};
use nixseed_core::channel::{Decoder, Message, encode_with_id};
use nixseed_core::seed::Seed;

use crate::serve::{
    Answering, ByteService, Drain, Method, Transport, serve_transport, until_stopped,
};

use crate::identity_lock::IdentityLock;
use crate::sources::Env;
use crate::stage::{self, StageOptions, Timer};
use crate::store::Store;

pub struct ChannelContext {
    pub opts: StageOptions,
    pub firewall: bool,
}

impl ChannelContext {
    fn identity_path(&self) -> PathBuf {
        self.opts
            .sysroot
            .join(self.opts.identity_dir.trim_start_matches('/'))
    }
}

/// Answers one request in this process.
pub async fn handle(msg: Message, ctx: &ChannelContext) -> Message {
    let result = match msg {
        Message::Status => status(ctx),
        Message::Push { bundle } => push(bundle, ctx).await,
        Message::Rollback => rollback(ctx).await,
        other => Err(anyhow::anyhow!(
            "unexpected message {:?} from the host (expected status, push or rollback)",
            other.kind()
        )),
    };
    result.unwrap_or_else(|e| {
        tracing::warn!("control channel: {e:#}");
        Message::Error {
            message: format!("{e:#}"),
        }
    })
}

fn env(ctx: &ChannelContext) -> Env {
    Env::new(
        ctx.opts.host.clone(),
        ctx.opts.sysroot.clone(),
        ctx.opts.run.clone(),
    )
}

/// Where the changes whose reload failed are kept until a push or rollback retries them.
fn reload_pending(ctx: &ChannelContext) -> PathBuf {
    ctx.opts.run.join("nixseed/reload-pending")
}

/// The line of that record which says the changes came with the machine's first
/// identity: sshd, which had no host key before it, is then started by the retry too,
/// not only restarted if it runs.
const FIRST_IDENTITY_LINE: &str = "#first-identity";

/// The reloads an earlier push or rollback left to retry.
#[derive(Debug, Default, PartialEq)]
struct PendingReloads {
    /// The changed files (names relative to a generation) whose reload is not done.
    changes: Vec<String>,
    /// They came with the first identity ([`FIRST_IDENTITY_LINE`]).
    first_identity: bool,
}

impl PendingReloads {
    fn parse(text: &str) -> Self {
        let mut out = Self::default();
        for line in text.lines().filter(|l| !l.is_empty()) {
            if line == FIRST_IDENTITY_LINE {
                out.first_identity = true;
            } else {
                out.changes.push(line.to_owned());
            }
        }
        out
    }

    fn text(&self) -> String {
        let flag = self.first_identity.then_some(FIRST_IDENTITY_LINE);
        flag.into_iter()
            .chain(self.changes.iter().map(String::as_str))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Nothing owed: the flag alone asks for nothing, as a first identity's changes
    /// always include its host key.
    fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }
}

fn pending_reloads(ctx: &ChannelContext) -> PendingReloads {
    let record = reload_pending(ctx);
    match std::fs::read_to_string(&record) {
        Ok(t) => PendingReloads::parse(&t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => PendingReloads::default(),
        Err(e) => {
            tracing::warn!(
                "cannot read the reloads to retry from {}: {e}; retrying what /etc does not show yet only",
                record.display()
            );
            PendingReloads::default()
        }
    }
}

/// Writes the record of what is owed (whole or not at all: a half-written record would
/// read as less owed), or, with nothing owed, removes it.
fn record_reloads(ctx: &ChannelContext, owed: &PendingReloads) {
    let record = reload_pending(ctx);
    let done = if owed.changes.is_empty() {
        crate::accounts::remove_if_present(&record)
    } else {
        record
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .map_err(anyhow::Error::from)
            .and_then(|()| stage::write_atomic(&record, owed.text().as_bytes()))
    };
    if let Err(e) = done {
        tracing::warn!(
            "cannot record the reloads to retry in {}: {e:#}",
            record.display()
        );
    }
}

/// Why generation `n` is not what the running system uses, if it is not.
fn unapplied(store: &Store, n: u64, ctx: &ChannelContext) -> Option<String> {
    let bound = stage::bound_generation(&ctx.opts.run, &ctx.opts.identity_dir);
    if !bound.is_some_and(|m| stage::etc_shows(store, m, n)) {
        return Some(format!(
            "generation {n} is stored but /etc shows {}",
            bound.map_or_else(|| "no generation".to_owned(), |m| format!("generation {m}"))
        ));
    }
    if !stage::shadow_shows(store, n, &ctx.opts) {
        return Some(format!(
            "generation {n}'s passwords are not in /etc/shadow (the guest's journal says why)"
        ));
    }
    let pending = pending_reloads(ctx);
    (!pending.is_empty()).then(|| {
        format!(
            "generation {n} is bound, but reloading after {} failed",
            pending.changes.join(", ")
        )
    })
}

fn status(ctx: &ChannelContext) -> Result<Message> {
    let store = Store::open(&ctx.identity_path(), false)?;
    let current = store.current()?;
    let unapplied = current
        .as_ref()
        .and_then(|g| unapplied(&store, g.number, ctx));
    Ok(Message::StatusReply {
        generation: current.as_ref().map(|g| g.number),
        instance_id: current.as_ref().map(|g| g.manifest.instance_id.clone()),
        product_uuid: current
            .as_ref()
            .and_then(|g| g.manifest.product_uuid.clone()),
        files: current.map(|g| g.manifest.files).unwrap_or_default(),
        links: stage::links(&ctx.opts.host)
            .into_iter()
            .map(|l| (l.name, l.mac))
            .collect(),
        vm_product_uuid: env(ctx).product_uuid(),
        unapplied,
    })
}

/// A push or rollback writes to `/var`: while the guest agent holds filesystems frozen
/// (a backup in progress), that write would wait for the thaw, and the push with it.
/// Refused at once instead, by the process that holds the freeze.
fn refused_while_frozen(msg: &Message) -> Option<Message> {
    let what = match msg {
        Message::Push { bundle } => format!("push of `{}`", bundle.machine),
        Message::Rollback => "rollback".to_owned(),
        _ => return None,
    };
    crate::qga::frozen().then(|| Message::Error {
        message: format!(
            "{what} refused: filesystems are frozen by the guest agent (guest-fsfreeze-freeze, a backup in progress); try again after the thaw"
        ),
    })
}

/// How long a push or rollback waits for the identity lock: a guest-agent key change
/// holds it for milliseconds, a freeze (a backup) until its thaw.
const PUSH_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// The identity lock for `what`, or a refusal that says who may hold it, well within
/// `seedctl push`'s own wait for an answer.
fn identity_lock_for(what: &str, ctx: &ChannelContext) -> Result<IdentityLock> {
    IdentityLock::take_within(&ctx.opts.run, PUSH_LOCK_WAIT)?.with_context(|| {
        format!(
            "{what} refused: the identity has been locked for {} s (filesystems frozen by the guest agent for a backup, or another change of the identity in progress); try again after the thaw",
            PUSH_LOCK_WAIT.as_secs()
        )
    })
}

async fn push(bundle: nixseed_core::channel::Bundle, ctx: &ChannelContext) -> Result<Message> {
    let files = bundle.verify()?;
    let source = format!("channel:{}", bundle.machine);
    let seed = Seed::from_nocloud(&files, &source, None)?;
    if seed.disabled {
        anyhow::bail!(
            "the identity of `{}`: its meta-data says dsmode: disabled, so it is not applied",
            bundle.machine
        );
    }
    let env = env(ctx);
    env.check_bundle_is_mine(&seed, &bundle.machine)?;
    let _one = identity_lock_for(&format!("push of `{}`", bundle.machine), ctx)?;
    let store = Store::open(&ctx.identity_path(), true)?;
    let before = store.current_number()?;
    let mut t = Timer::new();
    let outcome = stage::apply_seed(&store, Some(&seed), &ctx.opts, &env, &mut t)?;
    let failed: Vec<String> = outcome.write_files_error.into_iter().collect();
    applied(
        &store,
        before,
        outcome.decision,
        outcome.changed,
        failed,
        ctx,
    )
    .await
}

async fn rollback(ctx: &ChannelContext) -> Result<Message> {
    // A rollback carries no signature. On a guest that takes only signed identities it
    // would bring back what a signed push replaced (an admin key taken away), and lower
    // the generation the next signed seed is held to, so a captured older one passes.
    if ctx.opts.trust.is_some() {
        anyhow::bail!(
            "rollback refused: this guest takes only signed identities (--trusted-keys), and a rollback is not signed; to go back, put the earlier identity in machines/NAME and `seedctl push` it, signed"
        );
    }
    let _one = identity_lock_for("rollback", ctx)?;
    let store = Store::open(&ctx.identity_path(), false)?;
    let before = store.current_number()?;
    // A current generation that no longer reads back is what a rollback is for: it is
    // then compared as empty, so everything the older one holds is reloaded.
    let old = match store.current() {
        Ok(g) => g.map(|g| g.tree).unwrap_or_default(),
        Err(e) => {
            tracing::warn!("rolling back from an unreadable generation: {e:#}");
            Default::default()
        }
    };
    let n = store.rollback()?;
    let new = store.read_generation(n)?.tree;
    let changed = stage::tree_changes(&old, &new);
    applied(
        &store,
        before,
        format!("rolled back to generation {n}"),
        changed,
        Vec::new(),
        ctx,
    )
    .await
}

/// Binds the current generation over `/etc` and reloads what its changes touch, when
/// the request changed it, or when an earlier one left it unbound or a reload failed
/// (the same push again is how an operator retries).
async fn applied(
    store: &Store,
    before: Option<u64>,
    decision: String,
    changed: Vec<String>,
    write_files_failed: Vec<String>,
    ctx: &ChannelContext,
) -> Result<Message> {
    let now = store.current_number()?;
    let mut effects = crate::reload::Effects::default();
    let mut reboot_required = Vec::new();
    let mut accounts_failed = None;
    let retry = pending_reloads(ctx);
    let bound = stage::bound_generation(&ctx.opts.run, &ctx.opts.identity_dir);
    if let Some(n) = now
        && (now != before
            || !bound.is_some_and(|m| stage::etc_shows(store, m, n))
            || !stage::shadow_shows(store, n, &ctx.opts)
            || !retry.is_empty())
    {
        // What the running system has not taken yet: this request's changes, those since
        // the generation /etc shows (an earlier request stopped before it recorded what
        // it owed), and the reloads that failed before.
        let shown = bound.and_then(|m| store.read_generation(m).ok());
        let shown = shown.map(|g| g.tree).unwrap_or_default();
        let mut todo = stage::tree_changes(&shown, &store.read_generation(n)?.tree);
        todo.extend(changed.iter().cloned());
        todo.extend(retry.changes);
        todo.sort();
        todo.dedup();
        // A first identity: the machine had none before this request, or none was bound
        // at this boot (sshd never had a host key), or a retry of such a request.
        let todo = PendingReloads {
            changes: todo,
            first_identity: before.is_none() || bound.is_none() || retry.first_identity,
        };
        // Recorded before anything is bound or reloaded: an agent stopped on the way (a
        // restart during sshd's wait) retries them, rather than taking them as done.
        record_reloads(ctx, &todo);
        let bound = stage::bind_generation(store, n, &ctx.opts, stage::BindTime::Live)
            .with_context(|| {
                format!(
                    "generation {n} is current but cannot be bound over /etc (the same push again, or the next boot, binds it)"
                )
            })?;
        if bound.machine_id_pending {
            reboot_required.push(nixseed_core::identity::MACHINE_ID.to_string());
        }
        accounts_failed = bound.accounts;
        crate::crashpoint::hit_async("before-reload").await;
        effects = crate::reload::after_change(
            &todo.changes,
            &ctx.identity_path(),
            ctx.firewall,
            todo.first_identity,
        )
        .await;
        // Kept while anything failed (written again, in case the first write could not
        // be made): the same push again binds and reloads again.
        if effects.failed.is_empty() && accounts_failed.is_none() {
            record_reloads(ctx, &PendingReloads::default());
        } else {
            record_reloads(ctx, &todo);
        }
    } else if let Some(n) = now
        && stage::machine_id_pending(store, n, &ctx.opts)
    {
        reboot_required.push(nixseed_core::identity::MACHINE_ID.to_string());
    }
    tracing::info!(
        "control channel: {decision}: generation {:?} -> {:?}, changed {:?}, reloaded {:?}, failed {:?}, needs reboot {:?}",
        before,
        now,
        changed,
        effects.reloaded,
        effects.failed,
        reboot_required
    );
    let mut failed = effects.failed;
    failed.extend(accounts_failed.map(|e| format!("passwords: {e}")));
    // Each says `write_files: …` itself.
    failed.extend(write_files_failed);
    Ok(Message::Applied {
        decision,
        generation: now,
        changed: if now != before { changed } else { Vec::new() },
        reboot_required,
        reloaded: effects.reloaded,
        failed,
    })
}

/// Who answers the control channel's requests: this process ([`ChannelContext`], as
/// `nixseed-agent channel` does) or a [`Helper`] run for each (the guest agent).
pub trait Answer {
    async fn answer(&self, msg: Message) -> Message;
}

impl Answer for ChannelContext {
    async fn answer(&self, msg: Message) -> Message {
        handle(msg, self).await
    }
}

impl Answer for Helper {
    async fn answer(&self, msg: Message) -> Message {
        self.run(&msg).await.unwrap_or_else(|e| {
            tracing::warn!("control channel: {e:#}");
            Message::Error {
                message: format!("{e:#}"),
            }
        })
    }
}

/// `nixseed-agent request ARGS`: one request on its stdin, its reply on its stdout. The
/// guest agent stays resident; the code that reads seeds, makes keys and binds `/etc`
/// runs only while a request is answered, in a process of its own.
pub struct Helper {
    pub program: PathBuf,
    pub args: Vec<std::ffi::OsString>,
}

/// The program beside this one that answers requests.
pub const HELPER_PROGRAM: &str = "nixseed-agent";

impl Helper {
    async fn run(&self, msg: &Message) -> Result<Message> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let shown = format!("{} request", self.program.display());
        let mut child = tokio::process::Command::new(&self.program)
            .arg("request")
            .args(&self.args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            // Its log on its stderr, which is this process's: under systemd, the stream
            // journald opened for this unit, so its lines are the unit's even once it
            // has exited (a short-lived process's own journal messages may not be).
            .env("NIXSEED_LOG_STDERR", "1")
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot run `{shown}` to answer a {}", msg.kind()))?;
        // It reads the whole request before it answers, so the request is written whole
        // first. One that stopped early has its exit status reported below.
        if let Some(mut stdin) = child.stdin.take() {
            let written = stdin.write_all(&encode_with_id(msg, None)).await;
            if let Err(e) = written
                && e.kind() != std::io::ErrorKind::BrokenPipe
            {
                return Err(e).with_context(|| format!("cannot write the request to `{shown}`"));
            }
        }
        let mut out = Vec::new();
        if let Some(mut stdout) = child.stdout.take() {
            stdout
                .read_to_end(&mut out)
                .await
                .with_context(|| format!("cannot read the reply of `{shown}`"))?;
        }
        let status = child
            .wait()
            .await
            .with_context(|| format!("cannot wait for `{shown}`"))?;
        let mut decoder = Decoder::default();
        decoder.push(&out);
        match decoder.next_frame() {
            Ok(Some((reply, _))) => Ok(reply),
            Ok(None) => anyhow::bail!(
                "`{shown}` stopped ({status}) before it answered the {} (the guest's journal says why)",
                msg.kind()
            ),
            Err(e) => Err(e).with_context(|| format!("the reply of `{shown}` ({status})")),
        }
    }
}

/// `nixseed-agent request`: answers the one request on stdin, the reply on stdout.
pub async fn answer_stdin(ctx: &ChannelContext) -> Result<()> {
    use std::io::{Read, Write};
    // Stopping the agent sends SIGTERM to the unit's every process, this one included;
    // the agent lets the request finish and sends its reply before it exits, so this
    // process must not die of it. Handled, the signal is only recorded (SIGKILL, from
    // the agent's limit or from systemd's, still ends it), and the programs it runs
    // start with the default action again (one already running then, such as `nft`,
    // is stopped with the unit, and its step is reported failed).
    use tokio::signal::unix::{SignalKind, signal};
    let _finish_on_sigterm = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    // And SIGINT, which a terminal sends the agent's whole process group.
    let _finish_on_sigint = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    let mut input = Vec::new();
    std::io::stdin()
        .lock()
        .take(nixseed_core::channel::MAX_FRAME as u64 + 64)
        .read_to_end(&mut input)
        .context("cannot read the request from stdin")?;
    let mut decoder = Decoder::default();
    decoder.push(&input);
    let reply = match decoder.next_frame() {
        Ok(Some((msg, _))) => handle(msg, ctx).await,
        Ok(None) => anyhow::bail!("no whole request on stdin ({} bytes)", input.len()),
        Err(e) => Message::Error {
            message: e.to_string(),
        },
    };
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(&encode_with_id(&reply, None))
        .and_then(|()| stdout.flush())
        .context("cannot write the reply to stdout")
}

/// The control channel as a [`ByteService`]: frames in, replies out.
pub struct ChannelService<A> {
    decoder: Decoder,
    answerer: A,
    drain: Drain,
    /// Held from a request's start until the serving loop comes back for the next one,
    /// which it does once the reply is written.
    answering: Option<Answering>,
}

impl<A: Answer> ChannelService<A> {
    pub fn new(answerer: A) -> Self {
        ChannelService {
            decoder: Decoder::default(),
            answerer,
            drain: Drain::default(),
            answering: None,
        }
    }

    /// What tells the serving loops to end after the request being answered.
    pub fn drain(&self) -> Drain {
        self.drain.clone()
    }

    async fn answer(&self, msg: Message) -> Message {
        match refused_while_frozen(&msg) {
            Some(refusal) => refusal,
            None => self.answerer.answer(msg).await,
        }
    }
}

impl<A: Answer> ByteService for ChannelService<A> {
    fn feed(&mut self, input: &[u8]) {
        self.decoder.push(input);
    }

    async fn answer_next(&mut self, out: &mut Vec<u8>) -> bool {
        // The last reply has been written (or dropped): that request is over.
        self.answering = None;
        let (reply, id) = match self.decoder.next_frame() {
            Ok(Some((msg, id))) => {
                self.answering = Some(self.drain.answering());
                (self.answer(msg).await, id)
            }
            Ok(None) => return false,
            Err(e) => {
                tracing::warn!("{e}");
                (
                    Message::Error {
                        message: e.to_string(),
                    },
                    self.decoder.refused_id(),
                )
            }
        };
        out.extend(encode_with_id(&reply, id));
        true
    }

    fn peer_closed(&mut self) {
        self.decoder = Decoder::default();
        self.answering = None;
    }

    /// `seedctl` writes its request as soon as it connects and waits for the answer; a
    /// client silent for this long holds the socket from the next push, and is closed.
    fn idle_limit(&self) -> Option<std::time::Duration> {
        Some(IDLE_CONNECTION)
    }

    fn stopping(&self) -> bool {
        self.drain.stopping()
    }
}

/// See [`ChannelService::idle_limit`].
const IDLE_CONNECTION: std::time::Duration = std::time::Duration::from_secs(10);

pub const DEFAULT_PORT: &str = "/dev/virtio-ports/org.nixseed.channel.0";

/// The control channel may be served on `transport` with these settings. Any process on
/// the host can open a guest's vsock port (AF_VSOCK asks for no privilege there), and a
/// push can give its sender root over SSH: on vsock a push must be signed.
pub fn check_transport(transport: &Transport, signed_only: bool) -> Result<()> {
    if let Transport::VsockListen(addr) = transport
        && !signed_only
    {
        anyhow::bail!(
            "the control channel on vsock {addr} needs --trusted-keys: any process on the host can open a vsock port, and an unsigned push would give it root over SSH; use a virtio-serial port (the default), or sign pushes (`seedctl keygen`)"
        );
    }
    Ok(())
}

/// Serves the control channel alone (`nixseed-agent channel`).
pub async fn run(method: Method, path: &std::path::Path, ctx: ChannelContext) -> Result<()> {
    let transport = match method {
        Method::UnixListen => Transport::UnixListen(path.to_path_buf()),
        Method::VsockListen => Transport::VsockListen(path.to_string_lossy().into_owned()),
        _ => Transport::VirtioSerial(path.to_path_buf()),
    };
    check_transport(&transport, ctx.opts.trust.is_some())?;
    let mut svc = ChannelService::new(ctx);
    let drain = svc.drain();
    until_stopped(
        serve_transport(&mut svc, &transport, true, "control-channel"),
        &drain,
    )
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_retry_of_the_first_identity_keeps_saying_so() {
        let first = PendingReloads {
            changes: vec![
                "ssh_host_ed25519_key".into(),
                "network/10-eth0.network".into(),
            ],
            first_identity: true,
        };
        assert_eq!(
            first.text(),
            "#first-identity\nssh_host_ed25519_key\nnetwork/10-eth0.network"
        );
        assert_eq!(PendingReloads::parse(&first.text()), first);
        // A record written before the flag existed, or of a later push: changes only.
        let later = PendingReloads::parse("hostname\n\nssh_host_ed25519_key\n");
        assert_eq!(later.changes, ["hostname", "ssh_host_ed25519_key"]);
        assert!(!later.first_identity);
        assert!(PendingReloads::parse("").is_empty());
    }
}
