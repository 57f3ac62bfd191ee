//! `tcp_ports`/`udp_ports` → one nftables table, `inet nixseed`, loaded by the agent when
//! the firewall is enabled. The table is the guest's inbound policy: established traffic,
//! loopback, ICMP, DHCP replies and SSH are always allowed (so a seed can never lock the
//! operator out), plus the identity's ports; everything else inbound is dropped.

/// Parses a ports file (one port or `a-b` range per line; blank lines and `#` comments
/// ignored) into nftables set elements.
pub fn parse_ports(text: &str, origin: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or_default().trim();
        if line.is_empty() {
            continue;
        }
        out.push(
            crate::identity::check_port(line)
                .map_err(|e| format!("{origin}: line {}: {e}", i + 1))?,
        );
    }
    Ok(out)
}

/// The whole ruleset, replacing any earlier nixseed table atomically (`nft -f`).
pub fn render(tcp: &[String], udp: &[String]) -> String {
    let set = |ports: &[String]| ports.join(", ");
    let mut rules = String::new();
    if !tcp.is_empty() {
        rules.push_str(&format!("    tcp dport {{ {} }} accept\n", set(tcp)));
    }
    if !udp.is_empty() {
        rules.push_str(&format!("    udp dport {{ {} }} accept\n", set(udp)));
    }
    // ICMP and IPv6-ICMP by number (1, 58): nft resolves protocol names through
    // /etc/protocols, which minimal images (Debian minbase) do not have.
    format!(
        "table inet nixseed\n\
         delete table inet nixseed\n\
         table inet nixseed {{\n  \
         chain input {{\n    \
         type filter hook input priority filter; policy drop;\n    \
         ct state established,related accept\n    \
         ct state invalid drop\n    \
         iifname \"lo\" accept\n    \
         meta l4proto {{ 1, 58 }} accept\n    \
         udp dport {{ 68, 546 }} accept\n    \
         tcp dport 22 accept\n\
         {rules}  }}\n\
         }}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_render_into_sets() {
        let tcp = parse_ports("80\n# web\n8000-8080\n\n", "tcp_ports").unwrap();
        let text = render(&tcp, &["53".to_string()]);
        assert!(
            text.contains("tcp dport { 80, 8000-8080 } accept"),
            "{text}"
        );
        assert!(text.contains("udp dport { 53 } accept"));
        assert!(
            text.contains("tcp dport 22 accept"),
            "SSH is never closed by a seed"
        );
        assert!(text.starts_with("table inet nixseed\ndelete table inet nixseed\n"));
    }

    #[test]
    fn bad_port_names_file_and_line() {
        let e = parse_ports("22\nhttp\n", "/var/identity/tcp_ports").unwrap_err();
        assert!(e.starts_with("/var/identity/tcp_ports: line 2:"), "{e}");
    }
}
