//! The subcommands of `gatehouse`.

pub mod jobs;
pub mod up;
