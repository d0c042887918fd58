//! RabbitMQ glue shared by gatekeeper and worker: the topology (one module owns every name and
//! argument), connecting, and publishing with confirms.
//!
//! Flow: gatekeeper --publish(confirmed)--> `gatehouse.jobs` --> `gatehouse.jobs.<class>`
//! --> worker --> reply queue of the gatekeeper instance that asked.

pub mod backoff;
pub mod process;
pub mod publisher;
pub mod shutdown;
pub mod topology;

pub use backoff::Backoff;
pub use lapin;
pub use publisher::{PublishError, Publisher};
pub use topology::Topology;

use std::path::PathBuf;

use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use lapin::{Connection, ConnectionProperties};

/// Opens an AMQP connection named after the component (the name shows in the management UI).
///
/// # Errors
/// When the broker cannot be reached or refuses the credentials.
pub async fn connect(url: &str, component: &str) -> Result<Connection, lapin::Error> {
    let props = ConnectionProperties::default().with_connection_name(component.into());
    Connection::connect(url, props).await
}

/// Opens the connection `settings` describe: `amqps://` with the client certificate of
/// `settings.tls` (mutual TLS, rustls), or plain `amqp://`.
///
/// # Errors
/// When a TLS file cannot be read, the broker cannot be reached, the TLS handshake fails, or
/// the broker refuses the credentials.
pub async fn connect_with(settings: &BrokerSettings, component: &str) -> Result<Connection, ConnectError> {
    let url = settings.url.expose();
    let Some(tls) = settings.tls.as_ref().filter(|_| url.starts_with("amqps://")) else {
        return Ok(connect(url, component).await?);
    };
    let read = |p: &PathBuf| std::fs::read(p).map_err(|e| ConnectError::Tls(format!("{}: {e}", p.display())));
    let config = OwnedTLSConfig {
        identity: Some(OwnedIdentity::PKCS8 { pem: read(&tls.cert)?, key: read(&tls.key)? }),
        cert_chain: Some(String::from_utf8_lossy(&read(&tls.ca)?).into_owned()),
    };
    let props = ConnectionProperties::default().with_connection_name(component.into());
    let runtime = lapin::runtime::default_runtime()?;
    Ok(Connection::connect_with_config(url, props, config, runtime).await?)
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("broker TLS material: {0}")]
    Tls(String),
    #[error(transparent)]
    Broker(#[from] lapin::Error),
}

/// Mutual TLS to the broker (section `[broker.tls]`), used with an `amqps://` URL.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct BrokerTlsSettings {
    /// CA that signed the broker's certificate (PEM).
    pub ca: PathBuf,
    /// This component's client certificate (PEM).
    pub cert: PathBuf,
    /// Its private key (PEM, PKCS#8).
    pub key: PathBuf,
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
    /// Client certificate for `amqps://` URLs.
    #[serde(default)]
    pub tls: Option<BrokerTlsSettings>,
}

impl BrokerSettings {
    pub fn topology(&self) -> Topology {
        Topology::new(self.prefix.clone())
    }
}
