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
//! - **Batches' jobs** (held together when the batch arrives) and a batch's `on_complete` job
//!   (held once every job of the batch is decided).
//! - **Jobs waiting for parents** (`after`, a workflow's steps): made due once every parent is
//!   decided, here, whichever worker decided them; the job's own delivery then decides whether
//!   it runs (`decide::parents`), so a fan-in child is released and run once however its
//!   parents' outcomes raced.

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

    /// Its tick, or sooner when a batch was held or a parent decided here (`HeldWake`).
    async fn until_next(&self) {
        tokio::select! {
            () = tokio::time::sleep(SWEEP_EVERY) => {}
            () = self.0.held.woken() => {}
        }
    }

    async fn run_once(&mut self) -> anyhow::Result<()> {
        let out = &self.0;
        // Batches whose jobs are all decided: their on_complete jobs are held, due now.
        let keys = out.keys.clone();
        out.store
            .transact(move |tx| {
                let make = |env: &gatehouse_protocol::JobEnvelope| keys.own_job(env).ok();
                crate::decide::complete_batches(tx, SWEEP_BATCH, &make)
            })
            .await?;
        // Jobs whose parents are all decided: due now. (While nothing waits for decisions, a
        // decided job does not wake this sweep.)
        let now = now_ms();
        let look = out.held.may_wait();
        let waiting = out
            .store
            .transact(move |tx| {
                tx.release_children(now, SWEEP_BATCH)?;
                if look { tx.waiting_for_decisions() } else { Ok(false) }
            })
            .await?;
        if look && !waiting {
            out.held.waiting(false);
        }
        // Pass after pass while they come full (a batch's jobs, a backlog of delayed ones).
        loop {
            let now = now_ms();
            let claimed_until = now + CLAIM_MS;
            let due =
                out.store.transact(move |tx| tx.claim_due_scheduled(now, claimed_until, SWEEP_BATCH)).await?;
            let full = due.len() == SWEEP_BATCH as usize;
            // Sent at once, each confirmed; released together.
            let sent =
                futures_util::future::join_all(due.iter().map(|(id, envelope)| out.send_back(id, envelope)))
                    .await;
            let mut released = Vec::with_capacity(due.len());
            let mut failed = None;
            for ((id, _), sent) in due.iter().zip(sent) {
                match sent {
                    Ok(true) => released.push(id.clone()),
                    Ok(false) => {}
                    Err(e) => failed = Some(e),
                }
            }
            let n = released.len();
            let release = move |tx: &mut gatehouse_storage::Tx<'_>| {
                released.iter().try_for_each(|id| tx.mark_released(id, claimed_until))
            };
            out.store.transact(release).await?;
            if n > 0 {
                tracing::debug!(jobs = n, "held jobs due: back to their queues");
            }
            if let Some(e) = failed {
                return Err(e);
            }
            if !full {
                break;
            }
        }
        let now = now_ms();
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
