//! Differential conformance: the same byte streams go to Debian's qemu-ga and to
//! `nixseed-agent serve`, both on unix-listen sockets, and the parsed replies must
//! agree once times, counters and versions are masked. Every deliberate difference is
//! normalised below with its reason, and listed in docs/guest-agent.md.

#![allow(clippy::unwrap_used)] // test scaffolding: a failed setup step should fail the test loudly

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::Value;

const QEMU_GA: &str = "/usr/sbin/qemu-ga";
/// Commands nixseed disables by default; qemu-ga gets them as `-b` so both agree.
const UNSAFE: &str = "guest-exec,guest-exec-status,guest-file-open,guest-file-close,guest-file-read,guest-file-write,guest-file-seek,guest-file-flush,guest-set-user-password";
const SENTINEL_ID: i64 = 987_654_321;
/// The freeze test mounts a filesystem other cases would see: run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Peer {
    name: &'static str,
    child: Child,
    sock: PathBuf,
    _dir: tempfile::TempDir,
}

impl Peer {
    fn start(name: &'static str) -> Peer {
        Peer::start_with(name, &[])
    }

    /// With the named unsafe commands enabled in both agents (`-b` lists the others for
    /// both, so a refusal is a block-list one in each; `--unsafe-rpcs` names the enabled
    /// ones for nixseed, which keeps unsafe commands off by default).
    fn start_with(name: &'static str, enable: &[&str]) -> Peer {
        Peer::start_env(name, enable, &[])
    }

    /// [`Peer::start_with`] with environment variables set for the agent.
    fn start_env(name: &'static str, enable: &[&str], env: &[(&str, &Path)]) -> Peer {
        let blocked: Vec<&str> = UNSAFE.split(',').filter(|c| !enable.contains(c)).collect();
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("sock");
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        let mut cmd = if name == "qemu-ga" {
            assert!(
                Path::new(QEMU_GA).exists(),
                "{QEMU_GA} is missing: install Debian's qemu-guest-agent (cargo xtask deps does)"
            );
            let mut c = Command::new(QEMU_GA);
            c.arg("-b").arg(blocked.join(","));
            c
        } else {
            let mut c = Command::new(env!("CARGO_BIN_EXE_nixseed-agent"));
            c.arg("serve");
            // No D-Bus here: a shutdown request must fail cleanly, never power off.
            c.env("DBUS_SYSTEM_BUS_ADDRESS", "unix:path=/nonexistent/bus");
            c.env("NIXSEED_LOG_STDERR", "1");
            c.arg("-b").arg(blocked.join(","));
            if !enable.is_empty() {
                c.arg("--unsafe-rpcs").arg(enable.join(","));
            }
            c
        };
        cmd.envs(env.iter().copied());
        cmd.arg("-m")
            .arg("unix-listen")
            .arg("-p")
            .arg(&sock)
            .arg("-t")
            .arg(&state);
        let child = cmd
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        assert!(
            nixseed_test_support::listening_within(&sock, Duration::from_secs(10)),
            "{name} did not listen"
        );
        Peer {
            name,
            child,
            sock,
            _dir: dir,
        }
    }

    /// Writes each chunk (10 ms apart), then a resynchronising sentinel, and returns
    /// the replies before the sentinel's: (delimited?, parsed line).
    fn exchange(&self, chunks: &[&[u8]]) -> Vec<(bool, Value)> {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        for c in chunks {
            s.write_all(c).unwrap();
            std::thread::sleep(Duration::from_millis(10));
        }
        let sentinel =
            format!("\u{0}{{\"execute\":\"guest-sync\",\"arguments\":{{\"id\":{SENTINEL_ID}}}}}");
        // A raw 0xFF (not UTF-8, so written as bytes) ends any half-read token.
        let mut tail = vec![0xFFu8];
        tail.extend_from_slice(&sentinel.as_bytes()[1..]);
        s.write_all(&tail).unwrap();
        let mut buf = Vec::new();
        let mut chunk = [0u8; 65536];
        let done = format!("\"return\": {SENTINEL_ID}");
        // Only the newly read bytes (and a sentinel's length before them) are searched, so
        // a reply of many megabytes is not scanned over and over.
        let mut searched = 0;
        while !buf[searched..]
            .windows(done.len())
            .any(|w| w == done.as_bytes())
        {
            searched = buf.len().saturating_sub(done.len());
            let n = s.read(&mut chunk).unwrap_or_else(|e| {
                panic!(
                    "{}: no sentinel reply: {e}; got {:?}",
                    self.name,
                    String::from_utf8_lossy(&buf)
                )
            });
            assert!(n > 0, "{} closed the connection", self.name);
            buf.extend_from_slice(&chunk[..n]);
        }
        let mut out = Vec::new();
        for line in buf.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            let (delim, body) = match line.first() {
                Some(0xFF) => (true, &line[1..]),
                _ => (false, line),
            };
            assert!(body.is_ascii(), "{}: non-ASCII reply {:?}", self.name, body);
            let v: Value = serde_json::from_slice(body).unwrap_or_else(|e| {
                panic!(
                    "{}: reply is not JSON ({e}): {:?}",
                    self.name,
                    String::from_utf8_lossy(body)
                )
            });
            out.push((delim, v));
        }
        // Drop the stray-0xFF error and the sentinel's own reply.
        out.truncate(out.len().saturating_sub(2));
        out
    }

    /// One request on its own connection; its reply.
    fn call(&self, request: &str) -> Value {
        let r = self.exchange(&[request.as_bytes()]);
        assert_eq!(
            r.len(),
            1,
            "{}: one reply to {request}, got {r:?}",
            self.name
        );
        r[0].1.clone()
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, as systemd stops either agent. nixseed must exit on it; Debian's qemu-ga
    /// has been seen to hang in its SIGTERM handler now and then (both threads waiting on
    /// a futex, SIGTERM blocked), and is killed after the same wait so that the
    /// comparison goes on.
    fn stop(mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let exited = nixseed_test_support::wait_for(Duration::from_secs(10), || {
            !matches!(self.child.try_wait(), Ok(None))
        });
        if !exited {
            let _ = self.child.kill();
            let _ = self.child.wait();
            assert_ne!(
                self.name, "nixseed",
                "nixseed-agent serve did not exit within 10 s of SIGTERM"
            );
            eprintln!("{}: still running 10 s after SIGTERM; killed", self.name);
        }
    }
}

/// Calls `f` on every value at `path`: a name steps into an object's member, `*` into
/// every element of an array. A step that finds nothing to enter ends that branch.
fn each_at(v: &mut Value, path: &[&str], f: &mut dyn FnMut(&mut Value)) {
    match path {
        [] => f(v),
        ["*", rest @ ..] => {
            if let Value::Array(a) = v {
                for x in a {
                    each_at(x, rest, f);
                }
            }
        }
        [k, rest @ ..] => {
            if let Some(x) = v.get_mut(*k) {
                each_at(x, rest, f);
            }
        }
    }
}

fn mask_at(v: &mut Value, path: &[&str]) {
    each_at(v, path, &mut |x| *x = Value::String("<masked>".into()));
}

/// Removes the member the last step of `path` names from the objects the steps before
/// it lead to.
fn remove_at(v: &mut Value, path: &[&str]) {
    let Some((member, parents)) = path.split_last() else {
        return;
    };
    each_at(v, parents, &mut |x| {
        if let Value::Object(m) = x {
            m.remove(*member);
        }
    });
}

/// Masks every member of the objects at `path` except those named in `keep`.
fn mask_members(v: &mut Value, path: &[&str], keep: &[&str]) {
    each_at(v, path, &mut |x| {
        if let Value::Object(m) = x {
            for (name, member) in m.iter_mut() {
                if !keep.contains(&name.as_str()) {
                    *member = Value::String("<masked>".into());
                }
            }
        }
    });
}

fn sort_by(v: &mut Value, path: &[&str], key: &str) {
    let mut cur = v;
    for k in path {
        match cur.get_mut(*k) {
            Some(x) => cur = x,
            None => return,
        }
    }
    if let Value::Array(a) = cur {
        a.sort_by_key(|x| x.get(key).map(|k| k.to_string()).unwrap_or_default());
    }
}

type Normalize = fn(&mut Value);

struct Case {
    name: &'static str,
    chunks: Vec<Vec<u8>>,
    normalize: Option<Normalize>,
}

