//! `nixseed-agent serve`: the qemu-guest-agent daemon. Flags follow qemu-ga where they
//! overlap (`-m -p -b -a -t -F -c`, `QGA_CONF`) so it can stand in for qemu-ga in
//! existing units and tests. One [`Agent`] serves the port; its parser state outlives
//! connections. The runtime is single-threaded to keep the resident set small.

use std::ffi::OsString;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use nixseed_core::decide::ClonePolicy;
use nixseed_core::qga::commands::CommandPolicy;
use nixseed_core::qga::sysparse::{conf_list, qga_conf};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::channel::{ChannelService, Helper};
use crate::port_events::{NodeWatch, PortEvents};
use crate::qga::{Agent, AgentConfig};

/// A protocol served on a byte stream: bytes in, reply bytes out. The guest agent and
/// the control channel share the transports below. Replies are taken one at a time and
/// each is written before the next request is answered: one read can carry many
/// requests (40 guest-file-read of 48 MiB fit in one write), and holding all their
/// replies at once would take gigabytes.
pub(crate) trait ByteService {
    /// Takes bytes read from the peer.
    fn feed(&mut self, input: &[u8]);
    /// Answers the next complete request, appending its reply (if any) to `out`; false
    /// when no request is waiting.
    async fn answer_next(&mut self, out: &mut Vec<u8>) -> bool;
    /// The peer went away. The guest agent keeps its parser state across connections
    /// (as qemu-ga does); the control channel starts a fresh frame.
    fn peer_closed(&mut self) {}
    /// The port itself went away (the host detached it from the VM): nothing the host
    /// sent before is kept for the host that comes with the port again.
    fn port_gone(&mut self) {
        self.peer_closed();
    }
    /// How long a connection on a listening socket may stay silent before it is closed,
    /// so that the next one in the backlog is served; `None`: as long as it likes (the
    /// guest agent, as qemu-ga).
    fn idle_limit(&self) -> Option<std::time::Duration> {
        None
    }
    /// The agent was told to stop while a request was being answered: once its reply is
    /// written, the serving loop ends ([`until_stopped`]).
    fn stopping(&self) -> bool {
        false
    }
}

/// Whether a control-channel request is being answered, and whether the agent was told
/// to stop. Shared by the service, which marks each request, the serving loops, which
/// end after a reply once told to stop, and [`until_stopped`]. The runtime has one
/// thread, so plain cells do.
#[derive(Clone, Default)]
pub struct Drain(std::rc::Rc<DrainState>);

#[derive(Default)]
struct DrainState {
    answering: std::cell::Cell<bool>,
    stopping: std::cell::Cell<bool>,
}

/// Marks a request as being answered while it lives.
pub struct Answering(Drain);

impl Drop for Answering {
    fn drop(&mut self) {
        self.0.0.answering.set(false);
    }
}

impl Drain {
    /// A request is being answered until the returned guard is dropped.
    pub fn answering(&self) -> Answering {
        self.0.answering.set(true);
        Answering(self.clone())
    }

    pub fn stopping(&self) -> bool {
        self.0.stopping.get()
    }

    /// Told to stop: whether a request is being answered (and the loops are to end
    /// after its reply) rather than nothing at all.
    fn stop(&self) -> bool {
        self.0.stopping.set(true);
        self.0.answering.get()
    }
}

/// How long a stop waits for the control-channel request in progress: a push takes a few
/// seconds under TCG, its reloads wait up to 20 s for sshd, and `nft` up to 30 s. Below
/// the units' `TimeoutStopSec=` (90 s, with room for a request in `nixseed-agent
/// channel`'s own process, whose synchronous steps delay the signal's turn), so the
/// agent, not systemd's SIGKILL, decides, and thaws what the host froze on its way out.
const STOP_GRACE: Duration = Duration::from_secs(60);

/// Runs `serving` until it ends or the agent is told to stop (SIGTERM, as systemd stops
/// it, or SIGINT). A control-channel request being answered then (a push half applied)
/// is finished and its reply sent before the agent exits, for up to [`STOP_GRACE`]:
/// `systemctl stop`, or a shutdown, during `seedctl push` leaves the push taken whole
/// and the host told so, instead of stopped midway.
pub(crate) async fn until_stopped(
    serving: impl std::future::Future<Output = Result<()>>,
    drain: &Drain,
) -> Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    // Which of the two came next.
    async fn next(
        term: &mut tokio::signal::unix::Signal,
        int: &mut tokio::signal::unix::Signal,
    ) -> &'static str {
        tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        }
    }
    tokio::pin!(serving);
    let name = tokio::select! {
        r = &mut serving => return r,
        name = next(&mut term, &mut int) => name,
    };
    if !drain.stop() {
        tracing::info!("{name}: stopping");
        return Ok(());
    }
    tracing::info!(
        "{name}: stopping once the control-channel request in progress is answered (at most {} s)",
        STOP_GRACE.as_secs()
    );
    // A second signal (Ctrl-C again, `kill` again) stops without the reply.
    tokio::select! {
        r = &mut serving => {
            tracing::info!("{name}: the request in progress was answered; stopping");
            r
        }
        () = tokio::time::sleep(STOP_GRACE) => {
            tracing::warn!(
                "{name}: the control-channel request in progress was not answered within {} s; stopping without its reply",
                STOP_GRACE.as_secs()
            );
            Ok(())
        }
        second = next(&mut term, &mut int) => {
            tracing::warn!(
                "{second} again: stopping without the reply to the control-channel request in progress"
            );
            Ok(())
        }
    }
}

impl ByteService for Agent {
    fn feed(&mut self, input: &[u8]) {
        Agent::feed(self, input);
    }

    async fn answer_next(&mut self, out: &mut Vec<u8>) -> bool {
        Agent::answer_next(self, out).await
    }

    fn port_gone(&mut self) {
        Agent::port_gone(self);
    }
}

pub const DEFAULT_VIRTIO_PATH: &str = "/dev/virtio-ports/org.qemu.guest_agent.0";
pub const DEFAULT_SERIAL_PATH: &str = "/dev/ttyS0";
pub const DEFAULT_STATE_DIR: &str = "/run/nixseed-agent";
pub const DEFAULT_FSFREEZE_HOOK: &str = "/etc/qemu/fsfreeze-hook";
/// How long to wait before reading again while part of a request waits for its host.
const HUP_BACKOFF: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    VirtioSerial,
    IsaSerial,
    UnixListen,
    VsockListen,
}

