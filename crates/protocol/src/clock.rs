//! The one clock every component reads: Unix time in milliseconds.
//!
//! Signed, as storage keeps times (`BIGINT`/`INTEGER`); where the wire carries an unsigned
//! time, compare with `now_ms().unsigned_abs()` (a time before 1970 reads as 0).

use std::time::{SystemTime, UNIX_EPOCH};

/// Milliseconds since the Unix epoch (0 if the system clock is set before it).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
