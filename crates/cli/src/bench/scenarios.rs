//! The scenarios against a running gatekeeper, over real mTLS.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use gatehouse_client::{Client, Connection, Method};
use serde_json::{Value, json};

use super::stats::{Budget, Samples};

/// Requests answered so far, for the progress line.
pub static DONE: AtomicU64 = AtomicU64::new(0);

/// `n` connections: `n` of HTTP/1.1, or handles on one HTTP/2 connection.
async fn connections(client: &Client, n: usize) -> anyhow::Result<Vec<Connection>> {
    let first = client.connect().await?;
    let mut out = Vec::with_capacity(n);
    if let Some(shared) = first.share() {
        out.extend((1..n).filter_map(|_| shared.share()));
        out.push(first);
        return Ok(out);
    }
    out.push(first);
    for _ in 1..n {
        out.push(client.connect().await?);
    }
    Ok(out)
}

/// `n` connections spread over `clients` (client identities) in turn.
async fn connections_of(clients: &[Client], n: usize) -> anyhow::Result<Vec<Connection>> {
    let mut out = Vec::with_capacity(n);
    for (i, client) in clients.iter().enumerate() {
        let share = n / clients.len() + usize::from(i < n % clients.len());
        if share > 0 {
            out.extend(connections(client, share).await?);
        }
    }
    Ok(out)
}

/// The job every scenario submits (the reference publishes the same JSON).
pub fn job(i: u64, priority: u8) -> Value {
    json!({"kind": "vault.put", "payload": {"record": {"n": i, "bench": "x".repeat(64)}}, "priority": priority})
}

/// A job of `kind` (any kind whose payload is `{"text"}`, like the executable examples).
pub fn text_job(kind: &str, i: u64) -> Value {
    json!({"kind": kind, "payload": {"text": format!("bench job number {i}")}, "priority": 5})
}

/// Submits with `Prefer: wait` until `duration` passes: the full round trip through worker and
/// storage. A success is a 200 with status `succeeded`.
pub async fn sync(client: &Client, concurrency: usize, duration: Duration) -> anyhow::Result<Samples> {
    sync_of(std::slice::from_ref(client), concurrency, duration, None).await
}

/// [`sync`] with jobs of `kind` ([`text_job`]), or `vault.put` ([`job`]) when `None`, the
/// connections spread over `clients`.
pub async fn sync_of(
    clients: &[Client],
    concurrency: usize,
    duration: Duration,
    kind: Option<&str>,
) -> anyhow::Result<Samples> {
    let kind: Option<Arc<str>> = kind.map(Arc::from);
    let conns = connections_of(clients, concurrency).await?;
    let start = Instant::now();
    let deadline = start + duration;
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(c, mut conn)| {
            let kind = kind.clone();
            tokio::spawn(async move {
                let mut s = Samples::default();
                let mut i = (c as u64) << 32;
                while Instant::now() < deadline {
                    i += 1;
                    let sent = Instant::now();
                    let body = kind.as_deref().map_or_else(|| job(i, 5), |k| text_job(k, i));
                    match conn.submit(&body, Some(10)).await {
                        Ok(r) if r.status == 200 && r.json()["status"] == "succeeded" => {
                            s.latencies.push(sent.elapsed())
                        }
                        Ok(r) => s.error(r.status),
                        Err(_) => s.error(0),
                    }
                    DONE.fetch_add(1, Ordering::Relaxed);
                }
                s.elapsed = start.elapsed();
                s
            })
        })
        .collect();
    let mut samples = Samples::default();
    for t in tasks {
        samples.merge(t.await?);
    }
    Ok(samples)
}

/// Submits without waiting (answered after the broker's confirm) until `duration` passes or
/// `count` jobs were sent; answers the samples and the accepted job ids, in order.
pub async fn accept(
    client: &Client,
    concurrency: usize,
    duration: Duration,
    count: u64,
    priority: u8,
) -> anyhow::Result<(Samples, Vec<String>)> {
    let conns = connections(client, concurrency).await?;
    let start = Instant::now();
    let deadline = start + duration;
    let budget = Budget::new(count);
    let tasks: Vec<_> = conns
        .into_iter()
        .enumerate()
        .map(|(c, mut conn)| {
            let budget = budget.clone();
            tokio::spawn(async move {
                let (mut s, mut ids) = (Samples::default(), Vec::new());
                let mut i = (c as u64) << 32;
                while Instant::now() < deadline && budget.take() {
                    i += 1;
                    let sent = Instant::now();
                    match conn.submit(&job(i, priority), None).await {
                        Ok(r) if r.status == 202 => {
                            s.latencies.push(sent.elapsed());
                            ids.push(r.json()["id"].as_str().unwrap_or_default().to_owned());
                        }
                        Ok(r) => s.error(r.status),
                        Err(_) => s.error(0),
                    }
                    DONE.fetch_add(1, Ordering::Relaxed);
                }
                s.elapsed = start.elapsed();
                (s, ids)
            })
        })
        .collect();
    let (mut samples, mut ids) = (Samples::default(), Vec::new());
    for t in tasks {
        let (s, i) = t.await?;
        samples.merge(s);
        ids.extend(i);
    }
    Ok((samples, ids))
}

