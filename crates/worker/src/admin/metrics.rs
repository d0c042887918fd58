//! The worker's metrics (Prometheus, `prometheus-client`), served by the admin listener, and
//! the activity the dashboard shows ([`super::activity`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::activity::{Activity, Event};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Outcome {
    kind: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Kind {
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Held {
    kind: String,
    state: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Checkpoint {
    /// `pass` (beside the writer) or `rewind` (holds the writer off, restarts the log).
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Firing {
    schedule: String,
    /// `fired`, `skipped` (the previous one still ran) or `missed` (no worker ran at its time).
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

/// How often the parked and scheduled gauges are counted in storage at most.
pub const WAITING_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// What the worker counts.
pub struct WorkerMetrics {
    registry: Registry,
    jobs: Family<Outcome, Counter>,
    handler_seconds: Family<Kind, Histogram>,
    retries: Family<Kind, Counter>,
    dead_letters: Family<Reason, Counter>,
    parked: Gauge,
    scheduled: Gauge,
    /// Jobs held in storage, by kind and state.
    held: Family<Held, Gauge>,
    /// When `parked` and `scheduled` were last counted, and the counts made (see
    /// [`WorkerMetrics::refresh_waiting`]).
    waiting_counted: tokio::sync::Mutex<Option<std::time::Instant>>,
    waiting_counts: Counter,
    connected: Gauge,
    commit_seconds: Histogram,
    commit_group: Histogram,
    checkpoint_seconds: Family<Checkpoint, Histogram>,
    pruned: Counter,
    prune_seconds: Histogram,
    firings: Family<Firing, Counter>,
    storage_refusing: Gauge,
    storage_outages: Counter,
    /// Whether a broker session is consuming (`/readyz`).
    pub ready: AtomicBool,
    /// What the dashboard shows.
    pub activity: Activity,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let histogram = |start, n| Histogram::new(exponential_buckets(start, 2.0, n));
        let mut metrics = Self {
            registry: Registry::with_prefix("gatehouse_worker"),
            jobs: Family::default(),
            handler_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
            }),
            retries: Family::default(),
            dead_letters: Family::default(),
            parked: Gauge::default(),
            scheduled: Gauge::default(),
            held: Family::default(),
            waiting_counted: tokio::sync::Mutex::new(None),
            waiting_counts: Counter::default(),
            connected: Gauge::default(),
            commit_seconds: histogram(0.000_25, 14),
            commit_group: histogram(1.0, 8),
            checkpoint_seconds: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            }),
            pruned: Counter::default(),
            prune_seconds: histogram(0.000_25, 14),
            firings: Family::default(),
            storage_refusing: Gauge::default(),
            storage_outages: Counter::default(),
            ready: AtomicBool::new(false),
            activity: Activity::default(),
        };
        metrics.register_jobs();
        metrics.register_storage();
        metrics
    }
}

impl WorkerMetrics {
    fn register_jobs(&mut self) {
        let r = &mut self.registry;
        r.register("jobs", "Jobs decided, by kind and outcome (status)", self.jobs.clone());
        r.register(
            "handler_duration_seconds",
            "Time to decide and run a job (storage kinds: the whole transaction; external kinds: the handler)",
            self.handler_seconds.clone(),
        );
        r.register("retries", "Failed attempts sent to a retry queue, by kind", self.retries.clone());
        r.register("dead_letters", "Messages dead-lettered, by reason", self.dead_letters.clone());
        r.register("parked_jobs", "Jobs waiting for an earlier sequence number", self.parked.clone());
        r.register("scheduled_jobs", "Delayed jobs held until their time", self.scheduled.clone());
        r.register(
            "held_jobs",
            "Jobs held in storage, unstarted, by kind and state (scheduled, throttled, waiting_for_turn, paused)",
            self.held.clone(),
        );
        r.register(
            "waiting_counts",
            "Times the parked and scheduled jobs were counted in storage (at most once per 5 s, whatever the scrape and dashboard rate)",
            self.waiting_counts.clone(),
        );
        r.register("broker_connected", "Whether a broker session is consuming", self.connected.clone());
        r.register(
            "storage_refusing_writes",
            "Whether storage refuses writes now (disk full, read-only, unreachable): no jobs are taken",
            self.storage_refusing.clone(),
        );
        r.register("storage_outages", "Times storage began to refuse writes", self.storage_outages.clone());
        r.register(
            "schedule_firings",
            "Schedule firings this worker planned, by schedule and outcome (fired, skipped, missed)",
            self.firings.clone(),
        );
    }

