//! The guest image: a Debian bookworm tree shaped like the immutable nixseed NixOS VM.
//!
//! Two cache layers under `~/.cache/nixseed/images/`:
//! 1. `<tree-key>/` — debootstrap plus configuration, and `rootfs.ext4` made from it.
//!    The key hashes the variant, the package list, the variant's own settings and
//!    [`IMAGE_CODE_VERSION`]; this layer
//!    takes minutes and is rebuilt only when one of those changes.
//! 2. `<tree-key>/final-<key>/` — `base.qcow2` with the agent binary and `agent/dist/`
//!    injected by `debugfs` (no mount, seconds), and the test initramfs. Rebuilding the
//!    agent only redoes this layer.

use crate::cmd::{self, hex};
use crate::paths::{cache_root, workspace_root};
use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// Bump when the image-building code changes what ends up in the tree.
pub const IMAGE_CODE_VERSION: u32 = 7;
/// Bump when the final layer (injection, initramfs) changes.
pub const FINAL_CODE_VERSION: u32 = 4;

pub const SUITE: &str = "bookworm";
pub const ROOT_LABEL: &str = "nixseed-root";
pub const VAR_LABEL: &str = "nixseed-var";
/// Sparse size of the root filesystem; qcow2 stores only what is used.
const ROOTFS_SIZE: &str = "2G";
/// Where the agent binary lives in the image (the dist units' ExecStart).
pub const AGENT_PATH_IN_IMAGE: &str = "/usr/bin/nixseed-agent";

/// The guest agent's own program, built beside `nixseed-agent` and installed beside it
/// in the image, where `nixseed-agent serve` becomes it. An agent given without it
/// (`NIXSEED_AGENT_BIN`) serves from its own process.
const GUEST_AGENT_NAME: &str = "nixseed-guest-agent";

fn guest_agent_beside(agent: &Path) -> Option<PathBuf> {
    Some(agent.with_file_name(GUEST_AGENT_NAME)).filter(|p| p.is_file())
}

const BASE_PACKAGES: &[&str] = &[
    "systemd",
    "systemd-sysv",
    "libpam-systemd",
    "dbus",
    "udev",
    "openssh-server",
    "iproute2",
    "nftables",
    "kmod",
    "e2fsprogs",
    "procps",
    "sudo",
    "linux-image-amd64",
];
const CLOUD_INIT_PACKAGES: &[&str] = &["cloud-init", "qemu-guest-agent", "python3-cffi-backend"];
/// cloud.cfg.d drop-in of the cloud-init variant (part of its tree key). minbase has no
/// `locales`: cloud-init's default `en_US.UTF-8` makes `update-locale` fail and the run end
/// in `status: error`, while `C.UTF-8` is built into glibc.
const CLOUD_INIT_CFG: &str = "datasource_list: [ NoCloud, None ]\nlocale: C.UTF-8\n";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Variant {
    /// Read-only root, `/var` on a second disk, identity from nixseed.
    Nixseed,
    /// Debian's cloud-init and qemu-guest-agent on a writable root: the benchmark anchor.
    CloudInit,
}

impl Variant {
    pub fn name(self) -> &'static str {
        match self {
            Variant::Nixseed => "nixseed",
            Variant::CloudInit => "cloud-init",
        }
    }
    pub fn packages(self) -> Vec<&'static str> {
        let mut p = BASE_PACKAGES.to_vec();
        if self == Variant::CloudInit {
            p.extend_from_slice(CLOUD_INIT_PACKAGES);
        }
        p
    }
}

/// A bootable image: disk, kernel, initramfs.
#[derive(Clone, Debug)]
pub struct GuestImage {
    pub variant: Variant,
    pub base_qcow2: PathBuf,
    /// The kernel to boot: the uncompressed ELF when it can be entered through PVH
    /// (see `kernel.rs`), otherwise the bzImage.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub kernel_release: String,
    /// The configured tree, for tests that want to look at what is in the image.
    pub tree: PathBuf,
    pub timings: BuildTimings,
}

#[derive(Clone, Debug, Default)]
pub struct BuildTimings {
    /// `None` when the tree came from the cache.
    pub tree: Option<Duration>,
    pub final_layer: Option<Duration>,
    pub total: Duration,
}

/// Builds (or takes from the cache) the image for `variant`. `agent` is injected into the
/// nixseed variant and its initramfs.
pub fn prepare(variant: Variant, agent: Option<&Path>) -> Result<GuestImage> {
    let start = Instant::now();
    let mut timings = BuildTimings {
        tree: prepare_tree(variant)?,
        ..Default::default()
    };
    let tree_dir = tree_dir(variant);
    let kernel_release = fs::read_to_string(tree_dir.join("kernel-release"))
        .with_context(|| format!("reading {}/kernel-release", tree_dir.display()))?
        .trim()
        .to_string();
    let tree = tree_dir.join("tree");
    let dist = workspace_root().join("agent/dist");
    let key = final_key(agent, &dist)?;
    let final_dir = tree_dir.join(format!("final-{}", &key[..16]));
    if !final_dir.join("ready").exists() {
        let t = Instant::now();
        build_final_layer(
            variant,
            &tree_dir,
            &final_dir,
            agent,
            &dist,
            &kernel_release,
        )?;
        timings.final_layer = Some(t.elapsed());
        prune_final_layers(&tree_dir, &final_dir);
    }
    timings.total = start.elapsed();
    Ok(GuestImage {
        variant,
        base_qcow2: final_dir.join("base.qcow2"),
        kernel: crate::kernel::bootable(&tree_dir.join("vmlinuz")),
        initramfs: final_dir.join("initramfs.cpio"),
        kernel_release,
        tree,
        timings,
    })
}

/// The cached tree layer's directory for `variant`.
pub fn tree_dir(variant: Variant) -> PathBuf {
    cache_root().join("images").join(tree_key(variant))
}

/// Builds the slow layer (debootstrap) unless cached; returns how long it took if built.
pub fn prepare_tree(variant: Variant) -> Result<Option<Duration>> {
    // Also with the tree cached: QEMU, qemu-img, xorriso and mtools boot and seed every VM,
    // and a machine may have the cache without them.
    crate::deps::ensure_packages(crate::deps::QEMU_PACKAGES)?;
    let dir = tree_dir(variant);
    if dir.join("ready").exists() {
        return Ok(None);
    }
    let t = Instant::now();
    build_tree_layer(variant, &dir)?;
    prune_old_trees(variant, &dir);
    Ok(Some(t.elapsed()))
}

/// Older trees of the same variant (a previous package list or code version) go away.
fn prune_old_trees(variant: Variant, keep: &Path) {
    let Some(parent) = keep.parent() else { return };
    let Ok(rd) = fs::read_dir(parent) else { return };
    let prefix = format!("{}-", variant.name());
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let rest = name.strip_prefix(&prefix);
        // "nixseed-<hex>" only: do not mistake "cloud-init-…" for a "cloud-…" variant.
        if rest.is_some_and(|r| r.len() == 16 && r.bytes().all(|b| b.is_ascii_hexdigit()))
            && e.path() != keep
        {
            eprintln!("vm-tests: removing outdated image {}", e.path().display());
            let _ = fs::remove_dir_all(e.path());
        }
    }
}

