//! Build (open storage, connect, declare), then run until told to stop, reconnecting with
//! backoff whenever the broker connection is lost.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use futures_util::StreamExt;
use gatehouse_broker::backoff::is_unreachable;
use gatehouse_broker::lapin::message::Delivery;
use gatehouse_broker::lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use gatehouse_broker::lapin::types::FieldTable;
use gatehouse_broker::lapin::{Channel, Connection};
use gatehouse_broker::process::BadConfig;
use gatehouse_broker::{Backoff, Publisher};
use gatehouse_protocol::Catalog;
use gatehouse_protocol::schemas::Schemas;
use gatehouse_storage::Store;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::acks::Acks;
use crate::consumer::{self, Context};
use crate::dashboard::BrokerView;
use crate::gaps;
use crate::handlers::exec::Exec;
use crate::handlers::exec::sandbox::Sandbox;
use crate::handlers::{Handler, Kinds, Registry};
use crate::keys::WorkerKeys;
use crate::metrics::WorkerMetrics;
use crate::retention::Retention;
use crate::settings::WorkerSettings;

/// Longest pause between reconnection attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A worker with storage open and a first broker session established, not yet consuming.
pub struct Worker {
    settings: WorkerSettings,
    store: Store,
    catalog: Arc<Catalog>,
    /// Shared by all sessions: a suspect job runs alone (see [`crate::consumer`]).
    isolation: Arc<tokio::sync::RwLock<()>>,
    keys: Arc<WorkerKeys>,
    kinds: Arc<Kinds>,
    metrics: Arc<WorkerMetrics>,
    retention: Arc<Retention>,
    /// The schedules this worker fires (see [`crate::schedules`]).
    schedules: Arc<crate::schedules::Schedules>,
    /// What the dashboard sees of the broker.
    broker: Arc<BrokerView>,
    /// Handlers' progress reports, and (until the worker runs) where they arrive.
    progress: (crate::progress::Sender, Option<tokio::sync::mpsc::Receiver<crate::progress::Report>>),
    /// Basic auth of the admin listener.
    credentials: Option<Arc<[u8; 32]>>,
    admin_hosts: Arc<Vec<String>>,
    /// The admin listener (`/healthz`, `/readyz`, `/metrics`), bound at build.
    admin: Option<tokio::net::TcpListener>,
    /// Tells handlers and consumers that the worker is stopping.
    stop: (watch::Sender<bool>, watch::Receiver<bool>),
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
        let Self { settings, mut registry } = self;
        let bad = |e: &dyn std::fmt::Display| anyhow::Error::new(BadConfig(e.to_string()));
        let catalog = Arc::new(Catalog::load(&settings.catalog.path).map_err(|e| bad(&e))?);
        if settings.testing.enabled {
            crate::handlers::testing::register(&mut registry);
        }
        let testing = settings.testing.enabled;
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
        registry.check(&catalog, settings.testing.enabled).map_err(|e| bad(&e))?;
        let schemas = Schemas::compile(&catalog).map_err(|e| bad(&e))?;
        let kinds = Arc::new(Kinds { registry, schemas });
        let keys = Arc::new(WorkerKeys::load(&settings.keys).map_err(|e| bad(&e))?);
        let retention = Arc::new(Retention::new(&settings, &catalog).map_err(|e| bad(&e))?);
        settings.consumer.leases().map_err(|e| bad(&e))?;
        let schedules = match &settings.schedules.path {
            Some(path) => {
                crate::schedules::Schedules::load(path, &catalog, &kinds.schemas, settings.testing.enabled)
                    .map_err(|e| bad(&e))?
            }
            None => crate::schedules::Schedules::default(),
        };
        let credentials = settings.admin.credentials().map_err(|e| bad(&e))?.map(Arc::new);
        let admin_hosts = Arc::new(settings.admin.allowed_hosts.clone());
        let classes = catalog.queues().iter().map(|q| q.name.clone()).collect();
        let broker = BrokerView::new(settings.broker.topology(), classes);
        let (progress_tx, progress_rx) = crate::progress::channel();
        let location = settings.storage.location().map_err(|e| bad(&e))?;
        let store = open_storage(&location, &settings.keys.data_keyring, kinds.registry.families()).await?;
        let isolation = Arc::new(tokio::sync::RwLock::new(()));
        let stop = watch::channel(false);
        let metrics = Arc::new(WorkerMetrics::default());
        store.observe(metrics.clone());
        let admin = tokio::net::TcpListener::bind(settings.admin.listen)
            .await
            .with_context(|| format!("binding the admin listener {}", settings.admin.listen))?;
        let mut backoff = Backoff::new(Duration::from_millis(250), MAX_BACKOFF);
        let shared = Shared {
            store: &store,
            catalog: &catalog,
            isolation: &isolation,
            keys: &keys,
            kinds: &kinds,
            metrics: &metrics,
            broker: &broker,
            progress: &progress_tx,
            stop: &stop.1,
        };
        // A broker that does not answer yet (starting, restarting) is waited for in `run`;
        // anything else (credentials, permissions) fails the start.
        let session = match Session::open(&settings, &shared).await {
            Ok(s) => Some(s),
            Err(e) if is_unreachable(&e) => {
                backoff.failed("the broker does not answer yet", &format!("{e:#}"), true);
                None
            }
            Err(e) => return Err(e),
        };
        let admin = Some(admin);
        Ok(Worker {
            settings,
            store,
            catalog,
            isolation,
            keys,
            kinds,
            metrics,
            retention,
            schedules: Arc::new(schedules),
            broker,
            progress: (progress_tx, Some(progress_rx)),
            credentials,
            admin_hosts,
            admin,
            stop,
            session,
            backoff,
        })
    }
}

