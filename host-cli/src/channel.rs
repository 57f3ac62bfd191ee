//! The host end of the nixseed control channel (`org.nixseed.channel.0`, frames from
//! `nixseed_core::channel`): where a machine's channel socket is, request/reply for
//! `push`/`status`/`rollback`, and answering the `hello` a guest sends at first boot when
//! it has no seed disk.
//!
//! QEMU's chardev socket serves one client at a time: while one seedctl process holds a
//! machine's channel (a `seedctl serve`, say), another one's requests go unanswered and
//! end in the timeout error, which says so. A queued client's bytes would still reach the
//! guest once the first one leaves, so `push` and `rollback` are sent only after the
//! guest has answered on this connection (a `status`, or its boot-time `hello`): a
//! request that timed out before that was never sent. Each request carries an id, and a
//! reply with another id (left on the port for an earlier client) is not taken for ours.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nixseed_core::channel::{Bundle, Decoder, MAX_FRAME, Message, encode, encode_with_id};

use crate::libvirt::virsh;
use crate::machine::{Identity, Paths};
use crate::nocloud;
use crate::state::{CHANNEL_SOCK, StateDir, pid_alive};

/// The virtio-serial port name the agent opens in the guest.
pub const PORT_NAME: &str = "org.nixseed.channel.0";

/// The identity of a machine as the bundle `push` sends: the very seed files `seedctl seed`
/// writes to the ISO ([`nocloud::seed_files`]).
pub fn bundle(id: &Identity) -> Result<Bundle> {
    Ok(Bundle::from_files(
        &id.name,
        &crate::signing::seed_files(id)?.to_core(),
    ))
}

/// Where a machine's channel socket is: `--socket`, else the live libvirt domain's channel
/// with `--connect`, else the `seedctl run` socket in the state directory.
pub fn socket_path(
    paths: &Paths,
    name: &str,
    socket: Option<&Path>,
    connect: Option<&str>,
) -> Result<PathBuf> {
    crate::names::check_machine_name(name)?;
    if let Some(s) = socket {
        return Ok(s.to_path_buf());
    }
    if let Some(uri) = connect {
        let uri = crate::libvirt::uri(Some(uri));
        crate::libvirt::refuse_remote_channel(&uri, name, "this command")?;
        return libvirt_socket(&uri, name);
    }
    let sock = StateDir::new(paths, name).file(CHANNEL_SOCK);
    // Absolute, so errors and logs name the file wherever they are read.
    Ok(std::path::absolute(&sock).unwrap_or(sock))
}

/// The channel socket of a running libvirt domain, from its live XML.
pub fn libvirt_socket(uri: &str, name: &str) -> Result<PathBuf> {
    let xml = virsh(uri, name, &["dumpxml", name])?;
    match channel_socket_in_xml(&xml) {
        Some(p) => Ok(PathBuf::from(p)),
        None => bail!(
            "machine `{name}`: the libvirt domain on {uri} has no unix channel named {PORT_NAME}; redefine it with `seedctl define {name}` (its XML carries one), or, while it runs, attach one with `virsh attach-device {name} FILE --live` (the XML is in docs/guest-agent.md, \"Control channel\")"
        ),
    }
}

/// The `<source path=.../>` of the `<channel type='unix'>` whose target is the nixseed
/// port. libvirt writes attributes in single quotes; double quotes are accepted too.
pub fn channel_socket_in_xml(xml: &str) -> Option<String> {
    let mut rest = xml;
    while let Some(start) = rest.find("<channel") {
        let after = &rest[start..];
        let end = after.find("</channel>")?;
        let block = &after[..end];
        rest = &after[end..];
        let Some(open_end) = block.find('>') else {
            continue;
        };
        if attr(&block[..open_end], "type").as_deref() != Some("unix") {
            continue;
        }
        let target = element(block, "target").and_then(|t| attr(t, "name"));
        if target.as_deref() != Some(PORT_NAME) {
            continue;
        }
        if let Some(path) = element(block, "source").and_then(|s| attr(s, "path")) {
            return Some(path);
        }
    }
    None
}

