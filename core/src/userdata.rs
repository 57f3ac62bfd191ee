//! user-data and vendor-data: `#cloud-config` (plain, gzip'd, or inside MIME multipart)
//! into a [`CloudConfig`] holding just the keys nixseed acts on. Other keys are kept as
//! warnings that name them; nothing is silently dropped.

use std::collections::BTreeMap;
use std::io::Read;

use crate::yaml::{self, Mapping, Value};

/// The largest user-data accepted after decompression. cloud-init has no limit; a seed
/// larger than this is an attack or a mistake, and reading it would stall the initrd.
pub const MAX_USER_DATA: usize = 16 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum UserDataError {
    #[error(transparent)]
    Yaml(#[from] yaml::YamlError),
    #[error("{origin}: {detail}")]
    Invalid { origin: String, detail: String },
}

fn invalid(origin: &str, detail: impl Into<String>) -> UserDataError {
    UserDataError::Invalid {
        origin: origin.to_string(),
        detail: detail.into(),
    }
}

/// A user from `users:` (or the legacy `user:`/`password:` pair Proxmox writes).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct User {
    pub name: String,
    /// The entry's keys that were written, `sudo: false` included, for merging a name
    /// given again ([`merge_into`]): what an entry gave, even as "nothing", stays.
    #[serde(skip)]
    pub given: std::collections::BTreeSet<&'static str>,
    pub ssh_authorized_keys: Vec<String>,
    /// A crypt(3) hash (`$5$…`, `$6$…`); never a clear-text password.
    pub passwd: Option<String>,
    pub lock_passwd: Option<bool>,
    pub groups: Vec<String>,
    /// `sudo:` rules (`ALL=(ALL) NOPASSWD:ALL`); a user with one counts as admin.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sudo: Vec<String>,
}

/// A `write_files` entry; validated to stay under `/var` or `/run`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteFile {
    pub path: String,
    pub content: Vec<u8>,
    pub permissions: u32,
    /// `append: true`: added to the end of an existing file instead of replacing it.
    pub append: bool,
    /// `owner:` as written (`user`, `user:group`, or numeric IDs); `None` is root.
    pub owner: Option<String>,
}

/// `resolv_conf:` as cloud-init's cc_resolv_conf reads it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ResolvConf {
    pub nameservers: Vec<String>,
    pub searchdomains: Vec<String>,
    pub domain: Option<String>,
    pub options: Vec<String>,
}

/// The `nixseed:` extension block written by `seedctl seed`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NixseedBlock {
    pub machine_id: Option<String>,
    pub product_uuid: Option<String>,
    pub tcp_ports: Vec<String>,
    pub udp_ports: Vec<String>,
    pub hosts: Vec<String>,
    pub resolv_conf: Option<String>,
}

/// The cloud-config keys nixseed understands (docs/identity.md, "What is understood from user-data").
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CloudConfig {
    pub hostname: Option<String>,
    pub fqdn: Option<String>,
    /// These three are `None` when the seed does not say, so that an explicit `false` in
    /// user-data wins over vendor-data's `true`, as in cloud-init's merge.
    pub manage_etc_hosts: Option<bool>,
    pub preserve_hostname: Option<bool>,
    pub prefer_fqdn_over_hostname: Option<bool>,
    pub ssh_authorized_keys: Vec<String>,
    pub users: Vec<User>,
    /// `ssh_keys:` host keys, by cloud-init's names (`ed25519_private`, `ed25519_public`).
    pub ssh_keys: BTreeMap<String, String>,
    pub ssh_pwauth: Option<bool>,
    pub write_files: Vec<WriteFile>,
    pub bootcmd: Vec<String>,
    pub runcmd: Vec<String>,
    pub timezone: Option<String>,
    /// Only with `manage_resolv_conf: true` in the same user-data, as cloud-init's
    /// cc_resolv_conf runs only then; without it, dropped with a warning.
    pub resolv_conf: Option<ResolvConf>,
    pub manage_resolv_conf: Option<bool>,
    /// `chpasswd: {list|users}` entries as merged so far ([`ChpasswdLists::hashes`]
    /// gives user name → hash).
    pub chpasswd: ChpasswdLists,
    pub nixseed: NixseedBlock,
    /// One line per key or part that was ignored, naming it.
    pub warnings: Vec<String>,
    /// The legacy `user:` (the default user), which a later part's `users:` leaves alone.
    pub default_user: Option<String>,
    /// The legacy `password:` (the default user's), kept as written until
    /// [`apply_legacy_password`] knows every `chpasswd:` list, vendor-data's included.
    pub password: Option<String>,
    /// `vendor_data: {enabled: ...}`: `Some(false)` turns vendor-data off, as in
    /// cloud-init; `None` when user-data does not say.
    pub vendor_data: Option<bool>,
    /// The same for a ConfigDrive's `vendor_data2.json` (`vendor_data2:`).
    pub vendor_data2: Option<bool>,
    /// The list keys ([`LIST_KEYS`]) the config names, an empty list or `null` included:
    /// cloud-init's merge keeps user-data's value whenever the key is there, so
    /// `write_files: []` in user-data turns vendor-data's files off.
    pub given: std::collections::BTreeSet<&'static str>,
    /// Every top-level key a part has given so far, for a later part whose merge keeps
    /// what is there ([`MergeHow`]).
    pub seen: std::collections::BTreeSet<String>,
}

/// `chpasswd:`'s `users` and `list` entries (name, hash) in the order given, each `None`
/// until a part names it: a later part's merge treats the two lists on their own, as
/// cloud-init's dict merger recurses into `chpasswd`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ChpasswdLists {
    users: Option<Vec<(String, String)>>,
    list: Option<Vec<(String, String)>>,
    /// Some entry names an account, whatever its password (a clear-text or `RANDOM` one
    /// is not kept): cloud-init then passes the legacy `password:` over.
    names_anyone: bool,
}

impl ChpasswdLists {
    /// A later part's `chpasswd:` onto what earlier parts gave: the part's whole mapping
    /// under a replacing merge (the default) or when none came before; else a list the
    /// earlier parts did not name is added, and one they did is kept, unless the merge
    /// recurses into lists, which the list merger then merges ([`merge_list`]).
    fn merge(&mut self, part: ChpasswdLists, how: MergeHow, earlier: bool) {
        if !earlier || how.replace {
            *self = part;
            return;
        }
        let mut taken = false;
        for (mine, theirs) in [(&mut self.users, part.users), (&mut self.list, part.list)] {
            match (mine, theirs) {
                (_, None) => {}
                (mine @ None, theirs) => {
                    *mine = theirs;
                    taken = true;
                }
                (Some(mine), Some(theirs)) if how.recurse_array => {
                    merge_list(mine, theirs, Some(how.list));
                    taken = true;
                }
                (Some(_), Some(_)) => {}
            }
        }
        // A part whose lists were passed over names no one for the legacy password.
        self.names_anyone |= taken && part.names_anyone;
    }

    /// User name → hash; a later entry for the same user wins, `list` after `users` (the
    /// order cloud-init's set-passwords hands them to `chpasswd -e`).
    pub fn hashes(&self) -> BTreeMap<String, String> {
        let entries = self.users.iter().chain(self.list.iter()).flatten();
        entries.cloned().collect()
    }

    /// A lower config's `chpasswd:` under this one, as cloud-init's `mergemanydict`
    /// merges vendor-data under user-data: a list this one names stays, a list only the
    /// lower names is added.
    fn fill_from(&mut self, lower: ChpasswdLists) {
        if self.users.is_none() {
            self.names_anyone |= lower.users.as_ref().is_some_and(|u| !u.is_empty());
            self.users = lower.users;
        }
        if self.list.is_none() {
            self.names_anyone |= lower.list.as_ref().is_some_and(|l| !l.is_empty());
            self.list = lower.list;
        }
    }

    /// No entry in either list.
    pub fn is_empty(&self) -> bool {
        self.users.iter().chain(self.list.iter()).all(Vec::is_empty)
    }

    /// Some entry names an account, kept or not (see `names_anyone`).
    pub fn names_anyone(&self) -> bool {
        self.names_anyone || !self.is_empty()
    }
}

/// The keys whose value is a list taken whole from the first config that names them
/// (user-data, else vendor_data2.json, else vendor-data).
pub const LIST_KEYS: [&str; 3] = ["ssh_authorized_keys", "users", "write_files"];

impl CloudConfig {
    /// `self` over `lower`, key by key: user-data over vendor-data, and a ConfigDrive's
    /// `vendor_data2.json` over its `vendor_data.json` (cloud-init's order). Only the keys
    /// vendor-data may give are taken from `lower`.
    pub fn over(mut self, lower: CloudConfig) -> CloudConfig {
        let v = lower;
        self.hostname = self.hostname.or(v.hostname);
        self.fqdn = self.fqdn.or(v.fqdn);
        self.manage_etc_hosts = self.manage_etc_hosts.or(v.manage_etc_hosts);
        self.preserve_hostname = self.preserve_hostname.or(v.preserve_hostname);
        self.prefer_fqdn_over_hostname = self
            .prefer_fqdn_over_hostname
            .or(v.prefer_fqdn_over_hostname);
        // A list is taken whole from the first config that names its key, even as `[]`.
        // `users` also counts a legacy `user:`, which adds to the list.
        let named = |c: &CloudConfig, key: &str| c.given.contains(key);
        if !named(&self, "ssh_authorized_keys") {
            self.ssh_authorized_keys = v.ssh_authorized_keys;
        }
        // A config that names no `users:` but has the legacy `user:` keeps that account
        // and takes the lower list besides, as cloud-init's merged config holds both keys.
        if !named(&self, "users") {
            let mut lower = v.users;
            // user-data's `user:` wins over vendor-data's, as the merge keeps the first
            // value of a key: vendor-data's default user is not made.
            if self.default_user.is_some()
                && let Some(theirs) = &v.default_user
            {
                lower.retain(|u| &u.name != theirs);
            }
            upsert_users(&mut self.users, lower);
        }
        if self.ssh_keys.is_empty() {
            self.ssh_keys = v.ssh_keys;
        }
        self.chpasswd.fill_from(v.chpasswd);
        // The whole list, not a concatenation: cloud-init's merge keeps the first config's
        // `write_files` (user-data's, else vendor_data2.json's, else vendor-data's).
        if !named(&self, "write_files") {
            self.write_files = v.write_files;
        }
        self.given.extend(v.given);
        // User-data's word wins even when it leaves sshd alone (`unchanged`, or a value
        // cloud-init does not understand): only a config that does not name the key
        // takes vendor-data's.
        if !self.seen.contains("ssh_pwauth") {
            self.ssh_pwauth = v.ssh_pwauth;
        }
        self.resolv_conf = self.resolv_conf.or(v.resolv_conf);
        self.timezone = self.timezone.or(v.timezone);
        self
    }
}

/// Keys that cloud-init knows and nixseed deliberately leaves alone: a warning still names
/// them, but says they are understood and why they do nothing here.
const IGNORED_ON_IMMUTABLE: &[&str] = &[
    "package_upgrade",
    "package_update",
    "packages",
    "apt",
    "growpart",
    "resize_rootfs",
    "locale",
    "ntp",
    "final_message",
];

/// The keys of a `users` entry nixseed acts on; others are named in a warning.
const USER_KEYS: &[&str] = &[
    "name",
    "ssh_authorized_keys",
    "passwd",
    "hashed_passwd",
    "lock_passwd",
    "groups",
    "sudo",
];

/// cloud-init's `util.is_true`: a true boolean, or a scalar whose text is `true`, `1`,
/// `on` or `yes` in any case.
fn is_true(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        v => yaml::scalar_text(v).is_some_and(|t| {
            matches!(
                t.trim().to_lowercase().as_str(),
                "true" | "1" | "on" | "yes"
            )
        }),
    }
}

/// Decodes raw user-data bytes (gzip, MIME multipart or plain) into a cloud-config.
/// `origin` names the file in every message.
pub fn parse(bytes: &[u8], origin: &str) -> Result<CloudConfig, UserDataError> {
    parse_documents(&[bytes], origin)
}

/// Several user-data documents read as one, each as [`parse`] reads a whole user-data and
/// later ones over earlier ones, as cloud-init reads a list of vendor-data documents
/// (a ConfigDrive's `vendor_data.json` may hold one).
pub fn parse_documents(docs: &[&[u8]], origin: &str) -> Result<CloudConfig, UserDataError> {
    let mut config = CloudConfig::default();
    // One limit for all the documents together, as for the parts of one.
    let mut left = MAX_USER_DATA;
    for doc in docs {
        add_document(&mut config, doc, origin, &mut left)?;
    }
    if config.resolv_conf.is_some() && config.manage_resolv_conf != Some(true) {
        config.resolv_conf = None;
        config.warnings.push(format!(
            "{origin}: key 'resolv_conf' ignored without manage_resolv_conf: true, as cloud-init ignores it"
        ));
    }
    // Passwords are kept only as crypt hashes, as for chpasswd: nixseed never stores a
    // clear-text secret (and users.json, like /etc/shadow, is for root only).
    for u in &mut config.users {
        if u.passwd.as_deref().is_some_and(|p| !p.starts_with('$')) {
            u.passwd = None;
            config.warnings.push(format!(
                "{origin}: clear-text password for user '{}' ignored; give a crypt hash",
                u.name
            ));
        }
    }
    Ok(config)
}

/// Reads one document into `config`, its bytes (unpacked, and each MIME part decoded)
/// charged to `left`.
fn add_document(
    config: &mut CloudConfig,
    bytes: &[u8],
    origin: &str,
    left: &mut usize,
) -> Result<(), UserDataError> {
    let bytes = gunzip_if_needed(bytes, origin, *left)?;
    if bytes.len() > *left {
        return Err(invalid(
            origin,
            format!(
                "{} bytes exceed the {} byte limit for user-data",
                bytes.len(),
                MAX_USER_DATA
            ),
        ));
    }
    let text = std::str::from_utf8(&bytes)
        .map_err(|e| invalid(origin, format!("not UTF-8 text ({e})")))?;
    for part in parts(text, origin, left)? {
        match part {
            Part::CloudConfig(text, merge) => {
                merge_cloud_config(config, &text, merge.as_deref(), origin)?
            }
            Part::Ignored(what) => config.warnings.push(format!(
                "{origin}: {what} ignored (nixseed applies #cloud-config only)"
            )),
        }
    }
    Ok(())
}

