//! The nixseed control channel (`org.nixseed.channel.0`): frames and messages between
//! `seedctl` on the host and the agent in the guest. A frame is a 4-byte big-endian
//! length and one JSON object carrying the protocol version `v`. The host pushes an
//! identity as a [`Bundle`] of NoCloud seed files, so a pushed identity goes through
//! exactly the code path of a seed ISO. A request may carry an `id`, which its reply
//! echoes: on a virtio-serial port the stream outlives each host connection, so a reply
//! meant for an earlier client can reach the next one, which tells it apart by its `id`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::manifest::sha256_hex;
use crate::seed::SeedFiles;

pub const PROTOCOL_VERSION: u32 = 1;
/// The largest frame accepted; a bundle is a few KiB.
pub const MAX_FRAME: usize = 1 << 20;
/// The only file names a bundle may carry: no path ever comes from the host.
pub const BUNDLE_FILES: &[&str] = crate::nocloud::SEED_FILES;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BundleFile {
    pub sha256: String,
    /// Base64.
    pub data: String,
}

/// An identity as seed files, with a digest per file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bundle {
    /// The machine name on the host, for logs on both sides.
    pub machine: String,
    pub files: BTreeMap<String, BundleFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case")]
pub enum Message {
    /// Guest → host at boot, repeated until answered: who am I, what do I have.
    Hello {
        product_uuid: Option<String>,
        generation: Option<u64>,
        instance_id: Option<String>,
    },
    /// Host → guest: apply this identity (an answer to `hello`, or a live push).
    Push { bundle: Bundle },
    /// Host → guest: this machine is not mine to provision.
    Refuse { reason: String },
    /// Host → guest: report the identity.
    Status,
    /// Host → guest: make the previous generation current again.
    Rollback,
    /// Guest → host: the answer to `status`.
    StatusReply {
        generation: Option<u64>,
        instance_id: Option<String>,
        product_uuid: Option<String>,
        /// Relative file name → sha256, from the manifest.
        files: BTreeMap<String, String>,
        /// The guest's NICs, name → MAC: the host renders the network files for them and
        /// compares those too. Absent from agents that do not report them.
        #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
        links: BTreeMap<String, String>,
        /// The VM's own DMI product_uuid now (`product_uuid` is the one recorded when the
        /// generation was written): a disk copied into another VM shows a different one.
        /// Absent from older agents.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        vm_product_uuid: Option<String>,
        /// Why the current generation is not what the running system uses (its binds over
        /// `/etc` or a reload failed); the next push or rollback tries again. Absent when
        /// it is applied, and from older agents.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        unapplied: Option<String>,
    },
    /// Guest → host: the answer to `push` and `rollback`.
    Applied {
        decision: String,
        generation: Option<u64>,
        changed: Vec<String>,
        /// What only takes effect after a reboot (machine-id).
        reboot_required: Vec<String>,
        /// Services reloaded live.
        reloaded: Vec<String>,
        /// What was to be told and did not take the change (hostname, sshd,
        /// systemd-networkd, nftables), each as "what: why": an sshd whose restart job
        /// failed or that is not running after it, a networkd that cannot be reached.
        /// Absent from older agents.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        failed: Vec<String>,
    },
    /// Either side: the request could not be served.
    Error { message: String },
}

impl Message {
    /// The message type as the protocol spells it, for logs and errors.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello { .. } => "hello",
            Message::Push { .. } => "push",
            Message::Refuse { .. } => "refuse",
            Message::Status => "status",
            Message::Rollback => "rollback",
            Message::StatusReply { .. } => "status-reply",
            Message::Applied { .. } => "applied",
            Message::Error { .. } => "error",
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Envelope {
    v: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    id: Option<u64>,
    #[serde(flatten)]
    message: Message,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("control channel: frame of {0} bytes exceeds the {MAX_FRAME} byte limit{hint}", hint = json_hint(*.0))]
    Oversized(usize),
    #[error("control channel: malformed frame: {0}")]
    Malformed(String),
    #[error(
        "control channel: protocol version {0} is not supported (this side speaks {PROTOCOL_VERSION})"
    )]
    Version(u64),
    #[error("control channel: bundle for {machine}: {detail}")]
    Bundle { machine: String, detail: String },
}

