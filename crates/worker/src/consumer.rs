//! The one owner of ack / nack decisions.
//!
//! | what happened                                   | broker action                            |
//! |-------------------------------------------------|------------------------------------------|
//! | decided and committed (any outcome), or parked  | reply, then `ack`                        |
//! | handler failed retryably, attempts left         | publish to a retry queue (confirmed), `ack` |
//! | attempts exhausted; unknown kind                | publish to `gatehouse.dead` with reason headers (confirmed), record, `ack` |
//! | unsigned or badly signed, stale, undecodable, unsealable, misrouted (queue or priority not the vouched ones), a replay without a valid operator grant | the same, without running or recording anything |
//! | would park past the client's cap (`parked_limit`) | dead-lettered and recorded, its number not used up |
//! | storage or broker trouble before a decision     | `nack` + requeue after a pause           |
//!
//! The original delivery is acked only after whatever replaces it (outcome, retry message,
//! dead letter) is durable, so a crash anywhere means a redelivery, which the job id makes
//! harmless.
//!
//! **Crash isolation.** A job that crashes the worker process also interrupts the jobs running
//! beside it, and each interrupted attempt counts. So a job whose previous attempt was
//! interrupted (a *suspect*) runs alone: it waits for the running jobs, and others wait for
//! it. The culprit then crashes alone and reaches its max attempts; a bystander is charged at
//! most the one attempt it was running when the first crash hit.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use gatehouse_broker::lapin::message::Delivery;
use gatehouse_broker::lapin::options::{BasicAckOptions, BasicNackOptions};
use gatehouse_broker::lapin::types::{AMQPValue, FieldTable, LongString};
use gatehouse_broker::lapin::{BasicProperties, Channel};
use gatehouse_broker::topology::headers;
use gatehouse_broker::{Publisher, Topology};
use gatehouse_protocol::{
    Catalog, ControlRequest, JobEnvelope, JobId, JobState, JobStatus, KindSpec, Vouched,
};
use gatehouse_storage::{StorageError, Store, now_ms, panic_message};
use tracing::Instrument;

use crate::acks::Acks;
use crate::apply::{self, Answer, ApplyError, Arrival, Decided, ReplyTarget, Step};
use crate::dashboard::Event;
use crate::handlers::{self, Handler, Kinds, Outcome};
use crate::job_locks::JobLocks;
use crate::keys::{Refusal, WorkerKeys};
use crate::reply;
use gatehouse_protocol::replay::Grant;

/// What every delivery handler needs.
pub struct Context {
    pub store: Store,
    pub catalog: Arc<Catalog>,
    /// Channel for replies (no confirms: see [`crate::reply`]).
    pub replies: Channel,
    /// Confirm channel for retries and dead letters.
    pub publisher: Publisher,
    pub topology: Topology,
    /// Whether the `test.*` kinds run.
    pub testing: bool,
    /// The handlers and schemas of the kinds this worker runs.
    pub kinds: Arc<Kinds>,
    pub metrics: Arc<crate::metrics::WorkerMetrics>,
    /// Becomes `true` when the worker begins to shut down (handlers see it in their context).
    pub stop: tokio::sync::watch::Receiver<bool>,
    /// Retry queues declared on this connection.
    pub retry_queues: Mutex<HashSet<String>>,
    /// Jobs run under the read side; suspects (see the module docs) under the write side.
    pub isolation: Arc<tokio::sync::RwLock<()>>,
    /// One delivery of a job at a time.
    pub job_locks: Arc<JobLocks>,
    pub keys: Arc<WorkerKeys>,
    /// Acknowledgements of the job channel (see [`crate::acks`]).
    pub acks: Acks,
    /// What one client may hold in storage (see [`apply::Decided::OverCap`]).
    pub caps: apply::ClientCaps,
    /// External handlers running here, to tell of a cancellation.
    pub running: Arc<crate::cancel::Running>,
    /// Where handlers' progress reports go.
    pub progress: crate::progress::Sender,
    /// When a running job's delivery is acked and its message held in storage instead.
    pub leases: crate::leases::LeaseSettings,
    /// Deliveries acked at hand-off (by tag, on this channel), with their job and the token of
    /// the attempt's lease.
    pub handed_off: Mutex<std::collections::HashMap<u64, (JobId, String)>>,
}

/// Pause before a delivery that hit trouble goes back to the queue, so that a sick database
/// or broker is not hammered.
const TROUBLE_PAUSE: Duration = Duration::from_millis(500);

