//! Liveness and readiness.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::App;
use crate::problem::Problem;

/// The process answers.
pub async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// The broker channel is open and the topology was declared (it is, once the app exists).
pub async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.link.publisher().is_some() {
        Json(json!({"status": "ready"})).into_response()
    } else {
        Problem::broker_unavailable("not connected to the broker").into_response()
    }
}
