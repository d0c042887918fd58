//! The `worker` process: logging, settings, then build and run until SIGINT / SIGTERM.

use std::process::ExitCode;

use crate::{Worker, WorkerSettings};

/// Runs the `worker` binary: `worker [CONFIG]` (default `config/worker.toml`). Exits 64 on bad
/// configuration, before anything is bound or connected.
pub fn main() -> ExitCode {
    gatehouse_broker::process::main("worker", WorkerSettings::load, |settings| async {
        Worker::build(settings).await?.run_until_stopped(gatehouse_broker::shutdown::signal()).await
    })
}
