//! Job handlers: what runs a kind. Every kind — the built-in `vault.*` and `ledger.*`, the
//! `test.*` kinds, and the operator's own — is a [`Handler`] registered under its name in a
//! [`Registry`] (see `Worker::builder`). The handler chooses how it runs:
//!
//! | sort | where it runs | its effect | for |
//! |---|---|---|---|
//! | [`StorageHandler`] | inside the job's own storage transaction (the storage thread) | exactly once: it commits together with the outcome and the dedupe record, or not at all | state in the worker's own database (vault, ledger) |
//! | [`ExternalHandler`] | on the async runtime (spawn blocking work onto `tokio::task::spawn_blocking`), never on the storage thread; its outcome is recorded after | at least once: a crash after the effect and before the record runs it again, so use [`JobContext::id`] as the idempotency key downstream | calls to other systems, computation |
//!
//! Before any handler sees a payload, the worker validates it against the kind's JSON Schema
//! again (a gatekeeper of another release, a replayed message): one that fails is `failed`
//! with `invalid-payload`, never run. Every kind's `timeout_ms` bounds an attempt: an external
//! handler's future is dropped at the deadline, a storage handler that overran has its
//! transaction rolled back; either way the attempt ends retryable and counts.

pub mod exec;
pub mod ledger;
pub mod progress;
pub mod testing;
pub mod vault;

use std::collections::HashMap;
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse_protocol::batch::BatchSummary;
use gatehouse_protocol::fields::{FieldAad, FieldOpener};
use gatehouse_protocol::schemas::Schemas;
use gatehouse_protocol::{Catalog, JobEnvelope, JobId, JobState, JobStatus, Sequence};
use gatehouse_storage::{Family, StorageError, Tx};
use serde::de::DeserializeOwned;
use serde_json::Value;
use tokio::sync::watch;

/// How long a cancelled handler has to stop by itself: an executable gets SIGTERM, then
/// SIGKILL after this; a Rust handler that has not stopped is dropped.
pub const CANCEL_GRACE: Duration = Duration::from_secs(5);

/// How a handler ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Done; the result goes to the client.
    Success(Value),
    /// Will never succeed (bad input, not found, overflow); recorded as `failed`.
    Permanent(String),
    /// May succeed later; retried with backoff until the kind's max attempts.
    Retryable(String),
    /// Stopped because its client cancelled the job ([`JobContext::cancelled`]); recorded as
    /// `cancelled`.
    Cancelled,
}

/// What kind of failure an attempt's error text describes, for the log, metrics and dead-letter
/// headers: the text itself can quote the payload (an executable's last stderr line, a panic
/// message) and goes only to the job's owner, sealed at rest.
pub fn error_class(error: &str) -> &'static str {
    const CLASSES: &[(&str, &str)] = &[
        ("timed out", "timeout"),
        ("panic", "panic"),
        ("storage", "storage"),
        ("stored data", "storage"),
        ("handler stopped", "stopped"),
        ("invalid-payload", "invalid-payload"),
        ("bad-seal", "bad-seal"),
        ("exit ", "exit-status"),
        ("killed by signal", "signal"),
        ("CPU time limit", "cpu-limit"),
        ("file size limit", "file-size-limit"),
        ("stderr over", "stderr-limit"),
        ("output", "output"),
        ("could not run", "spawn"),
        ("could not start", "spawn"),
        ("the worker stop", "stopped"),
    ];
    CLASSES.iter().find(|(prefix, _)| error.starts_with(prefix)).map_or("handler-error", |(_, class)| class)
}

/// What a handler knows about the job it runs. The payload comes separately, typed.
#[derive(Debug, Clone)]
pub struct JobContext {
    /// The job's id: unique per job, the same on every attempt and redelivery — the
    /// idempotency key for effects outside the worker.
    pub id: JobId,
    pub kind: String,
    /// The client identity the gatekeeper authenticated; act on it, never on a client's claim.
    pub client: String,
    /// The job's sequence key (the client's own name for it) and number, for sequenced kinds.
    pub sequence: Option<Sequence>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When the attempt times out (`timeout_ms`).
    pub deadline: Instant,
    stop: Option<watch::Receiver<bool>>,
    cancel: Option<watch::Receiver<bool>>,
    progress: Option<progress::Sender>,
    checkpoint: Option<Value>,
    store: Option<gatehouse_storage::Store>,
    reservation: Option<Arc<Reservation>>,
    batch: Option<BatchSummary>,
    parents: Option<Vec<JobStatus>>,
}

