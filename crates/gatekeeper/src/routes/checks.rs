//! The checks of one submitted job, shared by `POST /v1/jobs`, `POST /v1/batches` and `POST
//! /v1/workflows`: kind, policy, priority, delay, sequence, parents, sanitizing, sealed fields
//! and schema. What passes is the job as it will travel (its id minted), without a reply
//! target.

use gatehouse_protocol::submit::RawSequence;
use gatehouse_protocol::trace::Trace;
use gatehouse_protocol::{JobEnvelope, JobId, KindSpec, Priority, Sequence, SubmitRequest};
use serde_json::Value;

use super::App;
use crate::policy::ClientPolicy;
use crate::problem::{FieldError, Problem};
use crate::sanitize;

/// A request body of type `T`: `application/json`, at most `limit` bytes, sanitized JSON (see
/// [`sanitize::parse`]), no field the type does not name.
///
/// # Errors
/// `415`, `413`, `400 malformed-json` or `400 invalid-envelope`.
pub(crate) fn json_body<T: serde::de::DeserializeOwned>(
    headers: &axum::http::HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
    limit: usize,
) -> Result<T, Problem> {
    if !super::jobs::is_json(headers) {
        return Err(Problem::unsupported_media_type());
    }
    let body = body.map_err(|e| {
        if e.status() == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
            Problem::body_too_large(limit)
        } else {
            Problem::malformed_json(format!("cannot read the body: {e}"))
        }
    })?;
    let value = sanitize::parse(&body).map_err(|e| Problem::malformed_json(e.to_string()))?;
    serde_json::from_value(value).map_err(|e| Problem::invalid_envelope(e.to_string()))
}

/// A submit route's response: `accepted`, or its problem, counted and logged as `what` rejected.
pub(crate) fn answered(
    app: &App,
    what: &str,
    accepted: Result<axum::response::Response, Problem>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    match accepted {
        Ok(res) => res,
        Err(problem) => {
            app.metrics.rejected(problem.slug());
            tracing::info!(reason = problem.slug(), status = problem.status, "{what} rejected");
            problem.into_response()
        }
    }
}

/// The policy of `client` in `policies` (`403 unknown-client` when it has none).
pub(crate) fn policy_of<'a>(
    policies: &'a crate::policy::Policy,
    client: &str,
) -> Result<&'a ClientPolicy, Problem> {
    policies
        .client(client)
        .ok_or_else(|| Problem::forbidden("unknown-client", "this client identity has no policy"))
}

/// A `group` (batch, workflow) of `n` `items` at `/items`: 1 to `most` of them, or `422
/// <group>-size`.
pub(crate) fn check_count(n: usize, most: usize, group: &str, items: &str) -> Result<(), Problem> {
    if (1..=most).contains(&n) {
        return Ok(());
    }
    let (slug, title) = match group {
        "batch" => ("batch-size", "Batch size out of bounds"),
        _ => ("workflow-size", "Workflow size out of bounds"),
    };
    Err(Problem::validation(
        title,
        slug,
        vec![field(&format!("/{items}"), format!("a {group} holds 1 to {most} {items}"))],
    ))
}

/// Checks `req` of `client` under its `policy`; answers its kind and the job as it will
/// travel.
///
/// # Errors
/// The first problem found.
pub(crate) fn check_job<'a>(
    app: &'a App,
    client: &str,
    policy: &ClientPolicy,
    mut req: SubmitRequest,
    trace: &Trace,
) -> Result<(&'a KindSpec, JobEnvelope), Problem> {
    let spec = app.catalog.kind(&req.kind).ok_or_else(|| {
        Problem::validation(
            "Unknown job kind",
            "unknown-kind",
            vec![field("/kind", format!("no job kind named {:?}", req.kind))],
        )
    })?;
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
    let after = check_after(app, client, spec, req.after.take().unwrap_or_default())?;
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

    let id = app.ids.mint(client, req.idempotency_key.as_deref());
    let envelope = JobEnvelope {
        id,
        kind: spec.name.clone(),
        client: client.to_owned(),
        priority,
        sequence,
        payload: req.payload,
        submitted_at_ms,
        not_before_ms,
        reply: None,
        trace_id: Some(trace.trace_id.clone()),
        span_id: Some(trace.span_id.clone()),
        shard: app.catalog.shard_for(spec, policy.place),
        share: policy.share,
        idempotency_key: req.idempotency_key,
        completes: None,
        after,
        on_parent_failure: req.on_parent_failure.unwrap_or_default(),
    };
    Ok((spec, envelope))
}

/// The jobs a job waits for: ids of the client's own jobs (another client's, or one that is no
/// job id, is `404`, as a status read of it would be), at most
/// [`gatehouse_protocol::batch::MAX_WORKFLOW_STEPS`], none twice; not for a sequenced kind (its
/// sequence orders its jobs).
///
/// # Errors
/// `404`, or `422 invalid-after`.
fn check_after(app: &App, client: &str, spec: &KindSpec, after: Vec<String>) -> Result<Vec<JobId>, Problem> {
    let refused =
        |m: String| Problem::validation("Invalid parents", "invalid-after", vec![field("/after", m)]);
    if after.is_empty() {
        return Ok(Vec::new());
    }
    if spec.sequenced {
        return Err(refused(format!("{} is sequenced: its sequence orders its jobs, not after", spec.name)));
    }
    let most = gatehouse_protocol::batch::MAX_WORKFLOW_STEPS;
    if after.len() > most {
        return Err(refused(format!("a job waits for at most {most} others")));
    }
    let mut ids: Vec<JobId> = Vec::with_capacity(after.len());
    for id in &after {
        let id = JobId::parse(id)
            .ok()
            .filter(|id| app.ids.is_owned_by(id, client))
            .ok_or_else(Problem::not_found)?;
        if ids.contains(&id) {
            return Err(refused(format!("{id} is named twice")));
        }
        ids.push(id);
    }
    Ok(ids)
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

pub(crate) fn field(path: &str, message: impl Into<String>) -> FieldError {
    FieldError { path: path.into(), message: message.into() }
}
