//! RabbitMQ glue shared by gatekeeper and worker: the topology (one module owns every name and
//! argument), connecting, and publishing with confirms.
//!
//! Flow: gatekeeper --publish(confirmed)--> `gatehouse.jobs` --> `gatehouse.jobs.<class>`
//! --> worker --> reply queue of the gatekeeper instance that asked.

pub mod backoff;
pub mod process;
pub mod publisher;
pub mod shutdown;
pub mod telemetry;
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
    // The cluster's nodes in turn, from the one after the node this process last reached (so
    // that a node that was lost is tried last); the first that answers.
    let urls = settings.urls();
    let start = NEXT_NODE.load(std::sync::atomic::Ordering::Relaxed);
    let mut last = None;
    for i in 0..urls.len() {
        let n = (start + i) % urls.len();
        // A node that does not answer in time (cut off, or booting with its port open but
        // its AMQP not yet): the next one. Without the bound, a connect can hang for minutes.
        let attempt = tokio::time::timeout(CONNECT_TIMEOUT, connect_to(urls[n], settings, component));
        match attempt.await.unwrap_or(Err(ConnectError::Timeout)) {
            Ok(c) => {
                NEXT_NODE.store(n + 1, std::sync::atomic::Ordering::Relaxed);
                if urls.len() > 1 {
                    tracing::info!(node = n + 1, of = urls.len(), "connected to a broker node");
                }
                return Ok(c);
            }
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| ConnectError::Tls("no broker URL".into())))
}

/// Longest a connection to one node may take to open.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Where [`connect_with`] starts next: the node after the one it reached last.
static NEXT_NODE: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

async fn connect_to(
    url: &str,
    settings: &BrokerSettings,
    component: &str,
) -> Result<Connection, ConnectError> {
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
    #[error("the broker did not open the connection within {} s", CONNECT_TIMEOUT.as_secs())]
    Timeout,
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
    /// The other nodes of a RabbitMQ cluster, in the same form: a connection goes to any node
    /// that answers, and after a loss to the next one.
    #[serde(default)]
    pub other_urls: Vec<gatehouse_protocol::settings::Secret>,
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

    /// `url`, then `other_urls`.
    pub fn urls(&self) -> Vec<&str> {
        std::iter::once(&self.url).chain(&self.other_urls).map(|u| u.expose()).collect()
    }
}
