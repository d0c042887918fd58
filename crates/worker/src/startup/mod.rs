//! Build (open storage, connect, declare), then run until told to stop, reconnecting with
//! backoff whenever the broker connection is lost. The one module that wires everything:
//! [`WorkerBuilder::build`] checks the configuration and opens what lives as long as the
//! worker; [`Worker::run_until_stopped`] starts the admin listener and the worker's
//! sweepers, then one [`session`] after another.

pub mod process;
mod session;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use gatehouse_broker::Backoff;
use gatehouse_broker::backoff::is_unreachable;
use gatehouse_broker::process::BadConfig;
use gatehouse_protocol::Catalog;
use gatehouse_protocol::keys;
use gatehouse_protocol::schemas::Schemas;
use gatehouse_storage::Store;
use tokio::sync::{mpsc, watch};

use self::session::{Ended, Session};
use crate::admin::dashboard::BrokerView;
use crate::admin::metrics::WorkerMetrics;
use crate::decide::ClientCaps;
use crate::delivery::Shared;
use crate::handlers::exec::Exec;
use crate::handlers::exec::sandbox::Sandbox;
use crate::handlers::progress;
use crate::handlers::{Handler, Kinds, Registry};
use crate::security::WorkerKeys;
use crate::settings::WorkerSettings;
use crate::sweep::retention::{Pruning, Retention};
use crate::sweep::schedules::{Planning, Schedules};

/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A worker with storage open and a first broker session established, not yet consuming.
pub struct Worker {
    settings: WorkerSettings,
    /// What every delivery shares, for the worker's lifetime.
    shared: Arc<Shared>,
    retention: Arc<Retention>,
    /// The schedules this worker fires (see [`crate::sweep::schedules`]).
    schedules: Arc<Schedules>,
    /// What the dashboard sees of the broker.
    broker: Arc<BrokerView>,
    /// Where handlers' progress reports arrive (until the worker runs).
    progress: Option<mpsc::Receiver<progress::Report>>,
    /// Basic auth of the admin listener.
    credentials: Option<Arc<[u8; 32]>>,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`), bound at build.
    admin: Option<tokio::net::TcpListener>,
    /// Tells handlers, sweepers and consumers that the worker is stopping.
    stop: watch::Sender<bool>,
    session: Option<Session>,
    backoff: Backoff,
}

/// Assembles a worker: its settings and the handlers of the kinds it runs.
///
/// ```no_run
/// # async fn example(settings: gatehouse_worker::WorkerSettings) -> anyhow::Result<()> {
/// use gatehouse_worker::handlers::{Outcome, external};
/// #[derive(serde::Deserialize)]
/// struct Text { text: String }
/// let worker = gatehouse_worker::Worker::builder(settings)
///     .builtins()
///     .handle("example.wordcount", external(|_job, p: Text| async move {
///         Outcome::Success(serde_json::json!({ "words": p.text.split_whitespace().count() }))
///     }))
///     .build()
///     .await?;
/// # Ok(()) }
/// ```
pub struct WorkerBuilder {
    settings: WorkerSettings,
    registry: Registry,
}

fn bad(e: &dyn std::fmt::Display) -> anyhow::Error {
    anyhow::Error::new(BadConfig(e.to_string()))
}

impl WorkerBuilder {
    /// Adds the built-in kinds (`vault.*`, `ledger.*`).
    pub fn builtins(mut self) -> Self {
        self.registry.extend(Registry::builtins());
        self
    }

    /// Adds a handler family: tables of its own that its storage handlers use, created and
    /// changed by its migrations when storage opens (see [`gatehouse_storage::Family`]).
    pub fn family(mut self, family: gatehouse_storage::Family) -> Self {
        self.registry.add_family(family);
        self
    }

    /// Registers `handler` for `kind` (see [`crate::handlers`]).
    pub fn handle(mut self, kind: &str, handler: Handler) -> Self {
        self.registry.insert(kind, handler);
        self
    }

