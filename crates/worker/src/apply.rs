//! The decision for one delivery, taken inside one storage transaction:
//!
//! 1. **Dedupe.** A job id already stored is a redelivery, a client retry or a replay: no
//!    second effect; the stored outcome is answered.
//! 2. **Sequence.** For sequenced kinds exactly the key's next number runs. A later number is
//!    parked in storage (committed before the delivery is acked) and runs, in order, as soon
//!    as the gap closes. A number that another job already holds is a `sequence_conflict`.
//!    A job that fails permanently still uses up its number, so one bad job cannot block
//!    its key forever.
//! 3. **Run** the handler and record the outcome.
//!
//! Priority cannot overtake a sequence: a priority-9 job for number 5 parks until 4 applied.

use gatehouse_protocol::{Catalog, JobEnvelope, JobId, JobState, JobStatus};
use gatehouse_storage::{Parked, StorageError, StoredJob, Tx};

use crate::handlers::{self, Outcome};

/// Where the answer about a job goes, if anyone waits for it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ReplyTarget {
    pub reply_to: Option<String>,
    pub correlation_id: Option<String>,
}

/// A status to send to a reply target.
#[derive(Debug, Clone, PartialEq)]
pub struct Answer {
    pub status: JobStatus,
    pub target: ReplyTarget,
}

/// Decides and applies one delivery; returns the answers to send after commit: the job's own,
/// then those of parked successors that it released.
///
/// # Errors
/// Only storage failures, which roll the whole decision back.
pub fn apply(
    tx: &Tx<'_>,
    catalog: &Catalog,
    env: JobEnvelope,
    raw: &[u8],
    target: ReplyTarget,
) -> Result<Vec<Answer>, StorageError> {
    if let Some(stored) = tx.job(&env.id)? {
        return Ok(vec![Answer {
            status: status_of(tx, stored)?,
            target,
        }]);
    }
    let sequenced = catalog.kind(&env.kind).is_some_and(|k| k.sequenced);
    let Some(seq) = env.sequence.clone().filter(|_| sequenced) else {
        let outcome = if sequenced {
            Outcome::Permanent(format!("{} needs a sequence", env.kind))
        } else {
            handlers::run(tx, &env)?
        };
        let status = record(tx, &env, outcome, None)?;
        return Ok(vec![Answer { status, target }]);
    };

    let (key, number) = (seq.key().to_owned(), seq.number());
    let expected = tx.next_expected(&key)?;
    let holder = tx.sequence_holder(&key, number)?;
    if number < expected || holder.is_some() {
        let error = format!("sequence_conflict: number {number} of {key} belongs to another job");
        let status = record(tx, &env, Outcome::Permanent(error), None)?;
        return Ok(vec![Answer { status, target }]);
    }
    if number > expected {
        let job = stored(
            &env,
            JobState::WaitingForSequence,
            None,
            None,
            Some((key.clone(), number)),
        );
        tx.record_job(&job)?;
        tx.park(&Parked {
            job_id: env.id.clone(),
            seq_key: key,
            seq_number: number,
            envelope: raw.to_vec(),
            reply_to: target.reply_to.clone(),
            correlation_id: target.correlation_id.clone(),
        })?;
        let mut status = JobStatus::new(env.id, JobState::WaitingForSequence);
        status.expected = Some(expected);
        return Ok(vec![Answer { status, target }]);
    }

    // The expected number: run it, then every parked successor the gap was holding back.
    let outcome = handlers::run(tx, &env)?;
    let mut answers = vec![Answer {
        status: record(tx, &env, outcome, Some((key.clone(), number)))?,
        target,
    }];
    let mut next = number + 1;
    while let Some(parked) = tx.take_parked(&key, next)? {
        let env: JobEnvelope = serde_json::from_slice(&parked.envelope)
            .map_err(|e| StorageError::Corrupt(format!("parked job {}: {e}", parked.job_id)))?;
        let outcome = handlers::run(tx, &env)?;
        let status = record(tx, &env, outcome, Some((key.clone(), next)))?;
        let target = ReplyTarget {
            reply_to: parked.reply_to,
            correlation_id: parked.correlation_id,
        };
        answers.push(Answer { status, target });
        next += 1;
    }
    tx.set_next_expected(&key, next)?;
    Ok(answers)
}

/// The status of `id` for `client`: not found when it does not exist *or* is someone else's.
///
/// # Errors
/// Only storage failures.
pub fn status_for(tx: &Tx<'_>, id: &JobId, client: &str) -> Result<JobStatus, StorageError> {
    match tx.job(id)? {
        Some(job) if job.client == client => status_of(tx, job),
        _ => Ok(JobStatus::new(id.clone(), JobState::NotFound)),
    }
}

