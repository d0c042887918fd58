//! The `gatehouse` command, as a library so that the end-to-end tests reuse its parts: dev
//! certificates, the private RabbitMQ node and PostgreSQL server, and the client commands.

pub mod apt;
pub mod bench;
pub mod broker_node;
pub mod certs;
pub mod cluster;
pub mod commands;
pub mod hosts;
pub mod postgres_node;
