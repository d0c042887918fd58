//! `GET /v1/jobs/{id}/events`: a job's live event stream (Server-Sent Events, over the same
//! mTLS). Every state transition the worker recorded is an `event: state` with the
//! transition's number as its `id`, in order; the final one carries the whole status (result
//! or error) and ends the stream. While the job runs, a change of its progress is an
//! `event: progress` (without an id: progress is the latest report, not a transition). A client
//! that reconnects with `Last-Event-ID: N` gets the transitions after N: none is lost.
//!
//! The stream asks the worker (over the control queue, like a status query) every
//! [`POLL`]; only its first query counts against the client's rate. It ends after
//! `server.max_stream_s` (the client reconnects with `Last-Event-ID`); a `Last-Event-ID` that
//! is not a number (or past the largest the worker numbers, 2^63 - 1) is
//! `400 invalid-last-event-id`. A finished job's stream ends at once, whatever `Last-Event-ID`
//! says. A client holds at most its policy's `max_streams` streams (`429 too-many-streams`).

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use gatehouse_protocol::{JobState, JobStatus, Progress};
use serde_json::json;
use tokio::sync::mpsc;

use super::App;
use super::jobs::{Ask, ask_worker};
use crate::problem::Problem;
use crate::tally::Place;
use crate::tls::ClientIdentity;

/// How often an open stream asks the worker for news.
pub const POLL: Duration = Duration::from_millis(250);

pub async fn events(
    State(app): State<Arc<App>>,
    Extension(client): Extension<ClientIdentity>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let after = match headers.get("last-event-id").map(|v| v.to_str().map(|v| v.trim().parse::<u64>())) {
        None => 0,
        // Stored as a signed 64-bit number by the worker: anything larger was never one.
        Some(Ok(Ok(n))) if i64::try_from(n).is_ok() => n,
        // Our event ids are numbers: anything else was not one of them.
        Some(_) => {
            return invalid_last_event_id("Last-Event-ID must be the number of an event of this stream");
        }
    };
    // A listed client's place among its open streams (an unlisted one is refused below).
    let place = match enter_stream(&app, &client) {
        Ok(place) => place,
        Err(problem) => return problem.into_response(),
    };
    // The first query answers what a status query would (404, 429, 503) before any streaming.
    let first = match ask_worker(&app, &client, &id, Ask::Events { after, counted: true }).await {
        Ok(s) => s,
        Err(res) => return res,
    };
    let (tx, rx) = mpsc::channel::<Event>(16);
    tokio::spawn(async move {
        follow(app, client, id, after, first, tx).await;
        drop(place);
    });
    sse(rx)
}

/// `400 invalid-last-event-id`, saying what this stream's ids are.
pub(super) fn invalid_last_event_id(detail: &str) -> Response {
    Problem::new(
        axum::http::StatusCode::BAD_REQUEST,
        "invalid-last-event-id",
        "Invalid Last-Event-ID",
        detail,
    )
    .into_response()
}

/// The client's place among its open event streams (held while the stream lasts; `None` for a
/// client the policy does not list, which the stream's first query refuses); `429
/// too-many-streams` past its policy's `max_streams`.
pub(super) fn enter_stream(app: &App, client: &ClientIdentity) -> Result<Option<Place>, Problem> {
    let max = app.policy.current().client(&client.0).map(|p| p.max_streams);
    match max.map(|max| app.streams.enter(&client.0, max)) {
        Some(None) => Err(Problem::new(
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            "too-many-streams",
            "Too many open event streams",
            "this client holds the most open event streams its policy allows; close one first",
        )),
        Some(Some(place)) => Ok(Some(place)),
        None => Ok(None),
    }
}

/// The Server-Sent Events response of the events sent into `rx`'s sender.
pub(super) fn sse(rx: mpsc::Receiver<Event>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|e| (Ok::<_, Infallible>(e), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default()).into_response()
}

/// Sends the job's events into `tx` until the job is final, the client goes (`tx` closes) or
/// the worker stops answering (the client reconnects with `Last-Event-ID`).
async fn follow(
    app: Arc<App>,
    client: ClientIdentity,
    id: String,
    mut after: u64,
    mut status: JobStatus,
    tx: mpsc::Sender<Event>,
) {
    let mut progress: Option<Progress> = None;
    let mut told_anything = false;
    let ends = tokio::time::Instant::now() + app.max_stream;
    loop {
        let events = status.events.take().unwrap_or_default();
        if events.is_empty() && !told_anything && after == 0 {
            // Nothing recorded yet (the worker has not seen the job), or a job from before the
            // log: where it is now.
            let event = state_event(0, &status, None);
            if tx.send(event).await.is_err() || status.status.is_final() {
                return;
            }
        }
        told_anything = true;
        for e in events {
            after = e.seq;
            let last = e.status.is_final();
            // The final transition carries the whole status (result or error).
            let event = state_event(e.seq, &status, Some(&e));
            if tx.send(event).await.is_err() || last {
                return;
            }
        }
        if status.status.is_final() {
            // Final, with nothing after `after` (a Last-Event-ID at or past its last
            // transition): where it ended, and the end of the stream.
            let _ = tx.send(state_event(after, &status, None)).await;
            return;
        }
        if status.status == JobState::Running && status.progress.is_some() && status.progress != progress {
            progress = status.progress.clone();
            let data = json!({"id": status.id, "progress": progress});
            if tx.send(Event::default().event("progress").data(data.to_string())).await.is_err() {
                return;
            }
        }
        tokio::select! {
            () = tokio::time::sleep(POLL) => {}
            () = tx.closed() => return,
        }
        if tokio::time::Instant::now() >= ends {
            // Long enough: the client reconnects from its last event.
            return;
        }
        status = match ask_worker(&app, &client, &id, Ask::Events { after, counted: false }).await {
            Ok(s) => s,
            Err(_) => {
                let _ =
                    tx.send(Event::default().event("error").data(r#"{"error":"worker-unavailable"}"#)).await;
                return;
            }
        };
    }
}

/// An `event: state` numbered `seq`: the transition `e`, or with none the status now. A final
/// one is the whole status.
fn state_event(seq: u64, now: &JobStatus, e: Option<&gatehouse_protocol::JobEvent>) -> Event {
    let data = match e {
        Some(e) if e.status.is_final() => {
            let mut whole = now.clone();
            whole.status = e.status;
            whole.progress = None;
            serde_json::to_value(&whole).unwrap_or_default()
        }
        Some(e) => json!({
            "id": now.id,
            "status": e.status,
            "at": gatehouse_protocol::submit::format_rfc3339_ms(e.at_ms),
        }),
        None => {
            let mut whole = now.clone();
            whole.progress = None;
            serde_json::to_value(&whole).unwrap_or_default()
        }
    };
    Event::default().event("state").id(seq.to_string()).data(data.to_string())
}
