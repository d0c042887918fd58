//! Executable kinds (`[kind.exec]` in the catalog): any program, in any language, runs a kind —
//! operators add processing without rebuilding the worker.
//!
//! **stream**: a pool of `processes` long-lived children (default 2), one JSON line per job
//! each way (see [`Exec::run_streamed`]); for speed, since starting an interpreter per job
//! costs milliseconds.
//!
//! **oneshot**: one process per job. The payload is JSON on stdin, the result the JSON on
//! stdout. Exit 0 → succeeded with that result; exit 75 (`EX_TEMPFAIL`) → retryable; any other
//! exit or a signal → failed, with the exit status and the last stderr line (at most 500
//! bytes); stdout that is not one JSON value, or longer than `max_output_bytes` → failed. At
//! the deadline (`timeout_ms`) the child's whole process group is killed and the attempt is
//! retryable.
//!
//! The child is kept apart from the worker: its environment holds only `PATH`, `LANG` and
//! `GATEHOUSE_JOB_ID`, `GATEHOUSE_KIND`, `GATEHOUSE_CLIENT`, `GATEHOUSE_ATTEMPT` (never the
//! worker's settings, broker URL or key paths); it works in a fresh private temporary folder,
//! removed afterwards; it runs under resource limits (CPU seconds, address space, open files,
//! processes; through util-linux's `prlimit`, since the workspace forbids `unsafe` and with it
//! a `pre_exec` hook) in its own process group, optionally as another user, and is killed when
//! the worker dies, even by SIGKILL (`setpriv --pdeathsig KILL`): no orphan outlives it. Its stderr stays
//! out of the worker's log unless the kind sets `log_stderr`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;

use gatehouse_protocol::catalog::{ExecMode, ExecSpec};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use super::{ExternalHandler, HandlerFuture, JobContext, Outcome};

/// Exit status that asks for a retry (`EX_TEMPFAIL` of sysexits.h).
pub const EXIT_RETRY: i32 = 75;
/// Longest stderr line kept as the error of a failed job.
const MAX_ERROR_LINE: usize = 500;
/// A line on a oneshot executable's stderr that reports progress: `GATEHOUSE-PROGRESS <percent> <message>`.
const PROGRESS_PREFIX: &str = "GATEHOUSE-PROGRESS ";
/// A line on a oneshot executable's stderr that saves a checkpoint: `GATEHOUSE-CHECKPOINT <json>`.
const CHECKPOINT_PREFIX: &[u8] = b"GATEHOUSE-CHECKPOINT ";
/// The file in a oneshot executable's folder that holds the checkpoint it resumes from.
const CHECKPOINT_FILE: &str = "checkpoint.json";
/// Largest checkpoint an executable may save.
const MAX_CHECKPOINT: usize = 64 * 1024;
/// Where `prlimit` and `setpriv` live on Debian (util-linux, an essential package).
const PRLIMIT: &str = "/usr/bin/prlimit";
const SETPRIV: &str = "/usr/bin/setpriv";

/// An executable kind, checked at start-up.
pub struct Exec {
    kind: String,
    spec: ExecSpec,
    /// The user to run as: (uid, gid).
    user: Option<(u32, u32)>,
    /// Stream mode: idle long-lived children; `slots` bounds how many exist at once.
    idle: std::sync::Mutex<Vec<StreamChild>>,
    slots: tokio::sync::Semaphore,
}

impl Exec {
    /// Checks the kind's executable configuration: a program that exists and can be
    /// executed, `prlimit` and `setpriv`, and the user. (An unknown mode does not parse.)
    ///
    /// # Errors
    /// What is wrong, in one line.
    pub fn new(kind: &str, spec: &ExecSpec) -> Result<Arc<Self>, String> {
        let program = &spec.command[0];
        let found = if program.contains('/') { Some(PathBuf::from(program)) } else { in_path(program) };
        match found {
            Some(p) if is_executable(&p) => {}
            Some(p) => return Err(format!("kind {kind}: {} is not an executable file", p.display())),
            None => return Err(format!("kind {kind}: program {program:?} not found in PATH")),
        }
        for tool in [PRLIMIT, SETPRIV] {
            if !is_executable(Path::new(tool)) {
                return Err(format!("kind {kind}: {tool} (util-linux) is needed to confine the child"));
            }
        }
        let user = spec
            .user
            .as_deref()
            .map(|u| user_ids(u).ok_or_else(|| format!("kind {kind}: no user {u:?}")))
            .transpose()?;
        let slots = tokio::sync::Semaphore::new(spec.processes.max(1));
        Ok(Arc::new(Self {
            kind: kind.to_owned(),
            spec: spec.clone(),
            user,
            idle: Default::default(),
            slots,
        }))
    }