/// Status queries older than this are not answered (their asker gave up long ago).
const CONTROL_MAX_AGE: Duration = Duration::from_secs(60);

/// Longest retry delay, however many attempts came before.
const MAX_RETRY_DELAY_MS: u64 = 5 * 60 * 1000;

/// Handles one job delivery from the queue of `class`, start to ack.
pub async fn handle_job(ctx: Arc<Context>, class: String, mut delivery: Delivery) {
    let data = std::mem::take(&mut delivery.data);
    // Nothing unsigned, forged, stale, misrouted or replayed without an operator's grant runs,
    // or even gets parsed beyond what checking needs.
    let checked = ctx.keys.open_job(&data).and_then(|(env, target)| {
        let replay = check_delivery(&ctx, &class, &delivery, &data, &env)?;
        Ok((env, target, replay))
    });
    let (env, target, replay) = match checked {
        Ok(checked) => checked,
        Err(refusal) => {
            tracing::warn!(reason = refusal.reason(), "job message refused");
            let dead = Dead { reason: refusal.reason(), error: None, attempts: 0 };
            return dead_letter(&ctx, &delivery, &data, &class, None, dead).await;
        }
    };
    let trace_id = env.trace_id.as_deref().unwrap_or("");
    let span = tracing::info_span!("job", job_id = %env.id, kind = %env.kind, client = %env.client, trace_id);
    async move {
        let _one_at_a_time = ctx.job_locks.lock(&env.id).await;
        let spec = ctx.catalog.kind(&env.kind).filter(|k| ctx.testing || !k.testing).cloned();
        let Some(spec) = spec else {
            let error = Some(format!("this worker does not run {}", env.kind));
            let dead = Dead { reason: "unknown_kind", error, attempts: 0 };
            return dead_letter(&ctx, &delivery, &data, &class, Some((&env, &target)), dead).await;
        };
        let job = Job { ctx: &ctx, delivery: &delivery, data: &data, class: &class, target, spec, env };
        job.handle(replay).await;
    }
    .instrument(span)
    .await;
}

/// One decodable job delivery and what handling it needs.
struct Job<'a> {
    ctx: &'a Context,
    delivery: &'a Delivery,
    data: &'a [u8],
    class: &'a str,
    target: ReplyTarget,
    spec: KindSpec,
    env: JobEnvelope,
}

