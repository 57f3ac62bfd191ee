//! ConfigDrive2 (label `config-2`) as Proxmox VE and OpenStack Nova write it:
//! `openstack/latest/meta_data.json`, `user_data`, the network as `network_data.json`
//! (Nova) or as an ENI file under `openstack/content/` (Proxmox), and vendor-data in
//! `vendor_data.json` and `vendor_data2.json`.

use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
#[error("{origin}: {detail}")]
pub struct ConfigDriveError {
    pub origin: String,
    pub detail: String,
}

/// `public_keys` in every shape cloud-init accepts (`normalize_pubkey_data`): Nova's
/// `{"name": "key"}`, a list per name, a plain list or one string. What is not a string
/// is passed over, as cloud-init passes it over.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum PublicKeys {
    Named(std::collections::BTreeMap<String, serde_json::Value>),
    List(Vec<serde_json::Value>),
    One(String),
    Other(serde_json::Value),
}

impl Default for PublicKeys {
    fn default() -> Self {
        PublicKeys::List(Vec::new())
    }
}

impl PublicKeys {
    fn into_keys(self) -> Vec<String> {
        let strings = |v: serde_json::Value| -> Vec<String> {
            match v {
                serde_json::Value::String(k) => vec![k],
                serde_json::Value::Array(items) => items
                    .into_iter()
                    .filter_map(|i| i.as_str().map(str::to_owned))
                    .collect(),
                _ => Vec::new(),
            }
        };
        let keys = match self {
            PublicKeys::Named(map) => map.into_values().flat_map(strings).collect(),
            PublicKeys::List(items) => strings(serde_json::Value::Array(items)),
            PublicKeys::One(k) => vec![k],
            PublicKeys::Other(v) => strings(v),
        };
        keys.into_iter().filter(|k| !k.is_empty()).collect()
    }
}

/// The parts of `meta_data.json` nixseed uses.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ConfigDriveMeta {
    pub instance_id: String,
    pub hostname: Option<String>,
    pub public_keys: Vec<String>,
    /// Path of the ENI file relative to `openstack/` (e.g. `content/0000`), validated to
    /// stay inside the drive.
    pub network_path: Option<String>,
    /// What was read and not used, each naming the file.
    pub warnings: Vec<String>,
    /// `"meta": {"dsmode": "disabled"}`: cloud-init does not claim such a drive.
    pub disabled: bool,
}

pub fn parse_meta_data(bytes: &[u8], origin: &str) -> Result<ConfigDriveMeta, ConfigDriveError> {
    let fail = |detail: String| ConfigDriveError {
        origin: origin.to_string(),
        detail,
    };
    // Through a JSON value: a key given twice keeps its last value, as Python's json
    // (and so cloud-init) reads it, instead of refusing the file.
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| fail(format!("malformed JSON: {e}")))?;
    let Some(meta) = value.as_object() else {
        return Err(fail(format!(
            "expected a JSON object, found {}",
            json_kind(&value)
        )));
    };
    // A string, or a number as cloud-init takes it (`"uuid": 12345` is instance 12345).
    let text =
        |at: &str, v: Option<&serde_json::Value>| -> Result<Option<String>, ConfigDriveError> {
            match v {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(serde_json::Value::String(s)) => Ok(Some(s.clone())),
                Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
                Some(other) => Err(fail(format!(
                    "key `{at}`: expected a string, found {}",
                    json_kind(other)
                ))),
            }
        };
    // cloud-init refuses a drive without one (`BrokenMetadata`): it is the instance-id,
    // so a fixed stand-in would hide every later change of the drive.
    let Some(uuid) = text("uuid", meta.get("uuid"))?.filter(|u| !u.trim().is_empty()) else {
        return Err(fail(
            "no `uuid`: it is the instance-id, and cloud-init refuses a drive without it too"
                .into(),
        ));
    };
    // `network_config: {}` names no file, and cloud-init passes it over.
    let content_path = meta
        .get("network_config")
        .and_then(|n| n.get("content_path"));
    let network_path = match text("network_config.content_path", content_path)? {
        Some(path) => {
            let rel = path.trim_start_matches('/');
            if rel.split('/').any(|c| c == ".." || c.is_empty()) {
                return Err(fail(format!(
                    "network_config.content_path '{path}' leaves the drive"
                )));
            }
            Some(rel.to_string())
        }
        None => None,
    };
    let mut warnings = Vec::new();
    if let Some(serde_json::Value::Array(files)) = meta.get("files")
        && !files.is_empty()
    {
        let paths: Vec<&str> = files
            .iter()
            .filter_map(|f| f.get("path").and_then(serde_json::Value::as_str))
            .collect();
        warnings.push(format!(
            "{origin}: key 'files' ignored: nixseed does not write injected files ({}); give them as user-data write_files under /var",
            paths.join(", ")
        ));
    }
    let public_keys = match meta.get("public_keys") {
        None => PublicKeys::default(),
        Some(v) => serde_json::from_value(v.clone()).unwrap_or(PublicKeys::Other(v.clone())),
    };
    let dsmode = meta
        .get("meta")
        .and_then(|m| m.get("dsmode"))
        .and_then(serde_json::Value::as_str);
    Ok(ConfigDriveMeta {
        instance_id: uuid,
        // Only `hostname`, as cloud-init copies it to `local-hostname`: Nova's `name` is
        // the display name ("My VM"), not a host name. An empty one names no host.
        hostname: text("hostname", meta.get("hostname"))?.filter(|h| !h.is_empty()),
        public_keys: public_keys.into_keys(),
        network_path,
        warnings,
        disabled: dsmode == Some("disabled"),
    })
}

