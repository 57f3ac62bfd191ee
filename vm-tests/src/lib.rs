//! vm-tests: builds a Debian guest shaped like the immutable nixseed NixOS VM (read-only
//! root, `/var` on its own disk, identity applied from the initramfs) and boots it under
//! QEMU. `cargo xtask demo`, `test` and `bench` all drive VMs through this crate.

pub mod bench;
pub mod cmd;
pub mod demo;
pub mod deps;
pub mod image;
pub mod initramfs;
pub mod kernel;
pub mod libvirtd;
pub mod machine;
pub mod paths;
pub mod profile;
pub mod qemu;
pub mod qga_client;
pub mod scenarios;
pub mod ssh;
