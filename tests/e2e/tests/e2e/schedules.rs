//! Schedules: cron firings planned in storage by every worker, each firing one job however
//! many workers plan it (and whichever of them dies), and no overlap unless the schedule
//! allows it.

#[path = "../shared/schedules_scenario.rs"]
mod scenario;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_workers_fire_each_firing_once_and_never_overlap() {
    scenario::fire_each_firing_once(false).await;
}
