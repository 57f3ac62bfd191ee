//! The ISO 9660 reader against volumes written by the real tools seeds come from: xorriso
//! (libvirt, virt-install), genisoimage as Proxmox VE runs it (`-iso-level 3 -R`) and as
//! cloud-localds runs it (`-joliet -rock`), in every naming mode. The names the reader
//! returns are the ones Linux's isofs shows for the same volume.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use nixseed_core::iso9660::{Kind, Names, read_file, read_root};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("nixseed-iso-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("stage")).unwrap();
    dir
}

const FILES: &[(&str, &[u8])] = &[
    ("meta-data", b"instance-id: iid-1\nlocal-hostname: vm1\n"),
    ("user-data", b"#cloud-config\nhostname: vm1\n"),
    ("network-config", b"version: 2\nethernets: {}\n"),
    ("vendor-data", b""),
];

/// xorriso as libvirt and virt-install run it: Rock Ridge and Joliet.
const XORRISO_RJ: &[&str] = &[
    "xorriso", "-as", "mkisofs", "-quiet", "-V", "cidata", "-R", "-J",
];

/// Runs `tool args... -o dir/seed.iso dir/stage` and returns the image.
fn pack(dir: &Path, tool: &[&str]) -> Vec<u8> {
    let out = dir.join("seed.iso");
    let st = Command::new(tool[0])
        .args(&tool[1..])
        .arg("-o")
        .arg(&out)
        .arg(dir.join("stage"))
        .output()
        .unwrap_or_else(|e| panic!("{} (cargo xtask deps installs it): {e}", tool[0]));
    assert!(
        st.status.success(),
        "{tool:?}: {}",
        String::from_utf8_lossy(&st.stderr)
    );
    std::fs::read(&out).unwrap()
}

/// Writes FILES into `dir/stage` and packs it with `tool`.
fn make_iso(dir: &Path, tool: &[&str]) -> Vec<u8> {
    let stage = dir.join("stage");
    for (name, bytes) in FILES {
        std::fs::write(stage.join(name), bytes).unwrap();
    }
    pack(dir, tool)
}

fn assert_seed_files(image: &[u8], names: Names) {
    let root = read_root(image).unwrap();
    assert_eq!(root.names, names);
    for (name, bytes) in FILES {
        let e = root
            .get(name)
            .unwrap_or_else(|| panic!("{name} missing from {:?}", root.entries));
        assert_eq!(e.kind, Kind::File);
        assert_eq!(
            read_file(image, e, 1 << 20, name).unwrap(),
            *bytes,
            "{name}"
        );
    }
}

#[test]
fn xorriso_rock_ridge_and_joliet() {
    let d = scratch("xorriso-rj");
    let img = make_iso(&d, XORRISO_RJ);
    assert_seed_files(&img, Names::RockRidge);
}

#[test]
fn joliet_only_uses_the_joliet_tree() {
    // (xorriso always adds Rock Ridge; genisoimage without -R does not.)
    let d = scratch("joliet");
    let img = make_iso(&d, &["genisoimage", "-quiet", "-V", "cidata", "-J"]);
    assert_seed_files(&img, Names::Joliet);
}

#[test]
fn proxmox_genisoimage_rock_ridge_without_joliet() {
    let d = scratch("proxmox");
    let img = make_iso(
        &d,
        &[
            "genisoimage",
            "-quiet",
            "-iso-level",
            "3",
            "-R",
            "-V",
            "cidata",
        ],
    );
    assert_seed_files(&img, Names::RockRidge);
}

#[test]
fn cloud_localds_genisoimage() {
    let d = scratch("localds");
    let img = make_iso(
        &d,
        &[
            "genisoimage",
            "-quiet",
            "-joliet",
            "-rock",
            "-volid",
            "cidata",
        ],
    );
    assert_seed_files(&img, Names::RockRidge);
}

