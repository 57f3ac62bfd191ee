//! Live change: edit machines/NAME (hostname, ports, admin keys), `seedctl push` over the
//! VM's control channel, and see it applied without a reboot.

use super::*;
use crate::cmd;
use crate::qga_client;
use std::fs;
use std::path::Path;

pub fn push(h: &Harness) -> Result<()> {
    let m = h.new_machine("push")?;
    let b = h.boot(&m)?;
    idle_without_hosts(&m, &b)?;
    calls_then_session(&m, &b)?;
    idle_hosts_attached(h, &m, &b)?;
    channel_source_yields_to_serve(&b)?;
    let boot_id = b.ssh.run("cat /proc/sys/kernel/random/boot_id")?;
    let before = b
        .ssh
        .run("nft list table inet nixseed 2>&1 || true")?
        .to_string();
    if !before.contains("tcp dport 22 accept") {
        let why = b.ssh.run(
            "cat /etc/default/nixseed; systemctl status --no-pager nixseed-firewall.service; \
             journalctl -b --no-pager -o cat -u nixseed-firewall.service | tail -n 20",
        )?;
        bail!(
            "the firewall from the seed is not loaded at boot (nixseed-firewall.service):\n{before}\n{why}"
        );
    }
    ensure!(
        !opens(&before, "tcp", "8080") && !opens(&before, "udp", "5353"),
        "a port is open before it was pushed:\n{before}"
    );

    // The operator's edits.
    let second = ClientKey::ensure(&m.state.join("second-admin"))?;
    fs::write(m.dir.join("hostname"), "push-renamed\n").context("editing hostname")?;
    fs::write(m.dir.join("tcp_ports"), "22\n8080\n").context("editing tcp_ports")?;
    fs::write(m.dir.join("udp_ports"), "5353\n").context("editing udp_ports")?;
    let keys = format!("{}\n{}\n", h.key.public_line()?, second.public_line()?);
    fs::write(m.dir.join("admin_authorized_keys"), keys).context("editing admin keys")?;

    let chan = b.vm.config.channel_socket();
    // Before the push, status must see the edits as drift (exit 3), file by file.
    edited_files_are(h, &m, &chan, 3, "mismatch").context("seedctl status before the push")?;
    let out = cmd::run(&mut seedctl_on(h, &m, "push", 60, &chan)?)?;
    eprintln!(
        "vm-tests: {}: seedctl push: {}",
        m.name,
        String::from_utf8_lossy(&out.stdout).trim()
    );

    let live = b.ssh.run("hostname")?;
    ensure!(
        live.trim() == "push-renamed",
        "hostname after push is '{}', not push-renamed",
        live.trim()
    );
    let etc = b.ssh.run("cat /etc/hostname")?;
    ensure!(
        etc.trim() == "push-renamed",
        "/etc/hostname after push is '{}'",
        etc.trim()
    );
    // sshd still presents the pinned key (a new connection through the pinned known_hosts).
    let seen = ssh::keyscan(b.ssh.port).context("sshd stopped answering after the push")?;
    ensure!(
        Some(seen.clone()) == ssh::key_type_and_blob(&m.host_key_pub()?),
        "sshd presents {seen} after the push, not the machine's key"
    );
    // The added admin key logs in.
    let with_second = Ssh::fresh_only(b.ssh.port, second, b.ssh.known_hosts.clone());
    let who = with_second.run("id -un")?;
    ensure!(
        who.trim() == "root",
        "the pushed admin key logs in as '{}'",
        who.trim()
    );
    let fw = b.ssh.run("nft list table inet nixseed")?;
    ensure!(
        opens(&fw, "tcp", "8080") && opens(&fw, "udp", "5353") && opens(&fw, "tcp", "22"),
        "nftables does not accept the pushed ports (tcp 22 and 8080, udp 5353):\n{fw}"
    );
    let synced =
        edited_files_are(h, &m, &chan, 0, "match").context("seedctl status after the push")?;
    // The guest lists its NICs, so the network file it rendered for its own NIC name is
    // compared, not only listed.
    let network_matches = synced["files"].as_object().is_some_and(|f| {
        f.iter()
            .any(|(n, s)| n.starts_with("network/") && s == "match")
    });
    ensure!(
        network_matches,
        "seedctl status did not compare the guest's network file: {synced}"
    );
    // The generation it reports is the one the guest's store holds as current.
    let current = b.ssh.run("readlink /var/identity/current")?;
    let generation = synced["generation"].as_u64();
    ensure!(
        generation.map(|g| format!("gen-{g}")).as_deref() == Some(current.trim()),
        "seedctl status reports generation {generation:?}, the guest's store has {}",
        current.trim()
    );
    // Revoking: the second key taken out of machines/NAME and pushed is turned away, and
    // the key left there still logs in.
    fs::write(
        m.dir.join("admin_authorized_keys"),
        format!("{}\n", h.key.public_line()?),
    )
    .context("editing admin keys")?;
    cmd::run(&mut seedctl_on(h, &m, "push", 60, &chan)?)
        .context("seedctl push of a revoked key")?;
    refused(
        &with_second,
        "the admin key taken out of machines/NAME/admin_authorized_keys and pushed",
    )?;
    b.ssh
        .login("true")
        .context("the admin key left in machines/NAME no longer logs in after the revocation")?;
    agent_key_changes(h, &m, &b)?;
    let boot_id2 = b.ssh.run("cat /proc/sys/kernel/random/boot_id")?;
    ensure!(boot_id == boot_id2, "the guest rebooted during the push");
    control_port_replugged(h, &m, &b)?;
    guest_agent_port_replugged(h, &m, &b)?;
    let b = apply_restarted_during_a_push(h, &m, b)?;
    let b = agent_stopped_during_a_push(h, &m, b)?;
    let b = sshd_exits_after_its_start(h, &m, b)?;
    let b = push_in_shape(h, &m, b, &PER_CONNECTION)?;
    let b = push_in_shape(h, &m, b, &SOCKET_ONLY)?;
    sshd_refuses_the_new_key(h, &m, b)
}

/// Whether a rule of `nft list` output accepts `port` for `proto`: a `PROTO dport` line
/// that names the port alone or in a set, and ends in `accept`.
fn opens(ruleset: &str, proto: &str, port: &str) -> bool {
    ruleset.lines().map(str::trim).any(|rule| {
        rule.strip_prefix(proto)
            .and_then(|r| r.trim_start().strip_prefix("dport"))
            .and_then(|r| r.strip_suffix("accept"))
            .is_some_and(|ports| {
                ports
                    .split(|c: char| !c.is_ascii_digit())
                    .any(|p| p == port)
            })
    })
}

/// The files of `machines/NAME` the scenario edits before its push.
const EDITED: [&str; 3] = ["hostname", "tcp_ports", "admin_authorized_keys"];

/// `seedctl status NAME --json`, which must exit with `exit` (0 in sync, 3 out of sync)
/// and call each of the [`EDITED`] files `state`; its report.
fn edited_files_are(
    h: &Harness,
    m: &Machine,
    socket: &Path,
    exit: i32,
    state: &str,
) -> Result<serde_json::Value> {
    let report = status_report(h, m, socket, exit)?;
    for f in EDITED {
        ensure!(
            report["files"][f] == state,
            "seedctl status calls {f} {}, not {state}: {report}",
            report["files"][f]
        );
    }
    Ok(report)
}

/// `seedctl status NAME --json`; `want` is the exit status it must end with (0 in sync,
/// 3 out of sync).
fn status_report(h: &Harness, m: &Machine, socket: &Path, want: i32) -> Result<serde_json::Value> {
    let out = seedctl_on(h, m, "status", 60, socket)?
        .arg("--json")
        .stdin(std::process::Stdio::null())
        .output()
        .context("cannot start seedctl status")?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.code() == Some(want),
        "seedctl status exited with {} (want {want}):\n{text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(text.trim())
        .with_context(|| format!("seedctl status --json printed:\n{text}"))
}

