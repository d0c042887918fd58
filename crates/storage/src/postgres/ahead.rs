//! The read stage of a batch: what its closures first do — lock their job, probe it — done for
//! all of them in one round trip before they run.
//!
//! A delivery's closure starts with `lock job <id>` and [`crate::Tx::probe_paused`]. Run one
//! closure after another, that is a round trip per job; here the batch tries every job's lock
//! in one statement and probes every job in the next, pipelined (the server runs them in
//! order, so the probe's snapshot is taken once the locks are held, and it sees what their
//! previous holders committed). A closure then finds its lock held and its probe answered.
//!
//! A probe read ahead is served once, to the closure it was read for, and only while it is
//! still true: to the first closure that locks the job in this transaction (another closure
//! locking it may have changed its rows), as that closure's first statement (it has written
//! nothing of its own yet), and with the same pause targets. Otherwise the probe is read
//! again. A job whose lock another transaction holds is not run in the batch: the runner sets
//! it aside to run alone, where it waits for its lock.

use std::collections::{HashMap, HashSet};

use gatehouse_protocol::JobId;

use super::session::{Session, pg_row};
use crate::StorageError;
use crate::sql::Row;

/// The first thing a closure does: lock job `id` and probe it with these pause targets (see
/// [`crate::Store::transact_on`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobProbe {
    pub id: JobId,
    pub pauses: [String; 2],
}

impl JobProbe {
    /// The job's lock (as [`crate::Tx::lock_job`] names it).
    fn lock(&self) -> String {
        crate::tx::job_lock(self.id.as_str())
    }
}

/// What a batch's read stage found, for the closures to use.
#[derive(Default)]
pub(crate) struct Ahead {
    /// Locks the read stage holds, outside any closure's savepoint: taking them again is
    /// nothing.
    held: HashSet<String>,
    /// Probe rows read ahead, by job id, with their pause targets.
    probes: HashMap<String, ([String; 2], Row)>,
    /// The closure that first locked each name in this transaction.
    lockers: HashMap<String, usize>,
}

/// Tries each job's lock, in one statement.
const TRY_LOCKS: &str =
    "SELECT name, pg_try_advisory_xact_lock(hashtextextended(name, 0)) FROM unnest($1::text[]) AS name";

/// The read stage's statements use their generic plan. Given the sets' sizes, the planner
/// would otherwise plan them anew at every batch: a plan for each size, each found cheaper than
/// the generic one (measured: 0.04 ms of the server's CPU per job, a quarter of it).
const GENERIC_PLAN: &str = "SET LOCAL plan_cache_mode = force_generic_plan";

/// And the batch's other statements, as usual.
const ANY_PLAN: &str = "SET LOCAL plan_cache_mode = auto";

impl Session<'_> {
    /// The read stage for `probes` (run first in a shared transaction, after `BEGIN`): answers
    /// the indexes of those whose lock another transaction holds.
    ///
    /// # Errors
    /// A storage failure (the transaction is then unusable).
    pub(super) fn read_ahead(&self, probes: &[&JobProbe]) -> Result<Vec<usize>, StorageError> {
        if probes.is_empty() {
            return Ok(Vec::new());
        }
        let names: Vec<String> = probes.iter().map(|p| p.lock()).collect();
        let ids: Vec<&str> = probes.iter().map(|p| p.id.as_str()).collect();
        let first: Vec<&str> = probes.iter().map(|p| p.pauses[0].as_str()).collect();
        let second: Vec<&str> = probes.iter().map(|p| p.pauses[1].as_str()).collect();
        let probe_many =
            crate::tx::probe_sql("unnest($1::text[], $2::text[], $3::text[]) AS k(id, p1, p2)", true);
        let link = self.link;
        let (locks, rows) = self.with_pending(async move {
            let try_locks = link.prepare_cached(TRY_LOCKS).await?;
            let probe = link.prepare_cached(&probe_many).await?;
            let client = link.client();
            let (_, locks, rows, ()) = futures_util::future::try_join4(
                client.batch_execute(GENERIC_PLAN),
                client.query(&try_locks, &[&names]),
                client.query(&probe, &[&ids, &first, &second]),
                client.batch_execute(ANY_PLAN),
            )
            .await?;
            Ok((locks, rows))
        })?;
        let mut ahead = self.ahead.borrow_mut();
        for row in &locks {
            if row.try_get::<_, bool>(1)? {
                ahead.held.insert(row.try_get(0)?);
            }
        }
        // Each row says whose it is: a join answers in any order.
        for row in &rows {
            let (id, p1, p2): (String, String, String) =
                (row.try_get(14)?, row.try_get(15)?, row.try_get(16)?);
            ahead.probes.insert(id, ([p1, p2], pg_row(row)?));
        }
        Ok(probes
            .iter()
            .enumerate()
            .filter(|(_, p)| !ahead.held.contains(&p.lock()))
            .map(|(i, _)| i)
            .collect())
    }

    /// Notes that the running closure locks `name`; whether the read stage holds it already.
    pub(super) fn locked_ahead(&self, name: &str) -> bool {
        let (closure, _) = self.closure.get();
        let mut ahead = self.ahead.borrow_mut();
        // Who locked first matters only while a probe read ahead waits to be served.
        if !ahead.probes.is_empty() {
            ahead.lockers.entry(name.to_owned()).or_insert(closure);
        }
        ahead.held.contains(name)
    }

    /// The probe of job `id` read ahead, if it is still true for the running closure (see the
    /// module's notes). Served once.
    pub(crate) fn probe_read_ahead(&self, id: &str, pauses: [&str; 2]) -> Option<Row> {
        let (closure, statements) = self.closure.get();
        let mut ahead = self.ahead.borrow_mut();
        let (read_for, row) = ahead.probes.remove(id)?;
        // Another closure that locked the job first may have changed its rows.
        let locked_first = ahead.lockers.get(&crate::tx::job_lock(id)) == Some(&closure);
        (locked_first && statements == 0 && read_for[0] == pauses[0] && read_for[1] == pauses[1])
            .then_some(row)
    }
}