impl JobContext {
    fn new(env: &JobEnvelope, attempt: u32, timeout: Duration, stop: Option<watch::Receiver<bool>>) -> Self {
        Self {
            id: env.id.clone(),
            kind: env.kind.clone(),
            client: env.client.clone(),
            sequence: env.sequence.clone(),
            attempt,
            deadline: Instant::now() + timeout,
            stop,
            cancel: None,
            progress: None,
            checkpoint: None,
            store: None,
            reservation: None,
            batch: None,
            parents: None,
        }
    }

    /// For a job of a kind that declares `parent_results`: how each job it waited for
    /// (`after`) ended, in the order named — state, and result or error. `None` for any other.
    pub fn parents(&self) -> Option<&[JobStatus]> {
        self.parents.as_deref()
    }

    /// Gives a job its parents' outcomes.
    pub fn with_parents(mut self, parents: Option<Vec<JobStatus>>) -> Self {
        self.parents = parents;
        self
    }

    /// For a batch's `on_complete` job: the batch, every job of it decided (its jobs by state,
    /// their ids in order). `None` for any other job.
    pub fn batch(&self) -> Option<&BatchSummary> {
        self.batch.as_ref()
    }

    /// Gives an `on_complete` job its batch's summary.
    pub fn with_batch(mut self, batch: Option<BatchSummary>) -> Self {
        self.batch = batch;
        self
    }

    /// What the handler's [`ExternalHandler::reserve`] took for this attempt, if it took
    /// something of type `T` (held until the attempt ends).
    pub fn reservation<T: std::any::Any>(&self) -> Option<&T> {
        self.reservation.as_ref().and_then(|r| r.0.downcast_ref())
    }

    /// The last checkpoint an earlier attempt of this job saved ([`JobContext::save_checkpoint`]):
    /// where this attempt starts instead of from the beginning. `None` on a first attempt (or
    /// when none was saved).
    pub fn checkpoint(&self) -> Option<&Value> {
        self.checkpoint.as_ref()
    }

    /// Saves `state` (any JSON, sealed at rest, only this job sees it) as the job's checkpoint,
    /// durably: if this attempt is interrupted (the worker killed, the host lost, a shutdown),
    /// the next one finds it in [`JobContext::checkpoint`]. Each save replaces the one before;
    /// the checkpoint goes when the job is decided. Storage handlers run in one transaction and
    /// have nothing to save.
    ///
    /// # Errors
    /// When storage cannot keep it (the attempt may go on, or end retryable).
    pub async fn save_checkpoint(&self, state: Value) -> Result<(), StorageError> {
        let Some(store) = &self.store else { return Ok(()) };
        let (id, client) = (self.id.clone(), self.client.clone());
        store.transact(move |tx| tx.save_checkpoint(&id, &client, &state)).await
    }

    /// Reports how far the job got: `percent` (0 to 100) and/or a short message (control
    /// characters removed, at most 200 characters). The latest report shows in the job's
    /// status while it runs; it is sealed at rest and only its client sees it. Never waits
    /// (a report the worker cannot take at once is dropped; the next one supersedes it).
    /// Storage handlers run inside one transaction: nothing to report.
    pub fn progress(&self, percent: Option<u8>, message: &str) {
        if let Some(tx) = &self.progress {
            let _ = tx.try_send((
                self.id.clone(),
                self.client.clone(),
                gatehouse_protocol::Progress::new(percent, message),
            ));
        }
    }

    /// Whether the job's client cancelled it: a handler should stop and answer
    /// [`Outcome::Cancelled`] (the worker stops waiting for it after a grace period).
    pub fn is_cancelled(&self) -> bool {
        self.cancel.as_ref().is_some_and(|c| *c.borrow())
    }

    /// Resolves when the job's client cancels it (never, for storage handlers: a cancelled
    /// job never starts one).
    pub async fn cancelled(&mut self) {
        match &mut self.cancel {
            Some(cancel) => {
                let _ = cancel.wait_for(|c| *c).await;
            }
            None => std::future::pending().await,
        }
    }

    /// Whether the worker is shutting down: a long handler should stop and answer
    /// [`Outcome::Retryable`] (the job then runs again after the restart).
    pub fn is_stopping(&self) -> bool {
        self.stop.as_ref().is_some_and(|s| *s.borrow())
    }

