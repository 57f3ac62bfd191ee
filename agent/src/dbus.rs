//! A minimal D-Bus client: one method call on the system bus, waiting for its reply, one
//! systemd job followed to its result, or a unit's state read as often as a watch needs,
//! on one connection. The agent makes few calls (logind
//! PowerOff/Halt/Reboot/Suspend; systemd ResetFailedUnit, (Try)RestartUnit, LoadUnit and
//! a unit's ActiveState, SubState, Type, MainPID and NRestarts; networkd Reload); a full
//! D-Bus library costs more than the rest of the guest agent together, and the guest
//! binary has a 2.5 MiB budget (docs/benchmarks.md). Supported: EXTERNAL authentication,
//! method calls with `b`/`s` arguments, method returns (object paths, string and `u32`
//! variants), errors and systemd's `JobRemoved` signal, in either byte order.

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
    #[error("cannot reach the D-Bus system bus at {path}: {cause}")]
    Connect { path: String, cause: std::io::Error },
    #[error("D-Bus: {0}")]
    Protocol(String),
    #[error("{name}: {message}")]
    Remote { name: String, message: String },
    #[error("D-Bus: did not finish within {0:?}")]
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
    call_reply_at(bus, dest, path, iface, member, args)
        .await
        .map(|_| ())
}

