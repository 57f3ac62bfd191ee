//! Golden tests: nixseed's networkd rendering against cloud-init's own renderer.
//!
//! Every directory under `tests/fixtures/network/` is one case: the input
//! (`network-config`, ConfigDrive `eni` or ConfigDrive `network_data.json`), the guest's
//! NICs (`links`), and what cloud-init wrote for it, produced by
//! `scripts/network-goldens/regen.sh`:
//!
//! - `expected-current/`: cloud-init 26.2. nixseed must write the same files, byte for
//!   byte (this includes the `.netdev` files for VLANs, bonds and bridges), apart from
//!   the keys a case's `current-differs` names: those are compared section by section
//!   without them.
//! - `expected/`: Debian bookworm's cloud-init 22.4.2. The `.network` files must match
//!   section by section, apart from what 22.4.2 is known not to write (see
//!   `bookworm_view`); 22.4.2 writes no `.netdev` at all.
//! - `same-as`: cloud-init rejects this input; nixseed must render it exactly like the
//!   named case (which says the same thing in a form cloud-init accepts).

#![allow(clippy::unwrap_used)] // a fixture that cannot be read is a failed test

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

use nixseed_core::network::{self, Link, NetworkSetting};

type Sections = Vec<(String, Vec<String>)>;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/network")
}

fn links(case: &Path) -> Vec<Link> {
    let text = fs::read_to_string(case.join("links")).unwrap_or_default();
    text.lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            let mut w = l.split_whitespace();
            Link {
                name: w.next().unwrap().to_string(),
                mac: w.next().expect("links: `name mac` per line").to_lowercase(),
            }
        })
        .collect()
}

fn render_case(case: &Path) -> Result<BTreeMap<String, String>, String> {
    let links = links(case);
    let eni = case.join("eni");
    let network_data = case.join("network_data.json");
    let cfg = if network_data.exists() {
        let bytes = fs::read(&network_data).unwrap();
        network::parse_network_data(&bytes, &network_data.display().to_string())
            .map_err(|e| e.to_string())?
    } else if eni.exists() {
        let text = fs::read_to_string(&eni).unwrap();
        network::parse_eni(&text, &eni.display().to_string()).map_err(|e| e.to_string())?
    } else {
        let path = case.join("network-config");
        let bytes = fs::read(&path).unwrap();
        match network::parse(&bytes, &path.display().to_string()).map_err(|e| e.to_string())? {
            NetworkSetting::Disabled => return Ok(BTreeMap::new()),
            NetworkSetting::Config(c) => c,
        }
    };
    network::render_networkd(&cfg, &links)
}

fn read_dir_files(dir: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for e in fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        out.insert(name, fs::read_to_string(e.path()).unwrap());
    }
    out
}

/// Sections in file order, blank lines dropped (22.4.2 puts one after every
/// `[Route]` key and two at the end of a file).
fn sections(text: &str) -> Sections {
    let mut out: Sections = Vec::new();
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if line.starts_with('[') {
            out.push((line.to_string(), Vec::new()));
        } else if let Some(last) = out.last_mut() {
            last.1.push(line.to_string());
        } else {
            out.push(("<before any section>".into(), vec![line.to_string()]));
        }
    }
    out
}