fn case(name: &'static str, chunks: &[&[u8]]) -> Case {
    Case {
        name,
        chunks: chunks.iter().map(|c| c.to_vec()).collect(),
        normalize: None,
    }
}

fn with(name: &'static str, chunks: &[&[u8]], n: Normalize) -> Case {
    Case {
        normalize: Some(n),
        ..case(name, chunks)
    }
}

fn cmd(name: &str) -> Vec<u8> {
    format!("{{\"execute\":\"{name}\"}}").into_bytes()
}

fn cases() -> Vec<Case> {
    let c = |n: &'static str| with(n, &[&cmd(n)], |_| {});
    let mut v = vec![
        // Framing.
        case("ping", &[b"{\"execute\":\"guest-ping\"}"]),
        case("id null", &[b"{\"execute\":\"guest-ping\",\"id\":null}"]),
        case("id nested", &[b"{\"execute\":\"guest-ping\",\"id\":[1,{\"a\":2.5},\"x\",true,-0,1e2,0.1]}"]),
        case("split writes", &[b"{\"exec", b"ute\":\"guest-", b"ping\"", b",\"id\":7}"]),
        case("two per write", &[b"{\"execute\":\"guest-ping\",\"id\":1}{\"execute\":\"guest-ping\",\"id\":2}"]),
        case("newline separated", &[b"{\"execute\":\"guest-ping\"}\n{\"execute\":\"guest-ping\",\"id\":\"b\"}\n"]),
        case("single quotes", &[b"{'execute':'guest-ping','id':'q'}"]),
        case("raw 0xff then sync", &[b"\xff{\"execute\":\"guest-sync\",\"arguments\":{\"id\":42}}"]),
        with(
            "proxmox: sync-delimited + command in one write",
            &[b"{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":123456}}\n{\"execute\":\"guest-get-osinfo\"}\n"],
            |_| {},
        ),
        case("libvirt: guest-sync with a millisecond id", &[b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":1795311790169}}", b"{\"execute\":\"guest-get-host-name\"}"]),
        case("sync-delimited then silence", &[b"\xff{\"execute\":\"guest-sync-delimited\",\"arguments\":{\"id\":9}}"]),
        // Garbage and parse errors.
        case("garbage keyword", &[b"garbage", b"}"]),
        case("control byte in string", &[b"{\"execute\":\"gu\xc3\xa9st\x7f\x01/\\\"}"]),
        case("bad utf-8", &[b"{\"execute\":\"\xc3(\"}"]),
        case("missing colon", &[b"{\"execute\" \"guest-ping\"}"]),
        case("trailing comma", &[b"{\"execute\":\"guest-ping\",}"]),
        case("non-string key", &[b"{1:2}"]),
        case("wrong closer", &[b"{\"execute\":\"guest-ping\"]"]),
        case("duplicate key", &[b"{\"execute\":\"guest-ping\",\"execute\":\"guest-info\"}"]),
        case("bad escape", &[b"{\"execute\":\"\\x\"}"]),
        case("lone surrogate", &[b"{\"execute\":\"guest-p\\uD800\"}"]),
        case("astral and NUL escapes", &[b"{\"execute\":\"guest-p\\ud83d\\ude00\\u0000\"}"]),
        case("leading zero", &[b"{\"id\":01}"]),
        case("array", &[b"[1]"]),
        case("string", &[b"\"abc\""]),
        case("number", &[b"12 "]),
        // Envelope.
        case("empty object", &[b"{}"]),
        case("execute not string", &[b"{\"execute\":1}"]),
        case("arguments not object", &[b"{\"execute\":\"guest-ping\",\"arguments\":1}"]),
        case("unexpected member", &[b"{\"execute\":\"guest-ping\",\"foo\":1}"]),
        case("exec-oob refused", &[b"{\"exec-oob\":\"guest-ping\"}"]),
        case("unknown command", &[b"{\"execute\":\"guest-nonexistent\",\"id\":3}"]),
        case("disabled command", &[b"{\"execute\":\"guest-exec\",\"arguments\":{\"path\":\"/bin/true\"}}"]),
        case("disabled password", &[b"{\"execute\":\"guest-set-user-password\",\"arguments\":{}}"]),
        // Arguments.
        case("unexpected parameter", &[b"{\"execute\":\"guest-ping\",\"arguments\":{\"foo\":1}}"]),
        case("missing parameter", &[b"{\"execute\":\"guest-sync\"}"]),
        case("mistyped parameter", &[b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":\"a\"}}"]),
        case("float for integer", &[b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":1.0}}"]),
        case("u64 for integer", &[b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":18446744073709551615}}"]),
        case("beyond u64", &[b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":99999999999999999999}}"]),
        case("i64 min", &[b"{\"execute\":\"guest-sync\",\"arguments\":{\"id\":-9223372036854775808}}"]),
        case("list element type", &[b"{\"execute\":\"guest-ssh-add-authorized-keys\",\"arguments\":{\"username\":\"nosuch\",\"keys\":[1]}}"]),
        // Commands.
        with("guest-get-time", &[&cmd("guest-get-time")], |v| mask_at(v, &["return"])),
        case("set-time type", &[b"{\"execute\":\"guest-set-time\",\"arguments\":{\"time\":\"x\"}}"]),
        case("set-time beyond 2070", &[b"{\"execute\":\"guest-set-time\",\"arguments\":{\"time\":9223372036854775807}}"]),
        case("set-time negative", &[b"{\"execute\":\"guest-set-time\",\"arguments\":{\"time\":-1}}"]),
        c("guest-get-osinfo"),
        c("guest-get-host-name"),
        c("guest-get-timezone"),
        c("guest-get-users"),
        c("guest-get-vcpus"),
        // guest-set-vcpus, only what changes nothing on this machine: argument errors
        // (refused before anything runs) and CPUs that do not exist.
        case("set-vcpus none", &[b"{\"execute\":\"guest-set-vcpus\",\"arguments\":{\"vcpus\":[]}}"]),
        case("set-vcpus missing", &[b"{\"execute\":\"guest-set-vcpus\",\"arguments\":{}}"]),
        case("set-vcpus not a list", &[b"{\"execute\":\"guest-set-vcpus\",\"arguments\":{\"vcpus\":{}}}"]),
        case("set-vcpus element not an object", &[b"{\"execute\":\"guest-set-vcpus\",\"arguments\":{\"vcpus\":[1]}}"]),
        case("set-vcpus online missing", &[b"{\"execute\":\"guest-set-vcpus\",\"arguments\":{\"vcpus\":[{\"logical-id\":0}]}}"]),
        case("set-vcpus id mistyped", &[b"{\"execute\":\"guest-set-vcpus\",\"arguments\":{\"vcpus\":[{\"logical-id\":\"a\",\"online\":true}]}}"]),
        case("set-vcpus unexpected member", &[b"{\"execute\":\"guest-set-vcpus\",\"arguments\":{\"vcpus\":[{\"logical-id\":0,\"online\":true},{\"logical-id\":0,\"online\":true,\"x\":1}]}}"]),
        case("set-vcpus no such CPU", &[b"{\"execute\":\"guest-set-vcpus\",\"arguments\":{\"vcpus\":[{\"logical-id\":99999,\"online\":true}]}}"]),
        case("set-vcpus negative id", &[b"{\"execute\":\"guest-set-vcpus\",\"arguments\":{\"vcpus\":[{\"logical-id\":-1,\"online\":true}]}}"]),
        case("set-vcpus bad first element before a non-object", &[b"{\"execute\":\"guest-set-vcpus\",\"arguments\":{\"vcpus\":[{\"logical-id\":0},1]}}"]),
        c("guest-get-memory-block-info"),
        c("guest-get-memory-blocks"),
        // guest-set-memory-blocks, only what changes nothing on this machine: argument
        // errors and blocks that do not exist (a negative index is read as uint64).
        case("set-memory-blocks none", &[b"{\"execute\":\"guest-set-memory-blocks\",\"arguments\":{\"mem-blks\":[]}}"]),
        case("set-memory-blocks missing", &[b"{\"execute\":\"guest-set-memory-blocks\",\"arguments\":{}}"]),
        case("set-memory-blocks element not an object", &[b"{\"execute\":\"guest-set-memory-blocks\",\"arguments\":{\"mem-blks\":[1]}}"]),
        case("set-memory-blocks online missing", &[b"{\"execute\":\"guest-set-memory-blocks\",\"arguments\":{\"mem-blks\":[{\"phys-index\":0}]}}"]),
        case("set-memory-blocks index missing", &[b"{\"execute\":\"guest-set-memory-blocks\",\"arguments\":{\"mem-blks\":[{\"online\":true}]}}"]),
        case("set-memory-blocks index mistyped", &[b"{\"execute\":\"guest-set-memory-blocks\",\"arguments\":{\"mem-blks\":[{\"phys-index\":1.5,\"online\":true}]}}"]),
        case("set-memory-blocks index a string", &[b"{\"execute\":\"guest-set-memory-blocks\",\"arguments\":{\"mem-blks\":[{\"phys-index\":\"0\",\"online\":true}]}}"]),
        case("set-memory-blocks unexpected member", &[b"{\"execute\":\"guest-set-memory-blocks\",\"arguments\":{\"mem-blks\":[{\"phys-index\":999999,\"online\":false},{\"phys-index\":0,\"online\":false,\"x\":1}]}}"]),
        case("set-memory-blocks no such block", &[b"{\"execute\":\"guest-set-memory-blocks\",\"arguments\":{\"mem-blks\":[{\"phys-index\":999999,\"online\":false,\"can-offline\":true},{\"phys-index\":-1,\"online\":true},{\"phys-index\":18446744073709551615,\"online\":false}]}}"]),
        // Counters move between the two agents' runs: the member sets, CPU numbers and
        // devices must agree here; the values are checked in `counters_lie_between_two_qemu_ga_readings`.
        with("guest-get-cpustats", &[&cmd("guest-get-cpustats")], |v| {
            mask_members(v, &["return", "*"], &["cpu", "type"]);
        }),
        with("guest-get-diskstats", &[&cmd("guest-get-diskstats")], |v| {
            mask_members(v, &["return", "*", "stats"], &[]);
        }),
        c("guest-fsfreeze-status"),
        c("guest-fsfreeze-thaw"),
        with("guest-network-get-interfaces", &[&cmd("guest-network-get-interfaces")], |v| {
            mask_at(v, &["return", "*", "statistics"]);
        }),
        with("guest-get-fsinfo", &[&cmd("guest-get-fsinfo")], |v| {
            mask_at(v, &["return", "*", "used-bytes"]);
            mask_at(v, &["return", "*", "total-bytes"]);
            // nixseed adds the sysfs serial qemu-ga only takes from udev.
            remove_at(v, &["return", "*", "disk", "*", "serial"]);
        }),
        with("guest-get-disks", &[&cmd("guest-get-disks")], |v| {
            remove_at(v, &["return", "*", "address", "serial"]);
            sort_by(v, &["return"], "name");
        }),
        with("guest-fstrim", &[&cmd("guest-fstrim")], |v| {
            mask_at(v, &["return", "paths", "*", "trimmed"]);
            sort_by(v, &["return", "paths"], "path");
        }),
        // qemu-ga checks the keys before it looks the user up.
        case("ssh add: a comment is no key", &[b"{\"execute\":\"guest-ssh-add-authorized-keys\",\"arguments\":{\"username\":\"nosuch\",\"keys\":[\"#not a key\"]}}"]),
        case("ssh remove: a comment is no key", &[b"{\"execute\":\"guest-ssh-remove-authorized-keys\",\"arguments\":{\"username\":\"root\",\"keys\":[\"#not a key\"]}}"]),
        case("ssh add: a line break inside a key", &[b"{\"execute\":\"guest-ssh-add-authorized-keys\",\"arguments\":{\"username\":\"nosuch\",\"keys\":[\"ssh-ed25519 AAAA a\",\"ssh-ed25519 AAAA b\\nssh-rsa BBBB\"]}}"]),
        case("ssh add: a space before a comment", &[b"{\"execute\":\"guest-ssh-add-authorized-keys\",\"arguments\":{\"username\":\"nosuch\",\"keys\":[\" #x\",\"\"]}}"]),
        case("ssh keys unknown user", &[b"{\"execute\":\"guest-ssh-get-authorized-keys\",\"arguments\":{\"username\":\"nosuch\"}}"]),
        case("shutdown bad mode", &[b"{\"execute\":\"guest-shutdown\",\"arguments\":{\"mode\":\"bogus\"}}"]),
        // The only case that opens a file: both agents hand out handle 1000 first.
        case("file seek: whence codes and names", &[
            b"{\"execute\":\"guest-file-open\",\"arguments\":{\"path\":\"/etc/hostname\"}}",
            b"{\"execute\":\"guest-file-seek\",\"arguments\":{\"handle\":1000,\"offset\":1,\"whence\":\"set\"}}",
            b"{\"execute\":\"guest-file-seek\",\"arguments\":{\"handle\":1000,\"offset\":1,\"whence\":\"cur\"}}",
            b"{\"execute\":\"guest-file-seek\",\"arguments\":{\"handle\":1000,\"offset\":0,\"whence\":\"end\"}}",
            b"{\"execute\":\"guest-file-seek\",\"arguments\":{\"handle\":1000,\"offset\":2,\"whence\":0}}",
            b"{\"execute\":\"guest-file-seek\",\"arguments\":{\"handle\":1000,\"offset\":-1,\"whence\":0}}",
            b"{\"execute\":\"guest-file-seek\",\"arguments\":{\"handle\":1000,\"offset\":0,\"whence\":\"bogus\"}}",
            b"{\"execute\":\"guest-file-seek\",\"arguments\":{\"handle\":1000,\"offset\":0,\"whence\":7}}",
            b"{\"execute\":\"guest-file-seek\",\"arguments\":{\"handle\":1000,\"offset\":0,\"whence\":1.5}}",
            b"{\"execute\":\"guest-file-seek\",\"arguments\":{\"handle\":1000,\"offset\":0,\"whence\":true}}",
            b"{\"execute\":\"guest-file-seek\",\"arguments\":{\"handle\":1000,\"offset\":0}}",
            b"{\"execute\":\"guest-file-close\",\"arguments\":{\"handle\":1000}}",
        ]),
        with("guest-info", &[&cmd("guest-info")], keep_common_commands),
    ];
    // The boot CPU, where it has no `online` file (x86 kernels without cpu0 hotplug):
    // on line is a success without a write, off line is refused. Where it has the file,
    // these requests would change this machine's CPU 0, so they are not sent.
    if !std::path::Path::new("/sys/devices/system/cpu/cpu0/online").exists() {
        v.push(case("set-vcpus boot CPU off line", &[b"{\"execute\":\"guest-set-vcpus\",\"arguments\":{\"vcpus\":[{\"logical-id\":0,\"online\":false}]}}"]));
        v.push(case("set-vcpus boot CPU on line, then no such CPU", &[b"{\"execute\":\"guest-set-vcpus\",\"arguments\":{\"vcpus\":[{\"logical-id\":0,\"online\":true,\"can-offline\":false},{\"logical-id\":99999,\"online\":false}]}}"]));
    }
    // Memory block 0 on line: asking for on line again is a success without a write.
    // Sent only where the block is on line now, so nothing changes on this machine.
    if std::fs::read_to_string("/sys/devices/system/memory/memory0/state")
        .is_ok_and(|s| s.starts_with("online"))
    {
        v.push(case("set-memory-blocks on line again", &[b"{\"execute\":\"guest-set-memory-blocks\",\"arguments\":{\"mem-blks\":[{\"phys-index\":0,\"online\":true},{\"phys-index\":999999,\"online\":true}]}}"]));
    }
    v
}

