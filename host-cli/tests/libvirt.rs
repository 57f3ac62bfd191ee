//! `seedctl xml` passes libvirt's own schema check, and virsh-driven commands explain an
//! unreachable URI.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::{Scratch, require_tool};

/// `seedctl xml web1 -o FILE ARGS`, checked against libvirt's domain schema; the XML.
fn domain_xml(s: &Scratch, file: &str, args: &[&str]) -> String {
    s.ok(&[&["xml", "web1", "-o", file][..], args].concat());
    validate(s, file);
    std::fs::read_to_string(s.path().join(file)).unwrap()
}

fn validate(s: &Scratch, file: &str) {
    let out = Command::new("virt-xml-validate")
        .arg(s.path().join(file))
        .arg("domain")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{file} rejected:\n{}{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(s.path().join(file)).unwrap()
    );
}

#[test]
fn domain_xml_validates_for_uefi_and_direct_kernel_boot() {
    require_tool("virt-xml-validate");
    require_tool("xmllint");
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let code = s.path().join("CODE.fd");
    let vars = s.path().join("VARS.fd");
    std::fs::write(&code, b"").unwrap();
    std::fs::write(&vars, b"").unwrap();
    let xml = domain_xml(
        &s,
        "uefi.xml",
        &[
            "--ovmf-code",
            code.to_str().unwrap(),
            "--ovmf-vars",
            vars.to_str().unwrap(),
        ],
    );
    let kxml = domain_xml(
        &s,
        "kernel.xml",
        &[
            "--type",
            "kvm",
            "--net",
            "default",
            "--kernel",
            "/boot/vmlinuz",
            "--initrd",
            "/boot/initrd.img",
            "--cmdline",
            "console=ttyS0 nixseed.debug=1",
        ],
    );

    let uuid = std::fs::read_to_string(s.machine("web1").join("product_uuid")).unwrap();
    assert!(xml.contains(&format!("<uuid>{}</uuid>", uuid.trim())));
    assert!(
        xml.contains("<domain type='qemu'>")
            && xml.contains("machine='q35'")
            && xml.contains("<acpi/>")
    );
    assert!(
        xml.contains("name='org.qemu.guest_agent.0'")
            && xml.contains("name='org.nixseed.channel.0'")
    );
    assert!(
        xml.contains("<target dev='vda' bus='virtio'/>")
            && xml.contains("<target dev='vdb' bus='virtio'/>")
    );
    assert!(
        xml.contains("device='cdrom'") && xml.contains("bus='sata'") && xml.contains("seed.iso")
    );
    assert!(
        kxml.contains("<domain type='kvm'>")
            && kxml.contains("<cmdline>console=ttyS0 nixseed.debug=1</cmdline>")
    );
    assert!(kxml.contains("<source network='default'/>"));
    // Under KVM the host's CPU, not qemu64; under TCG libvirt's default. A pty console
    // (`virsh console` attaches only to one) logged to the state directory; discard
    // passed down, so the guest's fstrim shrinks the qcow2 files.
    assert!(kxml.contains("<cpu mode='host-passthrough'") && !xml.contains("<cpu"));
    assert!(
        xml.contains("<serial type='pty'>") && xml.contains("libvirt-console.log' append='on'/>"),
        "{xml}"
    );
    assert_eq!(xml.matches("discard='unmap'").count(), 2, "{xml}");

    // --seed-via channel: no cdrom; the MAC and the channel socket that `seedctl serve`
    // reads back from the domain are there.
    let cxml = domain_xml(
        &s,
        "channel.xml",
        &["--kernel", "/boot/vmlinuz", "--seed-via", "channel"],
    );
    assert!(!cxml.contains("device='cdrom'") && !cxml.contains("seed.iso"));
    let sock = seedctl::channel::channel_socket_in_xml(&cxml).unwrap();
    assert!(sock.ends_with("web1/libvirt-channel.sock"), "{sock}");
    let list: serde_json::Value = serde_json::from_str(&s.ok(&["list", "--json"])).unwrap();
    let mac = list["machines"][0]["mac"].as_str().unwrap();
    assert!(cxml.contains(&format!("<mac address='{mac}'/>")), "{cxml}");
}

