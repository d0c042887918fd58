//! `gatehouse up`: the whole system on this machine, until Ctrl-C.
//!
//! Dev certificates (if missing) → a broker (the configured one, or a private node) →
//! worker and gatekeeper as separate processes → health check → the URLs and a `curl` line.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use gatehouse_client::Method;
use gatehouse_client::{Client, Identity};
use tokio::process::{Child, Command};

use gatehouse_devenv::{broker_node, certs};

/// Options of `gatehouse up`.
#[derive(Debug, Clone, clap::Args)]
pub struct UpArgs {
    /// Folder with the dev certificates (written if missing).
    #[arg(long, default_value = "certs/dev")]
    pub certs: PathBuf,
    /// Broker to use (admin URL); when nothing answers there on 127.0.0.1:5672, a private
    /// node starts. The components connect as the least-privilege users of their settings.
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub broker: String,
    /// Instead: a three-node RabbitMQ cluster on this machine (AMQP on 127.0.0.1:5681–5683,
    /// data in .gatehouse/cluster), every queue class as replicated quorum lanes.
    #[arg(long)]
    pub cluster: bool,
    /// Storage on PostgreSQL (the private server from Debian's `postgresql`, installed when
    /// missing: 127.0.0.1:5439, database `gatehouse`) instead of the SQLite file.
    #[arg(long)]
    pub postgres: bool,
    /// Worker processes to run (several need --postgres); the first's admin listener is the
    /// configured one, worker N's is 127.0.0.1:(9110 + N).
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
}

/// AMQP port of the first node of `up --cluster`.
pub const CLUSTER_PORT: u16 = 5681;

/// Runs everything until Ctrl-C or until a component exits.
///
/// # Errors
/// When a part cannot be started.
pub async fn up(args: &UpArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        Path::new("config/gatekeeper.toml").exists(),
        "run `gatehouse up` from the repository root (config/ not found here)"
    );
    let bin_dir = std::env::current_exe()?.parent().context("no binary folder")?.to_owned();
    for bin in ["gatekeeper", "worker"] {
        anyhow::ensure!(
            bin_dir.join(bin).exists(),
            "{} is missing: build everything first (cargo build --release)",
            bin_dir.join(bin).display()
        );
    }
    if !args.certs.join("ca.pem").exists() {
        certs::write_dev(&args.certs)?;
        println!("wrote dev certificates and keys to {}", args.certs.display());
    } else if ["operator-signing.pub", "worker-data.keys", "worker-keys.json"]
        .iter()
        .any(|f| !args.certs.join(f).exists())
    {
        // Certificates from an earlier release: add the keys it did not have (keeping the rest).
        gatehouse_protocol::keys::write_dev(&args.certs)?;
        println!("wrote the missing dev keys to {}", args.certs.display());
    }
    anyhow::ensure!(
        args.workers >= 1 && (args.workers == 1 || args.postgres),
        "several workers share PostgreSQL storage: add --postgres (SQLite storage is one worker's)"
    );
    let storage = if args.postgres { postgres_storage().await? } else { Vec::new() };
    if args.cluster {
        return up_cluster(&bin_dir, &args.certs, args.workers, &storage).await;
    }
    let node = {
        let (url, home) = (args.broker.clone(), PathBuf::from(".gatehouse/rabbitmq"));
        tokio::task::spawn_blocking(move || broker_node::ensure(&url, &home)).await??
    };
    if node.started_here {
        println!("started a private RabbitMQ node (data in .gatehouse/rabbitmq)");
    }
    let ran = run_components(&bin_dir, &args.certs, &node, args.workers, &storage).await;
    if node.started_here {
        node.stop()?;
        println!("private RabbitMQ node stopped");
    }
    ran
}

/// `up --cluster`: three nodes, the definitions loaded into them, the catalog's classes as
/// quorum lanes, each component given every node's URL (with its own credentials).
async fn up_cluster(
    bin_dir: &Path,
    certs: &Path,
    workers: usize,
    storage: &[(String, String)],
) -> anyhow::Result<()> {
    let home = PathBuf::from(".gatehouse/cluster");
    let cluster = {
        let home = home.clone();
        tokio::task::spawn_blocking(move || gatehouse_devenv::cluster::Cluster::start(&home, CLUSTER_PORT))
            .await??
    };
    println!("started a three-node RabbitMQ cluster (data in {})", home.display());
    let ran = async {
        let defs = std::fs::canonicalize("config/rabbitmq/definitions.json")?;
        cluster.run(1, &["import_definitions", &defs.to_string_lossy()])?;
        let catalog = std::path::absolute(home.join("jobs.toml"))?;
        gatehouse_devenv::cluster::quorum_catalog(Path::new("config/jobs.toml"), &catalog)?;
        let mut env = Vec::new();
        for (prefix, config) in [("WORKER", "config/worker.toml"), ("GATEKEEPER", "config/gatekeeper.toml")] {
            let urls = node_urls(config, prefix)?;
            env.push((format!("{prefix}__BROKER__URL"), urls[0].clone()));
            env.push((format!("{prefix}__BROKER__OTHER_URLS"), urls[1..].join(",")));
            env.push((format!("{prefix}__CATALOG__PATH"), catalog.display().to_string()));
        }
        env.extend(storage.iter().cloned());
        let mut workers = spawn_workers(bin_dir, workers, &env)?;
        let mut gatekeeper = spawn(bin_dir, "gatekeeper", "config/gatekeeper.toml", &env)?;
        supervise(certs, &mut workers, &mut gatekeeper, "http://127.0.0.1:15681 (and :15682, :15683)").await
    }
    .await;
    tokio::task::spawn_blocking(move || cluster.stop()).await?;
    println!("RabbitMQ cluster stopped");
    ran
}

