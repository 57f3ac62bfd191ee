//! libvirt: `seedctl define`/`start` on the system libvirtd (started without systemd when
//! needed), then the virsh commands an operator runs against the guest agent, answered by
//! `nixseed-agent serve` in the guest, and `virsh shutdown --mode agent`.

use super::*;
use crate::cmd;
use crate::libvirtd::{self, URI, virsh};
use crate::qemu::{CHANNEL_PORT as CONTROL_PORT, QGA_PORT as AGENT_PORT};
use std::path::Path;
use std::process::Command;

/// Undefines the domain however the scenario ends (a failed run leaves nothing behind).
struct Domain<'a> {
    name: &'a str,
}

impl Drop for Domain<'_> {
    fn drop(&mut self) {
        libvirtd::remove_domain(self.name);
    }
}

/// `virsh ARGS` until it succeeds, while the domain runs; returns its stdout.
fn virsh_until(name: &str, args: &[&str], timeout: Duration, what: &str) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match virsh(args) {
            Ok(out) => return Ok(out),
            Err(e) => format!("{e:#}"),
        };
        let state = virsh(&["domstate", name]).unwrap_or_default();
        if state.trim() != "running" {
            bail!(
                "domain {name} is '{}' while waiting for {what}\n{}",
                state.trim(),
                libvirtd::qemu_log(name)
            );
        }
        if Instant::now() > deadline {
            bail!(
                "{what}: no success within {} s; last error: {last}",
                timeout.as_secs()
            );
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Rows of a virsh table (header and rule dropped), split on whitespace.
fn table_rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.chars().all(|c| c == '-'))
        .filter(|l| !l.starts_with("Name ") && !l.starts_with("Mountpoint "))
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