/// `seedctl VERB NAME --timeout SECS --socket SOCKET`, for more arguments to follow.
pub(super) fn seedctl_on(
    h: &Harness,
    m: &Machine,
    verb: &str,
    secs: u32,
    socket: &Path,
) -> Result<std::process::Command> {
    let mut c = m.seedctl(h.seedctl.as_ref())?;
    c.args([verb, &m.name, "--timeout", &secs.to_string(), "--socket"])
        .arg(socket);
    Ok(c)
}

/// The agent's CPU time, in clock ticks (1/100 s), over `secs` seconds.
fn agent_cpu_ticks(b: &Booted, secs: u64) -> Result<u64> {
    unit_counter_delta(
        b,
        AGENT_UNIT,
        secs,
        "awk '{print $14 + $15}' /proc/$p/stat",
        "CPU time",
    )
}

/// How often the agent's threads woke from a wait over `secs` seconds.
fn agent_wakeups(b: &Booted, secs: u64) -> Result<u64> {
    unit_counter_delta(b, AGENT_UNIT, secs, WAKEUPS, "count of wake-ups")
}

const AGENT_UNIT: &str = "nixseed-agent.service";

/// With no host on either port, the agent sleeps: a port with no host reads as hung up
/// at all times, and an agent that looks again every 100 ms (as qemu-ga does) wakes ten
/// times a second per port, and answers a new connection (Proxmox VE makes one per call)
/// only at its next look.
fn idle_without_hosts(m: &Machine, b: &Booted) -> Result<()> {
    // Past the second in which a host that just left may still complete a request.
    std::thread::sleep(Duration::from_secs(2));
    let woke = agent_wakeups(b, 3)?;
    ensure!(
        woke <= NO_HOST_WAKEUPS,
        "with no host on either port, the agent woke {woke} times in 3 s \
         (at most {NO_HOST_WAKEUPS}: it should sleep until a host comes)"
    );
    eprintln!(
        "vm-tests: {}: no host on either port: the agent woke {woke} times in 3 s",
        m.name
    );
    Ok(())
}

/// Calls on a new connection each, as Proxmox VE makes them, then a client that keeps
/// its connection, as libvirtd does, three times over: every call and every ping of the
/// session is answered. (With the port watched for a host during a session as well, the
/// watch could take a request's bytes off the device without the agent being woken for
/// them, and a session right after such calls stalled until its client gave up.)
fn calls_then_session(m: &Machine, b: &Booted) -> Result<()> {
    let sock = b.vm.config.qga_socket();
    let mut slowest = Duration::ZERO;
    for round in 1..=3u64 {
        let took = qga_client::calls(&sock, 20, round * 1000)
            .with_context(|| format!("round {round} of calls on a new connection each"))?;
        slowest = took.into_iter().fold(slowest, Duration::max);
        let mut q = qga_client::Qga::connect(&sock, Duration::from_secs(30))
            .with_context(|| format!("a kept connection after round {round} of calls"))?;
        for i in 1..=100 {
            q.ping().with_context(|| {
                format!("ping {i} of 100 on a kept connection after round {round} of calls")
            })?;
        }
    }
    eprintln!(
        "vm-tests: {}: 3 × (20 calls on a new connection each, then 100 pings on a kept one): \
         all answered, the slowest call in {:.1} ms",
        m.name,
        slowest.as_secs_f64() * 1e3
    );
    Ok(())
}

/// A boot stage run while the agent's `serve` holds the control port (virtio_console lets
/// one process open a port at a time) finds no seed over it and says why, instead of
/// failing on the busy port.
fn channel_source_yields_to_serve(b: &Booted) -> Result<()> {
    let out = b.ssh.run(
        "rm -rf /tmp/yield && mkdir -p /tmp/yield/s/var /tmp/yield/s/etc /tmp/yield/r && \
         nixseed-agent initrd --sysroot /tmp/yield/s --run /tmp/yield/r --sources channel \
         --channel-wait 2 2>&1; echo rc=$?",
    )?;
    ensure!(
        out.contains("is held by another process") && out.contains("rc=0"),
        "a boot stage asking the host over the port `serve` holds must find no seed and \
         exit 0:\n{out}"
    );
    Ok(())
}

/// The most wake-ups an agent with no host on either port may have in 3 s.
const NO_HOST_WAKEUPS: u64 = 3;

/// A host that stays connected to a port without sending, as libvirtd does with the guest
/// agent's, once each port had no host (both were opened at boot, before any host came):
/// the agent must sit idle, not spin, and still answer on the other port. (Before, a port
/// that had reported hang-up once was taken as always ready: with a host attached and
/// silent, the agent read it in a loop at full CPU and never served the other port.)
fn idle_hosts_attached(h: &Harness, m: &Machine, b: &Booted) -> Result<()> {
    let seedctl = |verb: &str, socket: &Path, tail: &[&str]| -> Result<()> {
        cmd::run(seedctl_on(h, m, verb, 30, socket)?.args(tail)).map(drop)
    };
    let qga = b.vm.config.qga_socket();
    let chan = b.vm.config.channel_socket();
    let mut ticks = Vec::new();
    for holds_agent in [true, false] {
        let (held, socket, other) = if holds_agent {
            ("guest agent", &qga, "control channel")
        } else {
            ("control channel", &chan, "guest agent")
        };
        let _idle = std::os::unix::net::UnixStream::connect(socket)
            .with_context(|| format!("connecting to the {held}'s socket"))?;
        std::thread::sleep(Duration::from_secs(1));
        let used = agent_cpu_ticks(b, 3)?;
        ensure!(
            used <= IDLE_TICKS,
            "with a silent host attached to the {held}'s port, the agent used {used} ticks \
             of CPU in 3 s (at most {IDLE_TICKS} when idle)"
        );
        if holds_agent {
            seedctl("status", &chan, &[])
        } else {
            seedctl("agent", &qga, &["ping"])
        }
        .with_context(|| format!("the {other} while a silent host holds the {held}'s port"))?;
        ticks.push(used);
    }
    eprintln!(
        "vm-tests: {}: a silent host on each port: the agent used {} and {} ticks of CPU in \
         3 s, and answered on the other port",
        m.name, ticks[0], ticks[1]
    );
    Ok(())
}

/// The most CPU an idle agent may use in 3 s, in clock ticks: 10%.
const IDLE_TICKS: u64 = 30;

/// The drop-in of [`sshd_exits_after_its_start`]: ssh.service becomes `Type=simple`, as
/// older NixOS releases' sshd.service is, so systemd calls it started as soon as its process runs. The
/// first start after it exits after a second, as an sshd that cannot load its host key
/// does; systemd restarts it (`Restart=on-failure`) and the next start runs sshd.
const SSHD_EXITS_ONCE: &str = "[Service]\nType=simple\nExecStart=\n\
ExecStart=/bin/sh -c 'if [ -e /run/sshd-exited-once ]; then exec /usr/sbin/sshd -D; fi; \
touch /run/sshd-exited-once; sleep 1; exit 1'\nRestart=on-failure\nRestartSec=2\n";

/// Where the step below holds a push between its bind and its reloads.
const PUSH_HELD_DROPIN: &str = "/run/systemd/system/nixseed-agent.service.d/90-hold-push.conf";

/// `systemctl restart nixseed-apply` while a push that rotates the host key is held
/// between binding its generation and restarting sshd ([`held_push`]). Stage 2 must wait
/// its 2 s, then leave the identity to the push and say so, and the push must be taken
/// whole: exit 0, sshd reloaded, the pushed key presented. (When stage 2 waited for the
/// push's lock instead, the push's sshd restart waited for stage 2's job, which sshd is
/// ordered after, until the push gave up on sshd and exited 4.)
fn apply_restarted_during_a_push(h: &Harness, m: &Machine, b: Booted) -> Result<Booted> {
    let left_before = agent_lines(&b)?.1;
    let (b, restart) = held_push(
        h,
        m,
        b,
        "systemctl restart nixseed-apply.service",
        "with nixseed-apply restarted during it",
    )?;
    let left = agent_lines(&b)?.1;
    ensure!(
        restart.trim().starts_with("rc=0") && left > left_before,
        "nixseed-apply restarted during the push did not leave the identity to it (`{}`; its journal line counted {left_before} before, {left} after)",
        restart.trim()
    );
    eprintln!(
        "vm-tests: {}: nixseed-apply restarted during a push left the identity to it ({} ms); the push was taken",
        m.name,
        restart.split_whitespace().nth(1).unwrap_or("?")
    );
    Ok(b)
}

