//! The control channel end to end: a real agent serving `channel -m unix-listen` in its own
//! mount and UTS namespaces over a scratch sysroot; the test is the host side.

#![allow(clippy::unwrap_used)] // test scaffolding: a failed setup step should fail the test loudly

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use nixseed_core::channel::{Bundle, Decoder, Message, encode, encode_with_id};
use nixseed_core::seed::SeedFiles;

use nixseed_test_support as ts;

const AGENT: &str = env!("CARGO_BIN_EXE_nixseed-agent");

fn scratch() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    ts::Guest::default().lay_out(dir.path()).unwrap();
    ts::write_seed(
        dir.path(),
        "instance-id: one\n",
        "#cloud-config\nhostname: first\n",
        None,
    )
    .unwrap();
    dir
}

struct Server {
    child: Child,
    sock: PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// First boot from the seed directory, then serve the channel, in one namespace.
    fn start(dir: &Path) -> Server {
        let sock = dir.join("channel.sock");
        let child =
            ts::spawn_channel_guest(Path::new(AGENT), dir, &sock, std::process::Stdio::inherit())
                .unwrap();
        Server { child, sock }
    }

    /// The agent's view of a path inside its mount namespace.
    fn view(&self, abs: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{}", self.agent_pid(), abs.display()))
    }

    /// The `/etc/hostname` of the scratch guest `dir` as the agent sees it: a live push
    /// re-binds it inside the agent's mount namespace only.
    fn etc_hostname(&self, dir: &Path) -> String {
        std::fs::read_to_string(self.view(&dir.join("sysroot/etc/hostname"))).unwrap()
    }

    fn agent_pid(&self) -> u32 {
        // `sh -c ... exec agent` keeps the pid.
        self.child.id()
    }

    fn request(&self, raw: &[u8]) -> Message {
        self.replies(raw, 1).remove(0).0
    }

    /// Writes `raw` on one connection and reads `count` replies with the ids they echo.
    fn replies(&self, raw: &[u8], count: usize) -> Vec<(Message, Option<u64>)> {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        s.write_all(raw).unwrap();
        let mut d = Decoder::default();
        let mut buf = [0u8; 65536];
        let mut out = Vec::new();
        while out.len() < count {
            while let Some(frame) = d.next_frame().unwrap() {
                out.push(frame);
            }
            if out.len() >= count {
                break;
            }
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "agent closed the channel without answering");
            d.push(&buf[..n]);
        }
        out
    }
}

/// The generation and the failures of an `applied` answer.
fn applied(answer: Message) -> (Option<u64>, Vec<String>) {
    let Message::Applied {
        generation, failed, ..
    } = answer
    else {
        panic!("push must answer with applied, not {answer:?}")
    };
    (generation, failed)
}

