//! Filesystems and disks as libvirt and Proxmox see them: guest-get-fsinfo (with the
//! disk addresses `virsh domfsinfo` maps back to the domain XML), guest-get-disks and
//! guest-fstrim. Addresses are read from the device's sysfs path.

use std::path::{Path, PathBuf};

use nixseed_core::qga::{Args, QgaError};
use serde_json::{Map, Value, json};

use super::fsfreeze::{block_mounts, fitrim};
use super::{Agent, CmdResult};

fn kname_of(major: u32, minor: u32) -> Option<String> {
    let p = std::fs::canonicalize(format!("/sys/dev/block/{major}:{minor}")).ok()?;
    Some(p.file_name()?.to_string_lossy().into_owned())
}

fn sys_block(kname: &str) -> Option<PathBuf> {
    std::fs::canonicalize(format!("/sys/class/block/{kname}")).ok()
}

fn is_partition(kname: &str) -> bool {
    Path::new(&format!("/sys/class/block/{kname}/partition")).exists()
}

/// The whole-disk kernel name for a partition (or the name itself).
fn disk_of(kname: &str) -> String {
    if is_partition(kname)
        && let Some(parent) = sys_block(kname).and_then(|p| p.parent().map(Path::to_path_buf))
        && let Some(n) = parent.file_name()
    {
        return n.to_string_lossy().into_owned();
    }
    kname.to_string()
}

fn slaves(kname: &str) -> Vec<String> {
    std::fs::read_dir(format!("/sys/class/block/{kname}/slaves"))
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn parse_pci(c: &str) -> Option<[u32; 4]> {
    // DDDD:BB:SS.F
    let (dom, rest) = c.split_once(':')?;
    let (bus, rest) = rest.split_once(':')?;
    let (slot, func) = rest.split_once('.')?;
    if dom.len() != 4 || bus.len() != 2 || slot.len() != 2 || func.len() != 1 {
        return None;
    }
    let h = |s: &str| u32::from_str_radix(s, 16).ok();
    Some([h(dom)?, h(bus)?, h(slot)?, h(func)?])
}

fn parse_hctl(c: &str) -> Option<[u32; 4]> {
    let v: Vec<u32> = c.split(':').filter_map(|x| x.parse().ok()).collect();
    (v.len() == 4 && c.split(':').count() == 4).then(|| [v[0], v[1], v[2], v[3]])
}

fn udev_property(major: u32, minor: u32, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(format!("/run/udev/data/b{major}:{minor}")).ok()?;
    let prefix = format!("E:{key}=");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix).map(str::to_string))
}

fn dev_numbers(kname: &str) -> Option<(u32, u32)> {
    let t = std::fs::read_to_string(format!("/sys/class/block/{kname}/dev")).ok()?;
    let (a, b) = t.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// The index of the `ataN` port on the path among its controller's ports (`ata*` beside
/// it, in number order): qemu-ga's IDE bus and SATA unit.
fn ata_port_index(comps: &[&str]) -> Option<u32> {
    let number = |c: &str| c.strip_prefix("ata").and_then(|n| n.parse::<u32>().ok());
    let at = comps.iter().position(|c| number(c).is_some())?;
    let port = number(comps[at])?;
    let controller = comps[..at].join("/");
    let mut ports: Vec<u32> = std::fs::read_dir(controller)
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| number(&e.file_name().to_string_lossy()))
        .collect();
    ports.sort_unstable();
    ports
        .iter()
        .position(|p| *p == port)
        .and_then(|i| u32::try_from(i).ok())
}

/// Bus type, bus, target and unit from the controller's driver, the SCSI address
/// (host:channel:target:lun) and the place of the device's `ataN` port among its
/// controller's ports.
fn bus_address(driver: &str, hctl: Option<[u32; 4]>, port: u32) -> (&'static str, u32, u32, u32) {
    match (driver, hctl) {
        ("virtio-pci", None) => ("virtio", 0, 0, 0),
        ("virtio-pci", Some(h)) => ("scsi", 0, 0, h[3]),
        ("sym53c8xx", Some(h)) => ("scsi", 0, 0, h[2]),
        ("ata_piix", Some(h)) => ("ide", port, 0, h[2]),
        ("ahci", Some(_)) => ("sata", 0, 0, port),
        ("nvme", _) => ("nvme", 0, 0, 0),
        ("xhci_hcd" | "ehci-pci" | "uhci_hcd", _) => ("usb", 0, 0, 0),
        (_, Some(h)) => ("scsi", h[1], h[2], h[3]),
        _ => ("unknown", 0, 0, 0),
    }
}

