//! `vm-tests demo` (`cargo xtask demo`): one machine from nothing to a clean shutdown,
//! step by step, with what an operator would look at after each step.

use crate::cmd;
use crate::image::Variant;
use crate::machine::Machine;
use crate::scenarios::{Harness, agent_timing_lines};
use crate::ssh;
use anyhow::{Context, Result, ensure};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

fn step(n: u32, title: &str) {
    println!("\n== {n}. {title}");
}

/// Indented output of a command, for the reader.
fn show(text: &str) {
    for l in text.trim_end().lines() {
        println!("   {l}");
    }
}

/// `SHA256:…` fingerprint of one public key line.
fn fingerprint(key_line: &str, scratch: &Path) -> Result<String> {
    let f = scratch.join("fingerprint.pub");
    std::fs::write(&f, format!("{key_line}\n"))
        .with_context(|| format!("writing {}", f.display()))?;
    let out = cmd::stdout(Command::new("ssh-keygen").arg("-lf").arg(&f))?;
    out.split_whitespace()
        .nth(1)
        .map(String::from)
        .with_context(|| format!("ssh-keygen -lf printed '{}'", out.trim()))
}

/// `seedctl agent NAME --socket QGA ARGS…`, its output shown.
fn agent(h: &Harness, m: &Machine, qga: &Path, args: &[&str]) -> Result<String> {
    let out = cmd::stdout(
        m.seedctl(h.seedctl.as_ref())?
            .args(["agent", &m.name, "--timeout", "30", "--socket"])
            .arg(qga)
            .args(args),
    )?;
    println!("   $ seedctl agent {} {}", m.name, args.join(" "));
    show(&out);
    Ok(out)
}

/// The IPv4 addresses a `guest-network-get-interfaces` answer lists, loopback left out.
fn agent_ipv4s(ifaddr: &serde_json::Value) -> Vec<String> {
    let nics = ifaddr.as_array().map(Vec::as_slice).unwrap_or_default();
    nics.iter()
        .filter(|nic| nic["name"] != "lo")
        .flat_map(|nic| nic["ip-addresses"].as_array().cloned().unwrap_or_default())
        .filter(|a| a["ip-address-type"] == "ipv4")
        .filter_map(|a| a["ip-address"].as_str().map(str::to_owned))
        .collect()
}

