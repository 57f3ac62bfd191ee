//! network-config (v1, v2, ConfigDrive ENI and `network_data.json`) and its rendering to
//! systemd-networkd files. The initrd stage and `seedctl render` call [`parse`] /
//! [`parse_eni`] / [`parse_network_data`] on the seed's bytes, then [`render_networkd`] with the guest's NICs; the files land in
//! `/var/identity/network/` and are linked into `/run/systemd/network`.
//!
//! Output follows cloud-init's networkd renderer (`cloudinit/net/networkd.py`); the
//! golden tests in `core/tests/network_golden.rs` compare against cloud-init itself.

mod eni;
mod ip;
mod netjson;
mod networkd;
mod v1;
mod v2;

use std::collections::BTreeMap;

/// A parsed network-config, whatever form it came in.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct NetworkConfig {
    /// 1 for v1 and ENI, 2 for v2. cloud-init copies global nameservers into every
    /// interface only for v1.
    pub version: u8,
    pub interfaces: Vec<Interface>,
    /// v1 `type: route` entries; cloud-init adds them to every interface.
    pub routes: Vec<Route>,
    /// v1 `type: nameserver` entries without `interface:` (and ENI `dns_*` lines).
    pub nameservers: Vec<String>,
    pub search: Vec<String>,
}

/// What the seed says about networking.
#[derive(Debug, Clone, PartialEq)]
pub enum NetworkSetting {
    /// `{config: disabled}`: leave networking alone.
    Disabled,
    Config(NetworkConfig),
}

/// A network interface present in the guest, used to match `mac_address` entries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    pub name: String,
    /// Lowercase, colon-separated.
    pub mac: String,
}

impl std::str::FromStr for Link {
    type Err = String;

    /// `NAME=MAC`, the form the `--link` options of `nixseed-agent render` and `seedctl
    /// render` take: a NIC the guest has, so a config that matches by MAC names it.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, mac) = s
            .split_once('=')
            .ok_or_else(|| "expected NAME=MAC".to_string())?;
        if name.is_empty() || name.len() > 15 || name.contains(['/', ' ', ':']) {
            return Err(format!(
                "{name:?} is not an interface name (1-15 characters, no '/', ':' or space)"
            ));
        }
        let octets: Vec<&str> = mac.split(':').collect();
        if octets.len() != 6
            || !octets
                .iter()
                .all(|o| o.len() == 2 && o.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(format!(
                "{mac:?} is not a MAC address (six hex octets, colon-separated)"
            ));
        }
        Ok(Link {
            name: name.into(),
            mac: mac.to_ascii_lowercase(),
        })
    }
}