/// guest-info: the version differs by design, and each agent implements commands the
/// other lacks (docs/guest-agent.md); the shared ones must agree on every field.
fn keep_common_commands(v: &mut Value) {
    mask_at(v, &["return", "version"]);
    let ours: &[&str] = &nixseed_core_names();
    if let Some(Value::Array(list)) = v.pointer_mut("/return/supported_commands") {
        list.retain(|c| {
            ours.contains(&c["name"].as_str().unwrap_or_default())
                && QEMU_72.contains(&c["name"].as_str().unwrap_or_default())
        });
        list.sort_by_key(|c| c["name"].to_string());
    }
}

/// Commands qemu-ga 7.2 implements (from its guest-info), for the intersection above.
const QEMU_72: &[&str] = &[
    "guest-sync",
    "guest-sync-delimited",
    "guest-ping",
    "guest-info",
    "guest-get-time",
    "guest-set-time",
    "guest-get-osinfo",
    "guest-get-host-name",
    "guest-get-timezone",
    "guest-get-users",
    "guest-get-vcpus",
    "guest-set-vcpus",
    "guest-get-memory-block-info",
    "guest-get-memory-blocks",
    "guest-set-memory-blocks",
    "guest-get-cpustats",
    "guest-get-diskstats",
    "guest-network-get-interfaces",
    "guest-get-fsinfo",
    "guest-get-disks",
    "guest-fsfreeze-status",
    "guest-fsfreeze-freeze",
    "guest-fsfreeze-freeze-list",
    "guest-fsfreeze-thaw",
    "guest-fstrim",
    "guest-shutdown",
    "guest-suspend-disk",
    "guest-suspend-ram",
    "guest-suspend-hybrid",
    "guest-ssh-get-authorized-keys",
    "guest-ssh-add-authorized-keys",
    "guest-ssh-remove-authorized-keys",
    "guest-exec",
    "guest-exec-status",
    "guest-file-open",
    "guest-file-close",
    "guest-file-read",
    "guest-file-write",
    "guest-file-seek",
    "guest-file-flush",
    "guest-set-user-password",
];