/// `systemctl stop nixseed-agent` while a push that rotates the host key is held as in
/// [`held_push`]: the stop must wait for the push (the agent's journal says it waits, and
/// then that the push was answered) and end with the agent's own exit (`Result=success`,
/// not systemd's kill after `TimeoutStopSec=`), well before that timeout; the push must be
/// taken whole, its reply sent before the agent exits. (Before, systemd's SIGTERM ended
/// the push's process with the agent, and `seedctl push` got no reply.)
fn agent_stopped_during_a_push(h: &Harness, m: &Machine, b: Booted) -> Result<Booted> {
    let before = stop_lines(&b)?;
    let (b, stop) = held_push(
        h,
        m,
        b,
        "systemctl stop nixseed-agent.service && \
         test \"$(systemctl show -p Result --value nixseed-agent.service)\" = success",
        "with the agent stopped during it",
    )?;
    let after = stop_lines(&b)?;
    let ms: u64 = stop
        .split_whitespace()
        .nth(1)
        .and_then(|w| w.parse().ok())
        .unwrap_or(u64::MAX);
    ensure!(
        stop.trim().starts_with("rc=0") && after.0 > before.0 && after.1 > before.1 && ms < 30_000,
        "the agent stopped during a push did not wait for it and exit (`{}`, want rc=0 within 30 s; its journal lines saying it waits {} -> {}, that the push was answered {} -> {})",
        stop.trim(),
        before.0,
        after.0,
        before.1,
        after.1
    );
    eprintln!(
        "vm-tests: {}: the agent stopped during a push waited for it ({ms} ms); the push was taken",
        m.name
    );
    Ok(b)
}

/// The agent's journal lines of this boot that say a stop waits for a request, and that
/// the request was answered and the agent stops.
fn stop_lines(b: &Booted) -> Result<(u32, u32)> {
    let [waits, answered] = journal_counts(
        b,
        "-u nixseed-agent.service",
        [
            "stopping once the control-channel request in progress is answered",
            "the request in progress was answered; stopping",
        ],
    )?;
    Ok((waits, answered))
}

/// How many of this boot's journal lines (`filter`: journalctl's selection) hold each of
/// `texts` (no single quotes in them).
fn journal_counts<const N: usize>(b: &Booted, filter: &str, texts: [&str; N]) -> Result<[u32; N]> {
    let quoted: Vec<String> = texts.iter().map(|t| format!("'{t}'")).collect();
    let out = b.ssh.run(&format!(
        "for e in {}; do journalctl -b --no-pager -o cat {filter} | grep -c \"$e\" || true; done",
        quoted.join(" ")
    ))?;
    let n: Vec<u32> = out
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    n.try_into()
        .map_err(|_| anyhow::anyhow!("unexpected count of the agent's journal lines: {out}"))
}

/// A push that rotates the host key, held between binding its generation and restarting
/// sshd for 6 s by the test-only delay point `before-reload` (set for the guest agent's
/// request helpers through a runtime drop-in), and `during` run in the guest while it is
/// held. The push must be taken whole (`case` names it in the error). Whatever happens,
/// the drop-in is removed and the agent restarted without it. Returns the machine with
/// its ssh pinned to the pushed key, and what `during` printed (`rc=STATUS MS`).
fn held_push(
    h: &Harness,
    m: &Machine,
    mut b: Booted,
    during: &str,
    case: &str,
) -> Result<(Booted, String)> {
    let held = push_held_while(h, m, &b, during);
    let restore = format!(
        "rm -f {PUSH_HELD_DROPIN} && systemctl daemon-reload && systemctl restart nixseed-agent.service"
    );
    // Over the kept connection, which outlives sshd's restart; else a new one that takes
    // the pushed key.
    let restored = b.ssh.run(&restore).or_else(|_| {
        Ssh::pinned(b.ssh.port, h.key.clone(), &m.host_key_pub()?, &m.state)?.run(&restore)
    });
    let (out, said) = held?;
    pushed_as_expected(m, case, true, &out)?;
    restored.context("removing the drop-in that held the push")?;
    let rotated = m.host_key_pub()?;
    ssh::wait_for_host_key(b.ssh.port, Some(&rotated), Duration::from_secs(60), || {
        Ok(())
    })
    .with_context(|| format!("sshd does not present the key pushed {case}"))?;
    b.ssh = Ssh::pinned(b.ssh.port, h.key.clone(), &rotated, &m.state)?;
    Ok((b, said))
}

/// The agent's journal lines of this boot that say a push reached the delay point
/// `before-reload`, and that stage 2 left the identity to a change in progress.
fn agent_lines(b: &Booted) -> Result<(u32, u32)> {
    let [held, left] = journal_counts(
        b,
        "-t nixseed-agent",
        [
            "test delay point reached: before-reload",
            "the identity has been changing for",
        ],
    )?;
    Ok((held, left))
}

