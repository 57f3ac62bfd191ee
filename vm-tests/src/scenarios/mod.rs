//! Scenarios: each makes its own machine, boots it (one VM at a time) and asserts what an
//! operator would check by hand. `vm-tests test` prints `N passed, N failed` last.

use crate::cmd;
use crate::deps;
use crate::image::{self, GuestImage, Variant};
use crate::machine::{self, Machine, Seedctl};
use crate::paths::work_root;
use crate::qemu::{self, Accel, Vm, VmConfig};
use crate::ssh::{self, ClientKey, Ssh};
use anyhow::{Context, Result, bail, ensure};
use std::path::PathBuf;
use std::time::{Duration, Instant};

mod identity;
mod operator;
// nixseed behaviours an operator relies on (clones, Proxmox seeds, push, upgrade, hostile seeds, channel).
mod channel;
mod clones;
mod credentials;
mod crosscheck;
mod hostile;
mod libvirt;
mod powercut;
mod proxmox;
mod push;
mod upgrade;

/// Shared by every scenario in one run: image, client key, seedctl, accelerator.
pub struct Harness {
    pub work: PathBuf,
    pub image: GuestImage,
    pub key: ClientKey,
    pub seedctl: Option<Seedctl>,
    pub accel: Accel,
}

/// A VM whose sshd answered with the pinned key.
pub struct Booted {
    pub vm: Vm,
    pub ssh: Ssh,
    pub boot_to_sshd: Duration,
}

impl Booted {
    /// Waits until cloud-init has finished its run, and requires that it finished
    /// cleanly (`status: done`): a figure or a check taken from a run that failed would be
    /// no comparison. cloud-init restarts sshd in its later stages, which can cut the
    /// wait's own session: a cut wait is tried again, twice at most.
    pub fn wait_for_cloud_init(&self) -> Result<()> {
        let mut last = String::new();
        for _ in 0..3 {
            let Ok(o) = self.ssh.output("cloud-init status --wait --long") else {
                continue;
            };
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            if last.lines().any(|l| l.trim() == "status: done") {
                return Ok(());
            }
            if last.contains("status: error") || last.contains("status: degraded") {
                break;
            }
        }
        bail!("cloud-init did not finish cleanly:\n{last}")
    }
}

