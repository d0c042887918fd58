//! A client's job list (`GET /v1/jobs`): what it asks for, what comes back, and its cursor.
//! Metadata only — id, kind, state, times, attempts; results stay behind `GET /v1/jobs/{id}`.

use serde::{Deserialize, Serialize};

use crate::JobState;
use crate::submit::{format_rfc3339_ms, parse_rfc3339_ms};

/// Jobs per page unless the client asks for fewer or more.
pub const DEFAULT_LIMIT: u32 = 50;
/// The most jobs one page holds.
pub const MAX_LIMIT: u32 = 500;

/// What a list asks the worker for (checked by the gatekeeper).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobQuery {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<JobState>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub submitted_after_ms: Option<u64>,
    /// Only the jobs of this batch of the client's (its id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch: Option<String>,
    /// Only the steps of this workflow of the client's (its id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workflow: Option<String>,
    /// Where the previous page ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cursor: Option<Cursor>,
    pub limit: u32,
}

/// The last job of a page: (when it was submitted, its id). Travels to clients as
/// `<ms>.<id>`, opaque to them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub submitted_at_ms: i64,
    pub id: String,
}

impl Cursor {
    /// As the API spells it.
    pub fn encode(&self) -> String {
        format!("{}.{}", self.submitted_at_ms, self.id)
    }

    /// `None` when `s` is not a cursor this API gave out.
    pub fn decode(s: &str) -> Option<Self> {
        let (ms, id) = s.split_once('.')?;
        let ok_id = !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_hexdigit());
        let ms = ms.parse::<i64>().ok().filter(|ms| *ms >= 0)?;
        ok_id.then(|| Self { submitted_at_ms: ms, id: id.to_owned() })
    }
}

/// One job of a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: String,
    pub kind: String,
    pub status: JobState,
    /// RFC 3339, when the gatekeeper accepted it.
    pub submitted_at: String,
    /// RFC 3339, its last change of state.
    pub updated_at: String,
    /// Attempts started, while it has not ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
}

impl JobSummary {
    pub fn new(id: String, kind: String, status: JobState, submitted_at_ms: i64, updated_at_ms: i64) -> Self {
        let at = |ms: i64| format_rfc3339_ms(u64::try_from(ms).unwrap_or(0));
        Self {
            id,
            kind,
            status,
            submitted_at: at(submitted_at_ms),
            updated_at: at(updated_at_ms),
            attempts: None,
        }
    }
}

/// One page of a list, newest first; `next_cursor` when there may be more.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobPage {
    pub jobs: Vec<JobSummary>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<String>,
}

/// A query parameter that does not hold: (its name, why).
pub type QueryError = (&'static str, String);

impl JobQuery {
    /// The query of `GET /v1/jobs?state=…&kind=…&submitted_after=…&limit=…&cursor=…`.
    ///
    /// # Errors
    /// Each parameter that does not hold, by name.
    pub fn from_params<'a>(
        params: impl IntoIterator<Item = (&'a str, &'a str)>,
    ) -> Result<Self, Vec<QueryError>> {
        let mut q = Self { limit: DEFAULT_LIMIT, ..Self::default() };
        let mut errors = Vec::new();
        for (name, value) in params {
            match name {
                "state" => match JobState::parse(value) {
                    Some(s) => q.state = Some(s),
                    None => errors.push(("state", format!("no job state is called {value:?}"))),
                },
                // Characters, as the document's maxLength counts them (not bytes).
                "kind" if (1..=128).contains(&value.chars().count()) => q.kind = Some(value.to_owned()),
                "kind" => errors.push(("kind", "must be 1 to 128 characters".into())),
                "submitted_after" => match parse_rfc3339_ms(value) {
                    Some(ms) => q.submitted_after_ms = Some(ms),
                    None => errors.push(("submitted_after", "must be an RFC 3339 time".into())),
                },
                "limit" => match value.parse::<u32>() {
                    Ok(n) if (1..=MAX_LIMIT).contains(&n) => q.limit = n,
                    _ => errors.push(("limit", format!("must be 1 to {MAX_LIMIT}"))),
                },
                "batch" | "workflow" if crate::JobId::parse(value).is_err() => {
                    errors.push((if name == "batch" { "batch" } else { "workflow" }, "is not an id".into()));
                }
                "batch" => q.batch = Some(value.to_owned()),
                "workflow" => q.workflow = Some(value.to_owned()),
                "cursor" => match Cursor::decode(value) {
                    Some(c) => q.cursor = Some(c),
                    None => errors.push(("cursor", "is not a cursor of this list".into())),
                },
                _ => {}
            }
        }
        if errors.is_empty() { Ok(q) } else { Err(errors) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_are_checked_and_cursors_round_trip() {
        let q = JobQuery::from_params([("state", "failed"), ("kind", "vault.put"), ("limit", "7")]).unwrap();
        assert_eq!((q.state, q.kind.as_deref(), q.limit), (Some(JobState::Failed), Some("vault.put"), 7));
        assert_eq!(JobQuery::from_params([]).unwrap().limit, DEFAULT_LIMIT);
        let wide = "é".repeat(128);
        assert_eq!(
            JobQuery::from_params([("kind", wide.as_str())]).unwrap().kind.as_deref(),
            Some(wide.as_str())
        );
        let bad = JobQuery::from_params([
            ("state", "nope"),
            ("limit", "501"),
            ("cursor", "x"),
            ("submitted_after", "y"),
        ])
        .unwrap_err();
        let names: Vec<&str> = bad.iter().map(|(n, _)| *n).collect();
        assert_eq!(names, ["state", "limit", "cursor", "submitted_after"]);
        let c = Cursor { submitted_at_ms: 1_700_000_000_123, id: "01a2ff".into() };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("-1.ab"), None);
        assert_eq!(Cursor::decode("12.not-hex"), None);
    }
}
