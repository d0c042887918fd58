//! What the fault suites share: a deterministic PRNG, the ledger model (jobs, submission
//! order), submitting under faults, and checking storage against the model. Included by
//! `faults.rs` and `cluster.rs` (`#[path]`), each its own test binary; not every binary uses
//! every item.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse_e2e::{TestSystem, oracle};
use serde_json::{Value, json};

pub fn env_size(var: &str, default: usize) -> usize {
    std::env::var(var).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A small deterministic PRNG (xorshift64*), so that a failing run can be repeated.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            v.swap(i, self.below(i as u64 + 1) as usize);
        }
    }
}

/// One ledger job of the model.
#[derive(Debug, Clone)]
pub struct LedgerJob {
    pub account: String,
    pub number: u64,
    pub amount: i64,
}

/// `n` ledger jobs over `accounts` accounts named `<name>-<k>`, numbers 1.. per account, random
/// amounts from `rng`; and the order to submit them in (shuffled).
pub fn ledger_model(n: usize, accounts: usize, name: &str, rng: &mut Rng) -> (Vec<LedgerJob>, Vec<usize>) {
    let jobs: Vec<LedgerJob> = (0..n)
        .map(|i| LedgerJob {
            account: format!("{name}-{}", i % accounts),
            number: (i / accounts) as u64 + 1,
            amount: rng.below(1000) as i64 + 1,
        })
        .collect();
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    (jobs, order)
}

impl LedgerJob {
    pub fn body(&self) -> Value {
        json!({
            "kind": "ledger.apply",
            "payload": {"account": self.account, "amount": self.amount},
            "sequence": {"key": self.account, "number": self.number},
            "idempotency_key": format!("{}-{}", self.account, self.number),
        })
    }
}

/// Submits `jobs` over `clients` connections; each job until the gatekeeper accepts it (503s
/// are retried, as a client should). Returns the job ids by index and the count of 503s.
pub async fn submit_all(
    sys: &TestSystem,
    jobs: Vec<Value>,
    clients: usize,
) -> (HashMap<usize, String>, usize) {
    submit_paced(sys, jobs, clients, Duration::ZERO).await
}

/// [`submit_all`], each client pausing `pace` between jobs (to spread load over a fault).
pub async fn submit_paced(
    sys: &TestSystem,
    jobs: Vec<Value>,
    clients: usize,
    pace: Duration,
) -> (HashMap<usize, String>, usize) {
    let queue = Arc::new(std::sync::Mutex::new(jobs.into_iter().enumerate().collect::<VecDeque<_>>()));
    // Spread over the gatekeepers, when there are several.
    let gatekeepers = sys.clients();
    let mut tasks = Vec::new();
    for t in 0..clients {
        let (queue, client) = (queue.clone(), gatekeepers[t % gatekeepers.len()].clone());
        tasks.push(tokio::spawn(async move {
            let mut ids = HashMap::new();
            let mut unavailable = 0;
            let mut conn = None;
            loop {
                let Some((i, job)) = queue.lock().unwrap().pop_front() else {
                    break;
                };
                let deadline = Instant::now() + Duration::from_secs(120);
                loop {
                    assert!(Instant::now() < deadline, "job {i} was never accepted");
                    if conn.is_none() {
                        conn = client.connect().await.ok();
                    }
                    let Some(c) = conn.as_mut() else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    match c.submit(&job, None).await {
                        Ok(res) if res.status == 202 || res.status == 200 => {
                            ids.insert(i, res.json()["id"].as_str().unwrap().to_owned());
                            tokio::time::sleep(pace).await;
                            break;
                        }
                        Ok(res) if res.status == 503 => {
                            assert!(res.retry_after.is_some(), "503 without Retry-After");
                            unavailable += 1;
                            tokio::time::sleep(Duration::from_millis(100)).await;
                        }
                        Ok(res) => panic!("job {i} refused: {} {}", res.status, res.text()),
                        Err(_) => conn = None,
                    }
                }
            }
            (ids, unavailable)
        }));
    }
    let mut all = HashMap::new();
    let mut unavailable = 0;
    for t in tasks {
        let (ids, u) = t.await.unwrap();
        all.extend(ids);
        unavailable += u;
    }
    (all, unavailable)
}

/// Waits until `done(ledger)` holds or `timeout` passes.
pub async fn wait_ledger(
    sys: &TestSystem,
    timeout: Duration,
    done: impl Fn(&HashMap<String, (i64, u64)>) -> bool,
) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if done(&oracle::ledger(&sys.storage(), &sys.keyring())) {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

/// Compares storage with the model of ledger jobs: (applied, lost, duplicated, order violations).
pub fn check_ledger(
    sys: &TestSystem,
    jobs: &[LedgerJob],
    ids: &HashMap<usize, String>,
) -> (usize, usize, usize, usize) {
    let rows = oracle::jobs(&sys.storage(), &sys.keyring());
    let ledger = oracle::ledger(&sys.storage(), &sys.keyring());
    let mut prefix: HashMap<(String, u64), i64> = HashMap::new();
    let mut by_account: HashMap<&str, Vec<&LedgerJob>> = HashMap::new();
    for j in jobs {
        by_account.entry(&j.account).or_default().push(j);
    }
    let mut duplicated = 0;
    for (account, mut js) in by_account {
        js.sort_by_key(|j| j.number);
        let mut sum = 0;
        for j in &js {
            sum += j.amount;
            prefix.insert((account.to_owned(), j.number), sum);
        }
        let expected = (sum, js.len() as u64);
        if ledger.get(account).is_some_and(|got| *got != expected && got.1 == expected.1) {
            duplicated += 1;
        }
    }
    let (mut applied, mut lost, mut order) = (0, 0, 0);
    for (i, j) in jobs.iter().enumerate() {
        let Some(id) = ids.get(&i) else { continue };
        match rows.get(id) {
            Some(row) if row.state == "succeeded" => {
                applied += 1;
                let r = row.result.as_ref().unwrap();
                let want = prefix[&(j.account.clone(), j.number)];
                if r["sequence"] != j.number || r["balance"] != want {
                    order += 1;
                }
            }
            _ => lost += 1,
        }
    }
    (applied, lost, duplicated, order)
}
