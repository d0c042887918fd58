//! `gatehouse schedules list`: each schedule of the worker's schedules file with its next
//! firing, and from the worker's database its last firing, that firing's job and state, and
//! how many firings ran, were skipped or missed. An operator command, like `gatehouse rekey`:
//! run it where the worker runs, with its settings.

use std::path::PathBuf;

use anyhow::Context as _;
use gatehouse_protocol::Catalog;
use gatehouse_protocol::schemas::Schemas;
use gatehouse_storage::Store;
use gatehouse_worker::settings::WorkerSettings;
use gatehouse_worker::sweep::schedules::Schedules;
use serde_json::{Value, json};

#[derive(Debug, Clone, clap::Args)]
pub struct SchedulesArgs {
    /// The worker's settings (its `[schedules] path`, database and keyring).
    #[arg(long, default_value = "config/worker.toml")]
    pub config: PathBuf,
}

/// One JSON object per schedule.
///
/// # Errors
/// When the settings, the catalog, the schedules file or the database cannot be read.
pub async fn list(args: &SchedulesArgs) -> anyhow::Result<Vec<Value>> {
    let settings =
        WorkerSettings::load(&args.config).with_context(|| format!("{}", args.config.display()))?;
    let Some(path) = &settings.schedules.path else { return Ok(Vec::new()) };
    let catalog = Catalog::load(&settings.catalog.path)?;
    let schemas = Schemas::compile(&catalog)?;
    let schedules =
        Schedules::load(path, &catalog, &schemas, settings.testing.enabled).map_err(anyhow::Error::msg)?;
    let location = settings.storage.location().map_err(anyhow::Error::msg)?;
    let exists = match &location {
        gatehouse_storage::Location::Sqlite(path) => path.exists(),
        gatehouse_storage::Location::Postgres(_) => true,
    };
    let states = if exists {
        let keyring = gatehouse_protocol::keys::keyring(&settings.keys.data_keyring)?;
        let store = Store::open(&location, keyring, &[]).await?;
        store
            .transact(|tx| {
                let mut out = Vec::new();
                for s in tx.schedule_states()? {
                    let job_state = match &s.last_job {
                        Some(id) => tx.job(id)?.map(|j| j.state.as_str().to_owned()),
                        None => None,
                    };
                    out.push((s, job_state));
                }
                Ok::<_, gatehouse_storage::StorageError>(out)
            })
            .await?
    } else {
        Vec::new()
    };
    let now = gatehouse_protocol::clock::now_ms();
    let time = |ms: i64| gatehouse_protocol::submit::format_rfc3339_ms(ms.max(0) as u64);
    Ok(schedules
        .0
        .iter()
        .map(|s| {
            let state = states.iter().find(|(st, _)| st.name == s.spec.name);
            let last_job = state.and_then(|(st, _)| st.last_job.as_ref());
            json!({
                "name": s.spec.name,
                "cron": s.spec.cron,
                "timezone": s.spec.timezone,
                "kind": s.spec.kind,
                "next": s.next_after(now).map(time),
                "last": last_job.and_then(|_| state.map(|(st, _)| time(st.last_fire_ms))),
                "last_job": last_job.map(|id| id.to_string()),
                // Undecided jobs are not in the record yet: queued or running.
                "last_job_state": last_job.map(|_| state.and_then(|(_, j)| j.clone()).unwrap_or_else(|| "queued_or_running".into())),
                "fired": state.map_or(0, |(st, _)| st.fired),
                "skipped": state.map_or(0, |(st, _)| st.skipped),
                "missed": state.map_or(0, |(st, _)| st.missed),
            })
        })
        .collect())
}