    /// The child's command: killed if the worker dies (`setpriv --pdeathsig KILL`), under its
    /// resource limits (`prlimit`), with only `env` (plus `PATH` and `LANG`), in `dir`, in its
    /// own process group, as the kind's user.
    fn command(&self, env: &[(&str, String)], dir: &Path) -> std::io::Result<tokio::process::Command> {
        let l = &self.spec.limits;
        let mut cmd = tokio::process::Command::new(SETPRIV);
        cmd.args(["--pdeathsig", "KILL", "--", PRLIMIT])
            .arg(format!("--cpu={}", l.cpu_s))
            .arg(format!("--as={}", l.address_space_mb.saturating_mul(1024 * 1024)))
            .arg(format!("--nofile={}", l.open_files))
            .arg(format!("--nproc={}", l.processes))
            .arg("--")
            .args(&self.spec.command)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into()))
            .env("LANG", std::env::var_os("LANG").unwrap_or_else(|| "C.UTF-8".into()))
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(dir, Some(uid), Some(gid))?;
            cmd.uid(uid).gid(gid);
        }
        Ok(cmd)
    }

    async fn run_oneshot(&self, job: JobContext, payload: Value) -> Outcome {
        match self.spawn_and_wait(&job, payload).await {
            Ok(outcome) => outcome,
            // The machine's trouble (no temporary folder, no fork), not the job's.
            Err(e) => Outcome::Retryable(format!("could not run {}: {e}", self.kind)),
        }
    }

    async fn spawn_and_wait(&self, job: &JobContext, payload: Value) -> std::io::Result<Outcome> {
        let dir = tempfile::Builder::new().prefix("gatehouse-job-").tempdir()?;
        let mut env = vec![
            ("GATEHOUSE_JOB_ID", job.id.to_string()),
            ("GATEHOUSE_KIND", job.kind.clone()),
            ("GATEHOUSE_CLIENT", job.client.clone()),
            ("GATEHOUSE_ATTEMPT", job.attempt.to_string()),
        ];
        // An earlier attempt's checkpoint: a file in its private folder, named by the variable.
        if let Some(checkpoint) = job.checkpoint() {
            let path = dir.path().join(CHECKPOINT_FILE);
            std::fs::write(&path, serde_json::to_vec(checkpoint).map_err(std::io::Error::other)?)?;
            if let Some((uid, gid)) = self.user {
                std::os::unix::fs::chown(&path, Some(uid), Some(gid))?;
            }
            env.push(("GATEHOUSE_CHECKPOINT", path.display().to_string()));
        }
        let mut child = self.command(&env, dir.path())?.spawn()?;
        // Whatever happens from here (the consumer drops this future at the deadline, too), the
        // child's whole group goes with it.
        let group = GroupKill(child.id());
        let (Some(mut stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(std::io::Error::other("no pipes to the child"));
        };
        let input = serde_json::to_vec(&payload).map_err(std::io::Error::other)?;
        let feed = async move {
            // A child that does not read its input is its own business.
            let _ = stdin.write_all(&input).await;
            drop(stdin);
        };
        let max = self.spec.max_output_bytes;
        let (log, job_id) = (self.spec.log_stderr, job.id.to_string());
        let mut cancel = job.clone();
        let ran = {
            let work = tokio::time::timeout_at(job.deadline.into(), async {
                let ((), out, err, status) = tokio::join!(
                    feed,
                    read_limited(stdout, max),
                    last_line(stderr, log, &job_id, Some(job)),
                    child.wait()
                );
                (out, err, status)
            });
            tokio::pin!(work);
            tokio::select! {
                ran = &mut work => Some(ran),
                () = cancel.cancelled() => {
                    // Cancelled: SIGTERM to its group; SIGKILL (dropping `group`) after the
                    // grace period if it is still there.
                    group.signal("TERM");
                    let _ = tokio::time::timeout(crate::cancel::GRACE, &mut work).await;
                    None
                }
            }
        };
        let Some(ran) = ran else { return Ok(Outcome::Cancelled) };
        drop(group);
        let Ok((out, err, status)) = ran else {
            // The group is killed: reap the child (no zombie).
            let _ = child.wait().await;
            return Ok(Outcome::Retryable(format!("{} timed out; its processes were killed", self.kind)));
        };
        let (out, err, status) = (out?, err?, status?);
        let error = |what: String| if err.is_empty() { what } else { format!("{what}: {err}") };
        Ok(match status.code() {
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
                Outcome::Permanent(error(format!("killed by signal {}", status.signal().unwrap_or(0))))
            }
        })
    }

    /// Stream mode: the job goes to an idle child (or a new one, up to `processes`) as one JSON
    /// line `{"id", "kind", "client", "attempt", "payload"}`; the child answers one line
    /// `{"id", "result"}` or `{"id", "error", "retryable"}`. A child that dies, answers out of
    /// protocol, or hangs past the deadline is killed and replaced; its job's attempt counts
    /// (retryable).
    async fn run_streamed(&self, job: JobContext, payload: Value) -> Outcome {
        let Ok(_slot) = self.slots.acquire().await else {
            return Outcome::Retryable("the worker is stopping".into());
        };
        let idle = self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop();
        let mut child = match idle {
            Some(c) => c,
            None => match self.spawn_stream_child() {
                Ok(c) => c,
                Err(e) => return Outcome::Retryable(format!("could not start {}: {e}", self.kind)),
            },
        };
        let line = serde_json::json!({
            "id": job.id, "kind": job.kind, "client": job.client, "attempt": job.attempt,
            "checkpoint": job.checkpoint(), "payload": payload,
        });
        let max = self.spec.max_output_bytes;
        let mut cancel = job.clone();
        let pgid = child.group.0;
        let exchange = {
            let exchange = tokio::time::timeout_at(job.deadline.into(), async {
                use tokio::io::AsyncBufReadExt as _;
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
                    // `{"id", "progress": {"percent", "message"}}` or `{"id", "checkpoint"}`
                    // before the answer: a report, or a checkpoint to keep (durably, before
                    // the next line is read).
                    match serde_json::from_slice::<StreamNote>(&answer) {
                        Ok(StreamNote::Progress { id, progress: p }) if id == job.id.as_str() => {
                            job.progress(p.percent, &p.message);
                        }
                        Ok(StreamNote::Checkpoint { id, checkpoint }) if id == job.id.as_str() => {
                            job.save_checkpoint(checkpoint).await.map_err(std::io::Error::other)?;
                        }
                        _ => return Ok(answer),
                    }
                }
            });
            tokio::pin!(exchange);
            tokio::select! {
                exchange = &mut exchange => Some(exchange),
                () = cancel.cancelled() => {
                    // Cancelled: its process gets SIGTERM, and is dropped (SIGKILL, then
                    // replaced) after the grace period if it has not answered.
                    signal_group(pgid, "TERM");
                    let _ = tokio::time::timeout(crate::cancel::GRACE, &mut exchange).await;
                    None
                }
            }
        };
        let Some(exchange) = exchange else { return Outcome::Cancelled };
        // A child in trouble is dropped here: its group is killed, and a new one starts for the
        // next job.
        let answer = match exchange {
            Err(_) => {
                return Outcome::Retryable(format!("{} timed out; its process was replaced", self.kind));
            }
            Ok(Err(e)) => return Outcome::Retryable(format!("{}: {e}; its process was replaced", self.kind)),
            Ok(Ok(answer)) => answer,
        };
        let outcome = match serde_json::from_slice::<StreamAnswer>(&answer) {
            Ok(a) if a.id != job.id.as_str() => None,
            Ok(StreamAnswer { result: Some(r), error: None, .. }) => Some(Outcome::Success(r)),
            Ok(StreamAnswer { error: Some(e), retryable, .. }) => {
                let e = truncate(&e, MAX_ERROR_LINE).to_owned();
                Some(if retryable { Outcome::Retryable(e) } else { Outcome::Permanent(e) })
            }
            _ => None,
        };
        match outcome {
            Some(o) => {
                // Healthy: back to the pool for the next job.
                self.idle.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(child);
                o
            }
            None => Outcome::Retryable(format!(
                "{} answered out of protocol; its process was replaced",
                self.kind
            )),
        }
    }

    fn spawn_stream_child(&self) -> std::io::Result<StreamChild> {
        let dir = tempfile::Builder::new().prefix("gatehouse-stream-").tempdir()?;
        let mut child = self.command(&[("GATEHOUSE_KIND", self.kind.clone())], dir.path())?.spawn()?;
        let group = GroupKill(child.id());
        let (Some(stdin), Some(stdout), Some(stderr)) =
            (child.stdin.take(), child.stdout.take(), child.stderr.take())
        else {
            return Err(std::io::Error::other("no pipes to the child"));
        };
        let (log, label) = (self.spec.log_stderr, format!("{} stream process {:?}", self.kind, child.id()));
        tokio::spawn(async move {
            let _ = last_line(stderr, log, &label, None).await;
        });
        Ok(StreamChild { _child: child, stdin, stdout: tokio::io::BufReader::new(stdout), group, _dir: dir })
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
}

