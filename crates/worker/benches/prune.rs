//! What pruning costs the jobs beside it: the latency of a job's storage transaction (what a
//! synchronous request waits for in the worker) while a million decided jobs are pruned,
//! against the same transactions with no pruning, in one run on one database.
//!
//! `cargo bench -p gatehouse-worker --bench prune` (GATEHOUSE_PRUNE_ROWS to change the million,
//! GATEHOUSE_PRUNE_BATCH the shipped batch of 100)

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use gatehouse_protocol::crypto::Keyring;
use gatehouse_protocol::{Catalog, JobId, JobState};
use gatehouse_storage::{Store, StoredJob};
use gatehouse_worker::admin::metrics::WorkerMetrics;
use gatehouse_worker::handlers::vault;
use gatehouse_worker::settings::WorkerSettings;
use gatehouse_worker::sweep::retention::{Retention, prune_once};
use serde_json::json;

/// Concurrent job loops (like concurrent sync clients).
const CLIENTS: usize = 8;

fn job(n: u64, state: JobState) -> StoredJob {
    let mut raw = [0u8; 16];
    raw[..8].copy_from_slice(&n.to_be_bytes());
    StoredJob {
        id: JobId::from_bytes(raw),
        client: "bench".into(),
        kind: "vault.put".into(),
        state,
        result: Some(json!({"token": format!("{n:032x}")})),
        error: None,
        reason: None,
        sequence: None,
        submitted_at_ms: None,
    }
}

/// Runs `CLIENTS` loops of vault.put-like transactions (a sealed vault record and a job
/// record with a sealed result) while `go` holds; answers every latency.
async fn jobs_while(store: &Store, first: u64, go: Arc<AtomicBool>) -> Vec<Duration> {
    let tasks: Vec<_> = (0..CLIENTS as u64)
        .map(|c| {
            let (store, go) = (store.clone(), go.clone());
            tokio::spawn(async move {
                let mut took = Vec::new();
                let mut n = first + c * 10_000_000;
                while go.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    store
                        .transact(move |tx| {
                            vault::store(tx, "bench", &json!({"name": "Ada", "n": n}))?;
                            tx.record_job(&job(n, JobState::Succeeded))
                        })
                        .await
                        .expect("job transaction");
                    took.push(started.elapsed());
                    n += 1;
                }
                took
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("job loop"));
    }
    all
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 * p).ceil() as usize).saturating_sub(1).min(sorted.len() - 1)]
}

fn report(name: &str, mut took: Vec<Duration>, over: Duration) -> Duration {
    took.sort();
    let p99 = percentile(&took, 0.99);
    println!(
        "{name:<22} jobs {:>7}  {:>7.0}/s  p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>6.2} ms",
        took.len(),
        took.len() as f64 / over.as_secs_f64(),
        percentile(&took, 0.5).as_secs_f64() * 1e3,
        p99.as_secs_f64() * 1e3,
        took.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
    );
    p99
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let rows: u64 =
        std::env::var("GATEHOUSE_PRUNE_ROWS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir().expect("temp dir");
    let keyring = Keyring::parse(&format!("k1 {}", "ab".repeat(32))).expect("keyring");
    let store =
        Store::open_sqlite(&dir.path().join("bench.sqlite"), keyring, &[vault::FAMILY]).expect("store");

    let filled = Instant::now();
    for chunk in (0..rows).step_by(10_000) {
        store
            .transact(move |tx| {
                (chunk..(chunk + 10_000).min(rows))
                    .try_for_each(|n| tx.record_job(&job(n, JobState::Succeeded)))
            })
            .await
            .expect("fill");
    }
    println!("filled {rows} decided jobs in {:.1} s", filled.elapsed().as_secs_f64());

    // Retention 0 (and a message age limit of 0): everything decided before now goes.
    let config = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
    let mut settings = WorkerSettings::load(&config.join("worker.toml")).expect("settings");
    settings.keys.max_message_age_s = 0;
    settings.retention.retain_s = Some(0);
    if let Some(batch) = std::env::var("GATEHOUSE_PRUNE_BATCH").ok().and_then(|v| v.parse().ok()) {
        settings.retention.prune_batch = batch;
    }
    let catalog = Catalog::load(&config.join("jobs.toml")).expect("catalog");
    let retention = Retention::new(&settings, &catalog).expect("retention");
    let metrics = WorkerMetrics::default();
    let (_stop_tx, stop) = tokio::sync::watch::channel(false);

    // The reference: the same job loops for 10 s with nothing else going on.
    let go = Arc::new(AtomicBool::new(true));
    let stopper = {
        let go = go.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(10)).await;
            go.store(false, Ordering::Relaxed);
        })
    };
    let started = Instant::now();
    let idle = jobs_while(&store, 1 << 40, go).await;
    stopper.await.expect("timer");
    let idle = report("jobs, no pruning", idle, started.elapsed());

    // The same loops for as long as one pruning pass over every row takes.
    let go = Arc::new(AtomicBool::new(true));
    let started = Instant::now();
    let pruning = {
        let (store, go) = (store.clone(), go.clone());
        tokio::spawn(async move {
            let n = prune_once(&store, &retention, &metrics, &stop).await.expect("prune");
            go.store(false, Ordering::Relaxed);
            (n, started.elapsed())
        })
    };
    let beside = jobs_while(&store, 1 << 41, go).await;
    let (pruned, took) = pruning.await.expect("pruner");
    let busy = report("jobs, while pruning", beside, took);
    println!(
        "pruned {pruned} records in {:.1} s ({:.0}/s, batches of {})",
        took.as_secs_f64(),
        pruned as f64 / took.as_secs_f64(),
        settings.retention.prune_batch
    );
    println!("p99 while pruning / p99 idle: {:.2}", busy.as_secs_f64() / idle.as_secs_f64());
}
