//! Job handlers, one module per kind family. A handler runs inside the job's storage
//! transaction and says explicitly how it ended; [`crate::apply`] turns that into the stored
//! outcome, and the consumer into ack / reply / requeue.

pub mod ledger;
pub mod testing;
pub mod vault;

use gatehouse_protocol::JobEnvelope;
use gatehouse_storage::{StorageError, Tx};
use serde::de::DeserializeOwned;
use serde_json::Value;

/// How a handler ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done; the result goes to the client.
    Success(Value),
    /// Will never succeed (bad input, not found, overflow); recorded as `failed`.
    Permanent(String),
    /// May succeed later; retried with backoff until the kind's max attempts.
    Retryable(String),
}

/// Whether `kind` runs outside the storage transaction (then its outcome is recorded after).
pub fn is_external(kind: &str) -> bool {
    kind.starts_with("test.")
}

/// Runs the handler of `env.kind`. Storage errors abort the transaction; the consumer decides
/// whether to try again.
///
/// # Errors
/// Only storage failures; everything else is an [`Outcome`].
pub fn run(tx: &Tx<'_>, env: &JobEnvelope) -> Result<Outcome, StorageError> {
    match env.kind.as_str() {
        "vault.put" => with_payload(env, |p| vault::put(tx, &env.client, p)),
        "vault.get" => with_payload(env, |p| vault::get(tx, &env.client, p)),
        "vault.delete" => with_payload(env, |p| vault::delete(tx, &env.client, p)),
        "ledger.apply" => with_payload(env, |p| ledger::apply(tx, env, p)),
        "ledger.balance" => with_payload(env, |p| ledger::balance(tx, env, p)),
        other => Ok(Outcome::Permanent(format!("unknown kind {other}"))),
    }
}

/// Parses the payload into the handler's own type: the worker does not trust that the
/// gatekeeper validated it.
fn with_payload<P: DeserializeOwned>(
    env: &JobEnvelope,
    handler: impl FnOnce(P) -> Result<Outcome, StorageError>,
) -> Result<Outcome, StorageError> {
    match P::deserialize(&env.payload) {
        Ok(p) => handler(p),
        // Not the parser's message: it can quote payload values, and errors are stored and
        // dead-letter headers are visible in the broker.
        Err(_) => Ok(Outcome::Permanent(format!("invalid payload for {}", env.kind))),
    }
}
