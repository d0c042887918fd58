//! Running an external handler's attempt (outside storage): its own task, its timeout, its
//! cancellation, then its outcome recorded, fenced by the attempt's lease once handed off.

use std::time::Duration;

use gatehouse_protocol::{JobEnvelope, KindSpec};
use gatehouse_storage::{StorageError, panic_message};

use super::Ctx;
use super::lease::Holder;
use crate::decide::{self, Answer, Started};
use crate::handlers::{self, CANCEL_GRACE, Handler, Outcome, Reservation};
use crate::security::ReplyTarget;

/// How an external handler's attempt failed to end in a recorded outcome.
pub enum Failure {
    /// Retryable: the text says why.
    Retry(String),
    /// Its lease was lost (see [`super::lease`]): another attempt runs the job; nothing of
    /// this one is recorded.
    LeaseLost,
}

/// Aborts a spawned task when dropped (the attempt was given up).
struct AbortOnDrop(tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// One attempt of an external handler, as [`run`] needs it.
pub struct Attempt<'a> {
    pub spec: &'a KindSpec,
    pub env: &'a JobEnvelope,
    pub target: &'a ReplyTarget,
    pub started: Started,
    pub reservation: Option<Reservation>,
    pub holder: &'a Holder,
}

/// `context` with what the job is given from storage: an on_complete job its batch, a job of a
/// kind that declares `parent_results` how the jobs it waited for ended.
async fn given(
    shared: &super::Shared,
    env: &JobEnvelope,
    context: handlers::JobContext,
) -> Result<handlers::JobContext, StorageError> {
    if env.completes.is_none() && env.after.is_empty() {
        return Ok(context);
    }
    let (kinds, job) = (shared.kinds.clone(), env.clone());
    let (batch, parents) = shared
        .store
        .read(move |tx| {
            let batch = match &job.completes {
                Some(batch) => tx.batch_of(batch, &job.client, None)?,
                None => None,
            };
            Ok::<_, StorageError>((batch, kinds.parents(tx, &job)?))
        })
        .await?;
    Ok(context.with_batch(batch).with_parents(parents))
}

/// Runs an external handler (outside storage) with its timeout, then records its outcome,
/// fenced by `holder`'s lease once the job was handed off.
pub async fn run(ctx: &Ctx, attempt: Attempt<'_>) -> Result<Vec<Answer>, Failure> {
    let Attempt { spec, env, target, started, reservation, holder } = attempt;
    let shared = &ctx.shared;
    // The worker's own schema check first: an invalid payload is never run.
    let (payload, handler) = match (shared.kinds.payload(env), shared.kinds.registry.get(&env.kind)) {
        (Err(refused), _) => return record(ctx, env, target, refused, holder).await,
        (Ok(payload), Some(Handler::External(h))) => (payload, h.clone()),
        (Ok(_), _) => {
            let missing = Outcome::Permanent(format!("{} has no external handler in this worker", env.kind));
            return record(ctx, env, target, missing, holder).await;
        }
    };
    let timeout = Duration::from_millis(spec.timeout_ms);
    let registration = shared.running.register(&env.id);
    let mut cancelled = registration.cancelled.clone();
    let context = handlers::external_context(
        env,
        handlers::Attempt {
            number: started.attempt,
            timeout,
            stop: shared.stop.clone(),
            cancel: cancelled.clone(),
            progress: shared.progress.clone(),
            store: shared.store.clone(),
            checkpoint: started.checkpoint,
            reservation,
        },
    );
    // Its own task: a panic is caught there, and at the deadline (or a grace period after a
    // cancellation) the task (the handler's future) is dropped.
    let context = match given(shared, env, context).await {
        Ok(context) => context,
        Err(e) => {
            return Err(Failure::Retry(format!("storage: what the job is given could not be read: {e}")));
        }
    };
    let task = tokio::spawn(handler.run(context, payload));
    // Given up (the lease lost, the worker stopping): the handler goes too.
    let abort = AbortOnDrop(task.abort_handle());
    let given_up = async {
        let _ = cancelled.wait_for(|c| *c).await;
        tokio::time::sleep(CANCEL_GRACE + Duration::from_secs(1)).await;
    };
    let ended = tokio::select! {
        ended = tokio::time::timeout(timeout, task) => ended,
        () = given_up => {
            abort.0.abort();
            return record(ctx, env, target, Outcome::Cancelled, holder).await;
        }
    };
    let was_cancelled = *registration.cancelled.borrow();
    drop(registration);
    let outcome = match ended {
        Err(_) => {
            abort.0.abort();
            Err(format!("timed out after {} ms", spec.timeout_ms))
        }
        Ok(Err(join)) if join.is_panic() => Err(format!("panic: {}", panic_message(&*join.into_panic()))),
        Ok(Err(join)) => Err(format!("handler stopped: {join}")),
        // Cancelled: not worth another attempt (recorded as cancelled).
        Ok(Ok(Outcome::Retryable(_))) if was_cancelled => Ok(Outcome::Cancelled),
        Ok(Ok(Outcome::Retryable(e))) => Err(e),
        Ok(Ok(outcome)) => Ok(outcome),
    };
    match outcome {
        Ok(outcome) => record(ctx, env, target, outcome, holder).await,
        Err(error) => Err(retry(ctx, env, holder, error).await),
    }
}

/// A retryable failure, unless the attempt's lease is lost (see [`super::lease`]).
async fn retry(ctx: &Ctx, env: &JobEnvelope, holder: &Holder, error: String) -> Failure {
    let Some(token) = holder.fence().map(str::to_owned) else { return Failure::Retry(error) };
    let id = env.id.clone();
    match ctx.shared.store.transact(move |tx| tx.holds_lease(&id, &token)).await {
        Ok(false) => Failure::LeaseLost,
        _ => Failure::Retry(error),
    }
}

/// Records an external handler's decided outcome (and runs the parked successors it releases),
/// in the same transaction as the check that a handed-off attempt still holds its lease.
async fn record(
    ctx: &Ctx,
    env: &JobEnvelope,
    target: &ReplyTarget,
    outcome: Outcome,
    holder: &Holder,
) -> Result<Vec<Answer>, Failure> {
    let shared = &ctx.shared;
    let (catalog, kinds, keys, env, target) =
        (shared.catalog.clone(), shared.kinds.clone(), shared.keys.clone(), env.clone(), target.clone());
    let fence = holder.fence().map(str::to_owned);
    shared
        .store
        .transact(move |tx| {
            if let Some(token) = &fence
                && !tx.holds_lease(&env.id, token)?
            {
                return Ok(None);
            }
            let run = decide::Run { catalog: &catalog, kinds: &kinds, sessions: &keys.sessions };
            run.record_outcome(tx, &env, outcome.clone(), &target).map(Some)
        })
        .await
        .map_err(|e| Failure::Retry(format!("storage: {e}")))?
        .ok_or(Failure::LeaseLost)
}