enum Part {
    /// A cloud-config document, with the merge its MIME part asks for (`Merge-Type`).
    CloudConfig(String, Option<String>),
    Ignored(String),
}

/// How a cloud-config part merges into what the parts before it gave, from its
/// `Merge-Type`/`X-Merge-Type` header or its own `merge_how`/`merge_type` key, in
/// cloud-init's spelling (`list(append)+dict(recurse_array)+str()`, or a list of
/// `{name, settings}` mappings), as cloud-init's mergers do it at the top level: with
/// `dict(replace)` (cloud-init's default) a key replaces what was there; with a `dict`
/// without `replace`, a key already given keeps its earlier value, except a list under
/// `recurse_array`, which the list merger merges ([`ListMethod`]); with no `dict` at all,
/// the part adds nothing.
#[derive(Debug, Clone, Copy, PartialEq)]
struct MergeHow {
    dict: bool,
    replace: bool,
    recurse_array: bool,
    list: ListMethod,
}

/// cloud-init's list merger (`list(...)`): what a later list does to one given before,
/// when the dict merger hands it the two (`recurse_array`).
#[derive(Debug, Clone, Copy, PartialEq)]
enum ListMethod {
    /// `list()` / `list(replace)`: the later list's items replace the earlier's at the
    /// same places; the earlier list's length stays.
    ByIndex,
    Append,
    Prepend,
    /// `list(no_replace)`: the earlier list stays.
    Keep,
}

impl MergeHow {
    const DEFAULT: MergeHow = MergeHow {
        dict: true,
        replace: true,
        recurse_array: false,
        list: ListMethod::ByIndex,
    };

    /// `None`: `how` names no merger this reads (then the default applies).
    fn parse(how: &Value) -> Option<MergeHow> {
        let mergers: Vec<(String, Vec<String>)> = match how {
            Value::String(text) => text
                .split('+')
                .filter_map(|m| {
                    let m = m.trim();
                    let (name, rest) = m.split_once('(')?;
                    let opts = rest.strip_suffix(')')?;
                    let opts = opts.split(',').map(|o| o.trim().to_owned());
                    Some((name.trim().to_owned(), opts.collect()))
                })
                .collect(),
            Value::Sequence(list) => list
                .iter()
                .filter_map(|m| {
                    let name = m.get("name")?.as_str()?.to_owned();
                    let opts = m.get("settings").and_then(Value::as_sequence);
                    let opts = opts.into_iter().flatten().filter_map(Value::as_str);
                    Some((name, opts.map(str::to_owned).collect()))
                })
                .collect(),
            _ => Vec::new(),
        };
        if mergers.is_empty() {
            return None;
        }
        let opts = |name: &str| mergers.iter().find(|(n, _)| n == name).map(|(_, o)| o);
        let has = |name: &str, opt: &str| opts(name).is_some_and(|o| o.iter().any(|x| x == opt));
        // The first of these the list merger is given wins, in cloud-init's order.
        let list = [
            ("append", ListMethod::Append),
            ("prepend", ListMethod::Prepend),
            ("replace", ListMethod::ByIndex),
            ("no_replace", ListMethod::Keep),
        ]
        .into_iter()
        .find(|(opt, _)| has("list", opt))
        .map_or(ListMethod::ByIndex, |(_, m)| m);
        Some(MergeHow {
            dict: opts("dict").is_some(),
            replace: has("dict", "replace"),
            recurse_array: has("dict", "recurse_array") || has("dict", "recurse_list"),
            list,
        })
    }

    /// What a list key of a part does to the same key given before (`earlier`): the
    /// dict merger replaces the value whole when the key is new or the dict merger
    /// replaces; otherwise (the key reached here only under `recurse_array`) the list
    /// merger decides.
    fn list_merge(&self, earlier: bool) -> Option<ListMethod> {
        (earlier && !self.replace).then_some(self.list)
    }
}

/// A later list onto an earlier one: `None` replaces it whole (see [`MergeHow::list_merge`]).
fn merge_list<T>(list: &mut Vec<T>, later: Vec<T>, method: Option<ListMethod>) {
    match method {
        None => *list = later,
        Some(ListMethod::Append) => list.extend(later),
        Some(ListMethod::Prepend) => {
            let earlier = std::mem::replace(list, later);
            list.extend(earlier);
        }
        Some(ListMethod::ByIndex) => {
            for (old, new) in list.iter_mut().zip(later) {
                *old = new;
            }
        }
        Some(ListMethod::Keep) => {}
    }
}

/// Gunzips `bytes` when they are gzip data; more than `limit` bytes out is refused (a
/// small gzip member can expand a thousandfold).
fn gunzip_if_needed(bytes: &[u8], origin: &str, limit: usize) -> Result<Vec<u8>, UserDataError> {
    if !bytes.starts_with(&[0x1f, 0x8b]) {
        return Ok(bytes.to_vec());
    }
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(bytes)
        .take(limit as u64 + 1)
        .read_to_end(&mut out)
        .map_err(|e| invalid(origin, format!("gzip data is corrupt: {e}")))?;
    if out.len() > limit {
        return Err(invalid(
            origin,
            format!(
                "gzip data expands beyond the {limit} bytes left of the {MAX_USER_DATA} byte limit"
            ),
        ));
    }
    Ok(out)
}

/// Whether `text` is cloud-config by its first line, as cloud-init tells: without regard
/// to case, and the longest known start first, so `#cloud-config-archive` and
/// `#cloud-config-jsonp` (other formats) are not `#cloud-config`.
fn is_cloud_config(text: &str) -> bool {
    let start = text
        .trim_start()
        .chars()
        .take(24)
        .collect::<String>()
        .to_ascii_lowercase();
    start.starts_with("#cloud-config")
        && !start.starts_with("#cloud-config-archive")
        && !start.starts_with("#cloud-config-jsonp")
}

/// `## template: jinja` user-data with no template in it (no `{{`, `{%` or `{#`), which
/// cloud-init's rendering leaves as it is: the text after the header line. A real
/// template is not rendered here, and stays what the caller ignores with a warning.
fn plain_jinja(text: &str) -> Option<&str> {
    let (first, rest) = text.trim_start().split_once('\n')?;
    let first = first.trim().to_ascii_lowercase();
    let is_jinja = first
        .strip_prefix("##")
        .map(str::trim_start)
        .and_then(|f| f.strip_prefix("template:"))
        .is_some_and(|f| f.trim() == "jinja");
    let templated = ["{{", "{%", "{#"].iter().any(|m| rest.contains(m));
    (is_jinja && !templated).then_some(rest)
}

/// The parts of one document (no larger than `left`), charged to `left`: a MIME
/// document by its parts' decoded bodies, any other by its text.
fn parts(text: &str, origin: &str, left: &mut usize) -> Result<Vec<Part>, UserDataError> {
    let text = plain_jinja(text).unwrap_or(text);
    let trimmed = text.trim_start();
    if trimmed.is_empty() {
        return Ok(Vec::new());
    }
    if let Some(boundary) = mime_boundary(text).filter(|_| !is_cloud_config(trimmed)) {
        return mime_parts(text, &boundary, origin, left);
    }
    *left = left.saturating_sub(text.len());
    if is_cloud_config(trimmed) {
        return Ok(vec![Part::CloudConfig(text.to_string(), None)]);
    }
    let first = trimmed.lines().next().unwrap_or_default();
    Ok(vec![Part::Ignored(format!(
        "user-data starting with {first:?}"
    ))])
}

/// The boundary of a MIME multipart document, from its top-level Content-Type header.
fn mime_boundary(text: &str) -> Option<String> {
    let headers = text.split("\n\n").next()?;
    let unfolded = headers.replace("\n ", " ").replace("\n\t", " ");
    let ct = unfolded
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("content-type:"))?;
    if !ct.to_ascii_lowercase().contains("multipart/") {
        return None;
    }
    let at = ct.to_ascii_lowercase().find("boundary=")?;
    let value = &ct[at + "boundary=".len()..];
    let value = value.split(';').next()?.trim().trim_matches('"');
    Some(value.to_string())
}

fn mime_parts(
    text: &str,
    boundary: &str,
    origin: &str,
    left: &mut usize,
) -> Result<Vec<Part>, UserDataError> {
    let text = text.replace("\r\n", "\n");
    let delimiter = format!("--{boundary}");
    let mut out = Vec::new();
    for chunk in text.split(&delimiter).skip(1) {
        if chunk.starts_with("--") {
            break;
        }
        let chunk = chunk.strip_prefix('\n').unwrap_or(chunk);
        let (head, body) = chunk.split_once("\n\n").unwrap_or((chunk, ""));
        let header = |name: &str| {
            head.lines().find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.trim()
                    .eq_ignore_ascii_case(name)
                    .then(|| v.trim().to_ascii_lowercase())
            })
        };
        let ctype = header("content-type").unwrap_or_else(|| "text/plain".into());
        let body = body.strip_suffix('\n').unwrap_or(body);
        let body = match header("content-transfer-encoding").as_deref() {
            Some("base64") => {
                let raw = crate::credentials::base64_decode(body)
                    .ok_or_else(|| invalid(origin, "a MIME part's base64 body is corrupt"))?;
                let raw = gunzip_if_needed(&raw, origin, *left)?;
                String::from_utf8(raw)
                    .map_err(|_| invalid(origin, "a MIME part is not UTF-8 text"))?
            }
            _ => body.to_string(),
        };
        // All parts together are held by the limit for user-data, decoded or not.
        *left = left.checked_sub(body.len()).ok_or_else(|| {
            invalid(
                origin,
                format!("MIME parts expand beyond the {MAX_USER_DATA} byte limit for user-data"),
            )
        })?;
        let body = match plain_jinja(&body).map(str::to_owned) {
            Some(rest) => rest,
            None => body,
        };
        let ctype_name = ctype.split(';').next().unwrap_or_default().trim();
        if ctype_name == "text/cloud-config" || is_cloud_config(&body) {
            let merge = header("merge-type").or_else(|| header("x-merge-type"));
            out.push(Part::CloudConfig(body, merge));
        } else {
            let name = ctype.split(';').next().unwrap_or_default().to_string();
            out.push(Part::Ignored(format!("MIME part of type {name}")));
        }
    }
    Ok(out)
}

