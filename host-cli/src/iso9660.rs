//! A small ISO 9660 writer for NoCloud seed volumes: files in the root directory only,
//! with Rock Ridge (`SP`, `RR`, `PX`, `NM`, `ER` through `CE`) so that `user-data` keeps
//! its name on readers without Joliet, and a Joliet tree for readers without Rock Ridge.
//! The output depends only on the inputs (the timestamp is a parameter), so the same
//! identity always gives the same bytes.
//!
//! Layout (2048-byte sectors): 0-15 system area, 16 primary volume descriptor, 17 Joliet
//! supplementary descriptor, 18 terminator, 19-22 path tables (primary L/M, Joliet L/M),
//! 23 the Rock Ridge continuation area holding `ER`, then the primary root directory,
//! the Joliet root directory and the file data.

use anyhow::{Result, bail};

pub const SECTOR: usize = 2048;
const FIRST_FREE: u32 = 24;
const CE_SECTOR: u32 = 23;

/// What a seed volume holds.
#[derive(Debug, Clone)]
pub struct IsoOptions<'a> {
    /// Volume label, e.g. `cidata` (at most 16 characters so Joliet carries it whole).
    pub volume_id: &'a str,
    /// Seconds since the Unix epoch used for every timestamp on the volume.
    pub epoch: i64,
}

fn both16(v: u16) -> [u8; 4] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], b[0], b[1]]
}

fn both32(v: u32) -> [u8; 8] {
    let (l, b) = (v.to_le_bytes(), v.to_be_bytes());
    [l[0], l[1], l[2], l[3], b[0], b[1], b[2], b[3]]
}

/// (year, month, day, hour, minute, second) in UTC.
fn civil(epoch: i64) -> (i64, u32, u32, u32, u32, u32) {
    let secs = epoch.rem_euclid(86_400);
    let (year, month, day) = nixseed_core::civil::civil_from_days(epoch.div_euclid(86_400));
    (
        year,
        month as u32,
        day as u32,
        (secs / 3600) as u32,
        (secs / 60 % 60) as u32,
        (secs % 60) as u32,
    )
}

/// ECMA-119 9.1.5 recording date (7 bytes, GMT offset 0).
fn dir_date(epoch: i64) -> [u8; 7] {
    let (y, mo, d, h, mi, s) = civil(epoch);
    let y = (y - 1900).clamp(0, 255) as u8;
    [y, mo as u8, d as u8, h as u8, mi as u8, s as u8, 0]
}

/// ECMA-119 8.4.26.1 volume date (`YYYYMMDDHHMMSScc` + GMT offset).
fn vol_date(epoch: i64) -> [u8; 17] {
    let (y, mo, d, h, mi, s) = civil(epoch);
    let text = format!("{y:04}{mo:02}{d:02}{h:02}{mi:02}{s:02}00");
    let mut out = [0u8; 17];
    out[..16].copy_from_slice(&text.as_bytes()[..16]);
    out
}

fn susp_px(mode: u32, nlink: u32) -> Vec<u8> {
    let mut e = vec![b'P', b'X', 36, 1];
    e.extend(both32(mode));
    e.extend(both32(nlink));
    e.extend(both32(0));
    e.extend(both32(0));
    e
}

fn susp_rr(flags: u8) -> Vec<u8> {
    vec![b'R', b'R', 5, 1, flags]
}

fn susp_nm(name: &str) -> Vec<u8> {
    let mut e = vec![b'N', b'M', (5 + name.len()) as u8, 1, 0];
    e.extend(name.as_bytes());
    e
}

fn susp_ce(sector: u32, len: u32) -> Vec<u8> {
    let mut e = vec![b'C', b'E', 28, 1];
    e.extend(both32(sector));
    e.extend(both32(0));
    e.extend(both32(len));
    e
}

fn susp_er() -> Vec<u8> {
    let id = b"RRIP_1991A";
    let des: &[u8] =
        b"THE ROCK RIDGE INTERCHANGE PROTOCOL PROVIDES SUPPORT FOR POSIX FILE SYSTEM SEMANTICS";
    let src: &[u8] = b"PLEASE CONTACT DISC PUBLISHER FOR SPECIFICATION SOURCE.  SEE PUBLISHER IDENTIFIER IN PRIMARY VOLUME DESCRIPTOR FOR CONTACT INFORMATION.";
    let len = 8 + id.len() + des.len() + src.len();
    let mut e = vec![
        b'E',
        b'R',
        len as u8,
        1,
        id.len() as u8,
        des.len() as u8,
        src.len() as u8,
        1,
    ];
    e.extend(id);
    e.extend(des);
    e.extend(src);
    e
}

