//! Every command name mapped to the function that answers it. Adding a command is one
//! line here, one entry in `nixseed_core::qga::commands`, and a function in the file
//! for its family.

use std::future::Future;
use std::pin::Pin;

use nixseed_core::qga::Args;

use super::{
    Agent, CmdResult, exec, file, fs, fsfreeze, network, password, shutdown, ssh_keys, sync, system,
};

pub type BoxFuture<'a> = Pin<Box<dyn Future<Output = CmdResult> + 'a>>;

#[derive(Clone, Copy)]
pub enum Handler {
    Sync(fn(&mut Agent, Args) -> CmdResult),
    Async(for<'a> fn(&'a mut Agent, Args) -> BoxFuture<'a>),
}

const REGISTRY: &[(&str, Handler)] = &[
    ("guest-sync", Handler::Sync(sync::sync)),
    ("guest-sync-delimited", Handler::Sync(sync::sync_delimited)),
    ("guest-ping", Handler::Sync(sync::ping)),
    ("guest-info", Handler::Sync(sync::info)),
    ("guest-get-time", Handler::Sync(system::get_time)),
    ("guest-set-time", Handler::Sync(system::set_time)),
    ("guest-get-osinfo", Handler::Sync(system::get_osinfo)),
    ("guest-get-host-name", Handler::Sync(system::get_host_name)),
    ("guest-get-timezone", Handler::Sync(system::get_timezone)),
    ("guest-get-users", Handler::Sync(system::get_users)),
    ("guest-get-vcpus", Handler::Sync(system::get_vcpus)),
    ("guest-set-vcpus", Handler::Sync(system::set_vcpus)),
    ("guest-get-load", Handler::Sync(system::get_load)),
    (
        "guest-get-memory-block-info",
        Handler::Sync(system::get_memory_block_info),
    ),
    (
        "guest-get-memory-blocks",
        Handler::Sync(system::get_memory_blocks),
    ),
    (
        "guest-set-memory-blocks",
        Handler::Async(system::set_memory_blocks),
    ),
    ("guest-get-cpustats", Handler::Sync(system::get_cpustats)),
    ("guest-get-diskstats", Handler::Sync(system::get_diskstats)),
    (
        "guest-network-get-interfaces",
        Handler::Sync(network::get_interfaces),
    ),
    ("guest-network-get-route", Handler::Sync(network::get_route)),
    ("guest-get-fsinfo", Handler::Sync(fs::get_fsinfo)),
    ("guest-get-disks", Handler::Sync(fs::get_disks)),
    ("guest-fsfreeze-status", Handler::Sync(fsfreeze::status)),
    ("guest-fsfreeze-freeze", Handler::Async(fsfreeze::freeze)),
    (
        "guest-fsfreeze-freeze-list",
        Handler::Async(fsfreeze::freeze_list),
    ),
    ("guest-fsfreeze-thaw", Handler::Sync(fsfreeze::thaw)),
    ("guest-fstrim", Handler::Sync(fs::fstrim)),
    ("guest-shutdown", Handler::Async(shutdown::shutdown)),
    ("guest-suspend-disk", Handler::Async(shutdown::suspend_disk)),
    ("guest-suspend-ram", Handler::Async(shutdown::suspend_ram)),
    (
        "guest-suspend-hybrid",
        Handler::Async(shutdown::suspend_hybrid),
    ),
    (
        "guest-ssh-get-authorized-keys",
        Handler::Sync(ssh_keys::get),
    ),
    (
        "guest-ssh-add-authorized-keys",
        Handler::Sync(ssh_keys::add),
    ),
    (
        "guest-ssh-remove-authorized-keys",
        Handler::Sync(ssh_keys::remove),
    ),
    ("guest-exec", Handler::Sync(exec::exec)),
    ("guest-exec-status", Handler::Sync(exec::status)),
    ("guest-file-open", Handler::Sync(file::open)),
    ("guest-file-close", Handler::Sync(file::close)),
    ("guest-file-read", Handler::Sync(file::read)),
    ("guest-file-write", Handler::Sync(file::write)),
    ("guest-file-seek", Handler::Sync(file::seek)),
    ("guest-file-flush", Handler::Sync(file::flush)),
    (
        "guest-set-user-password",
        Handler::Sync(password::set_user_password),
    ),
];

pub fn handler(name: &str) -> Option<Handler> {
    REGISTRY.iter().find(|(n, _)| *n == name).map(|(_, h)| *h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nixseed_core::qga::commands::COMMANDS;

    #[test]
    fn registry_and_command_table_agree() {
        let reg: Vec<_> = REGISTRY.iter().map(|(n, _)| *n).collect();
        let table: Vec<_> = COMMANDS.iter().map(|c| c.name).collect();
        assert_eq!(reg, table);
    }
}
