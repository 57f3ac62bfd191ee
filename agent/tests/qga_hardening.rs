//! Guest-agent hardening: a rate limit that paces work and never holds up sync/ping, unsafe commands in the
//! audit log, guest-file-* confined to configured directories, refusals that say why, and
//! an agent that outlives running out of descriptors.
#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_nixseed-agent");

struct Serve {
    child: Child,
    sock: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn serve(extra: &[&str]) -> Serve {
    serve_via(&[], extra)
}

/// The agent started through `wrapper` (a program that execs it, such as `setsid` or
/// `prlimit`), so that its pid is the agent's.
fn serve_via(wrapper: &[&str], extra: &[&str]) -> Serve {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("qga.sock");
    let mut cmd = match wrapper {
        [] => Command::new(AGENT),
        [program, args @ ..] => {
            let mut c = Command::new(program);
            c.args(args).arg(AGENT);
            c
        }
    };
    let child = cmd
        .args(["serve", "--no-channel", "-m", "unix-listen", "-p"])
        .arg(&sock)
        .arg("-t")
        .arg(dir.path().join("state"))
        .args(extra)
        .env("NIXSEED_LOG_STDERR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    assert!(
        nixseed_test_support::listening_within(&sock, Duration::from_secs(20)),
        "the agent did not listen"
    );
    Serve {
        child,
        sock,
        _dir: dir,
    }
}

fn replies(sock: &std::path::Path, requests: &str, n: usize) -> Vec<String> {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    (&s).write_all(requests.as_bytes()).unwrap();
    let mut r = BufReader::new(&s);
    (0..n)
        .map(|_| {
            let mut l = String::new();
            r.read_line(&mut l).unwrap();
            l
        })
        .collect()
}

/// A request that draws from the rate limit's bucket.
const OSINFO: &str = r#"{"execute":"guest-get-osinfo"}"#;

/// A burst past the limit is paced, not refused (qemu-ga refuses none): all 400 requests
/// are answered, the last 200 at the sustained rate (50 per second, so about 4 s).
#[test]
fn bursts_of_work_are_paced_and_every_request_is_answered() {
    let s = serve(&[]);
    let mut req = OSINFO.repeat(400);
    req.push_str(
        r#"{"execute":"guest-ping","id":1}{"execute":"guest-sync","arguments":{"id":99}}"#,
    );
    let t0 = Instant::now();
    let out = replies(&s.sock, &req, 402);
    let took = t0.elapsed();
    let answered = out[..400]
        .iter()
        .filter(|l| l.starts_with(r#"{"return": {"#))
        .count();
    assert_eq!(
        answered,
        400,
        "{:?}",
        out.iter().find(|l| !l.starts_with(r#"{"return""#))
    );
    assert!(
        took >= Duration::from_secs(3),
        "200 past the burst in {took:?}"
    );
    assert_eq!(out[400], "{\"return\": {}, \"id\": 1}\n");
    assert_eq!(out[401], "{\"return\": 99}\n");
}

/// Ping, sync and thaw never wait for the bucket: a client that flooded it can still
/// resynchronise at once on a new request.
#[test]
fn ping_and_sync_are_never_paced() {
    let s = serve(&[]);
    replies(&s.sock, &OSINFO.repeat(200), 200);
    let t0 = Instant::now();
    let out = replies(
        &s.sock,
        &r#"{"execute":"guest-ping","id":2}"#.repeat(100),
        100,
    );
    assert!(out.iter().all(|l| l == "{\"return\": {}, \"id\": 2}\n"));
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
}

#[test]
fn unsafe_commands_are_audited_and_files_confined() {
    let dir = tempfile::tempdir().unwrap();
    let allowed = dir.path().join("allowed");
    std::fs::create_dir(&allowed).unwrap();
    std::fs::write(allowed.join("ok.txt"), "hello").unwrap();
    std::os::unix::fs::symlink("/etc", allowed.join("escape")).unwrap();
    let mut s = serve(&[
        "--unsafe-rpcs",
        "guest-file-open,guest-file-close",
        "--file-dirs",
        allowed.to_str().unwrap(),
    ]);
    let open = |p: &str| format!(r#"{{"execute":"guest-file-open","arguments":{{"path":"{p}"}}}}"#);
    let req = [
        open(&allowed.join("ok.txt").display().to_string()),
        open("/etc/hostname"),
        open(&allowed.join("escape/hostname").display().to_string()),
        open(&format!("{}/../../etc/hostname", allowed.display())),
    ]
    .concat();
    let out = replies(&s.sock, &req, 4);
    assert!(out[0].starts_with(r#"{"return": "#), "{}", out[0]);
    for l in &out[1..] {
        assert!(
            l.contains("outside the directories guest-file-* may use"),
            "{l}"
        );
    }
    let _ = s.child.kill();
    let mut err = String::new();
    std::io::Read::read_to_string(s.child.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(err.contains("AUDIT guest agent: running guest-file-open (enabled by the allow-list) with arguments [path]"), "{err}");
}

/// A background grandchild keeps the output pipes open after the child exits: like
/// qemu-ga, guest-exec-status says `exited: false` until they close, and the agent keeps
/// answering everything else meanwhile.
#[test]
fn exec_status_does_not_wait_for_a_grandchild_holding_the_output() {
    let s = serve(&["--unsafe-rpcs", "guest-exec,guest-exec-status"]);
    let conn = UnixStream::connect(&s.sock).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut r = BufReader::new(&conn);
    let mut ask = |req: &str| {
        (&conn).write_all(req.as_bytes()).unwrap();
        let mut l = String::new();
        r.read_line(&mut l).unwrap();
        l
    };
    let started = ask(
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/sh","arg":["-c","sleep 4 & echo hi"],"capture-output":true}}"#,
    );
    let v: serde_json::Value = serde_json::from_str(&started).unwrap();
    let pid = v["return"]["pid"].as_i64().unwrap();
    std::thread::sleep(Duration::from_millis(700));
    let status = format!(r#"{{"execute":"guest-exec-status","arguments":{{"pid":{pid}}}}}"#);
    let t0 = Instant::now();
    let first = ask(&status);
    let ping = ask(r#"{"execute":"guest-ping"}"#);
    assert!(
        t0.elapsed() < Duration::from_secs(2),
        "status and ping took {:?}",
        t0.elapsed()
    );
    assert_eq!(first, "{\"return\": {\"exited\": false}}\n");
    assert_eq!(ping, "{\"return\": {}}\n");
    let done = loop {
        let l = ask(&status);
        if !l.contains("\"exited\": false") {
            break l;
        }
        assert!(t0.elapsed() < Duration::from_secs(15), "never finished");
        std::thread::sleep(Duration::from_millis(200));
    };
    let v: serde_json::Value = serde_json::from_str(&done).unwrap();
    assert_eq!(v["return"]["exited"], true, "{done}");
    assert_eq!(v["return"]["exitcode"], 0, "{done}");
    assert_eq!(v["return"]["out-data"], "aGkK", "{done}");
}

/// `nixseed-agent status --identity-dir DIR`: exits 0 with the current manifest.
/// An identity store at `dir/identity`, rendered by the agent from a NoCloud seed
/// directory holding `meta` and `user` (generation 1).
fn rendered_store(dir: &std::path::Path, meta: &str, user: &str) -> std::path::PathBuf {
    let seed = dir.join("seed");
    std::fs::create_dir(&seed).unwrap();
    std::fs::write(seed.join("meta-data"), meta).unwrap();
    std::fs::write(seed.join("user-data"), user).unwrap();
    let id = dir.join("identity");
    let rendered = Command::new(AGENT)
        .args(["render", "--seed"])
        .arg(&seed)
        .arg("--out")
        .arg(&id)
        .output()
        .unwrap();
    assert!(rendered.status.success(), "{rendered:?}");
    id
}

fn status_of(dir: &std::path::Path) -> serde_json::Value {
    let out = Command::new(AGENT)
        .args(["status", "--identity-dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "status fails on {}: {}",
        dir.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn authorized_key_changes_are_new_generations_that_verify() {
    let dir = tempfile::tempdir().unwrap();
    let k1 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKb1 one";
    let k2 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKb2 two";
    let id = rendered_store(
        dir.path(),
        "instance-id: i-keys\nlocal-hostname: keys\n",
        &format!("#cloud-config\nssh_authorized_keys:\n  - {k1}\n"),
    );
    assert_eq!(status_of(&id)["generation"], 1);

    let s = serve(&["--identity-dir", id.to_str().unwrap()]);
    let add = format!(
        r#"{{"execute":"guest-ssh-add-authorized-keys","arguments":{{"username":"root","keys":["{k2}"]}}}}"#
    );
    assert_eq!(replies(&s.sock, &add, 1)[0].trim(), r#"{"return": {}}"#);
    // The change is a generation of its own; its manifest matches its files.
    let st = status_of(&id);
    assert_eq!(st["generation"], 2, "{st}");
    assert_eq!(st["instance_id"], "i-keys");
    let keys = std::fs::read_to_string(id.join("admin_authorized_keys")).unwrap();
    assert_eq!(keys, format!("{k1}\n{k2}\n"));
    // The seed's own generation is untouched (a rollback returns to it).
    assert_eq!(
        std::fs::read_to_string(id.join("gen-1/admin_authorized_keys")).unwrap(),
        format!("{k1}\n")
    );
    // Removing every key leaves a whole, empty file, not what a power cut leaves.
    let remove = format!(
        r#"{{"execute":"guest-ssh-remove-authorized-keys","arguments":{{"username":"root","keys":["{k1}","{k2}"]}}}}"#
    );
    assert_eq!(replies(&s.sock, &remove, 1)[0].trim(), r#"{"return": {}}"#);
    assert_eq!(status_of(&id)["generation"], 3);
    assert_eq!(
        std::fs::read_to_string(id.join("admin_authorized_keys")).unwrap(),
        ""
    );
    drop(s);
    // A store whose `current` is gone (a power cut recovered to nothing, no seed since):
    // refused, and no plain `current` appears through the dangling flat link.
    std::fs::remove_file(id.join("current")).unwrap();
    let s = serve(&["--identity-dir", id.to_str().unwrap()]);
    let out = replies(&s.sock, &add, 1);
    assert!(out[0].contains("no current generation"), "{}", out[0]);
    assert!(id.join("current").symlink_metadata().is_err());
}

/// The handle in guest-file-open's `{"return": N}`.
fn returned_handle(reply: &str) -> i64 {
    reply
        .trim()
        .trim_start_matches(r#"{"return": "#)
        .trim_end_matches('}')
        .parse()
        .unwrap_or_else(|_| panic!("not a handle: {reply}"))
}

#[test]
fn reading_a_pipe_with_nothing_in_it_does_not_stall_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    let s = serve(&[
        "--unsafe-rpcs",
        "guest-file-open,guest-file-read,guest-file-write",
    ]);
    let t0 = Instant::now();
    // No writer yet: the open does not wait for one.
    let open = format!(
        r#"{{"execute":"guest-file-open","arguments":{{"path":"{}"}}}}"#,
        fifo.display()
    );
    let h = returned_handle(&replies(&s.sock, &open, 1)[0]);
    // A writer that holds the pipe open and sends nothing, then a little.
    let mut writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
    let read = format!(
        r#"{{"execute":"guest-file-read","arguments":{{"handle":{h}}}}}{{"execute":"guest-ping"}}"#
    );
    let out = replies(&s.sock, &read, 2);
    assert_eq!(
        out[0].trim(),
        r#"{"return": {"count": 0, "buf-b64": "", "eof": false}}"#
    );
    assert_eq!(out[1].trim(), r#"{"return": {}}"#);
    writer.write_all(b"hi").unwrap();
    let out = replies(&s.sock, &read, 2);
    assert_eq!(
        out[0].trim(),
        r#"{"return": {"count": 2, "buf-b64": "aGk=", "eof": false}}"#
    );
    // The other way: a reader that reads nothing, and more data than the pipe holds.
    let out_fifo = dir.path().join("out");
    assert!(
        Command::new("mkfifo")
            .arg(&out_fifo)
            .status()
            .unwrap()
            .success()
    );
    use std::os::unix::fs::OpenOptionsExt;
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
        .open(&out_fifo)
        .unwrap();
    let open_w = format!(
        r#"{{"execute":"guest-file-open","arguments":{{"path":"{}","mode":"w"}}}}"#,
        out_fifo.display()
    );
    let w = returned_handle(&replies(&s.sock, &open_w, 1)[0]);
    let data = "A".repeat(256 << 10);
    let write = format!(
        r#"{{"execute":"guest-file-write","arguments":{{"handle":{w},"buf-b64":"{data}"}}}}{{"execute":"guest-ping"}}"#
    );
    let out = replies(&s.sock, &write, 2);
    let count: usize = out[0]
        .split("\"count\": ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("{}", out[0]));
    assert!(
        count > 0 && count < 192 << 10,
        "wrote {count} bytes into a pipe nobody reads"
    );
    assert_eq!(out[1].trim(), r#"{"return": {}}"#);
    assert!(t0.elapsed() < Duration::from_secs(10));
}

/// Commands newer than Debian's qemu-ga (so outside the differential test) answer with
/// the member names of QEMU's schema: `GuestLoadAverage` (10.0) and, for IPv4 routes,
/// `GuestNetworkRoute` (9.1).
#[test]
fn newer_commands_use_the_schema_names() {
    let s = serve(&[]);
    let r = replies(
        &s.sock,
        "{\"execute\":\"guest-get-load\"}\n{\"execute\":\"guest-network-get-route\"}\n",
        2,
    );
    let load: serde_json::Value = serde_json::from_str(&r[0]).unwrap();
    // QEMU prints doubles with %.17g: a load of exactly 2.00 comes out as `2`.
    for k in ["load1m", "load5m", "load15m"] {
        assert!(load["return"][k].is_number(), "{k} in {}", r[0]);
    }
    let routes: serde_json::Value = serde_json::from_str(&r[1]).unwrap();
    for route in routes["return"].as_array().unwrap() {
        let family_field = if route["version"] == 6 {
            "nexthop"
        } else {
            "gateway"
        };
        assert!(route[family_field].is_string(), "{route}");
        assert!(
            route["iface"].is_string() && route["metric"].is_i64(),
            "{route}"
        );
    }
}

/// Keys map to the identity's files by account: `--admin-user` to admin_authorized_keys,
/// `--ssh-user` to user_authorized_keys, any other existing account is refused (one
/// shared file would let its keys log in as the ssh user). KubeVirt's periodic resend of
/// the same keys with `reset` makes no new generation.
#[test]
fn keys_map_to_accounts_and_an_unchanged_resend_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let id = rendered_store(dir.path(), "instance-id: i-acc\n", "#cloud-config\n");
    let s = serve(&[
        "--identity-dir",
        id.to_str().unwrap(),
        "--admin-user",
        "daemon",
        "--ssh-user",
        "nobody",
    ]);
    let k3 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKb3 three";
    let k4 = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKb4 four";
    let set = |user: &str, keys: &[&str]| {
        format!(
            r#"{{"execute":"guest-ssh-add-authorized-keys","arguments":{{"username":"{user}","keys":{},"reset":true}}}}"#,
            serde_json::json!(keys)
        )
    };
    let ok = r#"{"return": {}}"#;
    assert_eq!(replies(&s.sock, &set("nobody", &[k3, k4]), 1)[0].trim(), ok);
    assert_eq!(
        std::fs::read_to_string(id.join("user_authorized_keys")).unwrap(),
        format!("{k3}\n{k4}\n")
    );
    assert_eq!(status_of(&id)["generation"], 2);
    assert_eq!(replies(&s.sock, &set("daemon", &[k4]), 1)[0].trim(), ok);
    assert_eq!(
        std::fs::read_to_string(id.join("admin_authorized_keys")).unwrap(),
        format!("{k4}\n")
    );
    assert_eq!(status_of(&id)["generation"], 3);
    // The same keys again, in another order, as KubeVirt resends them: nothing written.
    assert_eq!(replies(&s.sock, &set("nobody", &[k4, k3]), 1)[0].trim(), ok);
    assert_eq!(status_of(&id)["generation"], 3);
    // Other accounts, root among them when it is not the admin account: refused, naming
    // the accounts that have files.
    for user in ["root", "bin"] {
        let other = replies(&s.sock, &set(user, &[k3]), 1);
        assert!(
            other[0].contains(&format!("user '{user}' has no keys in the identity"))
                && other[0].contains(
                    "only 'daemon' (admin_authorized_keys) and 'nobody' (user_authorized_keys)"
                ),
            "{}",
            other[0]
        );
    }
    assert_eq!(status_of(&id)["generation"], 3);
}

fn file_open(path: &std::path::Path, mode: &str) -> String {
    serde_json::json!({"execute": "guest-file-open", "arguments": {"path": path, "mode": mode}})
        .to_string()
}

/// `--file-dirs`: links are followed only while they stay inside. A dangling link and a
/// link to an existing file outside are refused, and nothing is created or changed
/// outside; links inside, relative or absolute, and a dangling one inside still work.
#[test]
fn file_dirs_refuse_links_that_leave_and_keep_those_inside() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let (allowed, outside) = (dir.path().join("allowed"), dir.path().join("outside"));
    std::fs::create_dir_all(allowed.join("sub")).unwrap();
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), "secret").unwrap();
    std::fs::write(allowed.join("inside.txt"), "inside").unwrap();
    symlink(outside.join("evil"), allowed.join("dangling")).unwrap();
    symlink("../outside/evil2", allowed.join("dangling-relative")).unwrap();
    symlink(outside.join("secret"), allowed.join("to-secret")).unwrap();
    symlink("../outside", allowed.join("out-dir")).unwrap();
    symlink("inside.txt", allowed.join("relative")).unwrap();
    symlink(allowed.join("inside.txt"), allowed.join("sub/absolute")).unwrap();
    symlink(
        "../made-through-a-link",
        allowed.join("sub/dangling-inside"),
    )
    .unwrap();
    let s = serve(&[
        "--unsafe-rpcs",
        "guest-file-open,guest-file-read,guest-file-close",
        "--file-dirs",
        allowed.to_str().unwrap(),
    ]);
    let refused = [
        file_open(&allowed.join("dangling"), "w"),
        file_open(&allowed.join("dangling-relative"), "a"),
        file_open(&allowed.join("to-secret"), "r"),
        file_open(&allowed.join("to-secret"), "w"),
        file_open(&allowed.join("out-dir/new"), "w+"),
        file_open(&allowed.join("sub/../../outside/new2"), "w"),
    ];
    let out = replies(&s.sock, &refused.concat(), refused.len());
    for (request, reply) in refused.iter().zip(&out) {
        assert!(
            reply.contains("outside the directories guest-file-* may use"),
            "{request}: {reply}"
        );
    }
    let mut left: Vec<_> = std::fs::read_dir(&outside)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    left.sort();
    assert_eq!(left, ["secret"], "something was made outside");
    assert_eq!(
        std::fs::read_to_string(outside.join("secret")).unwrap(),
        "secret"
    );

    let kept = [
        file_open(&allowed.join("relative"), "r"),
        file_open(&allowed.join("sub/absolute"), "r"),
        file_open(&allowed.join("sub/dangling-inside"), "w"),
    ];
    let out = replies(&s.sock, &kept.concat(), kept.len());
    let handles: Vec<i64> = out.iter().map(|r| returned_handle(r)).collect();
    let read = format!(
        r#"{{"execute":"guest-file-read","arguments":{{"handle":{}}}}}"#,
        handles[1]
    );
    let out = replies(&s.sock, &read, 1);
    assert!(out[0].contains(r#""buf-b64": "aW5zaWRl""#), "{}", out[0]);
    assert!(allowed.join("made-through-a-link").exists());
}

/// qemu-ga opens with `O_NOCTTY`: a terminal opened on the host's behalf never becomes
/// the controlling terminal of the agent, a session leader without one under systemd.
#[test]
fn opening_a_terminal_does_not_make_it_the_agents() {
    use std::os::fd::AsRawFd;
    let pty = nix::pty::openpty(None, None).unwrap();
    let tty = std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())).unwrap();
    let s = serve_via(&["setsid"], &["--unsafe-rpcs", "guest-file-open"]);
    let out = replies(&s.sock, &file_open(&tty, "r+"), 1);
    returned_handle(&out[0]);
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", s.child.id())).unwrap();
    // Fields after the command's closing parenthesis: state, ppid, pgrp, session, tty_nr.
    let after = stat.rsplit_once(')').unwrap().1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    assert_eq!(
        fields[3],
        s.child.id().to_string(),
        "the agent leads its session"
    );
    assert_eq!(
        fields[4], "0",
        "the agent has a controlling terminal: {stat}"
    );
}

/// At most 512 handles, or half the soft descriptor limit: here 32 under `ulimit -n 64`.
/// Past it guest-file-open says so; a closed handle makes room again.
#[test]
fn guest_file_handles_are_capped_below_the_descriptor_limit() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, "x").unwrap();
    let s = serve_via(
        &["prlimit", "--nofile=64:64", "--"],
        &["--unsafe-rpcs", "guest-file-open,guest-file-close"],
    );
    let open = file_open(&file, "r");
    let out = replies(&s.sock, &open.repeat(33), 33);
    for r in &out[..32] {
        returned_handle(r);
    }
    let expected = format!(
        "failed to open file '{}': 32 guest-file handles are open, the most guest-file-open keeps; close one with guest-file-close first",
        file.display()
    );
    assert!(out[32].contains(&expected), "{}", out[32]);
    let close = format!(
        r#"{{"execute":"guest-file-close","arguments":{{"handle":{}}}}}"#,
        returned_handle(&out[0])
    );
    let out = replies(&s.sock, &(close + &open), 2);
    assert_eq!(out[0].trim(), r#"{"return": {}}"#);
    returned_handle(&out[1]);
}

/// Descriptors run out under the agent (its limit lowered while it runs): each open that
/// finds none fails on its own, and the agent goes on answering, on that connection and
/// on the next, with the handles it holds still open.
#[test]
fn running_out_of_descriptors_does_not_stop_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, "x").unwrap();
    let mut s = serve(&[
        "--unsafe-rpcs",
        "guest-file-open,guest-file-read,guest-file-close",
    ]);
    let pid = s.child.id().to_string();
    let lowered = Command::new("prlimit")
        .args(["--pid", &pid, "--nofile=48:48"])
        .status()
        .unwrap();
    assert!(lowered.success(), "prlimit --pid");
    let open = file_open(&file, "r");
    let req = open.repeat(60) + r#"{"execute":"guest-ping"}"#;
    let out = replies(&s.sock, &req, 61);
    let handles: Vec<i64> = out[..60]
        .iter()
        .filter(|r| r.starts_with(r#"{"return": "#))
        .map(|r| returned_handle(r))
        .collect();
    let refused = out[..60]
        .iter()
        .filter(|r| r.contains("Too many open files"))
        .count();
    assert!(refused > 0 && handles.len() + refused == 60, "{out:?}");
    assert_eq!(out[60].trim(), r#"{"return": {}}"#);
    // A new connection, and the handles still work.
    let read = format!(
        r#"{{"execute":"guest-file-read","arguments":{{"handle":{}}}}}{{"execute":"guest-file-close","arguments":{{"handle":{}}}}}"#,
        handles[0], handles[1]
    );
    let out = replies(&s.sock, &(read + &open), 3);
    assert!(out[0].contains(r#""buf-b64": "eA==""#), "{}", out[0]);
    assert_eq!(out[1].trim(), r#"{"return": {}}"#);
    returned_handle(&out[2]);
    assert!(s.child.try_wait().unwrap().is_none(), "the agent exited");
}

/// A refused command says which setting refused it, with qemu-ga's error class.
#[test]
fn refusals_say_why() {
    let class =
        |r: &str| serde_json::from_str::<serde_json::Value>(r).unwrap()["error"]["class"].clone();
    let s = serve(&[]);
    let out = replies(
        &s.sock,
        r#"{"execute":"guest-exec","arguments":{"path":"/bin/true"}}"#,
        1,
    );
    assert!(
        out[0].contains("Command guest-exec has been disabled: the command is unsafe and off by default; name it in --unsafe-rpcs (or -a) to enable it"),
        "{}",
        out[0]
    );
    assert_eq!(class(&out[0]), "CommandNotFound");
    drop(s);
    let s = serve(&["-a", "guest-ping", "-b", "guest-info"]);
    let req = r#"{"execute":"guest-get-osinfo"}{"execute":"guest-info"}{"execute":"guest-ping"}"#;
    let out = replies(&s.sock, req, 3);
    assert!(
        out[0].contains("Command guest-get-osinfo has been disabled: the command is not allowed"),
        "{}",
        out[0]
    );
    assert_eq!(class(&out[0]), "CommandNotFound");
    assert!(
        out[1].contains(r#""desc": "Command guest-info has been disabled""#),
        "{}",
        out[1]
    );
    assert_eq!(out[2].trim(), r#"{"return": {}}"#);
}