/// One directory record (ECMA-119 9.1) with its System Use area.
fn dir_record(
    ident: &[u8],
    extent: u32,
    size: u32,
    dir: bool,
    date: [u8; 7],
    su: &[u8],
) -> Vec<u8> {
    let mut r = vec![0u8; 33];
    r[2..10].copy_from_slice(&both32(extent));
    r[10..18].copy_from_slice(&both32(size));
    r[18..25].copy_from_slice(&date);
    r[25] = if dir { 2 } else { 0 };
    r[28..32].copy_from_slice(&both16(1));
    r[32] = ident.len() as u8;
    r.extend(ident);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r.extend(su);
    if r.len() % 2 == 1 {
        r.push(0);
    }
    r[0] = r.len() as u8;
    r
}

/// Lay records out in sectors; a record never crosses a sector boundary.
fn pack(records: &[Vec<u8>]) -> Vec<u8> {
    let mut out: Vec<u8> = Vec::new();
    for r in records {
        let used = out.len() % SECTOR;
        if used + r.len() > SECTOR {
            out.resize(out.len() + SECTOR - used, 0);
        }
        out.extend(r);
    }
    let rem = out.len() % SECTOR;
    if rem != 0 || out.is_empty() {
        out.resize(out.len() + SECTOR - rem, 0);
    }
    out
}

fn sectors(len: usize) -> u32 {
    len.div_ceil(SECTOR) as u32
}

/// Level-2 ISO 9660 identifier: `USER_DATA.;1`.
fn iso_name(name: &str) -> String {
    let up: String = name
        .chars()
        .map(|c| match c.to_ascii_uppercase() {
            c @ ('A'..='Z' | '0'..='9' | '_' | '.') => c,
            _ => '_',
        })
        .collect();
    let (stem, ext) = match up.rsplit_once('.') {
        Some((s, e)) => (s.replace('.', "_"), e.to_owned()),
        None => (up, String::new()),
    };
    format!("{stem}.{ext};1")
}

fn ucs2(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_be_bytes).collect()
}

fn text_field(out: &mut [u8], s: &str, joliet: bool) {
    if joliet {
        for pair in out.chunks_mut(2) {
            pair.copy_from_slice(&[0, b' '][..pair.len()]);
        }
        let b = ucs2(s);
        let n = b.len().min(out.len());
        out[..n].copy_from_slice(&b[..n]);
    } else {
        out.fill(b' ');
        let n = s.len().min(out.len());
        out[..n].copy_from_slice(&s.as_bytes()[..n]);
    }
}

struct Descriptor<'a> {
    joliet: bool,
    volume_id: &'a str,
    total: u32,
    l_path: u32,
    m_path: u32,
    root: &'a [u8],
    epoch: i64,
}

fn volume_descriptor(d: &Descriptor) -> Vec<u8> {
    let mut v = vec![0u8; SECTOR];
    v[0] = if d.joliet { 2 } else { 1 };
    v[1..6].copy_from_slice(b"CD001");
    v[6] = 1;
    text_field(&mut v[8..40], "", d.joliet);
    text_field(&mut v[40..72], d.volume_id, d.joliet);
    v[80..88].copy_from_slice(&both32(d.total));
    if d.joliet {
        v[88..91].copy_from_slice(b"%/E"); // UCS-2 level 3
    }
    v[120..124].copy_from_slice(&both16(1));
    v[124..128].copy_from_slice(&both16(1));
    v[128..132].copy_from_slice(&both16(SECTOR as u16));
    v[132..140].copy_from_slice(&both32(10));
    v[140..144].copy_from_slice(&d.l_path.to_le_bytes());
    v[148..152].copy_from_slice(&d.m_path.to_be_bytes());
    v[156..190].copy_from_slice(d.root);
    for (range, text) in [
        (190..318, ""),
        (318..446, ""),
        (446..574, "NIXSEED SEEDCTL"),
        (574..702, "NIXSEED SEEDCTL"),
        (702..739, ""),
        (739..776, ""),
        (776..813, ""),
    ] {
        text_field(&mut v[range], text, d.joliet);
    }
    let date = vol_date(d.epoch);
    v[813..830].copy_from_slice(&date);
    v[830..847].copy_from_slice(&date);
    v[847..863].fill(b'0');
    v[864..881].copy_from_slice(&date);
    v[881] = 1;
    v
}

fn path_table(extent: u32, big_endian: bool) -> Vec<u8> {
    let mut p = vec![1u8, 0];
    if big_endian {
        p.extend(extent.to_be_bytes());
        p.extend(1u16.to_be_bytes());
    } else {
        p.extend(extent.to_le_bytes());
        p.extend(1u16.to_le_bytes());
    }
    p.extend([0, 0]);
    p
}

