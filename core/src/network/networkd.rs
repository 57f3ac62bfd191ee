//! systemd-networkd files, laid out as cloud-init's networkd renderer writes them:
//! sections in alphabetical order, sorted unique keys, one section per address and per
//! route, one blank line between sections and a single trailing newline.

use std::collections::{BTreeMap, BTreeSet};

use super::{InterfaceKind, Link, NetworkConfig, Route, SubnetKind, ip};

/// One unit file under construction.
#[derive(Default)]
struct Unit {
    /// The first `key=value` whose value would break the file's lines (a line break or
    /// another control character from the seed), for [`Unit::finish`] to refuse.
    bad: Option<String>,
    sections: BTreeMap<&'static str, BTreeSet<String>>,
    addresses: BTreeSet<String>,
    /// Keyed like cloud-init (`a<N>` subnet gateways, `c<N>` global routes, `r<N>`
    /// subnet routes) so that sorting the keys gives cloud-init's order.
    routes: BTreeMap<String, BTreeSet<String>>,
    /// `[RoutingPolicyRule]` sections, in the config's order.
    rules: Vec<BTreeSet<String>>,
}

impl Unit {
    /// `key=value`, noting a value that holds a control character: written as it is, a
    /// line break there would start lines (or sections) the seed did not ask for.
    fn line(&mut self, key: &str, value: &str) -> String {
        if self.bad.is_none() && value.chars().any(char::is_control) {
            self.bad = Some(format!("{key}={value:?}"));
        }
        format!("{key}={value}")
    }

    fn set(&mut self, section: &'static str, key: &str, value: impl AsRef<str>) {
        let line = self.line(key, value.as_ref());
        self.sections.entry(section).or_default().insert(line);
    }

    fn route(&mut self, rid: String, key: &str, value: impl AsRef<str>) {
        let line = self.line(key, value.as_ref());
        self.routes.entry(rid).or_default().insert(line);
    }

    fn rule(&mut self, rule: &[(&str, String)]) {
        let lines = rule.iter().map(|(k, v)| self.line(k, v)).collect();
        self.rules.push(lines);
    }

    fn add_route(&mut self, rid: String, r: &Route) {
        self.routes.entry(rid.clone()).or_default();
        if let Some(g) = &r.gateway {
            self.route(rid.clone(), "Gateway", g);
            if r.on_link {
                self.route(rid.clone(), "GatewayOnLink", "yes");
            }
        }
        self.route(
            rid.clone(),
            "Destination",
            format!("{}/{}", r.network, r.prefix),
        );
        if let Some(m) = &r.metric {
            self.route(rid.clone(), "Metric", m);
        }
        if let Some(t) = &r.table {
            self.route(rid, "Table", t);
        }
    }

    /// The file's text, or the value that cannot be written in it.
    fn finish(self) -> Result<String, String> {
        if let Some(bad) = self.bad {
            return Err(format!(
                "{bad}: a value holding a line break or another control character"
            ));
        }
        let mut blocks: BTreeMap<&str, Vec<String>> = BTreeMap::new();
        for (name, keys) in self.sections {
            if !keys.is_empty() {
                blocks
                    .entry(name)
                    .or_default()
                    .push(keys.into_iter().collect::<Vec<_>>().join("\n"));
            }
        }
        for a in self.addresses {
            blocks.entry("Address").or_default().push(a);
        }
        for (_, keys) in self.routes {
            if !keys.is_empty() {
                blocks
                    .entry("Route")
                    .or_default()
                    .push(keys.into_iter().collect::<Vec<_>>().join("\n"));
            }
        }
        for keys in self.rules {
            if !keys.is_empty() {
                blocks
                    .entry("RoutingPolicyRule")
                    .or_default()
                    .push(keys.into_iter().collect::<Vec<_>>().join("\n"));
            }
        }
        let mut out = String::new();
        for (name, bodies) in blocks {
            for body in bodies {
                if !out.is_empty() {
                    out.push('\n');
                }
                out.push_str(&format!("[{name}]\n{body}\n"));
            }
        }
        Ok(out)
    }
}

