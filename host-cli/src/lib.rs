//! seedctl: the nixseed host CLI. Each subcommand lives in `cmd/<name>.rs`; the modules
//! beside it hold what several commands share (machine identities, seed images, QEMU and
//! libvirt plumbing, the guest-agent client).

pub mod accel;
pub mod channel;
pub mod cli;
pub mod cmd;
pub mod disk;
pub mod firmware;
pub mod fsutil;
pub mod iso9660;
pub mod libvirt;
pub mod machine;
pub mod names;
pub mod nocloud;
pub mod output;
pub mod qga;
pub mod qmp;
pub mod signing;
pub mod state;
pub mod tools;
pub mod vfat;