impl std::str::FromStr for Method {
    type Err = String;
    /// qemu-ga's names, on the command line and in its configuration file.
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "virtio-serial" => Ok(Method::VirtioSerial),
            "isa-serial" => Ok(Method::IsaSerial),
            "unix-listen" => Ok(Method::UnixListen),
            "vsock-listen" => Ok(Method::VsockListen),
            other => Err(format!(
                "method '{other}' is not supported (use virtio-serial, isa-serial, unix-listen or vsock-listen)"
            )),
        }
    }
}

/// `serve`'s options; their spellings and help are in `cli.rs`. `None` and empty lists
/// fall back to the configuration file, then to qemu-ga's defaults.
#[derive(Debug)]
pub struct ServeArgs {
    pub method: Option<Method>,
    pub path: Option<PathBuf>,
    pub block_rpcs: Vec<String>,
    pub allow_rpcs: Vec<String>,
    pub unsafe_rpcs: Vec<String>,
    pub statedir: Option<PathBuf>,
    pub fsfreeze_hook: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub identity_dir: Option<PathBuf>,
    pub admin_user: Option<String>,
    pub ssh_user: Option<String>,
    pub file_dirs: Vec<PathBuf>,
    pub channel_path: PathBuf,
    pub channel_method: Method,
    pub no_channel: bool,
    pub firewall: bool,
    pub trusted_keys: Option<PathBuf>,
    pub clone_policy: Option<ClonePolicy>,
}

impl Default for ServeArgs {
    fn default() -> Self {
        ServeArgs {
            method: None,
            path: None,
            block_rpcs: Vec::new(),
            allow_rpcs: Vec::new(),
            unsafe_rpcs: Vec::new(),
            statedir: None,
            fsfreeze_hook: None,
            config: None,
            identity_dir: None,
            admin_user: None,
            ssh_user: None,
            file_dirs: Vec::new(),
            channel_path: crate::channel::DEFAULT_PORT.into(),
            channel_method: Method::VirtioSerial,
            no_channel: false,
            firewall: false,
            trusted_keys: None,
            clone_policy: None,
        }
    }
}

/// A port the agent answers on.
#[derive(Debug, Clone)]
pub enum Transport {
    VirtioSerial(PathBuf),
    IsaSerial(PathBuf),
    UnixListen(PathBuf),
    /// qemu-ga's `CID:PORT`.
    VsockListen(String),
}

fn settings(args: &ServeArgs) -> Result<(Transport, AgentConfig)> {
    let config_path = args
        .config
        .clone()
        .or_else(|| std::env::var_os("QGA_CONF").map(PathBuf::from));
    let conf = match &config_path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("cannot read the configuration file {}", p.display()))?;
            qga_conf(&text)
        }
        None => Default::default(),
    };
    let method = match (args.method, conf.get("method")) {
        (Some(m), _) => m,
        (None, None) => Method::VirtioSerial,
        (None, Some(name)) => name.parse().map_err(|e| {
            let file = config_path.as_deref().unwrap_or(Path::new("config"));
            anyhow::anyhow!("{}: {e}", file.display())
        })?,
    };
    let path = args
        .path
        .clone()
        .or_else(|| conf.get("path").map(PathBuf::from));
    let transport = match method {
        Method::VirtioSerial => {
            Transport::VirtioSerial(path.unwrap_or_else(|| DEFAULT_VIRTIO_PATH.into()))
        }
        Method::IsaSerial => {
            Transport::IsaSerial(path.unwrap_or_else(|| DEFAULT_SERIAL_PATH.into()))
        }
        Method::UnixListen => {
            Transport::UnixListen(path.context("unix-listen needs a socket path: pass -p PATH")?)
        }
        Method::VsockListen => Transport::VsockListen(
            path.context("vsock-listen needs CID:PORT: pass -p CID:PORT, e.g. -p -1:1234")?
                .to_string_lossy()
                .into_owned(),
        ),
    };
    let list = |cli: &Vec<String>, key: &str| {
        if cli.is_empty() {
            conf.get(key).map(|v| conf_list(v)).unwrap_or_default()
        } else {
            cli.clone()
        }
    };
    let policy = CommandPolicy {
        allow: list(&args.allow_rpcs, "allow-rpcs"),
        block: list(&args.block_rpcs, "block-rpcs"),
        unsafe_allowed: list(&args.unsafe_rpcs, "unsafe-rpcs"),
    };
    for name in policy
        .allow
        .iter()
        .chain(&policy.block)
        .chain(&policy.unsafe_allowed)
    {
        if nixseed_core::qga::commands::lookup(name).is_none() {
            tracing::warn!("command list names '{name}', which this agent does not implement");
        }
    }
    let config = AgentConfig {
        policy,
        state_dir: args
            .statedir
            .clone()
            .or_else(|| conf.get("statedir").map(PathBuf::from))
            .unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        fsfreeze_hook: args
            .fsfreeze_hook
            .clone()
            .or_else(|| conf.get("fsfreeze-hook").map(PathBuf::from)),
        identity_dir: args
            .identity_dir
            .clone()
            .or_else(|| conf.get("identity-dir").map(PathBuf::from))
            .unwrap_or_else(|| "/var/identity".into()),
        admin_user: args
            .admin_user
            .clone()
            .or_else(|| conf.get("admin-user").map(String::from))
            .unwrap_or_else(|| "root".into()),
        ssh_user: args
            .ssh_user
            .clone()
            .or_else(|| conf.get("ssh-user").map(String::from)),
        file_dirs: if args.file_dirs.is_empty() {
            conf.get("file-dirs")
                .map(|v| conf_list(v).into_iter().map(PathBuf::from).collect())
                .unwrap_or_default()
        } else {
            args.file_dirs.clone()
        },
    };
    Ok((transport, config))
}

/// The program `nixseed-agent serve` becomes: this daemon, linked without the code that
/// reads seeds, makes keys and binds `/etc` (the control channel's requests run it in
/// `nixseed-agent request`). The kernel maps a program's pages 64 KiB around each page
/// run, so a resident process in the whole binary ends up mapping nearly all of it.
pub const GUEST_AGENT_PROGRAM: &str = "nixseed-guest-agent";

