//! The request envelope `{"execute", "arguments"?, "id"?}` and the arguments reader,
//! with the checks in qemu-ga's order and its messages word for word.

use serde_json::{Map, Value};

use super::QgaError;
use super::encode::qdict_order;

/// A request that passed the envelope checks.
#[derive(Debug, Clone, PartialEq)]
pub struct QgaRequest {
    pub execute: String,
    pub arguments: Map<String, Value>,
    pub id: Option<Value>,
}

/// Checks one framed value. On error, the id to echo (if the value had one) comes back
/// with the error.
pub fn parse_request(v: Value) -> Result<QgaRequest, (QgaError, Option<Value>)> {
    let Value::Object(mut m) = v else {
        return Err((QgaError::generic("QMP input must be a JSON object"), None));
    };
    let id = m.get("id").cloned();
    for key in qdict_order(&m) {
        match key {
            "execute" if !m[key].is_string() => {
                return Err((
                    QgaError::generic("QMP input member 'execute' must be a string"),
                    id,
                ));
            }
            "arguments" if !m[key].is_object() => {
                return Err((
                    QgaError::generic("QMP input member 'arguments' must be an object"),
                    id,
                ));
            }
            "execute" | "arguments" | "id" => {}
            other => {
                return Err((
                    QgaError::generic(format!("QMP input member '{other}' is unexpected")),
                    id,
                ));
            }
        }
    }
    let Some(Value::String(execute)) = m.remove("execute") else {
        return Err((QgaError::generic("QMP input lacks member 'execute'"), id));
    };
    let arguments = match m.remove("arguments") {
        Some(Value::Object(a)) => a,
        _ => Map::new(),
    };
    Ok(QgaRequest {
        execute,
        arguments,
        id,
    })
}

/// Reads a command's arguments the way qemu's input visitor does: members in schema
/// order (the first bad one is reported), then any member nobody asked for.
#[derive(Debug)]
pub struct Args {
    map: Map<String, Value>,
    seen: Vec<String>,
    /// Where these arguments sit in the request, for error texts: empty at the top,
    /// `vcpus[0].` for an element of a list of objects.
    prefix: String,
}

fn type_error(name: &str, expected: &str) -> QgaError {
    QgaError::generic(format!(
        "Invalid parameter type for '{name}', expected: {expected}"
    ))
}

fn missing(name: &str) -> QgaError {
    QgaError::generic(format!("Parameter '{name}' is missing"))
}

fn as_i64(v: &Value) -> Option<i64> {
    match v {
        Value::Number(n) if n.is_i64() => n.as_i64(),
        _ => None,
    }
}

fn as_u64(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) if n.is_u64() => n.as_u64(),
        // qemu accepts negative numbers for uint64 for backward compatibility.
        Value::Number(n) if n.is_i64() => n.as_i64().map(|i| i as u64),
        _ => None,
    }
}

impl Args {
    pub fn new(map: Map<String, Value>) -> Self {
        Args {
            map,
            seen: Vec::new(),
            prefix: String::new(),
        }
    }

