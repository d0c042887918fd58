//! One delivery of a job at a time. The broker can hand the worker two copies of one job (a
//! retry message and a redelivery after a crash, a client's resubmit). Each copy waits for the
//! one before it, so that the second sees the first's recorded outcome instead of racing it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use gatehouse_protocol::JobId;
use tokio::sync::OwnedMutexGuard;

/// A lock per job id, kept only while someone holds or waits for it.
#[derive(Default)]
pub struct JobLocks {
    locks: Mutex<HashMap<JobId, Arc<tokio::sync::Mutex<()>>>>,
}

/// Held while one delivery of a job is handled.
pub struct JobGuard<'a> {
    owner: &'a JobLocks,
    id: JobId,
    lock: Arc<tokio::sync::Mutex<()>>,
    held: Option<OwnedMutexGuard<()>>,
}

impl JobLocks {
    /// Waits until no other delivery of `id` is being handled.
    pub async fn lock(&self, id: &JobId) -> JobGuard<'_> {
        let lock = self.map().entry(id.clone()).or_default().clone();
        let held = lock.clone().lock_owned().await;
        JobGuard { owner: self, id: id.clone(), lock, held: Some(held) }
    }

    /// Job ids with a holder or waiters now.
    pub fn len(&self) -> usize {
        self.map().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<JobId, Arc<tokio::sync::Mutex<()>>>> {
        self.locks.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for JobGuard<'_> {
    fn drop(&mut self) {
        self.held.take();
        let mut map = self.owner.map();
        // The map's reference and ours: nobody else waits, so forget the lock.
        if Arc::strong_count(&self.lock) == 2 {
            map.remove(&self.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn copies_of_one_job_take_turns_and_the_map_empties() {
        let locks = Arc::new(JobLocks::default());
        let id = JobId::from_bytes([1; 16]);
        let first = locks.lock(&id).await;
        let (l2, id2) = (locks.clone(), id.clone());
        let second = tokio::spawn(async move {
            let _g = l2.lock(&id2).await;
        });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!second.is_finished(), "the second copy must wait");
        // Another job is not held up.
        drop(locks.lock(&JobId::from_bytes([2; 16])).await);
        drop(first);
        second.await.unwrap();
        assert!(locks.is_empty());
    }
}