#[test]
fn unreachable_libvirt_uri_is_named() {
    require_tool("virsh");
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock";
    for args in [
        vec!["start", "web1", "--connect", uri],
        vec!["stop", "web1", "--connect", uri],
        vec!["agent", "web1", "--connect", uri, "ping"],
    ] {
        let err = s.fails(&args);
        assert!(
            err.contains("unreachable") && err.contains(uri) && err.contains("machine `web1`"),
            "{args:?}: {err}"
        );
    }
}

/// A running test-driver domain named web1.
const WEB1: &str =
    "<domain type='test'><name>web1</name><memory>65536</memory><os><type>hvm</type></os></domain>";

/// libvirt's test driver loaded from a node file holding `domains` (it stands in for
/// libvirtd); returns its URI. Each virsh call reads the file afresh.
fn test_driver(s: &Scratch, domains: &str) -> String {
    let node = s.path().join("node.xml");
    std::fs::write(&node, format!("<node>{domains}</node>\n")).unwrap();
    format!("test://{}", node.display())
}

/// Machine `web1` and a test driver running a domain of that name; the driver's URI.
fn web1_running_under_libvirt() -> (Scratch, String) {
    require_tool("virsh");
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let uri = test_driver(&s, WEB1);
    (s, uri)
}

/// Machine `web1` with its disks, and another base, `new.qcow2`, to upgrade it to.
fn web1_and_a_new_base() -> Scratch {
    require_tool("virsh");
    require_tool("qemu-img");
    require_tool("mkfs.ext4");
    let s = Scratch::new();
    s.created("web1", "64M");
    s.qcow2("new.qcow2");
    s
}

/// The arguments of `seedctl upgrade web1 --base new.qcow2` through the libvirt at `uri`.
fn upgrade_through(uri: &str) -> [&str; 6] {
    ["upgrade", "web1", "--base", "new.qcow2", "--connect", uri]
}

/// A domain defined with `--seed-via channel` has no cdrom: a plain `start` would boot it
/// with no identity and nobody answering its hello, so it is refused with what to do.
#[test]
fn plain_start_of_a_channel_only_domain_is_refused() {
    let (s, uri) = web1_running_under_libvirt();
    let err = s.fails(&["start", "web1", "--connect", &uri]);
    assert!(
        err.contains("has no seed cdrom") && err.contains("seedctl start web1 --seed-via channel"),
        "{err}"
    );
}

/// `stop --connect` waits for the domain to power off, not only for libvirt to pass the
/// request on. The test driver forgets the shutdown between virsh calls, so the domain
/// stays running and the wait ends with an error naming machine, URI and `destroy`.
#[test]
fn stop_through_libvirt_waits_for_the_power_off() {
    let (s, uri) = web1_running_under_libvirt();
    let t0 = std::time::Instant::now();
    let err = s.fails(&["stop", "web1", "--connect", &uri, "--timeout", "1"]);
    assert!(
        t0.elapsed() >= std::time::Duration::from_secs(1),
        "did not wait"
    );
    assert!(
        err.contains("machine `web1`")
            && err.contains(&uri)
            && err.contains("still running")
            && err.contains("seedctl destroy web1"),
        "{err}"
    );
}

/// `upgrade` refuses a machine libvirt runs: its QEMU holds the old overlay open.
#[test]
fn upgrade_of_a_running_libvirt_domain_is_refused() {
    let s = web1_and_a_new_base();
    let uri = test_driver(&s, WEB1);
    let boot = s.state("web1").join("boot.qcow2");
    let before = std::fs::read(&boot).unwrap();
    let err = s.fails(&upgrade_through(&uri));
    assert!(
        err.contains("running under libvirt") && err.contains("seedctl stop web1"),
        "{err}"
    );
    assert_eq!(std::fs::read(&boot).unwrap(), before);
    // A libvirt without that domain does not stop it.
    test_driver(&s, "");
    s.ok(&upgrade_through(&uri));
    assert_ne!(std::fs::read(&boot).unwrap(), before);
}

