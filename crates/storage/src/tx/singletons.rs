//! Singletons: whose turn each key is, and the jobs waiting for it.

use super::*;

impl Tx<'_> {
    /// Takes job `id` out of the singleton waiting line (it was refused).
    pub fn stop_waiting(&self, id: &JobId) -> Result<(), StorageError> {
        self.exec("DELETE FROM singleton_waiting WHERE job_id = ?1", params![id.as_str()])?;
        Ok(())
    }

    /// Takes the turn of singleton `key` for job `id` if it is free (or already `id`'s);
    /// otherwise queues the job's message behind the others waiting and answers `false`.
    pub fn take_turn(&self, key: &str, id: &JobId, envelope: &[u8]) -> Result<bool, StorageError> {
        self.lock(&format!("turn {key}"))?;
        let holder: Option<String> =
            self.one("SELECT job_id FROM singleton_turns WHERE key = ?1", params![key], |r| r.get(0))?;
        match holder {
            Some(h) if h == id.as_str() => Ok(true),
            Some(_) => {
                self.exec(
                    "INSERT INTO singleton_waiting (key, job_id, envelope) VALUES (?1, ?2, ?3)
                     ON CONFLICT(job_id) DO NOTHING",
                    params![key, id.as_str(), envelope],
                )?;
                Ok(false)
            }
            None => {
                self.exec(
                    "INSERT INTO singleton_turns (key, job_id) VALUES (?1, ?2)",
                    params![key, id.as_str()],
                )?;
                Ok(true)
            }
        }
    }

    /// Job `id` is decided: the turns it held pass to the next job waiting for each (its message
    /// goes back to its queue, through the delayed-job sweeper, at once).
    pub(super) fn pass_turns(&self, id: &JobId) -> Result<(), StorageError> {
        let keys: Vec<String> = self
            .rows("SELECT key FROM singleton_turns WHERE job_id = ?1", params![id.as_str()])?
            .iter()
            .map(|r| r.get(0))
            .collect::<Result<_, _>>()?;
        for key in keys {
            self.lock(&format!("turn {key}"))?;
            let next: Option<(i64, String, Vec<u8>)> = self.one(
                "SELECT seq, job_id, envelope FROM singleton_waiting WHERE key = ?1 ORDER BY seq LIMIT 1",
                params![&key],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )?;
            match next {
                Some((seq, next, envelope)) => {
                    self.exec("UPDATE singleton_turns SET job_id = ?1 WHERE key = ?2", params![next, key])?;
                    self.exec("DELETE FROM singleton_waiting WHERE seq = ?1", params![seq])?;
                    self.exec(
                        "INSERT INTO scheduled (job_id, due_ms, envelope) VALUES (?1, 0, ?2)
                         ON CONFLICT(job_id) DO UPDATE SET due_ms = 0, released = 0, claimed_until_ms = 0,
                             envelope = excluded.envelope",
                        params![next, envelope],
                    )?;
                }
                None => {
                    self.exec("DELETE FROM singleton_turns WHERE key = ?1", params![&key])?;
                }
            }
        }
        Ok(())
    }

    /// Forgets the message of a singleton job whose turn came (it runs now).
    pub fn turn_taken(&self, id: &JobId) -> Result<(), StorageError> {
        self.exec("DELETE FROM scheduled WHERE job_id = ?1", params![id.as_str()])?;
        self.exec("DELETE FROM jobs WHERE id = ?1 AND state = 'waiting_for_turn'", params![id.as_str()])?;
        Ok(())
    }
}
