//! Long jobs whose worker stopped renewing their lease (see `delivery::lease`): their held
//! message goes back to its queue, and the next attempt starts from the last checkpoint.

use std::sync::Arc;
use std::time::Duration;

use gatehouse_protocol::clock::now_ms;

use super::{CLAIM_MS, Sweep};
use crate::outbound::Outbound;

/// How often storage is asked for leases that ran out.
const SWEEP_EVERY: Duration = Duration::from_millis(250);
/// Most expired leases sent back per sweep.
const SWEEP_BATCH: u32 = 200;

/// Sends the messages of leases that ran out back to their queues.
pub struct ExpiredLeases(pub Arc<Outbound>);

impl Sweep for ExpiredLeases {
    fn name(&self) -> &'static str {
        "expired leases"
    }

    fn pause(&self) -> Duration {
        SWEEP_EVERY
    }

    async fn run_once(&mut self) -> anyhow::Result<()> {
        let out = &self.0;
        let now = now_ms();
        let expired =
            out.store.transact(move |tx| tx.claim_expired_leases(now, now + CLAIM_MS, SWEEP_BATCH)).await?;
        for (id, envelope) in expired {
            tracing::warn!(job_id = %id, "a long job's lease ran out (its worker stopped): back to its queue");
            out.send_back(&id, &envelope).await?;
            let ended = id.clone();
            out.store.transact(move |tx| tx.end_lease(&ended, None)).await?;
        }
        Ok(())
    }
}
