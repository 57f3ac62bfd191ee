//! The seed's password settings over the image's `/etc/shadow`: the initrd stage (and a
//! push) binds the composed file over the read-only one, as it composes `/etc/hosts`.
//! nixseed never creates accounts; an account the image lacks is reported, not made.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `users.json`, as `identity::build` writes it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct Accounts {
    #[serde(default)]
    pub users: Vec<AccountEntry>,
    #[serde(default)]
    pub ssh_pwauth: Option<bool>,
    /// User name → crypt hash (`chpasswd:`, and cloud-init runs it after `users:`).
    #[serde(default)]
    pub chpasswd: BTreeMap<String, String>,
}

/// One `users:` entry (or the legacy `user:`), the fields that touch `/etc/shadow`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AccountEntry {
    pub name: String,
    #[serde(default)]
    pub passwd: Option<String>,
    #[serde(default)]
    pub lock_passwd: Option<bool>,
}

impl Accounts {
    /// Reads `users.json`; `origin` names the file in the error.
    pub fn parse(bytes: &[u8], origin: &str) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("{origin}: {e}"))
    }

    /// Whether anything here changes `/etc/shadow`: a hash, or a lock (cloud-init locks a
    /// `users:` entry's password unless it says `lock_passwd: false`).
    pub fn touches_shadow(&self) -> bool {
        !self.chpasswd.is_empty()
            || self
                .users
                .iter()
                .any(|u| u.passwd.is_some() || u.lock_passwd.unwrap_or(true))
    }
}

/// The composed `/etc/shadow` and what happened to each account named.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ComposedShadow {
    pub text: String,
    /// Accounts whose password field changed, in the order of the file.
    pub changed: Vec<String>,
    /// Accounts given a password hash that the image does not have.
    pub missing: Vec<String>,
    /// Accounts whose hash could not go in the file (a `:` or a control character would
    /// split or add a line); their lines stay as the image has them.
    pub refused: Vec<String>,
}

/// Whether `hash` fits in the password field of one `/etc/shadow` line.
fn fits_a_field(hash: &str) -> bool {
    !hash.is_empty() && !hash.chars().any(|c| c == ':' || c.is_control())
}

/// The image's `/etc/shadow` with the seed's settings, in cloud-init's order: each
/// `users:` entry's hash, then its lock (`!` before the hash; the default for an entry),
/// then `chpasswd:` (a hash, unlocked, as `chpasswd -e` writes it). Lines that are not
/// accounts (comments, blanks, a malformed line) are kept as they are.
pub fn compose(image: &str, accounts: &Accounts) -> ComposedShadow {
    let mut lines: Vec<Vec<String>> = image
        .lines()
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect();
    let mut missing = Vec::new();
    let mut changed = Vec::new();
    let mut refused = Vec::new();
    let mut set = |name: &str, hash: Option<&str>, lock: bool, missing: &mut Vec<String>| {
        if hash.is_some_and(|h| !fits_a_field(h)) {
            refused.push(name.to_string());
            return;
        }
        let Some(fields) = lines
            .iter_mut()
            .find(|f| f.len() >= 2 && f[0] == name && !name.starts_with('#'))
        else {
            if hash.is_some() && !missing.iter().any(|m| m == name) {
                missing.push(name.to_string());
            }
            return;
        };
        let before = fields[1].clone();
        if let Some(h) = hash {
            fields[1] = h.to_string();
        }
        if lock && !fields[1].starts_with('!') {
            fields[1].insert(0, '!');
        }
        if fields[1] != before && !changed.iter().any(|c| c == name) {
            changed.push(name.to_string());
        }
    };
    for u in &accounts.users {
        set(
            &u.name,
            u.passwd.as_deref(),
            u.lock_passwd.unwrap_or(true),
            &mut missing,
        );
    }
    for (name, hash) in &accounts.chpasswd {
        set(name, Some(hash), false, &mut missing);
    }
    let mut text: String = lines
        .iter()
        .map(|f| f.join(":"))
        .collect::<Vec<_>>()
        .join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    ComposedShadow {
        text,
        changed,
        missing,
        refused,
    }
}