impl Job<'_> {
    fn arrival(&self, replay: Option<Grant>) -> Arrival {
        Arrival {
            env: self.env.clone(),
            raw: self.data.to_vec(),
            target: self.target.clone(),
            replay,
            caps: self.ctx.caps,
            turn_lease: None,
        }
    }

    async fn handle(&self, replay: Option<Grant>) {
        if !self.ctx.kinds.registry.is_external(&self.env.kind) {
            return self.decide_and_run(replay).await;
        }
        // A singleton job's attempt holds a lease from its turn on (see [`crate::leases`]).
        let holder = crate::leases::Holder::new();
        let lease_ms = i64::try_from(self.ctx.leases.lease.as_millis()).unwrap_or(i64::MAX);
        // Only a singleton job takes a lease with its turn.
        let singleton = self.spec.singleton || self.spec.singleton_key.is_some();
        let turn_lease = singleton.then(|| apply::TurnLease {
            holder: holder.token.clone(),
            expires_at_ms: now_ms().saturating_add(lease_ms),
        });
        let prepared = {
            let spec = self.spec.clone();
            let arrival = Arrival { turn_lease, ..self.arrival(replay) };
            self.ctx.store.transact(move |tx| apply::prepare(tx, &spec, &arrival)).await
        };
        match prepared {
            Ok(Step::Decided(d)) => self.settle_decided(d).await,
            Ok(Step::Run { suspect }) => self.run_isolated(suspect, holder).await,
            Err(e) => {
                tracing::warn!(error = %e, "could not decide the job; requeueing");
                requeue_after_pause(self.ctx, self.delivery).await;
            }
        }
    }

    /// A storage kind: the whole decision and effect in one transaction (one share of a group
    /// commit). Its handler runs on the storage thread, where a panic is caught: nothing it
    /// does can take the process down, so it needs no crash isolation.
    async fn decide_and_run(&self, replay: Option<Grant>) {
        let started = std::time::Instant::now();
        let decided = {
            let (catalog, kinds, spec, keys, arrival) = (
                self.ctx.catalog.clone(),
                self.ctx.kinds.clone(),
                self.spec.clone(),
                self.ctx.keys.clone(),
                self.arrival(replay),
            );
            self.ctx
                .store
                .transact(move |tx| {
                    apply::decide_and_run(tx, &catalog, &kinds, &spec, &keys.sessions, &arrival)
                })
                .await
        };
        self.ctx.metrics.handler_took(&self.env.kind, started.elapsed());
        let error = match decided {
            Ok(d) => return self.settle_decided(d).await,
            Err(ApplyError::Retry(e)) => e,
            Err(ApplyError::Storage(StorageError::Panicked(m))) => format!("panic: {m}"),
            // Data that cannot be read (altered or damaged) will not read better later: count
            // the attempt, so that the job is dead-lettered instead of coming back forever.
            Err(ApplyError::Storage(e @ (StorageError::Crypto(_) | StorageError::Corrupt(_)))) => {
                tracing::warn!(error = %e, "stored data the job needs cannot be read");
                format!("stored data cannot be read: {e}")
            }
            Err(ApplyError::Storage(e)) => {
                // Nothing was decided or counted (busy, disk trouble): try the delivery again.
                tracing::warn!(error = %e, "could not decide the job; requeueing");
                return requeue_after_pause(self.ctx, self.delivery).await;
            }
        };
        let (id, client, e) = (self.env.id.clone(), self.env.client.clone(), error.clone());
        match self.ctx.store.transact(move |tx| tx.record_failed_attempt(&id, &client, &e)).await {
            Ok(attempt) => self.retry_or_dead(attempt, error).await,
            Err(se) => {
                tracing::warn!(error = %se, "could not record the failed attempt; requeueing");
                requeue_after_pause(self.ctx, self.delivery).await;
            }
        }
    }

    /// Counts the attempt and runs it, alone if it is a suspect. The isolation lock is taken
    /// before the attempt is counted: a job that waits here while a suspect crashes the process
    /// has not started and is not charged.
    async fn run_isolated(&self, suspect: bool, holder: crate::leases::Holder) {
        let (_alone, _shared);
        if suspect {
            tracing::warn!("previous attempt was interrupted by a crash: running it alone");
            _alone = self.ctx.isolation.write().await;
        } else {
            _shared = self.ctx.isolation.read().await;
        }
        // Capacity first (a stream kind's process slot): waiting for it is not the attempt's.
        let reservation = match self.ctx.kinds.registry.get(&self.env.kind) {
            Some(Handler::External(h)) => h.reserve(&self.env.client).await,
            _ => None,
        };
        let begun = {
            let (spec, env, target) = (self.spec.clone(), self.env.clone(), self.target.clone());
            self.ctx.store.transact(move |tx| apply::begin(tx, &spec, &env, &target)).await
        };
        let started = match begun {
            Ok(Ok(started)) => started,
            Ok(Err(decided)) => return self.settle_decided(decided).await,
            Err(e) => {
                tracing::warn!(error = %e, "could not count the attempt; requeueing");
                return requeue_after_pause(self.ctx, self.delivery).await;
            }
        };
        let (ctx, spec, env) = (self.ctx, &self.spec, &self.env);
        let attempt = started.attempt;
        let began = std::time::Instant::now();
        // A singleton job's lease was taken with its turn: handed off at once.
        let leased = self.spec.singleton || self.spec.singleton_key.is_some();
        let ran = {
            let running = run(ctx, spec, env, &self.target, started, reservation, &holder);
            tokio::pin!(running);
            // A long job's delivery is acked after a while, its message held in storage
            // instead (see [`crate::leases`]); if that hold cannot be kept, the handler stops
            // (its task is aborted when `running` is dropped).
            let tag = self.delivery.delivery_tag;
            tokio::select! {
                biased;
                ran = &mut running => ran,
                crate::leases::LeaseLost = crate::leases::hold(ctx, tag, &env.id, self.data, &holder, leased) => {
                    Err(Failure::LeaseLost)
                }
            }
        };
        ctx.metrics.handler_took(&env.kind, began.elapsed());
        match ran {
            Ok(answers) => finish(ctx, self.delivery, &self.env.kind, &answers).await,
            Err(Failure::Retry(error)) => self.failed(attempt, error).await,
            Err(Failure::LeaseLost) => {
                // Acked at hand-off; the job goes back to its queue when the lease runs out.
                ctx.handed_off
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .remove(&self.delivery.delivery_tag);
                tracing::warn!(
                    "a long job's lease could not be kept (storage unreachable): its handler is stopped, and the job runs again once the lease has run out"
                );
            }
        }
    }

    /// A retryable failure of an attempt counted before it ran: record why, then retry or
    /// dead-letter.
    async fn failed(&self, attempt: u32, error: String) {
        let (id, e) = (self.env.id.clone(), error.clone());
        if let Err(se) = self.ctx.store.transact(move |tx| tx.fail_attempt(&id, &e)).await {
            tracing::warn!(error = %se, "could not record the failed attempt");
        }
        self.retry_or_dead(attempt, error).await;
    }

    /// Retry with backoff, or dead-letter when attempts are used up.
    async fn retry_or_dead(&self, attempt: u32, error: String) {
        let (ctx, delivery, data, class, spec, env) =
            (self.ctx, self.delivery, self.data, self.class, &self.spec, &self.env);
        // The class, never the text (it can quote the payload; the owner reads it in the status).
        let error_class = handlers::error_class(&error);
        tracing::warn!(attempt, max_attempts = spec.max_attempts, error = error_class, "attempt failed");
        if attempt >= spec.max_attempts {
            let dead = Dead { reason: "max_attempts", error: Some(error), attempts: attempt };
            return dead_letter(ctx, delivery, data, class, Some((env, &self.target)), dead).await;
        }
        let delay = spec.retry_backoff_ms.saturating_mul(1 << (attempt - 1).min(20)).min(MAX_RETRY_DELAY_MS);
        let retried = async {
            let queue = retry_queue(ctx, class, delay).await?;
            let props = without_replay(&delivery.properties);
            ctx.publisher.publish_persistent(&ctx.topology.retry_exchange(), &queue, data, props).await?;
            Ok::<_, gatehouse_broker::PublishError>(())
        };
        match retried.await {
            Ok(()) => {
                tracing::info!(delay_ms = delay, "retry scheduled");
                ctx.metrics.retried(&env.kind);
                let mut status = JobStatus::new(env.id.clone(), JobState::Retrying);
                status.error = Some(error);
                reply::send(ctx, &self.target, &status).await;
                settle(ctx, delivery, Settle::Ack).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not schedule the retry; requeueing");
                requeue_after_pause(ctx, delivery).await;
            }
        }
    }

    async fn settle_decided(&self, decided: Decided) {
        match decided {
            Decided::Done(answers) => finish(self.ctx, self.delivery, &self.env.kind, &answers).await,
            Decided::OverCap(cap) => {
                let error = Some(format!(
                    "{} already has {} {}",
                    self.env.client,
                    cap.of(&self.ctx.caps),
                    cap.holding()
                ));
                let dead = Dead { reason: cap.reason(), error, attempts: 0 };
                let job = Some((&self.env, &self.target));
                dead_letter(self.ctx, self.delivery, self.data, self.class, job, dead).await;
            }
            Decided::ReplayRefused => {
                tracing::warn!("replay refused: its grant is for an earlier dead letter of the job");
                let dead = Dead { reason: "replay_refused", error: None, attempts: 0 };
                dead_letter(self.ctx, self.delivery, self.data, self.class, None, dead).await;
            }
            Decided::Exhausted { attempts, last_error } => {
                let error = last_error.unwrap_or_else(|| "the worker stopped while running it".into());
                let dead = Dead { reason: "max_attempts", error: Some(error), attempts };
                let job = Some((&self.env, &self.target));
                dead_letter(self.ctx, self.delivery, self.data, self.class, job, dead).await;
            }
        }
    }
}

