//! nixseed-core: everything that decides what a guest writes, as pure functions over
//! bytes and structs. The agent and `seedctl` are thin shells around this crate, so
//! `seedctl render` shows exactly what a guest will write.

pub mod channel;
pub mod civil;
pub mod configdrive;
pub mod credentials;
pub mod decide;
pub mod firewall;
#[cfg(feature = "os-fresh")]
pub mod fresh;
pub mod identity;
pub mod iso9660;
pub mod label;
pub mod manifest;
pub mod network;
pub mod nocloud;
pub mod qga;
pub mod seed;
pub mod shadow;
pub mod trust;
pub mod userdata;
pub mod yaml;
