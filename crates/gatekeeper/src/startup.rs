//! Build (load, bind, connect, declare), then run until told to stop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use gatehouse_protocol::Catalog;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

use crate::ids::IdMinter;
use crate::keys::GatekeeperKeys;
use crate::link::BrokerLink;
use crate::policy::LivePolicy;
use crate::replies::Replies;
use crate::routes::{self, App};
use crate::server::{self, Limits};
use crate::settings::GatekeeperSettings;
use gatehouse_protocol::schemas::Schemas;

/// Requests that may wait for the worker at once, across `Prefer: wait` and status queries.
const MAX_PENDING_REPLIES: usize = 65_536;

/// A gatekeeper that is bound, connected and declared, not yet serving.
pub struct Gatekeeper {
    listener: TcpListener,
    admin: TcpListener,
    /// Names the admin listener answers besides addresses and `localhost`.
    admin_hosts: Vec<String>,
    acceptor: TlsAcceptor,
    app: Arc<App>,
    limits: Limits,
    supervisor: tokio::task::JoinHandle<()>,
}

impl Gatekeeper {
    /// Loads catalog, schemas, policy, TLS material and the id secret; binds the listener;
    /// connects to the broker, declares the topology and this instance's reply queue.
    ///
    /// # Errors
    /// When any of those fails.
    pub async fn build(settings: GatekeeperSettings) -> anyhow::Result<Self> {
        let catalog = Catalog::load(&settings.catalog.path)?;
        // The test kinds are unknown here unless testing is on (the worker would refuse them).
        let catalog = if settings.testing.enabled { catalog } else { catalog.without_testing() };
        let schemas = Schemas::compile(&catalog)?;
        let openapi = crate::openapi::build(&catalog).map_err(anyhow::Error::msg)?;
        let policy = LivePolicy::load(&settings.policy.path)
            .with_context(|| format!("loading policy {}", settings.policy.path.display()))?;
        let ids = IdMinter::from_file(&settings.ids.secret_file)?;
        let acceptor = TlsAcceptor::from(crate::tls::server_config(&settings.tls)?);
        let listener = TcpListener::bind(settings.server.listen)
            .await
            .with_context(|| format!("binding {}", settings.server.listen))?;
        let admin = TcpListener::bind(settings.admin.listen)
            .await
            .with_context(|| format!("binding the admin listener {}", settings.admin.listen))?;

        let topology = settings.broker.topology();
        let instance = instance_id();
        let metrics = crate::metrics::Metrics::default();
        let replies = Replies::new(
            instance.clone(),
            topology.reply_queue(&instance),
            MAX_PENDING_REPLIES,
            (metrics.late_replies.clone(), metrics.forged_replies.clone()),
        );
        let keys = Arc::new(GatekeeperKeys::load(&settings.keys)?);
        let (link, supervisor) =
            BrokerLink::start(settings.broker.clone(), replies.clone(), keys.clone()).await;

        let app = Arc::new(App {
            catalog,
            schemas,
            policy,
            metrics,
            openapi,
            rate: Default::default(),
            streams: Default::default(),
            ids,
            link,
            keys,
            topology,
            replies,
            max_body_bytes: settings.server.max_body_bytes,
            max_wait: std::time::Duration::from_secs(settings.server.max_wait_s),
            status_timeout: settings.server.status_timeout(),
            max_stream: std::time::Duration::from_secs(settings.server.max_stream_s),
            publish_timeout: settings.server.publish_timeout(),
            request_timeout: std::time::Duration::from_millis(settings.server.request_timeout_ms),
        });
        let limits = Limits {
            handshake_timeout: settings.server.handshake_timeout(),
            header_read_timeout: std::time::Duration::from_millis(settings.server.header_read_timeout_ms),
            max_connections: settings.server.max_connections,
            http2_max_streams: settings.server.http2_max_streams,
            stopping_wait_time: settings.server.stopping_wait_time(),
        };
        let admin_hosts = settings.admin.allowed_hosts.clone();
        Ok(Self { listener, admin, admin_hosts, acceptor, app, limits, supervisor })
    }

    /// The bound address (useful with port 0).
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The bound admin address.
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn admin_addr(&self) -> std::io::Result<SocketAddr> {
        self.admin.local_addr()
    }

    /// A handle that reloads the client policy file (the process wires SIGHUP to it).
    pub fn policy_reloader(&self) -> PolicyReloader {
        PolicyReloader(self.app.clone())
    }

    /// Serves until `shutdown` resolves, drains, and closes the broker connection.
    ///
    /// # Errors
    /// When the listener has no address.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        tracing::info!(addr = %self.listener.local_addr()?, "gatekeeper listening");
        let router = routes::router(self.app.clone());
        let (stop_admin, admin_stopped) = tokio::sync::oneshot::channel::<()>();
        let admin = axum::serve(self.admin, crate::admin::router(self.app.clone(), self.admin_hosts))
            .with_graceful_shutdown(async move {
                let _ = admin_stopped.await;
            });
        let admin = tokio::spawn(async move { admin.await });
        // An idle gatekeeper forgets past sessions' reply keys too (see keys::REPLY_WINDOW_MS).
        let keys = self.app.keys.clone();
        let forgetting = tokio::spawn(async move {
            loop {
                tokio::time::sleep(crate::keys::KEEP_SWEEP).await;
                keys.forget_expired();
            }
        });
        let (app, connections) = (self.app.clone(), Arc::new(crate::tally::Tally::default()));
        let gate: server::ConnectionGate = Arc::new(move |client| {
            let max = app
                .policy
                .current()
                .client(&client.0)
                .map_or(crate::policy::UNLISTED_MAX_CONNECTIONS, |p| p.max_connections);
            connections.enter(&client.0, max)
        });
        server::serve(self.listener, self.acceptor, router, self.limits, gate, shutdown).await;
        forgetting.abort();
        let _ = stop_admin.send(());
        let _ = admin.await;
        self.supervisor.abort();
        self.app.link.close().await;
        tracing::info!(late_replies = self.app.replies.late_count(), "gatekeeper stopped");
        Ok(())
    }
}

/// Reloads the client policy (see [`Gatekeeper::policy_reloader`]).
#[derive(Clone)]
pub struct PolicyReloader(Arc<App>);

impl PolicyReloader {
    /// Reloads `config/policy.toml`; on error the policy in force stays, and the error is
    /// logged. Open connections are not touched.
    pub fn reload(&self) -> bool {
        match self.0.policy.reload() {
            Ok(()) => {
                tracing::info!("client policy reloaded");
                true
            }
            Err(e) => {
                tracing::error!(error = %e, "client policy not reloaded; the previous one stays");
                false
            }
        }
    }
}

/// A random id for this process's reply queue.
fn instance_id() -> String {
    use ring::rand::{SecureRandom, SystemRandom};
    let mut raw = [0u8; 16];
    let _ = SystemRandom::new().fill(&mut raw);
    gatehouse_protocol::JobId::from_bytes(raw).as_str()[..12].to_owned()
}
