//! Why a message was dead-lettered, as one type. Its label is the one string every reader
//! sees: the `x-gatehouse-reason` header, the stored job's `reason`, the dead-letter metric's
//! label and the dashboard.

use std::fmt;

/// Why a message went to `gatehouse.dead`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeadReason {
    /// No session, one no trusted key signed, or a MAC that does not check.
    BadSignature,
    /// Submitted (or due) longer ago than `max_message_age_s`, or in the future.
    Stale,
    /// Signed, but the body is not a job.
    Undecodable,
    /// Authentic, but the payload does not open in its session.
    Unsealable,
    /// Written in another format version.
    UnsupportedVersion,
    /// Delivered from another class's queue or at another priority than vouched for.
    Misrouted,
    /// A replay without a valid operator grant, or with one for an earlier dead letter.
    ReplayRefused,
    /// A kind this worker does not run.
    UnknownKind,
    /// Attempts used up.
    MaxAttempts,
    /// Would park past the client's `max_parked_per_client`.
    ParkedLimit,
    /// Would be held delayed past the client's `max_delayed_per_client`.
    DelayedLimit,
    /// Would wait for a singleton turn past the client's `max_waiting_per_client`.
    WaitingLimit,
    /// Parked longer than the kind's `gap_timeout_s` for its predecessor.
    SequenceGapTimeout,
}

impl DeadReason {
    /// Every reason, for tests and documentation.
    pub const ALL: [Self; 13] = [
        Self::BadSignature,
        Self::Stale,
        Self::Undecodable,
        Self::Unsealable,
        Self::UnsupportedVersion,
        Self::Misrouted,
        Self::ReplayRefused,
        Self::UnknownKind,
        Self::MaxAttempts,
        Self::ParkedLimit,
        Self::DelayedLimit,
        Self::WaitingLimit,
        Self::SequenceGapTimeout,
    ];

    /// The label on the wire, in storage and in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadSignature => "bad_signature",
            Self::Stale => "stale",
            Self::Undecodable => "undecodable",
            Self::Unsealable => "unsealable",
            Self::UnsupportedVersion => "unsupported_version",
            Self::Misrouted => "misrouted",
            Self::ReplayRefused => "replay_refused",
            Self::UnknownKind => "unknown_kind",
            Self::MaxAttempts => "max_attempts",
            Self::ParkedLimit => "parked_limit",
            Self::DelayedLimit => "delayed_limit",
            Self::WaitingLimit => "waiting_limit",
            Self::SequenceGapTimeout => "sequence_gap_timeout",
        }
    }
}

impl fmt::Display for DeadReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::DeadReason;

    #[test]
    fn the_label_is_the_serialized_name_and_each_is_distinct() {
        let mut seen = std::collections::HashSet::new();
        for r in DeadReason::ALL {
            assert_eq!(serde_json::to_value(r).unwrap(), serde_json::json!(r.as_str()));
            assert!(seen.insert(r.as_str()), "{r} twice");
        }
    }
}
