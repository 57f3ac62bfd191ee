//! `seedctl build`: `nix build` of the guest image with a spinner; the result becomes
//! the default base for `seedctl create`.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Args;
use serde_json::json;

use crate::fsutil::write_atomic;
use crate::machine::Paths;
use crate::output::Report;
use crate::state::{BASE_ROOTS, DEFAULT_BASE};

#[derive(Debug, Args)]
#[command(after_help = "Examples:
  seedctl build                       # .#nixseed-image
  seedctl build github:me/fleet#web-image")]
pub struct BuildArgs {
    /// Flake output that builds a qcow2 image (a file, or a directory holding one)
    #[arg(default_value = ".#nixseed-image")]
    pub installable: String,
}

/// The qcow2 inside a build result (the path itself when it is a file).
fn image_in(out: &std::path::Path) -> Result<PathBuf> {
    if out.is_file() {
        return Ok(out.to_owned());
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(out)
        .with_context(|| format!("listing {}", out.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "qcow2"))
        .collect();
    found.sort();
    found
        .into_iter()
        .next()
        .with_context(|| format!("build result {} holds no .qcow2 image", out.display()))
}

pub fn run(paths: &Paths, a: &BuildArgs) -> Result<Report> {
    // Every overlay made from the result uses it as its backing file: each build keeps a
    // garbage-collector root of its own, so `nix-collect-garbage` cannot remove a base
    // that machines still boot from (an older one stays until its link is removed).
    let roots = paths.state.join(BASE_ROOTS);
    std::fs::create_dir_all(&roots).with_context(|| format!("creating {}", roots.display()))?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    // Two builds within one second each keep their own root (nix would replace a link).
    let link = (1..)
        .map(|n| match n {
            1 => roots.join(format!("result-{stamp}")),
            n => roots.join(format!("result-{stamp}-{n}")),
        })
        .find(|l| std::fs::symlink_metadata(l).is_err())
        .unwrap_or_else(|| roots.join(format!("result-{stamp}")));
    let link = std::path::absolute(&link).unwrap_or(link);
    // Flakes and the `nix` command are still experimental in upstream Nix and off in a
    // default install; the flag turns them on for this command only, and does nothing
    // where they are on already.
    let mut child = Command::new("nix")
        .args(["--extra-experimental-features", "nix-command flakes"])
        .args(["build", "--print-out-paths", "-L", "--out-link"])
        .arg(&link)
        .arg(&a.installable)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running `nix build`; install nix (https://nixos.org/download)")?;
    let spinner = indicatif::ProgressBar::new_spinner();
    spinner.set_message(format!("nix build {}", a.installable));
    spinner.enable_steady_tick(Duration::from_millis(120));
    let mut stderr = child.stderr.take().context("capturing nix output")?;
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .context("capturing nix output")?
        .read_to_string(&mut stdout)
        .context("reading nix output")?;
    let status = child.wait().context("waiting for nix build")?;
    let log = log.join().unwrap_or_default();
    spinner.finish_and_clear();
    if !status.success() {
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "`nix build {}` failed ({status}):\n{}",
            a.installable,
            tail.join("\n")
        );
    }
    let out = stdout
        .lines()
        .last()
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(PathBuf::from);
    let out =
        out.with_context(|| format!("`nix build {}` printed no output path", a.installable))?;
    let image = image_in(&out)?;
    std::fs::create_dir_all(&paths.state)
        .with_context(|| format!("creating {}", paths.state.display()))?;
    write_atomic(
        &paths.state.join(DEFAULT_BASE),
        format!("{}\n", image.display()).as_bytes(),
        0o644,
    )?;
    Ok(Report::new(
        format!(
            "built {}\ndefault base for `seedctl create`: {}\nkept from garbage collection by {}",
            out.display(),
            image.display(),
            link.display()
        ),
        json!({ "out_path": out, "image": image, "gc_root": link }),
    ))
}
