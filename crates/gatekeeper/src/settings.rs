//! Gatekeeper settings (`config/gatekeeper.toml`, overridable as `GATEKEEPER__SECTION__KEY`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use gatehouse_broker::BrokerSettings;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
pub struct GatekeeperSettings {
    pub server: ServerSettings,
    pub tls: TlsSettings,
    pub broker: BrokerSettings,
    pub catalog: PathSetting,
    pub policy: PathSetting,
    pub ids: IdSettings,
    pub keys: KeySettings,
    pub admin: AdminSettings,
    #[serde(default)]
    pub testing: TestingSettings,
    #[serde(default)]
    pub telemetry: gatehouse_broker::telemetry::TelemetrySettings,
}

impl gatehouse_broker::process::HasTelemetry for GatekeeperSettings {
    fn telemetry(&self) -> &gatehouse_broker::telemetry::TelemetrySettings {
        &self.telemetry
    }
}

/// `[testing]`: whether the catalog's `testing` kinds exist here (never in production; the
/// worker has the same switch).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct TestingSettings {
    #[serde(default)]
    pub enabled: bool,
}

/// The plain-HTTP admin listener: `/healthz`, `/readyz`, `/metrics`.
#[derive(Debug, Clone, Deserialize)]
pub struct AdminSettings {
    /// Keep it on loopback (or a management network): it has no TLS and no authentication.
    pub listen: SocketAddr,
    /// Host names answered besides IP addresses and `localhost` (any other name is refused:
    /// DNS rebinding from a browser), e.g. the name Prometheus scrapes.
    #[serde(default)]
    pub allowed_hosts: Vec<String>,
}

/// Key files (see `gatehouse_protocol::keys`).
#[derive(Debug, Clone, Deserialize)]
pub struct KeySettings {
    /// The gatekeeper's Ed25519 key; signs its sessions with the worker, which vouch for every
    /// job and query.
    pub signing_key: PathBuf,
    /// The worker's X25519 public key; job payloads are sealed to it in short sessions, and
    /// the worker's replies come sealed under each session's reply key.
    pub worker_sealing_key: PathBuf,
    /// The worker's public sealing keys as a set an operator certified (`gatehouse keys
    /// certify`), served as is at `GET /v1/keys` for clients that seal fields themselves.
    #[serde(default)]
    pub worker_key_set: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ServerSettings {
    /// Address of the mTLS API; port 0 picks a free port.
    pub listen: SocketAddr,
    /// A client that has not finished the TLS handshake by then is dropped.
    pub handshake_timeout_ms: u64,
    /// A client that has not sent a request's headers by then is dropped (slowloris).
    pub header_read_timeout_ms: u64,
    /// Longest a whole request may take, body included; then `408`. Must exceed
    /// `max_wait_s` (a `Prefer: wait` request legitimately takes that long).
    pub request_timeout_ms: u64,
    /// Largest request body accepted; larger ones get 413 before being read whole.
    pub max_body_bytes: usize,
    /// Open client connections at most; more are refused at accept.
    pub max_connections: usize,
    /// Ceiling of `Prefer: wait=N`.
    pub max_wait_s: u64,
    /// How long a status query waits for the worker before answering 503.
    pub status_timeout_ms: u64,
    /// How long a publish may wait for the broker's confirm before answering 503 (e.g. while
    /// the broker blocks publishers on a memory or disk alarm).
    pub publish_timeout_ms: u64,
    /// After SIGTERM: how long in-flight requests may take.
    pub stopping_wait_time_ms: u64,
    /// Longest an event stream stays open; the client reconnects with `Last-Event-ID` (as
    /// SSE clients do) and loses nothing.
    #[serde(default = "default_max_stream_s")]
    pub max_stream_s: u64,
    /// Concurrent requests (HTTP/2 streams) one connection may carry.
    #[serde(default = "default_http2_max_streams")]
    pub http2_max_streams: u32,
}

fn default_http2_max_streams() -> u32 {
    64
}

fn default_max_stream_s() -> u64 {
    300
}

impl ServerSettings {
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }
    pub fn status_timeout(&self) -> Duration {
        Duration::from_millis(self.status_timeout_ms)
    }
    pub fn publish_timeout(&self) -> Duration {
        Duration::from_millis(self.publish_timeout_ms)
    }
    pub fn stopping_wait_time(&self) -> Duration {
        Duration::from_millis(self.stopping_wait_time_ms)
    }
}

#[derive(Debug, Clone, Deserialize)]
pub struct TlsSettings {
    /// Server certificate chain (PEM).
    pub cert: PathBuf,
    /// Server private key (PEM).
    pub key: PathBuf,
    /// CA that signs client certificates (PEM); clients without such a certificate are refused.
    pub client_ca: PathBuf,
    /// Optional certificate revocation list(s) of that CA (PEM). When set, a revoked client is
    /// refused, and so is everyone once the CRL is past its next update (fail closed: renew it).
    #[serde(default)]
    pub client_crl: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PathSetting {
    pub path: PathBuf,
}

#[derive(Debug, Clone, Deserialize)]
pub struct IdSettings {
    /// File holding the secret that binds each job id to its owner (hex, 32 bytes or more).
    pub secret_file: PathBuf,
}

impl GatekeeperSettings {
    /// Loads `path` with environment overrides.
    ///
    /// # Errors
    /// When the file is missing or a key is missing or mistyped.
    pub fn load(path: &Path) -> Result<Self, config::ConfigError> {
        gatehouse_protocol::settings::load(path, "GATEKEEPER")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_settings_load() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/gatekeeper.toml");
        let s = GatekeeperSettings::load(&path).unwrap();
        assert_eq!(s.server.listen.port(), 8443);
    }
}
