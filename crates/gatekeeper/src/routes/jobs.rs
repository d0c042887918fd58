//! `POST /v1/jobs`, `GET /v1/jobs/{id}` and `DELETE /v1/jobs/{id}`.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use gatehouse_broker::PublishError;
use gatehouse_broker::lapin::BasicProperties;
use gatehouse_broker::topology::CONTROL_ROUTING_KEY;
use gatehouse_protocol::listing::{JobPage, JobQuery};
use gatehouse_protocol::trace::Trace;
use gatehouse_protocol::{
    ControlRequest, JobEnvelope, JobId, JobState, JobStatus, ReplyTo, SubmitRequest, Vouched,
};
use serde_json::json;
use tracing::Instrument as _;

use super::App;
use super::checks::{check_job, field, json_body};
use crate::problem::Problem;
use crate::replies::Waiter;
use crate::tls::ClientIdentity;

/// `POST /v1/jobs`: check, publish with confirm, and optionally wait for the outcome.
pub async fn submit(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientIdentity>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let wait = requested_wait(&headers).map(|w| w.min(app.max_wait));
    // The client's trace continues here (or one starts): every log line of this request, the
    // worker's for the job, and the response carry its id.
    let mut trace = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .and_then(Trace::continue_from)
        .unwrap_or_else(Trace::fresh);
    let span = tracing::info_span!("submit", client = %client.0, trace_id = tracing::field::Empty);
    // Exported spans (OTLP) join the client's trace; this span's id is then the one the
    // response and the worker's spans name.
    if let Some(parent) = &trace.parent_id {
        gatehouse_broker::telemetry::continue_trace(&span, &trace.trace_id, parent);
    }
    if let Some((trace_id, span_id)) = gatehouse_broker::telemetry::ids(&span) {
        (trace.trace_id, trace.span_id) = (trace_id, span_id);
    }
    span.record("trace_id", trace.trace_id.as_str());
    let mut res = async {
        match accept(&app, &client, &headers, body, wait, &trace).await {
            Ok(res) => {
                app.metrics.accepted();
                res
            }
            Err(problem) => {
                app.metrics.rejected(problem.slug());
                tracing::info!(reason = problem.slug(), status = problem.status, "job rejected");
                problem.into_response()
            }
        }
    }
    .instrument(span)
    .await;
    if let Ok(v) = HeaderValue::from_str(&trace.header()) {
        res.headers_mut().insert("traceparent", v);
    }
    res
}

async fn accept(
    app: &App,
    client: &ClientIdentity,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
    wait: Option<Duration>,
    trace: &Trace,
) -> Result<Response, Problem> {
    // Spans (OTLP): validate, publish, wait. Nothing below awaits until the publish.
    let validating = tracing::info_span!(target: "gatehouse::spans", "validate").entered();
    let req: SubmitRequest = json_body(headers, body, app.max_body_bytes)?;

    let policies = authorize(app, client)?;
    let policy = policies
        .client(&client.0)
        .ok_or_else(|| Problem::forbidden("unknown-client", "this client identity has no policy"))?;
    let (spec, mut envelope) = check_job(app, &client.0, policy, req, trace)?;
    let (priority, not_before_ms) = (envelope.priority, envelope.not_before_ms);

    // A delayed job is answered at once (`scheduled`): nobody waits days for a reply.
    let wait = wait.filter(|_| not_before_ms.is_none());

    let mut waiting = None;
    if wait.is_some() {
        let waiter = app
            .replies
            .register(&envelope.id, &client.0)
            .map_err(|e| Problem::broker_unavailable(e.to_string()))?;
        // The reply target travels inside the vouched message, not as AMQP properties.
        envelope.reply = Some(ReplyTo {
            queue: app.replies.queue().to_owned(),
            correlation_id: waiter.correlation_id().to_owned(),
        });
        waiting = Some(waiter);
    }
    let body = seal(app, &envelope)?;
    // Only the property the broker needs: every extra property or header costs the broker a
    // measurable share of its throughput (see `Vouched`). The job id and reply target travel in
    // the body; the worker labels a dead letter with the id (`message_id`) for `gatehouse dlq`.
    let props = BasicProperties::default().with_priority(priority.get());
    drop(validating);
    // `<class>.p<priority>[.s<shard>]`: the broker's bindings take it to its class's queue
    // (of its client's fair shard), or for quorum lanes to the lane of its priority.
    publish(app, &app.catalog.publish_key(spec, priority.get(), envelope.shard), &body, props, true)
        .instrument(tracing::info_span!(target: "gatehouse::spans", "publish"))
        .await?;
    tracing::debug!(job_id = %envelope.id, kind = %envelope.kind, priority = priority.get(), "job accepted");

    let mut last = JobStatus::new(envelope.id.clone(), JobState::Queued);
    if let Some(at) = not_before_ms {
        last.status = JobState::Scheduled;
        last.not_before = Some(gatehouse_protocol::submit::format_rfc3339_ms(at));
    }
    if let (Some(w), Some(wait)) = (waiting.as_mut(), wait) {
        last = await_outcome(w, wait, last)
            .instrument(tracing::info_span!(target: "gatehouse::spans", "wait"))
            .await;
        if last.status.is_final() {
            return Ok((StatusCode::OK, Json(last)).into_response());
        }
    }
    Ok(accepted(last))
}

