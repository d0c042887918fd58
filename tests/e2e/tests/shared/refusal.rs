//! Storage that refuses writes for a while (a full disk, a read-only database), while jobs
//! keep coming: what the worker must do is the same on both backends, so both fault suites run
//! this one scenario and differ only in how they cause the refusal and end it. Included by
//! `faults.rs` (SQLite on a small tmpfs) and `scale_out.rs` (PostgreSQL read-only).
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::time::{Duration, Instant};

use gatehouse_e2e::{TestSystem, management, oracle, report};
use serde_json::Value;

use super::ledger_model::*;

/// What the scenario saw.
pub struct Refusal {
    /// `/readyz` while storage refused writes (status, text).
    pub readyz_during: Option<(u16, String)>,
    /// Status reads of decided jobs during the refusal, and those that did not answer 200
    /// `succeeded`.
    pub reads: usize,
    pub failed_reads: Vec<String>,
    pub drained: bool,
    pub ready_again: bool,
    pub counts: (usize, usize, usize, usize, usize),
    pub expected: usize,
    /// The worker's WARN lines, and its whole log.
    pub warns: Vec<String>,
    pub log: String,
}

async fn readyz(sys: &TestSystem) -> (u16, String) {
    let admin = sys.worker_admin_addr.expect("one worker process has an admin listener");
    management::call_at(admin, "GET", "/readyz", None).await
}

/// 200 ledger jobs on working storage; then `refuse`, and 600 more submitted while `/readyz`
/// and status reads of the first jobs are watched for 4 s after the worker says 503; then
/// `restore`, and everything must be applied once, in order. `name` labels the report line.
pub async fn storage_refuses_writes(
    sys: &TestSystem,
    name: &str,
    refuse: impl Future<Output = ()>,
    restore: impl Future<Output = ()>,
) -> Refusal {
    let (before, during, accounts) = (200, 600, 10);
    let mut rng = Rng(0xd15c);
    let (jobs, _) = ledger_model(before + during, accounts, "refused", &mut rng);
    // The first `before` jobs of the model (the lowest numbers of each account) run on working
    // storage, and their ids are read back throughout the refusal; the rest come during it.
    // Each part in a shuffled order.
    let (mut order, mut rest): (Vec<usize>, Vec<usize>) =
        ((0..before).collect(), (before..before + during).collect());
    rng.shuffle(&mut order);
    rng.shuffle(&mut rest);
    order.extend(rest);
    let bodies: Vec<Value> = order.iter().map(|&i| jobs[i].body()).collect();
    let (first, _) = submit_all(sys, bodies[..before].to_vec(), 8).await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let sample: Vec<String> = first.values().take(25).cloned().collect();
    loop {
        let rows = oracle::jobs(&sys.storage(), &sys.keyring());
        if first.values().all(|id| rows.get(id).is_some_and(|r| r.state == "succeeded"))
            && readyz(sys).await.0 == 200
        {
            break;
        }
        assert!(Instant::now() < deadline, "the first jobs were not decided");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    refuse.await;
    let submitting = submit_paced(sys, bodies[before..].to_vec(), 4, Duration::from_millis(5));
    let watching = async {
        let (mut refused, mut reads, mut failed_reads) = (None::<(Instant, (u16, String))>, 0, Vec::new());
        let mut conn = sys.connect().await;
        let until = Instant::now() + Duration::from_secs(60);
        while Instant::now() < until {
            let ready = readyz(sys).await;
            if ready.0 == 503 && refused.is_none() {
                refused = Some((Instant::now(), ready));
            }
            for id in &sample {
                let r = conn.status(id).await.expect("status request");
                reads += 1;
                if r.status != 200 || r.json()["status"] != "succeeded" {
                    failed_reads.push(format!("{id}: {} {}", r.status, r.text()));
                }
            }
            if refused.as_ref().is_some_and(|(at, _)| at.elapsed() > Duration::from_secs(4)) {
                break;
            }
        }
        (refused.map(|(_, r)| r), reads, failed_reads)
    };
    let ((during_ids, unavailable), (readyz_during, reads, failed_reads)) =
        tokio::join!(submitting, watching);
    restore.await;

    let mut ids = first;
    ids.extend(during_ids.into_iter().map(|(i, id)| (i + before, id)));
    let model_ids: HashMap<usize, String> = ids.iter().map(|(&pos, id)| (order[pos], id.clone())).collect();
    let per_account = ((before + during) / accounts) as u64;
    let drained = wait_ledger(sys, Duration::from_secs(120), |l| {
        l.len() == accounts && l.values().all(|(_, s)| *s == per_account)
    })
    .await;
    let until = Instant::now() + Duration::from_secs(30);
    let ready_again = loop {
        if readyz(sys).await.0 == 200 {
            break true;
        }
        if Instant::now() > until {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (applied, lost, duplicated, violations) = check_ledger(sys, &jobs, &model_ids);
    let dead = sys.queue_depth(&sys.topology().dead_queue()).await;
    let log = sys.worker_process().log();
    let warns: Vec<String> = log.lines().filter(|l| l.contains(" WARN ")).map(str::to_owned).collect();
    report(&format!(
        "FAULT {name} (N={}): accepted={} applied={applied} lost={lost} duplicated={duplicated} \
         order_violations={violations} dead_lettered={dead} status_reads_during={reads} failed_reads={} \
         readyz_during={:?} warn_lines={} outages_said={} recoveries={} 503s={unavailable}",
        before + during,
        ids.len(),
        failed_reads.len(),
        readyz_during,
        warns.len(),
        log.matches("storage refuses writes").count() + log.matches("storage refused a write again").count(),
        log.matches("storage takes writes again").count(),
    ));
    Refusal {
        readyz_during,
        reads,
        failed_reads,
        drained,
        ready_again,
        counts: (applied, lost, duplicated, violations, dead as usize),
        expected: before + during,
        warns,
        log,
    }
}

impl Refusal {
    /// What both backends must show: nothing lost or applied twice, out of order or
    /// dead-lettered; `/readyz` 503 with the reason during, 200 after; every status read of a
    /// decided job answered; the refusal said once at WARN, and fewer than 20 WARN lines in all.
    pub fn assert_held(&self) {
        let log = &self.log;
        assert!(self.drained, "not everything was applied; worker log:\n{log}");
        assert_eq!(self.counts, (self.expected, 0, 0, 0, 0), "applied, lost, duplicated, order, dead");
        let (status, text) =
            self.readyz_during.clone().unwrap_or_else(|| panic!("/readyz never said 503:\n{log}"));
        assert_eq!(status, 503);
        assert!(text.starts_with("storage refuses writes: "), "{text}");
        assert!(
            self.failed_reads.is_empty(),
            "{} of {} status reads failed during the refusal: {:?}",
            self.failed_reads.len(),
            self.reads,
            &self.failed_reads[..self.failed_reads.len().min(3)]
        );
        assert!(self.ready_again, "/readyz did not turn 200 again");
        assert!(self.warns.len() < 20, "{} WARN lines:\n{}", self.warns.len(), self.warns.join("\n"));
        let warned = self.warns.iter().filter(|l| l.contains("storage refuses writes")).count();
        assert_eq!(warned, 1, "said once at WARN:\n{log}");
        assert!(log.contains("storage takes writes again"), "never said:\n{log}");
    }
}