    fn register_storage(&mut self) {
        let r = &mut self.registry;
        r.register(
            "storage_commit_duration_seconds",
            "Group commits: BEGIN to COMMIT, fsync included",
            self.commit_seconds.clone(),
        );
        r.register(
            "storage_commit_group_size",
            "Closures (job decisions) per group commit",
            self.commit_group.clone(),
        );
        r.register(
            "storage_checkpoint_duration_seconds",
            "WAL checkpoints: passes beside the writer and rewinds of the log",
            self.checkpoint_seconds.clone(),
        );
        r.register("pruned_jobs", "Decided jobs' records deleted after their retention", self.pruned.clone());
        r.register(
            "prune_batch_duration_seconds",
            "Pruning batches: one storage closure each, committed with the jobs beside it",
            self.prune_seconds.clone(),
        );
    }
}

impl WorkerMetrics {
    /// Job `id` of `kind` ended in `status` (its state's name).
    pub fn decided(&self, kind: &str, status: &str, id: &str) {
        self.jobs.get_or_create(&Outcome { kind: kind.to_owned(), outcome: status.to_owned() }).inc();
        self.activity.decided(kind, status, id);
    }

    pub fn handler_took(&self, kind: &str, took: Duration) {
        self.handler_seconds.get_or_create(&Kind { kind: kind.to_owned() }).observe(took.as_secs_f64());
    }

    pub fn retried(&self, kind: &str) {
        self.retries.get_or_create(&Kind { kind: kind.to_owned() }).inc();
    }

    /// A message was dead-lettered (`event.reason` says why).
    pub fn dead_lettered(&self, event: Event) {
        let reason = event.reason.map_or("", |r| r.as_str()).to_owned();
        self.dead_letters.get_or_create(&Reason { reason }).inc();
        // A job that opened (its kind is known) was decided: dead-lettered.
        if let Some(kind) = &event.kind {
            self.jobs.get_or_create(&Outcome { kind: kind.clone(), outcome: "dead_lettered".into() }).inc();
        }
        self.activity.dead_lettered(event);
    }

    /// Counts the parked, the delayed and every held job in storage for the gauges — at most once per
    /// [`WAITING_EVERY`], whatever the rate of scrapes and dashboard polls (concurrent callers
    /// wait for one count), so that no HTTP client of the admin listener drives full counts.
    /// Answers the gauges (`None` for one that was never counted).
    pub async fn refresh_waiting(&self, store: &gatehouse_storage::Store) -> (Option<u64>, Option<u64>) {
        let mut counted = self.waiting_counted.lock().await;
        if counted.is_none_or(|at| at.elapsed() >= WAITING_EVERY) {
            let counts = store
                .read(|tx| {
                    Ok::<_, gatehouse_storage::StorageError>((
                        tx.parked_count()?,
                        tx.scheduled_count()?,
                        tx.held_by_kind()?,
                    ))
                })
                .await;
            self.waiting_counts.inc();
            if let Ok((parked, scheduled, held)) = counts {
                self.parked.set(i64::try_from(parked).unwrap_or(i64::MAX));
                self.scheduled.set(i64::try_from(scheduled).unwrap_or(i64::MAX));
                self.held.clear();
                for (kind, state, n) in held {
                    self.held.get_or_create(&Held { kind, state }).set(i64::try_from(n).unwrap_or(i64::MAX));
                }
                *counted = Some(std::time::Instant::now());
            }
        }
        let known = counted.is_some();
        let get = |g: &Gauge| known.then(|| u64::try_from(g.get()).unwrap_or(0));
        (get(&self.parked), get(&self.scheduled))
    }

    /// A pruning batch deleted `jobs` records in `took` (its closure, commit included).
    pub fn pruned(&self, jobs: u64, took: Duration) {
        self.pruned.inc_by(jobs);
        self.prune_seconds.observe(took.as_secs_f64());
    }

    /// A planning pass of `schedule` fired, skipped and missed these many firings.
    pub fn schedule_fired(&self, schedule: &str, fired: u64, skipped: u64, missed: u64) {
        for (outcome, n) in [("fired", fired), ("skipped", skipped), ("missed", missed)] {
            if n > 0 {
                let label = Firing { schedule: schedule.to_owned(), outcome: outcome.to_owned() };
                self.firings.get_or_create(&label).inc_by(n);
            }
        }
    }

    /// Storage began (`true`) or stopped refusing writes.
    pub fn storage_refusing(&self, refusing: bool) {
        self.storage_refusing.set(i64::from(refusing));
        if refusing {
            self.storage_outages.inc();
        }
    }

    /// Whether a broker session is consuming.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.connected.set(i64::from(ready));
    }

    /// The Prometheus text.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl gatehouse_storage::StorageObserver for WorkerMetrics {
    fn committed(&self, took: Duration, closures: usize) {
        self.commit_seconds.observe(took.as_secs_f64());
        self.commit_group.observe(closures as f64);
    }

    fn checkpointed(&self, took: Duration, rewind: bool) {
        let kind = if rewind { "rewind" } else { "pass" };
        self.checkpoint_seconds.get_or_create(&Checkpoint { kind: kind.into() }).observe(took.as_secs_f64());
    }
}