fn nixseed_core_names() -> Vec<&'static str> {
    nixseed_core::qga::commands::COMMANDS
        .iter()
        .map(|c| c.name)
        .collect()
}

fn run_all(peer: &Peer, cases: &[Case]) -> Vec<Vec<(bool, Value)>> {
    cases
        .iter()
        .map(|c| {
            let chunks: Vec<&[u8]> = c.chunks.iter().map(Vec::as_slice).collect();
            let mut r = peer.exchange(&chunks);
            if let Some(n) = c.normalize {
                for (_, v) in &mut r {
                    n(v);
                }
            }
            r
        })
        .collect()
}

#[test]
fn replies_match_qemu_ga() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let cases = cases();
    let qemu = Peer::start("qemu-ga");
    let theirs = run_all(&qemu, &cases);
    qemu.stop();
    let ours_peer = Peer::start("nixseed");
    let ours = run_all(&ours_peer, &cases);
    ours_peer.stop();
    let mut diffs = Vec::new();
    for ((c, t), o) in cases.iter().zip(&theirs).zip(&ours) {
        assert!(
            !t.is_empty() || c.name.contains("silence"),
            "qemu-ga sent nothing for {}",
            c.name
        );
        if t != o {
            diffs.push(format!("{}:\n  qemu-ga: {t:?}\n  nixseed: {o:?}", c.name));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} difference(s):\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// Whether `c` ran and exited 0, its output dropped.
fn succeeds(c: &mut Command) -> bool {
    c.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A 16 MiB ext4 image in `dir`, loop-mounted at `dir/mnt` (the mount point returned):
/// a filesystem of the test's own to freeze, never the build machine's.
fn loop_mounted_ext4(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("fs.img");
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::File::create(&img)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    assert!(
        succeeds(Command::new("mkfs.ext4").arg("-q").arg(&img)),
        "mkfs.ext4 failed (e2fsprogs)"
    );
    assert!(
        succeeds(
            Command::new("mount")
                .arg("-o")
                .arg("loop")
                .arg(&img)
                .arg(&mnt)
        ),
        "cannot loop-mount {} (the test suite runs as root, as the VM tests do)",
        img.display()
    );
    mnt
}

/// The freeze state machine on a real filesystem: a loop-mounted ext4 only (never the
/// build machine's own filesystems), frozen and thawed by each agent in turn.
#[test]
fn fsfreeze_matches_qemu_ga_on_a_loop_mount() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mnt = loop_mounted_ext4(dir.path());
    // A bind mount of the same filesystem, as /nix/store is on NixOS: naming only it
    // must still freeze its device.
    let bind = dir.path().join("bind");
    std::fs::create_dir_all(&bind).unwrap();
    assert!(
        succeeds(Command::new("mount").arg("--bind").arg(&mnt).arg(&bind)),
        "cannot bind-mount {}",
        mnt.display()
    );
    let b = bind.to_string_lossy().into_owned();
    let freeze_bind = format!(
        "{{\"execute\":\"guest-fsfreeze-freeze-list\",\"arguments\":{{\"mountpoints\":[\"{b}\"]}}}}"
    );
    let m = mnt.to_string_lossy().into_owned();
    let freeze = format!(
        "{{\"execute\":\"guest-fsfreeze-freeze-list\",\"arguments\":{{\"mountpoints\":[\"{m}\",\"/nonexistent\"]}}}}"
    );
    let script: Vec<Vec<u8>> = vec![
        freeze.clone().into_bytes(),
        cmd("guest-fsfreeze-status"),
        cmd("guest-get-time"),
        cmd("guest-ping"),
        freeze.into_bytes(),
        b"{\"execute\":\"guest-fsfreeze-freeze-list\",\"arguments\":{\"mountpoints\":[]}}".to_vec(),
        cmd("guest-fsfreeze-thaw"),
        cmd("guest-fsfreeze-status"),
        cmd("guest-fsfreeze-thaw"),
        freeze_bind.into_bytes(),
        cmd("guest-fsfreeze-status"),
        cmd("guest-fsfreeze-thaw"),
    ];
    let run = |name| {
        let p = Peer::start(name);
        let out: Vec<_> = script.iter().map(|s| p.exchange(&[s])).collect();
        p.stop();
        out
    };
    let theirs = run("qemu-ga");
    let ours = run("nixseed");
    let _ = Command::new("umount").arg(&bind).status();
    let _ = Command::new("umount").arg(&mnt).status();
    assert_eq!(theirs, ours);
    assert_eq!(theirs[0][0].1["return"], 1, "qemu-ga froze the loop mount");
    assert_eq!(
        theirs[9][0].1["return"], 1,
        "qemu-ga froze it through the bind"
    );
}

/// A freeze keeps the identity lock (`/run/nixseed/identity.lock`) until its thaw, so a
/// control-channel push cannot start writing to a frozen `/var` and stall there.
#[test]
fn a_freeze_holds_the_identity_lock_until_the_thaw() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let mnt = loop_mounted_ext4(dir.path());
    let p = Peer::start("nixseed");
    let lock_free = || {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open("/run/nixseed/identity.lock")
            .unwrap();
        rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_ok()
    };
    let freeze = format!(
        "{{\"execute\":\"guest-fsfreeze-freeze-list\",\"arguments\":{{\"mountpoints\":[\"{}\"]}}}}",
        mnt.display()
    );
    let frozen = p.call(&freeze);
    let held = !lock_free();
    let thawed = p.call(r#"{"execute":"guest-fsfreeze-thaw"}"#);
    let free_after = lock_free();
    p.stop();
    let _ = Command::new("umount").arg(&mnt).status();
    assert_eq!(frozen["return"], 1, "{frozen}");
    assert_eq!(thawed["return"], 1, "{thawed}");
    assert!(held, "the identity lock was free while frozen");
    assert!(free_after, "the identity lock stayed held after the thaw");
}

/// Every counter nixseed reports lies between two qemu-ga readings taken before and after
/// it: the kernel's counters only grow, so a wrong field, unit or scale falls outside.
/// `ios-pgr` (requests in flight) is a level, not a counter, and `iowait` can go down
/// (proc(5)): both are left out.
#[test]
fn counters_lie_between_two_qemu_ga_readings() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let qemu = Peer::start("qemu-ga");
    let ours_peer = Peer::start("nixseed");
    for (command, key, inner) in [
        ("guest-get-cpustats", "cpu", None),
        ("guest-get-diskstats", "name", Some("stats")),
    ] {
        let read = |p: &Peer| -> Vec<Value> {
            let r = p.exchange(&[&cmd(command)]);
            r[0].1["return"].as_array().cloned().unwrap_or_default()
        };
        let before = read(&qemu);
        let ours = read(&ours_peer);
        let after = read(&qemu);
        assert!(!ours.is_empty(), "{command}: nixseed listed nothing");
        let ids = |l: &[Value]| l.iter().map(|x| x[key].to_string()).collect::<Vec<_>>();
        assert_eq!(ids(&before), ids(&ours), "{command}: the same entries");
        assert_eq!(ids(&ours), ids(&after), "{command}: the same entries");
        let mut checked = 0;
        for ((b, o), a) in before.iter().zip(&ours).zip(&after) {
            let id = &o[key];
            let pick = |x: &Value| inner.map_or(x.clone(), |k| x[k].clone());
            let (b, o, a) = (pick(b), pick(o), pick(a));
            let members = o.as_object().unwrap();
            assert_eq!(
                members.keys().collect::<Vec<_>>(),
                b.as_object().unwrap().keys().collect::<Vec<_>>(),
                "{command} {id}: the same members"
            );
            for (m, v) in members {
                if matches!(m.as_str(), "cpu" | "type" | "ios-pgr" | "iowait") {
                    continue;
                }
                let (lo, mid, hi) = (b[m].as_u64(), v.as_u64(), a[m].as_u64());
                assert!(
                    lo <= mid && mid <= hi && mid.is_some(),
                    "{command} {id} {m}: qemu-ga {lo:?} then nixseed {mid:?} then qemu-ga {hi:?}"
                );
                checked += 1;
            }
        }
        assert!(checked > 0, "{command}: no counter was compared");
    }
    qemu.stop();
    ours_peer.stop();
}

