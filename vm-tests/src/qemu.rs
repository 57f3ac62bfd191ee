//! Plain QEMU runner: direct kernel boot of the test initramfs, the machine's overlay,
//! `/var` disk and seed, virtio-serial ports for the guest agent and the nixseed channel,
//! user-mode networking with ssh forwarded to a free local port, serial console to a file.

use crate::cmd;
use crate::paths::cache_root;
use anyhow::{Context, Result, bail};
use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const QGA_PORT: &str = "org.qemu.guest_agent.0";
pub const CHANNEL_PORT: &str = "org.nixseed.channel.0";
/// The QEMU device id of the control channel's port (for `device_del`/`device_add`).
pub const CHANNEL_DEVICE: &str = "nixseed-channel-port";
/// The QEMU device id of the guest agent's port.
pub const QGA_DEVICE: &str = "nixseed-qga-port";
/// The user network of [`VmConfig::extra_nic`]: apart from the main one (`10.0.2.0/24`),
/// so the guest's replies to the forwarded ports leave by the main NIC.
pub const EXTRA_NET: &str = "10.0.3.0/24";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    Tcg,
}

impl Accel {
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

/// Everything one boot needs.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// QEMU cache mode of the `/var` disk: `unsafe` (fast; guest flushes are ignored) for
    /// most scenarios, `writeback` where a killed QEMU must keep what the guest flushed.
    pub var_cache: &'static str,
    pub name: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    /// Root overlay (virtio disk 0).
    pub boot_disk: PathBuf,
    /// `/var` disk (virtio disk 1); the cloud-init variant has none.
    pub var_disk: Option<PathBuf>,
    pub seed_iso: Option<PathBuf>,
    pub product_uuid: String,
    pub mac: String,
    pub memory_mib: u32,
    pub cpus: u32,
    pub ssh_port: u16,
    /// A second forwarded port, to [`REACH_GUEST_PORT`] in the guest, where nothing
    /// listens: once the guest has its address its kernel answers there with a reset
    /// (`ssh::wait_for_host_key_via`).
    pub reach_port: Option<u16>,
    /// A second NIC with this MAC, ahead of the main one on the PCI bus, on a user network
    /// of its own (`10.0.3.0/24`, nothing forwarded, no way out): a VM with two NICs whose
    /// seed must find each by its MAC.
    pub extra_nic: Option<String>,
    /// More QEMU options, after the ones above (`-fw_cfg`, more `-smbios`).
    pub extra_args: Vec<String>,
    /// Sockets, serial log, pid file.
    pub runtime_dir: PathBuf,
    pub accel: Accel,
}

