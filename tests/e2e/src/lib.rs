//! Test harness: one real broker (started once if none answers), and per test a gatekeeper
//! and a worker on port 0 with their own queue prefix, certificates, policy and SQLite file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use gatehouse_broker::lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
use gatehouse_broker::{BrokerSettings, Topology};
use gatehouse_client::{Client, Connection, Identity, Response};
use gatehouse_gatekeeper::Gatekeeper;
use gatehouse_gatekeeper::settings::{
    GatekeeperSettings, IdSettings, PathSetting, ServerSettings, TlsSettings,
};
use gatehouse_protocol::Catalog;
use gatehouse_protocol::settings::Secret;
use gatehouse_worker::Worker;
use gatehouse_worker::settings::{
    CatalogSettings, ConsumerSettings, StorageSettings, TestingSettings, WorkerSettings,
};
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The broker the tests use: `GATEHOUSE_TEST_AMQP_URL`, or the local default, where a
/// private node is started (once, shared by all tests and later runs) if nothing answers.
pub fn broker_url() -> String {
    static URL: OnceLock<String> = OnceLock::new();
    URL.get_or_init(|| {
        let url = std::env::var("GATEHOUSE_TEST_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into());
        let home = repo_root().join(".gatehouse/rabbitmq");
        if let Err(e) = gatehouse_cli::broker_node::ensure(&url, &home) {
            panic!("the end-to-end tests need RabbitMQ: {e:#}");
        }
        url
    })
    .clone()
}

/// Another client certificate the test policy knows (allowed everything, like dev-client).
pub const OTHER_CLIENT: &str = "other-client";

/// A running gatekeeper + worker pair.
pub struct TestSystem {
    pub addr: SocketAddr,
    pub certs: TempDir,
    pub prefix: String,
    data: TempDir,
    stops: Vec<oneshot::Sender<()>>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
}

fn random_hex(bytes: usize) -> String {
    let mut raw = vec![0u8; bytes];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw).expect("randomness");
    raw.iter().map(|b| format!("{b:02x}")).collect()
}

async fn until(rx: oneshot::Receiver<()>) {
    let _ = rx.await;
}

impl TestSystem {
    /// Starts a worker and a gatekeeper against the test broker.
    pub async fn start() -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("warn")
            .with_test_writer()
            .try_init();
        let url = tokio::task::spawn_blocking(broker_url)
            .await
            .expect("broker");
        let certs = TempDir::new().expect("tempdir");
        let data = TempDir::new().expect("tempdir");
        gatehouse_cli::certs::write_dev(certs.path()).expect("dev certs");
        gatehouse_cli::certs::write_client(certs.path(), OTHER_CLIENT).expect("other client cert");
        let policy = data.path().join("policy.toml");
        std::fs::write(
            &policy,
            format!(
                "[[client]]\nidentity = \"dev-client\"\nkinds = [\"*\"]\nmax_priority = 9\n\n\
                 [[client]]\nidentity = \"{OTHER_CLIENT}\"\nkinds = [\"*\"]\nmax_priority = 9\n"
            ),
        )
        .expect("policy");
        let prefix = format!("t{}.", random_hex(4));
        let broker = BrokerSettings {
            url: Secret::new(url),
            prefix: prefix.clone(),
        };
        let catalog = repo_root().join("config/jobs.toml");

