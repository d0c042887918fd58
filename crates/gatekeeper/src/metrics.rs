//! Counters, served as Prometheus text on the admin listener (`/metrics`).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// What the gatekeeper counts.
#[derive(Debug, Default)]
pub struct Metrics {
    accepted: AtomicU64,
    rejected: Mutex<BTreeMap<String, u64>>,
}

impl Metrics {
    pub fn accepted(&self) {
        self.accepted.fetch_add(1, Ordering::Relaxed);
    }

    /// One rejection, by its problem type.
    pub fn rejected(&self, reason: &str) {
        *self
            .rejected
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(reason.to_owned())
            .or_default() += 1;
    }

    /// The Prometheus text exposition; `late` and `forged` come from the reply consumer.
    pub fn render(&self, late_replies: u64, forged_replies: u64, connected: bool) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# HELP gatehouse_jobs_accepted_total Jobs the broker confirmed.");
        let _ = writeln!(out, "# TYPE gatehouse_jobs_accepted_total counter");
        let _ = writeln!(out, "gatehouse_jobs_accepted_total {}", self.accepted.load(Ordering::Relaxed));
        let _ = writeln!(out, "# HELP gatehouse_requests_rejected_total Submits rejected, by problem type.");
        let _ = writeln!(out, "# TYPE gatehouse_requests_rejected_total counter");
        for (reason, n) in self.rejected.lock().unwrap_or_else(std::sync::PoisonError::into_inner).iter() {
            let _ = writeln!(out, "gatehouse_requests_rejected_total{{reason=\"{reason}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP gatehouse_replies_late_total Replies that came after their request stopped waiting."
        );
        let _ = writeln!(out, "# TYPE gatehouse_replies_late_total counter");
        let _ = writeln!(out, "gatehouse_replies_late_total {late_replies}");
        let _ = writeln!(
            out,
            "# HELP gatehouse_replies_forged_total Replies dropped: not sealed by the worker, or altered."
        );
        let _ = writeln!(out, "# TYPE gatehouse_replies_forged_total counter");
        let _ = writeln!(out, "gatehouse_replies_forged_total {forged_replies}");
        let _ = writeln!(out, "# HELP gatehouse_broker_connected Whether the broker link is up.");
        let _ = writeln!(out, "# TYPE gatehouse_broker_connected gauge");
        let _ = writeln!(out, "gatehouse_broker_connected {}", u8::from(connected));
        out
    }
}