/// A domain shut off with its memory saved (`virsh managedsave`) resumes that memory at
/// its next start: `upgrade` must not give it another boot disk meanwhile. The same
/// domain shut off plainly is upgraded.
#[test]
fn upgrade_of_a_managed_saved_domain_is_refused() {
    let s = web1_and_a_new_base();
    // runstate 5: shut off.
    let web1 = |saved: &str| {
        format!(
            "<domain type='test' xmlns:test='http://libvirt.org/schemas/domain/test/1.0'><name>web1</name><memory>65536</memory><os><type>hvm</type></os><test:runstate>5</test:runstate>{saved}</domain>"
        )
    };
    let uri = test_driver(&s, &web1("<test:hasmanagedsave>yes</test:hasmanagedsave>"));
    let boot = s.state("web1").join("boot.qcow2");
    let before = std::fs::read(&boot).unwrap();
    let err = s.fails(&upgrade_through(&uri));
    assert!(
        err.contains("managed save") && err.contains("managedsave-remove web1"),
        "{err}"
    );
    assert_eq!(std::fs::read(&boot).unwrap(), before);
    test_driver(&s, &web1(""));
    s.ok(&upgrade_through(&uri));
    assert_ne!(std::fs::read(&boot).unwrap(), before);
}

/// `domain.xml` in the state directory says the machine is a libvirt domain, and makes
/// `upgrade` ask libvirt about it: a `define` that libvirt refused leaves none behind
/// (so an upgrade with no libvirt reachable goes ahead), a `define` libvirt took leaves
/// it, and `undefine` takes it away.
#[test]
fn domain_xml_is_kept_only_while_libvirt_has_the_domain() {
    let s = web1_and_a_new_base();
    let xml = s.state("web1").join("domain.xml");
    let nowhere = "qemu+unix:///system?socket=/nonexistent/libvirt-sock";
    s.fails(&["define", "web1", "--connect", nowhere]);
    assert!(!xml.exists(), "a refused define left {}", xml.display());
    let out = s
        .cmd(&["upgrade", "web1", "--base", "new.qcow2"])
        .env("LIBVIRT_DEFAULT_URI", nowhere)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");

    let uri = test_driver(&s, "");
    s.ok(&["define", "web1", "--connect", &uri]);
    assert!(xml.exists());
    let uri = test_driver(&s, WEB1);
    // `upgrade` without --connect asks the libvirt the domain was defined under, not the
    // default one (here one that knows no such domain, which would let it go ahead).
    let elsewhere = s.path().join("other-node.xml");
    std::fs::write(&elsewhere, "<node></node>\n").unwrap();
    let boot = s.state("web1").join("boot.qcow2");
    let before = std::fs::read(&boot).unwrap();
    let out = s
        .cmd(&["upgrade", "web1", "--base", "new.qcow2"])
        .env(
            "LIBVIRT_DEFAULT_URI",
            format!("test://{}", elsewhere.display()),
        )
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("running under libvirt") && err.contains(&uri),
        "{out:?}"
    );
    assert_eq!(std::fs::read(&boot).unwrap(), before);
    s.ok(&["undefine", "web1", "--connect", &uri]);
    assert!(!xml.exists(), "undefine left {}", xml.display());
    assert!(!s.state("web1").join("domain.uri").exists());
}

/// The control channel is a unix socket on the host that runs the domain: through a
/// remote URI, `start --seed-via channel` and `push` are refused before anything
/// changes (no virsh call: an unreachable host is never asked), naming the host.
#[test]
fn the_control_channel_through_a_remote_libvirt_is_refused_first() {
    let s = Scratch::new();
    s.ok(&["new", "web1"]);
    let uri = "qemu+ssh://root@hv1.invalid/system";
    for args in [
        &["start", "web1", "--seed-via", "channel", "--connect", uri][..],
        &["push", "web1", "--connect", uri],
        &["status", "web1", "--connect", uri],
    ] {
        let err = s.fails(args);
        assert!(
            err.contains("a unix socket on root@hv1.invalid") && err.contains("run seedctl on"),
            "{args:?}: {err}"
        );
    }
}
