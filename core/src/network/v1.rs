//! network-config version 1 (`config:` list of typed entries), as NoCloud seeds and
//! Proxmox VE write it.

use crate::yaml::Value;

use super::{
    Dns, Interface, InterfaceKind, NetworkConfig, NetworkError, Route, Subnet, SubnetKind,
    address_prefix, invalid,
};
use crate::yaml::get;

pub(super) fn parse(top: &Value, origin: &str) -> Result<NetworkConfig, NetworkError> {
    let mut cfg = NetworkConfig {
        version: 1,
        ..Default::default()
    };
    let entries = match get(top, "config") {
        Some(Value::Sequence(s)) => s.as_slice(),
        None => &[],
        Some(_) => return Err(invalid(origin, "config: expected a list of entries")),
    };
    super::check_count(origin, "config entries", entries.len())?;
    let mut iface_dns: Vec<(String, Dns, String)> = Vec::new();
    for (i, entry) in entries.iter().enumerate() {
        let at = format!("config[{i}]");
        let ty = text(entry, "type", &at, origin)?
            .ok_or_else(|| invalid(origin, format!("{at}.type is missing")))?;
        match ty.as_str() {
            "physical" | "infiniband" | "loopback" => {
                let mut iface = common(entry, &at, origin)?;
                if ty == "loopback" {
                    iface.kind = InterfaceKind::Loopback;
                } else {
                    iface.rename_by_mac = iface.mac.is_some();
                }
                upsert(&mut cfg.interfaces, iface);
            }
            "vlan" => {
                let mut iface = common(entry, &at, origin)?;
                let id = text(entry, "vlan_id", &at, origin)?
                    .ok_or_else(|| invalid(origin, format!("{at}.vlan_id is missing")))?;
                let link = text(entry, "vlan_link", &at, origin)?
                    .ok_or_else(|| invalid(origin, format!("{at}.vlan_link is missing")))?;
                iface.kind = InterfaceKind::Vlan { id, link };
                upsert(&mut cfg.interfaces, iface);
            }
            "bond" => {
                let mut iface = common(entry, &at, origin)?;
                let members = list(entry, "bond_interfaces", &at, origin)?;
                let mut params = Vec::new();
                if let Some(Value::Mapping(m)) = get(entry, "params") {
                    for (k, v) in m {
                        if let (Some(k), Some(v)) = (k.as_str(), crate::yaml::python_text(v)) {
                            params.push((k.to_string(), v));
                        }
                    }
                }
                iface.kind = InterfaceKind::Bond { members, params };
                upsert(&mut cfg.interfaces, iface);
            }
            "bridge" => {
                let mut iface = common(entry, &at, origin)?;
                let ports = list(entry, "bridge_interfaces", &at, origin)?;
                let mut params = Vec::new();
                if let Some(Value::Mapping(m)) = get(entry, "params") {
                    for (k, v) in m {
                        if let Some(k) = k.as_str() {
                            params.push((k.to_string(), bridge_value(k, v, &at, origin)?));
                        }
                    }
                }
                iface.kind = InterfaceKind::Bridge { ports, params };
                upsert(&mut cfg.interfaces, iface);
            }
            "nameserver" => {
                let dns = Dns {
                    nameservers: list(entry, "address", &at, origin)?,
                    search: list(entry, "search", &at, origin)?,
                };
                // cloud-init skips a nameserver entry without `address` (with a
                // warning), search domains included; so does nixseed.
                if dns.nameservers.is_empty() {
                    tracing::warn!(
                        origin,
                        entry = %at,
                        "nameserver entry without `address` is ignored, as cloud-init does"
                    );
                    continue;
                }
                match text(entry, "interface", &at, origin)? {
                    Some(name) => iface_dns.push((name, dns, at)),
                    None => {
                        cfg.nameservers.extend(dns.nameservers);
                        cfg.search.extend(dns.search);
                    }
                }
            }
            "route" => cfg.routes.push(route(entry, &at, origin)?),
            other => {
                return Err(invalid(
                    origin,
                    format!("{at}.type: `{other}` is not a network-config v1 type"),
                ));
            }
        }
    }
    for (name, dns, at) in iface_dns {
        let iface = cfg
            .interfaces
            .iter_mut()
            .find(|i| i.id == name)
            .ok_or_else(|| {
                invalid(
                    origin,
                    format!("{at}.interface: no interface named `{name}` in this config"),
                )
            })?;
        iface.dns = Some(dns);
    }
    add_placeholders(&mut cfg.interfaces, origin)?;
    Ok(cfg)
}

