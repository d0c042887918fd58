//! Long jobs and the broker's delivery timeout. RabbitMQ closes the channel of a consumer that
//! holds a delivery longer than its `consumer_timeout` (30 minutes by default) and redelivers
//! everything that channel held: a job running longer would run twice, and its neighbours'
//! deliveries would come back too. So a job still running after `hand_off_after_ms` is handed
//! off: its message is kept in storage under a lease (table `leases`), then its delivery is
//! acked. While the job runs, the worker renews the lease; when the attempt ends, its lease
//! ends too, once what replaces the delivery (the outcome, a retry, a dead letter) is durable.
//! A worker that dies stops renewing: when the lease runs out, the sweeper sends the held
//! message back to its queue (as [`crate::delays`] does for delayed jobs), and the next attempt
//! starts from the job's last checkpoint ([`crate::handlers::JobContext::checkpoint`]).
//!
//! Short jobs never touch this: no extra write unless a job outlives `hand_off_after_ms`.

use std::time::Duration;

use gatehouse_protocol::JobId;
use gatehouse_storage::now_ms;

use crate::consumer::{Context, Settle};

/// `[consumer] hand_off_after_ms` and `lease_ms`.
#[derive(Debug, Clone, Copy)]
pub struct LeaseSettings {
    /// How long a job runs before its delivery is handed off.
    pub hand_off_after: Duration,
    /// How long a lease lasts unless renewed; renewed every quarter of it.
    pub lease: Duration,
}

/// Most expired leases sent back per sweep.
const SWEEP_BATCH: u32 = 200;

/// Waits `hand_off_after`, hands the job's delivery (`tag`) off, then renews its lease; never
/// returns (dropped when the job's attempt ends).
pub async fn hold(ctx: &Context, tag: u64, id: &JobId, message: &[u8]) {
    tokio::time::sleep(ctx.leases.hand_off_after).await;
    let mut handed_off = false;
    loop {
        let expires = now_ms().saturating_add(ctx.leases.lease.as_millis() as i64);
        let (job, held) = (id.clone(), message.to_vec());
        match ctx.store.transact(move |tx| tx.lease(&job, &held, expires)).await {
            Ok(()) if !handed_off => {
                handed_off = true;
                ctx.handed_off
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .insert(tag, id.clone());
                ctx.acks.ack(tag);
                tracing::info!("long job: its delivery is acked, its message held in storage while it runs");
            }
            Ok(()) => {}
            Err(e) => tracing::warn!(error = %e, "could not keep a long job's lease; trying again"),
        }
        tokio::time::sleep(ctx.leases.lease / 4).await;
    }
}

/// The attempt of a handed-off job ended: with an ack (its outcome, retry or dead letter is
/// durable), its lease ends; with a requeue, the lease is left to run out, and the sweeper
/// sends the message back.
pub async fn ended(ctx: &Context, id: JobId, how: Settle) {
    if let Settle::Ack = how
        && let Err(e) = ctx.store.transact(move |tx| tx.end_lease(&id)).await
    {
        // Harmless: when the lease runs out its message comes back, and the job id dedupes it.
        tracing::warn!(error = %e, "could not end a long job's lease");
    }
}

/// Sends the messages of leases that ran out back to their queues.
///
/// # Errors
/// Storage or broker trouble (the sweep is tried again).
pub async fn release_expired(ctx: &Context) -> anyhow::Result<()> {
    let now = now_ms();
    let claim = now + crate::delays::CLAIM_MS;
    let expired = ctx.store.transact(move |tx| tx.claim_expired_leases(now, claim, SWEEP_BATCH)).await?;
    for (id, envelope) in expired {
        tracing::warn!(job_id = %id, "a long job's lease ran out (its worker stopped): back to its queue");
        crate::delays::send_back(ctx, &id, &envelope).await?;
        let ended = id.clone();
        ctx.store.transact(move |tx| tx.end_lease(&ended)).await?;
    }
    Ok(())
}
