//! `POST /v1/batches`: up to the client's `max_batch_jobs` jobs, each checked exactly as
//! `POST /v1/jobs` checks one (an idempotency key used twice is one job, listed twice, as two
//! single submits with it would be), accepted whole — one message, which the worker records in one
//! transaction — or refused whole, naming each refused job by its index. `GET
//! /v1/batches/{id}`: the batch's jobs by state, and their ids, for its owner only.

use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use gatehouse_broker::lapin::BasicProperties;
use gatehouse_protocol::batch::{BatchMessage, BatchSummary, BatchedJob};
use gatehouse_protocol::trace::Trace;
use gatehouse_protocol::{ControlRequest, JobEnvelope, JobId, JobState, KindSpec, SubmitRequest, Vouched};
use serde::Deserialize;
use serde_json::{Value, json};

use super::App;
use super::checks::{answered, check_count, check_job, field, json_body, policy_of};
use super::jobs::{authorize, publish, query_worker, seal};
use crate::problem::{FieldError, Problem};
use crate::tls::ClientIdentity;

/// A job of the batch, checked: its kind and the job as it will travel.
type Checked<'a> = (&'a KindSpec, JobEnvelope);

/// A batch's body may be this many times a single job's (`server.max_body_bytes`).
pub const BODY_FACTOR: usize = 32;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchRequest {
    jobs: Vec<Value>,
    #[serde(default)]
    on_complete: Option<Value>,
}

/// `POST /v1/batches`.
pub async fn submit(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientIdentity>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answered(&app, "batch", accept(&app, &client, &headers, body).await)
}

async fn accept(
    app: &App,
    client: &ClientIdentity,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let req: BatchRequest = json_body(headers, body, app.max_body_bytes.saturating_mul(BODY_FACTOR))?;
    let policies = authorize(app, client)?;
    let policy = policy_of(&policies, &client.0)?;
    check_count(req.jobs.len(), policy.max_batch_jobs, "batch", "jobs")?;
    let batch_id = app.ids.mint(&client.0, None);
    let (checked, on_complete) = check_all(app, &client.0, policy, req, &batch_id)?;
    let batch = message(app, &client.0, policy.share, batch_id, &checked, on_complete.as_ref())?;
    let ids: Vec<JobId> = batch.jobs.iter().map(|j| j.id.clone()).collect();
    let on_complete_id = batch.on_complete.as_ref().map(|j| j.id.clone());
    publish_group(app, &checked[0], &batch).await?;
    tracing::info!(batch = %batch.batch, jobs = ids.len(), "batch accepted");
    let id = batch.batch.as_str();
    let mut answer = json!({"id": id, "status_url": format!("/v1/batches/{id}"), "jobs": ids});
    if let Some(job) = on_complete_id {
        answer["on_complete"] = json!(job);
    }
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// Each job of `req` checked as `POST /v1/jobs` checks one, and its `on_complete`: all of them,
/// or every problem found, each under its index.
fn check_all<'a>(
    app: &'a App,
    client: &str,
    policy: &crate::policy::ClientPolicy,
    req: BatchRequest,
    batch_id: &JobId,
) -> Result<(Vec<Checked<'a>>, Option<JobEnvelope>), Problem> {
    let trace = Trace::fresh();
    let (mut checked, mut refused) = (Vec::with_capacity(req.jobs.len()), Vec::new());
    for (i, job) in req.jobs.into_iter().enumerate() {
        let one = serde_json::from_value::<SubmitRequest>(job)
            .map_err(|e| Problem::invalid_envelope(e.to_string()))
            .and_then(|req| check_job(app, client, policy, req, &trace));
        match one {
            Ok(job) => checked.push(job),
            Err(problem) => refused.extend(at_index("/jobs", i, &problem)),
        }
    }
    let on_complete = match req.on_complete {
        None => None,
        Some(body) => match completion(app, client, policy, body, &trace, batch_id) {
            Ok(envelope) => Some(envelope),
            Err(errors) => {
                refused.extend(errors);
                None
            }
        },
    };
    if !refused.is_empty() {
        return Err(Problem::validation("The batch is refused whole", "batch-refused", refused));
    }
    Ok((checked, on_complete))
}