/// A length whose four bytes are JSON text (`{"re`, `{"er`) came from a guest agent's
/// port, not the control channel: a slip of `--socket` that is easier named than read.
fn json_hint(len: usize) -> &'static str {
    let bytes = u32::try_from(len).unwrap_or(0).to_be_bytes();
    if bytes[0] == b'{'
        && bytes[1..]
            .iter()
            .all(|b| b.is_ascii_graphic() || *b == b' ')
    {
        " (its first bytes are JSON text: is this the guest agent's socket, not the control channel's?)"
    } else {
        ""
    }
}

pub fn encode(message: &Message) -> Vec<u8> {
    encode_with_id(message, None)
}

/// A frame carrying a request `id`, or a reply echoing one.
pub fn encode_with_id(message: &Message, id: Option<u64>) -> Vec<u8> {
    let body = serde_json::to_vec(&Envelope {
        v: PROTOCOL_VERSION,
        id,
        message: message.clone(),
    })
    .unwrap_or_default();
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend(body);
    out
}

/// The buffer a decoder keeps between requests; a larger one, grown for a large push,
/// is given back once the push is read.
const IDLE_BUFFER: usize = 64 * 1024;

/// A streaming decoder: feed bytes as they arrive, take whole messages out.
#[derive(Debug, Default)]
pub struct Decoder {
    buf: Vec<u8>,
    /// Bytes of an oversized frame still to arrive, dropped as they come.
    skip: usize,
    /// The `id` of the last frame refused after its JSON was read (a wrong version, an
    /// unknown message), so that the error answering it names the request.
    refused_id: Option<u64>,
}

impl Decoder {
    pub fn push(&mut self, bytes: &[u8]) {
        let dropped = self.skip.min(bytes.len());
        self.skip -= dropped;
        self.buf.extend_from_slice(&bytes[dropped..]);
    }

    /// The next whole message, `Ok(None)` while a frame is still incomplete.
    pub fn next_message(&mut self) -> Result<Option<Message>, FrameError> {
        Ok(self.next_frame()?.map(|(message, _)| message))
    }

    /// The next whole message with its request `id`. A malformed frame is dropped whole.
    /// An oversized one is dropped as its bytes arrive, so the rest of it is not read as
    /// frames of its own; closing the connection (a fresh decoder) ends that.
    pub fn next_frame(&mut self) -> Result<Option<(Message, Option<u64>)>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            let have = self.buf.len() - 4;
            if have >= len {
                self.buf.drain(..4 + len);
            } else {
                self.skip = len - have;
                self.buf.clear();
            }
            return Err(FrameError::Oversized(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let body: Vec<u8> = self.buf.drain(..4 + len).skip(4).collect();
        // A large push leaves no large buffer behind in an agent that idles for months.
        if self.buf.capacity() > IDLE_BUFFER && self.buf.len() <= IDLE_BUFFER {
            self.buf.shrink_to(IDLE_BUFFER);
        }
        let value: serde_json::Value =
            serde_json::from_slice(&body).map_err(|e| FrameError::Malformed(e.to_string()))?;
        self.refused_id = value.get("id").and_then(serde_json::Value::as_u64);
        let v = value.get("v").and_then(|v| v.as_u64()).unwrap_or(0);
        if v != u64::from(PROTOCOL_VERSION) {
            return Err(FrameError::Version(v));
        }
        let env: Envelope =
            serde_json::from_value(value).map_err(|e| FrameError::Malformed(e.to_string()))?;
        self.refused_id = None;
        Ok(Some((env.message, env.id)))
    }

    /// The `id` of the frame the last error refused, when its JSON carried one.
    pub fn refused_id(&mut self) -> Option<u64> {
        self.refused_id.take()
    }
}

impl Bundle {
    pub fn from_files(machine: &str, files: &SeedFiles) -> Bundle {
        Bundle {
            machine: machine.to_string(),
            files: files
                .0
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        BundleFile {
                            sha256: sha256_hex(v),
                            data: base64_encode(v),
                        },
                    )
                })
                .collect(),
        }
    }

    /// Decodes and verifies every file against its digest; only NoCloud names are allowed.
    pub fn verify(&self) -> Result<SeedFiles, FrameError> {
        let err = |detail: String| FrameError::Bundle {
            machine: self.machine.clone(),
            detail,
        };
        let mut out = BTreeMap::new();
        for (name, f) in &self.files {
            if !BUNDLE_FILES.contains(&name.as_str()) {
                return Err(err(format!(
                    "file name {name:?} is not a NoCloud seed file"
                )));
            }
            let data = crate::credentials::base64_decode(&f.data)
                .ok_or_else(|| err(format!("{name}: base64 is corrupt")))?;
            let found = sha256_hex(&data);
            if found != f.sha256 {
                return Err(err(format!(
                    "{name}: sha256 {found} does not match the bundle's {}",
                    f.sha256
                )));
            }
            out.insert(name.clone(), data);
        }
        for required in ["meta-data", "user-data"] {
            if !out.contains_key(required) {
                return Err(err(format!("{required} is missing")));
            }
        }
        Ok(SeedFiles(out))
    }
}