/// Build a volume holding `files` (name, content) in its root directory.
pub fn build(files: &[(&str, &[u8])], opts: &IsoOptions) -> Result<Vec<u8>> {
    if opts.volume_id.is_empty() || opts.volume_id.len() > 16 || !opts.volume_id.is_ascii() {
        bail!(
            "volume label `{}` must be 1 to 16 ASCII characters",
            opts.volume_id
        );
    }
    let mut entries: Vec<(String, &str, &[u8])> = Vec::new();
    for (name, data) in files {
        if name.is_empty() || name.len() > 64 || name.contains('/') || name.starts_with('.') {
            bail!("file name `{name}` cannot be stored in the seed root directory");
        }
        if data.len() > u32::MAX as usize {
            bail!("file `{name}` is larger than 4 GiB");
        }
        let iso = iso_name(name);
        if iso.len() > 32 {
            bail!("file name `{name}` is too long for an ISO 9660 identifier");
        }
        if entries.iter().any(|(i, _, _)| *i == iso) {
            bail!("file names collide on the ISO 9660 name `{iso}`: `{name}`");
        }
        entries.push((iso, name, data));
    }
    let date = dir_date(opts.epoch);
    let er = susp_er();

    // Record lengths do not depend on extents, so size the directories with the real
    // records built against provisional extents, then build them again.
    let primary_records = |root: u32, root_size: u32, extents: &[u32]| -> Vec<Vec<u8>> {
        let mut dot_su = vec![b'S', b'P', 7, 1, 0xBE, 0xEF, 0];
        dot_su.extend(susp_rr(0x01));
        dot_su.extend(susp_px(0o040555, 2));
        dot_su.extend(susp_ce(CE_SECTOR, er.len() as u32));
        let mut dotdot_su = susp_rr(0x01);
        dotdot_su.extend(susp_px(0o040555, 2));
        let mut sorted: Vec<usize> = (0..entries.len()).collect();
        sorted.sort_by(|a, b| entries[*a].0.cmp(&entries[*b].0));
        let mut recs = vec![
            dir_record(&[0], root, root_size, true, date, &dot_su),
            dir_record(&[1], root, root_size, true, date, &dotdot_su),
        ];
        for i in sorted {
            let (iso, name, data) = &entries[i];
            let mut su = susp_rr(0x09);
            su.extend(susp_px(0o100444, 1));
            su.extend(susp_nm(name));
            recs.push(dir_record(
                iso.as_bytes(),
                extents[i],
                data.len() as u32,
                false,
                date,
                &su,
            ));
        }
        recs
    };
    let joliet_records = |root: u32, root_size: u32, extents: &[u32]| -> Vec<Vec<u8>> {
        let mut sorted: Vec<usize> = (0..entries.len()).collect();
        sorted.sort_by(|a, b| ucs2(entries[*a].1).cmp(&ucs2(entries[*b].1)));
        let mut recs = vec![
            dir_record(&[0], root, root_size, true, date, &[]),
            dir_record(&[1], root, root_size, true, date, &[]),
        ];
        for i in sorted {
            let (_, name, data) = &entries[i];
            recs.push(dir_record(
                &ucs2(name),
                extents[i],
                data.len() as u32,
                false,
                date,
                &[],
            ));
        }
        recs
    };

    let zeros = vec![0u32; entries.len()];
    let p_sectors = sectors(pack(&primary_records(0, 0, &zeros)).len());
    let j_sectors = sectors(pack(&joliet_records(0, 0, &zeros)).len());
    let p_root = FIRST_FREE;
    let j_root = p_root + p_sectors;
    let mut next = j_root + j_sectors;
    let mut extents = Vec::with_capacity(entries.len());
    for (_, _, data) in &entries {
        if data.is_empty() {
            extents.push(0);
        } else {
            extents.push(next);
            next += sectors(data.len());
        }
    }
    let total = next;
    let p_dir = pack(&primary_records(
        p_root,
        p_sectors * SECTOR as u32,
        &extents,
    ));
    let j_dir = pack(&joliet_records(j_root, j_sectors * SECTOR as u32, &extents));

    let mut img = vec![0u8; total as usize * SECTOR];
    let mut put = |sector: u32, bytes: &[u8]| {
        let at = sector as usize * SECTOR;
        img[at..at + bytes.len()].copy_from_slice(bytes);
    };
    let p_root_rec = dir_record(&[0], p_root, p_sectors * SECTOR as u32, true, date, &[]);
    let j_root_rec = dir_record(&[0], j_root, j_sectors * SECTOR as u32, true, date, &[]);
    put(
        16,
        &volume_descriptor(&Descriptor {
            joliet: false,
            volume_id: opts.volume_id,
            total,
            l_path: 19,
            m_path: 20,
            root: &p_root_rec,
            epoch: opts.epoch,
        }),
    );
    put(
        17,
        &volume_descriptor(&Descriptor {
            joliet: true,
            volume_id: opts.volume_id,
            total,
            l_path: 21,
            m_path: 22,
            root: &j_root_rec,
            epoch: opts.epoch,
        }),
    );
    let mut term = vec![0u8; 7];
    term[0] = 255;
    term[1..6].copy_from_slice(b"CD001");
    term[6] = 1;
    put(18, &term);
    put(19, &path_table(p_root, false));
    put(20, &path_table(p_root, true));
    put(21, &path_table(j_root, false));
    put(22, &path_table(j_root, true));
    put(CE_SECTOR, &er);
    put(p_root, &p_dir);
    put(j_root, &j_dir);
    for ((_, _, data), extent) in entries.iter().zip(&extents) {
        if !data.is_empty() {
            put(*extent, data);
        }
    }
    Ok(img)
}

