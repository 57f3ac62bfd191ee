//! Reads an ISO 9660 volume (a NoCloud `cidata` or ConfigDrive `config-2` seed) straight from
//! its bytes, with the names Linux's isofs shows and finds with its default options:
//!
//! - The Joliet tree when the volume has one and its root does not announce Rock Ridge
//!   (an `ER` entry in the root's `.` record); names there are matched without regard
//!   to case or trailing dots, as isofs's `check=relaxed` default for Joliet does.
//! - Otherwise the primary tree, with each record's Rock Ridge `NM` name when it has one
//!   (with or without an `SP` entry: isofs tries Rock Ridge on every record), else its
//!   plain name as isofs translates it: lower case, a trailing `;1` or `.;1` dropped,
//!   any other `;` shown as `.`.
//!
//! A record whose Rock Ridge entries cannot be read (a continuation area off the volume
//! or chained too long) has no name under isofs, so it cannot be found; it is left out
//! and named in [`Root::broken`], and the rest of the directory is read.
//! The agent reads seed ISOs this way instead of mounting them; every length and offset
//! on the volume is checked, since a seed is untrusted input.

use std::io;

pub const SECTOR: u64 = 2048;

/// How many bytes of directory the root may span (a seed has a handful of files).
const MAX_DIR: u64 = 256 * 1024;
/// How many volume descriptors are read before giving up on a terminator.
const MAX_DESCRIPTORS: u64 = 32;
/// How many Rock Ridge continuation areas one record may chain (isofs gives up at 32 and
/// shows the record with no name; so does this reader, sooner).
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

/// Which directory tree the names came from: Rock Ridge (the primary tree, where some
/// record has Rock Ridge entries), Joliet, or Plain (the primary tree without them).
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
    /// The name is the record's Rock Ridge `NM`.
    pub rock_ridge: bool,
}

/// The root directory as a reader sees it.
#[derive(Debug, Clone)]
pub struct Root {
    pub names: Names,
    pub entries: Vec<Entry>,
    /// Records of the root left out because their Rock Ridge entries cannot be read,
    /// each named by its ISO 9660 identifier with the reason.
    pub broken: Vec<String>,
    /// Rock Ridge's `SP` skip length for every record's system use area.
    skip: usize,
}

impl Root {
    pub fn get(&self, name: &str) -> Option<&Entry> {
        self.entries
            .iter()
            .find(|e| names_match(self.names, &e.name, name))
    }

    /// The entries of a directory of this volume, named as the root's are.
    pub fn read_dir(&self, v: &(impl Volume + ?Sized), dir: &Entry) -> Result<Vec<Entry>, String> {
        if dir.kind != Kind::Directory {
            return Err(format!("{}: not a directory", dir.name));
        }
        let tree = if self.names == Names::Joliet {
            Tree::Joliet
        } else {
            Tree::Primary
        };
        let records = directory(v, dir.offset, dir.size, &dir.name)?;
        Ok(records
            .iter()
            .filter_map(|r| entry(v, r, tree, self.skip).ok().flatten())
            .collect())
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
            let found = self.read_dir(v, &at)?;
            match found
                .into_iter()
                .find(|e| names_match(self.names, &e.name, part))
            {
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
    let dot = records.first();
    // Rock Ridge's `SP` entry opens the root's `.` record and says how many bytes of
    // every record's system use area to skip.
    let skip = dot
        .map(|dot| system_use(dot, 0))
        .filter(|a| a.len() >= 7 && &a[..2] == b"SP" && a[4..6] == [0xBE, 0xEF])
        .map_or(0, |a| usize::from(a[6]));
    // The Joliet tree is used unless the root's `.` record announces Rock Ridge (`ER`).
    let announced = dot.is_some_and(|dot| {
        let mut er = false;
        let _ = walk_susp(v, system_use(dot, 0), &mut |sig, _| er |= sig == b"ER");
        er
    });
    let (tree, what, records) = match joliet_root {
        Some(root) if !announced => {
            let (offset, len) = extent_of(&root);
            let what = "Joliet root directory";
            (Tree::Joliet, what, directory(v, offset, len, what)?)
        }
        _ => (Tree::Primary, "root directory", records),
    };
    let mut entries = Vec::new();
    let mut broken = Vec::new();
    let mut rock_names = false;
    for r in &records {
        match entry(v, r, tree, skip) {
            Ok(Some(e)) => {
                rock_names |= e.rock_ridge;
                entries.push(e);
            }
            Ok(None) => {}
            Err(e) => broken.push(format!("{what}: {e}")),
        }
    }
    let names = match tree {
        Tree::Joliet => Names::Joliet,
        Tree::Primary if rock_names || skip > 0 || announced => Names::RockRidge,
        Tree::Primary => Names::Plain,
    };
    Ok(Root {
        names,
        entries,
        broken,
        skip,
    })
}

/// Whether a name shown on the volume (`shown`) is the one looked up (`wanted`): Joliet
/// names without regard to ASCII case or trailing dots, others exactly.
fn names_match(names: Names, shown: &str, wanted: &str) -> bool {
    if names != Names::Joliet {
        return shown == wanted;
    }
    let trim = |n: &str| -> String {
        let t = n.trim_end_matches('.');
        if t.is_empty() { n } else { t }.to_string()
    };
    trim(shown).eq_ignore_ascii_case(&trim(wanted))
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

/// Which tree a directory belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tree {
    /// The primary tree: Rock Ridge names where a record has them, else plain ones.
    Primary,
    Joliet,
}

/// One directory entry, or `None` for `.`, `..`, associated files and records Rock Ridge
/// relocated (`RE`); an error, naming the record, when its Rock Ridge entries cannot be
/// read.
fn entry(
    v: &(impl Volume + ?Sized),
    rec: &[u8],
    tree: Tree,
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
    let mut rock_ridge_name = false;
    let name = match tree {
        Tree::Primary => {
            let rr = rock_ridge(v, rec, skip)
                .map_err(|e| format!("record {}: {e}", String::from_utf8_lossy(id)))?;
            if rr.relocated {
                return Ok(None);
            }
            if let Some(mode) = rr.mode {
                kind = match mode & 0o170000 {
                    0o100000 => Kind::File,
                    0o040000 => Kind::Directory,
                    _ => Kind::Special,
                };
            }
            match rr.name {
                Some(n) => {
                    rock_ridge_name = true;
                    n
                }
                None => plain_name(id),
            }
        }
        Tree::Joliet => joliet_name(id),
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
        rock_ridge: rock_ridge_name,
    }))
}