    /// Resolves when the worker begins to shut down (never, for storage handlers).
    pub async fn stopping(&mut self) {
        match &mut self.stop {
            Some(stop) => {
                let _ = stop.wait_for(|s| *s).await;
            }
            None => std::future::pending().await,
        }
    }
}

/// A handler whose effect commits in the job's own storage transaction (exactly once). Its
/// code may run more than once for one effect — on PostgreSQL a transaction shared with other
/// jobs is undone when one of them fails or meets another worker's lock, and it runs again —
/// so it must do nothing outside `tx` (that is what an [`ExternalHandler`] is for).
pub trait StorageHandler: Send + Sync + 'static {
    /// Runs the job inside `tx`. A storage error rolls everything back (the consumer decides
    /// whether to try again); every other ending is an [`Outcome`].
    ///
    /// # Errors
    /// Only storage failures.
    fn run(&self, tx: &Tx<'_>, job: &JobContext, payload: Value) -> Result<Outcome, StorageError>;
}

/// A boxed future of an external handler.
pub type HandlerFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

/// A handler that works outside the worker's storage (at least once; see the module docs).
/// Inject its resources (an HTTP client, a pool) as fields of the implementing type.
pub trait ExternalHandler: Send + Sync + 'static {
    fn run(&self, job: JobContext, payload: Value) -> HandlerFuture;

    /// Waits until the handler can take a job of `client` (a process slot, a connection),
    /// **before** the attempt is counted and its timeout starts: a job that waits here behind
    /// other clients' slow jobs is not charged for it. What it answers travels with the
    /// attempt ([`JobContext::reservation`]) and is dropped when the attempt ends. `None`:
    /// nothing to wait for (the default).
    fn reserve(&self, client: &str) -> ReserveFuture {
        let _ = client;
        Box::pin(async { None })
    }
}

/// What [`ExternalHandler::reserve`] took: any value, held while the attempt runs.
pub struct Reservation(pub Box<dyn std::any::Any + Send + Sync>);

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reservation")
    }
}

/// A boxed future of [`ExternalHandler::reserve`].
pub type ReserveFuture = Pin<Box<dyn Future<Output = Option<Reservation>> + Send>>;

/// A registered handler.
#[derive(Clone)]
pub enum Handler {
    Storage(Arc<dyn StorageHandler>),
    External(Arc<dyn ExternalHandler>),
}

/// The outcome for a payload that does not parse into the handler's type. Not the parser's
/// message: it can quote payload values, and errors are stored and shown as dead-letter
/// headers in the broker.
fn invalid_payload(kind: &str) -> Outcome {
    Outcome::Permanent(format!("invalid-payload: not a {kind} payload"))
}

struct StorageFn<P, F>(F, PhantomData<fn(P)>);

