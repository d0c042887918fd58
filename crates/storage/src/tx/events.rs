//! The event log: each job's state transitions, numbered, for its live event stream.

use super::*;

impl Tx<'_> {
    /// Appends `state` to the state transitions of job `id` (of `client`), unless it is the
    /// latest already.
    pub fn log_state(&self, id: &JobId, client: &str, state: JobState) -> Result<(), StorageError> {
        let last: Option<(i64, String)> = self.one(
            "SELECT seq, state FROM job_events WHERE job_id = ?1 ORDER BY seq DESC LIMIT 1",
            params![id.as_str()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )?;
        if last.as_ref().is_some_and(|(_, s)| s == state.as_str()) {
            return Ok(());
        }
        self.exec(
            "INSERT INTO job_events (job_id, seq, client, state, at_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![id.as_str(), last.map_or(1, |(n, _)| n + 1), client, state.as_str(), now_ms()],
        )?;
        Ok(())
    }

    /// The state transitions of job `id` of `client` after number `after`, oldest first, at
    /// most `limit`.
    pub fn job_events(
        &self,
        id: &JobId,
        client: &str,
        after: u64,
        limit: u32,
    ) -> Result<Vec<gatehouse_protocol::JobEvent>, StorageError> {
        let rows = self.rows(
            "SELECT seq, state, at_ms FROM job_events WHERE job_id = ?1 AND client = ?2 AND seq > ?3
             ORDER BY seq LIMIT ?4",
            params![id.as_str(), client, to_i64(after)?, limit],
        )?;
        let mut out = Vec::new();
        for row in &rows {
            let (seq, state, at_ms) = (row.get::<i64>(0)?, row.get::<String>(1)?, row.get::<i64>(2)?);
            let status = JobState::parse(&state).ok_or_else(|| {
                StorageError::Corrupt(format!("job {id}: unknown state {state:?} in its events"))
            })?;
            out.push(gatehouse_protocol::JobEvent {
                seq: seq.max(0) as u64,
                status,
                at_ms: at_ms.max(0) as u64,
            });
        }
        Ok(out)
    }
}
