//! `POST /v1/workflows`: up to the client's `max_workflow_steps` named steps, each a job body
//! (checked exactly as `POST /v1/jobs` checks one) plus `after`, the names of the steps it
//! waits for. Accepted whole — one vouched message, which the worker records in one
//! transaction, each step then waiting in storage for its parents — or refused whole (an
//! unknown or repeated name, a cycle, a step the policy refuses: `422 workflow-refused`,
//! naming the step). `GET /v1/workflows/{id}`: every step's state; `GET
//! /v1/workflows/{id}/events`: each step's transitions as they happen.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::Event;
use axum::response::{IntoResponse, Response};
use gatehouse_protocol::batch::{BatchMessage, BatchSummary, in_dependency_order, is_step_name};
use gatehouse_protocol::trace::Trace;
use gatehouse_protocol::{JobEnvelope, JobId, KindSpec, SubmitRequest};
use serde::Deserialize;
use serde_json::{Map, Value, json};
use tokio::sync::mpsc;

use super::App;
use super::batches::{BODY_FACTOR, batched, group_status, owned_group, publish_group, read_group};
use super::checks::{answered, check_count, check_job, field, json_body, policy_of};
use super::events::{POLL, enter_stream, invalid_last_event_id, sse};
use super::jobs::authorize;
use crate::policy::ClientPolicy;
use crate::problem::{FieldError, Problem};
use crate::tls::ClientIdentity;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WorkflowRequest {
    steps: Vec<Value>,
}

/// A step, checked: its name, the names it waits for, its kind and the job as it will travel.
struct Step<'a> {
    name: String,
    after: Vec<String>,
    job: (&'a KindSpec, JobEnvelope),
}

/// `POST /v1/workflows`.
pub async fn submit(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientIdentity>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    answered(&app, "workflow", accept(&app, &client, &headers, body).await)
}

async fn accept(
    app: &App,
    client: &ClientIdentity,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, Problem> {
    let req: WorkflowRequest = json_body(headers, body, app.max_body_bytes.saturating_mul(BODY_FACTOR))?;
    let policies = authorize(app, client)?;
    let policy = policy_of(&policies, &client.0)?;
    check_count(req.steps.len(), policy.max_workflow_steps, "workflow", "steps")?;
    let steps = check_steps(app, &client.0, policy, req.steps)?;
    let id = app.ids.mint(&client.0, None);
    let mut message = BatchMessage {
        batch: id.clone(),
        client: client.0.clone(),
        share: policy.share,
        submitted_at_ms: gatehouse_protocol::clock::now_ms().unsigned_abs(),
        jobs: Vec::with_capacity(steps.len()),
        workflow: true,
        on_complete: None,
    };
    for step in &steps {
        let mut job = batched(app, &step.job.1)?;
        job.step = Some(step.name.clone());
        job.after.clone_from(&step.after);
        message.jobs.push(job);
    }
    publish_group(app, &steps[0].job, &message).await?;
    tracing::info!(workflow = %id, steps = steps.len(), "workflow accepted");
    let named: Map<String, Value> = steps.iter().map(|s| (s.name.clone(), json!(s.job.1.id))).collect();
    let answer = json!({
        "id": id,
        "status_url": format!("/v1/workflows/{id}"),
        "events_url": format!("/v1/workflows/{id}/events"),
        "steps": named,
    });
    Ok((StatusCode::ACCEPTED, Json(answer)).into_response())
}

/// Each step checked (its name, its job as `POST /v1/jobs` checks one), then the names it
/// waits for resolved and the whole checked for cycles: every step, or every problem found,
/// each under `/steps/<i>`.
fn check_steps<'a>(
    app: &'a App,
    client: &str,
    policy: &ClientPolicy,
    bodies: Vec<Value>,
) -> Result<Vec<Step<'a>>, Problem> {
    let trace = Trace::fresh();
    let (mut steps, mut refused) = (Vec::with_capacity(bodies.len()), Vec::new());
    let mut places: HashMap<String, usize> = HashMap::new();
    for (i, body) in bodies.into_iter().enumerate() {
        match one_step(app, client, policy, body, &trace) {
            Ok(step) if places.contains_key(&step.name) => {
                refused.push(field(
                    &format!("/steps/{i}/name"),
                    format!("{:?} names another step too", step.name),
                ));
            }
            Ok(step) => {
                places.insert(step.name.clone(), i);
                steps.push(step);
            }
            Err(errors) => refused.extend(errors.into_iter().map(|mut e| {
                e.path = format!("/steps/{i}{}", e.path);
                e
            })),
        }
    }
    if !refused.is_empty() {
        return Err(Problem::validation("The workflow is refused whole", "workflow-refused", refused));
    }
    let mut parents = Vec::with_capacity(steps.len());
    for (i, step) in steps.iter().enumerate() {
        let mut mine = Vec::with_capacity(step.after.len());
        for name in &step.after {
            match places.get(name) {
                Some(&p) if !mine.contains(&p) => mine.push(p),
                Some(_) => {
                    refused.push(field(&format!("/steps/{i}/after"), format!("{name:?} is named twice")))
                }
                None => {
                    refused.push(field(&format!("/steps/{i}/after"), format!("no step is named {name:?}")))
                }
            }
        }
        parents.push(mine);
    }
    if refused.is_empty()
        && let Err(i) = in_dependency_order(&parents)
    {
        refused.push(field(&format!("/steps/{i}/after"), "waits, through its parents, for itself (a cycle)"));
    }
    if !refused.is_empty() {
        return Err(Problem::validation("The workflow is refused whole", "workflow-refused", refused));
    }
    let ids: Vec<JobId> = steps.iter().map(|s| s.job.1.id.clone()).collect();
    for (step, mine) in steps.iter_mut().zip(parents) {
        step.job.1.after = mine.into_iter().map(|p| ids[p].clone()).collect();
    }
    Ok(steps)
}

