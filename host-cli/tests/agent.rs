//! `seedctl agent` against the real qemu-ga (`qemu-ga -m unix-listen`, no VM needed),
//! and the errors when nothing answers.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::net::UnixListener;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use common::{Scratch, require_tool};

struct QemuGa {
    child: Child,
    sock: std::path::PathBuf,
}

impl QemuGa {
    fn start(s: &Scratch) -> QemuGa {
        QemuGa::start_with(s, &[])
    }

    fn start_with(s: &Scratch, extra: &[&str]) -> QemuGa {
        require_tool("qemu-ga");
        let sock = s.path().join("qga.sock");
        let statedir = s.path().join("qga-state");
        std::fs::create_dir_all(&statedir).unwrap();
        let child = Command::new("qemu-ga")
            .args(["-m", "unix-listen", "-p"])
            .arg(&sock)
            .arg("-t")
            .arg(&statedir)
            .args(extra)
            .spawn()
            .unwrap();
        assert!(
            nixseed_test_support::listening_within(&sock, Duration::from_secs(10)),
            "qemu-ga did not listen on {}",
            sock.display()
        );
        QemuGa { child, sock }
    }
}

impl Drop for QemuGa {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The arguments of `seedctl agent vm1 --socket SOCK ARGS`: `args` to the guest agent
/// listening on `sock`.
fn agent_args<'a>(sock: &'a std::path::Path, args: &[&'a str]) -> Vec<&'a str> {
    let mut all = vec!["agent", "vm1", "--socket", sock.to_str().unwrap()];
    all.extend(args);
    all
}

fn agent(s: &Scratch, sock: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let all = [&["--json"][..], &agent_args(sock, args)].concat();
    serde_json::from_str(&s.ok(&all)).unwrap()
}

#[test]
fn commands_against_real_qemu_ga() {
    let s = Scratch::new();
    let ga = QemuGa::start(&s);
    assert_eq!(
        agent(&s, &ga.sock, &["ping"])["return"],
        serde_json::json!({})
    );
    let info = agent(&s, &ga.sock, &["info"]);
    assert!(info["return"]["version"].as_str().unwrap().contains('.'));
    // Without --json: the version, then the commands, the disabled ones marked.
    let text = s.ok(&agent_args(&ga.sock, &["info"]));
    assert!(
        text.starts_with("agent version ") && text.contains("\ncommands:\n  guest-"),
        "{text}"
    );
    assert!(text.lines().any(|l| l == "  guest-ping"), "{text}");
    assert!(
        info["return"]["supported_commands"]
            .as_array()
            .unwrap()
            .len()
            > 10
    );
    let host = agent(&s, &ga.sock, &["hostname"]);
    let expected = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap();
    assert_eq!(host["return"]["host-name"], expected.trim());
    let t = agent(&s, &ga.sock, &["time"])["return"].as_i64().unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64;
    assert!(
        (now - t).abs() < 60_000_000_000,
        "guest time {t} vs host {now}"
    );
    let os = agent(&s, &ga.sock, &["osinfo"]);
    assert!(os["return"]["kernel-release"].is_string());
    // Many sessions in a row: each resynchronises, none reads a stale reply.
    for _ in 0..5 {
        let v = agent(
            &s,
            &ga.sock,
            &["cmd", r#"{"execute":"guest-sync","arguments":{"id":4242}}"#],
        );
        assert_eq!(v["return"], 4242);
    }
    // The agent's own error class and text come through.
    let out = s.run(&agent_args(
        &ga.sock,
        &["cmd", r#"{"execute":"guest-nope"}"#],
    ));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("CommandNotFound")
            && err.contains("guest-nope")
            && err.contains("machine `vm1`"),
        "{err}"
    );
}

#[test]
fn a_refused_shutdown_is_an_error() {
    let s = Scratch::new();
    let ga = QemuGa::start_with(&s, &["-b", "guest-shutdown"]);
    let err = s.fails(&agent_args(&ga.sock, &["shutdown"]));
    assert!(
        err.contains("guest-shutdown") && err.contains("disabled"),
        "{err}"
    );
}

#[test]
fn silence_and_absence_are_reported_in_time() {
    let s = Scratch::new();
    // A socket that accepts and never answers.
    let silent = s.path().join("silent.sock");
    let listener = UnixListener::bind(&silent).unwrap();
    let start = Instant::now();
    let err = s.fails(&agent_args(&silent, &["--timeout", "1", "ping"]));
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(
        err.contains("no answer") && err.contains("silent.sock") && err.contains("machine `vm1`"),
        "{err}"
    );
    drop(listener);

    let err = s.fails(&["agent", "vm1", "ping"]);
    assert!(
        err.contains(".seedctl/vm1/qga.sock") && err.contains("is the machine running"),
        "{err}"
    );
    let err = s.fails(&["agent", "vm1", "cmd", "not json"]);
    assert!(err.contains("not JSON"), "{err}");
}

/// An agent that keeps talking without ever answering the sync (a reply with another id
/// every 200 ms, then one that trickles in a byte at a time) still ends the command at
/// its --timeout: the timeout bounds the exchange, not each read.
#[test]
fn a_chatty_agent_that_never_answers_is_cut_off_at_the_timeout() {
    use std::io::Write;
    let s = Scratch::new();
    for (name, chunks) in [
        ("chatty", vec![b"\xff{\"return\": 0}\n".to_vec(); 100]),
        ("trickle", {
            let mut v = vec![b"\xff".to_vec()];
            v.extend(b"{\"return\": ".iter().map(|b| vec![*b]));
            v.extend(std::iter::repeat_n(b" ".to_vec(), 100));
            v
        }),
    ] {
        let sock = s.path().join(format!("{name}.sock"));
        let listener = UnixListener::bind(&sock).unwrap();
        let talker = std::thread::spawn(move || {
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            for c in chunks {
                if conn.write_all(&c).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let start = Instant::now();
        let err = s.fails(&agent_args(&sock, &["--timeout", "2", "ping"]));
        let took = start.elapsed();
        assert!(err.contains("no answer"), "{name}: {err}");
        assert!(took < Duration::from_secs(4), "{name}: took {took:?}");
        let _ = talker.join();
    }
    let err = s.fails(&["agent", "vm1", "--timeout", "0", "ping"]);
    assert!(err.contains("--timeout"), "{err}");
}

/// `cmd` with guest-shutdown is sent as `shutdown` is: no answer is success.
#[test]
fn cmd_guest_shutdown_takes_silence_for_success() {
    let s = Scratch::new();
    let sock = s.path().join("down.sock");
    let listener = UnixListener::bind(&sock).unwrap();
    // Answers the sync, then reads the shutdown and says nothing, as an agent going down.
    let fake = std::thread::spawn(move || {
        use std::io::{BufRead, BufReader, Write};
        let (conn, _) = listener.accept().unwrap();
        let mut r = BufReader::new(conn.try_clone().unwrap());
        let mut w = conn;
        let mut line = Vec::new();
        r.read_until(b'}', &mut line).unwrap();
        r.read_until(b'}', &mut line).unwrap();
        let text = String::from_utf8_lossy(&line).into_owned();
        let id: String = text
            .split("\"id\":")
            .nth(1)
            .unwrap()
            .chars()
            .filter(char::is_ascii_digit)
            .collect();
        w.write_all(b"\xff").unwrap();
        w.write_all(format!("{{\"return\": {id}}}\n").as_bytes())
            .unwrap();
        let mut rest = Vec::new();
        r.read_until(b'}', &mut rest).unwrap();
        String::from_utf8_lossy(&rest).into_owned()
    });
    let out = s.ok(&agent_args(
        &sock,
        &["--timeout", "1", "cmd", r#"{"execute":"guest-shutdown"}"#],
    ));
    let seen = fake.join().unwrap();
    assert!(seen.contains("guest-shutdown"), "{seen}");
    assert!(!out.contains("no answer"), "{out}");
}