/// The start tag `<name ...>` (or `<name .../>`) inside `block`.
fn element<'a>(block: &'a str, name: &str) -> Option<&'a str> {
    let open = format!("<{name}");
    let mut from = 0;
    while let Some(i) = block[from..].find(&open) {
        let s = &block[from + i..];
        let next = s[open.len()..].chars().next();
        if matches!(next, Some(c) if c.is_whitespace() || c == '/' || c == '>') {
            return s.find('>').map(|e| &s[..e]);
        }
        from += i + open.len();
    }
    None
}

/// The unescaped value of attribute `name` in a start tag.
fn attr(tag: &str, name: &str) -> Option<String> {
    for q in ['\'', '"'] {
        let pat = format!(" {name}={q}");
        if let Some(i) = tag.find(&pat) {
            let v = &tag[i + pat.len()..];
            let end = v.find(q)?;
            return Some(
                v[..end]
                    .replace("&apos;", "'")
                    .replace("&quot;", "\"")
                    .replace("&lt;", "<")
                    .replace("&gt;", ">")
                    .replace("&amp;", "&"),
            );
        }
    }
    None
}

/// One connection to a machine's channel socket.
pub struct Channel {
    pub machine: String,
    pub socket: PathBuf,
    stream: UnixStream,
    decoder: Decoder,
    next_id: u64,
    /// Replies that came with no request id, which no request takes for its answer.
    without_id: u32,
}