fn ssh_timeout() -> Duration {
    let secs = std::env::var("NIXSEED_SSH_TIMEOUT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    Duration::from_secs(secs)
}

impl Harness {
    pub fn setup(variant: Variant) -> Result<Harness> {
        deps::ensure_packages(deps::QEMU_PACKAGES)?;
        let tree_time = image::prepare_tree(variant)?;
        let agent = match variant {
            Variant::Nixseed => Some(deps::build_agent()?),
            Variant::CloudInit => None,
        };
        let mut image = image::prepare(variant, agent.as_deref())?;
        image.timings.tree = tree_time;
        let work = work_root();
        let key = ClientKey::ensure(&work)?;
        let seedctl = Seedctl::locate();
        let accel = qemu::detect_accel(&image.kernel);
        let took = |d: Option<Duration>| {
            d.map_or("cached".to_string(), |d| {
                format!("{:.1} s", d.as_secs_f64())
            })
        };
        eprintln!(
            "vm-tests: image {} (tree layer {}, final layer {}), accel {}",
            image.base_qcow2.display(),
            took(image.timings.tree),
            took(image.timings.final_layer),
            accel.as_str()
        );
        Ok(Harness {
            work,
            image,
            key,
            seedctl,
            accel,
        })
    }

    pub fn new_machine(&self, name: &str) -> Result<Machine> {
        machine::create(
            &self.work,
            name,
            &self.image,
            &self.key,
            self.seedctl.as_ref(),
        )
        .with_context(|| format!("creating machine {name}"))
    }

    /// Boots `m` and waits until sshd presents exactly the machine's host key.
    pub fn boot(&self, m: &Machine) -> Result<Booted> {
        let expected = m.host_key_pub()?;
        self.boot_with(m, Some(&expected), |_| {})
    }

    /// Boots `m` with `tweak` applied to its QEMU configuration (another seed disk, none,
    /// ...) and waits until sshd answers: with `expected` (`ssh-ed25519 AAAA…`) set, any
    /// other host key fails at once; with `None`, the first key seen is pinned.
    pub fn boot_with(
        &self,
        m: &Machine,
        expected: Option<&str>,
        tweak: impl FnOnce(&mut VmConfig),
    ) -> Result<Booted> {
        let port = qemu::free_port()?;
        let mut cfg = m.vm_config(&self.image, self.accel, port)?;
        let reach = qemu::free_port_besides(port)?;
        cfg.reach_port = Some(reach);
        tweak(&mut cfg);
        let mut vm = Vm::start(cfg)?;
        let seen = ssh::wait_for_host_key_via(port, Some(reach), expected, ssh_timeout(), || {
            vm.ensure_running()
        });
        let seen = match seen {
            Ok(k) => k,
            Err(e) => bail!("{e:#}\n{}", vm.diagnostics()),
        };
        let boot_to_sshd = vm.started.elapsed();
        eprintln!(
            "vm-tests: {}: sshd answered with the pinned key after {:.1} s",
            m.name,
            boot_to_sshd.as_secs_f64()
        );
        let ssh = Ssh::pinned(port, self.key.clone(), &seen, &m.state)?;
        Ok(Booted {
            vm,
            ssh,
            boot_to_sshd,
        })
    }
}

impl Booted {
    /// Powers the guest off from inside and waits for QEMU to exit.
    pub fn poweroff(mut self) -> Result<()> {
        // The connection may drop before ssh sees an exit status: only QEMU's exit counts.
        let t = Instant::now();
        let _ = self.ssh.output("systemctl poweroff --no-block");
        self.vm.wait_exit(Duration::from_secs(180))?;
        eprintln!(
            "vm-tests: {}: powered off in {:.1} s",
            self.vm.config.name,
            t.elapsed().as_secs_f64()
        );
        Ok(())
    }

    /// Ends a VM whose disks nothing boots again: QEMU is killed, as a power cut would.
    /// The clean shutdown costs several seconds under TCG and is checked by the
    /// scenarios that boot the same disks again and by `first-boot`'s shutdown through
    /// the guest agent.
    pub fn discard(mut self) -> Result<()> {
        self.vm.kill();
        Ok(())
    }

    /// Shuts the guest down the way a host does, `seedctl agent NAME shutdown`
    /// (guest-shutdown, which answers nothing on success): seedctl must report success
    /// and QEMU must exit. Returns what seedctl printed and QEMU's exit status.
    pub fn shutdown_via_agent(mut self, h: &Harness, m: &Machine) -> Result<AgentShutdown> {
        let t = Instant::now();
        let said = cmd::run(
            m.seedctl(h.seedctl.as_ref())?
                .args(["agent", &m.name, "--socket"])
                .arg(self.vm.config.qga_socket())
                .arg("shutdown"),
        )?;
        let qemu = self.vm.wait_exit(Duration::from_secs(180))?;
        let took = t.elapsed();
        eprintln!(
            "vm-tests: {}: shut down through the guest agent in {:.1} s",
            m.name,
            took.as_secs_f64()
        );
        Ok(AgentShutdown { said, qemu, took })
    }
}

/// What `Booted::shutdown_via_agent` saw.
pub struct AgentShutdown {
    /// seedctl's output (it exited 0).
    pub said: std::process::Output,
    /// QEMU's exit status.
    pub qemu: std::process::ExitStatus,
    /// From the request to QEMU's exit.
    pub took: Duration,
}

/// One scenario: a name and the check.
pub struct Scenario {
    pub name: &'static str,
    pub about: &'static str,
    pub run: fn(&Harness) -> Result<()>,
}

/// Every scenario, in the order `vm-tests test` runs them. One file per family.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "first-boot",
        about: "booted by `seedctl run`: sshd offers only the machine's key, `seedctl ssh` logs in, machine-id from the seed set in the initrd, / read-only with a writable tmpfs /tmp, the system running with no failed unit, none of the blacklisted drivers loaded, the static device nodes as `kmod static-nodes` lists them; `seedctl agent shutdown` powers it off",
        run: identity::first_boot,
    },
    Scenario {
        name: "reboot",
        about: "a reboot on the same disks keeps the generation and every identity file byte-identical",
        run: identity::reboot,
    },
    Scenario {
        name: "clones",
        about: "two machines on one base image: distinct machine-id, host key, hostname and DHCP client id; the base is unchanged",
        run: clones::clones,
    },
    Scenario {
        name: "proxmox",
        about: "Proxmox-made seeds (genisoimage cidata, ConfigDrive2): static IPv4/IPv6 on the NIC with the VM's MAC, hostname, root key, root's password on the read-only /etc (PAM's check), ssh_pwauth; a password set through guest-set-user-password holds across a reboot; a Nova config drive (network_data.json, public_keys)",
        run: proxmox::proxmox,
    },
    Scenario {
        name: "push",
        about: "seedctl push of hostname, ports and admin keys: applied live, same host key, nftables opens the port, seedctl status in sync",
        run: push::push,
    },
    Scenario {
        name: "push-first",
        about: "a seedless boot with no identity, then seedctl push: sshd starts with the pinned key; the reboot sets machine-id in the initrd",
        run: push::push_first,
    },
    Scenario {
        name: "upgrade",
        about: "seedctl upgrade onto a rebuilt base: /var and the identity kept, the root is the new base",
        run: upgrade::upgrade,
    },
    Scenario {
        name: "hostile",
        about: "malformed, path-traversing and 100 MB user-data, then no seed: the previous identity boots, the journal names user-data and, with no seed, where the agent looked",
        run: hostile::hostile,
    },
    Scenario {
        name: "channel",
        about: "first boot with no seed disk, identity over virtio-serial from seedctl serve; host silent on reboot: identity kept",
        run: channel::channel,
    },
    Scenario {
        name: "credentials",
        about: "no seed disk: systemd credentials in QEMU fw_cfg and SMBIOS type 11 give the hostname (fw_cfg's over SMBIOS's), machine-id and root key",
        run: credentials::credentials,
    },
    Scenario {
        name: "libvirt",
        about: "seedctl define/start on qemu:///system; virsh domifaddr/domhostname/guestinfo/domfsinfo/domfsfreeze through the agent; shutdown --mode agent",
        run: libvirt::libvirt,
    },
    Scenario {
        name: "crosscheck",
        about: "real cloud-init boots seedctl's seed to the same hostname, root keys and SSH host key; a seed of users and passwords ends in the same /etc/shadow password fields and sshd setting under both",
        run: crosscheck::crosscheck,
    },
    Scenario {
        name: "powercut",
        about: "QEMU killed at 22 delay points in the initrd apply and a live push: /var/identity is always one whole generation, then boots to sshd",
        run: powercut::powercut,
    },
];

