//! A minimal QMP client for the `seedctl run` QEMU: power down, quit, query.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: String,
}

impl Qmp {
    pub fn connect(path: &Path) -> Result<Qmp> {
        let p = path.display().to_string();
        let s = UnixStream::connect(path)
            .with_context(|| format!("connecting to the QEMU monitor {p}"))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .with_context(|| format!("configuring {p}"))?;
        let writer = s.try_clone().with_context(|| format!("configuring {p}"))?;
        let mut q = Qmp {
            reader: BufReader::new(s),
            writer,
            path: p,
        };
        q.read_reply(true)?;
        q.execute("qmp_capabilities", None)?;
        Ok(q)
    }

    fn read_reply(&mut self, greeting: bool) -> Result<Value> {
        loop {
            let mut line = String::new();
            let n = self
                .reader
                .read_line(&mut line)
                .with_context(|| format!("reading from {}", self.path))?;
            if n == 0 {
                bail!("QEMU closed the monitor {}", self.path);
            }
            let v: Value = serde_json::from_str(&line)
                .with_context(|| format!("parsing QMP reply from {}", self.path))?;
            if greeting && v.get("QMP").is_some() {
                return Ok(v);
            }
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QEMU monitor {}: {}", self.path, e);
            }
            return Ok(v.get("return").cloned().unwrap_or(Value::Null));
        }
    }

    pub fn execute(&mut self, cmd: &str, args: Option<Value>) -> Result<Value> {
        let mut req = json!({ "execute": cmd });
        if let Some(a) = args {
            req["arguments"] = a;
        }
        self.writer
            .write_all(format!("{req}\n").as_bytes())
            .with_context(|| format!("writing to {}", self.path))?;
        self.read_reply(false)
    }
}
