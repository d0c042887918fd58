//! A batch delivery: every job of it recorded and held in storage in one transaction, then the
//! delivery acked. The held-messages sweep then sends each job to its own queue, where it is
//! checked and runs like any job (`sweep::held`).

use gatehouse_protocol::batch::BatchMessage;

use super::Ctx;
use super::settle::{Carried, act, finish, requeue_after_pause};
use crate::decide::{self, Dead, Verdict};
use crate::reasons::DeadReason;
use crate::security::Opened;

/// Handles one batch delivery (its message checked already), start to settle.
pub async fn handle_batch(ctx: &Ctx, carried: &Carried<'_>, batch: BatchMessage) {
    let Some(jobs) = decide::jobs_of(&batch) else {
        tracing::warn!(batch = %batch.batch, "a job of the batch does not read: the batch is refused whole");
        let dead = Dead::unrecorded(DeadReason::Undecodable, None);
        return act(ctx, carried, Verdict::DeadLetter(dead)).await;
    };
    // Its on_complete job is opened now (while its session is fresh) and kept with the batch.
    let on_complete = match &batch.on_complete {
        None => None,
        Some(job) => match ctx.shared.keys.open(job.message.as_bytes()) {
            Ok(Opened::Job(env, _))
                if env.id == job.id
                    && env.client == batch.client
                    && env.completes.as_ref() == Some(&batch.batch) =>
            {
                Some(env)
            }
            _ => {
                tracing::warn!(batch = %batch.batch, "the batch's on_complete job does not open: the batch is refused whole");
                let dead = Dead::unrecorded(DeadReason::Undecodable, None);
                return act(ctx, carried, Verdict::DeadLetter(dead)).await;
            }
        },
    };
    let (id, count) = (batch.batch.clone(), jobs.len());
    // Its on_complete job, or its steps, wait for jobs to be decided.
    let carried_waits = on_complete.is_some() || batch.workflow;
    let held = ctx
        .shared
        .store
        .transact(move |tx| decide::hold_batch(tx, &batch, &jobs, on_complete.as_ref()))
        .await;
    match held {
        Ok(held) => {
            tracing::info!(batch = %id, jobs = count, held, "batch recorded; its jobs go to their queues");
            if carried_waits {
                ctx.out.held.waiting(true);
            }
            ctx.out.held.now();
            finish(ctx, carried.delivery, "", &[]).await;
        }
        Err(e) => {
            if !ctx.shared.health.saw(&e) {
                tracing::warn!(batch = %id, error = %e, "could not record the batch; requeueing");
            }
            requeue_after_pause(ctx, carried.delivery).await;
        }
    }
}
