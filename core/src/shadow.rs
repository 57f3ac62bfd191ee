//! The seed's password settings over the image's `/etc/shadow`: the initrd stage (and a
//! push) binds the composed file over the read-only one, as it composes `/etc/hosts`.
//! nixseed never creates accounts; an account the image lacks is reported, not made.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

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
    /// `sudo:` rules, as cloud-init writes them for an account that already exists.
    #[serde(default)]
    pub sudo: Vec<String>,
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

/// Passwords set through the guest agent (`guest-set-user-password`) on a read-only
/// `/etc`, kept on the machine's `/var`. They apply over the seed's settings until the
/// machine gets a new instance-id: cloud-init sets the seed's passwords again for a new
/// instance, and so does nixseed. A machine that never had a seed has no instance
/// (`null`): its passwords apply until its first seed, whatever that seed's instance-id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentPasswords {
    #[serde(rename = "instance-id", default)]
    pub instance_id: Option<String>,
    /// User name → crypt hash.
    pub passwords: BTreeMap<String, String>,
}

impl AgentPasswords {
    pub fn parse(bytes: &[u8], origin: &str) -> Result<Self, String> {
        serde_json::from_slice(bytes).map_err(|e| format!("{origin}: {e}"))
    }

    /// The passwords that still apply to a generation of `instance_id` (`None`: no
    /// generation).
    pub fn for_instance(&self, instance_id: Option<&str>) -> BTreeMap<String, String> {
        if self.instance_id.as_deref() == instance_id {
            self.passwords.clone()
        } else {
            BTreeMap::new()
        }
    }

    /// The record after setting `user`'s hash on instance `instance_id`: a record of an
    /// earlier instance is dropped first.
    pub fn with(&self, instance_id: Option<&str>, user: &str, hash: &str) -> Self {
        let mut passwords = self.for_instance(instance_id);
        passwords.insert(user.to_string(), hash.to_string());
        AgentPasswords {
            instance_id: instance_id.map(str::to_string),
            passwords,
        }
    }
}

/// The alphabet of crypt(3) salts.
const SALT_CHARS: &[u8] = b"./0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A 16-character crypt salt from 16 random bytes.
pub fn salt_from(random: [u8; 16]) -> String {
    random
        .iter()
        .map(|b| SALT_CHARS[usize::from(*b) % SALT_CHARS.len()] as char)
        .collect()
}

/// `$6$salt$hash` (SHA-512 crypt, 5000 rounds: glibc's default, so no `rounds=` field),
/// what `chpasswd` writes for a clear-text password on Debian and NixOS.
pub fn sha512_crypt(password: &[u8], salt: &str) -> Result<String, String> {
    let params = sha_crypt::Sha512Params::new(sha_crypt::ROUNDS_DEFAULT)
        .map_err(|e| format!("SHA-512 crypt parameters: {e:?}"))?;
    let hash = sha_crypt::sha512_crypt_b64(password, salt.as_bytes(), &params)
        .map_err(|e| format!("SHA-512 crypt: {e:?}"))?;
    Ok(format!("$6${salt}${hash}"))
}

