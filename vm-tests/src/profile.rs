//! `vm-tests stage-profile`: which code a first run of the initrd stage makes the emulator
//! translate, by crate and by function.
//!
//! Under TCG the first execution of any code pays for its translation, and the boot's
//! initrd stage is such a first run: most of its time in the benchmark is translation,
//! not work. QEMU can log every block it translates (`log in_asm` on its monitor); this
//! turns on that log around one run of the stage in a booted guest, finds the agent's
//! blocks in it, and names them with the symbols of a build that differs from the
//! shipped binary only by keeping them (its code is checked to be byte-identical).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, Result, bail};

use crate::bench::{SCRATCH_ROOT, stage_rerun};
use crate::cmd;
use crate::deps;
use crate::image::Variant;
use crate::scenarios::Harness;

/// One translated block: its first guest address and its instruction count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Block {
    pub pc: u64,
    pub insns: u32,
}

/// Blocks from QEMU's `in_asm` log: each is a `IN:` line followed by one line per
/// instruction, `0x<address>:  <bytes> <mnemonic>`.
pub fn parse_in_asm(log: &str) -> Vec<Block> {
    let mut out = Vec::new();
    let mut current: Option<Block> = None;
    for line in log.lines() {
        if line.starts_with("IN:") {
            out.extend(current.take());
            current = Some(Block { pc: 0, insns: 0 });
            continue;
        }
        let Some(b) = current.as_mut() else { continue };
        let Some(addr) = line
            .strip_prefix("0x")
            .and_then(|rest| rest.split(':').next())
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        else {
            continue;
        };
        if b.insns == 0 {
            b.pc = addr;
        }
        b.insns += 1;
    }
    out.extend(current);
    out.retain(|b| b.insns > 0);
    out
}

/// The layout of the agent binary that locates its blocks in the guest's address space.
#[derive(Debug, Clone, Copy)]
pub struct Layout {
    /// `e_entry`, relative to the load address (the binary is position-independent).
    pub entry: u64,
    /// End of the highest `PT_LOAD` segment, relative to the load address.
    pub span: u64,
}

/// Where the agent was loaded. Every block that could be its entry point (the same
/// offset in its page) proposes a base; the right one is where many blocks begin exactly
/// at the start of one of the agent's functions (`starts`, sorted), as called functions do.
pub fn find_base(blocks: &[Block], layout: Layout, starts: &[u64]) -> Option<u64> {
    const USER_END: u64 = 0x0000_8000_0000_0000;
    let user: Vec<u64> = blocks
        .iter()
        .map(|b| b.pc)
        .filter(|&pc| pc < USER_END)
        .collect();
    let mut candidates: Vec<u64> = user
        .iter()
        .filter_map(|&pc| pc.checked_sub(layout.entry))
        .filter(|base| base & 0xfff == 0)
        .collect();
    candidates.sort_unstable();
    candidates.dedup();
    let hits = |base: u64| {
        user.iter()
            .filter(|&&pc| pc >= base && pc < base + layout.span)
            .filter(|&&pc| starts.binary_search(&(pc - base)).is_ok())
            .count()
    };
    candidates
        .into_iter()
        .map(|base| (hits(base), base))
        .max()
        .filter(|(n, _)| *n >= 20)
        .map(|(_, base)| base)
}

/// The crate a demangled Rust symbol belongs to; C symbols (musl's libc) are `libc`.
pub fn crate_of(symbol: &str) -> String {
    let s = symbol.trim_start_matches(['<', '&', '*', ' ', '(', '[']);
    let s = s
        .strip_prefix("mut ")
        .or_else(|| s.strip_prefix("dyn "))
        .or_else(|| s.strip_prefix("const "))
        .unwrap_or(s);
    // `<W as core::fmt::Write>::write_str`: a generic type, so the trait's crate.
    let s = match s.split_once(" as ") {
        Some((ty, rest)) if !ty.contains("::") => rest,
        _ => s,
    };
    if !s.contains("::") {
        return "libc (musl)".into();
    }
    let head = s.split("::").next().unwrap_or(s);
    head.split(['<', ' ', '>', '(', '[', ']'])
        .next()
        .unwrap_or(head)
        .to_string()
}

