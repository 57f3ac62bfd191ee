//! The one place nixseed touches YAML. cloud-init reads seeds with PyYAML (YAML 1.1);
//! serde_yaml speaks YAML 1.2. The helpers here bridge the two: lenient booleans
//! (`no`, `on`, `False`) and scalars that must keep their text (`instance-id: 0123`).
//! serde_yaml is archived upstream; swapping it for a fork touches only this file.

pub use serde_yaml::{Mapping, Value};
use std::ops::ControlFlow;

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
///
/// The document is read as PyYAML reads it where serde_yaml alone would differ: of keys
/// given twice the last wins, and merge keys (`<<: *base`) are applied. Three limits keep
/// a hostile document from stalling the boot or exhausting memory: flow collections
/// nested deeper than [`MAX_DEPTH`] and documents with more than [`MAX_NODES`] places a
/// node may start are refused before the parser sees them (its scanner's time grows with
/// the depth for every token; it holds every node's event at once), and aliases may not
/// expand the document beyond [`MAX_EXPANDED`] (each use of an anchor is a copy).
pub fn parse(text: &str, origin: &str) -> Result<Value, YamlError> {
    if text.trim().is_empty() {
        return Ok(Value::Mapping(Mapping::new()));
    }
    let seen = prescan(text, MAX_DEPTH);
    if let Some(line) = seen.too_deep {
        return Err(YamlError::new(
            origin,
            format!(
                "line {line}: malformed YAML: collections nested deeper than {MAX_DEPTH} levels"
            ),
        ));
    }
    if let Some(line) = seen.too_many {
        return Err(YamlError::new(
            origin,
            format!(
                "line {line}: the document has more than {MAX_NODES} nodes (a cloud-config has hundreds); refused before parsing, which would hold every one in memory"
            ),
        ));
    }
    let marked = mark_binary(text, &seen.binary_tags);
    let text = marked.as_deref().unwrap_or(text);
    let budget = std::cell::Cell::new(MAX_EXPANDED);
    let de = serde_yaml::Deserializer::from_str(text);
    let mut value = serde::de::DeserializeSeed::deserialize(Bounded(&budget), de).map_err(|e| {
        let place = e
            .location()
            .map(|l| format!("line {}, column {}: ", l.line(), l.column()))
            .unwrap_or_default();
        YamlError::new(origin, format!("{place}malformed YAML: {e}"))
    })?;
    value
        .apply_merge()
        .map_err(|e| YamlError::new(origin, format!("malformed YAML: merge key: {e}")))?;
    Ok(value)
}

/// How many nodes a document may have. serde_yaml holds every event of a document in
/// memory before the first is read (about 150 bytes each): 16 MiB of `[a,a,a,…]`, a
/// gzip'd user-data of 16 KiB, took 1.3 GB. The limit keeps that near 60 MiB.
pub const MAX_NODES: usize = 200_000;

/// serde_yaml's own limit on nesting; flow collections deeper than this are refused before
/// parsing.
pub const MAX_DEPTH: usize = 128;

/// How large the parsed document may grow with its aliases expanded: bytes of scalars
/// plus [`NODE_COST`] per node. Twice the largest user-data, so a document without
/// aliases never reaches it.
pub const MAX_EXPANDED: usize = 2 * crate::userdata::MAX_USER_DATA;
const NODE_COST: usize = 16;

/// Builds a [`Value`] as serde_yaml's own does, but charging every node and scalar to a
/// budget, and keeping the last of duplicate keys.
struct Bounded<'a>(&'a std::cell::Cell<usize>);

impl Bounded<'_> {
    fn charge<E: serde::de::Error>(&self, cost: usize) -> Result<(), E> {
        match self.0.get().checked_sub(cost.saturating_add(NODE_COST)) {
            Some(left) => {
                self.0.set(left);
                Ok(())
            }
            None => Err(E::custom(format_args!(
                "aliases expand the document beyond {MAX_EXPANDED} bytes"
            ))),
        }
    }
}