    /// Loads the catalog, checks it against the handlers, opens storage, connects to the
    /// broker and declares the topology.
    ///
    /// # Errors
    /// [`BadConfig`] when the catalog, its schemas or a key file cannot be used, or a catalog
    /// kind has no handler or a handler no catalog entry; otherwise when storage cannot be
    /// opened or the broker refuses us (a broker that does not answer yet is waited for).
    pub async fn build(self) -> anyhow::Result<Worker> {
        let Self { settings, registry } = self;
        let catalog = Arc::new(Catalog::load(&settings.catalog.path).map_err(|e| bad(&e))?);
        let kinds = Arc::new(kinds(&settings, &catalog, registry)?);
        let keys = Arc::new(WorkerKeys::load(&settings.keys).map_err(|e| bad(&e))?);
        let retention = Arc::new(Retention::new(&settings, &catalog).map_err(|e| bad(&e))?);
        let leases = settings.consumer.leases().map_err(|e| bad(&e))?;
        let schedules = match &settings.schedules.path {
            Some(path) => Schedules::load(path, &catalog, &kinds.schemas, settings.testing.enabled)
                .map_err(|e| bad(&e))?,
            None => Schedules::default(),
        };
        let credentials = settings.admin.credentials().map_err(|e| bad(&e))?.map(Arc::new);
        let classes = catalog.queues().iter().map(|q| (q.name.clone(), q.routes())).collect();
        let broker = BrokerView::new(settings.broker.topology(), classes);
        let (progress_tx, progress_rx) = progress::channel();
        let location = settings.storage.location().map_err(|e| bad(&e))?;
        let store = open_storage(&location, &settings.keys.data_keyring, kinds.registry.families()).await?;
        let metrics = Arc::new(WorkerMetrics::default());
        store.observe(metrics.clone());
        let admin = tokio::net::TcpListener::bind(settings.admin.listen)
            .await
            .with_context(|| format!("binding the admin listener {}", settings.admin.listen))?;
        let (stop, stopping) = watch::channel(false);
        let c = &settings.consumer;
        let health = Arc::new(crate::admin::health::StorageHealth::new(metrics.clone()));
        let shared = Arc::new(Shared {
            store,
            catalog,
            kinds,
            keys,
            metrics,
            health,
            testing: settings.testing.enabled,
            stop: stopping,
            isolation: tokio::sync::RwLock::new(()),
            job_locks: Default::default(),
            running: Default::default(),
            progress: progress_tx,
            caps: ClientCaps {
                parked: c.max_parked_per_client,
                delayed: c.max_delayed_per_client,
                waiting: c.max_waiting_per_client,
            },
            leases,
        });
        let mut backoff = Backoff::new(Duration::from_millis(250), MAX_BACKOFF);
        // A broker that does not answer yet (starting, restarting) is waited for in `run`;
        // anything else (credentials, permissions) fails the start.
        let session = match Session::open(&settings, &shared, &broker).await {
            Ok(s) => Some(s),
            Err(e) if is_unreachable(&e) => {
                backoff.failed("the broker does not answer yet", &format!("{e:#}"), true);
                None
            }
            Err(e) => return Err(e),
        };
        Ok(Worker {
            settings,
            shared,
            retention,
            schedules: Arc::new(schedules),
            broker,
            progress: Some(progress_rx),
            credentials,
            admin: Some(admin),
            stop,
            session,
            backoff,
        })
    }
}

/// The handlers of the catalog's kinds, checked against it: the registry's, the executables'
/// (sandboxed), and with testing on the `test.*` kinds'; and the catalog's compiled schemas.
fn kinds(settings: &WorkerSettings, catalog: &Catalog, mut registry: Registry) -> anyhow::Result<Kinds> {
    let testing = settings.testing.enabled;
    if testing {
        crate::handlers::testing::register(&mut registry);
    }
    let sandbox = if catalog.kinds().any(|k| k.exec.is_some()) {
        Some(Arc::new(Sandbox::new(&settings.sandbox, testing).map_err(|e| bad(&e))?))
    } else {
        None
    };
    for kind in catalog.kinds() {
        let (Some(exec), Some(sandbox)) = (&kind.exec, &sandbox) else { continue };
        if registry.get(&kind.name).is_some() {
            return Err(bad(&format!("kind {} has both a handler and [kind.exec]", kind.name)));
        }
        let exec = Exec::new(&kind.name, exec, sandbox.clone()).map_err(|e| bad(&e))?;
        registry.insert(&kind.name, Handler::External(Arc::new(exec)));
    }
    registry.check(catalog, testing).map_err(|e| bad(&e))?;
    let schemas = Schemas::compile(catalog).map_err(|e| bad(&e))?;
    let opening = std::iter::once(&settings.keys.sealing_key).chain(&settings.keys.previous_sealing_keys);
    let keys = opening.map(|p| keys::opening_key(p)).collect::<Result<Vec<_>, _>>().map_err(|e| bad(&e))?;
    let parent_results = catalog.kinds().filter(|k| k.parent_results).map(|k| k.name.clone()).collect();
    Ok(Kinds {
        registry,
        schemas,
        fields: gatehouse_protocol::fields::FieldOpener::new(keys),
        parent_results,
    })
}

impl Worker {
    /// A worker with no handlers yet: add them with [`WorkerBuilder::builtins`] and
    /// [`WorkerBuilder::handle`].
    pub fn builder(settings: WorkerSettings) -> WorkerBuilder {
        WorkerBuilder { settings, registry: Registry::default() }
    }

    /// The bound admin address (`/healthz`, `/readyz`, `/metrics`).
    ///
    /// # Errors
    /// When the socket has no local address.
    pub fn admin_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.admin.as_ref().map_or_else(|| Err(std::io::ErrorKind::NotConnected.into()), |a| a.local_addr())
    }

