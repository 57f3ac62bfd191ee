//! OpenStack `network_data.json` (ConfigDrive2 `openstack/latest/network_data.json`, as
//! Nova writes it), converted to the network-config v1 shape the way cloud-init's
//! ConfigDrive datasource does (`convert_net_json`): `links` become interfaces,
//! `networks` their subnets, `services` of type `dns` global nameservers.
//!
//! Where nixseed is stricter or writes more than cloud-init, docs/network.md says so.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{
    Interface, InterfaceKind, NetworkConfig, NetworkError, Route, Subnet, SubnetKind,
    address_prefix, invalid,
};

/// Link types cloud-init treats as a NIC found by its MAC (its `KNOWN_PHYSICAL_TYPES`);
/// JSON `null` counts too.
const PHYSICAL_TYPES: &[&str] = &[
    "bgpovs",
    "bridge",
    "cascading",
    "dvs",
    "ethernet",
    "hw_veb",
    "hyperv",
    "ovs",
    "phy",
    "tap",
    "vhostuser",
    "vif",
];

const NETWORK_TYPES: &[&str] = &[
    "ipv4",
    "static",
    "ipv6",
    "static6",
    "ipv4_dhcp",
    "ipv6_dhcp",
    "ipv6_slaac",
    "ipv6_dhcpv6-stateless",
    "ipv6_dhcpv6-stateful",
];