impl Channel {
    pub fn connect(machine: &str, socket: &Path) -> Result<Channel> {
        let stream = UnixStream::connect(socket).map_err(|e| {
            let hint = match e.kind() {
                ErrorKind::NotFound | ErrorKind::ConnectionRefused => {
                    " (is the machine running? `seedctl run` and libvirt create it at start)"
                }
                _ => "",
            };
            anyhow::anyhow!(
                "machine `{machine}`: cannot connect to the control channel socket {}: {e}{hint}",
                socket.display()
            )
        })?;
        Ok(Channel {
            machine: machine.to_owned(),
            socket: socket.to_path_buf(),
            stream,
            decoder: Decoder::default(),
            without_id: 0,
            // Distinct from the ids of earlier clients, whose replies may still arrive.
            next_id: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64),
        })
    }

    /// Sends a message with no request id (an answer to a guest's `hello`).
    pub fn send(&mut self, m: &Message) -> Result<()> {
        self.write_frame(m, encode(m))
    }

    /// Sends a request with a fresh id, which its reply echoes; returns the id.
    pub fn request(&mut self, m: &Message) -> Result<u64> {
        self.next_id = self.next_id.wrapping_add(1);
        let id = self.next_id;
        self.write_frame(m, encode_with_id(m, Some(id)))?;
        Ok(id)
    }

    fn write_frame(&mut self, m: &Message, frame: Vec<u8>) -> Result<()> {
        if frame.len() - 4 > MAX_FRAME {
            bail!(
                "machine `{}`: `{}` is {} bytes, over the control channel's {MAX_FRAME} byte frame limit; a larger identity goes in a seed disk (`seedctl seed`)",
                self.machine,
                m.kind(),
                frame.len() - 4
            );
        }
        self.stream.write_all(&frame).with_context(|| {
            format!(
                "machine `{}`: writing {} to the control channel {}",
                self.machine,
                m.kind(),
                self.socket.display()
            )
        })
    }

    /// The next message that arrives before `deadline`; `Ok(None)` when none did. The end
    /// of the stream is an error (the VM stopped or another side closed it).
    pub fn recv(&mut self, deadline: Instant) -> Result<Option<Message>> {
        Ok(self.recv_frame(deadline)?.map(|(m, _)| m))
    }

    /// [`Channel::recv`] with the request id the message echoes.
    pub fn recv_frame(&mut self, deadline: Instant) -> Result<Option<(Message, Option<u64>)>> {
        let mut buf = [0u8; 64 * 1024];
        loop {
            match self.decoder.next_frame() {
                Ok(Some((m, id))) => {
                    if id.is_none() && !matches!(m, Message::Hello { .. }) {
                        self.without_id += 1;
                    }
                    return Ok(Some((m, id)));
                }
                Ok(None) => {}
                Err(e) => bail!(
                    "machine `{}`: control channel {}: {e}",
                    self.machine,
                    self.socket.display()
                ),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            self.stream
                .set_read_timeout(Some(left.max(Duration::from_millis(1))))
                .context("setting the control channel read timeout")?;
            match self.stream.read(&mut buf) {
                Ok(0) => bail!(
                    "machine `{}`: the control channel {} was closed (the VM stopped?)",
                    self.machine,
                    self.socket.display()
                ),
                Ok(n) => self.decoder.push(&buf[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    return Err(e).with_context(|| {
                        format!(
                            "machine `{}`: reading the control channel {}",
                            self.machine,
                            self.socket.display()
                        )
                    });
                }
            }
        }
    }

    /// No answer in time; `effect` says what became of the request.
    fn silence(&self, what: &str, timeout: Duration, effect: &str) -> anyhow::Error {
        // An agent that echoes no ids answers every request without one.
        let without_id = match self.without_id {
            0 => String::new(),
            n => format!(
                "; {n} {} without a request id came and {} passed over: an agent older than request ids answers so, and the image needs a newer nixseed-agent",
                if n == 1 { "reply" } else { "replies" },
                if n == 1 { "was" } else { "were" }
            ),
        };
        anyhow::anyhow!(
            "machine `{}`: no answer to `{what}` on the control channel {} within {} s ({effect}){without_id}; check that the VM runs and `nixseed-agent serve` answers {PORT_NAME} in it, and that no other client (a `seedctl serve`) holds the socket",
            self.machine,
            self.socket.display(),
            timeout.as_secs_f64()
        )
    }
}

/// What a `push` or `rollback` came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// The running agent applied it and says what changed.
    Applied(Message),
    /// The guest is at its first-boot wait: the request went out as the answer to its
    /// `hello`, and it applies the identity as its boot seed (no live report).
    AtBoot { instance_id: Option<String> },
}

/// How long a running guest has to answer `status` after a hello arrived.
const HELLO_GRACE: Duration = Duration::from_millis(1500);

/// Whether a reply echoing `got` answers the request `sent`. The agent echoes the id of
/// every request it can read as JSON, so a reply without one answers a frame seedctl did
/// not send: an error about an earlier client's garbage or half frame, left on the port.
fn ours(got: Option<u64>, sent: u64) -> bool {
    got == Some(sent)
}

