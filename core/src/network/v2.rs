//! network-config version 2 (netplan-like: ethernets, vlans, bonds, bridges), read
//! the way cloud-init's network_state turns it into interfaces and subnets.

use crate::yaml::Value;

use super::v1::{add_placeholders, bridge_value, list, metric, text};
use super::{
    Dns, Interface, InterfaceKind, NetworkConfig, NetworkError, Route, Subnet, SubnetKind,
    address_prefix, invalid,
};
use crate::yaml::get;

/// v2 bond `parameters` and the v1 names cloud-init renders from.
const BOND_PARAMS: &[(&str, &str)] = &[
    ("ad-select", "bond-ad-select"),
    ("all-slaves-active", "bond-all-slaves-active"),
    ("arp-all-targets", "bond-arp-all-targets"),
    ("arp-interval", "bond-arp-interval"),
    ("arp-ip-target", "bond-arp-ip-target"),
    ("arp-validate", "bond-arp-validate"),
    ("down-delay", "bond-downdelay"),
    ("fail-over-mac-policy", "bond-fail-over-mac"),
    ("lacp-rate", "bond-lacp-rate"),
    ("learn-packet-interval", "bond-learn-packet-interval"),
    ("mii-monitor-interval", "bond-miimon"),
    ("min-links", "bond-min-links"),
    ("mode", "bond-mode"),
    ("gratuitous-arp", "bond-num-grat-arp"),
    ("gratuitious-arp", "bond-num-grat-arp"),
    ("packets-per-slave", "bond-packets-per-slave"),
    ("primary", "bond-primary"),
    ("primary-reselect-policy", "bond-primary-reselect"),
    ("up-delay", "bond-updelay"),
    ("transmit-hash-policy", "bond-xmit-hash-policy"),
];

const BRIDGE_PARAMS: &[(&str, &str)] = &[
    ("ageing-time", "bridge_ageing"),
    ("priority", "bridge_bridgeprio"),
    ("forward-delay", "bridge_fd"),
    ("hello-time", "bridge_hello"),
    ("max-age", "bridge_maxage"),
    ("path-cost", "bridge_pathcost"),
    ("port-priority", "bridge_portprio"),
    ("stp", "bridge_stp"),
];

pub(super) fn parse(top: &Value, origin: &str) -> Result<NetworkConfig, NetworkError> {
    let mut cfg = NetworkConfig {
        version: 2,
        ..Default::default()
    };
    let Value::Mapping(sections) = top else {
        return Err(invalid(origin, "expected a mapping"));
    };
    for (section, devices) in sections {
        let Some(section) = section.as_str() else {
            continue;
        };
        match section {
            "version" | "renderer" => continue,
            "wifis" => {
                tracing::warn!(
                    origin,
                    "wifis are not rendered to systemd-networkd, as in cloud-init"
                );
                continue;
            }
            "ethernets" | "vlans" | "bonds" | "bridges" => {}
            other => {
                return Err(invalid(
                    origin,
                    format!("`{other}` is not a network-config v2 section"),
                ));
            }
        }
        let Value::Mapping(devices) = devices else {
            if devices.is_null() {
                continue;
            }
            return Err(invalid(origin, format!("{section}: expected a mapping")));
        };
        super::check_count(origin, "devices", cfg.interfaces.len() + devices.len())?;
        for (key, dev) in devices {
            let id = crate::yaml::scalar_text(key)
                .ok_or_else(|| invalid(origin, format!("{section}: device names must be text")))?;
            let at = format!("{section}.{id}");
            let iface = device(section, id, dev, &at, origin)?;
            cfg.interfaces.push(iface);
        }
    }
    add_placeholders(&mut cfg.interfaces, origin)?;
    Ok(cfg)
}

/// The keys of a v2 device this reads; others are named in a warning (cloud-init's
/// networkd renderer passes over most of them too, without a word).
const DEVICE_KEYS: &[&str] = &[
    "accept-ra",
    "addresses",
    "dhcp4",
    "dhcp4-overrides",
    "dhcp6",
    "dhcp6-overrides",
    "gateway4",
    "gateway6",
    "id",
    "interfaces",
    "link",
    "macaddress",
    "match",
    "mtu",
    "nameservers",
    "optional",
    "parameters",
    "renderer",
    "routes",
    "routing-policy",
    "set-name",
];

