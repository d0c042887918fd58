//! HTTP routes. Every handler answers either its result or a [`Problem`].

pub mod batches;
mod checks;
pub mod events;
pub mod health;
pub mod jobs;
pub mod workflows;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use gatehouse_broker::Topology;
use gatehouse_protocol::Catalog;

use crate::ids::IdMinter;
use crate::keys::GatekeeperKeys;
use crate::link::BrokerLink;
use crate::metrics::Metrics;
use crate::policy::{LivePolicy, RateLimiter};
use crate::problem::Problem;
use crate::replies::Replies;
use gatehouse_protocol::schemas::Schemas;

/// Everything the handlers share.
pub struct App {
    pub catalog: Catalog,
    pub schemas: Schemas,
    pub policy: LivePolicy,
    pub metrics: Metrics,
    /// The served OpenAPI document (built from the catalog at start-up).
    pub openapi: String,
    pub rate: RateLimiter,
    /// Open event streams per client.
    pub streams: Arc<crate::tally::Tally>,
    pub ids: IdMinter,
    pub link: Arc<BrokerLink>,
    pub keys: Arc<GatekeeperKeys>,
    pub topology: Topology,
    pub replies: Arc<Replies>,
    pub max_body_bytes: usize,
    pub max_wait: Duration,
    pub status_timeout: Duration,
    /// Longest an event stream stays open.
    pub max_stream: Duration,
    pub publish_timeout: Duration,
    pub request_timeout: Duration,
}

/// The OpenAPI 3.1 document of this API, completed from the loaded catalog (see
/// [`crate::openapi`]).
async fn openapi(
    axum::extract::State(app): axum::extract::State<Arc<App>>,
) -> impl axum::response::IntoResponse {
    ([(axum::http::header::CONTENT_TYPE, "application/json")], app.openapi.clone())
}

/// Bounds a whole request, body included (a slow body is the slowloris that header timeouts
/// do not catch): past `request_timeout`, `408`.
async fn request_timeout(
    axum::extract::State(app): axum::extract::State<Arc<App>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    match tokio::time::timeout(app.request_timeout, next.run(req)).await {
        Ok(res) => res,
        Err(_) => axum::response::IntoResponse::into_response(Problem::new(
            axum::http::StatusCode::REQUEST_TIMEOUT,
            "request-timeout",
            "Request timeout",
            "the request took too long (a slow body?)",
        )),
    }
}

/// Times each routed request into the metrics, by route pattern and status.
async fn observe(
    axum::extract::State(app): axum::extract::State<Arc<App>>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let route = req
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |p| p.as_str().to_owned());
    let started = std::time::Instant::now();
    let res = next.run(req).await;
    app.metrics.request(&route, res.status().as_u16(), started.elapsed());
    res
}

/// The worker's public sealing keys as the operator certified them: served as is (a
/// gatekeeper cannot alter them unnoticed; clients check the operator's signature).
async fn worker_keys(axum::extract::State(app): axum::extract::State<Arc<App>>) -> axum::response::Response {
    use axum::response::IntoResponse as _;
    match app.keys.worker_key_set() {
        Some(set) => {
            ([(axum::http::header::CONTENT_TYPE, "application/json")], set.to_owned()).into_response()
        }
        None => Problem::new(
            axum::http::StatusCode::NOT_FOUND,
            "no-key-set",
            "No certified key set",
            "this gatekeeper serves no certified worker key set ([keys] worker_key_set)",
        )
        .into_response(),
    }
}

/// The API router. The client identity is inserted per connection by [`crate::server`].
pub fn router(app: Arc<App>) -> Router {
    let limit = app.max_body_bytes;
    Router::new()
        .route("/v1/jobs", post(jobs::submit).get(jobs::list))
        .route("/v1/jobs/{id}", get(jobs::status).delete(jobs::cancel))
        .route("/v1/jobs/{id}/events", get(events::events))
        .route(
            "/v1/batches",
            post(batches::submit).layer(DefaultBodyLimit::max(limit.saturating_mul(batches::BODY_FACTOR))),
        )
        .route("/v1/batches/{id}", get(batches::status))
        .route(
            "/v1/workflows",
            post(workflows::submit).layer(DefaultBodyLimit::max(limit.saturating_mul(batches::BODY_FACTOR))),
        )
        .route("/v1/workflows/{id}", get(workflows::status))
        .route("/v1/workflows/{id}/events", get(workflows::events))
        .route("/v1/keys", get(worker_keys))
        .route("/healthz", get(health::healthz))
        .route("/readyz", get(health::readyz))
        .route("/openapi.json", get(openapi))
        // After routing, so that the route's pattern (not the raw path) labels the histogram.
        .route_layer(axum::middleware::from_fn_with_state(app.clone(), observe))
        .fallback(|| async {
            Problem::new(axum::http::StatusCode::NOT_FOUND, "no-such-route", "Not found", "no such route")
        })
        .method_not_allowed_fallback(|| async {
            Problem::new(
                axum::http::StatusCode::METHOD_NOT_ALLOWED,
                "method-not-allowed",
                "Method not allowed",
                "this route does not take that method",
            )
        })
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(app.clone(), request_timeout))
        .with_state(app)
}