/// guest-exec-status until the process has exited (at most 30 s), with long output
/// members replaced by their length so that a failed comparison stays readable.
fn exec_status(peer: &Peer, pid: i64) -> Value {
    let request = format!("{{\"execute\":\"guest-exec-status\",\"arguments\":{{\"pid\":{pid}}}}}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut r = peer.call(&request);
        if r["return"]["exited"] != Value::Bool(false) {
            for key in ["out-data", "err-data"] {
                if let Some(x) = r["return"].get_mut(key)
                    && x.as_str().is_some_and(|d| d.len() > 64)
                {
                    let len = x.as_str().map_or(0, str::len);
                    *x = Value::String(format!("<{len} base64 characters>"));
                }
            }
            return r;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}: pid {pid} still running after 30 s",
            peer.name
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn exec(peer: &Peer, path: &str, args: &[&str]) -> i64 {
    let request = serde_json::json!({
        "execute": "guest-exec",
        "arguments": {"path": path, "arg": args, "capture-output": true},
    });
    let r = peer.call(&request.to_string());
    r["return"]["pid"]
        .as_i64()
        .unwrap_or_else(|| panic!("{}: guest-exec {path}: {r}", peer.name))
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

const EXEC: &[&str] = &["guest-exec", "guest-exec-status"];

/// Captured output as qemu-ga reports it: no `out-data`/`err-data` for a silent stream,
/// `X-truncated` beside any data, at most 16 MiB kept per stream, and the writer never
/// blocked by the cap.
#[test]
fn exec_output_matches_qemu_ga() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let runs: &[(&str, &[&str])] = &[
        ("/bin/true", &[]),
        ("/bin/sh", &["-c", "printf x; printf yz >&2"]),
        ("/bin/sh", &["-c", "exit 3"]),
        ("/bin/sh", &["-c", "kill -9 $$"]),
        // More than the cap: `head` only exits if the agent keeps reading.
        ("/bin/sh", &["-c", "yes | head -c 17000000; printf e >&2"]),
        // Exactly the cap is not truncated: nothing was dropped.
        ("/usr/bin/head", &["-c", "16777216", "/dev/zero"]),
    ];
    let theirs = same_as_qemu_ga(EXEC, |p| {
        let out: Vec<Value> = runs
            .iter()
            .map(|(path, args)| exec_status(p, exec(p, path, args)))
            .collect();
        out
    });
    assert_eq!(
        theirs[0],
        serde_json::json!({"return": {"exited": true, "exitcode": 0}}),
        "qemu-ga: no data members for a silent process"
    );
    assert_eq!(theirs[4]["return"]["out-truncated"], true);
}

/// `dir/name` holding `text`, mode 0755.
fn executable(dir: &Path, name: &str, text: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let file = dir.join(name);
    std::fs::write(&file, text).unwrap();
    std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
    file
}

/// A file the kernel cannot execute (a script with no `#!` line, as `qm guest exec` may
/// be handed) runs through /bin/sh, and one that is not there fails with glib's text,
/// both as in qemu-ga.
#[test]
fn exec_falls_back_to_sh_and_fails_in_qemu_gas_words() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let script = executable(dir.path(), "plain-script", "echo from-sh \"$1\"\n");
    let script = script.to_string_lossy().into_owned();
    let theirs = same_as_qemu_ga(EXEC, |p| {
        let missing = serde_json::json!({"execute": "guest-exec", "arguments": {"path": "/nonexistent/tool"}});
        vec![
            exec_status(p, exec(p, &script, &["arg1"])),
            p.call(&missing.to_string()),
        ]
    });
    assert_eq!(
        theirs[0]["return"]["out-data"], "ZnJvbS1zaCBhcmcxCg==",
        "from-sh arg1"
    );
    assert_eq!(
        theirs[1]["error"]["desc"],
        "Guest agent command failed, error was 'Failed to execute child process \u{201c}/nonexistent/tool\u{201d} (No such file or directory)'"
    );
}

/// A bare program name is looked up in the agent's own PATH, as glib's spawn does for
/// qemu-ga, also when `env` gives the child an environment without PATH (on NixOS almost
/// nothing is in /bin or /usr/bin, where a search of the child's empty PATH would look).
#[test]
fn exec_finds_a_bare_name_in_the_agents_path_like_qemu_ga() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    executable(
        dir.path(),
        "nixseed-path-probe",
        "#!/bin/sh\nprintf 'found %s' \"$LANG\"\n",
    );
    let path = std::ffi::OsString::from(format!("{}:/usr/bin:/bin", dir.path().display()));
    let run = |name| {
        let p = Peer::start_env(name, EXEC, &[("PATH", Path::new(&path))]);
        let out: Vec<Value> = [None, Some(vec!["LANG=C"])]
            .into_iter()
            .map(|env| {
                let mut args =
                    serde_json::json!({"path": "nixseed-path-probe", "capture-output": true});
                if let Some(env) = env {
                    args["env"] = serde_json::json!(env);
                }
                let r = p.call(
                    &serde_json::json!({"execute": "guest-exec", "arguments": args}).to_string(),
                );
                let pid = r["return"]["pid"]
                    .as_i64()
                    .unwrap_or_else(|| panic!("{name}: guest-exec: {r}"));
                exec_status(&p, pid)
            })
            .collect();
        p.stop();
        out
    };
    let theirs = run("qemu-ga");
    assert_eq!(theirs, run("nixseed"));
    // "found C": found through the agent's PATH, run with the environment given.
    assert_eq!(
        theirs[1]["return"]["out-data"], "Zm91bmQgQw==",
        "{theirs:?}"
    );
}

/// `yes` with its output captured: the agent's memory stays near the 16 MiB cap
/// (before the cap it grew by gigabytes), and other requests are still answered.
#[test]
fn exec_of_endless_output_stays_bounded() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let limit_kib = 96 * 1024;
    for name in ["qemu-ga", "nixseed"] {
        let p = Peer::start_with(name, EXEC);
        let pid = exec(&p, "/usr/bin/yes", &[]);
        let kill = || {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        };
        let until = std::time::Instant::now() + Duration::from_secs(2);
        let mut peak = 0;
        while std::time::Instant::now() < until {
            peak = peak.max(rss_kib(p.pid()));
            if peak > limit_kib {
                // Stop at once: without the cap this grows by gigabytes a second.
                kill();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let asked = std::time::Instant::now();
        let ping = p.call("{\"execute\":\"guest-ping\"}");
        let waited = asked.elapsed();
        kill();
        let status = exec_status(&p, pid);
        p.stop();
        assert!(
            peak <= limit_kib,
            "{name}: RSS reached {peak} KiB running `yes` (limit {limit_kib} KiB)"
        );
        assert_eq!(ping["return"], serde_json::json!({}), "{name}: ping");
        assert!(
            waited < Duration::from_secs(2),
            "{name}: ping took {waited:?}"
        );
        assert_eq!(
            status["return"],
            serde_json::json!({
                "exited": true,
                "signal": 9,
                "out-data": "<22369624 base64 characters>",
                "out-truncated": true,
            }),
            "{name}"
        );
    }
}

/// Zombie children of `pid` (state `Z` in /proc/N/stat, whose fourth field is the parent).
fn zombies_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(n) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{n}/stat")).unwrap_or_default();
        // The command name may hold spaces: fields are counted after its closing `)`.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.first() == Some(&"Z") && f.get(1) == Some(&pid.to_string().as_str()) {
            out.push(n);
        }
    }
    out
}