/// The part of [`held_push`] that its restore follows: the drop-in, the push held at its
/// delay point, and `during` then. Returns what the push printed and what `during`
/// printed (`rc=STATUS MS`).
fn push_held_while(
    h: &Harness,
    m: &Machine,
    b: &Booted,
    during: &str,
) -> Result<(std::process::Output, String)> {
    b.ssh.run(&format!(
        "mkdir -p /run/systemd/system/nixseed-agent.service.d && \
         printf '[Service]\\nEnvironment=NIXSEED_TEST_DELAY=before-reload:6000\\n' > {PUSH_HELD_DROPIN} && \
         systemctl daemon-reload && systemctl restart nixseed-agent.service"
    ))?;
    let held_before = agent_lines(b)?.0;
    rotate_host_key(m)?;
    let (said, complained) = (m.state.join("held-push.out"), m.state.join("held-push.err"));
    let file = |p: &Path| fs::File::create(p).with_context(|| format!("creating {}", p.display()));
    let mut push = cmd::Reaped(
        seedctl_on(h, m, "push", 60, &b.vm.config.channel_socket())?
            .stdin(std::process::Stdio::null())
            .stdout(file(&said)?)
            .stderr(file(&complained)?)
            .spawn()
            .context("running seedctl push")?,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while agent_lines(b)?.0 == held_before {
        ensure!(
            Instant::now() < deadline,
            "the push did not reach its delay point within 60 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ran = b.ssh.run(&format!(
        "s=$(date +%s%N); {during}; echo \"rc=$? $(( ($(date +%s%N) - s) / 1000000 ))\""
    ))?;
    let status = push.0.wait().context("waiting for seedctl push")?;
    let out = std::process::Output {
        status,
        stdout: fs::read(&said).unwrap_or_default(),
        stderr: fs::read(&complained).unwrap_or_default(),
    };
    Ok((out, ran))
}

/// A push that rotates the host key while sshd is a service systemd calls started at
/// fork, and its first start exits before listening: the restart job ends `done`, yet
/// `seedctl push` must say that sshd's main process exited, and exit 4. sshd then comes
/// back (systemd's restart) with the pushed key, and a further push, with sshd healthy
/// and still started at fork, is taken (exit 0, sshd reloaded) once sshd listens. The
/// drop-in is removed and the returned machine's ssh pins the last key.
fn sshd_exits_after_its_start(h: &Harness, m: &Machine, mut b: Booted) -> Result<Booted> {
    b.ssh.run(&format!(
        "mkdir -p /run/systemd/system/ssh.service.d && \
         cat > /run/systemd/system/ssh.service.d/80-exits-once.conf <<'UNIT' && \
         systemctl daemon-reload\n{SSHD_EXITS_ONCE}UNIT\n"
    ))?;
    let said = push_rotated_key(h, m, &b, "with sshd exiting after its start")?;
    let failed = line_starting(&said, "FAILED");
    ensure!(
        failed.contains("sshd: ssh.service's main process exited"),
        "seedctl push does not say that sshd exited after systemd started it:\n{said}"
    );
    let rotated = m.host_key_pub()?;
    ssh::wait_for_host_key(b.ssh.port, Some(&rotated), Duration::from_secs(120), || {
        Ok(())
    })
    .context("sshd did not come back with the pushed key after systemd restarted it")?;
    // The drop-in's next starts run sshd: a push now is taken once sshd listens.
    push_taken_and_presented(h, m, &mut b, "with sshd started at fork and healthy")?;
    // Taken because sshd was seen listening, not by the watch running out.
    // (The first count shows the filter finds the agent's lines at all.)
    let counts = b.ssh.run(
        "j=$(journalctl -b --no-pager -o cat -t nixseed-agent); \
         printf '%s\\n' \"$j\" | grep -c . ; printf '%s\\n' \"$j\" | grep -c 'was not seen listening' || true",
    )?;
    let counts: Vec<&str> = counts.split_whitespace().collect();
    ensure!(
        counts.len() == 2 && counts[0] != "0" && counts[1] == "0",
        "the agent did not see the healthy sshd listen (its watch ran out): lines of \
         nixseed-agent in the journal, and of them warnings: {counts:?}"
    );
    b.ssh.run(
        "rm /run/systemd/system/ssh.service.d/80-exits-once.conf && systemctl daemon-reload && \
         systemctl restart ssh.service",
    )?;
    b.ssh
        .login("true")
        .context("no login to sshd restarted as the image ships it")?;
    Ok(b)
}

/// The control channel's port unplugged from the running VM, with half a request in
/// flight, and plugged again (QMP `device_del`/`device_add`, what `virsh
/// detach-device`/`attach-device --live` ask of QEMU): the agent says the port went away,
/// reopens it when it is back, and the channel answers `seedctl status` again. Then the agent is restarted while the port is out, as
/// in a VM started without the channel: it says it waits for the port, and once the port
/// is plugged it serves it (`seedctl status` exits 0; the journal says it appeared).
fn control_port_replugged(h: &Harness, m: &Machine, b: &Booted) -> Result<()> {
    let unplug = || b.vm.unplug(&crate::qemu::CHANNEL);
    let plug = || b.vm.plug(&crate::qemu::CHANNEL);
    let status = |when: &str| -> Result<()> {
        cmd::run(&mut seedctl_on(
            h,
            m,
            "status",
            60,
            &b.vm.config.channel_socket(),
        )?)
        .with_context(|| format!("seedctl status {when}"))
        .map(drop)
    };
    // The agent's journal (all of this boot, or the current run of its unit) must have a
    // line containing `text` within 30 s.
    let logs = |this_run: bool, text: &str| -> Result<()> {
        let journal = if this_run {
            "journalctl -b -o cat _SYSTEMD_INVOCATION_ID=$(systemctl show -p InvocationID \
             --value nixseed-agent.service)"
        } else {
            "journalctl -b -o cat -t nixseed-agent"
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while b
            .ssh
            .run(&format!("{journal} | grep -cF -- '{text}' || true"))?
            .trim()
            == "0"
        {
            ensure!(
                Instant::now() < deadline,
                "no line with '{text}' from the agent{} within 30 s",
                if this_run { " (its current run)" } else { "" }
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        Ok(())
    };

    // Half a request is in flight when the port goes: the agent must not keep it for the
    // next client (the frame's length says 1000 bytes; 2 came).
    let mut half = std::os::unix::net::UnixStream::connect(b.vm.config.channel_socket())
        .context("connecting to the control channel's socket")?;
    std::io::Write::write_all(&mut half, &[0, 0, 3, 232, b'{', b'"'])
        .context("writing half a request to the control channel")?;
    std::thread::sleep(Duration::from_secs(1));
    unplug()?;
    drop(half);
    logs(false, "org.nixseed.channel.0 went away")?;
    plug()?;
    status("after the control port was plugged again")?;
    logs(false, "org.nixseed.channel.0 is back after")?;

    unplug()?;
    b.ssh.run(
        "for i in $(seq 60); do [ -e /dev/virtio-ports/org.nixseed.channel.0 ] || exit 0; \
         sleep 0.5; done; echo 'the unplugged port is still in /dev' >&2; exit 1",
    )?;
    b.ssh.run("systemctl restart nixseed-agent.service")?;
    logs(true, "org.nixseed.channel.0 is not there yet")?;
    plug()?;
    status("after the control port was plugged into an agent started without it")?;
    logs(true, "org.nixseed.channel.0 appeared")?;
    eprintln!(
        "vm-tests: {}: control port unplugged and plugged again: reopened; the agent \
         restarted without it served it once plugged",
        m.name
    );
    Ok(())
}

/// The guest agent's port taken out of the running VM and put back (QMP `device_del` and
/// `device_add`, what `virsh detach-device` and `attach-device --live` ask of QEMU), with
/// the agent kept running throughout (its main PID unchanged):
/// - once with `/` and `/var` frozen through the guest agent (a backup's freeze, then the
///   channel detached): with its host gone the agent thaws them, the control channel
///   answers `seedctl status` while the port is out, and the guest agent answers once
///   the port is back;
/// - 5 times at once, with a runtime drop-in that adds 2 s to the agent's stop (as on a
///   loaded host): a unit stopped when its port goes (`BindsTo=` the port's device) is
///   still stopping when the port is back, and systemd then drops the start udev asks
///   for. The agent is not stopped now; the drop-in keeps that from coming back unseen.
///   The guest agent must answer within 30 s of each plug;
/// - last, the agent restarted while the port is out ([`restarted_while_out`]).
fn guest_agent_port_replugged(h: &Harness, m: &Machine, b: &Booted) -> Result<()> {
    const ROUNDS: usize = 5;
    let pid = || {
        b.ssh
            .run(&format!("systemctl show -p MainPID --value {AGENT_UNIT}"))
    };
    let before = pid()?;
    detached_while_frozen(h, m, b)?;
    let took = replug_with_a_slow_stop(b, ROUNDS)?;
    let after = pid()?;
    ensure!(
        after == before,
        "nixseed-agent.service's main PID went from {} to {}: the agent was stopped with its \
         port rather than reopening it",
        before.trim(),
        after.trim()
    );
    let answered = restarted_while_out(b)?;
    eprintln!(
        "vm-tests: {}: the guest agent's port detached with / and /var frozen: thawed, the \
         control channel served meanwhile; then unplugged and plugged again at once, \
         {ROUNDS} times, with a slow stop: answered each time, {} s after the plug, by the \
         same process; restarted while the port was out, the agent waited {OUT_FOR} s for \
         it and answered {answered:.1} s after the plug",
        m.name,
        took.iter()
            .map(|s| format!("{s:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}

/// How long [`restarted_while_out`] leaves the port out: longer than systemd's default
/// start limit (5 starts within 10 s), which an agent failing at its start for want of
/// the port, restarted every second, would hit.
const OUT_FOR: u64 = 12;

/// `nixseed-agent.service` restarted while the guest agent's port is unplugged: the
/// restart must succeed and the unit stay active for [`OUT_FOR`] s, the journal must say
/// the agent waits for the port; then the port is plugged, and the guest agent must
/// answer (how long after the plug it did is returned). The port is plugged again
/// whatever fails.
fn restarted_while_out(b: &Booted) -> Result<f64> {
    let run = || -> Result<()> {
        unplug_guest_agent_port(b)?;
        b.ssh.run(QGA_NODE_GONE)?;
        // The same run of the agent all along: one restarted after failing would also
        // end up active, and say the same in its journal.
        b.ssh.run(&format!(
            "systemctl restart nixseed-agent.service || \
             {{ echo 'the restart of nixseed-agent.service with the port out failed' >&2; \
             exit 1; }}; pid=$(systemctl show -p MainPID --value nixseed-agent.service); \
             sleep {OUT_FOR}; state=$(systemctl is-active nixseed-agent.service); \
             now=$(systemctl show -p MainPID --value nixseed-agent.service); \
             [ \"$state\" = active ] && [ \"$now\" = \"$pid\" ] || {{ echo \"nixseed-agent.service \
             is $state with main PID $now, $pid at its restart with the port out {OUT_FOR} s \
             before\" >&2; exit 1; }}; \
             journalctl -b -o cat _SYSTEMD_INVOCATION_ID=$(systemctl show -p InvocationID \
             --value nixseed-agent.service) | grep -F 'org.qemu.guest_agent.0 is not there: \
             serving it once it is back'"
        ))?;
        plug_guest_agent_port(b, "after the restart with the port out")
    };
    run().inspect_err(|_| {
        let _ = plug_guest_agent_port(b, "to restore the VM");
    })?;
    answers_after_the_plug(b, "after the restart with the port out")
}

/// Waits, in the guest, for the unplugged guest agent port's node to be gone from
/// `/dev/virtio-ports` (30 s at most; then it fails).
const QGA_NODE_GONE: &str = "for i in $(seq 60); do \
    [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ] || exit 0; sleep 0.5; done; \
    echo 'the unplugged guest agent port is still in /dev/virtio-ports' >&2; exit 1";

/// `fsfreeze -u` thaws a frozen filesystem and fails with EINVAL on one that is not
/// frozen, so this look cannot block on a frozen filesystem and leaves the guest usable
/// whatever it finds: it prints `frozen M` for each of `/` and `/var` that was, and
/// `error M: …` where fsfreeze failed otherwise.
const FROZEN_PROBE: &str = "for m in / /var; do \
    if out=$(fsfreeze -u $m 2>&1); then echo \"frozen $m\"; \
    else case \"$out\" in *'Invalid argument'*) ;; *) echo \"error $m: $out\" ;; esac; fi; \
    done";

/// `/` and `/var` frozen through the guest agent, then its port unplugged: the agent
/// must say it thawed them, neither may be frozen, and the control channel must answer
/// while the port is out; plugged again, the guest agent must answer. Whatever fails,
/// the filesystems are thawed and the port is plugged again.
fn detached_while_frozen(h: &Harness, m: &Machine, b: &Booted) -> Result<()> {
    let run = || -> Result<()> {
        let mut q = qga_client::Qga::connect(&b.vm.config.qga_socket(), Duration::from_secs(30))?;
        let froze = q.execute(&serde_json::json!({
            "execute": "guest-fsfreeze-freeze-list",
            "arguments": {"mountpoints": ["/", "/var"]}
        }))?;
        ensure!(
            froze.get("return").and_then(|n| n.as_i64()) == Some(2),
            "guest-fsfreeze-freeze-list of / and /var did not freeze both: {froze}"
        );
        drop(q);
        unplug_guest_agent_port(b)?;
        // Read-only waits: the journal line comes only once /var is thawed.
        let thawed = b.ssh.run(
            "for i in $(seq 60); do journalctl -b -o cat -t nixseed-agent \
             | grep -F \"thawed 2 filesystem(s) as the guest agent's port went away\" \
             && exit 0; sleep 0.5; done; \
             echo 'no thaw line from the agent within 30 s' >&2; exit 1",
        );
        let probe = b.ssh.run(FROZEN_PROBE)?;
        ensure!(
            probe.trim().is_empty(),
            "with the guest agent's port detached, / and /var were not left thawed: {}",
            probe.trim().lines().collect::<Vec<_>>().join("; ")
        );
        thawed.context("the agent did not say it thawed / and /var when its port went")?;
        b.ssh.run(QGA_NODE_GONE)?;
        cmd::run(&mut seedctl_on(
            h,
            m,
            "status",
            60,
            &b.vm.config.channel_socket(),
        )?)
        .context("seedctl status over the control channel while the guest agent's port is out")?;
        plug_guest_agent_port(b, "after the frozen detach")?;
        answers_after_the_plug(b, "after the frozen detach").map(drop)
    };
    run().inspect_err(|_| {
        let _ = b.ssh.run(FROZEN_PROBE);
        let _ = plug_guest_agent_port(b, "to restore the VM");
        // The agent's own freeze state, should it still think the filesystems frozen.
        let _ = qga_client::Qga::connect(&b.vm.config.qga_socket(), Duration::from_secs(10))
            .and_then(|mut q| q.execute(&serde_json::json!({"execute": "guest-fsfreeze-thaw"})));
    })
}

/// `rounds` × the guest agent's port unplugged and plugged again at once, with the
/// agent's stop made 2 s slower by a runtime drop-in (removed afterwards whatever
/// failed, and the port plugged again); how long after each plug the agent answered.
fn replug_with_a_slow_stop(b: &Booted, rounds: usize) -> Result<Vec<f64>> {
    const SLOW_STOP: &str = "/run/systemd/system/nixseed-agent.service.d/80-slow-stop.conf";
    let remove = format!("rm -f {SLOW_STOP} && systemctl daemon-reload");
    let set = b.ssh.run(&format!(
        "mkdir -p \"$(dirname {SLOW_STOP})\" && \
         printf '[Service]\\nExecStopPost=/bin/sleep 2\\n' > {SLOW_STOP} && \
         systemctl daemon-reload"
    ));
    let took = set.and_then(|_| {
        (1..=rounds)
            .map(|round| {
                let what = format!("round {round} of {rounds}");
                unplug_guest_agent_port(b).with_context(|| what.clone())?;
                plug_guest_agent_port(b, &what)?;
                answers_after_the_plug(b, &what)
            })
            .collect::<Result<Vec<f64>>>()
    });
    if took.is_err() {
        let _ = plug_guest_agent_port(b, "to restore the VM");
    }
    let removed = b
        .ssh
        .run(&remove)
        .context("removing the slow stop's drop-in");
    match (took, removed) {
        (Ok(took), Ok(_)) => Ok(took),
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
        (Err(e), Err(c)) => Err(e.context(format!("and then: {c:#}"))),
    }
}

fn unplug_guest_agent_port(b: &Booted) -> Result<()> {
    b.vm.unplug(&crate::qemu::QGA)
}

/// Plugs the guest agent's port again. QEMU finishes an unplug on its own time (libvirt
/// waits for `DEVICE_DELETED`): until then the port's chardev is in use, and the plug is
/// tried again every 20 ms, for 10 s.
fn plug_guest_agent_port(b: &Booted, what: &str) -> Result<()> {
    let unplugged = Instant::now();
    while let Err(e) = b.vm.plug(&crate::qemu::QGA) {
        ensure!(
            unplugged.elapsed() < Duration::from_secs(10),
            "plugging the guest agent's port again ({what}): {e:#}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The guest agent answers `guest-sync-delimited`, then `guest-ping`, within 30 s of
/// its port's plug; how long that took. Otherwise the error has the agent's journal.
fn answers_after_the_plug(b: &Booted, what: &str) -> Result<f64> {
    let t = Instant::now();
    let answered = qga_client::Qga::connect(&b.vm.config.qga_socket(), Duration::from_secs(30))
        .and_then(|mut q| q.ping());
    if let Err(e) = answered {
        let journal = b
            .ssh
            .run(
                "journalctl -b -o short-monotonic --no-pager -n 15 -u nixseed-agent.service; \
                 journalctl -b -o short-monotonic --no-pager _PID=1 | grep -F nixseed-agent \
                 | tail -n 5",
            )
            .unwrap_or_else(|j| format!("(the guest's journal could not be read: {j:#})"));
        bail!(
            "the guest agent did not answer after its port was unplugged and plugged again \
             ({what}): {e:#}\nthe guest's journal:\n{journal}"
        );
    }
    Ok(t.elapsed().as_secs_f64())
}

/// Runtime units that make the test image start sshd per connection, as NixOS's
/// `services.openssh.startWhenNeeded` and older Debian releases do: an `ssh.socket`
/// (`Accept=yes`; it overrides Debian's own, which starts ssh.service) starts `sshd -i`
/// from `ssh@.service` for each connection. It declares `Conflicts=ssh.service`, as the
/// two cannot hold port 22 together.
const SSHD_PER_CONNECTION: &str = "mkdir -p /run/systemd/system && cd /run/systemd/system && \
printf '[Unit]\\nConflicts=ssh.service\\n[Socket]\\nListenStream=22\\nAccept=yes\\n' > ssh.socket && \
printf '[Service]\\nExecStart=-/usr/sbin/sshd -i\\nStandardInput=socket\\n\
RuntimeDirectory=sshd\\nRuntimeDirectoryPreserve=yes\\n' > ssh@.service && \
systemctl daemon-reload && systemctl stop ssh.service && systemctl start ssh.socket";

/// sshd started per connection ([`SSHD_PER_CONNECTION`]): a push that rotates the host
/// key is taken without a start of ssh.service, which would stop the socket.
const PER_CONNECTION: SshdShape = SshdShape {
    case: "with sshd started per connection",
    setup: SSHD_PER_CONNECTION,
    probe: "systemctl is-active ssh.socket ssh.service || true",
    expected: &["active", "inactive"],
    what: "ssh.socket and ssh.service",
    restore: "systemctl stop ssh.socket && rm /run/systemd/system/ssh.socket \
              /run/systemd/system/ssh@.service && systemctl daemon-reload && \
              systemctl start ssh.service",
};

/// The shape of NixOS with `services.openssh.startWhenNeeded`: no sshd service unit at
/// all, only `sshd.socket` (`Accept=yes`) and `sshd@.service`. The image's ssh units
/// cannot be deleted from the read-only root, so its unit directory and `/etc/init.d` are
/// shown as copies without them (bind mounts from /run; with the init script left,
/// systemd's SysV generator would make an ssh.service of its own), and Debian's
/// `sshd.service` alias in /etc is left pointing at nothing.
const SSHD_SOCKET_ONLY: &str = "systemctl stop ssh.service ssh.socket && \
mkdir -p /run/nixseed-test/units && cp -a /usr/lib/systemd/system/. /run/nixseed-test/units/ && \
rm -f /run/nixseed-test/units/ssh.service /run/nixseed-test/units/ssh.socket \
/run/nixseed-test/units/ssh@.service && \
mount --bind /run/nixseed-test/units /usr/lib/systemd/system && \
mkdir -p /run/nixseed-test/init.d && cp -a /etc/init.d/. /run/nixseed-test/init.d/ && \
rm -f /run/nixseed-test/init.d/ssh && mount --bind /run/nixseed-test/init.d /etc/init.d && \
mkdir -p /run/systemd/system && cd /run/systemd/system && \
printf '[Socket]\\nListenStream=22\\nAccept=yes\\n' > sshd.socket && \
printf '[Service]\\nExecStart=-/usr/sbin/sshd -i\\nStandardInput=socket\\n\
RuntimeDirectory=sshd\\nRuntimeDirectoryPreserve=yes\\n' > sshd@.service && \
systemctl daemon-reload && systemctl start sshd.socket";

/// No sshd service unit at all, sshd started per connection by `sshd.socket`
/// ([`SSHD_SOCKET_ONLY`]): a push that rotates the host key is taken, as the socket's next
/// connection reads the new key. The restore tries every step, and starts sshd last
/// whatever failed before, so that a failed restore still leaves a guest to look at.
const SOCKET_ONLY: SshdShape = SshdShape {
    case: "with only sshd.socket",
    setup: SSHD_SOCKET_ONLY,
    probe: "systemctl show -P LoadState ssh.service sshd.service; \
            systemctl is-active sshd.socket || true",
    expected: &["not-found", "not-found", "active"],
    what: "ssh.service, sshd.service and sshd.socket",
    restore: "st=0; systemctl stop sshd.socket || st=1; \
              rm /run/systemd/system/sshd.socket /run/systemd/system/sshd@.service || st=1; \
              umount /usr/lib/systemd/system /etc/init.d || st=1; \
              rm -r /run/nixseed-test || st=1; \
              systemctl daemon-reload || st=1; systemctl start ssh.service || st=1; exit $st",
};

/// A way of running sshd for [`push_in_shape`]: the commands that set it up and put the
/// image's ssh.service back, and what `probe` prints while it holds (`what` names the
/// units it reads, for errors).
struct SshdShape {
    case: &'static str,
    setup: &'static str,
    probe: &'static str,
    expected: &'static [&'static str],
    what: &'static str,
    restore: &'static str,
}

/// Sets `shape` up and checks it holds, pushes a rotated host key that must be taken (exit
/// 0, sshd listed) and presented by the next connection, checks the push left the shape as
/// it was, and restores ssh.service. The returned machine's ssh pins the last key.
fn push_in_shape(h: &Harness, m: &Machine, mut b: Booted, shape: &SshdShape) -> Result<Booted> {
    let expected = shape.expected.join(" ");
    let probe = |b: &Booted| -> Result<String> {
        Ok(b.ssh
            .run(shape.probe)?
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" "))
    };
    b.ssh.run(shape.setup)?;
    b.ssh
        .login("true")
        .with_context(|| format!("no login to sshd run {}", shape.case))?;
    let before = probe(&b)?;
    ensure!(
        before == expected,
        "{} are not '{expected}' after the switch: '{before}'",
        shape.what
    );
    push_taken_and_presented(h, m, &mut b, shape.case)?;
    let after = probe(&b)?;
    ensure!(
        after == expected,
        "the push changed how sshd runs: {} are '{after}', not '{expected}'",
        shape.what
    );
    b.ssh.run(shape.restore)?;
    b.ssh
        .login("true")
        .with_context(|| format!("no login to sshd restored after the push {}", shape.case))?;
    Ok(b)
}

/// Pushes that rotate the host key while sshd cannot start (here a drop-in whose
/// `ExecStartPre` fails, as a broken sshd configuration would, and which systemd does
/// not retry): the identity is applied,
/// and `seedctl push` says that sshd did not take it and exits 4, rather than reporting
/// sshd reloaded because systemd accepted the restart; a second push, with sshd already
/// down, says it is down. The guest is then shut down through the agent.
fn sshd_refuses_the_new_key(h: &Harness, m: &Machine, b: Booted) -> Result<()> {
    b.ssh.run(
        "mkdir -p /run/systemd/system/ssh.service.d && \
         printf '[Service]\nExecStartPre=/bin/false\nRestart=no\n' > /run/systemd/system/ssh.service.d/90-broken.conf && \
         systemctl daemon-reload",
    )?;
    // The restart job itself fails.
    let said = push_rotated_key(h, m, &b, "with sshd broken")?;
    let failed = line_starting(&said, "FAILED");
    ensure!(
        failed.contains("sshd") && failed.contains("ssh.service") && failed.contains("'failed'"),
        "seedctl push does not name sshd's failed restart:\n{said}"
    );
    // sshd is now failed (`Restart=no` in the drop-in, so systemd does not retry it): a
    // try-restart does nothing and its job ends `done`, yet sshd does not serve the new
    // key, and the push must say so.
    let said = push_rotated_key(h, m, &b, "with sshd down")?;
    let failed = line_starting(&said, "FAILED");
    ensure!(
        failed.contains("sshd: ssh.service is failed after TryRestartUnit"),
        "seedctl push does not say that sshd is down after the try-restart:\n{said}"
    );
    let shut = b.shutdown_via_agent(h, m)?;
    ensure!(
        shut.qemu.success(),
        "QEMU exited {} after the agent's shutdown",
        shut.qemu
    );
    Ok(())
}

/// The first line of seedctl's report that starts with `label`, or "".
fn line_starting<'a>(said: &'a str, label: &str) -> &'a str {
    said.lines()
        .find(|l| l.trim_start().starts_with(label))
        .unwrap_or_default()
}

/// A rotated host key pushed while sshd can take it: the push is taken, sshd presents
/// the key within 60 s, and `b`'s ssh pins it from then on.
fn push_taken_and_presented(h: &Harness, m: &Machine, b: &mut Booted, case: &str) -> Result<()> {
    push_rotated_key_expecting(h, m, b, case, true)?;
    let rotated = m.host_key_pub()?;
    ssh::wait_for_host_key(b.ssh.port, Some(&rotated), Duration::from_secs(60), || {
        Ok(())
    })
    .with_context(|| format!("sshd does not present the key pushed {case}"))?;
    b.ssh = Ssh::pinned(b.ssh.port, h.key.clone(), &rotated, &m.state)?;
    Ok(())
}

/// Replaces the host key in machines/NAME and pushes it while sshd cannot take it:
/// seedctl must exit 4 and not list sshd as reloaded. Returns what it printed.
fn push_rotated_key(h: &Harness, m: &Machine, b: &Booted, case: &str) -> Result<String> {
    push_rotated_key_expecting(h, m, b, case, false)
}

/// Replaces the host key in machines/NAME and pushes it. `taken`: sshd can take it, so
/// seedctl must exit 0 and list sshd as reloaded; otherwise exit 4 without sshd listed.
/// Returns what seedctl printed.
fn push_rotated_key_expecting(
    h: &Harness,
    m: &Machine,
    b: &Booted,
    case: &str,
    taken: bool,
) -> Result<String> {
    rotate_host_key(m)?;
    let out = seedctl_on(h, m, "push", 60, &b.vm.config.channel_socket())?
        .stdin(std::process::Stdio::null())
        .output()
        .context("running seedctl push")?;
    pushed_as_expected(m, case, taken, &out)
}

/// A new host key in machines/NAME.
fn rotate_host_key(m: &Machine) -> Result<()> {
    let fresh = m.state.join("rotated_host_key");
    let _ = fs::remove_file(&fresh);
    let _ = fs::remove_file(fresh.with_extension("pub"));
    cmd::run(
        std::process::Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", "", "-f"])
            .arg(&fresh),
    )?;
    fs::copy(&fresh, m.dir.join("ssh_host_ed25519_key")).context("rotating the host key")?;
    fs::copy(
        fresh.with_extension("pub"),
        m.dir.join("ssh_host_ed25519_key.pub"),
    )
    .context("rotating the host key")?;
    Ok(())
}

/// What a push of a rotated key printed and exited with: 0 with sshd reloaded when
/// `taken`, 4 without sshd reloaded otherwise. Returns what it printed.
fn pushed_as_expected(
    m: &Machine,
    case: &str,
    taken: bool,
    out: &std::process::Output,
) -> Result<String> {
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("vm-tests: {}: seedctl push {case}: {}", m.name, said.trim());
    let code = if taken { 0 } else { 4 };
    ensure!(
        out.status.code() == Some(code),
        "seedctl push {case} exited {}, not {code}:\n{said}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        line_starting(&said, "reloaded").contains("sshd") == taken,
        "seedctl push {case} {} sshd reloaded:\n{said}",
        if taken { "does not report" } else { "reports" }
    );
    Ok(said)
}

/// sshd turns `ssh`'s key away (`what` names the key for the error).
fn refused(ssh: &Ssh, what: &str) -> Result<()> {
    let out = ssh.login_output("true")?;
    let said = String::from_utf8_lossy(&out.stderr);
    ensure!(
        !out.status.success() && said.contains("Permission denied"),
        "{what} still logs in, or ssh failed otherwise: {}",
        said.trim()
    );
    Ok(())
}

/// A key added through the guest agent (what `virsh set-user-sshkeys` sends) logs in, and
/// no longer after it is removed. Each change is a generation of its own that leaves the
/// `/etc` binds where they are; after two of them the generation they show (the pushed
/// one, named by the applied marker) must still be whole, not pruned under the binds, and
/// a rerun of `nixseed-apply` verifies instead of re-applying.
fn agent_key_changes(h: &Harness, m: &Machine, b: &Booted) -> Result<()> {
    // The generation the revocation push made, which /etc must still show afterwards.
    let pushed_generation = b
        .ssh
        .run("readlink /var/identity/current")?
        .trim()
        .to_owned();
    let third = ClientKey::ensure(&m.state.join("agent-added"))?;
    let line = third.public_line()?;
    let request = |execute: &str| {
        serde_json::json!({
            "execute": execute,
            "arguments": {"username": "root", "keys": [line.trim()]},
        })
        .to_string()
    };
    let agent = |json: String| {
        cmd::run(seedctl_on(h, m, "agent", 60, &b.vm.config.qga_socket())?.args(["cmd", &json]))
    };
    let with_third = Ssh::fresh_only(b.ssh.port, third, b.ssh.known_hosts.clone());
    agent(request("guest-ssh-add-authorized-keys"))?;
    let who = with_third.run("id -un")?;
    ensure!(
        who.trim() == "root",
        "the key added through the guest agent logs in as '{}'",
        who.trim()
    );
    agent(request("guest-ssh-remove-authorized-keys"))?;
    refused(&with_third, "the key removed through the guest agent")?;
    // Rerunning stage 2 in this boot verifies rather than re-applying (or calling
    // machine-id late): /etc shows the same files as the current generation.
    let shown = b.ssh.run(
        "systemctl restart nixseed-apply.service; \
         readlink /var/identity/current; head -n 1 /run/nixseed/applied; \
         findmnt -rno SOURCE /etc/hostname; findmnt -rno SOURCE /etc/machine-id; \
         cat /etc/hostname; cat /var/identity/current/hostname; \
         journalctl -b --no-pager -o cat -u nixseed-apply.service | grep -E 'already applied|did not apply' | tail -n 1",
    )?;
    let lines: Vec<&str> = shown.lines().map(str::trim).collect();
    let [
        current,
        applied,
        hostname,
        machine_id,
        etc_name,
        current_name,
        rerun,
    ] = lines[..]
    else {
        bail!("unexpected answer about the binds after the key changes:\n{shown}");
    };
    let pushed = format!("gen-{applied}");
    ensure!(
        pushed == pushed_generation,
        "/run/nixseed/applied names {pushed} after the guest-agent key changes, not {pushed_generation}, the generation the push made"
    );
    ensure!(
        current != pushed,
        "after two guest-agent key changes `current` is still {current}"
    );
    for (file, source) in [("hostname", hostname), ("machine-id", machine_id)] {
        ensure!(
            source.contains(&format!("/identity/{pushed}/{file}")) && !source.contains("deleted"),
            "/etc/{file} is bound from {source}; /run/nixseed/applied names {pushed}, which must still be whole"
        );
    }
    ensure!(
        etc_name == current_name,
        "/etc/hostname says {etc_name}, the current generation {current_name}"
    );
    ensure!(
        rerun.contains(&format!(
            "already applied generation {}",
            current.trim_start_matches("gen-")
        )),
        "nixseed-apply rerun after the key changes says: {rerun}"
    );
    eprintln!(
        "vm-tests: {}: a key added and removed through the guest agent ({current}); /etc still shows {pushed}, kept whole; nixseed-apply verifies",
        m.name
    );
    Ok(())
}

/// How long push-first waits after the login prompt for sshd to reach its start limit.
const START_LIMIT_WAIT: Duration = Duration::from_secs(20);

/// Waits until the guest agent answers `guest-ping` on `vm`'s qemu-ga port, within
/// [`ssh_timeout`]; `when` says after what, for the error.
fn wait_for_agent(h: &Harness, m: &Machine, vm: &mut Vm, when: &str) -> Result<()> {
    let qga = vm.config.qga_socket();
    let deadline = Instant::now() + ssh_timeout();
    loop {
        vm.ensure_running()?;
        let ping = seedctl_on(h, m, "agent", 5, &qga)?
            .arg("ping")
            .output()
            .context("running seedctl agent ping")?;
        if ping.status.success() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "the guest agent did not answer within {} s {when}: {}\n{}",
                ssh_timeout().as_secs(),
                String::from_utf8_lossy(&ping.stderr).trim(),
                vm.diagnostics()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// The test-only kernel flag (agent/src/crashpoint.rs) with which push-first's push
/// (`nixseed-agent request`, run by the guest agent) exits once, after the first push
/// stored and bound the identity and recorded the reloads it owes, before it tells
/// sshd: as a process killed there would.
const EXIT_BEFORE_RELOAD: &str = "nixseed.test_delay=before-reload:exit";

/// A machine booted with no seed and no host answering has no identity: the guest agent
/// answers, sshd has no host key and stops at systemd's start limit. `seedctl push` then
/// brings the first identity, and the process applying it exits before it tells sshd
/// (see [`EXIT_BEFORE_RELOAD`]): the push fails and sshd stays down. The same push
/// again has nothing new to store but retries what the first one owed,
/// and as a first identity's: sshd starts with the machine's pinned key, the hostname is
/// live, machine-id is reported as needing a reboot, and the next boot (still with no
/// seed) has it from the initrd.
pub fn push_first(h: &Harness) -> Result<()> {
    let m = h.new_machine("push-first")?;
    let port = qemu::free_port()?;
    let mut cfg = m.vm_config(&h.image, h.accel, port)?;
    cfg.seed_iso = None;
    cfg.append.push(' ');
    cfg.append.push_str(EXIT_BEFORE_RELOAD);
    let mut vm = Vm::start(cfg)?;
    wait_for_agent(h, &m, &mut vm, "of a seedless boot")?;
    eprintln!(
        "vm-tests: {}: no identity; the guest agent answered after {:.1} s",
        m.name,
        vm.started.elapsed().as_secs_f64()
    );

    // sshd, with no host key, fails and restarts until systemd's start limit (5 starts)
    // stops it. The test image holds that limit for an hour instead of 10 s (image.rs,
    // SSH_START_LIMIT), so a plain RestartUnit is refused whenever the push comes, and
    // the agent must reset the failed state first. The login prompt comes once the boot's
    // jobs have run; the limit is reached well within the wait after it.
    let deadline = Instant::now() + ssh_timeout();
    while !vm.serial_text().contains("login:") {
        vm.ensure_running()?;
        ensure!(
            Instant::now() < deadline,
            "no login prompt on the console within {} s of a seedless boot\n{}",
            ssh_timeout().as_secs(),
            vm.diagnostics()
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(START_LIMIT_WAIT);

    // Nothing in the image made a host key of its own.
    if let Some(key) = ssh::keyscan(port) {
        bail!("with no identity sshd presents a host key: {key}");
    }

    let cut = seedctl_on(h, &m, "push", 20, &vm.config.channel_socket())?
        .output()
        .context("running seedctl push")?;
    ensure!(
        !cut.status.success(),
        "seedctl push succeeded although the process applying it exits before telling sshd:\n{}",
        String::from_utf8_lossy(&cut.stdout)
    );
    eprintln!(
        "vm-tests: {}: the first push, cut by its exit: {}",
        m.name,
        String::from_utf8_lossy(&cut.stderr).trim()
    );
    wait_for_agent(h, &m, &mut vm, "of the first push's exit")?;
    if let Some(key) = ssh::keyscan(port) {
        bail!("sshd presents a host key although the agent exited before telling it: {key}");
    }

    let t = Instant::now();
    let out = cmd::run(&mut seedctl_on(
        h,
        &m,
        "push",
        60,
        &vm.config.channel_socket(),
    )?)?;
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    eprintln!("vm-tests: {}: seedctl push: {}", m.name, said.trim());
    let expected = m.host_key_pub()?;
    let seen = ssh::wait_for_host_key(port, Some(&expected), Duration::from_secs(60), || {
        vm.ensure_running()
    })
    .with_context(|| {
        format!(
            "sshd did not start with the pushed host key\n{}",
            vm.diagnostics()
        )
    })?;
    eprintln!(
        "vm-tests: {}: sshd answered with the pushed key {:.1} s after the push began",
        m.name,
        t.elapsed().as_secs_f64()
    );
    // seedctl exited 0, so nothing failed; sshd is listed once its start job is done.
    let reloaded = line_starting(&said, "reloaded");
    ensure!(
        reloaded.contains("sshd"),
        "seedctl push does not report sshd started:\n{said}"
    );
    let needs_reboot = line_starting(&said, "needs reboot");
    ensure!(
        needs_reboot.contains("machine-id"),
        "the first push does not report machine-id as needing a reboot:\n{said}"
    );
    let b = Booted {
        ssh: Ssh::pinned(port, h.key.clone(), &seen, &m.state)?,
        vm,
        boot_to_sshd: Duration::ZERO,
    };
    let limit = b.ssh.run(
        "journalctl -b --no-pager -o cat -u ssh.service | grep -c 'Start request repeated too quickly' || true",
    )?;
    ensure!(
        limit.trim() != "0",
        "sshd had not reached systemd's start limit {} s after the login prompt, so the push did not meet it:\n{}",
        START_LIMIT_WAIT.as_secs(),
        b.ssh
            .run("journalctl -b --no-pager -o short-monotonic -u ssh.service | tail -20")?
    );
    eprintln!(
        "vm-tests: {}: sshd had stopped at systemd's start limit before the push",
        m.name
    );
    let exits = b.ssh.run(
        "journalctl -b --no-pager -o cat | grep -c 'test delay point reached: before-reload, exiting' || true",
    )?;
    ensure!(
        exits.trim() == "1",
        "the agent did not exit once at the point before the reloads ({} times)",
        exits.trim()
    );
    hostname_matches(&b.ssh, &m, "after the first push")?;
    // machine-id waits for the reboot: /etc keeps the ID systemd and journald run with,
    // the one the journal's directory is named after.
    let etc_id = b
        .ssh
        .run("id=$(cat /etc/machine-id); echo $id; test -d /var/log/journal/$id && echo journal")?;
    ensure!(
        etc_id.lines().next().map(str::trim) != Some(m.machine_id()?.as_str())
            && etc_id.contains("journal"),
        "after the first push /etc/machine-id and the journal disagree (the pushed ID is {}):\n{etc_id}",
        m.machine_id()?
    );
    ensure!(
        failed_units(&b.ssh)?.iter().all(|u| !u.contains("ssh")),
        "sshd is still failed after the first push:\n{}",
        b.ssh.run("systemctl --failed --no-legend || true")?
    );
    b.poweroff()?;

    // The next boot, still with no seed, sets the pushed machine-id in the initrd.
    let b = h.boot_with(&m, Some(&expected), |c| c.seed_iso = None)?;
    let id = b.ssh.run("cat /etc/machine-id; journalctl -b --no-pager -o cat | grep -c 'machine-id was set late' || true")?;
    let mut lines = id.lines().map(str::trim);
    let (live, late) = (
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or("0"),
    );
    ensure!(
        live == m.machine_id()?,
        "after a reboot /etc/machine-id is {live}, the pushed identity says {}",
        m.machine_id()?
    );
    ensure!(
        late == "0",
        "the reboot after the first push set machine-id late"
    );
    b.discard()
}

#[cfg(test)]
mod tests {
    use super::opens;

    #[test]
    fn a_port_is_open_only_in_an_accept_rule_of_its_protocol() {
        let table = "table inet nixseed {\n\tchain input {\n\t\ttcp dport 22 accept\n\t\t\
                     tcp dport { 22, 8080 } accept\n\t\tudp dport { 68, 546 } accept\n\t\t\
                     tcp dport 9090 drop\n\t}\n}\n";
        assert!(opens(table, "tcp", "22"));
        assert!(opens(table, "tcp", "8080"));
        assert!(opens(table, "udp", "546"));
        assert!(!opens(table, "udp", "8080"), "the port is tcp's");
        assert!(!opens(table, "tcp", "9090"), "a drop rule does not open it");
        assert!(!opens(table, "tcp", "808"), "ports are matched whole");
    }
}
