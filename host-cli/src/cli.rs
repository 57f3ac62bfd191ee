//! The command line: global options and the subcommand table.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

use crate::cmd;
use crate::machine::Paths;
use crate::output::Report;

#[derive(Debug, Parser)]
#[command(
    name = "seedctl",
    version,
    about = "Make nixseed identities, seed images, disks and VMs",
    after_help = "Quick start:
  seedctl new web1 --admin-key @~/.ssh/id_ed25519.pub
  seedctl build                          # or --base IMAGE on the next line
  seedctl create web1
  seedctl run web1 --detach
  seedctl ssh web1"
)]
pub struct Cli {
    /// Directory holding one sub-directory per machine [env: SEEDCTL_MACHINES] [default: ./machines]
    #[arg(long, global = true, value_name = "DIR")]
    pub machines: Option<PathBuf>,
    /// Directory for disks, seeds and VM runtime files [env: SEEDCTL_STATE] [default: .seedctl beside machines/]
    #[arg(long, global = true, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Print the result as JSON
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate a machine identity in machines/NAME/
    New(cmd::new::NewArgs),
    /// Make the ed25519 key that signs seeds and pushes
    Keygen(cmd::keygen::KeygenArgs),
    /// Write a NoCloud seed image (iso9660 or vfat) for a machine
    Seed(cmd::seed::SeedArgs),
    /// Write the identity tree the guest will produce from this machine's seed
    Render(cmd::render::RenderArgs),
    /// Create the boot overlay, /var disk and seed ISO under the state directory
    Create(cmd::create::CreateArgs),
    /// Boot a machine under plain QEMU (no libvirt)
    Run(cmd::run::RunArgs),
    /// SSH into a `seedctl run` machine as root, host key pinned
    Ssh(cmd::ssh::SshArgs),
    /// Print the libvirt domain XML for a machine
    Xml(cmd::xml::XmlArgs),
    /// Define the machine as a libvirt domain
    Define(cmd::power::DefineArgs),
    /// Start the libvirt domain
    Start(cmd::power::StartArgs),
    /// Power the machine off cleanly (ACPI)
    Stop(cmd::power::PowerArgs),
    /// Power the machine off at once
    Destroy(cmd::power::DestroyArgs),
    /// Remove the libvirt domain (disks, identity and UEFI variables stay)
    Undefine(cmd::power::UndefineArgs),
    /// Send the machine's identity to its running guest (control channel)
    Push(cmd::push::PushArgs),
    /// Compare the guest's identity with machines/NAME, file by file (control channel)
    Status(cmd::status::StatusArgs),
    /// Make the guest's previous identity generation current again (control channel)
    Rollback(cmd::rollback::RollbackArgs),
    /// Answer booting guests' hello on their control channels with their identities
    Serve(cmd::serve::ServeArgs),
    /// Guest-agent commands (ping, info, osinfo, ifaddr, freeze, thaw, shutdown, ...)
    Agent(cmd::agent::AgentArgs),
    /// Pinned known_hosts lines for every machine
    KnownHosts(cmd::known_hosts::KnownHostsArgs),
    /// List machines, their base image and state
    List(cmd::list::ListArgs),
    /// Put a machine on a new base image, keeping its /var disk
    Upgrade(cmd::upgrade::UpgradeArgs),
    /// nix build the guest image and make it the default base
    Build(cmd::build::BuildArgs),
}

impl Cli {
    pub fn paths(&self) -> Paths {
        Paths::resolve(self.machines.clone(), self.state.clone())
    }

    pub fn run(&self) -> Result<Report> {
        let paths = self.paths();
        match &self.command {
            Command::New(a) => cmd::new::run(&paths, a),
            Command::Seed(a) => cmd::seed::run(&paths, a),
            Command::Render(a) => cmd::render::run(&paths, a),
            Command::Create(a) => cmd::create::run(&paths, a),
            Command::Run(a) => cmd::run::run(&paths, a),
            Command::Ssh(a) => cmd::ssh::run(&paths, a),
            Command::Xml(a) => cmd::xml::run(&paths, a),
            Command::Define(a) => cmd::power::define(&paths, a),
            Command::Start(a) => cmd::power::start(&paths, a),
            Command::Stop(a) => cmd::power::stop(&paths, a),
            Command::Destroy(a) => cmd::power::destroy(&paths, a),
            Command::Undefine(a) => cmd::power::undefine(&paths, a),
            Command::Push(a) => cmd::push::run(&paths, a),
            Command::Status(a) => cmd::status::run(&paths, a),
            Command::Rollback(a) => cmd::rollback::run(&paths, a),
            Command::Serve(a) => cmd::serve::run(&paths, a),
            Command::Agent(a) => cmd::agent::run(&paths, a),
            Command::KnownHosts(a) => cmd::known_hosts::run(&paths, a),
            Command::List(a) => cmd::list::run(&paths, a),
            Command::Upgrade(a) => cmd::upgrade::run(&paths, a),
            Command::Build(a) => cmd::build::run(&paths, a),
            Command::Keygen(a) => cmd::keygen::run(a),
        }
    }
}