/// The keys of a v2 route this reads.
const ROUTE_KEYS: &[&str] = &["metric", "on-link", "table", "to", "via"];

/// Names each key of the mapping `v` (at `at`) outside `known` in a warning.
fn warn_unknown_keys(v: &Value, known: &[&str], at: &str, origin: &str) {
    let Value::Mapping(m) = v else {
        return;
    };
    for k in m.keys().filter_map(Value::as_str) {
        if !known.contains(&k) {
            tracing::warn!(origin, key = %format!("{at}.{k}"), "network-config v2 key not used here, ignored");
        }
    }
}

fn device(
    section: &str,
    id: String,
    dev: &Value,
    at: &str,
    origin: &str,
) -> Result<Interface, NetworkError> {
    if !matches!(dev, Value::Mapping(_) | Value::Null) {
        return Err(invalid(origin, format!("{at}: expected a mapping")));
    }
    warn_unknown_keys(dev, DEVICE_KEYS, at, origin);
    let mut iface = Interface {
        id,
        mtu: text(dev, "mtu", at, origin)?,
        // cloud-init's `util.is_true` for both: `1`, `on`, `yes`, `true` (any case) are
        // true, and any other value given is false.
        optional: get(dev, "optional").is_some_and(|v| crate::yaml::cloud_truth(v) == Some(true)),
        accept_ra: get(dev, "accept-ra").map(|v| crate::yaml::cloud_truth(v) == Some(true)),
        subnets: subnets(dev, at, origin)?,
        ..Default::default()
    };
    if let Some(ns) = get(dev, "nameservers") {
        let at = format!("{at}.nameservers");
        let dns = Dns {
            nameservers: list(ns, "addresses", &at, origin)?,
            search: list(ns, "search", &at, origin)?,
        };
        // As in cloud-init, per-interface DNS needs at least one address.
        if !dns.nameservers.is_empty() {
            iface.dns = Some(dns);
        } else if !dns.search.is_empty() {
            tracing::warn!(
                origin,
                device = %at,
                "search domains without nameserver addresses are dropped, as in cloud-init"
            );
        }
    }
    iface.routing_policy = routing_policy(dev, at, origin)?;
    match section {
        "ethernets" => {
            let m = get(dev, "match");
            if let Some(m) = m {
                warn_unknown_keys(m, &["macaddress", "driver"], &format!("{at}.match"), origin);
            }
            iface.mac = match m {
                Some(m) => text(m, "macaddress", &format!("{at}.match"), origin)?,
                None => None,
            }
            .map(|s| s.to_ascii_lowercase());
            iface.driver = match m {
                Some(m) => text(m, "driver", &format!("{at}.match"), origin)?,
                None => None,
            };
            iface.set_name = text(dev, "set-name", at, origin)?.filter(|s| !s.is_empty());
            iface.rename_by_mac = true;
            iface.dhcp4_overrides = overrides(dev, "dhcp4-overrides");
            iface.dhcp6_overrides = overrides(dev, "dhcp6-overrides");
        }
        "vlans" => {
            iface.mac = text(dev, "macaddress", at, origin)?.map(|s| s.to_ascii_lowercase());
            let vid = text(dev, "id", at, origin)?
                .ok_or_else(|| invalid(origin, format!("{at}.id is missing")))?;
            let link = text(dev, "link", at, origin)?
                .ok_or_else(|| invalid(origin, format!("{at}.link is missing")))?;
            iface.kind = InterfaceKind::Vlan { id: vid, link };
        }
        "bonds" => {
            iface.mac = text(dev, "macaddress", at, origin)?.map(|s| s.to_ascii_lowercase());
            let members = list(dev, "interfaces", at, origin)?;
            let mut params = Vec::new();
            if let Some(Value::Mapping(p)) = get(dev, "parameters") {
                for (k, v) in p {
                    let Some(k) = k.as_str() else { continue };
                    match BOND_PARAMS.iter().find(|(v2, _)| *v2 == k) {
                        Some((_, v1)) => {
                            if let Some(v) = crate::yaml::python_text(v) {
                                params.push((v1.to_string(), v));
                            }
                        }
                        None => {
                            tracing::warn!(origin, parameter = %format!("{at}.parameters.{k}"), "unknown bond parameter ignored")
                        }
                    }
                }
            }
            iface.kind = InterfaceKind::Bond { members, params };
        }
        _ => {
            iface.mac = text(dev, "macaddress", at, origin)?.map(|s| s.to_ascii_lowercase());
            let ports = list(dev, "interfaces", at, origin)?;
            let mut params = Vec::new();
            if let Some(Value::Mapping(p)) = get(dev, "parameters") {
                for (k, v) in p {
                    let Some(k) = k.as_str() else { continue };
                    match BRIDGE_PARAMS.iter().find(|(v2, _)| *v2 == k) {
                        // Per port (`path-cost: {eth0: 50}`): one `PORT VALUE` entry each.
                        Some((_, v1)) if matches!(v, Value::Mapping(_)) => {
                            if let Value::Mapping(ports) = v {
                                for (port, value) in ports {
                                    if let (Some(port), Some(value)) = (
                                        crate::yaml::scalar_text(port),
                                        crate::yaml::scalar_text(value),
                                    ) {
                                        params.push((
                                            v1.to_string(),
                                            Some(format!("{port} {value}")),
                                        ));
                                    }
                                }
                            }
                        }
                        Some((_, v1)) => params.push((
                            v1.to_string(),
                            bridge_value(v1, v, &format!("{at}.parameters"), origin)?,
                        )),
                        None => {
                            tracing::warn!(origin, parameter = %format!("{at}.parameters.{k}"), "unknown bridge parameter ignored")
                        }
                    }
                }
            }
            iface.kind = InterfaceKind::Bridge { ports, params };
        }
    }
    Ok(iface)
}

