//! `seedctl status`: ask the guest for its identity over the control channel and compare
//! it, file by file (sha256 from the guest's manifest), with what the host's
//! `machines/NAME` gives: the tree nixseed-core composes from the machine's seed, which
//! is exactly what the agent writes.
//!
//! Exit status: 0 when the guest is in sync, 3 when it answered but differs (scripts can
//! tell drift from an unreachable guest, which is an error and exits 1).

use std::collections::{BTreeMap, BTreeSet};

use anyhow::Result;
use clap::Args;
use nixseed_core::identity::NETWORK_DIR;
use nixseed_core::manifest::Manifest;
use serde_json::json;

use crate::channel;
use crate::cmd::push::ChannelArgs;
use crate::cmd::render::{expected_seed, expected_tree};
use crate::machine::{Identity, Paths};
use crate::nocloud;
use crate::output::Report;

/// Exit status of `status` when the guest differs from the host.
pub const EXIT_OUT_OF_SYNC: u8 = 3;

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl status web1
  seedctl status web1 --connect qemu:///system --json
Exit status: 0 in sync, 3 out of sync (the report says which files), 1 on error
(no answer, no socket).")]
pub struct StatusArgs {
    #[command(flatten)]
    pub channel: ChannelArgs,
}

/// How one file compares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum FileState {
    Match,
    Mismatch,
    /// The host's identity has it, the guest does not.
    Missing,
    /// Only the guest has it.
    Extra,
    /// Rendered in the guest from its own NICs (`network/*.network`): not compared.
    GuestRendered,
}

impl FileState {
    fn label(self) -> &'static str {
        match self {
            FileState::Match => "match",
            FileState::Mismatch => "MISMATCH",
            FileState::Missing => "MISSING",
            FileState::Extra => "EXTRA",
            FileState::GuestRendered => "guest",
        }
    }

    fn in_sync(self) -> bool {
        matches!(self, FileState::Match | FileState::GuestRendered)
    }
}

/// Compares the guest's manifest digests with the host's expected ones. Network files
/// carry the guest's NIC names: when the guest reported its NICs the host rendered them
/// for those and they compare like the rest; otherwise they are listed only.
pub fn compare(
    guest: &BTreeMap<String, String>,
    host: &BTreeMap<String, String>,
    guest_nics_known: bool,
) -> Vec<(String, FileState)> {
    let network = |n: &str| !guest_nics_known && n.starts_with(&format!("{NETWORK_DIR}/"));
    let names: BTreeSet<&String> = guest.keys().chain(host.keys()).collect();
    names
        .into_iter()
        .filter(|n| !network(n) || guest.contains_key(*n))
        .map(|n| {
            let state = match (guest.get(n), host.get(n)) {
                _ if network(n) => FileState::GuestRendered,
                (Some(g), Some(h)) if g == h => FileState::Match,
                (Some(_), Some(_)) => FileState::Mismatch,
                (None, _) => FileState::Missing,
                (Some(_), None) => FileState::Extra,
            };
            (n.clone(), state)
        })
        .collect()
}