/// Everything the tree layer writes into the tree that is data rather than code: each
/// one is part of [`tree_key`], so a change to any of them builds a new tree. A change to
/// the code that writes them bumps [`IMAGE_CODE_VERSION`] instead.
fn tree_inputs(variant: Variant) -> Vec<String> {
    let mut inputs = vec![
        format!(
            "variant={}\ncode={IMAGE_CODE_VERSION}\nsuite={SUITE}\npackages={}\n",
            variant.name(),
            variant.packages().join(",")
        ),
        LEAN_MODULES.join(","),
        LEAN_UNITS.join(","),
        LEAN_ENABLED.join(","),
        LEAN_GENERATORS.join(","),
        udev_trigger_dropin(),
        SSH_CHECKED_AT_BUILD.into(),
        FALLBACK_NETWORK.into(),
        JOURNALD_DROPIN.into(),
        COMMON_ENABLED.join(","),
        COMMON_DISABLED.join(","),
        fstab(variant),
    ];
    match variant {
        Variant::CloudInit => inputs.push(CLOUD_INIT_CFG.into()),
        Variant::Nixseed => inputs.extend([
            FACTORY_ONLY.join(","),
            SSHD_NIXSEED.into(),
            SUDOERS_NIXSEED.into(),
            PLACEHOLDERS.join(","),
            HOSTS_BASE.into(),
        ]),
    }
    inputs
}

fn tree_key(variant: Variant) -> String {
    let mut h = Sha256::new();
    for input in tree_inputs(variant) {
        h.update((input.len() as u64).to_le_bytes());
        h.update(input.as_bytes());
    }
    format!("{}-{}", variant.name(), &hex(&h.finalize())[..16])
}

/// sshd's drop-in in the nixseed image. The seed's `ssh_pwauth` comes first, as sshd
/// takes the first value it reads (docs/identity.md, "Passwords").
const SSHD_NIXSEED: &str = "# The seed's ssh_pwauth, written by nixseed at boot.\n\
     Include /run/nixseed/sshd_config.d/*.conf\n\
     # Host key and admin keys come from the machine's identity on its /var disk.\n\
     HostKey /var/identity/ssh_host_ed25519_key\n\
     AuthorizedKeysFile /var/identity/admin_authorized_keys\n\
     PermitRootLogin prohibit-password\n\
     PasswordAuthentication no\n\
     KbdInteractiveAuthentication no\n";

/// `/etc/default/nixseed` in the test image.
const AGENT_DEFAULTS: &str = "NIXSEED_SERVE_ARGS=--firewall\n";

fn final_key(agent: Option<&Path>, dist: &Path) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!(
        "final={FINAL_CODE_VERSION}\ninitramfs={}\n",
        crate::initramfs::INITRAMFS_CODE_VERSION
    ));
    // Every input of the final layer, so that a change to any of them is a new layer
    // without a version bump: the initramfs's /init, its module list and the busybox it
    // copies from the host, the agent's defaults file and sshd's start-limit drop-in.
    h.update(crate::initramfs::INIT.as_bytes());
    h.update(format!("modules={}\n", crate::initramfs::MODULES.join(",")));
    // (When busybox is missing, building the layer says so.)
    if let Ok(d) = sha256_file(Path::new(crate::initramfs::BUSYBOX)) {
        h.update(d);
    }
    h.update(AGENT_DEFAULTS.as_bytes());
    h.update(SSH_START_LIMIT.as_bytes());
    if let Some(a) = agent {
        h.update(b"agent:");
        h.update(sha256_file(a)?);
        if let Some(g) = guest_agent_beside(a) {
            h.update(b"guest-agent:");
            h.update(sha256_file(&g)?);
        }
    }
    for f in dist_files(dist)? {
        h.update(
            f.file_name()
                .map(|n| n.as_encoded_bytes())
                .unwrap_or_default(),
        );
        h.update(sha256_file(&f)?);
    }
    Ok(hex(&h.finalize()))
}

pub fn sha256_file(p: &Path) -> Result<Vec<u8>> {
    let bytes = fs::read(p).with_context(|| format!("reading {}", p.display()))?;
    Ok(Sha256::digest(&bytes).to_vec())
}

/// Files shipped in `agent/dist/`, sorted (missing directory: none).
pub fn dist_files(dist: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if !dist.is_dir() {
        return Ok(out);
    }
    for e in fs::read_dir(dist).with_context(|| format!("listing {}", dist.display()))? {
        let p = e?.path();
        if p.is_file() {
            out.push(p);
        }
    }
    out.sort();
    Ok(out)
}

/// The Debian mirror apt uses on this host (same URL, so the same proxy rules apply).
pub fn debian_mirror() -> String {
    if let Ok(m) = std::env::var("NIXSEED_DEBIAN_MIRROR") {
        return m;
    }
    let mut texts = Vec::new();
    if let Ok(rd) = fs::read_dir("/etc/apt/sources.list.d") {
        let mut paths: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        paths.sort();
        texts.extend(paths.iter().filter_map(|p| {
            let n = p.to_string_lossy();
            (n.ends_with(".sources") || n.ends_with(".list")).then(|| fs::read_to_string(p).ok())?
        }));
    }
    texts.extend(fs::read_to_string("/etc/apt/sources.list").ok());
    for text in &texts {
        if let Some(m) = mirror_from_sources(text) {
            return m;
        }
    }
    "http://deb.debian.org/debian".to_string()
}

/// Finds the URI serving the plain `bookworm` suite in deb822 or one-line sources.
fn mirror_from_sources(text: &str) -> Option<String> {
    for stanza in text.split("\n\n") {
        let field = |k: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(k).map(|v| v.trim().to_string()))
        };
        if let (Some(uris), Some(suites)) = (field("URIs:"), field("Suites:"))
            && suites.split_whitespace().any(|s| s == SUITE)
            && field("Enabled:").is_none_or(|e| e != "no")
        {
            return uris.split_whitespace().next().map(String::from);
        }
    }
    text.lines().find_map(|l| {
        let mut w = l.split_whitespace().filter(|w| !w.starts_with('['));
        (w.next()? == "deb").then_some(())?;
        let uri = w.next()?;
        (w.next()? == SUITE).then(|| uri.to_string())
    })
}

fn build_tree_layer(variant: Variant, dir: &Path) -> Result<()> {
    let tmp = dir.join("tree.tmp");
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing stale {}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let debs = cache_root().join("debs");
    fs::create_dir_all(&debs).with_context(|| format!("creating {}", debs.display()))?;
    let mirror = debian_mirror();
    let log = dir.join("debootstrap.log");
    eprintln!(
        "vm-tests: debootstrap {SUITE} ({}) into {} — several minutes; log: {}",
        variant.name(),
        tmp.display(),
        log.display()
    );
    let logf = fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let status = Command::new("debootstrap")
        .arg("--variant=minbase")
        .arg(format!("--include={}", variant.packages().join(",")))
        .arg(format!("--cache-dir={}", debs.display()))
        .arg(SUITE)
        .arg(&tmp)
        .arg(&mirror)
        // The kernel's postinst hook skips building a Debian initramfs we never use.
        .env("INITRD", "No")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .stdin(std::process::Stdio::null())
        .stdout(logf.try_clone()?)
        .stderr(logf)
        .status()
        .context("cannot start debootstrap (try `vm-tests deps`)")?;
    if !status.success() {
        bail!(
            "debootstrap {SUITE} from {mirror} failed ({status}); last lines of {}:\n{}",
            log.display(),
            crate::cmd::log_tail(&log, 30)
        );
    }
    let release = kernel_release(&tmp)?;
    let vmlinuz = tmp.join(format!("boot/vmlinuz-{release}"));
    fs::copy(&vmlinuz, dir.join("vmlinuz"))
        .with_context(|| format!("copying {}", vmlinuz.display()))?;
    match variant {
        Variant::Nixseed => configure_nixseed(&tmp)?,
        Variant::CloudInit => configure_cloud_init(&tmp)?,
    }
    check_sshd_config(&tmp)?;
    // sudo refuses to run at all over a sudoers file it cannot parse.
    cmd::run(
        Command::new("chroot")
            .arg(&tmp)
            .args(["visudo", "-c", "-q"]),
    )
    .with_context(|| format!("checking {}'s sudoers", tmp.display()))?;
    mark_etc_updated(&tmp)?;
    let tree = dir.join("tree");
    if tree.exists() {
        fs::remove_dir_all(&tree).with_context(|| format!("removing {}", tree.display()))?;
    }
    fs::rename(&tmp, &tree)
        .with_context(|| format!("renaming {} to {}", tmp.display(), tree.display()))?;
    let rootfs = dir.join("rootfs.ext4");
    let _ = fs::remove_file(&rootfs);
    mkfs_ext4_from(&tree, &rootfs, ROOT_LABEL, ROOTFS_SIZE)?;
    write(&dir.join("kernel-release"), &format!("{release}\n"))?;
    write(&dir.join("ready"), "")?;
    Ok(())
}