/// Sends `push` or `rollback` once the guest has answered on this connection, and waits
/// for `applied`. A guest `error` becomes an error naming the machine and the socket.
/// `machine` is the identity a push carries: a guest waiting at first boot is sent it
/// only when its hello's product_uuid is that machine's, as `seedctl serve` answers.
pub fn apply(
    chan: &mut Channel,
    request: &Message,
    timeout: Duration,
    machine: Option<&Identity>,
) -> Result<Outcome> {
    let deadline = Instant::now() + timeout;
    let what = request.kind();
    // First a `status`: nothing that changes the guest is written before it answers.
    let probe = chan.request(&Message::Status)?;
    // A guest waiting at first boot says hello and does not answer `status`; a running
    // one answers it. A hello may be one left on the port from before, so a running
    // guest is given a moment to answer before the hello counts.
    let mut hello: Option<(Option<String>, Option<String>)> = None;
    let mut wait = deadline;
    let at_boot = loop {
        match chan.recv_frame(wait)? {
            None if hello.is_some() => break hello,
            None => {
                return Err(chan.silence(what, timeout, "nothing was sent that changes it"));
            }
            Some((Message::StatusReply { .. } | Message::Error { .. }, id)) if ours(id, probe) => {
                break None;
            }
            Some((
                Message::Hello {
                    instance_id,
                    product_uuid,
                    ..
                },
                _,
            )) => {
                if hello.is_none() {
                    wait = deadline.min(Instant::now() + HELLO_GRACE);
                }
                hello = Some((instance_id, product_uuid));
            }
            // Left over from an earlier client: not ours.
            Some(_) => {}
        }
    };
    if let Some((instance_id, product_uuid)) = at_boot {
        // The guest waits at first boot: a push is the answer to its hello.
        if !matches!(request, Message::Push { .. }) {
            bail!(
                "machine `{}`: the guest is still booting and waiting for an identity on {}; `{what}` needs a running guest",
                chan.machine,
                chan.socket.display()
            );
        }
        if let Some(reason) = machine.and_then(|id| not_this_machine(id, product_uuid.as_deref())) {
            bail!(
                "machine `{}`: the guest waiting at first boot on {} is not this machine: {reason}; nothing was sent",
                chan.machine,
                chan.socket.display()
            );
        }
        chan.send(request)?;
        return Ok(Outcome::AtBoot { instance_id });
    }
    let sent = chan.request(request)?;
    while let Some((m, id)) = chan.recv_frame(deadline)? {
        match m {
            Message::Applied { .. } if ours(id, sent) => return Ok(Outcome::Applied(m)),
            Message::Error { message } if ours(id, sent) => bail!(
                "machine `{}`: the guest answered `{what}` on {} with an error: {message}",
                chan.machine,
                chan.socket.display()
            ),
            // Left over from an earlier client: not ours.
            _ => {}
        }
    }
    Err(chan.silence(
        what,
        timeout,
        &format!(
            "it was delivered and the guest may still apply it: see `seedctl status {}`",
            chan.machine
        ),
    ))
}

/// The guest's answer to `status`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestStatus {
    pub generation: Option<u64>,
    pub instance_id: Option<String>,
    pub product_uuid: Option<String>,
    /// Relative file name → sha256, from the guest's manifest.
    pub files: std::collections::BTreeMap<String, String>,
    /// The guest's NICs, empty when its agent does not report them.
    pub links: Vec<nixseed_core::network::Link>,
    /// The VM's DMI product_uuid now (`product_uuid` is the generation's record).
    pub vm_product_uuid: Option<String>,
    /// Why the current generation is not in use, when it is not.
    pub unapplied: Option<String>,
}

/// Sends `status` and waits for the reply.
pub fn status(chan: &mut Channel, timeout: Duration) -> Result<GuestStatus> {
    let sent = chan.request(&Message::Status)?;
    let deadline = Instant::now() + timeout;
    while let Some((m, id)) = chan.recv_frame(deadline)? {
        match m {
            Message::StatusReply { .. } | Message::Error { .. } if !ours(id, sent) => {}
            Message::StatusReply {
                generation,
                instance_id,
                product_uuid,
                files,
                links,
                vm_product_uuid,
                unapplied,
            } => {
                // Interfaces without an Ethernet MAC (a tunnel's empty address) match no
                // network-config entry, so they are left out rather than refused.
                let links = links
                    .iter()
                    .filter_map(|(name, mac)| format!("{name}={mac}").parse().ok())
                    .collect();
                return Ok(GuestStatus {
                    generation,
                    instance_id,
                    product_uuid,
                    files,
                    links,
                    vm_product_uuid,
                    unapplied,
                });
            }
            Message::Error { message } => bail!(
                "machine `{}`: the guest answered `status` on {} with an error: {message}",
                chan.machine,
                chan.socket.display()
            ),
            Message::Hello { .. } => bail!(
                "machine `{}`: the guest is still booting and waiting for an identity on {} (it said hello); answer it with `seedctl push {}`",
                chan.machine,
                chan.socket.display(),
                chan.machine
            ),
            _ => {}
        }
    }
    Err(chan.silence("status", timeout, "it changes nothing"))
}

