//! `custom-worker`: a Gatehouse worker that runs a job kind of its own, `example.wordcount`
//! (payload `{"text"}` → `{"words": N}`), beside the built-in kinds. Run it with this folder's
//! catalog (`WORKER__CATALOG__PATH=examples/custom-worker/jobs.toml`; the gatekeeper reads the
//! same file for the kind's schema).

use gatehouse_worker::handlers::{JobContext, Outcome, external};
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

fn main() -> std::process::ExitCode {
    gatehouse_worker::process::main_with(|worker| {
        worker.builtins().handle("example.wordcount", external(wordcount))
    })
}