/// Later parts override earlier ones key by key (cloud-init's default for top-level keys).
fn merge_cloud_config(
    config: &mut CloudConfig,
    text: &str,
    merge_header: Option<&str>,
    origin: &str,
) -> Result<(), UserDataError> {
    let map = yaml::parse_mapping(text, origin)?;
    // The part's own key wins over its MIME header, as in cloud-init.
    let own = ["merge_how", "merge_type"]
        .iter()
        .find_map(|k| map.get(Value::String((*k).to_owned())));
    let how = own
        .and_then(MergeHow::parse)
        .or_else(|| merge_header.and_then(|h| MergeHow::parse(&Value::String(h.to_owned()))))
        .unwrap_or(MergeHow::DEFAULT);
    if !how.dict {
        config.warnings.push(format!(
            "{origin}: a cloud-config part whose merge names no dict merger ignored, as cloud-init adds nothing from it"
        ));
        return Ok(());
    }
    for (key, value) in &map {
        let key = match yaml::plain_key(key, origin) {
            Ok(key) => key,
            Err(warning) => {
                config.warnings.push(warning);
                continue;
            }
        };
        // A part that keeps what is there: a key given before stays, but for a list
        // merged under `recurse_array`.
        let list_key = LIST_KEYS.contains(&key) || matches!(key, "bootcmd" | "runcmd");
        let earlier = !config.seen.insert(key.to_owned());
        // `chpasswd` and `ssh_keys` are mappings, which cloud-init's merge recurses into.
        let mapping_key = matches!(key, "chpasswd" | "ssh_keys");
        let recursed = mapping_key || (list_key && how.recurse_array);
        if earlier && !how.replace && !recursed {
            continue;
        }
        // cloud-init's dict merger keeps the earlier value when the later one is no
        // mapping to recurse into.
        if earlier && !how.replace && mapping_key && !value.is_mapping() {
            config.warnings.push(format!(
                "{origin}: key '{key}' is {}, not a mapping: the earlier parts' value is kept, as cloud-init's merge keeps it",
                yaml::kind(value)
            ));
            continue;
        }
        let list_merge = how.list_merge(earlier);
        let ctx = Ctx { origin, key };
        if let Some(list) = LIST_KEYS.iter().find(|k| **k == key) {
            config.given.insert(list);
        }
        match key {
            "hostname" => config.hostname = Some(ctx.text(value, text)?),
            "fqdn" => config.fqdn = Some(ctx.text(value, text)?),
            "manage_etc_hosts" => {
                config.manage_etc_hosts = Some(match value {
                    Value::String(s) if s == "localhost" || s.eq_ignore_ascii_case("template") => {
                        true
                    }
                    v => ctx.boolean(v),
                })
            }
            "preserve_hostname" => config.preserve_hostname = Some(ctx.boolean(value)),
            "prefer_fqdn_over_hostname" => {
                config.prefer_fqdn_over_hostname = Some(ctx.boolean(value))
            }
            "ssh_authorized_keys" => merge_list(
                &mut config.ssh_authorized_keys,
                ctx.keys(value)?,
                list_merge,
            ),
            "users" => {
                // A later part's list replaces an earlier one's (cloud-init's default
                // merge) unless the part appends or prepends lists (an account given
                // twice is one account, so both add) or keeps them; the default user from
                // `user:` stays. A merge by index is taken as a replacing one.
                let users = ctx.users(value, &mut config.warnings)?;
                match list_merge {
                    Some(ListMethod::Keep) => continue,
                    Some(ListMethod::Append | ListMethod::Prepend) => {}
                    None | Some(ListMethod::ByIndex) => {
                        let default = config.default_user.clone();
                        config.users.retain(|u| Some(&u.name) == default.as_ref());
                    }
                }
                upsert_users(&mut config.users, users);
                if config.users.len() > MAX_USERS {
                    return Err(ctx.err(format!(
                        "{} accounts with the parts before; at most {MAX_USERS} are read",
                        config.users.len()
                    )));
                }
            }
            "user" => {
                let user = match value {
                    Value::Mapping(m) => match ctx.user(m, &mut config.warnings)? {
                        Some(u) => u,
                        None => continue,
                    },
                    v => User {
                        name: ctx.scalar(v)?,
                        ..User::default()
                    },
                };
                config.default_user = Some(user.name.clone());
                upsert_user(&mut config.users, user, true);
            }
            // The legacy pair belongs to the default user (`user:`), wherever the keys
            // stand: applied once the whole part is read. Proxmox writes a hash.
            "password" => config.password = Some(ctx.text(value, text)?),
            "chpasswd" => {
                let part = ctx.chpasswd(value, &mut config.warnings)?;
                config.chpasswd.merge(part, how, earlier);
            }
            "ssh_keys" => {
                let keys = ctx.string_map(value)?;
                if earlier && !how.replace {
                    // Keys named before stay; new names are added.
                    for (name, key) in keys {
                        config.ssh_keys.entry(name).or_insert(key);
                    }
                } else {
                    config.ssh_keys = keys;
                }
                for k in config.ssh_keys.keys() {
                    if !matches!(k.as_str(), "ed25519_private" | "ed25519_public") {
                        config.warnings.push(format!(
                            "{origin}: key 'ssh_keys': '{k}' ignored (the host key is ed25519; give ed25519_private with ed25519_public)"
                        ));
                    }
                }
                let has = |k: &str| config.ssh_keys.contains_key(k);
                if has("ed25519_private") != has("ed25519_public") {
                    config.warnings.push(format!(
                        "{origin}: key 'ssh_keys': ed25519_private and ed25519_public come as a pair; the one given is ignored and the host key is kept or generated"
                    ));
                }
            }
            // cloud-init's set-passwords: is_true → yes, is_false → no, anything else
            // leaves sshd's setting as it is (with a warning unless it says `unchanged`).
            "ssh_pwauth" => {
                config.ssh_pwauth = yaml::cloud_truth(value);
                let unchanged = matches!(value, Value::Null)
                    || matches!(value, Value::String(s) if s.eq_ignore_ascii_case("unchanged"));
                if config.ssh_pwauth.is_none() && !unchanged {
                    config.warnings.push(format!(
                        "{origin}: key 'ssh_pwauth': {} not understood (true, false or unchanged); sshd's PasswordAuthentication is left as it is, as cloud-init leaves it",
                        yaml::scalar_text(value).map_or_else(|| yaml::kind(value).to_string(), |t| format!("{t:?}"))
                    ));
                }
            }
            // A later part's list replaces an earlier one's, as for `users`.
            "write_files" => {
                let files = ctx.write_files(value, &mut config.warnings)?;
                merge_list(&mut config.write_files, files, list_merge)
            }
            "bootcmd" => merge_list(&mut config.bootcmd, ctx.commands(value)?, list_merge),
            "runcmd" => merge_list(&mut config.runcmd, ctx.commands(value)?, list_merge),
            // Read above, for the lists of this part.
            "merge_how" | "merge_type" => {}
            "timezone" => config.timezone = Some(ctx.scalar(value)?),
            "resolv_conf" => config.resolv_conf = Some(ctx.resolv_conf(value)?),
            "manage_resolv_conf" => config.manage_resolv_conf = Some(ctx.boolean(value)),
            "nixseed" => config.nixseed = ctx.nixseed(value)?,
            // A later part that does not say `enabled` leaves an earlier part's word, as
            // cloud-init merges the mappings.
            "vendor_data" => {
                let said = ctx.vendor_switch(value, &mut config.warnings);
                config.vendor_data = said.or(config.vendor_data);
            }
            "vendor_data2" => {
                let said = ctx.vendor_switch(value, &mut config.warnings);
                config.vendor_data2 = said.or(config.vendor_data2);
            }
            // nixseed installs root's keys as given, which is what `disable_root: false`
            // asks of cloud-init (seedctl writes it for cloud-init's sake); only the
            // other answer is worth a warning.
            "disable_root" => {
                if yaml::bool11(value) != Some(false) {
                    config.warnings.push(format!(
                        "{origin}: key 'disable_root' ignored: root's keys are installed as given, as with `disable_root: false`"
                    ));
                }
            }
            k if IGNORED_ON_IMMUTABLE.contains(&k) => config.warnings.push(format!(
                "{origin}: key '{k}' ignored (not applicable to an immutable image)"
            )),
            k => config
                .warnings
                .push(format!("{origin}: unknown key '{k}' ignored")),
        }
    }
    // `users: [default]` leaves only the placeholder; the legacy `user:` is the default.
    config.users.retain(|u| u.name != "default");
    Ok(())
}

/// Gives the legacy `password:` to the default user (`user:`), as cloud-init's
/// set-passwords does: only when no `chpasswd:` list names anyone (`chpasswd`, the lists
/// of user-data and vendor-data together), and, as every password here, only as a crypt
/// hash. Set after the account is made and locked, with `chpasswd -e`, it ends up
/// unlocked. Each refusal is a warning naming `origin`.
pub fn apply_legacy_password(config: &mut CloudConfig, chpasswd_names_anyone: bool, origin: &str) {
    let Some(hash) = config.password.take() else {
        return;
    };
    let why = if chpasswd_names_anyone {
        "'chpasswd' lists passwords, which win (as in cloud-init)"
    } else if !hash.starts_with('$') {
        let name = config.default_user.as_deref().unwrap_or("the default user");
        config.warnings.push(format!(
            "{origin}: clear-text password for user '{name}' ignored; give a crypt hash"
        ));
        return;
    } else {
        let default = config.default_user.clone();
        match config
            .users
            .iter_mut()
            .find(|u| Some(&u.name) == default.as_ref())
        {
            Some(u) => {
                u.passwd = Some(hash);
                u.lock_passwd = Some(false);
                return;
            }
            None => "no 'user' to apply it to",
        }
    };
    config
        .warnings
        .push(format!("{origin}: key 'password' ignored: {why}"));
}

fn upsert_user(users: &mut Vec<User>, user: User, front: bool) {
    if let Some(existing) = users.iter_mut().find(|u| u.name == user.name) {
        merge_into(existing, user);
        return;
    }
    if front {
        users.insert(0, user);
    } else {
        users.push(user);
    }
}

/// A later entry for a user named before adds to it (keys, groups, a password not set).
/// A user named again, as cloud-init's `normalize_users_groups` merges the entries: what
/// the first gave stays, and what only the later gives is added (its `sudo`, its
/// `lock_passwd`, a password, keys or groups the first had none of).
fn merge_into(existing: &mut User, user: User) {
    let gave = |key: &str| existing.given.contains(key);
    if existing.passwd.is_none() && !gave("passwd") {
        existing.passwd = user.passwd;
    }
    if existing.lock_passwd.is_none() {
        existing.lock_passwd = user.lock_passwd;
    }
    if !gave("sudo") {
        existing.sudo = user.sudo;
    }
    if !gave("ssh_authorized_keys") {
        existing.ssh_authorized_keys = user.ssh_authorized_keys;
    }
    if !gave("groups") {
        existing.groups = user.groups;
    }
    existing.given.extend(user.given);
}

/// [`upsert_user`] for many at once, looking names up by a map rather than the list, so
/// that a long list costs its length and not its square.
fn upsert_users(users: &mut Vec<User>, new: Vec<User>) {
    let mut at: std::collections::HashMap<String, usize> = users
        .iter()
        .enumerate()
        .map(|(i, u)| (u.name.clone(), i))
        .collect();
    for user in new {
        match at.get(&user.name) {
            Some(&i) => merge_into(&mut users[i], user),
            None => {
                at.insert(user.name.clone(), users.len());
                users.push(user);
            }
        }
    }
}

/// Parse context: names the file and key in every error.
struct Ctx<'a> {
    origin: &'a str,
    key: &'a str,
}

