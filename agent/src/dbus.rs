//! A minimal D-Bus client: one method call on the system bus, waiting for its reply.
//! The agent makes four calls in all (logind PowerOff/Halt/Reboot/Suspend, systemd
//! TryRestartUnit, networkd Reload); a full D-Bus library costs more than the rest of the
//! guest agent together, and the guest binary has a 2.5 MiB budget (docs/benchmarks.md).
//! Supported: EXTERNAL authentication, method calls with `b`/`s` arguments, method
//! returns and errors in either byte order.

use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const TIMEOUT: Duration = Duration::from_secs(25);

#[derive(Debug, Clone, Copy)]
pub enum Arg<'a> {
    Bool(bool),
    Str(&'a str),
}

#[derive(Debug, thiserror::Error)]
pub enum DbusError {
    #[error("cannot reach the D-Bus system bus at {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("D-Bus: {0}")]
    Protocol(String),
    #[error("{name}: {message}")]
    Remote { name: String, message: String },
    #[error("D-Bus: no reply within {0:?}")]
    Timeout(Duration),
}

fn system_bus_path() -> PathBuf {
    std::env::var("DBUS_SYSTEM_BUS_ADDRESS")
        .ok()
        .and_then(|a| {
            a.split(';').find_map(|e| {
                e.strip_prefix("unix:path=")
                    .map(|p| p.split(',').next().unwrap_or(p).to_string())
            })
        })
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/run/dbus/system_bus_socket"))
}

