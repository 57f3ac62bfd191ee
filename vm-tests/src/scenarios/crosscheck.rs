//! crosscheck: the seed `seedctl seed` writes is a plain NoCloud seed. Real Debian
//! cloud-init, on the cloud-init variant of the same base, must boot it to the same
//! hostname, the same root keys and the very same SSH host key as nixseed does. And a
//! seed of users, passwords, sudo rules and a `!!binary` file ends in the same
//! `/etc/shadow` password fields, `sudo -l`, sshd setting and file bytes under both.

use super::*;
use crate::cmd;
use sha2::Digest;
use std::process::Command;

/// One file of a NoCloud ISO, read back with xorriso (the host kernel cannot mount it).
fn iso_file(iso: &std::path::Path, name: &str, scratch: &std::path::Path) -> Result<String> {
    let out = scratch.join(format!("iso-{name}"));
    let _ = std::fs::remove_file(&out);
    cmd::run(
        Command::new("xorriso")
            .args(["-osirrox", "on", "-indev"])
            .arg(iso)
            .args(["-extract", &format!("/{name}")])
            .arg(&out),
    )?;
    std::fs::read_to_string(&out).with_context(|| format!("reading {name} from {}", iso.display()))
}

pub fn crosscheck(h: &Harness) -> Result<()> {
    let ci = Harness::setup(Variant::CloudInit)?;
    seedctl_seed(&ci)?;
    passwords_as_cloud_init(h, &ci)
}

/// `openssl passwd -6 -salt nixseedxc{a,b,c} {a,b,c}`: three accounts, three hashes.
const HASH_A: &str = "$6$nixseedxca$TBLbrH.Qk0ontUwSqP10HsLWZzVfqL3AINxESFGIvgZyw1YhxxUiOnGb4u3Bohvc1HxoWLb9vTJU9R98bcquN/";
const HASH_B: &str = "$6$nixseedxcb$lgzucBpk/ZSUyO7ycIZgYBJe/5IibdU/dBki3kLbTGZYRucd.pTSzhv9XLpST2PZJI6EwjHNEuuM/liC7yAx1.";
const HASH_C: &str = "$6$nixseedxcc$3tJ7iWT1SjFhnZdUSs6oNGakXBhOHvCCTJSamlY9GWrm6BxUXCm5nm4QF5e5MIuCvD6ZWDHYwgMoORxd4W6140";

/// Where the seed writes binary content (`!!binary`, no `encoding`), as cloud-init's own
/// example writes an executable.
const BLOB: &str = "/var/lib/crosscheck/blob";

/// Every byte value, four times over: NULs and bytes that are not UTF-8 included.
fn blob() -> Vec<u8> {
    (0..1024).map(|i| (i % 256) as u8).collect()
}

/// Accounts the Debian base has, each meeting one rule: the legacy `user:`/`password:`
/// (set, unlocked), an entry with `lock_passwd: false` (set, unlocked), an entry with
/// a hash and the default lock (set, locked), an entry with neither (locked). Two of
/// them with `sudo:` rules, one as a string and one as a list. And a file whose content
/// is `!!binary`.
fn crosscheck_user_data(admin_key: &str, blob_base64: &str) -> String {
    let blob_lines: String = blob_base64
        .lines()
        .map(|l| format!("      {l}\n"))
        .collect();
    format!(
        "#cloud-config\n\
         ssh_authorized_keys:\n  - {admin_key}\n\
         disable_root: false\n\
         user: games\n\
         password: {HASH_A}\n\
         users:\n  \
           - default\n  \
           - {{name: man, hashed_passwd: '{HASH_B}', lock_passwd: false, sudo: 'ALL=(ALL) NOPASSWD:ALL'}}\n  \
           - {{name: lp, hashed_passwd: '{HASH_C}', sudo: ['ALL=(root) /usr/bin/id', 'ALL=(games) ALL']}}\n  \
           - {{name: news}}\n\
         chpasswd: {{expire: false}}\n\
         ssh_pwauth: true\n\
         write_files:\n  \
           - path: {BLOB}\n    \
             permissions: '0755'\n    \
             content: !!binary |\n{blob_lines}"
    )
}

