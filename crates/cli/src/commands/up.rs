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

use crate::{broker_node, certs};

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
}

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
    } else if !args.certs.join("operator-signing.pub").exists()
        || !args.certs.join("worker-data.keys").exists()
    {
        // Certificates from an earlier release: add the keys it did not have (keeping the rest).
        gatehouse_protocol::keys::write_dev(&args.certs)?;
        println!("wrote the missing dev keys to {}", args.certs.display());
    }
    let node = {
        let (url, home) = (args.broker.clone(), PathBuf::from(".gatehouse/rabbitmq"));
        tokio::task::spawn_blocking(move || broker_node::ensure(&url, &home)).await??
    };
    if node.started_here {
        println!("started a private RabbitMQ node (data in .gatehouse/rabbitmq)");
    }
    let ran = run_components(&bin_dir, &args.certs, &node).await;
    if node.started_here {
        node.stop()?;
        println!("private RabbitMQ node stopped");
    }
    ran
}

/// Loads the definitions, runs worker and gatekeeper until Ctrl-C or until one exits.
async fn run_components(bin_dir: &Path, certs: &Path, node: &broker_node::BrokerNode) -> anyhow::Result<()> {
    import_definitions(node).await?;
    let mut worker = spawn(bin_dir, "worker", "config/worker.toml")?;
    let mut gatekeeper = spawn(bin_dir, "gatekeeper", "config/gatekeeper.toml")?;
    let healthy = wait_healthy(certs).await;
    if let Err(e) = &healthy {
        eprintln!("gatekeeper did not become healthy: {e:#}");
    } else {
        print_banner(certs);
    }

    if healthy.is_ok() {
        tokio::select! {
            () = gatehouse_broker::shutdown::signal() => println!("\nstopping..."),
            s = worker.wait() => eprintln!("worker exited ({s:?}); stopping"),
            s = gatekeeper.wait() => eprintln!("gatekeeper exited ({s:?}); stopping"),
        }
    }
    // Gatekeeper first (stop accepting), then the worker (finish in-flight jobs).
    terminate(&mut gatekeeper).await;
    terminate(&mut worker).await;
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

fn spawn(bin_dir: &Path, name: &str, config: &str) -> anyhow::Result<Child> {
    Command::new(bin_dir.join(name))
        .arg(config)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {name}"))
}

async fn wait_healthy(certs: &Path) -> anyhow::Result<()> {
    let identity = Identity { cert: certs.join("client.pem"), key: certs.join("client.key") };
    let client = Client::new("https://127.0.0.1:8443", &certs.join("ca.pem"), Some(identity))?;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let mut conn = client.connect().await?;
            conn.request(Method::GET, "/readyz", &[], Vec::new()).await
        };
        match attempt.await {
            Ok(res) if res.status == 200 => return Ok(()),
            Ok(res) if Instant::now() > deadline => anyhow::bail!("readyz answered {}", res.status),
            Err(e) if Instant::now() > deadline => return Err(e.into()),
            _ => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

async fn terminate(child: &mut Child) {
    if let Some(pid) = child.id() {
        let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
    }
    if tokio::time::timeout(Duration::from_secs(15), child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

fn print_banner(certs: &Path) {
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
        mgmt = broker_node::MANAGEMENT_URL
    );
}
