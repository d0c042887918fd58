//! A job delivery, start to settle: opened and checked, decided in storage, run (storage
//! kinds inside the decision, external kinds isolated and counted first), then settled.

use gatehouse_broker::lapin::message::Delivery;
use gatehouse_protocol::clock::now_ms;
use gatehouse_protocol::replay::Grant;
use gatehouse_protocol::{JobEnvelope, KindSpec};
use gatehouse_storage::StorageError;
use tracing::Instrument;

use super::Ctx;
use super::checks::check_delivery;
use super::lease::{self, Holder, LeaseLost};
use super::run::{self, Failure};
use super::settle::{self, Carried, act, requeue_after_pause};
use crate::decide::{self, ApplyError, Arrival, Dead, Step, TurnLease, Verdict};
use crate::handlers::Handler;
use crate::reasons::DeadReason;
use crate::security::{Opened, ReplyTarget};

/// Handles one job delivery from the queue of `route`, start to settle.
pub async fn handle_job(ctx: Ctx, route: String, mut delivery: Delivery) {
    let data = std::mem::take(&mut delivery.data);
    // Nothing unsigned, forged, stale, misrouted or replayed without an operator's grant runs,
    // or even gets parsed beyond what checking needs.
    let checked = ctx.shared.keys.open(&data).and_then(|opened| match opened {
        Opened::Job(env, target) => {
            let replay = check_delivery(&ctx.shared, &route, &delivery, &data, &env)?;
            Ok(Ok((env, target, replay)))
        }
        Opened::Batch(batch) => Ok(Err(batch)),
    });
    let checked = match checked {
        Ok(Err(batch)) => {
            let carried = Carried { delivery: &delivery, data: &data, route: &route, job: None };
            return super::batch::handle_batch(&ctx, &carried, batch).await;
        }
        Ok(Ok(job)) => Ok(job),
        Err(reason) => Err(reason),
    };
    let (env, target, replay) = match checked {
        Ok(checked) => checked,
        Err(reason) => {
            tracing::warn!(%reason, "job message refused");
            let carried = Carried { delivery: &delivery, data: &data, route: &route, job: None };
            let dead = Dead::unrecorded(reason, None);
            return act(&ctx, &carried, Verdict::DeadLetter(dead)).await;
        }
    };
    let trace_id = env.trace_id.as_deref().unwrap_or("");
    let span = tracing::info_span!("job", job_id = %env.id, kind = %env.kind, client = %env.client, trace_id);
    // Exported spans (OTLP) continue the gatekeeper's span of the request.
    if let (Some(trace_id), Some(span_id)) = (&env.trace_id, &env.span_id) {
        gatehouse_broker::telemetry::continue_trace(&span, trace_id, span_id);
    }
    async move {
        let _one_at_a_time = ctx.shared.job_locks.lock(&env.id).await;
        let carried = Carried { delivery: &delivery, data: &data, route: &route, job: Some((&env, &target)) };
        let spec = ctx.shared.catalog.kind(&env.kind).filter(|k| ctx.shared.testing || !k.testing).cloned();
        let Some(spec) = spec else {
            let error = Some(format!("this worker does not run {}", env.kind));
            let dead = Dead { reason: DeadReason::UnknownKind, error, attempts: 0, record: true };
            return act(&ctx, &carried, Verdict::DeadLetter(dead)).await;
        };
        Job { ctx: &ctx, carried: &carried, env: &env, target: &target, spec }.handle(replay).await;
    }
    .instrument(span)
    .await;
}

/// One opened job delivery and what handling it needs.
struct Job<'a> {
    ctx: &'a Ctx,
    carried: &'a Carried<'a>,
    env: &'a JobEnvelope,
    target: &'a ReplyTarget,
    spec: KindSpec,
}