#[test]
fn plain_names_are_shown_the_way_isofs_maps_them() {
    // No Rock Ridge, no Joliet: mkisofs mangles names to 8.3 upper case with `;1`, and
    // isofs shows them lower-cased without the version. NoCloud cannot use such a volume,
    // and the reader must not pretend otherwise.
    let d = scratch("plain");
    let img = make_iso(&d, &["genisoimage", "-quiet", "-V", "cidata"]);
    let root = read_root(&img[..]).unwrap();
    assert_eq!(root.names, Names::Plain);
    let mut names: Vec<_> = root.entries.iter().map(|e| e.name.as_str()).collect();
    names.sort();
    assert!(names.contains(&"meta_dat"), "{names:?}");
    assert!(root.get("meta-data").is_none());
}

#[test]
fn links_and_directories_are_not_read_as_seed_files() {
    let d = scratch("links");
    let stage = d.join("stage");
    std::fs::write(stage.join("meta-data"), "instance-id: x\n").unwrap();
    std::os::unix::fs::symlink("/etc/shadow", stage.join("user-data")).unwrap();
    std::fs::create_dir(stage.join("network-config")).unwrap();
    let img = pack(
        &d,
        &["xorriso", "-as", "mkisofs", "-quiet", "-V", "cidata", "-R"],
    );
    let root = read_root(&img[..]).unwrap();
    let ud = root.get("user-data").unwrap();
    assert_eq!(ud.kind, Kind::Special);
    let err = read_file(&img[..], ud, 1 << 20, "nocloud:/dev/sr0/user-data").unwrap_err();
    assert!(
        err.contains("/dev/sr0/user-data") && err.contains("links are refused"),
        "{err}"
    );
    let nc = root.get("network-config").unwrap();
    assert_eq!(nc.kind, Kind::Directory);
    assert!(read_file(&img[..], nc, 1 << 20, "network-config").is_err());
}

#[test]
fn many_files_across_directory_sectors_and_the_size_cap() {
    let d = scratch("many");
    let stage = d.join("stage");
    for i in 0..120 {
        std::fs::write(
            stage.join(format!("a-rather-long-file-name-{i:03}")),
            [b'x'; 10],
        )
        .unwrap();
    }
    std::fs::write(stage.join("user-data"), vec![b'#'; 5000]).unwrap();
    let img = pack(&d, XORRISO_RJ);
    let root = read_root(&img[..]).unwrap();
    assert_eq!(root.entries.len(), 121);
    assert!(root.get("a-rather-long-file-name-119").is_some());
    let ud = root.get("user-data").unwrap();
    assert_eq!(
        read_file(&img[..], ud, 5000, "user-data").unwrap().len(),
        5000
    );
    let err = read_file(&img[..], ud, 4999, "nocloud:/dev/sr0/user-data").unwrap_err();
    assert!(
        err.contains("5000 bytes exceed the 4999 byte limit"),
        "{err}"
    );
}

#[test]
fn truncated_or_foreign_volumes_are_errors_not_panics() {
    let d = scratch("trunc");
    let img = make_iso(&d, XORRISO_RJ);
    for cut in [0, 1000, 16 * 2048 + 100, 17 * 2048] {
        assert!(read_root(&img[..cut]).is_err(), "cut at {cut}");
    }
    let root = read_root(&img[..]).unwrap();
    let ud = root.get("user-data").unwrap();
    let cut = usize::try_from(ud.offset).unwrap() + 1;
    let err = read_file(&img[..cut], ud, 1 << 20, "nocloud:/dev/sr0/user-data").unwrap_err();
    assert!(err.starts_with("nocloud:/dev/sr0/user-data"), "{err}");
    assert!(read_root(&vec![0u8; 64 * 1024][..]).is_err());
}

