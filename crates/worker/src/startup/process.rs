//! The `worker` process: logging, settings, then build and run until SIGINT / SIGTERM.

use std::process::ExitCode;

use super::{Worker, WorkerBuilder};
use crate::settings::WorkerSettings;

/// Runs the `worker` binary: `worker [CONFIG]` (default `config/worker.toml`). Exits 64 on bad
/// configuration, before anything is bound or connected.
pub fn main() -> ExitCode {
    gatehouse_broker::process::main("worker", WorkerSettings::load, |settings| async {
        Worker::build(settings).await?.run_until_stopped(gatehouse_broker::shutdown::signal()).await
    })
}

/// Runs a worker binary of your own: like [`main`], with the handlers `configure` registers
/// (`|worker| worker.builtins().handle("acme.score", ..)`; see `examples/custom-worker`).
pub fn main_with(configure: impl FnOnce(WorkerBuilder) -> WorkerBuilder + Send + 'static) -> ExitCode {
    gatehouse_broker::process::main("worker", WorkerSettings::load, |settings| async {
        configure(Worker::builder(settings))
            .build()
            .await?
            .run_until_stopped(gatehouse_broker::shutdown::signal())
            .await
    })
}