/// Becomes `nixseed-guest-agent`, installed beside this program, with the same
/// arguments (the process, its PID and its systemd unit stay the same). Returns only
/// when there is none, and the guest agent is then served by this process.
pub fn exec_guest_agent() {
    use std::os::unix::process::CommandExt;
    let Ok(me) = std::env::current_exe() else {
        return;
    };
    let program = me.with_file_name(GUEST_AGENT_PROGRAM);
    if program == me || !program.is_file() {
        tracing::debug!(
            "no {} beside {}: serving from it",
            GUEST_AGENT_PROGRAM,
            me.display()
        );
        return;
    }
    let e = std::process::Command::new(&program)
        .args(std::env::args_os().skip(1))
        .exec();
    tracing::warn!(
        "cannot run {}: {e}; serving from this process",
        program.display()
    );
}

/// The single-threaded runtime each of the agent's async commands runs on.
pub fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")
}

pub fn main(args: ServeArgs) -> Result<()> {
    let (transport, config) = settings(&args)?;
    let channel = channel_service(&args, &config)?;
    let mut agent = Agent::new(config)?;
    let rt = runtime()?;
    let result = rt.block_on(run(&mut agent, transport, channel));
    // A write the kernel is still working on (memory going off line) must not hold up a
    // stop: its worker thread is left behind.
    rt.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// The control channel beside the guest agent, when its port exists.
fn channel_service(
    args: &ServeArgs,
    config: &AgentConfig,
) -> Result<Option<(ChannelService<Helper>, Transport)>> {
    if args.no_channel {
        return Ok(None);
    }
    let transport = match args.channel_method {
        Method::UnixListen => Transport::UnixListen(args.channel_path.clone()),
        Method::VsockListen => {
            Transport::VsockListen(args.channel_path.to_string_lossy().into_owned())
        }
        // The port may not be there yet: udev makes each port's node on its own event,
        // and the agent starts on the guest-agent port's (see `wait_for_port`).
        _ => Transport::VirtioSerial(args.channel_path.clone()),
    };
    // A channel that must not be served is said loudly; the guest agent still serves.
    if let Err(e) = crate::channel::check_transport(&transport, args.trusted_keys.is_some()) {
        tracing::error!("not serving the control channel: {e:#}");
        return Ok(None);
    }
    let helper = Helper {
        program: helper_program(),
        args: helper_args(args, config),
    };
    Ok(Some((ChannelService::new(helper), transport)))
}

/// The program that answers control-channel requests: `nixseed-agent` beside
/// `nixseed-guest-agent` (they are installed in one directory), or this program itself
/// when it is the whole agent serving from its own process, whatever its name. Where
/// this program cannot be found (no `/proc`), `nixseed-agent` on the PATH.
fn helper_program() -> PathBuf {
    match std::env::current_exe() {
        Ok(me) if me.file_name() == Some(GUEST_AGENT_PROGRAM.as_ref()) => {
            me.with_file_name(crate::channel::HELPER_PROGRAM)
        }
        Ok(me) => me,
        Err(e) => {
            tracing::warn!(
                "cannot tell where this program is ({e}): control-channel requests run {} from the PATH",
                crate::channel::HELPER_PROGRAM
            );
            PathBuf::from(crate::channel::HELPER_PROGRAM)
        }
    }
}

/// What the request helper is told: the identity this agent serves, and how.
fn helper_args(args: &ServeArgs, config: &AgentConfig) -> Vec<OsString> {
    let mut out: Vec<OsString> = vec![
        "--identity-dir".into(),
        // As the identity code takes it: as text.
        config.identity_dir.to_string_lossy().into_owned().into(),
        "--clone-policy".into(),
        args.clone_policy.unwrap_or_default().name().into(),
    ];
    if let Some(keys) = &args.trusted_keys {
        out.extend(["--trusted-keys".into(), keys.clone().into()]);
    }
    if args.firewall {
        out.push("--firewall".into());
    }
    if tracing::enabled!(tracing::Level::DEBUG) {
        out.push("--verbose".into());
    }
    out
}

async fn run(
    agent: &mut Agent,
    transport: Transport,
    channel: Option<(ChannelService<Helper>, Transport)>,
) -> Result<()> {
    let drain = channel
        .as_ref()
        .map_or_else(Drain::default, |(svc, _)| svc.drain());
    // Both ports in one small process: the control channel needs no guest-agent state.
    // A control channel that cannot be served (its port busy or not a port) is said in
    // the journal and tried again later; the guest agent's port keeps being served.
    let control = async {
        match channel {
            Some((mut svc, t)) => {
                let mut pause = CONTROL_RETRY_FIRST;
                loop {
                    if let Transport::VirtioSerial(path) = &t {
                        wait_for_port(path, PORT_WAIT, PORT_RECHECK).await;
                    }
                    let began = tokio::time::Instant::now();
                    match serve_transport(&mut svc, &t, false, "control-channel").await {
                        Ok(()) => return Ok(()),
                        Err(e) => {
                            // A long healthy session before this failure starts the
                            // waits over.
                            if began.elapsed() > CONTROL_RETRY_MAX {
                                pause = CONTROL_RETRY_FIRST;
                            }
                            tracing::error!(
                                "control channel: {e:#}; the guest agent is still served, and the control channel is tried again in {} s",
                                pause.as_secs()
                            )
                        }
                    }
                    // Nothing read before the failure belongs to the next session.
                    svc.peer_closed();
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(CONTROL_RETRY_MAX);
                }
            }
            None => std::future::pending().await,
        }
    };
    // While a stop waits for a push, the guest agent's host is still answered.
    let serving = async {
        tokio::select! {
            r = serve_transport(agent, &transport, true, "guest-agent") => r,
            r = control => r,
        }
    };
    let result = until_stopped(serving, &drain).await;
    agent.thaw_for_exit();
    result
}

/// The first wait before a control channel that failed is tried again; each failure
/// doubles it, up to [`CONTROL_RETRY_MAX`].
const CONTROL_RETRY_FIRST: Duration = Duration::from_secs(5);
const CONTROL_RETRY_MAX: Duration = Duration::from_secs(300);

/// How long after the agent's start a missing control channel is worth a journal line
/// (and, with nothing to watch, is looked for often).
const PORT_WAIT: std::time::Duration = std::time::Duration::from_secs(120);
/// How often it is looked for besides: with its directory watched, a channel attached to
/// a running VM (`virsh attach-device --live`) is served as udev makes its node; without,
/// within this time.
const PORT_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits for a virtio-serial port's node: the agent starts when udev has made the guest
/// agent's port, and the control channel's port, a separate udev event, can come later
/// (seconds later in a busy boot), or only when the host attaches the channel to the
/// running VM. The agent sleeps until an entry is made in the node's directory, or in
/// the one above while that is not there ([`NodeWait`]), so a port attached later is
/// served at once, and looks again every `recheck` besides. Where nothing can be watched
/// it looks every 250 ms for `wait`, then every `recheck`. One journal line when `wait`
/// is over (a VM without the channel, as on Proxmox VE, is served as a guest
/// agent only meanwhile). Returns once the node is there.
async fn wait_for_port(path: &Path, wait: std::time::Duration, recheck: std::time::Duration) {
    if path.exists() {
        return;
    }
    tracing::info!("{} is not there yet: waiting for it", path.display());
    let mut watch = NodeWait::new(path);
    let since = tokio::time::Instant::now();
    let mut slow = false;
    loop {
        watch.renew();
        // Checked after the watch began: a node made before it is seen here.
        if path.exists() {
            break;
        }
        if !slow && since.elapsed() >= wait {
            tracing::info!(
                "no control channel at {} within {} s: serving the guest agent only, \
                 and looking for the channel every {} s",
                path.display(),
                wait.as_secs(),
                recheck.as_secs()
            );
            slow = true;
        }
        let step = if slow || watch.watching() {
            recheck
        } else {
            std::time::Duration::from_millis(250)
        };
        if let Err(e) = watch.changed(step).await {
            tracing::warn!(
                "cannot watch for {}: {e}; looking for it every {} s",
                path.display(),
                recheck.as_secs()
            );
            slow = true;
        }
    }
    tracing::info!(
        "{} appeared {:.1} s after the start",
        path.display(),
        since.elapsed().as_secs_f64()
    );
}

/// The wait for a port's node to be made: a [`NodeWatch`] on the node's directory, or,
/// while that is not there, on the directory above it (udev makes `/dev/virtio-ports`
/// with the first node in it). A watch left on a directory that was removed, or on the
/// one above once the node's is there, is made again by [`NodeWait::renew`]; one that
/// failed is not, and the wait is then on time alone.
struct NodeWait<'a> {
    path: &'a Path,
    watch: Option<NodeWatch>,
    broken: bool,
}

