//! guest-ssh-{get,add,remove}-authorized-keys on nixseed's identity files: the admin
//! account (`--admin-user`, root by default) uses `admin_authorized_keys`, the one
//! `--ssh-user` account `user_authorized_keys` (sshd matches each file to its account);
//! any other account is refused. An add that leaves the set unchanged writes nothing. In an identity store a change is a new
//! generation: the current identity with that one file changed, durable before `current`
//! moves to it, so every generation's manifest stays true to its files (the next boot,
//! `status` and a rollback verify them) and sshd, reading through `current`, sees the keys
//! at once. `/etc` (machine-id, hostname, resolv.conf, hosts: the same in both) stays
//! bound from the generation it was bound from, which the prune then keeps. The next
//! seed-driven generation supersedes it. Outside a store the file is
//! replaced atomically (temporary file, fsync, rename, fsync of the directory).

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nixseed_core::identity::{IdentityFile, mode_of};
use nixseed_core::qga::{Args, QgaError};
use serde_json::json;

use super::{Agent, CmdResult, io_text};

fn keys_file(agent: &Agent, username: &str) -> Result<PathBuf, QgaError> {
    nix::unistd::User::from_name(username)
        .ok()
        .flatten()
        .ok_or_else(|| QgaError::generic(format!("failed to lookup user '{username}': Success")))?;
    let config = &agent.config;
    let name = if username == config.admin_user {
        "admin_authorized_keys"
    } else if config.ssh_user.as_deref() == Some(username) {
        "user_authorized_keys"
    } else {
        // A shared file for every other account would let one account's keys log in as
        // another; sshd reads the identity's files only for these two accounts.
        return Err(QgaError::generic(format!(
            "user '{username}' has no keys in the identity: only '{}' (admin_authorized_keys){} are kept there",
            config.admin_user,
            config
                .ssh_user
                .as_deref()
                .map(|u| format!(" and '{u}' (user_authorized_keys)"))
                .unwrap_or_default()
        )));
    };
    Ok(config.identity_dir.join(name))
}

fn read_keys(path: &Path) -> Result<Vec<String>, QgaError> {
    match std::fs::read_to_string(path) {
        Ok(t) => Ok(t
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(String::from)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(QgaError::generic(format!(
            "failed to read '{}': {}",
            path.display(),
            io_text(&e)
        ))),
    }
}

fn write_atomic(path: &Path, text: &str) -> Result<(), QgaError> {
    let fail = |what: &str, e: std::io::Error| {
        QgaError::generic(format!(
            "failed to {what} '{}': {}",
            path.display(),
            io_text(&e)
        ))
    };
    let target = match std::fs::read_link(path) {
        Ok(t) if t.is_absolute() => t,
        Ok(t) => path.parent().unwrap_or(Path::new("/")).join(t),
        Err(_) => path.to_path_buf(),
    };
    let dir = target.parent().unwrap_or(Path::new("/"));
    std::fs::create_dir_all(dir).map_err(|e| fail("create the directory of", e))?;
    let tmp = dir.join(format!(
        ".{}.tmp",
        target
            .file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default()
    ));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o644)
        .open(&tmp)
        .map_err(|e| fail("write", e))?;
    f.write_all(text.as_bytes()).map_err(|e| fail("write", e))?;
    f.sync_all().map_err(|e| fail("sync", e))?;
    drop(f);
    std::fs::rename(&tmp, &target).map_err(|e| fail("replace", e))?;
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| fail("sync the directory of", e))?;
    Ok(())
}

/// Saves `keys` as the file `path` names: a new generation when `path` is a name in an
/// identity store with a current generation, the plain file otherwise.
fn save_keys(agent: &Agent, path: &Path, keys: &[String]) -> Result<(), QgaError> {
    let mut text = keys.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    let fail = |e: anyhow::Error| {
        QgaError::generic(format!("failed to update '{}': {e:#}", path.display()))
    };
    let dir = &agent.config.identity_dir;
    if !looks_like_store(dir) {
        return write_atomic(path, &text);
    }
    // In a store, never the plain file: that would write through the flat link into the
    // current generation, or make `current` a directory when the link dangles.
    let _one = crate::identity_lock::for_guest_agent_command()
        .map_err(|e| QgaError::generic(format!("failed to update '{}': {e}", path.display())))?;
    let store = crate::store::Store::open(dir, false).map_err(fail)?;
    let generation = store.current().map_err(fail)?.ok_or_else(|| {
        fail(anyhow::anyhow!(
            "{} has no current generation; keys can be changed once an identity is applied",
            dir.display()
        ))
    })?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let mut tree = generation.tree;
    tree.insert(
        name.clone(),
        IdentityFile {
            mode: mode_of(&name),
            bytes: text.into_bytes(),
        },
    );
    // /etc stays bound from the generation it was bound from (the files it shows there
    // are the same); that one is kept until a seed or a rollback moves the binds.
    let bound = crate::stage::bound_generation(Path::new("/run"), &dir.to_string_lossy());
    let n = store
        .write_generation_keeping(
            &tree,
            generation.manifest,
            crate::store::Durability::Now,
            bound,
        )
        .map_err(fail)?;
    tracing::info!(
        "{}: generation {n} (generation {} with {name} changed)",
        agent.config.identity_dir.display(),
        generation.number
    );
    Ok(())
}

