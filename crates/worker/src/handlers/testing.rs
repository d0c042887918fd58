//! `test.*` kinds for fault tests, registered only when the worker runs with
//! `testing.enabled = true`. They are external handlers, like any handler that does real work
//! elsewhere.

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
struct Anything {}

/// Registers `test.sleep`, `test.fail`, `test.panic` and `test.crash`.
pub fn register(r: &mut Registry) {
    r.insert(
        "test.sleep",
        // A well-behaved long handler: it stops when its job is cancelled.
        external(|mut job: JobContext, p: Sleep| async move {
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(p.ms)) => Outcome::Success(json!({ "slept_ms": p.ms })),
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
