//! The operator dashboard on the admin listener: a page (`/`, with its script and style from
//! the same origin, no external assets) over one JSON document (`/dashboard.json`): queue
//! depths, jobs decided by kind and outcome since the worker started, parked jobs, what is
//! paused, and the latest failures and dead letters with their reason. Read-only, but for the
//! pause and resume buttons, which are there only behind the admin auth (`super::pauses`).
//!
//! Metadata only: job ids, kinds, queue classes, reasons and attempt counts. Never a payload,
//! a result or an error text (a handler's error may quote the data it choked on).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::IntoResponse;
use gatehouse_broker::Topology;
use gatehouse_broker::lapin::Channel;
use gatehouse_broker::lapin::options::QueueDeclareOptions;
use gatehouse_broker::lapin::types::FieldTable;
use serde::Serialize;

use gatehouse_protocol::clock::now_ms;

use super::Admin;
use super::activity::Event;

/// The broker as the dashboard sees it: a channel of the current session (none while
/// disconnected) to ask queue depths on.
pub struct BrokerView {
    topology: Topology,
    /// Each class and its routes (its queue, lanes and fair shards).
    classes: Vec<(String, Vec<String>)>,
    channel: tokio::sync::Mutex<Option<Channel>>,
}

impl BrokerView {
    pub fn new(topology: Topology, classes: Vec<(String, Vec<String>)>) -> Arc<Self> {
        Arc::new(Self { topology, classes, channel: tokio::sync::Mutex::new(None) })
    }

    /// The channel of a new broker session.
    pub async fn connected(&self, channel: Channel) {
        *self.channel.lock().await = Some(channel);
    }

    /// Each class's depth (summed over its queues: lanes and fair shards), and the dead
    /// letters'.
    async fn depths(&self) -> Vec<QueueDepth> {
        let mut queues: Vec<(String, Option<String>, Vec<String>)> = self
            .classes
            .iter()
            .map(|(c, routes)| {
                let names = routes.iter().map(|r| self.topology.job_queue(r)).collect();
                (self.topology.job_queue(c), Some(c.clone()), names)
            })
            .collect();
        queues.push((self.topology.dead_queue(), None, vec![self.topology.dead_queue()]));
        let mut channel = self.channel.lock().await;
        let mut out = Vec::with_capacity(queues.len());
        for (name, class, names) in queues {
            let mut depth = QueueDepth { name, class, queues: names.len(), messages: None, consumers: None };
            let mut sum = Some((0, 0));
            for queue in &names {
                let Some(ch) = channel.as_ref() else {
                    sum = None;
                    break;
                };
                let passive = QueueDeclareOptions { passive: true, ..Default::default() };
                match ch.queue_declare(queue.as_str().into(), passive, FieldTable::default()).await {
                    Ok(q) => {
                        // Every worker consumes each of them: the most any has.
                        sum = sum.map(|(m, c)| (m + q.message_count(), c.max(q.consumer_count())));
                    }
                    // The channel is gone (connection lost, or the queue is): unknown until
                    // the next session.
                    Err(e) => {
                        tracing::debug!(error = %e, queue, "dashboard: no queue depth");
                        *channel = None;
                        sum = None;
                    }
                }
            }
            (depth.messages, depth.consumers) = (sum.map(|s| s.0), sum.map(|s| s.1));
            out.push(depth);
        }
        out
    }
}

#[derive(Serialize)]
struct QueueDepth {
    name: String,
    /// The queue class; none for the dead-letter queue.
    class: Option<String>,
    /// How many broker queues it is (lanes, fair shards).
    queues: usize,
    /// Unknown while the worker has no broker session.
    messages: Option<u32>,
    /// The consumers of each of its queues (every worker consumes all of them).
    consumers: Option<u32>,
}

#[derive(Serialize)]
struct KindCounts {
    kind: String,
    queue: Option<String>,
    decided: BTreeMap<String, u64>,
}

