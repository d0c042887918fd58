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
use gatehouse_protocol::submit::RawSequence;
use gatehouse_protocol::trace::Trace;
use gatehouse_protocol::{
    ControlRequest, JobEnvelope, JobId, JobState, JobStatus, KindSpec, Priority, ReplyTo, Sequence,
    SubmitRequest, Vouched,
};
use serde_json::{Value, json};
use tracing::Instrument as _;

use super::App;
use crate::problem::{FieldError, Problem};
use crate::replies::Waiter;
use crate::sanitize;
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
    if !is_json(headers) {
        return Err(Problem::unsupported_media_type());
    }
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            Problem::body_too_large(app.max_body_bytes)
        } else {
            Problem::malformed_json(format!("cannot read the body: {e}"))
        }
    })?;
    let value = sanitize::parse(&body).map_err(|e| Problem::malformed_json(e.to_string()))?;
    let mut req: SubmitRequest =
        serde_json::from_value(value).map_err(|e| Problem::invalid_envelope(e.to_string()))?;

    let spec = app.catalog.kind(&req.kind).ok_or_else(|| {
        Problem::validation(
            "Unknown job kind",
            "unknown-kind",
            vec![field("/kind", format!("no job kind named {:?}", req.kind))],
        )
    })?;
    let policies = authorize(app, client)?;
    let policy = policies
        .client(&client.0)
        .ok_or_else(|| Problem::forbidden("unknown-client", "this client identity has no policy"))?;
    if !policy.allows_kind(&spec.name) {
        return Err(Problem::forbidden(
            "kind-not-allowed",
            format!("this client may not submit {}", spec.name),
        ));
    }
    let priority = match req.priority {
        None => spec.priority.min(policy.max_priority),
        Some(p) => {
            let in_range = u8::try_from(p).map_err(|_| "priority must be between 0 and 9");
            let p = in_range.and_then(Priority::new).map_err(|m| {
                Problem::validation("Invalid priority", "invalid-priority", vec![field("/priority", m)])
            })?;
            if p > policy.max_priority {
                return Err(Problem::forbidden(
                    "priority-above-ceiling",
                    format!("this client's highest priority is {}", policy.max_priority.get()),
                ));
            }
            p
        }
    };
    let submitted_at_ms = gatehouse_protocol::clock::now_ms().unsigned_abs();
    let not_before_ms = check_delay(spec, policy, &req, submitted_at_ms)?;
    let sequence = check_sequence(spec, req.sequence, &req.payload)?;
    if let Some(seq) = &sequence
        && !policy.allows_sequence_key(seq.key())
    {
        return Err(Problem::forbidden(
            "sequence-key-not-allowed",
            "this client may not use that sequence key",
        ));
    }
    sanitize::sanitize(&mut req.payload)
        .map_err(|errors| Problem::validation("Payload out of bounds", "payload-out-of-bounds", errors))?;
    check_sealed(app.schemas.sealed(&spec.name), &req.payload, req.idempotency_key.as_deref())?;
    app.schemas.validate_as_sent(&spec.name, &req.payload).map_err(|errors| {
        let errors = errors.into_iter().map(|v| FieldError { path: v.path, message: v.message }).collect();
        Problem::validation("Payload does not match the kind's schema", "schema-violation", errors)
    })?;

    // A delayed job is answered at once (`scheduled`): nobody waits days for a reply.
    let wait = wait.filter(|_| not_before_ms.is_none());

    let id = app.ids.mint(&client.0, req.idempotency_key.as_deref());
    let mut waiter = match wait {
        Some(_) => Some(
            app.replies.register(&id, &client.0).map_err(|e| Problem::broker_unavailable(e.to_string()))?,
        ),
        None => None,
    };
    let envelope = JobEnvelope {
        id,
        kind: spec.name.clone(),
        client: client.0.clone(),
        priority,
        sequence,
        payload: req.payload,
        submitted_at_ms,
        not_before_ms,
        // The reply target travels inside the vouched message, not as AMQP properties.
        reply: waiter.as_ref().map(|w| ReplyTo {
            queue: app.replies.queue().to_owned(),
            correlation_id: w.correlation_id().to_owned(),
        }),
        trace_id: Some(trace.trace_id.clone()),
        span_id: Some(trace.span_id.clone()),
        shard: app.catalog.shard_for(spec, policy.place),
        share: policy.share,
        idempotency_key: req.idempotency_key,
    };
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
    if let (Some(w), Some(wait)) = (waiter.as_mut(), wait) {
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
fn seal(app: &App, envelope: &JobEnvelope) -> Result<Vec<u8>, Problem> {
    let session = app.keys.session().map_err(|_| Problem::internal("no session with the worker"))?;
    envelope
        .seal(&session)
        .ok()
        .and_then(|sealed| serde_json::to_vec(&sealed).ok())
        .and_then(|sealed| Vouched::wrap(&session, &sealed).ok())
        .ok_or_else(|| Problem::internal("the job could not be sealed"))
}

/// The client must have a policy, and a token of its rate; answers the policy in force.
fn authorize(app: &App, client: &ClientIdentity) -> Result<Arc<crate::policy::Policy>, Problem> {
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
async fn query_worker(
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

/// When a delayed job may run, within what its kind and the client's policy allow.
/// Each field the kind's schema marks sealed, when present, must be a well-formed sealed value
/// of bounded size (what is inside only the worker sees), and a job that carries one must have
/// an idempotency key (the sealed values are bound to it).
///
/// Checks the idempotency key's length first.
fn check_sealed(sealed: &[String], payload: &Value, idempotency_key: Option<&str>) -> Result<(), Problem> {
    if idempotency_key.is_some_and(|k| k.is_empty() || k.chars().count() > 256) {
        return Err(Problem::validation(
            "Invalid idempotency key",
            "invalid-idempotency-key",
            vec![field("/idempotency_key", "must be 1 to 256 characters")],
        ));
    }
    let mut carried = false;
    for path in sealed {
        match payload.pointer(path) {
            None => {}
            Some(Value::String(s)) if gatehouse_protocol::fields::well_formed(s) => carried = true,
            Some(_) => {
                return Err(Problem::validation(
                    "A sealed field arrived in the clear",
                    "field-must-be-sealed",
                    vec![field(
                        &format!("/payload{path}"),
                        "must be sealed by the client to a certified worker key (GET /v1/keys)",
                    )],
                ));
            }
        }
    }
    if carried && idempotency_key.is_none() {
        return Err(Problem::validation(
            "Sealed fields need an idempotency key",
            "idempotency-key-required",
            vec![field("/idempotency_key", "sealed fields are bound to the job's idempotency key")],
        ));
    }
    Ok(())
}

fn check_delay(
    spec: &KindSpec,
    policy: &crate::policy::ClientPolicy,
    req: &SubmitRequest,
    now_ms: u64,
) -> Result<Option<u64>, Problem> {
    let at = gatehouse_protocol::submit::not_before_ms(req, now_ms).map_err(|m| {
        let path = if req.delay_s.is_some() && req.not_before.is_none() { "/delay_s" } else { "/not_before" };
        Problem::validation("Invalid schedule", "invalid-schedule", vec![field(path, m)])
    })?;
    let Some(at) = at else { return Ok(None) };
    if policy.max_delay_s == Some(0) {
        return Err(Problem::forbidden("delay-not-allowed", "this client may not delay jobs"));
    }
    let limit = policy.max_delay_s.unwrap_or(u64::MAX).min(spec.max_delay_s);
    let delay_s = (at - now_ms).div_ceil(1000);
    if delay_s > limit {
        let path = if req.delay_s.is_some() { "/delay_s" } else { "/not_before" };
        let m = if limit == 0 {
            format!("{} takes no delay", spec.name)
        } else {
            format!("at most {limit} seconds from now")
        };
        return Err(Problem::validation("Delay too long", "delay-too-long", vec![field(path, m)]));
    }
    Ok(Some(at))
}

/// Sequence rules: required for sequenced kinds, refused for others, and for kinds with a
/// `sequence_key_field` the key must equal that payload field.
fn check_sequence(
    spec: &KindSpec,
    raw: Option<RawSequence>,
    payload: &Value,
) -> Result<Option<Sequence>, Problem> {
    let invalid =
        |m: String| Problem::validation("Invalid sequence", "invalid-sequence", vec![field("/sequence", m)]);
    match (spec.sequenced, raw) {
        (false, None) => Ok(None),
        (false, Some(_)) => Err(invalid(format!("{} is not sequenced; send no sequence", spec.name))),
        (true, None) => Err(invalid(format!(
            "{} is sequenced; send {{\"sequence\": {{\"key\", \"number\"}}}}",
            spec.name
        ))),
        (true, Some(raw)) => {
            let seq = Sequence::parse(raw).map_err(|m| invalid(m.to_owned()))?;
            if let Some(f) = &spec.sequence_key_field
                && payload.get(f).and_then(Value::as_str) != Some(seq.key())
            {
                return Err(invalid(format!("the sequence key must equal payload.{f}")));
            }
            Ok(Some(seq))
        }
    }
}

/// Publishes to the jobs exchange and waits for the confirm, within `publish_timeout`.
async fn publish(
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

fn is_json(headers: &HeaderMap) -> bool {
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

fn field(path: &str, message: impl Into<String>) -> FieldError {
    FieldError { path: path.into(), message: message.into() }
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