/// Bond members and bridge ports that the config names but does not define still get
/// a (DHCP=no) file, as in cloud-init. They count towards the interfaces read, so a
/// member list cannot get past [`super::MAX_INTERFACES`].
pub(super) fn add_placeholders(
    ifaces: &mut Vec<Interface>,
    origin: &str,
) -> Result<(), NetworkError> {
    let mut known: std::collections::HashSet<String> =
        ifaces.iter().map(|i| i.id.clone()).collect();
    let mut missing = Vec::new();
    for iface in ifaces.iter() {
        let refs = match &iface.kind {
            InterfaceKind::Bond { members, .. } => members,
            InterfaceKind::Bridge { ports, .. } => ports,
            _ => continue,
        };
        for r in refs {
            if known.insert(r.clone()) {
                missing.push(r.clone());
                super::check_count(
                    origin,
                    "interfaces with the bond members and bridge ports named",
                    known.len(),
                )?;
            }
        }
    }
    for id in missing {
        ifaces.push(Interface {
            id,
            ..Default::default()
        });
    }
    Ok(())
}

fn upsert(ifaces: &mut Vec<Interface>, iface: Interface) {
    match ifaces.iter_mut().find(|i| i.id == iface.id) {
        Some(slot) => *slot = iface,
        None => ifaces.push(iface),
    }
}

fn common(entry: &Value, at: &str, origin: &str) -> Result<Interface, NetworkError> {
    let id = text(entry, "name", at, origin)?
        .ok_or_else(|| invalid(origin, format!("{at}.name is missing")))?;
    let mut subnets = Vec::new();
    if let Some(v) = get(entry, "subnets") {
        let Value::Sequence(items) = v else {
            return Err(invalid(origin, format!("{at}.subnets: expected a list")));
        };
        for (j, s) in items.iter().enumerate() {
            subnets.push(subnet(s, &format!("{at}.subnets[{j}]"), origin)?);
        }
    }
    Ok(Interface {
        id,
        mac: text(entry, "mac_address", at, origin)?.map(|m| m.to_ascii_lowercase()),
        mtu: text(entry, "mtu", at, origin)?,
        optional: get(entry, "optional").is_some_and(crate::yaml::truthy),
        accept_ra: get(entry, "accept-ra").and_then(crate::yaml::bool11),
        subnets,
        ..Default::default()
    })
}

fn subnet(s: &Value, at: &str, origin: &str) -> Result<Subnet, NetworkError> {
    let ty = text(s, "type", at, origin)?
        .ok_or_else(|| invalid(origin, format!("{at}.type is missing")))?;
    let kind = match ty.as_str() {
        "static" | "static6" => SubnetKind::Static,
        "dhcp" | "dhcp4" => SubnetKind::Dhcp4,
        "dhcp6" => SubnetKind::Dhcp6,
        other => SubnetKind::Other(other.to_string()),
    };
    let mut address = None;
    if kind == SubnetKind::Static {
        let addr = text(s, "address", at, origin)?
            .or(text(s, "ip_address", at, origin)?)
            .ok_or_else(|| invalid(origin, format!("{at}.address is missing")))?;
        let prefix = text(s, "prefix", at, origin)?;
        let netmask = text(s, "netmask", at, origin)?;
        address = Some(
            address_prefix(&addr, prefix.as_deref(), netmask.as_deref())
                .map_err(|e| invalid(origin, format!("{at}.address: {e}")))?,
        );
    }
    let mut routes = Vec::new();
    if let Some(Value::Sequence(items)) = get(s, "routes") {
        for (k, r) in items.iter().enumerate() {
            routes.push(route(r, &format!("{at}.routes[{k}]"), origin)?);
        }
    }
    Ok(Subnet {
        kind,
        address,
        gateway: text(s, "gateway", at, origin)?.filter(|g| !g.is_empty()),
        dns_nameservers: words(s, "dns_nameservers", at, origin)?,
        dns_search: words(s, "dns_search", at, origin)?,
        routes,
    })
}

