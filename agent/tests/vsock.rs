//! `serve -m vsock-listen -p CID:PORT`: the agent binds an AF_VSOCK listener like qemu-ga.
//! These machines have no vsock transport to connect through (no vhost-vsock, no
//! vsock_loopback), so the test checks what is observable here: the listener holds the
//! port (a second agent cannot bind it) and a malformed address is refused by name.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const AGENT: &str = env!("CARGO_BIN_EXE_nixseed-agent");

/// `nixseed-agent serve --no-channel -m vsock-listen -p ADDR -t STATE`: the guest agent
/// alone, on the vsock address `addr`.
fn serve_vsock(addr: &str, state: &Path) -> Command {
    let mut c = Command::new(AGENT);
    c.args([
        "serve",
        "--no-channel",
        "-m",
        "vsock-listen",
        "-p",
        addr,
        "-t",
    ])
    .arg(state);
    c
}

#[test]
fn vsock_listener_holds_its_port_and_bad_addresses_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let port = 40000 + (std::process::id() % 20000);
    let addr = format!("-1:{port}");
    let serve = |state: &str| {
        serve_vsock(&addr, &dir.path().join(state))
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = serve("a");
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first agent must keep listening"
    );
    let second = serve("b");
    let t0 = Instant::now();
    let out = second.wait_with_output().unwrap();
    assert!(t0.elapsed() < Duration::from_secs(10));
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot bind vsock") && err.contains("in use"),
        "{err}"
    );
    let _ = first.kill();
    let _ = first.wait();

    let out = serve_vsock("nonsense", &dir.path().join("c"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("expected CID:PORT"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Any process on the host can open a guest's vsock port, so the control channel is not
/// served there unsigned: `channel` refuses to start, and `serve` goes on with the guest
/// agent alone and says why.
#[test]
fn the_control_channel_on_vsock_needs_trusted_keys() {
    let dir = tempfile::tempdir().unwrap();
    let port = 40000 + ((std::process::id() + 7) % 20000);
    let out = Command::new(AGENT)
        .args(["channel", "-m", "vsock-listen", "-p", &format!("-1:{port}")])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "served: {err}");
    assert!(err.contains("needs --trusted-keys"), "{err}");

    let mut serve = Command::new(AGENT)
        .args(["serve", "-m", "unix-listen", "-p"])
        .arg(dir.path().join("qga.sock"))
        .args(["--channel-method", "vsock-listen", "--channel-path"])
        .arg(format!("-1:{port}"))
        .arg("-t")
        .arg(dir.path().join("state"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let up = nixseed_test_support::wait_for(Duration::from_secs(20), || {
        dir.path().join("qga.sock").exists()
    });
    std::thread::sleep(Duration::from_millis(300));
    let still = serve.try_wait().unwrap().is_none();
    let _ = serve.kill();
    let out = serve.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(up && still, "the guest agent must keep serving: {err}");
    assert!(
        err.contains("not serving the control channel") && err.contains("needs --trusted-keys"),
        "{err}"
    );
}
