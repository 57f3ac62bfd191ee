//! A [`Seed`]: what one source said, normalised. Each source (NoCloud, ConfigDrive2,
//! systemd credentials, the control channel) is turned into this one shape, and
//! [`crate::identity::compose`] turns a seed into the identity file tree.

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::network::{self, NetworkSetting};
use crate::nocloud::{self, DsToken};
use crate::userdata::{self, CloudConfig};
use crate::{configdrive, credentials, identity};

#[derive(Debug, thiserror::Error)]
pub enum SeedError {
    #[error(transparent)]
    Yaml(#[from] crate::yaml::YamlError),
    #[error(transparent)]
    UserData(#[from] userdata::UserDataError),
    #[error(transparent)]
    Network(#[from] network::NetworkError),
    #[error(transparent)]
    ConfigDrive(#[from] configdrive::ConfigDriveError),
    #[error("{origin}: {detail}")]
    Invalid { origin: String, detail: String },
}

/// The raw files of a seed, by their names on the medium. Keeping the bytes lets the
/// digest (clone detection, "seed unchanged") cover exactly what was read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SeedFiles(pub BTreeMap<String, Vec<u8>>);

impl SeedFiles {
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.0.get(name).map(Vec::as_slice)
    }

    /// sha256 over every file name and content, in name order.
    pub fn digest(&self) -> String {
        let mut h = Sha256::new();
        for (name, bytes) in &self.0 {
            h.update((name.len() as u64).to_le_bytes());
            h.update(name.as_bytes());
            h.update((bytes.len() as u64).to_le_bytes());
            h.update(bytes);
        }
        hex(&h.finalize())
    }

    /// The ConfigDrive version these files were read from: the one whose
    /// `meta_data.json` they hold, as [`configdrive_version`] picks among several.
    pub fn configdrive_version(&self) -> &'static str {
        configdrive_version(|v| self.0.contains_key(&configdrive_file(v, META_DATA)))
    }
}

/// A normalised seed.
#[derive(Debug, Clone, Default)]
pub struct Seed {
    /// Where it came from, for the manifest and logs (`nocloud:/dev/sr0`).
    pub source: String,
    pub instance_id: String,
    pub local_hostname: Option<String>,
    pub public_keys: Vec<String>,
    pub user: CloudConfig,
    pub vendor: Option<CloudConfig>,
    pub network: Option<NetworkSetting>,
    /// The network came from ENI text (a ConfigDrive's `content/0000`, NoCloud
    /// meta-data's `network-interfaces`), which names interfaces without MACs.
    pub network_from_eni: bool,
    /// The ConfigDrive file that ENI came from, as `meta_data.json` names it
    /// (`content/0000` in what Proxmox and Nova write).
    pub network_file: Option<String>,
    /// meta-data says `dsmode: disabled`: cloud-init does not claim such a seed, and
    /// the search goes on past it.
    pub disabled: bool,
    /// See [`SeedFiles::digest`].
    pub digest: String,
    /// The files as read, for signature checks.
    pub files: SeedFiles,
    pub warnings: Vec<String>,
}

/// ConfigDrive2's files in one version directory under `openstack/`: the metadata (a
/// drive needs it), the user-data, the network description (OpenStack Nova writes it),
/// and the vendor-data: Nova's static vendor-data (and Proxmox's `cicustom: vendor=`
/// snippet), and Nova's dynamic vendor-data, which wins over it.
pub const META_DATA: &str = "meta_data.json";
pub const USER_DATA: &str = "user_data";
pub const NETWORK_DATA: &str = "network_data.json";
pub const VENDOR_DATA: &str = "vendor_data.json";
pub const VENDOR_DATA2: &str = "vendor_data2.json";
pub const CONFIGDRIVE_FILES: [&str; 5] = [
    META_DATA,
    USER_DATA,
    NETWORK_DATA,
    VENDOR_DATA,
    VENDOR_DATA2,
];

/// The dated metadata versions cloud-init reads from a config drive, oldest first.
pub const OPENSTACK_VERSIONS: [&str; 8] = [
    "2012-08-10",
    "2013-04-04",
    "2013-10-17",
    "2015-10-15",
    "2016-06-30",
    "2016-10-06",
    "2017-02-22",
    "2018-08-27",
];

/// The version directory under `openstack/` a config drive is read from, as cloud-init
/// picks it: the newest dated version it knows that the drive has (`has` tells), else
/// `latest`. Nova writes both, with the same files; a drive with only dated
/// directories is read from its newest.
pub fn configdrive_version(has: impl Fn(&str) -> bool) -> &'static str {
    OPENSTACK_VERSIONS
        .iter()
        .rev()
        .copied()
        .find(|v| has(v))
        .unwrap_or("latest")
}

/// One of [`CONFIGDRIVE_FILES`] in `version`, relative to `openstack/`.
pub fn configdrive_file(version: &str, file: &str) -> String {
    format!("{version}/{file}")
}

/// Gives the legacy `password:` to the default user (`user:`) as cloud-init's merge of
/// user-data over vendor-data (`vendors`, the highest first, each with its origin) sees
/// them: the password of the first config that has one goes to the default user of the
/// first config that names one, so `user:` in user-data and `password:` in vendor-data
/// (or the other way round) meet. `chpasswd:` as merged (user-data's, else the first
/// vendor-data's that has one) decides whether it counts.
fn legacy_passwords(
    user: &mut CloudConfig,
    user_origin: &str,
    vendors: &mut [(CloudConfig, String)],
) {
    let chpasswd_names_anyone = std::iter::once(&*user)
        .chain(vendors.iter().map(|(v, _)| v))
        .any(|c| c.chpasswd.names_anyone());
    let mut configs: Vec<(&mut CloudConfig, &str)> = std::iter::once((user, user_origin))
        .chain(vendors.iter_mut().map(|(v, from)| (v, from.as_str())))
        .collect();
    // The winning password, taken from every config (lower ones lose it in the merge).
    let mut password = None;
    for (c, from) in configs.iter_mut() {
        if let Some(p) = c.password.take() {
            password.get_or_insert((p, *from));
        }
    }
    let Some((password, from)) = password else {
        return;
    };
    let owner = configs
        .iter()
        .position(|(c, _)| c.default_user.is_some())
        .unwrap_or(0);
    let (config, _) = &mut configs[owner];
    config.password = Some(password);
    userdata::apply_legacy_password(config, chpasswd_names_anyone, from);
}

/// Names a file of a source for messages: `nocloud:/dev/sr0/user-data`.
fn origin(source: &str, file: &str) -> String {
    format!("{source}/{file}")
}

impl Seed {
    /// A NoCloud seed: `meta-data` and `user-data` must exist (either may be empty);
    /// `vendor-data` and `network-config` are optional. `ds` is the command-line token,
    /// whose values override meta-data.
    pub fn from_nocloud(
        files: &SeedFiles,
        source: &str,
        ds: Option<&DsToken>,
    ) -> Result<Seed, SeedError> {
        let need = |name: &str| {
            files.get(name).ok_or_else(|| SeedError::Invalid {
                origin: origin(source, name),
                detail:
                    "missing: a NoCloud seed needs meta-data and user-data (either may be empty)"
                        .into(),
            })
        };
        let mut meta = nocloud::parse_meta_data(need("meta-data")?, &origin(source, "meta-data"))?;
        if let Some(ds) = ds {
            ds.apply(&mut meta);
        }
        let mut user = userdata::parse(need("user-data")?, &origin(source, "user-data"))?;
        // `vendor_data: {enabled: false}` in user-data turns vendor-data off, as in cloud-init.
        let vendor_origin = origin(source, "vendor-data");
        let mut vendors = match files.get("vendor-data") {
            Some(b) if user.vendor_data != Some(false) => {
                vec![(userdata::parse(b, &vendor_origin)?, vendor_origin)]
            }
            _ => Vec::new(),
        };
        legacy_passwords(&mut user, &origin(source, "user-data"), &mut vendors);
        let vendor = vendors.pop().map(|(v, _)| v);
        // A `network-config` file, else meta-data's `network-interfaces` (ENI), as
        // cloud-init's NoCloud picks; and whether the network came from ENI.
        // A network-config with no configuration in it (comments only, `{}`, `network:`
        // with no value) is none, as in cloud-init.
        let given = match files.get("network-config") {
            Some(b) => network::parse_if_any(b, &origin(source, "network-config"))?,
            None => None,
        };
        let (network, network_from_eni) = match (given, &meta.network_interfaces) {
            (Some(n), _) => (Some(n), false),
            // ENI that cannot be read is a warning, not a refused seed: meta-data's
            // network is the older form, and the rest of the seed still applies.
            (_, Some(eni)) => {
                let from = origin(source, "meta-data (network-interfaces)");
                match network::parse_eni(eni, &from) {
                    Ok(cfg) => (Some(NetworkSetting::Config(cfg)), true),
                    Err(e) => {
                        meta.warnings
                            .push(format!("{e}; the network is left as the image has it"));
                        (None, false)
                    }
                }
            }
            _ => (None, false),
        };
        let mut warnings = meta.warnings.clone();
        warnings.extend(user.warnings.iter().cloned());
        if let Some(v) = &vendor {
            warnings.extend(v.warnings.iter().cloned());
        }
        let mut seed = Seed {
            source: source.to_string(),
            instance_id: meta.instance_id,
            local_hostname: meta.local_hostname,
            public_keys: meta.public_keys,
            user,
            vendor,
            network,
            network_from_eni,
            network_file: None,
            disabled: meta.dsmode.as_deref() == Some("disabled"),
            digest: files.digest(),
            files: files.clone(),
            warnings,
        };
        seed.settle_hostnames();
        Ok(seed)
    }

