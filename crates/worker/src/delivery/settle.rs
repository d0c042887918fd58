//! The one place a job delivery is acked, requeued or handed off, and where a
//! [`Verdict`] becomes broker actions ([`act`]).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use tracing::Instrument as _;

use gatehouse_broker::lapin::message::Delivery;
use gatehouse_broker::lapin::options::{BasicAckOptions, BasicNackOptions};
use gatehouse_protocol::{JobEnvelope, JobId, JobState, JobStatus};

use super::Ctx;
use super::acks::Acks;
use crate::decide::{Answer, Dead, Verdict};
use crate::outbound::Letter;
use crate::security::ReplyTarget;

/// Pause before a delivery that hit trouble goes back to the queue, so that a sick database
/// or broker is not hammered.
const TROUBLE_PAUSE: Duration = Duration::from_millis(500);

/// The job channel's settlements: its batched acks, and the deliveries acked at hand-off.
pub struct JobChannel {
    acks: Acks,
    /// Deliveries acked at hand-off (by tag), with their job and the token of the attempt's
    /// lease.
    handed_off: Mutex<HashMap<u64, (JobId, String)>>,
}

impl JobChannel {
    pub fn new(acks: Acks) -> Self {
        Self { acks, handed_off: Mutex::default() }
    }

    /// A delivery given back unstarted (shutdown): it was requeued already.
    pub fn given_back(&self, tag: u64) {
        self.acks.settled_elsewhere(tag);
    }

    /// Sends every pending ack.
    pub async fn flush(&self) {
        self.acks.flush().await;
    }

    fn handed_off(&self) -> std::sync::MutexGuard<'_, HashMap<u64, (JobId, String)>> {
        self.handed_off.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The ways a delivery ends.
#[derive(Debug, Clone, Copy)]
pub enum Settle {
    Ack,
    Requeue,
}

/// The job a delivery carries, as its verdict needs it: its body and properties, the route it
/// came from, and the verified job (none for a message that could not be opened).
pub struct Carried<'a> {
    pub delivery: &'a Delivery,
    pub data: &'a [u8],
    pub route: &'a str,
    pub job: Option<(&'a JobEnvelope, &'a ReplyTarget)>,
}

/// Acts on `verdict`: answers and acks, retries, or dead-letters, then settles the delivery.
pub async fn act(ctx: &Ctx, carried: &Carried<'_>, verdict: Verdict) {
    let settled = async {
        match verdict {
            Verdict::Answered(answers) => {
                let kind = carried.job.map_or("", |(env, _)| env.kind.as_str());
                finish(ctx, carried.delivery, kind, &answers).await;
            }
            Verdict::Retry { attempt, delay_ms, error } => {
                retry(ctx, carried, attempt, delay_ms, error).await
            }
            Verdict::DeadLetter(dead) => dead_letter(ctx, carried, dead).await,
        }
    };
    settled.instrument(tracing::info_span!(target: "gatehouse::spans", "settle")).await;
}

/// Sends the answers of a decided (or held) job, then acks.
pub async fn finish(ctx: &Ctx, delivery: &Delivery, kind: &str, answers: &[Answer]) {
    for a in answers {
        // Counted once decided; parked, scheduled and waiting jobs are counted when they are.
        if a.status.status.is_final() {
            ctx.shared.metrics.decided(kind, a.status.status.as_str(), a.status.id.as_str());
            ctx.out.held.decided();
        } else if a.status.status == gatehouse_protocol::JobState::WaitingForParents {
            ctx.out.held.waiting(true);
        }
        tracing::debug!(job_id = %a.status.id, status = a.status.status.as_str(), "job decided");
        ctx.out.reply(&a.target, &a.status).await;
    }
    settle(ctx, delivery, Settle::Ack).await;
}