impl Ctx<'_> {
    fn err(&self, detail: impl std::fmt::Display) -> UserDataError {
        invalid(self.origin, format!("key '{}': {detail}", self.key))
    }

    fn scalar(&self, v: &Value) -> Result<String, UserDataError> {
        yaml::scalar_text(v)
            .ok_or_else(|| self.err(format!("expected a string, found {}", yaml::kind(v))))
    }

    /// A top-level scalar whose source text must survive (hostnames like `0123`).
    fn text(&self, v: &Value, text: &str) -> Result<String, UserDataError> {
        yaml::keep_text(v, text, self.key)
            .ok_or_else(|| self.err(format!("expected a string, found {}", yaml::kind(v))))
    }

    /// A switch as cloud-init's `get_cfg_option_bool` reads it (`translate_bool`): on
    /// only for `true`, `1`, `on` or `yes` in any case; anything else is off, as there,
    /// rather than a refused seed.
    fn boolean(&self, v: &Value) -> bool {
        yaml::cloud_truth(v) == Some(true)
    }

    /// `vendor_data: {enabled: ...}` as cloud-init reads it: `enabled` counts as true only
    /// when it is `true`, or when its text is `true`, `1`, `on` or `yes` in any case (its
    /// `is_true`, which reads `str(value)`: the number 1 is on); a value
    /// that is not a mapping turns vendor-data off, with a warning. `None` when the
    /// mapping does not say (vendor-data stays on).
    fn vendor_switch(&self, v: &Value, warnings: &mut Vec<String>) -> Option<bool> {
        let Value::Mapping(m) = v else {
            warnings.push(format!(
                "{}: key '{}' is {}, not a mapping: vendor-data is not applied, as cloud-init does not apply it",
                self.origin,
                self.key,
                yaml::kind(v)
            ));
            return Some(false);
        };
        m.get("enabled").map(|e| match e {
            Value::Bool(b) => *b,
            Value::String(_) | Value::Number(_) => yaml::scalar_text(e).is_some_and(|s| {
                matches!(
                    s.trim().to_ascii_lowercase().as_str(),
                    "true" | "1" | "on" | "yes"
                )
            }),
            _ => false,
        })
    }

    fn keys(&self, v: &Value) -> Result<Vec<String>, UserDataError> {
        match v {
            // A string of several lines (a whole authorized_keys file) is several keys,
            // as cloud-init writes it: line by line.
            Value::Sequence(_) | Value::String(_) | Value::Null => Ok(yaml::string_list(v)
                .iter()
                .flat_map(|k| k.lines())
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .collect()),
            other => Err(self.err(format!(
                "expected a list of keys, found {}",
                yaml::kind(other)
            ))),
        }
    }

    fn string_map(&self, v: &Value) -> Result<BTreeMap<String, String>, UserDataError> {
        let Value::Mapping(m) = v else {
            return Err(self.err(format!("expected a mapping, found {}", yaml::kind(v))));
        };
        let mut out = BTreeMap::new();
        for (k, v) in m {
            let k = yaml::scalar_text(k).ok_or_else(|| self.err("non-string key"))?;
            out.insert(k, self.scalar(v)?);
        }
        Ok(out)
    }

    fn users(&self, v: &Value, warnings: &mut Vec<String>) -> Result<Vec<User>, UserDataError> {
        let items = match v {
            // A string in the list may name several, as cloud-init's `uniq_merge` splits it.
            Value::Sequence(items) => items
                .iter()
                .flat_map(|item| match item {
                    Value::String(s) if s.contains(',') => s
                        .split(',')
                        .map(|n| Value::String(n.trim().into()))
                        .filter(|n| n.as_str().is_some_and(|n| !n.is_empty()))
                        .collect(),
                    other => vec![other.clone()],
                })
                .collect(),
            Value::String(s) => s
                .split(',')
                .map(|n| Value::String(n.trim().into()))
                .collect(),
            Value::Null => Vec::new(),
            // cloud-init's mapping form: `alice: {settings}`, or `bob: true` for a user
            // with no settings (a false value leaves that user out).
            Value::Mapping(m) => {
                let mut items = Vec::new();
                for (k, v) in m {
                    let name = yaml::scalar_text(k)
                        .ok_or_else(|| self.err("a user name that is not text"))?;
                    match v {
                        Value::Mapping(settings) => {
                            let mut settings = settings.clone();
                            settings.insert("name".into(), Value::String(name));
                            items.push(Value::Mapping(settings));
                        }
                        Value::Bool(_) | Value::Number(_) | Value::String(_) => {
                            if is_true(v) {
                                items.push(Value::String(name));
                            }
                        }
                        other => {
                            return Err(self.err(format!(
                                "user '{name}': expected settings or a boolean, found {}",
                                yaml::kind(other)
                            )));
                        }
                    }
                }
                items
            }
            other => {
                return Err(self.err(format!(
                    "expected a list or a mapping, found {}",
                    yaml::kind(other)
                )));
            }
        };
        if items.len() > MAX_USERS {
            return Err(self.err(format!(
                "{} entries; at most {MAX_USERS} accounts are read",
                items.len()
            )));
        }
        let mut users = Vec::new();
        for item in &items {
            let user = match item {
                Value::Mapping(m) => match self.user(m, warnings)? {
                    Some(u) => u,
                    None => continue,
                },
                v => User {
                    name: self.scalar(v)?,
                    ..User::default()
                },
            };
            users.push(user);
        }
        let mut merged = Vec::new();
        upsert_users(&mut merged, users);
        Ok(merged)
    }

    /// One `users:` entry or the `user:` mapping; `None` for one without `name`, which is
    /// passed over with a warning (cloud-init gives it to its distro's default user, which
    /// nixseed does not make) rather than refusing the seed.
    fn user(&self, m: &Mapping, warnings: &mut Vec<String>) -> Result<Option<User>, UserDataError> {
        // cloud-init reads `ssh-authorized-keys` as `ssh_authorized_keys`, and so on.
        let m: Mapping = m
            .iter()
            .map(|(k, v)| match k.as_str() {
                Some(key) => (Value::String(key.trim().replace('-', "_")), v.clone()),
                None => (k.clone(), v.clone()),
            })
            .collect();
        let Some(name) = m.get("name").and_then(yaml::scalar_text) else {
            warnings.push(format!(
                "{}: key '{}': an entry without 'name' ignored (cloud-init gives it to the image's default user, which nixseed does not make)",
                self.origin, self.key
            ));
            return Ok(None);
        };
        for k in m.keys().filter_map(Value::as_str) {
            if !USER_KEYS.contains(&k) {
                warnings.push(format!(
                    "{}: key '{}': user '{name}': '{k}' ignored (nixseed applies {})",
                    self.origin,
                    self.key,
                    USER_KEYS.join(", ")
                ));
            }
        }
        let sub = |k: &str| m.get(k);
        let given = [
            "passwd",
            "sudo",
            "ssh_authorized_keys",
            "groups",
            "lock_passwd",
        ]
        .into_iter()
        .filter(|k| m.contains_key(*k) || (*k == "passwd" && m.contains_key("hashed_passwd")))
        .collect();
        Ok(Some(User {
            given,
            sudo: match sub("sudo") {
                // `sudo: false` (or null, or "") is no rule, as in cloud-init; an empty
                // rule would make an admin of the user and a sudoers line sudo refuses.
                None | Some(Value::Null | Value::Bool(false)) => Vec::new(),
                Some(Value::String(rule)) if rule.trim().is_empty() => Vec::new(),
                Some(Value::String(rule)) => vec![rule.clone()],
                Some(Value::Sequence(rules)) if rules.iter().all(Value::is_string) => rules
                    .iter()
                    .filter_map(Value::as_str)
                    .filter(|r| !r.trim().is_empty())
                    .map(str::to_owned)
                    .collect(),
                // cloud-init refuses anything else (`sudo: true` would be a rule `true`,
                // which sudo cannot parse, and then it runs for no one).
                Some(other) => {
                    warnings.push(format!(
                        "{}: key '{}': user '{name}': 'sudo' is {}, not a rule or a list of rules: ignored",
                        self.origin,
                        self.key,
                        yaml::kind(other)
                    ));
                    Vec::new()
                }
            },
            ssh_authorized_keys: match sub("ssh_authorized_keys") {
                Some(v) => self.keys(v)?,
                None => Vec::new(),
            },
            // cloud-init sets `hashed_passwd` after `passwd`, so it wins.
            passwd: sub("hashed_passwd")
                .or_else(|| sub("passwd"))
                .and_then(yaml::scalar_text),
            // cloud-init: `if kwargs.get("lock_passwd", True)`, Python's truth.
            lock_passwd: sub("lock_passwd").map(yaml::py_truth),
            groups: match sub("groups") {
                Some(Value::String(s)) => s.split(',').map(|g| g.trim().to_string()).collect(),
                Some(v) => yaml::string_list(v),
                None => Vec::new(),
            },
            name,
        }))
    }

    fn chpasswd(
        &self,
        v: &Value,
        warnings: &mut Vec<String>,
    ) -> Result<ChpasswdLists, UserDataError> {
        let Value::Mapping(m) = v else {
            return Err(self.err(format!("expected a mapping, found {}", yaml::kind(v))));
        };
        let mut names_anyone = false;
        let users = m.get("users").map(|users| {
            let mut out = Vec::new();
            for u in users.as_sequence().into_iter().flatten() {
                let Some(name) = u.get("name").and_then(yaml::scalar_text) else {
                    continue;
                };
                names_anyone = true;
                // cloud-init's `type`: `hash` by default, `text` a clear-text password
                // (whatever it looks like), `RANDOM` a generated one.
                let kind = u.get("type").and_then(yaml::scalar_text);
                match (kind.as_deref().unwrap_or("hash"), u.get("password")) {
                    ("hash", Some(pw)) => {
                        if let Some(pw) = yaml::scalar_text(pw) {
                            self.hashed_only(&name, pw, &mut out, warnings);
                        }
                    }
                    ("hash" | "text" | "RANDOM", _) => warnings.push(format!(
                        "{}: key 'chpasswd': clear-text or random password for '{name}' ignored; give a crypt hash",
                        self.origin
                    )),
                    (other, _) => warnings.push(format!(
                        "{}: key 'chpasswd': entry for '{name}' of type '{other}' ignored (hash, text or RANDOM), as cloud-init passes it over",
                        self.origin
                    )),
                }
            }
            out
        });
        let list = m.get("list").map(|list| {
            let lines: Vec<String> = match list {
                Value::String(s) => s.lines().map(str::to_string).collect(),
                v => yaml::string_list(v),
            };
            let mut out = Vec::new();
            for line in lines {
                match line.split_once(':') {
                    Some((name, pw)) => {
                        names_anyone = true;
                        self.hashed_only(name.trim(), pw.trim().to_string(), &mut out, warnings);
                    }
                    // cloud-init's whole module fails on such a line; one line is lost here.
                    None if !line.trim().is_empty() => warnings.push(format!(
                        "{}: key 'chpasswd': list entry {:?} has no ':' between name and password; ignored",
                        self.origin,
                        line.trim()
                    )),
                    None => {}
                }
            }
            out
        });
        Ok(ChpasswdLists {
            users,
            list,
            names_anyone,
        })
    }

    /// Clear-text and random passwords are refused: nixseed never stores a clear-text
    /// secret in `/var/identity`.
    fn hashed_only(
        &self,
        name: &str,
        pw: String,
        out: &mut Vec<(String, String)>,
        warnings: &mut Vec<String>,
    ) {
        if pw.starts_with('$') {
            out.push((name.to_string(), pw));
        } else {
            warnings.push(format!(
                "{}: key 'chpasswd': clear-text or random password for '{name}' ignored; give a crypt hash",
                self.origin
            ));
        }
    }

    /// The entries, whose contents (decoded) may total the user-data limit together (a
    /// later part's list replaces an earlier one's, so each list has the whole limit).
    fn write_files(
        &self,
        v: &Value,
        warnings: &mut Vec<String>,
    ) -> Result<Vec<WriteFile>, UserDataError> {
        // `write_files:` with no value writes nothing, as cloud-init's module skips it.
        let items = match v {
            Value::Sequence(items) => items.as_slice(),
            Value::Null => &[],
            _ => return Err(self.err(format!("expected a list, found {}", yaml::kind(v)))),
        };
        if items.len() > MAX_WRITE_FILES {
            return Err(self.err(format!(
                "{} entries; at most {MAX_WRITE_FILES} are written",
                items.len()
            )));
        }
        let mut out = Vec::new();
        let mut left = MAX_USER_DATA;
        let mut components = 0usize;
        for (i, item) in items.iter().enumerate() {
            // Skipped with a warning, as cloud-init's module skips it.
            let Some(path) = item
                .get("path")
                .and_then(yaml::scalar_text)
                .filter(|p| !p.is_empty())
            else {
                warnings.push(format!(
                    "{}: key 'write_files': entry {} has no 'path': skipped, as cloud-init skips it",
                    self.origin,
                    i + 1
                ));
                continue;
            };
            check_write_path(&path).map_err(|d| self.err(format!("{path}: {d}")))?;
            // A URL to fetch: nixseed reads no URLs (the initrd has no network). cloud-init
            // falls back to `content` when the fetch fails, and skips an entry with none.
            let url = item
                .get("source")
                .and_then(|s| s.get("uri"))
                .and_then(yaml::scalar_text)
                .filter(|u| !u.is_empty());
            if let Some(url) = &url {
                let has_content = item.get("content").is_some_and(|c| !c.is_null());
                warnings.push(format!(
                    "{}: key 'write_files': {path}: source uri {url} is not fetched (nixseed reads no URLs); {}",
                    self.origin,
                    if has_content {
                        "its inline content is written instead, as cloud-init does when the fetch fails"
                    } else {
                        "skipped, as cloud-init skips it when the fetch fails and no content is given"
                    }
                ));
                if !has_content {
                    continue;
                }
            }
            components += path.split('/').filter(|c| !c.is_empty()).count();
            if components > MAX_WRITE_FILES_COMPONENTS {
                return Err(self.err(format!(
                    "{path}: the paths of all entries together have more than {MAX_WRITE_FILES_COMPONENTS} components (each may be a directory to make on /var)"
                )));
            }
            // `!!binary` content is bytes, as PyYAML reads it; anything else is text.
            let content = match item.get("content") {
                Some(c) => match yaml::binary(c) {
                    Some(bytes) => bytes.map_err(|()| {
                        self.err(format!(
                            "{path}: !!binary content is not base64 text (a plain number or boolean loses its text: quote it)"
                        ))
                    })?,
                    None => yaml::scalar_text(c).unwrap_or_default().into_bytes(),
                },
                None => Vec::new(),
            };
            let encoding = item
                .get("encoding")
                .and_then(yaml::scalar_text)
                .map(|e| e.trim().to_ascii_lowercase());
            let content = self.decode(&path, content, encoding.as_deref(), left, warnings)?;
            left = left.checked_sub(content.len()).ok_or_else(|| {
                self.err(format!(
                    "{path}: the contents of all entries together exceed the {MAX_USER_DATA} byte limit"
                ))
            })?;
            let permissions = match item.get("permissions").filter(|p| !p.is_null()) {
                Some(p) => file_mode(p).unwrap_or_else(|d| {
                    warnings.push(format!(
                        "{}: key 'write_files': {path}: {d}; written with mode 0644, as cloud-init writes it",
                        self.origin
                    ));
                    0o644
                }),
                None => 0o644,
            };
            let flag = |k: &str| item.get(k).and_then(yaml::bool11).unwrap_or(false);
            if flag("defer") {
                warnings.push(format!(
                    "{}: key 'write_files': {path}: 'defer' ignored: written when the seed is applied, before any service starts",
                    self.origin
                ));
            }
            out.push(WriteFile {
                path,
                content,
                permissions,
                append: flag("append"),
                owner: item
                    .get("owner")
                    .and_then(yaml::scalar_text)
                    .map(|o| o.trim().to_string())
                    .filter(|o| !o.is_empty()),
            });
        }
        Ok(out)
    }

    /// An entry's content by its `encoding`, named as cloud-init names them (in any case):
    /// `b64`/`base64`, `gz`/`gzip`, and the two together (`gz+b64`, `gzip+base64`, ...).
    /// gzip content may be given as `!!binary` (bytes already) or as base64 text.
    /// An unknown encoding is written as it is, with a warning, as cloud-init does.
    fn decode(
        &self,
        path: &str,
        content: Vec<u8>,
        encoding: Option<&str>,
        left: usize,
        warnings: &mut Vec<String>,
    ) -> Result<Vec<u8>, UserDataError> {
        let base64 = |raw: &[u8]| {
            std::str::from_utf8(raw)
                .ok()
                .and_then(crate::credentials::base64_decode)
                .ok_or_else(|| self.err(format!("{path}: base64 content is corrupt")))
        };
        let gunzip = |raw: Vec<u8>| {
            if !raw.starts_with(&[0x1f, 0x8b]) {
                return Err(self.err(format!("{path}: content is not gzip data")));
            }
            gunzip_if_needed(&raw, self.origin, left).map_err(|e| match e {
                UserDataError::Invalid { detail, .. } => self.err(format!("{path}: {detail}")),
                other => other,
            })
        };
        match encoding {
            None | Some("text/plain") => Ok(content),
            Some("b64" | "base64") => base64(&content),
            Some("gz" | "gzip") if content.starts_with(&[0x1f, 0x8b]) => gunzip(content),
            Some("gz" | "gzip" | "gz+b64" | "gz+base64" | "gzip+b64" | "gzip+base64") => {
                gunzip(base64(&content)?)
            }
            Some(other) => {
                warnings.push(format!(
                    "{}: key 'write_files': {path}: unknown encoding '{other}', written as text",
                    self.origin
                ));
                Ok(content)
            }
        }
    }

    fn commands(&self, v: &Value) -> Result<Vec<String>, UserDataError> {
        let Value::Sequence(items) = v else {
            return Err(self.err(format!("expected a list, found {}", yaml::kind(v))));
        };
        items
            .iter()
            .map(|c| match c {
                Value::Sequence(argv) => Ok(argv
                    .iter()
                    .filter_map(yaml::scalar_text)
                    .map(|a| shell_quote(&a))
                    .collect::<Vec<_>>()
                    .join(" ")),
                other => self.scalar(other),
            })
            .collect()
    }

    fn resolv_conf(&self, v: &Value) -> Result<ResolvConf, UserDataError> {
        let Value::Mapping(m) = v else {
            return Err(self.err(format!("expected a mapping, found {}", yaml::kind(v))));
        };
        Ok(ResolvConf {
            nameservers: m
                .get("nameservers")
                .map(yaml::string_list)
                .unwrap_or_default(),
            searchdomains: m
                .get("searchdomains")
                .map(yaml::string_list)
                .unwrap_or_default(),
            domain: m.get("domain").and_then(yaml::scalar_text),
            options: match m.get("options") {
                Some(Value::Mapping(o)) => o
                    .iter()
                    .filter_map(|(k, v)| {
                        let k = yaml::scalar_text(k)?;
                        Some(match yaml::bool11(v) {
                            Some(true) => k,
                            Some(false) => return None,
                            None => format!("{k}:{}", yaml::scalar_text(v)?),
                        })
                    })
                    .collect(),
                Some(v) => yaml::string_list(v),
                None => Vec::new(),
            },
        })
    }

    fn nixseed(&self, v: &Value) -> Result<NixseedBlock, UserDataError> {
        let Value::Mapping(m) = v else {
            return Err(self.err(format!("expected a mapping, found {}", yaml::kind(v))));
        };
        let mut block = NixseedBlock::default();
        for (k, v) in m {
            let k = yaml::scalar_text(k).unwrap_or_default();
            match k.as_str() {
                "machine-id" => block.machine_id = Some(self.scalar(v)?),
                "product-uuid" => block.product_uuid = Some(self.scalar(v)?),
                "tcp_ports" => block.tcp_ports = yaml::string_list(v),
                "udp_ports" => block.udp_ports = yaml::string_list(v),
                "hosts" => block.hosts = yaml::string_list(v),
                "resolv_conf" => block.resolv_conf = Some(self.scalar(v)?),
                other => {
                    return Err(self.err(format!(
                        "unknown key '{other}' in the nixseed block (known: machine-id, product-uuid, tcp_ports, udp_ports, hosts, resolv_conf)"
                    )));
                }
            }
        }
        Ok(block)
    }
}

