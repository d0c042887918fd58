//! The `gatekeeper` process: logging, settings, then build and run until SIGINT / SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::{Gatekeeper, GatekeeperSettings};

/// Runs the `gatekeeper` binary: `gatekeeper [CONFIG]` (default `config/gatekeeper.toml`). Exits 64 on bad
/// configuration, before anything is bound or connected.
pub fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=warn".into()),
        )
        .init();
    let path =
        std::env::args_os().nth(1).map_or_else(|| PathBuf::from("config/gatekeeper.toml"), PathBuf::from);
    let settings = match GatekeeperSettings::load(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("gatekeeper: bad configuration in {}: {e}", path.display());
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("gatekeeper: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let run = async {
        Gatekeeper::build(settings).await?.run_until_stopped(gatehouse_broker::shutdown::signal()).await
    };
    match runtime.block_on(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "gatekeeper failed");
            ExitCode::FAILURE
        }
    }
}
