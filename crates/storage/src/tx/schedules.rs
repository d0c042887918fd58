//! Schedules: each schedule's last firing and its counts.

use super::*;

impl Tx<'_> {
    /// What storage knows of schedule `name`.
    pub fn schedule_state(&self, name: &str) -> Result<Option<ScheduleState>, StorageError> {
        self.one(
            &format!("SELECT {SCHEDULE_COLUMNS} FROM schedules WHERE name = ?1"),
            params![name],
            schedule_row,
        )
    }

    /// Every schedule storage knows, by name.
    pub fn schedule_states(&self) -> Result<Vec<ScheduleState>, StorageError> {
        self.rows(&format!("SELECT {SCHEDULE_COLUMNS} FROM schedules ORDER BY name"), params![])?
            .iter()
            .map(schedule_row)
            .collect()
    }

    /// Records a schedule's state (after it was planned in this transaction).
    pub fn save_schedule_state(&self, s: &ScheduleState) -> Result<(), StorageError> {
        self.exec(
            "INSERT INTO schedules (name, last_fire_ms, last_job, running_job, running_fire_ms, fired, skipped, missed)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
             ON CONFLICT(name) DO UPDATE SET last_fire_ms = excluded.last_fire_ms,
                 last_job = excluded.last_job, running_job = excluded.running_job,
                 running_fire_ms = excluded.running_fire_ms, fired = excluded.fired,
                 skipped = excluded.skipped, missed = excluded.missed",
            params![
                s.name,
                s.last_fire_ms,
                s.last_job.as_ref().map(JobId::as_str),
                s.running_job.as_ref().map(JobId::as_str),
                s.running_fire_ms,
                to_i64(s.fired)?,
                to_i64(s.skipped)?,
                to_i64(s.missed)?
            ],
        )?;
        Ok(())
    }
}