impl VmConfig {
    pub fn qga_socket(&self) -> PathBuf {
        self.runtime_dir.join("qga.sock")
    }
    pub fn channel_socket(&self) -> PathBuf {
        self.runtime_dir.join("nixseed-channel.sock")
    }
    pub fn serial_log(&self) -> PathBuf {
        self.runtime_dir.join("serial.log")
    }
    pub fn qmp_socket(&self) -> PathBuf {
        self.runtime_dir.join("qmp.sock")
    }

    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = vec![
            "-name".into(),
            self.name.clone(),
            "-machine".into(),
            format!("q35,accel={}", self.accel.as_str()),
            "-m".into(),
            self.memory_mib.to_string(),
            "-smp".into(),
            self.cpus.to_string(),
            "-nodefaults".into(),
            "-display".into(),
            "none".into(),
            "-no-user-config".into(),
            "-kernel".into(),
            self.kernel.display().to_string(),
            "-initrd".into(),
            self.initrd.display().to_string(),
            "-append".into(),
            self.append.clone(),
            "-smbios".into(),
            format!("type=1,uuid={}", self.product_uuid),
            "-uuid".into(),
            self.product_uuid.clone(),
            "-drive".into(),
            format!(
                "file={},if=virtio,format=qcow2,cache=unsafe,discard=unmap",
                self.boot_disk.display()
            ),
        ];
        // Under TCG, QEMU's default CPU model: the one `seedctl run` and seedctl's libvirt
        // domain boot, so every machine of the suite sees the same CPU.
        if self.accel == Accel::Kvm {
            a.extend(["-cpu".into(), "host".into()]);
        }
        if let Some(var) = &self.var_disk {
            a.push("-drive".into());
            a.push(format!(
                "file={},if=virtio,format=qcow2,cache={},discard=unmap",
                var.display(),
                self.var_cache
            ));
        }
        if let Some(seed) = &self.seed_iso {
            a.push("-drive".into());
            a.push(format!(
                "file={},media=cdrom,readonly=on,if=ide",
                seed.display()
            ));
        }
        if let Some(mac) = &self.extra_nic {
            a.extend([
                "-netdev".into(),
                format!("user,id=net1,net={EXTRA_NET},restrict=on"),
                "-device".into(),
                format!("virtio-net-pci,netdev=net1,mac={mac}"),
            ]);
        }
        let mut netdev = format!("user,id=net0,hostfwd=tcp:127.0.0.1:{}-:22", self.ssh_port);
        if let Some(p) = self.reach_port {
            netdev.push_str(&format!(",hostfwd=tcp:127.0.0.1:{p}-:{REACH_GUEST_PORT}"));
        }
        a.extend([
            "-netdev".into(),
            netdev,
            "-device".into(),
            format!("virtio-net-pci,netdev=net0,mac={}", self.mac),
            "-device".into(),
            "virtio-rng-pci".into(),
            "-device".into(),
            "virtio-serial-pci,id=vser0".into(),
            "-chardev".into(),
            format!(
                "socket,id={QGA_CHARDEV},path={},server=on,wait=off",
                self.qga_socket().display()
            ),
            "-device".into(),
            QGA.device_arg(),
            "-chardev".into(),
            format!(
                "socket,id={CHANNEL_CHARDEV},path={},server=on,wait=off",
                self.channel_socket().display()
            ),
            "-device".into(),
            CHANNEL.device_arg(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", self.qmp_socket().display()),
            "-serial".into(),
            format!("file:{}", self.serial_log().display()),
            "-pidfile".into(),
            self.runtime_dir.join("qemu.pid").display().to_string(),
        ]);
        a.extend(self.extra_args.iter().cloned());
        a
    }
}

/// A running QEMU; killed when dropped.
pub struct Vm {
    pub config: VmConfig,
    child: Option<Child>,
    pub started: Instant,
}

/// The chardev id of the guest agent's port (`-chardev socket,id=…`).
const QGA_CHARDEV: &str = "qga0";
/// The chardev id of the control channel's port.
const CHANNEL_CHARDEV: &str = "chan0";

/// A virtio-serial port of the VM, as QEMU's monitor names it.
pub struct SerialPort {
    pub chardev: &'static str,
    /// The port's name in the guest (`/dev/virtio-ports/NAME`).
    pub name: &'static str,
    /// The QEMU device id.
    pub id: &'static str,
}

impl SerialPort {
    /// The port's `-device` argument on QEMU's command line.
    fn device_arg(&self) -> String {
        format!(
            "virtserialport,bus=vser0.0,chardev={},name={},id={}",
            self.chardev, self.name, self.id
        )
    }
}

pub const QGA: SerialPort = SerialPort {
    chardev: QGA_CHARDEV,
    name: QGA_PORT,
    id: QGA_DEVICE,
};
pub const CHANNEL: SerialPort = SerialPort {
    chardev: CHANNEL_CHARDEV,
    name: CHANNEL_PORT,
    id: CHANNEL_DEVICE,
};

impl Vm {
    /// Unplugs `port` from the running VM (QMP `device_del`, what `virsh detach-device
    /// --live` asks of QEMU).
    pub fn unplug(&self, port: &SerialPort) -> Result<()> {
        self.qmp("device_del", serde_json::json!({"id": port.id}))
            .with_context(|| format!("unplugging {}", port.name))
            .map(drop)
    }

    /// Plugs `port` into the running VM (QMP `device_add`, what `virsh attach-device
    /// --live` asks of QEMU); one attempt.
    pub fn plug(&self, port: &SerialPort) -> Result<()> {
        self.qmp(
            "device_add",
            serde_json::json!({"driver": "virtserialport", "bus": "vser0.0",
                               "chardev": port.chardev, "name": port.name, "id": port.id}),
        )
        .map(drop)
    }

