//! `seedctl run` under real QEMU (TCG when KVM does not work): the devices and identity
//! wiring a guest relies on, checked through QEMU's own monitor, and stop/destroy.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Scratch, create_args, require_tool};

fn qmp(sock: &std::path::Path, cmd: &str) -> serde_json::Value {
    let s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    for c in ["{\"execute\":\"qmp_capabilities\"}", cmd] {
        writeln!(w, "{c}").unwrap();
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            if !line.contains("\"event\"") {
                break;
            }
        }
    }
    serde_json::from_str::<serde_json::Value>(&line).unwrap()["return"].clone()
}

fn machine(s: &Scratch) {
    s.created("web1", "32M");
}

/// `run`'s options for a small machine in the background under TCG.
const DETACHED_TCG: &[&str] = &["--detach", "--memory", "128", "--accel", "tcg"];

/// A scratch machine `web1` started detached under TCG; its SSH port.
fn started() -> (Scratch, u64) {
    require_tool("qemu-system-x86_64");
    require_tool("qemu-img");
    let s = Scratch::new();
    machine(&s);
    let out = s.ok(&[&["--json", "run", "web1"], DETACHED_TCG].concat());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let port = v["ssh_port"].as_u64().unwrap();
    (s, port)
}

/// Whether process `pid` has ended: gone, or a zombie waiting for a container init that
/// does not reap.
fn ended(pid: impl std::fmt::Display) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    stat.is_empty()
        || stat
            .rsplit(')')
            .next()
            .unwrap()
            .trim_start()
            .starts_with('Z')
}

/// What QEMU process `pid` holds open of files named `name`: the targets of its
/// `/proc/PID/fd` links, `… (deleted)` for a file renamed over since it was opened.
fn held(pid: &str, name: &str) -> Vec<String> {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.unwrap().path()).ok())
        .map(|t| t.display().to_string())
        .filter(|t| t.contains(name))
        .collect()
}

/// A seed written while the machine runs (by `seed`, and by `push`, which rewrites it)
/// is given to the running QEMU: QEMU keeps the file it opened, so without that a guest
/// rebooted inside it would apply the older seed. Written elsewhere (`-o`), it is not.
#[test]
fn a_seed_written_while_running_is_given_to_the_running_qemu() {
    let (s, _) = started();
    let sd = s.state("web1");
    let pid = std::fs::read_to_string(sd.join("qemu.pid")).unwrap();
    let pid = pid.trim();
    let iso = sd.join("seed.iso").display().to_string();
    assert_eq!(held(pid, "seed.iso"), std::slice::from_ref(&iso));

    std::fs::write(s.machine("web1").join("hostname"), "renamed\n").unwrap();
    let out = s.ok(&["seed", "web1", "-o", "elsewhere.iso"]);
    assert!(!out.contains("running QEMU"), "{out}");
    let out = s.ok(&["seed", "web1"]);
    assert!(
        out.contains("the running QEMU's seed cdrom now holds it"),
        "{out}"
    );
    assert_eq!(
        held(pid, "seed.iso"),
        [iso],
        "QEMU still holds the seed it started with"
    );
    s.ok(&["destroy", "web1"]);
    // A QEMU without a seed cdrom has nothing to take it.
    s.ok(&[&["run", "web1", "--seed-via", "channel"], DETACHED_TCG].concat());
    let out = s.ok(&["seed", "web1"]);
    assert!(!out.contains("running QEMU"), "{out}");
    s.ok(&["destroy", "web1"]);
}

