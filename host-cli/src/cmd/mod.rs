//! One module per subcommand.

pub mod agent;
pub mod create;
pub mod new;
pub mod power;
pub mod run;
pub mod seed;
pub mod ssh;
pub mod xml;