/// The job as it travels: its payload sealed to the worker (the broker never sees it), the
/// message vouched for in the gatekeeper's session.
pub(crate) fn seal(app: &App, envelope: &JobEnvelope) -> Result<Vec<u8>, Problem> {
    let session = app.keys.session().map_err(|_| Problem::internal("no session with the worker"))?;
    envelope
        .seal(&session)
        .ok()
        .and_then(|sealed| serde_json::to_vec(&sealed).ok())
        .and_then(|sealed| Vouched::wrap(&session, &sealed).ok())
        .ok_or_else(|| Problem::internal("the job could not be sealed"))
}

/// The client must have a policy, and a token of its rate; answers the policy in force.
pub(crate) fn authorize(app: &App, client: &ClientIdentity) -> Result<Arc<crate::policy::Policy>, Problem> {
    let policies = app.policy.current();
    let policy = policies
        .client(&client.0)
        .ok_or_else(|| Problem::forbidden("unknown-client", "this client identity has no policy"))?;
    if let Err(wait) = app.rate.take(&client.0, policy) {
        return Err(Problem::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate-limited",
            "Too many requests",
            format!("this client may send {} requests per second", policy.rate_per_s.unwrap_or_default()),
        )
        .retry_after(wait.as_secs_f64().ceil().max(1.0) as u32));
    }
    Ok(policies)
}

/// Waits for answers until one is final or `wait` is over; returns the latest known status.
async fn await_outcome(waiter: &mut Waiter, wait: Duration, mut last: JobStatus) -> JobStatus {
    let deadline = tokio::time::Instant::now() + wait;
    while let Some(status) = waiter.next_until(deadline).await {
        let done = status.status.is_final();
        last = status;
        if done {
            break;
        }
    }
    last
}

/// `202 Accepted` with where to ask later.
fn accepted(status: JobStatus) -> Response {
    let url = format!("/v1/jobs/{}", status.id);
    let mut body = json!({ "id": status.id, "status": status.status, "status_url": url });
    if let Some(expected) = status.expected {
        body["expected"] = json!(expected);
    }
    if let Some(at) = &status.not_before {
        body["not_before"] = json!(at);
    }
    let mut res = (StatusCode::ACCEPTED, Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&url) {
        res.headers_mut().insert(header::LOCATION, v);
    }
    res
}

/// `GET /v1/jobs/{id}`: asks the worker; someone else's id is 404.
pub async fn status(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientIdentity>,
    Path(id): Path<String>,
) -> Response {
    match ask_worker(&app, &client, &id, Ask::Status).await {
        Ok(s) => Json(s).into_response(),
        Err(res) => res,
    }
}

/// `DELETE /v1/jobs/{id}`: cancels one of the client's jobs that has not ended. `200` with
/// status `cancelled`; `202` with status `running` when its handler is running and was told to
/// stop (it ends `cancelled` unless it got to the end first); `409` when it had already ended.
pub async fn cancel(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientIdentity>,
    Path(id): Path<String>,
) -> Response {
    match ask_worker(&app, &client, &id, Ask::Cancel).await {
        Ok(s) if s.status == JobState::Cancelled => Json(s).into_response(),
        Ok(s) if s.status.is_final() => Problem::new(
            StatusCode::CONFLICT,
            "job-already-ended",
            "Job already ended",
            format!("the job already ended: {}", s.status.as_str()),
        )
        .into_response(),
        Ok(s) => (StatusCode::ACCEPTED, Json(s)).into_response(),
        Err(res) => res,
    }
}