fn bundle(meta: &str, user: &str) -> Bundle {
    let files = SeedFiles(
        [("meta-data", meta), ("user-data", user)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
    );
    Bundle::from_files("web1", &files)
}

#[test]
fn status_push_and_rollback() {
    let dir = scratch();
    let srv = Server::start(dir.path());
    let Message::StatusReply {
        generation,
        instance_id,
        files,
        ..
    } = srv.request(&encode(&Message::Status))
    else {
        panic!("status must answer with status-reply")
    };
    assert_eq!((generation, instance_id.as_deref()), (Some(1), Some("one")));
    assert!(files.contains_key("ssh_host_ed25519_key.pub"));
    let key_before =
        std::fs::read(dir.path().join("sysroot/var/identity/ssh_host_ed25519_key")).unwrap();

    let push = Message::Push {
        bundle: bundle(
            "instance-id: two\n",
            "#cloud-config\nhostname: second\nnixseed:\n  tcp_ports: [443]\n",
        ),
    };
    let Message::Applied {
        generation,
        changed,
        reloaded,
        reboot_required,
        ..
    } = srv.request(&encode(&push))
    else {
        panic!("push must answer with applied")
    };
    assert_eq!(generation, Some(2));
    assert!(
        changed.contains(&"hostname".to_string()) && changed.contains(&"tcp_ports".to_string()),
        "{changed:?}"
    );
    assert!(reloaded.contains(&"hostname".to_string()), "{reloaded:?}");
    assert!(
        reboot_required.is_empty(),
        "machine-id is kept on a new instance"
    );
    assert_eq!(
        srv.etc_hostname(dir.path()),
        "second\n",
        "/etc/hostname re-bound live"
    );
    assert_eq!(
        std::fs::read(dir.path().join("sysroot/var/identity/ssh_host_ed25519_key")).unwrap(),
        key_before
    );

    // The same push again changes nothing.
    let Message::Applied {
        generation,
        changed,
        ..
    } = srv.request(&encode(&push))
    else {
        panic!()
    };
    assert_eq!((generation, changed.len()), (Some(2), 0));

    let Message::Applied { generation, .. } = srv.request(&encode(&Message::Rollback)) else {
        panic!()
    };
    assert_eq!(generation, Some(1));
    assert_eq!(srv.etc_hostname(dir.path()), "first\n");
}

/// A channel guest as [`Server::start`], its log in `dir/agent.log` and `env` set.
fn logged_server(dir: &Path, env: &[(&str, &str)]) -> (Server, PathBuf) {
    let log = dir.join("agent.log");
    let sock = dir.join("channel.sock");
    let child = ts::spawn_channel_guest_with(
        Path::new(AGENT),
        dir,
        &sock,
        std::fs::File::create(&log).unwrap().into(),
        "",
        env,
    )
    .unwrap();
    (Server { child, sock }, log)
}

/// Every frame the agent writes on `conn` until it closes the connection.
fn frames_until_closed(conn: &mut UnixStream) -> Vec<Message> {
    let mut d = Decoder::default();
    let mut buf = [0u8; 65536];
    let mut out = Vec::new();
    loop {
        while let Some((frame, _)) = d.next_frame().unwrap() {
            out.push(frame);
        }
        match conn.read(&mut buf).unwrap() {
            0 => return out,
            n => d.push(&buf[..n]),
        }
    }
}

/// Sends `signal` to the agent once its log says the push reached the held point.
fn signal_when_held(srv: &Server, log: &Path, signal: nix::sys::signal::Signal) {
    assert!(
        ts::wait_for(Duration::from_secs(20), || std::fs::read_to_string(log)
            .unwrap()
            .contains("test delay point reached: before-reload")),
        "the push never reached its delay point:\n{}",
        std::fs::read_to_string(log).unwrap()
    );
    let pid = nix::unistd::Pid::from_raw(srv.agent_pid() as i32);
    nix::sys::signal::kill(pid, signal).unwrap();
}

/// The agent's exit status, which must come within `within`.
fn exits_within(srv: &mut Server, within: Duration) -> std::process::ExitStatus {
    assert!(
        ts::wait_for(within, || !matches!(srv.child.try_wait(), Ok(None))),
        "the agent was still running {} s after it was told to stop",
        within.as_secs()
    );
    srv.child.wait().unwrap()
}

/// Stopping the agent (SIGTERM, as `systemctl stop` and a shutdown send it) while it
/// applies a push finishes the push and sends its reply before the agent exits, instead of
/// leaving it half done with the host told nothing; a request the host sent behind it is
/// not taken any more. The push is held between its bind and its reloads by the test-only
/// delay point `before-reload`.
#[test]
fn a_stop_during_a_push_finishes_it_and_answers_first() {
    let dir = scratch();
    let (mut srv, log) = logged_server(dir.path(), &[("NIXSEED_TEST_DELAY", "before-reload:1500")]);
    let push = Message::Push {
        bundle: bundle("instance-id: two\n", "#cloud-config\nhostname: second\n"),
    };
    let mut conn = UnixStream::connect(&srv.sock).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut both = encode(&push);
    both.extend(encode(&Message::Status));
    conn.write_all(&both).unwrap();
    signal_when_held(&srv, &log, nix::sys::signal::Signal::SIGTERM);
    let replies = frames_until_closed(&mut conn);
    let said = std::fs::read_to_string(&log).unwrap();
    let [reply] = &replies[..] else {
        panic!("the stopped agent must answer the push alone, not {replies:?}:\n{said}")
    };
    assert_eq!(
        applied(reply.clone()).0,
        Some(2),
        "the push was not taken whole"
    );
    let status = exits_within(&mut srv, Duration::from_secs(10));
    assert!(status.success(), "the agent exited {status}");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("SIGTERM: stopping once the control-channel request in progress is answered")
            && said.contains("the request in progress was answered; stopping"),
        "the agent did not say it waited for the push:\n{said}"
    );
}

/// With no request in progress, a stop is at once: after a request's reply the agent
/// is not left waiting for one.
#[test]
fn a_stop_between_requests_is_at_once() {
    let dir = scratch();
    let (mut srv, log) = logged_server(dir.path(), &[]);
    let Message::StatusReply { generation, .. } = srv.request(&encode(&Message::Status)) else {
        panic!("status must answer with status-reply")
    };
    assert_eq!(generation, Some(1));
    let pid = nix::unistd::Pid::from_raw(srv.agent_pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = exits_within(&mut srv, Duration::from_secs(5));
    assert!(status.success(), "the agent exited {status}");
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("SIGTERM: stopping") && !said.contains("stopping once"),
        "{said}"
    );
}

/// A second signal while a stop waits for a push stops without the push's reply.
#[test]
fn a_second_signal_stops_without_waiting() {
    let dir = scratch();
    let (mut srv, log) =
        logged_server(dir.path(), &[("NIXSEED_TEST_DELAY", "before-reload:60000")]);
    let push = Message::Push {
        bundle: bundle("instance-id: two\n", "#cloud-config\nhostname: second\n"),
    };
    let mut conn = UnixStream::connect(&srv.sock).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    conn.write_all(&encode(&push)).unwrap();
    signal_when_held(&srv, &log, nix::sys::signal::Signal::SIGTERM);
    assert!(
        ts::wait_for(Duration::from_secs(10), || std::fs::read_to_string(&log)
            .unwrap()
            .contains("stopping once")),
        "the agent did not start waiting for the push"
    );
    let pid = nix::unistd::Pid::from_raw(srv.agent_pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT).unwrap();
    let status = exits_within(&mut srv, Duration::from_secs(5));
    assert!(status.success(), "the agent exited {status}");
    assert!(frames_until_closed(&mut conn).is_empty());
    let said = std::fs::read_to_string(&log).unwrap();
    assert!(
        said.contains("SIGINT again: stopping without the reply"),
        "{said}"
    );
}

