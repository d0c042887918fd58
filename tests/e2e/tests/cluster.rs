//! The broker as a three-node RabbitMQ cluster with quorum lanes: a node stopped, another
//! killed, the worker killed, one node partitioned off on a test host of its own. Each scenario
//! starts its own cluster; a binary of its own, so that nothing else shares its process or
//! its time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gatehouse_devenv::cluster::Cluster;
use gatehouse_e2e::{Options, TestSystem, report};
use serde_json::Value;
use tokio::sync::Mutex;

#[path = "shared/ledger_model.rs"]
mod ledger_model;
use ledger_model::*;

static SERIAL: Mutex<()> = Mutex::const_new(());

/// A three-node cluster (each node on a test host of its own with `on_hosts`), a system on it
/// with quorum lanes and a worker process, and the nodes' URLs; first the folder of the nodes'
/// data, which must outlive them (so: keep the tuple's order when binding it).
async fn cluster_system(on_hosts: bool) -> (tempfile::TempDir, Arc<Cluster>, TestSystem, Vec<String>) {
    let data = tempfile::tempdir().unwrap();
    let home = data.path().to_owned();
    let cluster = tokio::task::spawn_blocking(move || match on_hosts {
        true => Cluster::start_on_hosts(&home),
        false => Cluster::start(&home, 5681),
    })
    .await
    .unwrap()
    .expect("a three-node cluster starts");
    let cluster = Arc::new(cluster);
    let urls = cluster.urls("guest:guest", "%2f");
    let sys = TestSystem::start_with(Options {
        worker_binary: Some(env!("CARGO_BIN_EXE_e2e-worker")),
        quorum: true,
        broker_nodes: Some(urls.clone()),
        ..Options::default()
    })
    .await;
    (data, cluster, sys, urls)
}

/// Messages in `queue` of the broker at `url` (a passive declare).
async fn depth_at(url: &str, queue: &str) -> u32 {
    use gatehouse_broker::lapin::options::QueueDeclareOptions;
    let conn = gatehouse_broker::connect(url, "fault-depth").await.unwrap();
    let ch = conn.create_channel().await.unwrap();
    let opts = QueueDeclareOptions { passive: true, ..Default::default() };
    let n = ch
        .queue_declare(queue.into(), opts, Default::default())
        .await
        .map(|q| q.message_count())
        .unwrap_or(0);
    let _ = conn.close(200, "done".into()).await;
    n
}