/// A `write_files` mode as cloud-init reads it: a YAML number is the mode itself (`0o640`,
/// `0x1a4`, `420`), text is octal (`'0644'`, `'640'`, `0644`, which YAML 1.2 keeps as text);
/// bits above 07777 are dropped, as chmod(2) drops them. Anything else is an error for the
/// caller to warn of (cloud-init then writes the file with its default mode).
fn file_mode(v: &Value) -> Result<u32, String> {
    let mode = match v {
        Value::Number(n) => n.as_u64(),
        other => yaml::scalar_text(other).and_then(|t| {
            let t = t.trim();
            let digits = t
                .strip_prefix("0o")
                .or_else(|| t.strip_prefix("0O"))
                .unwrap_or(t);
            u64::from_str_radix(digits, 8).ok()
        }),
    };
    match mode.and_then(|m| u32::try_from(m).ok()) {
        Some(m) => Ok(m & 0o7777),
        None => Err(format!(
            "permissions '{}' are not a file mode (octal text like '0644')",
            yaml::scalar_text(v).unwrap_or_else(|| yaml::kind(v).to_string())
        )),
    }
}

/// Whether the absolute `path` is `dir` or lies below it, comparing whole components: a
/// doubled or trailing `/` changes nothing (`/var//identity/x` is inside `/var/identity`,
/// `/var/identity2` is not).
pub fn is_within(path: &str, dir: &str) -> bool {
    fn components(p: &str) -> Vec<&str> {
        p.split('/').filter(|c| !c.is_empty()).collect()
    }
    let (p, d) = (components(path), components(dir));
    p.len() >= d.len() && p[..d.len()] == d[..]
}

/// How many `write_files` entries one document may have: each is a file (and perhaps
/// directories) on `/var`, so a seed of many tiny entries must not use up its inodes.
pub const MAX_WRITE_FILES: usize = 1024;

/// `users:` entries a document may name (and all its parts together): more would only
/// stall the boot composing accounts no machine has.
pub const MAX_USERS: usize = 1024;

/// How many path components the `write_files` entries of one document may have together:
/// each may be a directory to make, and 1,024 paths of 2,000 components each would make
/// two million.
pub const MAX_WRITE_FILES_COMPONENTS: usize = 16_384;

/// Where the identity store lives unless the agent is told otherwise.
pub const IDENTITY_DIR: &str = "/var/identity";

/// Where `write_files` never writes, though below `/var` or `/run`: the directories
/// systemd, udev and nixseed itself read their configuration from. A file there would run
/// commands (a unit or drop-in, a tmpfiles, sysctl or udev rule) or change what nixseed
/// applies (its sudoers and sshd includes, its shadow base, the guest agent's passwords),
/// which a seed may do only through `runcmd`, and only when the operator opted in.
pub const WRITE_FILES_REFUSED: &[&str] = &[
    "/run/systemd",
    // systemd-shutdown runs /run/initramfs/shutdown as PID 1 at power-off.
    "/run/initramfs",
    // systemd-sysext and -confext merge images found here.
    "/run/extensions",
    "/run/confexts",
    "/var/lib/extensions",
    "/var/lib/confexts",
    // sudo's timestamps (a forged one skips the password) and users' runtime
    // directories (user units).
    "/run/sudo",
    "/var/run/sudo",
    "/run/user",
    "/var/lib/polkit-1",
    "/var/spool/at",
    "/var/spool/atjobs",
    "/run/udev",
    "/run/tmpfiles.d",
    "/run/sysctl.d",
    "/run/modules-load.d",
    "/run/modprobe.d",
    "/run/binfmt.d",
    "/run/environment.d",
    "/run/sysusers.d",
    "/run/repart.d",
    "/run/credentials",
    "/run/credstore",
    "/run/credstore.encrypted",
    "/run/nixseed",
    "/run/polkit-1",
    "/var/lib/nixseed",
    "/var/lib/systemd",
    "/var/spool/cron",
];

/// `write_files` may only target files below `/var` and `/run`, never in the identity
/// store or a directory of [`WRITE_FILES_REFUSED`]; the root is read-only and other paths
/// would escape the identity contract.
pub fn check_write_path(path: &str) -> Result<(), String> {
    if !path.starts_with('/') {
        return Err("path must be absolute".into());
    }
    if path.split('/').any(|c| c == ".." || c == ".") {
        return Err("path must not contain '.' or '..' components".into());
    }
    // The kernel's own limits (PATH_MAX, NAME_MAX): a longer path could not be opened
    // anyway, and each of its components would cost a directory on `/var` first.
    if path.len() >= 4096 {
        return Err(format!(
            "path is {} bytes long; the limit is 4095",
            path.len()
        ));
    }
    if path.split('/').any(|c| c.len() > 255) {
        return Err("a component of the path is longer than 255 bytes".into());
    }
    let below = |dir: &str| is_within(path, dir) && !is_within(dir, path);
    if !(below("/var") || below("/run")) || is_within(path, IDENTITY_DIR) {
        return Err(format!(
            "write_files may only write under /var or /run (and not into {IDENTITY_DIR})"
        ));
    }
    if let Some(dir) = WRITE_FILES_REFUSED.iter().find(|d| is_within(path, d)) {
        return Err(format!(
            "not into {dir}: the system reads its configuration there, and a file there could run commands, which a seed may do only through runcmd when the operator allows it"
        ));
    }
    Ok(())
}

