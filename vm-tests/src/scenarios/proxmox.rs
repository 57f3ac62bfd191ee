//! Seeds made the way Proxmox VE makes them (qemu-server's cloud-init code), with no
//! seedctl seed at all: a NoCloud `cidata` ISO from `genisoimage -iso-level 3 -R`, and a
//! ConfigDrive2 `config-2` drive. The static address lands on the NIC with the VM's MAC
//! (the guest calls it enp*/ens*, not eth0), and the hostname and root key work. The
//! NoCloud machine has a second NIC ahead of that one on the PCI bus, which the seed
//! names `eth1` with DHCP: only the MACs tell the two apart. Last, a config drive as
//! OpenStack Nova writes it, with the network in `network_data.json`.

use super::*;
use crate::machine::{Machine, genisoimage};
use std::process::Command;

/// Inside QEMU's user network, so ssh through hostfwd still reaches the guest.
const ADDR4: &str = "10.0.2.15";
const GW4: &str = "10.0.2.2";
const ADDR6: &str = "fec0::15";
const GW6: &str = "fec0::2";
/// Not QEMU's own resolver (10.0.2.3, which its DHCP hands out): only the seed names it.
const DNS: &str = "192.0.2.53";
const DOMAIN: &str = "example.org";
/// `openssl passwd -5 -salt nixseedpve proxmox`: Proxmox stores `cipassword` this way.
const PASSWORD_HASH: &str = "$5$nixseedpve$KRN7lXrCGhZIyeaocO.FhOwr16dk38tWWLprGB.zZO5";
const PASSWORD: &str = "proxmox";
/// The FQDN the Nova drive's static vendor-data gives.
const NOVA_FQDN: &str = "nova-vm.vendor.example";
/// A vendor snippet as an operator adds it with Proxmox's `cicustom: vendor=...`.
const VENDOR_DATA: &str = "#cloud-config\nssh_pwauth: true\n";

/// user-data with Proxmox's keys in Proxmox's order.
fn user_data(hostname: &str, admin_key: &str) -> String {
    format!(
        "#cloud-config\n\
         hostname: {hostname}\n\
         manage_etc_hosts: true\n\
         fqdn: {hostname}.{DOMAIN}\n\
         user: root\n\
         password: {PASSWORD_HASH}\n\
         ssh_authorized_keys:\n  - {admin_key}\n\
         chpasswd:\n  expire: False\n\
         users:\n  - default\n\
         package_upgrade: true\n"
    )
}

/// The second NIC's MAC (net1 in Proxmox's terms).
const EXTRA_MAC: &str = "52:54:00:e1:e1:01";
/// What QEMU's DHCP hands the second NIC on its own user network
/// ([`crate::qemu::EXTRA_NET`]).
const EXTRA_ADDR4: &str = "10.0.3.15";

/// network-config v1 as Proxmox writes it: `eth0` + the NIC's MAC, static v4 with a
/// dotted netmask, static6, then `eth1` + its MAC with DHCP (`dhcp4`, Proxmox's word)
/// when there is a second NIC, and a trailing nameserver entry.
fn network_config(mac: &str, extra_mac: Option<&str>) -> String {
    let eth1 = extra_mac
        .map(|m| {
            format!(
                "    - type: physical\n      \
                   name: eth1\n      \
                   mac_address: '{m}'\n      \
                   subnets:\n      \
                   - type: dhcp4\n"
            )
        })
        .unwrap_or_default();
    format!(
        "version: 1\n\
         config:\n    \
         - type: physical\n      \
           name: eth0\n      \
           mac_address: '{mac}'\n      \
           subnets:\n      \
           - type: static\n        \
             address: '{ADDR4}'\n        \
             netmask: '255.255.255.0'\n        \
             gateway: '{GW4}'\n      \
           - type: static6\n        \
             address: '{ADDR6}/64'\n        \
             gateway: '{GW6}'\n\
         {eth1}    \
         - type: nameserver\n      \
           address:\n      \
           - '{DNS}'\n      \
           search:\n      \
           - '{DOMAIN}'\n"
    )
}

/// The ENI text Proxmox writes into `openstack/content/0000`.
fn eni() -> String {
    format!(
        "auto lo\n\
         iface lo inet loopback\n\n    \
         dns_nameservers {DNS}\n    \
         dns_search {DOMAIN}\n\
         auto eth0\n\
         iface eth0 inet static\n        \
         address {ADDR4}\n        \
         netmask 255.255.255.0\n        \
         gateway {GW4}\n\
         iface eth0 inet6 static\n        \
         address {ADDR6}\n        \
         netmask 64\n        \
         gateway {GW6}\n"
    )
}