/// Calls `member` on the system bus and waits for the reply (its body is not read).
pub async fn call(
    dest: &str,
    path: &str,
    iface: &str,
    member: &str,
    args: &[Arg<'_>],
) -> Result<(), DbusError> {
    call_at(&system_bus_path(), dest, path, iface, member, args).await
}

pub async fn call_at(
    bus: &std::path::Path,
    dest: &str,
    path: &str,
    iface: &str,
    member: &str,
    args: &[Arg<'_>],
) -> Result<(), DbusError> {
    tokio::time::timeout(TIMEOUT, async {
        let stream = UnixStream::connect(bus)
            .await
            .map_err(|source| DbusError::Connect {
                path: bus.display().to_string(),
                source,
            })?;
        let mut conn = BufReader::new(stream);
        authenticate(&mut conn).await?;
        let io = |e: std::io::Error| DbusError::Protocol(e.to_string());
        let hello = method_call(
            1,
            "org.freedesktop.DBus",
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "Hello",
            &[],
        );
        let call = method_call(2, dest, path, iface, member, args);
        conn.get_mut()
            .write_all(&[hello, call].concat())
            .await
            .map_err(io)?;
        loop {
            let reply = read_message(&mut conn).await?;
            match (reply.kind, reply.reply_serial) {
                (2, Some(2)) => return Ok(()),
                (3, Some(2)) => {
                    return Err(DbusError::Remote {
                        name: reply.error_name.unwrap_or_else(|| "error".into()),
                        message: reply.error_message.unwrap_or_default(),
                    });
                }
                (3, Some(1)) => return Err(DbusError::Protocol("the bus refused Hello".into())),
                _ => continue,
            }
        }
    })
    .await
    .map_err(|_| DbusError::Timeout(TIMEOUT))?
}

async fn authenticate(conn: &mut BufReader<UnixStream>) -> Result<(), DbusError> {
    let io = |e: std::io::Error| DbusError::Protocol(format!("authentication: {e}"));
    let uid = rustix::process::geteuid().as_raw().to_string();
    let hex: String = uid.bytes().map(|b| format!("{b:02x}")).collect();
    conn.get_mut()
        .write_all(format!("\0AUTH EXTERNAL {hex}\r\n").as_bytes())
        .await
        .map_err(io)?;
    let mut line = String::new();
    conn.read_line(&mut line).await.map_err(io)?;
    if !line.starts_with("OK ") {
        return Err(DbusError::Protocol(format!(
            "the bus did not accept EXTERNAL authentication: {}",
            line.trim()
        )));
    }
    conn.get_mut().write_all(b"BEGIN\r\n").await.map_err(io)?;
    Ok(())
}

fn pad(buf: &mut Vec<u8>, align: usize) {
    while !buf.len().is_multiple_of(align) {
        buf.push(0);
    }
}

fn put_str(buf: &mut Vec<u8>, s: &str) {
    pad(buf, 4);
    buf.extend((s.len() as u32).to_le_bytes());
    buf.extend(s.as_bytes());
    buf.push(0);
}

/// One header field: code, variant signature, value.
fn put_field(buf: &mut Vec<u8>, code: u8, sig: u8, value: &str) {
    pad(buf, 8);
    buf.extend([code, 1, sig, 0]);
    if sig == b'g' {
        buf.push(value.len() as u8);
        buf.extend(value.as_bytes());
        buf.push(0);
    } else {
        put_str(buf, value);
    }
}

fn method_call(
    serial: u32,
    dest: &str,
    path: &str,
    iface: &str,
    member: &str,
    args: &[Arg<'_>],
) -> Vec<u8> {
    let mut body = Vec::new();
    let mut sig = String::new();
    for a in args {
        match a {
            Arg::Bool(b) => {
                pad(&mut body, 4);
                body.extend(u32::from(*b).to_le_bytes());
                sig.push('b');
            }
            Arg::Str(s) => {
                put_str(&mut body, s);
                sig.push('s');
            }
        }
    }
    let mut fields = Vec::new();
    put_field(&mut fields, 1, b'o', path);
    put_field(&mut fields, 2, b's', iface);
    put_field(&mut fields, 3, b's', member);
    put_field(&mut fields, 6, b's', dest);
    if !sig.is_empty() {
        put_field(&mut fields, 8, b'g', &sig);
    }
    let mut msg = vec![b'l', 1, 0, 1];
    msg.extend((body.len() as u32).to_le_bytes());
    msg.extend(serial.to_le_bytes());
    msg.extend((fields.len() as u32).to_le_bytes());
    msg.extend(fields);
    pad(&mut msg, 8);
    msg.extend(body);
    msg
}

struct Incoming {
    kind: u8,
    reply_serial: Option<u32>,
    error_name: Option<String>,
    error_message: Option<String>,
}

/// A cursor over a received message, honouring its byte order and alignment
/// (offsets are from the start of the message).
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    big: bool,
}

impl Cursor<'_> {
    fn align(&mut self, a: usize) {
        self.pos = self.pos.div_ceil(a) * a;
    }
    fn u8(&mut self) -> Option<u8> {
        let b = *self.buf.get(self.pos)?;
        self.pos += 1;
        Some(b)
    }
    fn u32(&mut self) -> Option<u32> {
        self.align(4);
        let b: [u8; 4] = self.buf.get(self.pos..self.pos + 4)?.try_into().ok()?;
        self.pos += 4;
        Some(if self.big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        })
    }
    fn string(&mut self) -> Option<String> {
        let len = self.u32()? as usize;
        let s = self.buf.get(self.pos..self.pos + len)?;
        self.pos += len + 1;
        Some(String::from_utf8_lossy(s).into_owned())
    }
    fn signature(&mut self) -> Option<String> {
        let len = self.u8()? as usize;
        let s = self.buf.get(self.pos..self.pos + len)?;
        self.pos += len + 1;
        Some(String::from_utf8_lossy(s).into_owned())
    }
}

/// A message larger than this is not something the agent asked for.
const MAX_MESSAGE: usize = 1 << 20;