/// What every broker session of a worker shares.
struct Shared<'a> {
    store: &'a Store,
    catalog: &'a Arc<Catalog>,
    isolation: &'a Arc<tokio::sync::RwLock<()>>,
    keys: &'a Arc<WorkerKeys>,
    kinds: &'a Arc<Kinds>,
    metrics: &'a Arc<WorkerMetrics>,
    broker: &'a Arc<BrokerView>,
    progress: &'a crate::progress::Sender,
    stop: &'a watch::Receiver<bool>,
}

/// One broker connection and what hangs off it.
struct Session {
    connection: Connection,
    /// The channel the job queues are consumed on (acked through `ctx.acks`).
    jobs: Channel,
    ctx: Arc<Context>,
}

/// Where a delivery came from.
#[derive(Clone)]
enum Source {
    /// The job queue of this class.
    Job(String),
    Control,
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
        let (stop_tx, stop) = (self.stop.0.clone(), self.stop.1.clone());
        let admin = crate::admin::router(crate::admin::Admin {
            metrics: self.metrics.clone(),
            store: self.store.clone(),
            catalog: self.catalog.clone(),
            broker: self.broker.clone(),
            credentials: self.credentials.clone(),
            allowed_hosts: self.admin_hosts.clone(),
        });
        let listener = self.admin.take().context("the admin listener is served once")?;
        let mut admin_stop = stop.clone();
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
        if let Some(rx) = self.progress.1.take() {
            tokio::spawn(crate::progress::keep(self.store.clone(), rx));
        }
        tokio::spawn(crate::retention::prune_forever(
            self.store.clone(),
            self.retention.clone(),
            self.metrics.clone(),
            stop.clone(),
        ));
        if !self.schedules.0.is_empty() {
            let planning = crate::schedules::run_forever(
                self.store.clone(),
                self.schedules.clone(),
                self.keys.clone(),
                self.metrics.clone(),
            );
            let mut stopping = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = planning => {}
                    _ = stopping.wait_for(|s| *s) => {}
                }
            });
        }
        tokio::spawn(async move {
            shutdown.await;
            let _ = stop_tx.send(true);
        });
        loop {
            let session = match self.session.take() {
                Some(s) => s,
                None => {
                    let shared = Shared {
                        store: &self.store,
                        catalog: &self.catalog,
                        isolation: &self.isolation,
                        keys: &self.keys,
                        kinds: &self.kinds,
                        metrics: &self.metrics,
                        broker: &self.broker,
                        progress: &self.progress.0,
                        stop: &self.stop.1,
                    };
                    match Session::open(&self.settings, &shared).await {
                        Ok(s) => {
                            self.backoff.succeeded();
                            tracing::info!("connected to the broker");
                            s
                        }
                        Err(e) => {
                            let expected = is_unreachable(&e);
                            let delay =
                                self.backoff.failed("broker unavailable", &format!("{e:#}"), expected);
                            if wait_or_stop(delay, stop.clone()).await {
                                return Ok(());
                            }
                            continue;
                        }
                    }
                }
            };
            match session.consume(&self.settings, stop.clone()).await? {
                Ended::Stopped => return Ok(()),
                Ended::ConnectionLost => tracing::warn!("broker connection lost; reconnecting"),
            }
        }
    }
}

