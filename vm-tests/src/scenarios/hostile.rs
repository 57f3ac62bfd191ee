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
            // The refusal itself, not only the value echoed.
            needle: r#""../../etc" is not a valid hostname"#,
        },
        Bad {
            what: "100 MB user-data",
            user_data: huge,
            needle: "byte limit",
        },
    ]
}

/// Boots with `seed` (None: no seed disk) and checks the previous identity answers:
/// machine-id, hostname, and the generation (`readlink /var/identity/current`).
fn boot_expecting_identity(
    h: &Harness,
    m: &Machine,
    seed: Option<PathBuf>,
    hostname: &str,
    generation: &str,
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
    let g = b.ssh.run("readlink /var/identity/current")?;
    ensure!(
        g == generation,
        "the generation moved from {} to {}",
        generation.trim(),
        g.trim()
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
        let b = boot_expecting_identity(h, &m, Some(iso.clone()), &hostname, &generation)
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
        b.poweroff()?;
        let _ = std::fs::remove_file(&iso);
    }

    eprintln!("vm-tests: {}: boot with no seed at all", m.name);
    let b = boot_expecting_identity(h, &m, None, &hostname, &generation).context("with no seed")?;
    // The journal says what was looked at, the seed volume by its label first.
    let said = b
        .ssh
        .run("journalctl -b -o cat | grep -a 'no seed found' || true")?;
    ensure!(
        said.contains("looked at: a filesystem labelled cidata or CIDATA"),
        "with no seed: the journal does not say where the seed was looked for:\n{said}"
    );
    full_var(h, &m, b, &hostname, &generation)
}

/// Fills `/var` to the last block, as root (who may use ext4's reserved blocks), so that
/// creating any file with data fails with ENOSPC; run again, it takes what was freed
/// since. Prints the free blocks left, then whether a 2-byte file still fits.
const FILL_VAR: &str = "size=$(stat -f -c %S /var); n=$(( $(stat -f -c %f /var) * size )); i=$(date +%s%N); \
    while [ $n -gt 1048576 ]; do \
      if fallocate -l $n /var/nixseed-test-fill.$i 2>/dev/null; then i=$((i + 1)); \
      else rm -f /var/nixseed-test-fill.$i; n=$((n / 2)); fi; \
    done; \
    dd if=/dev/zero of=/var/nixseed-test-fill.tail$i bs=4k 2>/dev/null; sync; \
    stat -f -c %f /var; \
    if echo x > /var/nixseed-test-probe 2>/dev/null; then echo room; else echo full; fi; \
    rm -f /var/nixseed-test-probe";

const FREE_VAR: &str = "rm -f /var/nixseed-test-fill.* /var/nixseed-test-probe; sync";

/// Fills `/var` (again) and fails unless nothing more fits.
fn fill_var(b: &Booted, when: &str) -> Result<()> {
    let said = b.ssh.run(FILL_VAR)?;
    ensure!(
        said.ends_with("full\n"),
        "{when}: /var is not full after filling it (free blocks, then whether a file fits):\n{said}"
    );
    Ok(())
}

/// `seedctl push` of a new hostname while `/var` is full; `machines/NAME/hostname` is
/// restored whatever happens. Returns whether it succeeded and what it printed.
fn push_new_hostname(h: &Harness, m: &Machine, b: &Booted) -> Result<(bool, String)> {
    let edited = m.dir.join("hostname");
    let before = std::fs::read(&edited).context("reading the machine's hostname")?;
    std::fs::write(&edited, "hostile-pushed\n").context("editing hostname")?;
    let out = super::push::seedctl_on(h, m, "push", 60, &b.vm.config.channel_socket()).and_then(
        |mut c| {
            c.stdin(std::process::Stdio::null())
                .output()
                .context("running seedctl push")
        },
    );
    std::fs::write(&edited, before).context("restoring hostname")?;
    let out = out?;
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), said))
}