/// A push that gives the machine another machine-id stores it for the next boot, and
/// `/etc/machine-id` keeps showing the ID the running systemd and journald use; every
/// reply says whether a reboot is still pending for it.
#[test]
fn a_live_push_keeps_the_running_machine_id_in_etc() {
    let dir = scratch();
    let srv = Server::start(dir.path());
    let etc_id = srv.view(&dir.path().join("sysroot/etc/machine-id"));
    let running = std::fs::read_to_string(&etc_id).unwrap();
    assert_eq!(
        running.trim().len(),
        32,
        "the boot bound a machine-id: {running:?}"
    );
    let new_id = "0123456789abcdef0123456789abcdef";
    let push = |instance: &str, host: &str| {
        let msg = Message::Push {
            bundle: bundle(
                &format!("instance-id: {instance}\n"),
                &format!("#cloud-config\nhostname: {host}\nnixseed:\n  machine-id: {new_id}\n"),
            ),
        };
        let Message::Applied {
            generation,
            reboot_required,
            ..
        } = srv.request(&encode(&msg))
        else {
            panic!("push must answer with applied")
        };
        (generation, reboot_required)
    };
    let pending = vec!["machine-id".to_string()];
    assert_eq!(push("two", "renamed"), (Some(2), pending.clone()));
    assert_eq!(
        std::fs::read_to_string(dir.path().join("sysroot/var/identity/machine-id")).unwrap(),
        format!("{new_id}\n"),
        "the new machine-id is current in the store, for the next boot"
    );
    assert_eq!(
        std::fs::read_to_string(&etc_id).unwrap(),
        running,
        "/etc/machine-id still shows the running ID"
    );
    assert_eq!(
        srv.etc_hostname(dir.path()),
        "renamed\n",
        "the rest of the push is live"
    );
    // Back to the generation whose machine-id is the running one: nothing pending.
    let Message::Applied {
        generation,
        reboot_required,
        ..
    } = srv.request(&encode(&Message::Rollback))
    else {
        panic!()
    };
    assert_eq!((generation, reboot_required), (Some(1), vec![]));
    assert_eq!(std::fs::read_to_string(&etc_id).unwrap(), running);
    // The new ID again (a generation of its own, 3: 2 still names the identity rolled
    // back from), then a change of the hostname alone: the reboot is still pending.
    assert_eq!(push("three", "renamed"), (Some(3), pending.clone()));
    assert_eq!(push("four", "again"), (Some(4), pending.clone()));
    assert_eq!(std::fs::read_to_string(&etc_id).unwrap(), running);
    // The same push again changes nothing and still says so.
    assert_eq!(push("four", "again"), (Some(4), pending));
}

#[test]
fn tampered_bundle_garbage_and_out_of_order_frames_are_refused() {
    let dir = scratch();
    let srv = Server::start(dir.path());
    let mut b = bundle("instance-id: two\n", "#cloud-config\nhostname: evil\n");
    b.files.get_mut("user-data").unwrap().sha256 = "0".repeat(64);
    let Message::Error { message } = srv.request(&encode(&Message::Push { bundle: b })) else {
        panic!()
    };
    assert!(message.contains("user-data: sha256"), "{message}");

    let Message::Error { message } = srv.request(&[0, 0, 0, 4, b'g', b'a', b'r', b'b']) else {
        panic!()
    };
    assert!(message.contains("malformed frame"), "{message}");

    let hello = Message::Hello {
        product_uuid: None,
        generation: None,
        instance_id: None,
    };
    let Message::Error { message } = srv.request(&encode(&hello)) else {
        panic!()
    };
    assert!(
        message.contains("unexpected message \"hello\""),
        "{message}"
    );

    let Message::Error { message } = srv.request(&[0xff, 0xff, 0xff, 0xff]) else {
        panic!()
    };
    assert!(message.contains("exceeds"), "{message}");

    // Nothing was applied, and the agent still serves.
    let Message::StatusReply { generation, .. } = srv.request(&encode(&Message::Status)) else {
        panic!()
    };
    assert_eq!(generation, Some(1));
    assert_eq!(srv.etc_hostname(dir.path()), "first\n");
}

/// An oversized frame is refused once and the rest of it is dropped, not read as frames
/// of its own: the request that follows on the same stream is answered, with its id.
#[test]
fn the_rest_of_an_oversized_frame_is_not_read_as_requests() {
    let dir = scratch();
    let srv = Server::start(dir.path());
    let len = nixseed_core::channel::MAX_FRAME + 100_000;
    let mut raw = (len as u32).to_be_bytes().to_vec();
    // Bytes that would read as length prefixes of more frames if they were not dropped.
    raw.extend(std::iter::repeat_n(b'A', len));
    raw.extend(encode_with_id(&Message::Status, Some(9)));
    let replies = srv.replies(&raw, 2);
    let (Message::Error { message }, None) = &replies[0] else {
        panic!("{replies:?}")
    };
    assert!(message.contains("exceeds"), "{message}");
    let (Message::StatusReply { generation, .. }, Some(9)) = &replies[1] else {
        panic!("{replies:?}")
    };
    assert_eq!(*generation, Some(1));
}

