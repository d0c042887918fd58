//! Executable kinds (`[kind.exec]` in the catalog): any program, in any language, runs a kind —
//! operators add processing without rebuilding the worker.
//!
//! **oneshot**: one process per job. The payload is JSON on stdin, the result the JSON on
//! stdout. Exit 0 → succeeded with that result; exit 75 (`EX_TEMPFAIL`) → retryable; any other
//! exit or a signal → failed, with the exit status and the last stderr line (at most 500
//! bytes); stdout that is not one JSON value, or longer than `max_output_bytes` → failed;
//! stderr longer than `max_stderr_bytes` → failed, the child killed. At the deadline
//! (`timeout_ms`) the child's whole process tree is killed and the attempt is retryable.
//!
//! **stream**: long-lived children, one JSON line per job each way ([`stream`]); each client's
//! jobs go to children of their own.
//!
//! Every child runs in a [`sandbox`]: namespaces that show it only its command, the kind's
//! `read_only` paths and a private memory folder, under resource limits (CPU seconds, address
//! space, open files, processes through `prlimit`; disk through the folder's size; stderr
//! through [`stderr`]), with an environment of `PATH`, `LANG` and `GATEHOUSE_JOB_ID`,
//! `GATEHOUSE_KIND`, `GATEHOUSE_CLIENT`, `GATEHOUSE_ATTEMPT` only (and `GATEHOUSE_CHECKPOINT`,
//! `GATEHOUSE_BATCH`, `GATEHOUSE_PARENTS` naming files in its input folder when it has them). Its whole process tree ends
//! with the attempt and with the worker. Its stderr stays out of the worker's log unless the
//! kind sets `log_stderr`.

pub mod sandbox;
mod stderr;
mod stream;

use std::sync::Arc;

use gatehouse_protocol::catalog::{ExecMode, ExecSpec};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use self::sandbox::Sandbox;
use self::stderr::Checkpoints;
use super::{ExternalHandler, HandlerFuture, JobContext, Outcome, Reservation, ReserveFuture};

/// Exit status that asks for a retry (`EX_TEMPFAIL` of sysexits.h).
pub const EXIT_RETRY: i32 = 75;
/// The file in a oneshot executable's input folder that holds the checkpoint it resumes from.
const CHECKPOINT_FILE: &str = "checkpoint.json";
/// For a batch's `on_complete` job: the batch's summary (`GATEHOUSE_BATCH` names it).
const BATCH_FILE: &str = "batch.json";
/// For a job of a kind that declares `parent_results`: how each job it waited for ended, a
/// JSON array of statuses (`GATEHOUSE_PARENTS` names it).
const PARENTS_FILE: &str = "parents.json";

/// An executable kind, checked at start-up.
pub struct Exec {
    kind: String,
    spec: ExecSpec,
    sandbox: Arc<Sandbox>,
    /// Stream mode: the children, by client.
    pool: stream::Pool,
}

impl Exec {
    /// Checks the kind's executable configuration: a program that exists and can be executed
    /// in the sandbox, and its `read_only` paths. (An unknown mode does not parse.) Stream
    /// kinds start reaping their idle children.
    ///
    /// # Errors
    /// What is wrong, in one line.
    pub fn new(kind: &str, spec: &ExecSpec, sandbox: Arc<Sandbox>) -> Result<Arc<Self>, String> {
        sandbox::check_command(kind, spec, &sandbox)?;
        let mut spec = spec.clone();
        // Canonical paths: a `..` through a folder the sandbox does not show would not resolve.
        for part in &mut spec.command {
            if let Ok(p) = std::path::Path::new(part.as_str()).canonicalize()
                && part.starts_with('/')
            {
                *part = p.to_string_lossy().into_owned();
            }
        }
        let this = Arc::new(Self {
            kind: kind.to_owned(),
            spec: spec.clone(),
            sandbox,
            pool: stream::Pool::new(spec.processes.max(1)),
        });
        if spec.mode == ExecMode::Stream {
            stream::reap_idle(Arc::downgrade(&this), std::time::Duration::from_secs(spec.idle_s.max(1)));
        }
        Ok(this)
    }

    async fn run_oneshot(&self, job: JobContext, payload: Value) -> Outcome {
        match self.spawn_and_wait(&job, payload).await {
            Ok(outcome) => outcome,
            // The machine's trouble (no temporary folder, no fork), not the job's.
            Err(e) => Outcome::Retryable(format!("could not run {}: {e}", self.kind)),
        }
    }

