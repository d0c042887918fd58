//! What the worker decided since it started, and its latest failures and dead letters: the
//! ring the dashboard shows, fed where the metrics are counted. Metadata only.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Mutex, PoisonError};

use gatehouse_protocol::clock::now_ms;
use serde::Serialize;

use crate::reasons::DeadReason;

/// What happened to a job, as the dashboard lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Failed,
    DeadLettered,
}

/// How many failures and dead letters the dashboard remembers.
const RECENT: usize = 50;

/// A failure or dead letter, as the dashboard shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Event {
    pub at_ms: u64,
    pub event: EventKind,
    /// The job's id; for a message that could not be opened, the id it claims (if any).
    pub job_id: Option<String>,
    pub kind: Option<String>,
    /// The queue class it came from.
    pub queue: Option<String>,
    /// Why it was dead-lettered.
    pub reason: Option<DeadReason>,
    pub attempts: Option<u32>,
}

/// What the worker decided since it started, and its latest failures.
#[derive(Default)]
pub struct Activity {
    inner: Mutex<Inner>,
}

#[derive(Default)]
pub(super) struct Inner {
    /// (kind, outcome) -> jobs.
    pub(super) decided: BTreeMap<(String, String), u64>,
    pub(super) recent: VecDeque<Event>,
}

impl Activity {
    pub(super) fn with<R>(&self, f: impl FnOnce(&mut Inner) -> R) -> R {
        f(&mut self.inner.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// A job of `kind` was decided with `outcome`; failures are remembered.
    pub fn decided(&self, kind: &str, outcome: &str, job_id: &str) {
        self.with(|i| {
            *i.decided.entry((kind.to_owned(), outcome.to_owned())).or_default() += 1;
            if outcome == "failed" {
                i.remember(Event {
                    at_ms: now_ms().unsigned_abs(),
                    event: EventKind::Failed,
                    job_id: Some(job_id.to_owned()),
                    kind: Some(kind.to_owned()),
                    queue: None,
                    reason: None,
                    attempts: None,
                });
            }
        });
    }

    /// A message was dead-lettered; one whose kind is known was a job, decided so.
    pub fn dead_lettered(&self, event: Event) {
        self.with(|i| {
            if let Some(kind) = &event.kind {
                *i.decided.entry((kind.clone(), "dead_lettered".into())).or_default() += 1;
            }
            i.remember(event);
        });
    }
}

impl Inner {
    fn remember(&mut self, event: Event) {
        if self.recent.len() == RECENT {
            self.recent.pop_back();
        }
        self.recent.push_front(event);
    }
}
