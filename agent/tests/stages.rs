//! The boot stages against a real mount namespace: a tmpfs-free scratch sysroot with
//! placeholders in `etc/`, the real bind mounts, and the real agent binary. Each test runs
//! the agent inside `unshare -m -u` so the binds (and a hostname stage 2 sets) vanish
//! with the test. Needs root.

#![allow(clippy::unwrap_used)] // test scaffolding: a failed setup step should fail the test loudly

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use nixseed_test_support as ts;

const AGENT: &str = env!("CARGO_BIN_EXE_nixseed-agent");

struct Vm {
    dir: tempfile::TempDir,
}

const PROXMOX_USER_DATA: &str = "#cloud-config\nhostname: web1\nmanage_etc_hosts: true\nfqdn: web1.example.com\nuser: admin\npassword: $5$abc$def\nssh_authorized_keys:\n  - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA0 admin@host\nchpasswd:\n  expire: False\nusers:\n  - default\npackage_upgrade: true\n";

/// The image's /etc/resolv.conf as the NixOS module writes it with resolved enabled.
const RESOLVED_STUB: &str = "nameserver 127.0.0.53\noptions edns0 trust-ad\nsearch .\n";

const PROXMOX_NETWORK: &str = "version: 1\nconfig:\n    - type: physical\n      name: eth0\n      mac_address: '52:54:00:12:34:56'\n      subnets:\n      - type: static\n        address: '192.168.1.10'\n        netmask: '255.255.255.0'\n        gateway: '192.168.1.1'\n      - type: static6\n        address: '2001:db8::10/64'\n        gateway: '2001:db8::1'\n    - type: nameserver\n      search:\n      - 'example.com'\n";

impl Vm {
    /// A scratch machine: sysroot with placeholders, a fake sysfs with one NIC and a
    /// product_uuid, and a NoCloud seed directory named on the command line.
    fn new() -> Vm {
        let dir = tempfile::tempdir().unwrap();
        let vm = Vm { dir };
        ts::Guest {
            nic: Some(("ens18", "52:54:00:12:34:56")),
            hosts: "127.0.0.1 localhost\n",
            resolv_conf: RESOLVED_STUB,
            cmdline: "ro quiet ds=nocloud;s=/seed/\n",
            ..ts::Guest::default()
        }
        .lay_out(vm.dir.path())
        .unwrap();
        vm.seed(
            "instance-id: iid-1\n",
            PROXMOX_USER_DATA,
            Some(PROXMOX_NETWORK),
        );
        vm
    }

