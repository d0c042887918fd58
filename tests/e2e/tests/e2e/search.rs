//! Finding your jobs (`GET /v1/jobs`): a client's own jobs only, newest first, filtered by
//! state, kind and time, paged by a cursor; metadata only; bad parameters a 422 naming each.

use std::time::Duration;

use gatehouse_cli::commands::jobs::{self, ListArgs};
use gatehouse_client::Connection;
use gatehouse_e2e::{OTHER_CLIENT, TestSystem};
use hyper::Method;
use serde_json::{Value, json};

async fn list(conn: &mut Connection, query: &str) -> (u16, Value) {
    let r = conn.request(Method::GET, &format!("/v1/jobs{query}"), &[], Vec::new()).await.expect("list");
    (r.status, r.json())
}

fn ids(page: &Value) -> Vec<String> {
    page["jobs"].as_array().unwrap().iter().map(|j| j["id"].as_str().unwrap().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_lists_its_own_jobs_newest_first_filtered_and_paged() {
    let sys = TestSystem::start().await;
    let mut mine = sys.connect().await;
    let mut theirs = sys.client_as(OTHER_CLIENT).connect().await.unwrap();
    let mut submitted = Vec::new();
    for n in 0..3 {
        let r = mine
            .submit(&json!({"kind": "vault.put", "payload": {"record": {"n": n}}}), Some(10))
            .await
            .unwrap();
        assert_eq!(r.json()["status"], "succeeded");
        submitted.push(r.json()["id"].as_str().unwrap().to_owned());
        // Distinct submission times: the order is the test's, not the ids'.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    for number in [1, 3] {
        let job = json!({"kind": "ledger.apply", "payload": {"account": "s-1", "amount": 1},
            "sequence": {"key": "s-1", "number": number}});
        let r = mine.submit(&job, None).await.unwrap();
        submitted.push(r.json()["id"].as_str().unwrap().to_owned());
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let other =
        theirs.submit(&json!({"kind": "vault.put", "payload": {"record": {}}}), Some(10)).await.unwrap();
    let other_id = other.json()["id"].as_str().unwrap().to_owned();

    // Number 3 waits for 2 (recorded once the worker saw it): all five are listed then.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let page = loop {
        let (status, page) = list(&mut mine, "").await;
        assert_eq!(status, 200, "{page}");
        if ids(&page).len() == 5 || std::time::Instant::now() > deadline {
            break page;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let newest_first: Vec<String> = submitted.iter().rev().cloned().collect();
    assert_eq!(ids(&page), newest_first, "{page}");
    let waiting = &page["jobs"][0];
    assert_eq!(
        (waiting["kind"].as_str(), waiting["status"].as_str()),
        (Some("ledger.apply"), Some("waiting_for_sequence"))
    );
    assert!(waiting["submitted_at"].is_string() && waiting["updated_at"].is_string(), "{waiting}");
    assert!(
        page["jobs"].as_array().unwrap().iter().all(|j| j.get("result").is_none()),
        "metadata only: {page}"
    );
    assert!(page.get("next_cursor").is_none(), "one page: {page}");

    let (_, vault) = list(&mut mine, "?kind=vault.put").await;
    assert_eq!(ids(&vault), newest_first[2..], "{vault}");
    let (_, waiting) = list(&mut mine, "?state=waiting_for_sequence").await;
    assert_eq!(ids(&waiting), newest_first[..1]);
    // Pages of two along the cursor: every job once, in order.
    let (mut paged, mut query) = (Vec::new(), "?limit=2".to_owned());
    loop {
        let (status, page) = list(&mut mine, &query).await;
        assert_eq!(status, 200, "{page}");
        paged.extend(ids(&page));
        let Some(next) = page["next_cursor"].as_str() else { break };
        query = format!("?limit=2&cursor={next}");
    }
    assert_eq!(paged, newest_first);

    // Another client's list holds its own job, none of these.
    let (_, other_page) = list(&mut theirs, "").await;
    assert_eq!(ids(&other_page), [other_id]);
    let (_, nothing) = list(&mut theirs, "?kind=ledger.apply").await;
    assert!(ids(&nothing).is_empty(), "{nothing}");

    // The CLI's `gatehouse jobs list` goes the same way.
    let args = ListArgs {
        state: None,
        kind: Some("vault.put".into()),
        submitted_after: None,
        batch: None,
        workflow: None,
        limit: 2,
        cursor: None,
    };
    assert!(jobs::list(&sys.endpoint(), &args, true).await.unwrap());
    let bad = ListArgs { state: Some("nope".into()), ..args };
    assert!(!jobs::list(&sys.endpoint(), &bad, true).await.unwrap(), "a refused list is not a success");

    let (status, problem) = list(&mut mine, "?state=nope&limit=0&cursor=x&submitted_after=yesterday").await;
    assert_eq!(status, 422, "{problem}");
    assert_eq!(problem["type"], "urn:gatehouse:problem:invalid-query");
    let paths: Vec<&str> =
        problem["errors"].as_array().unwrap().iter().map(|e| e["path"].as_str().unwrap()).collect();
    assert_eq!(paths, ["/state", "/limit", "/cursor", "/submitted_after"]);
    sys.stop().await;
}