/// Waits until the last `tail` of `ids` have a final status (the worker has drained the
/// backlog); answers when that happened.
pub async fn drained(
    client: &Client,
    ids: &[String],
    tail: usize,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let mut conn = client.connect().await?;
    let deadline = Instant::now() + timeout;
    for id in ids.iter().rev().take(tail) {
        loop {
            let r = conn.status(id).await?;
            let state = r.json()["status"].as_str().unwrap_or_default().to_owned();
            if ["succeeded", "failed", "dead_lettered"].contains(&state.as_str()) {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "the worker did not drain the backlog in {timeout:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok(Instant::now())
}

/// Probes at `priority` (9 for `priority`, 0 from another client for `fair`), `rate` per
/// second for `duration`, each waiting for its outcome; answers their latencies (the caller
/// has preloaded a priority-0 backlog).
pub async fn probes(client: &Client, rate: u32, duration: Duration, priority: u8) -> anyhow::Result<Samples> {
    let conn = Arc::new(tokio::sync::Mutex::new(connections(client, 32).await?));
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / f64::from(rate.max(1))));
    let start = Instant::now();
    let deadline = start + duration;
    let mut tasks = Vec::new();
    let mut i = 0u64;
    while Instant::now() < deadline {
        tick.tick().await;
        i += 1;
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let mut c = match conn.lock().await.pop() {
                Some(c) => c,
                None => return Err(0),
            };
            let start = Instant::now();
            let r = c.submit(&job(u64::MAX - i, priority), Some(30)).await;
            conn.lock().await.push(c);
            DONE.fetch_add(1, Ordering::Relaxed);
            match r {
                Ok(r) if r.status == 200 => Ok(start.elapsed()),
                Ok(r) => Err(r.status),
                Err(_) => Err(0),
            }
        }));
    }
    let mut s = Samples::default();
    for t in tasks {
        match t.await? {
            Ok(d) => s.latencies.push(d),
            Err(status) => s.error(status),
        }
    }
    s.elapsed = start.elapsed();
    Ok(s)
}

/// Opens `n` mTLS connections that each answer one `/healthz` and then stay idle; answers
/// them (dropping them closes them) and how many opened.
pub async fn idle(client: &Client, n: usize) -> (Vec<Connection>, usize) {
    let mut open = Vec::with_capacity(n);
    for _ in 0..n {
        let Ok(mut c) = client.connect().await else { continue };
        if c.request(Method::GET, "/healthz", &[], Vec::new()).await.is_ok_and(|r| r.status == 200) {
            open.push(c);
            DONE.fetch_add(1, Ordering::Relaxed);
        }
    }
    let count = open.len();
    (open, count)
}

/// `rounds` times, in turns: `n` jobs submitted one request after another on one connection
/// (each answered after the broker's confirm), then the same number as one batch
/// (`POST /v1/batches`). Answers the durations of each: single requests, batches.
pub async fn singles_and_batches(
    client: &Client,
    n: usize,
    rounds: usize,
) -> anyhow::Result<(Vec<Duration>, Vec<Duration>)> {
    let mut conn = client.connect().await?;
    let (mut singles, mut batches) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let base = (round as u64) << 32;
        let started = Instant::now();
        for i in 0..n as u64 {
            let r = conn.submit(&job(base + i, 5), None).await?;
            anyhow::ensure!(r.status == 202, "a single submit answered {}: {}", r.status, r.text());
        }
        singles.push(started.elapsed());
        let jobs: Vec<Value> = (0..n as u64).map(|i| job(base + (1 << 31) + i, 5)).collect();
        let started = Instant::now();
        let r = conn.submit_batch(&jobs).await?;
        anyhow::ensure!(r.status == 202, "the batch answered {}: {}", r.status, r.text());
        batches.push(started.elapsed());
    }
    Ok((singles, batches))
}