/// Function addresses from the linker's map of the shipped binary, sorted, with names
/// demangled (`c++filt` reads Rust's legacy mangling) and their hashes dropped.
struct Symbols(Vec<(u64, String)>);

impl Symbols {
    fn from_map(map: &str) -> Result<Symbols> {
        let mut raw = parse_map(map);
        raw.sort_by_key(|(a, _)| *a);
        let mut child = Command::new("c++filt")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .context("running c++filt (binutils)")?;
        let input: String = raw.iter().map(|(_, n)| format!("{n}\n")).collect();
        let mut stdin = child.stdin.take().context("c++filt's stdin")?;
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            stdin.write_all(input.as_bytes())
        });
        let out = child.wait_with_output().context("reading c++filt")?;
        writer
            .join()
            .map_err(|_| anyhow::anyhow!("writing to c++filt panicked"))?
            .context("writing to c++filt")?;
        let names = String::from_utf8_lossy(&out.stdout);
        let demangled: Vec<&str> = names.lines().collect();
        if demangled.len() != raw.len() {
            bail!("c++filt gave {} names for {}", demangled.len(), raw.len());
        }
        Ok(Symbols(
            raw.iter()
                .zip(demangled)
                .map(|((a, _), d)| (*a, drop_hash(d)))
                .collect(),
        ))
    }

    fn name(&self, offset: u64) -> &str {
        let i = self.0.partition_point(|(a, _)| *a <= offset);
        match i {
            0 => "?",
            i => &self.0[i - 1].1,
        }
    }
}

/// `(address, mangled name)` of each `.text.<name>` input section placed in the output
/// (GNU ld's map, `-Wl,-Map`; functions have sections of their own). The name and the
/// address are on one line, or on two when the name is long.
pub fn parse_map(map: &str) -> Vec<(u64, String)> {
    let placed = map
        .find("Linker script and memory map")
        .map_or("", |i| &map[i..]);
    let mut out = Vec::new();
    let mut pending: Option<&str> = None;
    for line in placed.lines() {
        let mut t = line.split_whitespace();
        let Some(first) = t.next() else { continue };
        let (name, addr) = match first.strip_prefix(".text.") {
            Some(name) => (Some(name), t.next()),
            None if first.starts_with("0x") => (pending.take(), Some(first)),
            None => {
                pending = None;
                continue;
            }
        };
        let Some(name) = name else { continue };
        match addr.and_then(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok()) {
            Some(a) if a != 0 => out.push((a, name.to_string())),
            Some(_) => {}
            None => pending = Some(name),
        }
    }
    out
}