/// How an external handler's attempt failed to end in a recorded outcome.
enum Failure {
    /// Retryable: the text says why.
    Retry(String),
    /// Its lease was lost (see [`crate::leases`]): another attempt runs the job; nothing of
    /// this one is recorded.
    LeaseLost,
}

impl From<String> for Failure {
    fn from(e: String) -> Self {
        Self::Retry(e)
    }
}

/// Aborts a spawned task when dropped (the attempt was given up).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs an external handler (outside storage) for attempt `attempt`, with its timeout, then
/// records its outcome, fenced by `holder`'s lease once the job was handed off.
async fn run(
    ctx: &Context,
    spec: &KindSpec,
    env: &JobEnvelope,
    target: &ReplyTarget,
    started: apply::Started,
    reservation: Option<handlers::Reservation>,
    holder: &crate::leases::Holder,
) -> Result<Vec<Answer>, Failure> {
    // The worker's own schema check first: an invalid payload is never run.
    let checked = handlers::revalidate(&ctx.kinds.schemas, env);
    let handler = match (checked, ctx.kinds.registry.get(&env.kind)) {
        (Some(invalid), _) => return record(ctx, env, target, invalid, holder).await,
        (None, Some(Handler::External(h))) => h.clone(),
        (None, _) => {
            let missing = Outcome::Permanent(format!("{} has no external handler in this worker", env.kind));
            return record(ctx, env, target, missing, holder).await;
        }
    };
    let timeout = Duration::from_millis(spec.timeout_ms);
    let registration = ctx.running.register(&env.id);
    let mut cancelled = registration.cancelled.clone();
    let attempt = handlers::Attempt {
        number: started.attempt,
        timeout,
        stop: ctx.stop.clone(),
        cancel: cancelled.clone(),
        progress: ctx.progress.clone(),
        store: ctx.store.clone(),
        checkpoint: started.checkpoint,
        reservation,
    };
    let job = handlers::external_context(env, attempt);
    // Its own task: a panic is caught there, and at the deadline (or a grace period after a
    // cancellation) the task (the handler's future) is dropped.
    let task = tokio::spawn(handler.run(job, env.payload.clone()));
    let abort = task.abort_handle();
    // Given up (the lease lost, the worker stopping): the handler goes too.
    let _abort = AbortOnDrop(task.abort_handle());
    let given_up = async {
        let _ = cancelled.wait_for(|c| *c).await;
        tokio::time::sleep(crate::cancel::GRACE + Duration::from_secs(1)).await;
    };
    let ended = tokio::select! {
        ended = tokio::time::timeout(timeout, task) => ended,
        () = given_up => {
            abort.abort();
            return record(ctx, env, target, Outcome::Cancelled, holder).await;
        }
    };
    let was_cancelled = *registration.cancelled.borrow();
    let outcome = match ended {
        Err(_) => {
            abort.abort();
            return Err(retry(ctx, env, holder, format!("timed out after {} ms", spec.timeout_ms)).await);
        }
        Ok(Err(join)) if join.is_panic() => {
            let e = format!("panic: {}", panic_message(&*join.into_panic()));
            return Err(retry(ctx, env, holder, e).await);
        }
        Ok(Err(join)) => return Err(retry(ctx, env, holder, format!("handler stopped: {join}")).await),
        // Cancelled: not worth another attempt (recorded as cancelled).
        Ok(Ok(Outcome::Retryable(_))) if was_cancelled => Outcome::Cancelled,
        Ok(Ok(Outcome::Retryable(e))) => return Err(retry(ctx, env, holder, e).await),
        Ok(Ok(outcome)) => outcome,
    };
    drop(registration);
    record(ctx, env, target, outcome, holder).await
}

