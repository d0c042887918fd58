//! Status, events, job-list, batch and cancellation queries from the gatekeeper (the control queue),
//! answered from storage to the owner only.

use std::time::Duration;

use gatehouse_broker::lapin::message::Delivery;
use gatehouse_protocol::clock::now_ms;
use gatehouse_protocol::listing::{Cursor, JobPage, JobQuery, JobSummary, MAX_LIMIT};
use gatehouse_protocol::{ControlRequest, JobId, JobState, JobStatus, Vouched};
use gatehouse_storage::{JobFilter, StorageError};

use super::Ctx;
use super::settle::settle_control;
use crate::decide;
use crate::security::{ReplyTarget, WorkerKeys};

/// Status queries older than this are not answered (their asker gave up long ago).
const CONTROL_MAX_AGE: Duration = Duration::from_secs(60);

/// Most state transitions in one answer to an events query (the stream asks again for more).
const EVENTS_PER_ANSWER: u32 = 100;

/// Answers one query from the gatekeeper.
pub async fn handle_control(ctx: Ctx, delivery: Delivery) {
    let keys = &ctx.shared.keys;
    let vouched = Vouched::parse(&delivery.data).ok();
    let query = vouched
        .filter(|v| v.verify(|id, s| keys.sessions.get(id, s)).is_ok())
        .and_then(|v| Some((serde_json::from_slice::<ControlRequest>(v.message()).ok()?, v)));
    let fresh = |sent_at_ms| WorkerKeys::is_fresh(sent_at_ms, CONTROL_MAX_AGE);
    match query {
        Some((ControlRequest::Cancel { id, client, sent_at_ms, reply }, vouched)) if fresh(sent_at_ms) => {
            let target = ReplyTarget::new(Some(reply), &client, &vouched);
            cancel(&ctx, &target, id, client).await;
        }
        Some((ControlRequest::Status { id, client, sent_at_ms, reply, minted_at_ms }, vouched))
            if fresh(sent_at_ms) =>
        {
            let target = ReplyTarget::new(Some(reply), &client, &vouched);
            answer_query(&ctx, &target, id, client, minted_at_ms, None).await;
        }
        Some((ControlRequest::Events { id, client, after, sent_at_ms, reply, minted_at_ms }, vouched))
            if fresh(sent_at_ms) =>
        {
            let target = ReplyTarget::new(Some(reply), &client, &vouched);
            answer_query(&ctx, &target, id, client, minted_at_ms, Some(after)).await;
        }
        Some((ControlRequest::List { id, client, query, sent_at_ms, reply }, vouched))
            if fresh(sent_at_ms) =>
        {
            let target = ReplyTarget::new(Some(reply), &client, &vouched);
            list(&ctx, &target, id, client, query).await;
        }
        Some((ControlRequest::Batch { id, client, sent_at_ms, reply, events_after }, vouched))
            if fresh(sent_at_ms) =>
        {
            let target = ReplyTarget::new(Some(reply), &client, &vouched);
            batch(&ctx, &target, id, client, events_after).await;
        }
        _ => tracing::warn!("unsigned, stale or undecodable control message dropped"),
    }
    settle_control(&delivery).await;
}

