//! guest-network-get-interfaces (addresses from getifaddrs, counters from
//! /proc/net/dev) and guest-network-get-route (/proc/net/route, ipv6_route).

use nix::ifaddrs::getifaddrs;
use nix::sys::socket::{AddressFamily, SockaddrLike, SockaddrStorage};
use nixseed_core::qga::sysparse::{proc_net_dev, proc_net_ipv6_route, proc_net_route};
use nixseed_core::qga::{Args, QgaError};
use serde_json::{Map, Value, json};

use super::{Agent, CmdResult, errno_text};

fn prefix_of(mask: Option<&SockaddrStorage>) -> u32 {
    let Some(m) = mask else { return 0 };
    if let Some(v4) = m.as_sockaddr_in() {
        return v4.ip().to_bits().count_ones();
    }
    if let Some(v6) = m.as_sockaddr_in6() {
        return v6.ip().to_bits().count_ones();
    }
    0
}

pub fn get_interfaces(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    let addrs = getifaddrs()
        .map_err(|e| QgaError::generic(format!("getifaddrs failed: {}", errno_text(e))))?;
    // Bytes: an interface name that is not UTF-8 must not drop every one's statistics.
    let stats = std::fs::read("/proc/net/dev")
        .map(|t| proc_net_dev(&String::from_utf8_lossy(&t)))
        .unwrap_or_default();
    let mut order: Vec<String> = Vec::new();
    let mut ifaces: std::collections::HashMap<String, Map<String, Value>> = Default::default();
    for a in addrs {
        let name = a.interface_name.clone();
        let entry = ifaces.entry(name.clone()).or_insert_with(|| {
            order.push(name.clone());
            let mut m = Map::new();
            m.insert("name".into(), Value::String(name.clone()));
            m
        });
        // A link with no link-layer address (tun, WireGuard) comes with no address at all
        // (or an empty one, below) and reads as zeros, as qemu-ga's SIOCGIFHWADDR gives it.
        let Some(addr) = a.address.as_ref() else {
            entry
                .entry("hardware-address")
                .or_insert_with(|| Value::String("00:00:00:00:00:00".into()));
            continue;
        };
        match addr.family() {
            Some(AddressFamily::Packet) => {
                if let Some(link) = addr.as_link_addr() {
                    let mac = link.addr().unwrap_or([0; 6]);
                    let text = mac
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(":");
                    entry.insert("hardware-address".into(), Value::String(text));
                }
            }
            Some(AddressFamily::Inet) | Some(AddressFamily::Inet6) => {
                let (ip, kind) = if let Some(v4) = addr.as_sockaddr_in() {
                    (v4.ip().to_string(), "ipv4")
                } else if let Some(v6) = addr.as_sockaddr_in6() {
                    (v6.ip().to_string(), "ipv6")
                } else {
                    continue;
                };
                let list = entry
                    .entry("ip-addresses")
                    .or_insert_with(|| Value::Array(Vec::new()));
                if let Value::Array(l) = list {
                    l.push(json!({
                        "ip-address": ip,
                        "ip-address-type": kind,
                        "prefix": prefix_of(a.netmask.as_ref()),
                    }));
                }
            }
            _ => {}
        }
    }
    let out: Vec<Value> = order
        .into_iter()
        .filter_map(|name| {
            let mut m = ifaces.remove(&name)?;
            // qemu-ga reports counters only for interfaces with an address.
            if m.contains_key("ip-addresses")
                && let Some(s) = stats.get(&name)
            {
                let keys = [
                    "rx-bytes",
                    "rx-packets",
                    "rx-errs",
                    "rx-dropped",
                    "tx-bytes",
                    "tx-packets",
                    "tx-errs",
                    "tx-dropped",
                ];
                let st: Map<String, Value> = keys
                    .iter()
                    .zip(s.iter())
                    .map(|(k, v)| (k.to_string(), Value::from(*v)))
                    .collect();
                m.insert("statistics".into(), Value::Object(st));
            }
            Some(Value::Object(m))
        })
        .collect();
    Ok(Some(Value::Array(out)))
}

pub fn get_route(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    let mut routes = std::fs::read_to_string("/proc/net/route")
        .map(|t| proc_net_route(&t))
        .unwrap_or_default();
    routes.extend(
        std::fs::read_to_string("/proc/net/ipv6_route")
            .map(|t| proc_net_ipv6_route(&t))
            .unwrap_or_default(),
    );
    Ok(Some(Value::Array(routes.iter().map(route_json).collect())))
}

/// One `GuestNetworkRoute` as qemu-ga's Linux code fills it: IPv4 routes carry `gateway`,
/// `mask`, `mtu`, `window` and `irtt`; IPv6 routes `nexthop`, the prefix lengths (as
/// strings) and `source`.
fn route_json(r: &nixseed_core::qga::sysparse::Route) -> Value {
    let mut m = Map::new();
    m.insert("iface".into(), r.iface.clone().into());
    m.insert("destination".into(), r.destination.clone().into());
    m.insert("metric".into(), r.metric.into());
    m.insert("flags".into(), r.flags.into());
    m.insert("refcnt".into(), r.refcnt.into());
    m.insert("use".into(), r.use_count.into());
    m.insert("version".into(), r.version.into());
    if r.version == 6 {
        m.insert("nexthop".into(), r.gateway.clone().into());
    } else {
        m.insert("gateway".into(), r.gateway.clone().into());
    }
    if let Some(mask) = &r.mask {
        m.insert("mask".into(), mask.clone().into());
        m.insert("mtu".into(), r.mtu.into());
        m.insert("window".into(), r.window.into());
        m.insert("irtt".into(), r.irtt.into());
    }
    if let Some(p) = r.prefix_len {
        m.insert("desprefixlen".into(), p.to_string().into());
    }
    if let Some(s) = &r.source {
        m.insert("source".into(), s.clone().into());
    }
    if let Some(p) = r.source_prefix_len {
        m.insert("srcprefixlen".into(), p.to_string().into());
    }
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(v: &Value) -> Vec<&str> {
        let mut k: Vec<&str> = v
            .as_object()
            .map(|m| m.keys().map(String::as_str).collect())
            .unwrap_or_default();
        k.sort();
        k
    }

    /// The member names of QEMU's `GuestNetworkRoute` (qga/qapi-schema.json, 9.1), per
    /// address family as its Linux code sets them.
    #[test]
    fn routes_use_the_schema_names_per_family() {
        let v4 = proc_net_route(
            "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n\
             eth0\t00000000\t0202000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n",
        );
        let v6 = proc_net_ipv6_route(
            "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000002 00000400 00000001 00000000 00000003 eth0\n",
        );
        assert_eq!(
            keys(&route_json(&v4[0])),
            [
                "destination",
                "flags",
                "gateway",
                "iface",
                "irtt",
                "mask",
                "metric",
                "mtu",
                "refcnt",
                "use",
                "version",
                "window"
            ]
        );
        assert_eq!(route_json(&v4[0])["gateway"], "10.0.2.2");
        assert_eq!(
            keys(&route_json(&v6[0])),
            [
                "desprefixlen",
                "destination",
                "flags",
                "iface",
                "metric",
                "nexthop",
                "refcnt",
                "source",
                "srcprefixlen",
                "use",
                "version"
            ]
        );
        assert_eq!(route_json(&v6[0])["nexthop"], "fe80::2");
    }
}
