//! Pausing and resuming from the dashboard (`POST /pauses`): the same as `gatehouse pause` and
//! `gatehouse resume`, a row in the worker's storage that every worker of it follows.
//!
//! Only behind the admin auth: without `[admin] basic_auth_user` the listener answers `403` (a
//! read-only dashboard anyone who reaches the port may see is fine; one that stops work is
//! not). A browser sends basic auth by itself, so a request must also be one another site
//! cannot make: JSON (`Content-Type: application/json`, which a cross-site form cannot send
//! and a cross-site script can only after a preflight this listener never allows) and, where
//! the browser says, from the dashboard's own origin (`Sec-Fetch-Site`).

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use gatehouse_protocol::Catalog;
use serde::Deserialize;
use serde_json::json;

use super::Admin;

/// What a pause or resume applies to, as stored: `kind:<name>` or `queue:<class>`, checked
/// against `catalog`.
///
/// # Errors
/// When the catalog has no such kind or class (the message says which).
pub fn target(catalog: &Catalog, what: Target, name: &str) -> Result<String, String> {
    match what {
        Target::Kind if catalog.kind(name).is_some() => Ok(format!("kind:{name}")),
        Target::Kind => Err(format!("the catalog has no job kind {name:?}")),
        Target::Queue if catalog.queue(name).is_some() => Ok(format!("queue:{name}")),
        Target::Queue => Err(format!("the catalog has no queue class {name:?}")),
    }
}

/// A kind or a queue class.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Target {
    Kind,
    Queue,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Pause,
    Resume,
}

/// `POST /pauses`: `{"action": "pause"|"resume", "target": "kind"|"queue", "name": "…"}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Change {
    action: Action,
    target: Target,
    name: String,
}

/// `POST /pauses`: answers `{"changed": bool}` (false: it was so already) and, for a resume,
/// `"released"`: the held jobs that go back to their queues.
pub async fn change(State(a): State<Admin>, headers: HeaderMap, body: Json<Change>) -> Response {
    if a.credentials.is_none() {
        let why = "pausing from the dashboard needs the admin auth ([admin] basic_auth_user)";
        return (StatusCode::FORBIDDEN, Json(json!({ "error": why }))).into_response();
    }
    let site = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok());
    if site.is_some_and(|s| s != "same-origin" && s != "none") {
        return (StatusCode::FORBIDDEN, Json(json!({ "error": "not from the dashboard" }))).into_response();
    }
    let Json(change) = body;
    let stored = match target(&a.catalog, change.target, &change.name) {
        Ok(t) => t,
        Err(e) => return (StatusCode::UNPROCESSABLE_ENTITY, Json(json!({ "error": e }))).into_response(),
    };
    let done = match change.action {
        Action::Pause => {
            let t = stored.clone();
            a.store.transact(move |tx| tx.pause(&t)).await.map(|changed| json!({ "changed": changed }))
        }
        Action::Resume => {
            let t = stored.clone();
            a.store.transact(move |tx| tx.resume(&t)).await.map(|released| match released {
                Some(n) => json!({ "changed": true, "released": n }),
                None => json!({ "changed": false }),
            })
        }
    };
    match done {
        Ok(body) => {
            tracing::info!(target = stored, action = ?change.action, "changed from the dashboard");
            Json(body).into_response()
        }
        Err(e) => {
            tracing::warn!(error = %e, target = stored, "pause or resume from the dashboard failed");
            let body = json!({ "error": "storage refused the change; try again" });
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}
