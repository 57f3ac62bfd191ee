//! `seedctl push/status/rollback/serve` against the real guest agent: `nixseed-agent
//! channel -m unix-listen` serving a scratch sysroot in its own mount and UTS namespaces
//! (it bind-mounts over /etc and sets the hostname), on the socket path `seedctl run`
//! gives a machine. The hello tests play the guest on a socket as QEMU would expose it.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Scratch, agent_binary};
use nixseed_core::channel::{Decoder, Message, encode, encode_with_id};
use nixseed_test_support as ts;
use serde_json::Value;

/// A guest: the agent's first boot from a seed of its own (hostname `first`), then the
/// control channel on STATE/web1/channel.sock.
struct Guest {
    child: Child,
    root: PathBuf,
}

impl Drop for Guest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    fn start(s: &Scratch, product_uuid: &str) -> Guest {
        let root = s.path().join("guest");
        std::fs::create_dir_all(&root).unwrap();
        let mac = s.domain_mac("web1");
        ts::Guest {
            product_uuid,
            nic: Some(("ens3", &mac)),
            ..ts::Guest::default()
        }
        .lay_out(&root)
        .unwrap();
        ts::write_seed(
            &root,
            "instance-id: one\n",
            "#cloud-config\nhostname: first\n",
            None,
        )
        .unwrap();
        let sock = s.state("web1").join("channel.sock");
        std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
        let agent = agent_binary();
        let child = ts::spawn_channel_guest(&agent, &root, &sock, Stdio::null()).unwrap();
        Guest { child, root }
    }

    /// A path of the guest's scratch root as its mount namespace shows it.
    fn view(&self, rel: &str) -> PathBuf {
        PathBuf::from(format!(
            "/proc/{}/root{}/{rel}",
            self.child.id(),
            self.root.display()
        ))
    }

    /// A file as the guest sees it (inside its mount namespace).
    fn read(&self, rel: &str) -> String {
        let p = format!(
            "/proc/{}/root{}/sysroot/{rel}",
            self.child.id(),
            self.root.display()
        );
        std::fs::read_to_string(p).unwrap()
    }
}

fn json(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}):\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

fn web1(s: &Scratch) -> String {
    s.new_with_admin_key("web1", &["--tcp-port", "22", "--tcp-port", "443"]);
    std::fs::read_to_string(s.machine("web1").join("product_uuid"))
        .unwrap()
        .trim()
        .to_owned()
}

/// A listener on `sock`, its directory made first: the host end of a machine's channel.
fn listen_at(sock: &Path) -> UnixListener {
    std::fs::create_dir_all(sock.parent().unwrap()).unwrap();
    UnixListener::bind(sock).unwrap()
}

