//! Reads an ISO 9660 volume (a NoCloud `cidata` or ConfigDrive `config-2` seed) straight from
//! its bytes, with the names Linux's isofs would show: Rock Ridge `NM` when the volume has
//! Rock Ridge, else the Joliet tree, else the plain names lower-cased without `;1`.
//! The agent reads seed ISOs this way instead of mounting them; every length and offset
//! on the volume is checked, since a seed is untrusted input.

use std::io;

pub const SECTOR: u64 = 2048;

/// How many bytes of directory the root may span (a seed has a handful of files).
const MAX_DIR: u64 = 256 * 1024;
/// How many volume descriptors are read before giving up on a terminator.
const MAX_DESCRIPTORS: u64 = 32;
/// How many Rock Ridge continuation areas one record may chain.
const MAX_CONTINUATIONS: usize = 8;
/// Where Linux's isofs stops a Rock Ridge name: the `NM` piece that would bring it to this
/// many bytes is dropped with every later one, so a name holds at most 253 bytes and a
/// volume of long names cannot make its reader hold more than that per entry.
const MAX_RR_NAME: usize = 254;

/// Random access to a volume: a byte slice in tests, a block device in the guest.
pub trait Volume {
    /// Fills `buf` from byte `offset`; reading past the end is an error.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
}

impl Volume for [u8] {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| eof())?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.get(start..end))
            .ok_or_else(eof)?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

#[cfg(unix)]
impl Volume for std::fs::File {
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        std::os::unix::fs::FileExt::read_exact_at(self, buf, offset)
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "beyond the end of the volume")
}

/// Which directory tree the names came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Names {
    RockRidge,
    Joliet,
    Plain,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    File,
    Directory,
    /// A Rock Ridge symbolic link, device or socket: never read as a seed file.
    Special,
}

/// One entry of the root directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub kind: Kind,
    /// Byte offset of the data on the volume.
    pub offset: u64,
    pub size: u64,
    /// Why the data cannot be read as one extent (multi-extent or interleaved), if so.
    pub unreadable: Option<&'static str>,
}

/// The root directory as a reader sees it.
#[derive(Debug, Clone)]
pub struct Root {
    pub names: Names,
    pub entries: Vec<Entry>,
    /// Rock Ridge's `SP` skip length for every record's system use area.
    skip: usize,
}

impl Root {
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// The entries of a directory of this volume, named as the root's are.
    pub fn read_dir(&self, v: &(impl Volume + ?Sized), dir: &Entry) -> Result<Vec<Entry>, String> {
        if dir.kind != Kind::Directory {
            return Err(format!("{}: not a directory", dir.name));
        }
        directory(v, dir.offset, dir.size, &dir.name)?
            .iter()
            .filter_map(|r| entry(v, r, self.names, self.skip).transpose())
            .collect()
    }

    /// Follows a relative path such as `openstack/latest/meta_data.json` from the root;
    /// `None` when a component is missing.
    pub fn lookup(&self, v: &(impl Volume + ?Sized), path: &str) -> Result<Option<Entry>, String> {
        let mut parts = path.split('/').filter(|p| !p.is_empty());
        let Some(first) = parts.next() else {
            return Ok(None);
        };
        let Some(mut at) = self.get(first).cloned() else {
            return Ok(None);
        };
        for part in parts {
            match self.read_dir(v, &at)?.into_iter().find(|e| e.name == part) {
                Some(e) => at = e,
                None => return Ok(None),
            }
        }
        Ok(Some(at))
    }
}

fn le16(b: &[u8]) -> u16 {
    u16::from_le_bytes([b[0], b[1]])
}