/// What a route asks the worker about a job.
#[derive(Clone, Copy)]
pub(crate) enum Ask {
    Status,
    Cancel,
    /// The state transitions after number `after`, for the event stream; only the stream's
    /// first query counts against the client's rate (`counted`).
    Events {
        after: u64,
        counted: bool,
    },
}

/// Asks the worker about job `id` of `client` over the control queue and waits for the
/// answer: the job's status, or the response to give instead (not the client's, expired,
/// unavailable).
pub(crate) async fn ask_worker(
    app: &App,
    client: &ClientIdentity,
    id: &str,
    ask: Ask,
) -> Result<JobStatus, Response> {
    // The same policy as submitting: a client removed from the policy reads nothing, and
    // every query (a broker round trip) counts against its rate, but an event stream's
    // follow-up polls.
    let allowed = match ask {
        Ask::Events { counted: false, .. } => app
            .policy
            .current()
            .client(&client.0)
            .map(|_| ())
            .ok_or_else(|| Problem::forbidden("unknown-client", "this client identity has no policy")),
        _ => authorize(app, client).map(|_| ()),
    };
    if let Err(problem) = allowed {
        app.metrics.rejected(problem.slug());
        return Err(problem.into_response());
    }
    let Some(id) = JobId::parse(id).ok().filter(|id| app.ids.is_owned_by(id, &client.0)) else {
        return Err(Problem::not_found().into_response());
    };
    let (id_, client_) = (id.clone(), client.0.clone());
    let minted_at_ms = app.ids.minted_at_ms(&id, &client.0);
    let answer = query_worker(app, client, &id, |reply, sent_at_ms| match ask {
        Ask::Status => ControlRequest::Status { id: id_, client: client_, sent_at_ms, reply, minted_at_ms },
        Ask::Cancel => ControlRequest::Cancel { id: id_, client: client_, sent_at_ms, reply },
        Ask::Events { after, .. } => {
            ControlRequest::Events { id: id_, client: client_, after, sent_at_ms, reply, minted_at_ms }
        }
    })
    .await?;
    match answer {
        // The id is this client's (checked above) but the worker has not seen it yet.
        s if s.status == JobState::NotFound && matches!(ask, Ask::Status | Ask::Events { .. }) => {
            Ok(JobStatus::new(id, JobState::Queued))
        }
        s if s.status == JobState::NotFound => Err(Problem::not_found().into_response()),
        s if s.status == JobState::Expired => Err(Problem::expired().into_response()),
        s => Ok(s),
    }
}

/// Sends the worker the control request `request` makes (given where to reply and the time)
/// about `id`, and waits for its answer, bound to `id` and `client`.
pub(crate) async fn query_worker(
    app: &App,
    client: &ClientIdentity,
    id: &JobId,
    request: impl FnOnce(ReplyTo, u64) -> ControlRequest,
) -> Result<JobStatus, Response> {
    let mut waiter = match app.replies.register(id, &client.0) {
        Ok(w) => w,
        Err(e) => return Err(Problem::broker_unavailable(e.to_string()).into_response()),
    };
    let sent_at_ms = gatehouse_protocol::clock::now_ms().unsigned_abs();
    let reply =
        ReplyTo { queue: app.replies.queue().to_owned(), correlation_id: waiter.correlation_id().to_owned() };
    let query = request(reply, sent_at_ms);
    let expiration = app.status_timeout.as_millis().to_string();
    let props = BasicProperties::default().with_expiration(expiration.as_str().into());
    let body = serde_json::to_vec(&query)
        .ok()
        .zip(app.keys.session().ok())
        .and_then(|(query, session)| Vouched::wrap(&session, &query).ok());
    let sent = match body {
        Some(body) => publish(app, CONTROL_ROUTING_KEY, &body, props, false).await,
        None => Err(Problem::internal("no session with the worker")),
    };
    if let Err(problem) = sent {
        return Err(problem.into_response());
    }
    let deadline = tokio::time::Instant::now() + app.status_timeout;
    waiter.next_until(deadline).await.ok_or_else(|| {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "worker-unavailable",
            "Service unavailable",
            "the worker did not answer in time",
        )
        .retry_after(1)
        .into_response()
    })
}

