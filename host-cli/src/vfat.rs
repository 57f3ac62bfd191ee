//! The vfat form of a seed volume (label `CIDATA`), for platforms that attach seeds as
//! disks rather than cdroms. Built in memory with the fatfs crate; fixed volume id and
//! timestamps keep the image reproducible.

use std::io::{Cursor, Seek, SeekFrom, Write};

use anyhow::{Context, Result};
use fatfs::{
    Date, DateTime, FatType, FileSystem, FormatVolumeOptions, FsOptions, Time, TimeProvider,
};

/// Every file on a seed image carries this time (2020-01-01 00:00:00).
#[derive(Debug)]
struct FixedTime;

impl TimeProvider for FixedTime {
    fn get_current_date(&self) -> Date {
        Date {
            year: 2020,
            month: 1,
            day: 1,
        }
    }
    fn get_current_date_time(&self) -> DateTime {
        DateTime {
            date: self.get_current_date(),
            time: Time {
                hour: 0,
                min: 0,
                sec: 0,
                millis: 0,
            },
        }
    }
}

static FIXED_TIME: FixedTime = FixedTime;

/// Build a FAT12 image labelled `label` (at most 11 characters) holding `files`.
pub fn build(files: &[(&str, &[u8])], label: &str, volume_id: u32) -> Result<Vec<u8>> {
    let payload: usize = files.iter().map(|(_, d)| d.len().div_ceil(512) * 512).sum();
    // 1 MiB is plenty for a seed; grow for unusually large payloads.
    let size = (payload * 2 + 256 * 1024)
        .max(1024 * 1024)
        .next_multiple_of(512);
    let mut disk = Cursor::new(vec![0u8; size]);
    let mut label_bytes = [b' '; 11];
    for (dst, src) in label_bytes.iter_mut().zip(label.bytes()) {
        *dst = src.to_ascii_uppercase();
    }
    fatfs::format_volume(
        &mut disk,
        FormatVolumeOptions::new()
            .fat_type(FatType::Fat12)
            .volume_label(label_bytes)
            .volume_id(volume_id),
    )
    .context("formatting the vfat seed image")?;
    disk.seek(SeekFrom::Start(0))
        .context("rewinding the vfat image")?;
    {
        let fs = FileSystem::new(&mut disk, FsOptions::new().time_provider(&FIXED_TIME))
            .context("opening the fresh vfat image")?;
        let root = fs.root_dir();
        for (name, data) in files {
            let mut f = root
                .create_file(name)
                .with_context(|| format!("creating {name} on the vfat seed image"))?;
            f.write_all(data)
                .with_context(|| format!("writing {name} on the vfat seed image"))?;
            f.flush()
                .with_context(|| format!("writing {name} on the vfat seed image"))?;
        }
        drop(root);
        fs.unmount().context("closing the vfat seed image")?;
    }
    Ok(disk.into_inner())
}