/// v2 `routing-policy` entries as networkd `[RoutingPolicyRule]` keys.
fn routing_policy(
    dev: &Value,
    at: &str,
    origin: &str,
) -> Result<Vec<Vec<(&'static str, String)>>, NetworkError> {
    const KEYS: &[(&str, &str)] = &[
        ("from", "From"),
        ("to", "To"),
        ("table", "Table"),
        ("priority", "Priority"),
        ("mark", "FirewallMark"),
        ("type-of-service", "TypeOfService"),
    ];
    let rules = match get(dev, "routing-policy") {
        None => return Ok(Vec::new()),
        Some(Value::Sequence(rules)) => rules,
        Some(_) => {
            return Err(invalid(
                origin,
                format!("{at}.routing-policy: expected a list"),
            ));
        }
    };
    let mut out = Vec::new();
    for (i, rule) in rules.iter().enumerate() {
        let at = format!("{at}.routing-policy[{i}]");
        let Value::Mapping(m) = rule else {
            return Err(invalid(origin, format!("{at}: expected a mapping")));
        };
        let mut keys = Vec::new();
        for (k, v) in m {
            let k = k.as_str().unwrap_or_default();
            let Some((_, sysd)) = KEYS.iter().find(|(v2, _)| *v2 == k) else {
                tracing::warn!(origin, key = %format!("{at}.{k}"), "unknown routing-policy key ignored");
                continue;
            };
            let value = crate::yaml::scalar_text(v)
                .ok_or_else(|| invalid(origin, format!("{at}.{k}: expected a value")))?;
            keys.push((*sysd, value));
        }
        out.push(keys);
    }
    Ok(out)
}

fn overrides(dev: &Value, key: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Some(Value::Mapping(m)) = get(dev, key) {
        for (k, v) in m {
            if let (Some(k), Some(v)) = (k.as_str(), crate::yaml::python_text(v)) {
                out.push((k.to_string(), v));
            }
        }
    }
    out
}

