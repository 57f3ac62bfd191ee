//! A host-side client of the guest agent on QEMU's chardev socket, as the benchmark and
//! the scenarios use it: one connection kept open, or one per call as Proxmox VE does.

use anyhow::{Context, Result, bail};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// `n` guest-pings, each on a new connection as Proxmox VE calls the agent
/// ([`ping_new_connection`], ids from `first_id`), with pauses of 150–249 ms between them
/// that do not repeat in step with an agent's 100 ms look for a host. Their round trips.
pub fn calls(sock: &Path, n: u64, first_id: u64) -> Result<Vec<Duration>> {
    (0..n)
        .map(|i| {
            std::thread::sleep(Duration::from_millis(150 + (i * 37) % 100));
            ping_new_connection(sock, first_id + i)
                .with_context(|| format!("call {} of {n} on a new connection", i + 1))
        })
        .collect()
}

/// One guest-ping the way Proxmox VE calls the agent: a new connection,
/// `guest-sync-delimited` and the command in one write, then the 0xFF, the sync reply
/// and the command's reply. Timed from the write to the command's reply.
pub fn ping_new_connection(sock: &Path, id: u64) -> Result<Duration> {
    let mut w = UnixStream::connect(sock)
        .with_context(|| format!("connecting to the guest agent socket {}", sock.display()))?;
    w.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut r = BufReader::new(w.try_clone()?);
    let t = Instant::now();
    w.write_all(
        format!(
            "{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n\
             {{\"execute\":\"guest-ping\"}}\n"
        )
        .as_bytes(),
    )?;
    let mut skipped = Vec::new();
    r.read_until(0xFF, &mut skipped)
        .context("waiting for the sync delimiter")?;
    if skipped.last() != Some(&0xFF) {
        bail!("the guest agent socket closed before the sync delimiter");
    }
    let (mut sync, mut ping) = (String::new(), String::new());
    r.read_line(&mut sync).context("reading the sync reply")?;
    r.read_line(&mut ping)
        .context("reading the guest-ping reply")?;
    let took = t.elapsed();
    let synced: Option<u64> = serde_json::from_str::<serde_json::Value>(sync.trim())
        .ok()
        .and_then(|v| v.get("return")?.as_u64());
    if synced != Some(id) || ping.trim() != r#"{"return": {}}"# {
        bail!(
            "a call on a new connection answered `{}` then `{}`",
            sync.trim(),
            ping.trim()
        );
    }
    Ok(took)
}

/// A host-side client of the guest agent on QEMU's chardev socket.
pub struct Qga {
    w: UnixStream,
    r: BufReader<UnixStream>,
}

impl Qga {
    /// Connects and syncs with `guest-sync-delimited` (retried until the agent answers).
    pub fn connect(sock: &Path, timeout: Duration) -> Result<Qga> {
        let w = UnixStream::connect(sock)
            .with_context(|| format!("connecting to the guest agent socket {}", sock.display()))?;
        w.set_read_timeout(Some(Duration::from_secs(2)))?;
        let r = BufReader::new(w.try_clone()?);
        let mut q = Qga { w, r };
        let deadline = Instant::now() + timeout;
        let mut id: u64 = 0x6e78_0000;
        loop {
            id += 1;
            if q.sync(id)? {
                q.w.set_read_timeout(Some(Duration::from_secs(10)))?;
                return Ok(q);
            }
            if Instant::now() > deadline {
                bail!(
                    "no guest-sync-delimited answer on {} within {} s",
                    sock.display(),
                    timeout.as_secs()
                );
            }
        }
    }

    /// One sync round; false on a read timeout (agent not there yet).
    fn sync(&mut self, id: u64) -> Result<bool> {
        self.w.write_all(
            format!("{{\"execute\":\"guest-sync-delimited\",\"arguments\":{{\"id\":{id}}}}}\n")
                .as_bytes(),
        )?;
        // Skip everything up to the 0xFF delimiter, then the reply line; stale replies of
        // earlier rounds carry other ids.
        loop {
            let mut byte = [0u8; 1];
            match self.r.read(&mut byte) {
                Ok(0) => bail!("the guest agent socket closed during sync"),
                Ok(_) if byte[0] == 0xFF => {}
                Ok(_) => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    return Ok(false);
                }
                Err(e) => return Err(e).context("reading the sync reply"),
            }
            let mut line = String::new();
            match self.r.read_line(&mut line) {
                Ok(_) => {}
                Err(_) => return Ok(false),
            }
            let v: serde_json::Value = match serde_json::from_str(line.trim()) {
                Ok(v) => v,
                Err(_) => continue,
            };
            if v.get("return").and_then(|r| r.as_u64()) == Some(id) {
                return Ok(true);
            }
        }
    }

    /// One command (a JSON request line) and its reply, parsed.
    pub fn execute(&mut self, request: &serde_json::Value) -> Result<serde_json::Value> {
        self.w.write_all(format!("{request}\n").as_bytes())?;
        let mut line = String::new();
        self.r
            .read_line(&mut line)
            .with_context(|| format!("reading the reply to {request}"))?;
        serde_json::from_str(line.trim())
            .with_context(|| format!("the reply to {request} is not JSON: `{}`", line.trim()))
    }

    /// One `guest-ping` round trip.
    pub fn ping(&mut self) -> Result<Duration> {
        let t = Instant::now();
        self.w.write_all(b"{\"execute\":\"guest-ping\"}\n")?;
        let mut line = String::new();
        self.r
            .read_line(&mut line)
            .context("reading the guest-ping reply")?;
        let took = t.elapsed();
        if line.trim() != r#"{"return": {}}"# {
            bail!("guest-ping answered `{}`", line.trim());
        }
        Ok(took)
    }
}