#[derive(Serialize)]
struct Snapshot {
    at_ms: u64,
    ready: bool,
    queues: Vec<QueueDepth>,
    kinds: Vec<KindCounts>,
    parked: Option<u64>,
    /// Delayed jobs held until their time.
    scheduled: Option<u64>,
    recent: Vec<Event>,
    /// Kinds and queue classes paused (`kind:<name>`, `queue:<class>`): since when, how many
    /// jobs each holds; `None` when storage could not be read.
    paused: Option<Vec<PausedView>>,
    /// Whether the page may pause and resume (only behind the admin auth).
    controls: bool,
}

#[derive(Serialize)]
struct PausedView {
    target: String,
    since_ms: i64,
    held: u64,
}

/// `GET /dashboard.json`.
pub async fn snapshot(State(a): State<Admin>) -> impl IntoResponse {
    let queues = a.broker.depths().await;
    let paused = a.store.read(|tx| tx.pauses()).await.ok().map(|ps| {
        ps.into_iter().map(|p| PausedView { target: p.target, since_ms: p.since_ms, held: p.held }).collect()
    });
    let (parked, scheduled) = a.metrics.refresh_waiting(&a.store).await;
    let (decided, recent) =
        a.metrics.activity.with(|i| (i.decided.clone(), i.recent.iter().cloned().collect()));
    let mut kinds: BTreeMap<String, KindCounts> = a
        .catalog
        .kinds()
        .map(|k| {
            let counts =
                KindCounts { kind: k.name.clone(), queue: Some(k.queue.clone()), decided: BTreeMap::new() };
            (k.name.clone(), counts)
        })
        .collect();
    for ((kind, outcome), n) in decided {
        kinds
            .entry(kind.clone())
            .or_insert_with(|| KindCounts { kind, queue: None, decided: BTreeMap::new() })
            .decided
            .insert(outcome, n);
    }
    let body = Snapshot {
        at_ms: now_ms().unsigned_abs(),
        ready: a.metrics.ready.load(std::sync::atomic::Ordering::Relaxed),
        queues,
        kinds: kinds.into_values().collect(),
        parked,
        scheduled,
        recent,
        paused,
        controls: a.credentials.is_some(),
    };
    ([(header::CACHE_CONTROL, "no-store")], axum::Json(body))
}

/// One job as the dashboard shows it: metadata only (never its result, error text or payload).
#[derive(Serialize)]
struct JobView {
    id: String,
    kind: String,
    client: String,
    status: String,
    reason: Option<String>,
    /// Its state transitions, in order (at most [`JOB_EVENTS`]).
    events: Vec<gatehouse_protocol::JobEvent>,
}

/// The most state transitions a job's view lists.
const JOB_EVENTS: u32 = 200;

/// `GET /jobs/{id}`: a job's state and its transitions, for an id the page shows; `404` for one
/// storage does not know (or no longer: pruned).
pub async fn job(State(a): State<Admin>, Path(id): Path<String>) -> axum::response::Response {
    use axum::http::StatusCode;
    let Ok(id) = gatehouse_protocol::JobId::parse(&id) else {
        return (StatusCode::NOT_FOUND, "no such job").into_response();
    };
    let read = a
        .store
        .read(move |tx| {
            let Some(job) = tx.job(&id)? else { return Ok(None) };
            let events = tx.job_events(&id, &job.client, 0, JOB_EVENTS)?;
            Ok::<_, gatehouse_storage::StorageError>(Some(JobView {
                id: id.as_str().to_owned(),
                kind: job.kind,
                client: job.client,
                status: job.state.as_str().to_owned(),
                reason: job.reason,
                events,
            }))
        })
        .await;
    match read {
        Ok(Some(view)) => ([(header::CACHE_CONTROL, "no-store")], axum::Json(view)).into_response(),
        Ok(None) => (StatusCode::NOT_FOUND, "no such job").into_response(),
        Err(e) => {
            tracing::warn!(error = %e, "dashboard: a job could not be read");
            (StatusCode::SERVICE_UNAVAILABLE, "storage did not answer").into_response()
        }
    }
}

/// `GET /`: the page; it renders from `/dashboard.json` with `/dashboard.js`.
pub async fn page() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], include_str!("dashboard/index.html"))
}

pub async fn script() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/javascript; charset=utf-8")], include_str!("dashboard/dashboard.js"))
}

pub async fn style() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], include_str!("dashboard/dashboard.css"))
}