#[test]
fn run_wires_uuid_disks_channels_and_ssh_forward() {
    let (s, port) = started();
    let sd = s.state("web1");

    let uuid = std::fs::read_to_string(s.machine("web1").join("product_uuid")).unwrap();
    assert_eq!(
        qmp(&sd.join("qmp.sock"), "{\"execute\":\"query-uuid\"}")["UUID"],
        uuid.trim()
    );
    let blocks = qmp(&sd.join("qmp.sock"), "{\"execute\":\"query-block\"}").to_string();
    for f in ["boot.qcow2", "var.qcow2", "seed.iso"] {
        assert!(blocks.contains(f), "{f} not attached: {blocks}");
    }
    let ports = qmp(
        &sd.join("qmp.sock"),
        "{\"execute\":\"qom-list\",\"arguments\":{\"path\":\"/machine/peripheral-anon\"}}",
    );
    assert!(ports.to_string().contains("virtserialport"), "{ports}");
    // The guest-agent and channel sockets accept a host client; the SSH forward listens.
    UnixStream::connect(sd.join("qga.sock")).unwrap();
    UnixStream::connect(sd.join("channel.sock")).unwrap();
    std::net::TcpStream::connect(("127.0.0.1", port as u16)).unwrap();
    let kh = std::fs::read_to_string(sd.join("known_hosts")).unwrap();
    let host_pub =
        std::fs::read_to_string(s.machine("web1").join("ssh_host_ed25519_key.pub")).unwrap();
    let key_b64 = host_pub.split_whitespace().nth(1).unwrap();
    assert_eq!(kh, format!("[127.0.0.1]:{port} ssh-ed25519 {key_b64}\n"));
    assert!(sd.join("console.log").exists());

    let err = s.fails(&["run", "web1", "--detach"]);
    assert!(err.contains("already running"), "{err}");
    // With its pidfile gone, the QEMU still holds the disk: a second run does not take
    // its sockets away.
    let pidfile = std::fs::read(sd.join("qemu.pid")).unwrap();
    std::fs::remove_file(sd.join("qemu.pid")).unwrap();
    let err = s.fails(&["run", "web1", "--detach"]);
    assert!(err.contains("is in use by another process"), "{err}");
    assert!(sd.join("qmp.sock").exists() && sd.join("qga.sock").exists());
    std::fs::write(sd.join("qemu.pid"), pidfile).unwrap();
    // Firmware without an OS ignores the ACPI button: stop reports it and names destroy.
    let err = s.fails(&["stop", "web1", "--timeout", "1"]);
    assert!(err.contains("seedctl destroy web1"), "{err}");
    let pid: i32 = std::fs::read_to_string(sd.join("qemu.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    s.ok(&["destroy", "web1"]);
    assert!(
        ended(pid),
        "QEMU {pid} still runs after destroy: {}",
        std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default()
    );
    let err = s.fails(&["stop", "web1"]);
    assert!(
        err.contains("not running") && err.contains("--connect"),
        "{err}"
    );
}

/// A run whose QEMU cannot start (the SSH port is taken) fails, naming the machine, and
/// leaves the last run's port and known_hosts line for `seedctl ssh`.
#[test]
fn a_run_that_cannot_start_keeps_the_last_runs_port() {
    let (s, port) = started();
    s.ok(&["destroy", "web1"]);
    let sd = s.state("web1");
    let state = std::fs::read_to_string(sd.join("state.json")).unwrap();
    let kh = std::fs::read_to_string(sd.join("known_hosts")).unwrap();
    assert!(kh.starts_with(&format!("[127.0.0.1]:{port} ")), "{kh}");

    // Port 0 is no port `seedctl ssh` could reach: a usage error, before anything runs.
    let out = s.run(&[&["run", "web1"], DETACHED_TCG, &["--ssh-port", "0"]].concat());
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--ssh-port"));

    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = taken.local_addr().unwrap().port().to_string();
    let err = s.fails(&[&["run", "web1"], DETACHED_TCG, &["--ssh-port", &busy]].concat());
    assert!(err.contains("machine `web1`: starting QEMU"), "{err}");
    assert_eq!(
        std::fs::read_to_string(sd.join("state.json")).unwrap(),
        state
    );
    assert_eq!(std::fs::read_to_string(sd.join("known_hosts")).unwrap(), kh);
}

/// A state directory with a comma and a space in its path (QEMU's option syntax splits
/// at commas), and a read-only UEFI variables template (a Nix store file): the VM starts,
/// with every file in place, and its own copy of the variables is writable.
#[test]
fn run_works_from_a_state_path_with_a_comma_and_a_read_only_vars_template() {
    use std::os::unix::fs::PermissionsExt;
    require_tool("qemu-system-x86_64");
    require_tool("qemu-img");
    let s = Scratch::new();
    let state = s.path().join("vm state, one");
    let st = state.display().to_string();
    s.ok(&["new", "web1"]);
    s.qcow2("base.qcow2");
    s.ok(&[
        &["--state", &st][..],
        &create_args("web1", "base.qcow2", "32M"),
    ]
    .concat());
    let Some(template) = [
        "/usr/share/OVMF/OVMF_VARS_4M.fd",
        "/usr/share/OVMF/OVMF_VARS.fd",
    ]
    .into_iter()
    .map(std::path::Path::new)
    .find(|p| p.exists()) else {
        panic!("no OVMF_VARS in /usr/share/OVMF (cargo xtask deps installs ovmf)")
    };
    let ro = s.path().join("vars-ro.fd");
    std::fs::copy(template, &ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o444)).unwrap();
    let ro = ro.display().to_string();
    // The firmware the template was built with: a store fits only its own build.
    let code = template.display().to_string().replacen("VARS", "CODE", 1);
    s.ok(&[
        &["--state", &st, "run", "web1"],
        DETACHED_TCG,
        &["--ovmf-code", &code, "--ovmf-vars", &ro],
    ]
    .concat());
    let sd = state.join("web1");
    let blocks = qmp(&sd.join("qmp.sock"), "{\"execute\":\"query-block\"}").to_string();
    for f in [
        "vm state, one/web1/boot.qcow2",
        "vm state, one/web1/var.qcow2",
        "seed.iso",
        "OVMF_VARS.fd",
    ] {
        assert!(blocks.contains(f), "{f} not attached: {blocks}");
    }
    assert!(sd.join("console.log").exists());
    let mode = std::fs::metadata(sd.join("OVMF_VARS.fd"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    s.ok(&["--state", &st, "destroy", "web1"]);
}

#[test]
fn run_without_disks_points_at_create() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let err = s.fails(&["run", "web1"]);
    assert!(err.contains("seedctl create web1"), "{err}");
    let err = s.fails(&["ssh", "web1"]);
    assert!(err.contains("seedctl run web1"), "{err}");
}

/// `--seed-via channel`: no seed cdrom, the NIC carries the machine's MAC (the one the
/// default network-config matches), and a background answerer holds the channel socket
/// until QEMU is gone. Answering a real guest's hello is a vm-tests scenario.
#[test]
fn seed_via_channel_attaches_no_seed_and_answers_in_the_background() {
    require_tool("qemu-system-x86_64");
    require_tool("qemu-img");
    let s = Scratch::new();
    machine(&s);
    std::fs::remove_file(s.state("web1").join("seed.iso")).unwrap();
    let out = s.ok(&[
        &["--json", "run", "web1"],
        DETACHED_TCG,
        &["--seed-via", "channel"],
    ]
    .concat());
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let sd = s.state("web1");
    assert_eq!(v["seed_via"], "channel");
    let blocks = qmp(&sd.join("qmp.sock"), "{\"execute\":\"query-block\"}").to_string();
    assert!(blocks.contains("boot.qcow2"), "{blocks}");
    assert!(
        !blocks.contains("seed.iso") && !blocks.contains("\"removable\":true"),
        "a seed cdrom is attached: {blocks}"
    );
    assert!(!sd.join("seed.iso").exists(), "no seed ISO is written");
    let list: serde_json::Value = serde_json::from_str(&s.ok(&["list", "--json"])).unwrap();
    let rx = qmp(&sd.join("qmp.sock"), "{\"execute\":\"query-rx-filter\"}");
    assert_eq!(rx[0]["main-mac"], list["machines"][0]["mac"], "{rx}");

    let answerer = v["answerer_pid"].as_u64().unwrap();
    let log_path = sd.join("channel.log");
    let t0 = std::time::Instant::now();
    loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("waiting for the guest's hello on") {
            assert!(log.contains("web1"), "{log}");
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "answerer log: {log}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    s.ok(&["destroy", "web1"]);
    let t0 = std::time::Instant::now();
    while !ended(answerer) {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the answerer outlived QEMU"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = std::fs::read_to_string(&log_path).unwrap();
    assert!(log.contains("QEMU exited"), "{log}");
}

/// Ctrl-C on a foreground `run` (SIGINT to seedctl's process group, as a terminal sends
/// it) does not end QEMU at once: the first asks the guest to power off through ACPI, and
/// QEMU keeps running (this guest has no system to answer it); the second ends QEMU, and
/// seedctl with it.
#[test]
fn ctrl_c_on_a_foreground_run_powers_off_and_a_second_ends_qemu() {
    use std::os::unix::process::CommandExt;
    require_tool("qemu-system-x86_64");
    require_tool("qemu-img");
    let s = Scratch::new();
    machine(&s);
    let mut run = s
        .cmd(&["run", "web1", "--memory", "128", "--accel", "tcg"])
        .process_group(0)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let group = format!("-{}", run.id());
    let interrupt = || {
        let sent = std::process::Command::new("kill")
            .args(["-INT", "--", &group])
            .status()
            .unwrap();
        assert!(sent.success());
    };
    let pidfile = s.state("web1").join("qemu.pid");
    let qmp_sock = s.state("web1").join("qmp.sock");
    assert!(
        nixseed_test_support::wait_for(Duration::from_secs(20), || {
            nixseed_test_support::listening(&qmp_sock)
        }),
        "QEMU did not start"
    );
    let qemu = std::fs::read_to_string(&pidfile).unwrap().trim().to_owned();
    // Give seedctl a moment past QEMU's start to take Ctrl-C over.
    std::thread::sleep(Duration::from_millis(500));
    interrupt();
    std::thread::sleep(Duration::from_secs(2));
    assert!(!ended(&qemu), "the first Ctrl-C ended QEMU");
    assert!(
        run.try_wait().unwrap().is_none(),
        "the first Ctrl-C ended seedctl"
    );
    interrupt();
    assert!(
        nixseed_test_support::wait_for(Duration::from_secs(20), || {
            run.try_wait().unwrap().is_some()
        }),
        "seedctl still runs after the second Ctrl-C"
    );
    assert!(ended(&qemu), "QEMU still runs after the second Ctrl-C");
    let mut said = String::new();
    std::io::Read::read_to_string(&mut run.stderr.take().unwrap(), &mut said).unwrap();
    assert!(
        said.contains("asking the guest to power off (ACPI)")
            && said.contains("ending QEMU at once"),
        "{said}"
    );
}