/// `bytes` in base64, 76 characters a line, by coreutils' `base64`.
fn base64_lines(bytes: &[u8]) -> Result<String> {
    use std::io::Write;
    let mut child = std::process::Command::new("base64")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running base64")?;
    child
        .stdin
        .take()
        .context("base64's stdin")?
        .write_all(bytes)?;
    let out = child.wait_with_output()?;
    ensure!(out.status.success(), "base64 failed");
    Ok(String::from_utf8(out.stdout)?)
}

/// One seed of users, passwords and a binary file, booted by real cloud-init and by
/// nixseed: the password fields of `/etc/shadow`, sshd's `PasswordAuthentication` and the
/// file's checksum and mode must agree, and must be what the seed asks for (so two agents
/// doing nothing cannot pass).
fn passwords_as_cloud_init(h: &Harness, ci: &Harness) -> Result<()> {
    let ud = crosscheck_user_data(&h.key.public_line()?, &base64_lines(&blob())?);
    let md = "instance-id: pw-crosscheck\nlocal-hostname: pw-crosscheck\n";
    let mut seen = Vec::new();
    for (harness, name) in [(ci, "pw-cloud-init"), (h, "pw-nixseed")] {
        let m = harness.new_machine(name)?;
        let iso = m.state.join("pw-cidata.iso");
        crate::machine::genisoimage(
            &m.state.join("pw-cidata"),
            &[("user-data", ud.as_bytes()), ("meta-data", md.as_bytes())],
            "cidata",
            &iso,
        )?;
        let b = harness.boot_with(&m, None, |c| c.seed_iso = Some(iso))?;
        if std::ptr::eq(harness, ci) {
            let status = b.ssh.run("cloud-init status --wait --long || true")?;
            ensure!(
                status.contains("status: done"),
                "cloud-init did not finish cleanly:\n{status}"
            );
        }
        let shadow = b
            .ssh
            .run("for u in root games man lp news; do getent shadow $u | cut -d: -f1,2; done")?;
        let sshd = b.ssh.run(
            "sshd -T -C user=root,host=client,addr=10.0.2.2 | grep -i '^passwordauthentication '",
        )?;
        let file = b
            .ssh
            .run(&format!("sha256sum {BLOB}; stat -c '%a %s' {BLOB}"))?;
        // The legacy `user:` is left out: cloud-init gives it the distribution's default
        // user's rule, which nixseed does not know (docs/identity.md, "sudo rules").
        // Neither image resolves its own name here, and the two resolvers word that
        // differently; it is no part of the rules.
        let sudo = b.ssh.run(
            "for u in man lp news; do sudo -l -U $u; done 2>&1 | grep -v '^sudo: unable to resolve host'",
        )?;
        b.discard()?;
        seen.push((
            name,
            format!("{shadow}{file}{sudo}"),
            sshd.to_ascii_lowercase(),
        ));
    }
    let (ci_seen, ours) = (&seen[0], &seen[1]);
    ensure!(
        ci_seen.1 == ours.1 && ci_seen.2 == ours.2,
        "the seed's passwords, sudo rules or binary file differ between cloud-init and nixseed:\n\
         cloud-init:\n{}{}nixseed:\n{}{}",
        ci_seen.1,
        ci_seen.2,
        ours.1,
        ours.2
    );
    let want = format!("games:{HASH_A}\nman:{HASH_B}\nlp:!{HASH_C}\n");
    let blob_sum = sha2::Sha256::digest(blob())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let want_file = format!("{blob_sum}  {BLOB}\n755 1024\n");
    ensure!(
        ours.1.contains(&want)
            && ours.1.contains("news:!")
            && ours.1.contains("User man may run the following commands")
            && ours.1.contains("(ALL) NOPASSWD: ALL")
            && ours.1.contains("(root) /usr/bin/id")
            && ours.1.contains("(games) ALL")
            && ours.1.contains("User news is not allowed to run sudo")
            && ours.1.contains(&want_file)
            && ours.2.contains("yes"),
        "both agents agree, but not on what the seed asks for:\n{}{}",
        ours.1,
        ours.2
    );
    eprintln!(
        "vm-tests: cloud-init and nixseed agree on the seed's passwords, sudo rules, ssh_pwauth and binary file:\n{}{}",
        ours.1, ours.2
    );
    Ok(())
}