/// One step: `name`, `after` (names) and a job body; its problems with paths relative to it.
fn one_step<'a>(
    app: &'a App,
    client: &str,
    policy: &ClientPolicy,
    body: Value,
    trace: &Trace,
) -> Result<Step<'a>, Vec<FieldError>> {
    let Value::Object(mut body) = body else {
        return Err(vec![field("", "a step is an object: name, after, and a job")]);
    };
    let name = match body.remove("name") {
        Some(Value::String(name)) if is_step_name(&name) => name,
        _ => return Err(vec![field("/name", "1 to 64 letters, digits, _ or -")]),
    };
    let after = match body.remove("after") {
        None => Vec::new(),
        Some(Value::Array(names)) => {
            let names: Option<Vec<String>> =
                names.into_iter().map(|n| n.as_str().map(str::to_owned)).collect();
            names.ok_or_else(|| vec![field("/after", "names of steps (strings)")])?
        }
        Some(_) => return Err(vec![field("/after", "names of steps (strings)")]),
    };
    let job = serde_json::from_value::<SubmitRequest>(Value::Object(body))
        .map_err(|e| Problem::invalid_envelope(e.to_string()))
        .and_then(|req| check_job(app, client, policy, req, trace))
        .map_err(|problem| relative(&problem))?;
    if !after.is_empty() && job.0.sequenced {
        return Err(vec![field(
            "/after",
            format!("{} is sequenced: its sequence orders its jobs", job.0.name),
        )]);
    }
    Ok(Step { name, after, job })
}

/// A step's problem, its paths relative to the step.
fn relative(problem: &Problem) -> Vec<FieldError> {
    if problem.errors.is_empty() {
        return vec![field("", format!("{}: {}", problem.slug(), problem.detail))];
    }
    problem.errors.iter().map(|e| field(&e.path, format!("{}: {}", problem.slug(), e.message))).collect()
}

/// `GET /v1/workflows/{id}`.
pub async fn status(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientIdentity>,
    Path(id): Path<String>,
) -> Response {
    group_status(&app, &client, &id, true).await
}

