//! Filesystem labels from superblocks, for finding seed volumes in the initrd where there
//! is no udev and no blkid: the iso9660 primary volume descriptor at 32 KiB, the FAT boot
//! sector's BPB, and the ext4 superblock (for the `/var` disk).

/// How many bytes of a device [`probe`] needs.
pub const PROBE_LEN: usize = 32 * 1024 + 2048;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FsType {
    Iso9660,
    Vfat,
    Ext4,
}

impl FsType {
    /// The name `mount(2)` wants.
    pub fn mount_name(&self) -> &'static str {
        match self {
            FsType::Iso9660 => "iso9660",
            FsType::Vfat => "vfat",
            FsType::Ext4 => "ext4",
        }
    }
}

/// The filesystem type and label found at the start of a device, if any.
pub fn probe(head: &[u8]) -> Option<(FsType, String)> {
    probe_iso9660(head)
        .map(|l| (FsType::Iso9660, l))
        .or_else(|| probe_fat(head).map(|l| (FsType::Vfat, l)))
        .or_else(|| probe_ext(head).map(|l| (FsType::Ext4, l)))
}

fn probe_iso9660(head: &[u8]) -> Option<String> {
    let pvd = head.get(32768..32768 + 2048)?;
    if pvd[0] != 1 || &pvd[1..6] != b"CD001" {
        return None;
    }
    Some(text(&pvd[40..72]))
}

fn probe_fat(head: &[u8]) -> Option<String> {
    let bs = head.get(..512)?;
    if bs[510] != 0x55 || bs[511] != 0xAA {
        return None;
    }
    let bytes_per_sector = u16::from_le_bytes([bs[11], bs[12]]);
    if !matches!(bytes_per_sector, 512 | 1024 | 2048 | 4096) || bs[13] == 0 {
        return None;
    }
    let fat16_size = u16::from_le_bytes([bs[22], bs[23]]);
    // FAT32 keeps the extended BPB at 64, FAT12/16 at 36; 0x29 marks a label being present.
    let (sig, label) = if fat16_size == 0 { (66, 71) } else { (38, 43) };
    if bs[sig] != 0x29 {
        return None;
    }
    // "NO NAME" is no label in the boot sector; the root directory may still hold one.
    let label = text(&bs[label..label + 11]);
    Some(if label == "NO NAME" {
        String::new()
    } else {
        label
    })
}

/// How many bytes of a FAT root directory are read at a time.
const FAT_CHUNK: u64 = 4096;
/// The most clusters of a FAT32 root directory followed, as blkid follows them.
const FAT32_MAX_CLUSTERS: usize = 99;
/// The largest cluster read whole (a FAT32 cluster is at most 32 KiB in practice).
const FAT_MAX_CLUSTER: u64 = 256 * 1024;

/// What a stretch of root directory entries says about the label.
#[derive(Debug, PartialEq, Eq)]
pub enum RootScan {
    Label(String),
    /// The end-of-directory entry: nothing follows in this stretch.
    End,
    /// Neither: the label may be further on.
    More,
}

/// The volume label entry among FAT root directory entries, as blkid's
/// `search_fat_label` looks for it: not free, no cluster, not a long-name part, the
/// volume-label bit without the directory bit.
pub fn scan_fat_root(dir: &[u8]) -> RootScan {
    for e in dir.chunks_exact(32) {
        match e[0] {
            0x00 => return RootScan::End,
            0xE5 => continue,
            _ => {}
        }
        let cluster = e[20] | e[21] | e[26] | e[27];
        if cluster != 0 || e[11] & 0x3F == 0x0F {
            continue;
        }
        if e[11] & 0x18 == 0x08 {
            let label = text(&e[..11]);
            return if label.is_empty() {
                RootScan::End
            } else {
                RootScan::Label(label)
            };
        }
    }
    RootScan::More
}

