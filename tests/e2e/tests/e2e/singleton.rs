//! Singleton kinds: at most one job of the kind runs at a time; the others wait their turn
//! (`waiting_for_turn`) without using up attempts, and all of them run.

use std::time::Duration;

use gatehouse_e2e::{Options, TestSystem, wait_final};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn fifty_concurrent_submissions_of_a_singleton_kind_never_run_two_at_once() {
    // Prefetch 8: without the singleton rule, up to 8 would run at once.
    let sys =
        TestSystem::start_with(Options { testing: true, prefetch: Some(8), ..Options::default() }).await;
    let ids =
        gatehouse_e2e::submit_at_once(&sys, &json!({"kind": "test.singleton", "payload": {"ms": 40}}), 50)
            .await;
    // While the first ones run, later ones wait their turn.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut conn = sys.connect().await;
    let mut waiting = 0;
    for id in &ids {
        if conn.status(id).await.unwrap().json()["status"] == "waiting_for_turn" {
            waiting += 1;
        }
    }
    assert!(waiting > 0, "no job was waiting for its turn");
    for id in &ids {
        let s = wait_final(&mut sys.connect().await, id, Duration::from_secs(30)).await;
        assert_eq!(s["status"], "succeeded", "{s}");
        assert_eq!(s["result"]["running_at_once"], 1, "two ran at once: {s}");
        assert_eq!(s["result"]["attempt"], 1, "waiting used up an attempt: {s}");
    }
    sys.stop().await;
}