/// DHCP flags, addresses, gateways and routes as cloud-init's v2 → v1 conversion
/// lays them out: dhcp4, dhcp6, then one static subnet per address; gateway4/6 on the
/// first address of its family; nameservers on the first address; routes on the
/// first subnet (and dropped when there is none).
fn subnets(dev: &Value, at: &str, origin: &str) -> Result<Vec<Subnet>, NetworkError> {
    let mut out = Vec::new();
    let empty = |kind| Subnet {
        kind,
        address: None,
        gateway: None,
        dns_nameservers: Vec::new(),
        dns_search: Vec::new(),
        routes: Vec::new(),
    };
    for (key, kind) in [("dhcp4", SubnetKind::Dhcp4), ("dhcp6", SubnetKind::Dhcp6)] {
        // cloud-init's network_state turns DHCP on for any true value (`if
        // cfg.get("dhcp4")`), so `y` (a string to PyYAML) is on. Another string is on
        // there too, `n` and `sometimes` included, which is surely not what was meant:
        // refused, naming the file and key.
        if let Some(v) = get(dev, key) {
            let on = match crate::yaml::bool11(v) {
                Some(on) => on,
                None if matches!(v, Value::String(t) if t == "y" || t == "Y") => true,
                // A number is on when not zero, as Python's `if` reads it.
                None if matches!(v, Value::Number(_)) => crate::yaml::truthy(v),
                None => {
                    return Err(invalid(
                        origin,
                        format!(
                            "{at}.{key}: expected true/false (or yes/no, on/off); cloud-init would take any other text for true"
                        ),
                    ));
                }
            };
            if on {
                out.push(empty(kind));
            }
        }
    }
    let gateway4 = text(dev, "gateway4", at, origin)?;
    let gateway6 = text(dev, "gateway6", at, origin)?;
    let (mut gw4_used, mut gw6_used, mut ns_used) = (false, false, false);
    let ns = get(dev, "nameservers");
    for (i, addr) in list(dev, "addresses", at, origin)?.into_iter().enumerate() {
        let mut s = empty(SubnetKind::Static);
        s.address = Some(
            address_prefix(&addr, None, None)
                .map_err(|e| invalid(origin, format!("{at}.addresses[{i}]: {e}")))?,
        );
        if addr.contains(':') {
            if !gw6_used && gateway6.is_some() {
                s.gateway.clone_from(&gateway6);
                gw6_used = true;
            }
        } else if !gw4_used && gateway4.is_some() {
            s.gateway.clone_from(&gateway4);
            gw4_used = true;
        }
        if let Some(ns) = ns
            && !ns_used
        {
            let nat = format!("{at}.nameservers");
            s.dns_nameservers = list(ns, "addresses", &nat, origin)?;
            s.dns_search = list(ns, "search", &nat, origin)?;
            ns_used = !s.dns_nameservers.is_empty() || !s.dns_search.is_empty();
        }
        out.push(s);
    }
    let mut routes = Vec::new();
    if let Some(v) = get(dev, "routes") {
        let Value::Sequence(items) = v else {
            return Err(invalid(origin, format!("{at}.routes: expected a list")));
        };
        for (i, r) in items.iter().enumerate() {
            routes.push(route(r, &format!("{at}.routes[{i}]"), origin)?);
        }
    }
    if !routes.is_empty() {
        match out.first_mut() {
            Some(first) => first.routes = routes,
            None => tracing::warn!(
                origin,
                device = at,
                "routes on a device with neither DHCP nor addresses are dropped, as in cloud-init"
            ),
        }
    }
    Ok(out)
}

/// A v2 route: `to` (or `default`), `via`, `metric`, `table`, `on-link`.
fn route(r: &Value, at: &str, origin: &str) -> Result<Route, NetworkError> {
    warn_unknown_keys(r, ROUTE_KEYS, at, origin);
    let to =
        text(r, "to", at, origin)?.ok_or_else(|| invalid(origin, format!("{at}.to is missing")))?;
    let via = text(r, "via", at, origin)?.filter(|v| !v.is_empty());
    let to = super::v1::default_by_gateway(to, via.as_deref(), &format!("{at}.via"), origin)?;
    let (network, prefix) =
        address_prefix(&to, None, None).map_err(|e| invalid(origin, format!("{at}.to: {e}")))?;
    let metric = metric(r, at, origin)?;
    Ok(Route {
        network,
        prefix,
        gateway: via,
        metric,
        table: text(r, "table", at, origin)?,
        on_link: get(r, "on-link").and_then(crate::yaml::bool11) == Some(true),
    })
}
