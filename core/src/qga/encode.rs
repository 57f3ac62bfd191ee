//! Replies as qemu-ga writes them: one ASCII line, `": "` and `", "` separators,
//! non-ASCII and control characters as upper-case `\uXXXX`, doubles as `%.17g`, and
//! object members in qemu's hash-table order so a reply is byte-for-byte what qemu-ga
//! would send for the same value.

use serde_json::{Map, Number, Value};

use super::utf8::is_writable;

/// qemu's QDict bucket for a key (the gdbm/tdb hash, 512 buckets).
pub fn qdict_bucket(key: &str) -> u32 {
    let bytes = key.as_bytes();
    let mut value = 0x238F_13AFu32.wrapping_mul(bytes.len() as u32);
    for (i, &b) in bytes.iter().enumerate() {
        value = value.wrapping_add(u32::from(b) << ((i as u32 * 5) % 24));
    }
    1_103_515_243u32.wrapping_mul(value).wrapping_add(12345) % 512
}

/// The keys of an object in the order qemu-ga iterates them. Keys sharing a bucket
/// keep reverse insertion order in qemu; here they fall back to name order.
pub fn qdict_order(map: &Map<String, Value>) -> Vec<&str> {
    let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
    keys.sort_by_key(|k| qdict_bucket(k));
    keys
}

/// Appends `v` to `out` in qemu-ga's compact form.
pub fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => write_number(out, n),
        Value::String(s) => write_str(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, item) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, item);
            }
            out.push(']');
        }
        Value::Object(m) => {
            out.push('{');
            for (i, k) in qdict_order(m).into_iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_str(out, k);
                out.push_str(": ");
                write_value(out, &m[k]);
            }
            out.push('}');
        }
    }
}

fn write_number(out: &mut String, n: &Number) {
    if let Some(i) = n.as_i64() {
        out.push_str(&i.to_string());
    } else if let Some(u) = n.as_u64() {
        out.push_str(&u.to_string());
    } else if let Some(f) = n.as_f64() {
        out.push_str(&format_g17(f));
    }
}

/// C's `%.17g`.
pub fn format_g17(f: f64) -> String {
    if f == 0.0 {
        return if f.is_sign_negative() { "-0" } else { "0" }.into();
    }
    let sci = format!("{f:.16e}");
    let Some((mantissa, exp)) = sci.split_once('e') else {
        return sci;
    };
    let exp: i32 = exp.parse().unwrap_or(0);
    let strip = |s: &str| -> String {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..17).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        format!("{}e{sign}{:02}", strip(mantissa), exp.abs())
    } else {
        let decimals = (16 - exp).max(0) as usize;
        strip(&format!("{f:.decimals$}"))
    }
}

fn write_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            ' '..='~' => out.push(c),
            _ => {
                let cp = if is_writable(c) { u32::from(c) } else { 0xFFFD };
                if cp > 0xFFFF {
                    let v = cp - 0x10000;
                    out.push_str(&format!(
                        "\\u{:04X}\\u{:04X}",
                        0xD800 + (v >> 10),
                        0xDC00 + (v & 0x3FF)
                    ));
                } else {
                    out.push_str(&format!("\\u{cp:04X}"));
                }
            }
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn enc(v: &Value) -> String {
        let mut s = String::new();
        write_value(&mut s, v);
        s
    }

    #[test]
    fn member_order_matches_qemu_ga() {
        // Orders observed from qemu-ga 7.2 replies.
        let osinfo = json!({"name":1,"kernel-release":1,"version":1,"pretty-name":1,
            "version-id":1,"kernel-version":1,"machine":1,"id":1});
        assert_eq!(
            qdict_order(osinfo.as_object().unwrap()),
            [
                "name",
                "kernel-release",
                "version",
                "pretty-name",
                "version-id",
                "kernel-version",
                "machine",
                "id"
            ]
        );
        let reply = json!({"id": null, "return": {}});
        assert_eq!(enc(&reply), r#"{"return": {}, "id": null}"#);
        let cmd = json!({"success-response": true, "name": "x", "enabled": true});
        assert_eq!(
            enc(&cmd),
            r#"{"enabled": true, "name": "x", "success-response": true}"#
        );
    }

    #[test]
    fn escapes_like_qemu_ga() {
        assert_eq!(
            enc(&json!("\u{e9}\u{7f}\u{1}\u{1F600}\"\n\0\u{FFFE}")),
            r#""\u00E9\u007F\u0001\uD83D\uDE00\"\n\u0000\uFFFD""#
        );
    }

    #[test]
    fn doubles_like_printf_g17() {
        assert_eq!(format_g17(1.5e300), "1.5000000000000001e+300");
        assert_eq!(format_g17(0.1), "0.10000000000000001");
        assert_eq!(format_g17(100.0), "100");
        assert_eq!(format_g17(-1.5), "-1.5");
        assert_eq!(format_g17(1e20), "1e+20");
        assert_eq!(format_g17(0.25), "0.25");
        assert_eq!(format_g17(1e-5), "1.0000000000000001e-05");
    }
}