pub fn run(paths: &Paths, a: &StatusArgs) -> Result<Report> {
    let id = Identity::load(paths, &a.channel.name)?;
    // Parsed before the guest is asked: a seed the guest would reject is the host's
    // error, whatever the guest says.
    let seed = expected_seed(&id)?;
    let host_iid = nocloud::instance_id(&id);
    let mut chan = a.channel.open(paths)?;
    let channel::GuestStatus {
        generation,
        instance_id,
        product_uuid,
        files,
        links,
        vm_product_uuid,
        unapplied,
    } = channel::status(&mut chan, a.channel.timeout())?;
    // The VM's own UUID when the agent reports it: a disk copied into another VM keeps
    // the generation's record of the first one.
    let product_uuid = vm_product_uuid.or(product_uuid);
    let tree = expected_tree(&id, &seed, &links)?;
    let host_files = Manifest::files_of(&tree);
    let rows = compare(&files, &host_files, !links.is_empty());
    let iid_ok = instance_id.as_deref() == Some(host_iid.as_str());
    let uuid_ok = product_uuid
        .as_deref()
        .is_none_or(|u| u.eq_ignore_ascii_case(&id.product_uuid));
    let differing: Vec<&str> = rows
        .iter()
        .filter(|(_, s)| !s.in_sync())
        .map(|(n, _)| n.as_str())
        .collect();
    let in_sync =
        differing.is_empty() && iid_ok && uuid_ok && generation.is_some() && unapplied.is_none();

    let show = |v: Option<&str>| v.unwrap_or("none").to_owned();
    let mut human = format!(
        "machine `{}` over {}\n  generation   {}\n  instance-id  {}{}\n  product_uuid {}{}",
        id.name,
        chan.socket.display(),
        generation.map_or_else(|| "none (no identity yet)".to_owned(), |g| g.to_string()),
        show(instance_id.as_deref()),
        if iid_ok {
            String::new()
        } else {
            format!("  (host: {host_iid})")
        },
        show(product_uuid.as_deref()),
        if uuid_ok {
            String::new()
        } else {
            format!(
                "  (host: {}; a clone or another VM answers on this socket)",
                id.product_uuid
            )
        },
    );
    if let Some(why) = &unapplied {
        human.push_str(&format!("\n  not applied  {why}"));
    }
    for (name, state) in &rows {
        human.push_str(&format!("\n  {:<9} {name}", state.label()));
    }
    if in_sync {
        human.push_str(&format!("\nin sync with {}", id.dir.display()));
    } else {
        human.push_str(&format!(
            "\nOUT OF SYNC with {}{}; `seedctl push {}` sends the host's identity",
            id.dir.display(),
            if differing.is_empty() {
                String::new()
            } else {
                format!(": {}", differing.join(", "))
            },
            id.name
        ));
    }
    let json_files: BTreeMap<&str, FileState> =
        rows.iter().map(|(n, s)| (n.as_str(), *s)).collect();
    let report = Report::new(
        human,
        json!({
            "machine": id.name,
            "socket": chan.socket,
            "generation": generation,
            "instance_id": instance_id,
            "host_instance_id": host_iid,
            "product_uuid": product_uuid,
            "host_product_uuid": id.product_uuid,
            "unapplied": unapplied,
            "in_sync": in_sync,
            "files": json_files,
        }),
    );
    Ok(if in_sync {
        report
    } else {
        report.with_exit(EXIT_OUT_OF_SYNC)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn files_compare_by_digest_and_network_only_with_the_guest_nics() {
        let guest = map(&[
            ("hostname", "a"),
            ("machine-id", "b"),
            ("users.json", "u"),
            ("network/10-cloud-init-ens3.network", "n"),
        ]);
        let host = map(&[
            ("hostname", "a"),
            ("machine-id", "c"),
            ("tcp_ports", "t"),
            ("network/10-cloud-init-eth0.network", "m"),
        ]);
        assert_eq!(
            compare(&guest, &host, false),
            vec![
                ("hostname".to_owned(), FileState::Match),
                ("machine-id".to_owned(), FileState::Mismatch),
                (
                    "network/10-cloud-init-ens3.network".to_owned(),
                    FileState::GuestRendered
                ),
                ("tcp_ports".to_owned(), FileState::Missing),
                ("users.json".to_owned(), FileState::Extra),
            ]
        );
        // With the guest's NICs known, the network files compare like the others.
        let with_nics = compare(&guest, &host, true);
        assert!(with_nics.contains(&(
            "network/10-cloud-init-eth0.network".to_owned(),
            FileState::Missing
        )));
        assert!(with_nics.contains(&(
            "network/10-cloud-init-ens3.network".to_owned(),
            FileState::Extra
        )));
    }
}
