//! Load and fault tolerance of `nixseed-agent serve` on unix-listen: 100 000 requests
//! pipelined over one connection and 2 000 reconnects, every reply accounted for, and
//! many large replies to one write.

#![allow(clippy::unwrap_used)] // test scaffolding: a failed setup step should fail the test loudly

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::time::Duration;

/// `nixseed-agent serve` on unix-listen at `dir/sock` (state in `dir/state`), with `extra`
/// arguments; returns once it listens.
fn start_agent(dir: &std::path::Path, extra: &[&str]) -> std::process::Child {
    start_agent_env(dir, extra, &[])
}

/// [`start_agent`] with environment variables set for the agent.
fn start_agent_env(
    dir: &std::path::Path,
    extra: &[&str],
    env: &[(&str, &str)],
) -> std::process::Child {
    let sock = dir.join("sock");
    let child = Command::new(env!("CARGO_BIN_EXE_nixseed-agent"))
        .envs(env.iter().copied())
        .args(["serve", "-m", "unix-listen", "-t"])
        .arg(dir.join("state"))
        .arg("-p")
        .arg(&sock)
        .args(extra)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    assert!(
        nixseed_test_support::listening_within(&sock, Duration::from_secs(10)),
        "agent did not listen"
    );
    child
}

/// A `/proc/PID/status` figure in KiB (`VmRSS:`, `VmHWM:`).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn hundred_thousand_requests_and_two_thousand_reconnects() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sock");
    let mut child = start_agent(dir.path(), &[]);
    let rss_kib = || status_kib(child.id(), "VmRSS:");
    let rss_start = rss_kib();

    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let mut batch = Vec::new();
        for i in 0..100_000u32 {
            batch
                .extend_from_slice(format!("{{\"execute\":\"guest-ping\",\"id\":{i}}}").as_bytes());
            if batch.len() > 16 << 10 {
                w.write_all(&batch).unwrap();
                batch.clear();
            }
        }
        w.write_all(&batch).unwrap();
    });
    let mut r = BufReader::new(s);
    let mut line = String::new();
    for i in 0..100_000u32 {
        line.clear();
        r.read_line(&mut line).unwrap();
        assert_eq!(line, format!("{{\"return\": {{}}, \"id\": {i}}}\n"));
    }
    writer.join().unwrap();
    drop(r);
    let rss_after_load = rss_kib();

    let reconnects = |from: u32| {
        for i in from..from + 1000 {
            let mut s = UnixStream::connect(&sock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            // Proxmox style: a raw 0xFF, then guest-sync-delimited.
            let mut req = vec![0xFFu8];
            req.extend_from_slice(
                format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{i}}}}}")
                    .as_bytes(),
            );
            s.write_all(&req).unwrap();
            let mut r = BufReader::new(s);
            let mut err = String::new();
            r.read_line(&mut err).unwrap();
            assert!(err.contains("stray"), "{err}");
            let mut buf = Vec::new();
            r.read_until(b'\n', &mut buf).unwrap();
            let mut want = vec![0xFFu8];
            want.extend_from_slice(format!("{{\"return\": {i}}}\n").as_bytes());
            assert_eq!(buf, want);
            if i % 10 == 0 {
                // Leave half a request behind: the parser state belongs to the agent, so
                // the next client's 0xFF must clear it.
                r.get_mut().write_all(b"{\"execute\":\"guest-pi").unwrap();
            }
        }
    };
    // The first round may leave one-off allocations (a worker thread's heap); a leak
    // per connection grows the second round as much as the first.
    reconnects(0);
    let rss_warm = rss_kib();
    reconnects(1000);
    // Flat memory: the load leaves no more than buffers behind, the reconnects nothing.
    let rss_end = rss_kib();
    assert!(
        rss_after_load <= rss_start + 2048
            && rss_warm <= rss_after_load + 1024
            && rss_end <= rss_warm + 256,
        "RSS grew: {rss_start} KiB at start, {rss_after_load} after 100 000 requests, {rss_warm} after 1 000 reconnects, {rss_end} after 1 000 more"
    );
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    assert!(
        child.wait().unwrap().success(),
        "agent exits cleanly on SIGTERM"
    );
}