/// The seed `seedctl seed` writes, booted by real cloud-init.
fn seedctl_seed(ci: &Harness) -> Result<()> {
    let m = ci.new_machine("crosscheck")?;
    let want_key = m.host_key_pub()?;
    let meta = iso_file(&m.seed_iso, "meta-data", &m.state)?;
    let want_iid = meta
        .lines()
        .find_map(|l| l.strip_prefix("instance-id:"))
        .map(|v| v.trim().trim_matches('"').to_string())
        .with_context(|| format!("no instance-id in the seed's meta-data:\n{meta}"))?;

    // Harness::boot fails at once if sshd ever presents another key than machines/NAME's.
    let b = ci.boot(&m)?;
    let seen = ssh::keyscan(b.ssh.port)
        .with_context(|| format!("ssh-keyscan on port {} got no ed25519 key", b.ssh.port))?;
    ensure!(
        Some(seen.clone()) == ssh::key_type_and_blob(&want_key),
        "cloud-init's sshd presents `{seen}`, machines/{}/ssh_host_ed25519_key.pub is `{want_key}`",
        m.name
    );
    // Logged in as root with the harness key: ssh_authorized_keys + disable_root: false work.
    let whoami = b.ssh.run("id -un")?;
    ensure!(whoami.trim() == "root", "logged in as '{}'", whoami.trim());
    let status = b.ssh.run("cloud-init status --wait --long || true")?;
    ensure!(
        status.contains("status: done"),
        "cloud-init did not finish cleanly:\n{status}"
    );
    // And a new login once cloud-init is done with sshd and the accounts.
    b.ssh
        .login("true")
        .context("no login with the harness key once cloud-init was done")?;
    let iid = b.ssh.run("cat /var/lib/cloud/data/instance-id")?;
    ensure!(
        iid.trim() == want_iid,
        "cloud-init's instance-id is '{}', the seed's meta-data says '{want_iid}'",
        iid.trim()
    );
    let ds = b.ssh.run("cat /run/cloud-init/cloud-id 2>/dev/null; cat /var/lib/cloud/data/result.json 2>/dev/null || true")?;
    ensure!(
        ds.to_ascii_lowercase().contains("nocloud"),
        "cloud-init did not use the NoCloud datasource:\n{ds}"
    );
    let host = b.ssh.run("hostname")?;
    let want_host = m.read("hostname")?;
    ensure!(
        host.trim() == want_host.split('.').next().unwrap_or(&want_host),
        "cloud-init set hostname '{}', machines/{}/hostname says '{want_host}'",
        host.trim(),
        m.name
    );
    let guest_pub = b.ssh.run("cat /etc/ssh/ssh_host_ed25519_key.pub")?;
    ensure!(
        ssh::key_type_and_blob(&guest_pub) == ssh::key_type_and_blob(&want_key),
        "/etc/ssh/ssh_host_ed25519_key.pub in the guest is `{}`",
        guest_pub.trim()
    );
    // The private key on disk is the one from the seed, not a regenerated one.
    let derived = b
        .ssh
        .run("ssh-keygen -y -f /etc/ssh/ssh_host_ed25519_key")?;
    ensure!(
        ssh::key_type_and_blob(&derived) == ssh::key_type_and_blob(&want_key),
        "the guest's private host key derives `{}`, not the machine's key",
        derived.trim()
    );
    let auth = b.ssh.run("cat /root/.ssh/authorized_keys")?;
    let admin = m.read("admin_authorized_keys")?;
    for k in admin.lines().filter(|l| !l.trim().is_empty()) {
        let blob = ssh::key_type_and_blob(k).with_context(|| {
            format!("admin_authorized_keys holds `{k}`, not an OpenSSH public key")
        })?;
        ensure!(
            auth.contains(&blob),
            "root's authorized_keys lacks the admin key `{blob}`:\n{auth}"
        );
    }
    eprintln!(
        "vm-tests: {}: real cloud-init applied the seedctl seed: hostname {}, instance-id {}, host key {}",
        m.name,
        host.trim(),
        iid.trim(),
        seen
    );
    b.discard()
}