/// The answer to a guest's `hello`: the machine's bundle when the guest's DMI product_uuid
/// is the one recorded in `machines/NAME/product_uuid`, else `refuse` with the reason.
pub fn answer_hello(id: &Identity, product_uuid: Option<&str>) -> Message {
    if let Some(reason) = not_this_machine(id, product_uuid) {
        return Message::Refuse { reason };
    }
    match bundle(id) {
        Ok(bundle) => Message::Push { bundle },
        Err(e) => Message::Refuse {
            reason: format!("the host cannot build machine `{}`'s seed: {e:#}", id.name),
        },
    }
}

/// Why a guest whose hello carried `product_uuid` is not machine `id`, or `None` when it is.
fn not_this_machine(id: &Identity, product_uuid: Option<&str>) -> Option<String> {
    match product_uuid {
        Some(u) if u.trim().eq_ignore_ascii_case(&id.product_uuid) => None,
        Some(u) => Some(format!(
            "product_uuid {} is not machine `{}`'s ({} records {})",
            u.trim(),
            id.name,
            id.dir.join(crate::machine::PRODUCT_UUID).display(),
            id.product_uuid
        )),
        None => Some(format!(
            "the guest reported no product_uuid, so it cannot be checked against machine `{}`'s {}",
            id.name, id.product_uuid
        )),
    }
}

/// One answered hello, for logs and `--json`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Answer {
    pub machine: String,
    pub socket: PathBuf,
    /// What the guest had: its generation and instance-id.
    pub guest_generation: Option<u64>,
    pub guest_instance_id: Option<String>,
    pub product_uuid: Option<String>,
    /// `push` or `refuse`.
    pub answer: String,
    /// The instance-id of the pushed identity.
    pub instance_id: Option<String>,
    pub reason: Option<String>,
}

impl Answer {
    pub fn line(&self) -> String {
        let had = format!(
            "generation {}, instance-id {}",
            self.guest_generation
                .map_or_else(|| "none".to_owned(), |g| g.to_string()),
            self.guest_instance_id.as_deref().unwrap_or("none")
        );
        match &self.reason {
            Some(r) => format!(
                "{}: refused hello on {} ({had}): {r}",
                self.machine,
                self.socket.display()
            ),
            None => format!(
                "{}: answered hello on {} ({had}) with identity {}",
                self.machine,
                self.socket.display(),
                self.instance_id.as_deref().unwrap_or("?")
            ),
        }
    }
}

/// Which machine sits behind a socket, and when to stop waiting for it.
#[derive(Debug, Clone)]
pub struct HelloTarget {
    pub paths: Paths,
    pub name: String,
    pub socket: PathBuf,
    /// Stop when this process (the machine's QEMU) is gone.
    pub qemu_pid: Option<i32>,
}

/// A repeated hello that arrives this soon after an answer is the guest's earlier copy
/// (it says hello every second until it reads the answer); it is not answered again.
const HELLO_REPEAT: Duration = Duration::from_secs(2);
/// After the answer the connection stays open this long before `once` returns, so the
/// push is surely read by QEMU before the client goes away.
const LINGER: Duration = Duration::from_millis(1500);