fn kernel_release(tree: &Path) -> Result<String> {
    let dir = tree.join("lib/modules");
    let mut rel: Vec<String> = fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    rel.sort();
    rel.pop()
        .with_context(|| format!("no kernel under {}", dir.display()))
}

/// `mkfs.ext4 -d`: a filesystem image from a directory, no mount needed.
pub fn mkfs_ext4_from(tree: &Path, image: &Path, label: &str, size: &str) -> Result<()> {
    cmd::run(
        Command::new("mkfs.ext4")
            .args(["-q", "-F", "-L", label, "-d"])
            .arg(tree)
            .arg(image)
            .arg(size),
    )
    .map(|_| ())
}

fn write(p: &Path, content: &str) -> Result<()> {
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
    }
    fs::write(p, content).with_context(|| format!("writing {}", p.display()))
}

fn chroot_systemctl(tree: &Path, args: &[&str]) -> Result<()> {
    cmd::run(Command::new("chroot").arg(tree).arg("systemctl").args(args)).map(|_| ())
}

fn unit_exists(tree: &Path, unit: &str) -> bool {
    [
        "lib/systemd/system",
        "usr/lib/systemd/system",
        "etc/systemd/system",
    ]
    .iter()
    .any(|d| tree.join(d).join(unit).exists())
}

/// The nixseed test image's drop-in for Debian's ssh.service (five failed starts, then
/// refused for an hour).
const SSH_START_LIMIT: &str = "[Unit]\nStartLimitIntervalSec=1h\n";

/// Both images' drop-in for Debian's ssh.service: sshd's configuration is part of the
/// read-only base, so [`check_sshd_config`] checks it once when the image is built, as
/// NixOS checks the sshd_config it generates, instead of `sshd -t` before every start
/// (one more run of sshd, its crypto library and its configuration on the boot's path).
/// `systemctl reload` still runs Debian's `sshd -t` first.
const SSH_CHECKED_AT_BUILD: &str = "# The nixseed test base: sshd_config is checked when the image is built.\n\
                                    [Service]\n\
                                    ExecStartPre=\n";

const HOSTS_BASE: &str = "127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\nff02::1\t\tip6-allnodes\nff02::2\t\tip6-allrouters\n";

const FALLBACK_NETWORK: &str = "# Any wired NIC gets DHCP unless nixseed linked a rendered .network into /run\n# (those sort first, so they win).\n[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n";

/// Drivers udev would load for the emulated machine that a VM guest with a serial
/// console has no use for: nested virtualisation, Wi-Fi, graphics, the PC speaker and
/// mouse, the chipset's watchdog and SMBus, the kernel's accelerated crypto (sshd
/// does its crypto in user space), and what the emulated CPU's model matches: memory
/// error reporting (EDAC) and frequency scaling, which find no hardware and fail.
/// Under TCG each one costs a module load at boot.
pub const LEAN_MODULES: &[&str] = &[
    "kvm",
    "kvm_amd",
    "kvm_intel",
    "ccp",
    "irqbypass",
    "cfg80211",
    "rfkill",
    "drm",
    "bochs",
    "psmouse",
    "pcspkr",
    "serio_raw",
    "evdev",
    "joydev",
    "button",
    "iTCO_wdt",
    "iTCO_vendor_support",
    "intel_pmc_bxt",
    "i2c_i801",
    "i2c_smbus",
    "lpc_ich",
    "sg",
    "aesni_intel",
    "crypto_simd",
    "cryptd",
    "ghash_clmulni_intel",
    "sha1_ssse3",
    "sha256_ssse3",
    "sha512_ssse3",
    "crc32_pclmul",
    "crct10dif_pclmul",
    "efi_pstore",
    "edac_mce_amd",
    "amd64_edac",
    "powernow_k8",
    "pcc_cpufreq",
    "acpi_cpufreq",
];

/// Units with nothing to do in a VM driven over its serial console: systemd's early loads
/// of modules nothing here uses (loop devices, device mapper, FUSE, configfs, DRM, EFI
/// pstore; the mounts that would need them are skipped by their own conditions), the
/// debugfs and tracefs mounts, a login prompt on a virtual terminal no one can see
/// (`-nodefaults`: no display), the generator of networkd files from `ip=` on the
/// kernel command line (the images never pass one), and `kmod static-nodes`, whose list
/// depends only on the image's kernel and is written when the image is built
/// ([`STATIC_NODES`]). Also the remount of `/` with its fstab options (the initramfs
/// mounts it with exactly those, and fstab lists no other file system the unit
/// remounts) and the hugetlbfs mount (no huge pages are reserved).
const LEAN_UNITS: &[&str] = &[
    "modprobe@configfs.service",
    "modprobe@dm_mod.service",
    "modprobe@drm.service",
    "modprobe@efi_pstore.service",
    "modprobe@fuse.service",
    "modprobe@loop.service",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "getty@tty1.service",
    "systemd-network-generator.service",
    "kmod-static-nodes.service",
    "systemd-remount-fs.service",
    "dev-hugepages.mount",
];

/// The units of [`LEAN_UNITS`] that Debian enables (the rest are static).
const LEAN_ENABLED: &[&str] = &["getty@tty1.service", "systemd-network-generator.service"];

/// Generators with nothing to generate here (no crypttab, veritytab or integritytab, no
/// resume device, root given by label, no rc.local, no offline update, no `systemd.run=`
/// on the kernel command line, and no SysV init
/// script without a native unit or a mask: NixOS builds systemd without SysV
/// compatibility at all): each is one more program PID 1 runs before it starts any unit,
/// about 0.2 s of CPU apiece under TCG.
const LEAN_GENERATORS: &[&str] = &[
    "systemd-cryptsetup-generator",
    "systemd-integritysetup-generator",
    "systemd-veritysetup-generator",
    "systemd-hibernate-resume-generator",
    "systemd-gpt-auto-generator",
    "systemd-system-update-generator",
    "systemd-rc-local-generator",
    "systemd-sysv-generator",
    "systemd-run-generator",
];