    /// A ConfigDrive2 seed, with file names relative to `openstack/`
    /// (`latest/meta_data.json`, `latest/user_data`, `latest/network_data.json`,
    /// `content/0000`, ...). As in cloud-init, `network_data.json` is the network when
    /// the drive has one; only without it is the ENI file named by meta_data.json read.
    pub fn from_configdrive(files: &SeedFiles, source: &str) -> Result<Seed, SeedError> {
        let version = files.configdrive_version();
        let name = |file: &str| configdrive_file(version, file);
        let meta_name = name(META_DATA);
        let meta_bytes = files.get(&meta_name).ok_or_else(|| SeedError::Invalid {
            origin: origin(source, &meta_name),
            detail: "missing: a ConfigDrive2 seed needs openstack/latest/meta_data.json (or a dated version's)".into(),
        })?;
        let meta = configdrive::parse_meta_data(meta_bytes, &origin(source, &meta_name))?;
        let user_origin = origin(source, &name(USER_DATA));
        let mut user = match files.get(&name(USER_DATA)) {
            Some(b) => userdata::parse(b, &user_origin)?,
            None => CloudConfig::default(),
        };
        let mut unread = Vec::new();
        let mut read_vendor = |file: &str, enabled: Option<bool>| {
            let file = name(file);
            let bytes = files.get(&file).filter(|_| enabled != Some(false));
            let Some(bytes) = bytes else {
                return Ok(None);
            };
            let from = origin(source, &file);
            let vd = configdrive::vendor_data(bytes, &from);
            unread.extend(vd.warnings);
            if vd.docs.is_empty() {
                return Ok(None);
            }
            let docs: Vec<&[u8]> = vd.docs.iter().map(Vec::as_slice).collect();
            let cfg = userdata::parse_documents(&docs, &from)?;
            Ok::<_, SeedError>(Some((cfg, from)))
        };
        let mut vendors: Vec<(CloudConfig, String)> = [
            read_vendor(VENDOR_DATA2, user.vendor_data2)?,
            read_vendor(VENDOR_DATA, user.vendor_data)?,
        ]
        .into_iter()
        .flatten()
        .collect();
        legacy_passwords(&mut user, &user_origin, &mut vendors);
        let mut warnings = meta.warnings.clone();
        warnings.extend(user.warnings.iter().cloned());
        warnings.extend(unread);
        for (v, _) in &vendors {
            warnings.extend(v.warnings.iter().cloned());
        }
        // vendor_data2.json over vendor_data.json, as cloud-init merges them.
        let vendor = vendors
            .into_iter()
            .map(|(v, _)| v)
            .reduce(|high, low| high.over(low));
        let network_name = name(NETWORK_DATA);
        let network = match (files.get(&network_name), &meta.network_path) {
            (Some(bytes), _) => Some(NetworkSetting::Config(network::parse_network_data(
                bytes,
                &origin(source, &network_name),
            )?)),
            (None, Some(path)) => {
                let bytes = files.get(path).ok_or_else(|| SeedError::Invalid {
                    origin: origin(source, path),
                    detail: "missing, but meta_data.json names it as network_config".into(),
                })?;
                let text = String::from_utf8_lossy(bytes);
                Some(NetworkSetting::Config(network::parse_eni(
                    &text,
                    &origin(source, path),
                )?))
            }
            (None, None) => None,
        };
        let network_from_eni = files.get(&network_name).is_none() && network.is_some();
        let network_file = if network_from_eni {
            meta.network_path.clone()
        } else {
            None
        };
        let mut seed = Seed {
            source: source.to_string(),
            instance_id: meta.instance_id,
            local_hostname: meta.hostname,
            public_keys: meta.public_keys,
            user,
            vendor,
            network,
            network_from_eni,
            network_file,
            disabled: meta.disabled,
            digest: files.digest(),
            files: files.clone(),
            warnings,
        };
        seed.settle_hostnames();
        Ok(seed)
    }

