//! Test harness: one real broker (started once if none answers), and per test a gatekeeper
//! (in-process, port 0) and a worker (in-process, or a real child process that fault tests
//! kill), each test with its own queue prefix, certificates, policy and SQLite file.

mod env;
pub mod management;
pub mod oracle;
mod worker_process;

pub use env::*;
pub use worker_process::WorkerProcess;
use worker_process::worker_toml;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gatehouse_broker::lapin::options::{ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use gatehouse_broker::lapin::types::FieldTable;
use gatehouse_broker::{BrokerSettings, Topology};
use gatehouse_client::{Client, Connection, Identity, Response};
use gatehouse_gatekeeper::Gatekeeper;
use gatehouse_gatekeeper::settings::{
    GatekeeperSettings, IdSettings, KeySettings as GatekeeperKeySettings, PathSetting, ServerSettings,
    TlsSettings,
};
use gatehouse_protocol::Catalog;
use gatehouse_protocol::settings::Secret;
pub use gatehouse_storage::Location;
use gatehouse_worker::Worker;
use gatehouse_worker::settings::{
    CatalogSettings, ConsumerSettings, KeySettings as WorkerKeySettings, StorageSettings, TestingSettings,
    WorkerSettings,
};
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// Another client certificate the test policy knows (allowed everything, like dev-client).
pub const OTHER_CLIENT: &str = "other-client";

/// How a test system is set up.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Run the worker as this binary (a real process that can be killed) instead of in-process.
    pub worker_binary: Option<&'static str>,
    /// Restart the worker process whenever it exits (like a service manager would).
    pub supervise_worker: bool,
    /// Enable the `test.*` kinds.
    pub testing: bool,
    /// Override every kind's sequence gap timeout.
    pub gap_timeout_s: Option<u64>,
    /// Override the worker's prefetch (default 4).
    pub prefetch: Option<u16>,
    /// Use this job catalog (for gatekeeper and worker) instead of the shipped one.
    pub catalog: Option<PathBuf>,
    /// Override the worker's cap on parked jobs per client.
    pub max_parked_per_client: Option<u64>,
    /// Override the worker's caps per client on delayed jobs and on jobs waiting for a
    /// singleton turn.
    pub max_delayed_and_waiting_per_client: Option<(u64, u64)>,
    /// Override every queue class's max length.
    pub max_length: Option<u32>,
    /// Connect as these users instead of guest: (gatekeeper URL, worker URL).
    pub broker_urls: Option<(String, String)>,
    /// Use this topology prefix instead of a random one.
    pub prefix: Option<String>,
    /// `RUST_LOG` of a worker process (default: the processes' own default filter).
    pub worker_log: Option<&'static str>,
    /// Client certificate for `amqps://` broker URLs.
    pub broker_tls: Option<gatehouse_broker::BrokerTlsSettings>,
    /// More client certificates to make (`NAME.pem` / `NAME.key`) ...
    pub extra_clients: &'static [&'static str],
    /// ... and more policy entries (TOML) appended to the test policy.
    pub extra_policy: &'static str,
    /// Runs on the certificates folder before the gatekeeper loads it (to add test certs).
    pub prepare_certs: Option<fn(&Path)>,
    /// A CRL file in the certificates folder for the gatekeeper.
    pub client_crl: Option<&'static str>,
    /// The gatekeeper's connection limit (default 256).
    pub max_connections: Option<usize>,
    /// The worker's `keys.max_message_age_s` (default 3600).
    pub max_message_age_s: Option<u64>,
    /// Basic auth on the worker's admin listener: user `ops` with this password.
    pub worker_admin_password: Option<&'static str>,
    /// The worker's `[retention]` (default: the worker's defaults).
    pub retention: Option<gatehouse_worker::settings::RetentionSettings>,
    /// The worker's `hand_off_after_ms` and `lease_ms` (long jobs).
    pub hand_off: Option<(u64, u64)>,
    /// The worker's schedules file (its TOML text).
    pub schedules: Option<&'static str>,
    /// Worker processes sharing one database (with `worker_binary`); 1 when 0.
    pub workers: usize,
    /// The gatekeeper's `max_stream_s` (300).
    pub max_stream_s: Option<u64>,
    /// Every queue class of the catalog as quorum lanes (`type = "quorum"`) of one fair shard.
    pub quorum: bool,
    /// The components' first broker URL answers nowhere; the real one is the second.
    pub dead_first_node: bool,
    /// The nodes of a broker cluster, for both components (instead of the test broker).
    pub broker_nodes: Option<Vec<String>>,
    /// Storage on a new database of the tests' PostgreSQL server instead of an SQLite file.
    pub postgres: bool,
    /// Gatekeepers to start (at least one); `addr` is the first's, [`TestSystem::clients`]
    /// has one client per gatekeeper.
    pub gatekeepers: usize,
    /// Run the worker process (with `worker_binary`) as this uid and gid, as the container
    /// does (its certificates and data folders are handed to it).
    pub worker_uid: Option<u32>,
    /// The worker's SQLite file in this folder (a small file system the test mounts) instead
    /// of the test's data folder.
    pub sqlite_dir: Option<PathBuf>,
    /// Spans to this OTLP/HTTP traces URL (`[telemetry] otlp_endpoint`): a worker process
    /// exports them itself; the in-process gatekeeper's go wherever the test process's
    /// subscriber sends them.
    pub otlp_endpoint: Option<String>,
}