/// A retryable failure, unless the attempt's lease is lost (see [`crate::leases`]).
async fn retry(ctx: &Context, env: &JobEnvelope, holder: &crate::leases::Holder, error: String) -> Failure {
    let Some(token) = holder.fence().map(str::to_owned) else { return Failure::Retry(error) };
    let id = env.id.clone();
    match ctx.store.transact(move |tx| tx.holds_lease(&id, &token)).await {
        Ok(false) => Failure::LeaseLost,
        _ => Failure::Retry(error),
    }
}

/// Records an external handler's decided outcome (and runs the parked successors it releases),
/// in the same transaction as the check that a handed-off attempt still holds its lease.
async fn record(
    ctx: &Context,
    env: &JobEnvelope,
    target: &ReplyTarget,
    outcome: Outcome,
    holder: &crate::leases::Holder,
) -> Result<Vec<Answer>, Failure> {
    let (catalog, kinds, keys, env, target) =
        (ctx.catalog.clone(), ctx.kinds.clone(), ctx.keys.clone(), env.clone(), target.clone());
    let fence = holder.fence().map(str::to_owned);
    ctx.store
        .transact(move |tx| {
            if let Some(token) = &fence
                && !tx.holds_lease(&env.id, token)?
            {
                return Ok(None);
            }
            let run = apply::Run { catalog: &catalog, kinds: &kinds, sessions: &keys.sessions };
            run.record_outcome(tx, &env, outcome, &target).map(Some)
        })
        .await
        .map_err(|e| Failure::Retry(format!("storage: {e}")))?
        .ok_or(Failure::LeaseLost)
}

async fn retry_queue(
    ctx: &Context,
    class: &str,
    delay_ms: u64,
) -> Result<String, gatehouse_broker::PublishError> {
    let name = ctx.topology.retry_queue(class, delay_ms);
    let known = ctx.retry_queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains(&name);
    if !known {
        let replicated = ctx.catalog.class_of_route(class).is_some_and(|q| !q.lanes().is_empty());
        ctx.topology.declare_retry_queue(ctx.publisher.channel(), class, delay_ms, replicated).await?;
        ctx.retry_queues.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(name.clone());
    }
    Ok(name)
}

