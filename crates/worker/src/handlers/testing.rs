//! `test.*` kinds for fault tests, available only when the worker runs with
//! `testing.enabled = true`. They run outside the storage transaction, like any handler that
//! does real work elsewhere.

use std::time::Duration;

use gatehouse_protocol::JobEnvelope;
use serde::Deserialize;
use serde_json::json;

use super::Outcome;

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

/// Runs a test kind. `attempt` is 1 for the first start of this job.
pub async fn run(env: &JobEnvelope, attempt: u32) -> Outcome {
    match env.kind.as_str() {
        "test.sleep" => match Sleep::deserialize(&env.payload) {
            Ok(p) => {
                tokio::time::sleep(Duration::from_millis(p.ms)).await;
                Outcome::Success(json!({ "slept_ms": p.ms }))
            }
            Err(_) => Outcome::Permanent("invalid payload".into()),
        },
        "test.fail" => match Fail::deserialize(&env.payload) {
            Ok(p) if attempt <= p.times => {
                Outcome::Retryable(format!("failing on purpose: attempt {attempt} of {}", p.times))
            }
            Ok(_) => Outcome::Success(json!({ "attempts": attempt })),
            Err(_) => Outcome::Permanent("invalid payload".into()),
        },
        "test.panic" => panic!("test.panic: panicking on purpose"),
        "test.crash" => {
            tracing::error!(job_id = %env.id, "test.crash: aborting the worker process on purpose");
            std::process::abort()
        }
        other => Outcome::Permanent(format!("unknown kind {other}")),
    }
}