/// 24 guest-file-read of 8 MiB each arrive in one write: each reply (11 MiB of base64) is
/// written before the next request is answered, so the agent's peak memory stays near
/// one reply's, not the 256 MiB all of them take together.
#[test]
fn large_replies_to_one_write_are_written_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sock");
    let mut child = start_agent(
        dir.path(),
        &["--unsafe-rpcs", "guest-file-open,guest-file-read"],
    );
    // Peak resident memory of the agent so far.
    let hwm_kib = || status_kib(child.id(), "VmHWM:");
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    w.write_all(b"{\"execute\":\"guest-file-open\",\"arguments\":{\"path\":\"/dev/zero\"}}")
        .unwrap();
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line).unwrap();
    assert_eq!(line, b"{\"return\": 1000}\n");
    let before = hwm_kib();
    let reads = 24;
    let batch =
        "{\"execute\":\"guest-file-read\",\"arguments\":{\"handle\":1000,\"count\":8388608}}"
            .repeat(reads);
    w.write_all(batch.as_bytes()).unwrap();
    for i in 0..reads {
        line.clear();
        r.read_until(b'\n', &mut line).unwrap();
        assert!(
            line.starts_with(b"{\"return\": {") && line.ends_with(b"}\n") && line.len() > 8 << 20,
            "reply {i}: {:?}",
            String::from_utf8_lossy(&line[..line.len().min(200)])
        );
    }
    let peak = hwm_kib();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    );
    let _ = child.wait();
    assert!(
        peak < before + 128 * 1024,
        "peak RSS went from {before} KiB to {peak} KiB answering {reads} reads of 8 MiB"
    );
}

/// One large reply (24 MiB read through guest-file-read: 32 MiB of base64) leaves no
/// large buffer behind: the agent's resident memory falls back near where it started.
#[test]
fn a_large_reply_gives_its_memory_back() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("sock");
    let file = dir.path().join("big");
    std::fs::write(&file, vec![0x5a_u8; 24 << 20]).unwrap();
    // glibc's malloc (this test build's; the guest's agent is linked with musl) raises its
    // mmap threshold to the size of a large block once that is freed, and then keeps
    // later blocks of that size in its heap: a fixed threshold leaves only what the agent
    // itself holds on to.
    let mut child = start_agent_env(
        dir.path(),
        &["--unsafe-rpcs", "guest-file-open,guest-file-read"],
        &[("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=131072")],
    );
    let rss_start = status_kib(child.id(), "VmRSS:");
    let s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    let mut call = |req: String| {
        w.write_all(req.as_bytes()).unwrap();
        line.clear();
        r.read_line(&mut line).unwrap();
        line.clone()
    };
    let open = call(format!(
        r#"{{"execute":"guest-file-open","arguments":{{"path":"{}"}}}}"#,
        file.display()
    ));
    let handle: u64 = open
        .trim()
        .trim_start_matches(r#"{"return": "#)
        .trim_end_matches('}')
        .parse()
        .unwrap_or_else(|_| panic!("{open}"));
    let read = call(format!(
        r#"{{"execute":"guest-file-read","arguments":{{"handle":{handle},"count":{}}}}}"#,
        24 << 20
    ));
    assert!(read.len() > 32 << 20, "{} bytes", read.len());
    assert_eq!(
        call(r#"{"execute":"guest-ping"}"#.into()),
        "{\"return\": {}}\n"
    );
    let rss_end = status_kib(child.id(), "VmRSS:");
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        rss_end < rss_start + 8 * 1024,
        "RSS {rss_start} KiB at the start, {rss_end} KiB after the reply"
    );
}
