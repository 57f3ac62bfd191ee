//! Debian ENI text, as Proxmox VE writes it into a ConfigDrive2 seed
//! (`openstack/content/0000`).
//!
//! Two places where nixseed reads more than cloud-init does, both documented in
//! docs/network.md: an interface may have an `inet` and an `inet6` stanza (cloud-init
//! rejects the second one, so a dual-stack Proxmox VM gets no network from it), and
//! `dns_nameservers`/`dns_search` (Proxmox's spelling, inside the `lo` stanza) are
//! global nameservers.

use std::collections::{HashMap, HashSet};

use super::{
    Interface, InterfaceKind, MAX_INTERFACES, NetworkConfig, NetworkError, Subnet, SubnetKind,
    address_prefix, invalid,
};

struct Stanza {
    iface: String,
    family: String,
    method: String,
    line: usize,
    options: Vec<(String, String)>,
}

pub(super) fn parse(text: &str, origin: &str) -> Result<NetworkConfig, NetworkError> {
    let mut stanzas: Vec<Stanza> = Vec::new();
    let mut defined: HashSet<(String, String)> = HashSet::new();
    let mut cfg = NetworkConfig {
        version: 1,
        ..Default::default()
    };
    for (n, raw) in text.lines().enumerate() {
        let line_no = n + 1;
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut words = line.split_whitespace();
        let Some(option) = words.next() else { continue };
        let rest: Vec<&str> = words.collect();
        match option {
            "auto" | "allow-hotplug" | "source" | "source-directory" => {}
            "iface" => {
                let [iface, family, method, ..] = rest.as_slice() else {
                    return Err(invalid(
                        origin,
                        format!("line {line_no}: `iface` needs a name, a family and a method"),
                    ));
                };
                if !defined.insert((iface.to_string(), family.to_string())) {
                    return Err(invalid(
                        origin,
                        format!("line {line_no}: interface {iface} {family} is defined twice"),
                    ));
                }
                // An interface has at most an inet and an inet6 stanza.
                if defined.len() > 2 * MAX_INTERFACES {
                    return Err(invalid(
                        origin,
                        format!(
                            "line {line_no}: more than {} iface stanzas, the most nixseed reads",
                            2 * MAX_INTERFACES
                        ),
                    ));
                }
                stanzas.push(Stanza {
                    iface: iface.to_string(),
                    family: family.to_string(),
                    method: method.to_string(),
                    line: line_no,
                    options: Vec::new(),
                });
            }
            "dns_nameservers" | "dns-nameservers" => {
                cfg.nameservers.extend(rest.iter().map(|s| s.to_string()))
            }
            "dns_search" | "dns-search" => cfg.search.extend(rest.iter().map(|s| s.to_string())),
            _ => {
                let Some(cur) = stanzas.last_mut() else {
                    return Err(invalid(
                        origin,
                        format!("line {line_no}: `{option}` outside an iface stanza"),
                    ));
                };
                let value = match (option, rest.as_slice()) {
                    ("hwaddress", ["ether", mac, ..]) => mac.to_string(),
                    _ => rest.join(" "),
                };
                cur.options.push((option.to_string(), value));
            }
        }
    }

    let mut index: HashMap<String, usize> = HashMap::new();
    for st in &stanzas {
        let opt = |k: &str| {
            st.options
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.clone())
        };
        let at = format!("line {} (iface {} {})", st.line, st.iface, st.family);
        // An alias stanza (`eth0:1`) adds its address to its device, as cloud-init reads
        // it: `eth0:1` is no interface of its own.
        let dev = st
            .iface
            .split_once(':')
            .map_or(st.iface.as_str(), |(d, _)| d);
        let idx = match index.get(dev) {
            Some(&i) => i,
            None if index.len() >= MAX_INTERFACES => {
                return Err(invalid(
                    origin,
                    format!(
                        "line {}: more than {MAX_INTERFACES} interfaces, the most nixseed reads",
                        st.line
                    ),
                ));
            }
            None => {
                index.insert(dev.to_string(), cfg.interfaces.len());
                cfg.interfaces.push(Interface {
                    id: dev.to_string(),
                    kind: if dev == "lo" {
                        InterfaceKind::Loopback
                    } else {
                        InterfaceKind::Physical
                    },
                    ..Default::default()
                });
                cfg.interfaces.len() - 1
            }
        };
        let iface = &mut cfg.interfaces[idx];
        if let Some(mac) = opt("hwaddress") {
            iface.mac = Some(mac.to_ascii_lowercase());
            iface.rename_by_mac = true;
        }
        if let Some(mtu) = opt("mtu") {
            iface.mtu = Some(mtu);
        }
        let kind = match (st.family.as_str(), st.method.as_str()) {
            (_, "static") => SubnetKind::Static,
            ("inet", "dhcp") => SubnetKind::Dhcp4,
            ("inet6", "dhcp") => SubnetKind::Dhcp6,
            ("inet6", "auto") => SubnetKind::Other("ipv6_slaac".into()),
            (_, other) => SubnetKind::Other(other.into()),
        };
        let address = if kind == SubnetKind::Static {
            let addr = opt("address")
                .ok_or_else(|| invalid(origin, format!("{at}: static needs `address`")))?;
            Some(
                address_prefix(&addr, None, opt("netmask").as_deref())
                    .map_err(|e| invalid(origin, format!("{at}: {e}")))?,
            )
        } else {
            None
        };
        iface.subnets.push(Subnet {
            kind,
            address,
            gateway: opt("gateway"),
            dns_nameservers: Vec::new(),
            dns_search: Vec::new(),
            routes: Vec::new(),
        });
    }
    Ok(cfg)
}
