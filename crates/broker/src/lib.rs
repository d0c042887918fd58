//! RabbitMQ glue shared by gatekeeper and worker: the topology (one module owns every name and
//! argument), connecting, and publishing with confirms.
//!
//! Flow: gatekeeper --publish(confirmed)--> `gatehouse.jobs` --> `gatehouse.jobs.<class>`
//! --> worker --> reply queue of the gatekeeper instance that asked.

pub mod publisher;
pub mod shutdown;
pub mod signing;
pub mod topology;

pub use lapin;
pub use publisher::{PublishError, Publisher};
pub use topology::Topology;

use lapin::{Connection, ConnectionProperties};

/// Opens an AMQP connection named after the component (the name shows in the management UI).
///
/// # Errors
/// When the broker cannot be reached or refuses the credentials.
pub async fn connect(url: &str, component: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(component.into());
    Connection::connect(url, props).await
}

/// Where the broker is and how our names are prefixed (section `[broker]` of each component's
/// settings).
#[derive(Debug, Clone, serde::Deserialize)]
pub struct BrokerSettings {
    /// `amqp://user:password@host:port/vhost`; holds a password, so never logged.
    pub url: gatehouse_protocol::settings::Secret,
    /// Prefix of every exchange and queue name; empty in production, unique per test.
    #[serde(default)]
    pub prefix: String,
}

impl BrokerSettings {
    pub fn topology(&self) -> Topology {
        Topology::new(self.prefix.clone())
    }
}