/// The address libvirt needs for the block device `kname` (a disk, or a partition of one,
/// which `dev` then names, as qemu-ga names the device the filesystem is on), or None for
/// devices not on a bus we can name (loop, ram, ...). Bus, target and unit are read from
/// the sysfs path as qemu-ga reads them for each controller: IDE's bus and SATA's unit
/// from the port's place among the controller's `ataN` ports, LSI's unit from the SCSI
/// target, virtio-scsi's from the LUN.
fn disk_address(kname: &str) -> Option<Value> {
    let sys = sys_block(kname)?;
    let path = sys.to_string_lossy().into_owned();
    let comps: Vec<&str> = path.split('/').collect();
    let pci_idx = comps.iter().rposition(|c| parse_pci(c).is_some())?;
    let pci = parse_pci(comps[pci_idx])?;
    let pci_dir: PathBuf = comps[..=pci_idx].join("/").into();
    let driver = std::fs::read_link(pci_dir.join("driver"))
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let hctl = comps.iter().rev().find_map(|c| parse_hctl(c));
    let port = ata_port_index(&comps).unwrap_or(0);
    let (bus_type, bus, target, unit) = bus_address(&driver, hctl, port);
    let mut m = Map::new();
    m.insert(
        "pci-controller".into(),
        json!({"domain": pci[0], "bus": pci[1], "slot": pci[2], "function": pci[3]}),
    );
    m.insert("bus-type".into(), bus_type.into());
    m.insert("bus".into(), bus.into());
    m.insert("target".into(), target.into());
    m.insert("unit".into(), unit.into());
    m.insert("dev".into(), format!("/dev/{kname}").into());
    let disk = disk_of(kname);
    let serial = dev_numbers(kname)
        .and_then(|(a, b)| udev_property(a, b, "ID_SERIAL"))
        .or_else(|| {
            std::fs::read_to_string(format!("/sys/class/block/{disk}/serial"))
                .or_else(|_| {
                    std::fs::read_to_string(format!("/sys/class/block/{disk}/device/serial"))
                })
                .ok()
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
        });
    if let Some(s) = serial {
        m.insert("serial".into(), s.into());
    }
    Some(Value::Object(m))
}

/// Addresses of every physical device under `kname`: the device itself, or through
/// device-mapper and md slaves (each slave a disk or a partition) the devices it is made of.
fn disk_addresses(kname: &str, depth: u32, out: &mut Vec<Value>) {
    let s = slaves(kname);
    if s.is_empty() || depth > 8 {
        out.extend(disk_address(kname));
    } else {
        for slave in s {
            disk_addresses(&slave, depth + 1, out);
        }
    }
}

pub fn get_fsinfo(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    let mut out = Vec::new();
    // Every mount, bind mounts and btrfs subvolumes included, last mounted first, as
    // qemu-ga lists them.
    for m in block_mounts().into_iter().rev() {
        let Some(kname) = kname_of(m.major, m.minor) else {
            continue;
        };
        let mut fs = Map::new();
        fs.insert("name".into(), kname.clone().into());
        fs.insert("mountpoint".into(), m.mountpoint.clone().into());
        fs.insert("type".into(), m.fstype.clone().into());
        if let Ok(st) = nix::sys::statvfs::statvfs(m.path.as_path()) {
            let fr = st.fragment_size();
            let used = st.blocks().saturating_sub(st.blocks_free());
            fs.insert("used-bytes".into(), (used * fr).into());
            fs.insert(
                "total-bytes".into(),
                ((used + st.blocks_available()) * fr).into(),
            );
        }
        let mut disks = Vec::new();
        disk_addresses(&kname, 0, &mut disks);
        fs.insert("disk".into(), Value::Array(disks));
        out.push(Value::Object(fs));
    }
    Ok(Some(Value::Array(out)))
}