pub fn base64_encode(bytes: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> SeedFiles {
        SeedFiles(
            [
                ("meta-data", "instance-id: a\n"),
                ("user-data", "#cloud-config\nhostname: x\n"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.as_bytes().to_vec()))
            .collect(),
        )
    }

    #[test]
    fn round_trip_split_across_reads() {
        let msg = Message::Push {
            bundle: Bundle::from_files("web1", &files()),
        };
        let bytes = [encode(&msg), encode(&Message::Status)].concat();
        let mut d = Decoder::default();
        let mut got = Vec::new();
        for b in bytes.chunks(3) {
            d.push(b);
            while let Some(m) = d.next_message().unwrap() {
                got.push(m);
            }
        }
        assert_eq!(got, vec![msg.clone(), Message::Status]);
        let Message::Push { bundle } = &got[0] else {
            panic!()
        };
        assert_eq!(bundle.verify().unwrap(), files());
    }

    #[test]
    fn truncated_frame_waits_oversized_is_refused() {
        let mut d = Decoder::default();
        let bytes = encode(&Message::Status);
        d.push(&bytes[..bytes.len() - 1]);
        assert_eq!(d.next_message(), Ok(None));
        let mut d = Decoder::default();
        d.push(&(MAX_FRAME as u32 + 1).to_be_bytes());
        assert_eq!(d.next_message(), Err(FrameError::Oversized(MAX_FRAME + 1)));
        // The rest of the oversized frame, however it arrives, is dropped, not read as
        // frames of its own; what follows it is read.
        let rest = vec![0x41u8; MAX_FRAME + 1];
        d.push(&rest[..5000]);
        assert_eq!(d.next_message(), Ok(None));
        let mut tail = rest[5000..].to_vec();
        tail.extend(encode(&Message::Rollback));
        d.push(&tail);
        assert_eq!(d.next_message(), Ok(Some(Message::Rollback)));
    }

    #[test]
    fn a_request_id_is_carried_and_optional() {
        let mut d = Decoder::default();
        d.push(&encode_with_id(&Message::Status, Some(7)));
        d.push(&encode(&Message::Rollback));
        assert_eq!(d.next_frame(), Ok(Some((Message::Status, Some(7)))));
        assert_eq!(d.next_frame(), Ok(Some((Message::Rollback, None))));
    }

    #[test]
    fn wrong_version_and_garbage_are_errors() {
        let body = br#"{"v":2,"type":"status"}"#;
        let mut d = Decoder::default();
        d.push(&(body.len() as u32).to_be_bytes());
        d.push(body);
        assert_eq!(d.next_message(), Err(FrameError::Version(2)));
        // 2^32 + 1 is not version 1.
        let body = br#"{"v":4294967297,"type":"status"}"#;
        d.push(&(body.len() as u32).to_be_bytes());
        d.push(body);
        assert_eq!(d.next_message(), Err(FrameError::Version(4294967297)));
        let mut d = Decoder::default();
        d.push(&[0, 0, 0, 3, b'x', b'y', b'z']);
        assert!(matches!(d.next_message(), Err(FrameError::Malformed(_))));
        assert_eq!(d.refused_id(), None);
    }

    /// A request refused after its JSON was read is answered under its own id, so the
    /// host does not take the error for an answer to something else.
    #[test]
    fn a_refused_frame_keeps_its_id_for_the_error() {
        let mut d = Decoder::default();
        for body in [
            &br#"{"v":1,"id":5,"type":"reboot"}"#[..],
            br#"{"v":9,"id":6,"type":"status"}"#,
            br#"not json"#,
        ] {
            d.push(&(body.len() as u32).to_be_bytes());
            d.push(body);
        }
        assert!(matches!(d.next_frame(), Err(FrameError::Malformed(_))));
        assert_eq!(d.refused_id(), Some(5));
        assert_eq!(d.next_frame(), Err(FrameError::Version(9)));
        assert_eq!(d.refused_id(), Some(6));
        assert!(matches!(d.next_frame(), Err(FrameError::Malformed(_))));
        assert_eq!(d.refused_id(), None);
    }

    /// A guest agent's reply read as a frame is named for what it likely is.
    #[test]
    fn a_guest_agent_reply_read_as_a_frame_says_so() {
        let mut d = Decoder::default();
        d.push(br#"{"return": {}}"#);
        let e = d.next_message().unwrap_err().to_string();
        assert!(e.contains("is this the guest agent's socket"), "{e}");
        let mut d = Decoder::default();
        d.push(&[0x7f, 0, 0, 0, 0]);
        let e = d.next_message().unwrap_err().to_string();
        assert!(!e.contains("guest agent"), "{e}");
    }

    /// The agent's memory after a large push goes back to what it idles with.
    #[test]
    fn a_large_frame_leaves_no_large_buffer_behind() {
        let mut files = files();
        files.0.insert("user-data".into(), vec![b'#'; 600 * 1024]);
        let big = encode(&Message::Push {
            bundle: Bundle::from_files("web1", &files),
        });
        let mut d = Decoder::default();
        for chunk in big.chunks(4096) {
            d.push(chunk);
        }
        d.push(&encode(&Message::Status));
        assert!(matches!(d.next_message(), Ok(Some(Message::Push { .. }))));
        assert!(d.buf.capacity() <= IDLE_BUFFER, "{}", d.buf.capacity());
        assert_eq!(d.next_message(), Ok(Some(Message::Status)));
    }

    #[test]
    fn tampered_or_foreign_files_are_refused() {
        let mut b = Bundle::from_files("web1", &files());
        b.files.get_mut("user-data").unwrap().data =
            base64_encode(b"#cloud-config\nhostname: evil\n");
        assert!(
            b.verify()
                .unwrap_err()
                .to_string()
                .contains("user-data: sha256")
        );
        let mut b = Bundle::from_files("web1", &files());
        let f = b.files["meta-data"].clone();
        b.files.insert("../etc/shadow".into(), f);
        assert!(
            b.verify()
                .unwrap_err()
                .to_string()
                .contains("not a NoCloud seed file")
        );
    }

    #[test]
    fn base64_round_trip() {
        for s in ["", "a", "ab", "abc", "abcd", "hello world"] {
            let e = base64_encode(s.as_bytes());
            assert_eq!(crate::credentials::base64_decode(&e).unwrap(), s.as_bytes());
        }
        assert_eq!(base64_encode(b"hi"), "aGk=");
    }
}
