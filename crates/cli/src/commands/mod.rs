//! The subcommands of `gatehouse`.

pub mod dlq;
pub mod jobs;
pub mod pauses;
pub mod queues;
pub mod rekey;
pub mod schedules;
pub mod up;