    /// A seed from systemd credentials (`system.hostname`, `system.machine_id`,
    /// `ssh.authorized_keys.root`). A credential systemd would ignore (an empty or invalid
    /// hostname, a machine-id it cannot parse) is dropped with a warning, the others
    /// apply; `None` when no usable one is left. The instance-id is derived from the
    /// credentials themselves, so changing any of them is a new instance.
    pub fn from_credentials(
        creds: &credentials::Credentials,
        source: &str,
        product_uuid: Option<&str>,
    ) -> (Option<Seed>, Vec<String>) {
        let mut warnings = creds.warnings.clone();
        let text = |name: &str| {
            creds
                .values
                .get(name)
                .map(|b| String::from_utf8_lossy(b).trim().to_string())
        };
        let mut drop = |name: &str, why: String| {
            warnings.push(format!(
                "{source}: credential {name} is ignored, as systemd ignores it: {why}"
            ));
        };
        let hostname = text(credentials::HOSTNAME).filter(|h| {
            let ok = if h.is_empty() {
                Err("it is empty".to_string())
            } else {
                identity::check_hostname(h)
            };
            ok.map_err(|e| drop(credentials::HOSTNAME, e)).is_ok()
        });
        let machine_id = text(credentials::MACHINE_ID).and_then(|m| {
            credentials::machine_id_from_credential(&m, product_uuid)
                .map_err(|e| drop(credentials::MACHINE_ID, e))
                .ok()
        });
        let keys = text(credentials::ROOT_KEYS).filter(|k| !k.is_empty());
        if hostname.is_none() && machine_id.is_none() && keys.is_none() {
            return (None, warnings);
        }
        let files = SeedFiles(
            creds
                .values
                .iter()
                .filter(|(k, _)| {
                    [
                        credentials::HOSTNAME,
                        credentials::MACHINE_ID,
                        credentials::ROOT_KEYS,
                    ]
                    .contains(&k.as_str())
                })
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        );
        let digest = files.digest();
        // systemd names the machine by the credential as given, an FQDN included: as
        // cloud-config, that is the FQDN preferred over its short name.
        let fqdn = hostname.as_ref().is_some_and(|h| h.contains('.'));
        let mut user = CloudConfig {
            hostname,
            prefer_fqdn_over_hostname: fqdn.then_some(true),
            ..CloudConfig::default()
        };
        user.nixseed.machine_id = machine_id;
        user.ssh_authorized_keys = keys
            .map(|k| k.lines().map(str::to_string).collect())
            .unwrap_or_default();
        let seed = Seed {
            source: source.to_string(),
            instance_id: format!("credentials-{}", &digest[..16]),
            user,
            digest,
            files,
            ..Seed::default()
        };
        (Some(seed), warnings)
    }
}

impl Seed {
    /// The file a source calls `nocloud` in NoCloud terms (`configdrive` in ConfigDrive's),
    /// named for messages (`nocloud:/dev/sr0/meta-data`).
    /// A ConfigDrive's file is one of [`CONFIGDRIVE_FILES`] in the version read, or
    /// another path relative to `openstack/` (`content/0000`).
    fn file_origin(&self, nocloud: &str, configdrive: &str) -> String {
        if !self.source.starts_with("configdrive") {
            return origin(&self.source, nocloud);
        }
        let name = if CONFIGDRIVE_FILES.contains(&configdrive) {
            configdrive_file(self.files.configdrive_version(), configdrive)
        } else {
            configdrive.to_string()
        };
        origin(&self.source, &name)
    }