pub(super) fn parse(bytes: &[u8], origin: &str) -> Result<NetworkConfig, NetworkError> {
    let doc: Value = serde_json::from_slice(bytes)
        .map_err(|e| invalid(origin, format!("not valid JSON: {e}")))?;
    if !doc.is_object() {
        return Err(invalid(
            origin,
            "expected an object with `links`, `networks` and `services`",
        ));
    }
    let links = array(&doc, "links", "", origin)?;
    let networks = array(&doc, "networks", "", origin)?;
    let services = array(&doc, "services", "", origin)?;
    super::check_count(origin, "links", links.len())?;
    super::check_count(origin, "networks", networks.len())?;

    // Every link's interface name first: bonds and VLANs may name links listed after them.
    let mut ids: BTreeMap<String, String> = BTreeMap::new();
    let mut bond_number = 0usize;
    for (i, link) in links.iter().enumerate() {
        let at = format!("links[{i}]");
        let link_id = required(link, "id", &at, origin)?;
        let name = text(link, "name", &at, origin)?;
        let iface_id = match link_type(link, &at, origin)?.as_deref() {
            Some("bond") => {
                // Nova gives a bond no name, and its `id` may be anything: cloud-init
                // numbers bonds in link order.
                let n = bond_number;
                bond_number += 1;
                name.unwrap_or_else(|| format!("bond{n}"))
            }
            Some("vlan") => continue,
            _ => name.unwrap_or_else(|| link_id.clone()),
        };
        name_ok(&iface_id, &at, origin)?;
        if ids.values().any(|v| *v == iface_id) {
            return Err(invalid(
                origin,
                format!("{at}: a second interface would be called `{iface_id}`"),
            ));
        }
        if ids.insert(link_id.clone(), iface_id).is_some() {
            return Err(invalid(
                origin,
                format!("{at}.id: `{link_id}` is used by another link"),
            ));
        }
    }
    for (i, link) in links.iter().enumerate() {
        let at = format!("links[{i}]");
        if link_type(link, &at, origin)?.as_deref() == Some("vlan") {
            let link_id = required(link, "id", &at, origin)?;
            let parent = required(link, "vlan_link", &at, origin)?;
            let vlan_id = integer(link, "vlan_id", &at, origin)?;
            let base = ids.get(&parent).cloned().unwrap_or_else(|| parent.clone());
            if ids
                .insert(link_id.clone(), format!("{base}.{vlan_id}"))
                .is_some()
            {
                return Err(invalid(
                    origin,
                    format!("{at}.id: `{link_id}` is used by another link"),
                ));
            }
        }
    }
    let id_of = |target: &str, at: &str| {
        ids.get(target).cloned().ok_or_else(|| {
            invalid(
                origin,
                format!("{at}: no link in `links` has the id `{target}`"),
            )
        })
    };

    // Each network belongs to the link it names. One naming no link configures nothing:
    // cloud-init passes it over, and so does nixseed, with a warning.
    let mut by_link: BTreeMap<String, Vec<(String, &Value)>> = BTreeMap::new();
    for (j, network) in networks.iter().enumerate() {
        let at = format!("networks[{j}]");
        let link = required(network, "link", &at, origin)?;
        if let Err(e) = id_of(&link, &format!("{at}.link")) {
            tracing::warn!("{e}; the network is not configured");
            continue;
        }
        let ty = required(network, "type", &at, origin)?;
        if !NETWORK_TYPES.contains(&ty.as_str()) {
            tracing::warn!(
                origin,
                "{at}.type: `{ty}` is not a network type nixseed knows (one of {}); the network is not configured, as cloud-init leaves it",
                NETWORK_TYPES.join(", ")
            );
            continue;
        }
        by_link.entry(link).or_default().push((at, network));
    }

    let mut cfg = NetworkConfig {
        version: 1,
        ..Default::default()
    };
    for (i, link) in links.iter().enumerate() {
        let at = format!("links[{i}]");
        let link_id = required(link, "id", &at, origin)?;
        let ty = link_type(link, &at, origin)?;
        let mac = text(link, "ethernet_mac_address", &at, origin)?
            .filter(|m| !m.is_empty())
            .map(|m| m.to_ascii_lowercase());
        if let Some(m) = &mac {
            plain(m, &format!("{at}.ethernet_mac_address"), origin)?;
        }
        let mtu = text(link, "mtu", &at, origin)?;
        if let Some(m) = &mtu
            && m.parse::<u32>().is_err()
        {
            return Err(invalid(
                origin,
                format!("{at}.mtu: `{m}` is not an integer"),
            ));
        }
        let mut iface = Interface {
            id: id_of(&link_id, &format!("{at}.id"))?,
            mtu,
            ..Default::default()
        };
        for (nat, network) in by_link.get(&link_id).into_iter().flatten() {
            let (subnet, accept_ra) = subnet(network, nat, origin)?;
            if accept_ra.is_some() {
                iface.accept_ra = accept_ra;
            }
            iface.subnets.push(subnet);
        }
        match ty.as_deref() {
            Some("bond") => {
                iface.mac = mac;
                let members = match link.get("bond_links") {
                    Some(Value::Array(items)) => items,
                    _ => {
                        return Err(invalid(
                            origin,
                            format!("{at}.bond_links: expected a list of link ids"),
                        ));
                    }
                };
                let members = members
                    .iter()
                    .enumerate()
                    .map(|(k, m)| {
                        let mat = format!("{at}.bond_links[{k}]");
                        let target = scalar(m)
                            .ok_or_else(|| invalid(origin, format!("{mat}: expected a link id")))?;
                        id_of(&target, &mat)
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                iface.kind = InterfaceKind::Bond {
                    members,
                    params: bond_params(link, &at, origin)?,
                };
            }
            Some("vlan") => {
                let parent = required(link, "vlan_link", &at, origin)?;
                let vlan_mac = required(link, "vlan_mac_address", &at, origin)?;
                plain(&vlan_mac, &format!("{at}.vlan_mac_address"), origin)?;
                iface.mac = Some(vlan_mac.to_ascii_lowercase());
                iface.kind = InterfaceKind::Vlan {
                    id: integer(link, "vlan_id", &at, origin)?,
                    link: id_of(&parent, &format!("{at}.vlan_link"))?,
                };
                iface.name_after_link = true;
            }
            _ => {
                if mac.is_none() && text(link, "name", &at, origin)?.is_none() {
                    return Err(invalid(
                        origin,
                        format!(
                            "{at}: a link needs `ethernet_mac_address` or `name` to find its NIC"
                        ),
                    ));
                }
                iface.rename_by_mac = mac.is_some();
                iface.mac = mac;
            }
        }
        cfg.interfaces.push(iface);
    }

    // cloud-init turns every service into a nameserver entry; only `dns` ones are.
    for (k, service) in services.iter().enumerate() {
        let at = format!("services[{k}]");
        if text(service, "type", &at, origin)?.as_deref() != Some("dns") {
            continue;
        }
        if let Some(address) = text(service, "address", &at, origin)? {
            cfg.nameservers
                .push(ip(&address, &format!("{at}.address"), origin)?);
        }
    }
    Ok(cfg)
}

/// One network as a subnet of its link, and what it says about IPv6 router
/// advertisements (`ipv6` static turns them off, DHCPv6 on).
fn subnet(network: &Value, at: &str, origin: &str) -> Result<(Subnet, Option<bool>), NetworkError> {
    let ty = required(network, "type", at, origin)?;
    if !NETWORK_TYPES.contains(&ty.as_str()) {
        return Err(invalid(
            origin,
            format!(
                "{at}.type: `{ty}` is not a network_data.json network type (expected one of {})",
                NETWORK_TYPES.join(", ")
            ),
        ));
    }
    let (kind, accept_ra) = match ty.as_str() {
        "ipv4_dhcp" => (SubnetKind::Dhcp4, None),
        "ipv6_dhcp" => (SubnetKind::Dhcp6, Some(true)),
        "ipv4" | "static" => (SubnetKind::Static, None),
        "ipv6" | "static6" => (SubnetKind::Static, Some(false)),
        "ipv6_dhcpv6-stateful" => (SubnetKind::Other(ty.clone()), Some(true)),
        _ => (SubnetKind::Other(ty.clone()), None),
    };
    let address = if kind == SubnetKind::Static {
        let addr = required(network, "ip_address", at, origin)?;
        let netmask = text(network, "netmask", at, origin)?;
        Some(
            address_prefix(&addr, None, netmask.as_deref())
                .map_err(|e| invalid(origin, format!("{at}.ip_address: {e}")))?,
        )
    } else {
        None
    };
    let gateway = match text(network, "gateway", at, origin)?.filter(|g| !g.is_empty()) {
        Some(g) => Some(ip(&g, &format!("{at}.gateway"), origin)?),
        None => None,
    };
    let mut routes = Vec::new();
    for (k, r) in array(network, "routes", at, origin)?.iter().enumerate() {
        routes.push(route(r, &format!("{at}.routes[{k}]"), origin)?);
    }
    // DNS services of the network's routes, then of the network, replace its
    // `dns_nameservers` when there are any (cloud-init 26.2; 22.4.2 ignores them).
    let mut services = Vec::new();
    for (k, r) in array(network, "routes", at, origin)?.iter().enumerate() {
        dns_services(r, &format!("{at}.routes[{k}]"), origin, &mut services)?;
    }
    dns_services(network, at, origin, &mut services)?;
    let dns_nameservers = if services.is_empty() {
        addresses(network, "dns_nameservers", at, origin)?
    } else {
        services
    };
    let subnet = Subnet {
        kind,
        address,
        gateway,
        dns_nameservers,
        dns_search: words(network, "dns_search", at, origin)?,
        routes,
    };
    Ok((subnet, accept_ra))
}

/// A route: `network` (or `destination`) with `netmask`, `gateway`, `metric`.
fn route(r: &Value, at: &str, origin: &str) -> Result<Route, NetworkError> {
    let dest = match text(r, "destination", at, origin)? {
        Some(d) => d,
        None => required(r, "network", at, origin)?,
    };
    let netmask = text(r, "netmask", at, origin)?;
    let (network, prefix) = address_prefix(&dest, None, netmask.as_deref())
        .map_err(|e| invalid(origin, format!("{at}.network: {e}")))?;
    let gateway = match text(r, "gateway", at, origin)?.filter(|g| !g.is_empty()) {
        Some(g) => Some(ip(&g, &format!("{at}.gateway"), origin)?),
        None => None,
    };
    let metric = super::check_metric(text(r, "metric", at, origin)?, at, origin)?;
    Ok(Route {
        network,
        prefix,
        gateway,
        metric,
        table: None,
        on_link: false,
    })
}

/// Appends the addresses of `v.services` entries of type `dns`, without repeats.
fn dns_services(
    v: &Value,
    at: &str,
    origin: &str,
    out: &mut Vec<String>,
) -> Result<(), NetworkError> {
    for (k, service) in array(v, "services", at, origin)?.iter().enumerate() {
        let sat = format!("{at}.services[{k}]");
        if text(service, "type", &sat, origin)?.as_deref() != Some("dns") {
            continue;
        }
        if let Some(a) = text(service, "address", &sat, origin)? {
            let a = ip(&a, &format!("{sat}.address"), origin)?;
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    Ok(())
}

/// `bond_*` keys other than `bond_links`, under the v1 names the renderer knows:
/// `bond_xmit_hash_policy` is `bond-xmit-hash-policy`. (cloud-init replaces only the
/// first underscore, so it loses every two-word parameter; see docs/network.md.)
fn bond_params(
    link: &Value,
    at: &str,
    origin: &str,
) -> Result<Vec<(String, String)>, NetworkError> {
    let mut params = Vec::new();
    let Some(fields) = link.as_object() else {
        return Ok(params);
    };
    for (key, value) in fields {
        if key == "bond_links" || !key.starts_with("bond") {
            continue;
        }
        let Some(value) = scalar(value) else {
            continue;
        };
        plain(&value, &format!("{at}.{key}"), origin)?;
        let rest = key.split_once("bond_").map_or(key.as_str(), |(_, r)| r);
        params.push((format!("bond-{}", rest.replace('_', "-")), value));
    }
    Ok(params)
}

/// The link's `type`; `null` is a physical NIC, and so is a type cloud-init does not
/// list (with a warning).
fn link_type(link: &Value, at: &str, origin: &str) -> Result<Option<String>, NetworkError> {
    if !link.is_object() {
        return Err(invalid(origin, format!("{at}: expected an object")));
    }
    let Some(v) = link.get("type") else {
        return Err(invalid(origin, format!("{at}.type is missing")));
    };
    if v.is_null() {
        return Ok(None);
    }
    let ty = scalar(v).ok_or_else(|| invalid(origin, format!("{at}.type: expected a string")))?;
    if ty != "bond" && ty != "vlan" && !PHYSICAL_TYPES.contains(&ty.as_str()) {
        // A type Nova adds later is still a NIC: cloud-init treats it as one, with a warning.
        tracing::warn!(
            origin,
            "{at}.type: `{ty}` is not a link type nixseed knows; treated as a physical NIC, as cloud-init treats it"
        );
    }
    Ok(Some(ty))
}

/// `key` as an array; absent or `null` is empty.
fn array<'a>(v: &'a Value, key: &str, at: &str, origin: &str) -> Result<&'a [Value], NetworkError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) => Ok(items),
        Some(_) => Err(invalid(
            origin,
            format!("{}: expected a list", dotted(at, key)),
        )),
    }
}

fn dotted(at: &str, key: &str) -> String {
    if at.is_empty() {
        key.to_string()
    } else {
        format!("{at}.{key}")
    }
}

/// A string, number or boolean as Python prints it; anything else is `None`.
fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(true) => Some("True".into()),
        Value::Bool(false) => Some("False".into()),
        _ => None,
    }
}

