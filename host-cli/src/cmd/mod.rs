//! One module per subcommand.

pub mod agent;
pub mod build;
pub mod create;
pub mod known_hosts;
pub mod list;
pub mod new;
pub mod power;
pub mod render;
pub mod run;
pub mod seed;
pub mod ssh;
pub mod upgrade;
pub mod xml;
