//! Stream mode: long-lived children, one JSON line per job each way.
//!
//! A job goes to an idle child **of its own client** (or a new one) as one line
//! `{"id", "kind", "client", "attempt", "checkpoint", "payload"}` (and `"parents"`, for a kind
//! that declares `parent_results`); the child answers one line
//! `{"id", "result"}` or `{"id", "error", "retryable"}`, after any number of
//! `{"id", "progress": {...}}` / `{"id", "checkpoint"}` lines. A child that dies, answers out
//! of protocol, or hangs past the deadline is killed and replaced; its job's attempt counts
//! (retryable).
//!
//! Clients never share a child (nor its folder or uid): a child one client's payload
//! compromised never sees another client's jobs. At most `processes` children exist per kind;
//! a job takes a slot ([`Pool::slot`], through [`super::ExternalHandler::reserve`]) before its
//! attempt counts and its timeout starts, so other clients' slow jobs never make it time out.
//! With every slot's child busy or idle, a client without a child of its own takes the place
//! of another client's idle one; children idle for `idle_s` are stopped.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::stderr::{self, Checkpoints, MAX_ERROR_LINE, truncate};
use super::{Exec, Tree};
use crate::handlers::{JobContext, Outcome};

/// A stream kind's children, by client, and the slots that bound them.
pub struct Pool {
    slots: Arc<Semaphore>,
    capacity: usize,
    idle: Mutex<HashMap<String, Vec<Idle>>>,
    /// Told when a child comes back idle.
    returned: tokio::sync::Notify,
}

/// What [`Pool::take`] found.
enum Take {
    Own(Box<StreamChild>),
    Spawn,
    Wait,
}

/// How long a job waits for its own client's child to come back before another client's idle
/// child is stopped to make room for a new one: starting a process costs ~40 ms of CPU, an
/// exchange a few ms. Without it, more clients than processes made nearly every job start one.
const PATIENCE: Duration = Duration::from_millis(50);

struct Idle {
    child: StreamChild,
    since: Instant,
}

impl Pool {
    pub fn new(capacity: usize) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(capacity)),
            capacity,
            idle: Mutex::default(),
            returned: Default::default(),
        }
    }

    /// A process slot (first come, first served); `None` when the worker is stopping.
    pub async fn slot(&self) -> Option<OwnedSemaphorePermit> {
        self.slots.clone().acquire_owned().await.ok()
    }

    fn idle(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Idle>>> {
        self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// `client`'s idle child, if it has one (`Own`); `Spawn` when a new one may start (a slot
    /// without a child, or another client's idle child stopped to make room for it); `Wait`
    /// when every slot has a child and none is idle — or, within [`PATIENCE`], when the only
    /// idle ones are other clients': its own may come back sooner than a new one starts.
    fn take(&self, client: &str, patient: bool) -> Take {
        let mut idle = self.idle();
        if let Some(c) = idle.get_mut(client).and_then(Vec::pop) {
            if idle.get(client).is_some_and(Vec::is_empty) {
                idle.remove(client);
            }
            return Take::Own(Box::new(c.child));
        }
        let busy = self.capacity - self.slots.available_permits();
        let parked: usize = idle.values().map(Vec::len).sum();
        // `busy` counts this job's own slot: it has no child yet.
        if busy.saturating_sub(1) + parked < self.capacity {
            return Take::Spawn;
        }
        if parked == 0 || patient {
            return Take::Wait;
        }
        let oldest = idle
            .iter()
            .filter_map(|(k, v)| v.first().map(|c| (k.clone(), c.since)))
            .min_by_key(|(_, since)| *since)
            .map(|(k, _)| k);
        if let Some(k) = oldest {
            let list = idle.get_mut(&k).expect("just found");
            drop(list.remove(0));
            if list.is_empty() {
                idle.remove(&k);
            }
        }
        Take::Spawn
    }

    /// A child for `client` (see [`Pool::take`]): its own as soon as one is idle, else a new
    /// one once [`PATIENCE`] has passed and a place can be made.
    async fn child(
        &self,
        client: &str,
        spawn: impl Fn() -> std::io::Result<StreamChild>,
    ) -> std::io::Result<StreamChild> {
        let since = Instant::now();
        loop {
            let returned = self.returned.notified();
            tokio::pin!(returned);
            returned.as_mut().enable();
            match self.take(client, since.elapsed() < PATIENCE) {
                Take::Own(c) => return Ok(*c),
                Take::Spawn => return spawn(),
                Take::Wait => {
                    let left = PATIENCE.saturating_sub(since.elapsed()).max(Duration::from_millis(1));
                    let _ = tokio::time::timeout(left, returned).await;
                }
            }
        }
    }

    fn put_back(&self, client: &str, child: StreamChild) {
        self.idle().entry(client.to_owned()).or_default().push(Idle { child, since: Instant::now() });
        self.returned.notify_waiters();
    }

    /// Stops the children idle for longer than `idle_for`.
    fn reap(&self, idle_for: Duration) {
        let mut idle = self.idle();
        for list in idle.values_mut() {
            list.retain(|c| c.since.elapsed() < idle_for);
        }
        idle.retain(|_, list| !list.is_empty());
    }
}

/// Stops `exec`'s idle children every so often, until the kind is gone.
pub fn reap_idle(exec: Weak<Exec>, idle_for: Duration) {
    let every = (idle_for / 4).max(Duration::from_millis(250));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let Some(exec) = exec.upgrade() else { return };
            exec.pool.reap(idle_for);
        }
    });
}

