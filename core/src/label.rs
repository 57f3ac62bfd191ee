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

/// At most how many bytes of a FAT root directory [`fat_root_label`] looks at: the label
/// entry is among the first ones in practice (mkfs.vfat and mlabel write it first).
pub const FAT_ROOT_LEN: u64 = 4096;

/// Where a FAT volume's root directory starts on the device, from its boot sector, and how
/// many of its bytes to read: after the reserved sectors and the FATs on FAT12/16, where
/// its size is fixed; at its first cluster on FAT32, one cluster of it (the next may be
/// anywhere). Never more than [`FAT_ROOT_LEN`].
pub fn fat_root_dir(head: &[u8]) -> Option<(u64, u64)> {
    let bs = head.get(..512)?;
    let u16_at = |i: usize| u64::from(u16::from_le_bytes([bs[i], bs[i + 1]]));
    let u32_at = |i: usize| u64::from(u32::from_le_bytes([bs[i], bs[i + 1], bs[i + 2], bs[i + 3]]));
    let bytes_per_sector = u16_at(11);
    let sectors_per_cluster = u64::from(bs[13]);
    let reserved = u16_at(14);
    let fats = u64::from(bs[16]);
    let fat16_size = u16_at(22);
    let (sectors, len) = if fat16_size != 0 {
        (reserved + fats * fat16_size, u16_at(17) * 32)
    } else {
        let fat32_size = u32_at(36);
        let root_cluster = u32_at(44);
        let first = reserved
            + fats * fat32_size
            + root_cluster
                .checked_sub(2)?
                .checked_mul(sectors_per_cluster)?;
        (first, sectors_per_cluster * bytes_per_sector)
    };
    Some((
        sectors.checked_mul(bytes_per_sector)?,
        len.min(FAT_ROOT_LEN),
    ))
}

/// The volume label entry of a FAT root directory (what blkid reports as `LABEL`), if
/// `dir` (its first bytes) holds one.
pub fn fat_root_label(dir: &[u8]) -> Option<String> {
    for e in dir.chunks_exact(32) {
        match e[0] {
            0x00 => return None,
            0xE5 => continue,
            _ => {}
        }
        // The volume-label bit without the directory bit, as blkid reads it; 0x0F is a
        // long-name part.
        if e[11] & 0x18 == 0x08 && e[11] & 0x0F != 0x0F {
            let label = text(&e[..11]);
            return (!label.is_empty()).then_some(label);
        }
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
        dir[32..43].copy_from_slice(b"CIDATA     ");
        dir[32 + 11] = 0x08;
        assert_eq!(fat_root_label(&dir).as_deref(), Some("CIDATA"));
        dir[32 + 11] = 0x0F;
        assert_eq!(fat_root_label(&dir), None);
        // A directory entry with the label bit set too (text read as entries) is none.
        dir[32 + 11] = 0x18;
        assert_eq!(fat_root_label(&dir), None);
        assert_eq!(fat_label("", Some("CIDATA")), "CIDATA");
        assert_eq!(fat_label("cidata", Some("OTHER")), "cidata");
        assert_eq!(fat_label("OTHER", Some("CIDATA")), "CIDATA");
        assert_eq!(fat_label("OTHER", None), "OTHER");
    }

    /// FAT12/16: the fixed root directory after the FATs, its own size; FAT32: one
    /// cluster at the root cluster; a hostile root cluster of 0 or 1 is no place.
    #[test]
    fn fat_root_directory_place_and_extent() {
        let mut bs = vec![0u8; 512];
        bs[11..13].copy_from_slice(&512u16.to_le_bytes());
        bs[13] = 4;
        bs[14..16].copy_from_slice(&1u16.to_le_bytes());
        bs[16] = 2;
        bs[17..19].copy_from_slice(&64u16.to_le_bytes());
        bs[22..24].copy_from_slice(&3u16.to_le_bytes());
        assert_eq!(fat_root_dir(&bs), Some((7 * 512, 64 * 32)));
        bs[17..19].copy_from_slice(&512u16.to_le_bytes());
        assert_eq!(fat_root_dir(&bs), Some((7 * 512, FAT_ROOT_LEN)));
        bs[22..24].copy_from_slice(&0u16.to_le_bytes());
        bs[13] = 1;
        bs[14..16].copy_from_slice(&32u16.to_le_bytes());
        bs[36..40].copy_from_slice(&100u32.to_le_bytes());
        bs[44..48].copy_from_slice(&2u32.to_le_bytes());
        assert_eq!(fat_root_dir(&bs), Some((232 * 512, 512)));
        bs[44..48].copy_from_slice(&1u32.to_le_bytes());
        assert_eq!(fat_root_dir(&bs), None);
    }

    #[test]
    fn short_or_empty_devices_have_no_label() {
        assert_eq!(probe(&[0u8; 100]), None);
        assert_eq!(probe(&vec![0u8; PROBE_LEN]), None);
    }
}