/// `nixseed-agent serve` in `dir`: the guest agent on `dir/qga.sock`, the control channel
/// on `channel` (with `args` for its method), an identity directory `dir/identity` that
/// does not exist. Returns the child, the guest agent's socket and that directory.
fn serve_in(dir: &Path, args: &[&str], channel: &Path) -> (Child, PathBuf, PathBuf) {
    let qga = dir.join("qga.sock");
    let ids = dir.join("identity");
    let child = Command::new(AGENT)
        .args(["serve", "-m", "unix-listen", "-p"])
        .arg(&qga)
        .arg("-t")
        .arg(dir.join("state"))
        .args(args)
        .arg("--channel-path")
        .arg(channel)
        .arg("--identity-dir")
        .arg(&ids)
        .spawn()
        .unwrap();
    (child, qga, ids)
}

#[test]
fn serve_answers_the_guest_agent_and_the_control_channel_in_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let ch = dir.path().join("channel.sock");
    let (mut child, qga, ids) = serve_in(dir.path(), &["--channel-method", "unix-listen"], &ch);
    assert!(
        ts::wait_for(Duration::from_secs(20), || ts::listening(&qga)
            && ts::listening(&ch)),
        "the agent never listened on both sockets"
    );
    let mut q = UnixStream::connect(&qga).unwrap();
    q.write_all(br#"{"execute":"guest-ping","id":7}"#).unwrap();
    let mut line = [0u8; 64];
    let n = q.read(&mut line).unwrap();
    assert_eq!(&line[..n], b"{\"return\": {}, \"id\": 7}\n");
    // No identity in that directory: the channel answers, naming it.
    let srv = Server {
        child: Command::new("true").spawn().unwrap(),
        sock: ch,
    };
    let Message::Error { message } = srv.request(&encode(&Message::Status)) else {
        panic!()
    };
    assert!(message.contains(&ids.display().to_string()), "{message}");
    let _ = child.kill();
    let _ = child.wait();
}

/// The control channel's port can appear after the agent started (udev makes each
/// virtio-serial port's node on its own event, and the agent starts on the guest agent's):
/// a port that shows up a second later (a raw pty here, where a VM has a virtio-serial
/// node) is still served.
#[test]
fn a_control_port_that_appears_after_the_start_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let port = dir.path().join("org.nixseed.channel.0");
    let (mut child, qga, ids) = serve_in(dir.path(), &[], &port);
    assert!(
        ts::listening_within(&qga, Duration::from_secs(20)),
        "no guest agent socket"
    );
    std::thread::sleep(Duration::from_secs(1));

    let (mut master, slave) = ts::raw_pty_at(&port).unwrap();
    master.write_all(&encode(&Message::Status)).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut d = Decoder::default();
        let mut buf = [0u8; 65536];
        loop {
            let Ok(n) = master.read(&mut buf) else { return };
            d.push(&buf[..n]);
            if let Ok(Some(m)) = d.next_message() {
                let _ = tx.send(m);
                return;
            }
        }
    });
    let answer = rx.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    // No identity in that directory: the channel answers, naming it.
    let Ok(Message::Error { message }) = answer else {
        panic!("no answer on the control port that appeared late: {answer:?}")
    };
    assert!(message.contains(&ids.display().to_string()), "{message}");
    drop(slave);
}

