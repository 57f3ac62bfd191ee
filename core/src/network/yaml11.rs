//! YAML access for network-config. cloud-init reads seeds with PyYAML (YAML 1.1), so
//! `dhcp4: no` is a boolean there while serde_yaml (YAML 1.2) hands back the string
//! "no". These helpers read scalars the way cloud-init sees them.

use serde_yaml::Value;

/// Parses a document. The only place in the network module that calls serde_yaml.
pub(crate) fn load(bytes: &[u8]) -> Result<Value, serde_yaml::Error> {
    serde_yaml::from_slice(bytes)
}

/// A YAML 1.1 boolean: true/false, yes/no, on/off, y/n in any case, or a bool node.
pub(crate) fn as_bool(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "y" => Some(true),
            "false" | "no" | "off" | "n" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// Any scalar as its text (numbers keep their YAML spelling, e.g. `9000`).
pub(crate) fn as_text(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A scalar as Python's `str()` would print the value PyYAML produced; cloud-init
/// writes bond and DHCP override values that way (`use-dns: no` → `UseDNS=False`).
pub(crate) fn as_python_text(v: &Value) -> Option<String> {
    match as_bool(v) {
        Some(true) => Some("True".into()),
        Some(false) => Some("False".into()),
        None => as_text(v),
    }
}

/// Python truthiness of the value PyYAML would produce.
pub(crate) fn truthy(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => as_bool(v).unwrap_or(!s.is_empty()),
        Value::Sequence(s) => !s.is_empty(),
        Value::Mapping(m) => !m.is_empty(),
        Value::Tagged(t) => truthy(&t.value),
    }
}

/// Looks a key up in a mapping node.
pub(crate) fn get<'a>(v: &'a Value, key: &str) -> Option<&'a Value> {
    match v {
        Value::Mapping(m) => m.get(key).filter(|x| !x.is_null()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn yaml11_booleans_in_any_case() {
        for (s, want) in [
            ("yes", true),
            ("No", false),
            ("ON", true),
            ("off", false),
            ("True", true),
            ("FALSE", false),
        ] {
            assert_eq!(as_bool(&Value::String(s.into())), Some(want), "{s}");
        }
        assert_eq!(as_bool(&Value::String("maybe".into())), None);
        assert!(!truthy(&Value::String("no".into())));
        assert!(truthy(&Value::String("eth0".into())));
    }
}
