//! Retention: a decided job's record (outcome, result, error) is deleted once it is older than
//! its kind's `retain_s` (or the worker's `[retention] retain_s`). Vault records and ledger
//! state are not job records: they stay until deleted.
//!
//! Pruning runs in the background in small batches, each one storage closure committed with
//! whatever jobs arrive beside it, so the writer is never held for longer than one batch; a
//! backlog is worked off at no more than half the writer's time.
//!
//! Safety against redelivery: a job's record is also what stops its message from running
//! twice. Retention is therefore never shorter than `keys.max_message_age_s`, and the worker
//! refuses any message older than that as `stale`: by the time a record is pruned, no message
//! of that job can run any more (a record is pruned `retain_s` after the job was decided, which
//! is after it was submitted). A status query for a pruned job answers `expired`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse_protocol::Catalog;
use gatehouse_protocol::clock::now_ms;
use gatehouse_storage::{StorageError, Store};
use tokio::sync::watch;

use super::Sweep;
use crate::admin::metrics::WorkerMetrics;
use crate::settings::WorkerSettings;

/// How long each kind's decided jobs are kept, and how pruning goes.
#[derive(Debug, Clone)]
pub struct Retention {
    default: Duration,
    per_kind: HashMap<String, Duration>,
    batch: u32,
    every: Duration,
}

impl Retention {
    /// The retention the settings and the catalog ask for.
    ///
    /// # Errors
    /// When a retention is shorter than `keys.max_message_age_s` (a redelivered message of a
    /// pruned job could run it again), or the batch size is 0.
    pub fn new(settings: &WorkerSettings, catalog: &Catalog) -> Result<Self, String> {
        let floor = settings.keys.max_message_age_s;
        let r = &settings.retention;
        let default = r.retain_s.unwrap_or(floor);
        let short = |what: &str, s: u64| {
            format!(
                "{what} = {s} is shorter than keys.max_message_age_s = {floor}: a job pruned earlier \
                 could run again if its message came back"
            )
        };
        if default < floor {
            return Err(short("retention.retain_s", default));
        }
        if r.prune_batch == 0 {
            return Err("retention.prune_batch must be at least 1".into());
        }
        let mut per_kind = HashMap::new();
        for kind in catalog.kinds() {
            if let Some(s) = kind.retain_s {
                if s < floor {
                    return Err(short(&format!("retain_s of kind {}", kind.name), s));
                }
                per_kind.insert(kind.name.clone(), Duration::from_secs(s));
            }
        }
        Ok(Self {
            default: Duration::from_secs(default),
            per_kind,
            batch: r.prune_batch,
            every: Duration::from_millis(r.prune_every_ms.max(1)),
        })
    }

    /// How long decided jobs of `kind` are kept (kinds no longer in the catalog: the default).
    pub fn of(&self, kind: &str) -> Duration {
        self.per_kind.get(kind).copied().unwrap_or(self.default)
    }
}

/// Deletes decided jobs' records past their retention, pass after pass.
pub struct Pruning {
    pub store: Store,
    pub retention: Arc<Retention>,
    pub metrics: Arc<WorkerMetrics>,
    /// A pass stops between batches when this turns true.
    pub stop: watch::Receiver<bool>,
}

impl Sweep for Pruning {
    fn name(&self) -> &'static str {
        "retention"
    }

    fn pause(&self) -> Duration {
        self.retention.every
    }

    async fn run_once(&mut self) -> anyhow::Result<()> {
        let n = prune_once(&self.store, &self.retention, &self.metrics, &self.stop).await?;
        if n > 0 {
            tracing::debug!(jobs = n, "pruned decided jobs past their retention");
        }
        Ok(())
    }
}

/// One pass: every kind's expired records, a batch at a time, until none is left or `stop`
/// turns true. Answers how many went.
///
/// # Errors
/// A storage failure (the next pass tries again).
pub async fn prune_once(
    store: &Store,
    retention: &Retention,
    metrics: &WorkerMetrics,
    stop: &watch::Receiver<bool>,
) -> Result<u64, StorageError> {
    let kinds = store.transact(|tx| tx.decided_kinds()).await?;
    let mut total = 0;
    for kind in kinds {
        let keep = i64::try_from(retention.of(&kind).as_millis()).unwrap_or(i64::MAX);
        let before = now_ms().saturating_sub(keep);
        loop {
            if *stop.borrow() {
                return Ok(total);
            }
            let started = Instant::now();
            let (k, batch) = (kind.clone(), retention.batch);
            let n = store.transact(move |tx| tx.prune_decided(&k, before, batch)).await?;
            metrics.pruned(n, started.elapsed());
            total += n;
            if n < u64::from(batch) {
                break;
            }
            // A backlog (a first start with retention, a long outage): leave the writer to the
            // jobs for as long as the batch held it, so that pruning takes at most half of it.
            tokio::time::sleep(started.elapsed()).await;
        }
    }
    // Cancellations of jobs that never came: their messages are stale by now.
    let before = now_ms().saturating_sub(i64::try_from(retention.default.as_millis()).unwrap_or(i64::MAX));
    loop {
        let batch = retention.batch;
        let n = store.transact(move |tx| tx.prune_cancelled(before, batch)).await?;
        if n < u64::from(batch) {
            break;
        }
    }
    // Dead-letter counts of jobs whose dead letters are stale by now.
    loop {
        let batch = retention.batch;
        let n = store.transact(move |tx| tx.prune_dead_counts(before, batch)).await?;
        if n < u64::from(batch) {
            break;
        }
    }
    // Batches none of whose jobs is kept any more.
    loop {
        let batch = retention.batch;
        let n = store.transact(move |tx| tx.prune_batches(batch)).await?;
        if n < u64::from(batch) {
            break;
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn shipped() -> (WorkerSettings, Catalog) {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let settings = WorkerSettings::load(&root.join("worker.toml")).unwrap();
        (settings, Catalog::load(&root.join("jobs.toml")).unwrap())
    }

    #[test]
    fn retention_defaults_to_the_message_age_limit_and_kinds_may_keep_longer() {
        let (mut settings, catalog) = shipped();
        let floor = Duration::from_secs(settings.keys.max_message_age_s);
        let r = Retention::new(&settings, &catalog).unwrap();
        assert_eq!(r.of("vault.put"), floor);
        assert_eq!(r.of("a.kind.no.longer.in.the.catalog"), floor);
        settings.retention.retain_s = Some(settings.keys.max_message_age_s * 2);
        assert_eq!(Retention::new(&settings, &catalog).unwrap().of("vault.put"), floor * 2);
    }

    #[test]
    fn a_retention_shorter_than_the_message_age_limit_is_refused() {
        let (mut settings, mut catalog_) = shipped();
        settings.retention.retain_s = Some(settings.keys.max_message_age_s - 1);
        let err = Retention::new(&settings, &catalog_).unwrap_err();
        assert!(err.contains("retention.retain_s") && err.contains("max_message_age_s"), "{err}");

        settings.retention.retain_s = None;
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let toml = std::fs::read_to_string(root.join("jobs.toml"))
            .unwrap()
            .replace("schema = \"schemas/", &format!("schema = \"{}/schemas/", root.display()))
            .replacen("name = \"vault.put\"", "name = \"vault.put\"\nretain_s = 60", 1);
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("jobs.toml"), toml).unwrap();
        catalog_ = Catalog::load(&dir.path().join("jobs.toml")).unwrap();
        let err = Retention::new(&settings, &catalog_).unwrap_err();
        assert!(err.contains("retain_s of kind vault.put = 60"), "{err}");
    }
}
