//! One module per subcommand.

pub mod agent;
pub mod build;
pub mod create;
pub mod keygen;
pub mod known_hosts;
pub mod list;
pub mod new;
pub mod power;
pub mod push;
pub mod render;
pub mod rollback;
pub mod run;
pub mod seed;
pub mod serve;
pub mod ssh;
pub mod status;
pub mod upgrade;
pub mod xml;
