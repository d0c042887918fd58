//! The `gatekeeper` process: logging, settings, then build and run until SIGINT / SIGTERM;
//! SIGHUP reloads the client policy.

use std::process::ExitCode;

use crate::{Gatekeeper, GatekeeperSettings};

/// Runs the `gatekeeper` binary: `gatekeeper [CONFIG]` (default `config/gatekeeper.toml`).
/// Exits 64 on bad configuration, before anything is bound or connected.
pub fn main() -> ExitCode {
    gatehouse_broker::process::main("gatekeeper", GatekeeperSettings::load, |settings| async {
        let gatekeeper = Gatekeeper::build(settings).await?;
        let reloader = gatekeeper.policy_reloader();
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                reloader.reload();
            }
        });
        gatekeeper.run_until_stopped(gatehouse_broker::shutdown::signal()).await
    })
}
