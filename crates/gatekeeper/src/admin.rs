//! The plain-HTTP admin listener (loopback by default): `/healthz`, `/readyz` and `/metrics`.
//! It answers even when the public listener is full.

use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::routing::get;

use crate::routes::{App, health};

/// The admin router; it answers requests for an IP address, `localhost` or one of
/// `allowed_hosts` only (DNS rebinding, see [`gatehouse_protocol::hosts`]).
pub fn router(app: Arc<App>, allowed_hosts: Vec<String>) -> Router {
    let allowed = Arc::new(allowed_hosts);
    Router::new()
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/metrics", get(metrics))
        .layer(axum::middleware::from_fn(move |req: axum::extract::Request, next: axum::middleware::Next| {
            let allowed = allowed.clone();
            async move {
                let host = req.headers().get(axum::http::header::HOST).map(|h| h.to_str().unwrap_or(""));
                if gatehouse_protocol::hosts::admin_host_allowed(host, &allowed) {
                    return next.run(req).await;
                }
                let refusal = "unknown host: list it in [admin] allowed_hosts";
                axum::response::IntoResponse::into_response((
                    axum::http::StatusCode::MISDIRECTED_REQUEST,
                    refusal,
                ))
            }
        }))
        .with_state(app)
}

async fn metrics(State(app): State<Arc<App>>) -> impl axum::response::IntoResponse {
    let text = app.metrics.render(app.link.publisher().is_some());
    ([(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], text)
}