pub fn run() -> Result<()> {
    let t0 = Instant::now();
    step(
        1,
        "guest image (cached layers; a changed agent costs seconds)",
    );
    let h = Harness::setup(Variant::Nixseed)?;
    println!(
        "   base image {} ({}), ready after {:.1} s",
        h.image.base_qcow2.display(),
        h.accel.as_str(),
        t0.elapsed().as_secs_f64()
    );

    step(2, "a machine: seedctl new + seedctl create");
    let m = h.new_machine("demo")?;
    println!("   identity   {}", m.dir.display());
    println!("   machine-id {}", m.machine_id()?);
    println!("   hostname   {}", m.read("hostname")?);
    println!(
        "   disks      {} (overlay on the base), {}",
        m.boot_disk.display(),
        m.var_disk.display()
    );
    println!("   seed       {}", m.seed_iso.display());

    step(3, "boot under QEMU until sshd answers");
    let b = h.boot(&m)?;
    let qga = b.vm.config.qga_socket();
    let chan = b.vm.config.channel_socket();
    println!(
        "   sshd answered after {:.1} s (serial console: {})",
        b.boot_to_sshd.as_secs_f64(),
        b.vm.config.serial_log().display()
    );

    step(
        4,
        "host key: what sshd presents vs machines/demo (no trust on first use)",
    );
    let scanned = ssh::keyscan(b.ssh.port).context("ssh-keyscan found no ed25519 key")?;
    let fp_seen = fingerprint(&scanned, &m.state)?;
    let fp_file = fingerprint(&m.host_key_pub()?, &m.state)?;
    println!("   sshd (ssh-keyscan)                      {fp_seen}");
    println!("   machines/demo/ssh_host_ed25519_key.pub  {fp_file}");
    ensure!(
        fp_seen == fp_file,
        "host key mismatch: {fp_seen} vs {fp_file}"
    );
    println!("   match");
    println!(
        "   $ cat /etc/machine-id   -> {}",
        b.ssh.run("cat /etc/machine-id")?.trim()
    );
    println!(
        "   $ findmnt -no OPTIONS / -> {}",
        b.ssh.run("findmnt -no OPTIONS /")?.trim()
    );

    step(
        5,
        "the guest agent (qemu-guest-agent protocol, answered by nixseed-agent)",
    );
    let pong = agent(&h, &m, &qga, &["ping"])?;
    ensure!(pong.trim() == "pong", "guest-ping did not answer: {pong}");
    let osinfo: serde_json::Value = serde_json::from_str(&agent(&h, &m, &qga, &["osinfo"])?)
        .context("guest-get-osinfo's answer is not JSON")?;
    let os_id = b.ssh.run(". /etc/os-release && echo \"$ID\"")?;
    ensure!(
        osinfo["id"].as_str() == Some(os_id.trim()),
        "guest-get-osinfo's id {} is not the guest's os-release ID '{}'",
        osinfo["id"],
        os_id.trim()
    );
    let hostname = std::fs::read_to_string(m.dir.join("hostname"))
        .context("reading machines/demo/hostname")?;
    let said = agent(&h, &m, &qga, &["hostname"])?;
    ensure!(
        said.trim() == hostname.trim(),
        "the guest agent's hostname is not the machine's '{}': {said}",
        hostname.trim()
    );
    let ifaddr: serde_json::Value = serde_json::from_str(&agent(&h, &m, &qga, &["ifaddr"])?)
        .context("guest-network-get-interfaces' answer is not JSON")?;
    let kernel_says = b.ssh.run("ip -4 -o addr show scope global")?;
    let mut listed = agent_ipv4s(&ifaddr);
    let mut kernel: Vec<String> = kernel_says
        .split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "inet")
        .filter_map(|w| w[1].split('/').next().map(str::to_owned))
        .collect();
    listed.sort();
    kernel.sort();
    ensure!(
        !listed.is_empty() && listed == kernel,
        "the guest agent's IPv4 addresses {listed:?} are not the guest kernel's {kernel:?}:\n{kernel_says}"
    );

    step(6, "the agent's own timing, from the guest's journal");
    let timing = agent_timing_lines(&b.ssh)?;
    ensure!(
        timing.iter().any(|l| l.contains("nixseed initrd: ")),
        "the journal has no timing line of the initrd stage: {timing:?}"
    );
    show(&timing.join("\n"));

    step(
        7,
        "a live change: edit machines/demo/hostname, seedctl push",
    );
    std::fs::write(m.dir.join("hostname"), "demo-pushed\n")
        .context("editing machines/demo/hostname")?;
    let out = cmd::stdout(
        m.seedctl(h.seedctl.as_ref())?
            .args(["push", &m.name, "--timeout", "60", "--socket"])
            .arg(&chan),
    )?;
    println!("   $ seedctl push {}", m.name);
    show(&out);
    // A new connection: sshd still takes the operator's key and presents the pinned one.
    let live = b.ssh.login("hostname")?;
    println!(
        "   $ hostname (over ssh, same pinned key) -> {}",
        live.trim()
    );
    ensure!(
        live.trim() == "demo-pushed",
        "the pushed hostname is not live: {}",
        live.trim()
    );
    let said = agent(&h, &m, &qga, &["hostname"])?;
    ensure!(
        said.trim() == "demo-pushed",
        "the guest agent still answers the old hostname: {said}"
    );

    step(
        8,
        "shutdown through the guest agent (guest-shutdown), wait for QEMU to exit",
    );
    // guest-shutdown sends no reply on success: seedctl must exit 0 and QEMU must exit.
    let done = b.shutdown_via_agent(&h, &m)?;
    println!("   $ seedctl agent {} shutdown", m.name);
    show(&String::from_utf8_lossy(&done.said.stdout));
    show(&String::from_utf8_lossy(&done.said.stderr));
    println!(
        "   QEMU exited ({}) {:.1} s after guest-shutdown",
        done.qemu,
        done.took.as_secs_f64()
    );
    ensure!(done.qemu.success(), "QEMU exited with {}", done.qemu);
    println!("\ndemo done in {:.1} s", t0.elapsed().as_secs_f64());
    Ok(())
}