/// Reads back the files of the root directory with the guest agent's reader
/// (`nixseed_core::iso9660`): the inverse of [`build`] for what seeds hold. For tests and
/// fuzzing; the guest kernel and xorriso are the independent readers.
pub fn read_root(image: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    use nixseed_core::iso9660;
    let root = iso9660::read_root(image).map_err(anyhow::Error::msg)?;
    root.entries
        .iter()
        .map(|e| {
            iso9660::read_file(image, e, image.len() as u64, &e.name)
                .map(|bytes| (e.name.clone(), bytes))
                .map_err(anyhow::Error::msg)
        })
        .collect()
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn opts() -> IsoOptions<'static> {
        IsoOptions {
            volume_id: "cidata",
            epoch: 1_577_836_800,
        }
    }

    #[test]
    fn dates() {
        assert_eq!(civil(0), (1970, 1, 1, 0, 0, 0));
        assert_eq!(civil(1_577_836_800), (2020, 1, 1, 0, 0, 0));
        assert_eq!(civil(951_782_400 + 3661), (2000, 2, 29, 1, 1, 1));
        assert_eq!(&vol_date(1_577_836_800)[..16], b"2020010100000000");
        assert_eq!(dir_date(1_577_836_800), [120, 1, 1, 0, 0, 0, 0]);
    }

    #[test]
    fn names() {
        assert_eq!(iso_name("user-data"), "USER_DATA.;1");
        assert_eq!(iso_name("network-config"), "NETWORK_CONFIG.;1");
        assert_eq!(iso_name("a.b.txt"), "A_B.TXT;1");
    }

    #[test]
    fn label_and_descriptors() {
        let img = build(
            &[("user-data", b"#cloud-config\n"), ("meta-data", b"")],
            &opts(),
        )
        .unwrap();
        assert_eq!(img.len() % SECTOR, 0);
        let pvd = &img[16 * SECTOR..17 * SECTOR];
        assert_eq!(&pvd[0..6], b"\x01CD001");
        assert_eq!(&pvd[40..46], b"cidata");
        let svd = &img[17 * SECTOR..18 * SECTOR];
        assert_eq!(&svd[88..91], b"%/E");
        assert_eq!(&svd[40..52], &ucs2("cidata")[..]);
        assert_eq!(img[18 * SECTOR], 255);
        let total = u32::from_le_bytes(pvd[80..84].try_into().unwrap());
        assert_eq!(total as usize * SECTOR, img.len());
    }

    #[test]
    fn many_files_span_directory_sectors() {
        let names: Vec<String> = (0..60).map(|i| format!("file-number-{i:03}")).collect();
        let files: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), n.as_bytes())).collect();
        let img = build(&files, &opts()).unwrap();
        // Each name must appear once as Rock Ridge NM content.
        for n in &names {
            let hits = img.windows(n.len()).filter(|w| *w == n.as_bytes()).count();
            assert!(hits >= 2, "{n}: name and data");
        }
    }

    #[test]
    fn reads_back_what_it_wrote() {
        let files: Vec<(String, Vec<u8>)> = (0..40)
            .map(|i| (format!("file-{i}.with-a-long-name"), vec![i as u8; i * 100]))
            .collect();
        let list: Vec<(&str, &[u8])> = files
            .iter()
            .map(|(n, b)| (n.as_str(), b.as_slice()))
            .collect();
        let img = build(&list, &opts()).unwrap();
        let mut back = read_root(&img).unwrap();
        back.sort();
        let mut want = files.clone();
        want.sort();
        assert_eq!(back, want);
        assert!(read_root(&img[..1000]).is_err());
    }

    #[test]
    fn rejects_bad_names() {
        assert!(build(&[("a/b", b"")], &opts()).is_err());
        assert!(build(&[("x-y", b""), ("x_y", b"")], &opts()).is_err());
        assert!(
            build(
                &[],
                &IsoOptions {
                    volume_id: "",
                    epoch: 0
                }
            )
            .is_err()
        );
    }
}
