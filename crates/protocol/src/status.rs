//! Job states and the status document that the worker replies and the API returns.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::JobId;

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    /// Accepted, waiting for its `not_before` time (a delayed job).
    Scheduled,
    Running,
    WaitingForSequence,
    /// A singleton job waiting for the one of its kind (or key) that runs now to end.
    WaitingForTurn,
    /// Accepted and held: an operator paused its kind or queue class (`gatehouse pause`).
    Paused,
    /// Held until its reserved start: its kind's start rate was used up.
    Throttled,
    /// Held until every job it names in `after` is decided.
    WaitingForParents,
    Retrying,
    Succeeded,
    Failed,
    DeadLettered,
    /// Cancelled by its client before it ran (or while it ran, by a handler that stopped).
    Cancelled,
    /// Only on the wire between worker and gatekeeper: no such job for this client.
    NotFound,
    /// Only on the wire between worker and gatekeeper: the job is older than the worker's
    /// retention — its record was pruned, or it never ran and now never will.
    Expired,
}

impl JobState {
    /// The wire name, as stored and as shown to clients.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Scheduled => "scheduled",
            Self::Running => "running",
            Self::WaitingForSequence => "waiting_for_sequence",
            Self::WaitingForTurn => "waiting_for_turn",
            Self::Paused => "paused",
            Self::Throttled => "throttled",
            Self::WaitingForParents => "waiting_for_parents",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::DeadLettered => "dead_lettered",
            Self::Cancelled => "cancelled",
            Self::NotFound => "not_found",
            Self::Expired => "expired",
        }
    }

    /// Parses a stored state name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            Self::Queued,
            Self::Scheduled,
            Self::Running,
            Self::WaitingForSequence,
            Self::WaitingForTurn,
            Self::Paused,
            Self::Throttled,
            Self::WaitingForParents,
            Self::Retrying,
            Self::Succeeded,
            Self::Failed,
            Self::DeadLettered,
            Self::Cancelled,
            Self::NotFound,
            Self::Expired,
        ]
        .into_iter()
        .find(|s2| s2.as_str() == s)
    }

    /// Succeeded, failed, dead-lettered or cancelled: nothing more will happen.
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::DeadLettered | Self::Cancelled)
    }
}

/// The status of one job: the worker's reply body, and the API's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub id: JobId,
    pub status: JobState,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
    /// Why the job failed (state `failed`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The next sequence number the job's key waits for (state `waiting_for_sequence`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<u64>,
    /// Why the job was dead-lettered (state `dead_lettered`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// When it runs (state `scheduled`), RFC 3339 UTC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_before: Option<String>,
    /// What its handler last said of its progress (while it runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// Only on the wire between worker and gatekeeper, answering an events query: the job's
    /// state transitions after the one asked from, oldest first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<Vec<JobEvent>>,
}

/// One state transition of a job, numbered from 1 in the order they happened.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobEvent {
    pub seq: u64,
    pub status: JobState,
    /// Unix ms.
    pub at_ms: u64,
}

/// A running job's progress, as its handler reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// 0 to 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u8>,
    /// A short note (at most [`Progress::MAX_MESSAGE`] characters, no control characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

impl Progress {
    /// Longest message kept, in characters.
    pub const MAX_MESSAGE: usize = 200;

    /// A progress report made safe to keep and show: the percent capped at 100, the message
    /// without control characters, trimmed and cut to [`Progress::MAX_MESSAGE`] characters.
    pub fn new(percent: Option<u8>, message: &str) -> Self {
        let message: String = message
            .chars()
            .filter(|c| !c.is_control())
            .take(Self::MAX_MESSAGE)
            .collect::<String>()
            .trim()
            .to_owned();
        Self { percent: percent.map(|p| p.min(100)), message: (!message.is_empty()).then_some(message) }
    }
}

impl JobStatus {
    /// A status with only id and state set.
    pub fn new(id: JobId, status: JobState) -> Self {
        Self {
            id,
            status,
            result: None,
            error: None,
            expected: None,
            reason: None,
            not_before: None,
            progress: None,
            events: None,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn progress_is_capped_and_its_message_cleaned() {
        let p = super::Progress::new(Some(140), "  copying\u{7} \u{1b}[31mfiles  ");
        assert_eq!(p.percent, Some(100));
        assert_eq!(p.message.as_deref(), Some("copying [31mfiles"));
        assert_eq!(super::Progress::new(None, "x".repeat(500).as_str()).message.unwrap().len(), 200);
        assert_eq!(super::Progress::new(Some(5), " \n ").message, None);
    }

    use super::*;

    #[test]
    fn state_names_round_trip() {
        for s in ["queued", "running", "waiting_for_sequence", "succeeded", "failed"] {
            assert_eq!(JobState::parse(s).unwrap().as_str(), s);
        }
        assert!(JobState::parse("bogus").is_none());
    }
}