#[test]
fn a_configdrive_is_walked_by_path_in_each_naming_mode() {
    // Proxmox's config-2 drive: OpenStack layout in subdirectories.
    for (mode, flag, names) in [
        ("rr", "-R", Names::RockRidge),
        ("joliet", "-J", Names::Joliet),
    ] {
        let d = scratch(&format!("configdrive-{mode}"));
        let stage = d.join("stage");
        std::fs::create_dir_all(stage.join("openstack/latest")).unwrap();
        std::fs::create_dir_all(stage.join("openstack/content")).unwrap();
        std::fs::write(
            stage.join("openstack/latest/meta_data.json"),
            b"{\"uuid\":\"u\"}",
        )
        .unwrap();
        std::fs::write(stage.join("openstack/content/0000"), b"auto eth0\n").unwrap();
        let img = pack(&d, &["genisoimage", "-quiet", "-V", "config-2", flag]);
        let root = read_root(&img[..]).unwrap();
        assert_eq!(root.names, names, "{mode}");
        let meta = root
            .lookup(&img[..], "openstack/latest/meta_data.json")
            .unwrap()
            .unwrap_or_else(|| panic!("{mode}: meta_data.json not found"));
        assert_eq!(
            read_file(&img[..], &meta, 1024, "m").unwrap(),
            b"{\"uuid\":\"u\"}"
        );
        let net = root
            .lookup(&img[..], "openstack/content/0000")
            .unwrap()
            .unwrap();
        assert_eq!(
            read_file(&img[..], &net, 1024, "n").unwrap(),
            b"auto eth0\n"
        );
        assert!(
            root.lookup(&img[..], "openstack/latest/user_data")
                .unwrap()
                .is_none()
        );
        assert!(
            root.lookup(&img[..], "openstack/latest/meta_data.json/x")
                .is_err()
        );
    }
}

/// A both-endian 32-bit field of ISO 9660.
fn both32(v: u32) -> Vec<u8> {
    [v.to_le_bytes(), v.to_be_bytes()].concat()
}

/// One directory record with `name` and system use area `su`.
fn record(lba: u32, size: u32, flags: u8, name: &[u8], su: &[u8]) -> Vec<u8> {
    let mut r = vec![0u8, 0];
    r.extend(both32(lba));
    r.extend(both32(size));
    r.extend([0u8; 7]);
    r.extend([flags, 0, 0, 1, 0, 0, 1, name.len() as u8]);
    r.extend(name);
    if name.len().is_multiple_of(2) {
        r.push(0);
    }
    r.extend(su);
    r[0] = r.len() as u8;
    r
}

/// A hostile Rock Ridge volume: a 256 KiB root directory whose every record continues its
/// name (`CE`) into one sector that is full of `NM` pieces (and, when `looping`,
/// continues into itself).
fn hostile_rock_ridge(looping: bool) -> (Vec<u8>, usize) {
    const S: usize = 2048;
    let (root_lba, root_sectors, ce_lba) = (20u32, 128usize, 18u32);
    let mut img = vec![0u8; S * (root_lba as usize + root_sectors + 2)];
    let root_size = (root_sectors * S) as u32;
    let sp = b"SP\x07\x01\xbe\xef\x00";
    let mut pvd = vec![0u8; S];
    pvd[..7].copy_from_slice(b"\x01CD001\x01");
    pvd[40..46].copy_from_slice(b"cidata");
    pvd[80..88].copy_from_slice(&both32((img.len() / S) as u32));
    pvd[128..132].copy_from_slice(&[0x00, 0x08, 0x08, 0x00]);
    pvd[156..190].copy_from_slice(&record(root_lba, root_size, 2, &[0], sp)[..34]);
    img[16 * S..17 * S].copy_from_slice(&pvd);
    img[17 * S..17 * S + 7].copy_from_slice(b"\xffCD001\x01");
    let mut ce = b"CE\x1c\x01".to_vec();
    ce.extend(both32(ce_lba));
    ce.extend(both32(0));
    ce.extend(both32(S as u32));
    let mut area = if looping { ce.clone() } else { Vec::new() };
    while area.len() + 255 <= S {
        area.extend(b"NM\xff\x01\x01");
        area.extend([b'a'; 250]);
    }
    let at = ce_lba as usize * S;
    img[at..at + area.len()].copy_from_slice(&area);
    let mut count = 0usize;
    for sector in 0..root_sectors {
        let mut sec = Vec::new();
        if sector == 0 {
            sec.extend(record(root_lba, root_size, 2, &[0], sp));
            sec.extend(record(root_lba, root_size, 2, &[1], &[]));
        }
        loop {
            let r = record(0, 0, 0, &[b'a' + (count % 26) as u8], &ce);
            if sec.len() + r.len() > S {
                break;
            }
            sec.extend(r);
            count += 1;
        }
        let at = (root_lba as usize + sector) * S;
        img[at..at + sec.len()].copy_from_slice(&sec);
    }
    (img, count)
}