/// A scalar field as text; absent or `null` is `None`, a list or object an error.
fn text(v: &Value, key: &str, at: &str, origin: &str) -> Result<Option<String>, NetworkError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(x) => scalar(x).map(Some).ok_or_else(|| {
            invalid(
                origin,
                format!("{}: expected a single value", dotted(at, key)),
            )
        }),
    }
}

fn required(v: &Value, key: &str, at: &str, origin: &str) -> Result<String, NetworkError> {
    text(v, key, at, origin)?
        .ok_or_else(|| invalid(origin, format!("{} is missing", dotted(at, key))))
}

fn integer(v: &Value, key: &str, at: &str, origin: &str) -> Result<String, NetworkError> {
    let n = required(v, key, at, origin)?;
    if n.parse::<u32>().is_err() {
        return Err(invalid(
            origin,
            format!("{}: `{n}` is not an integer", dotted(at, key)),
        ));
    }
    Ok(n)
}

/// An IP address, as written.
fn ip(s: &str, at: &str, origin: &str) -> Result<String, NetworkError> {
    s.parse::<std::net::IpAddr>()
        .map(|_| s.to_string())
        .map_err(|_| invalid(origin, format!("{at}: `{s}` is not an IP address")))
}

/// A list of addresses, or one string of them separated by spaces.
fn addresses(v: &Value, key: &str, at: &str, origin: &str) -> Result<Vec<String>, NetworkError> {
    words(v, key, at, origin)?
        .iter()
        .map(|a| ip(a, &dotted(at, key), origin))
        .collect()
}