/// A full `/var` in a running machine and at the next boot: a push and a guest-agent key
/// change fail with ENOSPC and the file named, the identity stays as it was and the agent
/// keeps serving; a new seed at boot is refused the same way, and applies once space is
/// free. journald keeps its journal in /run meanwhile, so that no vacuum of its own files
/// frees space on `/var` behind the test's back; on the full boot that follows it opens
/// `/var` at its start (the initramfs found it writable), and only logs that its file
/// cannot grow.
fn full_var(h: &Harness, m: &Machine, b: Booted, hostname: &str, generation: &str) -> Result<()> {
    eprintln!("vm-tests: {}: fill /var", m.name);
    b.ssh.run("journalctl --relinquish-var")?;
    fill_var(&b, "before the push")?;

    let (pushed, said) = push_new_hostname(h, m, &b)?;
    eprintln!(
        "vm-tests: {}: seedctl push on a full /var: {}",
        m.name,
        said.trim()
    );
    ensure!(!pushed, "seedctl push succeeded on a full /var:\n{said}");
    ensure!(
        said.lines().any(names_file_and_enospc),
        "seedctl push on a full /var does not name the file and ENOSPC on one line:\n{said}"
    );

    // The guest agent: a key change needs a generation too; it fails and the agent serves on.
    let refused_key = ClientKey::ensure(&m.state.join("full-var-key"))?.public_line()?;
    {
        let mut q =
            crate::qga_client::Qga::connect(&b.vm.config.qga_socket(), Duration::from_secs(60))?;
        let reply = q.execute(&serde_json::json!({
            "execute": "guest-ssh-add-authorized-keys",
            "arguments": {"username": "root", "keys": [refused_key.trim()]},
        }))?;
        eprintln!(
            "vm-tests: {}: guest-ssh-add-authorized-keys on a full /var: {reply}",
            m.name
        );
        let desc = reply["error"]["desc"].as_str().unwrap_or_default();
        ensure!(
            names_file_and_enospc(desc),
            "guest-ssh-add-authorized-keys on a full /var answered {reply}"
        );
        q.ping()
            .context("guest-ping after the refused key change")?;
    }
    let after = b.ssh.run(
        "hostname; readlink /var/identity/current; ls -a /var/identity | grep -c '^\\.tmp' || true",
    )?;
    ensure!(
        after == format!("{hostname}\n{}0\n", generation),
        "after the refused push and key change (want hostname, {}, no temporary generation):\n{after}",
        generation.trim()
    );
    // Full still, and journald off /var until the power-off.
    fill_var(&b, "before the power-off")?;
    b.poweroff()?;

    // The next boot brings a new instance: refused by name, the identity stays.
    let iso = m.state.join("hostile-full.iso");
    let md = "instance-id: hostile-full\nlocal-hostname: hostile-full\n";
    let ud = format!(
        "#cloud-config\nssh_authorized_keys:\n  - {}\n",
        h.key.public_line()?.trim()
    );
    genisoimage(
        &m.state.join("hostile-full"),
        &[("user-data", ud.as_bytes()), ("meta-data", md.as_bytes())],
        "cidata",
        &iso,
    )?;
    eprintln!("vm-tests: {}: boot a new instance on a full /var", m.name);
    let b = boot_expecting_identity(h, m, Some(iso.clone()), hostname, generation)
        .context("with a full /var")?;
    let said = b
        .ssh
        .run("journalctl -b --no-pager -o cat | grep -a 'cannot write a new generation' || true")?;
    eprintln!("vm-tests: {}: on a full /var:\n{}", m.name, said.trim_end());
    ensure!(
        said.lines().any(names_file_and_enospc),
        "with a full /var: no journal line names the file and ENOSPC:\n{said}"
    );

    b.ssh.run(FREE_VAR)?;
    b.poweroff()?;
    eprintln!("vm-tests: {}: the same seed with /var freed", m.name);
    let b = h.boot_with(m, Some(&m.host_key_pub()?), |c| {
        c.seed_iso = Some(iso.clone())
    })?;
    let now = b.ssh.run("hostname; readlink /var/identity/current")?;
    let lines: Vec<&str> = now.lines().collect();
    ensure!(
        matches!(lines[..], ["hostile-full", g] if g.starts_with("gen-") && g != generation.trim()),
        "with /var freed, the new instance did not apply (want hostile-full and a generation after {}):\n{now}",
        generation.trim()
    );
    let _ = std::fs::remove_file(&iso);
    b.discard()
}

/// One line that says ENOSPC and names a path below `/var/identity/` (the file, or the
/// generation directory it was going into), not the bare store directory.
fn names_file_and_enospc(line: &str) -> bool {
    line.contains("No space left on device")
        && line.split("/var/identity/").skip(1).any(|rest| {
            rest.chars()
                .next()
                .is_some_and(|c| !c.is_whitespace() && c != ':')
        })
}

#[cfg(test)]
mod tests {
    use super::names_file_and_enospc;

    #[test]
    fn the_file_and_enospc_on_one_line() {
        assert!(names_file_and_enospc(
            "cannot write /var/identity/.tmp-3/hostname: No space left on device (os error 28)"
        ));
        assert!(!names_file_and_enospc(
            "cannot write under /var/identity/: No space left on device"
        ));
        assert!(!names_file_and_enospc("/var/identity/gen-2/hostname"));
    }
}