/// Each name stops short of 254 bytes, as Linux's isofs stops it, however long its
/// pieces run (before names were capped, such a volume's 300 KB gave one name of 18 KB
/// per record and took 185 MB to read); a record whose continuation areas loop has no
/// name under isofs (it gives up on the chain) and is left out, named as broken.
#[test]
fn rock_ridge_names_are_capped_however_the_continuations_chain() {
    let (img, count) = hostile_rock_ridge(false);
    let root = read_root(&img[..]).unwrap();
    assert_eq!(root.names, Names::RockRidge);
    assert_eq!(root.entries.len(), count);
    assert!(count > 4000, "{count}");
    for e in &root.entries {
        assert!(
            e.name.len() <= 253 && e.name.len() >= 250,
            "{}",
            e.name.len()
        );
    }
    let (img, count) = hostile_rock_ridge(true);
    let root = read_root(&img[..]).unwrap();
    assert!(root.entries.is_empty());
    assert_eq!(root.broken.len(), count);
    assert!(
        root.broken[0]
            .starts_with("root directory: record a: Rock Ridge continuation areas chain more than"),
        "{}",
        root.broken[0]
    );
}

/// A volume crafted record by record: the root's `.` record carries `dot_su`, each file
/// is (ISO identifier, system use area, data); `joliet` adds a Joliet tree of
/// (UCS-2 name, data).
fn crafted(dot_su: &[u8], files: &[(&[u8], &[u8], &[u8])], joliet: &[(&str, &[u8])]) -> Vec<u8> {
    const S: usize = 2048;
    let (root_lba, joliet_lba, data_lba) = (20u32, 21u32, 24u32);
    let sectors = data_lba as usize + files.len() + joliet.len() + 1;
    let mut img = vec![0u8; S * sectors];
    let root_record = |lba: u32| record(lba, S as u32, 2, &[0], &[])[..34].to_vec();
    let mut pvd = vec![0u8; S];
    pvd[..7].copy_from_slice(b"\x01CD001\x01");
    pvd[40..46].copy_from_slice(b"cidata");
    pvd[80..88].copy_from_slice(&both32(sectors as u32));
    pvd[128..132].copy_from_slice(&[0x00, 0x08, 0x08, 0x00]);
    pvd[156..190].copy_from_slice(&root_record(root_lba));
    img[16 * S..17 * S].copy_from_slice(&pvd);
    let mut next = 17;
    if !joliet.is_empty() {
        let mut svd = pvd.clone();
        svd[0] = 2;
        svd[88..91].copy_from_slice(b"%/E");
        svd[156..190].copy_from_slice(&root_record(joliet_lba));
        img[17 * S..18 * S].copy_from_slice(&svd);
        next = 18;
    }
    img[next * S..next * S + 7].copy_from_slice(b"\xffCD001\x01");
    let mut lba = data_lba;
    let mut dir = record(root_lba, S as u32, 2, &[0], dot_su);
    dir.extend(record(root_lba, S as u32, 2, &[1], &[]));
    for (id, su, data) in files {
        dir.extend(record(lba, data.len() as u32, 0, id, su));
        img[lba as usize * S..][..data.len()].copy_from_slice(data);
        lba += 1;
    }
    img[root_lba as usize * S..][..dir.len()].copy_from_slice(&dir);
    let mut jdir = record(joliet_lba, S as u32, 2, &[0], &[]);
    jdir.extend(record(joliet_lba, S as u32, 2, &[1], &[]));
    for (name, data) in joliet {
        let id: Vec<u8> = name.encode_utf16().flat_map(u16::to_be_bytes).collect();
        jdir.extend(record(lba, data.len() as u32, 0, &id, &[]));
        img[lba as usize * S..][..data.len()].copy_from_slice(data);
        lba += 1;
    }
    if !joliet.is_empty() {
        img[joliet_lba as usize * S..][..jdir.len()].copy_from_slice(&jdir);
    }
    img
}

fn nm(name: &[u8]) -> Vec<u8> {
    let mut e = vec![b'N', b'M', 5 + name.len() as u8, 1, 0];
    e.extend(name);
    e
}

const SP: &[u8] = b"SP\x07\x01\xbe\xef\x00";