/// Whether the ISO has a Joliet supplementary volume descriptor (type 2, UCS-2 escape).
fn has_joliet(iso: &std::path::Path) -> Result<bool> {
    let bytes = std::fs::read(iso).with_context(|| format!("reading {}", iso.display()))?;
    for sector in 16..32 {
        let d = bytes
            .get(sector * 2048..sector * 2048 + 2048)
            .unwrap_or_default();
        if d.len() < 91 || &d[1..6] != b"CD001" {
            break;
        }
        if d[0] == 255 {
            break;
        }
        if d[0] == 2 && d[88] == b'%' && d[89] == b'/' {
            return Ok(true);
        }
    }
    Ok(false)
}

fn sha1_hex(bytes: &[u8], scratch: &std::path::Path) -> Result<String> {
    let f = scratch.join("sha1-input");
    std::fs::write(&f, bytes).with_context(|| format!("writing {}", f.display()))?;
    let out = crate::cmd::stdout(Command::new("sha1sum").arg(&f))?;
    out.split_whitespace()
        .next()
        .map(String::from)
        .context("sha1sum printed nothing")
}

/// The guest's name for the NIC with `mac`, which must be a predictable `enp…` name.
fn nic_named(b: &Booted, mac: &str) -> Result<String> {
    let ifname = b
        .ssh
        .run(&format!(
            "for d in /sys/class/net/*; do [ \"$(cat $d/address)\" = {mac} ] && basename $d; done; true"
        ))?
        .trim()
        .to_string();
    ensure!(!ifname.is_empty(), "no guest NIC has the MAC {mac}");
    // The guest's predictable name (the initramfs's rename took), not the kernel's ethN
    // that a seed's `eth0` would match by name alone.
    ensure!(
        ifname.starts_with("enp"),
        "the NIC with the MAC {mac} is named {ifname}, not a predictable enpXsY name"
    );
    Ok(ifname)
}

/// Boots `m` from `seed` alone (no seedctl seed; the host key is the agent's own), with
/// a second NIC of MAC `extra_mac` ahead of its own when given.
fn boot_pve(
    h: &Harness,
    m: &Machine,
    seed: &std::path::Path,
    extra_mac: Option<&str>,
) -> Result<Booted> {
    let seed = seed.to_path_buf();
    h.boot_with(m, None, |c| {
        c.seed_iso = Some(seed);
        c.extra_nic = extra_mac.map(String::from);
    })
}

/// Boots `m` from `seed` (no seedctl seed; the host key is the agent's own) and checks
/// what a Proxmox user would: the static address on the NIC with the VM's MAC, the
/// gateway, DNS, the hostname, root login with the key from user-data. With `extra_mac`
/// the VM has a second NIC ahead of that one, which must get its address from DHCP.
fn boot_and_check(
    h: &Harness,
    m: &Machine,
    seed: &std::path::Path,
    hostname: &str,
    extra_mac: Option<&str>,
    ssh_pwauth: bool,
) -> Result<()> {
    let b = boot_pve(h, m, seed, extra_mac)?;
    // Reaching this line means root logged in with the key from user-data.
    let mac = m.mac()?;
    let ifname = nic_named(&b, &mac)?;
    if let Some(extra) = extra_mac {
        check_second_nic(&b, &ifname, extra)?;
    }
    check_static_network(&b, m, &ifname, Some(DOMAIN))?;
    let got = b.ssh.run("hostname")?;
    ensure!(
        got.trim() == hostname,
        "hostname is '{}', the seed says '{hostname}'",
        got.trim()
    );
    // `user:`/`password:`: root's crypt hash is recorded for the image's user provisioning,
    // readable by root only.
    let users = b.ssh.run(
        "f=$(readlink -f /var/identity/current/users.json); stat -c '%a %U' \"$f\"; cat \"$f\"",
    )?;
    ensure!(
        users.starts_with("600 root\n")
            && users.contains("\"root\"")
            && users.contains(PASSWORD_HASH),
        "users.json does not record root with the seed's password hash, mode 0600:\n{users}"
    );
    let hosts = b.ssh.run("cat /etc/hosts")?;
    ensure!(
        hosts.contains(&format!("{hostname}.{DOMAIN}")),
        "manage_etc_hosts: /etc/hosts does not name {hostname}.{DOMAIN}:\n{hosts}"
    );
    check_password(&b, ssh_pwauth)?;
    if extra_mac.is_none() {
        return b.discard();
    }
    password_through_the_agent(h, m, b, seed)
}