/// The vendor-data documents a ConfigDrive's `vendor_data.json` or `vendor_data2.json`
/// holds, each to be read like a whole user-data.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct VendorData {
    pub docs: Vec<Vec<u8>>,
    pub warnings: Vec<String>,
}

/// Reads `vendor_data.json` (or `vendor_data2.json`) as cloud-init's `convert_vendordata`
/// reads it: a JSON string is the vendor-data, a list holds several, and an object's
/// `cloud-init` member is read the same way, one level deep (its other members are other
/// services' data). `null`, `false`, `0`, `""`, `[]` and `{}` give none. What cloud-init
/// rejects (`true`, a number, an object under `cloud-init`, a list item that is not a
/// string) is named in a warning and gives none.
///
/// Where nixseed differs, by decision: an empty file gives none (Proxmox writes one when
/// no vendor snippet is set; cloud-init refuses the whole drive over it), and a file that
/// is not JSON is taken as the vendor-data itself, since Proxmox copies its `cicustom:
/// vendor=` snippet (`#cloud-config` YAML) into the file unchanged.
pub fn vendor_data(bytes: &[u8], origin: &str) -> VendorData {
    let mut out = VendorData::default();
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return out;
    }
    match serde_json::from_slice::<serde_json::Value>(bytes) {
        Ok(value) => convert_vendor(value, true, origin, &mut out),
        Err(_) => out.docs.push(bytes.to_vec()),
    }
    out
}

fn convert_vendor(value: serde_json::Value, top: bool, origin: &str, out: &mut VendorData) {
    use serde_json::Value;
    let mut refuse = |what: &str| {
        out.warnings.push(format!(
            "{origin}: {what}: no vendor-data taken from it, as cloud-init takes none"
        ))
    };
    match value {
        Value::Null | Value::Bool(false) => {}
        Value::Number(n) if n.as_f64() == Some(0.0) => {}
        Value::String(s) if s.is_empty() => {}
        Value::String(s) => out.docs.push(s.into_bytes()),
        Value::Array(items) => {
            for (i, item) in items.into_iter().enumerate() {
                match item {
                    Value::String(s) => out.docs.push(s.into_bytes()),
                    Value::Null => {}
                    other => out.warnings.push(format!(
                        "{origin}: item {i} is {}, not a string: passed over",
                        json_kind(&other)
                    )),
                }
            }
        }
        Value::Object(mut map) if top => {
            if let Some(v) = map.remove("cloud-init") {
                convert_vendor(v, false, origin, out);
            }
        }
        Value::Object(map) if map.is_empty() => {}
        Value::Object(_) => refuse("its `cloud-init` member is an object"),
        other => refuse(&format!("it holds {}", json_kind(&other))),
    }
}

