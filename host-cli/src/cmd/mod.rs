//! One module per subcommand.

pub mod create;
pub mod new;
pub mod seed;