/// The guest's live hostname is the one in `machines/NAME/hostname`; `when` says at which
/// point of the scenario ("after the first push", ...).
pub fn hostname_matches(ssh: &Ssh, m: &Machine, when: &str) -> Result<()> {
    let live = ssh.run("hostname")?;
    let want = m.read("hostname")?;
    ensure!(
        live.trim() == want,
        "hostname {when} is '{}', machines/{}/hostname says '{want}'",
        live.trim(),
        m.name
    );
    Ok(())
}

/// Lines of `systemctl --failed`, empty when all is well.
pub fn failed_units(ssh: &Ssh) -> Result<Vec<String>> {
    let out = ssh.run("systemctl --failed --no-legend --plain --no-pager")?;
    Ok(out
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect())
}

/// True when `findmnt` reports `/` mounted read-only.
pub fn root_is_read_only(ssh: &Ssh) -> Result<bool> {
    let opts = ssh.run("findmnt -no OPTIONS /")?;
    Ok(opts.trim().split(',').any(|o| o == "ro"))
}

/// The agent's timing lines ("nixseed <stage>: … in N ms") from this boot's journal.
/// How much a counter of `unit`'s main process grew over `secs` seconds. `counter` is a
/// shell command that prints it for the process `$p`; `what` names it in errors.
pub fn unit_counter_delta(
    b: &Booted,
    unit: &str,
    secs: u64,
    counter: &str,
    what: &str,
) -> Result<u64> {
    let out = b.ssh.run(&format!(
        "p=$(systemctl show -P MainPID {unit}); \
         t() {{ {counter}; }}; a=$(t); sleep {secs}; echo $(( $(t) - a ))"
    ))?;
    out.trim()
        .parse()
        .with_context(|| format!("{unit}'s {what} is not a number: '{}'", out.trim()))
}

