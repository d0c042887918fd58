//! The worker's admin listener: plain HTTP on `[admin] listen` (default `127.0.0.1:9102`; keep
//! it private). `/healthz` and `/readyz` (a broker session is consuming, and storage takes
//! writes: see [`health`]) for probes; behind
//! optional basic auth (`[admin] basic_auth_user` and `basic_auth_password_file`), `/metrics`
//! (Prometheus) and the read-only dashboard (`/`, see [`dashboard`]).

pub mod activity;
pub mod dashboard;
pub mod health;
pub mod metrics;
pub mod pauses;

use std::sync::Arc;
use std::sync::atomic::Ordering;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use gatehouse_protocol::Catalog;
use gatehouse_storage::Store;
use ring::digest;

use self::dashboard::BrokerView;
use self::health::StorageHealth;
use self::metrics::WorkerMetrics;

/// What the admin listener needs.
#[derive(Clone)]
pub struct Admin {
    pub metrics: Arc<WorkerMetrics>,
    pub health: Arc<StorageHealth>,
    pub store: Store,
    pub catalog: Arc<Catalog>,
    pub broker: Arc<BrokerView>,
    /// SHA-256 of `user:password` when basic auth is on.
    pub credentials: Option<Arc<[u8; 32]>>,
    /// Host names answered besides addresses and `localhost` (see
    /// [`gatehouse_protocol::hosts`]).
    pub allowed_hosts: Arc<Vec<String>>,
}

/// `/healthz`, `/readyz`; `/metrics` and the dashboard behind basic auth when it is on.
pub fn router(admin: Admin) -> Router {
    let guarded = Router::new()
        .route("/metrics", get(metrics))
        .route("/", get(dashboard::page))
        .route("/dashboard.js", get(dashboard::script))
        .route("/dashboard.css", get(dashboard::style))
        .route("/dashboard.json", get(dashboard::snapshot))
        .route("/pauses", post(pauses::change))
        .route("/jobs/{id}", get(dashboard::job))
        .layer(middleware::from_fn(page_headers))
        .layer(middleware::from_fn_with_state(admin.clone(), basic_auth));
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(readyz))
        .merge(guarded)
        .layer(middleware::from_fn_with_state(admin.clone(), known_host))
        .with_state(admin)
}

/// Answers only requests for an address, `localhost` or a listed name (DNS rebinding).
async fn known_host(State(a): State<Admin>, req: Request, next: Next) -> Response {
    let host = req.headers().get(header::HOST).map(|h| h.to_str().unwrap_or(""));
    if gatehouse_protocol::hosts::admin_host_allowed(host, &a.allowed_hosts) {
        return next.run(req).await;
    }
    (StatusCode::MISDIRECTED_REQUEST, "unknown host: list it in [admin] allowed_hosts").into_response()
}

async fn readyz(State(a): State<Admin>) -> Response {
    if let Some(reason) = a.health.refusing() {
        return (StatusCode::SERVICE_UNAVAILABLE, format!("storage refuses writes: {reason}"))
            .into_response();
    }
    if a.metrics.ready.load(Ordering::Relaxed) {
        (StatusCode::OK, "ready").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "no broker session").into_response()
    }
}

async fn metrics(State(a): State<Admin>) -> impl IntoResponse {
    // Counted in storage (not a counter that could drift), at most once per 5 s.
    a.metrics.refresh_waiting(&a.store).await;
    (
        [(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        a.metrics.encode(),
    )
}

async fn basic_auth(State(a): State<Admin>, req: Request, next: Next) -> Response {
    let Some(expected) = &a.credentials else { return next.run(req).await };
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Basic "))
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b.trim()).ok())
        .map(|raw| digest::digest(&digest::SHA256, &raw));
    // Digests compared, not the secrets: how long the comparison takes says nothing of them.
    if given.is_some_and(|g| g.as_ref() == expected.as_slice()) {
        return next.run(req).await;
    }
    let mut res = (StatusCode::UNAUTHORIZED, "authentication required").into_response();
    res.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(r#"Basic realm="gatehouse worker""#));
    res
}

/// Same-origin everything: the page loads nothing from elsewhere, runs no inline script, and is
/// not framed.
async fn page_headers(req: Request, next: Next) -> Response {
    let mut res = next.run(req).await;
    let h = res.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; frame-ancestors 'none'"),
    );
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    res
}