/// One long-lived child of a stream kind: its pipes, its process tree (killed with it), its
/// input folder (removed with it).
pub struct StreamChild {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
    tree: Tree,
    _dir: tempfile::TempDir,
}

/// A stream child's answer to one job.
#[derive(serde::Deserialize)]
struct StreamAnswer {
    id: String,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    error: Option<String>,
    #[serde(default)]
    retryable: bool,
}

/// A stream child's line about the job it runs that is not its answer.
#[derive(serde::Deserialize)]
#[serde(untagged, deny_unknown_fields)]
enum StreamNote {
    Progress { id: String, progress: StreamProgressValue },
    Checkpoint { id: String, checkpoint: Value },
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamProgressValue {
    #[serde(default)]
    percent: Option<u8>,
    #[serde(default)]
    message: String,
}

/// The outcome a child's answer line says, if it is an answer to `job` in the protocol.
fn outcome_of(job: &JobContext, answer: &[u8]) -> Option<Outcome> {
    match serde_json::from_slice::<StreamAnswer>(answer) {
        Ok(a) if a.id != job.id.as_str() => None,
        Ok(StreamAnswer { result: Some(r), error: None, .. }) => Some(Outcome::Success(r)),
        Ok(StreamAnswer { error: Some(e), retryable, .. }) => {
            let e = truncate(&e, MAX_ERROR_LINE).to_owned();
            Some(if retryable { Outcome::Retryable(e) } else { Outcome::Permanent(e) })
        }
        _ => None,
    }
}

impl Exec {
    /// Runs one job on a child of its client (see the module docs).
    /// The slot taken before the attempt counted; a direct call takes its own (held until the
    /// attempt ends).
    async fn slot_for(&self, job: &JobContext) -> Result<Option<OwnedSemaphorePermit>, Outcome> {
        if job.reservation::<OwnedSemaphorePermit>().is_some() {
            return Ok(None);
        }
        match self.pool.slot().await {
            Some(slot) => Ok(Some(slot)),
            None => Err(Outcome::Retryable("the worker is stopping".into())),
        }
    }

