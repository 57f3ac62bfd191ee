//! nixseed-agent: the guest binary. `initrd` and `apply` give a VM its identity from a
//! seed; `serve` answers the qemu-guest-agent protocol; `render` is a dry run.

mod accounts;
mod channel;
mod commands;
mod crashpoint;
mod dbus;
mod logging;
mod mounts;
mod port_events;
mod qga;
mod reload;
mod serve;
mod sources;
mod stage;
mod store;
mod vsock;
mod write_files;

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};
use nixseed_core::decide::ClonePolicy;

#[derive(Parser)]
#[command(
    name = "nixseed-agent",
    version,
    about = "nixseed guest agent: identity from a seed, qemu-guest-agent protocol"
)]
struct Cli {
    /// Debug logging.
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Before switch-root: apply the seed under SYSROOT and bind /etc placeholders.
    Initrd(StageArgs),
    /// Stage 2: verify what the initrd stage did, or do the whole job late.
    Apply(StageArgs),
    /// Dry run: write the tree a seed directory would produce into OUT.
    Render(RenderArgs),
    /// Print the current generation's manifest.
    Status(StatusArgs),
    /// Answer the qemu-guest-agent protocol (qemu-ga compatible flags).
    Serve(serve::ServeArgs),
    /// Serve only the nixseed control channel (status, push, rollback).
    Channel(ChannelArgs),
    /// Load the identity's ports as the nftables table `inet nixseed`.
    Firewall(StatusArgs),
}

#[derive(Args)]
struct ChannelArgs {
    #[command(flatten)]
    stage: StageArgs,
    /// Transport.
    #[arg(short = 'm', long, value_enum, default_value = "virtio-serial")]
    method: serve::Method,
    /// Device or socket path.
    #[arg(short = 'p', long, default_value = channel::DEFAULT_PORT)]
    path: PathBuf,
}

#[derive(Args, Clone)]
struct StageArgs {
    /// The target root.
    #[arg(long, default_value = "/")]
    sysroot: PathBuf,
    /// Test root holding sys/, proc/, dev/ (defaults to /).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// The /run directory that survives switch-root.
    #[arg(long, default_value = "/run")]
    run: PathBuf,
    /// What to do when the VM was cloned: regenerate, adopt or refuse.
    #[arg(long, default_value = "regenerate")]
    clone_policy: ClonePolicy,
    /// Seed sources to try, in order (comma-separated).
    #[arg(long, value_delimiter = ',')]
    sources: Option<Vec<String>>,
    /// The identity directory inside the target root.
    #[arg(long, default_value = "/var/identity")]
    identity_dir: String,
    /// Seconds to wait for the host on the control channel when no seed disk is found
    /// (0 disables asking).
    #[arg(long, default_value_t = 5)]
    channel_wait: u64,
    /// Seconds to wait, when no seed is found while udevd still has device events queued,
    /// for the queue to empty before the seed volumes are tried again (0 disables waiting).
    #[arg(long, default_value_t = 5)]
    udev_wait: u64,
    /// Load the identity's ports as the nftables `inet nixseed` table (stage 2).
    #[arg(long)]
    firewall: bool,
    /// Run the seed's bootcmd (every boot, waited for) and runcmd (once per instance, queued
    /// after multi-user.target) in transient units (stage 2).
    #[arg(long)]
    run_commands: bool,
    /// OpenSSH public keys (one per line) a seed must be signed with; without it,
    /// unsigned seeds are accepted.
    #[arg(long, value_name = "FILE")]
    trusted_keys: Option<PathBuf>,
}

#[derive(Args)]
struct RenderArgs {
    /// A NoCloud seed directory (meta-data, user-data, network-config).
    #[arg(long)]
    seed: PathBuf,
    /// Where to write the identity tree.
    #[arg(long)]
    out: PathBuf,
    /// A guest NIC as NAME=MAC, to match network-config by MAC (repeatable).
    #[arg(long = "link", value_name = "NAME=MAC")]
    links: Vec<nixseed_core::network::Link>,
}