fn le32(b: &[u8]) -> u32 {
    u32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

fn read(v: &(impl Volume + ?Sized), offset: u64, len: u64, what: &str) -> Result<Vec<u8>, String> {
    let len = usize::try_from(len).map_err(|_| format!("{what}: length {len} is too large"))?;
    let mut buf = vec![0u8; len];
    v.read_at(offset, &mut buf)
        .map_err(|e| format!("{what} at byte {offset} ({len} bytes): {e}"))?;
    Ok(buf)
}

/// A directory extent: (byte offset, length) from a 34-byte-or-longer record.
fn extent_of(rec: &[u8]) -> (u64, u64) {
    let ear = u64::from(rec[1]);
    (
        (u64::from(le32(&rec[2..6])) + ear) * SECTOR,
        u64::from(le32(&rec[10..14])),
    )
}

/// Reads the root directory, choosing names as Linux's isofs does.
pub fn read_root(v: &(impl Volume + ?Sized)) -> Result<Root, String> {
    let mut primary_root = None;
    let mut joliet_root = None;
    for i in 0..MAX_DESCRIPTORS {
        let d = read(v, (16 + i) * SECTOR, SECTOR, "volume descriptor")?;
        if &d[1..6] != b"CD001" {
            return Err(format!(
                "sector {}: not an ISO 9660 volume descriptor",
                16 + i
            ));
        }
        match d[0] {
            1 if primary_root.is_none() => {
                let block = le16(&d[128..130]);
                if u64::from(block) != SECTOR {
                    return Err(format!("logical block size {block} is not supported"));
                }
                primary_root = Some(d[156..190].to_vec());
            }
            2 if joliet_root.is_none() && matches!(&d[88..91], b"%/@" | b"%/C" | b"%/E") => {
                joliet_root = Some(d[156..190].to_vec());
            }
            255 => break,
            _ => {}
        }
    }
    let primary = primary_root.ok_or("no primary volume descriptor")?;
    let (offset, len) = extent_of(&primary);
    let records = directory(v, offset, len, "root directory")?;
    // Rock Ridge announces itself with an `SP` entry in the root's `.` record.
    let rock_skip = records.first().and_then(|dot| {
        let a = system_use(dot, 0);
        (a.len() >= 7 && &a[..2] == b"SP" && a[4..6] == [0xBE, 0xEF]).then(|| usize::from(a[6]))
    });
    if let Some(skip) = rock_skip {
        let entries = records
            .iter()
            .filter_map(|r| entry(v, r, Names::RockRidge, skip).transpose())
            .collect::<Result<_, _>>()?;
        return Ok(Root {
            names: Names::RockRidge,
            entries,
            skip,
        });
    }
    let (names, records) = match joliet_root {
        Some(root) => {
            let (offset, len) = extent_of(&root);
            (
                Names::Joliet,
                directory(v, offset, len, "Joliet root directory")?,
            )
        }
        None => (Names::Plain, records),
    };
    let entries = records
        .iter()
        .filter_map(|r| entry(v, r, names, 0).transpose())
        .collect::<Result<_, _>>()?;
    Ok(Root {
        names,
        entries,
        skip: 0,
    })
}

/// The records of the directory at `offset` (`.` and `..` included); `what` names it.
fn directory(
    v: &(impl Volume + ?Sized),
    offset: u64,
    len: u64,
    what: &str,
) -> Result<Vec<Vec<u8>>, String> {
    if len > MAX_DIR {
        return Err(format!(
            "{what}: {len} bytes of directory exceed the {MAX_DIR} byte limit"
        ));
    }
    let dir = read(v, offset, len, what)?;
    let mut out = Vec::new();
    let mut pos = 0usize;
    while pos < dir.len() {
        let n = usize::from(dir[pos]);
        if n == 0 {
            // Records never cross a sector: the rest of this one is padding.
            pos = (pos / SECTOR as usize + 1) * SECTOR as usize;
            continue;
        }
        let rec = dir
            .get(pos..pos + n)
            .filter(|r| r.len() >= 34 && 33 + usize::from(r[32]) <= r.len())
            .ok_or_else(|| format!("{what}: record at byte {pos} is malformed"))?;
        out.push(rec.to_vec());
        pos += n;
    }
    Ok(out)
}

/// Where a record's system use area starts (after the name and its pad byte).
fn susp_start(rec: &[u8]) -> Option<usize> {
    let name_len = usize::from(rec[32]);
    let start = 33 + name_len + (1 - name_len % 2);
    (start <= rec.len()).then_some(start)
}

fn system_use(rec: &[u8], skip: usize) -> &[u8] {
    susp_start(rec)
        .and_then(|s| rec.get(s + skip..))
        .unwrap_or_default()
}

/// One directory entry, or `None` for `.`, `..` and associated files.
fn entry(
    v: &(impl Volume + ?Sized),
    rec: &[u8],
    names: Names,
    skip: usize,
) -> Result<Option<Entry>, String> {
    let id = &rec[33..33 + usize::from(rec[32])];
    let flags = rec[25];
    if id == [0] || id == [1] || flags & 0x04 != 0 {
        return Ok(None);
    }
    let mut kind = if flags & 0x02 != 0 {
        Kind::Directory
    } else {
        Kind::File
    };
    let name = match names {
        Names::RockRidge => {
            let rr = rock_ridge(v, rec, skip)?;
            if let Some(mode) = rr.mode {
                kind = match mode & 0o170000 {
                    0o100000 => Kind::File,
                    0o040000 => Kind::Directory,
                    _ => Kind::Special,
                };
            }
            rr.name.unwrap_or_else(|| plain_name(id))
        }
        Names::Joliet => joliet_name(id),
        Names::Plain => plain_name(id),
    };
    let unreadable = if flags & 0x80 != 0 {
        Some("a multi-extent file")
    } else if rec[26] != 0 || rec[27] != 0 {
        Some("an interleaved file")
    } else {
        None
    };
    let (offset, size) = extent_of(rec);
    Ok(Some(Entry {
        name,
        kind,
        offset,
        size,
        unreadable,
    }))
}

#[derive(Default)]
struct RockRidge {
    name: Option<String>,
    mode: Option<u32>,
}

/// The `NM` name and `PX` mode of a record, following `CE` continuation areas.
fn rock_ridge(v: &(impl Volume + ?Sized), rec: &[u8], skip: usize) -> Result<RockRidge, String> {
    let mut out = RockRidge::default();
    let mut name: Option<Vec<u8>> = None;
    let mut truncated = false;
    let mut area = system_use(rec, skip).to_vec();
    for _ in 0..=MAX_CONTINUATIONS {
        let mut next = None;
        let mut p = 0;
        while p + 4 <= area.len() {
            let (sig, len) = (&area[p..p + 2], usize::from(area[p + 2]));
            if len < 4 || p + len > area.len() {
                break;
            }
            let e = &area[p..p + len];
            match sig {
                // NM flags: 2 = ".", 4 = ".."; the rest of the entry is (part of) the name.
                b"NM" if len >= 5 && e[4] & 0x06 == 0 => {
                    let n = name.get_or_insert_with(Vec::new);
                    if n.len() + e[5..].len() >= MAX_RR_NAME {
                        truncated = true;
                    } else if !truncated {
                        n.extend_from_slice(&e[5..]);
                    }
                }
                b"PX" if len >= 12 => out.mode = Some(le32(&e[4..8])),
                b"CE" if len >= 28 => {
                    let at = u64::from(le32(&e[4..8])) * SECTOR + u64::from(le32(&e[12..16]));
                    next = Some((at, u64::from(le32(&e[20..24]))));
                }
                b"ST" => break,
                _ => {}
            }
            p += len;
        }
        match next {
            Some((at, len)) if len <= SECTOR => {
                area = read(v, at, len, "Rock Ridge continuation area")?;
            }
            Some((_, len)) => {
                return Err(format!(
                    "Rock Ridge continuation area of {len} bytes is larger than a sector"
                ));
            }
            None => break,
        }
    }
    out.name = name.map(|n| String::from_utf8_lossy(&n).into_owned());
    Ok(out)
}

fn strip_version(name: &str) -> &str {
    name.split(';').next().unwrap_or_default()
}

/// Joliet: UCS-2 big-endian, version suffix dropped.
fn joliet_name(id: &[u8]) -> String {
    let units: Vec<u16> = id
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    strip_version(&String::from_utf16_lossy(&units)).to_string()
}

/// A plain ISO 9660 name as isofs shows it by default: lower case, no `;1`, no
/// trailing dot.
fn plain_name(id: &[u8]) -> String {
    let text = String::from_utf8_lossy(id);
    let base = strip_version(&text);
    base.strip_suffix('.').unwrap_or(base).to_ascii_lowercase()
}

/// Reads an entry's data, refusing anything that is not a single-extent regular file of
/// at most `cap` bytes. Errors name the file by `origin`.
pub fn read_file(
    v: &(impl Volume + ?Sized),
    e: &Entry,
    cap: u64,
    origin: &str,
) -> Result<Vec<u8>, String> {
    match e.kind {
        Kind::File => {}
        Kind::Directory => return Err(format!("{origin}: a directory, not a file")),
        Kind::Special => {
            return Err(format!("{origin}: not a regular file (links are refused)"));
        }
    }
    if let Some(why) = e.unreadable {
        return Err(format!("{origin}: {why} is not supported in a seed"));
    }
    if e.size > cap {
        return Err(format!(
            "{origin}: {} bytes exceed the {cap} byte limit for a seed file",
            e.size
        ));
    }
    read(v, e.offset, e.size, origin)
}
