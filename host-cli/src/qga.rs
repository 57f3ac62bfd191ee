//! Guest-agent client over a unix socket (the host end of `org.qemu.guest_agent.0`).
//! It resynchronises with `guest-sync-delimited` before each session: send 0xFF to reset
//! the agent's parser, send the sync with a random id, skip everything up to the 0xFF
//! the agent puts before its reply, and accept only the reply carrying that id. Stale
//! replies left over from an earlier client are skipped the same way.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde_json::{Value, json};

pub struct QgaClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: PathBuf,
    timeout: Duration,
    /// When the exchange under way (a sync, a command) must have its answer: however many
    /// stale or foreign replies the agent sends meanwhile, no exchange waits longer than
    /// `timeout`.
    deadline: Instant,
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

impl QgaClient {
    pub fn connect(path: &Path, timeout: Duration) -> Result<QgaClient> {
        let s = UnixStream::connect(path).with_context(|| {
            format!(
                "connecting to the guest-agent socket {}; is the machine running?",
                path.display()
            )
        })?;
        s.set_read_timeout(Some(timeout))
            .with_context(|| format!("configuring {}", path.display()))?;
        s.set_write_timeout(Some(timeout))
            .with_context(|| format!("configuring {}", path.display()))?;
        let writer = s
            .try_clone()
            .with_context(|| format!("configuring {}", path.display()))?;
        Ok(QgaClient {
            reader: BufReader::new(s),
            writer,
            path: path.to_owned(),
            timeout,
            deadline: Instant::now() + timeout,
        })
    }

    /// Starts an exchange: its whole answer is due within the timeout.
    fn arm(&mut self) {
        self.deadline = Instant::now() + self.timeout;
    }