#[derive(Args)]
struct StatusArgs {
    #[arg(long, default_value = "/var/identity")]
    identity_dir: PathBuf,
}

impl StageArgs {
    fn options(&self) -> Result<stage::StageOptions> {
        if let Some(names) = &self.sources {
            let known = sources::names();
            for n in names {
                anyhow::ensure!(
                    known.contains(&n.as_str()),
                    "unknown source '{n}' (known: {})",
                    known.join(", ")
                );
            }
        }
        let abs = |p: &PathBuf| {
            std::fs::canonicalize(p).with_context(|| format!("{}: no such directory", p.display()))
        };
        Ok(stage::StageOptions {
            sysroot: abs(&self.sysroot)?,
            host: abs(&self.root)?,
            run: abs(&self.run)?,
            clone_policy: self.clone_policy,
            sources: self.sources.clone(),
            identity_dir: self.identity_dir.clone(),
            channel_wait: std::time::Duration::from_secs(self.channel_wait),
            udev_wait: std::time::Duration::from_secs(self.udev_wait),
            trust: stage::load_trust(self.trusted_keys.as_deref())?,
            durability: store::Durability::Now,
        })
    }
}

fn main() -> ExitCode {
    let cli = parse_args();
    logging::init(cli.verbose);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The command line, parsed on a short-lived thread. clap builds the whole command tree
/// in one derived function whose frame is about 60 KiB; on the main thread those stack
/// pages would stay resident for as long as the process runs, which for `serve` is the
/// VM's lifetime. A thread's stack is unmapped when it is joined.
fn parse_args() -> Cli {
    let argv = serve::qemu_ga_argv(std::env::args_os());
    let parsed = std::thread::Builder::new()
        .name("args".into())
        .stack_size(PARSE_STACK)
        .spawn(move || Cli::parse_from(argv));
    match parsed.map(|t| t.join()) {
        Ok(Ok(cli)) => cli,
        // No thread to be had (or it panicked): parse here, at the cost of the stack.
        _ => Cli::parse_from(serve::qemu_ga_argv(std::env::args_os())),
    }
}

/// The parsing thread's stack: the derived builder's frame and clap's own calls, with room
/// for a debug build's larger frames. Only the pages touched are ever resident.
const PARSE_STACK: usize = 1024 * 1024;

fn run(command: Command) -> Result<()> {
    match command {
        Command::Initrd(a) => {
            let opts = stage::StageOptions {
                durability: store::Durability::Deferred,
                ..a.options()?
            };
            let o = stage::run_boot_stage(&opts, stage::BindTime::Initrd)?;
            tracing::info!("{}", stage::summary("initrd", &o));
        }
        Command::Apply(a) => {
            let opts = a.options()?;
            let o = stage::run_apply(&opts)?;
            tracing::info!("{}", stage::summary("apply", &o));
            let dir = opts.sysroot.join(opts.identity_dir.trim_start_matches('/'));
            if a.firewall {
                reload::load_firewall(&dir)?;
                tracing::info!(
                    "firewall: loaded the inet nixseed table from {}",
                    dir.display()
                );
            }
            if a.run_commands {
                let store = store::Store::open(&dir, false)?;
                if let Some(g) = store.current()? {
                    commands::run(&opts.sysroot, &dir, &g.manifest.instance_id)?;
                }
            }
        }
        Command::Render(a) => render(&a)?,
        Command::Firewall(a) => {
            reload::load_firewall(&a.identity_dir)?;
            tracing::info!(
                "firewall: loaded the inet nixseed table from {}",
                a.identity_dir.display()
            );
        }
        Command::Serve(a) => serve::main(a)?,
        Command::Channel(a) => {
            let ctx = channel::ChannelContext {
                opts: a.stage.options()?,
                firewall: a.stage.firewall,
            };
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the runtime")?
                .block_on(channel::run(a.method, &a.path, ctx))?;
        }
        Command::Status(a) => {
            let store = store::Store::open(&a.identity_dir, false)?;
            match store.current()? {
                Some(g) => println!("{}", String::from_utf8_lossy(&g.manifest.to_bytes())),
                None => println!("no identity yet in {}", a.identity_dir.display()),
            }
        }
    }
    Ok(())
}

fn render(a: &RenderArgs) -> Result<()> {
    use nixseed_core::identity::{ComposeContext, compose};
    use nixseed_core::manifest::Manifest;
    let files = sources::read_seed_files(&a.seed, nixseed_core::nocloud::SEED_FILES)?;
    let source = format!("nocloud:{}", a.seed.display());
    let seed = nixseed_core::seed::Seed::from_nocloud(&files, &source, None)?;
    for w in &seed.warnings {
        tracing::warn!("{w}");
    }
    let ctx = ComposeContext {
        links: a.links.clone(),
        regenerate: false,
    };
    let tree = compose(&seed, None, &ctx, &mut nixseed_core::fresh::OsFresh)?;
    let store = store::Store::open(&a.out, true)?;
    let n = store.write_generation(
        &tree,
        Manifest {
            generation: 0,
            instance_id: seed.instance_id.clone(),
            source,
            product_uuid: None,
            seed_digest: seed.digest.clone(),
            files: Default::default(),
            seed_generation: None,
        },
        store::Durability::Now,
    )?;
    for (name, f) in &tree {
        println!("{:o} {name} ({} bytes)", f.mode, f.bytes.len());
    }
    println!("wrote generation {n} to {}", a.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hook(argv: &[&str]) -> Option<PathBuf> {
        let argv = serve::qemu_ga_argv(argv.iter().map(Into::into));
        match Cli::try_parse_from(&argv).map(|c| c.command) {
            Ok(Command::Serve(s)) => s.fsfreeze_hook,
            Ok(_) => panic!("not the serve command"),
            Err(e) => panic!("{argv:?} did not parse: {e}"),
        }
    }

    #[test]
    fn fsfreeze_hook_takes_every_qemu_ga_spelling() {
        let default = Some(PathBuf::from(serve::DEFAULT_FSFREEZE_HOOK));
        assert_eq!(hook(&["a", "serve", "-F"]), default);
        assert_eq!(hook(&["a", "serve", "-F/x/hook"]), Some("/x/hook".into()));
        assert_eq!(hook(&["a", "serve", "-F=/y"]), Some("/y".into()));
        assert_eq!(
            hook(&["a", "serve", "--fsfreeze-hook=/z"]),
            Some("/z".into())
        );
        assert_eq!(hook(&["a", "serve"]), None);
    }

    #[test]
    fn serve_takes_the_clone_policy_the_boot_stages_take() {
        let parse = |argv: &[&str]| match Cli::try_parse_from(argv).map(|c| c.command) {
            Ok(Command::Serve(s)) => s.clone_policy.unwrap_or_default(),
            _ => panic!("{argv:?} did not parse as serve"),
        };
        assert_eq!(parse(&["a", "serve"]), ClonePolicy::Regenerate);
        assert_eq!(
            parse(&["a", "serve", "--clone-policy", "refuse"]),
            ClonePolicy::Refuse
        );
        assert!(Cli::try_parse_from(["a", "serve", "--clone-policy", "maybe"]).is_err());
    }

    #[test]
    fn a_path_value_that_looks_like_the_hook_flag_stays_a_path() {
        let argv = serve::qemu_ga_argv(["a", "serve", "-p", "-Fodd"].map(Into::into));
        let Ok(Command::Serve(s)) = Cli::try_parse_from(argv).map(|c| c.command) else {
            panic!("did not parse");
        };
        assert_eq!(s.path, Some("-Fodd".into()));
        assert_eq!(s.fsfreeze_hook, None);
    }
}