/// A control channel that cannot be served (its path is a directory here, as a port
/// held elsewhere or gone mid-open would fail) is said in the journal and tried again;
/// the guest agent keeps answering on its own port, and the process does not exit.
#[test]
fn a_control_port_that_cannot_be_opened_leaves_the_guest_agent_serving() {
    let dir = tempfile::tempdir().unwrap();
    let port = dir.path().join("org.nixseed.channel.0");
    std::fs::create_dir(&port).unwrap();
    let (mut child, qga, _) = serve_in(dir.path(), &[], &port);
    assert!(
        ts::listening_within(&qga, Duration::from_secs(20)),
        "no guest agent socket"
    );
    std::thread::sleep(Duration::from_secs(2));
    let exited = child.try_wait().unwrap();
    let answer = UnixStream::connect(&qga).and_then(|mut q| {
        q.write_all(br#"{"execute":"guest-ping","id":8}"#)?;
        let mut line = [0u8; 64];
        let n = q.read(&mut line)?;
        Ok(line[..n].to_vec())
    });
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(exited, None, "the agent exited over its control port");
    assert_eq!(answer.unwrap(), b"{\"return\": {}, \"id\": 8}\n");
}

/// While the guest agent holds filesystems frozen (here: the marker a frozen agent leaves,
/// with which a new one starts frozen), a push or rollback would write to `/var` and wait
/// for a thaw that the same process must answer: both are refused at once, nothing is
/// logged meanwhile (journald on a frozen `/var` would block the agent's log line), and
/// `guest-fsfreeze-thaw` is still answered, after which the channel works again and the
/// log says what it dropped.
#[test]
fn a_frozen_agent_refuses_pushes_and_still_answers_the_thaw() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    std::fs::write(state.join("qga.state.isfrozen"), b"").unwrap();
    let qga = dir.path().join("qga.sock");
    let ch = dir.path().join("channel.sock");
    let ids = dir.path().join("identity");
    let child = Command::new(AGENT)
        .args(["serve", "-m", "unix-listen", "-p"])
        .arg(&qga)
        .arg("-t")
        .arg(&state)
        .args(["--channel-method", "unix-listen", "--channel-path"])
        .arg(&ch)
        .arg("--identity-dir")
        .arg(&ids)
        .env("NIXSEED_LOG_STDERR", "1")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut srv = Server { child, sock: ch };
    assert!(
        ts::wait_for(Duration::from_secs(20), || ts::listening(&qga)
            && ts::listening(&srv.sock)),
        "the agent never listened on both sockets"
    );
    let push = Message::Push {
        bundle: bundle("instance-id: two\n", "#cloud-config\nhostname: second\n"),
    };
    for (request, what) in [(push, "push of `web1`"), (Message::Rollback, "rollback")] {
        let Message::Error { message } = srv.request(&encode(&request)) else {
            panic!("{what} was not refused")
        };
        assert!(
            message.contains(what) && message.contains("frozen"),
            "{message}"
        );
    }
    assert!(!ids.exists(), "a refused push created {}", ids.display());

    let mut q = UnixStream::connect(&qga).unwrap();
    q.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    q.write_all(br#"{"execute":"guest-fsfreeze-thaw","id":1}"#)
        .unwrap();
    let mut line = [0u8; 128];
    let n = q.read(&mut line).unwrap();
    let reply = String::from_utf8_lossy(&line[..n]);
    assert!(
        reply.starts_with("{\"return\": ") && reply.ends_with("\"id\": 1}\n"),
        "{reply}"
    );
    q.write_all(br#"{"execute":"guest-fsfreeze-status"}"#)
        .unwrap();
    let n = q.read(&mut line).unwrap();
    assert_eq!(&line[..n], b"{\"return\": \"thawed\"}\n");

    // Thawed: the rollback now reaches the (missing) store and says so.
    let Message::Error { message } = srv.request(&encode(&Message::Rollback)) else {
        panic!("rollback with no store succeeded")
    };
    assert!(!message.contains("frozen"), "{message}");

    let _ = srv.child.kill();
    let _ = srv.child.wait();
    let mut log = String::new();
    srv.child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(log.contains("logging is off until the thaw"), "{log}");
    assert!(
        !log.contains("push of `web1` refused") && !log.contains("rollback refused"),
        "logged while frozen:\n{log}"
    );
    let dropped: u32 = log
        .split("logging is on again; ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no line says logging is on again:\n{log}"));
    assert!(dropped >= 2, "{dropped} dropped:\n{log}");
    // The statement that was silent while frozen logs again after the thaw: the thawed
    // rollback's failure, from the same warning as the refusals.
    let after = log.split("logging is on again").nth(1).unwrap_or_default();
    assert!(
        after.contains("control channel: ") && after.contains(&ids.display().to_string()),
        "the thawed rollback's failure was not logged:\n{log}"
    );
}

/// A push whose `write_files` cannot be written (an owner the guest does not have) is
/// applied without them, and the reply says so under `failed`, where `seedctl push`
/// shows it and exits non-zero, instead of reporting success.
#[test]
fn a_push_whose_write_files_fail_says_so() {
    let dir = scratch();
    let srv = Server::start(dir.path());
    let push = Message::Push {
        bundle: bundle(
            "instance-id: two\n",
            "#cloud-config\nhostname: second\nwrite_files:\n  - path: /var/lib/app/conf\n    content: hi\n    owner: nosuchuser\n",
        ),
    };
    let (generation, failed) = applied(srv.request(&encode(&push)));
    assert_eq!(generation, Some(2));
    assert!(
        failed
            .iter()
            .any(|f| f.starts_with("write_files:") && f.contains("nosuchuser")),
        "{failed:?}"
    );
}

/// A write_files entry that cannot be written (a file stands where its directory goes) is
/// reported, and the same push again, once the cause is gone, writes it: the entries
/// before it are not written twice (an `append` appends once).
#[test]
fn the_same_push_again_writes_the_files_that_failed() {
    let dir = scratch();
    let srv = Server::start(dir.path());
    let blocker = dir.path().join("sysroot/var/lib/blocked");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, "in the way").unwrap();
    let push = encode(&Message::Push {
        bundle: bundle(
            "instance-id: two\n",
            "#cloud-config\nhostname: second\nwrite_files:\n  - path: /var/lib/app/log\n    content: \"once\\n\"\n    append: true\n  - path: /var/lib/blocked/conf\n    content: hi\n",
        ),
    });
    let Message::Applied { failed, .. } = srv.request(&push) else {
        panic!("push must answer with applied")
    };
    assert!(
        failed.iter().any(|f| f.contains("/var/lib/blocked/conf")),
        "{failed:?}"
    );
    std::fs::remove_file(&blocker).unwrap();
    let Message::Applied {
        failed, decision, ..
    } = srv.request(&push)
    else {
        panic!("push must answer with applied")
    };
    assert!(failed.is_empty(), "{decision}: {failed:?}");
    assert_eq!(
        std::fs::read_to_string(dir.path().join("sysroot/var/lib/blocked/conf")).unwrap(),
        "hi"
    );
    assert_eq!(
        std::fs::read_to_string(dir.path().join("sysroot/var/lib/app/log")).unwrap(),
        "once\n"
    );
}