/// Answers hellos on the machine's channel, reconnecting when the VM restarts. The
/// identity is loaded afresh for every hello, so edits to `machines/NAME` are served.
/// With `once` it returns after the first answer; otherwise it runs until the QEMU
/// process named by `qemu_pid` is gone (or forever). `log` gets one line per event.
pub fn answer_hellos(
    t: &HelloTarget,
    once: bool,
    log: &(dyn Fn(&str) + Sync),
) -> Result<Option<Answer>> {
    let gone = || t.qemu_pid.is_some_and(|p| !pid_alive(p));
    let mut last_answer: Option<Instant> = None;
    let mut waiting_logged = false;
    loop {
        if gone() {
            log(&format!(
                "{}: QEMU exited; no longer answering on {}",
                t.name,
                t.socket.display()
            ));
            return Ok(None);
        }
        let mut chan = match Channel::connect(&t.name, &t.socket) {
            Ok(c) => c,
            Err(e) => {
                if !waiting_logged {
                    log(&format!("{e:#}; retrying"));
                    waiting_logged = true;
                }
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
        };
        waiting_logged = false;
        log(&format!(
            "{}: waiting for the guest's hello on {}",
            t.name,
            t.socket.display()
        ));
        loop {
            if gone() {
                break;
            }
            let msg = match chan.recv(Instant::now() + Duration::from_millis(500)) {
                Ok(Some(m)) => m,
                Ok(None) => continue,
                Err(e) => {
                    log(&format!("{e:#}; reconnecting"));
                    std::thread::sleep(Duration::from_millis(500));
                    break;
                }
            };
            let Message::Hello {
                product_uuid,
                generation,
                instance_id,
            } = msg
            else {
                log(&format!(
                    "{}: ignoring `{}` on {} (only hello is answered here)",
                    t.name,
                    msg.kind(),
                    t.socket.display()
                ));
                continue;
            };
            if last_answer.is_some_and(|at| at.elapsed() < HELLO_REPEAT) {
                continue;
            }
            let id = match Identity::load(&t.paths, &t.name) {
                Ok(id) => id,
                Err(e) => {
                    // Say nothing to the guest: it keeps its identity after its wait.
                    log(&format!("{e:#}; the hello stays unanswered"));
                    continue;
                }
            };
            let reply = answer_hello(&id, product_uuid.as_deref());
            if let Err(e) = chan.send(&reply) {
                log(&format!("{e:#}; reconnecting"));
                break;
            }
            last_answer = Some(Instant::now());
            let answer = Answer {
                machine: t.name.clone(),
                socket: t.socket.clone(),
                guest_generation: generation,
                guest_instance_id: instance_id,
                product_uuid,
                answer: reply.kind().to_owned(),
                instance_id: matches!(reply, Message::Push { .. })
                    .then(|| nocloud::instance_id(&id)),
                reason: match &reply {
                    Message::Refuse { reason } => Some(reason.clone()),
                    _ => None,
                },
            };
            log(&answer.line());
            if once {
                let until = Instant::now() + LINGER;
                // Drain the guest's repeated hellos without answering them.
                while let Ok(Some(_)) = chan.recv(until) {}
                return Ok(Some(answer));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_nixseed_channel_among_others() {
        let xml = "<domain><devices>
    <channel type='unix'>
      <source mode='bind' path='/var/lib/libvirt/qemu/channel/target/domain-1-web1/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
    </channel>
    <channel type='spicevmc'>
      <target type='virtio' name='org.nixseed.channel.0'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='/srv/vm/web1 &amp; co/libvirt-channel.sock'/>
      <target type='virtio' name='org.nixseed.channel.0' state='disconnected'/>
      <alias name='channel1'/>
    </channel>
  </devices></domain>";
        assert_eq!(
            channel_socket_in_xml(xml).as_deref(),
            Some("/srv/vm/web1 & co/libvirt-channel.sock")
        );
        let no_channel = "<domain><devices><channel type='unix'><source mode='bind' path='/x'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel></devices></domain>";
        assert_eq!(channel_socket_in_xml(no_channel), None);
        let double = r#"<channel type="unix"><source mode="bind" path="/y"/><target type="virtio" name="org.nixseed.channel.0"/></channel>"#;
        assert_eq!(channel_socket_in_xml(double).as_deref(), Some("/y"));
    }
}