    /// A member's name as qemu's errors spell it.
    fn full(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The argument names given, for the audit log (values may be secrets).
    pub fn names(&self) -> Vec<&str> {
        self.map.keys().map(String::as_str).collect()
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        self.seen.push(name.to_string());
        self.map.get(name).cloned()
    }

    /// A required argument of a QAPI alternate type, left to the command to interpret.
    pub fn value(&mut self, name: &str) -> Result<Value, QgaError> {
        let full = self.full(name);
        self.take(name).ok_or_else(|| missing(&full))
    }

    pub fn opt_i64(&mut self, name: &str) -> Result<Option<i64>, QgaError> {
        match self.take(name) {
            None => Ok(None),
            Some(v) => as_i64(&v)
                .map(Some)
                .ok_or_else(|| type_error(&self.full(name), "integer")),
        }
    }

    pub fn i64(&mut self, name: &str) -> Result<i64, QgaError> {
        let full = self.full(name);
        self.opt_i64(name)?.ok_or_else(|| missing(&full))
    }

    pub fn opt_u64(&mut self, name: &str) -> Result<Option<u64>, QgaError> {
        match self.take(name) {
            None => Ok(None),
            // qemu's visitor words a bad uint64 differently from other types.
            Some(v) => as_u64(&v).map(Some).ok_or_else(|| {
                QgaError::generic(format!("Parameter '{}' expects uint64", self.full(name)))
            }),
        }
    }

    pub fn u64(&mut self, name: &str) -> Result<u64, QgaError> {
        let full = self.full(name);
        self.opt_u64(name)?.ok_or_else(|| missing(&full))
    }

    pub fn opt_str(&mut self, name: &str) -> Result<Option<String>, QgaError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s)),
            Some(_) => Err(type_error(&self.full(name), "string")),
        }
    }

    pub fn str(&mut self, name: &str) -> Result<String, QgaError> {
        let full = self.full(name);
        self.opt_str(name)?.ok_or_else(|| missing(&full))
    }

    pub fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, QgaError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(_) => Err(type_error(&self.full(name), "boolean")),
        }
    }

    pub fn bool(&mut self, name: &str) -> Result<bool, QgaError> {
        let full = self.full(name);
        self.opt_bool(name)?.ok_or_else(|| missing(&full))
    }

    pub fn opt_str_list(&mut self, name: &str) -> Result<Option<Vec<String>>, QgaError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::String(s) => Ok(s),
                    _ => Err(type_error(&format!("{}[{i}]", self.full(name)), "string")),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Some),
            Some(_) => Err(type_error(&self.full(name), "array")),
        }
    }

    pub fn str_list(&mut self, name: &str) -> Result<Vec<String>, QgaError> {
        let full = self.full(name);
        self.opt_str_list(name)?.ok_or_else(|| missing(&full))
    }

    /// A required list of objects (`vcpus: [GuestLogicalProcessor]`): one `Args` per
    /// element, or the error for an element that is not an object. The caller takes
    /// each with `?`, reads its members and finishes it before the next, so errors come
    /// in the order of qemu's visitor (element 0 whole, then element 1).
    pub fn object_list(&mut self, name: &str) -> Result<Vec<Result<Args, QgaError>>, QgaError> {
        let full = self.full(name);
        match self.take(name) {
            None => Err(missing(&full)),
            Some(Value::Array(items)) => Ok(items
                .into_iter()
                .enumerate()
                .map(|(i, v)| match v {
                    Value::Object(map) => Ok(Args {
                        map,
                        seen: Vec::new(),
                        prefix: format!("{full}[{i}]."),
                    }),
                    _ => Err(type_error(&format!("{full}[{i}]"), "object")),
                })
                .collect()),
            Some(_) => Err(type_error(&full, "array")),
        }
    }

    /// Ends reading: an argument the command does not take is an error.
    pub fn finish(self) -> Result<(), QgaError> {
        for key in qdict_order(&self.map) {
            if !self.seen.iter().any(|s| s == key) {
                return Err(QgaError::generic(format!(
                    "Parameter '{}{key}' is unexpected",
                    self.prefix
                )));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn desc(v: Value) -> String {
        parse_request(v).err().map(|e| e.0.desc).unwrap_or_default()
    }

    #[test]
    fn envelope_messages() {
        assert_eq!(desc(json!([1])), "QMP input must be a JSON object");
        assert_eq!(desc(json!({})), "QMP input lacks member 'execute'");
        assert_eq!(
            desc(json!({"execute": 1})),
            "QMP input member 'execute' must be a string"
        );
        assert_eq!(
            desc(json!({"execute": "x", "arguments": 1})),
            "QMP input member 'arguments' must be an object"
        );
        assert_eq!(
            desc(json!({"execute": "x", "foo": 1})),
            "QMP input member 'foo' is unexpected"
        );
        let (_, id) = parse_request(json!({"id": null})).unwrap_err();
        assert_eq!(id, Some(Value::Null));
    }

    #[test]
    fn argument_messages() {
        let mut a = Args::new(json!({"id": "a"}).as_object().unwrap().clone());
        assert_eq!(
            a.i64("id").unwrap_err().desc,
            "Invalid parameter type for 'id', expected: integer"
        );
        let mut a = Args::new(Map::new());
        assert_eq!(a.i64("id").unwrap_err().desc, "Parameter 'id' is missing");
        let a = Args::new(json!({"foo": 1}).as_object().unwrap().clone());
        assert_eq!(
            a.finish().unwrap_err().desc,
            "Parameter 'foo' is unexpected"
        );
        let mut a = Args::new(json!({"keys": [1]}).as_object().unwrap().clone());
        assert_eq!(
            a.str_list("keys").unwrap_err().desc,
            "Invalid parameter type for 'keys[0]', expected: string"
        );
        let mut a = Args::new(json!({"id": 1.0}).as_object().unwrap().clone());
        assert!(a.i64("id").is_err());
    }
}