/// Whether a hash given as it is (`guest-set-user-password` with `crypted`) can stand in
/// the password field.
pub fn hash_fits(hash: &str) -> bool {
    fits_a_field(hash)
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
/// then `chpasswd:` (a hash, unlocked, as `chpasswd -e` writes it), then `agent`, the
/// passwords set through the guest agent for this instance (unlocked too). Lines that are
/// not accounts (comments, blanks, a malformed line) are kept as they are.
pub fn compose(
    image: &str,
    accounts: &Accounts,
    agent: &BTreeMap<String, String>,
) -> ComposedShadow {
    let mut lines: Vec<Vec<String>> = image
        .lines()
        .map(|l| l.split(':').map(str::to_string).collect())
        .collect();
    let mut missing = Vec::new();
    let mut changed = Vec::new();
    let mut refused = Vec::new();
    let mut set = |name: &str, hash: Option<&str>, lock: bool| {
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
        set(&u.name, u.passwd.as_deref(), u.lock_passwd.unwrap_or(true));
    }
    for (name, hash) in accounts.chpasswd.iter().chain(agent) {
        set(name, Some(hash), false);
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

/// The seed's `sudo:` rules as one sudoers file.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Sudoers {
    /// cloud-init's lines (`# User rules for NAME`, then `NAME RULE` for each rule);
    /// `None` when no entry has a rule.
    pub text: Option<String>,
    /// `name: why` for each entry left out.
    pub refused: Vec<String>,
}

/// Whether `name` can stand as a user in a sudoers rule: a plain account name. sudoers
/// reads a leading `%` as a group, `#` as a uid and `+` as a netgroup, a name of capitals,
/// digits and `_` (`ALL` among them) as an alias, and a blank, a comma or a `:` would
/// change the rule.
fn plain_account_name(name: &str) -> bool {
    let mut chars = name.chars();
    let alias = name.starts_with(|c: char| c.is_ascii_uppercase())
        && name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_');
    !alias
        && chars
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-' | '$'))
}

/// The `sudo:` rules of `accounts`, in the order of the entries. An entry whose name is
/// not a plain account name, or one of whose rules holds a control character (a line
/// break would add a sudoers line of the seed's choosing), is left out whole.
pub fn sudoers(accounts: &Accounts) -> Sudoers {
    let mut out = Sudoers::default();
    let mut text = String::new();
    for u in accounts.users.iter().filter(|u| !u.sudo.is_empty()) {
        if !plain_account_name(&u.name) {
            out.refused.push(format!(
                "{}: not a plain account name",
                u.name.escape_debug()
            ));
            continue;
        }
        if u.sudo.iter().any(|r| r.chars().any(char::is_control)) {
            out.refused
                .push(format!("{}: a rule holds a control character", u.name));
            continue;
        }
        // A line ending in `\` goes on into the next one.
        if u.sudo.iter().any(|r| r.trim_end().ends_with('\\')) {
            out.refused
                .push(format!("{}: a rule ends in a backslash", u.name));
            continue;
        }
        text.push_str(&format!("\n# User rules for {}\n", u.name));
        for rule in &u.sudo {
            text.push_str(&format!("{} {}\n", u.name, rule.trim()));
        }
    }
    if !text.is_empty() {
        out.text = Some(format!("# From the seed's users (nixseed).\n{text}"));
    }
    out
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
        let c = compose(IMAGE, &a, &BTreeMap::new());
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
        let c = compose(IMAGE, &a, &BTreeMap::new());
        assert_eq!(field(&c.text, "ops"), format!("!{HASH}"));
        assert_eq!(field(&c.text, "daemon"), "!*");
        assert_eq!(c.changed, ["ops", "daemon"]);

        let a = accounts(&format!(
            r#"{{"users":[{{"name":"ops","passwd":"$6$x$y"}}],"chpasswd":{{"ops":"{HASH}"}}}}"#
        ));
        assert_eq!(
            field(&compose(IMAGE, &a, &BTreeMap::new()).text, "ops"),
            HASH
        );
    }

    /// An account already locked is not locked twice; `lock_passwd: false` without a
    /// hash changes nothing (cloud-init does not unlock then).
    #[test]
    fn locks_are_idempotent_and_an_unlock_alone_is_no_change() {
        let a = accounts(r#"{"users":[{"name":"ops"},{"name":"root","lock_passwd":false}]}"#);
        let c = compose(IMAGE, &a, &BTreeMap::new());
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
        let c = compose(IMAGE, &a, &BTreeMap::new());
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
        let c = compose(image, &a, &BTreeMap::new());
        assert_eq!(c.text, "# comment\n\nroot:$6$a$b:1::::::\nbroken\n");
        assert_eq!(c.missing, ["# comment"]);
    }

    /// A hostile seed cannot add a line or a field to `/etc/shadow` through a hash.
    #[test]
    fn a_hash_that_would_split_the_line_is_refused() {
        let a = accounts(
            r#"{"chpasswd":{"root":"$6$a$b:0:0\nevil::0:0:99999:7:::"},"users":[{"name":"ops","passwd":"x:y","lock_passwd":false}]}"#,
        );
        let c = compose(IMAGE, &a, &BTreeMap::new());
        assert_eq!(c.text, IMAGE);
        assert_eq!(c.refused, ["ops", "root"]);
    }

    /// A password set through the guest agent wins over the seed's for the same
    /// instance and is forgotten for a new one.
    #[test]
    fn agent_passwords_apply_last_and_only_to_their_instance() {
        let a = accounts(&format!(
            r#"{{"users":[{{"name":"root","passwd":"{HASH}","lock_passwd":false}}]}}"#
        ));
        let rec = AgentPasswords::default().with(Some("iid-1"), "root", "$6$s$agent");
        let c = compose(IMAGE, &a, &rec.for_instance(Some("iid-1")));
        assert_eq!(field(&c.text, "root"), "$6$s$agent");
        let c = compose(IMAGE, &a, &rec.for_instance(Some("iid-2")));
        assert_eq!(field(&c.text, "root"), HASH);
        let rec2 = rec.with(Some("iid-2"), "ops", "$6$s$ops");
        assert_eq!(rec2.passwords.keys().collect::<Vec<_>>(), ["ops"]);
        let back = AgentPasswords::parse(&serde_json::to_vec(&rec2).unwrap(), "p").unwrap();
        assert_eq!(back, rec2);
    }

    /// A machine without a generation keeps its own record, which no seed's instance
    /// matches, not even an empty instance-id.
    #[test]
    fn agent_passwords_without_a_generation_belong_to_no_instance() {
        let rec = AgentPasswords::default().with(None, "root", "$6$s$agent");
        assert_eq!(rec.for_instance(None).len(), 1);
        assert!(rec.for_instance(Some("")).is_empty());
        let text = serde_json::to_string(&rec).unwrap();
        assert!(text.contains(r#""instance-id":null"#), "{text}");
        let old = AgentPasswords::parse(br#"{"instance-id": "", "passwords": {}}"#, "p").unwrap();
        assert_eq!(old.instance_id.as_deref(), Some(""));
        let bare = AgentPasswords::parse(br#"{"passwords": {"root": "x"}}"#, "p").unwrap();
        assert_eq!(bare.for_instance(None).len(), 1);
    }

    /// Ulrich Drepper's SHA-crypt specification, its first SHA-512 test vector: the hash
    /// glibc's crypt(3) and so PAM compute.
    #[test]
    fn sha512_crypt_matches_the_specification() {
        assert_eq!(
            sha512_crypt(b"Hello world!", "saltstring").unwrap(),
            "$6$saltstring$svn8UoSVapNtMuq1ukKS4tPQd8iKwSMHWjl/O817G3uBnIFNjnQJuesI68u4OTLiBFdcbYEdFCoEOfaS35inz1"
        );
        let salt = salt_from([255; 16]);
        assert_eq!(salt.len(), 16);
        assert!(salt.bytes().all(|b| SALT_CHARS.contains(&b)));
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

    #[test]
    fn sudo_rules_as_cloud_init_writes_them() {
        let a = accounts(
            r#"{"users": [
                {"name": "ops", "sudo": ["ALL=(ALL) NOPASSWD:ALL"]},
                {"name": "nobody-here"},
                {"name": "deploy", "sudo": ["ALL=(root) /usr/bin/systemctl", " ALL=(app) ALL "]}
            ]}"#,
        );
        assert_eq!(
            sudoers(&a).text.as_deref(),
            Some(
                "# From the seed's users (nixseed).\n\n# User rules for ops\nops ALL=(ALL) NOPASSWD:ALL\n\n# User rules for deploy\ndeploy ALL=(root) /usr/bin/systemctl\ndeploy ALL=(app) ALL\n"
            )
        );
        assert_eq!(
            sudoers(&accounts(r#"{"users": [{"name": "ops"}]}"#)),
            Sudoers::default()
        );
    }

    #[test]
    fn sudo_rules_cannot_add_lines_or_name_groups() {
        let a = accounts(
            r#"{"users": [
                {"name": "%sudo", "sudo": ["ALL=(ALL) ALL"]},
                {"name": "ALL", "sudo": ["ALL=(ALL) ALL"]},
                {"name": "ADMINS_2", "sudo": ["ALL=(ALL) ALL"]},
                {"name": "cont", "sudo": ["ALL=(ALL) ALL \\"]},
                {"name": "ops", "sudo": ["ALL=(ALL) ALL\nALL ALL=(ALL) NOPASSWD:ALL"]},
                {"name": "ok", "sudo": ["ALL=(ALL) ALL"]}
            ]}"#,
        );
        let s = sudoers(&a);
        assert_eq!(
            s.text.as_deref(),
            Some("# From the seed's users (nixseed).\n\n# User rules for ok\nok ALL=(ALL) ALL\n")
        );
        let names: Vec<&str> = s
            .refused
            .iter()
            .map(|r| r.split(':').next().unwrap_or_default())
            .collect();
        assert_eq!(
            names,
            ["%sudo", "ALL", "ADMINS_2", "cont", "ops"],
            "{:?}",
            s.refused
        );
    }
}
