//! `vm-tests`: the harness binary that `cargo xtask deps|demo|test|bench` call.

use anyhow::Result;
use clap::{Parser, Subcommand};
use vm_tests::image::{self, Variant};

#[derive(Parser)]
#[command(about = "Build the nixseed guest image and boot it under QEMU")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install host packages (apt-get), the musl target and musl-tools.
    Deps,
    /// Build (or reuse from the cache) the guest image and initramfs.
    Image {
        /// `nixseed` (default) or `cloud-init` (the benchmark anchor).
        #[arg(long, default_value = "nixseed")]
        variant: String,
    },
    /// First boot of one machine: build, boot, look around, power off; prints timings.
    BootSmoke {
        /// `nixseed` (default) or `cloud-init`.
        #[arg(long, default_value = "nixseed")]
        variant: String,
        /// Extra kernel command-line arguments, e.g. `systemd.mask=nixseed-firewall.service`.
        #[arg(long, default_value = "")]
        append: String,
        /// vCPUs (the benchmark's main series uses 1, its second series 2).
        #[arg(long, default_value_t = 1)]
        cpus: u32,
    },
    /// One machine end to end, step by step: create, boot, host key, guest agent, push,
    /// shutdown through the agent.
    Demo,
    /// Run scenarios (all when none named), one VM at a time.
    Test { scenarios: Vec<String> },
    /// Which code a first run of the initrd stage makes the emulator translate, by crate
    /// and function (QEMU's `in_asm` log around one run in a booted guest).
    StageProfile,
    /// nixseed vs cloud-init + qemu-ga in real VMs (boot, provisioning, agent RSS, ping),
    /// plus the host-side benchmarks; prints markdown and rewrites docs/benchmarks.md.
    Bench {
        /// Boots per image in each series (at least 3). Five by default: on a shared host
        /// one boot can be a fifth slower than the next, and the median of five moves less.
        #[arg(long, default_value_t = 5)]
        boots: usize,
        /// guest-ping round trips per boot.
        #[arg(long, default_value_t = 200)]
        pings: usize,
        /// Skip the host-side benchmarks (apply, qga, seed).
        #[arg(long)]
        no_host: bool,
        /// Print only; leave docs/benchmarks.md alone.
        #[arg(long)]
        no_write: bool,
        /// A second series of boots of both images with N vCPUs (boot to sshd only); 0 skips it.
        #[arg(long, default_value_t = 2, value_name = "N")]
        wide_cpus: u32,
    },
}

fn parse_variant(s: &str) -> Result<Variant> {
    match s {
        "nixseed" => Ok(Variant::Nixseed),
        "cloud-init" => Ok(Variant::CloudInit),
        other => anyhow::bail!("unknown image variant '{other}' (use nixseed or cloud-init)"),
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Deps => vm_tests::deps::ensure_all(),
        Cmd::Image { variant } => {
            let variant = parse_variant(&variant)?;
            let img = build_image(variant)?;
            println!("base image: {}", img.base_qcow2.display());
            println!(
                "kernel:     {} ({})",
                img.kernel.display(),
                img.kernel_release
            );
            println!("initramfs:  {}", img.initramfs.display());
            Ok(())
        }
        Cmd::BootSmoke {
            variant,
            append,
            cpus,
        } => vm_tests::scenarios::boot_smoke(parse_variant(&variant)?, &append, cpus),
        Cmd::Demo => vm_tests::demo::run(),
        Cmd::StageProfile => vm_tests::profile::run(),
        Cmd::Bench {
            boots,
            pings,
            no_host,
            no_write,
            wide_cpus,
        } => vm_tests::bench::run(&vm_tests::bench::BenchOpts {
            boots,
            pings,
            host: !no_host,
            write_doc: !no_write,
            wide_cpus,
        }),
        Cmd::Test { scenarios } => {
            if !vm_tests::scenarios::run_tests(&scenarios)? {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

/// Tree first (slow, independent of the agent), then the agent build, then the final layer.
fn build_image(variant: Variant) -> Result<image::GuestImage> {
    let tree_time = image::prepare_tree(variant)?;
    let agent = match variant {
        Variant::Nixseed => Some(vm_tests::deps::build_agent()?),
        Variant::CloudInit => None,
    };
    let mut img = image::prepare(variant, agent.as_deref())?;
    img.timings.tree = tree_time;
    match img.timings.tree {
        Some(t) => println!("tree layer built in {:.1} s", t.as_secs_f64()),
        None => println!("tree layer from cache"),
    }
    match img.timings.final_layer {
        Some(t) => println!("final layer built in {:.1} s", t.as_secs_f64()),
        None => println!("final layer from cache"),
    }
    Ok(img)
}