async fn retry(ctx: &Ctx, carried: &Carried<'_>, attempt: u32, delay_ms: u64, error: String) {
    let Some((env, target)) = carried.job else { return requeue_after_pause(ctx, carried.delivery).await };
    let props = &carried.delivery.properties;
    match ctx.out.retry(carried.route, delay_ms, carried.data, props).await {
        Ok(()) => {
            tracing::info!(attempt, delay_ms, "retry scheduled");
            ctx.shared.metrics.retried(&env.kind);
            let mut status = JobStatus::new(env.id.clone(), JobState::Retrying);
            status.error = Some(error);
            ctx.out.reply(target, &status).await;
            settle(ctx, carried.delivery, Settle::Ack).await;
        }
        Err(e) => {
            if ctx.shared.health.refusing().is_none() {
                tracing::warn!(error = %e, "could not schedule the retry; requeueing");
            }
            requeue_after_pause(ctx, carried.delivery).await;
        }
    }
}

async fn dead_letter(ctx: &Ctx, carried: &Carried<'_>, dead: Dead) {
    let letter = Letter {
        data: carried.data,
        props: carried.delivery.properties.clone(),
        route: carried.route,
        // A job recorded as dead-lettered is counted and named; a refused one is only sent on.
        job: carried.job.filter(|_| dead.record),
        parked: None,
    };
    let recorded = dead.record;
    match ctx.out.dead_letter(letter, dead).await {
        Ok(()) => {
            if recorded {
                ctx.out.held.decided();
            }
            settle(ctx, carried.delivery, Settle::Ack).await;
        }
        Err(e) => {
            // Quiet while storage refuses writes: that was said once.
            if ctx.shared.health.refusing().is_none() {
                tracing::warn!(error = %e, "requeueing");
            }
            requeue_after_pause(ctx, carried.delivery).await;
        }
    }
}

/// Trouble before a decision (storage or broker): back to the queue after a pause.
pub async fn requeue_after_pause(ctx: &Ctx, delivery: &Delivery) {
    tokio::time::sleep(TROUBLE_PAUSE).await;
    settle(ctx, delivery, Settle::Requeue).await;
}

/// Settles a job delivery: an ack goes through the channel's batched [`Acks`], a requeue is
/// sent at once. A failure here means the channel is gone, and with it the delivery: the
/// broker will redeliver it, and the job id makes that harmless.
pub async fn settle(ctx: &Ctx, delivery: &Delivery, how: Settle) {
    let handed_off = ctx.channel.handed_off().remove(&delivery.delivery_tag);
    if let Some((id, holder)) = handed_off {
        // Acked at hand-off: what replaces it (outcome, retry, dead letter) is durable now, so
        // its held message goes; on a requeue it stays, and comes back when its lease runs out.
        return super::lease::ended(ctx, id, holder, how).await;
    }
    match how {
        Settle::Ack => ctx.channel.acks.ack(delivery.delivery_tag),
        Settle::Requeue => {
            let requeue = BasicNackOptions { requeue: true, ..Default::default() };
            if let Err(e) = delivery.acker.nack(requeue).await {
                tracing::warn!(error = %e, "could not requeue a delivery; the broker will redeliver it");
            }
            ctx.channel.acks.settled_elsewhere(delivery.delivery_tag);
        }
    }
}

/// Hands a long job's delivery off: acked now, its message held in storage under the lease
/// of `holder` (see [`super::lease`]).
pub fn hand_off(ctx: &Ctx, tag: u64, id: &JobId, holder: &str) {
    ctx.channel.handed_off().insert(tag, (id.clone(), holder.to_owned()));
    ctx.channel.acks.ack(tag);
}

/// A handed-off attempt ended without an outcome of its own (its lease was lost): another
/// attempt will settle the job, so nothing is left to settle here.
pub fn forget_hand_off(ctx: &Ctx, tag: u64) {
    ctx.channel.handed_off().remove(&tag);
}

/// Status queries are cheap to repeat and expire anyway: always acked (on their own channel).
pub async fn settle_control(delivery: &Delivery) {
    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
        tracing::warn!(error = %e, "could not ack a status query");
    }
}