    /// The child's environment: the job's identity, and an earlier attempt's checkpoint (a
    /// file in its `input` folder, named by the variable).
    fn job_env(
        &self,
        job: &JobContext,
        input: &std::path::Path,
    ) -> std::io::Result<Vec<(&'static str, String)>> {
        let mut env = vec![
            ("GATEHOUSE_JOB_ID", job.id.to_string()),
            ("GATEHOUSE_KIND", job.kind.clone()),
            ("GATEHOUSE_CLIENT", job.client.clone()),
            ("GATEHOUSE_ATTEMPT", job.attempt.to_string()),
        ];
        if let Some(checkpoint) = job.checkpoint() {
            let path = input.join(CHECKPOINT_FILE);
            std::fs::write(&path, serde_json::to_vec(checkpoint).map_err(std::io::Error::other)?)?;
            let seen = self.sandbox.input_path(input, CHECKPOINT_FILE);
            env.push(("GATEHOUSE_CHECKPOINT", seen.display().to_string()));
        }
        if let Some(batch) = job.batch() {
            let path = input.join(BATCH_FILE);
            std::fs::write(&path, serde_json::to_vec(batch).map_err(std::io::Error::other)?)?;
            env.push(("GATEHOUSE_BATCH", self.sandbox.input_path(input, BATCH_FILE).display().to_string()));
        }
        if let Some(parents) = job.parents() {
            let path = input.join(PARENTS_FILE);
            std::fs::write(&path, serde_json::to_vec(parents).map_err(std::io::Error::other)?)?;
            env.push((
                "GATEHOUSE_PARENTS",
                self.sandbox.input_path(input, PARENTS_FILE).display().to_string(),
            ));
        }
        Ok(env)
    }

    async fn spawn_and_wait(&self, job: &JobContext, payload: Value) -> std::io::Result<Outcome> {
        let input = tempfile::Builder::new().prefix("gatehouse-job-").tempdir()?;
        let env = self.job_env(job, input.path())?;
        let mut child = self.sandbox.command(&self.spec, &job.client, input.path(), &env)?.spawn()?;
        // Whatever happens from here (the consumer drops this future at the deadline, too), the
        // child's whole tree goes with it.
        let tree = Tree { pid: child.id(), sandboxed: self.sandbox.confines() };
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(std::io::Error::other("no pipes to the child"));
        };
        let input_json = serde_json::to_vec(&payload).map_err(std::io::Error::other)?;
        let feed = async move {
            // A child that does not read its input is its own business.
            let _ = stdin.write_all(&input_json).await;
            drop(stdin);
        };
        let max = self.spec.max_output_bytes;
        let (log, job_id) = (self.spec.log_stderr, job.id.to_string());
        let mut checkpoints = Checkpoints::default();
        let mut cancel = job.clone();
        let ran = {
            let errors = async {
                let read = stderr::read(
                    stderr,
                    self.spec.max_stderr_bytes,
                    log,
                    &job_id,
                    Some(job),
                    &mut checkpoints,
                );
                let read = read.await;
                if read.as_ref().is_ok_and(|e| e.over) {
                    // It would block writing, and has shown what it is: end it now.
                    tree.kill();
                }
                read
            };
            let work = tokio::time::timeout_at(job.deadline.into(), async {
                let ((), out, err, status) =
                    tokio::join!(feed, read_limited(stdout, max), errors, child.wait());
                (out, err, status)
            });
            tokio::pin!(work);
            tokio::select! {
                ran = &mut work => Some(ran),
                () = cancel.cancelled() => {
                    // Cancelled: SIGTERM to its processes; SIGKILL (dropping `tree`) after the
                    // grace period if they are still there. One cancelled as it starts may have
                    // no process of its own yet (the sandbox still setting up): asked again
                    // until one is there to be told.
                    let grace = tokio::time::Instant::now() + crate::handlers::CANCEL_GRACE;
                    let mut ended = false;
                    while !tree.terminate() && tokio::time::Instant::now() < grace {
                        if tokio::time::timeout(TERMINATE_AGAIN, &mut work).await.is_ok() {
                            ended = true;
                            break;
                        }
                    }
                    if !ended {
                        let _ = tokio::time::timeout_at(grace, &mut work).await;
                    }
                    None
                }
            }
        };
        checkpoints.flush(job).await;
        let Some(ran) = ran else { return Ok(Outcome::Cancelled) };
        drop(tree);
        let Ok((out, err, status)) = ran else {
            // The tree is killed: reap the child (no zombie).
            let _ = child.wait().await;
            return Ok(Outcome::Retryable(format!("{} timed out; its processes were killed", self.kind)));
        };
        let (out, err, status) = (out?, err?, status?);
        if err.over {
            return Ok(Outcome::Permanent(format!("stderr over {} bytes", self.spec.max_stderr_bytes)));
        }
        Ok(outcome_of(status, out, &err.last, max))
    }
}