/// A list of scalars, or one string split on whitespace.
fn words(v: &Value, key: &str, at: &str, origin: &str) -> Result<Vec<String>, NetworkError> {
    match v.get(key) {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(s.split_whitespace().map(str::to_string).collect()),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, x)| {
                let item = format!("{}[{i}]", dotted(at, key));
                let s = scalar(x)
                    .ok_or_else(|| invalid(origin, format!("{item}: expected a single value")))?;
                plain(&s, &item, origin)?;
                Ok(s)
            })
            .collect(),
        Some(_) => Err(invalid(
            origin,
            format!("{}: expected a list", dotted(at, key)),
        )),
    }
}

/// A value that goes into a unit file line: no whitespace or control characters,
/// which would end the line or the key.
fn plain(s: &str, at: &str, origin: &str) -> Result<(), NetworkError> {
    if s.is_empty() || s.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(invalid(
            origin,
            format!("{at}: `{}` is not a single word", s.escape_debug()),
        ));
    }
    Ok(())
}

/// An interface name that can name a unit file: a word without `/`, not starting with `.`.
fn name_ok(s: &str, at: &str, origin: &str) -> Result<(), NetworkError> {
    plain(s, at, origin)?;
    if s.contains('/') || s.starts_with('.') {
        return Err(invalid(
            origin,
            format!("{at}: `{s}` cannot name an interface"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::super::{Link, render_networkd};
    use super::*;

    const ORIGIN: &str = "configdrive:/dev/sr0/latest/network_data.json";

    fn error(json: &str) -> String {
        parse(json.as_bytes(), ORIGIN).unwrap_err().to_string()
    }

    /// What cloud-init passes over is passed over here too, with a warning: a link type
    /// it does not list is a NIC, and a network naming no link or of an unknown type
    /// configures nothing.
    #[test]
    fn an_unknown_link_type_is_a_nic_and_a_network_without_its_link_is_passed_over() {
        let json = r#"{"links": [{"id": "t", "type": "vhostuser-next", "ethernet_mac_address": "FA:16:3E:00:00:01"}],
            "networks": [{"link": "t", "type": "ipv4_dhcp"}, {"link": "gone", "type": "ipv4_dhcp"},
                {"link": "t", "type": "ipv5"}]}"#;
        let cfg = parse(json.as_bytes(), ORIGIN).unwrap();
        assert_eq!(cfg.interfaces.len(), 1);
        let nic = &cfg.interfaces[0];
        assert_eq!(nic.kind, InterfaceKind::Physical);
        assert_eq!(nic.mac.as_deref(), Some("fa:16:3e:00:00:01"));
        assert_eq!(nic.subnets.len(), 1);
    }

    #[test]
    fn hostile_inputs_name_the_file_and_the_key() {
        let nic = r#"{"id": "tap0", "type": "ovs", "ethernet_mac_address": "fa:16:3e:00:00:01"}"#;
        let cases = [
            ("{\"links\": [", "not valid JSON".to_string()),
            ("[1, 2]", "expected an object".into()),
            ("{\"links\": {}}", "links: expected a list".into()),
            (
                r#"{"links": [{"id": "b", "type": "bond", "bond_links": ["nope"]}]}"#,
                "links[0].bond_links[0]: no link in `links` has the id `nope`".into(),
            ),
            (
                r#"{"links": [{"id": "v", "type": "vlan", "vlan_link": "x", "vlan_id": 5, "vlan_mac_address": "fa:16:3e:00:00:01"}]}"#,
                "links[0].vlan_link: no link in `links` has the id `x`".into(),
            ),
            (
                r#"{"links": [{"id": "t", "type": "phy"}]}"#,
                "links[0]: a link needs `ethernet_mac_address` or `name`".into(),
            ),
            (
                r#"{"links": [{"id": "t", "name": "../etc", "type": "phy"}]}"#,
                "cannot name an interface".into(),
            ),
            (
                r#"{"links": [{"id": "t", "name": "eth0\nDNS=1.2.3.4", "type": "phy"}]}"#,
                "is not a single word".into(),
            ),
            (
                &format!(
                    r#"{{"links": [{nic}], "networks": [{{"link": "tap0", "type": "ipv4", "ip_address": "10.0.0.300"}}]}}"#
                ),
                "networks[0].ip_address".into(),
            ),
            (
                &format!(
                    r#"{{"links": [{nic}], "networks": [{{"link": "tap0", "type": "ipv4"}}]}}"#
                ),
                "networks[0].ip_address is missing".into(),
            ),
            (
                &format!(
                    r#"{{"links": [{nic}], "networks": [{{"link": "tap0", "type": "ipv4", "ip_address": "10.0.0.5", "routes": [{{"network": "0.0.0.0", "netmask": "0.0.0.0", "gateway": "gw"}}]}}]}}"#
                ),
                "networks[0].routes[0].gateway: `gw` is not an IP address".into(),
            ),
            (
                r#"{"services": [{"type": "dns", "address": "ns1.example"}]}"#,
                "services[0].address".into(),
            ),
        ];
        for (json, want) in &cases {
            let e = error(json);
            assert!(e.starts_with(&format!("{ORIGIN}: ")), "{e}");
            assert!(e.contains(want.as_str()), "{want} not in {e}");
        }
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let json = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(error(&json).contains("not valid JSON"));
    }

    #[test]
    fn unknown_fields_and_other_services_are_ignored() {
        let cfg = parse(
            br#"{"links": [{"id": "tap0", "type": null, "ethernet_mac_address": "FA:16:3E:00:00:01", "vif_id": "x", "extra": {"a": [1]}}],
                 "networks": [{"id": "n", "link": "tap0", "type": "ipv4_dhcp", "network_id": "y", "whatever": null}],
                 "services": [{"type": "ntp", "address": "pool.example"}, {"type": "dns", "address": "10.0.0.2"}],
                 "future": true}"#,
            ORIGIN,
        )
        .unwrap();
        assert_eq!(cfg.nameservers, vec!["10.0.0.2"]);
        assert_eq!(cfg.interfaces[0].mac.as_deref(), Some("fa:16:3e:00:00:01"));
        assert_eq!(cfg.interfaces[0].subnets[0].kind, SubnetKind::Dhcp4);
    }

    /// A VLAN is called after its link's name in the guest, known only with the NICs;
    /// without a NIC carrying the MAC, the link's own id stands in (cloud-init refuses).
    #[test]
    fn vlan_takes_its_name_from_the_nic_found_by_mac() {
        let cfg = parse(
            br#"{"links": [{"id": "tap0", "type": "phy", "ethernet_mac_address": "fa:16:3e:00:00:01"},
                           {"id": "v", "type": "vlan", "vlan_link": "tap0", "vlan_id": 7, "vlan_mac_address": "fa:16:3e:00:00:01"}],
                 "networks": [{"link": "v", "type": "ipv4", "ip_address": "192.0.2.5/24"}]}"#,
            ORIGIN,
        )
        .unwrap();
        let links = [Link {
            name: "ens3".into(),
            mac: "fa:16:3e:00:00:01".into(),
        }];
        let files = render_networkd(&cfg, &links).unwrap();
        assert!(files["10-cloud-init-ens3.network"].contains("VLAN=ens3.7"));
        assert!(files["10-cloud-init-ens3.7.netdev"].contains("Name=ens3.7"));
        let files = render_networkd(&cfg, &[]).unwrap();
        assert!(
            files.contains_key("10-cloud-init-tap0.7.network"),
            "{files:?}"
        );
    }

    #[test]
    fn bond_parameters_keep_every_word() {
        let cfg = parse(
            br#"{"links": [{"id": "a", "type": "phy", "ethernet_mac_address": "fa:16:3e:00:00:01"},
                           {"id": "b", "type": "phy", "ethernet_mac_address": "fa:16:3e:00:00:02"},
                           {"id": "x", "type": "bond", "bond_links": ["a", "b"], "bond_mode": "802.3ad",
                            "bond_xmit_hash_policy": "layer3+4", "bond_lacp_rate": "fast"}]}"#,
            ORIGIN,
        )
        .unwrap();
        let files = render_networkd(&cfg, &[]).unwrap();
        let netdev = &files["10-cloud-init-bond0.netdev"];
        for key in [
            "Mode=802.3ad",
            "TransmitHashPolicy=layer3+4",
            "LACPTransmitRate=fast",
        ] {
            assert!(netdev.contains(key), "{key} not in {netdev}");
        }
        assert!(files["10-cloud-init-a.network"].contains("Bond=bond0"));
    }
}