pub fn get_disks(_: &mut Agent, args: Args) -> CmdResult {
    args.finish()?;
    let mut names: Vec<String> = std::fs::read_dir("/sys/block")
        .map_err(|e| QgaError::generic(format!("/sys/block: {e}")))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    let mut out = Vec::new();
    for disk in names {
        let size = std::fs::read_to_string(format!("/sys/block/{disk}/size"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if size == 0 {
            continue;
        }
        let deps: Vec<Value> = slaves(&disk)
            .into_iter()
            .map(|s| Value::from(format!("/dev/{s}")))
            .collect();
        let mut m = Map::new();
        m.insert("name".into(), format!("/dev/{disk}").into());
        m.insert("partition".into(), false.into());
        m.insert("dependencies".into(), Value::Array(deps));
        if let Some(a) = disk_address(&disk) {
            m.insert("address".into(), a);
        }
        if let Ok(alias) = std::fs::read_to_string(format!("/sys/block/{disk}/dm/name")) {
            m.insert("alias".into(), alias.trim().into());
        }
        out.push(Value::Object(m));
        // Partitions follow their disk, depending on it.
        let mut parts: Vec<String> = std::fs::read_dir(format!("/sys/block/{disk}"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with(&disk) && is_partition(n))
                    .collect()
            })
            .unwrap_or_default();
        parts.sort();
        for p in parts {
            out.push(json!({
                "name": format!("/dev/{p}"),
                "partition": true,
                "dependencies": [format!("/dev/{disk}")],
            }));
        }
    }
    Ok(Some(Value::Array(out)))
}

pub fn fstrim(_: &mut Agent, mut args: Args) -> CmdResult {
    let minimum = args.opt_i64("minimum")?.unwrap_or(0).max(0) as u64;
    args.finish()?;
    let mut paths = Vec::new();
    // Every mount, last mounted first, as qemu-ga lists them; a second mount of a
    // device trims what the first left (usually nothing).
    for m in block_mounts().into_iter().rev() {
        let mut r = Map::new();
        r.insert("path".into(), m.mountpoint.clone().into());
        match fitrim(&m.path, minimum) {
            Ok((trimmed, used_minimum)) => {
                r.insert("trimmed".into(), trimmed.into());
                r.insert("minimum".into(), used_minimum.into());
            }
            Err(text) => {
                r.insert("error".into(), text.into());
            }
        }
        paths.push(Value::Object(r));
    }
    Ok(Some(json!({ "paths": paths })))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The numbers qemu-ga 7.2 gives for each controller (its `build_guest_fsinfo_for_pci_dev`
    /// reads them so, and qemu-ga run against a sysfs tree made for each case answered
    /// them): a SATA disk on the controller's fourth port (`ata4/host3`, ports
    /// ata1..ata6) is unit 3; an IDE disk on the second channel (`ata2`) is bus 1 whatever
    /// SCSI host number it got; an LSI disk's unit is its SCSI target; virtio-scsi's its LUN.
    #[test]
    fn bus_addresses_are_read_as_qemu_ga_reads_them() {
        assert_eq!(
            bus_address("ahci", Some([3, 0, 0, 0]), 3),
            ("sata", 0, 0, 3)
        );
        assert_eq!(
            bus_address("ata_piix", Some([7, 0, 1, 0]), 1),
            ("ide", 1, 0, 1)
        );
        assert_eq!(
            bus_address("sym53c8xx", Some([2, 0, 3, 0]), 0),
            ("scsi", 0, 0, 3)
        );
        assert_eq!(
            bus_address("virtio-pci", Some([0, 0, 0, 2]), 0),
            ("scsi", 0, 0, 2)
        );
        assert_eq!(bus_address("virtio-pci", None, 0), ("virtio", 0, 0, 0));
    }

    /// The port's place among the controller's ports, in number order (not readdir's).
    #[test]
    fn the_ata_port_index_counts_the_controllers_ports_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let controller = dir.path().join("0000:00:1f.2");
        for n in [10, 4, 1, 6] {
            std::fs::create_dir_all(controller.join(format!("ata{n}"))).unwrap();
        }
        let path = controller.join("ata6/host5/target5:0:0/5:0:0:0/block/sdc");
        let text = path.to_string_lossy();
        let comps: Vec<&str> = text.split('/').collect();
        assert_eq!(ata_port_index(&comps), Some(2));
    }
}