/// What a oneshot child's exit says: its status, its stdout (`None`: over `max` bytes) and its
/// last stderr line.
fn outcome_of(status: std::process::ExitStatus, out: Option<Vec<u8>>, last: &str, max: usize) -> Outcome {
    let error = |what: String| if last.is_empty() { what } else { format!("{what}: {last}") };
    match status.code() {
        Some(0) => match out {
            None => Outcome::Permanent(format!("output over {max} bytes")),
            Some(out) => match serde_json::from_slice::<Value>(&out) {
                Ok(result) => Outcome::Success(result),
                Err(_) => Outcome::Permanent("output is not one JSON value".into()),
            },
        },
        Some(EXIT_RETRY) => Outcome::Retryable(error(format!("exit {EXIT_RETRY}"))),
        Some(code) => Outcome::Permanent(error(format!("exit {code}"))),
        None => {
            use std::os::unix::process::ExitStatusExt as _;
            Outcome::Permanent(error(signal_reason(status.signal().unwrap_or(0))))
        }
    }
}

/// Why a child killed by `signal` ended, in words where a limit explains it.
fn signal_reason(signal: i32) -> String {
    match signal {
        // SIGXCPU: past limits.cpu_s.
        24 => "CPU time limit reached (killed by signal 24)".into(),
        // SIGXFSZ: a file past its limit.
        25 => "file size limit reached (killed by signal 25)".into(),
        s => format!("killed by signal {s}"),
    }
}

impl ExternalHandler for Arc<Exec> {
    fn run(&self, job: JobContext, payload: Value) -> HandlerFuture {
        let this = self.clone();
        Box::pin(async move {
            match this.spec.mode {
                ExecMode::Oneshot => this.run_oneshot(job, payload).await,
                ExecMode::Stream => this.run_streamed(job, payload).await,
            }
        })
    }

    /// Stream kinds: a process slot, before the attempt counts (oneshot kinds need none).
    fn reserve(&self, _client: &str) -> ReserveFuture {
        let this = self.clone();
        Box::pin(async move {
            if this.spec.mode != ExecMode::Stream {
                return None;
            }
            this.pool.slot().await.map(|permit| Reservation(Box::new(permit)))
        })
    }
}

/// A child's whole process tree, killed when dropped: no child or grandchild outlives its job.
/// Sandboxed, the tree is the child's PID namespace (it ends when the child, `bwrap`, is
/// killed); unconfined, its process group.
/// How soon a cancelled job whose processes were not there yet is asked again.
const TERMINATE_AGAIN: std::time::Duration = std::time::Duration::from_millis(25);

struct Tree {
    pid: Option<u32>,
    sandboxed: bool,
}

impl Tree {
    /// SIGTERM to the job's own processes (inside the sandbox: not to `bwrap`, whose death
    /// would SIGKILL them before they could stop); answers whether there was one to tell.
    fn terminate(&self) -> bool {
        let Some(pid) = self.pid else { return false };
        if self.sandboxed {
            let helpers: Vec<u32> = children_of(pid).into_iter().chain([pid]).collect();
            let job: Vec<u32> =
                sandbox::descendants(pid).into_iter().filter(|p| !helpers.contains(p)).collect();
            sandbox::signal(&job, "TERM");
            !job.is_empty()
        } else {
            signal_group(pid, "TERM");
            true
        }
    }

    fn kill(&self) {
        let Some(pid) = self.pid else { return };
        if self.sandboxed {
            sandbox::signal(&[pid], "KILL");
        } else {
            signal_group(pid, "KILL");
        }
    }
}

impl Drop for Tree {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The direct children of `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .map(|c| c.split_whitespace().filter_map(|c| c.parse().ok()).collect())
        .unwrap_or_default()
}

/// Sends `signal` to the process group `pgid`.
fn signal_group(pgid: u32, signal: &str) {
    let _ = std::process::Command::new("kill")
        .args([&format!("-{signal}"), "--", &format!("-{pgid}")])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status();
}

/// Reads at most `max` bytes; `None` when there was more.
async fn read_limited(mut r: impl AsyncRead + Unpin, max: usize) -> std::io::Result<Option<Vec<u8>>> {
    let mut buf = Vec::new();
    let n = (&mut r).take(max as u64 + 1).read_to_end(&mut buf).await?;
    if n > max {
        // Drain the rest so that the child is not blocked writing.
        let _ = tokio::io::copy(&mut r, &mut tokio::io::sink()).await;
        return Ok(None);
    }
    Ok(Some(buf))
}