/// A running gatekeeper + worker pair.
pub struct TestSystem {
    pub addr: SocketAddr,
    /// The gatekeeper's plain-HTTP admin listener.
    pub admin_addr: SocketAddr,
    /// The worker's admin listener (`/metrics`, `/readyz`); `None` for several worker processes.
    pub worker_admin_addr: Option<SocketAddr>,
    /// Reloads the gatekeeper's policy file (what SIGHUP does in the process).
    pub policy: gatehouse_gatekeeper::startup::PolicyReloader,
    pub certs: TempDir,
    pub prefix: String,
    pub data: TempDir,
    worker_settings: WorkerSettings,
    worker: WorkerRun,
    stop_gatekeeper: Option<oneshot::Sender<()>>,
    /// The gatekeepers after the first: address, stop, task.
    more_gatekeepers: Vec<(SocketAddr, oneshot::Sender<()>, JoinHandle<anyhow::Result<()>>)>,
    gatekeeper: Option<JoinHandle<anyhow::Result<()>>>,
    /// The topology is this test's own (random prefix): delete it at the end.
    owns_topology: bool,
}

enum WorkerRun {
    InProcess {
        stop: Option<oneshot::Sender<()>>,
        task: Option<JoinHandle<anyhow::Result<()>>>,
    },
    /// One or more processes on one database.
    Process(Vec<Arc<WorkerProcess>>),
}

/// Gives `dir` and what it holds (one level) to `uid`.
fn hand_over(dir: &Path, uid: u32) {
    std::os::unix::fs::chown(dir, Some(uid), Some(uid)).expect("chown");
    for entry in std::fs::read_dir(dir).expect("read_dir").flatten() {
        std::os::unix::fs::chown(entry.path(), Some(uid), Some(uid)).expect("chown");
    }
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).expect("randomness");
    gatehouse_protocol::hex::encode(&raw)
}

async fn until(rx: oneshot::Receiver<()>) {
    let _ = rx.await;
}

/// The catalog for a test: the shipped one, or a copy with other gap timeouts.
fn catalog_for(options: &Options, dir: &Path) -> PathBuf {
    if let Some(own) = &options.catalog {
        return own.clone();
    }
    let shipped = repo_root().join("config/jobs.toml");
    if options.gap_timeout_s.is_none() && options.max_length.is_none() && !options.quorum {
        return shipped;
    }
    let schemas = repo_root().join("config/schemas");
    let text = std::fs::read_to_string(&shipped).expect("catalog");
    let mut out = String::new();
    for line in text.lines() {
        if options.gap_timeout_s.is_some() && line.starts_with("gap_timeout_s") {
            continue;
        }
        // As `gatehouse up --cluster` (`quorum_catalog`): quorum lanes of one fair shard.
        if options.quorum && line.starts_with("fair_shards") {
            continue;
        }
        if options.quorum && line.starts_with("max_length") {
            out.push_str("type = \"quorum\"\n");
        }
        if let (Some(max), true) = (options.max_length, line.starts_with("max_length")) {
            out.push_str(&format!("max_length = {max}\n"));
            continue;
        }
        out.push_str(&line.replace("schema = \"schemas/", &format!("schema = \"{}/", schemas.display())));
        out.push('\n');
        if let (Some(gap), true) = (options.gap_timeout_s, line.starts_with("queue = ")) {
            out.push_str(&format!("gap_timeout_s = {gap}\n"));
        }
    }
    let path = dir.join("jobs.toml");
    std::fs::write(&path, out).expect("catalog copy");
    path
}