/// `key : value` lines of `virsh guestinfo` and `virsh guestvcpus`.
fn guestinfo_map(out: &str) -> std::collections::BTreeMap<String, String> {
    out.lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The first number in a line such as "Froze 2 filesystem(s)".
fn count_in(out: &str) -> Option<u32> {
    out.split_whitespace().find_map(|w| w.parse().ok())
}

pub fn libvirt(h: &Harness) -> Result<()> {
    let setup = libvirtd::ensure()?;
    eprintln!(
        "vm-tests: libvirt at {URI} ready in {:.1} s{}",
        setup.took.as_secs_f64(),
        if setup.started.is_empty() {
            " (already running)".to_string()
        } else {
            format!(" (started {})", setup.started.join(", "))
        }
    );
    let seedctl = h
        .seedctl
        .as_ref()
        .filter(|s| s.has("define") && s.has("start"))
        .context("the libvirt scenario needs seedctl with define/start")?;
    let name = "nixseed-libvirt";
    libvirtd::remove_domain(name);
    let m = h.new_machine(name)?;
    let machines = h.work.join("machines");
    let state = h.work.join("state");
    let cmdline = machine::kernel_cmdline(&h.image);
    let _domain = Domain { name };
    cmd::run(
        at_libvirt(
            seedctl,
            &machines,
            &state,
            "define",
            name,
            &["--type", "qemu", "--cpus", "2"],
        )
        .arg("--kernel")
        .arg(&h.image.kernel)
        .arg("--initrd")
        .arg(&h.image.initramfs)
        .arg("--cmdline")
        .arg(&cmdline),
    )?;
    let xml = virsh(&["dumpxml", "--inactive", name])?;
    ensure!(
        xml.contains("org.qemu.guest_agent.0") && xml.contains("<kernel>"),
        "the defined domain lacks the guest-agent channel or direct kernel boot:\n{xml}"
    );
    // The cdrom holding the seed through another spelling of its path (a domain defined
    // from another directory, or by hand from `seedctl xml`): `start` must still give it
    // the machine's seed, which virsh's `--insert` refuses on a drive with a medium.
    let alias = h.work.join("state-alias");
    let _ = std::fs::remove_file(&alias);
    std::os::unix::fs::symlink(&state, &alias).context("linking the state directory")?;
    let aliased = alias.join(name).join("seed.iso");
    virsh(&[
        "change-media",
        name,
        "sda",
        &aliased.display().to_string(),
        "--update",
        "--config",
    ])?;
    let t = Instant::now();
    cmd::run(&mut at_libvirt(
        seedctl,
        &machines,
        &state,
        "start",
        name,
        &[],
    ))?;
    let seed = std::path::absolute(state.join(name).join("seed.iso"))?;
    let xml = virsh(&["dumpxml", "--inactive", name])?;
    ensure!(
        xml.contains(&format!("file='{}'", seed.display())),
        "`seedctl start` left the seed cdrom on another path than {}:\n{xml}",
        seed.display()
    );

    // The agent answers once the guest's udev saw the port: hostname from the identity.
    let hostname = virsh_until(
        name,
        &["domhostname", name, "--source", "agent"],
        ssh_timeout(),
        "`virsh domhostname --source agent`",
    )?;
    eprintln!(
        "vm-tests: {name}: the guest agent answered libvirt after {:.1} s",
        t.elapsed().as_secs_f64()
    );
    let want_host = m.read("hostname")?;
    ensure!(
        hostname.trim() == want_host,
        "virsh domhostname --source agent says '{}', machines/{name}/hostname says '{want_host}'",
        hostname.trim()
    );

    // domifaddr: the NIC with the domain's MAC has the user-network IPv4 address.
    let iflist = virsh(&["domiflist", name])?;
    let mac = table_rows(&iflist)
        .into_iter()
        .find_map(|r| r.last().filter(|v| v.matches(':').count() == 5).cloned())
        .with_context(|| format!("no MAC in `virsh domiflist {name}`:\n{iflist}"))?;
    let deadline = Instant::now() + Duration::from_secs(120);
    let (ifaddr, addr) = loop {
        let out = virsh(&["domifaddr", name, "--source", "agent"])?;
        // Rows: name MAC proto addr/prefix; continuation rows start with "-".
        let found = out.lines().find_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w.len() >= 4 && w[1].eq_ignore_ascii_case(&mac) && w[2] == "ipv4")
                .then(|| w[3].to_string())
        });
        if let Some(a) = found {
            break (out, a);
        }
        ensure!(
            Instant::now() < deadline,
            "`virsh domifaddr {name} --source agent` shows no IPv4 address for {mac} after 120 s:\n{out}"
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    ensure!(
        addr.starts_with("10.0.2.") && addr.ends_with("/24"),
        "the guest's address on {mac} is {addr}, expected 10.0.2.x/24 from libvirt's user network:\n{ifaddr}"
    );
    ensure!(
        ifaddr
            .lines()
            .any(|l| l.contains("lo ") && l.contains("127.0.0.1/8")),
        "domifaddr --source agent does not list lo with 127.0.0.1/8:\n{ifaddr}"
    );

    // domfsinfo: / and /var with their disk targets (vda is the overlay, vdb the /var disk).
    let fsinfo = virsh(&["domfsinfo", name])?;
    let rows = table_rows(&fsinfo);
    let target_of = |mp: &str| {
        rows.iter()
            .find(|r| r.first().map(String::as_str) == Some(mp))
            .map(|r| (r.get(2).cloned(), r.get(3).cloned()))
    };
    for (mp, dev) in [("/", "vda"), ("/var", "vdb")] {
        let (fstype, target) = target_of(mp)
            .with_context(|| format!("`virsh domfsinfo {name}` has no {mp}:\n{fsinfo}"))?;
        ensure!(
            fstype.as_deref() == Some("ext4") && target.as_deref() == Some(dev),
            "`virsh domfsinfo {name}`: {mp} should be ext4 on {dev}, got {fstype:?} on {target:?}:\n{fsinfo}"
        );
    }

    // guestinfo: the groups libvirt asks for all come back, consistent with the above.
    let info = virsh(&["guestinfo", name])?;
    let map = guestinfo_map(&info);
    let get = |k: &str| map.get(k).map(String::as_str);
    ensure!(
        get("hostname") == Some(want_host.as_str()),
        "virsh guestinfo hostname is {:?}, expected '{want_host}':\n{info}",
        get("hostname")
    );
    ensure!(
        get("os.id") == Some("debian"),
        "virsh guestinfo os.id is {:?}:\n{info}",
        get("os.id")
    );
    let count = |k: &str| get(k).and_then(|v| v.parse::<u32>().ok()).unwrap_or(0);
    let fs_count = count("fs.count");
    ensure!(
        fs_count >= 2,
        "virsh guestinfo fs.count is {fs_count}, expected / and /var:\n{info}"
    );
    let mounts: Vec<&str> = (0..fs_count)
        .filter_map(|i| get(&format!("fs.{i}.mountpoint")))
        .collect();
    ensure!(
        mounts.contains(&"/") && mounts.contains(&"/var"),
        "virsh guestinfo mountpoints are {mounts:?}:\n{info}"
    );
    for k in ["timezone.offset", "user.count"] {
        ensure!(get(k).is_some(), "virsh guestinfo has no {k}:\n{info}");
    }
    // The disks (guest-get-disks), which libvirt maps to the domain's targets by the
    // addresses the agent reports, and the NIC (guest-network-get-interfaces) with the
    // domain's MAC and the address domifaddr showed.
    let aliases: Vec<&str> = (0..count("disk.count"))
        .filter_map(|i| get(&format!("disk.{i}.alias")))
        .collect();
    ensure!(
        aliases.contains(&"vda") && aliases.contains(&"vdb"),
        "virsh guestinfo's disks map to {aliases:?}, not to the domain's vda and vdb:\n{info}"
    );
    let nic_addrs: Vec<&str> = (0..count("if.count"))
        .find(|i| get(&format!("if.{i}.hwaddr")).is_some_and(|m| m.eq_ignore_ascii_case(&mac)))
        .map(|i| {
            (0..count(&format!("if.{i}.addr.count")))
                .filter_map(|j| get(&format!("if.{i}.addr.{j}.addr")))
                .collect()
        })
        .unwrap_or_default();
    let want_addr = addr.split('/').next().unwrap_or_default();
    ensure!(
        nic_addrs.contains(&want_addr),
        "virsh guestinfo lists {nic_addrs:?} for {mac}, not domifaddr's {addr}:\n{info}"
    );

    // domtime: guest-get-time, in seconds since the epoch, close to the host's clock.
    let domtime = virsh(&["domtime", name])?;
    let guest_secs: u64 = domtime
        .split_whitespace()
        .find_map(|w| w.parse().ok())
        .with_context(|| format!("no time in `virsh domtime {name}`: {domtime}"))?;
    let host_secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    ensure!(
        guest_secs.abs_diff(host_secs) < 300,
        "`virsh domtime {name}` says {guest_secs}, the host's clock {host_secs}"
    );

    // KubeVirt's guest statistics (its VMStatsCollector): the guest's own CPU and disk
    // counters, and its memory blocks.
    kubevirt_stats(name)?;

    // SSH keys through the agent: root's are the identity's admin keys; add and remove one.
    let keys = virsh(&["get-user-sshkeys", name, "root"])?;
    let admin = h.key.public_line()?;
    let admin_blob = ssh::key_type_and_blob(&admin).with_context(|| {
        format!(
            "the admin key `{}` is not an OpenSSH public key",
            admin.trim()
        )
    })?;
    ensure!(
        keys.contains(&admin_blob),
        "`virsh get-user-sshkeys {name} root` lacks the admin key {admin_blob}:\n{keys}"
    );
    let extra = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHu6f0QkpbbQ1ojHxOzzGrDf0Ct7n9pPvm8YTWjqwr7M libvirt-test";
    let extra_file = m.state.join("extra-key.pub");
    std::fs::write(&extra_file, format!("{extra}\n"))
        .with_context(|| format!("writing {}", extra_file.display()))?;
    let extra_path = extra_file.display().to_string();
    virsh(&["set-user-sshkeys", name, "root", "--file", &extra_path])?;
    let keys = virsh(&["get-user-sshkeys", name, "root"])?;
    ensure!(
        keys.contains(extra) && keys.contains(&admin_blob),
        "after set-user-sshkeys, root's keys are:\n{keys}"
    );
    virsh(&[
        "set-user-sshkeys",
        name,
        "root",
        "--remove",
        "--file",
        &extra_path,
    ])?;
    let keys = virsh(&["get-user-sshkeys", name, "root"])?;
    ensure!(
        !keys.contains(extra) && keys.contains(&admin_blob),
        "after set-user-sshkeys --remove, root's keys are:\n{keys}"
    );

    // A live change through libvirt: `seedctl push --connect` finds the channel socket in
    // the domain's XML; the agent then reports the new hostname to libvirt.
    std::fs::write(m.dir.join("hostname"), "libvirt-renamed\n")
        .with_context(|| format!("editing {}/hostname", m.dir.display()))?;
    // `seedctl VERB NAME --connect URI` over the domain's control channel.
    let over_channel = |verb: &str| {
        cmd::run(&mut at_libvirt(
            seedctl,
            &machines,
            &state,
            verb,
            name,
            &["--timeout", "60"],
        ))
    };
    let pushed = over_channel("push")?;
    let renamed = virsh(&["domhostname", name, "--source", "agent"])?;
    ensure!(
        renamed.trim() == "libvirt-renamed",
        "after `seedctl push {name} --connect {URI}` the agent says hostname '{}'; push said: {}",
        renamed.trim(),
        String::from_utf8_lossy(&pushed.stdout).trim()
    );
    over_channel("status").context("seedctl status --connect after the push")?;
    reboot_keeps_the_push(name, "libvirt-renamed", &pushed.stdout)?;
    // And back: the generation before the push is current again, with its hostname.
    over_channel("rollback")?;
    let back = virsh(&["domhostname", name, "--source", "agent"])?;
    ensure!(
        back.trim() == want_host,
        "after `seedctl rollback {name}` the agent says hostname '{}', not '{want_host}'",
        back.trim()
    );
    // machines/NAME agrees with the guest again.
    std::fs::write(m.dir.join("hostname"), format!("{want_host}\n"))
        .with_context(|| format!("restoring {}/hostname", m.dir.display()))?;
    seed_reaches_the_running_qemu(seedctl, &machines, &state, name)?;
    channel_hot_plug(name, &h.work, &over_channel)?;

    // Freeze and thaw: libvirt counts what the agent froze.
    let froze = virsh(&["domfsfreeze", name])?;
    let frozen = count_in(&froze).unwrap_or(0);
    let status = virsh(&[
        "qemu-agent-command",
        name,
        r#"{"execute":"guest-fsfreeze-status"}"#,
    ]);
    // A push during the freeze would write to /var and wait for the thaw in the very
    // process that answers it: refused at once, and the thaw below is still answered.
    let push_frozen = over_channel("push");
    let status_frozen = over_channel("status");
    let thawed = virsh(&["domfsthaw", name]);
    ensure!(
        frozen > 0,
        "`virsh domfsfreeze {name}` froze nothing: {froze}"
    );
    match push_frozen {
        Ok(out) => bail!(
            "`seedctl push {name}` succeeded while the guest's filesystems were frozen: {}",
            String::from_utf8_lossy(&out.stdout).trim()
        ),
        Err(e) => ensure!(
            format!("{e:#}").contains("filesystems are frozen by the guest agent"),
            "`seedctl push {name}` during the freeze failed without saying why: {e:#}"
        ),
    }
    status_frozen.context("seedctl status during the freeze")?;
    let status = status?;
    ensure!(
        status.contains("\"frozen\""),
        "guest-fsfreeze-status during the freeze says {status}"
    );
    let thawed = thawed?;
    ensure!(
        count_in(&thawed) == Some(frozen),
        "`virsh domfsthaw {name}` says '{}' after freezing {frozen}",
        thawed.trim()
    );
    let status = virsh(&[
        "qemu-agent-command",
        name,
        r#"{"execute":"guest-fsfreeze-status"}"#,
    ])?;
    ensure!(
        status.contains("\"thawed\""),
        "guest-fsfreeze-status after the thaw says {status}"
    );

    eprintln!(
        "vm-tests: {name}: agent says hostname {want_host}, then libvirt-renamed after seedctl push --connect and back after rollback; {mac} has {addr}, / on vda and /var on vdb, froze and thawed {frozen} filesystems (a push meanwhile refused)"
    );

    // Last before the shutdown: CPU hotplug in the guest.
    guest_vcpus(name)?;

    // Shutdown through the agent: the domain must reach "shut off" on its own.
    let t = Instant::now();
    virsh(&["shutdown", name, "--mode", "agent"])?;
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let st = virsh(&["domstate", name])?;
        if st.trim() == "shut off" {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "domain {name} is still '{}' 180 s after `virsh shutdown --mode agent`\n{}",
            st.trim(),
            libvirtd::qemu_log(name)
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "vm-tests: {name}: shut off {:.1} s after `virsh shutdown --mode agent`",
        t.elapsed().as_secs_f64()
    );
    answerer_stops_with_a_destroyed_domain(seedctl, &machines, &state, name)?;
    if seedctl.has("undefine") {
        undefine(seedctl, &machines, &state, name)?;
        undefine_keeps_uefi_variables(seedctl, &machines, &state, name)?;
    } else {
        virsh(&["undefine", "--nvram", name])?;
        undefined(name)?;
    }
    Ok(())
}

