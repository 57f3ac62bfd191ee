//! The commands nixseed answers and what `guest-info` says about them. The agent's
//! registry maps each name to a handler; a test there checks both lists agree.

/// Static facts about one command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandInfo {
    pub name: &'static str,
    /// False for commands that send nothing when they succeed (`guest-shutdown`).
    pub success_response: bool,
    /// Off unless named in the allow-list or `unsafe-rpcs`: they run programs, touch
    /// arbitrary files or change passwords.
    pub unsafe_by_default: bool,
    /// May run while filesystems are frozen (qemu-ga's fixed list).
    pub allowed_while_frozen: bool,
}

const fn cmd(name: &'static str) -> CommandInfo {
    CommandInfo {
        name,
        success_response: true,
        unsafe_by_default: false,
        allowed_while_frozen: false,
    }
}

const fn frozen_ok(name: &'static str) -> CommandInfo {
    CommandInfo {
        allowed_while_frozen: true,
        ..cmd(name)
    }
}

const fn no_reply(name: &'static str) -> CommandInfo {
    CommandInfo {
        success_response: false,
        ..cmd(name)
    }
}

const fn unsafe_cmd(name: &'static str) -> CommandInfo {
    CommandInfo {
        unsafe_by_default: true,
        ..cmd(name)
    }
}

pub const COMMANDS: &[CommandInfo] = &[
    frozen_ok("guest-sync"),
    frozen_ok("guest-sync-delimited"),
    frozen_ok("guest-ping"),
    frozen_ok("guest-info"),
    cmd("guest-get-time"),
    cmd("guest-set-time"),
    cmd("guest-get-osinfo"),
    cmd("guest-get-host-name"),
    cmd("guest-get-timezone"),
    cmd("guest-get-users"),
    cmd("guest-get-vcpus"),
    cmd("guest-set-vcpus"),
    cmd("guest-get-load"),
    cmd("guest-get-memory-block-info"),
    cmd("guest-get-memory-blocks"),
    cmd("guest-set-memory-blocks"),
    cmd("guest-get-cpustats"),
    cmd("guest-get-diskstats"),
    cmd("guest-network-get-interfaces"),
    cmd("guest-network-get-route"),
    cmd("guest-get-fsinfo"),
    cmd("guest-get-disks"),
    frozen_ok("guest-fsfreeze-status"),
    cmd("guest-fsfreeze-freeze"),
    cmd("guest-fsfreeze-freeze-list"),
    frozen_ok("guest-fsfreeze-thaw"),
    cmd("guest-fstrim"),
    no_reply("guest-shutdown"),
    no_reply("guest-suspend-disk"),
    no_reply("guest-suspend-ram"),
    no_reply("guest-suspend-hybrid"),
    cmd("guest-ssh-get-authorized-keys"),
    cmd("guest-ssh-add-authorized-keys"),
    cmd("guest-ssh-remove-authorized-keys"),
    unsafe_cmd("guest-exec"),
    unsafe_cmd("guest-exec-status"),
    unsafe_cmd("guest-file-open"),
    unsafe_cmd("guest-file-close"),
    unsafe_cmd("guest-file-read"),
    unsafe_cmd("guest-file-write"),
    unsafe_cmd("guest-file-seek"),
    unsafe_cmd("guest-file-flush"),
    unsafe_cmd("guest-set-user-password"),
];

pub fn lookup(name: &str) -> Option<&'static CommandInfo> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// The reason qemu-ga gives for commands refused while frozen.
pub const FROZEN_REASON: &str = "the agent is in frozen state";

/// Which commands run, from qemu-ga's `-a`/`-b` lists plus nixseed's unsafe default.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommandPolicy {
    /// `-a`: when non-empty, only these run.
    pub allow: Vec<String>,
    /// `-b`: never these (wins over `allow`).
    pub block: Vec<String>,
    /// Unsafe commands enabled without restricting the rest.
    pub unsafe_allowed: Vec<String>,
}

impl CommandPolicy {
    /// Whether `c` runs when the filesystems are thawed.
    pub fn enabled(&self, c: &CommandInfo) -> bool {
        let named = |list: &[String]| list.iter().any(|n| n == c.name);
        if named(&self.block) {
            return false;
        }
        if !self.allow.is_empty() && !named(&self.allow) {
            return false;
        }
        !c.unsafe_by_default || named(&self.allow) || named(&self.unsafe_allowed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unsafe_commands_need_naming() {
        let p = CommandPolicy::default();
        let exec = lookup("guest-exec").unwrap();
        let ping = lookup("guest-ping").unwrap();
        assert!(!p.enabled(exec));
        assert!(p.enabled(ping));
        let p = CommandPolicy {
            allow: vec!["guest-exec".into()],
            ..Default::default()
        };
        assert!(p.enabled(exec));
        assert!(!p.enabled(ping), "-a restricts to the list, as in qemu-ga");
        let p = CommandPolicy {
            unsafe_allowed: vec!["guest-exec".into()],
            ..Default::default()
        };
        assert!(
            p.enabled(exec) && p.enabled(ping),
            "--unsafe-rpcs restricts nothing"
        );
        let p = CommandPolicy {
            unsafe_allowed: vec!["guest-exec".into()],
            block: vec!["guest-ping".into()],
            ..Default::default()
        };
        assert!(p.enabled(exec));
        assert!(!p.enabled(ping));
    }

    #[test]
    fn only_qemu_ga_frozen_list_runs_while_frozen() {
        let names: Vec<_> = COMMANDS
            .iter()
            .filter(|c| c.allowed_while_frozen)
            .map(|c| c.name)
            .collect();
        assert_eq!(
            names,
            [
                "guest-sync",
                "guest-sync-delimited",
                "guest-ping",
                "guest-info",
                "guest-fsfreeze-status",
                "guest-fsfreeze-thaw"
            ]
        );
    }
}
