//! nixseed-agent's guest programs. `initrd` and `apply` give a VM its identity from a
//! seed; `serve` answers the qemu-guest-agent protocol; `render` is a dry run.

mod accounts;
mod channel;
mod cli;
mod commands;
mod crashpoint;
mod dbus;
mod identity_lock;
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
use cli::{Command, RenderArgs, StageArgs};

impl StageArgs {
    /// The stage's options. A wrong source name or an unreadable trusted-keys file does
    /// not stop the stage, which still binds the current generation (a boot with no
    /// identity has no host key): an unknown source is left out (all of them: the
    /// default list), and keys that cannot be read trust no seed at all.
    fn options(&self) -> Result<stage::StageOptions> {
        let known = sources::names();
        let sources = self.sources.as_ref().and_then(|names| {
            let (ok, unknown): (Vec<String>, Vec<String>) = names
                .iter()
                .cloned()
                .partition(|n| known.contains(&n.as_str()));
            if !unknown.is_empty() {
                tracing::error!(
                    "unknown source {} (known: {}): left out{}",
                    unknown.join(", "),
                    known.join(", "),
                    if ok.is_empty() {
                        "; the default sources are searched"
                    } else {
                        ""
                    }
                );
            }
            (!ok.is_empty()).then_some(ok)
        });
        let trust = stage::load_trust(self.trusted_keys.as_deref()).unwrap_or_else(|e| {
            tracing::error!("{e:#}: no seed is trusted, so none is applied");
            let why = format!("{e:#}");
            Some(std::sync::Arc::new(nixseed_core::trust::Trust::unreadable(
                why,
            )))
        });
        let abs = |p: &PathBuf| {
            std::fs::canonicalize(p).with_context(|| format!("{}: no such directory", p.display()))
        };
        Ok(stage::StageOptions {
            sysroot: abs(&self.sysroot)?,
            host: abs(&self.root)?,
            run: abs(&self.run)?,
            clone_policy: self.clone_policy,
            sources,
            identity_dir: self.identity_dir.clone(),
            channel_wait: std::time::Duration::from_secs(self.channel_wait),
            udev_wait: std::time::Duration::from_secs(self.udev_wait),
            trust,
            durability: store::Durability::Now,
        })
    }
}

/// `nixseed-agent`: every command.
pub fn agent_main() -> ExitCode {
    main_of(run)
}

/// `nixseed-guest-agent`: `nixseed-agent serve` alone, so that the resident process maps
/// none of the identity code (see `serve::exec_guest_agent`).
pub fn guest_agent_main() -> ExitCode {
    main_of(|command| match command {
        Command::Serve(a) => serve::main(a),
        _ => anyhow::bail!(
            "this program only serves the guest agent (`{} serve`); run {} for its other commands",
            cli::BIN,
            channel::HELPER_PROGRAM
        ),
    })
}

/// Reads the command line and runs its command with `run`.
fn main_of(run: impl FnOnce(Command) -> Result<()>) -> ExitCode {
    let cli = match cli::parse(std::env::args_os()) {
        Ok(cli) => cli,
        Err(cli::Stop::Print(text)) => {
            print!("{text}");
            return ExitCode::SUCCESS;
        }
        Err(cli::Stop::Usage(text)) => {
            eprint!("{text}");
            return ExitCode::from(2);
        }
    };
    logging::init(cli.verbose);
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// How long a rerun of stage 2 waits for a change of the identity in progress.
const APPLY_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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
            // At boot nothing else holds the lock: the guest agent and the channel start
            // after this unit. A restart of the unit while the identity is being changed
            // waits a little (a guest-agent command is done in well under a second), then
            // leaves the identity to a push or rollback, which binds and reloads what it
            // writes. Waiting for that to end would stall it: the push restarts sshd, and
            // systemd holds sshd's start until this unit's job, which sshd is ordered
            // after, has ended.
            let Some(one) = identity_lock::IdentityLock::take_within(&opts.run, APPLY_LOCK_WAIT)?
            else {
                tracing::warn!(
                    "the identity has been changing for {} s (a push or rollback holds {}), and it binds and reloads what it writes: this run did nothing (no bind{}{}); run it again once the change is done",
                    APPLY_LOCK_WAIT.as_secs(),
                    identity_lock::path(&opts.run).display(),
                    if a.firewall { ", no firewall load" } else { "" },
                    if a.run_commands {
                        ", no bootcmd or runcmd"
                    } else {
                        ""
                    },
                );
                return Ok(());
            };
            let o = stage::run_apply(&opts)?;
            drop(one);
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
        Command::Serve(a) => {
            serve::exec_guest_agent();
            serve::main(a)?;
        }
        Command::Request(a) => {
            // As the guest agent's process would answer it: on the running system,
            // waiting for nothing.
            let ctx = channel::ChannelContext {
                opts: stage::StageOptions {
                    channel_wait: std::time::Duration::ZERO,
                    udev_wait: std::time::Duration::ZERO,
                    ..a.options()?
                },
                firewall: a.firewall,
            };
            serve::runtime()?.block_on(channel::answer_stdin(&ctx))?;
        }
        Command::Channel(a) => {
            let ctx = channel::ChannelContext {
                opts: a.stage.options()?,
                firewall: a.stage.firewall,
            };
            serve::runtime()?.block_on(channel::run(a.method, &a.path, ctx))?;
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
    // A boot passes such a seed over: it produces no identity, and neither does its
    // dry run.
    anyhow::ensure!(
        !seed.disabled,
        "{}: meta-data says dsmode: disabled: a boot passes this seed over, as cloud-init passes it over; nothing written",
        seed.meta_origin()
    );
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