/// Why a message goes to the dead-letter queue.
pub struct Dead {
    pub reason: &'static str,
    pub error: Option<String>,
    pub attempts: u32,
}

/// Publishes the original message to `gatehouse.dead` with reason headers (confirmed), records
/// the job as dead-lettered, answers, and only then acks.
async fn dead_letter(
    ctx: &Context,
    delivery: &Delivery,
    data: &[u8],
    class: &str,
    job: Option<(&JobEnvelope, &ReplyTarget)>,
    dead: Dead,
) {
    let id = job.map(|(e, _)| e.id.to_string()).or_else(|| claimed_id(data));
    let mut props = without_replay(&delivery.properties);
    if let Some(id) = id.as_deref().filter(|_| props.message_id().is_none()) {
        props = props.with_message_id(id.into());
    }
    let mut props = dead_properties(props, &ctx.topology, class, &dead);
    if let Some((env, _)) = job {
        match with_dead_count(ctx, props, &env.id).await {
            Ok(counted) => props = counted,
            Err(e) => {
                tracing::warn!(error = %e, "could not count the dead letter; requeueing");
                return requeue_after_pause(ctx, delivery).await;
            }
        }
    }
    if let Err(e) = ctx.publisher.publish_persistent(&ctx.topology.dead_exchange(), "", data, props).await {
        tracing::warn!(error = %e, "could not dead-letter; requeueing");
        return requeue_after_pause(ctx, delivery).await;
    }
    ctx.metrics.dead_lettered(Event {
        at_ms: crate::keys::now_ms(),
        event: "dead_lettered",
        job_id: id,
        kind: job.map(|(e, _)| e.kind.clone()),
        queue: Some(class.to_owned()),
        reason: Some(dead.reason.to_owned()),
        attempts: Some(dead.attempts),
    });
    tracing::warn!(
        reason = dead.reason,
        attempts = dead.attempts,
        error = dead.error.as_deref().map(handlers::error_class),
        "dead-lettered"
    );
    if let Some((env, target)) = job {
        let (env, reason, error) = (env.clone(), dead.reason, dead.error);
        match ctx.store.transact(move |tx| apply::record_dead(tx, &env, reason, error)).await {
            Ok(status) => reply::send(ctx, target, &status).await,
            Err(e) => tracing::warn!(error = %e, "could not record the dead letter"),
        }
    }
    settle(ctx, delivery, Settle::Ack).await;
}

/// A verified job's dead letter: its id and which of its dead letters this is, for a replay
/// grant to name. Counted before the dead letter is published: one that is then not published
/// only moves the count on.
///
/// # Errors
/// When storage cannot count it (the caller requeues the delivery).
pub async fn with_dead_count(
    ctx: &Context,
    props: BasicProperties,
    id: &JobId,
) -> Result<BasicProperties, StorageError> {
    let jid = id.clone();
    let count = ctx.store.transact(move |tx| tx.count_dead_letter(&jid)).await?;
    let mut h = props.headers().clone().unwrap_or_default();
    h.insert(headers::JOB_ID.into(), AMQPValue::LongString(LongString::from(id.as_str())));
    h.insert(headers::DEAD_COUNT.into(), AMQPValue::LongUInt(count));
    Ok(props.with_headers(h))
}

/// The job id a message that could not be opened claims in its body, unverified: a label that
/// lets an operator find its dead letter (a replay is verified like any delivery). Only a
/// well-formed id: anything else could not even travel as a property.
fn claimed_id(data: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Claimed {
        id: JobId,
    }
    let vouched = Vouched::parse(data).ok()?;
    serde_json::from_slice::<Claimed>(vouched.message()).ok().map(|c| c.id.to_string())
}

/// Properties of a dead letter: the original ones plus the reason headers.
pub fn dead_properties(
    props: BasicProperties,
    topology: &Topology,
    class: &str,
    dead: &Dead,
) -> BasicProperties {
    let mut h = props.headers().clone().unwrap_or_default();
    let s = |v: &str| AMQPValue::LongString(LongString::from(v));
    h.insert(headers::REASON.into(), s(dead.reason));
    h.insert(headers::ATTEMPTS.into(), AMQPValue::LongUInt(dead.attempts));
    // Its class only: the text can quote the payload, and the broker is not trusted with it.
    h.insert(headers::LAST_ERROR.into(), s(dead.error.as_deref().map_or("", handlers::error_class)));
    h.insert(headers::ORIGINAL_QUEUE.into(), s(&topology.job_queue(class)));
    h.insert(headers::QUEUE_CLASS.into(), s(class));
    h.insert(headers::DEAD_AT.into(), AMQPValue::LongLongInt(now_ms()));
    props.with_headers(h)
}