/// For [`unit_counter_delta`]: how often the process's threads woke from a wait
/// (voluntary context switches).
pub const WAKEUPS: &str =
    "cat /proc/$p/task/*/status | awk '/^voluntary_ctxt_switches/ {s += $2} END {print s}'";

pub fn agent_timing_lines(ssh: &Ssh) -> Result<Vec<String>> {
    let out = ssh.run("journalctl -b --no-pager -o cat | grep -E 'nixseed [a-z0-9-]+: .* [0-9]+(\\.[0-9]+)? ms' || true")?;
    Ok(out.lines().map(String::from).collect())
}

/// How many lines of each failure the closing summary repeats.
const FAILURE_LINES: usize = 12;

/// Runs the named scenarios (all when empty); prints one line each and the summary.
pub fn run_tests(names: &[String]) -> Result<bool> {
    let chosen: Vec<&Scenario> = if names.is_empty() {
        SCENARIOS.iter().collect()
    } else {
        let mut v = Vec::new();
        for n in names {
            let s = SCENARIOS.iter().find(|s| s.name == n).with_context(|| {
                let known: Vec<&str> = SCENARIOS.iter().map(|s| s.name).collect();
                format!("unknown scenario '{n}' (known: {})", known.join(", "))
            })?;
            v.push(s);
        }
        v
    };
    let h = Harness::setup(Variant::Nixseed)?;
    let mut passed = 0;
    let mut failed: Vec<(&str, String)> = Vec::new();
    for s in chosen {
        let t = Instant::now();
        eprintln!("--- {}: {}", s.name, s.about);
        match (s.run)(&h) {
            Ok(()) => {
                passed += 1;
                eprintln!("PASS {} ({:.1} s)", s.name, t.elapsed().as_secs_f64());
            }
            Err(e) => {
                let took = t.elapsed().as_secs_f64();
                eprintln!("FAIL {} ({took:.1} s): {e:#}", s.name);
                failed.push((s.name, format!("{e:#}")));
            }
        }
    }
    // The failures again, last, so that the tail of a long log names them.
    for (name, error) in &failed {
        let first: Vec<&str> = error.lines().take(FAILURE_LINES).collect();
        eprintln!("FAILED {name}: {}", first.join("\n  "));
    }
    println!("{passed} passed, {} failed", failed.len());
    Ok(failed.is_empty())
}

