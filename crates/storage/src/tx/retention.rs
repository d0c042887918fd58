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