/// The batch as it travels: each job's own vouched message, and its on_complete job's.
fn message(
    app: &App,
    client: &str,
    share: u16,
    batch: JobId,
    checked: &[Checked<'_>],
    on_complete: Option<&JobEnvelope>,
) -> Result<BatchMessage, Problem> {
    let mut message = BatchMessage {
        batch,
        client: client.to_owned(),
        share,
        submitted_at_ms: gatehouse_protocol::clock::now_ms().unsigned_abs(),
        jobs: checked.iter().map(|(_, envelope)| batched(app, envelope)).collect::<Result<_, _>>()?,
        on_complete: None,
        workflow: false,
    };
    message.on_complete = on_complete.map(|envelope| batched(app, envelope)).transpose()?;
    Ok(message)
}

/// One job of a batch or workflow as it travels: its own vouched message.
pub(super) fn batched(app: &App, envelope: &JobEnvelope) -> Result<BatchedJob, Problem> {
    let message = String::from_utf8(seal(app, envelope)?).map_err(|_| Problem::internal("not UTF-8"))?;
    Ok(BatchedJob { id: envelope.id.clone(), message, step: None, after: Vec::new() })
}

/// Publishes `batch` (a batch or workflow, whose first job is `first`) vouched for, as one
/// message, to the queue of its first job at that job's priority; the worker sends each job on
/// to its own.
pub(super) async fn publish_group(
    app: &App,
    first: &(&KindSpec, JobEnvelope),
    batch: &BatchMessage,
) -> Result<(), Problem> {
    let session = app.keys.session().map_err(|_| Problem::internal("no session with the worker"))?;
    let body = serde_json::to_vec(batch)
        .ok()
        .and_then(|m| Vouched::wrap(&session, &m).ok())
        .ok_or_else(|| Problem::internal("the batch could not be sealed"))?;
    let (spec, job) = first;
    let props = BasicProperties::default().with_priority(job.priority.get());
    publish(app, &app.catalog.publish_key(spec, job.priority.get(), job.shard), &body, props, true).await
}

/// The batch's `on_complete` job, checked like a job (it runs once the batch is complete, and
/// then as any job: not before its `not_before`, in its sequence's order); errors under
/// `/on_complete`.
fn completion(
    app: &App,
    client: &str,
    policy: &crate::policy::ClientPolicy,
    body: Value,
    trace: &Trace,
    batch: &JobId,
) -> Result<JobEnvelope, Vec<FieldError>> {
    let under = |problem: &Problem| {
        problem
            .errors
            .iter()
            .map(|e| field(&format!("/on_complete{}", e.path), format!("{}: {}", problem.slug(), e.message)))
            .collect::<Vec<_>>()
    };
    let req = serde_json::from_value::<SubmitRequest>(body)
        .map_err(|e| vec![field("/on_complete", format!("invalid-envelope: {e}"))])?;
    let (_, mut envelope) = check_job(app, client, policy, req, trace).map_err(|p| {
        let errors = under(&p);
        if errors.is_empty() {
            vec![field("/on_complete", format!("{}: {}", p.slug(), p.detail))]
        } else {
            errors
        }
    })?;
    envelope.completes = Some(batch.clone());
    Ok(envelope)
}

/// A refused job's problem, its paths under `<list>/<i>` (`/jobs/3`, `/steps/0`).
pub(super) fn at_index(list: &str, i: usize, problem: &Problem) -> Vec<FieldError> {
    if problem.errors.is_empty() {
        return vec![field(&format!("{list}/{i}"), format!("{}: {}", problem.slug(), problem.detail))];
    }
    problem
        .errors
        .iter()
        .map(|e| {
            let path = e.path.strip_prefix('/').map_or(e.path.clone(), |rest| format!("{list}/{i}/{rest}"));
            field(&path, format!("{}: {}", problem.slug(), e.message))
        })
        .collect()
}

/// `GET /v1/batches/{id}`.
pub async fn status(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientIdentity>,
    Path(id): Path<String>,
) -> Response {
    group_status(&app, &client, &id, false).await
}

/// The status of batch (or, `workflow`, workflow) `id`, for its owner only.
pub(super) async fn group_status(app: &App, client: &ClientIdentity, id: &str, workflow: bool) -> Response {
    let id = match owned_group(app, client, id) {
        Ok(id) => id,
        Err(problem) => return problem.into_response(),
    };
    match read_group(app, client, &id, None).await {
        // The id is this client's (checked above) but the worker has not recorded it yet.
        Ok(None) => Json(json!({"id": id, "status": "queued"})).into_response(),
        // A batch's id is not a workflow's, nor the other way round.
        Ok(Some(summary)) if summary.steps.is_empty() == workflow => Problem::not_found().into_response(),
        Ok(Some(summary)) => Json(summary).into_response(),
        Err(res) => res,
    }
}

/// `id` as the id of one of `client`'s batches or workflows, the request authorized (its rate
/// taken); `404` for an id that is not one.
pub(super) fn owned_group(app: &App, client: &ClientIdentity, id: &str) -> Result<JobId, Problem> {
    if let Err(problem) = authorize(app, client) {
        app.metrics.rejected(problem.slug());
        return Err(problem);
    }
    JobId::parse(id).ok().filter(|id| app.ids.is_owned_by(id, &client.0)).ok_or_else(Problem::not_found)
}

/// What the worker holds of batch or workflow `id` (checked to be the client's); `None` while
/// it has not recorded it. With `events_after`, a workflow's steps' transitions after those.
pub(super) async fn read_group(
    app: &App,
    client: &ClientIdentity,
    id: &JobId,
    events_after: Option<Vec<u64>>,
) -> Result<Option<BatchSummary>, Response> {
    let client_ = client.0.clone();
    let group = id.clone();
    let answer = query_worker(app, client, id, |reply, sent_at_ms| ControlRequest::Batch {
        id: group,
        client: client_,
        sent_at_ms,
        reply,
        events_after,
    })
    .await?;
    if answer.status == JobState::NotFound {
        return Ok(None);
    }
    match answer.result.map(serde_json::from_value::<BatchSummary>) {
        Some(Ok(summary)) => Ok(Some(summary)),
        _ => Err(Problem::internal("the worker's answer was not a batch").into_response()),
    }
}