/// Sleeps `d`; true if shutdown came first.
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

async fn wait_or_stop(d: Duration, mut stop: watch::Receiver<bool>) -> bool {
    tokio::select! {
        () = tokio::time::sleep(d) => false,
        _ = stop.wait_for(|s| *s) => true,
    }
}

enum Ended {
    Stopped,
    ConnectionLost,
}

impl Session {
    async fn open(settings: &WorkerSettings, shared: &Shared<'_>) -> anyhow::Result<Self> {
        let Shared { store, catalog, isolation, keys, kinds, metrics, broker, progress, stop } = *shared;
        let connection = gatehouse_broker::connect_with(&settings.broker, "gatehouse-worker")
            .await
            .context("connecting to the broker")?;
        let topology = settings.broker.topology();
        let setup = connection.create_channel().await?;
        topology.declare(&setup, catalog.queues()).await.context("declaring topology")?;
        let _ = setup.close(200, "topology declared".into()).await;
        broker.connected(connection.create_channel().await?).await;
        let jobs = connection.create_channel().await?;
        let ctx = Arc::new(Context {
            store: store.clone(),
            catalog: catalog.clone(),
            replies: connection.create_channel().await?,
            publisher: Publisher::open(&connection).await?,
            topology,
            testing: settings.testing.enabled,
            kinds: kinds.clone(),
            metrics: metrics.clone(),
            stop: stop.clone(),
            retry_queues: Mutex::new(Default::default()),
            isolation: isolation.clone(),
            job_locks: Default::default(),
            keys: keys.clone(),
            acks: Acks::start(jobs.clone()),
            caps: crate::apply::ClientCaps {
                parked: settings.consumer.max_parked_per_client,
                delayed: settings.consumer.max_delayed_per_client,
                waiting: settings.consumer.max_waiting_per_client,
            },
            running: Arc::default(),
            progress: progress.clone(),
            leases: settings.consumer.leases().map_err(anyhow::Error::msg)?,
            handed_off: Mutex::default(),
        });
        Ok(Self { connection, jobs, ctx })
    }