    fn p(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn set_uuid(&self, uuid: &str) {
        ts::set_product_uuid(self.dir.path(), uuid).unwrap();
    }

    fn seed(&self, meta: &str, user: impl AsRef<[u8]>, network: Option<&str>) {
        ts::write_seed(self.dir.path(), meta, user, network).unwrap();
    }

    /// Runs `setup` (shell), then the initrd stage, then prints the bound /etc files,
    /// all in one private mount namespace.
    fn boot_with(&self, setup: &str) -> (Output, String) {
        self.run(&format!(
            "{setup}\n{AGENT} initrd --sysroot sysroot --root host --run run; echo \"rc=$?\"; for f in hostname machine-id hosts resolv.conf; do echo \"== $f\"; cat sysroot/etc/$f; done"
        ))
    }

    /// Runs `script` (shell) in the machine's directory, in one private mount namespace.
    fn run(&self, script: &str) -> (Output, String) {
        let script = format!("set -u; cd {}; {script}", self.dir.path().display());
        // Private UTS too: stage 2 sets the kernel's hostname.
        let out = Command::new("unshare")
            .args(["-m", "-u", "sh", "-c", &script])
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        (out, stdout)
    }

    fn boot(&self) -> (Output, String) {
        self.boot_with("")
    }

    /// Seeds instance `iid-N` with hostname `webN` and boots; the stage must write
    /// generation N.
    fn boot_instance(&self, n: u32) {
        self.seed(
            &format!("instance-id: iid-{n}\n"),
            format!("#cloud-config\nhostname: web{n}\n"),
            None,
        );
        self.boot();
        assert_eq!(self.generation(), format!("gen-{n}"));
    }

    /// Packs `stage` with `tool args... -o` into `host/dev/sr0`, a cdrom the probe finds
    /// through `host/sys/class/block/sr0`.
    fn attach_iso(&self, stage: &Path, tool: &[&str]) {
        std::fs::create_dir_all(self.p("host/dev")).unwrap();
        std::fs::create_dir_all(self.p("host/sys/class/block/sr0")).unwrap();
        let st = Command::new(tool[0])
            .args(&tool[1..])
            .arg("-o")
            .arg(self.p("host/dev/sr0"))
            .arg(stage)
            .status()
            .unwrap_or_else(|e| panic!("{} (cargo xtask deps installs it): {e}", tool[0]));
        assert!(st.success(), "{tool:?}");
    }

    /// Permission bits of a file of the current generation.
    fn mode(&self, name: &str) -> u32 {
        use std::os::unix::fs::PermissionsExt;
        std::fs::metadata(self.p("sysroot/var/identity/current").join(name))
            .unwrap()
            .permissions()
            .mode()
            & 0o777
    }

    fn identity(&self, name: &str) -> Vec<u8> {
        std::fs::read(self.p("sysroot/var/identity").join(name)).unwrap()
    }

    fn generation(&self) -> String {
        std::fs::read_link(self.p("sysroot/var/identity/current"))
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }
}

fn etc(stdout: &str, file: &str) -> String {
    let marker = format!("== {file}\n");
    let start = stdout
        .find(&marker)
        .map(|i| i + marker.len())
        .unwrap_or(stdout.len());
    let rest = &stdout[start..];
    rest[..rest.find("== ").unwrap_or(rest.len())].to_string()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn proxmox_seed_first_boot_binds_identity_over_etc() {
    let vm = Vm::new();
    let (out, s) = vm.boot();
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert_eq!(etc(&s, "hostname"), "web1\n");
    assert_eq!(
        etc(&s, "hosts"),
        "127.0.0.1 localhost\n127.0.1.1 web1.example.com web1\n"
    );
    let mid = etc(&s, "machine-id");
    assert_eq!(mid.trim().len(), 32, "{mid:?}");
    // Like cloud-init, a nameserver entry without addresses contributes nothing, and the
    // image's own resolv.conf stays what /etc/resolv.conf shows.
    assert_eq!(etc(&s, "resolv.conf"), RESOLVED_STUB);
    assert_eq!(vm.identity("resolv.conf"), b"");
    assert_eq!(
        vm.identity("admin_authorized_keys"),
        b"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA0 admin@host\n"
    );
    // Proxmox's eth0 is matched by MAC to the guest's ens18.
    let net = String::from_utf8(vm.identity("network/10-cloud-init-ens18.network")).unwrap();
    assert!(
        net.contains("Name=ens18")
            && net.contains("Address=192.168.1.10/24")
            && net.contains("Address=2001:db8::10/64"),
        "{net}"
    );
    let link = std::fs::read_link(vm.p("run/systemd/network/10-cloud-init-ens18.network")).unwrap();
    assert_eq!(
        link,
        Path::new("/var/identity/network/10-cloud-init-ens18.network")
    );
    // Modes from the contract.
    let mode = |n: &str| vm.mode(n);
    assert_eq!(mode("machine-id"), 0o444);
    assert_eq!(mode("ssh_host_ed25519_key"), 0o600);
    assert_eq!(mode("hostname"), 0o644);
    assert!(
        stderr(&out).contains("nixseed initrd: FirstBoot -> generation 1"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn resolv_conf_is_the_seeds_when_it_names_servers_and_the_images_otherwise() {
    let vm = Vm::new();
    vm.seed(
        "instance-id: iid-dns\n",
        "#cloud-config\nhostname: dns\nmanage_resolv_conf: true\nresolv_conf:\n  nameservers: ['192.0.2.53']\n",
        None,
    );
    let (out, s) = vm.boot();
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert_eq!(etc(&s, "resolv.conf"), "nameserver 192.0.2.53\n");
    // A later instance without DNS settings: back to the image's own file, not an empty one.
    vm.seed(
        "instance-id: iid-nodns\n",
        "#cloud-config\nhostname: nodns\n",
        None,
    );
    let (out, s) = vm.boot();
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert_eq!(etc(&s, "hostname"), "nodns\n");
    assert_eq!(etc(&s, "resolv.conf"), RESOLVED_STUB);
    // Search domains without a server: the image's servers stay, the domains follow.
    vm.seed(
        "instance-id: iid-search\n",
        "#cloud-config\nmanage_resolv_conf: true\nresolv_conf:\n  searchdomains: ['corp.example']\n",
        None,
    );
    let (out, s) = vm.boot();
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert_eq!(
        etc(&s, "resolv.conf"),
        format!("{RESOLVED_STUB}search corp.example\n")
    );
}

#[test]
fn same_instance_rewrites_nothing_and_new_instance_keeps_host_keys() {
    let vm = Vm::new();
    vm.boot();
    let key = vm.identity("ssh_host_ed25519_key");
    let manifest = vm.identity("manifest.json");
    let (_, s) = vm.boot();
    assert!(s.contains("rc=0"));
    assert_eq!(vm.generation(), "gen-1");
    assert_eq!(vm.identity("manifest.json"), manifest);
    vm.seed(
        "instance-id: iid-2\n",
        "#cloud-config\nhostname: web2\n",
        None,
    );
    let (_, s) = vm.boot();
    assert_eq!(etc(&s, "hostname"), "web2\n");
    assert_eq!(vm.generation(), "gen-2");
    assert_eq!(
        vm.identity("ssh_host_ed25519_key"),
        key,
        "a new instance-id must not regenerate host keys"
    );
    assert!(
        vm.p("sysroot/var/identity/gen-1").is_dir(),
        "the previous generation is kept"
    );
}

#[test]
fn clone_regenerates_machine_id_and_host_key() {
    let vm = Vm::new();
    vm.boot();
    let key = vm.identity("ssh_host_ed25519_key");
    let mid = vm.identity("machine-id");
    vm.set_uuid("99999999-2222-3333-4444-555555555555");
    let (out, _) = vm.boot();
    assert!(stderr(&out).contains("CLONE DETECTED"), "{}", stderr(&out));
    assert_ne!(vm.identity("ssh_host_ed25519_key"), key);
    assert_ne!(vm.identity("machine-id"), mid);
}

#[test]
fn clone_policy_refuse_applies_nothing() {
    let vm = Vm::new();
    vm.boot();
    vm.set_uuid("99999999-2222-3333-4444-555555555555");
    let (out, _) = vm.run(&format!(
        "{AGENT} initrd --sysroot sysroot --root host --run run --clone-policy refuse"
    ));
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("clone policy is 'refuse'"),
        "{}",
        stderr(&out)
    );
    assert_eq!(vm.generation(), "gen-1");
}

/// Boots once with a good seed, then with `bad`; the second boot must fail with `needle`
/// in its error, and the first identity must still be current and mounted.
fn assert_bad_seed_keeps_identity(setup: &str, prepare: impl Fn(&Vm), needle: &str) {
    let vm = Vm::new();
    let (_, first) = vm.boot();
    let mid = etc(&first, "machine-id");
    prepare(&vm);
    let (out, s) = vm.boot_with(setup);
    assert!(
        s.contains("rc=1"),
        "the stage must fail: {s}\n{}",
        stderr(&out)
    );
    let err = stderr(&out);
    assert!(err.contains(needle), "error should name {needle:?}: {err}");
    assert_eq!(
        etc(&s, "hostname"),
        "web1\n",
        "previous identity still mounted: {s}"
    );
    assert_eq!(etc(&s, "machine-id"), mid);
    assert_eq!(vm.generation(), "gen-1");
    let status = Command::new(AGENT)
        .args(["status", "--identity-dir"])
        .arg(vm.p("sysroot/var/identity"))
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "gen-1 still verifies against its manifest: {}",
        stderr(&status)
    );
}

/// A wrong `--sources` name or a trusted-keys file that cannot be read (a typo in the
/// machine's configuration) still binds the current generation: the machine keeps its
/// host key and name. An unknown source is left out and named; unreadable keys trust
/// no seed.
#[test]
fn bad_stage_options_still_bind_the_current_identity() {
    let vm = Vm::new();
    let (_, first) = vm.boot();
    let mid = etc(&first, "machine-id");
    for (opts, needle, rc) in [
        (
            "--sources bogus,nocloud-dir",
            "unknown source bogus",
            "rc=0",
        ),
        (
            "--sources bogus",
            "the default sources are searched",
            "rc=0",
        ),
        (
            "--trusted-keys /nonexistent/keys",
            "cannot read trusted keys /nonexistent/keys",
            "rc=1",
        ),
    ] {
        let (out, s) = vm.run(&format!(
            "{AGENT} initrd --sysroot sysroot --root host --run run {opts}; echo rc=$?; for f in hostname machine-id; do echo \"== $f\"; cat sysroot/etc/$f; done"
        ));
        let err = stderr(&out);
        assert!(s.contains(rc), "{opts}: {s}\n{err}");
        assert!(err.contains(needle), "{opts}: {err}");
        assert_eq!(etc(&s, "hostname"), "web1\n", "{opts}: {s}\n{err}");
        assert_eq!(etc(&s, "machine-id"), mid, "{opts}");
        assert_eq!(vm.generation(), "gen-1");
    }
}

#[test]
fn malformed_yaml_names_the_file_and_line() {
    assert_bad_seed_keeps_identity(
        "",
        |vm| {
            vm.seed(
                "instance-id: iid-2\n",
                "#cloud-config\nhostname: [oops\n",
                None,
            )
        },
        "/seed//user-data: line ",
    );
}

#[test]
fn hundred_megabyte_user_data_is_refused() {
    assert_bad_seed_keeps_identity(
        "",
        |vm| vm.seed("instance-id: iid-2\n", vec![b'#'; 100 * 1024 * 1024], None),
        "user-data: 104857600 bytes exceed",
    );
}

#[test]
fn path_traversal_hostname_is_refused() {
    assert_bad_seed_keeps_identity(
        "",
        |vm| {
            vm.seed(
                "instance-id: iid-2\n",
                "#cloud-config\nhostname: ../../etc\n",
                None,
            )
        },
        "key 'hostname': \"../../etc\" is not a valid hostname",
    );
}

#[test]
fn symlink_planted_at_current_is_refused() {
    let vm = Vm::new();
    vm.boot();
    let cur = vm.p("sysroot/var/identity/current");
    std::fs::remove_file(&cur).unwrap();
    std::os::unix::fs::symlink("/etc", &cur).unwrap();
    let (out, s) = vm.boot();
    assert!(s.contains("rc=1"));
    assert!(
        stderr(&out).contains("current points to \"/etc\", not to a generation"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn full_var_keeps_the_previous_generation_whole() {
    // /var is a tiny tmpfs holding the first identity; fill it, then try a new instance.
    let vm = Vm::new();
    let setup = "mount -t tmpfs -o size=512k tmpfs sysroot/var";
    let (out, s) = vm.run(&format!(
        "{setup}; {AGENT} initrd --sysroot sysroot --root host --run run 2>/dev/null; dd if=/dev/zero of=sysroot/var/fill bs=4k 2>/dev/null; sed -i s/iid-1/iid-2/ sysroot/seed/meta-data; {AGENT} initrd --sysroot sysroot --root host --run run; echo rc=$?; cat sysroot/etc/hostname; readlink sysroot/var/identity/current; {AGENT} status --identity-dir sysroot/var/identity >/dev/null && echo verified"
    ));
    assert!(s.contains("rc=1"), "{s}");
    assert!(
        stderr(&out).contains("No space left on device"),
        "{}",
        stderr(&out)
    );
    assert!(stderr(&out).contains("/var/identity"), "{}", stderr(&out));
    assert!(s.contains("web1\ngen-1\nverified"), "{s}");
}

#[test]
fn an_old_generation_that_cannot_be_removed_does_not_undo_the_new_one() {
    let vm = Vm::new();
    vm.boot();
    vm.boot_instance(2);
    // gen-1 is neither current nor the previous one, so writing gen-3 prunes it; a mount
    // on one of its files makes that removal fail (EBUSY).
    vm.seed(
        "instance-id: iid-3\n",
        "#cloud-config\nhostname: web3\n",
        None,
    );
    let (out, s) = vm.boot_with("mount --bind /dev/null sysroot/var/identity/gen-1/machine-id");
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert_eq!(etc(&s, "hostname"), "web3\n", "{s}");
    assert_eq!(vm.generation(), "gen-3");
    let err = stderr(&out);
    assert!(
        err.contains("gen-3 is current; cannot remove old") && err.contains("gen-1"),
        "{err}"
    );
}

#[test]
fn read_only_var_keeps_the_previous_generation_mounted() {
    assert_bad_seed_keeps_identity(
        "mount --bind sysroot/var sysroot/var && mount -o remount,bind,ro sysroot/var",
        |vm| {
            vm.seed(
                "instance-id: iid-2\n",
                "#cloud-config\nhostname: web2\n",
                None,
            )
        },
        "Read-only file system",
    );
}

#[test]
fn unreadable_device_is_named_and_boot_goes_on() {
    let vm = Vm::new();
    std::fs::create_dir_all(vm.p("host/sys/class/block/vdz")).unwrap();
    std::fs::create_dir_all(vm.p("host/dev/vdz")).unwrap();
    let (out, s) = vm.boot();
    assert!(s.contains("rc=0"), "{s}");
    assert!(stderr(&out).contains("dev/vdz"), "{}", stderr(&out));
}

#[test]
fn render_is_a_dry_run_of_the_same_tree() {
    let vm = Vm::new();
    let out = Command::new(AGENT)
        .args(["render", "--link", "ens18=52:54:00:12:34:56", "--seed"])
        .arg(vm.p("sysroot/seed"))
        .arg("--out")
        .arg(vm.p("rendered"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(std::fs::read(vm.p("rendered/hostname")).unwrap(), b"web1\n");
    assert!(
        vm.p("rendered/network/10-cloud-init-ens18.network")
            .exists()
    );
    assert!(
        !vm.p("sysroot/var/identity").exists(),
        "render must not touch the system"
    );
}

/// Signs the seed directory the way `seedctl` does, but with OpenSSH's own signer, so the
/// agent's verification is checked against an independent implementation.
fn sign_seed(vm: &Vm, uuid: &str, generation: u64) -> PathBuf {
    use nixseed_core::seed::SeedFiles;
    use nixseed_core::trust::{MANIFEST_FILE, SeedManifest};
    let key = vm.p("signing_key");
    if !key.exists() {
        let st = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(&key)
            .status()
            .unwrap();
        assert!(st.success());
        std::fs::copy(vm.p("signing_key.pub"), vm.p("trusted_keys")).unwrap();
    }
    let seed_dir = vm.p("sysroot/seed");
    let mut files = SeedFiles::default();
    for name in ["meta-data", "user-data", "network-config"] {
        if let Ok(b) = std::fs::read(seed_dir.join(name)) {
            files.0.insert(name.to_string(), b);
        }
    }
    let manifest = SeedManifest::for_files("web1", Some(uuid), generation, &files);
    let path = seed_dir.join(MANIFEST_FILE);
    std::fs::write(&path, manifest.to_bytes()).unwrap();
    let _ = std::fs::remove_file(seed_dir.join("nixseed-manifest.json.sig"));
    let st = Command::new("ssh-keygen")
        .args(["-Y", "sign", "-n", "nixseed-seed", "-f"])
        .arg(&key)
        .arg(&path)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    std::fs::rename(
        seed_dir.join("nixseed-manifest.json.sig"),
        seed_dir.join("nixseed-manifest.sig"),
    )
    .unwrap();
    vm.p("trusted_keys")
}

fn boot_trusted(vm: &Vm) -> (Output, String) {
    vm.run(&format!(
        "{AGENT} initrd --sysroot sysroot --root host --run run --trusted-keys trusted_keys; echo rc=$?; cat sysroot/etc/hostname"
    ))
}

#[test]
fn trusted_keys_accept_signed_seeds_and_refuse_the_rest() {
    let vm = Vm::new();
    let uuid = "11111111-2222-3333-4444-555555555555";
    sign_seed(&vm, uuid, 3);
    let (out, s) = boot_trusted(&vm);
    assert!(s.contains("rc=0\nweb1"), "{s}\n{}", stderr(&out));
    assert!(
        stderr(&out).contains("signature verified (machine web1, seed generation 3)"),
        "{}",
        stderr(&out)
    );

    // Tampered after signing: refused, identity stays.
    vm.seed(
        "instance-id: iid-2\n",
        "#cloud-config\nhostname: evil\n",
        Some(PROXMOX_NETWORK),
    );
    let (out, s) = boot_trusted(&vm);
    assert!(s.contains("rc=1\nweb1"), "{s}");
    assert!(
        stderr(&out).contains("does not match the signed manifest"),
        "{}",
        stderr(&out)
    );

    // Signed for another VM.
    sign_seed(&vm, "99999999-0000-0000-0000-000000000000", 4);
    let (out, _) = boot_trusted(&vm);
    assert!(
        stderr(&out).contains("but this VM is 11111111-2222-3333-4444-555555555555"),
        "{}",
        stderr(&out)
    );

    // An older generation than the applied one.
    sign_seed(&vm, uuid, 2);
    let (out, _) = boot_trusted(&vm);
    assert!(
        stderr(&out).contains("seed generation 2 is lower than the applied 3: rollback refused"),
        "{}",
        stderr(&out)
    );

    // Unsigned.
    for f in ["nixseed-manifest.json", "nixseed-manifest.sig"] {
        std::fs::remove_file(vm.p("sysroot/seed").join(f)).unwrap();
    }
    let (out, s) = boot_trusted(&vm);
    assert!(s.contains("rc=1\nweb1"), "{s}");
    assert!(
        stderr(&out).contains("unsigned seed refused"),
        "{}",
        stderr(&out)
    );
    assert_eq!(vm.generation(), "gen-1");
}

#[test]
fn identity_dir_owned_by_another_user_or_world_writable_is_refused() {
    let vm = Vm::new();
    vm.boot();
    let dir = vm.p("sysroot/var/identity");
    std::os::unix::fs::chown(&dir, Some(65534), None).unwrap();
    let (out, s) = vm.boot();
    assert!(s.contains("rc=1"), "{s}");
    assert!(
        stderr(&out).contains("is owned by uid 65534"),
        "{}",
        stderr(&out)
    );
    std::os::unix::fs::chown(&dir, Some(0), None).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
    let (out, s) = vm.boot();
    assert!(s.contains("rc=1"), "{s}");
    assert!(
        stderr(&out).contains("writable by group or others"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn write_files_land_under_var_once_per_instance() {
    let vm = Vm::new();
    vm.seed(
        "instance-id: iid-1\n",
        "#cloud-config\nhostname: web1\nwrite_files:\n  - path: /var/lib/app/token\n    content: s3cret\n    permissions: '0600'\n",
        None,
    );
    let (out, s) = vm.boot();
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    let f = vm.p("sysroot/var/lib/app/token");
    assert_eq!(std::fs::read(&f).unwrap(), b"s3cret");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&f).unwrap().permissions().mode() & 0o777,
        0o600
    );
    // The operator changes the file; a reboot of the same instance leaves it alone.
    std::fs::write(&f, "rotated").unwrap();
    vm.boot();
    assert_eq!(std::fs::read(&f).unwrap(), b"rotated");
}

/// A seed whose meta-data says `dsmode: disabled` is not claimed, as cloud-init does not
/// claim it: the identity the machine has stays, and the journal says why.
#[test]
fn a_seed_with_dsmode_disabled_is_passed_over() {
    let vm = Vm::new();
    vm.seed(
        "instance-id: iid-1\n",
        "#cloud-config\nhostname: web1\n",
        None,
    );
    let (out, s) = vm.boot();
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    vm.seed(
        "instance-id: iid-2\ndsmode: disabled\n",
        "#cloud-config\nhostname: web2\n",
        None,
    );
    let (out, s) = vm.boot();
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert!(
        stderr(&out).contains("dsmode: disabled: this seed is passed over"),
        "{}",
        stderr(&out)
    );
    assert_eq!(vm.generation(), "gen-1");
    assert_eq!(vm.identity("hostname"), b"web1\n");
    // Its dry run says the same, and writes nothing.
    let out = Command::new(AGENT)
        .args(["render", "--seed"])
        .arg(vm.p("sysroot/seed"))
        .arg("--out")
        .arg(vm.p("rendered"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("dsmode: disabled: a boot passes this seed over"),
        "{}",
        stderr(&out)
    );
    assert!(!vm.p("rendered/hostname").exists());
}

/// vendor-data's `write_files` run when user-data does not name the key, and not when it
/// says `write_files: []` (cloud-init's merge keeps user-data's value, empty or not).
#[test]
fn vendor_write_files_yield_to_an_empty_user_list() {
    let vendor =
        "#cloud-config\nwrite_files:\n  - path: /var/lib/vendor/flag\n    content: from-vendor\n";
    for (user, written) in [
        ("#cloud-config\nhostname: web1\n", true),
        ("#cloud-config\nhostname: web1\nwrite_files: []\n", false),
    ] {
        let vm = Vm::new();
        vm.seed("instance-id: iid-1\n", user, None);
        std::fs::write(vm.p("sysroot/seed/vendor-data"), vendor).unwrap();
        let (out, s) = vm.boot();
        assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
        assert_eq!(
            vm.p("sysroot/var/lib/vendor/flag").exists(),
            written,
            "user-data {user:?}: {}",
            stderr(&out)
        );
    }
}

/// Killed after the new generation became current and before its `write_files` were
/// written (a power cut there): the next boot of the same instance finds the marker the
/// apply left and writes them, once.
#[test]
fn write_files_cut_off_by_a_kill_are_written_at_the_next_boot() {
    let vm = Vm::new();
    vm.seed(
        "instance-id: iid-1\n",
        "#cloud-config\nhostname: web1\nwrite_files:\n  - path: /var/lib/app/log\n    content: \"line\\n\"\n    append: true\n",
        None,
    );
    kill_at(&vm, "before-write-files");
    let f = vm.p("sysroot/var/lib/app/log");
    assert!(!f.exists(), "written before the kill");
    assert_eq!(vm.generation(), "gen-1");

    let (out, s) = vm.boot();
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert!(
        stderr(&out).contains("did not finish (a shutdown or a file that could not be written): writing them now, from entry 1"),
        "{}",
        stderr(&out)
    );
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "line\n");
    assert!(!vm.p("sysroot/var/lib/nixseed/write-files-pending").exists());
    // Done once: the boot after that leaves the file alone.
    vm.boot();
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "line\n");
}

/// Stage 2 doing the whole job (no nixseed in the initrd, or an initrd stage that
/// failed) binds /etc/hostname after systemd set the kernel's hostname from the image:
/// it sets the kernel's hostname to the identity's too.
#[test]
fn stage_2_alone_sets_the_kernel_hostname() {
    let vm = Vm::new();
    vm.seed(
        "instance-id: iid-7\n",
        "#cloud-config\nhostname: web7\n",
        None,
    );
    let (out, s) = vm.run(&format!(
        "hostname image-name; {AGENT} apply --sysroot sysroot --root host --run run --channel-wait 0; echo rc=$?; echo \"== uname $(uname -n)\""
    ));
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert!(s.contains("== uname web7"), "{s}\n{}", stderr(&out));
}

/// A placeholder that is a symlink (a stock image's `/etc/resolv.conf ->
/// /run/systemd/resolve/stub-resolv.conf`) is refused by name before any bind is made:
/// /etc does not end up with some files of the identity and not others, and no bind lands
/// on the link's target.
#[test]
fn a_symlinked_placeholder_is_refused_before_any_bind() {
    let vm = Vm::new();
    std::fs::write(vm.p("sysroot/etc/stub-resolv.conf"), RESOLVED_STUB).unwrap();
    std::fs::remove_file(vm.p("sysroot/etc/resolv.conf")).unwrap();
    std::os::unix::fs::symlink("stub-resolv.conf", vm.p("sysroot/etc/resolv.conf")).unwrap();
    let (out, s) = vm.boot();
    assert!(!s.contains("rc=0"), "{s}");
    let err = stderr(&out);
    assert!(
        err.contains("sysroot/etc/resolv.conf: the placeholder is a symlink (to stub-resolv.conf)"),
        "{err}"
    );
    // Nothing bound: hostname and machine-id show the image's empty placeholders.
    assert!(s.contains("== hostname\n== machine-id\n"), "{s}");
    assert_eq!(
        std::fs::read_to_string(vm.p("sysroot/etc/stub-resolv.conf")).unwrap(),
        RESOLVED_STUB
    );
}

/// A clone (same seed, another product_uuid) keeps its instance: the files the seed
/// wrote are not written again, so an `append` entry is not doubled and an operator's
/// change to a written file stays.
#[test]
fn a_clone_does_not_write_its_files_again() {
    let vm = Vm::new();
    vm.seed(
        "instance-id: iid-1\n",
        "#cloud-config\nhostname: web1\nwrite_files:\n  - path: /var/lib/app/log\n    content: \"line\\n\"\n    append: true\n",
        None,
    );
    let (out, s) = vm.boot();
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    let f = vm.p("sysroot/var/lib/app/log");
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "line\n");
    vm.set_uuid("99999999-2222-3333-4444-555555555555");
    let (out, _) = vm.boot();
    assert!(stderr(&out).contains("CLONE DETECTED"), "{}", stderr(&out));
    assert_eq!(std::fs::read_to_string(&f).unwrap(), "line\n");
}

/// A write_files entry that cannot be written (here a symlink planted on its path) is an
/// error naming the file, and the identity is applied and mounted all the same.
#[test]
fn a_write_files_failure_is_reported_and_the_identity_still_applies() {
    let vm = Vm::new();
    vm.seed(
        "instance-id: iid-1\n",
        "#cloud-config\nhostname: web1\nwrite_files:\n  - path: /var/lib/app/token\n    content: s3cret\n",
        None,
    );
    let (out, s) = vm.boot_with(
        "mkdir -p sysroot/var/lib elsewhere && ln -s ../../../elsewhere sysroot/var/lib/app",
    );
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert!(s.contains("== hostname\nweb1"), "{s}");
    let err = stderr(&out);
    assert!(
        err.contains("write_files: cannot write /var/lib/app/token"),
        "{err}"
    );
    assert!(!vm.p("elsewhere/token").exists());
}

/// Every delay point of a new-instance apply: the agent is SIGKILLed there, and the store
/// must hold exactly the old or exactly the new generation, verified against its manifest.
/// (The real power cut, with the VM killed, is vm-tests' `powercut` scenario.)
#[test]
fn killed_at_every_point_the_store_holds_one_whole_generation() {
    let points = [
        "composed",
        "store-file-admin_authorized_keys",
        "store-file-hostname",
        "store-file-machine-id",
        "store-file-manifest.json",
        "store-file-network/10-cloud-init-ens18.network",
        "store-file-ssh_host_ed25519_key",
        "store-file-ssh_host_ed25519_key.pub",
        "store-file-user_authorized_keys",
        "store-before-rename",
        "store-before-swap",
        "store-after-swap",
        "store-after-links",
        "store-after-prune",
        "bind-machine-id",
        "bind-hostname",
        "bind-resolv.conf",
    ];
    for (i, point) in points.iter().enumerate() {
        let vm = Vm::new();
        vm.boot();
        let old = vm.identity("manifest.json");
        vm.seed(
            &format!("instance-id: iid-{}\n", i + 10),
            "#cloud-config\nhostname: web2\n",
            Some(PROXMOX_NETWORK),
        );
        kill_at(&vm, point);
        let status = Command::new(AGENT)
            .args(["status", "--identity-dir"])
            .arg(vm.p("sysroot/var/identity"))
            .output()
            .unwrap();
        assert!(status.status.success(), "{point}: {}", stderr(&status));
        let now = vm.identity("manifest.json");
        let gen_now = vm.generation();
        match gen_now.as_str() {
            "gen-1" => assert_eq!(now, old, "{point}: old generation changed"),
            "gen-2" => assert!(
                String::from_utf8_lossy(&now).contains(&format!("iid-{}", i + 10)),
                "{point}"
            ),
            other => panic!("{point}: current is {other}"),
        }
        // And the next boot completes the job.
        let (out, s) = vm.boot();
        assert!(
            s.contains("rc=0") && etc(&s, "hostname") == "web2\n",
            "{point}: {s}\n{}",
            stderr(&out)
        );
    }
}

/// Runs the initrd stage with the delay point `point` set, and SIGKILLs the agent once
/// it says it has reached it: a power cut there.
fn kill_at(vm: &Vm, point: &str) {
    use std::io::BufRead;
    let mut child = Command::new("unshare")
        .args(["-m", AGENT, "initrd", "--sysroot"])
        .arg(vm.p("sysroot"))
        .arg("--root")
        .arg(vm.p("host"))
        .arg("--run")
        .arg(vm.p("run"))
        .env("NIXSEED_TEST_DELAY", format!("{point}:60000"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let reached = std::io::BufReader::new(child.stderr.take().unwrap())
        .lines()
        .any(|l| l.unwrap().contains("test delay point reached"));
    assert!(reached, "{point}: the agent never reached the point");
    child.kill().unwrap();
    child.wait().unwrap();
}

/// Runs the initrd stage with the given cmdline and no `s=` seed directory.
fn boot_cmdline(vm: &Vm, cmdline: &str) -> (Output, String) {
    std::fs::write(vm.p("host/proc/cmdline"), cmdline).unwrap();
    vm.boot()
}

/// Stage 2 run again after `/etc` lost its binds (NixOS's sysinit-reactivation remounts
/// `/etc`), with a seed that brings a new machine-id: the rest of the identity is bound
/// again, `/etc/machine-id` keeps the ID the initrd stage gave this boot, and nothing
/// says it was set late.
#[test]
fn a_stage_two_rerun_keeps_the_boots_machine_id() {
    let vm = Vm::new();
    let new_id = "0123456789abcdef0123456789abcdef";
    std::fs::create_dir_all(vm.p("seed2")).unwrap();
    std::fs::write(vm.p("seed2/meta-data"), "instance-id: iid-2\n").unwrap();
    std::fs::write(
        vm.p("seed2/user-data"),
        format!("#cloud-config\nhostname: second\nnixseed:\n  machine-id: {new_id}\n"),
    )
    .unwrap();
    let (out, stdout) = vm.run(&format!(
        "{AGENT} initrd --sysroot sysroot --root host --run run 2>/dev/null || exit 9; echo \"== first\"; cat sysroot/etc/machine-id; cp seed2/meta-data seed2/user-data sysroot/seed/; for f in machine-id hostname resolv.conf hosts; do umount sysroot/etc/$f || exit 8; done; {AGENT} apply --sysroot sysroot --root host --run run; echo \"rc=$?\"; for f in hostname machine-id; do echo \"== $f\"; cat sysroot/etc/$f; done"
    ));
    assert!(stdout.contains("rc=0"), "{stdout}\n{}", stderr(&out));
    let first = format!(
        "{}\n",
        etc(&stdout, "first").lines().next().unwrap_or_default()
    );
    assert_eq!(first.trim().len(), 32, "{stdout}");
    assert_eq!(
        etc(&stdout, "hostname"),
        "second\n",
        "the new generation is bound"
    );
    assert_eq!(
        etc(&stdout, "machine-id"),
        first,
        "/etc/machine-id kept this boot's ID"
    );
    assert_eq!(
        vm.identity("machine-id"),
        format!("{new_id}\n").into_bytes()
    );
    let log = stderr(&out);
    assert!(
        !log.contains("set late") && log.contains("kept at this boot's"),
        "{log}"
    );
}

/// Stage 2 restarted while the identity lock is held (here by `flock`, as a push's
/// `nixseed-agent request` or a guest-agent command holds it). Held briefly, as by a
/// guest-agent command, stage 2 waits and then does its work. Held longer, as by a push,
/// it gives up after 2 s and leaves the identity to the push, which binds what it writes,
/// saying so: a push restarts sshd, whose start systemd holds until this unit's job has
/// ended, so a stage 2 that waited for the push would stall it. The lock file is root's
/// alone, whatever mode it was left with.
#[test]
fn a_stage_two_rerun_waits_briefly_then_leaves_the_identity_to_a_change_in_progress() {
    let vm = Vm::new();
    let (out, stdout) = vm.run(&format!(
        "{AGENT} initrd --sysroot sysroot --root host --run run 2>/dev/null || exit 9
         mkdir -p run/nixseed
         touch run/nixseed/identity.lock && chmod 0644 run/nixseed/identity.lock
         hold() {{ rm -f held; flock -x run/nixseed/identity.lock -c \"echo > held; sleep $1\" & \
                   while [ ! -e held ]; do sleep 0.05; done; }}
         timed() {{ start=$(date +%s%N); \
                    {AGENT} apply --sysroot sysroot --root host --run run ${{2:-}} 2> $1.log; \
                    echo \"$1=$? $(( ($(date +%s%N) - start) / 1000000 ))\"; }}
         hold 0.5; timed brief; wait
         hold 5; timed long --firewall; wait
         echo \"mode=$(stat -c %a run/nixseed/identity.lock)\"
         echo \"== hostname\"; cat sysroot/etc/hostname"
    ));
    let log =
        |name: &str| std::fs::read_to_string(vm.p(&format!("{name}.log"))).unwrap_or_default();
    let (brief, long) = (log("brief"), log("long"));
    let all = format!("{stdout}\n{}\nbrief:\n{brief}\nlong:\n{long}", stderr(&out));
    let ran = |name: &str| -> (String, u64) {
        let rest = stdout
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or_default();
        let (rc, ms) = rest.split_once(' ').unwrap_or(("?", ""));
        (rc.to_owned(), ms.parse().unwrap_or(u64::MAX))
    };
    let (rc, ms) = ran("brief");
    assert!(
        rc == "0" && (300..1900).contains(&ms) && brief.contains("nixseed apply:"),
        "held for 0.5 s, stage 2 must wait and do its work (rc {rc}, {ms} ms)\n{all}"
    );
    let (rc, ms) = ran("long");
    assert!(
        rc == "0" && (1900..4500).contains(&ms),
        "held for 5 s, stage 2 must give up after 2 s (rc {rc}, {ms} ms)\n{all}"
    );
    assert!(
        long.contains("the identity has been changing for 2 s")
            && long.contains("nixseed/identity.lock")
            && long.contains("no firewall load")
            && !long.contains("nixseed apply:"),
        "{all}"
    );
    assert!(stdout.contains("mode=600"), "{all}");
    assert_eq!(etc(&stdout, "hostname"), "web1\n");
}

/// Writes the image's `/var/lib/cloud/seed/nocloud` with `meta` and `user`.
fn seed_directory(vm: &Vm, meta: &str, user: &str) {
    let dir = vm.p("sysroot/var/lib/cloud/seed/nocloud");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("meta-data"), meta).unwrap();
    std::fs::write(dir.join("user-data"), user).unwrap();
}

#[test]
fn seed_directory_under_var_lib_cloud_is_a_source() {
    let vm = Vm::new();
    seed_directory(&vm, "instance-id: dir-1\nlocal-hostname: fromdir\n", "");
    let (out, s) = boot_cmdline(&vm, "ro quiet\n");
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert_eq!(etc(&s, "hostname"), "fromdir\n");
    assert!(stderr(&out).contains("source nocloud:"), "{}", stderr(&out));
}

/// A `ds=nocloud` token with no `s=` does not hide the image's seed directory: cloud-init
/// merges the token over it, so the directory's user-data (here a key) applies, and the
/// token's `h=` wins over its meta-data's name.
#[test]
fn a_token_without_a_seed_location_is_merged_over_the_seed_directory() {
    let vm = Vm::new();
    seed_directory(
        &vm,
        "instance-id: dir-1\nlocal-hostname: fromdir\n",
        "#cloud-config\nssh_authorized_keys: [ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFromTheSeedDirectory op@host]\n",
    );
    let (out, s) = boot_cmdline(&vm, "ro ds=nocloud;h=fromcmdline\n");
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    assert_eq!(etc(&s, "hostname"), "fromcmdline\n");
    assert!(err.contains("instance-id dir-1"), "{err}");
    let keys = std::fs::read_to_string(vm.p("sysroot/var/identity/current/admin_authorized_keys"))
        .unwrap_or_default();
    assert!(keys.contains("FromTheSeedDirectory"), "{keys}\n{err}");
}

/// A URL in `s=` (cloud-init's NoCloudNet fetches it) is not read, and the journal says
/// so, naming it: the token's own `i=`/`h=` still make the seed.
#[test]
fn a_seed_url_on_the_command_line_is_named_as_not_read() {
    let vm = Vm::new();
    let (out, s) = boot_cmdline(
        &vm,
        "ro ds=nocloud;s=http://10.0.0.1:8000/;i=iid-7;h=web7\n",
    );
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    assert_eq!(etc(&s, "hostname"), "web7\n");
    assert!(
        err.contains("seedfrom \"http://10.0.0.1:8000/\" is not read"),
        "{err}"
    );
}

#[test]
fn cmdline_and_smbios_serial_tokens_are_sources() {
    let vm = Vm::new();
    let (out, s) = boot_cmdline(&vm, "ro ds=nocloud;i=iid-cmd;h=fromcmdline\n");
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert_eq!(etc(&s, "hostname"), "fromcmdline\n");
    // A token in the serial with no command-line token: hostname `fromserial`.
    let boots_from_serial = |vm: &Vm, serial: &str| {
        std::fs::write(vm.p("host/sys/class/dmi/id/product_serial"), serial).unwrap();
        let (out, s) = boot_cmdline(vm, "ro\n");
        assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
        assert_eq!(etc(&s, "hostname"), "fromserial\n");
        assert!(
            stderr(&out).contains("source nocloud:smbios-serial"),
            "{}",
            stderr(&out)
        );
    };
    boots_from_serial(&Vm::new(), "ds=nocloud;h=fromserial;i=iid-serial\n");
    // A serial token that names a seed directory: its own i= and h= apply to that seed,
    // not the command line's.
    let vm = Vm::new();
    let dir = vm.p("sysroot/serial-seed");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("meta-data"), "instance-id: dir-1\n").unwrap();
    std::fs::write(dir.join("user-data"), "").unwrap();
    boots_from_serial(
        &vm,
        "ds=nocloud;s=file:///serial-seed/;i=iid-serial;h=fromserial\n",
    );
}

/// cloud-init merges the serial's token first and keeps the first value of a key: the
/// serial's `i=`/`h=` apply to a seed volume, and win over the command line's.
#[test]
fn the_serials_token_applies_to_a_volume_and_wins_over_the_command_line() {
    let vm = Vm::new();
    attach_cidata_iso(&vm, "instance-id: iid-volume\nlocal-hostname: volhost\n");
    std::fs::write(
        vm.p("host/sys/class/dmi/id/product_serial"),
        "ds=nocloud;i=iid-serial;h=serialhost\n",
    )
    .unwrap();
    let (out, s) = boot_cmdline(&vm, "ro ds=nocloud;h=cmdhost\n");
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    assert_eq!(etc(&s, "hostname"), "serialhost\n");
    assert!(
        err.contains("instance-id iid-serial, source nocloud:"),
        "{err}"
    );
    assert!(err.contains("dev/sr0"), "{err}");
}

#[test]
fn systemd_credentials_from_smbios_type_11_are_a_source() {
    let vm = Vm::new();
    let entry = vm.p("host/sys/firmware/dmi/entries/11-0");
    std::fs::create_dir_all(&entry).unwrap();
    let mut raw = vec![11u8, 5, 0, 0, 3];
    raw.extend_from_slice(b"io.systemd.credential:system.hostname=fromcreds\0");
    raw.extend_from_slice(
        b"io.systemd.credential:system.machine_id=0123456789abcdef0123456789abcdef\0",
    );
    raw.extend_from_slice(
        b"io.systemd.credential:ssh.authorized_keys.root=ssh-ed25519 AAAACRED root\0\0",
    );
    std::fs::write(entry.join("raw"), raw).unwrap();
    let (out, s) = boot_cmdline(&vm, "ro\n");
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert_eq!(etc(&s, "hostname"), "fromcreds\n");
    assert_eq!(etc(&s, "machine-id"), "0123456789abcdef0123456789abcdef\n");
    assert_eq!(
        vm.identity("admin_authorized_keys"),
        b"ssh-ed25519 AAAACRED root\n"
    );

    // An FQDN is the machine's name as given, as systemd sets it.
    let mut raw = vec![11u8, 5, 0, 0, 1];
    raw.extend_from_slice(b"io.systemd.credential:system.hostname=vm1.example.com\0\0");
    std::fs::write(entry.join("raw"), raw).unwrap();
    let (out, s) = boot_cmdline(&vm, "ro\n");
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert_eq!(etc(&s, "hostname"), "vm1.example.com\n");
}

/// Credentials from QEMU's fw_cfg (`-fw_cfg name=opt/io.systemd.credentials/NAME,…`, as
/// the `qemu_fw_cfg` driver shows them) and the kernel command line
/// (`systemd.set_credential=`), in systemd's order: fw_cfg, then SMBIOS, then the command
/// line, the first value of a name kept.
#[test]
fn fw_cfg_and_command_line_credentials_are_read_in_systemd_s_order() {
    let vm = Vm::new();
    let fw = vm.p("host/sys/firmware/qemu_fw_cfg/by_name/opt/io.systemd.credentials");
    std::fs::create_dir_all(fw.join("system.hostname")).unwrap();
    std::fs::write(fw.join("system.hostname/raw"), "from-fw-cfg").unwrap();
    let smbios = vm.p("host/sys/firmware/dmi/entries/11-0");
    std::fs::create_dir_all(&smbios).unwrap();
    let mut raw = vec![11u8, 5, 0, 0, 2];
    raw.extend_from_slice(b"io.systemd.credential:system.hostname=from-smbios\0");
    raw.extend_from_slice(
        b"io.systemd.credential:system.machine_id=0123456789abcdef0123456789abcdef\0\0",
    );
    std::fs::write(smbios.join("raw"), raw).unwrap();
    let (out, s) = boot_cmdline(
        &vm,
        "ro systemd.set_credential=system.machine_id:fedcba9876543210fedcba9876543210 systemd.set_credential=ssh.authorized_keys.root:\"ssh-ed25519 AAAACMDLINE root\"\n",
    );
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    assert_eq!(etc(&s, "hostname"), "from-fw-cfg\n");
    assert_eq!(etc(&s, "machine-id"), "0123456789abcdef0123456789abcdef\n");
    assert_eq!(
        vm.identity("admin_authorized_keys"),
        b"ssh-ed25519 AAAACMDLINE root\n"
    );
    assert!(
        err.contains("source credentials:fw_cfg+smbios+cmdline"),
        "{err}"
    );
    assert!(
        err.contains("11-0/raw: credential system.hostname is set twice"),
        "{err}"
    );
}

/// Credentials as systemd reads them: the SMBIOS entries in numeric order up to the first
/// number missing, with the first value of a name kept (`11-2` before `11-10`), a machine-id in UUID form or `firmware`
/// (the product UUID), and a credential systemd would ignore dropped alone.
#[test]
fn smbios_credentials_are_read_the_way_systemd_reads_them() {
    let entry = |vm: &Vm, n: u32, strings: &[&str]| {
        let dir = vm.p(&format!("host/sys/firmware/dmi/entries/11-{n}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut raw = vec![11u8, 5, 0, 0, strings.len() as u8];
        for s in strings {
            raw.extend_from_slice(format!("io.systemd.credential:{s}\0").as_bytes());
        }
        raw.push(0);
        std::fs::write(dir.join("raw"), raw).unwrap();
    };
    let vm = Vm::new();
    vm.set_uuid("0123ABCD-4567-89AB-CDEF-0123456789AB");
    for n in 0..=10 {
        entry(&vm, n, &[]);
    }
    entry(&vm, 10, &["system.hostname=from-ten"]);
    // After a missing number (11), systemd reads no further.
    entry(
        &vm,
        12,
        &["ssh.authorized_keys.root=ssh-ed25519 AAAAGAP root"],
    );
    entry(
        &vm,
        2,
        &["system.hostname=from-two", "system.machine_id=firmware"],
    );
    let (out, s) = boot_cmdline(&vm, "ro\n");
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    assert_eq!(etc(&s, "hostname"), "from-two\n");
    assert_eq!(etc(&s, "machine-id"), "0123abcd456789abcdef0123456789ab\n");
    assert!(
        err.contains("11-10/raw: credential system.hostname is set twice"),
        "{err}"
    );
    assert!(
        !vm.identity("admin_authorized_keys")
            .starts_with(b"ssh-ed25519 AAAAGAP")
    );

    let vm = Vm::new();
    entry(
        &vm,
        0,
        &[
            "system.hostname=",
            "system.machine_id=fedcba98-7654-3210-fedc-ba9876543210",
            "ssh.authorized_keys.root=ssh-ed25519 AAAACRED root",
        ],
    );
    let (out, s) = boot_cmdline(&vm, "ro\n");
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    assert_eq!(etc(&s, "machine-id"), "fedcba9876543210fedcba9876543210\n");
    assert_eq!(
        vm.identity("admin_authorized_keys"),
        b"ssh-ed25519 AAAACRED root\n"
    );
    assert!(
        err.contains("credential system.hostname is ignored, as systemd ignores it: it is empty"),
        "{err}"
    );
}

#[test]
fn a_cidata_iso_is_found_by_its_label_and_read_without_mounting() {
    // A real iso9660 image (xorriso, Rock Ridge + Joliet) as a "device": the label comes
    // from the primary volume descriptor and the files are read in place, so this runs
    // the whole stage on a host without iso9660 in its kernel.
    let vm = Vm::new();
    attach_cidata_iso(&vm, "instance-id: iso\nlocal-hostname: from-iso\n");
    let (out, s) = boot_cmdline(&vm, "ro\n");
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    assert!(
        err.contains("source nocloud:") && err.contains("dev/sr0"),
        "{err}"
    );
    assert_eq!(etc(&s, "hostname"), "from-iso\n");
}

/// A stray `cidata` disk that holds neither meta-data nor user-data is named and passed
/// over, and the seed on the next labelled device is applied, as cloud-init tries each.
#[test]
fn a_labelled_volume_without_seed_files_does_not_hide_the_next_one() {
    let vm = Vm::new();
    attach_cidata_iso(&vm, "instance-id: iso\nlocal-hostname: from-second\n");
    let stray = vm.p("stray-stage");
    std::fs::create_dir_all(&stray).unwrap();
    std::fs::write(stray.join("README"), "not a seed\n").unwrap();
    std::fs::create_dir_all(vm.p("host/sys/class/block/vdz")).unwrap();
    let st = Command::new("xorriso")
        .args(["-as", "mkisofs", "-quiet", "-V", "cidata", "-R", "-o"])
        .arg(vm.p("host/dev/vdz"))
        .arg(&stray)
        .status()
        .unwrap();
    assert!(st.success());
    let (out, s) = boot_cmdline(&vm, "ro\n");
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    assert!(
        err.contains("dev/vdz: labelled cidata but holds neither meta-data nor user-data")
            && err.contains("names: README"),
        "{err}"
    );
    assert_eq!(etc(&s, "hostname"), "from-second\n");
}

#[test]
fn a_symlinked_user_data_on_the_iso_is_refused_by_name() {
    let vm = Vm::new();
    let stage = vm.p("iso-stage");
    std::fs::create_dir_all(&stage).unwrap();
    std::fs::write(stage.join("meta-data"), "instance-id: iso\n").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", stage.join("user-data")).unwrap();
    vm.attach_iso(
        &stage,
        &["xorriso", "-as", "mkisofs", "-quiet", "-V", "cidata", "-R"],
    );
    let (out, s) = boot_cmdline(&vm, "ro\n");
    let err = stderr(&out);
    assert!(s.contains("rc=1"), "{s}");
    assert!(
        err.contains("dev/sr0/user-data: not a regular file (links are refused)"),
        "{err}"
    );
}

/// Empties every file of a generation: what ext4 shows after a power cut that came after
/// the journal committed the names but before delayed allocation wrote the data (a
/// stand-in for the cut itself, which vm-tests' powercut scenario makes on a real disk).
fn empty_files_of(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            empty_files_of(&e.path());
        } else {
            std::fs::write(e.path(), b"").unwrap();
        }
    }
}

#[test]
fn a_generation_left_incomplete_by_a_power_cut_is_rolled_back_at_the_next_boot() {
    let vm = Vm::new();
    vm.boot();
    let key = vm.identity("ssh_host_ed25519_key");
    vm.boot_instance(2);
    empty_files_of(&vm.p("sysroot/var/identity/gen-2"));

    // What the next boot will use, without changing anything.
    let status = Command::new(AGENT)
        .args(["status", "--identity-dir"])
        .arg(vm.p("sysroot/var/identity"))
        .output()
        .unwrap();
    assert!(status.status.success(), "{}", stderr(&status));
    let manifest = String::from_utf8_lossy(&status.stdout).into_owned();
    assert!(manifest.contains("\"generation\": 1"), "{manifest}");
    assert!(
        stderr(&status).contains("incomplete"),
        "{}",
        stderr(&status)
    );
    assert_eq!(vm.generation(), "gen-2");

    // The next boot makes gen-1 current again, then applies the seed once more.
    let (out, s) = vm.boot();
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    assert!(
        err.contains("gen-2 was left incomplete by a power cut")
            && err.contains("generation 1 is current again"),
        "{err}"
    );
    assert_eq!(etc(&s, "hostname"), "web2\n");
    assert_eq!(vm.generation(), "gen-2");
    assert_eq!(vm.identity("ssh_host_ed25519_key"), key);
}

#[test]
fn an_incomplete_first_generation_is_a_first_boot_again() {
    let vm = Vm::new();
    vm.boot();
    empty_files_of(&vm.p("sysroot/var/identity/gen-1"));
    let (out, s) = vm.boot();
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    assert!(
        err.contains("no earlier generation is whole") && err.contains("FirstBoot"),
        "{err}"
    );
    assert_eq!(etc(&s, "hostname"), "web1\n");
    assert!(!vm.identity("ssh_host_ed25519_key").is_empty());
}

/// An incomplete newest generation over an older one that does not read back whole for
/// another reason (here a changed file; an I/O error is the same): no fallback past the
/// older one to a first boot, which would make a new host key and machine-id while the
/// machine's own are still on the disk.
#[test]
fn an_unreadable_older_generation_is_never_replaced_by_a_first_boot() {
    let vm = Vm::new();
    vm.boot();
    let key = vm.identity("ssh_host_ed25519_key");
    vm.boot_instance(2);
    empty_files_of(&vm.p("sysroot/var/identity/gen-2"));
    std::fs::write(vm.p("sysroot/var/identity/gen-1/hostname"), "intruder\n").unwrap();
    let (out, _) = vm.boot();
    let err = stderr(&out);
    assert!(!err.contains("FirstBoot"), "{err}");
    assert!(
        err.contains("gen-1: hostname") && err.contains("does not match the manifest"),
        "{err}"
    );
    assert_eq!(vm.generation(), "gen-2");
    assert!(vm.p("sysroot/var/identity/gen-1").is_dir());
    assert_eq!(
        std::fs::read(vm.p("sysroot/var/identity/gen-1/ssh_host_ed25519_key")).unwrap(),
        key
    );
}

/// A recovery that cannot finish (here the store refuses the link it needs; a read-only
/// `/var` is the same) still leaves the machine its identity: the newest whole
/// generation is bound over `/etc` in place of the incomplete one.
#[test]
fn a_recovery_that_fails_still_binds_the_whole_generation() {
    let vm = Vm::new();
    vm.boot();
    vm.boot_instance(2);
    empty_files_of(&vm.p("sysroot/var/identity/gen-2"));
    std::fs::create_dir_all(vm.p("sysroot/var/identity/.tmp-link-current/in-the-way")).unwrap();
    let (out, s) = vm.boot();
    let err = stderr(&out);
    assert!(err.contains(".tmp-link-current"), "{err}");
    assert_eq!(etc(&s, "hostname"), "web1\n", "{err}");
}

#[test]
fn a_changed_identity_file_is_not_mistaken_for_a_power_cut() {
    let vm = Vm::new();
    vm.boot();
    std::fs::write(vm.p("sysroot/var/identity/gen-1/hostname"), "intruder\n").unwrap();
    let (out, _) = vm.boot();
    let err = stderr(&out);
    assert!(!err.contains("power cut"), "{err}");
    assert!(
        err.contains("gen-1: hostname") && err.contains("does not match the manifest"),
        "{err}"
    );
    assert_eq!(vm.generation(), "gen-1");
}

#[test]
fn identity_files_keep_their_modes_under_a_restrictive_umask() {
    let vm = Vm::new();
    let (out, s) = vm.boot_with("umask 077;");
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    let mode = |n: &str| vm.mode(n);
    assert_eq!(mode("machine-id"), 0o444);
    assert_eq!(mode("ssh_host_ed25519_key"), 0o600);
    assert_eq!(mode("hostname"), 0o644);
    assert_eq!(mode("ssh_host_ed25519_key.pub"), 0o644);
}

#[test]
fn a_configdrive_iso_is_read_in_place() {
    let vm = Vm::new();
    let stage = vm.p("cd-stage");
    std::fs::create_dir_all(stage.join("openstack/latest")).unwrap();
    std::fs::write(
        stage.join("openstack/latest/meta_data.json"),
        r#"{"uuid":"cd-1","hostname":"from-configdrive"}"#,
    )
    .unwrap();
    std::fs::write(stage.join("openstack/latest/user_data"), "#cloud-config\n").unwrap();
    // Nova's network description; the NIC is found by its MAC.
    std::fs::write(
        stage.join("openstack/latest/network_data.json"),
        r#"{"links": [{"id": "tap0", "type": "ovs", "ethernet_mac_address": "52:54:00:12:34:56"}],
            "networks": [{"id": "n0", "link": "tap0", "type": "ipv4", "ip_address": "10.9.8.7",
                          "netmask": "255.255.255.0",
                          "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "10.9.8.1"}]}],
            "services": [{"type": "dns", "address": "10.9.8.53"}]}"#,
    )
    .unwrap();
    vm.attach_iso(&stage, &["genisoimage", "-quiet", "-R", "-V", "config-2"]);
    let (out, s) = boot_cmdline(&vm, "ro\n");
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    assert!(
        err.contains("source configdrive:") && err.contains("dev/sr0"),
        "{err}"
    );
    assert_eq!(etc(&s, "hostname"), "from-configdrive\n");
    let net = String::from_utf8(vm.identity("network/10-cloud-init-ens18.network")).unwrap();
    assert!(
        net.contains("Address=10.9.8.7/24") && net.contains("DNS=10.9.8.53"),
        "{net}"
    );
}

/// A config drive is read from the newest dated version cloud-init knows that it has,
/// before `latest` (Nova writes both), and a drive with only dated versions is read.
#[test]
fn a_configdrive_is_read_from_its_newest_known_version() {
    let drive = |dirs: &[(&str, &str)]| {
        let vm = Vm::new();
        let stage = vm.p("cd-stage");
        for (dir, hostname) in dirs {
            let d = stage.join("openstack").join(dir);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("meta_data.json"),
                format!(r#"{{"uuid":"cd-{dir}","hostname":"{hostname}"}}"#),
            )
            .unwrap();
        }
        vm.attach_iso(&stage, &["genisoimage", "-quiet", "-R", "-V", "config-2"]);
        let (out, s) = boot_cmdline(&vm, "ro\n");
        let err = stderr(&out);
        assert!(s.contains("rc=0"), "{s}\n{err}");
        etc(&s, "hostname")
    };
    assert_eq!(
        drive(&[
            ("latest", "from-latest"),
            ("2018-08-27", "from-rocky"),
            ("2016-06-30", "from-newton"),
            // A version cloud-init does not know is not read.
            ("2020-10-14", "from-unknown"),
        ]),
        "from-rocky\n"
    );
    assert_eq!(
        drive(&[
            ("2012-08-10", "from-folsom"),
            ("2013-04-04", "from-grizzly")
        ]),
        "from-grizzly\n"
    );
}

/// A loop device over an image file, detached when dropped.
struct Loop(String);

impl Loop {
    fn attach(image: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(image)
            .output()
            .unwrap();
        assert!(out.status.success(), "losetup: {}", stderr(&out));
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// An ext4 volume labelled `config-2` holding `stage`, on a loop device the host tree shows
/// as `/dev/vdz`; returns the image file and the loop device.
fn ext4_seed_volume(vm: &Vm, stage: &Path) -> (PathBuf, Loop) {
    let image = vm.p("config-2.ext4");
    let st = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-L", "config-2", "-d"])
        .arg(stage)
        .arg(&image)
        .arg("4M")
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let lo = Loop::attach(&image);
    std::fs::create_dir_all(vm.p("host/dev")).unwrap();
    std::fs::create_dir_all(vm.p("host/sys/class/block/vdz")).unwrap();
    std::os::unix::fs::symlink(&lo.0, vm.p("host/dev/vdz")).unwrap();
    (image, lo)
}

/// A FAT seed whose label is only in its root directory (the boot sector says `NO NAME`),
/// which blkid reports as `LABEL=CIDATA` and cloud-init finds, is found too: on FAT12
/// and on FAT32, where the volume already held 60 files with long names when it was
/// labelled, so that mtools put the label entry in the first free slot, past the first
/// 4 KiB of the root directory (FAT12) and in a later cluster of its chain (FAT32).
#[test]
fn a_fat_seed_labelled_only_in_its_root_directory_is_found() {
    for (mkfs, size_kib, label_at) in [
        (&["-C"][..], "2048", 43),
        (&["-F", "32", "-s", "1", "-C"][..], "40000", 71),
    ] {
        let vm = Vm::new();
        let image = vm.p("cidata.vfat");
        let run = |cmd: &mut Command| {
            let out = cmd.output().unwrap();
            assert!(out.status.success(), "{cmd:?}: {}", stderr(&out));
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        run(Command::new("mkfs.vfat")
            .args(mkfs)
            .arg(&image)
            .arg(size_kib));
        let filler = vm.p("filler");
        std::fs::create_dir_all(&filler).unwrap();
        let mut copy = Command::new("mcopy");
        copy.arg("-i").arg(&image);
        for i in 0..60 {
            let f = filler.join(format!("a-very-long-file-name-number-{i}.txt"));
            std::fs::write(&f, "x").unwrap();
            copy.arg(f);
        }
        run(copy.arg("::/"));
        for (name, text) in [
            (
                "meta-data",
                "instance-id: fat-1\nlocal-hostname: from-fat-root\n",
            ),
            ("user-data", ""),
        ] {
            let file = vm.p(name);
            std::fs::write(&file, text).unwrap();
            run(Command::new("mcopy")
                .arg("-i")
                .arg(&image)
                .arg(&file)
                .arg(format!("::{name}")));
        }
        run(Command::new("mlabel").arg("-i").arg(&image).arg("::CIDATA"));
        // Take the boot sector's copy away (FAT12 at byte 43, FAT32 at 71).
        let mut bytes = std::fs::read(&image).unwrap();
        bytes[label_at..label_at + 11].copy_from_slice(b"NO NAME    ");
        std::fs::write(&image, bytes).unwrap();
        let blkid = run(Command::new("blkid")
            .args(["-p", "-o", "export"])
            .arg(&image));
        assert!(
            blkid.contains("LABEL=CIDATA") && !blkid.contains("LABEL_FATBOOT"),
            "{blkid}"
        );
        let lo = Loop::attach(&image);
        std::fs::create_dir_all(vm.p("host/dev")).unwrap();
        std::fs::create_dir_all(vm.p("host/sys/class/block/vdz")).unwrap();
        std::os::unix::fs::symlink(&lo.0, vm.p("host/dev/vdz")).unwrap();
        let (out, s) = boot_cmdline(&vm, "ro\n");
        let err = stderr(&out);
        let vfat = std::fs::read_to_string("/proc/filesystems")
            .unwrap()
            .lines()
            .any(|l| l.split_whitespace().last() == Some("vfat"));
        if vfat {
            assert!(s.contains("rc=0"), "{mkfs:?}: {s}\n{err}");
            assert_eq!(etc(&s, "hostname"), "from-fat-root\n");
        } else {
            // A kernel without vfat (some CI hosts): the volume was found by that label,
            // and its mount is what failed.
            assert!(
                err.contains("dev/vdz (vfat, label CIDATA)") && err.contains("No such device"),
                "{mkfs:?}: {err}"
            );
        }
        drop(lo);
    }
}

/// A seed volume the agent mounts (ext4 labelled `config-2`, on a loop device) whose
/// `openstack` directory is a symlink to a ConfigDrive tree off the volume: that tree is
/// not read.
#[test]
fn a_mounted_seed_volume_does_not_follow_symlinks_off_it() {
    let vm = Vm::new();
    let outside = vm.p("outside/latest");
    std::fs::create_dir_all(&outside).unwrap();
    std::fs::write(
        outside.join("meta_data.json"),
        r#"{"uuid":"off-1","hostname":"from-outside"}"#,
    )
    .unwrap();
    std::fs::write(outside.join("user_data"), "#cloud-config\n").unwrap();
    let stage = vm.p("ext4-stage");
    std::fs::create_dir_all(&stage).unwrap();
    std::os::unix::fs::symlink(vm.p("outside"), stage.join("openstack")).unwrap();
    let (_image, _lo) = ext4_seed_volume(&vm, &stage);
    let (out, s) = boot_cmdline(&vm, "ro\n");
    let err = stderr(&out);
    assert!(
        err.contains("media-config-2/openstack/latest/meta_data.json")
            && err.contains("Too many levels of symbolic links"),
        "the error names the file the symlink stopped: {err}"
    );
    assert_ne!(etc(&s, "hostname"), "from-outside\n", "{s}\n{err}");
    assert!(!err.contains("off-1"), "{err}");
}

/// A `cidata` ISO (xorriso, Rock Ridge + Joliet) with `meta_data` and an empty user-data
/// as the machine's cdrom.
fn attach_cidata_iso(vm: &Vm, meta_data: &str) {
    let stage = vm.p("iso-stage");
    std::fs::create_dir_all(&stage).unwrap();
    std::fs::write(stage.join("meta-data"), meta_data).unwrap();
    std::fs::write(stage.join("user-data"), "").unwrap();
    vm.attach_iso(
        &stage,
        &[
            "xorriso", "-as", "mkisofs", "-quiet", "-V", "cidata", "-R", "-J",
        ],
    );
}

/// A cidata ISO, packed into `host/dev/sr0` and then hidden: the setup script of a test
/// makes it appear (node and sysfs entry) while the stage runs, as a cdrom does whose
/// driver udev is still loading.
fn late_cidata_cdrom(vm: &Vm) {
    attach_cidata_iso(vm, "instance-id: late\nlocal-hostname: from-late-cdrom\n");
    std::fs::rename(vm.p("host/dev/sr0"), vm.p("sr0.later")).unwrap();
    std::fs::remove_dir(vm.p("host/sys/class/block/sr0")).unwrap();
    std::fs::write(vm.p("host/proc/cmdline"), "ro\n").unwrap();
}

/// The shell lines that make the hidden cdrom appear.
const CDROM_APPEARS: &str = "mv sr0.later host/dev/sr0 && mkdir host/sys/class/block/sr0";

/// Runs the initrd stage with `flags`, which must succeed; returns its stdout (the wall
/// time in `ms=` and the bound hostname) and its log.
fn initrd_stage(vm: &Vm, setup: &str, flags: &str) -> (String, String) {
    let (out, s) = vm.run(&format!(
        "{setup}\nstart=$(date +%s%N); {AGENT} initrd --sysroot sysroot --root host --run run --channel-wait 0 {flags}; echo \"rc=$?\"; echo \"ms=$(( ($(date +%s%N) - start) / 1000000 ))\"; echo \"== hostname\"; cat sysroot/etc/hostname"
    ));
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    (s, err)
}

fn wall_ms(stdout: &str) -> u64 {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix("ms="))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// udevd's control socket and its queue marker, as udevd keeps them under /run/udev while
/// events are queued.
const UDEV_BUSY: &str = "mkdir -p run/udev && touch run/udev/control run/udev/queue";

#[test]
fn a_seed_cdrom_udev_is_still_adding_is_found_once_its_queue_empties() {
    let vm = Vm::new();
    late_cidata_cdrom(&vm);
    // The device arrives and the queue empties two seconds into the stage.
    let setup = format!("{UDEV_BUSY}\n(sleep 2; {CDROM_APPEARS}; rm run/udev/queue) &");
    let (s, err) = initrd_stage(&vm, &setup, "");
    assert_eq!(etc(&s, "hostname"), "from-late-cdrom\n", "{err}");
    assert!(
        err.contains("waited") && err.contains("for its queue to empty"),
        "{err}"
    );
}

#[test]
fn the_wait_for_udev_is_bounded_and_skipped_without_udevd() {
    // udev never empties its queue: the stage gives up after --udev-wait, says so, and
    // boots without a seed (the cdrom only comes later).
    let vm = Vm::new();
    late_cidata_cdrom(&vm);
    let (s, err) = initrd_stage(&vm, UDEV_BUSY, "--udev-wait 1");
    assert!(err.contains("still had events queued after 1 s"), "{err}");
    let ms = wall_ms(&s);
    assert!((1000..4000).contains(&ms), "stage took {ms} ms\n{err}");
    assert_eq!(etc(&s, "hostname"), "", "{err}");

    // No udevd (an initramfs that runs none, like the test initramfs): no wait, even with
    // a queue file left behind, and a cdrom that comes later is not waited for.
    let vm = Vm::new();
    late_cidata_cdrom(&vm);
    let setup = format!("mkdir -p run/udev && touch run/udev/queue\n(sleep 4; {CDROM_APPEARS}) &");
    let (s, err) = initrd_stage(&vm, &setup, "");
    assert!(!err.contains("queue"), "{err}");
    assert!(wall_ms(&s) < 4000, "{s}\n{err}");
    assert_eq!(etc(&s, "hostname"), "", "{err}");
}

#[test]
fn a_boot_that_finds_its_seed_never_waits_for_udev() {
    // A seed volume already there, with udev busy for longer than the wait: found at once.
    let vm = Vm::new();
    attach_cidata_iso(&vm, "instance-id: iso\nlocal-hostname: from-iso\n");
    std::fs::write(vm.p("host/proc/cmdline"), "ro\n").unwrap();
    let (s, err) = initrd_stage(&vm, UDEV_BUSY, "--udev-wait 3");
    assert_eq!(etc(&s, "hostname"), "from-iso\n", "{err}");
    assert!(!err.contains("queue"), "{err}");
    assert!(wall_ms(&s) < 3000, "{s}\n{err}");

    // A seed named on the kernel command line and no seed volume: no wait either.
    let vm = Vm::new();
    let (s, err) = initrd_stage(&vm, UDEV_BUSY, "--udev-wait 3");
    assert_eq!(etc(&s, "hostname"), "web1\n", "{err}");
    assert!(!err.contains("queue"), "{err}");
    assert!(wall_ms(&s) < 3000, "{s}\n{err}");
}

/// An ext4 `config-2` volume whose journal is marked as needing recovery (as after a host
/// crashed while writing it) is read without replaying the journal: the seed is applied
/// and not one byte of the volume changes.
#[test]
fn a_mounted_ext4_seed_with_a_dirty_journal_is_left_unwritten() {
    let vm = Vm::new();
    let stage = vm.p("ext4-stage");
    let latest = stage.join("openstack/latest");
    std::fs::create_dir_all(&latest).unwrap();
    std::fs::write(
        latest.join("meta_data.json"),
        r#"{"uuid":"dirty-1","hostname":"from-dirty-ext4"}"#,
    )
    .unwrap();
    std::fs::write(latest.join("user_data"), "#cloud-config\n").unwrap();
    let (image, _lo) = ext4_seed_volume(&vm, &stage);
    let st = Command::new("debugfs")
        .args(["-w", "-R", "feature needs_recovery"])
        .arg(&image)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(st.success());
    let before = std::fs::read(&image).unwrap();
    let (out, s) = boot_cmdline(&vm, "ro\n");
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    assert_eq!(etc(&s, "hostname"), "from-dirty-ext4\n", "{err}");
    assert!(
        std::fs::read(&image).unwrap() == before,
        "the seed volume was written to: {err}"
    );
}

/// Proxmox's `user:`/`password:` on a read-only `/etc`: `/etc/shadow` shows the image's
/// file with the hash in the account's line, with the image's mode and group; a later
/// instance without passwords shows the image's file again, and `ssh_pwauth` comes and
/// goes as sshd's drop-in.
#[test]
fn seed_passwords_show_in_etc_shadow_and_leave_with_the_seed() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let vm = Vm::new();
    let image = "root:*:19000:0:99999:7:::\nadmin:!:19000:0:99999:7:::\n";
    let shadow = vm.p("sysroot/etc/shadow");
    std::fs::write(&shadow, image).unwrap();
    std::fs::set_permissions(&shadow, std::fs::Permissions::from_mode(0o640)).unwrap();
    let show = "echo \"== shadow\"; cat sysroot/etc/shadow; echo \"== mode\"; stat -c %a sysroot/etc/shadow; echo \"== dropin\"; cat run/nixseed/sshd_config.d/ssh_pwauth.conf 2>/dev/null; echo \"== end\"";
    let (out, s) = vm.run(&format!(
        "{AGENT} initrd --sysroot sysroot --root host --run run; echo \"rc=$?\"; {show}"
    ));
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert_eq!(
        etc(&s, "shadow"),
        "root:*:19000:0:99999:7:::\nadmin:$5$abc$def:19000:0:99999:7:::\n",
        "{}",
        stderr(&out)
    );
    assert_eq!(etc(&s, "mode"), "640\n");
    assert_eq!(etc(&s, "dropin"), "");
    // The image's own file is untouched, and nothing the seed gave is readable by others.
    assert_eq!(std::fs::read_to_string(&shadow).unwrap(), image);
    for f in ["run/nixseed/shadow", "run/nixseed/shadow.base"] {
        let meta = std::fs::metadata(vm.p(f)).unwrap();
        assert_eq!(meta.mode() & 0o007, 0, "{f} is readable by others");
    }

    vm.seed(
        "instance-id: iid-2\n",
        "#cloud-config\nhostname: web2\nssh_pwauth: true\nusers:\n  - {name: root, lock_passwd: false}\n",
        None,
    );
    let (out, s) = vm.run(&format!(
        "{AGENT} initrd --sysroot sysroot --root host --run run; echo \"rc=$?\"; {show}"
    ));
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert_eq!(etc(&s, "shadow"), image, "{}", stderr(&out));
    assert_eq!(
        etc(&s, "dropin"),
        "# From the seed's ssh_pwauth (nixseed).\nPasswordAuthentication yes\n"
    );
    assert!(!vm.p("run/nixseed/shadow").exists());
}

/// A hash for an account the image lacks is named in a warning; the rest applies.
#[test]
fn a_password_for_an_account_the_image_lacks_is_named() {
    let vm = Vm::new();
    std::fs::write(vm.p("sysroot/etc/shadow"), "root:*:1::::::\n").unwrap();
    let (out, s) = vm.boot();
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert_eq!(etc(&s, "hostname"), "web1\n");
    let err = stderr(&out);
    assert!(
        err.contains("users.json: no account 'admin' in the image's") && err.contains("etc/shadow"),
        "{err}"
    );
}

/// A `/etc/shadow` that links into `/var` (NixOS's userborn on an immutable `/etc`) is
/// left to the tool that keeps it: named in a warning, not bound, the rest applied.
#[test]
fn a_linked_etc_shadow_is_left_alone() {
    let vm = Vm::new();
    std::os::unix::fs::symlink("/var/lib/nixos/shadow", vm.p("sysroot/etc/shadow")).unwrap();
    let (out, s) = vm.run(&format!(
        "{AGENT} initrd --sysroot sysroot --root host --run run; echo \"rc=$?\"; echo \"== hostname\"; cat sysroot/etc/hostname; echo \"== mounts\"; grep -c ' /.*etc/shadow ' /proc/self/mountinfo; echo \"== end\""
    ));
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    assert_eq!(etc(&s, "hostname"), "web1\n");
    assert_eq!(etc(&s, "mounts"), "0\n", "{err}");
    assert!(
        err.contains("a link to /var/lib/nixos/shadow") && err.contains("not applied"),
        "{err}"
    );
}

/// `sudo:` rules reach `<run>/nixseed/sudoers.d` as cloud-init writes them, root's and
/// mode 0440 as sudo requires; a name sudo would read as a group is left out and named;
/// a later instance without rules takes the file away and keeps the directory that an
/// image's `@includedir` names.
#[test]
fn sudo_rules_come_and_go_with_the_seed() {
    let vm = Vm::new();
    vm.seed(
        "instance-id: iid-1\n",
        "#cloud-config\nhostname: web1\nusers:\n  - {name: ops, sudo: 'ALL=(ALL) NOPASSWD:ALL', lock_passwd: false}\n  - {name: '%adm', sudo: 'ALL=(ALL) ALL'}\n",
        None,
    );
    let show = "echo \"== sudoers\"; cat run/nixseed/sudoers.d/90-nixseed-users 2>/dev/null; echo \"== mode\"; stat -c '%a %u' run/nixseed/sudoers.d/90-nixseed-users 2>/dev/null; ls -d run/nixseed/sudoers.d; echo \"== end\"";
    let (out, s) = vm.run(&format!(
        "{AGENT} initrd --sysroot sysroot --root host --run run; echo \"rc=$?\"; {show}"
    ));
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    assert_eq!(
        etc(&s, "sudoers"),
        "# From the seed's users (nixseed).\n\n# User rules for ops\nops ALL=(ALL) NOPASSWD:ALL\n",
        "{err}"
    );
    assert_eq!(etc(&s, "mode"), "440 0\nrun/nixseed/sudoers.d\n");
    assert!(
        err.contains("users.json: sudo rules for %adm: not a plain account name: not applied"),
        "{err}"
    );

    vm.seed(
        "instance-id: iid-2\n",
        "#cloud-config\nhostname: web2\nusers:\n  - {name: ops, lock_passwd: false}\n",
        None,
    );
    let (out, s) = vm.run(&format!(
        "{AGENT} initrd --sysroot sysroot --root host --run run; echo \"rc=$?\"; {show}"
    ));
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert_eq!(etc(&s, "sudoers"), "");
    assert_eq!(etc(&s, "mode"), "run/nixseed/sudoers.d\n");
}

#[test]
fn agent_passwords_on_a_machine_that_never_had_a_seed_apply_at_every_boot() {
    let vm = Vm::new();
    // No seed anywhere: the command line names none and no volume carries one.
    std::fs::write(vm.p("host/proc/cmdline"), "ro quiet\n").unwrap();
    let image = "root:*:19000:0:99999:7:::\nalice:!:19000:0:99999:7:::\n";
    std::fs::write(vm.p("sysroot/etc/shadow"), image).unwrap();
    // What guest-set-user-password records on a machine without a generation.
    std::fs::create_dir_all(vm.p("sysroot/var/lib/nixseed")).unwrap();
    std::fs::write(
        vm.p("sysroot/var/lib/nixseed/passwords.json"),
        r#"{"instance-id": null, "passwords": {"root": "$6$salt$hash"}}"#,
    )
    .unwrap();
    let want = "root:$6$salt$hash:19000:0:99999:7:::\nalice:!:19000:0:99999:7:::\n";
    // Each run is a boot of its own (a new mount namespace): the initrd stage then stage 2,
    // the initrd stage again, and stage 2 alone (an image without nixseed in its initrd).
    for (what, stages) in [
        ("initrd stage, then stage 2", &["initrd", "apply"][..]),
        ("a second boot", &["initrd"][..]),
        ("stage 2 alone", &["apply"][..]),
    ] {
        let run: Vec<String> = stages
            .iter()
            .map(|s| format!("{AGENT} {s} --sysroot sysroot --root host --run run --channel-wait 0 || echo failed"))
            .collect();
        let (out, s) = vm.run(&format!(
            "rm -rf run/*; {}; echo '== shadow'; cat sysroot/etc/shadow; echo '== binds'; findmnt -rno TARGET | grep -c '/sysroot/etc/shadow$'",
            run.join("; ")
        ));
        assert_eq!(
            s,
            format!("== shadow\n{want}== binds\n1\n"),
            "{what}: /etc/shadow does not show the agent's password, bound once:\n{}",
            stderr(&out)
        );
        assert!(!vm.p("sysroot/var/identity/current").exists(), "{what}");
    }

    // The first seed is a new instance: those passwords no longer apply, as for any
    // earlier instance.
    std::fs::write(vm.p("host/proc/cmdline"), "ro quiet ds=nocloud;s=/seed/\n").unwrap();
    let (out, s) = vm.run(&format!(
        "{AGENT} initrd --sysroot sysroot --root host --run run --channel-wait 0; echo rc=$?; echo '== shadow'; cat sysroot/etc/shadow; echo '== end'"
    ));
    assert!(s.contains("rc=0"), "{s}\n{}", stderr(&out));
    assert!(
        s.contains(&format!("== shadow\n{image}== end")),
        "the seedless machine's password outlived its first seed:\n{s}\n{}",
        stderr(&out)
    );
}

/// network-config v2 keys that are not rendered (a `match: {name: …}` glob, a route's
/// `scope`, a device's `wakeonlan`) and search domains without a nameserver address are
/// each named in a warning, not passed over without a word; the rest applies.
#[test]
fn network_v2_keys_not_rendered_are_named() {
    let vm = Vm::new();
    vm.seed(
        "instance-id: v2-keys\n",
        "#cloud-config\nhostname: web1\n",
        Some(
            "version: 2\nethernets:\n  eth0:\n    match: {name: 'en*'}\n    wakeonlan: true\n    addresses: [192.0.2.10/24]\n    nameservers: {search: [example.org]}\n    routes:\n      - {to: 198.51.100.0/24, via: 192.0.2.1, scope: link}\n",
        ),
    );
    let (out, s) = vm.boot();
    let err = stderr(&out);
    assert!(s.contains("rc=0"), "{s}\n{err}");
    assert_eq!(etc(&s, "hostname"), "web1\n");
    for key in [
        "ethernets.eth0.match.name",
        "ethernets.eth0.wakeonlan",
        "ethernets.eth0.routes[0].scope",
    ] {
        assert!(
            err.lines()
                .any(|l| l.contains("v2 key not used here") && l.contains(key)),
            "{key}:\n{err}"
        );
    }
    assert!(
        err.contains("search domains without nameserver addresses are dropped"),
        "{err}"
    );
}

/// With no seed disk, the boot asks the host over the control channel (a raw pty stands
/// in for the virtio-serial port here). A bundle the host answers with that names another
/// VM's product_uuid (a host that mixed up its sockets) is refused as a live push refuses
/// it: taking it would give this VM the other one's host key and machine-id.
#[test]
fn a_boot_refuses_a_channel_identity_made_for_another_vm() {
    use nixseed_core::channel::{Bundle, Decoder, Message, encode};
    use nixseed_core::seed::SeedFiles;
    use std::io::{Read, Write};

    let vm = Vm::new();
    std::fs::remove_dir_all(vm.p("sysroot/seed")).unwrap();
    std::fs::write(vm.p("host/proc/cmdline"), "ro quiet\n").unwrap();
    let ports = vm.p("host/sys/class/virtio-ports/vport0p1");
    std::fs::create_dir_all(&ports).unwrap();
    std::fs::write(ports.join("name"), "org.nixseed.channel.0\n").unwrap();
    std::fs::create_dir_all(vm.p("host/dev")).unwrap();
    let (mut master, _slave) = ts::raw_pty_at(&vm.p("host/dev/vport0p1")).unwrap();

    let files = SeedFiles(
        [
            ("meta-data", "instance-id: other\n"),
            (
                "user-data",
                "#cloud-config\nhostname: other\nnixseed:\n  product-uuid: 99999999-8888-7777-6666-555555555555\n",
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
        .collect(),
    );
    let push = encode(&Message::Push {
        bundle: Bundle::from_files("other", &files),
    });
    let host = std::thread::spawn(move || {
        let mut d = Decoder::default();
        let mut buf = [0u8; 65536];
        loop {
            let Ok(n) = master.read(&mut buf) else {
                return false;
            };
            d.push(&buf[..n]);
            if let Ok(Some(Message::Hello { .. })) = d.next_message() {
                return master.write_all(&push).is_ok();
            }
        }
    });
    let (out, s) = vm.run(&format!(
        "{AGENT} initrd --sysroot sysroot --root host --run run --channel-wait 10; echo \"rc=$?\"; echo \"== hostname\"; cat sysroot/etc/hostname"
    ));
    let err = stderr(&out);
    assert!(host.join().unwrap(), "the agent never said hello");
    assert!(
        err.contains("the identity of `other` is for the VM with product_uuid 99999999-8888-7777-6666-555555555555"),
        "{s}\n{err}"
    );
    assert_eq!(etc(&s, "hostname"), "", "{err}");
    assert!(!vm.p("sysroot/var/identity/current").exists());
}