/// One call and its reply, whose body the caller reads.
async fn call_reply_at(
    bus: &std::path::Path,
    dest: &str,
    path: &str,
    iface: &str,
    member: &str,
    args: &[Arg<'_>],
) -> Result<Incoming, DbusError> {
    tokio::time::timeout(TIMEOUT, async {
        let mut conn = connect(bus).await?;
        let call = method_call(2, dest, path, iface, member, args);
        reply_on(&mut conn, 2, call).await
    })
    .await
    .map_err(|_| DbusError::Timeout(TIMEOUT))?
}

/// One method call (built by [`method_call`] with `serial`, above the Hello's 1) on an
/// open connection, and its reply.
async fn reply_on(
    conn: &mut BufReader<UnixStream>,
    serial: u32,
    call: Vec<u8>,
) -> Result<Incoming, DbusError> {
    send(conn, &[call]).await?;
    loop {
        let reply = read_message(conn).await?;
        match (reply.kind, reply.reply_serial) {
            (KIND_RETURN, Some(s)) if s == serial => return Ok(reply),
            (KIND_ERROR, Some(s)) if s == serial => return Err(reply.into_remote()),
            (KIND_ERROR, Some(1)) => return Err(hello_refused()),
            _ => continue,
        }
    }
}

const SYSTEMD: &str = "org.freedesktop.systemd1";
const SYSTEMD_PATH: &str = "/org/freedesktop/systemd1";
const SYSTEMD_MANAGER: &str = "org.freedesktop.systemd1.Manager";

/// Calls a method of systemd's manager that queues a job (`RestartUnit`,
/// `TryRestartUnit`, ...) and waits until the job is finished; returns the job's result
/// as systemd's `JobRemoved` signal gives it: `done`, or `failed`, `canceled`,
/// `timeout`, `dependency`, `skipped`, ... A queued job says nothing about whether the
/// unit came up; its result does.
pub async fn run_job(method: &str, args: &[Arg<'_>], wait: Duration) -> Result<String, DbusError> {
    run_job_at(&system_bus_path(), method, args, wait).await
}

pub async fn run_job_at(
    bus: &std::path::Path,
    method: &str,
    args: &[Arg<'_>],
    wait: Duration,
) -> Result<String, DbusError> {
    const JOB_CALL: u32 = 4;
    tokio::time::timeout(wait, async {
        let mut conn = connect(bus).await?;
        let rule = format!(
            "type='signal',sender='{SYSTEMD}',path='{SYSTEMD_PATH}',interface='{SYSTEMD_MANAGER}',member='JobRemoved'"
        );
        // The match and the subscription are in place before the job is queued, so its
        // JobRemoved cannot be missed (the bus handles one connection's messages in order).
        send(
            &mut conn,
            &[
                method_call(
                    2,
                    "org.freedesktop.DBus",
                    "/org/freedesktop/DBus",
                    "org.freedesktop.DBus",
                    "AddMatch",
                    &[Arg::Str(&rule)],
                ),
                method_call(3, SYSTEMD, SYSTEMD_PATH, SYSTEMD_MANAGER, "Subscribe", &[]),
                method_call(JOB_CALL, SYSTEMD, SYSTEMD_PATH, SYSTEMD_MANAGER, method, args),
            ],
        )
        .await?;
        // Our job once the reply names it, with the sender of that reply (systemd's unique
        // name): a JobRemoved from anyone else is not systemd's and is ignored.
        let mut job: Option<(String, Option<String>)> = None;
        // Jobs that ended before the reply naming ours was read: (sender, job, result).
        let mut ended: Vec<(Option<String>, String, String)> = Vec::new();
        loop {
            let m = read_message(&mut conn).await?;
            match (m.kind, m.reply_serial) {
                (KIND_ERROR, Some(1)) => return Err(hello_refused()),
                (KIND_ERROR, Some(2)) => {
                    return Err(DbusError::Protocol(format!(
                        "the bus refused the match for systemd's JobRemoved: {}",
                        m.into_remote()
                    )));
                }
                // systemd signals the end of a job to the client that queued it even
                // without a subscription.
                (KIND_ERROR, Some(3)) => {}
                (KIND_ERROR, Some(JOB_CALL)) => return Err(m.into_remote()),
                (KIND_RETURN, Some(JOB_CALL)) => {
                    let path = m.body_object_path().ok_or_else(|| {
                        DbusError::Protocol(format!("{method} did not answer with a job path"))
                    })?;
                    if let Some((_, _, result)) = ended
                        .iter()
                        .find(|(from, j, _)| *j == path && *from == m.sender)
                    {
                        return Ok(result.clone());
                    }
                    job = Some((path, m.sender));
                }
                (KIND_SIGNAL, _) if m.member.as_deref() == Some("JobRemoved") => {
                    let Some((path, result)) = m.job_removed() else {
                        continue;
                    };
                    match &job {
                        Some((ours, from)) if *ours == path && *from == m.sender => {
                            return Ok(result);
                        }
                        Some(_) => {}
                        None => ended.push((m.sender, path, result)),
                    }
                }
                _ => {}
            }
        }
    })
    .await
    .map_err(|_| DbusError::Timeout(wait))?
}

/// A unit's `ActiveState` (`active`, `inactive`, `failed`, `activating`, ...): a job
/// that ended `done` can still leave the unit down (a try-restart of a unit that was not
/// running, a start skipped by a condition).
pub async fn unit_active_state(unit: &str) -> Result<String, DbusError> {
    Ok(unit_state(unit).await?.active)
}

/// What systemd says of a unit after a job: its `ActiveState` and `SubState`, and for a
/// service its `Type`, `MainPID` and `NRestarts` (empty and 0 for other units). A
/// service of type `simple`, `exec` or `idle` is called started as soon as its process
/// runs, so whether it stays up shows only in later readings: the same main process, no
/// restart.
/// The readings are separate calls; the service's come first and the states last, so a
/// main process that exits in between shows in the states.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UnitState {
    pub active: String,
    pub sub: String,
    pub service_type: String,
    pub main_pid: u32,
    pub restarts: u32,
}

impl UnitState {
    /// `active`, or `reloading` (still serving).
    pub fn is_up(&self) -> bool {
        self.active == "active" || self.active == "reloading"
    }
}

pub async fn unit_state(unit: &str) -> Result<UnitState, DbusError> {
    unit_state_at(&system_bus_path(), unit).await
}

/// One reading on a connection of its own, all within [`TIMEOUT`].
pub async fn unit_state_at(bus: &std::path::Path, unit: &str) -> Result<UnitState, DbusError> {
    tokio::time::timeout(TIMEOUT, async {
        UnitReader::on(connect(bus).await?).reading(unit).await
    })
    .await
    .map_err(|_| DbusError::Timeout(TIMEOUT))?
}

/// Readings of units' states on one connection, for a watch that reads a unit again and
/// again (see [`UnitState`]). `LoadUnit`, not `GetUnit`: a unit systemd has unloaded
/// (stopped and not needed) is loaded again and reads `inactive`, and a unit with no
/// file reads `inactive` too. A reading that fails or times out may leave part of a
/// message unread, so after one the reader refuses to read again.
pub struct UnitReader {
    conn: BufReader<UnixStream>,
    /// The last serial used on the connection (1 is the Hello).
    serial: u32,
    broken: bool,
}

impl UnitReader {
    pub async fn open() -> Result<Self, DbusError> {
        Self::open_at(&system_bus_path()).await
    }

    pub async fn open_at(bus: &std::path::Path) -> Result<Self, DbusError> {
        tokio::time::timeout(TIMEOUT, connect(bus))
            .await
            .map_err(|_| DbusError::Timeout(TIMEOUT))?
            .map(Self::on)
    }

    fn on(conn: BufReader<UnixStream>) -> Self {
        Self {
            conn,
            serial: 1,
            broken: false,
        }
    }

    /// One call on the connection, and its reply.
    async fn ask(
        &mut self,
        path: &str,
        iface: &str,
        member: &str,
        args: &[Arg<'_>],
    ) -> Result<Incoming, DbusError> {
        self.serial += 1;
        let call = method_call(self.serial, SYSTEMD, path, iface, member, args);
        reply_on(&mut self.conn, self.serial, call).await
    }

    async fn property(
        &mut self,
        unit: &str,
        path: &str,
        iface: &str,
        name: &str,
    ) -> Result<Property, DbusError> {
        let reply = self
            .ask(
                path,
                "org.freedesktop.DBus.Properties",
                "Get",
                &[Arg::Str(iface), Arg::Str(name)],
            )
            .await?;
        reply
            .body_variant()
            .ok_or_else(|| DbusError::Protocol(format!("{unit}'s {name} is not a property value")))
    }

    /// Reads `unit`'s state within [`TIMEOUT`].
    pub async fn read(&mut self, unit: &str) -> Result<UnitState, DbusError> {
        if self.broken {
            return Err(DbusError::Protocol(format!(
                "reading {unit}'s state: the connection failed in an earlier reading"
            )));
        }
        let result = tokio::time::timeout(TIMEOUT, self.reading(unit))
            .await
            .unwrap_or(Err(DbusError::Timeout(TIMEOUT)));
        self.broken = result.is_err();
        result
    }

    async fn reading(&mut self, unit: &str) -> Result<UnitState, DbusError> {
        let reply = self
            .ask(SYSTEMD_PATH, SYSTEMD_MANAGER, "LoadUnit", &[Arg::Str(unit)])
            .await?;
        let path = reply.body_object_path().ok_or_else(|| {
            DbusError::Protocol(format!("LoadUnit {unit}: no unit path in the reply"))
        })?;
        let mut state = UnitState::default();
        if unit.ends_with(".service") {
            let service = "org.freedesktop.systemd1.Service";
            let mut get = async |name| self.property(unit, &path, service, name).await;
            state.service_type = get("Type").await?.string().unwrap_or_default();
            state.main_pid = get("MainPID").await?.u32().unwrap_or_default();
            state.restarts = get("NRestarts").await?.u32().unwrap_or_default();
        }
        let iface = "org.freedesktop.systemd1.Unit";
        state.active = self
            .property(unit, &path, iface, "ActiveState")
            .await?
            .string()
            .ok_or_else(|| DbusError::Protocol(format!("{unit}'s ActiveState is not a string")))?;
        state.sub = self
            .property(unit, &path, iface, "SubState")
            .await?
            .string()
            .unwrap_or_default();
        Ok(state)
    }
}

/// Connects, authenticates and says Hello (serial 1; the caller's serials start at 2).
async fn connect(bus: &std::path::Path) -> Result<BufReader<UnixStream>, DbusError> {
    let stream = UnixStream::connect(bus)
        .await
        .map_err(|cause| DbusError::Connect {
            path: bus.display().to_string(),
            cause,
        })?;
    let mut conn = BufReader::new(stream);
    authenticate(&mut conn).await?;
    let hello = method_call(
        1,
        "org.freedesktop.DBus",
        "/org/freedesktop/DBus",
        "org.freedesktop.DBus",
        "Hello",
        &[],
    );
    send(&mut conn, &[hello]).await?;
    Ok(conn)
}

fn hello_refused() -> DbusError {
    DbusError::Protocol("the bus refused Hello".into())
}

async fn send(conn: &mut BufReader<UnixStream>, msgs: &[Vec<u8>]) -> Result<(), DbusError> {
    conn.get_mut()
        .write_all(&msgs.concat())
        .await
        .map_err(|e| DbusError::Protocol(e.to_string()))
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
    frame(1, serial, &fields, &body)
}

/// A little-endian message of `kind` from its header fields and body.
fn frame(kind: u8, serial: u32, fields: &[u8], body: &[u8]) -> Vec<u8> {
    let mut msg = vec![b'l', kind, 0, 1];
    msg.extend((body.len() as u32).to_le_bytes());
    msg.extend(serial.to_le_bytes());
    msg.extend((fields.len() as u32).to_le_bytes());
    msg.extend(fields);
    pad(&mut msg, 8);
    msg.extend(body);
    msg
}

const KIND_RETURN: u8 = 2;
const KIND_ERROR: u8 = 3;
const KIND_SIGNAL: u8 = 4;

struct Incoming {
    kind: u8,
    #[cfg_attr(not(test), allow(dead_code))]
    serial: u32,
    sender: Option<String>,
    #[cfg_attr(not(test), allow(dead_code))]
    path: Option<String>,
    reply_serial: Option<u32>,
    error_name: Option<String>,
    member: Option<String>,
    body_sig: String,
    /// The whole message, and where its body starts (8-aligned).
    msg: Vec<u8>,
    body_at: usize,
    big: bool,
}

impl Incoming {
    fn body(&self) -> Cursor<'_> {
        Cursor {
            buf: &self.msg,
            pos: self.body_at,
            big: self.big,
        }
    }

    fn into_remote(self) -> DbusError {
        let message = if self.body_sig.starts_with('s') {
            self.body().string()
        } else {
            None
        };
        DbusError::Remote {
            name: self.error_name.unwrap_or_else(|| "error".into()),
            message: message.unwrap_or_default(),
        }
    }

    /// The body of a reply that is one object path (a queued job, a unit).
    fn body_object_path(&self) -> Option<String> {
        if self.body_sig != "o" {
            return None;
        }
        self.body().string()
    }

    /// The body of a reply that is one variant (a property): its value as a string or a
    /// `u32`, whichever its type is.
    fn body_variant(&self) -> Option<Property> {
        if self.body_sig != "v" {
            return None;
        }
        let mut c = self.body();
        match c.signature()?.as_str() {
            "s" => c.string().map(Property::Str),
            "u" => c.u32().map(Property::U32),
            _ => None,
        }
    }

    /// `JobRemoved(u id, o job, s unit, s result)`: the job's path and result.
    fn job_removed(&self) -> Option<(String, String)> {
        if self.body_sig != "uoss" {
            return None;
        }
        let mut c = self.body();
        c.u32()?;
        let job = c.string()?;
        c.string()?;
        Some((job, c.string()?))
    }
}

/// A property's value, of the two types the agent reads.
#[derive(Debug)]
enum Property {
    Str(String),
    U32(u32),
}

impl Property {
    fn string(self) -> Option<String> {
        match self {
            Property::Str(s) => Some(s),
            Property::U32(_) => None,
        }
    }

    fn u32(self) -> Option<u32> {
        match self {
            Property::U32(n) => Some(n),
            Property::Str(_) => None,
        }
    }
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
    let fields_end = 16 + fields_len;
    let mut out = Incoming {
        kind: head[1],
        serial: word(&head[8..12]) as u32,
        sender: None,
        path: None,
        reply_serial: None,
        error_name: None,
        member: None,
        body_sig: String::new(),
        msg: Vec::new(),
        body_at: fields_end.div_ceil(8) * 8,
        big,
    };
    let mut c = Cursor {
        buf: &msg,
        pos: 16,
        big,
    };
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
                match code {
                    1 => out.path = Some(v),
                    3 => out.member = Some(v),
                    7 => out.sender = Some(v),
                    4 => out.error_name = Some(v),
                    _ => {}
                }
            }
            "g" => {
                let v = c.signature().ok_or_else(bad)?;
                if code == 8 {
                    out.body_sig = v;
                }
            }
            other => {
                return Err(DbusError::Protocol(format!(
                    "unexpected header field type {other}"
                )));
            }
        }
    }
    out.msg = msg;
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

    /// A message from the fake below: `fields` as (code, type, value), a reply serial if
    /// any, and a body.
    fn fake_message(
        kind: u8,
        serial: u32,
        fields: &[(u8, u8, &str)],
        reply_to: Option<u32>,
        body: &[u8],
    ) -> Vec<u8> {
        let mut f = Vec::new();
        for (code, sig, value) in fields {
            put_field(&mut f, *code, *sig, value);
        }
        if let Some(r) = reply_to {
            pad(&mut f, 8);
            f.extend([5, 1, b'u', 0]);
            f.extend(r.to_le_bytes());
        }
        frame(kind, serial, &f, body)
    }

    fn job_removed(serial: u32, id: u32, job: &str, unit: &str, result: &str) -> Vec<u8> {
        let mut body = id.to_le_bytes().to_vec();
        put_str(&mut body, job);
        put_str(&mut body, unit);
        put_str(&mut body, result);
        fake_message(
            KIND_SIGNAL,
            serial,
            &[
                (1, b'o', SYSTEMD_PATH),
                (2, b's', SYSTEMD_MANAGER),
                (3, b's', "JobRemoved"),
                (8, b'g', "uoss"),
            ],
            None,
            &body,
        )
    }

    /// A fake of systemd's manager, on the real bus: it owns org.freedesktop.systemd1,
    /// answers `LoadUnit` and the properties `ActiveState` (`inactive` for units named
    /// `stopped`), `SubState` (`dead`, `listening` for sockets, `running`), `Type`,
    /// `MainPID` and `NRestarts`, and answers `RestartUnit` the way
    /// systemd does (a job path, then `JobRemoved` for
    /// another job and for this one). `ssh.service`'s job fails, `early.service`'s ends
    /// before the reply is sent, `hang.service`'s never ends, `missing.service` is no
    /// unit. A client's call whose serial is not above its last one gets no answer.
    async fn fake_systemd(bus: PathBuf, ready: tokio::sync::oneshot::Sender<()>) {
        let mut conn = connect(&bus).await.unwrap();
        let mut body = Vec::new();
        put_str(&mut body, SYSTEMD);
        pad(&mut body, 4);
        body.extend(4u32.to_le_bytes());
        let request = fake_message(
            1,
            2,
            &[
                (1, b'o', "/org/freedesktop/DBus"),
                (2, b's', "org.freedesktop.DBus"),
                (3, b's', "RequestName"),
                (6, b's', "org.freedesktop.DBus"),
                (8, b'g', "su"),
            ],
            None,
            &body,
        );
        send(&mut conn, &[request]).await.unwrap();
        while read_message(&mut conn).await.unwrap().reply_serial != Some(2) {}
        ready.send(()).unwrap();
        // Each client's last call serial: a call that does not raise it gets no answer
        // (the bus passes such calls on, so a client that reuses a serial is caught here).
        let mut last_call: std::collections::HashMap<String, u32> = Default::default();
        let mut serial = 10;
        let mut next = || {
            serial += 1;
            serial
        };
        loop {
            let Ok(call) = read_message(&mut conn).await else {
                return;
            };
            if call.kind != 1 {
                continue;
            }
            let to = call.sender.clone().unwrap_or_default();
            if last_call
                .insert(to.clone(), call.serial)
                .is_some_and(|l| l >= call.serial)
            {
                continue;
            }
            let reply = |serial: u32, sig: &str, body: &[u8]| {
                let mut fields = vec![(6, b's', to.as_str())];
                if !sig.is_empty() {
                    fields.push((8, b'g', sig));
                }
                fake_message(KIND_RETURN, serial, &fields, Some(call.serial), body)
            };
            let out = match call.member.as_deref() {
                Some("Subscribe") => vec![reply(next(), "", &[])],
                Some("LoadUnit") => {
                    let unit = call.body().string().unwrap();
                    let mut path = Vec::new();
                    put_str(
                        &mut path,
                        &format!("{SYSTEMD_PATH}/unit/{}", unit.replace('.', "_2e")),
                    );
                    vec![reply(next(), "o", &path)]
                }
                Some("Get") => {
                    let unit = call.path.clone().unwrap_or_default();
                    let mut body = call.body();
                    body.string().unwrap();
                    let mut value = Vec::new();
                    match body.string().unwrap().as_str() {
                        "ActiveState" if unit.contains("stopped") => {
                            value.extend([1, b's', 0]);
                            put_str(&mut value, "inactive");
                        }
                        "ActiveState" => {
                            value.extend([1, b's', 0]);
                            put_str(&mut value, "active");
                        }
                        "SubState" => {
                            value.extend([1, b's', 0]);
                            let sub = if unit.contains("stopped") {
                                "dead"
                            } else if unit.ends_with("socket") {
                                "listening"
                            } else {
                                "running"
                            };
                            put_str(&mut value, sub);
                        }
                        "Type" => {
                            value.extend([1, b's', 0]);
                            put_str(&mut value, "notify");
                        }
                        "MainPID" => value.extend([1, b'u', 0, 0, 42, 0, 0, 0]),
                        "NRestarts" => value.extend([1, b'u', 0, 0, 3, 0, 0, 0]),
                        _ => continue,
                    }
                    vec![reply(next(), "v", &value)]
                }
                Some("RestartUnit") => {
                    let unit = call.body().string().unwrap();
                    let job = format!("{SYSTEMD_PATH}/job/{}", call.serial + 100);
                    let mut path = Vec::new();
                    put_str(&mut path, &job);
                    let result = if unit == "ssh.service" {
                        "failed"
                    } else {
                        "done"
                    };
                    match unit.as_str() {
                        "missing.service" => {
                            let mut text = Vec::new();
                            put_str(&mut text, "Unit missing.service not found.");
                            vec![fake_message(
                                KIND_ERROR,
                                next(),
                                &[
                                    (4, b's', "org.freedesktop.systemd1.NoSuchUnit"),
                                    (6, b's', &to),
                                    (8, b'g', "s"),
                                ],
                                Some(call.serial),
                                &text,
                            )]
                        }
                        "hang.service" => vec![reply(next(), "o", &path)],
                        "early.service" => vec![
                            job_removed(next(), 1, &job, &unit, result),
                            reply(next(), "o", &path),
                        ],
                        _ => vec![
                            reply(next(), "o", &path),
                            job_removed(
                                next(),
                                2,
                                &format!("{SYSTEMD_PATH}/job/1"),
                                "other.service",
                                "failed",
                            ),
                            job_removed(next(), 3, &job, &unit, result),
                        ],
                    }
                }
                _ => continue,
            };
            send(&mut conn, &out).await.unwrap();
        }
    }

    #[test]
    fn a_job_is_followed_to_its_result() {
        let b = bus();
        rt().block_on(async {
            let restart = |unit: &'static str, wait: u64| {
                let path = b.path.clone();
                async move {
                    run_job_at(
                        &path,
                        "RestartUnit",
                        &[Arg::Str(unit), Arg::Str("replace")],
                        Duration::from_millis(wait),
                    )
                    .await
                }
            };
            // Nobody owns systemd's name yet: the bus answers the subscription with an
            // error (no such service, or its activation failed), which is returned.
            let e = restart("web.service", 5000).await.unwrap_err();
            assert!(
                matches!(&e, DbusError::Remote { name, .. } if name.starts_with("org.freedesktop.DBus.Error.")),
                "{e}"
            );

            let (tx, rx) = tokio::sync::oneshot::channel();
            tokio::spawn(fake_systemd(b.path.clone(), tx));
            rx.await.unwrap();
            assert_eq!(restart("web.service", 5000).await.unwrap(), "done");
            assert_eq!(restart("ssh.service", 5000).await.unwrap(), "failed");
            assert_eq!(restart("early.service", 5000).await.unwrap(), "done");
            let e = restart("missing.service", 5000).await.unwrap_err();
            assert!(
                matches!(&e, DbusError::Remote { name, .. } if name == "org.freedesktop.systemd1.NoSuchUnit"),
                "{e}"
            );
            let e = restart("hang.service", 300).await.unwrap_err();
            assert!(matches!(e, DbusError::Timeout(_)), "{e}");
            let state = |unit| unit_state_at(&b.path, unit);
            assert_eq!(
                state("web.service").await.unwrap(),
                UnitState {
                    active: "active".into(),
                    sub: "running".into(),
                    service_type: "notify".into(),
                    main_pid: 42,
                    restarts: 3,
                }
            );
            assert_eq!(state("stopped.service").await.unwrap().active, "inactive");
            // One connection for a watch's readings, one after the other.
            let mut reader = UnitReader::open_at(&b.path).await.unwrap();
            for unit in ["web.service", "stopped.service", "web.service"] {
                assert_eq!(reader.read(unit).await.unwrap(), state(unit).await.unwrap());
            }
            assert_eq!(reader.read("stopped.service").await.unwrap().sub, "dead");
            // Not a service: only its ActiveState is read.
            assert_eq!(
                state("ssh.socket").await.unwrap(),
                UnitState {
                    active: "active".into(),
                    sub: "listening".into(),
                    ..UnitState::default()
                }
            );
        });
    }
}