/// `std[7b12…]::foo::bar::h0123456789abcdef` → `std::foo::bar`: the hash and the crates'
/// disambiguators dropped.
fn drop_hash(name: &str) -> String {
    let is_hash = |h: &str| h.len() == 16 && h.bytes().all(|b| b.is_ascii_hexdigit());
    let name = match name.rsplit_once("::h") {
        Some((head, h)) if is_hash(h) => head,
        _ => name,
    };
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(i) = rest.find('[') {
        out.push_str(&rest[..i]);
        match rest[i + 1..].split_once(']') {
            Some((inside, after)) if is_hash(inside) => rest = after,
            _ => {
                out.push('[');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

fn layout_of(bin: &Path) -> Result<Layout> {
    let out = cmd::stdout(Command::new("readelf").args(["-hlW"]).arg(bin))?;
    let entry = out
        .lines()
        .find_map(|l| l.trim().strip_prefix("Entry point address:"))
        .and_then(|v| u64::from_str_radix(v.trim().trim_start_matches("0x"), 16).ok())
        .with_context(|| format!("no entry point in `readelf -h {}`", bin.display()))?;
    let span = out
        .lines()
        .filter(|l| l.trim_start().starts_with("LOAD"))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let vaddr = u64::from_str_radix(f.get(2)?.trim_start_matches("0x"), 16).ok()?;
            let memsz = u64::from_str_radix(f.get(5)?.trim_start_matches("0x"), 16).ok()?;
            Some(vaddr + memsz)
        })
        .max()
        .with_context(|| format!("no LOAD segment in `readelf -l {}`", bin.display()))?;
    Ok(Layout { entry, span })
}

/// The linker's map of the shipped agent: its last link run again with `-Wl,-Map`, which
/// must leave the binary byte for byte as it was.
fn link_map(shipped: &Path) -> Result<String> {
    let dir = crate::paths::workspace_root().join("target/stage-profile");
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let map = dir.join("nixseed-agent.map");
    let before =
        std::fs::read(shipped).with_context(|| format!("reading {}", shipped.display()))?;
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut c = Command::new(cargo);
    c.current_dir(crate::paths::workspace_root())
        .args([
            "rustc",
            "--release",
            "-p",
            "nixseed-agent",
            "--bin",
            "nixseed-agent",
        ])
        .args(["--target", deps::MUSL, "--", "-C"])
        .arg(format!("link-arg=-Wl,-Map={}", map.display()));
    cmd::run_visible(&mut c)?;
    let after = std::fs::read(shipped).with_context(|| format!("reading {}", shipped.display()))?;
    if before != after {
        bail!(
            "linking {} again with a map changed it: the map would not describe the shipped code",
            shipped.display()
        );
    }
    std::fs::read_to_string(&map).with_context(|| format!("reading {}", map.display()))
}

#[derive(Default)]
struct Tally {
    blocks: u64,
    insns: u64,
}

impl Tally {
    fn add(&mut self, b: &Block) {
        self.blocks += 1;
        self.insns += u64::from(b.insns);
    }
}

fn table(title: &str, rows: &BTreeMap<String, Tally>, total: u64, limit: usize) {
    let mut v: Vec<_> = rows.iter().collect();
    v.sort_by_key(|b| std::cmp::Reverse(b.1.insns));
    println!("\n| {title} | blocks | instructions | share |\n|---|---:|---:|---:|");
    for (name, t) in v.iter().take(limit) {
        let share = 100.0 * t.insns as f64 / total.max(1) as f64;
        println!(
            "| `{}` | {} | {} | {share:.1}% |",
            name.replace('|', "\\|"),
            t.blocks,
            t.insns
        );
    }
}

/// Boots a machine, logs the translation of one stage run, and prints the tables.
pub fn run() -> Result<()> {
    let h = Harness::setup(Variant::Nixseed)?;
    let shipped = deps::build_agent()?;
    let layout = layout_of(&shipped)?;
    let symbols = Symbols::from_map(&link_map(&shipped)?)?;
    let m = h.new_machine("stage-profile")?;
    let b = h.boot(&m)?;
    let prepare = format!(
        "set -e; d=/run/nixseed-profile; img=/var/tmp/nixseed-profile.img; mkdir -p $d/r\n{SCRATCH_ROOT}"
    );
    b.ssh
        .run(&prepare)
        .context("preparing a scratch root in the guest")?;
    let log = b.vm.config.runtime_dir.join("in_asm.log");
    let _ = std::fs::remove_file(&log);
    let hmp = |line: String| {
        b.vm.qmp(
            "human-monitor-command",
            serde_json::json!({ "command-line": line }),
        )
    };
    hmp(format!("logfile {}", log.display()))?;
    hmp("log in_asm".into())?;
    let stage = b.ssh.run(&stage_rerun(
        "/run/nixseed-profile/s",
        "/run/nixseed-profile/r",
    ));
    hmp("log none".into())?;
    hmp("logfile /dev/null".into())?;
    let stage = stage.context("running the stage in the guest")?;
    b.poweroff()?;
    let text =
        std::fs::read_to_string(&log).with_context(|| format!("reading {}", log.display()))?;
    let blocks = parse_in_asm(&text);
    let starts: Vec<u64> = symbols.0.iter().map(|(a, _)| *a).collect();
    let base = find_base(&blocks, layout, &starts).with_context(|| {
        format!(
            "no run of blocks in {} looks like the agent (entry {:#x}, span {:#x})",
            log.display(),
            layout.entry,
            layout.span
        )
    })?;
    let (mut kernel, mut agent, mut other) = (Tally::default(), Tally::default(), Tally::default());
    let mut crates: BTreeMap<String, Tally> = BTreeMap::new();
    let mut functions: BTreeMap<String, Tally> = BTreeMap::new();
    for blk in &blocks {
        if blk.pc >= 0xffff_8000_0000_0000 {
            kernel.add(blk);
        } else if blk.pc >= base && blk.pc < base + layout.span {
            agent.add(blk);
            let name = symbols.name(blk.pc - base);
            crates.entry(crate_of(name)).or_default().add(blk);
            functions.entry(name.to_string()).or_default().add(blk);
        } else {
            other.add(blk);
        }
    }
    println!(
        "stage (translation logged, so slower than a boot): {}",
        stage.trim()
    );
    println!("agent loaded at {base:#x}; blocks translated while the stage ran:\n");
    println!("| code | blocks | instructions |\n|---|---:|---:|");
    for (name, t) in [
        ("nixseed-agent", &agent),
        ("kernel", &kernel),
        ("other processes", &other),
    ] {
        println!("| {name} | {} | {} |", t.blocks, t.insns);
    }
    table("crate (agent only)", &crates, agent.insns, 40);
    table("function (agent only)", &functions, agent.insns, 60);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_come_from_in_asm_lines() {
        let log = "----------------\nIN: \n0x7ffff7f00010:  48 89 e7  movq %rsp, %rdi\n\
                   0x7ffff7f00013:  e8 00 00 00 00  callq 0x7ffff7f00018\n\n\
                   ----------------\nIN: \n0xffffffff81000000:  90  nop\n\n";
        assert_eq!(
            parse_in_asm(log),
            vec![
                Block {
                    pc: 0x7ffff7f00010,
                    insns: 2
                },
                Block {
                    pc: 0xffffffff81000000,
                    insns: 1
                }
            ]
        );
    }

    #[test]
    fn the_base_is_where_blocks_start_at_the_agents_functions() {
        let layout = Layout {
            entry: 0x1234,
            span: 0x10000,
        };
        let starts: Vec<u64> = (0..40).map(|i| 0x2000 + i * 0x40).collect();
        // Another process's block at the entry's page offset, with blocks of its own after.
        let mut blocks = vec![Block {
            pc: 0x5555_0000_1234,
            insns: 3,
        }];
        blocks.extend((0..100).map(|i| Block {
            pc: 0x5555_0000_1300 + i * 8,
            insns: 2,
        }));
        blocks.push(Block {
            pc: 0x7fff_f000_1234,
            insns: 1,
        });
        blocks.extend(starts.iter().map(|s| Block {
            pc: 0x7fff_f000_0000 + s,
            insns: 2,
        }));
        assert_eq!(find_base(&blocks, layout, &starts), Some(0x7fff_f000_0000));
        assert_eq!(find_base(&blocks[..101], layout, &starts), None);
    }

    #[test]
    fn functions_are_read_from_the_link_map() {
        let map = "Discarded input sections\n .text.gone\n                0x0000000000000000       0x10 a.o\n\
                   Linker script and memory map\n .text          0x0000000000001000   0x500\n\
                   .text.memcpy   0x0000000000001000       0x30 libc.a(memcpy.o)\n\
                   .text._ZN4core3fmt5write17h0123456789abcdefE\n\
                                  0x0000000000001040       0x80 agent.o\n";
        assert_eq!(
            parse_map(map),
            vec![
                (0x1000, "memcpy".to_string()),
                (0x1040, "_ZN4core3fmt5write17h0123456789abcdefE".to_string())
            ]
        );
        assert_eq!(
            drop_hash("core::fmt::write::h0123456789abcdef"),
            "core::fmt::write"
        );
        assert_eq!(drop_hash("memcpy"), "memcpy");
        assert_eq!(
            drop_hash("<std[7b120257af0c47a5]::fs::DirBuilder>::_create::h0123456789abcdef"),
            "<std::fs::DirBuilder>::_create"
        );
        assert_eq!(drop_hash("<[u8]>::to_vec"), "<[u8]>::to_vec");
    }

    #[test]
    fn crates_are_read_from_demangled_names() {
        assert_eq!(crate_of("serde_yaml::de::Deserializer::de"), "serde_yaml");
        assert_eq!(
            crate_of(
                "<serde_yaml::de::DeserializerFromEvents as serde::de::Deserializer>::deserialize_any"
            ),
            "serde_yaml"
        );
        assert_eq!(crate_of("<&mut W as core::fmt::Write>::write_str"), "core");
        assert_eq!(crate_of("memcpy"), "libc (musl)");
    }
}
