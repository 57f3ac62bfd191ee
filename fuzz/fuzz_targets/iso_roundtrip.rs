//! The seed ISO writer's inverse: whatever names and contents are built into an image,
//! reading it back gives exactly them; and reading arbitrary bytes (a root listing, a
//! ConfigDrive path walk) never panics.
#![no_main]
use seedctl::iso9660::{IsoOptions, build, read_root};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // The input becomes the image from sector 16 on, where the volume descriptors are
    // read first; the system area before it is zeros.
    let mut image = vec![0u8; 16 * 2048];
    image.extend_from_slice(data);
    let _ = read_root(&image);
    // The guest agent's own walk: a ConfigDrive path through arbitrary directories.
    if let Ok(root) = nixseed_core::iso9660::read_root(&image[..]) {
        if let Ok(Some(e)) = root.lookup(&image[..], "openstack/latest/meta_data.json") {
            let _ = nixseed_core::iso9660::read_file(&image[..], &e, 1 << 20, "meta_data.json");
        }
    }
    // Split the input into (name, content) pairs: name bytes up to ':', content to '\n'.
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    for line in data.split(|b| *b == b'\n').take(40) {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let name: String = String::from_utf8_lossy(&line[..colon])
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .take(40)
            .collect();
        if name.is_empty() || files.iter().any(|(n, _)| *n == name) {
            continue;
        }
        files.push((name, line[colon + 1..].to_vec()));
    }
    let list: Vec<(&str, &[u8])> = files.iter().map(|(n, b)| (n.as_str(), b.as_slice())).collect();
    let Ok(image) = build(&list, &IsoOptions { volume_id: "cidata", epoch: 1_577_836_800 }) else {
        return;
    };
    let mut back = read_root(&image).expect("an image the writer made must read back");
    back.sort();
    files.sort();
    assert_eq!(back, files);
});