impl<'de> serde::de::DeserializeSeed<'de> for Bounded<'_> {
    type Value = Value;

    fn deserialize<D: serde::Deserializer<'de>>(self, de: D) -> Result<Value, D::Error> {
        de.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Bounded<'_> {
    type Value = Value;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_bool<E: serde::de::Error>(self, b: bool) -> Result<Value, E> {
        self.charge(0)?;
        Ok(Value::Bool(b))
    }

    fn visit_i64<E: serde::de::Error>(self, i: i64) -> Result<Value, E> {
        self.charge(0)?;
        Ok(Value::Number(i.into()))
    }

    fn visit_u64<E: serde::de::Error>(self, u: u64) -> Result<Value, E> {
        self.charge(0)?;
        Ok(Value::Number(u.into()))
    }

    fn visit_f64<E: serde::de::Error>(self, f: f64) -> Result<Value, E> {
        self.charge(0)?;
        Ok(Value::Number(f.into()))
    }

    fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Value, E> {
        self.charge(s.len())?;
        Ok(Value::String(s.to_owned()))
    }

    fn visit_string<E: serde::de::Error>(self, s: String) -> Result<Value, E> {
        self.charge(s.len())?;
        Ok(Value::String(s))
    }

    fn visit_unit<E: serde::de::Error>(self) -> Result<Value, E> {
        self.charge(0)?;
        Ok(Value::Null)
    }

    fn visit_none<E: serde::de::Error>(self) -> Result<Value, E> {
        self.visit_unit()
    }

    fn visit_some<D: serde::Deserializer<'de>>(self, de: D) -> Result<Value, D::Error> {
        serde::de::DeserializeSeed::deserialize(self, de)
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        self.charge(0)?;
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(Bounded(self.0))? {
            items.push(item);
        }
        Ok(Value::Sequence(items))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        self.charge(0)?;
        let mut out = Mapping::new();
        while let Some(key) = map.next_key_seed(Bounded(self.0))? {
            let value = map.next_value_seed(Bounded(self.0))?;
            // PyYAML keeps the last of keys given twice; serde_yaml would refuse them.
            out.insert(key, value);
        }
        Ok(Value::Mapping(out))
    }

    fn visit_enum<A: serde::de::EnumAccess<'de>>(self, data: A) -> Result<Value, A::Error> {
        use serde::de::VariantAccess;
        self.charge(0)?;
        let (tag, contents) = data.variant_seed(std::marker::PhantomData::<String>)?;
        let value = contents.newtype_variant_seed(Bounded(self.0))?;
        Ok(Value::Tagged(Box::new(serde_yaml::value::TaggedValue {
            tag: serde_yaml::value::Tag::new(tag),
            value,
        })))
    }
}

/// What [`scan`] reports of a document.
enum Mark {
    /// A flow collection (`[`, `{`) opens on this line (1-based), `depth` deep.
    FlowOpen { line: usize, depth: usize },
    /// A node's tag (`!!binary`, `!local`) at these byte offsets of the document.
    Tag { start: usize, end: usize },
    /// Where a node may start on this line: a line's first token, a flow item after `,`,
    /// a value after `:`, an item after `-` or `?`. Each node is at least one of these.
    Node { line: usize },
}