/// A client that connects and sends nothing does not hold the channel from the next:
/// it is closed after 10 s, and a `status` waiting behind it is answered.
#[test]
fn a_silent_client_does_not_hold_the_channel() {
    let dir = scratch();
    let srv = Server::start(dir.path());
    let silent = UnixStream::connect(&srv.sock).unwrap();
    let t0 = std::time::Instant::now();
    let Message::StatusReply { generation, .. } = srv.request(&encode(&Message::Status)) else {
        panic!("status must answer with status-reply")
    };
    assert_eq!(generation, Some(1));
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(19),
        "answered after {waited:?}"
    );
    drop(silent);
}

/// A rollback carries no signature: a guest that takes only signed identities refuses
/// it, and its current generation stays (an admin key a signed push took away stays
/// away).
#[test]
fn a_guest_with_trusted_keys_refuses_the_unsigned_rollback() {
    let dir = scratch();
    let key = dir.path().join("signer");
    let made = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(made.success());
    let sock = dir.path().join("channel.sock");
    let child = ts::spawn_channel_guest_with(
        Path::new(AGENT),
        dir.path(),
        &sock,
        std::process::Stdio::inherit(),
        &format!("--trusted-keys {}", key.with_extension("pub").display()),
        &[],
    )
    .unwrap();
    let srv = Server { child, sock };
    let generation = |srv: &Server| match srv.request(&encode(&Message::Status)) {
        Message::StatusReply { generation, .. } => generation,
        other => panic!("status answered {other:?}"),
    };
    let before = generation(&srv);
    assert!(before.is_some());
    let Message::Error { message } = srv.request(&encode(&Message::Rollback)) else {
        panic!("an unsigned rollback was taken")
    };
    assert!(
        message.contains("rollback refused") && message.contains("--trusted-keys"),
        "{message}"
    );
    assert_eq!(generation(&srv), before);
}

/// While the identity lock is held (the guest agent keeps it from a freeze to its thaw,
/// so that a push cannot start writing to a frozen `/var`), a push waits a bounded time
/// and is then refused with the reason, well within `seedctl push`'s wait; once the lock
/// is let go, the same push applies.
#[test]
fn a_push_waits_a_bounded_time_for_a_held_identity_lock_and_says_why() {
    let dir = scratch();
    let srv = Server::start(dir.path());
    std::fs::create_dir_all(dir.path().join("run/nixseed")).unwrap();
    let lock = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.path().join("run/nixseed/identity.lock"))
        .unwrap();
    rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).unwrap();
    let push = encode(&Message::Push {
        bundle: bundle("instance-id: two\n", "#cloud-config\nhostname: second\n"),
    });
    let t0 = std::time::Instant::now();
    let Message::Error { message } = srv.request(&push) else {
        panic!("a push went ahead while the identity lock was held")
    };
    let waited = t0.elapsed();
    assert!(
        message.contains("push of `web1` refused")
            && message.contains("filesystems frozen by the guest agent"),
        "{message}"
    );
    assert!(
        (Duration::from_secs(9)..Duration::from_secs(20)).contains(&waited),
        "{waited:?}"
    );
    drop(lock);
    let (generation, failed) = applied(srv.request(&push));
    assert_eq!((generation, failed), (Some(2), Vec::<String>::new()));
    assert_eq!(srv.etc_hostname(dir.path()), "second\n");
}

/// A bundle made for a VM (seedctl names its product_uuid) is refused by one that cannot
/// read its own product_uuid (no DMI): it cannot show the bundle is its own, and taking
/// it would give it another VM's host key and machine-id.
#[test]
fn a_vm_without_a_product_uuid_refuses_a_bundle_that_names_one() {
    let dir = scratch();
    std::fs::remove_file(dir.path().join("host/sys/class/dmi/id/product_uuid")).unwrap();
    let srv = Server::start(dir.path());
    let push = encode(&Message::Push {
        bundle: bundle(
            "instance-id: two\n",
            "#cloud-config\nhostname: second\nnixseed:\n  product-uuid: 11111111-2222-3333-4444-555555555555\n",
        ),
    });
    let Message::Error { message } = srv.request(&push) else {
        panic!("a push naming a product_uuid must be refused without one to compare")
    };
    assert!(
        message.contains("has none to compare") && message.contains("web1"),
        "{message}"
    );
}