    async fn consume(
        self,
        settings: &WorkerSettings,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Ended> {
        let topology = &self.ctx.topology;
        let jobs = self.jobs.clone();
        jobs.basic_qos(settings.consumer.prefetch, BasicQosOptions::default()).await?;
        let control = self.connection.create_channel().await?;
        control.basic_qos(32, BasicQosOptions::default()).await?;

        let (tx, mut rx) = mpsc::channel::<(Source, Delivery)>(64);
        let mut tags = Vec::new();
        // Every class's queue, or each of its priority lanes (quorum).
        for route in self.ctx.catalog.queues().iter().flat_map(|q| q.routes()) {
            let tag = format!("worker.{route}");
            start(&jobs, &topology.job_queue(&route), &tag, Source::Job(route.clone()), &tx).await?;
            tags.push((jobs.clone(), tag));
        }
        let mut lanes =
            crate::dispatch::Lanes::new(&self.ctx.catalog, usize::from(settings.consumer.prefetch));
        start(&control, &topology.control_queue(), "worker.control", Source::Control, &tx).await?;
        tags.push((control.clone(), "worker.control".to_owned()));
        drop(tx);
        tracing::info!(prefetch = settings.consumer.prefetch, "worker consuming");
        self.ctx.metrics.set_ready(true);

        let sweeper = {
            let ctx = self.ctx.clone();
            tokio::spawn(async move { gaps::sweep_forever(&ctx).await })
        };
        let releaser = {
            let ctx = self.ctx.clone();
            tokio::spawn(async move { crate::delays::release_forever(&ctx).await })
        };
        let mut in_flight = JoinSet::new();
        // The tasks that hold a slot of a quorum class, and its name (freed however they end).
        let mut lane_tasks: HashMap<tokio::task::Id, String> = HashMap::new();
        let ended = loop {
            tokio::select! {
                _ = stop.wait_for(|s| *s) => break Ended::Stopped,
                next = rx.recv() => match next {
                    Some((Source::Job(route), d)) => match lanes.class_of(&route) {
                        Some(class) => lanes.hold(&class, route, d),
                        None => { in_flight.spawn(consumer::handle_job(self.ctx.clone(), route, d)); }
                    },
                    Some((Source::Control, d)) => { in_flight.spawn(consumer::handle_control(self.ctx.clone(), d)); }
                    None => break Ended::ConnectionLost,
                },
                Some(done) = in_flight.join_next_with_id(), if !in_flight.is_empty() => {
                    let id = match &done {
                        Ok((id, ())) => *id,
                        Err(e) => {
                            tracing::error!(error = %e, "delivery task failed");
                            e.id()
                        }
                    };
                    if let Some(class) = lane_tasks.remove(&id) {
                        lanes.finished(&class);
                    }
                }
            }
            // Start what the lanes hold, highest priority first, as slots free up.
            while let Some((class, route, d)) = lanes.next_to_start() {
                let task = in_flight.spawn(consumer::handle_job(self.ctx.clone(), route, d));
                lane_tasks.insert(task.id(), class);
            }
        };
        sweeper.abort();
        releaser.abort();
        self.ctx.metrics.set_ready(false);

        // No new deliveries; give back the ones received but not started.
        for (channel, tag) in &tags {
            let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
        }
        rx.close();
        for d in lanes.drain() {
            let _ = d.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
            self.ctx.acks.settled_elsewhere(d.delivery_tag);
        }
        while let Ok((source, d)) = rx.try_recv() {
            let _ = d.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
            if matches!(source, Source::Job(_)) {
                self.ctx.acks.settled_elsewhere(d.delivery_tag);
            }
        }
        let grace = settings.consumer.stopping_wait_time();
        let drained =
            tokio::time::timeout(grace, async { while in_flight.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                ?grace,
                left = in_flight.len(),
                "in-flight jobs did not finish in time; the broker will redeliver them"
            );
            in_flight.abort_all();
        }
        // What finished is acked before the connection goes.
        self.ctx.acks.flush().await;
        let _ = self.connection.close(200, "worker stopping".into()).await;
        if matches!(ended, Ended::Stopped) {
            tracing::info!("worker stopped");
        }
        Ok(ended)
    }
}

/// Starts a consumer on `queue` that forwards its deliveries to `tx`.
async fn start(
    channel: &Channel,
    queue: &str,
    tag: &str,
    source: Source,
    tx: &mpsc::Sender<(Source, Delivery)>,
) -> anyhow::Result<()> {
    let mut consumer = channel
        .basic_consume(queue.into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .with_context(|| format!("consuming {queue}"))?;
    let tx = tx.clone();
    let queue = queue.to_owned();
    tokio::spawn(async move {
        while let Some(next) = consumer.next().await {
            match next {
                Ok(d) => {
                    if tx.send((source.clone(), d)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, queue, "consumer stopped");
                    return;
                }
            }
        }
    });
    Ok(())
}
