//! Delayed jobs: a job with a `not_before` time arrives at once (the gatekeeper publishes it
//! like any other), is recorded `scheduled` and its message kept in storage (`decide`), and
//! is acked. Storage, not a process's memory and not the broker, holds the wait: it survives
//! restarts of every process, costs the broker nothing however long the delay, and needs no
//! broker plugin. Once due, this sweeper sends the kept message back to its job queue (through
//! `gatehouse.requeue`, as retries go), where it runs like any job.

use std::sync::Arc;
use std::time::Duration;

use gatehouse_protocol::clock::now_ms;

use super::{CLAIM_MS, Sweep};
use crate::outbound::Outbound;

/// How often storage is asked for delayed jobs that are due.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Most delayed jobs sent back per sweep.
const SWEEP_BATCH: u32 = 200;

/// Sends delayed jobs that came due back to their queue.
pub struct Delayed(pub Arc<Outbound>);

impl Sweep for Delayed {
    fn name(&self) -> &'static str {
        "delayed"
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
        Ok(())
    }
}