/// A reboot inside the same QEMU (`virsh reboot --mode agent`) after `seedctl push
/// --connect`: the guest reads the seed cdrom again at boot, and the push must have
/// given the domain's QEMU the new seed, or the older one would win over the pushed
/// identity. libvirt's `reboot` event tells the reset; the agent's next answer is the
/// new boot's.
fn reboot_keeps_the_push(name: &str, want_host: &str, push_said: &[u8]) -> Result<()> {
    let t = Instant::now();
    let mut event = Command::new("virsh")
        .args(["-c", URI, "event", "--domain", name, "--event", "reboot"])
        .args(["--timeout", "240"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("starting `virsh event --event reboot`")?;
    // The listener registers before the reboot is asked for.
    std::thread::sleep(Duration::from_secs(1));
    let asked = virsh(&["reboot", name, "--mode", "agent"]);
    if let Err(e) = asked {
        let _ = event.kill();
        let _ = event.wait();
        return Err(e.context(format!("`virsh reboot {name} --mode agent`")));
    }
    let heard = event
        .wait_with_output()
        .context("waiting for `virsh event --event reboot`")?;
    let said = String::from_utf8_lossy(&heard.stdout);
    ensure!(
        said.contains("reboot"),
        "no reboot event from domain {name} within 240 s of `virsh reboot --mode agent`: {} {}",
        said.trim(),
        String::from_utf8_lossy(&heard.stderr).trim()
    );
    let host = virsh_until(
        name,
        &["domhostname", name, "--source", "agent"],
        ssh_timeout(),
        "`virsh domhostname --source agent` after the reboot",
    )?;
    ensure!(
        host.trim() == want_host,
        "after `seedctl push {name} --connect` and a reboot inside the same QEMU the agent says hostname '{}', not the pushed '{want_host}': the domain's cdrom still held the older seed; push said: {}",
        host.trim(),
        String::from_utf8_lossy(push_said).trim()
    );
    eprintln!(
        "vm-tests: {name}: rebooted inside the same QEMU after the push, still '{want_host}' ({:.1} s)",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `seedctl seed NAME --connect URI` rewrites the seed ISO (a new file in its place) and
/// gives it to the running domain: libvirt's QEMU then holds the file the path names, not
/// the one it replaced, which `/proc/PID/fd` shows as `(deleted)`.
fn seed_reaches_the_running_qemu(
    seedctl: &Seedctl,
    machines: &Path,
    state: &Path,
    name: &str,
) -> Result<()> {
    let out = cmd::run(&mut at_libvirt(seedctl, machines, state, "seed", name, &[]))?;
    let said = String::from_utf8_lossy(&out.stdout);
    ensure!(
        said.contains("seed cdrom now holds it"),
        "`seedctl seed {name} --connect` did not say the running domain took the seed: {said}"
    );
    let pidfile = format!("/run/libvirt/qemu/{name}.pid");
    let pid = std::fs::read_to_string(&pidfile).with_context(|| format!("reading {pidfile}"))?;
    let fds = format!("/proc/{}/fd", pid.trim());
    let mut seeds = Vec::new();
    for e in std::fs::read_dir(&fds).with_context(|| format!("listing {fds}"))? {
        let target = std::fs::read_link(e?.path()).unwrap_or_default();
        let target = target.display().to_string();
        if target.contains("seed.iso") {
            seeds.push(target);
        }
    }
    let iso = state.join(name).join("seed.iso");
    let iso = std::path::absolute(&iso)
        .unwrap_or(iso)
        .display()
        .to_string();
    ensure!(
        seeds.contains(&iso) && !seeds.iter().any(|t| t.ends_with("(deleted)")),
        "after `seedctl seed {name} --connect` the domain's QEMU holds {seeds:?}, not only {iso}"
    );
    Ok(())
}

/// `seedctl VERB NAME --connect URI [EXTRA...]` against the scenario's libvirtd.
fn at_libvirt(
    seedctl: &Seedctl,
    machines: &Path,
    state: &Path,
    verb: &str,
    name: &str,
    extra: &[&str],
) -> Command {
    let mut c = seedctl.command(machines, state);
    c.args([verb, name, "--connect", URI]).args(extra);
    c
}

/// `seedctl undefine NAME --connect URI`; the domain must be gone.
fn undefine(seedctl: &Seedctl, machines: &Path, state: &Path, name: &str) -> Result<()> {
    cmd::run(&mut at_libvirt(
        seedctl,
        machines,
        state,
        "undefine",
        name,
        &[],
    ))?;
    undefined(name)
}

/// The domain must be gone after an undefine: libvirt, asked for every domain it
/// knows (a libvirt that cannot be asked is an error, not an absent domain), lists it no
/// more.
fn undefined(name: &str) -> Result<()> {
    let all = virsh(&["list", "--all", "--name"]).context("listing libvirt's domains")?;
    ensure!(
        !all.lines().any(|l| l.trim() == name),
        "domain {name} is still defined after undefine:\n{all}"
    );
    Ok(())
}

/// A UEFI domain's variables are the machine's own file, shared with `seedctl run`:
/// `seedctl undefine` removes the domain and leaves the file as it was.
fn undefine_keeps_uefi_variables(
    seedctl: &Seedctl,
    machines: &Path,
    state: &Path,
    name: &str,
) -> Result<()> {
    let vars = state.join(name).join("OVMF_VARS.fd");
    let kept = b"the machine's UEFI variables, written before undefine".to_vec();
    std::fs::write(&vars, &kept).with_context(|| format!("writing {}", vars.display()))?;
    cmd::run(&mut at_libvirt(
        seedctl,
        machines,
        state,
        "define",
        name,
        &["--type", "qemu"],
    ))?;
    let xml = virsh(&["dumpxml", name])?;
    ensure!(
        xml.contains("<nvram") && xml.contains("OVMF_VARS.fd"),
        "the UEFI domain names no variables file in the machine's state directory:\n{xml}"
    );
    undefine(seedctl, machines, state, name)?;
    let after = std::fs::read(&vars).with_context(|| {
        format!(
            "{} is gone after `seedctl undefine`: the machine lost its UEFI variables",
            vars.display()
        )
    })?;
    ensure!(
        after == kept,
        "{} changed across `seedctl undefine`",
        vars.display()
    );
    eprintln!(
        "vm-tests: {name}: a UEFI domain undefined, its variables kept in {}",
        vars.display()
    );
    Ok(())
}

/// Writes the XML of a unix channel to `port` for `virsh attach-device`/`detach-device`
/// into `work`: with the socket's `path`, or without one (libvirt then picks it, as the
/// XML in docs/guest-agent.md does). Returns the file's path.
fn channel_xml_file(work: &Path, verb: &str, port: &str, path: Option<&str>) -> Result<String> {
    let source = match path {
        Some(p) => format!("<source mode='bind' path='{p}'/>"),
        None => "<source mode='bind'/>".into(),
    };
    let file = work.join(format!("{verb}-{port}.xml"));
    std::fs::write(
        &file,
        format!(
            "<channel type='unix'>\n  {source}\n  <target type='virtio' name='{port}'/>\n</channel>\n"
        ),
    )
    .with_context(|| format!("writing {}", file.display()))?;
    Ok(file.to_string_lossy().into_owned())
}

/// Channels taken out of the running domain and put back, as an operator adds them to a
/// VM that runs (`virsh attach-device --live`, with the XML docs/guest-agent.md gives,
/// which leaves the socket's path to libvirt):
/// - the control channel alone, while the agent serves it: the guest agent keeps
///   answering meanwhile and `seedctl status --connect` says the channel is missing; once
///   the channel is back the agent reopens it;
/// - both channels: the agent reopens the guest-agent port once it is back (a unit bound
///   to the port's device would be stopped and, with the port back before that stop
///   ended, left stopped), and the control channel attached after that is served.
///
/// Should the guest agent not answer libvirt, the error shows QEMU's view of the
/// chardevs: `frontend-open` says whether the guest has the port open (so the agent in
/// the guest, or libvirt's connection to it, is at fault).
fn channel_hot_plug(
    name: &str,
    work: &Path,
    over_channel: &dyn Fn(&str) -> Result<std::process::Output>,
) -> Result<()> {
    let attach = |port: &str| -> Result<()> {
        let file = channel_xml_file(work, "attach", port, None)?;
        virsh(&["attach-device", name, &file, "--live"]).map(drop)
    };

    detach_channel(name, work, CONTROL_PORT)?;
    let host = virsh(&["domhostname", name, "--source", "agent"])
        .context("the guest agent after the control channel was detached")?;
    let missing = match over_channel("status") {
        Ok(o) => bail!(
            "seedctl status --connect answered with the channel detached: {}",
            String::from_utf8_lossy(&o.stdout)
        ),
        Err(e) => format!("{e:#}"),
    };
    ensure!(
        missing.contains(CONTROL_PORT),
        "seedctl status --connect without the channel does not name {CONTROL_PORT}: {missing}"
    );
    attach(CONTROL_PORT)?;
    let t = Instant::now();
    over_channel("status")
        .context("seedctl status --connect after the channel was attached again")?;
    let reopened = t.elapsed();

    detach_channel(name, work, CONTROL_PORT)?;
    detach_channel(name, work, AGENT_PORT)?;
    attach(AGENT_PORT)?;
    let t = Instant::now();
    if let Err(e) = virsh_until(
        name,
        &["domhostname", name, "--source", "agent"],
        Duration::from_secs(60),
        "the guest agent after its channel was attached again",
    ) {
        let chardevs = virsh(&[
            "qemu-monitor-command",
            name,
            "--pretty",
            r#"{"execute":"query-chardev"}"#,
        ])
        .unwrap_or_else(|q| format!("(query-chardev failed: {q:#})"));
        bail!("{e:#}\nQEMU's chardevs (query-chardev):\n{chardevs}");
    }
    let agent_back = t.elapsed();
    attach(CONTROL_PORT)?;
    let t = Instant::now();
    over_channel("status").context(
        "seedctl status --connect after the control channel was attached again, after the \
         guest agent's",
    )?;
    eprintln!(
        "vm-tests: {name}: control channel detached (the guest agent still said {}) and \
         attached again: answered {:.1} s later; both channels detached, the guest agent's \
         attached again: answered {:.1} s later, then the control channel: {:.1} s later",
        host.trim(),
        reopened.as_secs_f64(),
        agent_back.as_secs_f64(),
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `virsh detach-device --live` of the domain's channel to `port` (matched by its
/// socket's path, read from the live XML); the live XML must then lack it.
fn detach_channel(name: &str, work: &Path, port: &str) -> Result<()> {
    let live = virsh(&["dumpxml", name])?;
    let sock = channel_source(&live, port)
        .with_context(|| format!("the running domain {name} has no unix channel {port}"))?;
    let file = channel_xml_file(work, "detach", port, Some(&sock))?;
    virsh(&["detach-device", name, &file, "--live"])?;
    let gone = virsh(&["dumpxml", name])?;
    ensure!(
        channel_source(&gone, port).is_none(),
        "`virsh detach-device {name} --live` left {port} in the live XML"
    );
    Ok(())
}

/// The `<source path=.../>` of the unix channel whose target is `port`, in libvirt's XML.
fn channel_source(xml: &str, port: &str) -> Option<String> {
    xml.split("<channel ")
        .skip(1)
        .map(|c| c.split("</channel>").next().unwrap_or(c))
        .filter(|c| c.starts_with("type='unix'") && c.contains(&format!("name='{port}'")))
        .find_map(|c| {
            let (_, rest) = c.split_once("path='")?;
            rest.split_once('\'').map(|(p, _)| p.to_string())
        })
}

/// `seedctl start --seed-via channel` leaves an answerer (`serve --once`) for the guest's
/// hello. A domain destroyed before that hello must not keep it (and the channel socket)
/// forever: it stops with the domain's QEMU.
fn answerer_stops_with_a_destroyed_domain(
    seedctl: &Seedctl,
    machines: &Path,
    state: &Path,
    name: &str,
) -> Result<()> {
    let out = cmd::run(seedctl.command(machines, state).args([
        "--json",
        "start",
        name,
        "--connect",
        URI,
        "--seed-via",
        "channel",
    ]))?;
    let said: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "`seedctl --json start {name} --seed-via channel` printed no JSON: {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    let pid = said["answerer_pid"]
        .as_u64()
        .with_context(|| format!("no answerer_pid in seedctl's answer: {said}"))?;
    let log = said["answerer_log"].as_str().unwrap_or_default();
    let read_log = || std::fs::read_to_string(log).unwrap_or_default();
    virsh(&["destroy", name])?;
    let t = Instant::now();
    // Gone, or a zombie nobody has reaped yet: either way it has exited.
    let exited = || {
        std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |st| {
            st.rsplit(')')
                .next()
                .and_then(|r| r.split_whitespace().next())
                == Some("Z")
        })
    };
    while !exited() {
        if t.elapsed() > Duration::from_secs(30) {
            let _ = Command::new("kill").arg(pid.to_string()).status();
            bail!(
                "the answerer of `seedctl start --seed-via channel` (pid {pid}) still runs 30 s after `virsh destroy {name}`; its log {log}:\n{}",
                read_log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // It stopped because QEMU did, not on some error of its own.
    let text = read_log();
    ensure!(
        text.contains("QEMU exited; no longer answering"),
        "the answerer exited after `virsh destroy {name}` without saying QEMU was gone; its log {log}:\n{text}"
    );
    eprintln!(
        "vm-tests: {name}: destroyed before its hello; the channel answerer exited {:.1} s later",
        t.elapsed().as_secs_f64()
    );
    Ok(())
}

/// `virsh qemu-agent-command NAME '{"execute":COMMAND}'`, its `return` member.
fn agent_return(name: &str, command: &str) -> Result<serde_json::Value> {
    let out = virsh(&[
        "qemu-agent-command",
        name,
        &format!(r#"{{"execute":"{command}"}}"#),
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("{command} through virsh is not JSON: {out}"))?;
    Ok(v["return"].clone())
}

/// cpustats starts at vCPU 0 with idle time, diskstats has reads on the root disk
/// and writes on the /var disk, memory-blocks lists online blocks and answers a request
/// to set them per block.
fn kubevirt_stats(name: &str) -> Result<()> {
    let cpus = agent_return(name, "guest-get-cpustats")?;
    ensure!(
        cpus.as_array().is_some_and(|l| !l.is_empty()
            && l[0]["type"] == "linux"
            && l[0]["cpu"] == 0
            && l[0]["idle"].as_u64() > Some(0)),
        "guest-get-cpustats says {cpus}"
    );
    let disks = agent_return(name, "guest-get-diskstats")?;
    let stat = |dev: &str, counter: &str| {
        disks
            .as_array()
            .and_then(|l| l.iter().find(|d| d["name"] == dev))
            .and_then(|d| d["stats"][counter].as_u64())
    };
    ensure!(
        stat("vda", "read-ios") > Some(0) && stat("vdb", "write-ios") > Some(0),
        "guest-get-diskstats has no reads on vda or no writes on vdb: {disks}"
    );
    let blocks = agent_return(name, "guest-get-memory-blocks")?;
    ensure!(
        blocks
            .as_array()
            .is_some_and(|l| !l.is_empty() && l.iter().any(|b| b["online"] == true)),
        "guest-get-memory-blocks says {blocks}"
    );
    // guest-set-memory-blocks where nothing changes: an on-line block asked on line
    // again, and a block the guest does not have. (Taking memory off line is left out:
    // the kernel retries the page migration until it succeeds or is interrupted.)
    let index = blocks
        .as_array()
        .and_then(|l| l.iter().find(|b| b["online"] == true))
        .map(|b| b["phys-index"].clone())
        .unwrap_or_default();
    let request = serde_json::json!({"execute": "guest-set-memory-blocks", "arguments": {
        "mem-blks": [{"phys-index": index, "online": true}, {"phys-index": 999_999, "online": false}]}});
    let out = virsh(&["qemu-agent-command", name, &request.to_string()])?;
    let answer: serde_json::Value = serde_json::from_str(&out)
        .with_context(|| format!("guest-set-memory-blocks through virsh is not JSON: {out}"))?;
    let expected = serde_json::json!([
        {"phys-index": index, "response": "success"},
        {"phys-index": 999_999, "response": "not-found", "error-code": 2},
    ]);
    ensure!(
        answer["return"] == expected,
        "guest-set-memory-blocks {request} says {out}, not {expected}"
    );
    Ok(())
}

/// The `online : LIST` line of `virsh guestvcpus`.
fn online_list(out: &str) -> Option<String> {
    guestinfo_map(out).get("online").cloned()
}

/// `virsh guestvcpus` (guest-get-vcpus, guest-set-vcpus): the domain's two vCPUs are on
/// line and CPU 1 can go off line; disabling it takes it off line in the guest's kernel,
/// enabling brings it back.
fn guest_vcpus(name: &str) -> Result<()> {
    let before = virsh(&["guestvcpus", name])?;
    let map = guestinfo_map(&before);
    ensure!(
        map.get("vcpus").map(String::as_str) == Some("0-1")
            && online_list(&before).as_deref() == Some("0-1")
            && map.get("offlinable").map(String::as_str) == Some("1"),
        "`virsh guestvcpus {name}` before any change says:\n{before}"
    );
    virsh(&["guestvcpus", name, "--cpulist", "1", "--disable"])?;
    let off = virsh(&["guestvcpus", name])?;
    let cpus = agent_return(name, "guest-get-vcpus")?;
    let cpu1_online = cpus
        .as_array()
        .and_then(|l| l.iter().find(|c| c["logical-id"] == 1))
        .map(|c| c["online"].clone());
    ensure!(
        online_list(&off).as_deref() == Some("0") && cpu1_online == Some(serde_json::json!(false)),
        "after `virsh guestvcpus {name} --cpulist 1 --disable` the guest says:\n{off}\nguest-get-vcpus: {cpus}"
    );
    virsh(&["guestvcpus", name, "--cpulist", "1", "--enable"])?;
    let on = virsh(&["guestvcpus", name])?;
    ensure!(
        online_list(&on).as_deref() == Some("0-1"),
        "after `virsh guestvcpus {name} --cpulist 1 --enable` the guest says:\n{on}"
    );
    eprintln!("vm-tests: {name}: virsh guestvcpus took CPU 1 off line and back");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_virsh_tables_and_counts() {
        let fs = " Mountpoint   Name   Type   Target\n-------------------------------\n /            vda    ext4   vda\n /var         vdb    ext4   vdb\n";
        let rows = table_rows(fs);
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1], ["/var", "vdb", "ext4", "vdb"]);
        let ifl = table_rows(" -   user   -   virtio   52:54:00:e4:f5:28\n");
        assert_eq!(ifl[0].last().map(String::as_str), Some("52:54:00:e4:f5:28"));
        assert_eq!(count_in("Froze 2 filesystem(s)\n"), Some(2));
        assert_eq!(count_in("nothing"), None);
        let m = guestinfo_map("hostname            : web1\nfs.0.mountpoint     : /\n");
        assert_eq!(m.get("hostname").map(String::as_str), Some("web1"));
        assert_eq!(m.get("fs.0.mountpoint").map(String::as_str), Some("/"));
    }

    #[test]
    fn finds_the_control_channel_socket_in_live_xml() {
        let xml = "<devices>\n<channel type='unix'>\n<source mode='bind' path='/s/ga'/>\n\
                   <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>\n\
                   </channel>\n<channel type='unix'>\n<source mode='bind' path='/s/ctl'/>\n\
                   <target type='virtio' name='org.nixseed.channel.0' state='connected'/>\n\
                   <alias name='channel1'/>\n</channel>\n</devices>";
        assert_eq!(
            channel_source(xml, "org.nixseed.channel.0").as_deref(),
            Some("/s/ctl")
        );
        assert_eq!(
            channel_source(xml, "org.qemu.guest_agent.0").as_deref(),
            Some("/s/ga")
        );
        assert_eq!(channel_source(xml, "org.example.other"), None);
    }
}