impl<'a> NodeWait<'a> {
    fn new(path: &'a Path) -> Self {
        NodeWait {
            path,
            watch: None,
            broken: false,
        }
    }

    /// Puts the watch where it belongs now. Look for the node after this: one made
    /// before it is not reported.
    fn renew(&mut self) {
        let Some(dir) = self.path.parent() else {
            return;
        };
        let up = dir.parent();
        let placed =
            |w: &NodeWatch| w.is_on(dir) || (!dir.exists() && up.is_some_and(|up| w.is_on(up)));
        if self.broken || self.watch.as_ref().is_some_and(placed) {
            return;
        }
        self.watch = match (NodeWatch::new(dir), up) {
            (Ok(w), _) => Some(w),
            // Only a directory that is not there is waited for from above.
            (Err(e), Some(up)) if e.kind() == std::io::ErrorKind::NotFound => {
                let above = NodeWatch::new(up).ok();
                // Made between the two: its creation came before the watch above.
                if dir.exists() {
                    NodeWatch::new(dir).ok()
                } else {
                    above
                }
            }
            (Err(_), _) => None,
        };
    }

    fn watching(&self) -> bool {
        self.watch.is_some()
    }

    /// Returns when an entry is made in the watched directory, or after `step`. An error
    /// of the watch ends it for good.
    async fn changed(&mut self, step: Duration) -> std::io::Result<()> {
        let Some(w) = &self.watch else {
            tokio::time::sleep(step).await;
            return Ok(());
        };
        match tokio::time::timeout(step, w.changed()).await {
            Ok(Err(e)) => {
                self.watch = None;
                self.broken = true;
                Err(e)
            }
            _ => Ok(()),
        }
    }
}

/// Serves one protocol on one transport until it fails for good. `ready`: tell systemd
/// once the port is open.
pub(crate) async fn serve_transport<S: ByteService>(
    svc: &mut S,
    transport: &Transport,
    ready: bool,
    what: &str,
) -> Result<()> {
    match transport {
        Transport::UnixListen(path) => serve_unix(svc, path, ready, what).await,
        Transport::VsockListen(addr) => {
            let listener = crate::vsock::VsockListener::bind(&crate::vsock::parse_addr(addr)?)?;
            if ready {
                notify_ready();
            }
            tracing::info!("answering {what} requests on vsock {addr}");
            let mut refused = false;
            loop {
                let stream = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        let what = format!("vsock {addr}");
                        accept_failed(e, &what, &mut refused).await?;
                        continue;
                    }
                };
                accept_recovered(&format!("vsock {addr}"), &mut refused);
                if let Err(e) = serve_connection(svc, stream).await {
                    tracing::debug!("vsock client went away: {e}");
                }
                if svc.stopping() {
                    return Ok(());
                }
                svc.peer_closed();
            }
        }
        Transport::VirtioSerial(path) => serve_virtio(svc, path, ready, what).await,
        Transport::IsaSerial(path) => {
            use tokio_serial::SerialPortBuilderExt;
            let port = tokio_serial::new(path.to_string_lossy(), 38400)
                .open_native_async()
                .with_context(|| format!("cannot open serial port {}", path.display()))?;
            if ready {
                notify_ready();
            }
            tracing::info!("answering {what} requests on {}", path.display());
            serve_stream(svc, port)
                .await
                .with_context(|| format!("serial port {}", path.display()))
        }
    }
}

async fn serve_unix<S: ByteService>(
    svc: &mut S,
    path: &Path,
    ready: bool,
    what: &str,
) -> Result<()> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(m) = std::fs::symlink_metadata(path)
        && m.file_type().is_socket()
    {
        std::fs::remove_file(path)
            .with_context(|| format!("cannot remove the stale socket {}", path.display()))?;
    }
    let listener = tokio::net::UnixListener::bind(path)
        .with_context(|| format!("cannot listen on {}", path.display()))?;
    if ready {
        notify_ready();
    }
    tracing::info!("answering {what} requests on {}", path.display());
    let mut refused = false;
    loop {
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                accept_failed(e, &path.display().to_string(), &mut refused).await?;
                continue;
            }
        };
        accept_recovered(&path.display().to_string(), &mut refused);
        // One client at a time, as qemu-ga: the next waits in the backlog.
        if let Err(e) = serve_connection(svc, stream).await {
            tracing::debug!("client on {} went away: {e}", path.display());
        }
        if svc.stopping() {
            return Ok(());
        }
        svc.peer_closed();
    }
}