/// Processes the host never asks about are reaped when they exit, as qemu-ga reaps
/// them: three `guest-exec /bin/true` leave no zombie, and their status is still there.
#[test]
fn exec_leaves_no_zombies() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for name in ["qemu-ga", "nixseed"] {
        let p = Peer::start_with(name, EXEC);
        let pids: Vec<i64> = (0..3).map(|_| exec(&p, "/bin/true", &[])).collect();
        let mut zombies = Vec::new();
        // Reaping is asynchronous in both agents: give it a second.
        let reaped = nixseed_test_support::wait_for(Duration::from_secs(1), || {
            zombies = zombies_of(p.pid());
            zombies.is_empty()
        });
        let last = exec_status(&p, pids[2]);
        p.stop();
        assert!(
            reaped,
            "{name}: zombies {zombies:?} left by guest-exec /bin/true"
        );
        assert_eq!(
            last,
            serde_json::json!({"return": {"exited": true, "exitcode": 0}}),
            "{name}"
        );
    }
}

/// A scratch filesystem of `fstype` on a loop device, unmounted when dropped.
struct LoopMount {
    mnt: PathBuf,
    _dir: tempfile::TempDir,
}

impl LoopMount {
    fn new(fstype: &str, mkfs: &[&str], size: u64) -> LoopMount {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("fs.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir_all(&mnt).unwrap();
        std::fs::File::create(&img).unwrap().set_len(size).unwrap();
        let made = Command::new(mkfs[0])
            .args(&mkfs[1..])
            .arg(&img)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(made, "{} failed for {fstype}", mkfs[0]);
        let mounted = Command::new("mount")
            .args(["-t", fstype, "-o", "loop"])
            .arg(&img)
            .arg(&mnt)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            mounted,
            "cannot loop-mount {fstype} at {} (the test suite runs as root, as the VM tests do)",
            mnt.display()
        );
        LoopMount { mnt, _dir: dir }
    }

    fn path(&self) -> String {
        self.mnt.to_string_lossy().into_owned()
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.mnt).status();
    }
}

/// btrfs shows an anonymous device (major 0) in mountinfo; qemu-ga finds its block
/// device from the mount source, so a btrfs root is listed by guest-get-fsinfo, trimmed
/// by guest-fstrim and frozen by a backup. Checked on a loop-mounted btrfs only.
#[test]
fn btrfs_is_listed_trimmed_and_frozen_like_qemu_ga() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let fs = LoopMount::new("btrfs", &["mkfs.btrfs", "-q"], 128 << 20);
    let m = fs.path();
    let freeze = format!(
        "{{\"execute\":\"guest-fsfreeze-freeze-list\",\"arguments\":{{\"mountpoints\":[\"{m}\"]}}}}"
    );
    let script: Vec<Vec<u8>> = vec![
        cmd("guest-get-fsinfo"),
        cmd("guest-fstrim"),
        freeze.into_bytes(),
        cmd("guest-fsfreeze-status"),
        cmd("guest-fsfreeze-thaw"),
        cmd("guest-fsfreeze-status"),
    ];
    let run = |name| {
        let p = Peer::start(name);
        let mut out: Vec<Value> = script
            .iter()
            .map(|s| p.exchange(&[s])[0].1.clone())
            .collect();
        p.stop();
        // Only the scratch filesystem: the machine's own are compared in replies_match_qemu_ga.
        if let Some(Value::Array(l)) = out[0].get_mut("return") {
            l.retain(|f| f["mountpoint"] == m.as_str());
        }
        mask_at(&mut out[0], &["return", "*", "used-bytes"]);
        mask_at(&mut out[0], &["return", "*", "total-bytes"]);
        if let Some(Value::Array(l)) = out[1].pointer_mut("/return/paths") {
            l.retain(|f| f["path"] == m.as_str());
        }
        mask_at(&mut out[1], &["return", "paths", "*", "trimmed"]);
        out
    };
    let theirs = run("qemu-ga");
    let ours = run("nixseed");
    assert_eq!(theirs, ours);
    assert_eq!(theirs[0]["return"][0]["type"], "btrfs", "qemu-ga lists it");
    assert_eq!(
        theirs[1]["return"]["paths"][0]["path"],
        m.as_str(),
        "qemu-ga trims it"
    );
    assert_eq!(theirs[2]["return"], 1, "qemu-ga freezes it");
}

/// Mounts made for one test, unmounted in reverse order when it ends, failed or not.
#[derive(Default)]
struct Mounts(Vec<PathBuf>);

impl Mounts {
    fn mount(&mut self, args: &[&str], source: &Path, target: &Path) {
        std::fs::create_dir_all(target).unwrap();
        let ok = Command::new("mount")
            .args(args)
            .arg(source)
            .arg(target)
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "mount {args:?} {} {} failed (the test suite runs as root)",
            source.display(),
            target.display()
        );
        self.0.push(target.to_path_buf());
    }
}

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("fsfreeze")
                .arg("-u")
                .arg(m)
                .stderr(Stdio::null())
                .status();
            let _ = Command::new("umount").arg(m).status();
        }
    }
}

