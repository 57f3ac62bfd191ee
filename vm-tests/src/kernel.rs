//! The kernel the harness boots. A bzImage first decompresses itself, which under TCG
//! takes about 2.5 s of every boot (Debian's kernel is XZ-compressed). QEMU can instead
//! load the uncompressed ELF kernel directly and enter it through PVH when the kernel
//! carries the PVH entry note (`CONFIG_PVH=y`, as Debian's does), so the harness unpacks
//! the cached bzImage once and boots that. Both images use the same kernel, so the
//! comparison between them is unchanged; each boot is only shorter.

use anyhow::{Context, Result, bail};
use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// XZ's stream header magic.
const XZ_MAGIC: &[u8] = b"\xfd7zXZ\x00";
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the note QEMU looks for to enter a kernel through PVH.
const PVH_NOTE_TYPE: u32 = 18;

/// The kernel to boot: `vmlinux` beside `bzimage` (made on first use) when the kernel
/// can be entered through PVH, otherwise the bzImage itself, with the reason printed.
pub fn bootable(bzimage: &Path) -> PathBuf {
    let elf = bzimage.with_file_name("vmlinux");
    if elf.exists() {
        return elf;
    }
    match unpack(bzimage, &elf) {
        Ok(()) => elf,
        Err(e) => {
            eprintln!(
                "vm-tests: booting the compressed kernel {} ({e:#})",
                bzimage.display()
            );
            bzimage.to_path_buf()
        }
    }
}

/// Writes the ELF kernel inside `bzimage` to `out` (atomically), if it has a PVH entry.
fn unpack(bzimage: &Path, out: &Path) -> Result<()> {
    let image = fs::read(bzimage).with_context(|| format!("reading {}", bzimage.display()))?;
    let at = image
        .windows(XZ_MAGIC.len())
        .position(|w| w == XZ_MAGIC)
        .context("no XZ payload in the bzImage")?;
    let mut child = Command::new("xz")
        .args(["-dc", "--single-stream"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("cannot start xz")?;
    let mut stdin = child.stdin.take().context("xz stdin")?;
    let payload = image[at..].to_vec();
    // xz stops reading after the stream; the bytes after it are the bzImage's trailer.
    let feeder = std::thread::spawn(move || {
        let _ = stdin.write_all(&payload);
    });
    let output = child.wait_with_output().context("running xz")?;
    let _ = feeder.join();
    let elf = output.stdout;
    if elf.len() < 64 || &elf[..4] != b"\x7fELF" {
        bail!("the XZ payload is not an ELF kernel (xz {})", output.status);
    }
    if !has_pvh_note(&elf) {
        bail!("the kernel has no PVH entry note (CONFIG_PVH)");
    }
    let tmp = out.with_extension("tmp");
    fs::write(&tmp, &elf).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, out).with_context(|| format!("renaming {}", tmp.display()))?;
    Ok(())
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}
fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}
fn u64_at(b: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(b.get(at..at + 8)?.try_into().ok()?)).ok()
}

/// Whether a 64-bit little-endian ELF has a `Xen` note of type PHYS32_ENTRY in one of
/// its `PT_NOTE` segments.
fn has_pvh_note(elf: &[u8]) -> bool {
    pvh_note(elf).unwrap_or(false)
}

fn pvh_note(elf: &[u8]) -> Option<bool> {
    const PT_NOTE: u32 = 4;
    if elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return Some(false);
    }
    let phoff = u64_at(elf, 0x20)?;
    let phentsize = usize::from(u16_at(elf, 0x36)?);
    let phnum = usize::from(u16_at(elf, 0x38)?);
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        if u32_at(elf, ph)? != PT_NOTE {
            continue;
        }
        let (off, size) = (u64_at(elf, ph + 8)?, u64_at(elf, ph + 32)?);
        let notes = elf.get(off..off.checked_add(size)?)?;
        let mut at = 0;
        while at + 12 <= notes.len() {
            let namesz = u32_at(notes, at)? as usize;
            let descsz = u32_at(notes, at + 4)? as usize;
            let kind = u32_at(notes, at + 8)?;
            let name = notes.get(at + 12..at + 12 + namesz)?;
            if name == b"Xen\0" && kind == PVH_NOTE_TYPE {
                return Some(true);
            }
            at += 12 + namesz.next_multiple_of(4) + descsz.next_multiple_of(4);
        }
    }
    Some(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF64 with one PT_NOTE segment holding `notes`.
    fn elf_with_notes(notes: &[(&[u8], u32)]) -> Vec<u8> {
        let mut body = Vec::new();
        for (name, kind) in notes {
            body.extend((name.len() as u32).to_le_bytes());
            body.extend(4u32.to_le_bytes());
            body.extend(kind.to_le_bytes());
            body.extend(*name);
            body.resize(body.len().next_multiple_of(4), 0);
            body.extend([0u8; 4]);
        }
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[0x20..0x28].copy_from_slice(&64u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&56u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&4u32.to_le_bytes());
        elf[72..80].copy_from_slice(&(120u64).to_le_bytes());
        elf[96..104].copy_from_slice(&(body.len() as u64).to_le_bytes());
        elf.extend(body);
        elf
    }

    #[test]
    fn finds_the_pvh_entry_note_among_others() {
        let elf = elf_with_notes(&[(b"GNU\0", 3), (b"Xen\0", 6), (b"Xen\0", 18)]);
        assert!(has_pvh_note(&elf));
    }

    #[test]
    fn a_kernel_without_the_note_is_not_entered_through_pvh() {
        assert!(!has_pvh_note(&elf_with_notes(&[(b"Xen\0", 6)])));
        assert!(!has_pvh_note(&elf_with_notes(&[(b"GNU\0", 18)])));
        assert!(!has_pvh_note(b"\x7fELF"));
    }
}