/// Plays the guest end: takes seedctl's connection, with reads that give up after 20 s.
fn accept_seedctl(listener: &UnixListener) -> UnixStream {
    let (conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    conn
}

/// The guest's hello frame, naming the VM's `product_uuid`.
fn hello(product_uuid: &str) -> Vec<u8> {
    encode(&Message::Hello {
        product_uuid: Some(product_uuid.to_owned()),
        generation: None,
        instance_id: None,
    })
}

fn strs(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn push_status_and_rollback_against_the_real_agent() {
    let s = Scratch::new();
    let uuid = web1(&s);
    let guest = Guest::start(&s, &uuid);

    // Before: the guest booted from someone else's seed.
    let out = s.run(&["--json", "status", "web1"]);
    assert_eq!(out.status.code(), Some(3), "out of sync exits 3: {out:?}");
    let st = json(&out);
    assert_eq!(st["in_sync"], false);
    assert_eq!(st["instance_id"], "one");
    assert_eq!(st["files"]["hostname"], "mismatch");
    assert_eq!(st["files"]["machine-id"], "mismatch");
    let human = String::from_utf8(s.run(&["status", "web1"]).stdout).unwrap();
    assert!(human.contains("MISMATCH  hostname"), "{human}");
    assert!(human.contains("seedctl push web1"), "{human}");

    // A seed disk from an older identity (here: stand-in bytes)...
    let iso = s.state("web1").join("seed.iso");
    std::fs::create_dir_all(iso.parent().unwrap()).unwrap();
    std::fs::write(&iso, b"an older seed").unwrap();
    let stale = std::fs::read(&iso).unwrap();

    // Push: the guest applies the host's identity and reloads what changed. This guest
    // has no system bus, so sshd and networkd cannot be told: the push says so and
    // exits 4 (applied, not taken).
    let out = s.run(&["--json", "push", "web1"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    // ...is rewritten by the push, so the next boot does not bring the old seed back.
    let fresh = std::fs::read(&iso).unwrap();
    assert_ne!(
        fresh, stale,
        "push must refresh the state directory's seed disk"
    );
    s.ok(&["seed", "web1", "-o", "expected.iso"]);
    assert_eq!(fresh, std::fs::read(s.path().join("expected.iso")).unwrap());
    let p = json(&out);
    assert_eq!(p["generation"], 2);
    let changed = strs(&p["changed"]);
    for f in [
        "hostname",
        "machine-id",
        "admin_authorized_keys",
        "tcp_ports",
    ] {
        assert!(changed.contains(&f.to_owned()), "{f} not in {changed:?}");
    }
    assert!(strs(&p["reloaded"]).contains(&"hostname".to_owned()), "{p}");
    let failed = strs(&p["failed"]);
    assert!(
        failed
            .iter()
            .any(|f| f.starts_with("sshd: ") && f.contains("D-Bus system bus")),
        "{p}"
    );
    assert!(!strs(&p["reloaded"]).contains(&"sshd".to_owned()), "{p}");
    assert_eq!(strs(&p["reboot_required"]), vec!["machine-id".to_owned()]);
    assert_eq!(guest.read("etc/hostname"), "web1\n");
    let host_mid = std::fs::read_to_string(s.machine("web1").join("machine-id")).unwrap();
    assert_eq!(guest.read("var/identity/machine-id"), host_mid);

    // After: every file matches the host's, but sshd has not taken the new host key, so
    // the guest is not in sync yet, and says why.
    let out = s.run(&["--json", "status", "web1"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let st = json(&out);
    assert_eq!(st["in_sync"], false, "{st}");
    let why = st["unapplied"].as_str().unwrap();
    assert!(
        why.contains("generation 2 is bound, but reloading after")
            && why.contains("ssh_host_ed25519_key"),
        "{st}"
    );
    assert_eq!(st["instance_id"], st["host_instance_id"]);
    let files = st["files"].as_object().unwrap();
    for f in [
        "machine-id",
        "hostname",
        "ssh_host_ed25519_key",
        "ssh_host_ed25519_key.pub",
        "admin_authorized_keys",
        "user_authorized_keys",
        "tcp_ports",
        "udp_ports",
    ] {
        assert_eq!(files[f], "match", "{f}: {st}");
    }
    // The guest reported its NIC, so its network file is compared too.
    assert_eq!(files["network/10-cloud-init-ens3.network"], "match", "{st}");
    assert!(files.iter().all(|(_, v)| v == "match"), "{st}");

    // Edit the identity on the host and push again: only the hostname moves, the
    // machine-id of the first push still waits for a reboot, and the sshd reload that
    // failed is tried again (and fails again here: exit 4, not a silent success).
    std::fs::write(s.machine("web1").join("hostname"), "web1-renamed\n").unwrap();
    let out = s.run(&["push", "web1"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let human = String::from_utf8(out.stdout).unwrap();
    assert!(
        human.contains("changed        hostname, hosts\n"),
        "{human}"
    );
    assert!(human.contains("needs reboot   machine-id"), "{human}");
    assert!(
        human.contains("FAILED") && human.contains("sshd"),
        "{human}"
    );
    assert_eq!(guest.read("etc/hostname"), "web1-renamed\n");

    // The same push again changes nothing, says the reboot is still pending, and still
    // retries what did not take.
    let out = s.run(&["push", "web1"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let human = String::from_utf8(out.stdout).unwrap();
    assert!(human.contains("nothing changed"), "{human}");
    assert!(human.contains("needs reboot   machine-id"), "{human}");

    // Rollback: the previous generation comes back, and status sees the drift.
    let out = s.run(&["--json", "rollback", "web1"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    assert_eq!(json(&out)["generation"], 2);
    assert_eq!(guest.read("etc/hostname"), "web1\n");
    let out = s.run(&["--json", "status", "web1"]);
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(json(&out)["files"]["hostname"], "mismatch");
}

#[test]
fn guest_error_names_machine_and_socket() {
    let s = Scratch::new();
    let uuid = web1(&s);
    let _guest = Guest::start(&s, &uuid);
    // A guest on its first generation has nothing to roll back to.
    let err = s.fails(&["rollback", "web1"]);
    let sock = s.state("web1").join("channel.sock");
    assert!(err.contains("machine `web1`"), "{err}");
    assert!(err.contains(&sock.display().to_string()), "{err}");
    assert!(err.contains("no older generation"), "{err}");
}

#[test]
fn silence_and_no_socket_are_clear_errors() {
    let s = Scratch::new();
    web1(&s);
    let sock = s.state("web1").join("channel.sock");
    let err = s.fails(&["push", "web1"]);
    assert!(
        err.contains("machine `web1`")
            && err.contains("cannot connect")
            && err.contains(&sock.display().to_string()),
        "{err}"
    );

    // A socket that accepts but never answers, as QEMU's does with no agent in the guest.
    let listener = listen_at(&sock);
    let t0 = Instant::now();
    let out = s.run(&["status", "web1", "--timeout", "1"]);
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("machine `web1`")
            && err.contains("no answer to `status`")
            && err.contains(&sock.display().to_string())
            && err.contains("within 1 s"),
        "{err}"
    );
    drop(listener);

    for bad in ["nan", "inf", "0", "-1"] {
        let err = s.fails(&["status", "web1", &format!("--timeout={bad}")]);
        assert!(err.contains("not a number of seconds"), "{bad}: {err}");
    }
}

/// A bundle made for another VM is refused by the guest (it would get that VM's host key),
/// and a disk copied into another VM is shown as out of sync, whatever its records say.
#[test]
fn a_push_for_another_vm_is_refused_and_a_clone_is_out_of_sync() {
    let s = Scratch::new();
    let uuid = web1(&s);
    let guest = Guest::start(&s, &uuid);
    s.ok(&["new", "web2"]);
    let sock = s.state("web1").join("channel.sock");
    let err = s.fails(&["push", "web2", "--socket", &sock.display().to_string()]);
    assert!(
        err.contains("the identity of `web2` is for the VM with product_uuid")
            && err.contains(&format!("this VM's is {uuid}: refused")),
        "{err}"
    );
    assert_eq!(guest.read("etc/hostname"), "first\n");

    assert_eq!(s.run(&["push", "web1"]).status.code(), Some(4));
    let clone = "99999999-0000-4000-8000-000000000000";
    ts::set_product_uuid(&guest.root, clone).unwrap();
    let out = s.run(&["--json", "status", "web1"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    assert_eq!(json(&out)["product_uuid"], clone);
    let human = String::from_utf8(s.run(&["status", "web1"]).stdout).unwrap();
    assert!(human.contains("a clone or another VM answers"), "{human}");
}

/// A push whose binds over /etc fail leaves its generation current but not in use: the
/// push fails naming that, status says so, and the same push again binds it.
#[test]
fn a_generation_left_unbound_is_reported_and_bound_by_the_next_push() {
    let s = Scratch::new();
    let uuid = web1(&s);
    let guest = Guest::start(&s, &uuid);
    // An administrator's own file where the push links the network unit.
    let blocker = guest.view("run/systemd/network/10-cloud-init-ens3.network");
    std::fs::create_dir_all(blocker.parent().unwrap()).unwrap();
    std::fs::write(&blocker, "[Match]\n").unwrap();
    let err = s.fails(&["push", "web1"]);
    assert!(
        err.contains(
            "generation 2 is current but cannot be bound over /etc (the same push again, or the next boot, binds it)"
        ),
        "{err}"
    );
    let out = s.run(&["--json", "status", "web1"]);
    assert_eq!(out.status.code(), Some(3), "{out:?}");
    let st = json(&out);
    assert!(
        st["unapplied"]
            .as_str()
            .unwrap()
            .contains("generation 2 is stored but /etc shows generation 1"),
        "{st}"
    );

    std::fs::remove_file(&blocker).unwrap();
    let out = s.run(&["push", "web1"]);
    let human = String::from_utf8(out.stdout).unwrap();
    assert!(
        human.contains("nothing changed") && human.contains("reloaded       hostname"),
        "{human}"
    );
    assert_eq!(guest.read("etc/hostname"), "web1\n");
}

/// A push the guest takes while the machine's seed disk cannot be rewritten (here a
/// directory stands where it goes): the guest's report is printed whole, the seed disk
/// is named with what its staying old means, and the exit status is not success.
#[test]
fn a_push_whose_seed_disk_cannot_be_rewritten_reports_both() {
    let s = Scratch::new();
    let uuid = web1(&s);
    let guest = Guest::start(&s, &uuid);
    let iso = s.state("web1").join("seed.iso");
    std::fs::create_dir_all(iso.join("in-the-way")).unwrap();
    let out = s.run(&["push", "web1"]);
    assert_eq!(out.status.code(), Some(4), "{out:?}");
    let human = String::from_utf8(out.stdout).unwrap();
    assert!(
        human.contains("pushed `web1`") && human.contains("generation 2"),
        "{human}"
    );
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.contains("seed.iso") && err.contains("the machine's next boot applies it"),
        "{err}"
    );
    assert_eq!(guest.read("etc/hostname"), "web1\n");
}

/// A fake guest end on the channel socket (no agent): it answers as scripted, so the test
/// can put what a virtio-serial port may hold for an earlier client in front of replies.
/// `rollback` must not be written before the guest has answered anything, and a reply
/// with another request's id, or with none, must not be taken for the answer.
#[test]
fn rollback_waits_for_a_live_guest_and_takes_only_its_own_reply() {
    let s = Scratch::new();
    web1(&s);
    let listener = listen_at(&s.state("web1").join("channel.sock"));

    // A guest that never answers: the rollback times out without being sent.
    let silent = std::thread::spawn({
        let listener = listener.try_clone().unwrap();
        move || {
            let mut conn = accept_seedctl(&listener);
            let mut got = Vec::new();
            let _ = conn.read_to_end(&mut got);
            got
        }
    });
    let err = s.fails(&["rollback", "web1", "--timeout", "1"]);
    assert!(
        err.contains("no answer to `rollback`") && err.contains("nothing was sent that changes it"),
        "{err}"
    );
    let mut d = Decoder::default();
    d.push(&silent.join().unwrap());
    let Ok(Some((Message::Status, Some(_)))) = d.next_frame() else {
        panic!("seedctl must ask for status first")
    };
    assert_eq!(
        d.next_frame(),
        Ok(None),
        "nothing but the status may be written"
    );

    // A guest whose port still holds an earlier client's replies.
    let guest = std::thread::spawn(move || {
        let mut conn = accept_seedctl(&listener);
        let stale = Message::Applied {
            decision: "stale".into(),
            generation: Some(9),
            changed: Vec::new(),
            reboot_required: Vec::new(),
            reloaded: Vec::new(),
            failed: Vec::new(),
        };
        let garbage = Message::Error {
            message: "stale: the frame is not JSON".into(),
        };
        conn.write_all(&encode_with_id(&stale, Some(1))).unwrap();
        conn.write_all(&encode_with_id(&garbage, None)).unwrap();
        let mut d = Decoder::default();
        let mut buf = [0u8; 65536];
        let mut seen = Vec::new();
        while seen.len() < 2 {
            let n = conn.read(&mut buf).unwrap();
            assert!(n > 0);
            d.push(&buf[..n]);
            while let Some((m, id)) = d.next_frame().unwrap() {
                let reply = match &m {
                    Message::Status => status_reply(3),
                    _ => Message::Applied {
                        decision: "rolled back to generation 2".into(),
                        generation: Some(2),
                        changed: vec!["hostname".into()],
                        reboot_required: Vec::new(),
                        reloaded: Vec::new(),
                        failed: Vec::new(),
                    },
                };
                // The stale reply again, and the agent's error about an earlier
                // client's half frame, which carries no id; then ours.
                conn.write_all(&encode_with_id(&stale, Some(1))).unwrap();
                conn.write_all(&encode_with_id(&garbage, None)).unwrap();
                conn.write_all(&encode_with_id(&reply, id)).unwrap();
                seen.push(m.kind().to_owned());
            }
        }
        seen
    });
    let out = s.ok(&["rollback", "web1", "--timeout", "10"]);
    assert!(
        out.contains("generation 2") && !out.contains("stale"),
        "{out}"
    );
    assert_eq!(guest.join().unwrap(), ["status", "rollback"]);
}

/// A FAKE guest end whose agent echoes no request ids, as agents did before them: seedctl
/// takes none of its replies for the answer (one could be left for an earlier client),
/// and the error says what came and what to do.
#[test]
fn a_reply_without_a_request_id_is_not_taken_and_the_error_says_so() {
    let s = Scratch::new();
    web1(&s);
    let listener = listen_at(&s.state("web1").join("channel.sock"));
    let guest = std::thread::spawn(move || {
        let mut conn = accept_seedctl(&listener);
        let asked = read_message(&mut conn);
        conn.write_all(&encode_with_id(&status_reply(1), None))
            .unwrap();
        let mut rest = Vec::new();
        let _ = conn.read_to_end(&mut rest);
        asked
    });
    let err = s.fails(&["status", "web1", "--timeout", "1"]);
    assert!(
        err.contains("no answer to `status`")
            && err.contains("1 reply without a request id came and was passed over")
            && err.contains("needs a newer nixseed-agent"),
        "{err}"
    );
    assert_eq!(guest.join().unwrap(), Message::Status);
}

/// A guest's answer to `status` at `generation`, with nothing else known.
fn status_reply(generation: u64) -> Message {
    Message::StatusReply {
        generation: Some(generation),
        instance_id: None,
        product_uuid: None,
        files: Default::default(),
        links: Default::default(),
        vm_product_uuid: None,
        unapplied: None,
    }
}

/// Plays the guest: accept seedctl's connection on `sock`, say hello, return the answer.
fn hello_and_answer(listener: &UnixListener, product_uuid: &str) -> Message {
    let mut conn = accept_seedctl(listener);
    let hello = hello(product_uuid);
    // The guest repeats its hello until it hears back.
    conn.write_all(&hello).unwrap();
    conn.write_all(&hello).unwrap();
    read_message(&mut conn)
}

fn read_message(conn: &mut UnixStream) -> Message {
    let mut d = Decoder::default();
    let mut buf = [0u8; 65536];
    loop {
        let n = conn.read(&mut buf).unwrap();
        assert!(n > 0, "seedctl closed the channel without answering");
        d.push(&buf[..n]);
        if let Some(m) = d.next_message().unwrap() {
            return m;
        }
    }
}

/// `seedctl --json serve ARGS` started in the background, its output captured.
fn serve(s: &Scratch, args: &[&str]) -> Child {
    s.cmd(&[&["--json", "serve"][..], args].concat())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn serve_once(s: &Scratch, sock: &Path) -> Child {
    serve(
        s,
        &["web1", "--socket", &sock.display().to_string(), "--once"],
    )
}

#[test]
fn hello_is_answered_with_the_seed_iso_files() {
    common::require_tool("isoinfo");
    let s = Scratch::new();
    let uuid = web1(&s);
    let sock = s.path().join("qemu-channel.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let serve = serve_once(&s, &sock);
    let Message::Push { bundle } = hello_and_answer(&listener, &uuid.to_uppercase()) else {
        panic!("a hello with the machine's product_uuid must get push")
    };
    assert_eq!(bundle.machine, "web1");
    let files = bundle.verify().unwrap();

    // The bundle is byte for byte what the seed ISO carries.
    s.ok(&["seed", "web1", "-o", "seed.iso"]);
    for f in ["meta-data", "user-data", "network-config"] {
        let iso = common::stdout_of(
            Command::new("isoinfo")
                .args(["-R", "-i"])
                .arg(s.path().join("seed.iso"))
                .args(["-x", &format!("/{f}")]),
        );
        assert_eq!(
            String::from_utf8(files.get(f).unwrap().to_vec()).unwrap(),
            iso,
            "{f}"
        );
    }

    let out = serve.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    let ans = &v["answers"][0];
    assert_eq!(ans["answer"], "push");
    assert_eq!(ans["machine"], "web1");
    let log = String::from_utf8(out.stderr).unwrap();
    let iid = ans["instance_id"].as_str().unwrap();
    assert!(iid.starts_with("nixseed-"));
    assert!(
        log.contains("web1: answered hello") && log.contains(iid),
        "{log}"
    );
}

#[test]
fn hello_from_a_foreign_product_uuid_is_refused() {
    let s = Scratch::new();
    let uuid = web1(&s);
    let sock = s.path().join("qemu-channel.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let serve = serve_once(&s, &sock);
    let foreign = "00000000-1111-2222-3333-444444444444";
    let Message::Refuse { reason } = hello_and_answer(&listener, foreign) else {
        panic!("a foreign product_uuid must be refused")
    };
    assert!(
        reason.contains(foreign) && reason.contains(&uuid) && reason.contains("web1"),
        "{reason}"
    );
    let out = serve.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(json(&out)["answers"][0]["answer"], "refuse");
    let log = String::from_utf8(out.stderr).unwrap();
    assert!(
        log.contains("web1: refused hello") && log.contains(foreign),
        "{log}"
    );
}

/// `serve --once` promises an answered machine: when the machine's QEMU goes before its
/// guest says hello, it fails, naming the machine and the socket.
#[test]
fn serve_once_fails_when_qemu_exits_before_the_hello() {
    let s = Scratch::new();
    web1(&s);
    let sock = s.path().join("qemu-channel.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    let mut qemu = Command::new("sleep").arg("600").spawn().unwrap();
    let serve = serve(
        &s,
        &[
            "web1",
            "--socket",
            &sock.display().to_string(),
            "--once",
            "--qemu-pid",
            &qemu.id().to_string(),
        ],
    );
    // The answerer holds the channel; then QEMU goes without a hello.
    let _conn = accept_seedctl(&listener);
    qemu.kill().unwrap();
    qemu.wait().unwrap();
    let out = serve.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve --once exited 0: {err}");
    let e = json(&out)["error"].as_str().unwrap_or_default().to_owned();
    assert!(
        e.contains("web1")
            && e.contains(&sock.display().to_string())
            && e.contains("exited before the guest said hello"),
        "{e}"
    );
    assert!(err.contains("web1: QEMU exited"), "{err}");
}

/// `seedctl serve --connect URI` finds each running domain's channel socket in its live
/// XML (libvirt's test driver, loaded from a node file, stands in for libvirtd) and skips
/// domains that have no machine directory.
#[test]
fn serve_finds_libvirt_domains_channel_sockets() {
    common::require_tool("virsh");
    let s = Scratch::new();
    let uuid = web1(&s);
    let sock = s.path().join("libvirt-web1-channel.sock");
    let node = s.path().join("node.xml");
    std::fs::write(
        &node,
        format!(
            "<node>
<domain type='test'><name>web1</name><memory>65536</memory><os><type>hvm</type></os>
  <devices>
    <channel type='unix'>
      <source mode='bind' path='{}/qga.sock'/>
      <target type='virtio' name='org.qemu.guest_agent.0'/>
    </channel>
    <channel type='unix'>
      <source mode='bind' path='{}'/>
      <target type='virtio' name='org.nixseed.channel.0'/>
    </channel>
  </devices>
</domain>
<domain type='test'><name>unmanaged</name><memory>65536</memory><os><type>hvm</type></os></domain>
</node>
",
            s.path().display(),
            sock.display()
        ),
    )
    .unwrap();
    let listener = UnixListener::bind(&sock).unwrap();
    let uri = format!("test://{}", node.display());
    let serve = serve(&s, &["--connect", &uri, "--once"]);
    let Message::Push { bundle } = hello_and_answer(&listener, &uuid) else {
        panic!("web1 must be answered with push")
    };
    assert_eq!(bundle.machine, "web1");
    let out = serve.wait_with_output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let v = json(&out);
    assert_eq!(v["answers"].as_array().unwrap().len(), 1, "{v}");
    assert_eq!(v["answers"][0]["socket"], sock.display().to_string());
    let log = String::from_utf8(out.stderr).unwrap();
    assert!(log.contains("unmanaged: skipped"), "{log}");

    // A named domain with no machine directory is an error that says what to do.
    let err = s.fails(&["serve", "unmanaged", "--connect", &uri, "--once"]);
    assert!(err.contains("machine `unmanaged` not found"), "{err}");

    // A machine whose domain has no nixseed channel: the error says to redefine it.
    s.new_with_admin_key("unmanaged", &[]);
    let err = s.fails(&["serve", "unmanaged", "--connect", &uri, "--once"]);
    assert!(
        err.contains("has no unix channel named org.nixseed.channel.0")
            && err.contains("seedctl define unmanaged"),
        "{err}"
    );
}

/// The whole first-boot path with the real agent: its `initrd` stage finds no seed disk,
/// opens the `org.nixseed.channel.0` port (a pty here, where a VM has a virtio-serial
/// node) and says hello; the test bridges the port to a unix socket as QEMU's chardev
/// does, and `seedctl serve --once` answers. The guest ends up with the machine's
/// identity and `seedctl status` agrees.
#[test]
fn first_boot_identity_from_serve_through_the_real_agent() {
    let s = Scratch::new();
    let uuid = web1(&s);
    let root = s.path().join("guest");
    // No seed anywhere: the identity can only come over the channel.
    std::fs::create_dir_all(&root).unwrap();
    ts::Guest {
        product_uuid: &uuid,
        cmdline: "console=ttyS0\n",
        ..ts::Guest::default()
    }
    .lay_out(&root)
    .unwrap();
    for d in ["host/dev", "host/sys/class/virtio-ports/vport1p1"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::write(
        root.join("host/sys/class/virtio-ports/vport1p1/name"),
        "org.nixseed.channel.0\n",
    )
    .unwrap();

    let (master, slave) = ts::raw_pty_at(&root.join("host/dev/vport1p1")).unwrap();

    // QEMU's side: a chardev socket bridged to the port.
    let listener = listen_at(&s.state("web1").join("channel.sock"));
    std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut to_guest = master.try_clone().unwrap();
        let mut from_host = conn.try_clone().unwrap();
        std::thread::spawn(move || std::io::copy(&mut from_host, &mut to_guest));
        let (mut from_guest, mut to_host) = (master, conn);
        let _ = std::io::copy(&mut from_guest, &mut to_host);
    });

    let serve = serve(&s, &["--local", "web1", "--once"]);
    let agent = agent_binary();
    let out = Command::new("unshare")
        .args(["-m", "-u"])
        .arg(&agent)
        .arg("initrd")
        .arg("--sysroot")
        .arg(root.join("sysroot"))
        .arg("--root")
        .arg(root.join("host"))
        .arg("--run")
        .arg(root.join("run"))
        .args(["--channel-wait", "10"])
        .output()
        .unwrap();
    let agent_log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{agent_log}");
    assert!(
        agent_log.contains("identity for web1 received"),
        "{agent_log}"
    );
    if let Some(line) = agent_log.lines().find(|l| l.contains("received")) {
        eprintln!("agent: {line}");
    }
    let served = serve.wait_with_output().unwrap();
    assert!(served.status.success(), "{served:?}");
    assert_eq!(json(&served)["answers"][0]["answer"], "push");

    let var = root.join("sysroot/var/identity");
    for f in ["machine-id", "ssh_host_ed25519_key.pub", "tcp_ports"] {
        assert_eq!(
            std::fs::read_to_string(var.join(f)).unwrap(),
            std::fs::read_to_string(s.machine("web1").join(f)).unwrap(),
            "{f}"
        );
    }
    assert_eq!(
        std::fs::read_to_string(var.join("hostname")).unwrap(),
        "web1\n"
    );
    drop(slave);
}

/// Plays a guest at its first-boot wait for `push`: says hello with `product_uuid`, never
/// answers `status`, and returns the kinds of every message seedctl sent before it hung up.
fn guest_at_boot_wait(
    listener: UnixListener,
    product_uuid: &str,
) -> std::thread::JoinHandle<Vec<String>> {
    let hello = hello(product_uuid);
    std::thread::spawn(move || {
        let mut conn = accept_seedctl(&listener);
        conn.write_all(&hello).unwrap();
        let mut d = Decoder::default();
        let mut buf = [0u8; 65536];
        let mut seen = Vec::new();
        while let Ok(n) = conn.read(&mut buf) {
            if n == 0 {
                break;
            }
            d.push(&buf[..n]);
            while let Ok(Some(m)) = d.next_message() {
                seen.push(m.kind().to_owned());
            }
        }
        seen
    })
}

#[test]
fn a_push_to_another_machine_waiting_at_first_boot_sends_nothing() {
    let s = Scratch::new();
    let uuid = web1(&s);
    let sock = s.path().join("web2-channel.sock");
    let foreign = "00000000-1111-2222-3333-444444444444";
    let guest = guest_at_boot_wait(UnixListener::bind(&sock).unwrap(), foreign);
    let sock_arg = sock.display().to_string();
    let push = ["push", "web1", "--socket", &sock_arg, "--timeout", "10"];
    let err = s.fails(&push);
    assert!(
        err.contains("not this machine")
            && err.contains(foreign)
            && err.contains(&uuid)
            && err.contains("nothing was sent"),
        "{err}"
    );
    assert_eq!(guest.join().unwrap(), ["status"], "only the probe went out");

    // The machine's own guest at its wait gets the push.
    std::fs::remove_file(&sock).unwrap();
    let guest = guest_at_boot_wait(UnixListener::bind(&sock).unwrap(), &uuid.to_uppercase());
    let out = s.ok(&push);
    assert!(out.contains("waiting for an identity"), "{out}");
    assert_eq!(guest.join().unwrap(), ["status", "push"]);
}