/// The volume label entry of a FAT root directory (what blkid reports as `LABEL`), found
/// where the boot sector (`head`) puts the directory, through `read` (fills the buffer
/// from a byte offset of the device, `false` when it cannot). As blkid searches it: the
/// whole fixed root directory of FAT12/16 up to its end entry; on FAT32 the root's
/// cluster chain through the FAT, each cluster up to its end entry, at most 99 clusters.
/// Tools that relabel a volume holding files put the entry in the first free slot, which
/// may be far into the directory.
pub fn fat_root_label(head: &[u8], read: impl Fn(u64, &mut [u8]) -> bool) -> Option<String> {
    let bs = head.get(..512)?;
    let u16_at = |i: usize| u64::from(u16::from_le_bytes([bs[i], bs[i + 1]]));
    let u32_at = |i: usize| u64::from(u32::from_le_bytes([bs[i], bs[i + 1], bs[i + 2], bs[i + 3]]));
    let bytes_per_sector = u16_at(11);
    let sectors_per_cluster = u64::from(bs[13]);
    let reserved = u16_at(14);
    let fats = u64::from(bs[16]);
    let fat16_size = u16_at(22);
    // Reads `len` bytes at `at` a chunk at a time, stopping at what the entries say.
    let scan = |at: u64, len: u64| -> Option<RootScan> {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(FAT_CHUNK);
            let mut buf = vec![0u8; usize::try_from(n).ok()?];
            if !read(at.checked_add(done)?, &mut buf) {
                return None;
            }
            match scan_fat_root(&buf) {
                RootScan::More => done += n,
                found => return Some(found),
            }
        }
        Some(RootScan::More)
    };
    if fat16_size != 0 {
        let at = (reserved + fats * fat16_size).checked_mul(bytes_per_sector)?;
        return match scan(at, u16_at(17) * 32)? {
            RootScan::Label(l) => Some(l),
            _ => None,
        };
    }
    let fat32_size = u32_at(36);
    let fat_entries = fat32_size.checked_mul(bytes_per_sector)? / 4;
    let cluster = sectors_per_cluster.checked_mul(bytes_per_sector)?;
    if cluster == 0 || cluster > FAT_MAX_CLUSTER {
        return None;
    }
    let data = reserved.checked_add(fats.checked_mul(fat32_size)?)?;
    let mut next = u32_at(44);
    for _ in 0..FAT32_MAX_CLUSTERS {
        if next < 2 || next >= fat_entries {
            break;
        }
        let sector = data.checked_add((next - 2).checked_mul(sectors_per_cluster)?)?;
        if let Some(RootScan::Label(l)) = scan(sector.checked_mul(bytes_per_sector)?, cluster) {
            return Some(l);
        }
        let mut entry = [0u8; 4];
        if !read(reserved * bytes_per_sector + next * 4, &mut entry) {
            break;
        }
        next = u64::from(u32::from_le_bytes(entry) & 0x0FFF_FFFF);
    }
    None
}

/// The label of a FAT volume as cloud-init finds seeds by it: blkid's `LABEL` (the root
/// directory's entry) when it names a seed, else the boot sector's (`LABEL_FATBOOT`),
/// else the root directory's.
pub fn fat_label(boot: &str, root: Option<&str>) -> String {
    let seed = |l: &str| is_nocloud_label(l) || is_configdrive_label(l);
    match root {
        Some(r) if seed(r) || boot.is_empty() => r.to_string(),
        _ => boot.to_string(),
    }
}

fn probe_ext(head: &[u8]) -> Option<String> {
    let sb = head.get(1024..1024 + 256)?;
    if sb[56..58] != [0x53, 0xEF] {
        return None;
    }
    let raw = &sb[120..136];
    let end = raw.iter().position(|b| *b == 0).unwrap_or(raw.len());
    Some(String::from_utf8_lossy(&raw[..end]).into_owned())
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes)
        .trim_end_matches([' ', '\0'])
        .to_string()
}

/// NoCloud labels, exact case (cloud-init's ds-identify).
pub fn is_nocloud_label(label: &str) -> bool {
    label == "cidata" || label == "CIDATA"
}