/// A client's job list: one page, newest first, answered as the status of the query's own id
/// (its result the page). Read beside the writer, like status queries.
async fn list(ctx: &Ctx, target: &ReplyTarget, id: JobId, client: String, query: JobQuery) {
    let limit = query.limit.clamp(1, MAX_LIMIT);
    let filter = JobFilter {
        state: query.state.map(|s| s.as_str().to_owned()),
        kind: query.kind,
        submitted_after_ms: query.submitted_after_ms.and_then(|ms| i64::try_from(ms).ok()),
        after: query.cursor.map(|c| (c.submitted_at_ms, c.id)),
        batch: query.batch,
        workflow: query.workflow,
        limit,
    };
    let listed = ctx.shared.store.read(move |tx| tx.list_jobs(&client, &filter)).await;
    let rows = match listed {
        Ok(rows) => rows,
        Err(e) => return tracing::warn!(error = %e, "job list failed"),
    };
    let next_cursor = (rows.len() == limit as usize)
        .then(|| {
            rows.last().map(|j| Cursor { submitted_at_ms: j.submitted_at_ms, id: j.id.clone() }.encode())
        })
        .flatten();
    let jobs = rows
        .into_iter()
        .filter_map(|j| {
            let state = JobState::parse(&j.state)?;
            let mut summary = JobSummary::new(j.id, j.kind, state, j.submitted_at_ms, j.updated_at_ms);
            summary.attempts = j.attempts;
            Some(summary)
        })
        .collect();
    let mut status = JobStatus::new(id, JobState::Succeeded);
    status.result = serde_json::to_value(JobPage { jobs, next_cursor }).ok();
    ctx.out.reply(target, &status).await;
}

/// A client's batch: answered as the status of its id, `succeeded` with the summary as its
/// result, or `not_found` for anyone else's. Read beside the writer, like status queries.
async fn batch(ctx: &Ctx, target: &ReplyTarget, id: JobId, client: String, events_after: Option<Vec<u64>>) {
    let batch = id.clone();
    let read = move |tx: &mut gatehouse_storage::Tx<'_>| {
        decide::batch_status(tx, &batch, &client, events_after.as_deref())
    };
    match ctx.shared.store.read(read).await {
        Ok(summary) => {
            let mut status = JobStatus::new(id, JobState::NotFound);
            if let Some(summary) = summary {
                status.status = JobState::Succeeded;
                status.result = serde_json::to_value(summary).ok();
            }
            ctx.out.reply(target, &status).await;
        }
        Err(e) => tracing::warn!(error = %e, "batch query failed"),
    }
}

/// A client's cancellation: decided in storage; a job running here is told to stop.
async fn cancel(ctx: &Ctx, target: &ReplyTarget, id: JobId, client: String) {
    let job = id.clone();
    match ctx.shared.store.transact(move |tx| decide::cancel(tx, &job, &client)).await {
        Ok(status) => {
            if status.status == JobState::Running && ctx.shared.running.cancel(&id) {
                tracing::info!(job_id = %id, "running job cancelled: its handler is told to stop");
            }
            ctx.out.reply(target, &status).await;
        }
        Err(e) if ctx.shared.health.saw(&e) => {}
        Err(e) => tracing::warn!(error = %e, "cancellation failed"),
    }
}

/// Answers a status query, and with `events_after` the job's state transitions after that
/// number too.
async fn answer_query(
    ctx: &Ctx,
    target: &ReplyTarget,
    id: JobId,
    client: String,
    minted_at_ms: Option<u64>,
    events_after: Option<u64>,
) {
    // A job this old that storage does not know can never run (its message is stale): its
    // record was pruned, or it was lost before it ran.
    let max_age = ctx.shared.keys.max_message_age;
    let expired = minted_at_ms
        .is_some_and(|at| now_ms().unsigned_abs().saturating_sub(at) > max_age.as_millis() as u64);
    // Read beside the writer: answered while it is busy, or while storage refuses writes.
    let answer = ctx
        .shared
        .store
        .read(move |tx| {
            let mut s = decide::status_for(tx, &id, &client)?;
            if let Some(after) = events_after {
                s.events = Some(tx.job_events(&id, &client, after, EVENTS_PER_ANSWER)?);
            }
            Ok::<_, StorageError>(s)
        })
        .await
        .map(|mut s| {
            if s.status == JobState::NotFound && expired {
                s.status = JobState::Expired;
            }
            s
        });
    match answer {
        Ok(status) => ctx.out.reply(target, &status).await,
        Err(e) => tracing::warn!(error = %e, "status query failed"),
    }
}