/// The properties without the replay marker (a replay resets attempts once, not on every
/// retry).
fn without_replay(props: &BasicProperties) -> BasicProperties {
    let Some(h) = props.headers() else {
        return props.clone();
    };
    let mut kept = FieldTable::default();
    for (k, v) in h.inner() {
        if k.as_str() != headers::REPLAY {
            kept.insert(k.clone(), v.clone());
        }
    }
    props.clone().with_headers(kept)
}

/// Checks what the broker says about a delivery against what the gatekeeper vouched for: it
/// came from its kind's queue, at its vouched priority (a copy re-published at priority 9 or
/// into another class's queue would otherwise run early); and a replay marker carries an
/// operator's grant for exactly this body and job. Answers the grant (the dead letter it is for).
fn check_delivery(
    ctx: &Context,
    class: &str,
    delivery: &Delivery,
    data: &[u8],
    env: &JobEnvelope,
) -> Result<Option<Grant>, Refusal> {
    // Its class's queue, or for quorum lanes the lane of its priority.
    let queue_ok =
        ctx.catalog.kind(&env.kind).is_none_or(|k| ctx.catalog.route(k, env.priority.get()) == class);
    let priority = delivery.properties.priority().unwrap_or(0);
    if !queue_ok || priority != env.priority.get() {
        tracing::warn!(job_id = %env.id, queue = class, priority, vouched = env.priority.get(), "delivery metadata differs from the vouched job");
        return Err(Refusal::Misrouted);
    }
    let grant = delivery.properties.headers().as_ref().and_then(|h| h.inner().get(headers::REPLAY).cloned());
    let Some(grant) = grant else { return Ok(None) };
    let grant = match grant {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        _ => String::new(),
    };
    match ctx.keys.check_replay(&grant, env.id.as_str(), data) {
        Ok(grant) => Ok(Some(grant)),
        Err(e) => {
            tracing::warn!(job_id = %env.id, error = %e, "replay without a valid operator grant");
            Err(Refusal::ReplayRefused)
        }
    }
}

async fn finish(ctx: &Context, delivery: &Delivery, kind: &str, answers: &[Answer]) {
    for a in answers {
        // Counted once decided; parked, scheduled and waiting jobs are counted when they are.
        if a.status.status.is_final() {
            ctx.metrics.decided(kind, a.status.status.as_str(), a.status.id.as_str());
        }
        tracing::debug!(job_id = %a.status.id, status = a.status.status.as_str(), "job decided");
        reply::send(ctx, &a.target, &a.status).await;
    }
    settle(ctx, delivery, Settle::Ack).await;
}

/// Answers one status query from the gatekeeper.
pub async fn handle_control(ctx: Arc<Context>, delivery: Delivery) {
    let vouched = Vouched::parse(&delivery.data).ok();
    let query = vouched
        .filter(|v| v.verify(|id, s| ctx.keys.sessions.get(id, s)).is_ok())
        .and_then(|v| Some((serde_json::from_slice::<ControlRequest>(v.message()).ok()?, v)));
    match query {
        Some((ControlRequest::Cancel { id, client, sent_at_ms, reply }, vouched))
            if WorkerKeys::is_fresh(sent_at_ms, CONTROL_MAX_AGE) =>
        {
            let target = ReplyTarget::new(Some(reply), &client, &vouched);
            let job = id.clone();
            match ctx.store.transact(move |tx| apply::cancel(tx, &job, &client)).await {
                Ok(status) => {
                    if status.status == JobState::Running && ctx.running.cancel(&id) {
                        tracing::info!(job_id = %id, "running job cancelled: its handler is told to stop");
                    }
                    reply::send(&ctx, &target, &status).await;
                }
                Err(e) => tracing::warn!(error = %e, "cancellation failed"),
            }
        }
        Some((ControlRequest::Status { id, client, sent_at_ms, reply, minted_at_ms }, vouched))
            if WorkerKeys::is_fresh(sent_at_ms, CONTROL_MAX_AGE) =>
        {
            let target = ReplyTarget::new(Some(reply), &client, &vouched);
            answer_query(&ctx, &target, id, client, minted_at_ms, None).await;
        }
        Some((ControlRequest::Events { id, client, after, sent_at_ms, reply, minted_at_ms }, vouched))
            if WorkerKeys::is_fresh(sent_at_ms, CONTROL_MAX_AGE) =>
        {
            let target = ReplyTarget::new(Some(reply), &client, &vouched);
            answer_query(&ctx, &target, id, client, minted_at_ms, Some(after)).await;
        }
        _ => tracing::warn!("unsigned, stale or undecodable control message dropped"),
    }
    // Queries are cheap to repeat and expire anyway: always ack (on their own channel).
    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
        tracing::warn!(error = %e, "could not ack a status query");
    }
}