    /// Its meta-data file, named for messages.
    pub fn meta_origin(&self) -> String {
        self.file_origin("meta-data", META_DATA)
    }

    /// Hostnames cloud-init would set but systemd would not take from `/etc/hostname`
    /// (an `_`, as in a libvirt domain named `my_vm`) are dropped with a warning, so that
    /// the rest of the seed (keys, network) still applies and the name comes from the
    /// seed's next source, else stays as it is; a trailing dot (the DNS root) is taken
    /// off. A name that is no hostname at all (a path, spaces, control characters)
    /// stays, and composing refuses the seed.
    fn settle_hostnames(&mut self) {
        let (meta, user) = (self.meta_origin(), self.user_origin());
        let vendor = self.file_origin("vendor-data", VENDOR_DATA);
        let mut warnings = Vec::new();
        let mut settle = |name: &mut Option<String>, origin: &str, key: &str| {
            if let Some(n) = name.as_mut()
                && n.len() > 1
                && n.ends_with('.')
            {
                n.pop();
            }
            let Some(n) = name.as_deref() else { return };
            let hostname_like = n
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
            if hostname_like && crate::identity::check_hostname(n).is_err() {
                warnings.push(format!(
                    "{origin}: key '{key}': {n:?} is not a hostname systemd accepts (letters, digits and '-' in dot-separated labels of 1-63 characters); ignored: the seed's next name (vendor-data's, then meta-data's local-hostname) is used if it gives one, else the machine keeps the name it has"
                ));
                *name = None;
            }
        };
        // ConfigDrive's meta_data.json calls it `hostname`.
        let meta_key = if self.source.starts_with("configdrive") {
            "hostname"
        } else {
            "local-hostname"
        };
        settle(&mut self.local_hostname, &meta, meta_key);
        settle(&mut self.user.hostname, &user, "hostname");
        settle(&mut self.user.fqdn, &user, "fqdn");
        if let Some(v) = self.vendor.as_mut() {
            settle(&mut v.hostname, &vendor, "hostname");
            settle(&mut v.fqdn, &vendor, "fqdn");
        }
        self.warnings.extend(warnings);
    }

