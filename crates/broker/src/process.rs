//! The shape both component processes share: logging, settings (exit 64 when they are bad,
//! before anything is bound or connected), a runtime, then run until stopped.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

/// Runs component `name`: `NAME [CONFIG]` (default `config/NAME.toml`), settings read by
/// `load`, then `run` until it returns.
pub fn main<S, E, F, Fut>(name: &str, load: impl FnOnce(&Path) -> Result<S, E>, run: F) -> ExitCode
where
    E: std::fmt::Display,
    F: FnOnce(S) -> Fut,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,lapin=warn".into()),
        )
        .init();
    let path = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from(format!("config/{name}.toml")), PathBuf::from);
    let settings = match load(&path) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("{name}: bad configuration in {}: {e}", path.display());
            return ExitCode::from(64);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("{name}: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Spawned rather than run on this thread by `block_on`: the component's own loops (the
    // worker's dispatch of deliveries) then run on the runtime's threads, beside the tasks they
    // hand work to, instead of waking the main thread for every message.
    let ran = runtime.block_on(runtime.spawn(run(settings)));
    match ran.unwrap_or_else(|e| Err(anyhow::anyhow!("{name} stopped: {e}"))) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{name} failed");
            ExitCode::FAILURE
        }
    }
}
