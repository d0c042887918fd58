//! Messages held in storage, sent back to their job queue (through `gatehouse.requeue`, as
//! retries go) when their time comes, to run like any job:
//!
//! - **Delayed jobs.** A job with a `not_before` time arrives at once (the gatekeeper publishes
//!   it like any other), is recorded `scheduled` and its message kept in storage (`decide`),
//!   and is acked. Storage, not a process's memory and not the broker, holds the wait: it
//!   survives restarts of every process, costs the broker nothing however long the delay, and
//!   needs no broker plugin.
//! - **Long jobs whose lease ran out** (their worker stopped renewing it, see
//!   `delivery::lease`): the next attempt starts from the job's last checkpoint.

use std::sync::Arc;
use std::time::Duration;

use gatehouse_protocol::clock::now_ms;
use gatehouse_storage::SENT_BACK;

use super::{CLAIM_MS, Sweep};
use crate::outbound::Outbound;

/// How often storage is asked for held messages whose time came.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Most messages of each sort sent back per pass.
const SWEEP_BATCH: u32 = 200;

/// Sends delayed jobs that came due, and long jobs whose lease ran out, back to their queue.
pub struct Held(pub Arc<Outbound>);

impl Sweep for Held {
    fn name(&self) -> &'static str {
        "held messages"
    }

    fn pause(&self) -> Duration {
        SWEEP_EVERY
    }

    async fn run_once(&mut self) -> anyhow::Result<()> {
        let out = &self.0;
        let now = now_ms();
        let due =
            out.store.transact(move |tx| tx.claim_due_scheduled(now, now + CLAIM_MS, SWEEP_BATCH)).await?;
        for (id, envelope) in due {
            if out.send_back(&id, &envelope).await? {
                let released = id.clone();
                out.store.transact(move |tx| tx.mark_released(&released)).await?;
                tracing::debug!(job_id = %id, "delayed job due: back to its queue");
            }
        }
        let expired =
            out.store.transact(move |tx| tx.claim_expired_leases(now, now + CLAIM_MS, SWEEP_BATCH)).await?;
        for (id, envelope) in expired {
            tracing::warn!(job_id = %id, "a long job's lease ran out (its worker stopped): back to its queue");
            out.send_back(&id, &envelope).await?;
            let ended = id.clone();
            out.store.transact(move |tx| tx.end_lease(&ended, SENT_BACK)).await?;
        }
        Ok(())
    }
}