/// Which tree and which names isofs would show, on volumes no real writer makes but a
/// hostile seed may: the reader must find what cloud-init, reading through the kernel,
/// finds.
#[test]
fn names_are_chosen_as_isofs_chooses_them() {
    let seed = |root: &nixseed_core::iso9660::Root, img: &[u8]| {
        root.get("user-data")
            .map(|e| read_file(img, e, 1 << 20, "user-data").unwrap())
    };
    // Rock Ridge names without an `SP` entry, no Joliet: isofs still shows them.
    let img = crafted(&[], &[(b"U.;1", &nm(b"user-data"), b"rr")], &[]);
    let root = read_root(&img[..]).unwrap();
    assert_eq!(root.names, Names::RockRidge);
    assert_eq!(seed(&root, &img).as_deref(), Some(&b"rr"[..]));
    // `SP` without `ER`, and a Joliet tree: isofs shows the Joliet names.
    let img = crafted(
        SP,
        &[(b"U.;1", &nm(b"other"), b"rr")],
        &[("user-data;1", b"joliet")],
    );
    let root = read_root(&img[..]).unwrap();
    assert_eq!(root.names, Names::Joliet);
    assert_eq!(seed(&root, &img).as_deref(), Some(&b"joliet"[..]));
    // `ER` in the root's `.` record: Rock Ridge names, Joliet or not.
    let mut er = SP.to_vec();
    er.extend(b"ER\x0c\x01\x04\x00\x00\x01RRIP");
    let img = crafted(
        &er,
        &[(b"U.;1", &nm(b"user-data"), b"rr")],
        &[("user-data", b"joliet")],
    );
    let root = read_root(&img[..]).unwrap();
    assert_eq!(root.names, Names::RockRidge);
    assert_eq!(seed(&root, &img).as_deref(), Some(&b"rr"[..]));
    // An `NM` piece ends at a NUL; one with flags other than "continues" is passed over.
    let mut odd = nm(b"zz");
    odd[4] = 0x20;
    let img = crafted(
        &[],
        &[(b"U.;1", &[nm(b"user-data\0junk"), odd].concat(), b"nul")],
        &[],
    );
    let root = read_root(&img[..]).unwrap();
    assert_eq!(seed(&root, &img).as_deref(), Some(&b"nul"[..]));
    // Joliet names are found without regard to case or trailing dots.
    let img = crafted(&[], &[], &[("USER-DATA.;1", b"upper")]);
    let root = read_root(&img[..]).unwrap();
    assert_eq!(root.entries[0].name, "USER-DATA");
    assert_eq!(seed(&root, &img).as_deref(), Some(&b"upper"[..]));
    // Plain names: only a trailing `;1` goes; another version shows as `.2`.
    let img = crafted(
        &[],
        &[(b"USER-DATA;2", &[], b"v2"), (b"META-DATA.;1", &[], b"m")],
        &[],
    );
    let root = read_root(&img[..]).unwrap();
    assert_eq!(root.names, Names::Plain);
    let names: Vec<&str> = root.entries.iter().map(|e| e.name.as_str()).collect();
    assert_eq!(names, ["user-data.2", "meta-data"]);
}

/// A record whose continuation area is off the volume has no name under isofs, and
/// does not stop the rest of the directory from being read; it is named as broken.
#[test]
fn a_broken_record_does_not_hide_the_others() {
    let mut ce = b"CE\x1c\x01".to_vec();
    ce.extend(both32(0x7fff_ffff));
    ce.extend(both32(0));
    ce.extend(both32(28));
    let img = crafted(
        SP,
        &[
            (b"U.;1", &nm(b"user-data"), b"ok"),
            (b"ZZ.;1", &[nm(b"zz"), ce.clone()].concat(), b""),
        ],
        &[],
    );
    let root = read_root(&img[..]).unwrap();
    let e = root.get("user-data").unwrap();
    assert_eq!(read_file(&img[..], e, 1 << 20, "user-data").unwrap(), b"ok");
    assert!(root.get("zz").is_none());
    assert_eq!(root.broken.len(), 1);
    assert!(
        root.broken[0]
            .starts_with("root directory: record ZZ.;1: Rock Ridge continuation area at byte"),
        "{:?}",
        root.broken
    );
}