        let worker = Worker::build(WorkerSettings {
            broker: broker.clone(),
            consumer: ConsumerSettings {
                prefetch: 4,
                stopping_wait_time_ms: 5000,
            },
            storage: StorageSettings {
                path: data.path().join("worker.sqlite"),
            },
            catalog: CatalogSettings {
                path: catalog.clone(),
            },
            testing: TestingSettings { enabled: false },
        })
        .await
        .expect("worker builds");
        let gatekeeper = Gatekeeper::build(GatekeeperSettings {
            server: ServerSettings {
                listen: "127.0.0.1:0".parse().expect("addr"),
                handshake_timeout_ms: 5000,
                max_body_bytes: 65536,
                max_connections: 256,
                max_wait_s: 30,
                status_timeout_ms: 5000,
                publish_timeout_ms: 5000,
                stopping_wait_time_ms: 5000,
            },
            tls: TlsSettings {
                cert: certs.path().join("server.pem"),
                key: certs.path().join("server.key"),
                client_ca: certs.path().join("ca.pem"),
            },
            broker,
            catalog: PathSetting { path: catalog },
            policy: PathSetting { path: policy },
            ids: IdSettings {
                secret_file: certs.path().join("gatekeeper-ids.secret"),
            },
        })
        .await
        .expect("gatekeeper builds");
        let addr = gatekeeper.local_addr().expect("addr");

        let (stop_w, rx_w) = oneshot::channel();
        let (stop_g, rx_g) = oneshot::channel();
        let tasks = vec![
            tokio::spawn(gatekeeper.run_until_stopped(until(rx_g))),
            tokio::spawn(worker.run_until_stopped(until(rx_w))),
        ];
        Self {
            addr,
            certs,
            prefix,
            data,
            stops: vec![stop_g, stop_w],
            tasks,
        }
    }

    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// A client presenting the certificate of `name` (`client` = dev-client).
    pub fn client_as(&self, name: &str) -> Client {
        let dir = self.certs.path();
        let identity = Identity {
            cert: dir.join(format!("{name}.pem")),
            key: dir.join(format!("{name}.key")),
        };
        Client::new(&self.url(), &dir.join("ca.pem"), Some(identity)).expect("client")
    }

    /// A connection as dev-client.
    pub async fn connect(&self) -> Connection {
        self.client_as("client").connect().await.expect("connect")
    }

    /// Where the worker's SQLite file is.
    pub fn database(&self) -> PathBuf {
        self.data.path().join("worker.sqlite")
    }

    /// Stops both components and deletes this test's queues and exchanges.
    pub async fn stop(mut self) {
        for s in self.stops.drain(..) {
            let _ = s.send(());
        }
        for t in self.tasks.drain(..) {
            t.await
                .expect("component task")
                .expect("component stopped cleanly");
        }
        delete_topology(&self.prefix).await;
    }
}

async fn delete_topology(prefix: &str) {
    let Ok(conn) = gatehouse_broker::connect(&broker_url(), "gatehouse-e2e-cleanup").await else {
        return;
    };
    let Ok(ch) = conn.create_channel().await else {
        return;
    };
    let t = Topology::new(prefix);
    let catalog = Catalog::load(&repo_root().join("config/jobs.toml")).expect("catalog");
    let mut queues: Vec<String> = catalog
        .queues()
        .iter()
        .map(|q| t.job_queue(&q.name))
        .collect();
    queues.extend([t.dead_queue(), t.control_queue()]);
    for q in queues {
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for e in [t.jobs_exchange(), t.dead_exchange()] {
        let _ = ch
            .exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "done".into()).await;
}

/// Polls `GET /v1/jobs/{id}` until the status is final or `timeout` passes; the last answer.
pub async fn wait_final(conn: &mut Connection, id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let res = conn.status(id).await.expect("status request");
        assert_eq!(res.status, 200, "status of {id}: {}", res.text());
        let body = res.json();
        let state = body["status"].as_str().unwrap_or_default().to_owned();
        if ["succeeded", "failed", "dead_lettered"].contains(&state.as_str())
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
    assert_eq!(
        res.content_type.as_deref(),
        Some("application/problem+json"),
        "{}",
        res.text()
    );
    let body = res.json();
    assert_eq!(
        body["type"],
        format!("urn:gatehouse:problem:{slug}"),
        "{body}"
    );
    assert_eq!(body["status"], status);
    assert!(
        body["title"].is_string() && body["detail"].is_string(),
        "{body}"
    );
    body
}