/// Answers a status query, and with `events_after` the job's state transitions after that
/// number too.
async fn answer_query(
    ctx: &Context,
    target: &ReplyTarget,
    id: JobId,
    client: String,
    minted_at_ms: Option<u64>,
    events_after: Option<u64>,
) {
    // A job this old that storage does not know can never run (its message is stale): its
    // record was pruned, or it was lost before it ran.
    let max_age = ctx.keys.max_message_age;
    let expired =
        minted_at_ms.is_some_and(|at| crate::keys::now_ms().saturating_sub(at) > max_age.as_millis() as u64);
    let answer = ctx
        .store
        .transact(move |tx| {
            let mut s = apply::status_for(tx, &id, &client)?;
            if let Some(after) = events_after {
                s.events = Some(tx.job_events(&id, &client, after, EVENTS_PER_ANSWER)?);
            }
            Ok::<_, StorageError>(s)
        })
        .await
        .map(|mut s| {
            if s.status == JobState::NotFound && expired {
                s.status = JobState::Expired;
            }
            s
        });
    match answer {
        Ok(status) => reply::send(ctx, target, &status).await,
        Err(e) => tracing::warn!(error = %e, "status query failed"),
    }
}

/// Most state transitions in one answer to an events query (the stream asks again for more).
const EVENTS_PER_ANSWER: u32 = 100;

async fn requeue_after_pause(ctx: &Context, delivery: &Delivery) {
    tokio::time::sleep(TROUBLE_PAUSE).await;
    settle(ctx, delivery, Settle::Requeue).await;
}

/// The ways a delivery ends.
#[derive(Debug, Clone, Copy)]
pub enum Settle {
    Ack,
    Requeue,
}

/// Settles a job delivery: an ack goes through the channel's batched [`Acks`], a requeue is
/// sent at once. A failure here means the channel is gone, and with it the delivery: the
/// broker will redeliver it, and the job id makes that harmless.
pub async fn settle(ctx: &Context, delivery: &Delivery, how: Settle) {
    let handed_off = ctx
        .handed_off
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .remove(&delivery.delivery_tag);
    if let Some((id, holder)) = handed_off {
        // Acked at hand-off: what replaces it (outcome, retry, dead letter) is durable now, so
        // its held message goes; on a requeue it stays, and comes back when its lease runs out.
        return crate::leases::ended(ctx, id, holder, how).await;
    }
    match how {
        Settle::Ack => ctx.acks.ack(delivery.delivery_tag),
        Settle::Requeue => {
            let requeue = BasicNackOptions { requeue: true, ..Default::default() };
            if let Err(e) = delivery.acker.nack(requeue).await {
                tracing::warn!(error = %e, "could not requeue a delivery; the broker will redeliver it");
            }
            ctx.acks.settled_elsewhere(delivery.delivery_tag);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::claimed_id;

    fn vouched(message: &str) -> Vec<u8> {
        format!(r#"{{"v":1,"key_id":"k","session":"s","mac":"m","message":{message}}}"#).into_bytes()
    }

    #[test]
    fn a_dead_letter_is_labelled_only_with_a_well_formed_claimed_id() {
        let id = "0192f3a4b5c6d7e8f9a0b1c2d3e4f5a6";
        assert_eq!(
            claimed_id(&vouched(&format!(r#"{{"id":"{id}","kind":"vault.put"}}"#))).as_deref(),
            Some(id)
        );
        // Longer than an AMQP short string (255 bytes) may be: the dead letter could not be
        // published, and the message would come back forever.
        let long = "a".repeat(300);
        assert_eq!(claimed_id(&vouched(&format!(r#"{{"id":"{long}"}}"#))), None);
        assert_eq!(claimed_id(&vouched(r#"{"id":5}"#)), None);
        assert_eq!(claimed_id(br#"{"id":"0192f3a4b5c6d7e8f9a0b1c2d3e4f5a6"}"#), None, "not vouched for");
    }
}