/// A v1 route: `destination` or `network` with an optional `/prefix`, `prefix` or
/// `netmask`; `gateway`; `metric`.
pub(super) fn route(r: &Value, at: &str, origin: &str) -> Result<Route, NetworkError> {
    let dest = text(r, "destination", at, origin)?
        .or(text(r, "network", at, origin)?)
        .ok_or_else(|| invalid(origin, format!("{at}.destination is missing")))?;
    let gateway = text(r, "gateway", at, origin)?.filter(|g| !g.is_empty());
    let dest = default_by_gateway(dest, gateway.as_deref(), &format!("{at}.gateway"), origin)?;
    let prefix = text(r, "prefix", at, origin)?;
    let netmask = text(r, "netmask", at, origin)?;
    let (network, prefix) = address_prefix(&dest, prefix.as_deref(), netmask.as_deref())
        .map_err(|e| invalid(origin, format!("{at}.destination: {e}")))?;
    let metric = metric(r, at, origin)?;
    Ok(Route {
        network,
        prefix,
        gateway,
        metric,
        table: text(r, "table", at, origin)?,
        on_link: false,
    })
}

/// A route's destination `default` as cloud-init normalises it for v1 and v2 alike:
/// `0.0.0.0/0` or `::/0` by the family of the gateway (`gw_at` names where that is).
pub(super) fn default_by_gateway(
    dest: String,
    gateway: Option<&str>,
    gw_at: &str,
    origin: &str,
) -> Result<String, NetworkError> {
    if dest != "default" {
        return Ok(dest);
    }
    match gateway.map(str::parse::<std::net::IpAddr>) {
        Some(Ok(std::net::IpAddr::V4(_))) => Ok("0.0.0.0/0".to_string()),
        Some(Ok(std::net::IpAddr::V6(_))) => Ok("::/0".to_string()),
        _ => Err(invalid(
            origin,
            format!("{gw_at}: a `default` destination needs a gateway address here"),
        )),
    }
}

/// A bridge parameter as cloud-init keeps it: `bridge_stp` becomes a boolean, other
/// values stay as written; falsy values are `None` (cloud-init skips them).
pub(super) fn bridge_value(
    key: &str,
    v: &Value,
    at: &str,
    origin: &str,
) -> Result<Option<String>, NetworkError> {
    if key == "bridge_stp" {
        let on = match v {
            Value::Number(n) if n.as_u64() == Some(1) => true,
            Value::Number(n) if n.as_u64() == Some(0) => false,
            Value::String(s) if s == "1" => true,
            Value::String(s) if s == "0" => false,
            other => crate::yaml::bool11(other)
                .ok_or_else(|| invalid(origin, format!("{at}.{key}: expected on/off")))?,
        };
        return Ok(on.then(|| "yes".to_string()));
    }
    if !crate::yaml::truthy(v) {
        return Ok(None);
    }
    Ok(crate::yaml::python_text(v))
}

/// A route's `metric`: a non-negative integer, kept as written.
pub(super) fn metric(r: &Value, at: &str, origin: &str) -> Result<Option<String>, NetworkError> {
    super::check_metric(text(r, "metric", at, origin)?, at, origin)
}

/// A scalar field as text; a mapping or list there is an error naming the key.
pub(super) fn text(
    v: &Value,
    key: &str,
    at: &str,
    origin: &str,
) -> Result<Option<String>, NetworkError> {
    match get(v, key) {
        None => Ok(None),
        Some(x) => crate::yaml::scalar_text(x)
            .map(Some)
            .ok_or_else(|| invalid(origin, format!("{at}.{key}: expected a single value"))),
    }
}

/// A list of scalars; a single scalar counts as a one-item list.
pub(super) fn list(
    v: &Value,
    key: &str,
    at: &str,
    origin: &str,
) -> Result<Vec<String>, NetworkError> {
    match get(v, key) {
        None => Ok(Vec::new()),
        Some(Value::Sequence(items)) => items
            .iter()
            .enumerate()
            .map(|(i, x)| {
                crate::yaml::scalar_text(x).ok_or_else(|| {
                    invalid(origin, format!("{at}.{key}[{i}]: expected a single value"))
                })
            })
            .collect(),
        Some(x) => crate::yaml::scalar_text(x)
            .map(|s| vec![s])
            .ok_or_else(|| invalid(origin, format!("{at}.{key}: expected a list"))),
    }
}

/// Like [`list`], but a single string is split on whitespace (subnet `dns_*` keys).
fn words(v: &Value, key: &str, at: &str, origin: &str) -> Result<Vec<String>, NetworkError> {
    match get(v, key) {
        Some(Value::String(s)) => Ok(s.split_whitespace().map(str::to_string).collect()),
        _ => list(v, key, at, origin),
    }
}