/// `GET /v1/jobs?state=…&kind=…&submitted_after=…&limit=…&cursor=…`: the client's own jobs,
/// newest first, one page (metadata only), answered by the worker from its storage. Jobs the
/// worker has not seen yet (just submitted) are not listed yet.
pub async fn list(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientIdentity>,
    Query(params): Query<Vec<(String, String)>>,
) -> Response {
    if let Err(problem) = authorize(&app, &client) {
        app.metrics.rejected(problem.slug());
        return problem.into_response();
    }
    let query = match JobQuery::from_params(params.iter().map(|(k, v)| (k.as_str(), v.as_str()))) {
        Ok(q) => q,
        Err(errors) => {
            let errors = errors.into_iter().map(|(name, m)| field(&format!("/{name}"), m)).collect();
            return Problem::validation("Invalid query", "invalid-query", errors).into_response();
        }
    };
    // An id of the query's own: its answer is sealed to it and to this client.
    let id = app.ids.mint(&client.0, None);
    let client_ = client.0.clone();
    let answer = query_worker(&app, &client, &id.clone(), |reply, sent_at_ms| ControlRequest::List {
        id,
        client: client_,
        query,
        sent_at_ms,
        reply,
    })
    .await;
    match answer.map(|s| s.result.map(serde_json::from_value::<JobPage>)) {
        Ok(Some(Ok(page))) => Json(page).into_response(),
        Ok(_) => Problem::internal("the worker's answer was not a list").into_response(),
        Err(res) => res,
    }
}

/// Publishes to the jobs exchange and waits for the confirm, within `publish_timeout`.
pub(crate) async fn publish(
    app: &App,
    routing_key: &str,
    body: &[u8],
    props: BasicProperties,
    persistent: bool,
) -> Result<(), Problem> {
    let Some(publisher) = app.link.publisher() else {
        return Err(Problem::broker_unavailable("the message broker is not available"));
    };
    let exchange = app.topology.jobs_exchange();
    let confirmed = async {
        if persistent {
            publisher.publish_persistent(&exchange, routing_key, body, props).await
        } else {
            publisher.publish_transient(&exchange, routing_key, body, props).await
        }
    };
    match tokio::time::timeout(app.publish_timeout, confirmed).await {
        Ok(r) => r.map_err(refused),
        Err(_) => {
            tracing::warn!("publish not confirmed in time");
            Err(Problem::broker_unavailable("the message broker did not confirm in time"))
        }
    }
}

/// A publish the broker did not take: never a 2xx.
fn refused(e: PublishError) -> Problem {
    tracing::warn!(error = %e, "publish refused");
    match e {
        PublishError::Nacked => Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "queue-full",
            "Service unavailable",
            "the job queue is full; try again later",
        )
        .retry_after(1),
        PublishError::Returned(_) => Problem::broker_unavailable("the job queue is not available"),
        PublishError::Broker(_) => Problem::broker_unavailable("the message broker is not available"),
    }
}

pub(crate) fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"))
}

/// `Prefer: wait=N` (RFC 7240), in seconds.
fn requested_wait(headers: &HeaderMap) -> Option<Duration> {
    headers.get_all("prefer").iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        v.split([',', ';'])
            .find_map(|pref| pref.trim().strip_prefix("wait="))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .map(Duration::from_secs)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefer_wait_is_parsed() {
        let mut h = HeaderMap::new();
        assert_eq!(requested_wait(&h), None);
        h.insert("prefer", HeaderValue::from_static("respond-async, wait=5"));
        assert_eq!(requested_wait(&h), Some(Duration::from_secs(5)));
    }

    #[test]
    fn content_type_must_be_json() {
        let mut h = HeaderMap::new();
        assert!(!is_json(&h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
        assert!(is_json(&h));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        assert!(!is_json(&h));
    }
}