    /// One command on this VM's QMP monitor (a fresh session: greeting, capabilities,
    /// then `execute`); its `return`, or its `error` as an error. Events are skipped.
    pub fn qmp(&self, execute: &str, arguments: serde_json::Value) -> Result<serde_json::Value> {
        use std::io::{BufRead, BufReader, Write};
        let path = self.config.qmp_socket();
        let stream = std::os::unix::net::UnixStream::connect(&path)
            .with_context(|| format!("connecting to QEMU's monitor {}", path.display()))?;
        let mut writer = stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .and_then(|()| stream.try_clone())
            .with_context(|| format!("setting up {}", path.display()))?;
        let mut lines = BufReader::new(stream).lines();
        let mut reply = |request: serde_json::Value| -> Result<serde_json::Value> {
            writeln!(writer, "{request}")
                .with_context(|| format!("writing to {}", path.display()))?;
            loop {
                let line = lines
                    .next()
                    .with_context(|| {
                        format!("{} closed before answering {request}", path.display())
                    })?
                    .with_context(|| format!("reading {}", path.display()))?;
                let v: serde_json::Value = serde_json::from_str(&line)
                    .with_context(|| format!("QMP sent something not JSON: {line}"))?;
                if let Some(r) = v.get("return") {
                    return Ok(r.clone());
                }
                if let Some(e) = v.get("error") {
                    bail!("QMP {request} on {}: {e}", path.display());
                }
            }
        };
        reply(serde_json::json!({"execute": "qmp_capabilities"}))?;
        reply(serde_json::json!({"execute": execute, "arguments": arguments}))
    }

    pub fn start(config: VmConfig) -> Result<Vm> {
        fs::create_dir_all(&config.runtime_dir)
            .with_context(|| format!("creating {}", config.runtime_dir.display()))?;
        for s in [
            config.qga_socket(),
            config.channel_socket(),
            config.serial_log(),
            config.qmp_socket(),
        ] {
            let _ = fs::remove_file(s);
        }
        let log = config.runtime_dir.join("qemu.log");
        let logf = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut c = Command::new("qemu-system-x86_64");
        c.args(config.args())
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        fs::write(config.runtime_dir.join("qemu.cmdline"), cmd::describe(&c))
            .with_context(|| format!("writing {}/qemu.cmdline", config.runtime_dir.display()))?;
        let child = c
            .spawn()
            .context("cannot start qemu-system-x86_64 (try `vm-tests deps`)")?;
        Ok(Vm {
            config,
            child: Some(child),
            started: Instant::now(),
        })
    }

    /// `Some(status)` once QEMU has exited.
    pub fn exited(&mut self) -> Result<Option<ExitStatus>> {
        match &mut self.child {
            Some(c) => Ok(c.try_wait().context("waiting for qemu")?),
            None => bail!("VM {} was already stopped", self.config.name),
        }
    }

    /// Fails with the tail of the serial console and QEMU's own log if QEMU has exited.
    pub fn ensure_running(&mut self) -> Result<()> {
        if let Some(status) = self.exited()? {
            bail!(
                "VM {} stopped ({status}) while it should be running\n{}",
                self.config.name,
                self.diagnostics()
            );
        }
        Ok(())
    }