async fn read_message(conn: &mut BufReader<UnixStream>) -> Result<Incoming, DbusError> {
    let io = |e: std::io::Error| DbusError::Protocol(format!("reading a reply: {e}"));
    let mut head = [0u8; 16];
    conn.read_exact(&mut head).await.map_err(io)?;
    let big = match head[0] {
        b'l' => false,
        b'B' => true,
        other => {
            return Err(DbusError::Protocol(format!(
                "bad byte-order mark {other:#x}"
            )));
        }
    };
    let word = |b: &[u8]| {
        let b: [u8; 4] = [b[0], b[1], b[2], b[3]];
        (if big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }) as usize
    };
    let body_len = word(&head[4..8]);
    let fields_len = word(&head[12..16]);
    let total = (16 + fields_len).div_ceil(8) * 8 + body_len;
    if total > MAX_MESSAGE {
        return Err(DbusError::Protocol(format!(
            "a {total} byte message is too large"
        )));
    }
    let mut msg = head.to_vec();
    msg.resize(total, 0);
    conn.read_exact(&mut msg[16..]).await.map_err(io)?;
    let mut c = Cursor {
        buf: &msg,
        pos: 16,
        big,
    };
    let mut out = Incoming {
        kind: head[1],
        reply_serial: None,
        error_name: None,
        error_message: None,
    };
    let mut body_sig = String::new();
    let fields_end = 16 + fields_len;
    while c.pos < fields_end {
        c.align(8);
        if c.pos >= fields_end {
            break;
        }
        let bad = || DbusError::Protocol("malformed header field".into());
        let code = c.u8().ok_or_else(bad)?;
        let sig = c.signature().ok_or_else(bad)?;
        match sig.as_str() {
            "u" => {
                let v = c.u32().ok_or_else(bad)?;
                if code == 5 {
                    out.reply_serial = Some(v);
                }
            }
            "s" | "o" => {
                let v = c.string().ok_or_else(bad)?;
                if code == 4 {
                    out.error_name = Some(v);
                }
            }
            "g" => {
                let v = c.signature().ok_or_else(bad)?;
                if code == 8 {
                    body_sig = v;
                }
            }
            other => {
                return Err(DbusError::Protocol(format!(
                    "unexpected header field type {other}"
                )));
            }
        }
    }
    if out.kind == 3 && body_sig.starts_with('s') {
        c.pos = fields_end.div_ceil(8) * 8;
        out.error_message = c.string();
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A private bus from the real dbus-daemon (session configuration), so the client is
    /// checked against the reference implementation.
    struct Bus {
        child: std::process::Child,
        path: PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Drop for Bus {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn bus() -> Bus {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bus");
        let child = std::process::Command::new("dbus-daemon")
            .args(["--session", "--nofork", "--nopidfile"])
            .arg(format!("--address=unix:path={}", path.display()))
            .spawn()
            .expect("dbus-daemon (package dbus) is needed: cargo xtask deps installs it");
        for _ in 0..200 {
            if path.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Bus {
            child,
            path,
            _dir: dir,
        }
    }

    fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn calls_succeed_and_errors_carry_name_and_message() {
        let b = bus();
        rt().block_on(async {
            call_at(
                &b.path,
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "GetNameOwner",
                &[Arg::Str("org.freedesktop.DBus")],
            )
            .await
            .unwrap();
            call_at(
                &b.path,
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "ListNames",
                &[],
            )
            .await
            .unwrap();
            let e = call_at(
                &b.path,
                "org.freedesktop.DBus",
                "/org/freedesktop/DBus",
                "org.freedesktop.DBus",
                "NoSuchMethod",
                &[Arg::Bool(true)],
            )
            .await
            .unwrap_err();
            assert!(
                e.to_string()
                    .starts_with("org.freedesktop.DBus.Error.UnknownMethod: "),
                "{e}"
            );
            let e = call_at(
                &b.path,
                "org.freedesktop.login1",
                "/org/freedesktop/login1",
                "org.freedesktop.login1.Manager",
                "PowerOff",
                &[Arg::Bool(false)],
            )
            .await
            .unwrap_err();
            assert!(e.to_string().contains("org.freedesktop.login1"), "{e}");
        });
    }

    #[test]
    fn no_bus_is_a_clear_error() {
        let e = rt()
            .block_on(call_at(
                std::path::Path::new("/nonexistent/bus"),
                "a.b",
                "/",
                "a.b",
                "C",
                &[],
            ))
            .unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot reach the D-Bus system bus at /nonexistent/bus"),
            "{e}"
        );
    }
}