impl TestSystem {
    /// Starts a worker and a gatekeeper in-process against the test broker.
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    /// Starts a system as `options` say.
    pub async fn start_with(options: Options) -> Self {
        let _ = tracing_subscriber::fmt().with_env_filter("warn").with_test_writer().try_init();
        let url = tokio::task::spawn_blocking(broker_url).await.expect("broker");
        let certs = TempDir::new().expect("tempdir");
        let data = TempDir::new().expect("tempdir");
        gatehouse_devenv::certs::write_dev(certs.path()).expect("dev certs");
        gatehouse_devenv::certs::write_client(certs.path(), OTHER_CLIENT).expect("other client cert");
        for name in options.extra_clients {
            gatehouse_devenv::certs::write_client(certs.path(), name).expect("extra client cert");
        }
        if let Some(prepare) = options.prepare_certs {
            prepare(certs.path());
        }
        let policy = data.path().join("policy.toml");
        std::fs::write(
            &policy,
            format!(
                "[[client]]\nidentity = \"dev-client\"\nkinds = [\"*\"]\nmax_priority = 9\n\n\
                 [[client]]\nidentity = \"{OTHER_CLIENT}\"\nkinds = [\"*\"]\nmax_priority = 9\n\n{}",
                options.extra_policy
            ),
        )
        .expect("policy");
        let prefix = options.prefix.clone().unwrap_or_else(|| format!("t{}.", random_hex(4)));
        let (gatekeeper_url, worker_url) = options.broker_urls.clone().unwrap_or((url.clone(), url));
        // With `dead_first_node`, each component's first URL is a port nobody listens on.
        // With `broker_nodes`, a cluster's nodes.
        let nodes = |url: String| match (&options.broker_nodes, options.dead_first_node) {
            (Some(n), _) => (Secret::new(n[0].clone()), n[1..].iter().cloned().map(Secret::new).collect()),
            (None, true) => (Secret::new("amqp://guest:guest@127.0.0.1:1/%2f"), vec![Secret::new(url)]),
            (None, false) => (Secret::new(url), Vec::new()),
        };
        let (url, other_urls) = nodes(gatekeeper_url);
        let broker =
            BrokerSettings { url, other_urls, prefix: prefix.clone(), tls: options.broker_tls.clone() };
        let (url, other_urls) = nodes(worker_url);
        let worker_broker =
            BrokerSettings { url, other_urls, prefix: prefix.clone(), tls: options.broker_tls.clone() };
        let catalog = catalog_for(&options, data.path());
        if std::fs::read_to_string(&catalog).is_ok_and(|c| c.contains("[kind.exec]")) {
            bubblewrap();
        }

        let mut worker_settings = WorkerSettings {
            broker: worker_broker,
            consumer: ConsumerSettings {
                prefetch: options.prefetch.unwrap_or(4),
                stopping_wait_time_ms: 5000,
                max_parked_per_client: options.max_parked_per_client.unwrap_or(10_000),
                max_delayed_per_client: options.max_delayed_and_waiting_per_client.map_or(10_000, |c| c.0),
                max_waiting_per_client: options.max_delayed_and_waiting_per_client.map_or(10_000, |c| c.1),
                hand_off_after_ms: options.hand_off.map_or(600_000, |h| h.0),
                lease_ms: options.hand_off.map_or(60_000, |h| h.1),
            },
            storage: if options.postgres {
                let (url, password) = fresh_database().await;
                let file = data.path().join("postgres.password");
                std::fs::write(&file, password).expect("password file");
                StorageSettings { url: Some(url), password_file: Some(file), ..Default::default() }
            } else {
                let path = options.sqlite_dir.as_deref().unwrap_or(data.path()).join("worker.sqlite");
                StorageSettings { url: Some(format!("sqlite:{}", path.display())), ..Default::default() }
            },
            catalog: CatalogSettings { path: catalog.clone() },
            keys: WorkerKeySettings {
                sealing_key: certs.path().join("worker-sealing.key"),
                previous_sealing_keys: vec![],
                gatekeeper_signing_keys: vec![certs.path().join("gatekeeper-signing.pub")],
                operator_keys: vec![certs.path().join("operator-signing.pub")],
                data_keyring: certs.path().join("worker-data.keys"),
                max_message_age_s: options.max_message_age_s.unwrap_or(3600),
            },
            testing: TestingSettings { enabled: options.testing },
            admin: gatehouse_worker::settings::AdminSettings {
                listen: "127.0.0.1:0".parse().expect("addr"),
                basic_auth_user: options.worker_admin_password.map(|_| "ops".to_owned()),
                basic_auth_password_file: options.worker_admin_password.map(|p| {
                    let file = data.path().join("admin.password");
                    std::fs::write(&file, p).expect("password file");
                    file
                }),
                allowed_hosts: Vec::new(),
            },
            retention: options.retention.clone().unwrap_or_default(),
            schedules: gatehouse_worker::settings::ScheduleSettings {
                path: options.schedules.map(|text| {
                    let file = data.path().join("schedules.toml");
                    std::fs::write(&file, text).expect("schedules file");
                    file
                }),
            },
            sandbox: Default::default(),
            telemetry: gatehouse_broker::telemetry::TelemetrySettings {
                otlp_endpoint: options.otlp_endpoint.clone(),
            },
        };
        let mut worker_admin_addr = None;
        let worker = match options.worker_binary {
            None => {
                let w = Worker::build(worker_settings.clone()).await.expect("worker builds");
                worker_admin_addr = w.admin_addr().ok();
                let (stop, rx) = oneshot::channel();
                let task = tokio::spawn(w.run_until_stopped(until(rx)));
                WorkerRun::InProcess { stop: Some(stop), task: Some(task) }
            }
            Some(binary) => {
                if options.workers <= 1 {
                    // One process: its admin listener on a port known here.
                    let free = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
                    worker_settings.admin.listen = free.local_addr().expect("addr");
                    worker_admin_addr = Some(worker_settings.admin.listen);
                }
                let config = data.path().join("worker.toml");
                std::fs::write(&config, worker_toml(&worker_settings)).expect("worker config");
                if let Some(uid) = options.worker_uid {
                    for dir in [certs.path(), data.path()] {
                        hand_over(dir, uid);
                    }
                }
                let processes = (0..options.workers.max(1))
                    .map(|i| {
                        let log =
                            if i == 0 { "worker.log".to_owned() } else { format!("worker-{}.log", i + 1) };
                        let p = Arc::new(WorkerProcess {
                            binary: binary.into(),
                            config: config.clone(),
                            log: data.path().join(log),
                            log_filter: options
                                .worker_log
                                .unwrap_or(gatehouse_broker::process::DEFAULT_FILTER),
                            child: Mutex::new(None),
                            starts: 0.into(),
                            supervising: options.supervise_worker.into(),
                            uid: options.worker_uid,
                        });
                        p.start();
                        if options.supervise_worker {
                            let p = p.clone();
                            tokio::spawn(async move { p.supervise().await });
                        }
                        p
                    })
                    .collect();
                WorkerRun::Process(processes)
            }
        };
        let gatekeeper_settings = GatekeeperSettings {
            server: ServerSettings {
                listen: "127.0.0.1:0".parse().expect("addr"),
                handshake_timeout_ms: 2000,
                header_read_timeout_ms: 2000,
                request_timeout_ms: 15000,
                max_body_bytes: 65536,
                max_connections: options.max_connections.unwrap_or(256),
                max_wait_s: 30,
                status_timeout_ms: 5000,
                publish_timeout_ms: 5000,
                stopping_wait_time_ms: 5000,
                max_stream_s: options.max_stream_s.unwrap_or(300),
                http2_max_streams: 64,
            },
            tls: TlsSettings {
                cert: certs.path().join("server.pem"),
                key: certs.path().join("server.key"),
                client_ca: certs.path().join("ca.pem"),
                client_crl: options.client_crl.map(|f| certs.path().join(f)),
            },
            broker,
            catalog: PathSetting { path: catalog },
            policy: PathSetting { path: policy },
            ids: IdSettings { secret_file: certs.path().join("gatekeeper-ids.secret") },
            admin: gatehouse_gatekeeper::settings::AdminSettings {
                listen: "127.0.0.1:0".parse().expect("addr"),
                allowed_hosts: Vec::new(),
            },
            testing: gatehouse_gatekeeper::settings::TestingSettings { enabled: options.testing },
            telemetry: gatehouse_broker::telemetry::TelemetrySettings {
                otlp_endpoint: options.otlp_endpoint.clone(),
            },
            keys: GatekeeperKeySettings {
                signing_key: certs.path().join("gatekeeper-signing.key"),
                worker_sealing_key: certs.path().join("worker-sealing.pub"),
                worker_key_set: Some(certs.path().join("worker-keys.json")),
            },
        };
        let mut more_gatekeepers = Vec::new();
        for _ in 1..options.gatekeepers.max(1) {
            let g = Gatekeeper::build(gatekeeper_settings.clone()).await.expect("gatekeeper builds");
            let addr = g.local_addr().expect("addr");
            let (stop, rx) = oneshot::channel();
            more_gatekeepers.push((addr, stop, tokio::spawn(g.run_until_stopped(until(rx)))));
        }
        let gatekeeper = Gatekeeper::build(gatekeeper_settings).await.expect("gatekeeper builds");
        let addr = gatekeeper.local_addr().expect("addr");
        let admin_addr = gatekeeper.admin_addr().expect("admin addr");
        let policy = gatekeeper.policy_reloader();
        let (stop_g, rx_g) = oneshot::channel();
        let gatekeeper = tokio::spawn(gatekeeper.run_until_stopped(until(rx_g)));
        let system = Self {
            addr,
            admin_addr,
            worker_admin_addr,
            policy,
            certs,
            prefix,
            data,
            worker_settings,
            worker,
            stop_gatekeeper: Some(stop_g),
            more_gatekeepers,
            gatekeeper: Some(gatekeeper),
            owns_topology: options.prefix.is_none(),
        };
        system.wait_ready().await;
        system
    }

