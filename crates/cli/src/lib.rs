//! The `gatehouse` command, as a library so that the end-to-end tests reuse its commands and
//! the benchmark. The development environment it starts (`gatehouse up`) is
//! `gatehouse-devenv`'s.

pub mod bench;
pub mod commands;