/// An accept that failed. Running out of descriptors or memory, or a client that left
/// before it was taken, passes: the agent keeps the listener and every open guest-file
/// handle, logs once, and tries again after `HUP_BACKOFF` (the client waits in the
/// backlog meanwhile). Anything else is the listener's end, returned.
async fn accept_failed(e: std::io::Error, what: &str, refused: &mut bool) -> Result<()> {
    use nix::libc;
    let passes = matches!(
        e.raw_os_error(),
        Some(
            libc::EMFILE
                | libc::ENFILE
                | libc::ENOBUFS
                | libc::ENOMEM
                | libc::ECONNABORTED
                | libc::EPROTO
                | libc::EINTR
        )
    );
    if !passes {
        return Err(anyhow::Error::new(e).context(format!("accept on {what}")));
    }
    if !std::mem::replace(refused, true) {
        tracing::error!(
            "cannot take a connection on {what}: {e}; still serving, trying again every {} ms",
            HUP_BACKOFF.as_millis()
        );
    }
    tokio::time::sleep(HUP_BACKOFF).await;
    Ok(())
}

/// Empties the reply buffer for the next reply, and gives back the memory of a large
/// one (a 48 MiB guest-file-read is 64 MiB of base64), which would otherwise stay
/// resident for the agent's lifetime.
fn release_reply(out: &mut Vec<u8>) {
    const KEEP: usize = 64 << 10;
    if out.capacity() > KEEP {
        *out = Vec::with_capacity(KEEP);
    } else {
        out.clear();
    }
}

/// A connection was taken after [`accept_failed`] let some pass: say so once.
fn accept_recovered(what: &str, refused: &mut bool) {
    if std::mem::replace(refused, false) {
        tracing::info!("taking connections on {what} again");
    }
}

/// One connection taken on a listening socket, served one at a time: a client that
/// stays silent past the service's [`ByteService::idle_limit`] is closed with a warning,
/// so it cannot hold the port from every later one.
async fn serve_connection<S: ByteService, T: AsyncRead + AsyncWrite + Unpin>(
    svc: &mut S,
    stream: T,
) -> std::io::Result<()> {
    let idle = svc.idle_limit();
    serve_stream_within(svc, stream, idle).await
}

/// Reads requests and writes replies until the peer closes the stream.
pub(crate) async fn serve_stream<S: ByteService, T: AsyncRead + AsyncWrite + Unpin>(
    svc: &mut S,
    stream: T,
) -> std::io::Result<()> {
    serve_stream_within(svc, stream, None).await
}

/// [`serve_stream`], ending the connection after `idle` with nothing read.
async fn serve_stream_within<S: ByteService, T: AsyncRead + AsyncWrite + Unpin>(
    svc: &mut S,
    mut stream: T,
    idle: Option<std::time::Duration>,
) -> std::io::Result<()> {
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::new();
    // The first failed write: the peer is gone (or reads nothing), and no reply is sent
    // any more. Requests it sent before it went are still read to the end and run, as
    // qemu-ga runs them, so that none is lost (a pipelined `guest-file-close`) and the
    // parser, which outlives the connection, ends on a request boundary rather than in
    // the middle of one the next client's bytes would be appended to.
    let mut failed: Option<std::io::Error> = None;
    loop {
        let n = match idle {
            None => stream.read(&mut buf).await?,
            Some(limit) => match tokio::time::timeout(limit, stream.read(&mut buf)).await {
                Ok(read) => read?,
                Err(_) => {
                    tracing::warn!(
                        "closed a connection that sent nothing for {} s, so that the next one is served",
                        limit.as_secs()
                    );
                    return Ok(());
                }
            },
        };
        if n == 0 {
            return failed.map_or(Ok(()), Err);
        }
        svc.feed(&buf[..n]);
        // Every request read is answered, as qemu-ga does, even after the peer has gone
        // (a write failed): only the replies are dropped.
        // Once the agent is told to stop, requests already read wait unanswered.
        while !svc.stopping() && svc.answer_next(&mut out).await {
            if failed.is_none()
                && !out.is_empty()
                && let Err(e) = write_within(&mut stream, &out, idle).await
            {
                failed = Some(e);
            }
            release_reply(&mut out);
        }
        if svc.stopping() {
            return failed.map_or(Ok(()), Err);
        }
        // A client that holds the connection and reads nothing is closed, so that the
        // next one is served; one that went away is read to its end.
        if let Some(e) = failed.take_if(|e| e.kind() == std::io::ErrorKind::TimedOut) {
            return Err(e);
        }
    }
}

/// Writes `out` whole, giving up after `idle` on a client that reads nothing.
async fn write_within<T: AsyncWrite + Unpin>(
    stream: &mut T,
    out: &[u8],
    idle: Option<std::time::Duration>,
) -> std::io::Result<()> {
    match idle {
        None => stream.write_all(out).await,
        Some(limit) => tokio::time::timeout(limit, stream.write_all(out))
            .await
            .unwrap_or_else(|_| {
                tracing::warn!(
                    "closed a connection that read none of its answer for {} s, so that the next one is served",
                    limit.as_secs()
                );
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("the client read nothing for {} s", limit.as_secs()),
                ))
            }),
    }
}

fn open_port(path: &Path) -> Result<AsyncFd<std::fs::File>> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(path)
        .map_err(|e| {
            if e.raw_os_error() == Some(nix::libc::EBUSY) {
                anyhow::anyhow!(
                    "{} is busy: another guest agent (qemu-ga?) holds the port; stop it first",
                    path.display()
                )
            } else {
                anyhow::Error::new(e).context(format!("cannot open {}", path.display()))
            }
        })?;
    watch(f, path)
}

/// The error context of the wait for a host on `path`.
fn waiting(path: &Path) -> String {
    format!("cannot wait for a host on {}", path.display())
}

/// Takes the port out of the wait for a host (a host or bytes are there).
fn stop_waiting(events: &mut PortEvents, path: &Path) -> Result<()> {
    events
        .unwatch()
        .with_context(|| format!("cannot stop waiting for a host on {}", path.display()))
}