/// The cluster's node URLs for the component configured in `config`: its configured URL
/// (the dev one, `…@127.0.0.1:5672/…`) on each node's port.
fn node_urls(config: &str, prefix: &str) -> anyhow::Result<Vec<String>> {
    #[derive(serde::Deserialize)]
    struct Broker {
        broker: gatehouse_broker::BrokerSettings,
    }
    let settings: Broker = gatehouse_protocol::settings::load(Path::new(config), prefix)?;
    let url = settings.broker.url.expose();
    anyhow::ensure!(
        url.contains("@127.0.0.1:5672/"),
        "`up --cluster` runs the dev broker users on this machine; {config} points elsewhere"
    );
    Ok((0..gatehouse_devenv::cluster::NODES as u16)
        .map(|i| url.replace("@127.0.0.1:5672/", &format!("@127.0.0.1:{}/", CLUSTER_PORT + i)))
        .collect())
}

/// The private PostgreSQL server, started (and installed) if needed, with database
/// `gatehouse`: the workers' storage settings for it.
async fn postgres_storage() -> anyhow::Result<Vec<(String, String)>> {
    let node = gatehouse_devenv::postgres_node::PostgresNode::local(Path::new(".gatehouse/postgres"));
    let node = tokio::task::spawn_blocking(move || {
        node.ensure(None)?;
        node.create_database("gatehouse")?;
        Ok::<_, anyhow::Error>(node)
    })
    .await??;
    println!("PostgreSQL storage: {} (the private server)", node.url("gatehouse"));
    Ok(vec![
        ("WORKER__STORAGE__URL".into(), node.url("gatehouse")),
        ("WORKER__STORAGE__PASSWORD_FILE".into(), node.password_file().display().to_string()),
    ])
}

/// Loads the definitions, runs the workers and the gatekeeper until Ctrl-C or until one exits.
async fn run_components(
    bin_dir: &Path,
    certs: &Path,
    node: &broker_node::BrokerNode,
    workers: usize,
    storage: &[(String, String)],
) -> anyhow::Result<()> {
    import_definitions(node).await?;
    let mut workers = spawn_workers(bin_dir, workers, storage)?;
    let mut gatekeeper = spawn(bin_dir, "gatekeeper", "config/gatekeeper.toml", &[])?;
    supervise(certs, &mut workers, &mut gatekeeper, broker_node::MANAGEMENT_URL).await
}

/// `count` worker processes with `env`, each with its admin listener at [`worker_admin`].
fn spawn_workers(bin_dir: &Path, count: usize, env: &[(String, String)]) -> anyhow::Result<Vec<Child>> {
    (1..=count)
        .map(|n| {
            let mut env = env.to_vec();
            env.push(("WORKER__ADMIN__LISTEN".into(), worker_admin(n).to_string()));
            spawn(bin_dir, "worker", "config/worker.toml", &env)
        })
        .collect()
}

/// Worker `n`'s admin listener (`/readyz`): the shipped config's port for the first, 9110 + n
/// for the others.
fn worker_admin(n: usize) -> std::net::SocketAddr {
    let port = if n == 1 { 9102 } else { 9110 + n };
    std::net::SocketAddr::from(([127, 0, 0, 1], u16::try_from(port).unwrap_or(9102)))
}