/// Coldplug with the NICs first, and of the kernel's modules only those a rule names.
/// systemd's own order puts `module` first, and the kernel has an entry under /sys/module
/// for every built-in module too: about 860 uevents reached udevd before the NIC's, which
/// under TCG kept networkd (and so DHCP and sshd) waiting about 4 s after udevd started.
/// Every device is triggered but the virtual consoles: of the `tty` subsystem only
/// [`TTYS_TRIGGERED`] (the serial ports, the console, `/dev/tty` and `/dev/ptmx`), and
/// none of `vc`. The kernel makes 64 VTs (`tty0`–`tty63`) and their `vcs*` screens even
/// with no display; udev's only rules for them set the `tty` group, for logins on a
/// screen this base does not have (`getty@tty1` is masked), and replaying their 92
/// uevents cost udevd 0.36 s of CPU (0.63 s wall) in a booted guest with one vCPU. An
/// image meant for a VGA console would trigger them. Of the subsystem-type uevents
/// (buses, their driver lists and modules) only the modules in [`MODULES_WITH_RULES`]
/// are: no rule in the base matches the others, and replaying them cost udevd and journald 0.74 s of CPU (1.26 s
/// wall) in a booted guest with one vCPU, while networkd was starting.
/// Of the device uevents, those of [`SUBSYSTEMS_WITHOUT_RULES`] are left out too.
/// [`check_udev_rules`] fails the build if a rule of the tree says otherwise.
pub fn udev_trigger_dropin() -> String {
    format!(
        "# The nixseed test base: every device but the virtual consoles and the subsystems\n\
         # no udev rule acts on, the NICs first (networkd waits for them); of the modules,\n\
         # only those a udev rule names.\n\
         [Service]\n\
         ExecStart=\n\
         ExecStart=-udevadm trigger --type=devices --action=add --prioritized-subsystem=net,block,tpmrm,input --subsystem-nomatch=tty --subsystem-nomatch=vc{quiet}\n\
         ExecStart=-udevadm trigger --type=devices --action=add --subsystem-match=tty{ttys}\n\
         ExecStart=-udevadm trigger --type=subsystems --action=add --subsystem-match=module{modules}\n",
        quiet = udevadm_flags("subsystem-nomatch", SUBSYSTEMS_WITHOUT_RULES),
        ttys = udevadm_flags("sysname-match", TTYS_TRIGGERED),
        modules = udevadm_flags("sysname-match", MODULES_WITH_RULES),
    )
}

/// ` --FLAG=NAME` for each name: `udevadm trigger`'s arguments for a list.
pub fn udevadm_flags(flag: &str, names: &[&str]) -> String {
    names.iter().map(|n| format!(" --{flag}={n}")).collect()
}

/// The `tty` devices the base's coldplug triggers: serial ports (`ttyS*`, and `hvc*` for
/// a virtio or hypervisor console), the kernel console, `/dev/tty` and `/dev/ptmx`.
pub const TTYS_TRIGGERED: &[&str] = &["ttyS*", "hvc*", "console", "tty", "ptmx"];

/// The modules (`/sys/module/NAME`) Debian bookworm's udev rules match: `60-block.rules`
/// sets the block layer's media polling, `80-drivers.rules` loads `ppdev` after
/// `parport_pc`, `99-systemd.rules` tags `fuse` and `configfs` for their mounts.
pub const MODULES_WITH_RULES: &[&str] = &["block", "configfs", "fuse", "parport_pc"];

/// Device subsystems the base's coldplug leaves out. In the VMs these images boot (QEMU's
/// `q35` machine with virtio devices, as `seedctl run` and its libvirt domain define it),
/// none of their devices has a module alias (`MODALIAS`) or a device node (`DEVNAME`),
/// and no udev rule of the base names the subsystem, so udev's run over one of them
/// changes nothing: no module is loaded, no node made, no tag or property set (so udev
/// writes no database entry for them), no unit started, and systemd makes no `.device`
/// unit of them. They were 85 of the 190 device uevents, and replaying them in a booted
/// guest with one vCPU cost udevd about 0.76 s of CPU. Devices added later still reach
/// udev as they come. [`check_udev_rules`] and [`check_dist_rules`] fail the build if a
/// rule names one of them; the first-boot scenario fails if a device of one of them has a
/// module alias or a node.
pub const SUBSYSTEMS_WITHOUT_RULES: &[&str] = &[
    "ata_device",
    "ata_link",
    "ata_port",
    "bdi",
    "clockevents",
    "clocksource",
    "container",
    "devlink",
    "edac",
    "event_source",
    "machinecheck",
    "memory",
    "memory_tiering",
    "node",
    "nvmem",
    "pci_bus",
    "pnp",
    "regulator",
    "scsi_device",
    "scsi_host",
    "thermal",
    "vtconsole",
    "wakeup",
    "workqueue",
];

/// Checks that the tree's udev rules match no subsystem-type uevent other than the
/// modules [`udev_trigger_dropin`] triggers (a rule for `SUBSYSTEM=="module"` must name
/// one of [`MODULES_WITH_RULES`], and no rule matches `subsystem` or `drivers`), and that
/// no rule names a subsystem of [`SUBSYSTEMS_WITHOUT_RULES`].
pub fn check_udev_rules(tree: &Path) -> Result<()> {
    for dir in [
        "usr/lib/udev/rules.d",
        "lib/udev/rules.d",
        "etc/udev/rules.d",
    ] {
        let Ok(rd) = fs::read_dir(tree.join(dir)) else {
            continue;
        };
        for e in rd.flatten() {
            let path = e.path();
            let Ok(text) = fs::read_to_string(&path) else {
                continue;
            };
            check_rules_text(&path, &text)?;
        }
    }
    Ok(())
}

/// [`check_udev_rules`] for the agent's own rules in `agent/dist/`, which the final layer
/// adds to `/etc/udev/rules.d`.
pub fn check_dist_rules(dist: &Path) -> Result<()> {
    for f in dist_files(dist)? {
        if f.extension().is_some_and(|x| x == "rules") {
            let text =
                fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
            check_rules_text(&f, &text)?;
        }
    }
    Ok(())
}

fn check_rules_text(path: &Path, text: &str) -> Result<()> {
    match unhandled_subsystem_rule(text) {
        Some(line) => bail!(
            "{}: a udev rule matches uevents the base's coldplug does not trigger (see udev_trigger_dropin in vm-tests/src/image.rs): {line}",
            path.display()
        ),
        None => Ok(()),
    }
}

/// The first rule line that matches a module outside [`MODULES_WITH_RULES`], the
/// `subsystem` or `drivers` uevents, or names a subsystem of [`SUBSYSTEMS_WITHOUT_RULES`].
fn unhandled_subsystem_rule(rules: &str) -> Option<&str> {
    rules.lines().find(|line| {
        let line = line.trim();
        if line.starts_with('#') {
            return false;
        }
        let patterns = subsystem_patterns(line);
        let names = |subsystem: &str| patterns.iter().any(|p| glob_matches(p, subsystem));
        if names("subsystem")
            || names("drivers")
            || SUBSYSTEMS_WITHOUT_RULES.iter().any(|s| names(s))
        {
            return true;
        }
        if !names("module") {
            return false;
        }
        match line
            .split_once("KERNEL==\"")
            .and_then(|(_, r)| r.split_once('"'))
        {
            Some((name, _)) => !MODULES_WITH_RULES.contains(&name),
            None => true,
        }
    })
}

/// The patterns a udev rule line compares `SUBSYSTEM`, `SUBSYSTEMS` or `ENV{SUBSYSTEM}`
/// with, by `==` or `!=`, with or without spaces around the operator and whatever
/// separates the keys (`"a|b"` gives `a` and `b`).
fn subsystem_patterns(line: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut rest = line;
    while let Some(i) = rest.find("SUBSYSTEM") {
        rest = &rest[i + "SUBSYSTEM".len()..];
        let key_end = rest.strip_prefix('S').unwrap_or(rest);
        let key_end = key_end.strip_prefix('}').unwrap_or(key_end).trim_start();
        let value = key_end
            .strip_prefix("==")
            .or_else(|| key_end.strip_prefix("!="))
            .and_then(|v| v.trim_start().strip_prefix('"'))
            .and_then(|v| v.split_once('"'));
        if let Some((value, _)) = value {
            out.extend(value.split('|').filter(|p| !p.is_empty()));
        }
    }
    out
}