fn port_events(port: &AsyncFd<std::fs::File>, path: &Path) -> Result<PortEvents> {
    PortEvents::new(port.get_ref())
        .with_context(|| format!("cannot watch {} for a host", path.display()))
}

fn watch(f: std::fs::File, path: &Path) -> Result<AsyncFd<std::fs::File>> {
    // The File moves into the AsyncFd, so the fd stays open for its whole life; the
    // replacement (`AsyncFd::register`) is `unsafe` only to promise exactly that.
    #[allow(deprecated)]
    AsyncFd::new(f).with_context(|| format!("cannot poll {}", path.display()))
}

/// Registers the port with the runtime afresh. A virtio-serial port reports hang-up while
/// no host is connected, and tokio keeps a hang-up as final: once a host connects, every
/// wait for readiness would return at once, and the loop would spin at full CPU without
/// ever letting the other port be served. A new registration starts from the port's
/// state as it is now.
///
/// That takes a second descriptor for a moment. When there is none (EMFILE), the old
/// registration stays, with one error in the journal, and the caller's loop comes back
/// after `HUP_BACKOFF`: the agent keeps serving, looking at the port every 100 ms as
/// qemu-ga does, until a descriptor is free, rather than exiting and losing every open
/// guest-file handle.
async fn rearm(port: &mut AsyncFd<std::fs::File>, path: &Path) {
    let fresh = port
        .get_ref()
        .try_clone()
        .with_context(|| format!("cannot duplicate the descriptor of {}", path.display()))
        .and_then(|fd| watch(fd, path));
    match fresh {
        Ok(p) => {
            *port = p;
            if REARM_FAILING.swap(false, std::sync::atomic::Ordering::Relaxed) {
                tracing::info!("{}: registered with the runtime again", path.display());
            }
        }
        Err(e) => {
            if !REARM_FAILING.swap(true, std::sync::atomic::Ordering::Relaxed) {
                tracing::error!(
                    "{e:#}; still serving, looking at the port every {} ms until it works",
                    HUP_BACKOFF.as_millis()
                );
            }
            tokio::time::sleep(HUP_BACKOFF).await;
        }
    }
}

/// A fresh registration in [`rearm`] failed and has not worked since (one log line per
/// such spell).
static REARM_FAILING: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// What the agent has seen of the host side of a virtio-serial port, to tell a host that
/// left (what it half sent must go) from one the guest has not been told of yet: the
/// guest learns of a host's connect through the device's control queue, and the host's
/// first bytes can be read before that, with reads saying "no host" in between.
#[derive(Debug, Default)]
struct HostSide {
    /// A read found no data with a host there, or a write went out, since the last reset.
    seen: bool,
    /// Since when reads have said "no host".
    absent_since: Option<tokio::time::Instant>,
}

impl HostSide {
    fn present(&mut self) {
        self.seen = true;
        self.absent_since = None;
    }

    fn data(&mut self) {
        self.absent_since = None;
    }

    /// How long after `now` a request read in part may still wait for its host, while
    /// reads say "no host"; `None` once that is over (or before any such read).
    fn stale_in(&self, now: tokio::time::Instant) -> Option<Duration> {
        let since = self.absent_since?;
        STALE_PARTIAL
            .checked_sub(now.duration_since(since))
            .filter(|left| !left.is_zero())
    }

    /// A read said "no host" at `now`: whether a request read in part must be dropped
    /// (the host that sent it was seen and is gone, or nothing came for `STALE_PARTIAL`).
    fn absent(&mut self, now: tokio::time::Instant) -> bool {
        let since = *self.absent_since.get_or_insert(now);
        if self.seen || now.duration_since(since) >= STALE_PARTIAL {
            self.seen = false;
            true
        } else {
            false
        }
    }
}

/// How long reads may say "no host" with part of a request read, from a host never seen
/// connected, before that part is dropped.
const STALE_PARTIAL: Duration = Duration::from_secs(1);
/// How long a reply waits for the host to be there before it is dropped.
const REPLY_WAIT: Duration = Duration::from_secs(5);