/// `GET /v1/workflows/{id}/events`: `event: step` for each transition of each step (its name,
/// id, state and time), in the order they happened, then `event: workflow` with the whole
/// status once every step is decided, ending the stream. Each event's id holds, per step, the
/// last transition told; a client reconnecting with it as `Last-Event-ID` gets the rest. It
/// polls the worker as a job's stream does, and counts against the client's `max_streams`.
pub async fn events(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientIdentity>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let id = match owned_group(&app, &client, &id) {
        Ok(id) => id,
        Err(problem) => return problem.into_response(),
    };
    let seen = match headers.get("last-event-id").map(|v| v.to_str().map(parse_seen)) {
        None => Vec::new(),
        Some(Ok(Some(seen))) => seen,
        Some(_) => return invalid_last_event_id("Last-Event-ID must be the id of an event of this stream"),
    };
    let place = match enter_stream(&app, &client) {
        Ok(place) => place,
        Err(problem) => return problem.into_response(),
    };
    // (Not recorded yet — it was just submitted: the stream waits for it.)
    let first = match read_group(&app, &client, &id, Some(seen.clone())).await {
        Ok(Some(summary)) if summary.steps.is_empty() => return Problem::not_found().into_response(),
        Ok(summary) => summary,
        Err(res) => return res,
    };
    let (tx, rx) = mpsc::channel::<Event>(64);
    tokio::spawn(async move {
        follow(app, client, id, seen, first, tx).await;
        drop(place);
    });
    sse(rx)
}

/// A `Last-Event-ID` of this stream: each step's last transition told, dot-separated.
fn parse_seen(s: &str) -> Option<Vec<u64>> {
    let seen: Option<Vec<u64>> =
        s.trim().split('.').map(|n| n.parse::<u64>().ok().filter(|n| i64::try_from(*n).is_ok())).collect();
    seen.filter(|seen| seen.len() <= gatehouse_protocol::batch::MAX_WORKFLOW_STEPS)
}

/// Sends the steps' transitions into `tx` until every step is decided, the client goes, or the
/// stream has lasted `server.max_stream_s` (the client reconnects with `Last-Event-ID`).
async fn follow(
    app: Arc<App>,
    client: ClientIdentity,
    id: JobId,
    mut seen: Vec<u64>,
    mut summary: Option<BatchSummary>,
    tx: mpsc::Sender<Event>,
) {
    let ends = tokio::time::Instant::now() + app.max_stream;
    loop {
        if let Some(summary) = &mut summary {
            seen.resize(summary.steps.len(), 0);
            if !tell(summary, &mut seen, &tx).await {
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = tx.closed() => return,
        }
        if tokio::time::Instant::now() >= ends {
            return;
        }
        summary = match read_group(&app, &client, &id, Some(seen.clone())).await {
            Ok(summary) => summary,
            Err(_) => {
                let _ =
                    tx.send(Event::default().event("error").data(r#"{"error":"worker-unavailable"}"#)).await;
                return;
            }
        };
    }
}

/// Sends the transitions `summary` carries (and the whole status once it is complete); `false`
/// when the stream is over (complete, or the client went).
async fn tell(summary: &mut BatchSummary, seen: &mut [u64], tx: &mpsc::Sender<Event>) -> bool {
    for e in summary.events.take().unwrap_or_default() {
        let Some(step) = summary.steps.get(e.position) else { continue };
        seen[e.position] = seen[e.position].max(e.event.seq);
        let data = json!({
            "step": step.name,
            "id": step.id,
            "status": e.event.status,
            "at": gatehouse_protocol::submit::format_rfc3339_ms(e.event.at_ms),
        });
        let event_id = seen.iter().map(u64::to_string).collect::<Vec<_>>().join(".");
        if tx.send(Event::default().event("step").id(event_id).data(data.to_string())).await.is_err() {
            return false;
        }
    }
    if summary.status == "complete" {
        let data = serde_json::to_string(&summary).unwrap_or_default();
        let _ = tx.send(Event::default().event("workflow").data(data)).await;
        return false;
    }
    true
}