    /// Waits until every gatekeeper's `/readyz` answers 200 (its broker link is up, which needs
    /// the topology the worker declares). Each gatekeeper's link backs off on its own: the
    /// second of two could still answer 503 when the first is ready.
    pub async fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        for client in self.clients() {
            loop {
                let ready = async {
                    let mut c = client.connect().await.ok()?;
                    c.request(gatehouse_client::Method::GET, "/readyz", &[], Vec::new()).await.ok()
                };
                if ready.await.is_some_and(|r| r.status == 200) {
                    break;
                }
                assert!(Instant::now() < deadline, "a gatekeeper did not become ready");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A client presenting the certificate of `name` (`client` = dev-client).
    pub fn client_as(&self, name: &str) -> Client {
        let dir = self.certs.path();
        let identity =
            Identity { cert: dir.join(format!("{name}.pem")), key: dir.join(format!("{name}.key")) };
        Client::new(&self.url(), &dir.join("ca.pem"), Some(identity)).expect("client")
    }

    /// A client as dev-client.
    pub fn client(&self) -> Client {
        self.client_as("client")
    }

    /// A client as dev-client for each gatekeeper, the first's first.
    pub fn clients(&self) -> Vec<Client> {
        let dir = self.certs.path();
        let identity = Identity { cert: dir.join("client.pem"), key: dir.join("client.key") };
        std::iter::once(self.addr)
            .chain(self.more_gatekeepers.iter().map(|g| g.0))
            .map(|addr| {
                Client::new(&format!("https://{addr}"), &dir.join("ca.pem"), Some(identity.clone()))
                    .expect("client")
            })
            .collect()
    }

    /// The CLI's view of this gatekeeper, as dev-client.
    pub fn endpoint(&self) -> gatehouse_cli::commands::jobs::Endpoint {
        let dir = self.certs.path();
        gatehouse_cli::commands::jobs::Endpoint {
            url: self.url(),
            cert: dir.join("client.pem"),
            key: dir.join("client.key"),
            ca: dir.join("ca.pem"),
        }
    }

    /// A connection as dev-client.
    pub async fn connect(&self) -> Connection {
        self.client().connect().await.expect("connect")
    }

    /// The gatekeeper's policy file.
    pub fn policy_file(&self) -> PathBuf {
        self.data.path().join("policy.toml")
    }

    /// The worker's data keys (encryption at rest).
    /// The operator key the worker trusts for replays (`gatehouse dlq replay`).
    pub fn operator_key(&self) -> gatehouse_protocol::crypto::SigningKey {
        gatehouse_protocol::keys::signing_key(&self.certs.path().join("operator-signing.key"))
            .expect("operator key")
    }

    /// The worker's keys (as its settings name them).
    pub fn worker_keys(&self) -> gatehouse_worker::security::WorkerKeys {
        gatehouse_worker::security::WorkerKeys::load(&self.worker_settings.keys).expect("worker keys")
    }

    pub fn keyring(&self) -> PathBuf {
        self.worker_settings.keys.data_keyring.clone()
    }

    /// Where the worker's SQLite file is (panics for PostgreSQL storage).
    pub fn database(&self) -> PathBuf {
        match self.storage() {
            Location::Sqlite(path) => path,
            Location::Postgres(_) => panic!("this test system stores in PostgreSQL"),
        }
    }

    /// Where the worker's storage is.
    pub fn storage(&self) -> Location {
        self.worker_settings.storage.location().expect("storage settings")
    }

    pub fn topology(&self) -> Topology {
        Topology::new(self.prefix.clone())
    }

    /// The (first) worker process (panics for an in-process worker).
    pub fn worker_process(&self) -> &Arc<WorkerProcess> {
        &self.worker_processes()[0]
    }

    /// The worker processes (panics for an in-process worker).
    pub fn worker_processes(&self) -> &[Arc<WorkerProcess>] {
        match &self.worker {
            WorkerRun::Process(p) => p,
            WorkerRun::InProcess { .. } => panic!("this test system runs its worker in-process"),
        }
    }

    /// The job catalog both components were started on (a copy in the test's data folder
    /// when an option changed it, which a test may rewrite before it restarts the worker).
    pub fn catalog_path(&self) -> &Path {
        &self.worker_settings.catalog.path
    }

    /// Messages in `queue` now (by a passive declare).
    pub async fn queue_depth(&self, queue: &str) -> u32 {
        let conn = gatehouse_broker::connect(&broker_url(), "gatehouse-e2e-depth").await.expect("connect");
        let ch = conn.create_channel().await.expect("channel");
        let opts = QueueDeclareOptions { passive: true, ..Default::default() };
        let n =
            ch.queue_declare(queue.into(), opts, FieldTable::default()).await.expect("queue").message_count();
        let _ = conn.close(200, "done".into()).await;
        n
    }

    /// Stops both components and deletes this test's queues and exchanges.
    pub async fn stop(mut self) {
        if let Some(s) = self.stop_gatekeeper.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.gatekeeper.take() {
            t.await.expect("gatekeeper task").expect("gatekeeper stopped cleanly");
        }
        for (_, stop, task) in self.more_gatekeepers.drain(..) {
            let _ = stop.send(());
            task.await.expect("gatekeeper task").expect("gatekeeper stopped cleanly");
        }
        match &mut self.worker {
            WorkerRun::InProcess { stop, task } => {
                if let Some(s) = stop.take() {
                    let _ = s.send(());
                }
                if let Some(t) = task.take() {
                    t.await.expect("worker task").expect("worker stopped cleanly");
                }
            }
            WorkerRun::Process(processes) => {
                for p in processes.iter() {
                    p.supervising.store(false, std::sync::atomic::Ordering::SeqCst);
                    p.terminate();
                }
            }
        }
        if self.owns_topology {
            delete_topology(&self.prefix, &self.worker_settings.catalog.path).await;
        }
    }
}

async fn delete_topology(prefix: &str, catalog: &Path) {
    let Ok(conn) = gatehouse_broker::connect(&broker_url(), "gatehouse-e2e-cleanup").await else {
        return;
    };
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    let t = Topology::new(prefix);
    let catalog = Catalog::load(catalog).expect("catalog");
    let mut queues: Vec<String> =
        catalog.queues().iter().flat_map(|q| q.routes()).map(|r| t.job_queue(&r)).collect();
    queues.extend([t.dead_queue(), t.control_queue()]);
    for kind in catalog.kinds() {
        let routes = catalog.queue(&kind.queue).map(|q| q.routes()).unwrap_or_default();
        for (route, attempt) in routes.iter().flat_map(|r| (0..kind.max_attempts).map(move |a| (r, a))) {
            queues.push(t.retry_queue(route, kind.retry_backoff_ms << attempt));
        }
    }
    for q in queues {
        let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
    }
    for e in
        [t.jobs_exchange(), t.dead_exchange(), t.replies_exchange(), t.retry_exchange(), t.requeue_exchange()]
    {
        let _ = ch.exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default()).await;
    }
    let _ = conn.close(200, "done".into()).await;
}

/// Submits `job` `n` times, one after the other on `conn`; the job ids (each accepted with 202).
pub async fn submit_in_turn(conn: &mut Connection, job: &Value, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for _ in 0..n {
        let r = conn.submit(job, None).await.expect("submit");
        assert_eq!(r.status, 202, "{}", r.text());
        ids.push(r.json()["id"].as_str().expect("an id").to_owned());
    }
    ids
}

/// Three worker processes (test kinds on) on SQLite or on PostgreSQL.
pub async fn three_workers(postgres: bool, worker_binary: &'static str) -> TestSystem {
    TestSystem::start_with(Options {
        testing: true,
        worker_binary: Some(worker_binary),
        workers: 3,
        postgres,
        ..Options::default()
    })
    .await
}

/// Submits `job` `n` times at once, each on a connection of its own; the job ids (each
/// accepted with 202).
pub async fn submit_at_once(sys: &TestSystem, job: &Value, n: usize) -> Vec<String> {
    let client = sys.client();
    let submits: Vec<_> = (0..n)
        .map(|_| {
            let (client, job) = (client.clone(), job.clone());
            tokio::spawn(async move {
                let mut conn = client.connect().await.expect("connect");
                let r = conn.submit(&job, None).await.expect("submit");
                assert_eq!(r.status, 202, "{}", r.text());
                r.json()["id"].as_str().expect("an id").to_owned()
            })
        })
        .collect();
    let mut ids = Vec::new();
    for s in submits {
        ids.push(s.await.expect("submit task"));
    }
    ids
}

/// Polls `GET /v1/jobs/{id}` until the status is final or `timeout` passes; the last answer.
pub async fn wait_final(conn: &mut Connection, id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let res = conn.status(id).await.expect("status request");
        assert_eq!(res.status, 200, "status of {id}: {}", res.text());
        let body = res.json();
        let state = body["status"].as_str().unwrap_or_default().to_owned();
        if ["succeeded", "failed", "dead_lettered", "cancelled"].contains(&state.as_str())
            || Instant::now() > deadline
        {
            return body;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts `res` is an `application/problem+json` answer with `status` and reason `slug`.
pub fn assert_problem(res: &Response, status: u16, slug: &str) -> Value {
    assert_eq!(res.status, status, "{}", res.text());
    assert_eq!(res.content_type.as_deref(), Some("application/problem+json"), "{}", res.text());
    let body = res.json();
    assert_eq!(body["type"], format!("urn:gatehouse:problem:{slug}"), "{body}");
    assert_eq!(body["status"], status);
    assert!(body["title"].is_string() && body["detail"].is_string(), "{body}");
    body
}

/// Prints a fault scenario's summary line and appends it to `target/gatehouse-faults.txt`
/// (which `.ci/run` prints after the tests).
pub fn report(line: &str) {
    println!("{line}");
    let path = repo_root().join("target/gatehouse-faults.txt");
    if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        use std::io::Write;
        let _ = writeln!(f, "{line}");
    }
}