fn show(s: &Sections) -> String {
    s.iter()
        .map(|(name, keys)| format!("    {name} {}", keys.join(" | ")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Section-by-section difference, or None when equal.
fn diff(file: &str, want: &Sections, got: &Sections) -> Option<String> {
    if want == got {
        return None;
    }
    let mut msg = format!("  {file}:\n");
    let n = want.len().max(got.len());
    for i in 0..n {
        let w = want.get(i);
        let g = got.get(i);
        if w != g {
            msg += &format!(
                "    section #{i}: cloud-init {:?}\n                 nixseed    {:?}\n",
                w, g
            );
        }
    }
    msg += &format!("  cloud-init:\n{}\n  nixseed:\n{}\n", show(want), show(got));
    Some(msg)
}

/// What 22.4.2 would show of nixseed's (current cloud-init's) output. These are the
/// documented differences (docs/network.md), nothing case-specific:
/// - no `Bond=`, `Bridge=`, `VLAN=` in [Network] and no [Bridge] (it never links members);
/// - no `GatewayOnLink=` (added in later releases);
/// - no `RequiredForOnline=` and no [Link] `MACAddress=` (later releases);
/// - it keeps a v2 MAC in the seed's case; current releases lowercase it;
/// - for a bond, bridge or VLAN with a MAC it writes [Match] `MACAddress=`, which also
///   matches the members; current releases write it under [Link] and in the .netdev;
/// - it writes a Python boolean as Python spells it (`IPv6AcceptRA=True` for
///   OpenStack's `ipv6_dhcp`); current releases write `yes`/`no`, and networkd reads
///   both alike.
///
/// A case's `bookworm-differs` file can name further keys, left out of the comparison
/// on both sides (22.4.2 leaves them out, or writes them where current releases write
/// them otherwise), or `file <name>` for a file only 22.4.2 writes, one per line with
/// the reason.
fn bookworm_view(s: &Sections, extra: &[String]) -> Sections {
    let dropped = |section: &str, line: &str| {
        let key = line.split('=').next().unwrap_or("");
        match (section, key) {
            ("[Network]", "Bond" | "Bridge" | "VLAN") => true,
            ("[Route]", "GatewayOnLink") => true,
            ("[Link]", "RequiredForOnline" | "MACAddress") => true,
            _ => extra.iter().any(|k| k == key),
        }
    };
    s.iter()
        .filter(|(name, _)| name != "[Bridge]")
        .map(|(name, keys)| {
            let keys = keys
                .iter()
                .filter(|l| !dropped(name, l))
                .map(|l| networkd_boolean(&lower_mac(l)))
                .collect::<Vec<_>>();
            (name.clone(), keys)
        })
        .filter(|(_, keys)| !keys.is_empty())
        .collect()
}

fn networkd_boolean(line: &str) -> String {
    match line.split_once('=') {
        Some((k, "True")) => format!("{k}=yes"),
        Some((k, "False")) => format!("{k}=no"),
        _ => line.to_string(),
    }
}

fn lower_mac(line: &str) -> String {
    match line.strip_prefix("MACAddress=") {
        Some(m) => format!("MACAddress={}", m.to_lowercase()),
        None => line.to_string(),
    }
}

fn compare_files(
    label: &str,
    want: &BTreeMap<String, String>,
    got: &BTreeMap<String, String>,
    byte_exact: bool,
) -> Result<(), String> {
    let mut msg = String::new();
    let wn: Vec<_> = want.keys().collect();
    let gn: Vec<_> = got.keys().collect();
    if wn != gn {
        msg += &format!("  file names differ:\n    cloud-init {wn:?}\n    nixseed    {gn:?}\n");
    }
    for (name, w) in want {
        let Some(g) = got.get(name) else { continue };
        if let Some(d) = diff(name, &sections(w), &sections(g)) {
            msg += &d;
        } else if byte_exact && w != g {
            msg += &format!(
                "  {name}: same sections, different bytes\n    cloud-init {w:?}\n    nixseed    {g:?}\n"
            );
        }
    }
    if msg.is_empty() {
        Ok(())
    } else {
        Err(format!("against {label}:\n{msg}"))
    }
}

fn check_case(case: &Path) -> Result<Vec<&'static str>, String> {
    let got = render_case(case)?;
    let mut checked = Vec::new();

    if let Ok(other) = fs::read_to_string(case.join("same-as")) {
        let other = fixtures().join(other.trim());
        let want = render_case(&other)?;
        compare_files(&format!("case {}", other.display()), &want, &got, true)?;
        checked.push("same-as");
    }

    let current = case.join("expected-current");
    if current.is_dir() {
        let differs = differs_file(&case.join("current-differs"));
        if differs.is_empty() {
            compare_files("cloud-init 26.2", &unrenamed(&current, &got), &got, true)?;
        } else {
            let ours = got
                .iter()
                .map(|(n, t)| (n.clone(), without_keys(t, &differs)))
                .collect();
            compare_files("cloud-init 26.2", &unrenamed(&current, &got), &ours, false)?;
        }
        checked.push("26.2");
    }

    let bookworm = case.join("expected");
    if bookworm.is_dir() {
        let extra = differs_file(&case.join("bookworm-differs"));
        let (extra_files, extra): (Vec<String>, Vec<String>) =
            extra.into_iter().partition(|l| l.starts_with("file "));
        let extra_files: Vec<&str> = extra_files.iter().map(|l| l[5..].trim()).collect();
        let mut want = unrenamed(&bookworm, &got);
        want.retain(|n, _| !extra_files.contains(&n.as_str()));
        let ours: BTreeMap<String, String> = got
            .iter()
            .filter(|(n, _)| n.ends_with(".network"))
            .map(|(n, t)| (n.clone(), t.clone()))
            .collect();
        let virtual_device = |n: &str| got.contains_key(&n.replace(".network", ".netdev"));
        let want_view: BTreeMap<String, Sections> = want
            .iter()
            .map(|(n, t)| {
                let mut s = sections(t);
                if virtual_device(n) {
                    for (name, keys) in &mut s {
                        if name == "[Match]" {
                            keys.retain(|k| !k.starts_with("MACAddress="));
                        }
                    }
                }
                (n.clone(), bookworm_view(&s, &extra))
            })
            .collect();
        let ours_view: BTreeMap<String, Sections> = ours
            .iter()
            .map(|(n, t)| (n.clone(), bookworm_view(&sections(t), &extra)))
            .collect();
        let wn: Vec<_> = want_view.keys().collect();
        let gn: Vec<_> = ours_view.keys().collect();
        if wn != gn {
            return Err(format!(
                "against Debian cloud-init 22.4.2: .network files differ:\n    cloud-init {wn:?}\n    nixseed    {gn:?}"
            ));
        }
        let mut msg = String::new();
        for (name, w) in &want_view {
            if let Some(d) = diff(name, w, &ours_view[name]) {
                msg += &d;
            }
        }
        if !msg.is_empty() {
            return Err(format!("against Debian cloud-init 22.4.2:\n{msg}"));
        }
        checked.push("22.4.2");
    }

    if checked.is_empty() {
        return Err("no oracle output (expected/, expected-current/ or same-as)".into());
    }
    Ok(checked)
}

/// What cloud-init wrote into `dir`, as nixseed writes it for a guest that keeps its NIC
/// names. cloud-init renames a NIC it matches by MAC to the config's name (v1 `name`,
/// v2 `set-name`) before networkd starts; nixseed never renames one (docs/network.md,
/// "Interface names"). So a NIC's `.network` with `MACAddress=` in [Match] is named after
/// the case's guest NIC with that MAC (file name and `Name=`), and one whose MAC no NIC
/// has matches by the MAC alone: `Name=` gives way to `Type=ether`. Files of bonds,
/// bridges and VLANs (nixseed writes a `.netdev` for them: `got`) are left as they are.
fn unrenamed(dir: &Path, got: &BTreeMap<String, String>) -> BTreeMap<String, String> {
    let links = links(dir.parent().unwrap());
    let mut out = BTreeMap::new();
    for (file, text) in read_dir_files(dir) {
        let netdev = file.replace(".network", ".netdev");
        let mac = text
            .lines()
            .find_map(|l| l.strip_prefix("MACAddress="))
            .map(str::to_lowercase);
        let name = text.lines().find_map(|l| l.strip_prefix("Name="));
        let (Some(mac), Some(name), false) = (mac, name, got.contains_key(&netdev)) else {
            out.insert(file, text);
            continue;
        };
        let nic = links.iter().find(|l| l.mac == mac).map(|l| l.name.clone());
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        let at = lines
            .iter()
            .position(|l| l.strip_prefix("Name=") == Some(name));
        let (file, text) = match (nic, at) {
            (Some(n), Some(i)) => {
                lines[i] = format!("Name={n}");
                (
                    file.replace(&format!("-{name}.network"), &format!("-{n}.network")),
                    lines,
                )
            }
            (None, Some(i)) => {
                lines.remove(i);
                // [Match] keys are sorted; `Type` goes before the first key after it.
                let start = lines.iter().position(|l| l == "[Match]").unwrap() + 1;
                let end = lines[start..]
                    .iter()
                    .position(|l| l.is_empty() || l.starts_with('['))
                    .map_or(lines.len(), |p| p + start);
                let pos = (start..end)
                    .find(|&j| lines[j].as_str() > "Type=")
                    .unwrap_or(end);
                lines.insert(pos, "Type=ether".to_string());
                (file, lines)
            }
            _ => (file, lines),
        };
        out.insert(file, text.iter().map(|l| format!("{l}\n")).collect());
    }
    out
}

/// The entries of a `*-differs` file: one per line, `#` starts the reason.
fn differs_file(path: &Path) -> Vec<String> {
    fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split('#').next())
        .map(|l| l.trim().to_string())
        .filter(|l| !l.is_empty())
        .collect()
}

/// A unit file without the lines whose key is in `keys`.
fn without_keys(text: &str, keys: &[String]) -> String {
    text.lines()
        .filter(|l| !keys.iter().any(|k| l.split('=').next() == Some(k.as_str())))
        .map(|l| format!("{l}\n"))
        .collect()
}

#[test]
fn rendering_matches_cloud_init() {
    let mut cases: Vec<PathBuf> = fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    cases.sort();
    assert!(cases.len() >= 25, "only {} cases", cases.len());

    let mut failures = Vec::new();
    let mut tally: BTreeMap<&str, usize> = BTreeMap::new();
    for case in &cases {
        let name = case.file_name().unwrap().to_string_lossy().into_owned();
        match check_case(case) {
            Ok(checked) => {
                for c in checked {
                    *tally.entry(c).or_default() += 1;
                }
            }
            Err(e) => failures.push(format!("case {name}: {e}")),
        }
    }
    eprintln!(
        "{} of {} cases match cloud-init (checks passed: {tally:?})",
        cases.len() - failures.len(),
        cases.len()
    );
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn a_wrong_key_fails_the_comparison() {
    // The comparison itself must notice a changed value and a missing section.
    let want = sections("[Match]\nName=ens18\n\n[Network]\nDHCP=ipv4\n");
    let changed = sections("[Match]\nName=ens18\n\n[Network]\nDHCP=yes\n");
    let missing = sections("[Match]\nName=ens18\n");
    assert!(diff("f", &want, &changed).is_some());
    assert!(diff("f", &want, &missing).is_some());
    assert!(diff("f", &want, &want).is_none());
}
