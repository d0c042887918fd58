//! Delayed jobs: a job with a `not_before` time arrives at once (the gatekeeper publishes it
//! like any other), is recorded `scheduled` and its message kept in storage ([`crate::apply`]),
//! and is acked. Storage, not a process's memory and not the broker, holds the wait: it
//! survives restarts of every process, costs the broker nothing however long the delay, and
//! needs no broker plugin. Once due, this sweeper sends the kept message back to its job queue
//! (through `gatehouse.requeue`, as retries go), where it runs like any job. The same sweep
//! sends back the messages of long jobs whose lease ran out ([`crate::leases`]).

use std::time::Duration;

use gatehouse_broker::lapin::BasicProperties;
use gatehouse_protocol::{JobId, SealedJob, Vouched};
use gatehouse_storage::now_ms;

use crate::consumer::Context;

/// How often storage is asked for delayed jobs that are due.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Most delayed jobs sent back per sweep.
const SWEEP_BATCH: u32 = 200;

/// Sweeps until the task is dropped.
pub async fn release_forever(ctx: &Context) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = release_once(ctx).await {
            tracing::warn!(error = %e, "releasing delayed jobs failed; trying again");
        }
    }
}

/// How long a sweep's claim on a held message lasts: several workers sweep the same storage,
/// and only the one that claimed a message sends it; if it dies before it is done, the message
/// is claimed again after this.
pub const CLAIM_MS: i64 = 30_000;

async fn release_once(ctx: &Context) -> anyhow::Result<()> {
    let now = now_ms();
    let due = ctx.store.transact(move |tx| tx.claim_due_scheduled(now, now + CLAIM_MS, SWEEP_BATCH)).await?;
    for (id, envelope) in due {
        if send_back(ctx, &id, &envelope).await? {
            let released = id.clone();
            ctx.store.transact(move |tx| tx.mark_released(&released)).await?;
            tracing::debug!(job_id = %id, "delayed job due: back to its queue");
        }
    }
    crate::leases::release_expired(ctx).await
}

/// Sends a message held in storage back to its job queue, at its vouched priority (both
/// checked again when it arrives). Answers `false` for one that cannot be sent (unreadable, or
/// of a kind no longer in the catalog): it stays held, and an error is logged.
///
/// # Errors
/// When the broker does not confirm it.
pub async fn send_back(ctx: &Context, id: &JobId, envelope: &[u8]) -> anyhow::Result<bool> {
    let metadata = Vouched::parse(envelope)
        .map_err(anyhow::Error::from)
        .and_then(|v| Ok(serde_json::from_slice::<SealedJob>(v.message())?.metadata()));
    let env = match metadata {
        Ok(env) => env,
        Err(e) => {
            tracing::error!(job_id = %id, error = %e, "held job message unreadable; left held");
            return Ok(false);
        }
    };
    let Some(class) = ctx.catalog.kind(&env.kind).map(|k| ctx.catalog.route(k, env.priority.get())) else {
        tracing::error!(job_id = %id, kind = %env.kind, "held job of a kind no longer in the catalog; left held");
        return Ok(false);
    };
    let props = BasicProperties::default().with_priority(env.priority.get());
    ctx.publisher.publish_persistent(&ctx.topology.requeue_exchange(), &class, envelope, props).await?;
    Ok(true)
}