/// udev's shell-style match of `pattern` against `name` (`*`, `?` and `[...]`); a
/// bracket counts as matching any character, which only errs towards a match.
fn glob_matches(pattern: &str, name: &str) -> bool {
    fn go(p: &[u8], n: &[u8]) -> bool {
        match p.first() {
            None => n.is_empty(),
            Some(b'*') => (0..=n.len()).any(|i| go(&p[1..], &n[i..])),
            Some(b'?') => !n.is_empty() && go(&p[1..], &n[1..]),
            Some(b'[') => {
                let close = p.iter().position(|&c| c == b']').unwrap_or(p.len() - 1);
                !n.is_empty() && go(&p[close + 1..], &n[1..])
            }
            Some(&c) => n.first() == Some(&c) && go(&p[1..], &n[1..]),
        }
    }
    go(pattern.as_bytes(), name.as_bytes())
}

/// Where the base keeps the device nodes that load a module when opened (`/dev/fuse`,
/// `/dev/net/tun`, `/dev/loop-control`, …). `kmod-static-nodes.service` would write the
/// same list to `/run/tmpfiles.d/static-nodes.conf` at every boot, one process start
/// (about 0.5–0.9 s under TCG) on the way to udevd; the list depends only on the
/// kernel's `modules.devname`, which the read-only image fixes, so the build writes it
/// once and `systemd-tmpfiles-setup-dev.service` creates the nodes from it as before.
/// The first-boot scenario compares it with `kmod static-nodes` in the guest.
pub const STATIC_NODES: &str = "usr/lib/tmpfiles.d/static-nodes.conf";

/// `modules.devname` in the format `kmod static-nodes --format=tmpfiles` writes: a
/// directory line for a node below a subdirectory of `/dev`, then the node, mode 0600,
/// created only at boot (`!`).
pub fn static_nodes_tmpfiles(devname: &str) -> Result<String> {
    let mut out = String::new();
    for (i, line) in devname.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || anyhow::anyhow!("modules.devname line {}: '{line}'", i + 1);
        let mut f = line.split_whitespace();
        let (_module, node, dev) = match (f.next(), f.next(), f.next()) {
            (Some(m), Some(n), Some(d)) => (m, n, d),
            _ => return Err(bad()),
        };
        let kind = dev.chars().next().filter(|c| matches!(c, 'c' | 'b'));
        let numbers = dev
            .get(1..)
            .and_then(|n| n.split_once(':'))
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)));
        let (Some(kind), Some((major, minor))) = (kind, numbers) else {
            return Err(bad());
        };
        if let Some((dir, _)) = node.rsplit_once('/') {
            let _ = writeln!(out, "d /dev/{dir} 0755 - - -");
        }
        let _ = writeln!(out, "{kind}! /dev/{node} 0600 - - - {major}:{minor}");
    }
    Ok(out)
}

/// Debian links `/etc/modules-load.d/modules.conf` to `/etc/modules`, which names no
/// module in either image; the link alone makes `systemd-modules-load.service` start (a
/// process that loads nothing) instead of being skipped by its condition on non-empty
/// `modules-load.d` directories. The link goes when the file lists no module.
fn drop_empty_modules_load(tree: &Path) -> Result<()> {
    let link = tree.join("etc/modules-load.d/modules.conf");
    let listed = fs::read_to_string(tree.join("etc/modules")).unwrap_or_default();
    let names_a_module = listed
        .lines()
        .map(str::trim)
        .any(|l| !l.is_empty() && !l.starts_with('#'));
    if !names_a_module && fs::symlink_metadata(&link).is_ok() {
        fs::remove_file(&link).with_context(|| format!("removing {}", link.display()))?;
    }
    Ok(())
}

fn write_static_nodes(tree: &Path) -> Result<()> {
    let release = kernel_release(tree)?;
    let src = tree
        .join("lib/modules")
        .join(&release)
        .join("modules.devname");
    let devname = fs::read_to_string(&src).with_context(|| format!("reading {}", src.display()))?;
    let conf = static_nodes_tmpfiles(&devname).with_context(|| src.display().to_string())?;
    write(&tree.join(STATIC_NODES), &conf)
}

/// The base loads only what a VM guest uses: [`LEAN_MODULES`] are not autoloaded,
/// [`LEAN_UNITS`] are masked and [`LEAN_GENERATORS`] are masked the way systemd documents
/// (a link to /dev/null under /etc/systemd/system-generators).
fn configure_lean(tree: &Path) -> Result<()> {
    let mut conf = String::from(
        "# Drivers a VM guest with a serial console does not use (the nixseed test base).\n",
    );
    for m in LEAN_MODULES {
        let _ = writeln!(conf, "blacklist {m}");
    }
    write(&tree.join("etc/modprobe.d/nixseed-vm.conf"), &conf)?;
    let mut args = vec!["disable"];
    args.extend(LEAN_ENABLED);
    chroot_systemctl(tree, &args)?;
    let mut args = vec!["mask"];
    args.extend(LEAN_UNITS);
    chroot_systemctl(tree, &args)?;
    write_static_nodes(tree)?;
    drop_empty_modules_load(tree)?;
    check_udev_rules(tree)?;
    write(
        &tree.join("etc/systemd/system/systemd-udev-trigger.service.d/50-nixseed-net-first.conf"),
        &udev_trigger_dropin(),
    )?;
    let dir = tree.join("etc/systemd/system-generators");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    for g in LEAN_GENERATORS {
        let link = dir.join(g);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink("/dev/null", &link)
            .with_context(|| format!("masking {}", link.display()))?;
    }
    Ok(())
}

/// journald keeps its journal on `/var` (NixOS: `services.journald.storage`).
const JOURNALD_DROPIN: &str = "[Journal]\nStorage=persistent\n";
/// Units both images enable.
const COMMON_ENABLED: &[&str] = &["systemd-networkd.service", "serial-getty@ttyS0.service"];
/// Units both images disable where Debian ships them: nothing waits for the network to be
/// online, and no maintenance timer runs in a test VM.
const COMMON_DISABLED: &[&str] = &[
    "systemd-networkd-wait-online.service",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "dpkg-db-backup.timer",
    "e2scrub_all.timer",
    "e2scrub_reap.service",
];
/// Placeholders in the nixseed image's `/etc` that the initrd stage bind-mounts over;
/// empty, so a missing identity shows. `/etc/hosts` keeps [`HOSTS_BASE`] instead.
const PLACEHOLDERS: &[&str] = &["etc/machine-id", "etc/hostname", "etc/resolv.conf"];

/// The variant's `/etc/fstab`.
fn fstab(variant: Variant) -> String {
    match variant {
        Variant::Nixseed => format!(
            "# / is the shared read-only base image; /var is this machine's own disk\n\
             # (both already mounted by the initramfs, which also applied the identity).\n\
             LABEL={ROOT_LABEL}\t/\text4\tro,noatime\t0 0\n\
             LABEL={VAR_LABEL}\t/var\text4\trw,noatime\t0 0\n\
             # The root is read-only, so /tmp is memory (NixOS: boot.tmp.useTmpfs).\n\
             tmpfs\t/tmp\ttmpfs\tmode=1777,strictatime,nosuid,nodev,size=50%\t0 0\n"
        ),
        Variant::CloudInit => format!("LABEL={ROOT_LABEL}\t/\text4\trw,noatime\t0 1\n"),
    }
}