impl Job<'_> {
    fn arrival(&self, replay: Option<Grant>, turn_lease: Option<TurnLease>) -> Arrival {
        Arrival {
            env: self.env.clone(),
            raw: self.carried.data.to_vec(),
            target: self.target.clone(),
            replay,
            caps: self.ctx.shared.caps,
            turn_lease,
        }
    }

    fn delivery(&self) -> &Delivery {
        self.carried.delivery
    }

    /// A singleton job (one at a time per turn) takes a lease with its turn.
    fn is_singleton(&self) -> bool {
        self.spec.running_limit().is_some()
    }

    async fn handle(&self, replay: Option<Grant>) {
        if !self.ctx.shared.kinds.registry.is_external(&self.env.kind) {
            return self.decide_and_run(replay).await;
        }
        // A singleton job's attempt holds a lease from its turn on (see [`super::lease`]).
        let holder = Holder::new();
        let lease_ms = i64::try_from(self.ctx.shared.leases.lease.as_millis()).unwrap_or(i64::MAX);
        let turn_lease = self.is_singleton().then(|| TurnLease {
            holder: holder.token.clone(),
            expires_at_ms: now_ms().saturating_add(lease_ms),
        });
        let prepared = {
            let (spec, arrival) = (self.spec.clone(), self.arrival(replay, turn_lease));
            self.ctx
                .shared
                .store
                .transact_on(decide::probe_of(&spec, self.env), move |tx| {
                    decide::prepare(tx, &spec, &arrival)
                })
                .instrument(tracing::info_span!(target: "gatehouse::spans", "decide"))
                .await
        };
        match prepared {
            Ok(Step::Decided(verdict)) => act(self.ctx, self.carried, verdict).await,
            Ok(Step::Run { suspect }) => self.run_isolated(suspect, holder).await,
            Err(e) => self.requeue(&e).await,
        }
    }

    async fn requeue(&self, e: &StorageError) {
        if !self.ctx.shared.health.saw(e) {
            tracing::warn!(error = %e, "could not decide the job; requeueing");
        }
        requeue_after_pause(self.ctx, self.delivery()).await;
    }

    /// A storage kind: the whole decision and effect in one transaction (one share of a group
    /// commit). Its handler runs on the storage thread, where a panic is caught: nothing it
    /// does can take the process down, so it needs no crash isolation.
    async fn decide_and_run(&self, replay: Option<Grant>) {
        let shared = &self.ctx.shared;
        let started = std::time::Instant::now();
        let decided = {
            let (catalog, kinds, spec, keys, arrival) = (
                shared.catalog.clone(),
                shared.kinds.clone(),
                self.spec.clone(),
                shared.keys.clone(),
                self.arrival(replay, None),
            );
            shared
                .store
                .transact_on(decide::probe_of(&spec, self.env), move |tx| {
                    decide::decide_and_run(tx, &catalog, &kinds, &spec, &keys.sessions, &arrival)
                })
                .instrument(tracing::info_span!(target: "gatehouse::spans", "decide and run"))
                .await
        };
        shared.metrics.handler_took(&self.env.kind, started.elapsed());
        let error = match decided {
            Ok(verdict) => return act(self.ctx, self.carried, verdict).await,
            Err(ApplyError::Retry(e)) => e,
            Err(ApplyError::Storage(StorageError::Panicked(m))) => format!("panic: {m}"),
            // Data that cannot be read (altered or damaged) will not read better later: count
            // the attempt, so that the job is dead-lettered instead of coming back forever.
            Err(ApplyError::Storage(e @ (StorageError::Crypto(_) | StorageError::Corrupt(_)))) => {
                tracing::warn!(error = %e, "stored data the job needs cannot be read");
                format!("stored data cannot be read: {e}")
            }
            // The database refuses the job's statements (a constraint they break, a value or a
            // table it does not take) and would refuse them again: count the attempt, as for a
            // handler's retryable error (backoff, then the dead-letter queue: a job that keeps
            // failing never blocks its queue).
            Err(ApplyError::Storage(e)) if e.is_refused_statement() => {
                tracing::warn!(error = %e, "storage refused the job's statements");
                format!("storage refused the job's statements: {e}")
            }
            // Nothing was decided or counted (busy, disk trouble): try the delivery again.
            Err(ApplyError::Storage(e)) => return self.requeue(&e).await,
        };
        let (id, client, e) = (self.env.id.clone(), self.env.client.clone(), error.clone());
        match shared.store.transact(move |tx| tx.record_failed_attempt(&id, &client, &e)).await {
            Ok(attempt) => self.failed_attempt(attempt, error).await,
            Err(se) => self.requeue(&se).await,
        }
    }

    /// Counts the attempt and runs it, alone if it is a suspect. The isolation lock is taken
    /// before the attempt is counted: a job that waits here while a suspect crashes the process
    /// has not started and is not charged.
    async fn run_isolated(&self, suspect: bool, holder: Holder) {
        let shared = &self.ctx.shared;
        let (_alone, _shared);
        if suspect {
            tracing::warn!("previous attempt was interrupted by a crash: running it alone");
            _alone = shared.isolation.write().await;
        } else {
            _shared = shared.isolation.read().await;
        }
        // Capacity first (a stream kind's process slot): waiting for it is not the attempt's.
        let reservation = match shared.kinds.registry.get(&self.env.kind) {
            Some(Handler::External(h)) => h.reserve(&self.env.client).await,
            _ => None,
        };
        let begun = {
            let (spec, env, target) = (self.spec.clone(), self.env.clone(), self.target.clone());
            shared
                .store
                .transact(move |tx| decide::begin(tx, &spec, &env, &target))
                .instrument(tracing::info_span!(target: "gatehouse::spans", "begin attempt"))
                .await
        };
        let started = match begun {
            Ok(Ok(started)) => started,
            Ok(Err(verdict)) => return act(self.ctx, self.carried, verdict).await,
            Err(e) => return self.requeue(&e).await,
        };
        let attempt = started.attempt;
        let began = std::time::Instant::now();
        let ran = {
            let running = run::run(
                self.ctx,
                run::Attempt {
                    spec: &self.spec,
                    env: self.env,
                    target: self.target,
                    started,
                    reservation,
                    holder: &holder,
                },
            )
            .instrument(tracing::info_span!(target: "gatehouse::spans", "run", attempt));
            tokio::pin!(running);
            // A long job's delivery is acked after a while, its message held in storage
            // instead (see [`super::lease`]); if that hold cannot be kept, the handler stops
            // (its task is aborted when `running` is dropped). A singleton job's lease was
            // taken with its turn: handed off at once.
            let tag = self.delivery().delivery_tag;
            tokio::select! {
                biased;
                ran = &mut running => ran,
                LeaseLost = lease::hold(self.ctx, tag, &self.env.id, self.carried.data, &holder, self.is_singleton()) => {
                    Err(Failure::LeaseLost)
                }
            }
        };
        shared.metrics.handler_took(&self.env.kind, began.elapsed());
        match ran {
            Ok(answers) => act(self.ctx, self.carried, Verdict::Answered(answers)).await,
            Err(Failure::Retry(error)) => self.failed(attempt, error).await,
            Err(Failure::LeaseLost) => {
                // Acked at hand-off; the job goes back to its queue when the lease runs out.
                settle::forget_hand_off(self.ctx, self.delivery().delivery_tag);
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
        if let Err(se) = self.ctx.shared.store.transact(move |tx| tx.fail_attempt(&id, &e)).await
            && !self.ctx.shared.health.saw(&se)
        {
            tracing::warn!(error = %se, "could not record the failed attempt");
        }
        self.failed_attempt(attempt, error).await;
    }

    /// Retry with backoff, or dead-letter when attempts are used up.
    async fn failed_attempt(&self, attempt: u32, error: String) {
        // The class, never the text (it can quote the payload; the owner reads it in the status).
        let class = crate::handlers::error_class(&error);
        tracing::warn!(attempt, max_attempts = self.spec.max_attempts, error = class, "attempt failed");
        act(self.ctx, self.carried, decide::after_failure(&self.spec, attempt, error)).await;
    }
}