fn json_kind(v: &serde_json::Value) -> &'static str {
    use serde_json::Value;
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proxmox_meta_data_json() {
        let m = parse_meta_data(
            br#"{"uuid": "6f1c", "network_config": {"content_path": "/content/0000"}}"#,
            "meta_data.json",
        )
        .unwrap();
        assert_eq!(m.instance_id, "6f1c");
        assert_eq!(m.network_path.as_deref(), Some("content/0000"));
    }

    /// As cloud-init reads meta_data.json: only `hostname` names the host (Nova's `name`
    /// is the display name), an empty one names none, `network_config: {}` names no
    /// file, and Nova's injected `files` are named in a warning, not dropped silently.
    #[test]
    fn hostname_name_files_and_an_empty_network_config() {
        let m = parse_meta_data(
            br#"{"uuid": "u", "name": "My VM", "network_config": {}, "files": [{"path": "/etc/motd", "content_path": "/content/0001"}]}"#,
            "m",
        )
        .unwrap();
        assert_eq!(m.hostname, None);
        assert_eq!(m.network_path, None);
        assert_eq!(m.warnings.len(), 1, "{:?}", m.warnings);
        assert!(
            m.warnings[0].contains("'files'") && m.warnings[0].contains("/etc/motd"),
            "{:?}",
            m.warnings
        );
        let m = parse_meta_data(br#"{"uuid": "u", "hostname": "", "name": "vm"}"#, "m").unwrap();
        assert_eq!(m.hostname, None);
        let m = parse_meta_data(br#"{"uuid": "u", "hostname": "web1", "name": "x"}"#, "m").unwrap();
        assert_eq!(m.hostname.as_deref(), Some("web1"));
    }

    #[test]
    fn meta_data_as_python_reads_it() {
        let key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ8 op";
        for keys in [
            format!(r#"{{"k": "{key}"}}"#),
            format!(r#"{{"k": ["{key}", "", 7], "n": null}}"#),
            format!(r#"["{key}"]"#),
            format!(r#""{key}""#),
        ] {
            let json =
                format!(r#"{{"uuid": "a", "hostname": "x", "uuid": "b", "public_keys": {keys}}}"#);
            let m = parse_meta_data(json.as_bytes(), "meta_data.json").unwrap();
            assert_eq!(m.instance_id, "b", "{json}");
            assert_eq!(m.public_keys, [key], "{json}");
        }
    }

    /// The error `meta_data.json` holding `json` gives, from the drive at `/dev/sr0`.
    fn meta_error(json: &str) -> String {
        parse_meta_data(
            json.as_bytes(),
            "configdrive:/dev/sr0/latest/meta_data.json",
        )
        .unwrap_err()
        .to_string()
    }

    #[test]
    fn a_drive_without_uuid_is_refused() {
        for json in [
            r#"{"hostname": "alpha"}"#,
            r#"{"uuid": " ", "hostname": "alpha"}"#,
        ] {
            let e = meta_error(json);
            assert!(
                e.starts_with("configdrive:/dev/sr0/latest/meta_data.json: no `uuid`"),
                "{e}"
            );
        }
    }

    /// As Python's json gives it to cloud-init: a numeric uuid is that instance-id; a key
    /// of a kind no reading makes sense of is refused by its name.
    #[test]
    fn numbers_are_read_as_text_and_a_wrong_kind_names_its_key() {
        let m = parse_meta_data(br#"{"uuid": 12345, "hostname": "web1"}"#, "m").unwrap();
        assert_eq!(m.instance_id, "12345");
        for (json, key, kind) in [
            (r#"{"uuid": ["a"]}"#, "uuid", "a list"),
            (
                r#"{"uuid": "a", "hostname": {"x": 1}}"#,
                "hostname",
                "an object",
            ),
            (
                r#"{"uuid": "a", "network_config": {"content_path": true}}"#,
                "network_config.content_path",
                "a boolean",
            ),
        ] {
            let e = meta_error(json);
            assert!(
                e.contains(&format!("key `{key}`: expected a string, found {kind}"))
                    && e.starts_with("configdrive:/dev/sr0/latest/meta_data.json"),
                "{json}: {e}"
            );
        }
        let e = parse_meta_data(b"[1]", "m").unwrap_err().to_string();
        assert!(e.contains("expected a JSON object, found a list"), "{e}");
    }

    /// `"meta": {"dsmode": "disabled"}` is a drive cloud-init does not claim, as NoCloud's
    /// `dsmode: disabled`.
    #[test]
    fn a_drive_whose_meta_says_dsmode_disabled_is_marked() {
        let m = parse_meta_data(br#"{"uuid": "a", "meta": {"dsmode": "disabled"}}"#, "m").unwrap();
        assert!(m.disabled);
        let m = parse_meta_data(br#"{"uuid": "a", "meta": {"dsmode": "local"}}"#, "m").unwrap();
        assert!(!m.disabled);
    }

    #[test]
    fn content_path_cannot_escape() {
        let e = parse_meta_data(
            br#"{"uuid": "x", "network_config": {"content_path": "/../../etc/shadow"}}"#,
            "meta_data.json",
        )
        .unwrap_err();
        assert!(e.to_string().contains("leaves the drive"));
    }

    fn docs(json: &str) -> (Vec<String>, Vec<String>) {
        let v = vendor_data(
            json.as_bytes(),
            "configdrive:/dev/sr0/latest/vendor_data.json",
        );
        let docs = v
            .docs
            .into_iter()
            .map(|d| String::from_utf8(d).unwrap())
            .collect();
        (docs, v.warnings)
    }

    #[test]
    fn vendor_data_json_as_cloud_init_converts_it() {
        let cc = "#cloud-config\nssh_pwauth: true\n";
        let json_cc = serde_json::to_string(cc).unwrap();
        // Nova's StaticJSON provider: an object, cloud-init's part under `cloud-init`,
        // other services' members beside it.
        let nova = format!(r#"{{"cloud-init": {json_cc}, "other": {{"x": 1}}}}"#);
        assert_eq!(docs(&nova), (vec![cc.to_string()], vec![]));
        assert_eq!(docs(&json_cc), (vec![cc.to_string()], vec![]));
        let list = format!(r##"[{json_cc}, "#cloud-config\nfqdn: a.b\n", null]"##);
        assert_eq!(docs(&list).0.len(), 2);
        let nested = format!(r#"{{"cloud-init": [{json_cc}]}}"#);
        assert_eq!(docs(&nested).0, [cc]);
        // Nothing to take, and nothing to say.
        for none in [
            "",
            " \n",
            "{}",
            "[]",
            "null",
            "false",
            "0",
            "\"\"",
            r#"{"other": "x"}"#,
            r#"{"cloud-init": null}"#,
            r#"{"cloud-init": ""}"#,
        ] {
            assert_eq!(docs(none), (vec![], vec![]), "{none:?}");
        }
    }

    #[test]
    fn vendor_data_cloud_init_rejects_is_named_and_passed_over() {
        for bad in [
            "true",
            "7",
            r#"{"cloud-init": {"a": 1}}"#,
            r#"{"cloud-init": 3}"#,
        ] {
            let (d, w) = docs(bad);
            assert!(d.is_empty(), "{bad}");
            assert_eq!(w.len(), 1, "{bad}: {w:?}");
            assert!(
                w[0].starts_with("configdrive:/dev/sr0/latest/vendor_data.json: "),
                "{w:?}"
            );
        }
        let (d, w) = docs(r##"["#cloud-config\n", {"content": "x"}]"##);
        assert_eq!((d.len(), w.len()), (1, 1), "{w:?}");
        assert!(w[0].contains("item 1 is an object"), "{w:?}");
    }

    #[test]
    fn vendor_data_json_that_is_not_json_is_the_snippet_itself() {
        // What Proxmox writes for `cicustom: vendor=local:snippets/vendor.yaml`.
        let snippet = "#cloud-config\nssh_pwauth: true\n";
        assert_eq!(docs(snippet), (vec![snippet.to_string()], vec![]));
    }
}
