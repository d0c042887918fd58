//! `worker [CONFIG]` — runs the trusted side (default config: `config/worker.toml`).

use std::path::PathBuf;
use std::process::ExitCode;

use gatehouse_worker::{Worker, WorkerSettings};

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=warn".into()),
        )
        .init();
    let path = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("config/worker.toml"), PathBuf::from);
    let settings = match WorkerSettings::load(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("worker: bad configuration in {}: {e}", path.display());
            return ExitCode::from(64);
        }
    };
    let run = async {
        Worker::build(settings)
            .await?
            .run_until_stopped(gatehouse_broker::shutdown::signal())
            .await
    };
    match run.await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "worker failed");
            ExitCode::FAILURE
        }
    }
}
