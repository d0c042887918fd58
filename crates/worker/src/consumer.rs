//! The one owner of ack / nack decisions.
//!
//! | what happened                              | broker action                    |
//! |--------------------------------------------|----------------------------------|
//! | decided and committed (any outcome)        | reply, then `ack`                |
//! | transient storage failure                  | `nack` + requeue after a pause   |
//! | undecodable body, or non-transient failure | `reject` → DLX `gatehouse.dead`  |

use std::sync::Arc;
use std::time::Duration;

use gatehouse_broker::lapin::Channel;
use gatehouse_broker::lapin::message::Delivery;
use gatehouse_broker::lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};
use gatehouse_protocol::{Catalog, ControlRequest, JobEnvelope};
use gatehouse_storage::Store;
use tracing::Instrument;

use crate::apply::{self, ReplyTarget};
use crate::reply;

/// What every delivery handler needs.
pub struct Context {
    pub store: Store,
    pub catalog: Arc<Catalog>,
    /// Channel for replies (no confirms: see [`crate::reply`]).
    pub replies: Channel,
}

/// Pause before a delivery that hit a transient failure goes back to the queue, so that a
/// sick database is not hammered.
const TRANSIENT_PAUSE: Duration = Duration::from_millis(500);

/// Handles one job delivery, start to ack.
pub async fn handle_job(ctx: Arc<Context>, mut delivery: Delivery) {
    let data = std::mem::take(&mut delivery.data);
    let env: JobEnvelope = match serde_json::from_slice(&data) {
        Ok(env) => env,
        Err(e) => {
            tracing::warn!(error = %e, "undecodable job message: dead-lettering it");
            return settle(&delivery, Settle::DeadLetter).await;
        }
    };
    let span = tracing::info_span!("job", job_id = %env.id, kind = %env.kind, client = %env.client);
    async move {
        let target = reply_target(&delivery);
        let catalog = ctx.catalog.clone();
        let decided = ctx
            .store
            .transact(move |tx| apply::apply(tx, &catalog, env, &data, target))
            .await;
        match decided {
            Ok(answers) => {
                for a in &answers {
                    tracing::info!(job_id = %a.status.id, status = a.status.status.as_str(), "job decided");
                    reply::send(&ctx.replies, &a.target, &a.status).await;
                }
                settle(&delivery, Settle::Ack).await;
            }
            Err(e) if e.is_transient() => {
                tracing::warn!(error = %e, "transient failure: requeueing");
                tokio::time::sleep(TRANSIENT_PAUSE).await;
                settle(&delivery, Settle::Requeue).await;
            }
            Err(e) => {
                tracing::error!(error = %e, "job cannot be decided: dead-lettering it");
                settle(&delivery, Settle::DeadLetter).await;
            }
        }
    }
    .instrument(span)
    .await;
}

/// Answers one status query from the gatekeeper.
pub async fn handle_control(ctx: Arc<Context>, delivery: Delivery) {
    match serde_json::from_slice::<ControlRequest>(&delivery.data) {
        Ok(ControlRequest::Status { id, client }) => {
            let answer = ctx
                .store
                .transact(move |tx| apply::status_for(tx, &id, &client))
                .await;
            match answer {
                Ok(status) => reply::send(&ctx.replies, &reply_target(&delivery), &status).await,
                Err(e) => tracing::warn!(error = %e, "status query failed"),
            }
        }
        Err(e) => tracing::warn!(error = %e, "undecodable control message dropped"),
    }
    // Queries are cheap to repeat and expire anyway: always ack.
    settle(&delivery, Settle::Ack).await;
}

fn reply_target(d: &Delivery) -> ReplyTarget {
    ReplyTarget {
        reply_to: d.properties.reply_to().as_ref().map(ToString::to_string),
        correlation_id: d
            .properties
            .correlation_id()
            .as_ref()
            .map(ToString::to_string),
    }
}

/// The three ways a delivery ends.
#[derive(Debug, Clone, Copy)]
pub enum Settle {
    Ack,
    Requeue,
    DeadLetter,
}

/// Settles a delivery. A failure here means the channel is gone, and with it the delivery:
/// the broker will redeliver it, and the job id makes that harmless.
pub async fn settle(delivery: &Delivery, how: Settle) {
    let acker = &delivery.acker;
    let r = match how {
        Settle::Ack => acker.ack(BasicAckOptions::default()).await,
        Settle::Requeue => {
            acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await
        }
        Settle::DeadLetter => acker.reject(BasicRejectOptions { requeue: false }).await,
    };
    if let Err(e) = r {
        tracing::warn!(error = %e, ?how, "could not settle delivery; the broker will redeliver it");
    }
}