/// One long-lived child of a stream kind: its pipes, its group (killed with it), its private
/// folder (removed with it).
struct StreamChild {
    _child: tokio::process::Child,
    stdin: tokio::process::ChildStdin,
    stdout: tokio::io::BufReader<tokio::process::ChildStdout>,
    group: GroupKill,
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

/// Kills a process group when dropped (SIGKILL to `-pgid`): no child or grandchild outlives
/// its job.
struct GroupKill(Option<u32>);

impl GroupKill {
    /// Sends `signal` (`TERM`, ...) to the whole group.
    fn signal(&self, signal: &str) {
        signal_group(self.0, signal);
    }
}

/// Sends `signal` to the process group `pgid`.
fn signal_group(pgid: Option<u32>, signal: &str) {
    if let Some(pgid) = pgid {
        let _ = std::process::Command::new("kill")
            .args([&format!("-{signal}"), "--", &format!("-{pgid}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        self.signal("KILL");
    }
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

/// Reads stderr to its end; answers its last non-empty line (at most [`MAX_ERROR_LINE`]
/// bytes), and with `log` copies each line (truncated) to the log, marked with the job id.
async fn last_line(
    r: impl AsyncRead + Unpin,
    log: bool,
    job_id: &str,
    job: Option<&JobContext>,
) -> std::io::Result<String> {
    use tokio::io::AsyncBufReadExt as _;
    let mut lines = tokio::io::BufReader::new(r).split(b'\n');
    let mut last = String::new();
    while let Some(line) = lines.next_segment().await? {
        // `GATEHOUSE-CHECKPOINT {...}`: kept (durably, before the next line is read), never logged.
        if let (Some(job), Some(state)) = (job, line.strip_prefix(CHECKPOINT_PREFIX)) {
            match serde_json::from_slice::<Value>(state) {
                Ok(state) if state.is_object() && line.len() <= MAX_CHECKPOINT => {
                    job.save_checkpoint(state).await.map_err(std::io::Error::other)?;
                }
                _ => tracing::warn!(
                    job_id,
                    "a checkpoint line that is not a JSON object (or over 64 KiB) ignored"
                ),
            }
            continue;
        }
        let text = String::from_utf8_lossy(&line);
        let text = truncate(text.trim_end(), MAX_ERROR_LINE);
        // `GATEHOUSE-PROGRESS 40 copying`: a progress report, not output (never logged).
        if let (Some(job), Some(report)) = (job, text.strip_prefix(PROGRESS_PREFIX)) {
            let (percent, message) = progress_line(report);
            job.progress(percent, message);
            continue;
        }
        if log {
            tracing::info!(job_id, stderr = text, "executable's stderr");
        }
        if !text.trim().is_empty() {
            last = text.to_owned();
        }
    }
    Ok(last)
}

/// A progress report's percent (when it starts with one) and message.
fn progress_line(report: &str) -> (Option<u8>, &str) {
    let (first, rest) = report.split_once(' ').unwrap_or((report, ""));
    match first.parse::<u8>() {
        Ok(p) => (Some(p), rest),
        Err(_) => (None, report),
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn in_path(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(program)).find(|p| p.is_file())
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// (uid, gid) of a user name, from `id`.
fn user_ids(user: &str) -> Option<(u32, u32)> {
    let id = |flag: &str| {
        let out = std::process::Command::new("id").arg(flag).arg(user).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().parse().ok()).flatten()
    };
    Some((id("-u")?, id("-g")?))
}

#[cfg(test)]
mod tests {
    use super::progress_line;

    #[test]
    fn a_progress_line_is_a_percent_and_a_message_or_just_a_message() {
        assert_eq!(progress_line("40 copying files"), (Some(40), "copying files"));
        assert_eq!(progress_line("75"), (Some(75), ""));
        assert_eq!(progress_line("copying files"), (None, "copying files"));
        assert_eq!(progress_line("400 too much"), (None, "400 too much"), "not a percent: all message");
    }
}
