//! qemu-guest-agent wire protocol, the pure half of `nixseed-agent serve`: the
//! streaming framer, request envelope checks, qemu-ga's exact error classes and texts,
//! reply encoding and the command table. The agent feeds bytes in and writes the
//! returned bytes out; nothing here touches the system.

pub mod base64;
pub mod commands;
pub mod encode;
pub mod envelope;
pub mod framer;
pub mod limit;
pub mod sysparse;
pub mod utf8;

use serde_json::{Map, Value};

pub use envelope::{Args, QgaRequest};
pub use framer::Framer;

/// The byte qemu-ga writes before the reply to `guest-sync-delimited`.
pub const SYNC_DELIMITER: u8 = 0xFF;

/// qemu's error classes that qemu-ga uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    GenericError,
    CommandNotFound,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::GenericError => "GenericError",
            ErrorClass::CommandNotFound => "CommandNotFound",
        }
    }
}

/// An error reply: the class and the exact human text clients match on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{desc}")]
pub struct QgaError {
    pub class: ErrorClass,
    pub desc: String,
}

impl QgaError {
    pub fn generic(desc: impl Into<String>) -> Self {
        QgaError {
            class: ErrorClass::GenericError,
            desc: desc.into(),
        }
    }

    pub fn not_found(command: &str) -> Self {
        QgaError {
            class: ErrorClass::CommandNotFound,
            desc: format!("The command {command} has not been found"),
        }
    }

    /// `reason` is shown after a colon, as qemu-ga does for the frozen state.
    pub fn disabled(command: &str, reason: Option<&str>) -> Self {
        QgaError {
            class: ErrorClass::CommandNotFound,
            desc: match reason {
                Some(r) => format!("Command {command} has been disabled: {r}"),
                None => format!("Command {command} has been disabled"),
            },
        }
    }
}

/// What to send back for one request. `id` is `Some` when the request carried one,
/// `null` included.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    Return { value: Value, id: Option<Value> },
    Error { error: QgaError, id: Option<Value> },
}

impl Reply {
    /// The reply as one line, ending in `\n`, ASCII only.
    pub fn to_line(&self) -> String {
        let mut m = Map::new();
        let id = match self {
            Reply::Return { value, id } => {
                m.insert("return".into(), value.clone());
                id
            }
            Reply::Error { error, id } => {
                let mut e = Map::new();
                e.insert("class".into(), Value::String(error.class.as_str().into()));
                e.insert("desc".into(), Value::String(error.desc.clone()));
                m.insert("error".into(), Value::Object(e));
                id
            }
        };
        if let Some(id) = id {
            m.insert("id".into(), id.clone());
        }
        let mut line = String::new();
        encode::write_value(&mut line, &Value::Object(m));
        line.push('\n');
        line
    }
}

/// The agent's protocol state, shared by every connection on one port: the framer and
/// the pending `guest-sync-delimited` marker.
#[derive(Debug, Default)]
pub struct Session {
    pub framer: Framer,
    delimit_next: bool,
}

impl Session {
    pub fn new() -> Self {
        Self::default()
    }

    /// `guest-sync-delimited` was run: the next reply written starts with 0xFF.
    pub fn delimit_next_reply(&mut self) {
        self.delimit_next = true;
    }

    /// Encodes a reply, consuming a pending delimiter.
    pub fn encode(&mut self, reply: &Reply, out: &mut Vec<u8>) {
        if std::mem::take(&mut self.delimit_next) {
            out.push(SYNC_DELIMITER);
        }
        out.extend_from_slice(reply.to_line().as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reply_lines_are_ascii_and_echo_id() {
        let r = Reply::Return {
            value: json!({"host-name": "h\u{e9}"}),
            id: Some(Value::Null),
        };
        assert_eq!(
            r.to_line(),
            "{\"return\": {\"host-name\": \"h\\u00E9\"}, \"id\": null}\n"
        );
        let e = Reply::Error {
            error: QgaError::not_found("x"),
            id: None,
        };
        assert_eq!(
            e.to_line(),
            "{\"error\": {\"class\": \"CommandNotFound\", \"desc\": \"The command x has not been found\"}}\n"
        );
    }

    #[test]
    fn delimiter_precedes_only_the_next_reply() {
        let mut s = Session::new();
        let r = Reply::Return {
            value: json!(5),
            id: None,
        };
        let mut out = Vec::new();
        s.delimit_next_reply();
        s.encode(&r, &mut out);
        s.encode(&r, &mut out);
        assert_eq!(out, b"\xff{\"return\": 5}\n{\"return\": 5}\n");
    }
}
