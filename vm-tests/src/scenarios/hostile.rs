//! Hostile or broken seeds on a machine that already has its identity: the VM still boots
//! to sshd with the identity it had, and the journal names the file that was refused.

use super::*;
use crate::machine::{Machine, genisoimage};

/// 100 MB of user-data: far over the agent's 16 MiB cap for one seed file.
const HUGE: usize = 100 * 1024 * 1024;

struct Bad {
    what: &'static str,
    user_data: Vec<u8>,
    /// Text the journal line about user-data must also carry.
    needle: &'static str,
}

fn bad_seeds() -> Vec<Bad> {
    let mut huge = b"#cloud-config\n".to_vec();
    huge.resize(HUGE, b'#');
    vec![
        Bad {
            what: "malformed user-data",
            user_data: b"#cloud-config\nhostname: [unclosed\nssh_authorized_keys: {\n".to_vec(),
            needle: "malformed YAML",
        },
        Bad {
            what: "hostname ../../etc",
            user_data: b"#cloud-config\nhostname: ../../etc\n".to_vec(),
            needle: "../../etc",
        },
        Bad {
            what: "100 MB user-data",
            user_data: huge,
            needle: "byte limit",
        },
    ]
}

/// Boots with `seed` (None: no seed disk) and checks the previous identity answers.
fn boot_expecting_identity(
    h: &Harness,
    m: &Machine,
    seed: Option<PathBuf>,
    hostname: &str,
) -> Result<Booted> {
    let b = h.boot_with(m, Some(&m.host_key_pub()?), |c| c.seed_iso = seed)?;
    let id = b.ssh.run("cat /etc/machine-id")?;
    ensure!(
        id.trim() == m.machine_id()?,
        "machine-id is {} after the bad seed, was {}",
        id.trim(),
        m.machine_id()?
    );
    let got = b.ssh.run("hostname")?;
    ensure!(
        got.trim() == hostname,
        "hostname is '{}' after the bad seed, was '{hostname}'",
        got.trim()
    );
    Ok(b)
}

pub fn hostile(h: &Harness) -> Result<()> {
    let m = h.new_machine("hostile")?;
    let b = h.boot(&m)?;
    let hostname = b.ssh.run("hostname")?.trim().to_string();
    let generation = b.ssh.run("readlink /var/identity/current")?;
    b.poweroff()?;

    for (i, bad) in bad_seeds().into_iter().enumerate() {
        let iso = m.state.join(format!("hostile-{i}.iso"));
        let md = format!("instance-id: hostile-{i}\nlocal-hostname: hostile-{i}\n");
        genisoimage(
            &m.state.join(format!("hostile-{i}")),
            &[("user-data", &bad.user_data), ("meta-data", md.as_bytes())],
            "cidata",
            &iso,
        )?;
        eprintln!("vm-tests: {}: boot with {}", m.name, bad.what);
        let b = boot_expecting_identity(h, &m, Some(iso.clone()), &hostname)
            .with_context(|| format!("with {}", bad.what))?;
        let lines = b
            .ssh
            .run("journalctl -b --no-pager -o cat | grep -F user-data || true")?;
        eprintln!(
            "vm-tests: {}: journal about user-data:\n{}",
            m.name,
            lines.trim_end()
        );
        ensure!(
            lines.lines().any(|l| l.contains(bad.needle)),
            "with {}: no journal line names user-data and '{}'",
            bad.what,
            bad.needle
        );
        let g = b.ssh.run("readlink /var/identity/current")?;
        ensure!(
            g == generation,
            "with {}: the generation moved from {} to {}",
            bad.what,
            generation.trim(),
            g.trim()
        );
        b.poweroff()?;
        let _ = std::fs::remove_file(&iso);
    }

    eprintln!("vm-tests: {}: boot with no seed at all", m.name);
    let b = boot_expecting_identity(h, &m, None, &hostname).context("with no seed")?;
    let g = b.ssh.run("readlink /var/identity/current")?;
    ensure!(
        g == generation,
        "with no seed: the generation moved from {} to {}",
        generation.trim(),
        g.trim()
    );
    // The journal says what was looked at, the seed volume by its label first.
    let said = b
        .ssh
        .run("journalctl -b -o cat | grep -a 'no seed found' || true")?;
    ensure!(
        said.contains("looked at: a filesystem labelled cidata or CIDATA"),
        "with no seed: the journal does not say where the seed was looked for:\n{said}"
    );
    b.poweroff()
}
