//! The gap timeout: parked jobs whose predecessor has not arrived within the kind's
//! `gap_timeout_s` are dead-lettered with reason `sequence_gap_timeout`. Deadlines live in
//! storage (indexed), so memory stays flat however many jobs are parked, and a restarted worker
//! keeps them.

use std::sync::Arc;
use std::time::Duration;

use gatehouse_broker::lapin::BasicProperties;
use gatehouse_protocol::clock::now_ms;
use gatehouse_protocol::{SealedJob, Vouched};
use gatehouse_storage::Parked;

use super::{CLAIM_MS, Sweep};
use crate::decide::Dead;
use crate::outbound::{Letter, Outbound};
use crate::reasons::DeadReason;
use crate::security::ReplyTarget;

/// How often storage is asked for expired deadlines.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Most parked jobs dead-lettered per sweep.
const SWEEP_BATCH: u32 = 100;

/// Dead-letters parked jobs past their gap timeout.
pub struct Gaps(pub Arc<Outbound>);

impl Sweep for Gaps {
    fn name(&self) -> &'static str {
        "sequence gaps"
    }

    fn pause(&self) -> Duration {
        SWEEP_EVERY
    }

    async fn run_once(&mut self) -> anyhow::Result<()> {
        let out = &self.0;
        let now = now_ms();
        let expired =
            out.store.transact(move |tx| tx.claim_expired_parked(now, now + CLAIM_MS, SWEEP_BATCH)).await?;
        for parked in expired {
            timed_out(out, &parked).await?;
        }
        Ok(())
    }
}

/// Dead-letters one parked job (recorded only if it is still parked by then).
async fn timed_out(out: &Outbound, parked: &Parked) -> anyhow::Result<()> {
    // The metadata is enough to record it; the payload stays sealed. A row that cannot be read
    // (only a damaged database makes one) must not hold up the others.
    let metadata = Vouched::parse(&parked.envelope).map_err(anyhow::Error::from).and_then(|v| {
        let env = serde_json::from_slice::<SealedJob>(v.message())?.metadata();
        let target = ReplyTarget::of(&env, &v);
        Ok((env, target))
    });
    let (env, target) = match metadata {
        Ok(opened) => opened,
        Err(e) => {
            tracing::error!(job_id = %parked.job_id, error = %e, "parked job unreadable; skipped");
            return Ok(());
        }
    };
    let route = out
        .catalog
        .kind(&env.kind)
        .map_or_else(|| "batch".to_owned(), |k| out.catalog.route_in(k, env.priority.get(), env.shard));
    let error = format!(
        "number {} of {} waited past the gap timeout for its predecessor",
        parked.seq_number, parked.seq_key
    );
    let letter = Letter {
        data: &parked.envelope,
        props: BasicProperties::default().with_priority(env.priority.get()),
        route: &route,
        job: Some((&env, &target)),
        parked: Some((&parked.seq_key, parked.seq_number)),
    };
    let dead = Dead { reason: DeadReason::SequenceGapTimeout, error: Some(error), attempts: 0, record: true };
    Ok(out.dead_letter(letter, dead).await?)
}