/// The guest NIC with `iface`'s MAC, for entries named after their NIC (v1 physical,
/// v2 ethernets, ConfigDrive links).
fn nic<'a>(iface: &super::Interface, links: &'a [Link]) -> Option<&'a Link> {
    let mac = iface.mac.as_ref().filter(|_| iface.rename_by_mac)?;
    links.iter().find(|l| l.mac.eq_ignore_ascii_case(mac))
}

/// What an interface is called in the guest: the NIC with its MAC (v1 physical and v2
/// ethernets; nixseed never renames a NIC, so a `set-name` cannot name it), else
/// `set-name`, else its config name.
fn resolve(iface: &super::Interface, links: &[Link]) -> String {
    if let Some(link) = nic(iface, links) {
        return link.name.clone();
    }
    if let Some(n) = &iface.set_name {
        return n.clone();
    }
    iface.id.clone()
}

pub(super) fn render(
    cfg: &NetworkConfig,
    links: &[Link],
) -> Result<BTreeMap<String, String>, String> {
    let mut names: BTreeMap<&str, String> = cfg
        .interfaces
        .iter()
        .map(|i| (i.id.as_str(), resolve(i, links)))
        .collect();
    for iface in &cfg.interfaces {
        if iface.name_after_link
            && let InterfaceKind::Vlan { id, link } = &iface.kind
        {
            let base = names.get(link.as_str()).unwrap_or(link).clone();
            names.insert(iface.id.as_str(), format!("{base}.{id}"));
        }
    }
    let name_of = |id: &str| names.get(id).cloned().unwrap_or_else(|| id.to_string());

    let mut files = BTreeMap::new();
    // Member → master links that go into the members' .network files, keyed by the
    // member's config id: two entries can resolve to one name (an absent NIC whose
    // config name a present NIC has), and only the one named as a member is one.
    let mut vlans_on: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut bond_of: BTreeMap<String, String> = BTreeMap::new();
    let mut bridge_of: BTreeMap<String, String> = BTreeMap::new();
    // Per-port bridge settings for the ports' .network files: `[Bridge] Cost=`, `Priority=`.
    let mut port_settings: BTreeMap<String, Vec<(&'static str, String)>> = BTreeMap::new();

    for iface in &cfg.interfaces {
        let name = name_of(&iface.id);
        let mut dev = Unit::default();
        match &iface.kind {
            InterfaceKind::Vlan { id, link } => {
                vlans_on.entry(link.clone()).or_default().push(name.clone());
                dev.set("NetDev", "Kind", "vlan");
                dev.set("VLAN", "Id", id);
            }
            InterfaceKind::Bond { members, params } => {
                if members.is_empty() {
                    tracing::warn!(bond = %name, "bond without interfaces: no .netdev written");
                    continue;
                }
                for m in members {
                    bond_of.insert(m.clone(), name.clone());
                }
                dev.set("NetDev", "Kind", "bond");
                bond_params(&mut dev, params);
            }
            InterfaceKind::Bridge { ports, params } => {
                if ports.is_empty() {
                    tracing::warn!(bridge = %name, "bridge without interfaces: no .netdev written");
                    continue;
                }
                for p in ports {
                    bridge_of.insert(p.clone(), name.clone());
                }
                dev.set("NetDev", "Kind", "bridge");
                for (key, val) in params {
                    let Some(val) = val else { continue };
                    let per_port = match key.as_str() {
                        "bridge_pathcost" => Some("Cost"),
                        "bridge_portprio" => Some("Priority"),
                        _ => None,
                    };
                    if let Some(sysd) = per_port {
                        if let Some((port, value)) = val.split_once(' ') {
                            port_settings
                                .entry(port.to_string())
                                .or_default()
                                .push((sysd, value.to_string()));
                        }
                        continue;
                    }
                    let sysd = match key.as_str() {
                        "bridge_ageing" => "AgeingTimeSec",
                        "bridge_bridgeprio" => "Priority",
                        "bridge_fd" => "ForwardDelaySec",
                        "bridge_hello" => "HelloTimeSec",
                        "bridge_maxage" => "MaxAgeSec",
                        "bridge_stp" => "STP",
                        _ => continue,
                    };
                    dev.set("Bridge", sysd, val);
                }
            }
            InterfaceKind::Physical | InterfaceKind::Loopback => continue,
        }
        dev.set("NetDev", "Name", &name);
        if let Some(mtu) = &iface.mtu {
            dev.set("NetDev", "MTUBytes", mtu);
        }
        if let Some(mac) = &iface.mac {
            dev.set("NetDev", "MACAddress", mac);
        }
        let file = format!("10-cloud-init-{name}.netdev");
        let text = dev.finish().map_err(|e| format!("{file}: {e}"))?;
        files.insert(file, text);
    }

    for iface in &cfg.interfaces {
        let name = name_of(&iface.id);
        let mut u = Unit::default();
        for v in vlans_on.get(&iface.id).into_iter().flatten() {
            u.set("Network", "VLAN", v);
        }
        if let Some(b) = bond_of.get(&iface.id) {
            u.set("Network", "Bond", b);
        }
        if let Some(b) = bridge_of.get(&iface.id) {
            u.set("Network", "Bridge", b);
            for (key, value) in port_settings.get(&iface.id).into_iter().flatten() {
                u.set("Bridge", key, value);
            }
        }
        if let Some(d) = &iface.driver {
            u.set("Match", "Driver", d);
        }
        for rule in &iface.routing_policy {
            u.rule(rule);
        }

        let physical = iface.kind == InterfaceKind::Physical;
        let by_mac_alone =
            physical && iface.rename_by_mac && iface.mac.is_some() && nic(iface, links).is_none();
        if by_mac_alone {
            // No NIC has the MAC yet (its driver is not in the initrd, or it is plugged in
            // later): the name it will have is not known, so the MAC alone matches it, and
            // `Type=ether` keeps bonds and VLANs, which take a member's MAC, out.
            // An InfiniBand address is 20 bytes; an Ethernet one 6.
            let long = iface.mac.as_ref().is_some_and(|m| m.len() > 17);
            u.set("Match", "Type", if long { "infiniband" } else { "ether" });
        } else {
            u.set("Match", "Name", &name);
        }
        if let Some(mac) = &iface.mac {
            if physical {
                u.set("Match", "MACAddress", mac);
            } else if !matches!(iface.kind, InterfaceKind::Loopback) {
                u.set("Link", "MACAddress", mac);
            }
        }
        if let Some(mtu) = &iface.mtu {
            u.set("Link", "MTUBytes", mtu);
        }
        if iface.optional {
            u.set("Link", "RequiredForOnline", "no");
        }

        let mut dhcp = "no";
        let mut rid = 0usize;
        for s in &iface.subnets {
            match s.kind {
                SubnetKind::Dhcp4 => {
                    dhcp = match dhcp {
                        "no" => "ipv4",
                        "ipv6" => "yes",
                        d => d,
                    }
                }
                SubnetKind::Dhcp6 => {
                    dhcp = match dhcp {
                        "no" => "ipv6",
                        "ipv4" => "yes",
                        d => d,
                    }
                }
                _ => {}
            }
            for r in &s.routes {
                u.add_route(format!("r{rid}"), r);
                rid += 1;
            }
            if let Some((addr, prefix)) = &s.address {
                u.addresses.insert(format!("Address={addr}/{prefix}"));
                if let Some(gw) = &s.gateway {
                    let key = format!("a{rid}");
                    u.route(key.clone(), "Gateway", gw);
                    if ip::contains(addr, *prefix, gw) == Some(false) {
                        u.route(key, "GatewayOnLink", "yes");
                    }
                    rid += 1;
                }
                if !s.dns_nameservers.is_empty() {
                    u.set("Network", "DNS", s.dns_nameservers.join(" "));
                }
                if !s.dns_search.is_empty() {
                    u.set("Network", "Domains", s.dns_search.join(" "));
                }
            }
        }
        u.set("Network", "DHCP", dhcp);
        if let Some(ra) = iface.accept_ra {
            u.set("Network", "IPv6AcceptRA", if ra { "yes" } else { "no" });
        }

        // Interface DNS; for v1 the global nameservers stand in when there is none.
        let (ns, search) = match (&iface.dns, cfg.version) {
            (Some(d), _) => (d.nameservers.as_slice(), d.search.as_slice()),
            (None, 1) => (cfg.nameservers.as_slice(), cfg.search.as_slice()),
            (None, _) => (&[][..], &[][..]),
        };
        if !search.is_empty() {
            u.set("Network", "Domains", search.join(" "));
        }
        if !ns.is_empty() {
            u.set("Network", "DNS", ns.join(" "));
        }

        for (i, r) in cfg.routes.iter().enumerate() {
            u.add_route(format!("c{i}"), r);
        }

        for (ver, overrides) in [("4", &iface.dhcp4_overrides), ("6", &iface.dhcp6_overrides)] {
            if !(dhcp == "yes" || dhcp == format!("ipv{ver}")) {
                continue;
            }
            let (section, extra): (&'static str, &[(&str, &str)]) = if ver == "4" {
                (
                    "DHCPv4",
                    &[
                        ("send-hostname", "SendHostname"),
                        ("hostname", "Hostname"),
                        ("route-metric", "RouteMetric"),
                        ("use-mtu", "UseMTU"),
                        ("use-routes", "UseRoutes"),
                    ],
                )
            } else {
                ("DHCPv6", &[])
            };
            let common = [
                ("use-dns", "UseDNS"),
                ("use-domains", "UseDomains"),
                ("use-hostname", "UseHostname"),
                ("use-ntp", "UseNTP"),
            ];
            for (k, v) in overrides {
                if let Some((_, sysd)) = common.iter().chain(extra).find(|(key, _)| key == k) {
                    u.set(section, sysd, v);
                }
            }
        }

        let mut file = format!("10-cloud-init-{name}.network");
        // A NIC matched by its MAC alone keeps its config name (`eth0`), which can be the
        // name of a guest NIC another entry's MAC found: the file then takes the MAC
        // too, so neither replaces the other (cloud-init writes both).
        let taken = |id: &str| {
            cfg.interfaces
                .iter()
                .any(|o| o.id != id && name_of(&o.id) == name)
        };
        if by_mac_alone && taken(&iface.id) {
            let mac: String = iface
                .mac
                .iter()
                .flat_map(|m| m.chars())
                .filter(char::is_ascii_hexdigit)
                .collect();
            file = format!("10-cloud-init-{name}-{}.network", mac.to_ascii_lowercase());
        }
        let text = u.finish().map_err(|e| format!("{file}: {e}"))?;
        if files.insert(file.clone(), text).is_some() {
            tracing::warn!(
                "{file}: two interfaces of the network-config resolve to one name; the later one is written"
            );
        }
    }
    Ok(files)
}

fn bond_params(dev: &mut Unit, params: &[(String, String)]) {
    let ms = |v: &str| format!("{v}ms");
    for (key, val) in params {
        let (sysd, v) = match key.as_str() {
            "bond-ad-select" => ("AdSelect", val.clone()),
            "bond-arp-interval" => ("ARPIntervalSec", ms(val)),
            "bond-arp-validate" => ("ARPValidate", val.clone()),
            "bond-downdelay" => ("DownDelaySec", ms(val)),
            "bond-fail-over-mac" => ("FailOverMACPolicy", val.clone()),
            "bond-lacp-rate" => ("LACPTransmitRate", val.clone()),
            "bond-miimon" => ("MIIMonitorSec", ms(val)),
            "bond-min-links" => ("MinLinks", val.clone()),
            "bond-mode" => ("Mode", val.clone()),
            "bond-num-grat-arp" => ("GratuitousARP", val.clone()),
            "bond-primary-reselect" => ("PrimaryReselectPolicy", val.clone()),
            "bond-updelay" => ("UpDelaySec", ms(val)),
            "bond-xmit-hash-policy" => ("TransmitHashPolicy", val.clone()),
            "bond-all-slaves-active" => ("AllSlavesActive", val.to_lowercase()),
            "bond-arp-all-targets" => ("ARPAllTargets", val.clone()),
            "bond-learn-packet-interval" => ("LearnPacketIntervalSec", val.clone()),
            "bond-packets-per-slave" => ("PacketsPerSlave", val.clone()),
            _ => continue,
        };
        dev.set("Bond", sysd, v);
    }
}
