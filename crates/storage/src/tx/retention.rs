//! Retention: pruning decided jobs and the rows that outlive them.

use super::*;

impl Tx<'_> {
    /// The kinds that have decided jobs, in name order (one index seek per kind).
    pub fn decided_kinds(&self) -> Result<Vec<String>, StorageError> {
        let kinds = self
            .rows(
                &format!(
                    "WITH RECURSIVE k(kind) AS (
                         SELECT (SELECT min(kind) FROM jobs WHERE {DECIDED})
                         UNION ALL
                         SELECT (SELECT min(kind) FROM jobs WHERE {DECIDED} AND kind > k.kind) FROM k
                         WHERE k.kind IS NOT NULL)
                     SELECT kind FROM k WHERE kind IS NOT NULL"
                ),
                params![],
            )?
            .iter()
            .map(|r| r.get(0))
            .collect::<Result<_, _>>()?;
        Ok(kinds)
    }

    /// Deletes at most `limit` jobs of `kind` decided (succeeded, failed or dead-lettered)
    /// before `before_ms`, oldest first; answers how many. Their sequence numbers stay used (the
    /// key's next number is past them), and a message of a pruned job can no longer arrive
    /// (retention is at least the worker's `max_message_age_s`).
    pub fn prune_decided(&self, kind: &str, before_ms: i64, limit: u32) -> Result<u64, StorageError> {
        let n = self.exec(
            &format!(
                "DELETE FROM jobs WHERE id IN (
                     SELECT id FROM jobs WHERE {DECIDED} AND kind = ?1 AND updated_at_ms < ?2
                     ORDER BY updated_at_ms LIMIT ?3)"
            ),
            params![kind, before_ms, limit],
        )?;
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use crate::Store;

    #[tokio::test]
    async fn pruning_deletes_only_decided_jobs_of_the_kind_in_batches() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
        let of = |n: u8, kind: &str, state: JobState| StoredJob { kind: kind.into(), ..job(n, state, None) };
        let rows = [
            of(1, "a", JobState::Succeeded),
            of(2, "a", JobState::Failed),
            of(3, "a", JobState::DeadLettered),
            of(4, "a", JobState::WaitingForSequence),
            of(5, "b", JobState::Succeeded),
        ];
        store.transact(move |tx| rows.iter().try_for_each(|j| tx.record_job(j))).await.unwrap();
        let kinds = store.transact(|tx| tx.decided_kinds()).await.unwrap();
        assert_eq!(kinds, ["a", "b"]);

        // Nothing was decided before the cut-off yet.
        let then = now_ms() - 60_000;
        assert_eq!(store.transact(move |tx| tx.prune_decided("a", then, 10)).await.unwrap(), 0);

        let soon = now_ms() + 1;
        assert_eq!(store.transact(move |tx| tx.prune_decided("a", soon, 2)).await.unwrap(), 2);
        assert_eq!(store.transact(move |tx| tx.prune_decided("a", soon, 2)).await.unwrap(), 1);
        assert_eq!(store.transact(move |tx| tx.prune_decided("a", soon, 2)).await.unwrap(), 0);
        for (n, kept) in [(1, false), (2, false), (3, false), (4, true), (5, true)] {
            let found = store.transact(move |tx| tx.job(&id(n))).await.unwrap();
            assert_eq!(found.is_some(), kept, "job {n}");
        }
        assert_eq!(store.transact(|tx| tx.decided_kinds()).await.unwrap(), ["b"]);
    }
}