/// A push whose password cannot be bound over `/etc/shadow` (here a directory stands
/// where the composed file goes) says so under `failed`, where `seedctl push` shows it
/// and exits non-zero, and `/etc/shadow` keeps the image's file; the same push again,
/// once the cause is gone, binds the password and reports no password failed.
#[test]
fn a_push_whose_password_cannot_be_bound_says_so_and_is_retried() {
    let dir = scratch();
    let image = "root:*:19000:0:99999:7:::\n";
    std::fs::write(dir.path().join("sysroot/etc/shadow"), image).unwrap();
    let srv = Server::start(dir.path());
    let blocker = dir.path().join("run/nixseed/shadow");
    std::fs::create_dir_all(blocker.join("in-the-way")).unwrap();
    let push = encode(&Message::Push {
        bundle: bundle(
            "instance-id: two\n",
            "#cloud-config\nhostname: second\nusers:\n  - {name: root, hashed_passwd: '$5$abc$def', lock_passwd: false}\n",
        ),
    });
    let shadow = || std::fs::read_to_string(srv.view(&dir.path().join("sysroot/etc/shadow")));
    let (generation, failed) = applied(srv.request(&push));
    assert_eq!(generation, Some(2));
    assert!(
        failed
            .iter()
            .any(|f| f.starts_with("passwords:") && f.contains("run/nixseed/shadow")),
        "{failed:?}"
    );
    assert_eq!(shadow().unwrap(), image);
    assert_eq!(srv.etc_hostname(dir.path()), "second\n");

    std::fs::remove_dir_all(&blocker).unwrap();
    let Message::Applied {
        failed, decision, ..
    } = srv.request(&push)
    else {
        panic!("push must answer with applied")
    };
    // (sshd, restarted for users.json's ssh_pwauth, has no system bus to be told on here.)
    assert!(
        failed.iter().all(|f| !f.starts_with("passwords:")),
        "{decision}: {failed:?}"
    );
    assert_eq!(shadow().unwrap(), "root:$5$abc$def:19000:0:99999:7:::\n");
}

/// A machine that booted with no seed has no identity and nothing bound, and its `/run`
/// has no `nixseed` directory yet (as on NixOS). Its first push, whose sshd cannot be
/// told (no system bus here), records what it owes as a first identity's; the same push
/// again retries sshd's start as a start (its failed state reset first), not as the
/// try-restart of a later push, which would leave an sshd that never ran down.
#[test]
fn a_first_identity_s_failed_sshd_start_is_retried_as_a_start() {
    let dir = tempfile::tempdir().unwrap();
    ts::Guest::default().lay_out(dir.path()).unwrap();
    let srv = Server::start(dir.path());
    let run = dir.path().join("run/nixseed");
    if run.exists() {
        std::fs::remove_dir_all(&run).unwrap();
    }
    let push = encode(&Message::Push {
        bundle: bundle("instance-id: two\n", "#cloud-config\nhostname: second\n"),
    });
    let sshd_failure = |m: Message| {
        let (generation, failed) = applied(m);
        assert_eq!(generation, Some(1));
        failed
            .into_iter()
            .find(|f| f.starts_with("sshd:"))
            .unwrap_or_else(|| panic!("sshd's start did not fail without a system bus"))
    };
    let first = sshd_failure(srv.request(&push));
    assert!(first.contains("failed state"), "{first}");
    let record = std::fs::read_to_string(run.join("reload-pending")).unwrap();
    assert!(
        record.starts_with("#first-identity\n") && record.contains("ssh_host_ed25519_key"),
        "{record}"
    );
    let again = sshd_failure(srv.request(&push));
    assert!(
        again.contains("failed state") && !again.contains("TryRestartUnit"),
        "{again}"
    );
}

const GUEST_AGENT: &str = env!("CARGO_BIN_EXE_nixseed-guest-agent");

/// A guest-ping on the guest agent's socket `qga` is answered.
fn pings(qga: &Path) -> bool {
    let mut q = UnixStream::connect(qga).unwrap();
    q.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    q.write_all(br#"{"execute":"guest-ping","id":3}"#).unwrap();
    let mut line = [0u8; 64];
    let n = q.read(&mut line).unwrap_or(0);
    &line[..n] == b"{\"return\": {}, \"id\": 3}\n"
}

/// `nixseed-agent serve` becomes `nixseed-guest-agent`, installed beside it: the same
/// process, linked without the identity code it never runs. The control channel's
/// requests are answered by a `nixseed-agent request` run beside it: a status through the
/// guest agent's process reads the identity a `render` wrote.
#[test]
fn serve_becomes_the_guest_agent_program_and_a_request_runs_beside_it() {
    let dir = scratch();
    let (srv, qga) = serve_rendered(dir.path());
    let exe = std::fs::read_link(format!("/proc/{}/exe", srv.agent_pid())).unwrap();
    assert_eq!(
        exe.file_name().and_then(|n| n.to_str()),
        Some("nixseed-guest-agent"),
        "`nixseed-agent serve` runs as {}",
        exe.display()
    );
    let Message::StatusReply {
        generation,
        instance_id,
        ..
    } = srv.request(&encode(&Message::Status))
    else {
        panic!("status through the guest agent did not answer with status-reply")
    };
    assert_eq!((generation, instance_id.as_deref()), (Some(1), Some("one")));
    assert!(pings(&qga));
}

/// `nixseed-guest-agent` installed without `nixseed-agent` beside it answers each
/// control-channel request with an error that names the program it needs, and goes on
/// serving the guest agent.
#[test]
fn a_guest_agent_without_its_helper_says_so_and_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).unwrap();
    let alone = bin.join("nixseed-guest-agent");
    std::fs::copy(GUEST_AGENT, &alone).unwrap();
    let qga = dir.path().join("qga.sock");
    let ch = dir.path().join("channel.sock");
    let child = Command::new(&alone)
        .args(["serve", "-m", "unix-listen", "-p"])
        .arg(&qga)
        .arg("-t")
        .arg(dir.path().join("state"))
        .args(["--channel-method", "unix-listen", "--channel-path"])
        .arg(&ch)
        .arg("--identity-dir")
        .arg(dir.path().join("identity"))
        .spawn()
        .unwrap();
    let srv = Server { child, sock: ch };
    assert!(
        ts::wait_for(Duration::from_secs(20), || ts::listening(&qga)
            && ts::listening(&srv.sock)),
        "the agent never listened on both sockets"
    );
    for request in [Message::Status, Message::Rollback] {
        let Message::Error { message } = srv.request(&encode(&request)) else {
            panic!("{request:?} was answered without the program that answers it")
        };
        let wanted = format!(
            "cannot run `{} request`",
            bin.join("nixseed-agent").display()
        );
        assert!(message.contains(&wanted), "{message}");
        assert!(pings(&qga), "the guest agent stopped answering");
    }
}