/// Whether PAM's own checker (`unix_chkpwd`; it reads the password up to a NUL) takes
/// `pw` for root in the guest.
fn root_takes(b: &Booted, pw: &str) -> Result<bool> {
    let out = b.ssh.run(&format!(
        "printf '%s\\0' '{pw}' | /sbin/unix_chkpwd root nullok; echo rc=$?"
    ))?;
    Ok(out.trim() == "rc=0")
}

/// What `qm guest passwd` (Proxmox) and KubeVirt's access credentials send.
const AGENT_PASSWORD: &str = "set-by-the-guest-agent";

/// `guest-set-user-password` (clear text, as `qm guest passwd` sends it) on the
/// read-only `/etc`, where chpasswd cannot write: root takes the new password and no
/// longer the seed's, the record on `/var` is root's alone, and after a reboot on the same
/// seed (the same instance) the agent's password still holds.
fn password_through_the_agent(
    h: &Harness,
    m: &Machine,
    b: Booted,
    seed: &std::path::Path,
) -> Result<()> {
    // Unsafe commands are off unless allow-listed; an operator names them in the image,
    // the test in a runtime drop-in.
    b.ssh.run(
        "d=/run/systemd/system/nixseed-agent.service.d; mkdir -p $d && \
         printf '[Service]\nExecStart=\nExecStart=/usr/bin/nixseed-agent serve --firewall --unsafe-rpcs guest-set-user-password\n' > $d/unsafe.conf && \
         systemctl daemon-reload && systemctl restart nixseed-agent.service",
    )?;
    let chpasswd = b.ssh.run("echo root:x | chpasswd 2>&1; echo rc=$?")?;
    ensure!(
        !chpasswd.trim_end().ends_with("rc=0"),
        "chpasswd could write /etc/shadow: the test would not show the read-only path:\n{chpasswd}"
    );
    let sock = b.vm.config.qga_socket();
    let mut q = crate::qga_client::Qga::connect(&sock, std::time::Duration::from_secs(60))?;
    let encoded = crate::cmd::stdout(
        Command::new("sh").args(["-c", &format!("printf %s '{AGENT_PASSWORD}' | base64")]),
    )?;
    let reply = q.execute(&serde_json::json!({
        "execute": "guest-set-user-password",
        "arguments": {"username": "root", "password": encoded.trim(), "crypted": false},
    }))?;
    ensure!(
        reply == serde_json::json!({"return": {}}),
        "guest-set-user-password answered {reply}; journal:\n{}",
        b.ssh
            .run("journalctl -b -u nixseed-agent -o cat --no-pager | tail -n 20")?
    );
    ensure!(
        root_takes(&b, AGENT_PASSWORD)? && !root_takes(&b, PASSWORD)?,
        "after guest-set-user-password root does not take the new password alone: {}",
        b.ssh.run("grep ^root: /etc/shadow")?
    );
    // The new /etc/shadow leaves root's key login as it was (a new connection).
    b.ssh
        .login("true")
        .context("root's key no longer logs in after guest-set-user-password")?;
    let record = b.ssh.run(
        "stat -c '%a' /var/lib/nixseed/passwords.json; grep -c '\\$6\\$' /var/lib/nixseed/passwords.json",
    )?;
    ensure!(
        record == "600\n1\n",
        "/var/lib/nixseed/passwords.json is not root's alone with one SHA-512 crypt hash:\n{record}"
    );
    b.poweroff()?;

    let b = boot_pve(h, m, seed, Some(EXTRA_MAC))?;
    ensure!(
        root_takes(&b, AGENT_PASSWORD)? && !root_takes(&b, PASSWORD)?,
        "after a reboot on the same seed, root no longer takes the guest agent's password: {}",
        b.ssh
            .run("grep ^root: /etc/shadow; journalctl -b -o cat --no-pager | grep -i shadow")?
    );
    b.discard()
}

