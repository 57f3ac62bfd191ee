//! systemd credentials as the seed: a VM with no seed disk is given its hostname,
//! machine-id and root key by the host as QEMU fw_cfg entries and SMBIOS type 11 strings
//! (what `-fw_cfg`, `-smbios type=11` and libvirt's `<sysinfo>` set), and boots with them,
//! in systemd's order: fw_cfg before SMBIOS.

use anyhow::{Result, ensure};

use super::{Harness, agent_timing_lines};

/// The machine-id the SMBIOS strings give; the machine's own files are not on any seed.
const MACHINE_ID: &str = "c0ffee00c0ffee00c0ffee00c0ffee00";

pub fn credentials(h: &Harness) -> Result<()> {
    let m = h.new_machine("credentials")?;
    let key = h.key.public_line()?;
    let credential = |s: &str| format!("type=11,value=io.systemd.credential:{s}");
    let b = h.boot_with(&m, None, |c| {
        c.seed_iso = None;
        c.extra_args = vec![
            "-fw_cfg".into(),
            "name=opt/io.systemd.credentials/system.hostname,string=from-fw-cfg".into(),
            "-smbios".into(),
            credential("system.hostname=from-smbios"),
            "-smbios".into(),
            credential(&format!("system.machine_id={MACHINE_ID}")),
            "-smbios".into(),
            credential(&format!("ssh.authorized_keys.root={key}")),
        ];
    })?;
    // The login itself used the root key from the SMBIOS strings.
    let hostname = b.ssh.run("cat /etc/hostname; hostname")?;
    ensure!(
        hostname.lines().all(|l| l.trim() == "from-fw-cfg") && hostname.lines().count() == 2,
        "/etc/hostname and the live hostname are not fw_cfg's `from-fw-cfg` (fw_cfg comes before SMBIOS):\n{hostname}"
    );
    let id = b.ssh.run("cat /etc/machine-id")?;
    ensure!(
        id.trim() == MACHINE_ID,
        "/etc/machine-id is '{}', the credential says {MACHINE_ID}",
        id.trim()
    );
    let timing = agent_timing_lines(&b.ssh)?;
    ensure!(
        timing
            .iter()
            .any(|l| l.contains("nixseed initrd: ")
                && l.contains("source credentials:fw_cfg+smbios")),
        "the initrd stage did not apply the credentials from fw_cfg and SMBIOS:\n{}",
        timing.join("\n")
    );
    let twice = b.ssh.run(
        "journalctl -b --no-pager -o cat | grep -c 'credential system.hostname is set twice' || true",
    )?;
    ensure!(
        twice.trim() != "0",
        "the journal does not say that system.hostname was given twice and fw_cfg's value kept"
    );
    eprintln!(
        "vm-tests: {}: hostname from fw_cfg, machine-id and root key from SMBIOS",
        m.name
    );
    b.discard()
}
