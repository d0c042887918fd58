//! The live event stream (`GET /v1/jobs/{id}/events`, Server-Sent Events over mTLS): every
//! state transition in order, numbered; progress while the job runs; the final status closes
//! it; a reconnect with `Last-Event-ID` resumes without losing a transition; owner-only.

use std::time::Duration;

use gatehouse_client::{EventStream, ServerEvent};
use gatehouse_e2e::{OTHER_CLIENT, Options, TestSystem, assert_problem};
use serde_json::{Value, json};

async fn submit(sys: &TestSystem, body: Value) -> String {
    let r = sys.connect().await.submit(&body, None).await.unwrap();
    assert!(r.status == 202, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_owned()
}

async fn open(sys: &TestSystem, id: &str, last: Option<u64>) -> EventStream {
    match sys.connect().await.events(id, last).await.unwrap() {
        Ok(stream) => stream,
        Err(res) => panic!("{} {}", res.status, res.text()),
    }
}

/// Events until the stream ends (or 60 s).
async fn rest(stream: &mut EventStream) -> Vec<ServerEvent> {
    let mut out = Vec::new();
    let read = async {
        while let Some(e) = stream.next().await.unwrap() {
            out.push(e);
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read).await.expect("the stream never ended");
    out
}

fn states(events: &[ServerEvent]) -> Vec<(u64, String)> {
    events
        .iter()
        .filter(|e| e.event == "state")
        .map(|e| (e.id.as_deref().unwrap().parse().unwrap(), e.json()["status"].as_str().unwrap().to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jobs_stream_delivers_every_transition_in_order_with_progress_and_ends_with_its_result() {
    let sys = TestSystem::start_with(Options { testing: true, ..Options::default() }).await;
    let id = submit(&sys, json!({"kind": "test.long", "payload": {"steps": 5, "step_ms": 300}})).await;
    let events = rest(&mut open(&sys, &id, None).await).await;
    let seen = states(&events);
    // Numbered from 1 without a gap (or the `0` of a job the worker had not seen yet).
    let numbered: Vec<u64> = seen.iter().map(|(n, _)| *n).filter(|n| *n > 0).collect();
    assert_eq!(numbered, (1..=numbered.len() as u64).collect::<Vec<_>>(), "{seen:?}");
    let names: Vec<&str> = seen.iter().filter(|(n, _)| *n > 0).map(|(_, s)| s.as_str()).collect();
    assert_eq!(names, ["running", "succeeded"], "{seen:?}");
    let last = events.iter().rfind(|e| e.event == "state").unwrap().json();
    assert_eq!(last["result"]["steps_run"], 5, "{last}");
    let percents: Vec<u64> = events
        .iter()
        .filter(|e| e.event == "progress")
        .map(|e| e.json()["progress"]["percent"].as_u64().unwrap())
        .collect();
    assert!(percents.len() >= 2 && percents.windows(2).all(|w| w[0] < w[1]), "{percents:?}");

    // A delayed job that fails once: scheduled, queued (its time came), running, retrying,
    // running, succeeded — and a reconnect after the first event loses none of them.
    let id = submit(&sys, json!({"kind": "test.fail", "payload": {"times": 1}, "delay_s": 1})).await;
    let mut first = open(&sys, &id, None).await;
    let head = loop {
        let e = first.next().await.unwrap().unwrap();
        if e.event == "state" && e.id.as_deref() != Some("0") {
            break e;
        }
    };
    drop(first);
    let (n, state) = states(std::slice::from_ref(&head))[0].clone();
    assert_eq!((n, state.as_str()), (1, "scheduled"));
    let tail = rest(&mut open(&sys, &id, Some(n)).await).await;
    let mut all = vec![(n, state)];
    all.extend(states(&tail));
    let names: Vec<&str> = all.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(names, ["scheduled", "queued", "running", "retrying", "running", "succeeded"], "{all:?}");
    assert_eq!(all.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2, 3, 4, 5, 6]);

    // An ended job's stream is its final status at once; from after its last event, the same.
    let again = rest(&mut open(&sys, &id, None).await).await;
    assert_eq!(states(&again).last().unwrap().1, "succeeded");

    // `gatehouse status ID --follow` follows the stream to the end: true when it succeeded,
    // false for a job that was dead-lettered after its attempts.
    let endpoint = sys.endpoint();
    let id = submit(&sys, json!({"kind": "test.long", "payload": {"steps": 3, "step_ms": 200}})).await;
    assert!(gatehouse_cli::commands::jobs::follow(&endpoint, &id, false).await.unwrap());
    let id = submit(&sys, json!({"kind": "test.fail", "payload": {"times": 9}})).await;
    assert!(!gatehouse_cli::commands::jobs::follow(&endpoint, &id, true).await.unwrap());
    let dead = rest(&mut open(&sys, &id, None).await).await;
    let names: Vec<String> = states(&dead).into_iter().map(|(_, s)| s).collect();
    assert_eq!(names.last().map(String::as_str), Some("dead_lettered"), "{names:?}");
    assert_eq!(names.iter().filter(|s| *s == "retrying").count(), 3, "{names:?}");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn another_clients_job_has_no_stream() {
    let sys = TestSystem::start().await;
    let id = submit(&sys, json!({"kind": "vault.put", "payload": {"record": {"a": 1}}})).await;
    let mut theirs = sys.client_as(OTHER_CLIENT).connect().await.unwrap();
    let refused = theirs.events(&id, None).await.unwrap().err().expect("a stream of another's job");
    assert_problem(&refused, 404, "not-found");
    let refused = sys.connect().await.events("not-an-id", None).await.unwrap().err().expect("a stream");
    assert_problem(&refused, 404, "not-found");
    sys.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stream_ends_after_max_stream_s_and_resumes_from_its_last_event() {
    let sys =
        TestSystem::start_with(Options { testing: true, max_stream_s: Some(1), ..Options::default() }).await;
    let id = submit(&sys, json!({"kind": "test.long", "payload": {"steps": 6, "step_ms": 500}})).await;
    let mut all = Vec::new();
    let mut last = None;
    let mut streams = 0;
    while all.last().is_none_or(|(_, s): &(u64, String)| s != "succeeded") {
        streams += 1;
        assert!(streams < 20, "{all:?}");
        let got = states(&rest(&mut open(&sys, &id, last).await).await);
        all.extend(got.into_iter().filter(|(n, _)| *n > 0));
        last = all.last().map(|(n, _)| *n);
    }
    assert!(streams >= 2, "one stream outlived max_stream_s");
    let names: Vec<&str> = all.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(names, ["running", "succeeded"], "{all:?}");
    assert_eq!(all.iter().map(|(n, _)| *n).collect::<Vec<_>>(), [1, 2]);
    // The CLI reconnects the same way.
    let endpoint = sys.endpoint();
    let id = submit(&sys, json!({"kind": "test.long", "payload": {"steps": 5, "step_ms": 500}})).await;
    assert!(gatehouse_cli::commands::jobs::follow(&endpoint, &id, true).await.unwrap());
    // A Last-Event-ID that is not one of ours is refused.
    let res = sys
        .connect()
        .await
        .request(
            gatehouse_client::Method::GET,
            &format!("/v1/jobs/{id}/events"),
            &[("last-event-id", "{}")],
            vec![],
        )
        .await
        .unwrap();
    assert_problem(&res, 400, "invalid-last-event-id");
    sys.stop().await;
}
