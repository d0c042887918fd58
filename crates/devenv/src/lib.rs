//! The development environment `gatehouse up` and the end-to-end tests share, apart from the
//! `gatehouse` command's user-facing parts: Debian packages installed on demand ([`apt`]),
//! dev certificates ([`certs`]), a private RabbitMQ node ([`broker_node`]) and three-node
//! cluster ([`cluster`]), a private PostgreSQL server ([`postgres_node`]), and with the
//! `hosts` feature test hosts ([`hosts`]: network namespaces, root only). Everything it
//! writes goes under `.gatehouse/` or a folder the caller names, never the source tree.

pub mod apt;
pub mod broker_node;
pub mod certs;
pub mod cluster;
#[cfg(feature = "hosts")]
pub mod hosts;
pub mod postgres_node;