/// What the coldplug's kinds of uevents cost: each kind triggered again in the booted
/// guest and settled, with udevd's and journald's CPU time around it. The NICs are left
/// out (an `add` on them would restart their configuration under the ssh session).
const COLDPLUG_COST: &str = r#"cpu() { echo $(( ($(systemctl show -p CPUUsageNSec --value systemd-udevd) + $(systemctl show -p CPUUsageNSec --value systemd-journald)) / 1000000 )); }
run() { label=$1; shift; udevadm settle; n=$(udevadm trigger --dry-run --verbose "$@" | wc -l); c0=$(cpu); t0=$(date +%s%N); udevadm trigger --action=add --settle "$@"; t1=$(date +%s%N); c1=$(cpu); echo "$label: $n uevents, wall $(( (t1-t0)/1000000 )) ms, CPU $((c1-c0)) ms"; }
names=$(grep -hoE 'SUBSYSTEM=="module", KERNEL=="[^"]+"' /usr/lib/udev/rules.d/*.rules /etc/udev/rules.d/*.rules 2>/dev/null | sed -E 's/.*KERNEL=="([^"]+)"/\1/' | sort -u)
echo "modules named by a rule: $names"
run "subsystems (buses, drivers, modules)" --type=subsystems
run "modules named by a rule" --type=subsystems --subsystem-match=module $(for n in $names; do printf -- '--sysname-match=%s ' "$n"; done)
run "devices but the NICs" --type=devices --subsystem-nomatch=net"#;

/// CPU time per unit, the largest first, then the guest's CPU counters and uptime.
const CPU_BY_UNIT: &str = r#"for u in $(systemctl list-units --all --no-legend --plain | awk '{print $1}'); do n=$(systemctl show -p CPUUsageNSec --value $u 2>/dev/null); case $n in ''|*[!0-9]*) ;; *) echo "$((n/1000000)) $u";; esac; done | sort -rn | head -20; head -1 /proc/stat; cat /proc/uptime"#;

/// `vm-tests boot-smoke`: one machine, first boot, a look around, poweroff.
pub fn boot_smoke(variant: Variant, append: &str, cpus: u32) -> Result<()> {
    let t = Instant::now();
    let h = Harness::setup(variant)?;
    let build = t.elapsed();
    let m = h.new_machine("smoke")?;
    println!(
        "machine {} provisioned by seedctl; accel {}",
        m.name,
        h.accel.as_str()
    );
    let expected = m.host_key_pub()?;
    let b = h.boot_with(&m, Some(&expected), |cfg| {
        cfg.cpus = cpus.max(1);
        if !append.is_empty() {
            cfg.append.push(' ');
            cfg.append.push_str(append);
        }
    })?;
    if variant == Variant::CloudInit {
        b.wait_for_cloud_init()?;
    }
    let show = |label: &str, cmd: &str| match b.ssh.output(cmd) {
        Ok(o) => println!(
            "== {label}\n{}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        ),
        Err(e) => println!("== {label}\n(error: {e:#})"),
    };
    show(
        "CPU time by unit (ms), before the look around: the boot's share and the harness's logins",
        CPU_BY_UNIT,
    );
    show("machine-id", "cat /etc/machine-id");
    show("hostname", "hostname; cat /etc/hostname");
    show(
        "findmnt / /var",
        "findmnt -no TARGET,SOURCE,FSTYPE,OPTIONS / ; findmnt -no TARGET,SOURCE,FSTYPE,OPTIONS /var",
    );
    show(
        "systemctl --failed",
        "systemctl --failed --no-legend --plain --no-pager",
    );
    show("initrd stage log", "cat /run/nixseed/initrd.log");
    show("kernel log", "dmesg | grep -i nixseed");
    show(
        "nixseed in the journal",
        "journalctl -b --no-pager -o short-monotonic | grep -i nixseed | tail -20",
    );
    show(
        "/var/identity",
        "ls -la /var/identity/ /var/identity/current/",
    );
    show(
        "sshd in the journal (the host's first scans)",
        "journalctl -b -u ssh -o short-monotonic --no-pager | head -8",
    );
    show(
        "networkd in the journal (the address sshd is reached on)",
        "journalctl -b -u systemd-networkd -o short-monotonic --no-pager | head -12",
    );
    show(
        "kernel: the longest gaps between its log lines (with `--append initcall_debug`, per initcall)",
        "dmesg | awk -F'[][]' '{t=$2+0; if (NR>1) printf \"%8.3f %s\\n\", t-p, l; p=t; l=$0}' | sort -rn | head -25",
    );
    show(
        "kernel: the slowest initcalls (µs, with `--append initcall_debug`) and when the initramfs and systemd began",
        "dmesg | sed -n 's/.*initcall \\(.*\\) returned .* after \\([0-9]*\\) usecs/\\2 \\1/p' | sort -rn | head -15; dmesg | grep -m1 -E 'Run /init|Freeing unused kernel'; dmesg | grep -m1 'systemd\\[1\\]'",
    );
    show(
        "kernel and CPU",
        "cat /proc/cmdline; grep -H . /sys/devices/system/cpu/vulnerabilities/* | sed 's|.*/||'",
    );
    show(
        "udevd: the NIC's events (with `--append udev.log_level=debug`, each step)",
        "journalctl -b -u systemd-udevd -u systemd-udev-trigger -o short-monotonic --no-pager | grep -E 'eth0|enp0s|Starting|Started|Finished' | head -40",
    );
    show(
        "coldplug: uevents udev-trigger sends (subsystems, devices, of which /sys/module)",
        "udevadm trigger --dry-run --verbose --type=subsystems | wc -l; udevadm trigger --dry-run --verbose --type=devices | wc -l; udevadm trigger --dry-run --verbose --type=devices | grep -c '^/sys/module/'; grep -l 'SUBSYSTEM==\"module\"' /usr/lib/udev/rules.d/* /lib/udev/rules.d/* 2>/dev/null",
    );
    show(
        "the guest agent and sshd: started, active (µs of the guest's clock), CPU so far (ns)",
        "for u in nixseed-agent.service qemu-guest-agent.service ssh.service; do echo \"$u:\" $(systemctl show -p ExecMainStartTimestampMonotonic -p ActiveEnterTimestampMonotonic -p CPUUsageNSec $u); done",
    );
    show(
        "coldplug cost: the same uevents again in the booted guest (wall ms, udevd + journald CPU ms)",
        COLDPLUG_COST,
    );
    show(
        "modules loaded (the initramfs's, then udev's)",
        "lsmod | awk 'NR>1 {print $1}' | sort | tr '\\n' ' '; echo; lsmod | tail -n +2 | wc -l",
    );
    show(
        "boot profile",
        "systemd-analyze; systemd-analyze critical-chain ssh.service --no-pager; systemd-analyze blame --no-pager | head -15",
    );
    show("CPU time by unit (ms)", CPU_BY_UNIT);
    let expected_id = m.machine_id()?;
    let got_id = b.ssh.run("cat /etc/machine-id")?;
    let to_sshd = b.boot_to_sshd;
    b.poweroff()?;
    println!(
        "image ready in {:.1} s (tree layer: {}, final layer: {})",
        build.as_secs_f64(),
        h.image
            .timings
            .tree
            .map_or("cached".into(), |d| format!("{:.1} s", d.as_secs_f64())),
        h.image
            .timings
            .final_layer
            .map_or("cached".into(), |d| format!("{:.1} s", d.as_secs_f64()))
    );
    println!(
        "boot to sshd with the pinned key: {:.1} s ({})",
        to_sshd.as_secs_f64(),
        h.accel.as_str()
    );
    // cloud-init leaves the machine-id to systemd; only nixseed takes it from the seed.
    ensure!(
        variant == Variant::CloudInit || got_id.trim() == expected_id,
        "/etc/machine-id is '{}' but machines/{}/machine-id is '{expected_id}'",
        got_id.trim(),
        m.name
    );
    Ok(())
}