    /// Before a read: the time left until the deadline becomes the socket's read timeout,
    /// or, with none left, the exchange ends as unanswered.
    fn time_left(&mut self, what: &str) -> Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(self.no_answer(what));
        }
        self.reader
            .get_ref()
            .set_read_timeout(Some(left))
            .with_context(|| format!("configuring {}", self.path.display()))
    }

    fn no_answer(&self, what: &str) -> anyhow::Error {
        anyhow!(
            "no answer to {what} from the guest agent at {} within {} s; is nixseed-agent (or qemu-ga) running in the guest?",
            self.path.display(),
            self.timeout.as_secs_f32()
        )
    }

    fn send(&mut self, req: &Value) -> Result<()> {
        self.writer
            .write_all(req.to_string().as_bytes())
            .with_context(|| format!("writing to the guest-agent socket {}", self.path.display()))
    }

    /// Read one JSON value; None on end of stream.
    fn read_value(&mut self, what: &str) -> Result<Option<Value>> {
        self.time_left(what)?;
        let timed = Timed {
            reader: &mut self.reader,
            deadline: self.deadline,
        };
        let mut de = serde_json::Deserializer::from_reader(timed).into_iter::<Value>();
        match de.next() {
            None => Ok(None),
            Some(Ok(v)) => Ok(Some(v)),
            Some(Err(e)) if e.is_io() => {
                let io: std::io::Error = e.into();
                if is_timeout(&io) {
                    Err(self.no_answer(what))
                } else {
                    Err(io).context(what.to_owned())
                }
            }
            Some(Err(e)) => Err(anyhow!(
                "guest agent at {} sent malformed JSON in reply to {what}: {e}",
                self.path.display()
            )),
        }
    }

    /// `guest-sync-delimited` handshake.
    pub fn sync(&mut self) -> Result<()> {
        self.arm();
        let mut idb = [0u8; 4];
        getrandom::getrandom(&mut idb).map_err(|e| anyhow!("reading random bytes: {e}"))?;
        let id = i64::from(u32::from_le_bytes(idb) & 0x7fff_ffff);
        self.writer
            .write_all(&[0xff])
            .with_context(|| format!("writing to {}", self.path.display()))?;
        self.send(&json!({ "execute": "guest-sync-delimited", "arguments": { "id": id } }))?;
        loop {
            // Skip to the delimiter, within the deadline however the bytes come.
            loop {
                self.time_left("guest-sync-delimited")?;
                let buf = match self.reader.fill_buf() {
                    Ok([]) => bail!(
                        "the guest agent at {} closed the connection during guest-sync-delimited",
                        self.path.display()
                    ),
                    Ok(buf) => buf,
                    Err(e) if is_timeout(&e) => {
                        return Err(self.no_answer("guest-sync-delimited"));
                    }
                    Err(e) => {
                        return Err(e)
                            .with_context(|| format!("reading from {}", self.path.display()));
                    }
                };
                match buf.iter().position(|&b| b == 0xff) {
                    Some(i) => {
                        self.reader.consume(i + 1);
                        break;
                    }
                    None => {
                        let n = buf.len();
                        self.reader.consume(n);
                    }
                }
            }
            match self.read_value("guest-sync-delimited")? {
                Some(v) if v.get("return").and_then(Value::as_i64) == Some(id) => return Ok(()),
                Some(_) => continue,
                None => bail!(
                    "the guest agent at {} closed the connection during guest-sync-delimited",
                    self.path.display()
                ),
            }
        }
    }

    /// Run one command and return its `return` value, or the agent's error.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value> {
        self.arm();
        let mut req = json!({ "execute": command });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        self.send(&req)?;
        let v = self.read_value(command)?.ok_or_else(|| {
            anyhow!(
                "the guest agent at {} closed the connection before answering {command}",
                self.path.display()
            )
        })?;
        reply(command, v)
    }

    /// A command the agent answers only with silence when it succeeds (guest-shutdown).
    pub fn execute_no_reply(&mut self, command: &str, arguments: Option<Value>) -> Result<()> {
        self.arm();
        let mut req = json!({ "execute": command });
        if let Some(a) = arguments {
            req["arguments"] = a;
        }
        self.send(&req)?;
        // Look without consuming: an answer (a refusal) must be parsed whole. The newline
        // after the sync reply may still be buffered; it is not an answer.
        loop {
            if self.time_left(command).is_err() {
                return Ok(());
            }
            let blank = match self.reader.fill_buf() {
                Ok([]) => return Ok(()),
                Ok(buf) => buf.iter().take_while(|b| b.is_ascii_whitespace()).count(),
                Err(e) if is_timeout(&e) => return Ok(()),
                Err(_) => return Ok(()),
            };
            if blank == 0 {
                break;
            }
            self.reader.consume(blank);
        }
        match self.read_value(command)? {
            Some(v) => reply(command, v).map(|_| ()),
            None => Ok(()),
        }
    }
}

/// The client's reader for one JSON value: each time its buffer runs dry, the socket may
/// wait only for what is left of the exchange's time, so a reply that trickles in byte
/// by byte ends at the deadline too.
struct Timed<'a> {
    reader: &'a mut BufReader<UnixStream>,
    deadline: Instant,
}

impl std::io::Read for Timed<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.reader.buffer().is_empty() {
            let left = self.deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(std::io::ErrorKind::TimedOut.into());
            }
            self.reader.get_ref().set_read_timeout(Some(left))?;
        }
        self.reader.read(buf)
    }
}

/// `{"return": X}` gives X; `{"error": {"class", "desc"}}` becomes an error naming both.
pub fn reply(command: &str, v: Value) -> Result<Value> {
    if let Some(e) = v.get("error") {
        let class = e
            .get("class")
            .and_then(Value::as_str)
            .unwrap_or("GenericError");
        let desc = e.get("desc").and_then(Value::as_str).unwrap_or("");
        bail!("guest agent refused {command}: {class}: {desc}");
    }
    Ok(v.get("return").cloned().unwrap_or(Value::Null))
}
