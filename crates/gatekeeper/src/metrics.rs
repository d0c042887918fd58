//! What the gatekeeper counts and times, served as Prometheus text on the admin listener
//! (`/metrics`), with `prometheus-client`.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Reason {
    reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Request {
    route: String,
    status: u16,
}

/// The gatekeeper's metrics.
pub struct Metrics {
    registry: Registry,
    accepted: Counter,
    rejected: Family<Reason, Counter>,
    /// Replies that came after their request stopped waiting (counted by the reply consumer).
    pub late_replies: Counter,
    /// Replies dropped because they did not open for the request they named.
    pub forged_replies: Counter,
    connected: Gauge,
    requests: Family<Request, Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let accepted = Counter::default();
        registry.register("gatehouse_jobs_accepted", "Jobs the broker confirmed", accepted.clone());
        let rejected = Family::<Reason, Counter>::default();
        registry.register(
            "gatehouse_requests_rejected",
            "Requests rejected, by problem type",
            rejected.clone(),
        );
        let late_replies = Counter::default();
        registry.register(
            "gatehouse_replies_late",
            "Replies that came after their request stopped waiting",
            late_replies.clone(),
        );
        let forged_replies = Counter::default();
        registry.register(
            "gatehouse_replies_forged",
            "Replies dropped: not sealed for the request they named, or altered",
            forged_replies.clone(),
        );
        let connected = Gauge::default();
        registry.register("gatehouse_broker_connected", "Whether the broker link is up", connected.clone());
        let requests = Family::<Request, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.000_25, 2.0, 18))
        });
        registry.register(
            "gatehouse_request_duration_seconds",
            "Time to answer an API request, by route and status",
            requests.clone(),
        );
        Self { registry, accepted, rejected, late_replies, forged_replies, connected, requests }
    }
}

impl Metrics {
    pub fn accepted(&self) {
        self.accepted.inc();
    }

    /// One rejection, by its problem type.
    pub fn rejected(&self, reason: &str) {
        self.rejected.get_or_create(&Reason { reason: reason.to_owned() }).inc();
    }

    /// One answered request of `route` (its pattern, e.g. `/v1/jobs/{id}`).
    pub fn request(&self, route: &str, status: u16, took: Duration) {
        self.requests.get_or_create(&Request { route: route.to_owned(), status }).observe(took.as_secs_f64());
    }

    /// The text exposition (OpenMetrics); `connected` is read at scrape time.
    pub fn render(&self, connected: bool) -> String {
        self.connected.set(i64::from(connected));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}