/// The sshd drop-in for `ssh_pwauth` (cloud-init sets only `PasswordAuthentication`).
pub fn sshd_dropin(ssh_pwauth: bool) -> String {
    format!(
        "# From the seed's ssh_pwauth (nixseed).\nPasswordAuthentication {}\n",
        if ssh_pwauth { "yes" } else { "no" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Debian-like image file: root with no password, a service account, a user.
    const IMAGE: &str =
        "root:*:19000:0:99999:7:::\ndaemon:*:19000:0:99999:7:::\nops:!:19000:0:99999:7:::\n";
    const HASH: &str = "$5$nixseedpve$KRN7lXrCGhZIyeaocO.FhOwr16dk38tWWLprGB.zZO5";

    fn accounts(json: &str) -> Accounts {
        Accounts::parse(json.as_bytes(), "users.json").unwrap()
    }

    fn field(text: &str, user: &str) -> String {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{user}:")))
            .and_then(|rest| rest.split(':').next())
            .unwrap()
            .to_string()
    }

    /// Proxmox's `user: root` + `password:` (the parser marks it unlocked): root can log
    /// in with the password on the console; the other lines stay byte for byte.
    #[test]
    fn the_legacy_password_sets_the_hash_and_leaves_it_unlocked() {
        let a = accounts(&format!(
            r#"{{"users":[{{"name":"root","passwd":"{HASH}","lock_passwd":false}}]}}"#
        ));
        let c = compose(IMAGE, &a);
        assert_eq!(field(&c.text, "root"), HASH);
        assert_eq!(c.changed, ["root"]);
        assert!(c.missing.is_empty());
        assert_eq!(
            c.text.lines().skip(1).collect::<Vec<_>>(),
            IMAGE.lines().skip(1).collect::<Vec<_>>()
        );
        assert_eq!(
            c.text.lines().next().unwrap(),
            format!("root:{HASH}:19000:0:99999:7:::")
        );
    }

    /// cloud-init locks a `users:` entry's password unless told otherwise, hash or not;
    /// `chpasswd` runs later and writes a bare hash, which unlocks.
    #[test]
    fn entries_lock_by_default_and_chpasswd_unlocks() {
        let a = accounts(&format!(
            r#"{{"users":[{{"name":"ops","passwd":"{HASH}"}},{{"name":"daemon"}}]}}"#
        ));
        let c = compose(IMAGE, &a);
        assert_eq!(field(&c.text, "ops"), format!("!{HASH}"));
        assert_eq!(field(&c.text, "daemon"), "!*");
        assert_eq!(c.changed, ["ops", "daemon"]);

        let a = accounts(&format!(
            r#"{{"users":[{{"name":"ops","passwd":"$6$x$y"}}],"chpasswd":{{"ops":"{HASH}"}}}}"#
        ));
        assert_eq!(field(&compose(IMAGE, &a).text, "ops"), HASH);
    }

    /// An account already locked is not locked twice; `lock_passwd: false` without a
    /// hash changes nothing (cloud-init does not unlock then).
    #[test]
    fn locks_are_idempotent_and_an_unlock_alone_is_no_change() {
        let a = accounts(r#"{"users":[{"name":"ops"},{"name":"root","lock_passwd":false}]}"#);
        let c = compose(IMAGE, &a);
        assert_eq!(c.text, IMAGE);
        assert!(c.changed.is_empty());
    }

    /// nixseed makes no accounts: a hash for an account the image lacks is reported;
    /// a lock for one (seedctl's locked `user`) is not worth a report.
    #[test]
    fn accounts_the_image_lacks_are_reported_only_when_a_hash_is_lost() {
        let a = accounts(&format!(
            r#"{{"users":[{{"name":"user"}}],"chpasswd":{{"alice":"{HASH}"}}}}"#
        ));
        let c = compose(IMAGE, &a);
        assert_eq!(c.missing, ["alice"]);
        assert_eq!(c.text, IMAGE);
    }

    /// Only hashes and locks touch the file; `ssh_pwauth` alone does not.
    #[test]
    fn only_hashes_and_locks_touch_the_file() {
        assert!(!accounts(r#"{"users":[],"ssh_pwauth":true}"#).touches_shadow());
        assert!(!accounts(r#"{"users":[{"name":"root","lock_passwd":false}]}"#).touches_shadow());
        assert!(accounts(r#"{"users":[{"name":"user"}]}"#).touches_shadow());
        assert!(accounts(r#"{"chpasswd":{"root":"$6$a$b"}}"#).touches_shadow());
    }

    /// Comments, blank lines and a line that is not an account stay where they were, and
    /// a name that only looks like a comment is never matched.
    #[test]
    fn other_lines_are_kept() {
        let image = "# comment\n\nroot:*:1::::::\nbroken\n";
        let a = accounts(r##"{"chpasswd":{"# comment":"$6$a$b","root":"$6$a$b"}}"##);
        let c = compose(image, &a);
        assert_eq!(c.text, "# comment\n\nroot:$6$a$b:1::::::\nbroken\n");
        assert_eq!(c.missing, ["# comment"]);
    }

    /// A hostile seed cannot add a line or a field to `/etc/shadow` through a hash.
    #[test]
    fn a_hash_that_would_split_the_line_is_refused() {
        let a = accounts(
            r#"{"chpasswd":{"root":"$6$a$b:0:0\nevil::0:0:99999:7:::"},"users":[{"name":"ops","passwd":"x:y","lock_passwd":false}]}"#,
        );
        let c = compose(IMAGE, &a);
        assert_eq!(c.text, IMAGE);
        assert_eq!(c.refused, ["ops", "root"]);
    }

    #[test]
    fn garbage_names_the_file() {
        let e = Accounts::parse(b"{not json", "/var/identity/gen-3/users.json").unwrap_err();
        assert!(e.starts_with("/var/identity/gen-3/users.json: "), "{e}");
    }

    #[test]
    fn the_sshd_dropin_says_yes_or_no() {
        assert!(sshd_dropin(true).contains("\nPasswordAuthentication yes\n"));
        assert!(sshd_dropin(false).contains("\nPasswordAuthentication no\n"));
    }
}
