//! The one place nixseed touches YAML. cloud-init reads seeds with PyYAML (YAML 1.1);
//! serde_yaml speaks YAML 1.2. The helpers here bridge the two: lenient booleans
//! (`no`, `on`, `False`) and scalars that must keep their text (`instance-id: 0123`).
//! serde_yaml is archived upstream; swapping it for a fork touches only this file.

pub use serde_yaml::{Mapping, Value};

#[derive(Debug, thiserror::Error)]
#[error("{origin}: {detail}")]
pub struct YamlError {
    pub origin: String,
    pub detail: String,
}

impl YamlError {
    pub fn new(origin: &str, detail: impl Into<String>) -> Self {
        YamlError {
            origin: origin.to_string(),
            detail: detail.into(),
        }
    }
}

/// Parses one YAML document. An empty document is an empty mapping, as cloud-init treats it.
/// Errors carry the file name and the line and column.
pub fn parse(text: &str, origin: &str) -> Result<Value, YamlError> {
    if text.trim().is_empty() {
        return Ok(Value::Mapping(Mapping::new()));
    }
    serde_yaml::from_str::<Value>(text).map_err(|e| {
        let place = e
            .location()
            .map(|l| format!("line {}, column {}: ", l.line(), l.column()))
            .unwrap_or_default();
        YamlError::new(origin, format!("{place}malformed YAML: {e}"))
    })
}

/// Parses a document that must be a mapping (meta-data, cloud-config, network-config).
pub fn parse_mapping(text: &str, origin: &str) -> Result<Mapping, YamlError> {
    match parse(text, origin)? {
        Value::Mapping(m) => Ok(m),
        Value::Null => Ok(Mapping::new()),
        other => Err(YamlError::new(
            origin,
            format!(
                "expected a mapping at the top level, found {}",
                kind(&other)
            ),
        )),
    }
}

/// A human word for a value's type, for error messages.
pub fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Sequence(_) => "a list",
        Value::Mapping(_) => "a mapping",
        Value::Tagged(_) => "a tagged value",
    }
}

/// YAML 1.1 booleans as PyYAML reads them: yes/no/on/off/true/false/y/n in any of the
/// usual cases. A real boolean passes through. Anything else is `None`.
pub fn bool11(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.as_str() {
            "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" | "y" | "Y" => {
                Some(true)
            }
            "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False" | "FALSE" | "n"
            | "N" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// Any scalar as text: strings as they are, numbers and booleans as written.
/// Use [`raw_top_level`] when the exact source text matters (digits with leading zeros
/// survive here already: serde_yaml keeps `0123` a string).
pub fn scalar_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The source text of a top-level plain scalar `key: value`, as written in the document.
/// serde_yaml turns long digit strings into floats and `0x1F` into 31; identifiers and
/// hostnames must keep the bytes the operator wrote, so callers prefer this text whenever
/// the parsed value is a number.
pub fn raw_top_level(text: &str, key: &str) -> Option<String> {
    let mut found = None;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(key) else {
            continue;
        };
        let Some(rest) = rest.strip_prefix(':') else {
            continue;
        };
        let value = match rest.find(" #") {
            Some(i) => &rest[..i],
            None => rest,
        }
        .trim();
        if !value.is_empty() {
            found = Some(value.trim_matches(|c| c == '"' || c == '\'').to_string());
        }
    }
    found
}

/// Parses a document of any shape from bytes, for callers that walk the tree themselves
/// (network-config). The error names the file and where the YAML broke.
pub fn parse_bytes(bytes: &[u8], origin: &str) -> Result<Value, YamlError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| YamlError::new(origin, format!("not UTF-8 text ({e})")))?;
    if text.trim().is_empty() {
        return Ok(Value::Null);
    }
    parse(text, origin)
}

/// A scalar as Python's `str()` prints the value PyYAML produced: cloud-init writes bond
/// and DHCP override values that way (`use-dns: no` becomes `UseDNS=False`).
pub fn python_text(v: &Value) -> Option<String> {
    match bool11(v) {
        Some(true) => Some("True".into()),
        Some(false) => Some("False".into()),
        None => scalar_text(v),
    }
}

/// Python truthiness of the value PyYAML would produce.
pub fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => bool11(v).unwrap_or(!s.is_empty()),
        Value::Sequence(s) => !s.is_empty(),
        Value::Mapping(m) => !m.is_empty(),
        Value::Tagged(t) => truthy(&t.value),
    }
}

/// A key of a mapping node; `None` for a missing key, a null value or a non-mapping.
pub fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Mapping(m) => m.get(key).filter(|x| !x.is_null()),
        _ => None,
    }
}

/// A scalar that must stay a string (instance-id, hostname, password hash): the parsed
/// value, or the source text when YAML turned it into a number.
pub fn keep_text(map: &Mapping, text: &str, key: &str) -> Option<String> {
    match map.get(key)? {
        Value::Number(_) => raw_top_level(text, key).or_else(|| scalar_text(map.get(key)?)),
        v => scalar_text(v),
    }
}

/// A string, or a list of strings (cloud-init accepts both for key lists).
pub fn string_list(v: &Value) -> Vec<String> {
    match v {
        Value::Sequence(items) => items.iter().filter_map(scalar_text).collect(),
        Value::Null => Vec::new(),
        other => scalar_text(other).into_iter().collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml11_booleans_are_accepted() {
        let m = parse_mapping("a: no\nb: On\nc: False\nd: maybe\n", "t").unwrap();
        assert_eq!(bool11(&m["a"]), Some(false));
        assert_eq!(bool11(&m["b"]), Some(true));
        assert_eq!(bool11(&m["c"]), Some(false));
        assert_eq!(bool11(&m["d"]), None);
    }

    #[test]
    fn python_views_of_yaml11_values() {
        for (s, want) in [
            ("yes", true),
            ("No", false),
            ("ON", true),
            ("off", false),
            ("True", true),
            ("FALSE", false),
        ] {
            assert_eq!(bool11(&Value::String(s.into())), Some(want), "{s}");
        }
        assert_eq!(
            python_text(&Value::String("no".into())).as_deref(),
            Some("False")
        );
        assert!(!truthy(&Value::String("no".into())));
        assert!(truthy(&Value::String("eth0".into())));
        assert!(get(&parse("a: ~\n", "t").unwrap(), "a").is_none());
    }

    #[test]
    fn numeric_scalars_keep_their_source_text() {
        let text = "instance-id: 1234567890123456789012345678901234567890\nhostname: 0123\nid2: 0x1F # comment\n";
        let m = parse_mapping(text, "meta-data").unwrap();
        assert_eq!(
            keep_text(&m, text, "instance-id").as_deref(),
            Some("1234567890123456789012345678901234567890")
        );
        assert_eq!(keep_text(&m, text, "hostname").as_deref(), Some("0123"));
        assert_eq!(keep_text(&m, text, "id2").as_deref(), Some("0x1F"));
    }

    #[test]
    fn malformed_yaml_names_file_and_line() {
        let err = parse_mapping("a: [1, 2\nb: c\n", "user-data").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("user-data: line "), "{msg}");
    }

    #[test]
    fn top_level_list_is_refused() {
        let err = parse_mapping("- a\n- b\n", "meta-data").unwrap_err();
        assert!(err.to_string().contains("expected a mapping"));
    }
}
