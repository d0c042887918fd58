//! The worker's metrics (Prometheus, `prometheus-client`) and its admin listener: plain HTTP on
//! `[admin] listen` (default `127.0.0.1:9102`; keep it private) with `/healthz`, `/readyz`
//! (a broker session is consuming) and `/metrics`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use gatehouse_storage::Store;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

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
struct Checkpoint {
    /// `pass` (beside the writer) or `rewind` (holds the writer off, restarts the log).
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

/// What the worker counts.
pub struct WorkerMetrics {
    registry: Registry,
    jobs: Family<Outcome, Counter>,
    handler_seconds: Family<Kind, Histogram>,
    retries: Family<Kind, Counter>,
    dead_letters: Family<Reason, Counter>,
    parked: Gauge,
    connected: Gauge,
    commit_seconds: Histogram,
    commit_group: Histogram,
    checkpoint_seconds: Family<Checkpoint, Histogram>,
    pruned: Counter,
    prune_seconds: Histogram,
    /// Whether a broker session is consuming (`/readyz`).
    pub ready: AtomicBool,
}

impl Default for WorkerMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("gatehouse_worker");
        let jobs = Family::<Outcome, Counter>::default();
        registry.register("jobs", "Jobs decided, by kind and outcome (status)", jobs.clone());
        let handler_seconds = Family::<Kind, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_25, 2.0, 16))
        });
        registry.register(
            "handler_duration_seconds",
            "Time to decide and run a job (storage kinds: the whole transaction; external kinds: the handler)",
            handler_seconds.clone(),
        );
        let retries = Family::<Kind, Counter>::default();
        registry.register("retries", "Failed attempts sent to a retry queue, by kind", retries.clone());
        let dead_letters = Family::<Reason, Counter>::default();
        registry.register("dead_letters", "Messages dead-lettered, by reason", dead_letters.clone());
        let parked = Gauge::default();
        registry.register("parked_jobs", "Jobs waiting for an earlier sequence number", parked.clone());
        let connected = Gauge::default();
        registry.register("broker_connected", "Whether a broker session is consuming", connected.clone());
        let commit_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 14));
        registry.register(
            "storage_commit_duration_seconds",
            "Group commits: BEGIN to COMMIT, fsync included",
            commit_seconds.clone(),
        );
        let commit_group = Histogram::new(exponential_buckets(1.0, 2.0, 8));
        registry.register(
            "storage_commit_group_size",
            "Closures (job decisions) per group commit",
            commit_group.clone(),
        );
        let checkpoint_seconds = Family::<Checkpoint, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 14))
        });
        registry.register(
            "storage_checkpoint_duration_seconds",
            "WAL checkpoints: passes beside the writer and rewinds of the log",
            checkpoint_seconds.clone(),
        );
        let pruned = Counter::default();
        registry.register(
            "pruned_jobs",
            "Decided jobs' records deleted after their retention",
            pruned.clone(),
        );
        let prune_seconds = Histogram::new(exponential_buckets(0.000_25, 2.0, 14));
        registry.register(
            "prune_batch_duration_seconds",
            "Pruning batches: one storage closure each, committed with the jobs beside it",
            prune_seconds.clone(),
        );
        Self {
            registry,
            jobs,
            handler_seconds,
            retries,
            dead_letters,
            parked,
            connected,
            commit_seconds,
            commit_group,
            checkpoint_seconds,
            pruned,
            prune_seconds,
            ready: AtomicBool::new(false),
        }
    }
}

impl WorkerMetrics {
    /// A job of `kind` ended in `status` (its state's name).
    pub fn decided(&self, kind: &str, status: &str) {
        self.jobs.get_or_create(&Outcome { kind: kind.to_owned(), outcome: status.to_owned() }).inc();
    }

    pub fn handler_took(&self, kind: &str, took: Duration) {
        self.handler_seconds.get_or_create(&Kind { kind: kind.to_owned() }).observe(took.as_secs_f64());
    }

    pub fn retried(&self, kind: &str) {
        self.retries.get_or_create(&Kind { kind: kind.to_owned() }).inc();
    }

    pub fn dead_lettered(&self, reason: &str) {
        self.dead_letters.get_or_create(&Reason { reason: reason.to_owned() }).inc();
    }

    /// A pruning batch deleted `jobs` records in `took` (its closure, commit included).
    pub fn pruned(&self, jobs: u64, took: Duration) {
        self.pruned.inc_by(jobs);
        self.prune_seconds.observe(took.as_secs_f64());
    }

    /// Whether a broker session is consuming.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
        self.connected.set(i64::from(ready));
    }

    fn encode(&self) -> String {
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

/// What the admin listener needs.
#[derive(Clone)]
pub struct Admin {
    pub metrics: Arc<WorkerMetrics>,
    pub store: Store,
}

/// `/healthz`, `/readyz`, `/metrics`.
pub fn router(admin: Admin) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(admin)
}

async fn readyz(State(a): State<Admin>) -> impl IntoResponse {
    if a.metrics.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no broker session")
    }
}

async fn metrics(State(a): State<Admin>) -> impl IntoResponse {
    // Read at scrape time: the storage knows, not a counter that could drift.
    if let Ok(n) = a.store.transact(|tx| tx.parked_count()).await {
        a.metrics.parked.set(i64::try_from(n).unwrap_or(i64::MAX));
    }
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        a.metrics.encode(),
    )
}
