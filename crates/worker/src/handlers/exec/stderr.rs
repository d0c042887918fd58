//! A child's stderr, read with bounds: at most [`MAX_LINE`] bytes of a line are held (the rest
//! of a longer line is skipped unread into memory), at most `max_total` bytes in all (then the
//! reading stops and the caller ends the attempt). `GATEHOUSE-PROGRESS` and
//! `GATEHOUSE-CHECKPOINT` lines are recognised within those bounds, checkpoints kept at most
//! once per [`CHECKPOINT_EVERY`] (the latest of a burst is kept when the attempt ends), so one
//! job cannot hog the storage writer.

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, AsyncRead};

use crate::handlers::JobContext;

/// Longest stderr line kept as the error of a failed job.
pub const MAX_ERROR_LINE: usize = 500;
/// Largest checkpoint an executable may save.
pub const MAX_CHECKPOINT: usize = 64 * 1024;
/// Longest line looked at; the rest of a longer one is skipped.
const MAX_LINE: usize = MAX_CHECKPOINT + 64;
/// A line that reports progress: `GATEHOUSE-PROGRESS <percent> <message>`.
const PROGRESS_PREFIX: &str = "GATEHOUSE-PROGRESS ";
/// A line that saves a checkpoint: `GATEHOUSE-CHECKPOINT <json>`.
const CHECKPOINT_PREFIX: &[u8] = b"GATEHOUSE-CHECKPOINT ";
/// Fewest time between two checkpoints kept of one job.
pub const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// How a child's stderr ended.
pub struct Stderr {
    /// Its last non-empty line (at most [`MAX_ERROR_LINE`] bytes).
    pub last: String,
    /// It wrote more than allowed; reading stopped there.
    pub over: bool,
}

/// Keeps a job's checkpoints at most once per [`CHECKPOINT_EVERY`].
#[derive(Default)]
pub struct Checkpoints {
    saved: Option<Instant>,
    pending: Option<Value>,
}

impl Checkpoints {
    /// Keeps `state` now, or as the pending one when the last was kept too recently.
    ///
    /// # Errors
    /// When storage cannot keep it.
    pub async fn offer(&mut self, job: &JobContext, state: Value) -> Result<(), String> {
        if self.saved.is_some_and(|t| t.elapsed() < CHECKPOINT_EVERY) {
            self.pending = Some(state);
            return Ok(());
        }
        self.saved = Some(Instant::now());
        self.pending = None;
        job.save_checkpoint(state).await.map_err(|e| e.to_string())
    }

    /// Keeps the pending checkpoint, if any (when the attempt ends).
    pub async fn flush(&mut self, job: &JobContext) {
        if let Some(state) = self.pending.take() {
            self.saved = Some(Instant::now());
            if let Err(e) = job.save_checkpoint(state).await {
                tracing::warn!(job_id = %job.id, error = %e, "could not keep the job's last checkpoint");
            }
        }
    }
}

/// Reads stderr to its end or past `max_total` bytes. With `job`, progress and checkpoint
/// lines are taken (never logged); with `log`, other lines are copied (truncated) to the log.
///
/// # Errors
/// Reading failed, or a checkpoint could not be kept.
pub async fn read(
    r: impl AsyncRead + Unpin,
    max_total: u64,
    log: bool,
    label: &str,
    job: Option<&JobContext>,
    checkpoints: &mut Checkpoints,
) -> std::io::Result<Stderr> {
    let mut r = tokio::io::BufReader::new(r);
    let (mut line, mut total, mut skipping) = (Vec::new(), 0u64, false);
    let mut out = Stderr { last: String::new(), over: false };
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            if !line.is_empty() && !skipping {
                take_line(&line, log, label, job, checkpoints, &mut out).await?;
            }
            return Ok(out);
        }
        let (part, end) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (&chunk[..i], Some(i + 1)),
            None => (chunk, None),
        };
        if !skipping {
            let room = MAX_LINE.saturating_sub(line.len());
            line.extend_from_slice(&part[..part.len().min(room)]);
            skipping = part.len() > room;
        }
        let used = end.unwrap_or(chunk.len());
        r.consume(used);
        total += used as u64;
        if end.is_some() {
            if !skipping {
                take_line(&line, log, label, job, checkpoints, &mut out).await?;
            }
            line.clear();
            skipping = false;
        }
        if total > max_total {
            out.over = true;
            return Ok(out);
        }
    }
}

async fn take_line(
    line: &[u8],
    log: bool,
    label: &str,
    job: Option<&JobContext>,
    checkpoints: &mut Checkpoints,
    out: &mut Stderr,
) -> std::io::Result<()> {
    if let (Some(job), Some(state)) = (job, line.strip_prefix(CHECKPOINT_PREFIX)) {
        match serde_json::from_slice::<Value>(state) {
            Ok(state) if state.is_object() && line.len() <= MAX_CHECKPOINT => {
                checkpoints.offer(job, state).await.map_err(std::io::Error::other)?;
            }
            _ => tracing::warn!(
                job_id = label,
                "a checkpoint line that is not a JSON object (or over 64 KiB) ignored"
            ),
        }
        return Ok(());
    }
    let text = String::from_utf8_lossy(line);
    let text = truncate(text.trim_end(), MAX_ERROR_LINE);
    if let (Some(job), Some(report)) = (job, text.strip_prefix(PROGRESS_PREFIX)) {
        let (percent, message) = progress_line(report);
        job.progress(percent, message);
        return Ok(());
    }
    if log {
        tracing::info!(job_id = label, stderr = text, "executable's stderr");
    }
    if !text.trim().is_empty() {
        text.clone_into(&mut out.last);
    }
    Ok(())
}

/// A progress report's percent (when it starts with one) and message.
fn progress_line(report: &str) -> (Option<u8>, &str) {
    let (first, rest) = report.split_once(' ').unwrap_or((report, ""));
    match first.parse::<u8>() {
        Ok(p) => (Some(p), rest),
        Err(_) => (None, report),
    }
}

/// `s` cut to at most `max` bytes, on a character boundary.
pub fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_progress_line_is_a_percent_and_a_message_or_just_a_message() {
        assert_eq!(progress_line("40 copying files"), (Some(40), "copying files"));
        assert_eq!(progress_line("75"), (Some(75), ""));
        assert_eq!(progress_line("copying files"), (None, "copying files"));
        assert_eq!(progress_line("400 too much"), (None, "400 too much"), "not a percent: all message");
    }

    #[tokio::test]
    async fn a_line_without_end_is_held_only_up_to_its_bound_and_the_total_is_bounded() {
        // 8 MiB without a newline, then a last line: memory holds at most MAX_LINE of it.
        let mut input = vec![b'x'; 8 << 20];
        input.extend_from_slice(b"\nthe last line\n");
        let out = read(&input[..], 16 << 20, false, "t", None, &mut Checkpoints::default()).await.unwrap();
        assert!(!out.over);
        assert_eq!(out.last, "the last line");
        // Past max_total: reading stops, over.
        let out = read(&input[..], 1 << 20, false, "t", None, &mut Checkpoints::default()).await.unwrap();
        assert!(out.over);
    }
}