/// virtio-serial: the port stays open. With no host client, reads return 0 and poll
/// reports HUP: the agent then sleeps until the port changes ([`PortEvents`]): a host
/// connects, bytes come, or the port goes away. Only ENODEV (the device went away)
/// reopens. A port not there at the start is waited for the same way.
async fn serve_virtio<S: ByteService>(
    svc: &mut S,
    path: &Path,
    ready: bool,
    what: &str,
) -> Result<()> {
    // The wait for a host (`events`); the port is in it only while no host is there.
    let (mut port, mut events) = match open_port(path) {
        Ok(port) => {
            let events = port_events(&port, path)?;
            if ready {
                notify_ready();
            }
            (port, events)
        }
        // Gone before the agent could open it (the host detached it meanwhile, or the
        // agent was restarted while it was out): started, waiting for it to be back.
        Err(e) if not_back_yet(&e) => {
            if ready {
                notify_ready();
            }
            // As when it goes while served: what a predecessor froze is thawed, before
            // the journal line (no line is written while filesystems are frozen).
            svc.port_gone();
            tracing::info!(
                "{} is not there: serving it once it is back ({e:#})",
                path.display()
            );
            reopen_port(path).await
        }
        Err(e) => return Err(e),
    };
    tracing::info!("answering {what} requests on {}", path.display());
    let mut buf = vec![0u8; 4096];
    let mut out = Vec::new();
    let mut host = HostSide::default();
    // The port is watched for changes since before the last read: a read that finds no
    // host now may wait for the next change.
    let mut watched = false;
    loop {
        // However the port behaves, the other port and the signals get their turn.
        tokio::task::consume_budget().await;
        let mut guard = port.readable().await.context("poll")?;
        let hung_up = guard.ready().is_read_closed();
        let r = guard
            .try_io(|fd| nix::unistd::read(fd.as_raw_fd(), &mut buf).map_err(std::io::Error::from));
        let may_wait = std::mem::replace(&mut watched, false);
        if !matches!(r, Ok(Ok(0))) {
            // A host is there, or bytes are: the wait for one is over.
            stop_waiting(&mut events, path)?;
        }
        match r {
            Err(_would_block) => {
                drop(guard);
                // No data, and a host is there: wait for its bytes, from the state now.
                host.present();
                if hung_up {
                    rearm(&mut port, path).await;
                }
            }
            Ok(Ok(0)) if !may_wait => {
                drop(guard);
                // Watch the port for a change from now on, then read once more: one that
                // comes after this wakes the wait below.
                events.watch().with_context(|| waiting(path))?;
                watched = true;
            }
            Ok(Ok(0)) => {
                drop(guard);
                let now = tokio::time::Instant::now();
                let gone = host.absent(now);
                if gone {
                    svc.peer_closed();
                }
                let changed = match host.stale_in(now).filter(|_| !gone) {
                    // Part of a request may still be completed by a host the guest has
                    // not been told of: look again shortly, to drop it in time.
                    Some(left) => tokio::time::timeout(left.min(HUP_BACKOFF), events.changed())
                        .await
                        .unwrap_or(Ok(())),
                    None => events.changed().await,
                };
                changed.with_context(|| waiting(path))?;
            }
            Ok(Ok(n)) => {
                drop(guard);
                host.data();
                svc.feed(&buf[..n]);
                // After a reply that could not be sent (no host for REPLY_WAIT), the rest
                // of this read's replies are dropped at once rather than each waiting.
                let mut sending = true;
                // Once the agent is told to stop, requests already read wait unanswered.
                while !svc.stopping() && svc.answer_next(&mut out).await {
                    if sending && !out.is_empty() {
                        match write_port(&mut port, &mut events, path, &out).await {
                            Ok(()) => host.present(),
                            Err(e) => {
                                tracing::warn!("{}: reply not sent: {e:#}", path.display());
                                sending = false;
                            }
                        }
                    }
                    release_reply(&mut out);
                }
                if svc.stopping() {
                    return Ok(());
                }
            }
            Ok(Err(e)) if e.raw_os_error() == Some(nix::libc::ENODEV) => {
                drop(guard);
                // The host's side went with the device: what it half sent is not kept.
                host = HostSide::default();
                // Before the journal line: the guest agent thaws what was frozen first.
                svc.port_gone();
                tracing::warn!(
                    "{} went away (detached from the VM?); reopening it when it is back",
                    path.display()
                );
                let since = tokio::time::Instant::now();
                (port, events) = reopen_port(path).await;
                tracing::info!(
                    "{} is back after {:.1} s: answering {what} requests on it again",
                    path.display(),
                    since.elapsed().as_secs_f64()
                );
            }
            Ok(Err(e)) => {
                drop(guard);
                tracing::debug!("{}: read: {e}", path.display());
                tokio::time::sleep(HUP_BACKOFF).await;
            }
        }
    }
}

/// Waits for a port that went away (or was not there at the start) to be back, and
/// opens it. udev makes its node again when the host attaches the port: the agent sleeps
/// until an entry is made in the node's directory, or the one above while that is not
/// there ([`NodeWait`]), and looks every second besides. The node missing, or still
/// naming the removed port, means "not back yet"; another error (another agent holds the
/// port, no descriptors left) is logged once, and the port is tried again.
async fn reopen_port(path: &Path) -> (AsyncFd<std::fs::File>, PortEvents) {
    let mut watch = NodeWait::new(path);
    let mut said = false;
    // Since when the node has been there without opening.
    let mut there_since: Option<tokio::time::Instant> = None;
    loop {
        watch.renew();
        let opened = open_port(path).and_then(|p| Ok((port_events(&p, path)?, p)));
        let e = match opened {
            Ok((events, port)) => return (port, events),
            Err(e) => e,
        };
        let waited_out = if !not_back_yet(&e) {
            true
        } else if errno_is(&e, nix::libc::ENOENT) {
            there_since = None;
            false
        } else {
            // A node that stays there and does not open is not one going away (a
            // console port rather than a serial one, say).
            there_since
                .get_or_insert_with(tokio::time::Instant::now)
                .elapsed()
                >= NODE_THERE_BUT_CLOSED
        };
        if waited_out && !said {
            tracing::warn!("{e:#}; trying again until it opens");
            said = true;
        }
        if let Err(e) = watch.changed(REOPEN_RECHECK).await {
            tracing::warn!(
                "cannot watch for {}: {e}; looking for it every {} s",
                path.display(),
                REOPEN_RECHECK.as_secs()
            );
        }
    }
}

/// How long a port's node may be there without opening before that is said.
const NODE_THERE_BUT_CLOSED: Duration = Duration::from_secs(5);
/// How often a port that went away is looked for besides its directory's watch.
const REOPEN_RECHECK: Duration = Duration::from_secs(1);

/// Whether opening a port that went away failed only because it is not back yet: no
/// node, or a node of the removed port.
fn not_back_yet(e: &anyhow::Error) -> bool {
    [nix::libc::ENOENT, nix::libc::ENXIO, nix::libc::ENODEV]
        .into_iter()
        .any(|errno| errno_is(e, errno))
}

/// Whether an I/O error with `errno` is in `e`'s chain.
fn errno_is(e: &anyhow::Error, errno: i32) -> bool {
    e.chain()
        .filter_map(|c| c.downcast_ref::<std::io::Error>())
        .any(|io| io.raw_os_error() == Some(errno))
}

/// Writes a reply. The guest may not know of the host yet (its connect is still on the
/// way) or any more (it left): the write then waits for the port to change, for at most
/// `REPLY_WAIT` in all.
async fn write_port(
    port: &mut AsyncFd<std::fs::File>,
    events: &mut PortEvents,
    path: &Path,
    data: &[u8],
) -> Result<()> {
    let written = write_or_wait(port, events, path, data).await;
    // The port leaves the wait's set, as it does at the next read that finds a host, and
    // the runtime looks at it afresh: what the set's polls took off the device is seen.
    if events.is_watching() {
        stop_waiting(events, path)?;
        rearm(port, path).await;
    }
    written
}

