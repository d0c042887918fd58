//! `gatehouse bench` in a tiny smoke mode: every scenario runs against a real system and
//! reports what it promises. (The figures themselves come from the full run; see the README.)

use gatehouse_cli::bench::{self, BenchArgs};
use gatehouse_e2e::{TestSystem, broker_url};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_scenario_runs_and_reports() {
    // The shipped catalog plus the executable examples, for the `kinds` scenario.
    let sys = TestSystem::start_with(gatehouse_e2e::Options {
        catalog: Some(gatehouse_e2e::repo_root().join("examples/exec-kinds/jobs.toml")),
        // The `kinds` and `fair` scenarios' client identities (their certificates the bench
        // makes).
        extra_policy: "[[client]]\nidentity = \"bench-1\"\nkinds = [\"*\"]\nmax_priority = 9\n\n\
                       [[client]]\nidentity = \"bench-2\"\nkinds = [\"*\"]\nmax_priority = 9\n",
        ..Default::default()
    })
    .await;
    let args = BenchArgs {
        endpoint: sys.endpoint(),
        scenarios: ["sync", "async", "priority", "fair", "idle", "kinds", "batch"].map(String::from).to_vec(),
        kinds: vec!["acme.upper-stream".into()],
        clients: 2,
        concurrency: 2,
        duration: 1,
        http2: false,
        async_jobs: 100,
        backlog: 20,
        probe_rate: 10,
        idle_connections: 10,
        batch_jobs: 20,
        broker: broker_url(),
        // A `worker` process on this machine is not ours to pause.
        no_pause: true,
        prefetch: 4,
        quorum: false,
        json: true,
    };
    let reports = bench::run(&args).await.expect("bench runs");
    let by = |name: &str| reports.iter().find(|r| r["scenario"] == name).unwrap_or_else(|| panic!("{name}"));
    for name in ["sync", "async", "priority", "fair"] {
        let r = by(name);
        assert!(r["requests"].as_u64().unwrap() > 0, "{r}");
        assert_eq!(r["errors"], 0, "{r}");
        for key in ["throughput_per_s", "p50_ms", "p99_ms", "concurrency"] {
            assert!(r[key].is_number(), "{name} has no {key}: {r}");
        }
    }
    for name in ["sync", "async"] {
        let r = by(name);
        assert!(r["baseline_throughput_per_s"].as_f64().unwrap() > 0.0, "{r}");
        assert!(r["ratio"].as_f64().unwrap() > 0.0, "{r}");
    }
    assert!(by("async")["drain_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(by("async")["requests"], 100, "the async phase stops at --async-jobs");
    assert_eq!(by("priority")["backlog"], 20);
    assert_eq!(by("fair")["backlog"], 20);
    assert_eq!(by("idle")["idle_connections"], 10);
    let batch = by("batch");
    assert_eq!((batch["jobs_per_batch"].as_u64(), batch["rounds"].as_u64()), (Some(20), Some(5)), "{batch}");
    assert!(
        batch["batch_jobs_per_s"].as_f64().unwrap() > 0.0 && batch["ratio"].as_f64().unwrap() > 0.0,
        "{batch}"
    );
    let stream = by("acme.upper-stream");
    assert!(stream["requests"].as_u64().unwrap() > 0 && stream["errors"] == 0, "{stream}");
    assert!(stream["ratio_to_vault_put"].as_f64().unwrap() > 0.0, "{stream}");
    assert_eq!(stream["clients"], 2, "{stream}");
    sys.stop().await;
}