/// Proxmox's password works on the read-only root: PAM's own checker (`unix_chkpwd`,
/// what `login` on the console runs through pam_unix; it reads the password up to a NUL)
/// takes it for root and refuses another. `/etc/shadow` keeps the image's mode and group, and stage 2 found it bound
/// as the generation says (its fast path). sshd's own reading of its configuration
/// follows `ssh_pwauth` when the seed gives one and the image's `no` otherwise.
fn check_password(b: &Booted, ssh_pwauth: bool) -> Result<()> {
    ensure!(
        root_takes(b, PASSWORD)?,
        "root's password from the seed is refused by unix_chkpwd; /etc/shadow:\n{}",
        b.ssh
            .run("grep ^root: /etc/shadow; findmnt -n /etc/shadow; true")?
    );
    ensure!(
        !root_takes(b, "not-the-password")?,
        "unix_chkpwd takes any password for root: the check proves nothing"
    );
    let meta = b
        .ssh
        .run("stat -c '%a %G' /etc/shadow; findmnt -n -o SOURCE /etc/shadow")?;
    ensure!(
        meta.starts_with("640 shadow\n"),
        "/etc/shadow lost the image's mode and group: {meta}"
    );
    let apply = b
        .ssh
        .run("journalctl -b -u nixseed-apply.service -o cat --no-pager")?;
    ensure!(
        apply.contains("initrd stage already applied generation"),
        "stage 2 did not find the initrd stage's binds (with /etc/shadow) in place:\n{apply}"
    );
    check_ssh_pwauth(b, ssh_pwauth)
}

/// sshd's effective `PasswordAuthentication` for a root login is what `ssh_pwauth` asks.
fn check_ssh_pwauth(b: &Booted, ssh_pwauth: bool) -> Result<()> {
    let sshd = b.ssh.run(
        "sshd -T -C user=root,host=client,addr=10.0.2.2 | grep -i '^passwordauthentication '",
    )?;
    let want = if ssh_pwauth { "yes" } else { "no" };
    ensure!(
        sshd.trim()
            .eq_ignore_ascii_case(&format!("passwordauthentication {want}")),
        "sshd -T says `{}`; the seed's ssh_pwauth means {want}",
        sshd.trim()
    );
    Ok(())
}

/// The seed's static network on `ifname`: `ADDR4`/24 (not from DHCP) and `ADDR6`/64,
/// both default routes through it, and the seed's nameserver (and search domain, when
/// the seed's format can carry one) in resolv.conf.
fn check_static_network(b: &Booted, m: &Machine, ifname: &str, search: Option<&str>) -> Result<()> {
    let files = b.ssh.run(
        "grep -l . /run/systemd/network/* 2>/dev/null | xargs -r head -n 50; networkctl status --no-pager -n 0 2>&1 | head -n 20",
    )?;
    eprintln!(
        "vm-tests: {}: NIC {ifname}; networkd:\n{}",
        m.name,
        files.trim_end()
    );
    // networkd may still be configuring when sshd first answers.
    let v4 = b.ssh.run(&format!(
        "for i in $(seq 1 60); do ip -o -4 addr show dev {ifname} | grep -q ' {ADDR4}/24 ' && \
           ip -o -6 addr show dev {ifname} | grep -q ' {ADDR6}/64 ' && \
           ip -6 route show default | grep -q 'via {GW6} dev {ifname}' && break; sleep 1; done; \
         ip -o addr show dev {ifname}"
    ))?;
    let line4 = v4
        .lines()
        .find(|l| l.contains(&format!(" {ADDR4}/24 ")))
        .with_context(|| format!("{ADDR4}/24 is not on {ifname}:\n{v4}"))?;
    ensure!(
        !line4.contains("dynamic"),
        "{ADDR4} on {ifname} came from DHCP, not from the seed's static config: {line4}"
    );
    ensure!(
        v4.contains(&format!(" {ADDR6}/64 ")),
        "the static6 address {ADDR6}/64 is not on {ifname}:\n{v4}"
    );
    let route = b.ssh.run("ip -4 route show default")?;
    ensure!(
        route.contains(&format!("via {GW4} dev {ifname}")),
        "default route is not via {GW4} on {ifname}: {route}"
    );
    let route6 = b.ssh.run("ip -6 route show default")?;
    ensure!(
        route6.contains(&format!("via {GW6} dev {ifname}")),
        "the IPv6 default route is not via {GW6} on {ifname}: {route6}"
    );
    let resolv = b.ssh.run("cat /etc/resolv.conf")?;
    ensure!(
        resolv.contains(&format!("nameserver {DNS}"))
            && search.is_none_or(|d| resolv.lines().any(|l| {
                let mut words = l.split_whitespace();
                words.next() == Some("search") && words.any(|w| w == d)
            })),
        "/etc/resolv.conf lacks the seed's nameserver {DNS} (or search {search:?}):\n{resolv}"
    );
    Ok(())
}