/// Settings both variants share: networkd, serial console, persistent journal, no
/// timers that would write to a read-only root, and a lean set of drivers and units.
fn configure_common(tree: &Path) -> Result<()> {
    configure_lean(tree)?;
    write(
        &tree.join("etc/systemd/network/99-nixseed-fallback.network"),
        FALLBACK_NETWORK,
    )?;
    write(
        &tree.join("etc/systemd/journald.conf.d/nixseed.conf"),
        JOURNALD_DROPIN,
    )?;
    let mut on = vec!["enable"];
    on.extend(COMMON_ENABLED);
    chroot_systemctl(tree, &on)?;
    let off: Vec<&str> = COMMON_DISABLED
        .iter()
        .copied()
        .filter(|u| unit_exists(tree, u))
        .collect();
    write(
        &tree.join("etc/systemd/system/ssh.service.d/40-nixseed-checked-at-build.conf"),
        SSH_CHECKED_AT_BUILD,
    )?;
    if !off.is_empty() {
        let mut args = vec!["disable"];
        args.extend(off);
        chroot_systemctl(tree, &args)?;
    }
    // Downloaded packages and indexes are dead weight in a shared base image.
    for d in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        let p = tree.join(d);
        if let Ok(rd) = fs::read_dir(&p) {
            for e in rd.flatten() {
                if e.path().is_file() {
                    let _ = fs::remove_file(e.path());
                }
            }
        }
    }
    for e in fs::read_dir(tree.join("boot"))
        .context("listing the tree's /boot")?
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with("initrd.img") {
            let _ = fs::remove_file(e.path());
        }
    }
    for e in fs::read_dir(tree.join("etc/ssh"))
        .context("listing the tree's /etc/ssh")?
        .flatten()
    {
        if e.file_name().to_string_lossy().starts_with("ssh_host_") {
            fs::remove_file(e.path())
                .with_context(|| format!("removing {}", e.path().display()))?;
        }
    }
    Ok(())
}

/// sudo's drop-in in the nixseed image: the seed's `sudo:` rules, written by nixseed at
/// boot (docs/identity.md, "sudo rules"). sudo wants the file root's and not writable.
const SUDOERS_NIXSEED: &str = "# The seed's sudo rules, written by nixseed at boot.\n\
     @includedir /run/nixseed/sudoers.d\n";

fn configure_nixseed(tree: &Path) -> Result<()> {
    configure_common(tree)?;
    write(&tree.join("etc/fstab"), &fstab(Variant::Nixseed))?;
    write(
        &tree.join("etc/ssh/sshd_config.d/nixseed.conf"),
        SSHD_NIXSEED,
    )?;
    let sudoers = tree.join("etc/sudoers.d/nixseed");
    write(&sudoers, SUDOERS_NIXSEED)?;
    fs::set_permissions(
        &sudoers,
        std::os::unix::fs::PermissionsExt::from_mode(0o440),
    )
    .with_context(|| format!("setting the mode of {}", sudoers.display()))?;
    for f in PLACEHOLDERS {
        let p = tree.join(f);
        let _ = fs::remove_file(&p);
        write(&p, "")?;
    }
    let hosts = tree.join("etc/hosts");
    let _ = fs::remove_file(&hosts);
    write(&hosts, HOSTS_BASE)?;
    let _ = fs::remove_file(tree.join("var/lib/dbus/machine-id"));
    // Host keys come only from /var/identity: nothing may generate them at boot, and a
    // first-boot wizard would wait on the serial console.
    let mut masks = vec!["systemd-firstboot.service".to_string()];
    masks.extend(units_running(tree, "ssh-keygen")?);
    let mut args = vec!["mask"];
    args.extend(masks.iter().map(String::as_str));
    chroot_systemctl(tree, &args)?;
    move_var_to_factory(tree)
}

fn configure_cloud_init(tree: &Path) -> Result<()> {
    configure_common(tree)?;
    write(&tree.join("etc/fstab"), &fstab(Variant::CloudInit))?;
    // cloud-init writes the hostname and machine-id on first boot, as on any cloud image.
    write(&tree.join("etc/machine-id"), "")?;
    let _ = fs::remove_file(tree.join("var/lib/dbus/machine-id"));
    write(
        &tree.join("etc/cloud/cloud.cfg.d/90-nixseed-bench.cfg"),
        CLOUD_INIT_CFG,
    )
}

/// `sshd -t` in the finished tree, the check [`SSH_CHECKED_AT_BUILD`] takes off the boot:
/// with a throwaway host key (the image has none: they come from the identity, or from
/// cloud-init) and the privilege separation directory systemd makes at boot, both removed
/// again.
fn check_sshd_config(tree: &Path) -> Result<()> {
    let key = "/tmp/nixseed-sshd-check";
    let privsep = tree.join("run/sshd");
    fs::create_dir_all(&privsep).with_context(|| format!("creating {}", privsep.display()))?;
    let result = cmd::run(Command::new("chroot").arg(tree).args([
        "ssh-keygen",
        "-q",
        "-t",
        "ed25519",
        "-N",
        "",
        "-f",
        key,
    ]))
    .and_then(|_| {
        cmd::run(
            Command::new("chroot")
                .arg(tree)
                .args(["/usr/sbin/sshd", "-t", "-h", key]),
        )
    })
    .with_context(|| format!("checking {}'s sshd configuration", tree.display()));
    for p in [key.to_string(), format!("{key}.pub")] {
        let _ = fs::remove_file(tree.join(p.trim_start_matches('/')));
    }
    let _ = fs::remove_dir(&privsep);
    result.map(|_| ())
}

/// Unit files whose commands mention `needle` (e.g. host-key generators).
fn units_running(tree: &Path, needle: &str) -> Result<Vec<String>> {
    let mut out = Vec::new();
    for d in ["lib/systemd/system", "usr/lib/systemd/system"] {
        let Ok(rd) = fs::read_dir(tree.join(d)) else {
            continue;
        };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.ends_with(".service") || e.path().is_symlink() {
                continue;
            }
            let text = fs::read_to_string(e.path()).unwrap_or_default();
            if text
                .lines()
                .any(|l| l.starts_with("Exec") && l.contains(needle))
            {
                out.push(name);
            }
        }
    }
    Ok(out)
}

/// Package-manager state and install logs under `/var`: the root is read-only and replaced
/// whole by `seedctl upgrade`, so a running machine has no use for them (an immutable NixOS
/// VM has none either). They stay readable in the base image, e.g.
/// `dpkg --admindir=/usr/share/factory/var/lib/dpkg -l`, but are not copied onto every new
/// `/var` disk: copying dpkg's database was the longest step of a first boot under TCG.
const FACTORY_ONLY: &[&str] = &[
    "backups",
    "cache/apt",
    "cache/debconf",
    "cache/ldconfig",
    "lib/apt",
    "lib/dpkg",
    "lib/ucf",
    "log/alternatives.log",
    "log/apt",
    "log/bootstrap.log",
    "log/dpkg.log",
];

/// `/var` is a separate, initially empty disk: keep the packaged content under
/// `/usr/share/factory/var` and let systemd-tmpfiles copy what a running system needs
/// (everything but [`FACTORY_ONLY`]) when it is missing at boot.
fn move_var_to_factory(tree: &Path) -> Result<()> {
    let var = tree.join("var");
    let factory = tree.join("usr/share/factory/var");
    fs::create_dir_all(&factory).with_context(|| format!("creating {}", factory.display()))?;
    let mut lines = String::from(
        "# /var starts empty on a new machine's disk; fill in what packages shipped there.\n",
    );
    let owned = tmpfiles_paths(tree);
    let mut tops: Vec<_> = fs::read_dir(&var)
        .with_context(|| format!("listing {}", var.display()))?
        .flatten()
        .collect();
    tops.sort_by_key(|e| e.file_name());
    for top in tops {
        let name = top.file_name().to_string_lossy().into_owned();
        let src = top.path();
        let dst = factory.join(&name);
        fs::rename(&src, &dst)
            .with_context(|| format!("moving {} to {}", src.display(), dst.display()))?;
        // run, lock, tmp: systemd's own tmpfiles rules make these.
        if ["run", "lock", "tmp"].contains(&name.as_str()) || !dst.is_dir() || dst.is_symlink() {
            continue;
        }
        let mut subs: Vec<_> = fs::read_dir(&dst)
            .with_context(|| format!("listing {}", dst.display()))?
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        subs.sort();
        // Paths the packages' own tmpfiles.d already manage keep their rules.
        if subs.is_empty()
            && !owned.contains(&format!("/var/{name}"))
            && !FACTORY_ONLY.contains(&name.as_str())
        {
            let _ = writeln!(lines, "C /var/{name} - - - - /usr/share/factory/var/{name}");
        }
        for s in subs {
            if owned.contains(&format!("/var/{name}/{s}"))
                || FACTORY_ONLY.contains(&format!("{name}/{s}").as_str())
            {
                continue;
            }
            let _ = writeln!(
                lines,
                "C /var/{name}/{s} - - - - /usr/share/factory/var/{name}/{s}"
            );
        }
    }
    write(
        &tree.join("usr/lib/tmpfiles.d/nixseed-factory-var.conf"),
        &lines,
    )
}

