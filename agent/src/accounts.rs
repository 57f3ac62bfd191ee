//! The seed's account settings on a read-only `/etc` (docs/identity.md, "Passwords"):
//! `/etc/shadow` composed from the image's file and bound over it, sshd's `ssh_pwauth`
//! drop-in under `<run>/nixseed/sshd_config.d`, and the `sudo:` rules under
//! `<run>/nixseed/sudoers.d`. Part of every bind of a
//! generation: the initrd stage, stage 2 doing the whole job, a push; and a password set
//! through the guest agent where chpasswd cannot write.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use nixseed_core::identity;
use nixseed_core::shadow::{self, Accounts, AgentPasswords};

use crate::mounts;

const SHADOW: &str = "shadow";
/// The drop-in an image's sshd_config includes first (`Include
/// /run/nixseed/sshd_config.d/*.conf`), so that it wins over the image's own setting.
const SSHD_DROPIN_DIR: &str = "sshd_config.d";
const SSHD_DROPIN: &str = "ssh_pwauth.conf";
/// The directory an image's sudoers includes (`@includedir /run/nixseed/sudoers.d`), and
/// the file in it (sudo skips names with a `.`).
const SUDOERS_DIR: &str = "sudoers.d";
const SUDOERS: &str = "90-nixseed-users";

