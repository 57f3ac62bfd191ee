//! nixseed-guest-agent: `nixseed-agent serve` as a program of its own, which
//! `nixseed-agent serve` becomes when it is installed beside it.

fn main() -> std::process::ExitCode {
    nixseed_agent::guest_agent_main()
}