fn ext4_image(path: &Path) {
    std::fs::File::create(path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    let made = Command::new("mkfs.ext4")
        .arg("-q")
        .arg(path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(made, "mkfs.ext4 failed (e2fsprogs)");
}

/// Every mount is an entry of guest-get-fsinfo and guest-fstrim, a bind mount of a device
/// included, and a mountpoint hidden under a later mount gives qemu-ga's `failed to
/// open` texts; a freeze skips a filesystem frozen already (the second mount of a device,
/// or one `fsfreeze -f` froze) without counting it. Loop mounts only: nothing of this
/// machine is frozen.
#[test]
fn every_mount_is_listed_trimmed_and_frozen_like_qemu_ga() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_string_lossy().into_owned();
    let mut mounts = Mounts::default();
    let (img, hidden_img) = (dir.path().join("a.img"), dir.path().join("b.img"));
    ext4_image(&img);
    ext4_image(&hidden_img);
    let (mnt, bind) = (dir.path().join("mnt"), dir.path().join("bind"));
    let (cover, hidden) = (dir.path().join("cover"), dir.path().join("cover/hidden"));
    mounts.mount(&["-o", "loop"], &img, &mnt);
    mounts.mount(&["--bind"], &mnt, &bind);
    mounts.mount(&["-o", "loop"], &hidden_img, &hidden);
    mounts.mount(&["-t", "tmpfs"], Path::new("none"), &cover);
    let (m, b, h) = (
        mnt.to_string_lossy().into_owned(),
        bind.to_string_lossy().into_owned(),
        hidden.to_string_lossy().into_owned(),
    );
    let freeze = |list: &[&str]| {
        serde_json::json!({"execute": "guest-fsfreeze-freeze-list", "arguments": {"mountpoints": list}})
            .to_string()
    };
    let theirs = same_as_qemu_ga(&[], |p| {
        let mut out = Vec::new();
        let mut fsinfo = p.call(&String::from_utf8(cmd("guest-get-fsinfo")).unwrap());
        if let Some(Value::Array(l)) = fsinfo.get_mut("return") {
            l.retain(|f| f["mountpoint"].as_str().unwrap_or("").starts_with(&root));
        }
        mask_at(&mut fsinfo, &["return", "*", "used-bytes"]);
        mask_at(&mut fsinfo, &["return", "*", "total-bytes"]);
        out.push(fsinfo);
        let mut trim = p.call(&String::from_utf8(cmd("guest-fstrim")).unwrap());
        if let Some(Value::Array(l)) = trim.pointer_mut("/return/paths") {
            l.retain(|f| f["path"].as_str().unwrap_or("").starts_with(&root));
        }
        mask_at(&mut trim, &["return", "paths", "*", "trimmed"]);
        out.push(trim);
        let status = String::from_utf8(cmd("guest-fsfreeze-status")).unwrap();
        let thaw = String::from_utf8(cmd("guest-fsfreeze-thaw")).unwrap();
        out.push(p.call(&freeze(&[&m, &b])));
        out.push(p.call(&status));
        out.push(p.call(&thaw));
        out.push(p.call(&freeze(&[&h])));
        out.push(p.call(&status));
        let frozen = Command::new("fsfreeze").arg("-f").arg(&mnt).status();
        assert!(frozen.is_ok_and(|s| s.success()), "fsfreeze -f {m}");
        out.push(p.call(&freeze(&[&m])));
        out.push(p.call(&status));
        let _ = Command::new("fsfreeze").arg("-u").arg(&mnt).status();
        out
    });
    let paths = |v: &Value, key: &str| -> Vec<String> {
        v.as_array()
            .map(|l| {
                l.iter()
                    .map(|f| f[key].as_str().unwrap_or("").to_string())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        paths(&theirs[0]["return"], "mountpoint"),
        [h.clone(), b.clone(), m.clone()],
        "qemu-ga lists every mount, last mounted first"
    );
    assert_eq!(
        paths(&theirs[1]["return"]["paths"], "path"),
        [h.clone(), b, m]
    );
    assert_eq!(
        theirs[1]["return"]["paths"][0]["error"],
        "failed to open: No such file or directory"
    );
    assert_eq!(
        theirs[2]["return"], 1,
        "the bind mount's EBUSY is not counted"
    );
    assert_eq!(
        theirs[5]["error"]["desc"],
        format!("failed to open {h}: No such file or directory")
    );
    assert_eq!(theirs[7]["return"], 0, "frozen by someone else: skipped");
    assert_eq!(theirs[8]["return"], "thawed");
    drop(mounts);
}

/// A mount point whose name is not UTF-8 (a tmpfs here) hides no other mount: the loop
/// mount beside it is listed and frozen as qemu-ga lists and freezes it, where reading
/// mountinfo as text once made the freeze report 0 with nothing frozen.
#[test]
fn a_mount_point_that_is_not_utf8_hides_no_other_mount() {
    use std::os::unix::ffi::OsStrExt;
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().to_string_lossy().into_owned();
    let mut mounts = Mounts::default();
    let img = dir.path().join("a.img");
    ext4_image(&img);
    let mnt = dir.path().join("mnt");
    let odd = dir.path().join(std::ffi::OsStr::from_bytes(b"caf\xe9"));
    mounts.mount(&["-o", "loop"], &img, &mnt);
    mounts.mount(&["-t", "tmpfs"], Path::new("none"), &odd);
    let m = mnt.to_string_lossy().into_owned();
    let theirs = same_as_qemu_ga(&[], |p| {
        let mut fsinfo = p.call(&String::from_utf8(cmd("guest-get-fsinfo")).unwrap());
        if let Some(Value::Array(l)) = fsinfo.get_mut("return") {
            l.retain(|f| f["mountpoint"].as_str().unwrap_or("").starts_with(&root));
        }
        mask_at(&mut fsinfo, &["return", "*", "used-bytes"]);
        mask_at(&mut fsinfo, &["return", "*", "total-bytes"]);
        let freeze = serde_json::json!({"execute": "guest-fsfreeze-freeze-list", "arguments": {"mountpoints": [&m]}});
        vec![
            fsinfo,
            p.call(&freeze.to_string()),
            p.call(&String::from_utf8(cmd("guest-fsfreeze-thaw")).unwrap()),
        ]
    });
    assert_eq!(theirs[0]["return"][0]["mountpoint"], m.as_str());
    assert_eq!(theirs[1]["return"], 1, "qemu-ga freezes the loop mount");
    assert_eq!(theirs[2]["return"], 1);
    drop(mounts);
}

/// A link with no link-layer address (a tun device, as WireGuard and Tailscale make)
/// carries `hardware-address` all zeros, as qemu-ga's SIOCGIFHWADDR gives it.
#[test]
fn a_tun_device_has_a_zero_hardware_address_like_qemu_ga() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    struct Tun(&'static str);
    impl Drop for Tun {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["link", "del", self.0]).status();
        }
    }
    let ip = |args: &[&str]| {
        let ok = Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "ip {args:?} failed (iproute2, as root)");
    };
    let tun = Tun("nxsdtun0");
    ip(&["tuntap", "add", "dev", tun.0, "mode", "tun"]);
    ip(&["addr", "add", "198.51.100.7/32", "dev", tun.0]);
    let theirs = same_as_qemu_ga(&[], |p| {
        let all = p.call(&String::from_utf8(cmd("guest-network-get-interfaces")).unwrap());
        let mut mine = all["return"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["name"] == tun.0)
            .cloned()
            .collect::<Vec<_>>();
        for i in &mut mine {
            mask_at(i, &["statistics"]);
        }
        vec![Value::Array(mine)]
    });
    assert_eq!(theirs[0][0]["hardware-address"], "00:00:00:00:00:00");
    assert_eq!(
        theirs[0][0]["ip-addresses"][0]["ip-address"],
        "198.51.100.7"
    );
}

/// guest-file-open of a named pipe: with no reader, opening it for writing fails at once
/// (both open with `O_NONBLOCK`); with no writer, opening it for reading succeeds at once.
/// Modes are qemu-ga's names only.
#[test]
fn file_open_of_a_fifo_matches_qemu_ga() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let made = Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo");
    let open = |mode: &str| {
        serde_json::json!({"execute": "guest-file-open", "arguments": {"path": fifo, "mode": mode}})
            .to_string()
    };
    let theirs = same_as_qemu_ga(&["guest-file-open", "guest-file-close"], |p| {
        let mut out = vec![p.call(&open("w")), p.call(&open("a")), p.call(&open("br"))];
        out.push(p.call(&open("r")));
        out.push(p.call(r#"{"execute":"guest-file-close","arguments":{"handle":1000}}"#));
        out.push(p.call(&open("rb+")));
        out
    });
    assert!(
        theirs[0]["error"]["desc"]
            .as_str()
            .unwrap_or("")
            .ends_with("No such device or address"),
        "{}",
        theirs[0]
    );
    assert_eq!(theirs[2]["error"]["desc"], "invalid file open mode 'br'");
    assert_eq!(theirs[3]["return"], 1000, "opened with no writer");
}

/// Runs `session` against qemu-ga and then against nixseed-agent, each started with the
/// `enable`d commands, and requires the same replies; returns qemu-ga's.
fn same_as_qemu_ga(enable: &[&str], session: impl Fn(&Peer) -> Vec<Value>) -> Vec<Value> {
    let run = |name| {
        let p = Peer::start_with(name, enable);
        let out = session(&p);
        p.stop();
        out
    };
    let theirs = run("qemu-ga");
    let ours = run("nixseed");
    assert_eq!(theirs, ours);
    theirs
}

/// guest-set-user-password: qemu-ga refuses only a `\n` in the password and a `:` or
/// `\n` in the user name; any other bytes (not UTF-8, `\r`) go to chpasswd. The user
/// does not exist, so chpasswd fails in both and no password on this machine changes.
#[test]
fn set_user_password_matches_qemu_ga() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let nobody = "nixseed-no-such-user";
    let cases: &[(&str, &str, bool)] = &[
        (nobody, "cORzcw==", false), // "p\xe4ss": Latin-1, not UTF-8
        (nobody, "YQ1i", false),     // "a\rb"
        (nobody, "YW\nJj", false),   // wrapped base64, as Proxmox sends it
        (nobody, "JDUkc2FsdCRoYXNo", true),
        (nobody, "YQpi", false), // "a\nb"
        ("a:b", "YQ==", false),
        ("a\nb", "YQ==", false),
        ("a:b", "YQpi", false), // both: the password is checked first
    ];
    let theirs = same_as_qemu_ga(&["guest-set-user-password"], |p| {
        let out: Vec<Value> = cases
            .iter()
            .map(|(user, password, crypted)| {
                let request = serde_json::json!({
                    "execute": "guest-set-user-password",
                    "arguments": {"username": user, "password": password, "crypted": crypted},
                });
                p.call(&request.to_string())
            })
            .collect();
        out
    });
    assert_eq!(
        theirs[0]["error"]["desc"], "child process has failed to set user password",
        "qemu-ga hands a password that is not UTF-8 to chpasswd"
    );
}