/// The seed's `eth1` (DHCP) is the first NIC on the bus and `eth0` (static) the second:
/// each must be configured as the entry with its MAC says, not as its position would.
fn check_second_nic(b: &Booted, main: &str, extra_mac: &str) -> Result<()> {
    let extra = nic_named(b, extra_mac)?;
    // PCI addresses (fixed-width hex), the order the kernel found the NICs in.
    let pci = |n: &str| {
        b.ssh.run(&format!(
            "basename $(readlink -f /sys/class/net/{n}/device/..)"
        ))
    };
    let (first, second) = (pci(&extra)?, pci(main)?);
    ensure!(
        first.trim() < second.trim(),
        "the second NIC {extra} ({}) does not come before {main} ({}) on the bus: the test would not tell MACs from positions",
        first.trim(),
        second.trim()
    );
    let addrs = b.ssh.run(&format!(
        "for i in $(seq 1 60); do ip -o -4 addr show dev {extra} | grep -q ' {EXTRA_ADDR4}/24 ' && break; sleep 1; done; \
         ip -o addr show dev {extra}"
    ))?;
    let line = addrs
        .lines()
        .find(|l| l.contains(&format!(" {EXTRA_ADDR4}/24 ")))
        .with_context(|| {
            format!("{extra} ({extra_mac}, the seed's eth1) has no DHCP address {EXTRA_ADDR4}/24:\n{addrs}")
        })?;
    ensure!(
        line.contains("dynamic"),
        "{EXTRA_ADDR4} on {extra} is not from DHCP: {line}"
    );
    ensure!(
        !addrs.contains(&format!(" {ADDR4}/")) && !addrs.contains(&format!(" {ADDR6}/")),
        "the seed's static addresses for eth0 ({ADDR4}, {ADDR6}) are on {extra}, the NIC with the other MAC:\n{addrs}"
    );
    Ok(())
}

pub fn proxmox(h: &Harness) -> Result<()> {
    let admin = h.key.public_line()?;

    // citype nocloud (the default): cidata ISO, Rock Ridge only.
    let m = h.new_machine("pve-nocloud")?;
    let ud = user_data("pve-nocloud", &admin);
    let nc = network_config(&m.mac()?, Some(EXTRA_MAC));
    let iid = sha1_hex(format!("{ud}{nc}").as_bytes(), &m.state)?;
    let md = format!("instance-id: {iid}\n");
    let iso = m.state.join("proxmox-cidata.iso");
    genisoimage(
        &m.state.join("proxmox-cidata"),
        &[
            ("user-data", ud.as_bytes()),
            ("meta-data", md.as_bytes()),
            ("network-config", nc.as_bytes()),
            ("vendor-data", VENDOR_DATA.as_bytes()),
        ],
        "cidata",
        &iso,
    )?;
    ensure!(
        !has_joliet(&iso)?,
        "{} carries a Joliet directory; Proxmox's ISO has Rock Ridge only",
        iso.display()
    );
    boot_and_check(h, &m, &iso, "pve-nocloud", Some(EXTRA_MAC), true)?;

    // citype configdrive2: config-2 with OpenStack layout and ENI network data.
    let m = h.new_machine("pve-configdrive")?;
    let ud = user_data("pve-configdrive", &admin);
    let uuid = sha1_hex(format!("{ud}{}", eni()).as_bytes(), &m.state)?;
    let meta = format!(
        "{{\"uuid\":\"{uuid}\",\"network_config\":{{\"content_path\":\"/content/0000\"}}}}"
    );
    let eni = eni();
    let iso = m.state.join("proxmox-config-2.iso");
    genisoimage(
        &m.state.join("proxmox-config-2"),
        &[
            ("openstack/latest/user_data", ud.as_bytes()),
            ("openstack/latest/meta_data.json", meta.as_bytes()),
            ("openstack/latest/vendor_data.json", b""),
            ("openstack/content/0000", eni.as_bytes()),
        ],
        "config-2",
        &iso,
    )?;
    boot_and_check(h, &m, &iso, "pve-configdrive", None, false)?;

    nova_configdrive(h, &admin)
}

