//! Sequences: the next number each key applies, and the jobs parked for an earlier one.

use super::*;

impl Tx<'_> {
    /// The next number `key` applies (1 for a key never seen).
    pub fn next_expected(&self, key: &str) -> Result<u64, StorageError> {
        let next: Option<i64> =
            self.one("SELECT next FROM sequences WHERE key = ?1", params![key], |r| r.get(0))?;
        Ok(next.map_or(1, |n| n as u64))
    }

    pub fn set_next_expected(&self, key: &str, next: u64) -> Result<(), StorageError> {
        self.exec(
            "INSERT INTO sequences (key, next) VALUES (?1, ?2)
             ON CONFLICT(key) DO UPDATE SET next = excluded.next",
            params![key, to_i64(next)?],
        )?;
        Ok(())
    }

    /// The job that holds `number` in `key`'s sequence, applied or parked.
    pub fn sequence_holder(&self, key: &str, number: u64) -> Result<Option<JobId>, StorageError> {
        let id: Option<String> = self.one(
            "SELECT id FROM jobs WHERE seq_key = ?1 AND seq_number = ?2",
            params![key, to_i64(number)?],
            |r| r.get(0),
        )?;
        id.as_deref().map(parse_id).transpose()
    }

    /// Keeps a job until its predecessor has applied. Its `jobs` row must exist.
    pub fn park(&self, p: &Parked) -> Result<(), StorageError> {
        self.exec(
            "INSERT INTO parked (seq_key, seq_number, job_id, envelope, reply_to, correlation_id, parked_at_ms,
                 deadline_ms)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                p.seq_key,
                to_i64(p.seq_number)?,
                p.job_id.as_str(),
                p.envelope,
                p.reply_to,
                p.correlation_id,
                now_ms(),
                p.deadline_ms
            ],
        )?;
        Ok(())
    }

    /// Removes and returns the job parked at `number` of `key`, if any.
    pub fn take_parked(&self, key: &str, number: u64) -> Result<Option<Parked>, StorageError> {
        let n = to_i64(number)?;
        let row = self.one(
            &format!("SELECT {PARKED_COLUMNS} FROM parked WHERE seq_key = ?1 AND seq_number = ?2"),
            params![key, n],
            parked_row,
        )?;
        let Some((id, mut parked)) = row else { return Ok(None) };
        self.exec("DELETE FROM parked WHERE seq_key = ?1 AND seq_number = ?2", params![key, n])?;
        parked.job_id = parse_id(&id)?;
        Ok(Some(parked))
    }

    /// Claims parked jobs whose gap deadline passed before `now_ms` (the oldest, at most
    /// `limit`) for the caller to dead-letter: their deadline moves to `claimed_until_ms`, so
    /// that no other worker's sweep takes them meanwhile (and one that dies while dead-lettering
    /// lets them come back then). They stay parked until [`Tx::take_parked`]: the caller
    /// dead-letters first, then takes.
    pub fn claim_expired_parked(
        &self,
        now_ms: i64,
        claimed_until_ms: i64,
        limit: u32,
    ) -> Result<Vec<Parked>, StorageError> {
        let rows = self.rows(
            &format!(
                "UPDATE parked SET deadline_ms = ?2
                 WHERE deadline_ms < ?1 AND (seq_key, seq_number) IN (
                     SELECT seq_key, seq_number FROM parked WHERE deadline_ms < ?1 ORDER BY deadline_ms LIMIT ?3{}
                 ) RETURNING {PARKED_COLUMNS}",
                self.skip_locked()
            ),
            params![now_ms, claimed_until_ms, limit],
        )?;
        let mut out = Vec::new();
        for row in &rows {
            let (id, mut parked) = parked_row(row)?;
            parked.job_id = parse_id(&id)?;
            out.push(parked);
        }
        Ok(out)
    }

    /// How many jobs of `client` wait for a predecessor.
    pub fn parked_count_of(&self, client: &str) -> Result<u64, StorageError> {
        self.count_of(client, "parked h JOIN jobs j ON j.id = h.job_id", "")
    }

    /// How many delayed jobs of `client` are held until due.
    pub fn delayed_count_of(&self, client: &str) -> Result<u64, StorageError> {
        self.count_of(client, "scheduled h JOIN jobs j ON j.id = h.job_id", "AND h.released = 0")
    }

    /// How many jobs of `client` wait for a singleton turn.
    pub fn waiting_count_of(&self, client: &str) -> Result<u64, StorageError> {
        self.count_of(client, "singleton_waiting h JOIN jobs j ON j.id = h.job_id", "")
    }

    /// How many rows of `held` (joined to `jobs j`) are `client`'s, `and` holding too.
    pub(super) fn count_of(&self, client: &str, held: &str, and: &str) -> Result<u64, StorageError> {
        let sql = format!("SELECT count(*) FROM {held} WHERE j.client = ?1 {and}");
        let n: i64 = self.must(&sql, params![client], |r| r.get(0))?;
        Ok(n as u64)
    }

    /// How many jobs wait for a predecessor.
    pub fn parked_count(&self) -> Result<u64, StorageError> {
        let n: i64 = self.must("SELECT count(*) FROM parked", params![], |r| r.get(0))?;
        Ok(n as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use crate::Store;

    #[tokio::test]
    async fn a_sequence_number_belongs_to_one_job() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
        store.transact(|tx| tx.record_job(&job(1, JobState::Succeeded, Some(("k", 1))))).await.unwrap();
        let err = store
            .transact(|tx| tx.record_job(&job(2, JobState::Succeeded, Some(("k", 1)))))
            .await
            .unwrap_err();
        assert!(err.to_string().contains("UNIQUE"), "{err}");
        let holder = store.transact(|tx| tx.sequence_holder("k", 1)).await.unwrap();
        assert_eq!(holder, Some(id(1)));
    }

    #[tokio::test]
    async fn parked_jobs_come_back_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_sqlite(&dir.path().join("db.sqlite"), test_keyring(), &[]).unwrap();
        store
            .transact(|tx| {
                tx.record_job(&job(3, JobState::WaitingForSequence, Some(("k", 2))))?;
                tx.park(&Parked {
                    job_id: id(3),
                    seq_key: "k".into(),
                    seq_number: 2,
                    envelope: b"{}".to_vec(),
                    reply_to: None,
                    correlation_id: Some("c".into()),
                    deadline_ms: 0,
                })
            })
            .await
            .unwrap();
        let first = store.transact(|tx| tx.take_parked("k", 2)).await.unwrap();
        assert_eq!(first.unwrap().job_id, id(3));
        assert_eq!(store.transact(|tx| tx.take_parked("k", 2)).await.unwrap(), None);
    }
}