/// An identity store: a `current` link or a generation directory is there.
fn looks_like_store(dir: &Path) -> bool {
    dir.join("current").symlink_metadata().is_ok()
        || std::fs::read_dir(dir).is_ok_and(|entries| {
            entries
                .flatten()
                .any(|e| e.file_name().to_string_lossy().starts_with("gen-"))
        })
}

/// qemu-ga's check of the keys, made before the user is looked up: a comment (`#` first)
/// or a key with a line break inside would not be one line of authorized_keys. A `\r`
/// is refused too (qemu-ga writes it).
fn check_keys(keys: &[String]) -> Result<(), QgaError> {
    match keys
        .iter()
        .find(|k| k.starts_with('#') || k.contains(['\n', '\r']))
    {
        Some(k) => Err(QgaError::generic(format!(
            "invalid OpenSSH public key: '{k}'"
        ))),
        None => Ok(()),
    }
}

/// The keys to act on, trimmed. Blank entries are skipped: `virsh set-user-sshkeys --file`
/// splits the file on newlines and sends the empty string after the last one (qemu-ga
/// accepts it too).
fn usable_keys(keys: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(keys.len());
    for k in keys {
        let k = k.trim();
        if !k.is_empty() {
            out.push(k.to_string());
        }
    }
    out
}

pub fn get(agent: &mut Agent, mut args: Args) -> CmdResult {
    let username = args.str("username")?;
    args.finish()?;
    let path = keys_file(agent, &username)?;
    Ok(Some(json!({ "keys": read_keys(&path)? })))
}

pub fn add(agent: &mut Agent, mut args: Args) -> CmdResult {
    let username = args.str("username")?;
    let keys = args.str_list("keys")?;
    let reset = args.opt_bool("reset")?.unwrap_or(false);
    args.finish()?;
    check_keys(&keys)?;
    let path = keys_file(agent, &username)?;
    let keys = usable_keys(keys);
    let before = read_keys(&path)?;
    let mut all = if reset { Vec::new() } else { before.clone() };
    for k in keys {
        if !all.contains(&k) {
            all.push(k);
        }
    }
    // KubeVirt resends the same keys with `reset` every few minutes: an unchanged set is
    // no new generation (it would push the one before a push out of the store).
    let same = all.len() == before.len() && all.iter().all(|k| before.contains(k));
    if same {
        return Ok(Some(json!({})));
    }
    save_keys(agent, &path, &all)?;
    tracing::info!(
        "{}: {} key(s) after guest-ssh-add-authorized-keys",
        path.display(),
        all.len()
    );
    Ok(Some(json!({})))
}

pub fn remove(agent: &mut Agent, mut args: Args) -> CmdResult {
    let username = args.str("username")?;
    let keys = args.str_list("keys")?;
    args.finish()?;
    check_keys(&keys)?;
    let path = keys_file(agent, &username)?;
    let keys = usable_keys(keys);
    let before = read_keys(&path)?;
    let after: Vec<String> = before
        .iter()
        .filter(|l| !keys.contains(l))
        .cloned()
        .collect();
    if after.len() != before.len() {
        save_keys(agent, &path, &after)?;
    }
    Ok(Some(json!({})))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blank_entries_are_skipped_and_line_breaks_refused() {
        // What virsh sends for a key file ending in a newline.
        let keys = vec!["ssh-ed25519 AAAA k1 ".to_string(), String::new()];
        assert!(check_keys(&keys).is_ok());
        assert_eq!(usable_keys(keys), vec!["ssh-ed25519 AAAA k1".to_string()]);
        assert_eq!(
            check_keys(&["ssh-ed25519 AAAA\r".to_string()]).map_err(|e| e.desc),
            Err("invalid OpenSSH public key: 'ssh-ed25519 AAAA\r'".to_string())
        );
        assert_eq!(usable_keys(vec![" ".to_string()]), Vec::<String>::new());
    }
}