    pub(super) async fn run_streamed(&self, job: JobContext, payload: Value) -> Outcome {
        let _own_slot = match self.slot_for(&job).await {
            Ok(slot) => slot,
            Err(stopping) => return stopping,
        };
        let mut child = match self.pool.child(&job.client, || self.spawn_stream_child(&job.client)).await {
            Ok(c) => c,
            Err(e) => return Outcome::Retryable(format!("could not start {}: {e}", self.kind)),
        };
        let line = job_line(&job, payload);
        let max = self.spec.max_output_bytes;
        let mut cancel = job.clone();
        let mut checkpoints = Checkpoints::default();
        let exchange = {
            let exchange = tokio::time::timeout_at(job.deadline.into(), async {
                let mut out = serde_json::to_vec(&line).map_err(std::io::Error::other)?;
                out.push(b'\n');
                child.stdin.write_all(&out).await?;
                child.stdin.flush().await?;
                loop {
                    let mut answer = Vec::new();
                    let n = (&mut child.stdout).take(max as u64 + 1).read_until(b'\n', &mut answer).await?;
                    if n == 0 {
                        return Err(std::io::Error::other("it exited without answering"));
                    }
                    if !answer.ends_with(b"\n") {
                        return Err(std::io::Error::other(format!("its answer is over {max} bytes")));
                    }
                    // A report, or a checkpoint to keep (at most once a second, the latest of
                    // a burst when the attempt ends), before the answer.
                    match serde_json::from_slice::<StreamNote>(&answer) {
                        Ok(StreamNote::Progress { id, progress: p }) if id == job.id.as_str() => {
                            job.progress(p.percent, &p.message);
                        }
                        Ok(StreamNote::Checkpoint { id, checkpoint }) if id == job.id.as_str() => {
                            checkpoints.offer(&job, checkpoint).await.map_err(std::io::Error::other)?;
                        }
                        _ => return Ok(answer),
                    }
                }
            });
            tokio::pin!(exchange);
            tokio::select! {
                exchange = &mut exchange => Some(exchange),
                () = cancel.cancelled() => {
                    // Cancelled: its processes get SIGTERM, and the child is dropped (SIGKILL,
                    // then replaced) after the grace period if it has not answered.
                    child.tree.terminate();
                    let _ = tokio::time::timeout(crate::handlers::CANCEL_GRACE, &mut exchange).await;
                    None
                }
            }
        };
        checkpoints.flush(&job).await;
        let Some(exchange) = exchange else { return Outcome::Cancelled };
        // A child in trouble is dropped here: its tree is killed, and a new one starts for the
        // next job.
        let answer = match exchange {
            Err(_) => {
                return Outcome::Retryable(format!("{} timed out; its process was replaced", self.kind));
            }
            Ok(Err(e)) => return Outcome::Retryable(format!("{}: {e}; its process was replaced", self.kind)),
            Ok(Ok(answer)) => answer,
        };
        match outcome_of(&job, &answer) {
            Some(o) => {
                // Healthy: back to its client's idle children for the client's next job.
                self.pool.put_back(&job.client, child);
                o
            }
            None => Outcome::Retryable(format!(
                "{} answered out of protocol; its process was replaced",
                self.kind
            )),
        }
    }

    fn spawn_stream_child(&self, client: &str) -> std::io::Result<StreamChild> {
        let dir = tempfile::Builder::new().prefix("gatehouse-stream-").tempdir()?;
        let env = [("GATEHOUSE_KIND", self.kind.clone()), ("GATEHOUSE_CLIENT", client.to_owned())];
        let mut child = self.sandbox.command(&self.spec, client, dir.path(), &env)?.spawn()?;
        let tree = Tree { pid: child.id(), sandboxed: self.sandbox.confines() };
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(std::io::Error::other("no pipes to the child"));
        };
        let (log, label) = (self.spec.log_stderr, format!("{} stream process {:?}", self.kind, child.id()));
        // Its stderr, for as long as it lives: lines bounded, nothing kept but the last one.
        tokio::spawn(async move {
            let mut none = Checkpoints::default();
            let _ = stderr::read(stderr, u64::MAX, log, &label, None, &mut none).await;
        });
        Ok(StreamChild { _child: child, stdin, stdout: tokio::io::BufReader::new(stdout), tree, _dir: dir })
    }
}

/// The line a stream child is given for `job`.
fn job_line(job: &JobContext, payload: Value) -> Value {
    let mut line = serde_json::json!({
        "id": job.id, "kind": job.kind, "client": job.client, "attempt": job.attempt,
        "checkpoint": job.checkpoint(), "payload": payload,
    });
    if let Some(parents) = job.parents() {
        line["parents"] = serde_json::json!(parents);
    }
    line
}
