//! The gap timeout: parked jobs whose predecessor has not arrived within the kind's
//! `gap_timeout_s` are dead-lettered with reason `sequence_gap_timeout`. Deadlines live in
//! storage (indexed), so memory stays flat however many jobs are parked, and a restarted worker
//! keeps them.

use std::time::Duration;

use gatehouse_broker::lapin::BasicProperties;
use gatehouse_protocol::{SealedJob, Vouched};
use gatehouse_storage::now_ms;

use crate::apply;
use crate::consumer::{Context, Dead, dead_properties};
use crate::reply::{self, ReplyTarget};

/// How often storage is asked for expired deadlines.
const SWEEP_EVERY: Duration = Duration::from_secs(1);
/// Most parked jobs dead-lettered per sweep.
const SWEEP_BATCH: u32 = 100;

/// Sweeps until the task is dropped.
pub async fn sweep_forever(ctx: &Context) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    loop {
        tick.tick().await;
        if let Err(e) = sweep_once(ctx).await {
            tracing::warn!(error = %e, "gap sweep failed; trying again");
        }
    }
}

async fn sweep_once(ctx: &Context) -> anyhow::Result<()> {
    let now = now_ms();
    let claim = now + crate::delays::CLAIM_MS;
    let expired = ctx.store.transact(move |tx| tx.claim_expired_parked(now, claim, SWEEP_BATCH)).await?;
    for parked in expired {
        // The metadata is enough to record it; the payload stays sealed. A row that cannot be
        // read (only a damaged database makes one) must not hold up the others.
        let metadata = Vouched::parse(&parked.envelope).map_err(anyhow::Error::from).and_then(|v| {
            let env = serde_json::from_slice::<SealedJob>(v.message())?.metadata();
            let target = ReplyTarget::of(&env, &v);
            Ok((env, target))
        });
        let (env, target) = match metadata {
            Ok(opened) => opened,
            Err(e) => {
                tracing::error!(job_id = %parked.job_id, error = %e, "parked job unreadable; skipped");
                continue;
            }
        };
        let class = ctx
            .catalog
            .kind(&env.kind)
            .map_or_else(|| "batch".to_owned(), |k| ctx.catalog.route(k, env.priority.get()));
        let props = BasicProperties::default()
            .with_message_id(env.id.as_str().into())
            .with_priority(env.priority.get());
        let error = format!(
            "number {} of {} waited past the gap timeout for its predecessor",
            parked.seq_number, parked.seq_key
        );
        let dead = Dead { reason: "sequence_gap_timeout", error: Some(error.clone()), attempts: 0 };
        let props = crate::consumer::with_dead_count(
            ctx,
            dead_properties(props, &ctx.topology, &class, &dead),
            &env.id,
        )
        .await?;
        ctx.publisher.publish_persistent(&ctx.topology.dead_exchange(), "", &parked.envelope, props).await?;
        ctx.metrics.dead_lettered(crate::dashboard::Event {
            at_ms: crate::keys::now_ms(),
            event: "dead_lettered",
            job_id: Some(env.id.to_string()),
            kind: Some(env.kind.clone()),
            queue: Some(class.clone()),
            reason: Some(dead.reason.to_owned()),
            attempts: Some(0),
        });
        let (key, number, env_id) = (parked.seq_key.clone(), parked.seq_number, parked.job_id.clone());
        let status = ctx
            .store
            .transact(move |tx| match tx.lock_sequence(&key).and_then(|()| tx.take_parked(&key, number))? {
                Some(_) => apply::record_dead(tx, &env, "sequence_gap_timeout", Some(error)).map(Some),
                // Its predecessor arrived meanwhile and it applied: the dead letter just sent is
                // stale, and a replay of it is answered from the stored outcome.
                None => Ok(None),
            })
            .await?;
        let Some(status) = status else {
            tracing::warn!(job_id = %env_id, "applied while being dead-lettered; its dead letter is stale");
            continue;
        };
        tracing::warn!(job_id = %status.id, "dead-lettered after the sequence gap timeout");
        reply::send(ctx, &target, &status).await;
    }
    Ok(())
}
