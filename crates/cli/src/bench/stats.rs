//! Latency percentiles and error counts of one scenario.

use std::collections::BTreeMap;
use std::time::Duration;

/// What one scenario measured.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub latencies: Vec<Duration>,
    /// Non-success answers by HTTP status (`0`: the request failed without an answer).
    pub errors: BTreeMap<u16, u64>,
    /// How long the measured phase took (the longest of its clients).
    pub elapsed: Duration,
}

/// Requests a phase may still send, shared by its clients.
#[derive(Debug, Clone)]
pub struct Budget(std::sync::Arc<std::sync::atomic::AtomicU64>);

impl Budget {
    pub fn new(n: u64) -> Self {
        Self(std::sync::Arc::new(n.into()))
    }

    /// Takes one request from the budget; false when it is spent.
    pub fn take(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.0.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1)).is_ok()
    }
}

impl Samples {
    /// Adds what another client measured over the same phase.
    pub fn merge(&mut self, other: Samples) {
        self.latencies.extend(other.latencies);
        self.elapsed = self.elapsed.max(other.elapsed);
        for (k, v) in other.errors {
            *self.errors.entry(k).or_default() += v;
        }
    }

    /// Appends a later phase of the same measurement (its time adds up).
    pub fn then(&mut self, later: Samples) {
        let elapsed = self.elapsed + later.elapsed;
        self.merge(later);
        self.elapsed = elapsed;
    }

    pub fn error(&mut self, status: u16) {
        *self.errors.entry(status).or_default() += 1;
    }

    /// The `q`-quantile (0..=1) in milliseconds, nearest rank; 0 without samples.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        let mut sorted = self.latencies.clone();
        sorted.sort_unstable();
        if sorted.is_empty() {
            return 0.0;
        }
        let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
        sorted[rank - 1].as_secs_f64() * 1000.0
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_quantiles() {
        let s = Samples { latencies: (1..=100).map(Duration::from_millis).collect(), ..Default::default() };
        assert_eq!(s.quantile_ms(0.5), 50.0);
        assert_eq!(s.quantile_ms(0.99), 99.0);
        assert_eq!(s.quantile_ms(1.0), 100.0);
        assert_eq!(Samples::default().quantile_ms(0.5), 0.0);
    }
}