/// One interface of the config, before names are resolved against the guest's links.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Interface {
    /// The v1 `name` or the v2 key; other entries refer to the interface by it.
    pub id: String,
    /// v2 `set-name`.
    pub set_name: Option<String>,
    /// v1 `mac_address` or v2 `match.macaddress` (bond/bridge/vlan `macaddress`), lowercase.
    pub mac: Option<String>,
    /// Rename to the guest NIC carrying `mac` (v1 physical, v2 ethernets).
    pub rename_by_mac: bool,
    pub kind: InterfaceKind,
    pub mtu: Option<String>,
    /// v1/v2 `optional: true`: networkd should not wait for it.
    pub optional: bool,
    pub accept_ra: Option<bool>,
    pub subnets: Vec<Subnet>,
    /// Nameservers given for this interface only.
    pub dns: Option<Dns>,
    /// v2 `dhcp4-overrides` / `dhcp6-overrides` as (key, value) pairs.
    pub dhcp4_overrides: Vec<(String, String)>,
    pub dhcp6_overrides: Vec<(String, String)>,
    /// v2 `match.driver`.
    pub driver: Option<String>,
    /// v2 `routing-policy`: one rule per entry, as networkd (key, value) pairs.
    pub routing_policy: Vec<Vec<(&'static str, String)>>,
    /// A `network_data.json` VLAN: called `<link's name>.<VLAN id>` after its link's
    /// name in the guest, which is known only when the NICs are.
    pub name_after_link: bool,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub enum InterfaceKind {
    #[default]
    Physical,
    Loopback,
    Vlan {
        id: String,
        link: String,
    },
    /// `params` use v1 key names (`bond-mode`, ...); values as cloud-init prints them.
    Bond {
        members: Vec<String>,
        params: Vec<(String, String)>,
    },
    /// `params` use v1 key names (`bridge_stp`, ...); `None` marks a falsy value.
    Bridge {
        ports: Vec<String>,
        params: Vec<(String, Option<String>)>,
    },
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Dns {
    pub nameservers: Vec<String>,
    pub search: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum SubnetKind {
    Static,
    Dhcp4,
    Dhcp6,
    /// `ipv6_slaac`, `manual`, `loopback`, ...: no DHCP, no address.
    Other(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Subnet {
    pub kind: SubnetKind,
    /// Address and prefix length, for static subnets.
    pub address: Option<(String, u8)>,
    pub gateway: Option<String>,
    pub dns_nameservers: Vec<String>,
    pub dns_search: Vec<String>,
    pub routes: Vec<Route>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub network: String,
    pub prefix: u8,
    pub gateway: Option<String>,
    pub metric: Option<String>,
    pub table: Option<String>,
    /// v2 `on-link: true`: the gateway is reached on the link whatever the addresses
    /// (`GatewayOnLink=yes`), as a /32 address with a gateway outside it needs.
    pub on_link: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error("{origin}: {detail}")]
    Invalid { origin: String, detail: String },
}

/// A route's `metric` as written, when it is a non-negative integer.
pub(crate) fn check_metric(
    metric: Option<String>,
    at: &str,
    origin: &str,
) -> Result<Option<String>, NetworkError> {
    match metric {
        Some(m) if m.parse::<u32>().is_err() => Err(invalid(
            origin,
            format!("{at}.metric: `{m}` is not an integer"),
        )),
        m => Ok(m),
    }
}

/// The most interfaces (or ENI stanzas, network_data.json links or networks, v1
/// entries) one network config may describe. A VM has a handful; a seed with hundreds of
/// thousands would only make the parsers' cross-references slow in the initrd.
pub const MAX_INTERFACES: usize = 1024;

/// An error naming `origin` when `count` `what` exceed [`MAX_INTERFACES`].
pub(crate) fn check_count(origin: &str, what: &str, count: usize) -> Result<(), NetworkError> {
    if count > MAX_INTERFACES {
        return Err(invalid(
            origin,
            format!("{count} {what}; the most nixseed reads is {MAX_INTERFACES}"),
        ));
    }
    Ok(())
}

pub(crate) fn invalid(origin: &str, detail: impl Into<String>) -> NetworkError {
    NetworkError::Invalid {
        origin: origin.to_string(),
        detail: detail.into(),
    }
}

/// Parses a network-config document (v1 or v2, optionally under a top-level `network:`).
/// `origin` names the file in errors.
pub fn parse(bytes: &[u8], origin: &str) -> Result<NetworkSetting, NetworkError> {
    parse_if_any(bytes, origin)?
        .ok_or_else(|| invalid(origin, "expected a mapping with `version:`"))
}

/// [`parse`], with `None` for a document that holds no configuration at all: only
/// comments, `---`, `{}` or `network:` with no value. cloud-init reads such a
/// `network-config` as none given, and falls back as without the file.
pub fn parse_if_any(bytes: &[u8], origin: &str) -> Result<Option<NetworkSetting>, NetworkError> {
    use crate::yaml::Value;
    let doc = crate::yaml::parse_bytes(bytes, origin)
        .map_err(|e| invalid(origin, format!("not valid YAML: {}", e.detail)))?;
    let mut top = &doc;
    // `network:` with no value counts as the key given: it holds nothing, as below.
    if crate::yaml::get(top, "version").is_none()
        && let Value::Mapping(m) = top
        && let Some(inner) = m.get("network")
    {
        top = inner;
    }
    match top {
        Value::Null => return Ok(None),
        Value::Mapping(m) if m.is_empty() => return Ok(None),
        _ => {}
    }
    if !matches!(top, Value::Mapping(_)) {
        return Err(invalid(origin, "expected a mapping with `version:`"));
    }
    if crate::yaml::get(top, "config").and_then(Value::as_str) == Some("disabled") {
        return Ok(Some(NetworkSetting::Disabled));
    }
    let version = crate::yaml::get(top, "version")
        .and_then(crate::yaml::scalar_text)
        .ok_or_else(|| invalid(origin, "`version` is missing (expected 1 or 2)"))?;
    let cfg = match version.as_str() {
        "1" => v1::parse(top, origin)?,
        "2" => v2::parse(top, origin)?,
        other => {
            return Err(invalid(
                origin,
                format!("version: {other} is not supported (expected 1 or 2)"),
            ));
        }
    };
    Ok(Some(NetworkSetting::Config(cfg)))
}

/// Parses Debian ENI text (ConfigDrive2 `content/0000`).
pub fn parse_eni(text: &str, origin: &str) -> Result<NetworkConfig, NetworkError> {
    eni::parse(text, origin)
}

/// Parses OpenStack `network_data.json` (ConfigDrive2 `openstack/latest/network_data.json`)
/// as cloud-init's ConfigDrive datasource converts it.
pub fn parse_network_data(bytes: &[u8], origin: &str) -> Result<NetworkConfig, NetworkError> {
    netjson::parse(bytes, origin)
}

/// Renders systemd-networkd files: file name → content; an error names the file and the
/// value that cannot be written in it.
pub fn render_networkd(
    cfg: &NetworkConfig,
    links: &[Link],
) -> Result<BTreeMap<String, String>, String> {
    networkd::render(cfg, links)
}

/// Splits `addr[/prefix]` and works out the prefix the way cloud-init does: from the
/// `/` suffix, else `prefix`, else `netmask`, else /24 (IPv4) or /64 (IPv6).
pub(crate) fn address_prefix(
    addr: &str,
    prefix: Option<&str>,
    netmask: Option<&str>,
) -> Result<(String, u8), String> {
    let (ip, suffix) = match addr.split_once('/') {
        Some((ip, p)) => (ip, Some(p)),
        None => (addr, None),
    };
    let v6 = match ip.parse::<std::net::IpAddr>() {
        Ok(a) => a.is_ipv6(),
        Err(_) => return Err(format!("`{addr}` is not an IP address")),
    };
    let to_prefix = |m: &str| {
        if v6 {
            ip::v6_prefix(m)
        } else {
            ip::v4_prefix(m)
        }
    };
    let p = if let Some(s) = suffix {
        to_prefix(s).ok_or_else(|| format!("`{addr}` has an invalid prefix"))?
    } else if let Some(p) = prefix {
        to_prefix(p).ok_or_else(|| format!("prefix `{p}` is invalid for {ip}"))?
    } else if let Some(m) = netmask {
        to_prefix(m).ok_or_else(|| format!("netmask `{m}` is invalid for {ip}"))?
    } else if v6 {
        64
    } else {
        24
    };
    Ok((ip.to_string(), p))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn config(yaml: &str) -> NetworkConfig {
        match parse(yaml.as_bytes(), "network-config").unwrap() {
            NetworkSetting::Config(c) => c,
            NetworkSetting::Disabled => panic!("unexpectedly disabled"),
        }
    }

    fn error(yaml: &str) -> String {
        parse(yaml.as_bytes(), "/mnt/cidata/network-config")
            .unwrap_err()
            .to_string()
    }

    /// A Proxmox entry whose NIC is not there when the identity is written (its driver
    /// not in the initrd yet) is matched by MAC alone, not by a name the NIC never gets;
    /// found, it is matched by its own name. The bond that takes the MAC keeps its name.
    /// A v2 route with `on-link: true` (a /32 address whose gateway lies outside it, as
    /// Hetzner's and OVH's configs give) is written with `GatewayOnLink=yes`, without
    /// which networkd cannot add it; one without `on-link` is written as before.
    #[test]
    fn an_on_link_route_is_written_with_gateway_on_link() {
        let c = config(
            "version: 2\nethernets:\n  eth0:\n    addresses: [203.0.113.77/32]\n    routes:\n      - {to: 0.0.0.0/0, via: 172.31.1.1, on-link: true}\n      - {to: 198.51.100.0/24, via: 203.0.113.1}\n",
        );
        let files = render_networkd(&c, &[]).unwrap();
        let unit = &files["10-cloud-init-eth0.network"];
        assert!(
            unit.contains(
                "[Route]\nDestination=0.0.0.0/0\nGateway=172.31.1.1\nGatewayOnLink=yes\n"
            ),
            "{unit}"
        );
        assert!(
            unit.contains("[Route]\nDestination=198.51.100.0/24\nGateway=203.0.113.1\n\n")
                || unit.ends_with("[Route]\nDestination=198.51.100.0/24\nGateway=203.0.113.1\n"),
            "{unit}"
        );
    }

    /// With `net.ifnames=0`, the NIC of the second entry (`eth1`, MAC …:02) is the
    /// guest's `eth0` while the first entry's NIC (`eth0`, MAC …:01) has not appeared:
    /// both files are written, the absent one under its MAC too, and neither replaces the
    /// other (the static address reaches the first NIC when it comes).
    /// `text`'s files on a guest whose only NIC is `eth0` with MAC …:02: the NIC of a
    /// config entry `eth1`, while the entry `eth0` (MAC …:01) has no NIC yet. Returns the
    /// files, the present NIC's and the absent one's.
    fn eth0_taken(text: &str) -> (BTreeMap<String, String>, String, String) {
        let links = [Link {
            name: "eth0".into(),
            mac: "bc:24:11:5e:7a:02".into(),
        }];
        let files = render_networkd(&config(text), &links).unwrap();
        let present = files["10-cloud-init-eth0.network"].clone();
        let absent = files["10-cloud-init-eth0-bc24115e7a01.network"].clone();
        (files, present, absent)
    }

    #[test]
    fn an_absent_nic_s_config_name_taken_by_another_nic_loses_nothing() {
        let (files, present, absent) = eth0_taken(
            "version: 1\nconfig:\n  - {type: physical, name: eth0, mac_address: 'bc:24:11:5e:7a:01', subnets: [{type: static, address: 10.20.30.40/24, gateway: 10.20.30.1}]}\n  - {type: physical, name: eth1, mac_address: 'bc:24:11:5e:7a:02', subnets: [{type: dhcp4}]}\n",
        );
        assert!(
            present.contains("Name=eth0") && present.contains("DHCP=ipv4"),
            "{files:?}"
        );
        assert!(
            absent.contains("MACAddress=bc:24:11:5e:7a:01\nType=ether")
                && absent.contains("Address=10.20.30.40/24"),
            "{files:?}"
        );
        assert_eq!(files.len(), 2, "{files:?}");
    }

    /// The same with the absent NIC in a bond: only its own file joins the bond, not the
    /// present NIC's, which has the same name.
    #[test]
    fn an_absent_bond_member_s_name_taken_by_another_nic_keeps_that_nic_out() {
        let (files, present, absent) = eth0_taken(
            "version: 1\nconfig:\n  - {type: physical, name: eth0, mac_address: 'bc:24:11:5e:7a:01'}\n  - {type: physical, name: eth1, mac_address: 'bc:24:11:5e:7a:02', subnets: [{type: dhcp4}]}\n  - {type: bond, name: bond0, bond_interfaces: [eth0], params: {bond-mode: active-backup}, subnets: [{type: static, address: 10.20.30.40/24}]}\n",
        );
        assert!(
            !present.contains("Bond=") && present.contains("DHCP=ipv4"),
            "{files:?}"
        );
        assert!(absent.contains("Bond=bond0"), "{files:?}");
    }

    #[test]
    fn a_nic_not_yet_present_is_matched_by_its_mac_alone() {
        let c = config(
            "version: 1\nconfig:\n  - {type: physical, name: eth0, mac_address: 'bc:24:11:5e:7a:01', subnets: [{type: dhcp4}]}\n  - {type: bond, name: bond0, bond_interfaces: [eth0], mac_address: 'bc:24:11:5e:7a:01', subnets: [{type: dhcp6}]}\n",
        );
        let absent = render_networkd(&c, &[]).unwrap();
        assert_eq!(
            absent["10-cloud-init-eth0.network"].split("\n\n").next(),
            Some("[Match]\nMACAddress=bc:24:11:5e:7a:01\nType=ether"),
            "{absent:?}"
        );
        assert!(
            absent["10-cloud-init-bond0.network"].contains("[Match]\nName=bond0\n"),
            "{absent:?}"
        );
        let present = render_networkd(
            &c,
            &[Link {
                name: "ens18".into(),
                mac: "bc:24:11:5e:7a:01".into(),
            }],
        )
        .unwrap();
        assert_eq!(
            present["10-cloud-init-ens18.network"].split("\n\n").next(),
            Some("[Match]\nMACAddress=bc:24:11:5e:7a:01\nName=ens18")
        );
        // v2 `set-name` cannot rename the NIC: it is matched under its own name.
        let v2 = config(
            "version: 2\nethernets:\n  wan:\n    match: {macaddress: 'bc:24:11:5e:7a:01'}\n    set-name: wan0\n    dhcp4: true\n",
        );
        let files = render_networkd(
            &v2,
            &[Link {
                name: "ens18".into(),
                mac: "bc:24:11:5e:7a:01".into(),
            }],
        )
        .unwrap();
        assert_eq!(
            files.keys().collect::<Vec<_>>(),
            ["10-cloud-init-ens18.network"]
        );
    }

    #[test]
    fn v2_dhcp_accepts_yaml11_booleans() {
        let c = config(
            "version: 2\nethernets:\n  a: {dhcp4: yes, dhcp6: no}\n  b: {dhcp4: Off, dhcp6: ON}\n  c: {dhcp4: y}\n",
        );
        let kinds = |i: usize| -> Vec<SubnetKind> {
            c.interfaces[i]
                .subnets
                .iter()
                .map(|s| s.kind.clone())
                .collect()
        };
        assert_eq!(kinds(0), vec![SubnetKind::Dhcp4]);
        assert_eq!(kinds(1), vec![SubnetKind::Dhcp6]);
        // `y` is a string to PyYAML, and cloud-init turns DHCP on for it.
        assert_eq!(kinds(2), vec![SubnetKind::Dhcp4]);
    }

    #[test]
    fn dhcp_that_is_not_a_boolean_names_file_and_key() {
        let e = error("version: 2\nethernets:\n  ens18:\n    dhcp4: sometimes\n");
        assert!(e.starts_with("/mnt/cidata/network-config: "), "{e}");
        assert!(e.contains("ethernets.ens18.dhcp4"), "{e}");
        // cloud-init would turn DHCP on for `n`; refused rather than guessed.
        let e = error("version: 2\nethernets:\n  ens18:\n    dhcp4: n\n");
        assert!(
            e.contains("ethernets.ens18.dhcp4: expected true/false"),
            "{e}"
        );
    }

    #[test]
    fn dotted_netmask_becomes_prefix_and_default_prefixes_apply() {
        let c = config(
            "version: 1\nconfig:\n- type: physical\n  name: eth0\n  subnets:\n  - {type: static, address: 10.1.2.3, netmask: 255.255.240.0}\n  - {type: static, address: 10.9.9.9}\n  - {type: static6, address: '2001:db8::5'}\n",
        );
        let addrs: Vec<_> = c.interfaces[0]
            .subnets
            .iter()
            .map(|s| s.address.clone().unwrap())
            .collect();
        assert_eq!(
            addrs,
            vec![
                ("10.1.2.3".to_string(), 20),
                ("10.9.9.9".to_string(), 24),
                ("2001:db8::5".to_string(), 64)
            ]
        );
    }

    #[test]
    fn nameserver_without_address_is_skipped_like_cloud_init() {
        let c = config(
            "version: 1\nconfig:\n- {type: physical, name: eth0, subnets: [{type: dhcp4}]}\n- type: nameserver\n  search: [example.org]\n",
        );
        assert!(c.nameservers.is_empty());
        assert!(c.search.is_empty());
        let c = config(
            "version: 1\nconfig:\n- {type: physical, name: eth0}\n- type: nameserver\n  address: 192.0.2.53\n  search: example.org\n",
        );
        assert_eq!(c.nameservers, vec!["192.0.2.53"]);
        assert_eq!(c.search, vec!["example.org"]);
    }

    #[test]
    fn disabled_in_both_spellings() {
        for y in ["config: disabled\n", "network:\n  config: disabled\n"] {
            assert_eq!(parse(y.as_bytes(), "nc").unwrap(), NetworkSetting::Disabled);
        }
    }

    #[test]
    fn malformed_inputs_name_origin_and_key() {
        let cases = [
            (
                "version: 1\nconfig:\n- {type: physical, name: eth0, subnets: [{type: static, address: 10.0.0.1, netmask: 255.0.255.0}]}\n",
                "config[0].subnets[0].address",
            ),
            (
                "version: 1\nconfig:\n- {type: physical, name: eth0, subnets: [{type: static, address: not-an-ip}]}\n",
                "config[0].subnets[0].address",
            ),
            (
                "version: 1\nconfig:\n- {type: tunnel, name: t0}\n",
                "config[0].type",
            ),
            (
                "version: 1\nconfig:\n- {type: physical}\n",
                "config[0].name",
            ),
            (
                "version: 1\nconfig:\n- {type: route, destination: 10.0.0.0/8, metric: fast}\n",
                "config[0].metric",
            ),
            (
                "version: 2\nethernets:\n  e:\n    routes: [{to: default}]\n",
                "ethernets.e.routes[0].via",
            ),
            ("version: 3\n", "version"),
            ("ethernets: {}\n", "version"),
            ("version: 2\nethernets: [1, 2\n", "not valid YAML"),
        ];
        for (yaml, key) in cases {
            let e = error(yaml);
            assert!(e.starts_with("/mnt/cidata/network-config: "), "{e}");
            assert!(e.contains(key), "{key} not in {e}");
        }
    }

    /// An alias stanza (`eth0:1`) is a second address of its device, as cloud-init reads
    /// it: one file for eth0 with both addresses, and a single-NIC guest still binds it.
    #[test]
    fn an_eni_alias_adds_its_address_to_its_device() {
        let mut c = parse_eni(
            "auto eth0\niface eth0 inet static\n    address 10.0.0.5\n    netmask 255.255.255.0\n    gateway 10.0.0.1\nauto eth0:1\niface eth0:1 inet static\n    address 10.0.1.5\n    netmask 255.255.255.0\n",
            "openstack/content/0000",
        )
        .unwrap();
        assert_eq!(c.interfaces.len(), 1);
        let links = [Link {
            name: "ens18".into(),
            mac: "bc:24:11:5e:7a:01".into(),
        }];
        adopt_single_link(&mut c, &links);
        let files = render_networkd(&c, &links).unwrap();
        assert_eq!(files.len(), 1, "{files:?}");
        let unit = &files["10-cloud-init-ens18.network"];
        assert!(
            unit.contains("Address=10.0.0.5/24") && unit.contains("Address=10.0.1.5/24"),
            "{unit}"
        );
    }

    #[test]
    fn eni_merges_inet_and_inet6_and_reads_proxmox_dns() {
        let c = parse_eni(
            "auto lo\niface lo inet loopback\n\n        dns_nameservers 10.0.0.2 10.0.0.3\n        dns_search lab.example\nauto eth0\niface eth0 inet static\n        address 10.0.0.5\n        netmask 255.255.255.0\n        gateway 10.0.0.1\niface eth0 inet6 static\n        address 2001:db8::5\n        netmask 64\n        gateway 2001:db8::1\n",
            "openstack/content/0000",
        )
        .unwrap();
        assert_eq!(c.nameservers, vec!["10.0.0.2", "10.0.0.3"]);
        assert_eq!(c.search, vec!["lab.example"]);
        let eth0 = c.interfaces.iter().find(|i| i.id == "eth0").unwrap();
        assert_eq!(eth0.subnets.len(), 2);
        assert_eq!(eth0.subnets[1].address, Some(("2001:db8::5".into(), 64)));
        let e = parse_eni("iface eth0 inet static\n", "openstack/content/0000").unwrap_err();
        assert!(
            e.to_string().contains("openstack/content/0000: line 1"),
            "{e}"
        );
    }

    #[test]
    fn proxmox_eth0_is_renamed_to_the_nic_with_its_mac() {
        let c = config(
            "version: 1\nconfig:\n- {type: physical, name: eth0, mac_address: 'BC:24:11:00:00:01', subnets: [{type: dhcp4}]}\n",
        );
        let links = [Link {
            name: "ens18".into(),
            mac: "bc:24:11:00:00:01".into(),
        }];
        let files = render_networkd(&c, &links).unwrap();
        let f = &files["10-cloud-init-ens18.network"];
        assert_eq!(
            f,
            "[Match]\nMACAddress=bc:24:11:00:00:01\nName=ens18\n\n[Network]\nDHCP=ipv4\n"
        );
        // Without that NIC the config name stays.
        assert!(
            render_networkd(&c, &[])
                .unwrap()
                .contains_key("10-cloud-init-eth0.network")
        );
    }
}

/// ConfigDrive2's ENI names interfaces as the image's installer saw them (`eth0`) and
/// carries no MAC; guests name their NIC `ens18`. When the config has exactly one physical
/// interface without a MAC, its name is not a guest NIC, and the guest has exactly one NIC,
/// the interface is bound to that NIC by MAC — the only reading under which the config can
/// apply at all. Anything ambiguous is left as written.
pub fn adopt_single_link(cfg: &mut NetworkConfig, links: &[Link]) {
    let mut physical = cfg
        .interfaces
        .iter_mut()
        .filter(|i| matches!(i.kind, InterfaceKind::Physical));
    let (Some(iface), None) = (physical.next(), physical.next()) else {
        return;
    };
    if iface.mac.is_some() || iface.set_name.is_some() || links.iter().any(|l| l.name == iface.id) {
        return;
    }
    let [link] = links else {
        // Left as written: the files name a NIC the guest does not have, and the
        // journal says why, since nothing else will.
        tracing::warn!(
            "the network-config's interface {} carries no MAC and the guest has no NIC of that name; it is bound to the guest's NIC only when there is exactly one, and {} NICs are seen ({}): the files are written for {} as named",
            iface.id,
            links.len(),
            links
                .iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            iface.id
        );
        return;
    };
    iface.mac = Some(link.mac.clone());
    iface.rename_by_mac = true;
}

#[cfg(test)]
mod adopt_tests {
    use super::*;

    #[test]
    fn a_lone_eni_interface_binds_to_the_lone_guest_nic() {
        let eni = "auto eth0\niface eth0 inet static\n    address 10.0.2.15\n    netmask 255.255.255.0\n    gateway 10.0.2.2\n";
        let mut cfg = parse_eni(eni, "content/0000").unwrap();
        let links = [Link {
            name: "ens18".into(),
            mac: "52:54:00:aa:bb:cc".into(),
        }];
        adopt_single_link(&mut cfg, &links);
        let files = render_networkd(&cfg, &links).unwrap();
        let (name, text) = files.iter().next().unwrap();
        assert_eq!(name, "10-cloud-init-ens18.network");
        assert!(
            text.contains("Name=ens18") && text.contains("Address=10.0.2.15/24"),
            "{text}"
        );
        // Two guest NICs: ambiguous, left alone.
        let mut cfg = parse_eni(eni, "content/0000").unwrap();
        let two = [
            links[0].clone(),
            Link {
                name: "ens19".into(),
                mac: "52:54:00:aa:bb:cd".into(),
            },
        ];
        adopt_single_link(&mut cfg, &two);
        assert!(
            render_networkd(&cfg, &two)
                .unwrap()
                .contains_key("10-cloud-init-eth0.network")
        );
    }

    /// v2 `mark` and `type-of-service` become networkd's own keys; cloud-init 26.2 writes
    /// `Mark=` and `Type-of-service=`, which networkd does not know and ignores.
    #[test]
    fn routing_policy_marks_use_the_keys_networkd_knows() {
        let yaml = "version: 2\nethernets:\n  ens3:\n    addresses: [10.0.0.5/24]\n    routing-policy:\n      - {from: 10.0.0.5/32, mark: 7, type-of-service: 16, table: 200}\n";
        let v = crate::yaml::parse(yaml, "network-config").unwrap();
        let cfg = v2::parse(&v, "network-config").unwrap();
        let files = render_networkd(&cfg, &[]).unwrap();
        let text = &files["10-cloud-init-ens3.network"];
        assert!(
            text.ends_with(
                "[RoutingPolicyRule]\nFirewallMark=7\nFrom=10.0.0.5/32\nTable=200\nTypeOfService=16\n"
            ),
            "{text}"
        );
    }
}

#[cfg(test)]
mod limit_tests {
    use super::*;

    fn eni(n: usize) -> String {
        (0..n)
            .map(|i| format!("auto a{i}\niface a{i} inet dhcp\niface a{i} inet6 auto\n"))
            .collect()
    }

    /// A VM's worth of interfaces and more is read; a seed that lists more than
    /// MAX_INTERFACES is refused with the file named, in every format, instead of keeping
    /// the initrd busy with cross-references.
    #[test]
    fn every_format_refuses_more_interfaces_than_the_limit() {
        let ok = parse_eni(&eni(MAX_INTERFACES), "content/0000").unwrap();
        assert_eq!(ok.interfaces.len(), MAX_INTERFACES);
        // One stanza each: the stanza limit is not reached, the interface limit is.
        let inet_only: String = (0..=MAX_INTERFACES)
            .map(|i| format!("iface a{i} inet dhcp\n"))
            .collect();
        let err = parse_eni(&inet_only, "content/0000").unwrap_err();
        assert!(err.to_string().contains("interfaces"), "{err}");
        let err = parse_eni(&eni(MAX_INTERFACES + 1), "content/0000").unwrap_err();
        assert!(
            err.to_string().contains("content/0000") && err.to_string().contains("iface stanzas"),
            "{err}"
        );

        let v1: String = std::iter::once("version: 1\nconfig:\n".to_owned())
            .chain((0..=MAX_INTERFACES).map(|i| format!("  - {{type: physical, name: e{i}}}\n")))
            .collect();
        let err = parse(v1.as_bytes(), "network-config").unwrap_err();
        assert!(
            err.to_string().contains("network-config")
                && err.to_string().contains("config entries"),
            "{err}"
        );

        // Bond members the config names but does not define count too, and are looked up
        // in a set: 50 000 of them are refused at once, not after seconds of comparing.
        let members: Vec<String> = (0..50_000).map(|i| format!("m{i}")).collect();
        let bond = format!(
            "version: 1\nconfig:\n  - {{type: bond, name: bond0, bond_interfaces: [{}]}}\n",
            members.join(", ")
        );
        let t0 = std::time::Instant::now();
        let err = parse(bond.as_bytes(), "network-config").unwrap_err();
        assert!(
            err.to_string().contains("network-config")
                && err.to_string().contains("bond members and bridge ports"),
            "{err}"
        );
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(20),
            "{:?}",
            t0.elapsed()
        );

        let v2: String = std::iter::once("version: 2\nethernets:\n".to_owned())
            .chain((0..=MAX_INTERFACES).map(|i| format!("  e{i}: {{dhcp4: true}}\n")))
            .collect();
        let err = parse(v2.as_bytes(), "network-config").unwrap_err();
        assert!(err.to_string().contains("devices"), "{err}");

        let links: Vec<String> = (0..=MAX_INTERFACES)
            .map(|i| format!("{{\"id\": \"l{i}\", \"type\": \"phy\", \"ethernet_mac_address\": \"52:54:00:00:{:02x}:{:02x}\"}}", i / 256, i % 256))
            .collect();
        let json = format!("{{\"links\": [{}]}}", links.join(","));
        let err = parse_network_data(json.as_bytes(), "network_data.json").unwrap_err();
        assert!(
            err.to_string().contains("network_data.json") && err.to_string().contains("links"),
            "{err}"
        );
    }
}