#[derive(Default)]
struct RockRidge {
    name: Option<String>,
    mode: Option<u32>,
    /// An `RE` entry: the directory was relocated, and isofs does not show it here.
    relocated: bool,
}

/// Calls `each` with the signature and bytes of every System Use entry of `area` and
/// of the continuation areas (`CE`) it chains, up to `ST`; an error when a continuation
/// area is off the volume, crosses a sector or the chain is too long, as isofs refuses.
fn walk_susp(
    v: &(impl Volume + ?Sized),
    area: &[u8],
    each: &mut dyn FnMut(&[u8], &[u8]),
) -> Result<(), String> {
    let mut area = area.to_vec();
    for hop in 0..=MAX_CONTINUATIONS {
        let mut next = None;
        let mut p = 0;
        while p + 4 <= area.len() {
            let (sig, len) = (&area[p..p + 2], usize::from(area[p + 2]));
            if len < 4 || p + len > area.len() {
                break;
            }
            let e = &area[p..p + len];
            match sig {
                b"CE" if len >= 28 => {
                    next = Some((
                        u64::from(le32(&e[4..8])),
                        u64::from(le32(&e[12..16])),
                        u64::from(le32(&e[20..24])),
                    ));
                }
                b"ST" => break,
                _ => each(sig, e),
            }
            p += len;
        }
        let Some((block, offset, len)) = next else {
            return Ok(());
        };
        if hop == MAX_CONTINUATIONS {
            return Err(format!(
                "Rock Ridge continuation areas chain more than {MAX_CONTINUATIONS} times"
            ));
        }
        if offset >= SECTOR || len > SECTOR || offset + len > SECTOR {
            return Err(format!(
                "Rock Ridge continuation area of {len} bytes at byte {offset} of its sector crosses the sector"
            ));
        }
        area = read(
            v,
            block * SECTOR + offset,
            len,
            "Rock Ridge continuation area",
        )?;
    }
    Ok(())
}

/// The `NM` name, `PX` mode and `RE` mark of a record, as isofs reads them: an `NM`
/// piece for `.` or `..`, or with flags other than "continues", is passed over; a piece
/// ends at a NUL byte; an `RR` entry without its `NM` bit means no Rock Ridge name.
fn rock_ridge(v: &(impl Volume + ?Sized), rec: &[u8], skip: usize) -> Result<RockRidge, String> {
    let mut out = RockRidge::default();
    let mut name: Option<Vec<u8>> = None;
    let mut truncated = false;
    let mut no_name = false;
    walk_susp(v, system_use(rec, skip), &mut |sig, e| match sig {
        b"NM" if e.len() >= 5 && e[4] & 0x06 == 0 && e[4] & !0x01 == 0 => {
            if no_name {
                return;
            }
            let piece = &e[5..];
            let piece = piece
                .iter()
                .position(|&b| b == 0)
                .map_or(piece, |end| &piece[..end]);
            let n = name.get_or_insert_with(Vec::new);
            if n.len() + e[5..].len() >= MAX_RR_NAME {
                truncated = true;
            } else if !truncated {
                n.extend_from_slice(piece);
            }
        }
        b"RR" if e.len() >= 5 && e[4] & 0x08 == 0 => no_name = true,
        b"PX" if e.len() >= 12 => out.mode = Some(le32(&e[4..8])),
        b"RE" => out.relocated = true,
        _ => {}
    })?;
    if !no_name {
        out.name = name
            .filter(|n| !n.is_empty())
            .map(|n| String::from_utf8_lossy(&n).into_owned());
    }
    Ok(out)
}

/// Joliet as isofs shows it: UCS-2 big-endian, every trailing `;1` dropped, then
/// trailing dots (a name keeps its first character).
fn joliet_name(id: &[u8]) -> String {
    let units: Vec<u16> = id
        .chunks_exact(2)
        .map(|c| u16::from_be_bytes([c[0], c[1]]))
        .collect();
    let mut name = String::from_utf16_lossy(&units);
    while name.len() >= 2 && name.ends_with(";1") {
        name.truncate(name.len() - 2);
    }
    while name.len() >= 2 && name.ends_with('.') {
        name.pop();
    }
    name
}

/// A plain ISO 9660 name as isofs translates it by default (`map=normal`): lower case,
/// up to a NUL, a trailing `.;1` or `;1` dropped, any other `;` (and a `/`) shown as `.`.
fn plain_name(id: &[u8]) -> String {
    let len = id.len();
    let mut out = Vec::with_capacity(len);
    for (i, &c) in id.iter().enumerate() {
        if c == 0 {
            break;
        }
        if c == b'.' && i + 3 == len && id[i + 1] == b';' && id[i + 2] == b'1' {
            break;
        }
        if c == b';' && i + 2 == len && id[i + 1] == b'1' {
            break;
        }
        out.push(match c {
            b';' | b'/' => b'.',
            c => c.to_ascii_lowercase(),
        });
    }
    String::from_utf8_lossy(&out).into_owned()
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