/// Every path named by a tmpfiles.d rule in the tree.
fn tmpfiles_paths(tree: &Path) -> std::collections::BTreeSet<String> {
    let mut out = std::collections::BTreeSet::new();
    for d in ["usr/lib/tmpfiles.d", "lib/tmpfiles.d", "etc/tmpfiles.d"] {
        let Ok(rd) = fs::read_dir(tree.join(d)) else {
            continue;
        };
        for e in rd.flatten() {
            let text = fs::read_to_string(e.path()).unwrap_or_default();
            for l in text.lines().map(str::trim).filter(|l| !l.starts_with('#')) {
                if let Some(p) = l.split_whitespace().nth(1) {
                    out.insert(p.trim_end_matches('/').to_string());
                }
            }
        }
    }
    out
}

/// ConditionNeedsUpdate=/etc units (ldconfig, hwdb, sysusers) would try to write the
/// read-only /etc on every boot: record that /etc matches this /usr.
fn mark_etc_updated(tree: &Path) -> Result<()> {
    let usr = tree.join("usr");
    let meta = fs::metadata(&usr).with_context(|| format!("stat {}", usr.display()))?;
    let mtime = meta.modified()?.duration_since(std::time::UNIX_EPOCH)?;
    // Whole seconds: ext4 keeps nanoseconds, but compare on the safe side.
    let nsec = mtime.as_secs() as u128 * 1_000_000_000 + 999_999_999;
    write(
        &tree.join("etc/.updated"),
        &format!("# written by the nixseed image build\nTIMESTAMP_NSEC={nsec}\n"),
    )
}

