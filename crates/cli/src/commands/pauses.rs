//! `gatehouse pause kind|queue NAME`, `gatehouse resume kind|queue NAME`, `gatehouse pause
//! list`: hold a kind's or a queue class's jobs on every worker, and let them go again. An
//! operator command, like `gatehouse schedules`: run it where the worker runs, with its
//! settings; the pause lives in the worker's storage, so it holds on every worker of that
//! storage and across restarts.
//!
//! A paused kind's jobs are still accepted; each worker holds them, unstarted, as they arrive
//! (status `paused`); jobs already running finish. Resuming sends the held jobs back to their
//! queues in the order they arrived.

use std::path::PathBuf;

use anyhow::Context as _;
use gatehouse_protocol::Catalog;
use gatehouse_storage::{Pause, Store};
use gatehouse_worker::admin::pauses as admin;
use gatehouse_worker::settings::WorkerSettings;

/// What is paused.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Target {
    /// A job kind of the catalog.
    Kind { name: String },
    /// A queue class of the catalog (every kind queued there).
    Queue { name: String },
}

#[derive(Debug, Clone, clap::Args)]
pub struct PauseArgs {
    /// The worker's settings (its catalog and database).
    #[arg(long, default_value = "config/worker.toml", global = true)]
    pub config: PathBuf,
}

impl Target {
    /// As stored: `kind:<name>` or `queue:<class>`, checked against the worker's catalog.
    fn stored(&self, catalog: &Catalog) -> anyhow::Result<String> {
        let (what, name) = match self {
            Self::Kind { name } => (admin::Target::Kind, name),
            Self::Queue { name } => (admin::Target::Queue, name),
        };
        admin::target(catalog, what, name).map_err(anyhow::Error::msg)
    }
}

async fn open(args: &PauseArgs) -> anyhow::Result<(Store, Catalog)> {
    let settings =
        WorkerSettings::load(&args.config).with_context(|| format!("{}", args.config.display()))?;
    let catalog = Catalog::load(&settings.catalog.path)?;
    let location = settings.storage.location().map_err(anyhow::Error::msg)?;
    let keyring = gatehouse_protocol::keys::keyring(&settings.keys.data_keyring)?;
    Ok((Store::open(&location, keyring, &[]).await?, catalog))
}

/// Pauses `target`; answers whether it was running (`false`: it was paused already).
///
/// # Errors
/// A target the catalog does not have, or settings or storage that cannot be read.
pub async fn pause(args: &PauseArgs, target: &Target) -> anyhow::Result<bool> {
    let (store, catalog) = open(args).await?;
    let target = target.stored(&catalog)?;
    Ok(store.transact(move |tx| tx.pause(&target)).await?)
}

/// Resumes `target`; answers how many held jobs go back to their queues, or `None` when it
/// was not paused.
///
/// # Errors
/// A target the catalog does not have, or settings or storage that cannot be read.
pub async fn resume(args: &PauseArgs, target: &Target) -> anyhow::Result<Option<u64>> {
    let (store, catalog) = open(args).await?;
    let target = target.stored(&catalog)?;
    Ok(store.transact(move |tx| tx.resume(&target)).await?)
}

/// The pauses in force.
///
/// # Errors
/// Settings or storage that cannot be read.
pub async fn list(args: &PauseArgs) -> anyhow::Result<Vec<Pause>> {
    let (store, _) = open(args).await?;
    Ok(store.read(|tx| tx.pauses()).await?)
}
