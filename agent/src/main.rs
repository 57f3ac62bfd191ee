//! nixseed-agent: the guest binary. `initrd` and `apply` give a VM its identity from a
//! seed; `serve` answers the qemu-guest-agent protocol; `render` is a dry run.

fn main() -> std::process::ExitCode {
    nixseed_agent::agent_main()
}
