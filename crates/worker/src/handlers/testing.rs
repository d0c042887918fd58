//! `test.*` kinds for fault tests, registered only when the worker runs with
//! `testing.enabled = true`. They are external handlers, like any handler that does real work
//! elsewhere.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Deserialize;
use serde_json::json;

use super::{JobContext, Outcome, Registry, external};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Sleep {
    ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Fail {
    times: u32,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Long {
    steps: u32,
    step_ms: u64,
}

#[derive(Deserialize)]
struct Anything {}

/// How many `test.singleton` jobs run right now (in this process).
static SINGLETONS_RUNNING: AtomicUsize = AtomicUsize::new(0);

/// `test.long`: `steps` steps of `step_ms`, a checkpoint after each: an attempt starts from the
/// last checkpoint, and the result says where it started and how many steps it ran.
async fn long(mut job: JobContext, p: Long) -> Outcome {
    let start = job.checkpoint().and_then(|c| c["next"].as_u64()).map_or(0, |n| n as u32);
    for step in start..p.steps {
        tokio::select! {
            () = tokio::time::sleep(Duration::from_millis(p.step_ms)) => {}
            () = job.cancelled() => return Outcome::Cancelled,
        }
        if let Err(e) = job.save_checkpoint(json!({ "next": step + 1 })).await {
            return Outcome::Retryable(format!("could not save a checkpoint: {e}"));
        }
        job.progress(Some(((step + 1) * 100 / p.steps.max(1)) as u8), "");
    }
    Outcome::Success(
        json!({ "resumed_from": start, "steps_run": p.steps - start.min(p.steps), "attempt": job.attempt }),
    )
}

/// `test.singleton`: sleeps like test.sleep, and says how many jobs of its kind ran at once
/// with it (in this process) and when it ran (unix ms; across processes).
async fn singleton(job: JobContext, p: Sleep) -> Outcome {
    let started = gatehouse_protocol::clock::now_ms();
    tracing::info!(job_id = %job.id, "test.singleton started");
    let at_start = SINGLETONS_RUNNING.fetch_add(1, Ordering::SeqCst) + 1;
    tokio::time::sleep(Duration::from_millis(p.ms)).await;
    let at_end = SINGLETONS_RUNNING.fetch_sub(1, Ordering::SeqCst);
    Outcome::Success(json!({
        "running_at_once": at_start.max(at_end), "attempt": job.attempt,
        "started_at_ms": started, "ended_at_ms": gatehouse_protocol::clock::now_ms(),
    }))
}

/// Registers `test.long`, `test.sleep`, `test.singleton`, `test.limited`, `test.rated`, `test.progress`, `test.fail`,
/// `test.panic` and `test.crash`.
pub fn register(r: &mut Registry) {
    r.insert("test.long", external(long));
    r.insert(
        "test.progress",
        // Reports half-way at once, then sleeps (or stops when cancelled).
        external(|mut job: JobContext, p: Sleep| async move {
            job.progress(Some(50), "half-way: MARKER-PROGRESS-5150");
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(p.ms)) => Outcome::Success(json!({ "slept_ms": p.ms })),
                () = job.cancelled() => Outcome::Cancelled,
            }
        }),
    );
    r.insert("test.singleton", external(singleton));
    // (`max_running = 4` in the catalog: its results say when each ran.)
    r.insert("test.limited", external(singleton));
    // (`rate = "20/s"`.)
    r.insert("test.rated", external(singleton));
    r.insert(
        "test.sleep",
        // A well-behaved long handler: it stops when its job is cancelled. Its result says when
        // it ran (unix ms).
        external(|mut job: JobContext, p: Sleep| async move {
            let started = gatehouse_protocol::clock::now_ms();
            tokio::select! {
                // (As a batch's on_complete job, the batch it was given too.)
                () = tokio::time::sleep(Duration::from_millis(p.ms)) => Outcome::Success(json!({
                    "slept_ms": p.ms, "started_at_ms": started, "ended_at_ms": gatehouse_protocol::clock::now_ms(),
                    "batch": job.batch(), "parents": job.parents(),
                })),
                () = job.cancelled() => Outcome::Cancelled,
            }
        }),
    );
    r.insert(
        "test.fail",
        external(|job: JobContext, p: Fail| async move {
            if job.attempt <= p.times {
                Outcome::Retryable(format!("failing on purpose: attempt {} of {}", job.attempt, p.times))
            } else {
                Outcome::Success(json!({ "attempts": job.attempt }))
            }
        }),
    );
    r.insert(
        "test.panic",
        external(|_job: JobContext, _: Anything| async move { panic!("test.panic: panicking on purpose") }),
    );
    r.insert(
        "test.crash",
        external(|job: JobContext, _: Anything| async move {
            tracing::error!(job_id = %job.id, "test.crash: aborting the worker process on purpose");
            std::process::abort()
        }),
    );
}