/// Waits until the gatekeeper and every worker are ready (says "up" only then), then until
/// Ctrl-C or until a component exits; stops them all.
async fn supervise(
    certs: &Path,
    workers: &mut [Child],
    gatekeeper: &mut Child,
    management: &str,
) -> anyhow::Result<()> {
    let healthy = wait_ready(certs, workers, gatekeeper).await.context("Gatehouse did not start");
    if healthy.is_ok() {
        print_banner(certs, management);
    }

    if healthy.is_ok() {
        let any_worker = futures_util::future::select_all(workers.iter_mut().map(|w| Box::pin(w.wait())));
        tokio::select! {
            () = gatehouse_broker::shutdown::signal() => println!("\nstopping..."),
            (s, _, _) = any_worker => eprintln!("a worker exited ({s:?}); stopping"),
            s = gatekeeper.wait() => eprintln!("gatekeeper exited ({s:?}); stopping"),
        }
    }
    // Gatekeeper first (stop accepting), then the workers (finish in-flight jobs).
    terminate(gatekeeper).await;
    for worker in workers.iter_mut() {
        terminate(worker).await;
    }
    healthy
}

/// Loads the vhost, users and permissions of `config/rabbitmq/definitions.json` (idempotent):
/// through the private node when it runs, else through the local `rabbitmqctl`.
async fn import_definitions(node: &broker_node::BrokerNode) -> anyhow::Result<()> {
    // rabbitmqctl resolves a relative path elsewhere: give it an absolute one.
    let defs = std::fs::canonicalize("config/rabbitmq/definitions.json")?;
    let defs = defs.to_string_lossy().into_owned();
    let defs = defs.as_str();
    let mut cmd = match node.running_pid() {
        Some(_) => node.ctl(&["import_definitions", defs]),
        None => {
            let mut c = std::process::Command::new("rabbitmqctl");
            c.args(["import_definitions", defs]);
            c
        }
    };
    let status = tokio::task::spawn_blocking(move || cmd.stdout(Stdio::null()).status()).await?;
    anyhow::ensure!(
        status.is_ok_and(|s| s.success()),
        "could not load {defs} into the broker; load it yourself (rabbitmqctl import_definitions {defs})"
    );
    Ok(())
}

fn spawn(bin_dir: &Path, name: &str, config: &str, env: &[(String, String)]) -> anyhow::Result<Child> {
    Command::new(bin_dir.join(name))
        .arg(config)
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))
}

/// Waits until the gatekeeper's `/readyz` (over mTLS) and every worker's (its admin listener)
/// answer 200. A component that exits meanwhile (bad configuration: its own error is on
/// stderr above) ends the wait at once.
async fn wait_ready(certs: &Path, workers: &mut [Child], gatekeeper: &mut Child) -> anyhow::Result<()> {
    let identity = Identity { cert: certs.join("client.pem"), key: certs.join("client.key") };
    let client = Client::new("https://127.0.0.1:8443", &certs.join("ca.pem"), Some(identity))?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut waiting_for = "the gatekeeper".to_owned();
    loop {
        for (n, worker) in workers.iter_mut().enumerate() {
            if let Some(status) = worker.try_wait()? {
                anyhow::bail!("worker {} exited before it was ready ({status})", n + 1);
            }
        }
        if let Some(status) = gatekeeper.try_wait()? {
            anyhow::bail!("the gatekeeper exited before it was ready ({status})");
        }
        let gatekeeper_ready = async {
            let mut conn = client.connect().await?;
            anyhow::Ok(conn.request(Method::GET, "/readyz", &[], Vec::new()).await?.status == 200)
        };
        if gatekeeper_ready.await.unwrap_or(false) {
            let mut all = true;
            for n in 1..=workers.len() {
                if !plain_ready(worker_admin(n)).await {
                    waiting_for = format!("worker {n} (its /readyz at {})", worker_admin(n));
                    all = false;
                    break;
                }
            }
            if all {
                return Ok(());
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "{waiting_for} was not ready within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether a plain-HTTP admin listener's `/readyz` answers 200.
async fn plain_ready(addr: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let asked = async {
        let mut s = tokio::net::TcpStream::connect(addr).await?;
        s.write_all(b"GET /readyz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").await?;
        let mut status = [0u8; 12];
        s.read_exact(&mut status).await?;
        std::io::Result::Ok(status[9..] == *b"200")
    };
    tokio::time::timeout(Duration::from_secs(2), asked).await.is_ok_and(|r| r.unwrap_or(false))
}

async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
    }
    if tokio::time::timeout(Duration::from_secs(15), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

fn print_banner(certs: &Path, management: &str) {
    let c = certs.display();
    println!(
        r#"
Gatehouse is up.

  API (mTLS)      https://127.0.0.1:8443
  RabbitMQ UI     {mgmt}  (guest / guest; vhost "gatehouse": queues gatehouse.jobs.*, gatehouse.dead)

Try it:

  curl --cacert {c}/ca.pem --cert {c}/client.pem --key {c}/client.key \
       -H 'content-type: application/json' -H 'prefer: wait=5' \
       -d '{{"kind":"vault.put","payload":{{"record":{{"name":"Ada"}}}}}}' \
       https://127.0.0.1:8443/v1/jobs

Press Ctrl-C to stop.
"#,
        mgmt = management
    );
}
