//! Reconnecting: capped exponential backoff that says so once per outage.
//!
//! Both components wait for a broker that is not there yet (a service manager or a compose
//! deployment starts everything at once) and for one that went away. An outage is reported in
//! one line when it starts and one when it ends, not once per attempt; the attempts in between
//! log at debug level.

use std::time::Duration;

/// Backoff state across the attempts of one outage.
#[derive(Debug)]
pub struct Backoff {
    first: Duration,
    next: Duration,
    max: Duration,
    /// Failures since the last success.
    failures: u32,
}

impl Backoff {
    /// Starts at `first`, doubling to at most `max`.
    pub fn new(first: Duration, max: Duration) -> Self {
        Self { first, next: first, max, failures: 0 }
    }

    /// Records a failed attempt; answers how long to wait before the next one. The first
    /// failure of an outage is logged (at INFO when `expected`, as while waiting for a broker or
    /// topology that is still starting; at WARN otherwise), the rest at debug level.
    pub fn failed(&mut self, what: &str, error: &dyn std::fmt::Display, expected: bool) -> Duration {
        let delay = self.next;
        if self.failures == 0 {
            if expected {
                tracing::info!(error = %error, max_backoff = ?self.max, "{what}; waiting");
            } else {
                tracing::warn!(error = %error, max_backoff = ?self.max, "{what}; retrying");
            }
        } else {
            tracing::debug!(error = %error, ?delay, attempt = self.failures + 1, "{what}; retrying");
        }
        self.failures += 1;
        self.next = (self.next * 2).min(self.max);
        delay
    }

    /// Records a success; answers whether it ended an outage (so the caller can say so).
    pub fn succeeded(&mut self) -> bool {
        let ended = self.failures > 0;
        self.failures = 0;
        self.next = self.first;
        ended
    }
}

/// Whether a connect/declare error means the topology is not declared yet (`NOT_FOUND`): the
/// gatekeeper's broker user may not declare it, the worker does, and may simply not have yet.
pub fn is_missing_topology(error: &anyhow::Error) -> bool {
    format!("{error:#}").contains("NOT_FOUND")
}

/// Whether an error means nothing answered at the broker's address (refused, unreachable),
/// as while it starts or restarts.
pub fn is_unreachable(error: &anyhow::Error) -> bool {
    error.chain().any(|e| {
        e.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused
                    | std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::NotConnected
                    | std::io::ErrorKind::TimedOut
            )
        })
    }) || error
        .chain()
        .any(|e| matches!(e.downcast_ref::<crate::ConnectError>(), Some(crate::ConnectError::Timeout)))
        || format!("{error:#}").contains("Connection refused")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_to_its_cap_and_starts_over_after_a_success() {
        let mut b = Backoff::new(Duration::from_millis(250), Duration::from_secs(1));
        let delays: Vec<_> = (0..4).map(|_| b.failed("x", &"e", true).as_millis()).collect();
        assert_eq!(delays, [250, 500, 1000, 1000]);
        assert!(b.succeeded());
        assert!(!b.succeeded());
        assert_eq!(b.failed("x", &"e", true).as_millis(), 250);
    }
}