    /// Waits for QEMU to exit on its own (guest poweroff).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.exited()? {
                self.child = None;
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!(
                    "VM {} did not power off within {} s\n{}",
                    self.config.name,
                    timeout.as_secs(),
                    self.diagnostics()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn serial_text(&self) -> String {
        cmd::read_lossy(&self.config.serial_log())
    }

    /// The last lines of the serial console and QEMU's stderr, for error messages.
    pub fn diagnostics(&self) -> String {
        let qemu = cmd::read_lossy(&self.config.runtime_dir.join("qemu.log"));
        format!(
            "--- serial console ({}), last lines ---\n{}\n--- qemu ---\n{}",
            self.config.serial_log().display(),
            crate::cmd::log_tail(&self.config.serial_log(), 40),
            qemu.trim()
        )
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A local TCP port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a probe socket on 127.0.0.1")?;
    Ok(l.local_addr()?.port())
}

/// The guest port the reach probes go to: TCP discard, which no image serves.
pub const REACH_GUEST_PORT: u16 = 9;

/// Another free local port than `taken`.
pub fn free_port_besides(taken: u16) -> Result<u16> {
    for _ in 0..8 {
        let p = free_port()?;
        if p != taken {
            return Ok(p);
        }
    }
    bail!("no free local port besides {taken}")
}

/// KVM only if a short probe boot of `kernel` actually runs under it (`/dev/kvm` can exist
/// and hang). `NIXSEED_ACCEL=kvm|tcg` overrides; the answer is cached per host boot.
pub fn detect_accel(kernel: &Path) -> Accel {
    match std::env::var("NIXSEED_ACCEL").as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    if !Path::new("/dev/kvm").exists() {
        return Accel::Tcg;
    }
    let boot_id = fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap_or_default();
    let cache = cache_root().join(format!("accel-{}", boot_id.trim()));
    match fs::read_to_string(&cache).as_deref() {
        Ok("kvm") => return Accel::Kvm,
        Ok("tcg") => return Accel::Tcg,
        _ => {}
    }
    let accel = if probe_kvm(kernel) {
        Accel::Kvm
    } else {
        Accel::Tcg
    };
    let _ = fs::create_dir_all(cache_root());
    let _ = fs::write(&cache, accel.as_str());
    accel
}

/// Boots the kernel with no root under KVM: it panics within seconds if KVM works.
fn probe_kvm(kernel: &Path) -> bool {
    let Ok(dir) = std::env::temp_dir().canonicalize() else {
        return false;
    };
    let log = dir.join(format!("nixseed-kvm-probe-{}.log", std::process::id()));
    let child = Command::new("qemu-system-x86_64")
        .args([
            "-machine",
            "q35,accel=kvm",
            "-m",
            "256",
            "-nodefaults",
            "-display",
            "none",
            "-no-reboot",
        ])
        .arg("-kernel")
        .arg(kernel)
        .args(["-append", "console=ttyS0 panic=-1"])
        .arg("-serial")
        .arg(format!("file:{}", log.display()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
    let Ok(mut child) = child else { return false };
    let deadline = Instant::now() + Duration::from_secs(20);
    let ok = loop {
        match child.try_wait() {
            Ok(Some(_)) => break cmd::read_lossy(&log).contains("Kernel panic"),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
            _ => {
                let _ = child.kill();
                // A process stuck in the KVM ioctl may not die at once; do not wait on it.
                break false;
            }
        }
    };
    let _ = fs::remove_file(&log);
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn args_wire_ports_disks_and_smbios() {
        let cfg = VmConfig {
            var_cache: "unsafe",
            name: "t".into(),
            kernel: "/k".into(),
            initrd: "/i".into(),
            append: "console=ttyS0 ro".into(),
            boot_disk: "/b.qcow2".into(),
            var_disk: Some("/v.qcow2".into()),
            seed_iso: Some("/s.iso".into()),
            product_uuid: "4c3f6a8e-0000-4000-8000-000000000001".into(),
            mac: "52:54:00:12:34:56".into(),
            memory_mib: 1024,
            cpus: 1,
            ssh_port: 2222,
            reach_port: Some(2223),
            extra_nic: None,
            extra_args: Vec::new(),
            runtime_dir: "/run/t".into(),
            accel: Accel::Tcg,
        };
        let a = cfg.args().join(" ");
        assert!(a.contains("q35,accel=tcg"));
        assert!(a.contains("type=1,uuid=4c3f6a8e-0000-4000-8000-000000000001"));
        assert!(a.contains("hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=tcp:127.0.0.1:2223-:9"));
        assert!(a.contains("name=org.qemu.guest_agent.0"));
        assert!(a.contains("name=org.nixseed.channel.0"));
        assert!(a.contains("file=/v.qcow2,if=virtio"));
        assert!(a.contains("file=/s.iso,media=cdrom"));
        assert!(!a.contains("id=net1"));
        let two = VmConfig {
            extra_nic: Some("52:54:00:aa:bb:cc".into()),
            extra_args: Vec::new(),
            ..cfg
        }
        .args()
        .join(" ");
        let extra = two.find("netdev=net1,mac=52:54:00:aa:bb:cc");
        let main = two.find("netdev=net0,mac=52:54:00:12:34:56");
        assert!(
            extra.is_some() && main.is_some() && extra < main,
            "the second NIC must come first on the bus: {two}"
        );
        assert!(two.contains("user,id=net1,net=10.0.3.0/24,restrict=on"));
    }
}