async fn write_or_wait(
    port: &mut AsyncFd<std::fs::File>,
    events: &mut PortEvents,
    path: &Path,
    mut data: &[u8],
) -> Result<()> {
    let mut no_host_since = None;
    while !data.is_empty() {
        let mut guard = port.writable().await.context("poll")?;
        let hung_up = guard.ready().is_write_closed();
        match guard
            .try_io(|fd| nix::unistd::write(fd.get_ref(), data).map_err(std::io::Error::from))
        {
            Ok(Ok(n)) => {
                data = &data[n..];
                no_host_since = None;
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(_would_block) if hung_up => {
                drop(guard);
                let since = *no_host_since.get_or_insert_with(tokio::time::Instant::now);
                let Some(left) = REPLY_WAIT.checked_sub(since.elapsed()) else {
                    bail!(
                        "no host on the port for {} s ({} bytes dropped)",
                        REPLY_WAIT.as_secs(),
                        data.len()
                    );
                };
                if events.is_watching() {
                    // The host's connect (or its leaving for good) is a change of the port.
                    tokio::time::timeout(left, events.changed())
                        .await
                        .unwrap_or(Ok(()))
                        .with_context(|| waiting(path))?;
                } else {
                    // Watch from now on, then write once more: a connect after this wakes
                    // the wait above.
                    events.watch().with_context(|| waiting(path))?;
                }
                // The runtime keeps a hang-up as final: the next look starts from now.
                rearm(port, path).await;
            }
            // The host is there and has not taken what was sent: wait for it.
            Err(_would_block) => {}
        }
    }
    Ok(())
}

/// Tells systemd (Type=notify) the port is open, with a plain datagram.
fn notify_ready() {
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let sock = match std::os::unix::net::UnixDatagram::unbound() {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!("cannot notify systemd: {e}");
            return;
        }
    };
    let t = target.to_string_lossy();
    let r = if let Some(name) = t.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|a| sock.send_to_addr(b"READY=1", &a))
    } else {
        sock.send_to(b"READY=1", &*t)
    };
    if let Err(e) = r {
        tracing::warn!("cannot notify systemd at {t}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// A host that was seen and left takes its half request with it; one whose connect
    /// the guest has not been told of yet keeps it (its next bytes complete it), until
    /// nothing more came for `STALE_PARTIAL`.
    #[test]
    fn a_half_request_is_dropped_only_when_its_host_is_gone() {
        let t0 = tokio::time::Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);

        let mut left = HostSide::default();
        left.data();
        left.present();
        assert!(left.absent(ms(0)), "a host seen connected, then gone");
        assert!(!left.absent(ms(100)), "and only once per host");

        let mut arriving = HostSide::default();
        arriving.data();
        assert!(
            !arriving.absent(ms(0)),
            "bytes before the guest knows of the host"
        );
        assert!(!arriving.absent(ms(900)));
        arriving.data();
        assert!(!arriving.absent(ms(1000)), "more bytes restart the wait");
        assert!(
            arriving.absent(ms(2000)),
            "nothing for STALE_PARTIAL: dropped"
        );
    }

    /// A port attached after the fast look gave up (a channel hot-plugged into a running
    /// VM) is still found.
    #[test]
    fn a_port_attached_after_the_fast_look_is_found() {
        // Neither the node's directory nor the one above it is there to watch (they come
        // with the port): the timed looks find it.
        let dir = tempfile::tempdir().unwrap();
        let ports = dir.path().join("dev").join("virtio-ports");
        let port = ports.join("org.nixseed.channel.0");
        let found = wait_while_attached(&port, Duration::from_millis(900), || {
            std::fs::create_dir_all(&ports).unwrap();
            std::fs::write(&port, b"").unwrap();
        });
        assert!(found, "the port attached after 0.9 s was not waited for");
    }

    /// The node's directory is made with the node, as udev makes `/dev/virtio-ports` with
    /// its first port: the wait watches the directory above, so the port is found at once.
    #[test]
    fn a_port_whose_directory_comes_with_it_is_found_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let ports = dir.path().join("virtio-ports");
        let port = ports.join("org.nixseed.channel.0");
        let found = found_without_looking(&port, || {
            std::fs::create_dir(&ports).unwrap();
            std::fs::write(&port, b"").unwrap();
        });
        assert!(found, "the port made with its directory was not found");
    }

    #[test]
    fn a_port_attached_to_a_watched_directory_is_found_at_once() {
        // Looks every 60 s only: the port is found through the directory's watch.
        let dir = tempfile::tempdir().unwrap();
        let port = dir.path().join("org.nixseed.channel.0");
        let tmp = dir.path().join(".org.nixseed.channel.0.tmp");
        let found = found_without_looking(&port, || {
            std::fs::write(&tmp, b"").unwrap();
            std::fs::rename(&tmp, &port).unwrap();
        });
        assert!(
            found,
            "the port renamed into the watched directory was not found"
        );
    }

    /// udev removes `/dev/virtio-ports` with its last node and makes it again with the
    /// next: the port made in the new directory is found through a watch, not by the
    /// next look (60 s away).
    #[test]
    fn a_port_in_a_directory_removed_and_made_again_is_found_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let ports = dir.path().join("virtio-ports");
        std::fs::create_dir(&ports).unwrap();
        let port = ports.join("org.nixseed.channel.0");
        let found = found_without_looking(&port, || {
            std::fs::remove_dir(&ports).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            std::fs::create_dir(&ports).unwrap();
            std::thread::sleep(Duration::from_millis(300));
            std::fs::write(&port, b"").unwrap();
        });
        assert!(
            found,
            "the port made in the directory made again was not found"
        );
    }

    /// Whether `wait_for_port`, looking every 60 s only, found the port within 10 s while
    /// `attach` ran after 300 ms: found through a watch.
    fn found_without_looking(port: &Path, attach: impl FnOnce() + Send) -> bool {
        wait_while_attached_within(
            port,
            Duration::from_millis(300),
            (Duration::from_secs(60), Duration::from_secs(60)),
            Duration::from_secs(10),
            attach,
        )
    }

    /// Runs `wait_for_port` (fast look 300 ms, then every 400 ms) while `attach` runs
    /// after `after` on another thread; whether the wait ended with the port there.
    fn wait_while_attached(port: &Path, after: Duration, attach: impl FnOnce() + Send) -> bool {
        wait_while_attached_within(
            port,
            after,
            (Duration::from_millis(300), Duration::from_millis(400)),
            Duration::from_secs(10),
            attach,
        )
    }

    fn wait_while_attached_within(
        port: &Path,
        after: Duration,
        (wait, recheck): (Duration, Duration),
        limit: Duration,
        attach: impl FnOnce() + Send,
    ) -> bool {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .enable_io()
            .build()
            .unwrap();
        std::thread::scope(|scope| {
            scope.spawn(move || {
                std::thread::sleep(after);
                attach();
            });
            let found = rt.block_on(async {
                tokio::time::timeout(limit, wait_for_port(port, wait, recheck)).await
            });
            found.is_ok() && port.exists()
        })
    }
}