/// Base64 arguments (`input-data`, `password`, `buf-b64`) are decoded as qemu-ga
/// decodes them: only `A-Za-z0-9+/=` and `\n`, and on past padding (`YQ==YQ==` is `aa`).
#[test]
fn base64_arguments_match_qemu_ga() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let texts = ["YQ==YQ==", "YW\nJj", "YWJjZA", "YQ== ", "-_8=", "a*b"];
    let theirs = same_as_qemu_ga(
        &[
            "guest-exec",
            "guest-exec-status",
            "guest-set-user-password",
            "guest-file-open",
            "guest-file-write",
            "guest-file-close",
        ],
        |p| {
            let mut out = Vec::new();
            for text in texts {
                let request = serde_json::json!({
                    "execute": "guest-exec",
                    "arguments": {"path": "/bin/cat", "input-data": text, "capture-output": true},
                });
                let r = p.call(&request.to_string());
                out.push(match r["return"]["pid"].as_i64() {
                    Some(pid) => exec_status(p, pid),
                    None => r,
                });
                let request = serde_json::json!({
                    "execute": "guest-set-user-password",
                    "arguments": {"username": "nixseed-no-such-user", "password": text, "crypted": false},
                });
                out.push(p.call(&request.to_string()));
            }
            let dir = tempfile::tempdir().unwrap();
            let file = dir.path().join("written");
            let open = serde_json::json!({
                "execute": "guest-file-open",
                "arguments": {"path": file, "mode": "w"},
            });
            let handle = p.call(&open.to_string())["return"].as_i64().unwrap();
            for text in texts {
                let write = serde_json::json!({
                    "execute": "guest-file-write",
                    "arguments": {"handle": handle, "buf-b64": text},
                });
                out.push(p.call(&write.to_string()));
            }
            p.call(&format!(
                "{{\"execute\":\"guest-file-close\",\"arguments\":{{\"handle\":{handle}}}}}"
            ));
            out.push(Value::String(
                String::from_utf8_lossy(&std::fs::read(&file).unwrap()).into_owned(),
            ));
            out
        },
    );
    assert_eq!(
        theirs[0]["return"]["out-data"], "YWE=",
        "qemu-ga: YQ==YQ== is aa"
    );
    assert_eq!(
        theirs.last().unwrap(),
        &Value::String("aaabcabc".into()),
        "qemu-ga wrote the valid ones"
    );
}

/// guest-file-*: an unknown handle is reported before any bad argument value, as qemu-ga
/// looks the handle up first; then whence codes and names on a real handle.
#[test]
fn file_commands_match_qemu_ga() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let requests: &[&str] = &[
        r#"{"execute":"guest-file-read","arguments":{"handle":99999,"count":-1}}"#,
        r#"{"execute":"guest-file-read","arguments":{"handle":99999,"count":99999999999}}"#,
        r#"{"execute":"guest-file-write","arguments":{"handle":99999,"buf-b64":"a*b"}}"#,
        r#"{"execute":"guest-file-write","arguments":{"handle":99999,"buf-b64":"YQ==","count":-1}}"#,
        r#"{"execute":"guest-file-seek","arguments":{"handle":99999,"offset":0,"whence":7}}"#,
        r#"{"execute":"guest-file-seek","arguments":{"handle":99999,"offset":-1,"whence":"set"}}"#,
        r#"{"execute":"guest-file-seek","arguments":{"handle":99999,"offset":0,"whence":"bogus"}}"#,
        r#"{"execute":"guest-file-flush","arguments":{"handle":99999}}"#,
        r#"{"execute":"guest-file-close","arguments":{"handle":99999}}"#,
        // Both agents hand out handle 1000 first.
        r#"{"execute":"guest-file-open","arguments":{"path":"/etc/hostname"}}"#,
        r#"{"execute":"guest-file-read","arguments":{"handle":1000,"count":-1}}"#,
        r#"{"execute":"guest-file-write","arguments":{"handle":1000,"buf-b64":"YQ==","count":2}}"#,
        r#"{"execute":"guest-file-seek","arguments":{"handle":1000,"offset":1,"whence":"set"}}"#,
        r#"{"execute":"guest-file-seek","arguments":{"handle":1000,"offset":1,"whence":"cur"}}"#,
        r#"{"execute":"guest-file-seek","arguments":{"handle":1000,"offset":0,"whence":"end"}}"#,
        r#"{"execute":"guest-file-seek","arguments":{"handle":1000,"offset":2,"whence":0}}"#,
        r#"{"execute":"guest-file-seek","arguments":{"handle":1000,"offset":-1,"whence":0}}"#,
        r#"{"execute":"guest-file-seek","arguments":{"handle":1000,"offset":0,"whence":7}}"#,
        r#"{"execute":"guest-file-close","arguments":{"handle":1000}}"#,
    ];
    let theirs = same_as_qemu_ga(
        &[
            "guest-file-open",
            "guest-file-close",
            "guest-file-read",
            "guest-file-write",
            "guest-file-seek",
            "guest-file-flush",
        ],
        |p| {
            let out: Vec<Value> = requests.iter().map(|r| p.call(r)).collect();
            out
        },
    );
    assert_eq!(
        theirs[0]["error"]["desc"], "handle '99999' has not been found",
        "qemu-ga looks the handle up first"
    );
}

/// A client that sends many requests and hangs up without reading their replies: the
/// next client's first request is answered as qemu-ga answers it. Its 300 requests of 24
/// bytes straddle the agent's 4 KiB reads, so an agent that stopped reading at the
/// first failed reply would keep half a request and garble the next client's.
#[test]
fn a_client_that_hangs_up_unanswered_leaves_the_next_one_whole() {
    let _one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    for name in ["qemu-ga", "nixseed"] {
        let peer = Peer::start(name);
        let mut a = UnixStream::connect(&peer.sock).unwrap();
        a.write_all(&br#"{"execute":"guest-ping"}"#.repeat(300))
            .unwrap();
        drop(a);
        std::thread::sleep(Duration::from_millis(500));
        let mut b = UnixStream::connect(&peer.sock).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        b.write_all(br#"{"execute":"guest-sync","arguments":{"id":4}}"#)
            .unwrap();
        let mut reply = Vec::new();
        let mut byte = [0u8; 1];
        while !reply.ends_with(b"\n") {
            let n = b.read(&mut byte).unwrap();
            assert!(n > 0, "{name} closed the connection");
            reply.push(byte[0]);
        }
        assert_eq!(
            String::from_utf8_lossy(&reply),
            "{\"return\": 4}\n",
            "{name}"
        );
        peer.stop();
    }
}

/// Zones compiled "slim" (zic's default since 2020b) list no transitions that their
/// footer rule gives: the time zone reported is the footer's for today, as glib (and so
/// qemu-ga) reads it. One southern and one northern zone, so that one of the two is on
/// daylight time whatever the date.
#[test]
fn the_time_zone_of_a_slim_zone_file_matches_qemu_ga() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("zones");
    std::fs::write(
        &src,
        "Rule AN 2008 max - Apr Sun>=1 2:00s 0 S\n\
         Rule AN 2008 max - Oct Sun>=1 2:00s 1:00 D\n\
         Zone Test/Syd 10:00 AN AE%sT\n\
         Rule EU 1981 max - Mar lastSun 1:00u 1:00 S\n\
         Rule EU 1996 max - Oct lastSun 1:00u 0 -\n\
         Zone Test/Ber 1:00 EU CE%sT\n",
    )
    .unwrap();
    let out = dir.path().join("out");
    let st = Command::new("zic")
        .args(["-b", "slim", "-d"])
        .arg(&out)
        .arg(&src)
        .status()
        .expect("zic (Debian's libc-bin)");
    assert!(st.success());
    let mut zones = Vec::new();
    for zone in ["Test/Syd", "Test/Ber"] {
        let tz = out.join(zone);
        let mut replies = Vec::new();
        for name in ["qemu-ga", "nixseed"] {
            let peer = Peer::start_env(name, &[], &[("TZ", &tz)]);
            replies.push(peer.call(r#"{"execute":"guest-get-timezone"}"#));
            peer.stop();
        }
        assert_eq!(replies[0], replies[1], "{zone}");
        zones.push(replies[0]["return"]["zone"].as_str().unwrap().to_string());
    }
    assert!(
        zones.iter().any(|z| z == "AEDT" || z == "CEST"),
        "neither zone is on daylight time: {zones:?}"
    );
}