fn status_of(tx: &Tx<'_>, job: StoredJob) -> Result<JobStatus, StorageError> {
    let mut status = JobStatus::new(job.id, job.state);
    status.result = job.result;
    status.error = job.error;
    if let (JobState::WaitingForSequence, Some((key, _))) = (job.state, &job.sequence) {
        status.expected = Some(tx.next_expected(key)?);
    }
    Ok(status)
}

fn record(
    tx: &Tx<'_>,
    env: &JobEnvelope,
    outcome: Outcome,
    sequence: Option<(String, u64)>,
) -> Result<JobStatus, StorageError> {
    let job = match outcome {
        Outcome::Success(result) => stored(env, JobState::Succeeded, Some(result), None, sequence),
        Outcome::Permanent(error) => stored(env, JobState::Failed, None, Some(error), sequence),
    };
    tx.record_job(&job)?;
    let mut status = JobStatus::new(job.id, job.state);
    status.result = job.result;
    status.error = job.error;
    Ok(status)
}

fn stored(
    env: &JobEnvelope,
    state: JobState,
    result: Option<serde_json::Value>,
    error: Option<String>,
    sequence: Option<(String, u64)>,
) -> StoredJob {
    StoredJob {
        id: env.id.clone(),
        client: env.client.clone(),
        kind: env.kind.clone(),
        state,
        result,
        error,
        sequence,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use gatehouse_protocol::submit::RawSequence;
    use gatehouse_protocol::{Priority, Sequence};
    use gatehouse_storage::Store;
    use serde_json::json;

    use super::*;

    fn catalog() -> Catalog {
        Catalog::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/jobs.toml"))
            .unwrap()
    }

    fn ledger_job(n: u8, number: u64, amount: i64) -> JobEnvelope {
        JobEnvelope {
            id: JobId::from_bytes([n; 16]),
            kind: "ledger.apply".into(),
            client: "c".into(),
            priority: Priority::new(3).unwrap(),
            sequence: Some(
                Sequence::parse(RawSequence {
                    key: "acct".into(),
                    number,
                })
                .unwrap(),
            ),
            payload: json!({"account": "acct", "amount": amount}),
            submitted_at_ms: 0,
        }
    }

    async fn deliver(store: &Store, env: JobEnvelope) -> Vec<Answer> {
        let catalog = catalog();
        let raw = serde_json::to_vec(&env).unwrap();
        store
            .transact(move |tx| apply(tx, &catalog, env, &raw, ReplyTarget::default()))
            .await
            .unwrap()
    }

    fn states(answers: &[Answer]) -> Vec<JobState> {
        answers.iter().map(|a| a.status.status).collect()
    }

    #[tokio::test]
    async fn out_of_order_numbers_apply_in_order_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db")).unwrap();

        let a = deliver(&store, ledger_job(3, 3, 100)).await;
        assert_eq!(states(&a), [JobState::WaitingForSequence]);
        assert_eq!(a[0].status.expected, Some(1));
        let a = deliver(&store, ledger_job(2, 2, 10)).await;
        assert_eq!(states(&a), [JobState::WaitingForSequence]);

        let a = deliver(&store, ledger_job(1, 1, 1)).await;
        assert_eq!(states(&a), [JobState::Succeeded; 3]);
        let balances: Vec<_> = a
            .iter()
            .map(|a| a.status.result.as_ref().unwrap()["balance"].clone())
            .collect();
        assert_eq!(balances, [json!(1), json!(11), json!(111)]);

        // Redelivery of an applied job: same answer, no second effect.
        let again = deliver(&store, ledger_job(2, 2, 10)).await;
        assert_eq!(
            again[0].status.result.as_ref().unwrap()["balance"],
            json!(11)
        );
        let (balance, seq) = store
            .transact(|tx| tx.ledger_balance("acct"))
            .await
            .unwrap();
        assert_eq!((balance, seq), (111, 3));
    }

    #[tokio::test]
    async fn another_job_claiming_a_used_number_is_a_conflict() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db")).unwrap();
        deliver(&store, ledger_job(1, 1, 5)).await;
        let a = deliver(&store, ledger_job(9, 1, 500)).await;
        assert_eq!(states(&a), [JobState::Failed]);
        assert!(
            a[0].status
                .error
                .as_ref()
                .unwrap()
                .starts_with("sequence_conflict")
        );
        let (balance, _) = store
            .transact(|tx| tx.ledger_balance("acct"))
            .await
            .unwrap();
        assert_eq!(balance, 5);
    }

    #[tokio::test]
    async fn status_is_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db")).unwrap();
        deliver(&store, ledger_job(1, 1, 5)).await;
        let id = JobId::from_bytes([1; 16]);
        let (i2, i3) = (id.clone(), id.clone());
        let mine = store
            .transact(move |tx| status_for(tx, &i2, "c"))
            .await
            .unwrap();
        assert_eq!(mine.status, JobState::Succeeded);
        let theirs = store
            .transact(move |tx| status_for(tx, &i3, "other"))
            .await
            .unwrap();
        assert_eq!(theirs.status, JobState::NotFound);
    }
}