    /// The standard worker: the built-in kinds (and the `test.*` kinds when testing is on).
    ///
    /// # Errors
    /// See [`WorkerBuilder::build`].
    pub async fn build(settings: WorkerSettings) -> anyhow::Result<Self> {
        Self::builder(settings).builtins().build().await
    }

    /// Consumes until `shutdown` resolves. When the broker connection is lost, reconnects with
    /// backoff (redeclaring the topology) and goes on; unacked deliveries come again and the
    /// job id makes them harmless. On shutdown: stops consuming, returns unstarted deliveries,
    /// and lets in-flight jobs finish within `stopping_wait_time`.
    ///
    /// # Errors
    /// Only when consuming cannot start on a fresh connection for a reason other than the
    /// broker being unreachable.
    pub async fn run_until_stopped(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        self.start_services()?;
        let stop_tx = self.stop.clone();
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        let stop = self.stop.subscribe();
        loop {
            let session = match self.session.take() {
                Some(s) => s,
                None => match Session::open(&self.settings, &self.shared, &self.broker).await {
                    Ok(s) => {
                        self.backoff.succeeded();
                        tracing::info!("connected to the broker");
                        s
                    }
                    Err(e) => {
                        let expected = is_unreachable(&e);
                        let delay = self.backoff.failed("broker unavailable", &format!("{e:#}"), expected);
                        if wait_or_stop(delay, stop.clone()).await {
                            return Ok(());
                        }
                        continue;
                    }
                },
            };
            match session.consume(&self.settings, stop.clone()).await? {
                Ended::Stopped => return Ok(()),
                Ended::ConnectionLost => tracing::warn!("broker connection lost; reconnecting"),
            }
        }
    }

    /// What runs for the worker's lifetime beside the sessions: the admin listener, the
    /// progress keeper, pruning and schedule planning.
    fn start_services(&mut self) -> anyhow::Result<()> {
        let shared = &self.shared;
        let admin = crate::admin::router(crate::admin::Admin {
            metrics: shared.metrics.clone(),
            health: shared.health.clone(),
            store: shared.store.clone(),
            catalog: shared.catalog.clone(),
            broker: self.broker.clone(),
            credentials: self.credentials.clone(),
            allowed_hosts: Arc::new(self.settings.admin.allowed_hosts.clone()),
        });
        let listener = self.admin.take().context("the admin listener is served once")?;
        let mut admin_stop = self.stop.subscribe();
        tokio::spawn(async move {
            let served = axum::serve(listener, admin)
                .with_graceful_shutdown(async move {
                    let _ = admin_stop.wait_for(|s| *s).await;
                })
                .await;
            if let Err(e) = served {
                tracing::warn!(error = %e, "admin listener stopped");
            }
        });
        tokio::spawn(crate::admin::health::probe(shared.health.clone(), shared.store.clone()));
        if let Some(rx) = self.progress.take() {
            tokio::spawn(progress::keep(shared.store.clone(), rx));
        }
        let pruning = Pruning {
            store: shared.store.clone(),
            retention: self.retention.clone(),
            metrics: shared.metrics.clone(),
            stop: self.stop.subscribe(),
        };
        tokio::spawn(crate::sweep::run(pruning, shared.health.clone(), self.stop.subscribe()));
        if !self.schedules.0.is_empty() {
            let planning = Planning::new(
                shared.store.clone(),
                self.schedules.clone(),
                shared.keys.clone(),
                shared.metrics.clone(),
            );
            tokio::spawn(crate::sweep::run(planning, shared.health.clone(), self.stop.subscribe()));
        }
        Ok(())
    }
}

/// Opens the storage at `location` and migrates it. A database that does not answer yet
/// (starting, restarting, not reachable) is waited for, as the broker is.
async fn open_storage(
    location: &gatehouse_storage::Location,
    keyring: &std::path::Path,
    families: &[gatehouse_storage::Family],
) -> anyhow::Result<Store> {
    let mut backoff = Backoff::new(Duration::from_millis(250), MAX_BACKOFF);
    loop {
        let keys = gatehouse_protocol::keys::keyring(keyring).map_err(|e| BadConfig(e.to_string()))?;
        match Store::open(location, keys, families).await {
            Ok(store) => {
                if backoff.succeeded() {
                    tracing::info!(storage = %location, "the storage answers");
                }
                return Ok(store);
            }
            Err(gatehouse_storage::StorageError::Config(e)) => return Err(BadConfig(e).into()),
            Err(e) if e.is_transient() => {
                tokio::time::sleep(backoff.failed("the storage does not answer yet", &e, true)).await;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(format!("opening the storage {location}"))),
        }
    }
}

/// Sleeps `d`; true if shutdown came first.
async fn wait_or_stop(d: Duration, mut stop: watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    }
}