/// Walks a document as far as a scan that knows quoted scalars, comments and block
/// scalars can tell, reporting flow collections and tags where a node could start, until
/// `on` breaks. It counts a bracket in a plain scalar only where a collection could
/// start, so it errs towards deeper.
fn scan(text: &str, mut on: impl FnMut(Mark) -> ControlFlow<()>) {
    let mut depth = 0usize;
    let mut quote: Option<u8> = None;
    let mut block_scalar: Option<usize> = None;
    let mut line_start = 0;
    for (n, line) in text.split_inclusive('\n').enumerate() {
        let offset = line_start;
        line_start += line.len();
        let line = line.trim_end_matches(['\n', '\r']);
        let bytes = line.as_bytes();
        let indent = bytes.iter().take_while(|&&c| c == b' ').count();
        if let Some(parent) = block_scalar {
            if line.trim().is_empty() || indent > parent {
                continue;
            }
            block_scalar = None;
        }
        let mut at_start = quote.is_none();
        let first = line.trim_start();
        if at_start
            && !first.is_empty()
            && !first.starts_with('#')
            && on(Mark::Node { line: n + 1 }).is_break()
        {
            return;
        }
        // The column of the block node this line is in (`key` in `- key: |`), and of a
        // `-` or `?` indicator until the token after it: a block scalar's text is the
        // lines indented deeper than the node it is the value of.
        let mut node_col = indent;
        let mut dash_col: Option<usize> = None;
        // The column of a tag or anchor after that indicator: a node's properties, so
        // its column, not a node of their own (`- &a |`, `- !!binary |`).
        let mut prop_col: Option<usize> = None;
        let mut i = 0;
        while i < bytes.len() {
            let c = bytes[i];
            let next_blank = bytes.get(i + 1).is_none_or(|b| matches!(b, b' ' | b'\t'));
            if let Some(q) = quote {
                if q == b'"' && c == b'\\' {
                    i += 2;
                    continue;
                }
                if c == q {
                    if q == b'\'' && bytes.get(i + 1) == Some(&b'\'') {
                        i += 2;
                        continue;
                    }
                    quote = None;
                    at_start = false;
                }
                i += 1;
                continue;
            }
            let parent_col = dash_col.unwrap_or(node_col);
            let indicator = matches!(c, b'-' | b'?') && next_blank && at_start;
            let property = matches!(c, b'!' | b'&') && at_start;
            if property && dash_col.is_some() {
                prop_col.get_or_insert(i);
            } else if !matches!(c, b' ' | b'\t') && !indicator && dash_col.take().is_some() {
                node_col = prop_col.take().unwrap_or(i);
            }
            match c {
                b' ' | b'\t' => {}
                b'#' if i == 0 || matches!(bytes[i - 1], b' ' | b'\t') => break,
                b'"' | b'\'' if at_start => quote = Some(c),
                b'[' | b'{' if depth > 0 || at_start => {
                    depth += 1;
                    if on(Mark::FlowOpen { line: n + 1, depth }).is_break() {
                        return;
                    }
                    at_start = true;
                }
                b']' | b'}' if depth > 0 => {
                    depth -= 1;
                    at_start = false;
                }
                b',' | b':' if depth > 0 || (c == b':' && next_blank) => {
                    at_start = true;
                    if on(Mark::Node { line: n + 1 }).is_break() {
                        return;
                    }
                }
                // An indicator only where a node starts; inside a plain scalar
                // (`echo a - b`) it is text.
                b'-' | b'?' if indicator => {
                    dash_col = Some(i);
                    prop_col = None;
                    if on(Mark::Node { line: n + 1 }).is_break() {
                        return;
                    }
                }
                b'|' | b'>' if at_start && depth == 0 => {
                    block_scalar = Some(parent_col);
                    break;
                }
                b'!' | b'&' if at_start => {
                    let begin = i;
                    while i + 1 < bytes.len() && !matches!(bytes[i + 1], b' ' | b'\t') {
                        i += 1;
                    }
                    let (start, end) = (offset + begin, offset + i + 1);
                    if c == b'!' && on(Mark::Tag { start, end }).is_break() {
                        return;
                    }
                }
                _ => at_start = false,
            }
            i += 1;
        }
    }
}

/// What one [`scan`] before the parser finds in a document.
struct Prescan {
    /// The line on which the places a node may start pass [`MAX_NODES`].
    too_many: Option<usize>,
    /// The line on which flow collections first nest deeper than the limit. A document
    /// serde_yaml accepts (nesting of any kind at most 128) stays below the limit unless
    /// its plain scalars hold unbalanced brackets.
    too_deep: Option<usize>,
    /// Where each `!!binary` tag starts.
    binary_tags: Vec<usize>,
}

