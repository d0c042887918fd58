//! The schedules scenario, shared by the e2e suite (SQLite) and the scale-out suite
//! (PostgreSQL): cron firings planned in storage by three workers, each firing one job however
//! many workers plan it (and whichever of them dies), and no overlap unless the schedule allows
//! it. Included with `#[path]`.

use std::collections::HashMap;
use std::time::Duration;

use gatehouse_e2e::{Options, TestSystem, oracle, report};

const SCHEDULES: &str = r#"
[[schedule]]
name = "every-second"
cron = "* * * * * *"
kind = "test.sleep"
payload = { ms = 50 }
client = "dev-client"
overlap = true

[[schedule]]
name = "every-second-slow"
cron = "* * * * * *"
kind = "test.sleep"
payload = { ms = 2500 }
client = "dev-client"
"#;

/// `schedule fired` lines of every worker's log, by job id.
fn fired_lines(sys: &TestSystem) -> HashMap<String, usize> {
    let mut by_job = HashMap::new();
    for w in sys.worker_processes() {
        for line in w.log().lines().filter(|l| l.contains("schedule fired")) {
            let id = line.split("job_id=").nth(1).and_then(|r| r.split_whitespace().next()).unwrap_or("");
            *by_job.entry(id.to_owned()).or_insert(0) += 1;
        }
    }
    by_job
}

pub async fn fire_each_firing_once(postgres: bool) {
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        workers: 3,
        testing: true,
        schedules: Some(SCHEDULES),
        postgres,
        ..Options::default()
    })
    .await;
    // Half-way, the worker that has planned the firings so far dies (kill -9): another one
    // plans them from then on.
    tokio::time::sleep(Duration::from_secs(15)).await;
    let planner =
        sys.worker_processes().iter().max_by_key(|w| w.log().matches("schedule fired").count()).unwrap();
    planner.kill();
    tokio::time::sleep(Duration::from_secs(15)).await;
    for w in sys.worker_processes() {
        w.terminate();
    }
    let db = sys.storage();
    let int = |v: &Option<String>| v.as_deref().unwrap().parse::<i64>().unwrap();
    let state = |name: &str| -> (i64, i64, i64) {
        let rows =
            oracle::rows(&db, &format!("SELECT fired, skipped, missed FROM schedules WHERE name = '{name}'"));
        (int(&rows[0][0]), int(&rows[0][1]), int(&rows[0][2]))
    };
    let jobs = oracle::jobs(&db, &sys.keyring());
    let fired = fired_lines(&sys);

    // Every second, overlap allowed: one job per firing, made by exactly one of the workers.
    let (n, skipped, missed) = state("every-second");
    assert!(
        n >= 25,
        "only {n} firings in 30 s; logs:\n{}",
        sys.worker_processes().iter().map(|w| w.log()).collect::<Vec<_>>().join("\n----\n")
    );
    assert_eq!((skipped, missed), (0, 0));
    let firings: Vec<_> = fired.keys().filter(|id| jobs.contains_key(*id)).collect();
    assert!(fired.values().all(|c| *c == 1), "a firing made by two workers: {fired:?}");
    let planners = sys.worker_processes().iter().filter(|w| w.log().contains("schedule fired")).count();
    assert!(planners >= 2, "no other worker planned firings after the first died");
    let mut per_second = 0;
    for w in sys.worker_processes() {
        per_second += w.log().matches("schedule fired schedule=every-second ").count();
    }
    assert_eq!(per_second as i64, n, "fired lines and the schedule's count differ");
    // Ids derive from the firing time: consecutive seconds.
    let first =
        int(&oracle::rows(&db, "SELECT min(updated_at_ms) FROM jobs WHERE kind = 'test.sleep'")[0][0]);
    let second = (first / 1000 - 2) * 1000;
    let keys = sys.worker_keys();
    let consecutive = (0..60)
        .filter(|i| jobs.contains_key(keys.firing_id("every-second", second + i * 1000).as_str()))
        .count();
    assert!(consecutive as i64 >= n - 2, "firing ids are not one per second: {consecutive} of {n}");

    // Every second, 2.5 s runs, no overlap: the firings in between are skipped and counted.
    let (slow, slow_skipped, _) = state("every-second-slow");
    assert!(slow >= 5 && slow_skipped >= slow, "fired {slow}, skipped {slow_skipped}");
    let mut runs: Vec<(u64, u64)> = jobs
        .values()
        .filter_map(|j| j.result.as_ref())
        .filter(|r| r["slept_ms"] == 2500)
        .map(|r| (r["started_at_ms"].as_u64().unwrap(), r["ended_at_ms"].as_u64().unwrap()))
        .collect();
    runs.sort_unstable();
    assert!(runs.len() as i64 >= slow - 1, "{} runs of {slow} firings", runs.len());
    for pair in runs.windows(2) {
        assert!(pair[1].0 >= pair[0].1, "two runs overlapped: {pair:?}");
    }
    // `gatehouse schedules list` shows each schedule's next and last firings, from the files
    // and the database where the worker runs.
    let args =
        gatehouse_cli::commands::schedules::SchedulesArgs { config: sys.data.path().join("worker.toml") };
    let listed = gatehouse_cli::commands::schedules::list(&args).await.unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    let slow_listed = listed.iter().find(|l| l["name"] == "every-second-slow").unwrap();
    assert_eq!(slow_listed["fired"], slow, "{slow_listed}");
    assert_eq!(slow_listed["skipped"], slow_skipped, "{slow_listed}");
    assert!(slow_listed["next"].as_str().is_some_and(|t| t.ends_with('Z')), "{slow_listed}");
    let last_job = slow_listed["last_job"].as_str().unwrap();
    assert!(
        jobs.contains_key(last_job) || slow_listed["last_job_state"] == "queued_or_running",
        "{slow_listed}"
    );
    report(&format!(
        "schedules, 3 workers on {}, 30 s: every-second fired {n} (skipped 0, duplicates 0); \
         every-second-slow (2.5 s runs) fired {slow}, skipped {slow_skipped}, overlaps 0; {} firings in all",
        if postgres { "postgres" } else { "sqlite" },
        firings.len()
    ));
    sys.stop().await;
}