/// Layer 2: copy `rootfs.ext4`, inject the agent and `agent/dist/` with debugfs, convert
/// to qcow2, build the initramfs.
fn build_final_layer(
    variant: Variant,
    tree_dir: &Path,
    final_dir: &Path,
    agent: Option<&Path>,
    dist: &Path,
    kernel_release: &str,
) -> Result<()> {
    if variant == Variant::Nixseed {
        check_dist_rules(dist)?;
    }
    // Per process: two harness runs at once (parallel test runs) must not write into
    // the same staging directory.
    let tmp = final_dir.with_extension(format!("tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()))?;
    }
    fs::create_dir_all(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let raw = tmp.join("rootfs.ext4");
    cmd::run(
        Command::new("cp")
            .arg("--sparse=always")
            .arg(tree_dir.join("rootfs.ext4"))
            .arg(&raw),
    )?;
    if variant == Variant::Nixseed {
        let tree = tree_dir.join("tree");
        let mut script = injection_script(&tree, agent, dist)?;
        // The dist units read extra arguments from here: the test image loads the
        // identity's ports into nftables, as `services.nixseed.firewall.enable` does.
        let defaults = tmp.join("nixseed.default");
        write(&defaults, AGENT_DEFAULTS)?;
        if tree.join("etc/default/nixseed").exists() {
            script.push_str("rm /etc/default/nixseed\n");
        }
        script.push_str(&format!(
            "cd /etc/default\nwrite {} nixseed\nsif /etc/default/nixseed mode 0100644\nsif /etc/default/nixseed uid 0\nsif /etc/default/nixseed gid 0\ncd /\n",
            defaults.display()
        ));
        // sshd's start limit held for an hour instead of ten seconds: the push-first
        // scenario meets the state in which systemd refuses to start it, whatever its timing.
        let limit = tmp.join("ssh-start-limit.conf");
        write(&limit, SSH_START_LIMIT)?;
        if !tree.join("etc/systemd/system/ssh.service.d").is_dir() {
            let d = "/etc/systemd/system/ssh.service.d";
            script.push_str(&format!(
                "mkdir {d}\nsif {d} mode 040755\nsif {d} uid 0\nsif {d} gid 0\n"
            ));
        }
        let f = "/etc/systemd/system/ssh.service.d/50-start-limit.conf";
        script.push_str(&format!(
            "cd /etc/systemd/system/ssh.service.d\nwrite {} 50-start-limit.conf\nsif {f} mode 0100644\nsif {f} uid 0\nsif {f} gid 0\ncd /\n",
            limit.display()
        ));
        let script_path = tmp.join("inject.debugfs");
        write(&script_path, &script)?;
        let out = cmd::run(
            Command::new("debugfs")
                .arg("-w")
                .arg("-f")
                .arg(&script_path)
                .arg(&raw),
        )?;
        // debugfs reports command errors on stderr but exits 0.
        let err = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = err
            .lines()
            .filter(|l| !l.starts_with("debugfs ") && !l.trim().is_empty())
            .collect();
        if !errors.is_empty() {
            bail!(
                "debugfs injection into {} failed:\n{}",
                raw.display(),
                errors.join("\n")
            );
        }
        cmd::run(Command::new("e2fsck").args(["-fn"]).arg(&raw))
            .with_context(|| format!("checking {} after injection", raw.display()))?;
    }
    cmd::run(
        Command::new("qemu-img")
            .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
            .arg(&raw)
            .arg(tmp.join("base.qcow2")),
    )?;
    fs::remove_file(&raw).with_context(|| format!("removing {}", raw.display()))?;
    let modules = tree_dir.join("tree/lib/modules").join(kernel_release);
    let agent_for_initrd = if variant == Variant::Nixseed {
        agent
    } else {
        None
    };
    crate::initramfs::build(
        &modules,
        agent_for_initrd,
        &tmp.join("initramfs.cpio"),
        &tmp,
    )?;
    write(&tmp.join("ready"), "")?;
    if final_dir.join("ready").exists() {
        // Another run finished the same layer first and may be booting from it: keep it.
        return fs::remove_dir_all(&tmp).with_context(|| format!("removing {}", tmp.display()));
    }
    if final_dir.exists() {
        fs::remove_dir_all(final_dir)
            .with_context(|| format!("removing {}", final_dir.display()))?;
    }
    fs::rename(&tmp, final_dir)
        .with_context(|| format!("renaming {} to {}", tmp.display(), final_dir.display()))
}

/// Keeps the three newest final layers; older overlays' backing files go with them.
fn prune_final_layers(tree_dir: &Path, keep: &Path) {
    let Ok(rd) = fs::read_dir(tree_dir) else {
        return;
    };
    let mut finals: Vec<(std::time::SystemTime, PathBuf)> = rd
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("final-") && e.path() != keep)
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    finals.sort();
    while finals.len() > 2 {
        let (_, p) = finals.remove(0);
        let _ = fs::remove_dir_all(p);
    }
}

/// debugfs commands that install the agent and the dist files, and enable units with an
/// `[Install]` section the way `systemctl enable` would (WantedBy/RequiredBy symlinks).
fn injection_script(tree: &Path, agent: Option<&Path>, dist: &Path) -> Result<String> {
    let mut s = String::new();
    let mut made_dirs = std::collections::BTreeSet::new();
    let mut ensure_dir = |s: &mut String, dir: &str| {
        if !tree.join(dir.trim_start_matches('/')).is_dir() && made_dirs.insert(dir.to_string()) {
            let _ = writeln!(s, "mkdir {dir}\nsif {dir} uid 0\nsif {dir} gid 0");
        }
    };
    let put = |s: &mut String, src: &Path, dest_dir: &str, name: &str, mode: &str| {
        let dest = format!("{dest_dir}/{name}");
        if tree.join(dest.trim_start_matches('/')).exists() {
            let _ = writeln!(s, "rm {dest}");
        }
        let _ = writeln!(
            s,
            "cd {dest_dir}\nwrite {} {name}\nsif {dest} mode {mode}\nsif {dest} uid 0\nsif {dest} gid 0\ncd /",
            src.display()
        );
    };
    if let Some(agent) = agent {
        let (dir, name) = AGENT_PATH_IN_IMAGE
            .rsplit_once('/')
            .unwrap_or(("/usr/bin", "nixseed-agent"));
        put(&mut s, agent, dir, name, "0100755");
        if let Some(g) = guest_agent_beside(agent) {
            put(&mut s, &g, dir, GUEST_AGENT_NAME, "0100755");
        }
    }
    for f in dist_files(dist)? {
        let name = f
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let (dir, is_unit) = if name.ends_with(".rules") {
            ("/etc/udev/rules.d", false)
        } else if [
            ".service", ".socket", ".target", ".timer", ".path", ".mount",
        ]
        .iter()
        .any(|x| name.ends_with(x))
        {
            ("/etc/systemd/system", true)
        } else {
            continue;
        };
        put(&mut s, &f, dir, &name, "0100644");
        if !is_unit {
            continue;
        }
        let text = fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?;
        for (key, targets) in install_section(&text) {
            let suffix = if key == "RequiredBy" {
                "requires"
            } else {
                "wants"
            };
            for t in targets {
                let d = format!("/etc/systemd/system/{t}.{suffix}");
                ensure_dir(&mut s, &d);
                let _ = writeln!(s, "cd {d}\nsymlink {name} /etc/systemd/system/{name}\ncd /");
            }
        }
    }
    Ok(s)
}

/// `WantedBy=`/`RequiredBy=` values of a unit's `[Install]` section.
pub fn install_section(unit: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut in_install = false;
    for line in unit.lines().map(str::trim) {
        if line.starts_with('[') {
            in_install = line == "[Install]";
            continue;
        }
        if !in_install {
            continue;
        }
        if let Some((k, v)) = line.split_once('=') {
            let k = k.trim();
            if k == "WantedBy" || k == "RequiredBy" {
                out.push((
                    k.to_string(),
                    v.split_whitespace().map(String::from).collect(),
                ));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn static_nodes_in_kmods_tmpfiles_format() {
        let devname = "# Device nodes to trigger on-demand module loading.\nfuse fuse c10:229\ntun net/tun c10:200\nfoo bar/baz/qux b7:1\n";
        assert_eq!(
            static_nodes_tmpfiles(devname).unwrap(),
            "c! /dev/fuse 0600 - - - 10:229\nd /dev/net 0755 - - -\nc! /dev/net/tun 0600 - - - 10:200\nd /dev/bar/baz 0755 - - -\nb! /dev/bar/baz/qux 0600 - - - 7:1\n"
        );
        let err = static_nodes_tmpfiles("fuse fuse x10:229\n").unwrap_err();
        assert!(err.to_string().contains("line 1"), "{err}");
        assert!(static_nodes_tmpfiles("fuse fuse\n").is_err());
    }

    #[test]
    fn rules_for_other_module_or_bus_uevents_are_found() {
        let ok = "# SUBSYSTEM==\"module\", KERNEL==\"loop\"\nSUBSYSTEM==\"module\", KERNEL==\"fuse\", TAG+=\"systemd\"\nSUBSYSTEM==\"net\", RUN+=\"x\"\n";
        assert_eq!(unhandled_subsystem_rule(ok), None);
        let other = "SUBSYSTEM==\"module\", KERNEL==\"loop\", RUN+=\"x\"\n";
        assert_eq!(unhandled_subsystem_rule(other), Some(other.trim_end()));
        let any = "ACTION==\"add\", SUBSYSTEM==\"module\", RUN+=\"x\"";
        assert_eq!(unhandled_subsystem_rule(any), Some(any));
        let bus = "SUBSYSTEM==\"drivers\", ENV{X}=\"1\"";
        assert_eq!(unhandled_subsystem_rule(bus), Some(bus));
    }

    #[test]
    fn rules_for_a_subsystem_left_out_of_coldplug_are_found() {
        let ok = "SUBSYSTEM==\"net|block\", RUN+=\"x\"\nSUBSYSTEMS==\"pci\", ENV{X}=\"1\"\n# SUBSYSTEM==\"memory\", RUN+=\"x\"\n";
        assert_eq!(unhandled_subsystem_rule(ok), None);
        for line in [
            "SUBSYSTEM==\"memory\", ACTION==\"add\", ATTR{state}=\"online\"",
            "SUBSYSTEM!=\"scsi_host\", GOTO=\"end\"",
            "SUBSYSTEMS==\"usb|ata_port\", ENV{X}=\"1\"",
            "ACTION==\"add\", SUBSYSTEM==\"wake*\", RUN+=\"x\"",
            "SUBSYSTEM==\"ata_[dl]*\", RUN+=\"x\"",
            "SUBSYSTEM == \"memory\", RUN+=\"x\"",
            "ACTION==\"add\" SUBSYSTEM==\"node\" RUN+=\"x\"",
            "ENV{SUBSYSTEM}==\"workqueue\", RUN+=\"x\"",
        ] {
            assert_eq!(unhandled_subsystem_rule(line), Some(line), "{line}");
        }
        assert!(glob_matches("memory", "memory"));
        assert!(!glob_matches("memory", "memory_tiering"));
        assert!(glob_matches("mem*", "memory_tiering"));
        assert!(!glob_matches("mem?", "memory"));
    }

    #[test]
    fn mirror_from_deb822_skips_security() {
        let text = "Types: deb\nURIs: http://mirror.example/debian-security\nSuites: bookworm-security\n\nTypes: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\nComponents: main\n";
        assert_eq!(
            mirror_from_sources(text).as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn mirror_from_one_line_sources() {
        let text = "deb [arch=amd64] http://mirror.example/debian bookworm main\n";
        assert_eq!(
            mirror_from_sources(text).as_deref(),
            Some("http://mirror.example/debian")
        );
    }

    #[test]
    fn install_section_collects_wanted_and_required() {
        let unit = "[Unit]\nWantedBy=ignored.target\n[Service]\nType=oneshot\n[Install]\nWantedBy=multi-user.target sysinit.target\nRequiredBy=sshd.service\n";
        let got = install_section(unit);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].1, vec!["multi-user.target", "sysinit.target"]);
        assert_eq!(got[1].0, "RequiredBy");
    }

    #[test]
    fn tree_key_differs_per_variant() {
        assert_ne!(tree_key(Variant::Nixseed), tree_key(Variant::CloudInit));
    }

    #[test]
    fn tree_key_covers_the_files_written_into_both_trees() {
        for variant in [Variant::Nixseed, Variant::CloudInit] {
            let inputs = tree_inputs(variant);
            for written in [
                FALLBACK_NETWORK.to_string(),
                JOURNALD_DROPIN.into(),
                SSH_CHECKED_AT_BUILD.into(),
                fstab(variant),
            ] {
                assert!(
                    inputs.contains(&written),
                    "{variant:?} leaves out {written:?}"
                );
            }
        }
        let nixseed = tree_inputs(Variant::Nixseed);
        assert!(nixseed.contains(&HOSTS_BASE.to_string()));
        assert!(nixseed.contains(&PLACEHOLDERS.join(",")));
        assert_ne!(fstab(Variant::Nixseed), fstab(Variant::CloudInit));
    }
}