impl<P, F> StorageHandler for StorageFn<P, F>
where
    P: DeserializeOwned + 'static,
    F: Fn(&Tx<'_>, &JobContext, P) -> Result<Outcome, StorageError> + Send + Sync + 'static,
{
    fn run(&self, tx: &Tx<'_>, job: &JobContext, payload: Value) -> Result<Outcome, StorageError> {
        match P::deserialize(payload) {
            Ok(p) => (self.0)(tx, job, p),
            Err(_) => Ok(invalid_payload(&job.kind)),
        }
    }
}

struct ExternalFn<P, F>(F, PhantomData<fn(P)>);

impl<P, F, Fut> ExternalHandler for ExternalFn<P, F>
where
    P: DeserializeOwned + Send + 'static,
    F: Fn(JobContext, P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    fn run(&self, job: JobContext, payload: Value) -> HandlerFuture {
        match P::deserialize(payload) {
            Ok(p) => Box::pin((self.0)(job, p)),
            Err(_) => {
                let outcome = invalid_payload(&job.kind);
                Box::pin(async move { outcome })
            }
        }
    }
}

/// A storage handler from a function of the typed payload `P`.
pub fn in_storage<P, F>(f: F) -> Handler
where
    P: DeserializeOwned + 'static,
    F: Fn(&Tx<'_>, &JobContext, P) -> Result<Outcome, StorageError> + Send + Sync + 'static,
{
    Handler::Storage(Arc::new(StorageFn(f, PhantomData)))
}

/// An external handler from an async function of the typed payload `P`.
pub fn external<P, F, Fut>(f: F) -> Handler
where
    P: DeserializeOwned + Send + 'static,
    F: Fn(JobContext, P) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Outcome> + Send + 'static,
{
    Handler::External(Arc::new(ExternalFn(f, PhantomData)))
}

/// The kinds a worker runs, by name, and the handler families whose tables they use.
#[derive(Clone, Default)]
pub struct Registry {
    handlers: HashMap<String, Handler>,
    families: Vec<Family>,
    /// Handlers that run their kind only where the catalog lists it (a built-in kind added
    /// later, which catalogs written before need not list).
    optional: Vec<String>,
}

/// A catalog and a set of handlers that do not match.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Mismatch(String);

impl Registry {
    /// `vault.put`, `vault.get`, `vault.delete`, `ledger.apply`, `ledger.balance`; and where
    /// the catalog lists it, `vault.put_sealed` (a `vault.put` whose record the client seals).
    pub fn builtins() -> Self {
        let mut r = Self::default();
        r.insert("vault.put", in_storage(vault::put));
        r.insert("vault.put_sealed", in_storage(vault::put));
        r.optional.push("vault.put_sealed".into());
        r.insert("vault.get", in_storage(vault::get));
        r.insert("vault.delete", in_storage(vault::delete));
        r.insert("ledger.apply", in_storage(ledger::apply));
        r.insert("ledger.balance", in_storage(ledger::balance));
        r.add_family(vault::FAMILY);
        r.add_family(ledger::FAMILY);
        r
    }

    /// Adds every handler and family of `other` (replacing handlers of the same kind).
    pub fn extend(&mut self, other: Self) {
        self.handlers.extend(other.handlers);
        self.optional.extend(other.optional);
        for f in other.families {
            self.add_family(f);
        }
    }

    /// Adds a family whose tables this worker's storage handlers use. The same family twice
    /// is kept once; two different families of one name stop the worker at start.
    pub fn add_family(&mut self, family: Family) {
        let same = |f: &Family| f.name == family.name && f.migrations == family.migrations;
        if !self.families.iter().any(same) {
            self.families.push(family);
        }
    }

    /// The families, to migrate when storage opens.
    pub fn families(&self) -> &[Family] {
        &self.families
    }

    /// Registers `handler` for `kind` (replacing one registered before).
    pub fn insert(&mut self, kind: &str, handler: Handler) {
        self.handlers.insert(kind.to_owned(), handler);
    }

    pub fn get(&self, kind: &str) -> Option<&Handler> {
        self.handlers.get(kind)
    }

    /// Whether `kind` runs outside storage.
    pub fn is_external(&self, kind: &str) -> bool {
        matches!(self.get(kind), Some(Handler::External(_)))
    }

    /// Checks that every kind of `catalog` this worker runs (`test.*` kinds only when
    /// `testing`) has a handler, and every handler a catalog entry.
    ///
    /// # Errors
    /// The first mismatch, in one line.
    pub fn check(&self, catalog: &Catalog, testing: bool) -> Result<(), Mismatch> {
        let runs = |k: &&gatehouse_protocol::KindSpec| testing || !k.testing;
        let unlisted_optional = |k: &&String| self.optional.contains(k) && catalog.kind(k).is_none();
        if let Some(k) = catalog.kinds().filter(runs).find(|k| !self.handlers.contains_key(&k.name)) {
            return Err(Mismatch(format!(
                "the job catalog lists kind {} but this worker has no handler for it",
                k.name
            )));
        }
        let mut extra: Vec<&String> = self
            .handlers
            .keys()
            .filter(|k| catalog.kind(k).filter(runs).is_none() && !unlisted_optional(k))
            .collect();
        extra.sort();
        if let Some(k) = extra.first() {
            return Err(Mismatch(format!(
                "this worker has a handler for kind {k}, which the job catalog does not list"
            )));
        }
        Ok(())
    }
}

/// What running a kind needs: the handlers (checked against the catalog), the catalog's
/// compiled schemas, and the keys that open fields clients sealed themselves.
pub struct Kinds {
    pub registry: Registry,
    pub schemas: Schemas,
    pub fields: FieldOpener,
    /// The kinds that declare `parent_results`: their handlers are given the outcomes of the
    /// jobs they waited for.
    pub parent_results: std::collections::BTreeSet<String>,
}

impl Kinds {
    /// Runs `env` with its storage handler inside `tx`; see [`run_in_storage`].
    ///
    /// # Errors
    /// Only storage failures.
    pub fn run_in_storage(
        &self,
        tx: &Tx<'_>,
        env: &JobEnvelope,
        attempt: u32,
        timeout: Duration,
        cancelled: Option<bool>,
    ) -> Result<Outcome, StorageError> {
        run_in_storage(self, tx, env, attempt, timeout, cancelled)
    }

    /// For a job of a kind that declares `parent_results`: how each job it waited for (`after`)
    /// ended, its result or error included (read from storage; they never leave the worker).
    ///
    /// # Errors
    /// A storage failure.
    pub fn parents(&self, tx: &Tx<'_>, env: &JobEnvelope) -> Result<Option<Vec<JobStatus>>, StorageError> {
        if env.after.is_empty() || !self.parent_results.contains(&env.kind) {
            return Ok(None);
        }
        let parents = tx.parents(&env.after, &env.client)?;
        let statuses = env.after.iter().zip(parents).map(|(id, job)| match job {
            Some(job) => {
                let mut status = JobStatus::new(id.clone(), job.state);
                status.result = job.result;
                status.error = job.error;
                status.reason = job.reason;
                status
            }
            None => JobStatus::new(id.clone(), JobState::Expired),
        });
        Ok(Some(statuses.collect()))
    }

    /// The payload a handler is given: each field the client sealed opened, then validated
    /// against the kind's schema (the worker's own check). A field that does not open (sealed
    /// for another client, kind, field or job, to a key this worker does not hold, or sent in
    /// the clear) ends the job `failed: bad-seal`, unrun; a payload that breaks the schema,
    /// `failed: invalid-payload`. Only paths are named, never values.
    ///
    /// # Errors
    /// That outcome.
    pub fn payload(&self, env: &JobEnvelope) -> Result<Value, Outcome> {
        let mut payload = env.payload.clone();
        for path in self.schemas.sealed(&env.kind) {
            let Some(field) = payload.pointer_mut(path) else { continue };
            let Some(key) = env.idempotency_key.as_deref() else {
                return Err(Outcome::Permanent(format!("bad-seal at /payload{path}: no idempotency key")));
            };
            let aad = FieldAad { client: &env.client, kind: &env.kind, path, idempotency_key: key };
            let opened = match &*field {
                Value::String(sealed) => self.fields.open(sealed, &aad),
                _ => Err(gatehouse_protocol::crypto::CryptoError::Malformed),
            };
            *field = opened.map_err(|e| Outcome::Permanent(format!("bad-seal at /payload{path}: {e}")))?;
        }
        if let Err(violations) = self.schemas.validate(&env.kind, &payload) {
            let paths: Vec<String> = violations.into_iter().map(|v| v.path).collect();
            return Err(Outcome::Permanent(format!("invalid-payload at {}", paths.join(", "))));
        }
        Ok(payload)
    }
}

/// Runs `env` with its storage handler inside `tx`, after the schema check. An attempt that
/// took longer than `timeout` is undone and ends retryable.
///
/// # Errors
/// Only storage failures.
pub fn run_in_storage(
    kinds: &Kinds,
    tx: &Tx<'_>,
    env: &JobEnvelope,
    attempt: u32,
    timeout: Duration,
    cancelled: Option<bool>,
) -> Result<Outcome, StorageError> {
    // Cancelled by its client: never run (a sequenced job uses up its number all the same).
    // `cancelled`: already read in this transaction.
    if cancelled.map_or_else(|| tx.is_cancelled(&env.id), Ok)? {
        return Ok(Outcome::Cancelled);
    }
    let payload = match kinds.payload(env) {
        Ok(payload) => payload,
        Err(refused) => return Ok(refused),
    };
    let Some(Handler::Storage(handler)) = kinds.registry.get(&env.kind) else {
        return Ok(Outcome::Permanent(format!("{} has no storage handler in this worker", env.kind)));
    };
    let batch = match &env.completes {
        Some(batch) => tx.batch_of(batch, &env.client, None)?,
        None => None,
    };
    let parents = kinds.parents(tx, env)?;
    let job = JobContext::new(env, attempt, timeout, None).with_batch(batch).with_parents(parents);
    let outcome = handler.run(tx, &job, payload)?;
    if Instant::now() > job.deadline {
        return Ok(Outcome::Retryable(format!("timed out after {} ms", timeout.as_millis())));
    }
    Ok(outcome)
}

/// What an external handler's attempt is given beside its job: `stop` tells of shutdown,
/// `cancel` of the client's cancellation; `progress` takes its reports, `store` its checkpoints;
/// `checkpoint` is the last one an earlier attempt saved.
pub struct Attempt {
    pub number: u32,
    pub timeout: Duration,
    pub stop: watch::Receiver<bool>,
    pub cancel: watch::Receiver<bool>,
    pub progress: progress::Sender,
    pub store: gatehouse_storage::Store,
    pub checkpoint: Option<Value>,
    pub reservation: Option<Reservation>,
}

/// The context for an external handler's attempt.
pub fn external_context(env: &JobEnvelope, attempt: Attempt) -> JobContext {
    JobContext {
        cancel: Some(attempt.cancel),
        progress: Some(attempt.progress),
        checkpoint: attempt.checkpoint,
        store: Some(attempt.store),
        reservation: attempt.reservation.map(Arc::new),
        ..JobContext::new(env, attempt.number, attempt.timeout, Some(attempt.stop))
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use gatehouse_protocol::{JobEnvelope, JobId, Priority};
    use serde_json::json;

    use super::*;

    fn catalog() -> Catalog {
        Catalog::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/jobs.toml")).unwrap()
    }

    #[test]
    fn the_catalog_and_the_handlers_must_match() {
        let catalog = catalog();
        assert!(Registry::builtins().check(&catalog, false).is_ok());
        // With testing on, the test.* kinds need their handlers too.
        let e = Registry::builtins().check(&catalog, true).unwrap_err().to_string();
        assert!(e.contains("test.") && e.contains("no handler"), "{e}");
        let mut with_tests = Registry::builtins();
        testing::register(&mut with_tests);
        assert!(with_tests.check(&catalog, true).is_ok());
        // A catalog written before vault.put_sealed existed need not list it.
        let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let text = std::fs::read_to_string(config.join("jobs.toml")).unwrap();
        let (before, after) = text.split_once("name = \"vault.put_sealed\"").unwrap();
        let older = format!(
            "{}{}",
            before.rsplit_once("[[kind]]").unwrap().0,
            after.split_once("[[kind]]").map_or(String::new(), |(_, rest)| format!("[[kind]]{rest}"))
        );
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(config.join("schemas"), dir.path().join("schemas")).unwrap();
        std::fs::write(dir.path().join("jobs.toml"), older).unwrap();
        let older = Catalog::load(&dir.path().join("jobs.toml")).unwrap();
        assert!(older.kind("vault.put_sealed").is_none() && older.kind("vault.get").is_some());
        assert!(Registry::builtins().check(&older, false).is_ok());
        // A handler the catalog does not list.
        let mut extra = Registry::builtins();
        extra.insert(
            "acme.score",
            external(|_job: JobContext, _: Value| async { Outcome::Success(json!({})) }),
        );
        let e = extra.check(&catalog, false).unwrap_err().to_string();
        assert!(e.contains("acme.score") && e.contains("does not list"), "{e}");
    }

    #[test]
    fn an_invalid_payload_is_refused_naming_paths_not_values() {
        let kinds = Kinds {
            registry: Registry::default(),
            schemas: Schemas::compile(&catalog()).unwrap(),
            fields: FieldOpener::new(Vec::new()),
            parent_results: Default::default(),
        };
        let env = JobEnvelope {
            id: JobId::from_bytes([1; 16]),
            kind: "ledger.balance".into(),
            client: "c".into(),
            priority: Priority::new(1).unwrap(),
            sequence: None,
            payload: json!({"account": 12345, "secret": "MARKER"}),
            submitted_at_ms: 0,
            not_before_ms: None,
            reply: None,
            trace_id: None,
            span_id: None,
            shard: 0,
            share: 1,
            idempotency_key: None,
            completes: None,
            after: Vec::new(),
            on_parent_failure: gatehouse_protocol::envelope::ParentFailure::Cancel,
        };
        let Err(Outcome::Permanent(e)) = kinds.payload(&env) else { panic!("accepted") };
        assert!(e.starts_with("invalid-payload") && !e.contains("MARKER") && !e.contains("12345"), "{e}");
    }
}