fn shell_quote(arg: &str) -> String {
    if !arg.is_empty()
        && arg
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c))
    {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accounts `c`'s `chpasswd:` sets a password for, in name order, space-separated.
    fn chpasswd_names(c: &CloudConfig) -> String {
        c.chpasswd
            .hashes()
            .into_keys()
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Each of `wants` is part of one of `c`'s warnings.
    fn assert_warned(c: &CloudConfig, wants: &[&str]) {
        for want in wants {
            assert!(
                c.warnings.iter().any(|w| w.contains(want)),
                "{want}: {:?}",
                c.warnings
            );
        }
    }

    /// user-data read as a seed reads it: parsed, then the legacy `password:` applied
    /// against its own `chpasswd:` (no vendor-data).
    fn parse(bytes: &[u8], origin: &str) -> Result<CloudConfig, UserDataError> {
        let mut c = super::parse(bytes, origin)?;
        let names_anyone = c.chpasswd.names_anyone();
        apply_legacy_password(&mut c, names_anyone, origin);
        Ok(c)
    }

    /// The spellings cloud-init's tutorials use: hyphenated keys, and `users` as a
    /// mapping of name to settings (or to a boolean).
    /// A key string of several lines (an authorized_keys file pasted in) is one key per
    /// line, as cloud-init writes it, for a user and at the top level alike.
    #[test]
    fn a_key_string_of_several_lines_is_several_keys() {
        let c = parse(
            b"#cloud-config\nssh_authorized_keys: \"ssh-ed25519 A top\\n\\nssh-ed25519 B top\\n\"\nusers:\n  - name: alice\n    ssh_authorized_keys: \"ssh-ed25519 C alice\\nssh-ed25519 D alice\\n\"\n",
            "user-data",
        )
        .unwrap();
        assert_eq!(
            c.ssh_authorized_keys,
            ["ssh-ed25519 A top", "ssh-ed25519 B top"]
        );
        assert_eq!(
            c.users[0].ssh_authorized_keys,
            ["ssh-ed25519 C alice", "ssh-ed25519 D alice"]
        );
    }

    /// The first line tells the format as cloud-init tells it: `#Cloud-Config` is
    /// cloud-config; `#cloud-config-archive` and `#cloud-config-jsonp` are other formats,
    /// passed over with a warning rather than refused as a malformed cloud-config; a
    /// `## template: jinja` header over text with no template in it is read past; a real
    /// template is passed over with a warning.
    #[test]
    fn the_first_line_tells_the_format_as_cloud_init_tells_it() {
        let c = parse(
            b"#Cloud-Config
hostname: web1
",
            "user-data",
        )
        .unwrap();
        assert_eq!(c.hostname.as_deref(), Some("web1"));
        for other in [
            "#cloud-config-archive
- type: text/cloud-config
  content: 'hostname: x'
",
            "#cloud-config-jsonp
[]
",
        ] {
            let c = parse(other.as_bytes(), "user-data").unwrap();
            assert_eq!(c.hostname, None);
            assert!(
                c.warnings.iter().any(|w| w.contains("user-data")),
                "{other}: {:?}",
                c.warnings
            );
        }
        let c = parse(
            b"## template: jinja
#cloud-config
hostname: web2
",
            "user-data",
        )
        .unwrap();
        assert_eq!(c.hostname.as_deref(), Some("web2"));
        let c = parse(
            b"## template: jinja
#cloud-config
hostname: {{ v1.local_hostname }}
",
            "user-data",
        )
        .unwrap();
        assert_eq!(c.hostname, None);
        assert!(
            c.warnings.iter().any(|w| w.contains("template")),
            "{:?}",
            c.warnings
        );
    }

    /// `resolv_conf:` counts only with `manage_resolv_conf: true`, as cloud-init's
    /// cc_resolv_conf runs only then; without it, a warning says it was passed over.
    #[test]
    fn resolv_conf_needs_manage_resolv_conf() {
        let rc = "resolv_conf:\n  nameservers: ['192.0.2.53']\n";
        let c = parse(format!("#cloud-config\n{rc}").as_bytes(), "user-data").unwrap();
        assert!(c.resolv_conf.is_none());
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("'resolv_conf' ignored without manage_resolv_conf")),
            "{:?}",
            c.warnings
        );
        let c = parse(
            format!("#cloud-config\nmanage_resolv_conf: true\n{rc}").as_bytes(),
            "user-data",
        )
        .unwrap();
        assert_eq!(
            c.resolv_conf.map(|r| r.nameservers),
            Some(vec!["192.0.2.53".to_owned()])
        );
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
    }

    #[test]
    fn users_take_hyphenated_keys_and_the_mapping_form() {
        let c = parse(
            b"#cloud-config\nusers:\n  - name: demo\n    groups: sudo\n    ssh-authorized-keys: [ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoKeyDemoKeyDemoKeyDemoKeyDemoKeyDemoK demo]\n    lock-passwd: false\n",
            "user-data",
        )
        .unwrap();
        let demo = c.users.iter().find(|u| u.name == "demo").unwrap();
        assert_eq!(demo.ssh_authorized_keys.len(), 1, "{demo:?}");
        assert_eq!(demo.lock_passwd, Some(false));
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);

        let c = parse(
            b"#cloud-config\nusers:\n  alice: {groups: wheel}\n  bob: true\n  carol: false\n",
            "user-data",
        )
        .unwrap();
        let names: Vec<&str> = c.users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["alice", "bob"]);
        assert_eq!(c.users[0].groups, ["wheel"]);

        let err = parse(
            b"#cloud-config\nusers:\n  dave: [a, b]\n",
            "/seed/user-data",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("/seed/user-data") && err.contains("dave"),
            "{err}"
        );
    }

    /// write_files never reaches the directories the system reads its configuration
    /// from, however the path is spelt; a neighbour with a longer name is fine.
    #[test]
    fn write_files_stay_out_of_the_systems_configuration() {
        for bad in [
            "/run/systemd/system/sshd.service.d/x.conf",
            "/run//systemd/network/10-cloud-init-eth0.network",
            "/run/udev/rules.d/99-x.rules",
            "/run/tmpfiles.d/x.conf",
            "/run/nixseed/sudoers.d/zz",
            "/var/lib/nixseed/passwords.json",
            "/var/lib/systemd/linger/root",
            "/var/spool/cron/crontabs/root",
            "/run/polkit-1/rules.d/00-x.rules",
            "/run/initramfs/shutdown",
            "/run/extensions/x.raw",
            "/var/lib/extensions/x.raw",
            "/run/sudo/ts/root",
            "/run/user/0/systemd/user/x.service",
            "/var/spool/atjobs/a0001",
        ] {
            let err = check_write_path(bad).unwrap_err();
            assert!(err.contains("runcmd"), "{bad}: {err}");
        }
        for good in ["/run/systemd-app/flag", "/run/app/x", "/var/lib/app/conf"] {
            assert_eq!(check_write_path(good), Ok(()), "{good}");
        }
    }

    /// `disable_root: false` (what seedctl writes for cloud-init) says what nixseed does
    /// with root's keys anyway: no warning. Any other value is named in one.
    #[test]
    fn disable_root_false_is_quiet_and_true_is_named() {
        let c = parse(b"#cloud-config\ndisable_root: false\n", "user-data").unwrap();
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = parse(b"#cloud-config\ndisable_root: true\n", "user-data").unwrap();
        assert_eq!(
            c.warnings,
            [
                "user-data: key 'disable_root' ignored: root's keys are installed as given, as with `disable_root: false`"
            ]
        );
    }

    /// A key with a local tag (`!x hostname:`) is not the key `hostname`: ignored with a
    /// warning. (A fuzzed input once panicked here: the tagged key was matched by name,
    /// then looked up in the mapping, where it is not found by name.)
    #[test]
    fn a_tagged_key_is_ignored_not_read_as_its_name() {
        let ud = b"#cloud-configfig\n!ostoud-c)me: hostname: TRUE\n.NANge_etc_me: TRUE\n.NANge_etc_hosts: truehost";
        let c = parse(ud, "user-data").unwrap();
        assert_eq!(c.hostname, None);
        assert!(
            c.warnings
                .iter()
                .any(|w| w == "user-data: a key ignored: a tagged value, not a plain string"),
            "{:?}",
            c.warnings
        );
        let c = parse(b"#cloud-config\n!x fqdn: 12\nhostname: 0123\n", "user-data").unwrap();
        assert_eq!((c.fqdn, c.hostname.as_deref()), (None, Some("0123")));
    }

    /// gzip+base64 of `n` zero bytes, as a write_files `content`.
    fn gz_b64_zeros(n: usize) -> String {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&vec![0u8; n]).unwrap();
        crate::channel::base64_encode(&gz.finish().unwrap())
    }

    #[test]
    fn write_files_contents_are_limited_all_together_and_refused_not_cut() {
        // Three entries of 6 MiB each: 16 KiB of user-data, 18 MiB decoded.
        let six = gz_b64_zeros(6 << 20);
        let mut ud = String::from("#cloud-config\nwrite_files:\n");
        for i in 0..3 {
            ud.push_str(&format!(
                "  - path: /var/lib/f{i}\n    encoding: gz+b64\n    content: {six}\n"
            ));
        }
        let e = parse(ud.as_bytes(), "user-data").unwrap_err().to_string();
        assert!(
            e.contains("user-data") && e.contains("/var/lib/f2") && e.contains("byte limit"),
            "{e}"
        );
        // Two fit.
        let two: String = ud.lines().take(2 + 2 * 3).collect::<Vec<_>>().join("\n");
        let c = parse(two.as_bytes(), "user-data").unwrap();
        assert_eq!(c.write_files.len(), 2);
        let lens: Vec<usize> = c.write_files.iter().map(|f| f.content.len()).collect();
        assert_eq!(lens, vec![6 << 20; 2]);
        // One entry over the whole limit is refused, not cut to the limit.
        let big = gz_b64_zeros(MAX_USER_DATA + 1);
        let one = format!(
            "#cloud-config\nwrite_files:\n  - path: /var/lib/big\n    encoding: gz+b64\n    content: {big}\n"
        );
        let e = parse(one.as_bytes(), "user-data").unwrap_err().to_string();
        assert!(
            e.contains("/var/lib/big") && e.contains("gzip data expands"),
            "{e}"
        );
    }

    #[test]
    fn write_files_modes_are_read_as_cloud_init_reads_them() {
        let text = "#cloud-config\nwrite_files:\n  - {path: /var/a, permissions: 0o640}\n  - {path: /var/b, permissions: 420}\n  - {path: /var/c, permissions: '0600'}\n  - {path: /var/d, permissions: 0755}\n  - {path: /var/e, permissions: 0x1ed}\n  - {path: /var/f}\n";
        let c = parse(text.as_bytes(), "user-data").unwrap();
        let modes: Vec<u32> = c.write_files.iter().map(|f| f.permissions).collect();
        assert_eq!(modes, [0o640, 0o644, 0o600, 0o755, 0o755, 0o644]);
        // What cloud-init cannot decode is written with its default mode, with a warning
        // (the seed is not refused); bits above 07777 go, as chmod(2) drops them.
        for (mode, want) in [("0999", 0o644), ("rw-r--r--", 0o644), ("0o17777", 0o7777)] {
            let text = format!(
                "#cloud-config\nwrite_files:\n  - {{path: /var/a, permissions: '{mode}'}}\n"
            );
            let c = parse(text.as_bytes(), "user-data").unwrap();
            assert_eq!(c.write_files[0].permissions, want, "{mode}");
            let warned = c.warnings.iter().any(|w| {
                w.starts_with("user-data: key 'write_files': /var/a: permissions")
                    && w.ends_with("written with mode 0644, as cloud-init writes it")
            });
            assert_eq!(warned, want == 0o644, "{mode}: {:?}", c.warnings);
        }
    }

    /// As cloud-init's module: an entry with no `path` is skipped with a warning, not a
    /// refused seed; a `source.uri` (which nixseed does not fetch) falls back to the inline
    /// content, and an entry with neither is skipped with a warning, never written empty.
    #[test]
    fn write_files_skip_what_cloud_init_skips_and_say_so() {
        let text = "#cloud-config\nwrite_files:\n  - {content: orphan}\n  - {path: /var/lib/app/cfg, source: {uri: 'http://h/cfg'}}\n  - {path: /var/lib/app/other, source: {uri: 'http://h/o'}, content: fallback}\n  - {path: /var/lib/app/empty}\n";
        let c = parse(text.as_bytes(), "user-data").unwrap();
        let written: Vec<(&str, &[u8])> = c
            .write_files
            .iter()
            .map(|f| (f.path.as_str(), &f.content[..]))
            .collect();
        assert_eq!(
            written,
            [
                ("/var/lib/app/other", &b"fallback"[..]),
                ("/var/lib/app/empty", b"")
            ]
        );
        let said = |what: &str| c.warnings.iter().any(|w| w.contains(what));
        assert!(said("entry 1 has no 'path': skipped"), "{:?}", c.warnings);
        assert!(
            said("/var/lib/app/cfg: source uri http://h/cfg is not fetched")
                && said("skipped, as cloud-init skips it"),
            "{:?}",
            c.warnings
        );
        assert!(
            said("its inline content is written instead"),
            "{:?}",
            c.warnings
        );
    }

    #[test]
    fn write_files_encodings_by_cloud_init_names_in_any_case() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"hello gz\n").unwrap();
        let gz = crate::channel::base64_encode(&gz.finish().unwrap());
        let text = format!(
            "#cloud-config\nwrite_files:\n  - {{path: /var/a, encoding: B64, content: aGkK}}\n  - {{path: /var/b, encoding: gzip, content: !!binary '{gz}'}}\n  - {{path: /var/c, encoding: gzip+b64, content: '{gz}'}}\n  - {{path: /var/d, encoding: ' GZ+Base64 ', content: '{gz}'}}\n  - {{path: /var/e, encoding: rot13, content: plain}}\n  - {{path: /var/f, content: x, append: true, owner: 'app:apps', defer: true}}\n"
        );
        let c = parse(text.as_bytes(), "user-data").unwrap();
        let contents: Vec<&[u8]> = c.write_files.iter().map(|f| &f.content[..]).collect();
        assert_eq!(
            contents,
            [
                &b"hi\n"[..],
                b"hello gz\n",
                b"hello gz\n",
                b"hello gz\n",
                b"plain",
                b"x"
            ]
        );
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("/var/e: unknown encoding 'rot13', written as text")),
            "{:?}",
            c.warnings
        );
        let f = &c.write_files[5];
        assert!(f.append && f.owner.as_deref() == Some("app:apps"));
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("/var/f: 'defer' ignored"))
        );
        let e = parse(
            b"#cloud-config\nwrite_files:\n  - {path: /var/a, encoding: gz, content: plain}\n",
            "user-data",
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("/var/a: "), "{e}");
    }

    #[test]
    fn binary_content_without_encoding_is_written_as_its_bytes() {
        // cloud-init's own example writes an executable this way: PyYAML decodes
        // `!!binary`, and write_files writes the bytes.
        let bytes: Vec<u8> = (0u8..=255).collect();
        let b64 = crate::channel::base64_encode(&bytes);
        let (head, tail) = b64.split_at(200);
        let text = format!(
            "#cloud-config\nwrite_files:\n- path: /var/lib/app/blob\n  permissions: '0555'\n  content: !!binary |\n    {head}\n    {tail}\n- {{path: /var/b, content: !!binary aGkK}}\n- path: /var/c\n  content: '!!binary aGkK'\n- path: /var/d\n  # content: !!binary aGkK\n  content: |\n    !!binary aGkK\n"
        );
        let c = parse(text.as_bytes(), "user-data").unwrap();
        let contents: Vec<&[u8]> = c.write_files.iter().map(|f| &f.content[..]).collect();
        assert_eq!(
            contents,
            [&bytes[..], b"hi\n", b"!!binary aGkK", b"!!binary aGkK\n"]
        );
        let e = parse(
            b"#cloud-config\nwrite_files:\n- {path: /var/a, content: !!binary 'not base64!'}\n",
            "user-data",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("user-data: key 'write_files': /var/a: !!binary content is not base64"),
            "{e}"
        );
        // Where text is wanted, binary data is named as such.
        let e = parse(b"#cloud-config\nhostname: !!binary aGkK\n", "user-data")
            .unwrap_err()
            .to_string();
        assert!(e.contains("binary data (!!binary)"), "{e}");
    }

    /// cloud-init takes a rule or a list of rules; `sudo: true` would be a rule `true`,
    /// which sudo cannot parse.
    #[test]
    fn sudo_is_a_rule_or_a_list_of_rules() {
        let c = parse(
            b"#cloud-config\nusers:\n  - {name: a, sudo: 'ALL=(ALL) ALL'}\n  - {name: b, sudo: ['ALL=(x) ALL', 'ALL=(y) ALL']}\n  - {name: c, sudo: true}\n  - {name: d, sudo: false}\n  - {name: e, sudo: [ALL, 3]}\n",
            "user-data",
        )
        .unwrap();
        let rules: Vec<usize> = c.users.iter().map(|u| u.sudo.len()).collect();
        assert_eq!(rules, [1, 2, 0, 0, 0]);
        let said: Vec<&String> = c
            .warnings
            .iter()
            .filter(|w| w.contains("'sudo' is"))
            .collect();
        assert_eq!(said.len(), 2, "{:?}", c.warnings);
        assert!(
            said[0].contains("user 'c': 'sudo' is a boolean"),
            "{said:?}"
        );
    }

    #[test]
    fn write_paths_are_compared_by_whole_components() {
        for ok in [
            "/var/lib/app.conf",
            "/run/app/x",
            "/var//lib/x",
            "/var/identity2/x",
        ] {
            assert_eq!(check_write_path(ok), Ok(()), "{ok}");
        }
        for bad in [
            "/var/identity",
            "/var/identity/current",
            "/var//identity/current",
            "/var/identity//gen-1/hostname",
            "//var/identity/x",
            "/var/",
            "/var",
            "/run//",
            "/etc/passwd",
            "/var/../etc/passwd",
            "var/x",
        ] {
            assert!(check_write_path(bad).is_err(), "{bad} must be refused");
        }
        // As deep as the kernel allows and no deeper: a path of a million components
        // would cost a million directories on /var.
        let deep = format!("/var/tmp{}", "/x".repeat(2040));
        assert!(check_write_path(&deep).is_ok());
        let deeper = format!("/var/tmp{}", "/x".repeat(2044));
        assert!(check_write_path(&deeper).unwrap_err().contains("4095"));
        let long_name = format!("/var/tmp/{}", "n".repeat(256));
        assert!(check_write_path(&long_name).is_err());
        // Within each path's limit, but not all together.
        let deep = format!("/var/tmp{}", "/x".repeat(2000));
        let doc = format!(
            "#cloud-config\nwrite_files:\n{}",
            format!("  - {{path: '{deep}', content: a}}\n").repeat(9)
        );
        let err = parse(doc.as_bytes(), "/seed/user-data")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/seed/user-data") && err.contains("more than 16384 components"),
            "{err}"
        );
    }

    /// user-data exactly in the shape and order Proxmox VE writes it (PVE::QemuServer::Cloudinit).
    const PROXMOX: &str = "#cloud-config\nhostname: 0123\nmanage_etc_hosts: true\nfqdn: 0123.example.com\nuser: admin\npassword: $5$salt$4iUKXwyDd6fNk3MvxwJHJEkmF2GIHE26b2ecvE1eLX.\nssh_authorized_keys:\n  - ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIA0 admin@host\nchpasswd:\n  expire: False\nusers:\n  - default\npackage_upgrade: true\n";

    #[test]
    fn proxmox_user_data_parses_exactly() {
        let c = parse(PROXMOX.as_bytes(), "user-data").unwrap();
        assert_eq!(c.hostname.as_deref(), Some("0123"));
        assert_eq!(c.fqdn.as_deref(), Some("0123.example.com"));
        assert_eq!(c.manage_etc_hosts, Some(true));
        assert_eq!(c.users.len(), 1);
        assert_eq!(c.users[0].name, "admin");
        assert!(c.users[0].passwd.as_deref().unwrap().starts_with("$5$"));
        assert_eq!(c.ssh_authorized_keys.len(), 1);
        assert_eq!(c.warnings.len(), 1, "{:?}", c.warnings);
        assert!(c.warnings[0].contains("'package_upgrade'"));
    }

    #[test]
    fn clear_text_passwords_are_never_kept() {
        let c = parse(
            b"#cloud-config\nuser: admin\npassword: passw0rd\nusers:\n  - name: bob\n    passwd: hunter2\n  - name: eve\n    hashed_passwd: $6$s$h\n",
            "user-data",
        )
        .unwrap();
        let pw = |n: &str| c.users.iter().find(|u| u.name == n).unwrap().passwd.clone();
        assert_eq!(pw("admin"), None);
        assert_eq!(pw("bob"), None);
        assert_eq!(pw("eve").as_deref(), Some("$6$s$h"));
        for n in ["admin", "bob"] {
            assert!(
                c.warnings
                    .iter()
                    .any(|w| w.contains("user-data: clear-text password") && w.contains(n)),
                "{:?}",
                c.warnings
            );
        }
    }

    #[test]
    fn gzip_user_data_is_unpacked() {
        use std::io::Write;
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"#cloud-config\nhostname: zipped\n").unwrap();
        let c = parse(&gz.finish().unwrap(), "user-data").unwrap();
        assert_eq!(c.hostname.as_deref(), Some("zipped"));
    }

    #[test]
    fn gzip_mime_parts_are_limited_all_together() {
        use std::io::Write;
        let mut body = b"#cloud-config\n".to_vec();
        body.resize(6 << 20, b'#');
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&body).unwrap();
        let part = crate::channel::base64_encode(&gz.finish().unwrap());
        let mut text = String::from("Content-Type: multipart/mixed; boundary=\"XYZ\"\n\n");
        for _ in 0..3 {
            text.push_str(&format!(
                "--XYZ\nContent-Type: text/cloud-config\nContent-Transfer-Encoding: base64\n\n{part}\n"
            ));
        }
        text.push_str("--XYZ--\n");
        let e = parse(text.as_bytes(), "user-data").unwrap_err().to_string();
        assert!(
            e.starts_with("user-data: ") && e.contains("byte limit"),
            "{e}"
        );
    }

    /// Several documents (a ConfigDrive's vendor-data list) share one limit too.
    #[test]
    fn documents_are_limited_all_together() {
        use std::io::Write;
        let mut body = b"#cloud-config\n".to_vec();
        body.resize(6 << 20, b'#');
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(&body).unwrap();
        let doc = gz.finish().unwrap();
        assert!(parse_documents(&[&doc, &doc], "vendor_data.json").is_ok());
        let e = parse_documents(&[&doc, &doc, &doc], "vendor_data.json")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("vendor_data.json: ") && e.contains("byte limit"),
            "{e}"
        );
    }

    /// A MIME document of cloud-config parts, each with its extra header lines.
    fn mime(parts: &[(&str, &str)]) -> String {
        let mut text = String::from("Content-Type: multipart/mixed; boundary=\"B\"\n\n");
        for (headers, body) in parts {
            text.push_str(&format!(
                "--B\nContent-Type: text/cloud-config\n{headers}\n{body}\n"
            ));
        }
        text + "--B--\n"
    }

    /// A part's merge, from its `Merge-Type` header or its `merge_how` key, decides as
    /// cloud-init 22.4's mergers decide (each case checked against them): Terraform's
    /// `list(append)+dict(recurse_array)+str()` appends lists and keeps a scalar given
    /// before, while adding new keys; `dict(replace)` replaces lists even with
    /// `list(append)`; a later part with no merge replaces; a merge with no `dict`
    /// merger adds nothing, with a warning.
    #[test]
    fn a_parts_merge_type_decides_as_cloud_init_merges() {
        let first = "#cloud-config\nhostname: a\nusers: [{name: alice}]\nruncmd: [a]\n";
        let second =
            "#cloud-config\nhostname: b\nusers: [{name: bob}]\nruncmd: [b]\nfqdn: new.example\n";
        let names = |c: &CloudConfig| c.users.iter().map(|u| u.name.clone()).collect::<Vec<_>>();
        let c = parse(
            mime(&[
                ("", first),
                (
                    "Merge-Type: list(append)+dict(recurse_array)+str()\n",
                    second,
                ),
            ])
            .as_bytes(),
            "user-data",
        )
        .unwrap();
        assert_eq!(c.hostname.as_deref(), Some("a"));
        assert_eq!(c.fqdn.as_deref(), Some("new.example"));
        assert_eq!(names(&c), ["alice", "bob"]);
        assert_eq!(c.runcmd, ["a", "b"]);
        // A third part with no merge replaces, as cloud-init's default does.
        let c = parse(
            mime(&[
                ("", first),
                (
                    "X-Merge-Type: list(append)+dict(recurse_array)+str()\n",
                    second,
                ),
                ("", "#cloud-config\nruncmd: [c]\n"),
            ])
            .as_bytes(),
            "user-data",
        )
        .unwrap();
        assert_eq!(c.runcmd, ["c"]);
        // The part's own key, in the list form.
        let c = parse(
            mime(&[
                ("", first),
                ("", "#cloud-config\nmerge_how:\n  - {name: list, settings: [append]}\n  - {name: dict, settings: [recurse_array]}\nruncmd: [b]\n"),
            ])
            .as_bytes(),
            "user-data",
        )
        .unwrap();
        assert_eq!(c.runcmd, ["a", "b"]);
        assert!(c.warnings.is_empty(), "{:?}", c.warnings);
        let c = parse(
            mime(&[
                ("", first),
                ("Merge-Type: list(append)+dict(replace)+str()\n", second),
            ])
            .as_bytes(),
            "user-data",
        )
        .unwrap();
        assert_eq!(
            (c.hostname.as_deref(), names(&c)),
            (Some("b"), vec!["bob".to_owned()])
        );
        let c = parse(
            mime(&[("", first), ("Merge-Type: list(append)\n", second)]).as_bytes(),
            "user-data",
        )
        .unwrap();
        assert_eq!((c.hostname.as_deref(), c.fqdn), (Some("a"), None));
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("names no dict merger")),
            "{:?}",
            c.warnings
        );
    }

    /// cloud-init's list merger under `recurse_array` (each case checked against 22.4's
    /// CloudConfigPartHandler): `list()` replaces item by item and keeps the earlier
    /// list's length, `prepend` puts the part's items first, `no_replace` keeps the
    /// earlier list; the same inside `chpasswd`; a later `chpasswd: ~` leaves the earlier.
    #[test]
    fn lists_merge_as_cloud_inits_list_merger() {
        let a = "#cloud-config\nruncmd: [a, b]\nchpasswd: {list: ['root:$6$a$b', 'bob:$6$c$d']}\n";
        let b = "#cloud-config\nruncmd: [c]\nchpasswd: {list: ['admin:$6$e$f']}\n";
        let merged = |how: &str, later: &str| {
            let header = format!("Merge-Type: {how}+dict(recurse_array)+str()\n");
            let c = parse(mime(&[("", a), (&header, later)]).as_bytes(), "user-data").unwrap();
            let names = chpasswd_names(&c);
            (c.runcmd.join(" "), names, c.warnings)
        };
        let pair = |r: &str, n: &str| (r.to_owned(), n.to_owned());
        let strip = |(r, n, _): (String, String, Vec<String>)| (r, n);
        assert_eq!(strip(merged("list()", b)), pair("c b", "admin bob"));
        assert_eq!(
            strip(merged("list(prepend)", b)),
            pair("c a b", "admin bob root")
        );
        assert_eq!(
            strip(merged("list(no_replace)", b)),
            pair("a b", "bob root")
        );
        assert_eq!(
            strip(merged("list(append)", b)),
            pair("a b c", "admin bob root")
        );
        let (runcmd, names, warnings) =
            merged("list()", "#cloud-config\nruncmd: [c, d, e]\nchpasswd: ~\n");
        assert_eq!(pair(&runcmd, &names), pair("c d", "bob root"));
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("key 'chpasswd' is null, not a mapping")),
            "{warnings:?}"
        );
    }

    /// User-data's `ssh_pwauth: unchanged` wins over vendor-data's `true`, as in
    /// cloud-init's merge; `manage_etc_hosts: Template` is on, as `translate_bool` with
    /// its `template` addon reads it.
    #[test]
    fn user_datas_unchanged_ssh_pwauth_wins_and_template_is_any_case() {
        let user = parse(
            b"#cloud-config\nssh_pwauth: unchanged\nmanage_etc_hosts: Template\n",
            "user-data",
        )
        .unwrap();
        let vendor = parse(b"#cloud-config\nssh_pwauth: true\n", "vendor-data").unwrap();
        let c = user.over(vendor.clone());
        assert_eq!((c.ssh_pwauth, c.manage_etc_hosts), (None, Some(true)));
        let silent = parse(b"#cloud-config\nhostname: a\n", "user-data").unwrap();
        assert_eq!(silent.over(vendor).ssh_pwauth, Some(true));
    }

    /// User-data with only the legacy `user:` and vendor-data with `users:`: both accounts,
    /// as cloud-init's merged config holds both keys; user-data's `users:` still replaces
    /// vendor-data's whole.
    #[test]
    fn a_legacy_user_does_not_hide_vendor_data_s_users() {
        // The accounts of user-data `user` over vendor-data `vendor`.
        let merged = |user: &str, vendor: &str| -> Vec<User> {
            let vendor = parse(
                format!("#cloud-config\n{vendor}\n").as_bytes(),
                "vendor-data",
            );
            let user = parse(format!("#cloud-config\n{user}\n").as_bytes(), "user-data");
            user.unwrap().over(vendor.unwrap()).users
        };
        let names = |users: &[User]| users.iter().map(|u| u.name.clone()).collect::<Vec<_>>();
        let ops = "users: [{name: ops, sudo: 'ALL=(ALL) ALL', ssh_authorized_keys: [k]}]";
        let users = merged("user: alice", ops);
        assert_eq!(names(&users), ["alice", "ops"]);
        assert_eq!(users[1].sudo, ["ALL=(ALL) ALL"]);
        assert_eq!(names(&merged("users: [bob]", ops)), ["bob"]);
        // vendor-data's own `user:` loses to user-data's: no account, no rule.
        let ubuntu =
            "user: {name: ubuntu, sudo: 'ALL=(ALL) NOPASSWD:ALL', ssh_authorized_keys: [k]}";
        assert_eq!(names(&merged("user: alice", ubuntu)), ["alice"]);
        // `sudo: false` is given: a later entry's rule for the same name does not apply.
        let users = merged(
            "user: {name: alice, sudo: false, ssh_authorized_keys: [k]}",
            "users: [{name: alice, sudo: 'ALL=(ALL) ALL'}]",
        );
        assert_eq!(names(&users), ["alice"]);
        assert!(users[0].sudo.is_empty(), "{:?}", users[0].sudo);
        let c = parse(
            b"#cloud-config\nusers: [{name: a, sudo: false}, {name: a, sudo: 'ALL=(ALL) ALL'}]\n",
            "user-data",
        )
        .unwrap();
        assert!(c.users[0].sudo.is_empty());
    }

    /// `users: ["bob,carol"]` is two accounts, as cloud-init splits a string in the list.
    #[test]
    fn a_comma_string_in_the_users_list_names_several() {
        let c = parse(b"#cloud-config\nusers: ['bob, carol', dave]\n", "user-data").unwrap();
        let names: Vec<&str> = c.users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["bob", "carol", "dave"]);
    }

    /// `chpasswd.users` entries by cloud-init's `type`: a `text` password is clear text
    /// even when it looks like a hash, and is not kept; `RANDOM` is not kept; a list line
    /// without `:` is named.
    #[test]
    fn chpasswd_entry_types_are_read_as_cloud_init_reads_them() {
        let c = parse(
            b"#cloud-config\nchpasswd:\n  users:\n    - {name: a, password: $6$a$a}\n    - {name: b, type: text, password: $6$b$b}\n    - {name: c, type: RANDOM}\n    - {name: d, type: odd, password: $6$d$d}\n  list: ['e:$6$e$e', 'oops']\n",
            "user-data",
        )
        .unwrap();
        let names: Vec<String> = c.chpasswd.hashes().into_keys().collect();
        assert_eq!(names, ["a", "e"]);
        assert_warned(
            &c,
            &[
                "clear-text or random password for 'b' ignored",
                "clear-text or random password for 'c' ignored",
                "entry for 'd' of type 'odd' ignored",
                "list entry \"oops\" has no ':'",
            ],
        );
    }

    /// Vendor-data's `chpasswd.users` beside user-data's `chpasswd.list`: both are set, as
    /// cloud-init merges the `chpasswd` mappings; a list user-data names stays its own.
    #[test]
    fn vendor_data_s_chpasswd_lists_fill_in_what_user_data_leaves_out() {
        let vendor = parse(
            b"#cloud-config\nchpasswd: {users: [{name: root, password: $6$r$r}], list: ['bob:$6$b$b']}\n",
            "vendor-data",
        )
        .unwrap();
        let user = parse(
            b"#cloud-config\nchpasswd: {expire: false, list: ['alice:$6$a$a']}\n",
            "user-data",
        )
        .unwrap();
        let merged = user.over(vendor);
        let names: Vec<String> = merged.chpasswd.hashes().into_keys().collect();
        assert_eq!(names, ["alice", "root"]);
    }

    /// A document naming more accounts than any machine has is refused with the file
    /// and key named; a name given twice is one account with both entries' settings.
    #[test]
    fn users_are_bounded_and_a_name_given_twice_is_one_account() {
        let many = |n: usize| {
            let names: Vec<String> = (0..n).map(|i| format!("u{i}")).collect();
            format!("#cloud-config\nusers: [{}]\n", names.join(", "))
        };
        let c = parse(many(MAX_USERS).as_bytes(), "user-data").unwrap();
        assert_eq!(c.users.len(), MAX_USERS);
        let e = parse(many(MAX_USERS + 1).as_bytes(), "user-data").unwrap_err();
        assert!(
            e.to_string()
                .contains("user-data: key 'users': 1025 entries"),
            "{e}"
        );
        // As cloud-init merges them: the first entry's values stay, and the later one's
        // `sudo` and `lock_passwd`, which the first lacks, are added.
        let twice = parse(
            b"#cloud-config\nusers: [{name: a, groups: x}, b, {name: a, groups: y, sudo: 'ALL=(ALL) ALL', lock_passwd: false}]\n",
            "user-data",
        )
        .unwrap();
        let a = &twice.users[0];
        assert_eq!(
            (twice.users.len(), a.groups.clone()),
            (2, vec!["x".to_owned()])
        );
        assert_eq!(a.sudo, ["ALL=(ALL) ALL"]);
        assert_eq!(a.lock_passwd, Some(false));
        // `user: alice` first, her settings in `users:` after: the same account, with them.
        let c = parse(
            b"#cloud-config\nuser: alice\nusers: [{name: alice, sudo: 'ALL=(ALL) ALL', lock_passwd: false}]\n",
            "user-data",
        )
        .unwrap();
        assert_eq!(c.users.len(), 1);
        assert_eq!(c.users[0].sudo, ["ALL=(ALL) ALL"]);
        assert_eq!(c.users[0].lock_passwd, Some(false));
    }

    /// What cloud-init makes of odd `users:` entries: `sudo: ""` is no rule (an empty rule
    /// would make an admin, whose keys log in as root, and a sudoers line sudo refuses); an
    /// entry without `name` is passed over with a warning, and the rest of the seed
    /// applies; `lock_passwd` is Python's truth of the value.
    #[test]
    fn empty_sudo_nameless_entries_and_lock_passwd_as_cloud_init_reads_them() {
        let c = parse(
            b"#cloud-config\nhostname: web1\nusers: [{name: s1, sudo: '', ssh_authorized_keys: [k1]}, {ssh_authorized_keys: [k2]}, {name: s2, sudo: ['', 'ALL=(ALL) ALL']}]\n",
            "user-data",
        )
        .unwrap();
        assert_eq!(c.hostname.as_deref(), Some("web1"));
        let names: Vec<&str> = c.users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(names, ["s1", "s2"]);
        assert!(c.users[0].sudo.is_empty());
        assert_eq!(c.users[1].sudo, ["ALL=(ALL) ALL"]);
        assert_warned(
            &c,
            &["user-data: key 'users': an entry without 'name' ignored"],
        );
        for (value, locked) in [
            ("false", false),
            ("true", true),
            ("'false'", true),
            ("no", false),
            ("0", false),
            ("1", true),
            ("~", false),
            ("''", false),
        ] {
            let c = parse(
                format!("#cloud-config\nusers: [{{name: u, lock_passwd: {value}}}]\n").as_bytes(),
                "user-data",
            )
            .unwrap();
            assert_eq!(c.users[0].lock_passwd, Some(locked), "lock_passwd: {value}");
        }
    }

    /// Switches read as cloud-init reads them (its `is_true`/`is_false`, checked with
    /// 22.4): a number or an odd case is no reason to refuse the seed; an `ssh_pwauth`
    /// it does not understand leaves sshd as it is, with a warning.
    #[test]
    fn switches_are_read_as_cloud_init_reads_them() {
        let c =
            |text: &str| parse(format!("#cloud-config\n{text}").as_bytes(), "user-data").unwrap();
        assert_eq!(c("ssh_pwauth: 1\n").ssh_pwauth, Some(true));
        assert_eq!(c("ssh_pwauth: 'no'\n").ssh_pwauth, Some(false));
        let unchanged = c("ssh_pwauth: Unchanged\n");
        assert_eq!((unchanged.ssh_pwauth, unchanged.warnings.len()), (None, 0));
        let odd = c("ssh_pwauth: n\n");
        assert_eq!(odd.ssh_pwauth, None);
        assert!(
            odd.warnings[0].contains("'ssh_pwauth': \"n\" not understood"),
            "{:?}",
            odd.warnings
        );
        assert_eq!(c("preserve_hostname: 0\n").preserve_hostname, Some(false));
        assert_eq!(
            c("preserve_hostname: 'YES'\n").preserve_hostname,
            Some(true)
        );
        assert_eq!(
            c("prefer_fqdn_over_hostname: maybe\n").prefer_fqdn_over_hostname,
            Some(false)
        );
    }

    /// `chpasswd` and `ssh_keys` are mappings, into which cloud-init 22.4's merge
    /// recurses (each case checked against its CloudConfigPartHandler): the default
    /// replaces the whole mapping; a keeping merge keeps what is there and adds the keys
    /// that are new; `recurse_array` appends `chpasswd`'s list, or replaces it without
    /// `list(append)`.
    #[test]
    fn chpasswd_and_ssh_keys_merge_as_mappings() {
        let first = "#cloud-config\nchpasswd: {expire: false, list: ['root:$6$a$b']}\nssh_keys: {ed25519_public: OLD}\n";
        let second = "#cloud-config\nchpasswd: {list: ['admin:$6$c$d']}\nssh_keys: {ed25519_private: P, ed25519_public: Q}\n";
        let merged = |how: &str| {
            let c = parse(mime(&[("", first), (how, second)]).as_bytes(), "user-data").unwrap();
            let passwords = chpasswd_names(&c);
            let keys = c.ssh_keys.values().cloned().collect::<Vec<_>>().join(" ");
            (passwords, keys)
        };
        let pair = |a: &str, b: &str| (a.to_owned(), b.to_owned());
        assert_eq!(merged(""), pair("admin", "P Q"));
        let keeping = merged("Merge-Type: list(append)+dict()+str()\n");
        assert_eq!(keeping, pair("root", "P OLD"));
        let appending = merged("Merge-Type: list(append)+dict(recurse_array)+str()\n");
        assert_eq!(appending, pair("admin root", "P OLD"));
        let replacing = merged("Merge-Type: list()+dict(recurse_array)+str()\n");
        assert_eq!(replacing, pair("admin", "P OLD"));
        // A list the earlier parts did not name is added by a keeping merge.
        let c = parse(
            mime(&[
                (
                    "",
                    "#cloud-config\nchpasswd: {users: [{name: root, password: $6$a$b}]}\n",
                ),
                ("Merge-Type: list(append)+dict()+str()\n", second),
            ])
            .as_bytes(),
            "user-data",
        )
        .unwrap();
        assert_eq!(
            c.chpasswd.hashes().keys().collect::<Vec<_>>(),
            ["admin", "root"]
        );
    }

    #[test]
    fn mime_multipart_merges_cloud_config_parts() {
        let text = "Content-Type: multipart/mixed; boundary=\"XYZ\"\nMIME-Version: 1.0\n\n--XYZ\nContent-Type: text/cloud-config\n\n#cloud-config\nhostname: first\ntimezone: UTC\n\n--XYZ\nContent-Type: text/x-shellscript\n\n#!/bin/sh\necho hi\n--XYZ\nContent-Type: text/cloud-config\nContent-Transfer-Encoding: base64\n\nI2Nsb3VkLWNvbmZpZwpob3N0bmFtZTogc2Vjb25kCg==\n--XYZ--\n";
        let c = parse(text.as_bytes(), "user-data").unwrap();
        assert_eq!(c.hostname.as_deref(), Some("second"));
        assert_eq!(c.timezone.as_deref(), Some("UTC"));
        assert!(c.warnings.iter().any(|w| w.contains("text/x-shellscript")));
    }

    #[test]
    fn a_later_mime_part_replaces_users_and_write_files_lists() {
        let part =
            |body: &str| format!("--B\nContent-Type: text/cloud-config\n\n#cloud-config\n{body}\n");
        let text = format!(
            "Content-Type: multipart/mixed; boundary=\"B\"\n\n{}{}--B--\n",
            part(
                "user: admin\nusers: [alice]\nwrite_files:\n  - {path: /var/a}\n  - {path: /var/b}"
            ),
            part("users: [bob]\nwrite_files:\n  - {path: /var/c}"),
        );
        let c = parse(text.as_bytes(), "user-data").unwrap();
        let names: Vec<&str> = c.users.iter().map(|u| u.name.as_str()).collect();
        assert_eq!(
            names,
            ["admin", "bob"],
            "the default user stays, alice is replaced"
        );
        let paths: Vec<&str> = c.write_files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["/var/c"]);
    }

    /// An entry with both: `hashed_passwd` is set last by cloud-init, and a clear-text
    /// `passwd` beside it does not cost the hash.
    #[test]
    fn hashed_passwd_wins_over_passwd() {
        let c = parse(
            b"#cloud-config\nusers:\n  - {name: a, passwd: '$6$p$p', hashed_passwd: '$6$h$h'}\n  - {name: b, passwd: clear, hashed_passwd: '$6$h$h'}\n",
            "user-data",
        )
        .unwrap();
        assert_eq!(c.users[0].passwd.as_deref(), Some("$6$h$h"));
        assert_eq!(c.users[1].passwd.as_deref(), Some("$6$h$h"));
    }

    /// A legacy `password:` in one part and a `chpasswd:` list in a later one: the
    /// password is ignored, as when both stand in one part. A clear-text one leaves the
    /// default user as it was (locked by default), not unlocked without a hash.
    #[test]
    fn the_legacy_password_is_judged_after_every_part() {
        let multi = "Content-Type: multipart/mixed; boundary=\"B\"\nMIME-Version: 1.0\n\n--B\nContent-Type: text/cloud-config\n\n#cloud-config\nuser: admin\npassword: $6$x$y\n--B\nContent-Type: text/cloud-config\n\n#cloud-config\nchpasswd: {list: ['root:$6$a$b']}\n--B--\n";
        let c = parse(multi.as_bytes(), "user-data").unwrap();
        assert_eq!(c.users[0].passwd, None);
        assert_eq!(c.users[0].lock_passwd, None);
        let c = parse(
            b"#cloud-config\nuser: admin\npassword: secret\n",
            "user-data",
        )
        .unwrap();
        assert_eq!(
            c.users[0].lock_passwd, None,
            "a dropped password unlocks nothing"
        );
    }

    /// cloud-init applies `password:` only when `chpasswd:` names no one, and nixseed
    /// never keeps a clear-text password.
    #[test]
    fn the_legacy_password_yields_to_chpasswd_and_must_be_a_hash() {
        for (text, warning) in [
            (
                "user: admin\npassword: $6$x$y\nchpasswd: {list: ['root:$6$a$b']}\n",
                "'chpasswd' lists passwords",
            ),
            // An entry nixseed does not keep (a random password) still names someone.
            (
                "user: admin\npassword: $6$x$y\nchpasswd: {list: ['bob:RANDOM']}\n",
                "'chpasswd' lists passwords",
            ),
            (
                "user: admin\npassword: secret\n",
                "clear-text password for user 'admin' ignored",
            ),
        ] {
            let c = parse(format!("#cloud-config\n{text}").as_bytes(), "user-data").unwrap();
            assert_eq!(c.users[0].passwd, None, "{text}");
            assert!(
                c.warnings.iter().any(|w| w.contains(warning)),
                "{text}: {:?}",
                c.warnings
            );
        }
    }

    #[test]
    fn the_legacy_password_goes_to_the_default_user_wherever_it_stands() {
        let c = parse(
            b"#cloud-config\npassword: $6$x$y\nuser: admin\n",
            "user-data",
        )
        .unwrap();
        assert_eq!(c.users[0].name, "admin");
        assert_eq!(c.users[0].passwd.as_deref(), Some("$6$x$y"));
        assert_eq!(
            c.users[0].lock_passwd,
            Some(false),
            "cloud-init's set-passwords runs after the account is locked, and unlocks it"
        );
        let c = parse(
            b"#cloud-config\nusers: [{name: bob}]\npassword: $6$x$y\n",
            "user-data",
        )
        .unwrap();
        assert_eq!(c.users[0].passwd, None, "bob is not the default user");
        assert!(
            c.warnings
                .iter()
                .any(|w| w.contains("key 'password' ignored"))
        );
    }

    #[test]
    fn user_and_host_key_entries_nixseed_does_not_apply_are_named() {
        let text = "#cloud-config\nusers:\n  - name: alice\n    sudo: ALL=(ALL) NOPASSWD:ALL\n    shell: /bin/zsh\n    plain_text_passwd: x\n  - {name: carol, sudo: false}\nssh_keys:\n  rsa_private: x\n  ed25519_private: y\n";
        let c = parse(text.as_bytes(), "user-data").unwrap();
        assert_eq!(c.users[0].sudo, ["ALL=(ALL) NOPASSWD:ALL"]);
        assert!(c.users[1].sudo.is_empty());
        assert_warned(
            &c,
            &[
                "user 'alice': 'shell' ignored",
                "user 'alice': 'plain_text_passwd' ignored",
                "'rsa_private' ignored",
                "ed25519_private and ed25519_public come as a pair",
            ],
        );
    }

    #[test]
    fn write_files_outside_var_and_run_is_an_error_naming_the_path() {
        let text = "#cloud-config\nwrite_files:\n  - path: /etc/passwd\n    content: x\n";
        let err = parse(text.as_bytes(), "user-data").unwrap_err().to_string();
        assert!(
            err.contains("user-data") && err.contains("write_files") && err.contains("/etc/passwd"),
            "{err}"
        );
        let ok = "#cloud-config\nwrite_files:\n  - path: /var/lib/app/conf\n    content: aGk=\n    encoding: b64\n    permissions: '0600'\n";
        let c = parse(ok.as_bytes(), "user-data").unwrap();
        assert_eq!(c.write_files[0].content, b"hi");
        assert_eq!(c.write_files[0].permissions, 0o600);
    }

    #[test]
    fn nixseed_block_and_unknown_keys() {
        let text = "#cloud-config\nnixseed:\n  machine-id: 0123456789abcdef0123456789abcdef\n  tcp_ports: [22, '8000-8080']\nfrobnicate: 1\n";
        let c = parse(text.as_bytes(), "user-data").unwrap();
        assert_eq!(c.nixseed.tcp_ports, vec!["22", "8000-8080"]);
        assert_eq!(
            c.warnings,
            vec!["user-data: unknown key 'frobnicate' ignored"]
        );
    }

    #[test]
    fn wrong_types_name_file_and_key() {
        let err = parse(b"#cloud-config\nssh_authorized_keys: {a: b}\n", "user-data")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "user-data: key 'ssh_authorized_keys': expected a list of keys, found a mapping"
        );
    }

    #[test]
    fn oversized_user_data_is_refused() {
        let big = vec![b'#'; MAX_USER_DATA + 1];
        let err = parse(&big, "user-data").unwrap_err().to_string();
        assert!(err.contains("exceed"), "{err}");
    }
}