    /// Its user-data file, named for messages.
    pub fn user_origin(&self) -> String {
        self.file_origin("user-data", USER_DATA)
    }

    /// The file its network came from, named for messages.
    pub fn network_origin(&self) -> String {
        if self.network_from_eni {
            let file = self.network_file.as_deref().unwrap_or("content/0000");
            self.file_origin("meta-data", file)
        } else {
            self.file_origin("network-config", NETWORK_DATA)
        }
    }
}

pub fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        out.push(char::from(DIGITS[usize::from(b >> 4)]));
        out.push(char::from(DIGITS[usize::from(b & 0x0f)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(hex(&[0x00, 0x0f, 0xa5, 0xff]), "000fa5ff");
        assert_eq!(
            crate::manifest::sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    fn files(pairs: &[(&str, &str)]) -> SeedFiles {
        SeedFiles(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        )
    }

    #[test]
    fn nocloud_vendor_data_can_be_turned_off_by_user_data() {
        let read = |user: &str| {
            let f = files(&[
                ("meta-data", "instance-id: i-1\n"),
                ("user-data", user),
                ("vendor-data", "#cloud-config\nssh_pwauth: true\n"),
            ]);
            Seed::from_nocloud(&f, "nocloud:/dev/sr0", None)
                .unwrap()
                .vendor
                .and_then(|v| v.ssh_pwauth)
        };
        assert_eq!(read("#cloud-config\n"), Some(true));
        assert_eq!(
            read("#cloud-config\nvendor_data: {enabled: true}\n"),
            Some(true)
        );
        assert_eq!(read("#cloud-config\nvendor_data: {enabled: false}\n"), None);
    }

    /// Messages about a ConfigDrive's ENI network name the file meta_data.json names.
    #[test]
    fn a_configdrive_eni_is_named_as_meta_data_names_it() {
        let f = files(&[
            (
                "latest/meta_data.json",
                r#"{"uuid": "i-1", "network_config": {"content_path": "/content/0001"}}"#,
            ),
            ("content/0001", "auto eth0\niface eth0 inet dhcp\n"),
        ]);
        let seed = Seed::from_configdrive(&f, "configdrive:/dev/sr0").unwrap();
        assert!(seed.network_from_eni);
        assert_eq!(seed.network_origin(), "configdrive:/dev/sr0/content/0001");
    }

    /// A network-config that holds no configuration (comments only, `{}`, `---`, a bare
    /// `network:`) is none, as cloud-init reads it: the rest of the seed applies, and the
    /// network falls back as without the file (here to meta-data's ENI).
    #[test]
    fn an_empty_network_config_is_none_given() {
        for empty in ["# filled in later\n", "{}\n", "---\n", "network:\n"] {
            let seed = Seed::from_nocloud(
                &files(&[
                    ("meta-data", "instance-id: i-1\n"),
                    ("user-data", "#cloud-config\nhostname: web1\n"),
                    ("network-config", empty),
                ]),
                "nocloud:/dev/sr0",
                None,
            )
            .unwrap_or_else(|e| panic!("{empty:?}: {e}"));
            assert!(seed.network.is_none(), "{empty:?}");
            assert_eq!(seed.user.hostname.as_deref(), Some("web1"));
        }
        let eni = Seed::from_nocloud(
            &files(&[
                (
                    "meta-data",
                    "instance-id: i-1\nnetwork-interfaces: |\n  auto eth0\n  iface eth0 inet dhcp\n",
                ),
                ("user-data", "#cloud-config\n"),
                ("network-config", "# none\n"),
            ]),
            "nocloud:/dev/sr0",
            None,
        )
        .unwrap();
        assert!(eni.network_from_eni && eni.network.is_some());
    }

    #[test]
    fn nocloud_requires_both_files() {
        let err = Seed::from_nocloud(&files(&[("meta-data", "")]), "nocloud:/dev/sr0", None)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("nocloud:/dev/sr0/user-data: missing"),
            "{err}"
        );
    }

    #[test]
    fn digest_changes_with_any_byte() {
        let a = files(&[("meta-data", "instance-id: a\n"), ("user-data", "")]);
        let b = files(&[("meta-data", "instance-id: a\n"), ("user-data", " ")]);
        assert_ne!(a.digest(), b.digest());
    }

    #[test]
    fn credentials_seed() {
        let mut c = credentials::Credentials::default();
        c.values
            .insert(credentials::HOSTNAME.to_string(), b"vm7\n".to_vec());
        let s = Seed::from_credentials(&c, "credentials:smbios", None)
            .0
            .unwrap();
        assert_eq!(s.user.hostname.as_deref(), Some("vm7"));
        assert!(s.instance_id.starts_with("credentials-"));
        let none = credentials::Credentials::default();
        assert!(Seed::from_credentials(&none, "x", None).0.is_none());
    }

    /// What systemd ignores is dropped alone: the root key still applies.
    #[test]
    fn a_credential_systemd_ignores_drops_only_itself() {
        let mut c = credentials::Credentials::default();
        for (k, v) in [
            (credentials::HOSTNAME, ""),
            (credentials::MACHINE_ID, "not-an-id"),
            (credentials::ROOT_KEYS, "ssh-ed25519 AAAA"),
        ] {
            c.values.insert(k.to_string(), v.as_bytes().to_vec());
        }
        let (s, warnings) = Seed::from_credentials(&c, "credentials:smbios", None);
        let s = s.unwrap();
        assert_eq!(s.user.hostname, None);
        assert_eq!(s.user.nixseed.machine_id, None);
        assert_eq!(s.user.ssh_authorized_keys, ["ssh-ed25519 AAAA"]);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(warnings[0].contains("credentials:smbios: credential system.hostname is ignored"));
        assert!(warnings[1].contains("system.machine_id is ignored"));
        c.values.remove(credentials::ROOT_KEYS);
        assert!(
            Seed::from_credentials(&c, "credentials:smbios", None)
                .0
                .is_none()
        );
    }
}

#[cfg(test)]
mod configdrive_tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const META: &str = r#"{"uuid": "i-1", "network_config": {"content_path": "/content/0000"}}"#;
    const ENI: &str = "auto eth0\niface eth0 inet dhcp\n";
    const NETWORK_DATA: &str = r#"{"links": [{"id": "tap0", "type": "ovs", "ethernet_mac_address": "fa:16:3e:00:00:01"}],
        "networks": [{"link": "tap0", "type": "ipv4", "ip_address": "10.0.0.5/24"}]}"#;

    fn seed(pairs: &[(&str, &str)]) -> Result<Seed, SeedError> {
        let files = SeedFiles(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
                .collect(),
        );
        Seed::from_configdrive(&files, "configdrive:/dev/sr0")
    }

    fn first_interface(s: &Seed) -> String {
        match &s.network {
            Some(NetworkSetting::Config(c)) => c.interfaces[0].id.clone(),
            other => panic!("no network config: {other:?}"),
        }
    }

    /// A ConfigDrive hostname systemd would not take is dropped, named as the file and
    /// key Nova writes (`hostname` in meta_data.json); the rest of the seed applies.
    #[test]
    fn a_configdrive_hostname_systemd_refuses_is_named_and_dropped() {
        let s = seed(&[(
            "latest/meta_data.json",
            r#"{"uuid": "i-1", "hostname": "my_vm", "public_keys": {"k": "ssh-ed25519 AAAA a@b"}}"#,
        )])
        .unwrap();
        assert_eq!(s.local_hostname, None);
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("latest/meta_data.json: key 'hostname': \"my_vm\"")),
            "{:?}",
            s.warnings
        );
        assert_eq!(s.public_keys.len(), 1);
    }

    #[test]
    fn network_data_json_is_preferred_over_the_eni_file() {
        let both = seed(&[
            ("latest/meta_data.json", META),
            ("content/0000", ENI),
            ("latest/network_data.json", NETWORK_DATA),
        ])
        .unwrap();
        assert_eq!(first_interface(&both), "tap0");
        let eni_only = seed(&[("latest/meta_data.json", META), ("content/0000", ENI)]).unwrap();
        assert_eq!(first_interface(&eni_only), "eth0");
        // The ENI file named by meta_data.json need not be there when network_data.json is.
        let json_only = seed(&[
            ("latest/meta_data.json", META),
            ("latest/network_data.json", NETWORK_DATA),
        ])
        .unwrap();
        assert_eq!(first_interface(&json_only), "tap0");
    }

    /// A drive read from a dated version names that version's files.
    #[test]
    fn a_dated_version_is_read_and_named() {
        let s = seed(&[
            ("2016-06-30/meta_data.json", META),
            ("content/0000", ENI),
            ("2016-06-30/user_data", "#cloud-config\nhostname: a_b\n"),
        ])
        .unwrap();
        assert_eq!(first_interface(&s), "eth0");
        assert_eq!(
            s.user_origin(),
            "configdrive:/dev/sr0/2016-06-30/user_data",
            "{:?}",
            s.warnings
        );
        assert!(
            s.warnings
                .iter()
                .any(|w| w.starts_with("configdrive:/dev/sr0/2016-06-30/user_data: key 'hostname'")),
            "{:?}",
            s.warnings
        );
        assert_eq!(s.network_origin(), "configdrive:/dev/sr0/content/0000");
    }

    #[test]
    fn the_newest_known_version_wins() {
        let has = |present: &'static [&'static str]| move |v: &str| present.contains(&v);
        assert_eq!(configdrive_version(has(&["latest"])), "latest");
        assert_eq!(
            configdrive_version(has(&["latest", "2013-10-17", "2018-08-27", "2012-08-10"])),
            "2018-08-27"
        );
        assert_eq!(configdrive_version(has(&["2021-01-01"])), "latest");
    }

    #[test]
    fn a_bad_network_data_json_names_the_file() {
        let e = seed(&[
            ("latest/meta_data.json", META),
            ("content/0000", ENI),
            ("latest/network_data.json", "{\"links\": [{\"id\": 1,"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("configdrive:/dev/sr0/latest/network_data.json: not valid JSON"),
            "{e}"
        );
    }

    /// No ENI file named: the drive needs none.
    const NOVA_META: &str = r#"{"uuid": "i-2"}"#;
    const USER: &str = "#cloud-config\nhostname: alpha\n";

    fn vendor_json(cloud_config: &str) -> String {
        serde_json::json!({"cloud-init": cloud_config, "other-service": {"k": 1}}).to_string()
    }

    #[test]
    fn vendor_data2_over_vendor_data_and_user_data_over_both() {
        let v1 = vendor_json(
            "#cloud-config\nssh_pwauth: false\nfqdn: alpha.vendor.example\ntimezone: UTC\nwrite_files: [{path: /var/lib/v1, content: a}]\n",
        );
        let v2 = vendor_json(
            "#cloud-config\nssh_pwauth: true\nwrite_files: [{path: /var/lib/v2, content: b}]\n",
        );
        let s = seed(&[
            ("latest/meta_data.json", NOVA_META),
            (
                "latest/user_data",
                "#cloud-config\nhostname: alpha\ntimezone: Europe/Paris\n",
            ),
            ("latest/vendor_data.json", &v1),
            ("latest/vendor_data2.json", &v2),
        ])
        .unwrap();
        let v = s.vendor.clone().unwrap();
        assert_eq!(v.ssh_pwauth, Some(true), "vendor_data2.json wins");
        // cloud-init's merge keeps the first list whole: vendor_data2.json's.
        let paths: Vec<&str> = v.write_files.iter().map(|f| f.path.as_str()).collect();
        assert_eq!(paths, ["/var/lib/v2"]);
        assert_eq!(v.fqdn.as_deref(), Some("alpha.vendor.example"));
        let merged = s.user.clone().over(v);
        assert_eq!(
            merged.timezone.as_deref(),
            Some("Europe/Paris"),
            "user-data wins"
        );
        assert_eq!(
            merged.write_files.len(),
            1,
            "user-data gives none: vendor's"
        );
        let user_files = userdata::parse(
            b"#cloud-config\nwrite_files: [{path: /var/lib/u, content: c}]\n",
            "u",
        )
        .unwrap()
        .over(s.vendor.clone().unwrap());
        let paths: Vec<&str> = user_files
            .write_files
            .iter()
            .map(|f| f.path.as_str())
            .collect();
        assert_eq!(paths, ["/var/lib/u"], "user-data's list wins whole");
        // A list key user-data names wins even empty or null, as in cloud-init's
        // mergemanydict: `write_files: []` turns vendor-data's files off.
        let vendor = userdata::parse(
            b"#cloud-config\nwrite_files: [{path: /var/lib/v, content: a}]\nssh_authorized_keys: [ssh-ed25519 AAAAC3 vendor]\nusers: [{name: vend}]\n",
            "v",
        )
        .unwrap();
        for doc in [
            "#cloud-config\nwrite_files: []\nssh_authorized_keys: []\nusers: []\n",
            "#cloud-config\nwrite_files:\nssh_authorized_keys:\nusers:\n",
        ] {
            let merged = userdata::parse(doc.as_bytes(), "u")
                .unwrap()
                .over(vendor.clone());
            assert!(
                merged.write_files.is_empty(),
                "{doc}: {:?}",
                merged.write_files
            );
            assert!(merged.ssh_authorized_keys.is_empty(), "{doc}");
            assert!(merged.users.is_empty(), "{doc}: {:?}", merged.users);
        }
        let silent = userdata::parse(b"#cloud-config\nhostname: a\n", "u")
            .unwrap()
            .over(vendor.clone());
        assert_eq!(silent.write_files.len(), 1, "user-data silent: vendor's");
        assert_eq!(silent.ssh_authorized_keys.len(), 1);
        assert_eq!(silent.users.len(), 1);
        assert!(s.warnings.is_empty(), "{:?}", s.warnings);
        // An explicit false wins over a lower true.
        let no_hosts = userdata::parse(b"#cloud-config\nmanage_etc_hosts: false\n", "u").unwrap();
        let vendor_hosts =
            userdata::parse(b"#cloud-config\nmanage_etc_hosts: true\n", "v").unwrap();
        assert_eq!(
            no_hosts.over(vendor_hosts.clone()).manage_etc_hosts,
            Some(false)
        );
        assert_eq!(
            CloudConfig::default().over(vendor_hosts).manage_etc_hosts,
            Some(true)
        );
    }

    #[test]
    fn user_data_can_turn_each_vendor_data_off() {
        let v1 = vendor_json("#cloud-config\nfqdn: alpha.vendor.example\n");
        let v2 = vendor_json("#cloud-config\nssh_pwauth: true\n");
        let with = |user: &str| {
            seed(&[
                ("latest/meta_data.json", NOVA_META),
                ("latest/user_data", user),
                ("latest/vendor_data.json", &v1),
                ("latest/vendor_data2.json", &v2),
            ])
            .unwrap()
            .vendor
        };
        let v = with(&format!("{USER}vendor_data: {{enabled: false}}\n")).unwrap();
        assert_eq!((v.fqdn, v.ssh_pwauth), (None, Some(true)));
        let v = with(&format!("{USER}vendor_data2: {{enabled: 'no'}}\n")).unwrap();
        assert_eq!(
            (v.fqdn.as_deref(), v.ssh_pwauth),
            (Some("alpha.vendor.example"), None)
        );
        // cloud-init's is_true: only true and the words true, 1, on, yes turn it on.
        let both_off = format!("{USER}vendor_data: {{enabled: 2}}\nvendor_data2: []\n");
        let s = seed(&[
            ("latest/meta_data.json", NOVA_META),
            ("latest/user_data", &both_off),
            ("latest/vendor_data.json", &v1),
            ("latest/vendor_data2.json", &v2),
        ])
        .unwrap();
        assert!(s.vendor.is_none());
        assert!(
            s.warnings
                .iter()
                .any(|w| w.contains("key 'vendor_data2' is a list, not a mapping")),
            "{:?}",
            s.warnings
        );
        let on = with(&format!(
            "{USER}vendor_data: {{enabled: 'On', prefix: []}}\n"
        ))
        .unwrap();
        assert!(on.fqdn.is_some());
    }

    #[test]
    fn proxmox_vendor_data_json_empty_or_the_snippet_itself() {
        let empty = seed(&[
            ("latest/meta_data.json", NOVA_META),
            ("latest/user_data", USER),
            ("latest/vendor_data.json", ""),
        ])
        .unwrap();
        assert!(empty.vendor.is_none() && empty.warnings.is_empty());
        let snippet = seed(&[
            ("latest/meta_data.json", NOVA_META),
            ("latest/user_data", USER),
            (
                "latest/vendor_data.json",
                "#cloud-config\nssh_pwauth: true\n",
            ),
        ])
        .unwrap();
        assert_eq!(snippet.vendor.unwrap().ssh_pwauth, Some(true));
    }

    #[test]
    fn a_bad_vendor_data_document_names_the_file() {
        let e = seed(&[
            ("latest/meta_data.json", NOVA_META),
            (
                "latest/vendor_data2.json",
                &vendor_json("#cloud-config\nssh_pwauth: [\n"),
            ),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("configdrive:/dev/sr0/latest/vendor_data2.json: "),
            "{e}"
        );
    }

    #[test]
    fn vendor_data_chpasswd_keeps_the_legacy_password_out() {
        let user = "#cloud-config\nuser: root\npassword: $6$salt$hash\n";
        let vd = vendor_json(
            "#cloud-config\nchpasswd:\n  users:\n    - {name: games, password: $6$x$y}\n",
        );
        let s = seed(&[
            ("latest/meta_data.json", NOVA_META),
            ("latest/user_data", user),
            ("latest/vendor_data.json", &vd),
        ])
        .unwrap();
        let root = s.user.users.iter().find(|u| u.name == "root").unwrap();
        assert_eq!(root.passwd, None, "chpasswd in vendor-data names someone");
    }
}