/// `nixseed-agent serve` ([`serve_in`]) of the scratch guest `dir`'s seed, rendered into
/// its identity directory, with the control channel on `dir/channel.sock`; returns it
/// once both sockets listen, and the guest agent's socket.
fn serve_rendered(dir: &Path) -> (Server, PathBuf) {
    render_identity(dir);
    let ch = dir.join("channel.sock");
    let (child, qga, _) = serve_in(dir, &["--channel-method", "unix-listen"], &ch);
    let srv = Server { child, sock: ch };
    assert!(
        ts::wait_for(Duration::from_secs(20), || ts::listening(&qga)
            && ts::listening(&srv.sock)),
        "the agent never listened on both sockets"
    );
    (srv, qga)
}

/// The scratch guest's seed rendered into `dir/identity`, the identity directory
/// [`serve_in`] serves.
fn render_identity(dir: &Path) {
    let rendered = Command::new(AGENT)
        .args(["render", "--seed"])
        .arg(dir.join("sysroot/seed"))
        .arg("--out")
        .arg(dir.join("identity"))
        .output()
        .unwrap();
    assert!(rendered.status.success(), "{rendered:?}");
}

/// Writes one guest-agent request on `q` and reads its one-line reply.
fn qga_call(q: &mut UnixStream, request: &str) -> String {
    q.write_all(request.as_bytes()).unwrap();
    let mut reply = Vec::new();
    let mut byte = [0u8; 1];
    while !reply.ends_with(b"\n") {
        assert_eq!(q.read(&mut byte).unwrap(), 1, "the agent closed the socket");
        reply.push(byte[0]);
    }
    String::from_utf8_lossy(&reply).into_owned()
}

/// While a change of the identity holds its lock (held here by `flock`, as a push's
/// `nixseed-agent request` holds it), a guest-agent command that would change the
/// identity fails saying so, rather than lose the push's generation or wait for it, and
/// a freeze waits until the change is done, so that no snapshot holds half of one.
#[test]
fn guest_agent_commands_meet_a_change_of_the_identity_in_progress() {
    let dir = scratch();
    let (_srv, qga) = serve_rendered(dir.path());
    std::fs::create_dir_all("/run/nixseed").unwrap();
    let mut holder = Command::new("flock")
        .args([
            "-x",
            "/run/nixseed/identity.lock",
            "-c",
            "echo held; sleep 2",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut held = [0u8; 5];
    holder.stdout.take().unwrap().read_exact(&mut held).unwrap();
    let t = std::time::Instant::now();
    let mut q = UnixStream::connect(&qga).unwrap();
    q.set_read_timeout(Some(Duration::from_secs(40))).unwrap();
    let added = qga_call(
        &mut q,
        r#"{"execute":"guest-ssh-add-authorized-keys","arguments":{"username":"root","keys":["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0m1dJkZGt8bWWX2I3YyVnYQ5A0LrS0cm4d8cnYbAQN lock-test"]},"id":1}"#,
    );
    assert!(
        added.contains(
            "the identity is being changed (a control-channel push or rollback, or nixseed-apply)"
        ),
        "{added}"
    );
    let frozen = qga_call(
        &mut q,
        r#"{"execute":"guest-fsfreeze-freeze-list","arguments":{"mountpoints":["/no/such/mount"]},"id":2}"#,
    );
    assert_eq!(frozen, "{\"return\": 0, \"id\": 2}\n");
    assert!(
        t.elapsed() >= Duration::from_millis(1500),
        "the freeze did not wait for the change in progress ({:?})",
        t.elapsed()
    );
    assert!(holder.wait().unwrap().success());
    // Let go: the same command now changes the identity.
    let added = qga_call(
        &mut q,
        r#"{"execute":"guest-ssh-add-authorized-keys","arguments":{"username":"root","keys":["ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ0m1dJkZGt8bWWX2I3YyVnYQ5A0LrS0cm4d8cnYbAQN lock-test"]},"id":3}"#,
    );
    assert_eq!(added, "{\"return\": {}, \"id\": 3}\n");
    let keys = std::fs::read_to_string(dir.path().join("identity/admin_authorized_keys")).unwrap();
    assert!(keys.contains("lock-test"), "{keys}");
}