/// A JSON file that may be absent (then there is nothing to apply): `parse`d, or an error
/// naming the file and saying what is then `not_applied`.
fn read_optional<T: Default>(
    path: &Path,
    parse: impl Fn(&[u8], &str) -> Result<T, String>,
    not_applied: &str,
) -> Result<T> {
    match std::fs::read(path) {
        Ok(bytes) => parse(&bytes, &path.display().to_string())
            .map_err(|e| anyhow::anyhow!("{e}; {not_applied} not applied")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The generation's `users.json`, or nothing to apply when it has none.
pub fn read(gen_dir: &Path) -> Result<Accounts> {
    read_optional(
        &gen_dir.join(identity::USERS),
        Accounts::parse,
        "passwords and ssh_pwauth",
    )
}

/// Where passwords set through the guest agent are kept, under the target root.
const AGENT_PASSWORDS: &str = "var/lib/nixseed/passwords.json";

/// What `/etc/shadow` and sshd take from a generation: its `users.json`, and the
/// passwords set through the guest agent while the machine had its instance-id.
struct Settings {
    accounts: Accounts,
    agent: BTreeMap<String, String>,
}

impl Settings {
    fn load(gen_dir: &Path, sysroot: &Path) -> Result<Settings> {
        let accounts = read(gen_dir)?;
        let record = agent_passwords(sysroot)?;
        let agent = if record.passwords.is_empty() {
            BTreeMap::new()
        } else {
            record.for_instance(instance_id(gen_dir).as_deref())
        };
        Ok(Settings { accounts, agent })
    }

    fn touches_shadow(&self) -> bool {
        self.accounts.touches_shadow() || !self.agent.is_empty()
    }

    fn compose(&self, image: &str) -> shadow::ComposedShadow {
        shadow::compose(image, &self.accounts, &self.agent)
    }
}

/// The generation's instance-id (from its manifest; empty when it cannot be read), or
/// `None` when there is no generation, as on a machine that never had a seed.
fn instance_id(gen_dir: &Path) -> Option<String> {
    if !gen_dir.exists() {
        return None;
    }
    let manifest = std::fs::read(gen_dir.join("manifest.json"))
        .ok()
        .and_then(|b| serde_json::from_slice::<nixseed_core::manifest::Manifest>(&b).ok());
    Some(manifest.map(|m| m.instance_id).unwrap_or_default())
}

fn agent_passwords(sysroot: &Path) -> Result<AgentPasswords> {
    read_optional(
        &sysroot.join(AGENT_PASSWORDS),
        AgentPasswords::parse,
        "passwords set through the guest agent",
    )
}

/// Whether `/etc` shows generation `gen_dir`'s password settings (stage 2's check):
/// `/etc/shadow` is bound when they change the image's file, and only then, and what is
/// bound there is the image's file (its copy in `<nixseed_run>/shadow.base`) with them,
/// not an earlier generation's left by a bind that failed.
pub fn shadow_bound_as_needed(
    gen_dir: &Path,
    sysroot: &Path,
    nixseed_run: &Path,
    mounted: &[PathBuf],
) -> bool {
    let target = sysroot.join("etc").join(SHADOW);
    let bound = mounted.iter().any(|m| m == &target);
    if link_target(&target).is_some() {
        return !bound;
    }
    let Ok(settings) = Settings::load(gen_dir, sysroot) else {
        return false;
    };
    if !settings.touches_shadow() {
        return !bound;
    }
    let shown = std::fs::read_to_string(&target);
    if bound {
        let base = std::fs::read_to_string(nixseed_run.join(format!("{SHADOW}.base")));
        return match (base, shown) {
            (Ok(base), Ok(shown)) => settings.compose(&base).text == shown,
            _ => false,
        };
    }
    match shown {
        Ok(image) => settings.compose(&image).text == image,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

/// Why a password could not be set through the guest agent.
#[derive(Debug, thiserror::Error)]
pub enum SetPasswordError {
    #[error("no account '{0}' in the image's /etc/shadow")]
    NoAccount(String),
    #[error(transparent)]
    Failed(#[from] anyhow::Error),
}

/// `guest-set-user-password` on a read-only `/etc`: records `user`'s hash on `/var` for
/// the current instance (written whole and synced before it counts) and binds
/// `/etc/shadow` again with it. The caller holds the identity lock (a push binds too).
pub fn set_agent_password(
    identity_dir: &Path,
    user: &str,
    hash: &str,
) -> Result<(), SetPasswordError> {
    let sysroot = Path::new("/");
    let gen_dir = identity_dir.join("current");
    let nixseed_run = Path::new("/run/nixseed");
    let mounted = mounts::mount_points()?;
    let target = sysroot.join("etc").join(SHADOW);
    let is_bound = mounted.iter().any(|m| m == &target);
    if let Some(to) = link_target(&target) {
        return Err(anyhow::anyhow!(
            "{} is a link to {}, which nixseed leaves to the image's own account tool",
            target.display(),
            to.display()
        )
        .into());
    }
    std::fs::create_dir_all(nixseed_run)
        .with_context(|| format!("cannot create {}", nixseed_run.display()))?;
    let image = image_shadow(&target, nixseed_run, is_bound)?;
    let record = agent_passwords(sysroot)?.with(instance_id(&gen_dir).as_deref(), user, hash);
    let check = shadow::compose(&image.text, &Accounts::default(), &record.passwords);
    if check.missing.iter().any(|m| m == user) {
        return Err(SetPasswordError::NoAccount(user.to_string()));
    }
    let path = sysroot.join(AGENT_PASSWORDS);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let before = std::fs::read(&path).ok();
    let bytes = serde_json::to_vec_pretty(&record).context("cannot encode the passwords")?;
    write_durably(&path, &bytes)?;
    let bound = mounts::mount_points().and_then(|m| bind(&gen_dir, sysroot, nixseed_run, &m));
    if let Err(e) = bound {
        // A command that failed leaves no password behind for the next boot.
        let undone = match before {
            Some(old) => write_durably(&path, &old),
            None => remove_if_present(&path),
        };
        if let Err(u) = undone {
            tracing::warn!("{u:#}");
        }
        return Err(e.into());
    }
    Ok(())
}

/// `write_private` (mode 0600), then the directory synced, so the file survives a power cut.
fn write_durably(path: &Path, bytes: &[u8]) -> Result<()> {
    write_private(path, bytes, 0o600, 0)?;
    let dir = path.parent().unwrap_or(Path::new("/"));
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("cannot sync {}", dir.display()))
}

/// Where `path` links to, when it is a symbolic link. Such a `/etc/shadow` is left alone:
/// the file it names belongs to a tool that rewrites it, and an absolute link does not
/// even resolve under `/sysroot` in the initrd.
fn link_target(path: &Path) -> Option<PathBuf> {
    std::fs::read_link(path).ok()
}

/// Takes the seed's `/etc/shadow` away: the image's file shows again.
fn unbind_shadow(target: &Path, composed: &Path, is_bound: bool) -> Result<()> {
    if is_bound {
        rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH)
            .with_context(|| format!("cannot unmount the seed's {} bind", target.display()))?;
    }
    remove_if_present(composed)
}

/// A boot with no generation (a machine that never had a seed): `/etc/shadow` shows the
/// passwords set through the guest agent while it had none, as a generation's bind would
/// show them over its own settings. Nothing is bound when there are none.
pub fn bind_without_generation(gen_dir: &Path, opts: &crate::stage::StageOptions) -> Result<()> {
    let record = agent_passwords(&opts.sysroot)?;
    if record
        .for_instance(instance_id(gen_dir).as_deref())
        .is_empty()
    {
        return Ok(());
    }
    let nixseed_run = opts.run.join("nixseed");
    std::fs::create_dir_all(&nixseed_run)
        .with_context(|| format!("cannot create {}", nixseed_run.display()))?;
    bind(
        gen_dir,
        &opts.sysroot,
        &nixseed_run,
        &mounts::mount_points()?,
    )
}

/// Applies generation `gen_dir`'s settings; a generation without them takes away what an
/// earlier one applied. Accounts the image lacks are named in a warning. A running
/// system's binds (a push, a guest-agent command) are made under the identity lock
/// (`identity_lock`), one at a time.
pub fn bind(gen_dir: &Path, sysroot: &Path, nixseed_run: &Path, mounted: &[PathBuf]) -> Result<()> {
    let settings = Settings::load(gen_dir, sysroot)?;
    sshd_dropin(nixseed_run, settings.accounts.ssh_pwauth)?;
    sudo_rules(
        nixseed_run,
        &settings.accounts,
        &gen_dir.join(identity::USERS),
    )?;

    let target = sysroot.join("etc").join(SHADOW);
    let composed_path = nixseed_run.join(SHADOW);
    let is_bound = mounted.iter().any(|m| m == &target);
    if !settings.touches_shadow() {
        return unbind_shadow(&target, &composed_path, is_bound);
    }
    if let Some(to) = link_target(&target) {
        tracing::warn!(
            "{}: a link to {} (the image's own account tool keeps the file, as NixOS's userborn does): the seed's passwords are not applied",
            target.display(),
            to.display()
        );
        return Ok(());
    }
    if !target.exists() {
        tracing::warn!(
            "{}: the image has no such file; the seed's passwords are not applied",
            target.display()
        );
        return Ok(());
    }
    let image = image_shadow(&target, nixseed_run, is_bound)?;
    let composed = settings.compose(&image.text);
    let origin = gen_dir.join(identity::USERS);
    for name in &composed.missing {
        tracing::warn!(
            "{}: no account '{name}' in the image's {}: its password is not applied (nixseed makes no accounts; declare it in the image)",
            origin.display(),
            target.display()
        );
    }
    for name in &composed.refused {
        tracing::warn!(
            "{}: the password hash for '{name}' holds ':' or a control character: not applied",
            origin.display()
        );
    }
    if composed.text == image.text {
        // Nothing to change (seedctl's locked `user`, an account already locked): the
        // image's file serves, with no bind.
        return unbind_shadow(&target, &composed_path, image.still_bound);
    }
    // `image_shadow` may have taken an old bind away already.
    let mounted: Vec<PathBuf> = mounted
        .iter()
        .filter(|m| image.still_bound || *m != &target)
        .cloned()
        .collect();
    write_private(
        &composed_path,
        composed.text.as_bytes(),
        image.mode,
        image.gid,
    )?;
    mounts::bind_readonly(&composed_path, &target, &mounted)?;
    if !composed.changed.is_empty() {
        tracing::info!(
            "{}: password settings from the seed for {}",
            target.display(),
            composed.changed.join(", ")
        );
    }
    Ok(())
}

/// The image's own `/etc/shadow`, with its mode and group, kept in
/// `<run>/nixseed/shadow.base` (root only) the first time, before anything is bound over it.
struct ImageShadow {
    text: String,
    mode: u32,
    gid: u32,
    /// Whether an earlier bind is still over the image's file.
    still_bound: bool,
}

fn image_shadow(target: &Path, nixseed_run: &Path, is_bound: bool) -> Result<ImageShadow> {
    let copy = nixseed_run.join(format!("{SHADOW}.base"));
    let meta_of =
        |p: &Path| std::fs::metadata(p).with_context(|| format!("cannot stat {}", p.display()));
    if copy.exists() {
        let text = std::fs::read_to_string(&copy)
            .with_context(|| format!("cannot read {}", copy.display()))?;
        // The bind shows the composed file, which has the image's mode and group.
        let meta = meta_of(target)?;
        return Ok(ImageShadow {
            text,
            mode: meta.mode() & 0o7777,
            gid: meta.gid(),
            still_bound: is_bound,
        });
    }
    if is_bound {
        // A bind without its base (a /run emptied by hand): take it away to read the
        // image's file again.
        rustix::mount::unmount(target, rustix::mount::UnmountFlags::DETACH)
            .with_context(|| format!("cannot unmount the old bind at {}", target.display()))?;
    }
    let text = std::fs::read_to_string(target)
        .with_context(|| format!("cannot read the image's {}", target.display()))?;
    let meta = meta_of(target)?;
    write_private(&copy, text.as_bytes(), 0o600, 0)?;
    Ok(ImageShadow {
        text,
        mode: meta.mode() & 0o7777,
        gid: meta.gid(),
        still_bound: false,
    })
}

/// Writes `bytes` to `path` through a temporary file created with no access for others,
/// then given `mode` and group `gid`: a password hash is never readable by more than
/// the final file allows, not even for a moment.
fn write_private(path: &Path, bytes: &[u8], mode: u32, gid: u32) -> Result<()> {
    let tmp = path.with_extension("tmp");
    remove_if_present(&tmp)?;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot create {}", tmp.display()))?;
    f.write_all(bytes)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::os::unix::fs::fchown(&f, None, Some(gid))
        .with_context(|| format!("cannot give {} group {gid}", tmp.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))
        .and_then(|_| f.sync_all())
        .with_context(|| format!("cannot set the mode of {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("cannot rename {} into place", tmp.display()))
}

/// Removes `path`; one that is not there is no error.
pub(crate) fn remove_if_present(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("cannot remove {}", path.display()))
        }
        _ => Ok(()),
    }
}

/// `<run>/nixseed/sshd_config.d/ssh_pwauth.conf`, present only when the seed says.
fn sshd_dropin(nixseed_run: &Path, ssh_pwauth: Option<bool>) -> Result<()> {
    let dir = nixseed_run.join(SSHD_DROPIN_DIR);
    let path = dir.join(SSHD_DROPIN);
    match ssh_pwauth {
        Some(on) => {
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            crate::stage::write_atomic(&path, shadow::sshd_dropin(on).as_bytes())?;
            let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644));
            Ok(())
        }
        None => remove_if_present(&path),
    }
}

/// `<run>/nixseed/sudoers.d/90-nixseed-users` (root's, mode 0440, as sudo wants it),
/// present only when the seed has rules. The directory is always there, so that an
/// image's `@includedir` finds it.
fn sudo_rules(nixseed_run: &Path, accounts: &Accounts, origin: &Path) -> Result<()> {
    let dir = nixseed_run.join(SUDOERS_DIR);
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join(SUDOERS);
    let rules = shadow::sudoers(accounts);
    for why in &rules.refused {
        tracing::warn!("{}: sudo rules for {why}: not applied", origin.display());
    }
    match rules.text {
        Some(text) => write_private(&path, text.as_bytes(), 0o440, 0),
        None => remove_if_present(&path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The composed file has the image's mode and group from its first byte on, and the
    /// kept copy of the image's file is root's alone.
    #[test]
    fn composed_files_keep_the_image_s_mode_and_are_never_world_readable() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("shadow");
        let gid = nix::unistd::getgid().as_raw();
        write_private(&p, b"root:*:1::::::\n", 0o640, gid).unwrap();
        let meta = std::fs::metadata(&p).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o640);
        assert_eq!(meta.gid(), gid);
        // Written again over a stale temporary file (a power cut mid-write).
        std::fs::write(p.with_extension("tmp"), b"stale").unwrap();
        write_private(&p, b"root:!:1::::::\n", 0o600, gid).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"root:!:1::::::\n");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o7777, 0o600);
        assert!(!p.with_extension("tmp").exists());
    }

    /// The sshd drop-in follows the generation: written when the seed sets ssh_pwauth,
    /// gone when a later generation does not.
    #[test]
    fn the_sshd_dropin_comes_and_goes_with_ssh_pwauth() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(SSHD_DROPIN_DIR).join(SSHD_DROPIN);
        sshd_dropin(dir.path(), Some(true)).unwrap();
        assert!(
            std::fs::read_to_string(&file)
                .unwrap()
                .contains("PasswordAuthentication yes")
        );
        sshd_dropin(dir.path(), None).unwrap();
        assert!(!file.exists());
        sshd_dropin(dir.path(), None).unwrap();
    }

    /// A users.json that cannot be read as JSON names itself, and nothing is applied.
    #[test]
    fn a_broken_users_json_is_named() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(identity::USERS), b"{").unwrap();
        let e = read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("users.json") && e.contains("not applied"), "{e}");
        assert!(!shadow_bound_as_needed(
            dir.path(),
            dir.path(),
            dir.path(),
            &[]
        ));
    }
}