/// ConfigDrive2 labels.
pub fn is_configdrive_label(label: &str) -> bool {
    label == "config-2" || label == "CONFIG-2"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iso9660_label_from_pvd() {
        let mut img = vec![0u8; PROBE_LEN];
        img[32768] = 1;
        img[32769..32774].copy_from_slice(b"CD001");
        img[32768 + 40..32768 + 72].copy_from_slice(b"cidata                          ");
        assert_eq!(probe(&img), Some((FsType::Iso9660, "cidata".into())));
    }

    #[test]
    fn fat16_label_from_bpb() {
        let mut img = vec![0u8; PROBE_LEN];
        img[11..13].copy_from_slice(&512u16.to_le_bytes());
        img[13] = 4;
        img[22] = 8;
        img[38] = 0x29;
        img[43..54].copy_from_slice(b"CIDATA     ");
        img[510] = 0x55;
        img[511] = 0xAA;
        assert_eq!(probe(&img), Some((FsType::Vfat, "CIDATA".into())));
    }

    #[test]
    fn fat_root_directory_label_entry() {
        let mut dir = vec![0u8; 96];
        dir[..11].copy_from_slice(b"README  TXT");
        dir[11] = 0x20;
        dir[26] = 3;
        dir[32..43].copy_from_slice(b"CIDATA     ");
        dir[32 + 11] = 0x08;
        assert_eq!(scan_fat_root(&dir), RootScan::Label("CIDATA".into()));
        dir[32 + 11] = 0x0F;
        assert_eq!(scan_fat_root(&dir), RootScan::End);
        // A directory entry with the label bit set too (text read as entries) is none.
        dir[32 + 11] = 0x18;
        assert_eq!(scan_fat_root(&dir), RootScan::End);
        // An entry with a cluster is a file, whatever its attributes say.
        dir[32 + 11] = 0x08;
        dir[32 + 26] = 5;
        assert_eq!(scan_fat_root(&dir[..64]), RootScan::More);
        assert_eq!(fat_label("", Some("CIDATA")), "CIDATA");
        assert_eq!(fat_label("cidata", Some("OTHER")), "cidata");
        assert_eq!(fat_label("OTHER", Some("CIDATA")), "CIDATA");
        assert_eq!(fat_label("OTHER", None), "OTHER");
    }

    /// A volume in memory, for the reads [`fat_root_label`] makes.
    fn reader(img: &[u8]) -> impl Fn(u64, &mut [u8]) -> bool + '_ {
        |at, buf| {
            let at = at as usize;
            match img.get(at..at + buf.len()) {
                Some(src) => {
                    buf.copy_from_slice(src);
                    true
                }
                None => false,
            }
        }
    }

    /// FAT16: the label entry far into the fixed root directory (after 200 files) is
    /// found; FAT32: in the root's second cluster, reached through the FAT; a hostile
    /// root cluster of 0 or 1 is no place.
    #[test]
    fn fat_root_label_anywhere_in_the_root_directory() {
        let entry = |name: &[u8; 11], attr: u8| {
            let mut e = [0u8; 32];
            e[..11].copy_from_slice(name);
            e[11] = attr;
            e
        };
        let mut img = vec![0u8; 64 * 1024];
        img[11..13].copy_from_slice(&512u16.to_le_bytes());
        img[13] = 1;
        img[14..16].copy_from_slice(&1u16.to_le_bytes());
        img[16] = 2;
        img[17..19].copy_from_slice(&512u16.to_le_bytes());
        img[22..24].copy_from_slice(&3u16.to_le_bytes());
        let root = 7 * 512;
        for i in 0..200 {
            img[root + i * 32..root + i * 32 + 32].copy_from_slice(&entry(b"FILE    TXT", 0x20));
        }
        img[root + 200 * 32..root + 201 * 32].copy_from_slice(&entry(b"CIDATA     ", 0x08));
        let head = img[..512].to_vec();
        assert_eq!(
            fat_root_label(&head, reader(&img)).as_deref(),
            Some("CIDATA")
        );

        let mut img = vec![0u8; 64 * 1024];
        img[11..13].copy_from_slice(&512u16.to_le_bytes());
        img[13] = 1;
        img[14..16].copy_from_slice(&4u16.to_le_bytes());
        img[16] = 1;
        img[36..40].copy_from_slice(&4u32.to_le_bytes());
        img[44..48].copy_from_slice(&2u32.to_le_bytes());
        // FAT at sector 4: cluster 2 → 7, 7 → end of chain.
        img[4 * 512 + 8..4 * 512 + 12].copy_from_slice(&7u32.to_le_bytes());
        img[4 * 512 + 28..4 * 512 + 32].copy_from_slice(&0x0FFF_FFFFu32.to_le_bytes());
        // Data from sector 8: cluster 2 full of files, cluster 7 with the label.
        for i in 0..16 {
            let at = 8 * 512 + i * 32;
            img[at..at + 32].copy_from_slice(&entry(b"FILE    TXT", 0x20));
        }
        let at = (8 + 5) * 512;
        img[at..at + 32].copy_from_slice(&entry(b"CONFIG-2   ", 0x08));
        let head = img[..512].to_vec();
        assert_eq!(
            fat_root_label(&head, reader(&img)).as_deref(),
            Some("CONFIG-2")
        );
        let mut hostile = head.clone();
        hostile[44..48].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(fat_root_label(&hostile, reader(&img)), None);
        // A chain that loops ends after blkid's bound.
        img[4 * 512 + 28..4 * 512 + 32].copy_from_slice(&2u32.to_le_bytes());
        img[at..at + 32].fill(0);
        img[at..at + 32].copy_from_slice(&entry(b"FILE    TXT", 0x20));
        assert_eq!(fat_root_label(&head, reader(&img)), None);
    }

    #[test]
    fn short_or_empty_devices_have_no_label() {
        assert_eq!(probe(&[0u8; 100]), None);
        assert_eq!(probe(&vec![0u8; PROBE_LEN]), None);
    }
}