/// Every job queue of the system's catalog (each lane of each fair shard).
fn job_queues(sys: &TestSystem) -> Vec<String> {
    let catalog = gatehouse_protocol::Catalog::load(sys.catalog_path()).expect("catalog");
    catalog.queues().iter().flat_map(|q| q.routes()).map(|r| sys.topology().job_queue(&r)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn quorum_lanes_on_a_three_node_cluster_lose_nothing_when_nodes_go() {
    let _serial = SERIAL.lock().await;
    let (_data, cluster, sys, urls) = cluster_system(false).await;
    let n = env_size("GATEHOUSE_FAULT_N", 2000) / 4;
    let accounts = 20;
    let (jobs, order) = ledger_model(n, accounts, "qq", &mut Rng(0x9e0_0001));
    let bodies: Vec<Value> = order.iter().map(|&i| jobs[i].body()).collect();

    // Under the stream: stop the node that leads the ledger's lane, start it again, then kill
    // another node's VM outright. Two of three nodes keep the quorum throughout.
    let lane = sys.topology().job_queue("batch.p0");
    let every_queue = job_queues(&sys);
    let faults = {
        let (cluster, lane) = (cluster.clone(), lane.clone());
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(800)).await;
            let leader = tokio::task::spawn_blocking({
                let (c, l) = (cluster.clone(), lane.clone());
                move || c.leader_of(&l)
            })
            .await
            .unwrap()
            .expect("the lane has a leader");
            let stopped = Instant::now();
            let c = cluster.clone();
            tokio::task::spawn_blocking(move || c.run(leader, &["stop_app"])).await.unwrap().unwrap();
            let c = cluster.clone();
            let l = lane.clone();
            let new_leader = tokio::task::spawn_blocking(move || {
                let deadline = Instant::now() + Duration::from_secs(30);
                loop {
                    match c.leader_of(&l) {
                        Ok(n) if n != leader => return Some(n),
                        _ if Instant::now() > deadline => return None,
                        _ => std::thread::sleep(Duration::from_millis(100)),
                    }
                }
            })
            .await
            .unwrap();
            let failover = stopped.elapsed();
            tokio::time::sleep(Duration::from_secs(2)).await;
            // Back, and caught up (an online member of every lane of every shard again) before
            // the next loss: two nodes lost at once would be no quorum for a queue it has not
            // caught up with, and that queue would rightly refuse publishes.
            let c = cluster.clone();
            let caught_up = tokio::task::spawn_blocking(move || {
                c.run(leader, &["start_app"]).unwrap();
                c.wait_online(&every_queue, &[1, 2, 3], Duration::from_secs(90))
            })
            .await
            .unwrap();
            assert!(caught_up, "the restarted node did not catch up with the lane");
            let victim = (1..=3).find(|i| *i != leader).unwrap();
            cluster.kill(victim).unwrap();
            (leader, new_leader, failover, victim)
        })
    };
    // And the worker dies (kill -9) six times meanwhile, with deliveries prefetched from every
    // lane: those come back with a higher delivery count, which must never reach the lanes'
    // x-delivery-limit (50) and dead-letter a healthy job.
    let killer = {
        let worker = sys.worker_process().clone();
        tokio::spawn(async move {
            for _ in 0..6 {
                tokio::time::sleep(Duration::from_millis(1500)).await;
                worker.kill();
                worker.start();
            }
        })
    };
    let (ids, unavailable) = submit_paced(&sys, bodies, 4, Duration::from_millis(120)).await;
    let (leader, new_leader, failover, victim) = faults.await.unwrap();
    killer.await.unwrap();
    let per_account = (n / accounts) as u64;
    let drained = wait_ledger(&sys, Duration::from_secs(120), |l| {
        l.len() == accounts && l.values().all(|(_, s)| *s == per_account)
    })
    .await;
    let mut model_ids = HashMap::new();
    for (pos, &i) in order.iter().enumerate() {
        if let Some(id) = ids.get(&pos) {
            model_ids.insert(i, id.clone());
        }
    }
    let (applied, lost, duplicated, violations) = check_ledger(&sys, &jobs, &model_ids);
    // The killed node comes back and catches up.
    let c = cluster.clone();
    let rejoined = tokio::task::spawn_blocking(move || {
        c.start_node(victim)?;
        c.await_node(victim, Duration::from_secs(60))
    })
    .await
    .unwrap();
    let dead = depth_at(&urls[leader % 3], &sys.topology().dead_queue()).await;
    report(&format!(
        "FAULT quorum lanes, 3-node cluster (N={n}): stop_app of lane leader node {leader} (new leader {new_leader:?} \
         after {:.1} s), start_app, then kill -9 of node {victim}: submitted={n} accepted={} applied={applied} \
         lost={lost} duplicated={duplicated} order_violations={violations} dead_lettered={dead} 503s={unavailable} \
         killed node rejoined={}; worker killed -9 six times (starts={})",
        failover.as_secs_f64(),
        ids.len(),
        rejoined.is_ok(),
        sys.worker_process().starts.load(std::sync::atomic::Ordering::SeqCst),
    ));
    assert!(drained, "not everything was applied; worker log:\n{}", sys.worker_process().log());
    assert!(new_leader.is_some(), "no new leader after the leader's node stopped");
    assert_eq!((applied, lost, duplicated, violations, dead), (n, 0, 0, 0, 0));
    assert!(rejoined.is_ok(), "{rejoined:?}");
    sys.stop().await;
    cluster.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_partitioned_cluster_node_loses_nothing_and_applies_nothing_twice_after_the_heal() {
    let _serial = SERIAL.lock().await;
    // Each node on a test host of its own (a network namespace with a veth link to a bridge
    // on this machine, where worker and gatekeeper run); node 3's link is cut under load and
    // restored later.
    let (_data, cluster, sys, urls) = cluster_system(true).await;
    let n = env_size("GATEHOUSE_FAULT_N", 2000) / 4;
    let accounts = 20;
    let (jobs, order) = ledger_model(n, accounts, "np", &mut Rng(0x9e0_0002));
    let bodies: Vec<Value> = order.iter().map(|&i| jobs[i].body()).collect();
    let partition = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(3)).await;
            cluster.hosts().unwrap().link(3, false).unwrap();
            let cut = Instant::now();
            tokio::time::sleep(Duration::from_secs(6)).await;
            cluster.hosts().unwrap().link(3, true).unwrap();
            cut.elapsed()
        })
    };
    let (ids, unavailable) = submit_paced(&sys, bodies, 4, Duration::from_millis(120)).await;
    let cut_for = partition.await.unwrap();
    let per_account = (n / accounts) as u64;
    let drained = wait_ledger(&sys, Duration::from_secs(120), |l| {
        l.len() == accounts && l.values().all(|(_, s)| *s == per_account)
    })
    .await;
    // After the heal, node 3 is an online member of the lane again.
    let lane = sys.topology().job_queue("batch.p0");
    let c = cluster.clone();
    let healed = tokio::task::spawn_blocking(move || c.wait_online(&[lane], &[3], Duration::from_secs(60)))
        .await
        .unwrap();
    let mut model_ids = HashMap::new();
    for (pos, &i) in order.iter().enumerate() {
        if let Some(id) = ids.get(&pos) {
            model_ids.insert(i, id.clone());
        }
    }
    let (applied, lost, duplicated, violations) = check_ledger(&sys, &jobs, &model_ids);
    let dead = depth_at(&urls[0], &sys.topology().dead_queue()).await;
    report(&format!(
        "FAULT quorum lanes, 3 nodes on 3 test hosts (N={n}): node 3's link cut for {:.1} s under load, then \
         restored: submitted={n} accepted={} applied={applied} lost={lost} duplicated={duplicated} \
         order_violations={violations} dead_lettered={dead} 503s={unavailable} node 3 back in the lane={healed}",
        cut_for.as_secs_f64(),
        ids.len(),
    ));
    assert!(drained, "not everything was applied; worker log:\n{}", sys.worker_process().log());
    assert_eq!((applied, lost, duplicated, violations, dead), (n, 0, 0, 0, 0));
    assert!(healed, "node 3 did not rejoin the lane after the heal");
    sys.stop().await;
}