fn prescan(text: &str, limit: usize) -> Prescan {
    let mut seen = Prescan {
        too_many: None,
        too_deep: None,
        binary_tags: Vec::new(),
    };
    let mut nodes = 0usize;
    scan(text, |mark| match mark {
        Mark::Node { line } | Mark::FlowOpen { line, .. } if nodes >= MAX_NODES => {
            seen.too_many = Some(line);
            ControlFlow::Break(())
        }
        Mark::Node { .. } => {
            nodes += 1;
            ControlFlow::Continue(())
        }
        Mark::FlowOpen { line, depth } if depth > limit => {
            seen.too_deep = Some(line);
            ControlFlow::Break(())
        }
        Mark::FlowOpen { .. } => {
            nodes += 1;
            ControlFlow::Continue(())
        }
        Mark::Tag { start, end } if &text[start..end] == "!!binary" => {
            seen.binary_tags.push(start);
            ControlFlow::Continue(())
        }
        _ => ControlFlow::Continue(()),
    });
    seen
}

/// The local tag `!!binary` is read as: serde_yaml resolves `!!binary` to YAML's global
/// binary tag and then drops it, leaving the base64 text, where PyYAML (and so
/// cloud-init) gives the decoded bytes. The document is read with each `!!binary` tag
/// turned into this one, which serde_yaml keeps ([`binary`] decodes it).
const BINARY_TAG: &str = "!binary";

/// `text` with the `!!binary` tags at `tags` turned into [`BINARY_TAG`], padded to the
/// same length so that positions in messages stay right; `None` when there are none.
fn mark_binary(text: &str, tags: &[usize]) -> Option<String> {
    if tags.is_empty() {
        return None;
    }
    let mut out = text.to_string();
    for &start in tags {
        out.replace_range(start..start + "!!binary".len(), &format!("{BINARY_TAG} "));
    }
    Some(out)
}

