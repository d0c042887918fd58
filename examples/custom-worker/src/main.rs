//! `custom-worker`: a Gatehouse worker that runs job kinds of its own beside the built-in
//! kinds: `example.wordcount` (payload `{"text"}` → `{"words": N}`), an external handler, and
//! `example.claim` (payload `{"name", "note"}` → `{"claimed": name}`), a storage handler with a
//! table of its own. Run it with this folder's catalog
//! (`WORKER__CATALOG__PATH=examples/custom-worker/jobs.toml`; the gatekeeper reads the same
//! file for the kinds' schemas).

use gatehouse_storage::sql::params;
use gatehouse_storage::{Family, Place, SealedColumn, StorageError, Tx};
use gatehouse_worker::handlers::{JobContext, Outcome, external, in_storage};
use serde::Deserialize;
use serde_json::json;

/// The payload, as `schemas/example.wordcount.json` describes it.
#[derive(Deserialize)]
struct Text {
    text: String,
}

/// Counts words. An external handler: it works outside the worker's storage (here it needs
/// none), on the async runtime; its outcome is recorded after it returns.
async fn wordcount(_job: JobContext, p: Text) -> Outcome {
    Outcome::Success(json!({ "words": p.text.split_whitespace().count() }))
}

/// `example.claim`'s table, created when the worker opens storage. The note is sealed at rest,
/// bound to its name and owner.
const NAMES: Family = Family {
    name: "example.names",
    migrations: &[
        "CREATE TABLE example_names (name TEXT PRIMARY KEY, owner TEXT NOT NULL, note TEXT NOT NULL)",
    ],
    sealed: &[SealedColumn { table: "example_names", key: "name", owner: "owner", column: "note" }],
};

/// The payload, as `schemas/example.claim.json` describes it.
#[derive(Deserialize)]
struct Claim {
    name: String,
    note: String,
}

/// Claims a name for the calling client. A storage handler: it runs inside the job's own
/// transaction, so its row and the job's outcome commit together, exactly once. A name claimed
/// already is refused by the table's primary key: the worker counts that attempt like a
/// retryable error (backoff, then the dead-letter queue after `max_attempts`, the database's
/// reason as the error). A handler that wants another answer looks first and returns
/// `Outcome::Permanent`.
fn claim(tx: &Tx<'_>, job: &JobContext, p: Claim) -> Result<Outcome, StorageError> {
    let place = Place { table: "example_names", column: "note", row: &p.name, owner: &job.client };
    let note = tx.seal(&json!(p.note), &place)?;
    tx.write(
        "INSERT INTO example_names (name, owner, note) VALUES (?1, ?2, ?3)",
        params![p.name, job.client, note],
    )?;
    Ok(Outcome::Success(json!({ "claimed": p.name })))
}

fn main() -> std::process::ExitCode {
    gatehouse_worker::process::main_with(|worker| {
        worker
            .builtins()
            .handle("example.wordcount", external(wordcount))
            .family(NAMES)
            .handle("example.claim", in_storage(claim))
    })
}