/// A config drive as OpenStack Nova writes it: `meta_data.json` with the key in
/// `public_keys` and an FQDN `hostname`, the network in `network_data.json` (static IPv4
/// and IPv6 on the link with the VM's MAC, a DNS service), no user data at all, and
/// vendor-data from both of Nova's providers: the static `vendor_data.json` and the
/// dynamic `vendor_data2.json`, each a JSON object with cloud-init's part under
/// `cloud-init` beside other services' members.
fn nova_configdrive(h: &Harness, admin: &str) -> Result<()> {
    let m = h.new_machine("nova-configdrive")?;
    let mac = m.mac()?;
    let meta = serde_json::json!({
        "uuid": "6f1b1d1e-2c4a-4e57-9a8b-1f2e3d4c5b6a",
        "hostname": "nova-vm.novalocal",
        "name": "nova-vm",
        "launch_index": 0,
        "availability_zone": "nova",
        "public_keys": {"mykey": admin},
        "keys": [{"name": "mykey", "type": "ssh", "data": admin}],
        "devices": [],
    });
    let network = serde_json::json!({
        "links": [{"id": "tap1a2b3c4d-5e", "vif_id": "1a2b3c4d-5e6f-4a8b-9c0d-1e2f3a4b5c6d",
                   "type": "ovs", "mtu": 1500, "ethernet_mac_address": mac}],
        "networks": [
            {"id": "network0", "type": "ipv4", "link": "tap1a2b3c4d-5e",
             "ip_address": ADDR4, "netmask": "255.255.255.0",
             "routes": [{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": GW4}],
             "network_id": "net-v4"},
            {"id": "network1", "type": "ipv6", "link": "tap1a2b3c4d-5e",
             "ip_address": ADDR6, "netmask": "ffff:ffff:ffff:ffff::",
             "routes": [{"network": "::", "netmask": "::", "gateway": GW6}],
             "network_id": "net-v6"},
        ],
        "services": [{"type": "dns", "address": DNS}],
    });
    // The dynamic provider's `ssh_pwauth` wins over the static one's; the static one's
    // FQDN and /etc/hosts still apply.
    let vendor = serde_json::json!({
        "cloud-init": format!("#cloud-config\nssh_pwauth: false\nmanage_etc_hosts: true\nfqdn: {NOVA_FQDN}\n"),
        "static-service": {"motd": "hello"},
    });
    let vendor2 = serde_json::json!({
        "cloud-init": "#cloud-config\nssh_pwauth: true\n",
        "dynamic-service": {"token": "abc"},
    });
    let (meta, network) = (meta.to_string(), network.to_string());
    let (vendor, vendor2) = (vendor.to_string(), vendor2.to_string());
    let iso = m.state.join("nova-config-2.iso");
    genisoimage(
        &m.state.join("nova-config-2"),
        &[
            ("openstack/latest/meta_data.json", meta.as_bytes()),
            ("openstack/latest/network_data.json", network.as_bytes()),
            ("openstack/latest/vendor_data.json", vendor.as_bytes()),
            ("openstack/latest/vendor_data2.json", vendor2.as_bytes()),
        ],
        "config-2",
        &iso,
    )?;
    // Reaching sshd's answer and a login means root took the key from `public_keys`.
    let b = boot_pve(h, &m, &iso, None)?;
    let ifname = nic_named(&b, &mac)?;
    check_static_network(&b, &m, &ifname, None)?;
    let facts = b
        .ssh
        .run("hostname; grep -o '\"source\": *\"[^\"]*\"' /var/identity/manifest.json")?;
    ensure!(
        facts.starts_with("nova-vm\n") && facts.contains("\"configdrive:"),
        "a Nova config drive did not give hostname nova-vm from configdrive: (hostname, manifest source):\n{facts}"
    );
    let hosts = b.ssh.run("cat /etc/hosts")?;
    ensure!(
        hosts.contains(NOVA_FQDN),
        "vendor_data.json's manage_etc_hosts and fqdn: /etc/hosts does not name {NOVA_FQDN}:\n{hosts}"
    );
    check_ssh_pwauth(&b, true)?;
    b.discard()
}