/// The bytes of a `!!binary` node (its base64 text decoded, as PyYAML decodes it):
/// `None` when `v` is not one, `Some(Err(()))` when its text is not base64.
pub fn binary(v: &Value) -> Option<Result<Vec<u8>, ()>> {
    let Value::Tagged(t) = v else {
        return None;
    };
    if t.tag != BINARY_TAG {
        return None;
    }
    Some(match &t.value {
        // An empty node is no bytes, as PyYAML reads it.
        Value::Null => Ok(Vec::new()),
        Value::String(s) => crate::credentials::base64_decode(s).ok_or(()),
        // A plain scalar serde_yaml reads as a number or a boolean may have lost its
        // text (`0x1F` is 31): refused rather than decoded wrong; quoted, it decodes.
        _ => Err(()),
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
        Value::Tagged(t) if t.tag == BINARY_TAG => "binary data (!!binary)",
        Value::Tagged(_) => "a tagged value",
    }
}

/// YAML 1.1 booleans as PyYAML reads them: yes/no/on/off/true/false in the three cases
/// its resolver knows (PyYAML leaves `y` and `n` strings). A real boolean passes through.
/// Anything else is `None`.
pub fn bool11(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.as_str() {
            "yes" | "Yes" | "YES" | "on" | "On" | "ON" | "true" | "True" | "TRUE" => Some(true),
            "no" | "No" | "NO" | "off" | "Off" | "OFF" | "false" | "False" | "FALSE" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// What Python's `if value:` makes of a value PyYAML read, for keys cloud-init tests that
/// way (`lock_passwd`). YAML 1.1's `yes`/`no`/`on`/`off`, which PyYAML reads as booleans
/// and this parser as text, are booleans here too; `true`/`false` as text were quoted
/// (unquoted, they are booleans already), and like any other non-empty text are true.
/// Null, `0`, `""` and empty lists and mappings are false.
pub fn py_truth(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64().is_some_and(|f| f != 0.0),
        Value::String(s) => match s.as_str() {
            "yes" | "Yes" | "YES" | "on" | "On" | "ON" => true,
            "no" | "No" | "NO" | "off" | "Off" | "OFF" => false,
            s => !s.is_empty(),
        },
        Value::Sequence(items) => !items.is_empty(),
        Value::Mapping(m) => !m.is_empty(),
        Value::Tagged(t) => py_truth(&t.value),
    }
}

/// cloud-init's `is_true` / `is_false` (and `translate_bool`'s true side): a boolean as
/// it is, else the value's text, trimmed and in any case, among `true 1 on yes` or
/// `false 0 off no`; `None` for anything else (a list, `maybe`, `2`).
pub fn cloud_truth(v: &Value) -> Option<bool> {
    if let Value::Bool(b) = v {
        return Some(*b);
    }
    let text = scalar_text(v)?.trim().to_ascii_lowercase();
    match text.as_str() {
        "true" | "1" | "on" | "yes" => Some(true),
        "false" | "0" | "off" | "no" => Some(false),
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
/// `value` of top-level `key`, or its source text when YAML turned it into a number.
pub fn keep_text(value: &Value, text: &str, key: &str) -> Option<String> {
    match value {
        Value::Number(_) => raw_top_level(text, key).or_else(|| scalar_text(value)),
        v => scalar_text(v),
    }
}

/// A mapping key as a name: a plain string, not a tagged one (`!tag hostname:`), which
/// serde_yaml's `as_str` would read as the bare name although the mapping cannot be
/// looked up by it; PyYAML refuses such a tag. Any other key is the warning that it was
/// ignored, naming `origin`.
pub fn plain_key<'a>(key: &'a Value, origin: &str) -> Result<&'a str, String> {
    match key {
        Value::String(s) => Ok(s),
        _ => Err(format!(
            "{origin}: a key ignored: {}, not a plain string",
            kind(key)
        )),
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
    fn binary_tags_keep_positions_in_messages() {
        // `!!Binary` is not rewritten and is as long: the error on the tag's own line
        // must stand at the same column.
        let other = parse("a: !!Binary x y: z\n", "f").unwrap_err().to_string();
        let tagged = parse("a: !!binary x y: z\n", "f").unwrap_err().to_string();
        let at = |e: &str| {
            e.split(": malformed")
                .next()
                .unwrap_or_default()
                .to_string()
        };
        assert!(at(&other).starts_with("f: line 1, column "), "{other}");
        assert_eq!(at(&other), at(&tagged), "{tagged}");
        // Text inside a plain scalar, a quoted one or a comment is left alone.
        assert_eq!(
            prescan(
                "- echo a - !!binary b\n- '!!binary'\n# !!binary\n",
                MAX_DEPTH
            )
            .binary_tags,
            Vec::<usize>::new()
        );
        assert_eq!(
            binary(&parse("- !!binary\n", "f").unwrap()[0]),
            Some(Ok(Vec::new()))
        );
        assert_eq!(
            binary(&parse("- !!binary 0x1F\n", "f").unwrap()[0]),
            Some(Err(()))
        );
        let v = parse("- !!binary aGkK\n- [!!binary 'aGk=']\n", "f").unwrap();
        assert_eq!(binary(&v[0]), Some(Ok(b"hi\n".to_vec())));
        assert_eq!(binary(&v[1][0]), Some(Ok(b"hi".to_vec())));
    }

    /// As cloud-init 22.4's `util.is_true` / `is_false` read values (checked with it).
    #[test]
    fn cloud_truth_reads_values_as_cloud_init_does() {
        let m = parse_mapping(
            "a: 1\nb: 0\nc: ' Yes '\nd: Unchanged\ne: n\nf: [1]\ng: OFF\n",
            "t",
        )
        .unwrap();
        let got: Vec<Option<bool>> = ["a", "b", "c", "d", "e", "f", "g"]
            .iter()
            .map(|k| cloud_truth(&m[*k]))
            .collect();
        assert_eq!(
            got,
            [
                Some(true),
                Some(false),
                Some(true),
                None,
                None,
                None,
                Some(false)
            ]
        );
    }

    #[test]
    fn yaml11_booleans_are_accepted() {
        let m = parse_mapping("a: no\nb: On\nc: False\nd: maybe\ne: y\n", "t").unwrap();
        assert_eq!(bool11(&m["a"]), Some(false));
        assert_eq!(bool11(&m["b"]), Some(true));
        assert_eq!(bool11(&m["c"]), Some(false));
        assert_eq!(bool11(&m["d"]), None);
        assert_eq!(bool11(&m["e"]), None, "PyYAML reads `y` as a string");
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
        let keep = |key: &str| keep_text(&m[key], text, key);
        assert_eq!(
            keep("instance-id").as_deref(),
            Some("1234567890123456789012345678901234567890")
        );
        assert_eq!(keep("hostname").as_deref(), Some("0123"));
        assert_eq!(keep("id2").as_deref(), Some("0x1F"));
    }

    #[test]
    fn malformed_yaml_names_file_and_line() {
        let err = parse_mapping("a: [1, 2\nb: c\n", "user-data").unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("user-data: line "), "{msg}");
    }

    #[test]
    fn the_last_of_duplicate_keys_wins_as_in_pyyaml() {
        let m = parse_mapping("hostname: a\nfqdn: x\nhostname: b\n", "user-data").unwrap();
        assert_eq!(m["hostname"], Value::String("b".into()));
        assert_eq!(m.len(), 2);
    }

    #[test]
    fn merge_keys_are_applied() {
        let text = "base: &b {groups: [wheel], shell: /bin/sh}\nusers:\n  - <<: *b\n    name: bob\n    shell: /bin/zsh\n";
        let v = parse(text, "user-data").unwrap();
        let bob = &v["users"][0];
        assert_eq!(bob["name"], Value::String("bob".into()));
        assert_eq!(bob["groups"][0], Value::String("wheel".into()));
        assert_eq!(
            bob["shell"],
            Value::String("/bin/zsh".into()),
            "the entry's own key wins"
        );
        assert!(bob.get("<<").is_none());
    }

    #[test]
    fn aliases_cannot_expand_a_document_without_bound() {
        // One 1 MiB anchored string named 40 times: 40 MiB once expanded.
        let big = "x".repeat(1 << 20);
        let mut text = format!("a: &big {big}\nb: [");
        text.push_str(&vec!["*big"; 40].join(", "));
        text.push_str("]\n");
        let err = parse(&text, "user-data").unwrap_err().to_string();
        assert!(
            err.starts_with("user-data: ") && err.contains("aliases expand the document"),
            "{err}"
        );
        // A few uses stay within the bound.
        let small = format!("a: &big {big}\nb: [*big, *big]\n");
        assert!(parse(&small, "user-data").is_ok());
    }

    /// 16 MiB of one-letter items (what 16 KiB of gzip expands to) is refused before
    /// serde_yaml holds its millions of events; text in block and quoted scalars, however
    /// many commas, colons and lines it has, does not count.
    #[test]
    fn a_document_of_millions_of_nodes_is_refused_before_parsing() {
        let bomb = format!("#cloud-config\nx: [{}a]\n", "a,".repeat(8 << 20));
        let err = parse(&bomb, "user-data").unwrap_err().to_string();
        assert!(
            err.starts_with("user-data: line 2: the document has more than 200000 nodes"),
            "{err}"
        );
        // A block scalar's text ends where the node it belongs to does: the flow list
        // of the next key in the same item is scanned, not skipped as text.
        let after_block = format!("x:\n- a: |\n   b\n  c: [{}a]\n", "a,".repeat(MAX_NODES));
        let err = parse(&after_block, "user-data").unwrap_err().to_string();
        assert!(err.contains("more than 200000 nodes"), "{err}");
        let open = "[".repeat(300);
        let item =
            format!("w:\n- content: |\n    {open}\n    {open}\n  path: /var/x\n- |\n  {open}\n");
        let m = parse_mapping(&item, "user-data").unwrap();
        assert_eq!(m["w"][0]["path"], Value::String("/var/x".into()));
        assert_eq!(m["w"][1], Value::String(format!("{open}\n")));
        // Properties before `|` belong to the item's node: its text is still skipped (an
        // unclosed quote in it must not hide the `!!binary` tag after it).
        for props in ["&probe", "!!str", "&probe !!str"] {
            let doc = format!(
                "b:\n  - {props} |\n    python3 -c \"\n    print(1)\n    \"\nw:\n  - path: /var/x\n    content: !!binary |\n      aGVsbG8=\n"
            );
            let m = parse_mapping(&doc, "user-data").unwrap();
            assert_eq!(
                binary(&m["w"][0]["content"]),
                Some(Ok(b"hello".to_vec())),
                "{props}: {:?}",
                m["w"][0]["content"]
            );
        }
        let lines = format!("x:\n{}", "- a\n".repeat(MAX_NODES + 1));
        let err = parse(&lines, "user-data").unwrap_err().to_string();
        assert!(
            err.contains("more than 200000 nodes"),
            "one item per line: {err}"
        );
        let block = format!("x: [{}a]\n", "a,\n  ".repeat(MAX_NODES));
        assert!(
            parse(&block, "user-data").is_err(),
            "one item per line counts too"
        );
        let csv = "a,b:c,- d\n".repeat(MAX_NODES);
        let text = format!(
            "literal: |\n{}quoted: \"{}\"\nwrite_files:\n  - path: /var/x\n    content: ok\n",
            csv.lines().map(|l| format!("  {l}\n")).collect::<String>(),
            "a, b: c, ".repeat(MAX_NODES)
        );
        let m = parse_mapping(&text, "user-data").unwrap();
        assert_eq!(m["literal"].as_str().map(str::len), Some(csv.len()));
    }

    #[test]
    fn deep_flow_nesting_is_refused_before_parsing() {
        let text = format!("a: 1\nx: {}\n", "[".repeat(100_000));
        let err = parse(&text, "meta-data").unwrap_err().to_string();
        assert_eq!(
            err,
            "meta-data: line 2: malformed YAML: collections nested deeper than 128 levels"
        );
        let flow = format!("x: {}1{}\n", "[".repeat(120), "]".repeat(120));
        assert!(parse(&flow, "t").is_ok(), "nesting within the limit parses");
    }

    #[test]
    fn brackets_in_scalars_comments_and_block_scalars_do_not_count_as_nesting() {
        let open = "[".repeat(300);
        let text = format!(
            "a: \"{open}\"\nb: '{open}'\nc: x{open}\n# {open}\nd: |\n  {open}\n  more {open}\ne: [\"{open}\", '{open}']\n"
        );
        let m = parse_mapping(&text, "user-data").unwrap();
        assert_eq!(m["c"], Value::String(format!("x{open}")));
        assert_eq!(m["d"], Value::String(format!("{open}\nmore {open}\n")));
        // A closing bracket inside a quoted scalar does not close a collection.
        let hidden = format!("x: {}\n", "[ \"]\", ".repeat(200));
        assert!(
            parse(&hidden, "t")
                .unwrap_err()
                .to_string()
                .contains("nested deeper")
        );
    }

    #[test]
    fn top_level_list_is_refused() {
        let err = parse_mapping("- a\n- b\n", "meta-data").unwrap_err();
        assert!(err.to_string().contains("expected a mapping"));
    }
}
