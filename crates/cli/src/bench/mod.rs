//! `gatehouse bench`: throughput, latency and priority under load against a running
//! gatekeeper, with the raw broker measured in the same run as the reference.
//!
//! | scenario | what | reference |
//! |---|---|---|
//! | `kinds` | each `--kind` (payload `{"text"}`) with `Prefer: wait` | the built-in `vault.put` the same way, in turns |
//! | `sync` | `vault.put` with `Prefer: wait`: gatekeeper → broker → worker → SQLite → reply | lapin RPC: confirmed persistent publish to a priority queue, consume, reply (in turns with ours, five slices each) |
//! | `async` | submit only (answered after the confirm; a local worker paused meanwhile), then the drain rate until applied | lapin confirmed persistent publishes |
//! | `priority` | preload a backlog of priority-0 jobs (a local worker paused meanwhile), then priority-9 probes at a fixed rate while it drains | – |
//! | `fair` | the `priority` backlog loaded by one client, then another client (`bench-1`, listed in the policy) submits at the same priority 0 at a fixed rate while it drains: its latency | – |
//! | `idle` | gatekeeper memory with many idle mTLS connections | – |
//! | `batch` | 1,000 `vault.put` as one `POST /v1/batches` (a local worker paused meanwhile) | the same 1,000 as single submits on one connection, in turns |

mod baseline;
mod cpu;
mod rss;
mod scenarios;
mod stats;

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::commands::jobs::Endpoint;
use stats::Samples;

/// Options of `gatehouse bench`.
#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[command(flatten)]
    pub endpoint: Endpoint,
    /// Scenarios to run (repeatable): sync, async, priority, fair, idle, kinds, batch.
    #[arg(long = "scenario", default_values = ["sync", "async", "priority", "idle"])]
    pub scenarios: Vec<String>,
    /// Concurrent clients (and baseline callers).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,
    /// Seconds each measured phase runs.
    #[arg(long, default_value_t = 10)]
    pub duration: u64,
    /// Use HTTP/2 (all clients share one connection) instead of HTTP/1.1 keep-alive.
    #[arg(long)]
    pub http2: bool,
    /// Most jobs the async phase (and its reference) submits: it ends at this count or after
    /// `--duration`. Half the default queue bound, so that the paused worker's queue never
    /// fills (a full queue answers 503).
    #[arg(long, default_value_t = 50_000)]
    pub async_jobs: u64,
    /// Low-priority jobs queued before the priority probes (and the other client's jobs of
    /// `fair`).
    #[arg(long, default_value_t = 50_000)]
    pub backlog: usize,
    /// Priority-9 probes per second (and the other client's jobs per second of `fair`).
    #[arg(long, default_value_t = 20)]
    pub probe_rate: u32,
    /// Idle connections for the `idle` scenario.
    #[arg(long, default_value_t = 1000)]
    pub idle_connections: usize,
    /// Jobs of each batch of the `batch` scenario (and single submits it compares them with).
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..=1000))]
    pub batch_jobs: u64,
    /// Broker for the raw-lapin reference (admin URL; it declares and deletes
    /// `gatehouse.bench.baseline`).
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    pub broker: String,
    /// Do not pause the local `worker` process while loading the priority backlog.
    #[arg(long)]
    pub no_pause: bool,
    /// Prefetch of the reference consumer (the worker's, config/worker.toml, to compare like
    /// with like).
    #[arg(long, default_value_t = 16)]
    pub prefetch: u16,
    /// For the `kinds` scenario: kinds whose payload is `{"text"}` (e.g. the executable kinds
    /// of examples/exec-kinds), each measured like `sync` against `vault.put` in turns.
    #[arg(long = "kind")]
    pub kinds: Vec<String>,
    /// For the `kinds` scenario: spread the connections over this many client identities,
    /// `bench-1` … `bench-N` (their certificates are made beside `--cert` from the dev CA when
    /// missing; list them in the gatekeeper's policy).
    #[arg(long, default_value_t = 1)]
    pub clients: usize,
    /// The reference on a quorum queue (against a system whose classes are quorum lanes,
    /// `gatehouse up --cluster`; point `--broker` at a node of the cluster).
    #[arg(long)]
    pub quorum: bool,
    /// One JSON object per line per scenario instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// The client identities of the `kinds` scenario: the given one, or `bench-1` … `bench-N`
/// (certificates made from the dev CA beside `--cert` when missing).
fn bench_clients(
    args: &BenchArgs,
    client: &gatehouse_client::Client,
) -> anyhow::Result<Vec<gatehouse_client::Client>> {
    if args.clients <= 1 {
        return Ok(vec![client.clone()]);
    }
    (1..=args.clients).map(|i| bench_client(args, i)).collect()
}

/// A client as `bench-<i>` (its certificate made from the dev CA beside `--cert` when missing).
fn bench_client(args: &BenchArgs, i: usize) -> anyhow::Result<gatehouse_client::Client> {
    let dir = args.endpoint.cert.parent().unwrap_or(std::path::Path::new("."));
    let name = format!("bench-{i}");
    let (cert, key) = (dir.join(format!("{name}.pem")), dir.join(format!("{name}.key")));
    if !cert.exists() {
        gatehouse_devenv::certs::write_client(dir, &name)?;
    }
    let identity = gatehouse_client::Identity { cert, key };
    let c = gatehouse_client::Client::new(&args.endpoint.url, &args.endpoint.ca, Some(identity))?;
    Ok(if args.http2 { c.http2() } else { c })
}

/// Slices of the sync and async scenarios and of their references, run in turns.
const SLICES: u32 = 5;

/// Pauses the local `worker` processes (SIGSTOP) unless `--no-pause`; answers their pids
/// (`None` when none was paused).
fn pause_local_worker(args: &BenchArgs) -> Option<Vec<u32>> {
    if args.no_pause {
        return None;
    }
    let paused: Vec<u32> =
        rss::pids_of("worker").into_iter().filter(|pid| rss::signal(*pid, "STOP")).collect();
    (!paused.is_empty()).then_some(paused)
}

/// Resumes workers paused by [`pause_local_worker`].
fn resume(workers: &Option<Vec<u32>>) {
    for pid in workers.iter().flatten() {
        rss::signal(*pid, "CONT");
    }
}

/// Runs the scenarios; answers one report per scenario.
///
/// # Errors
/// When the gatekeeper or the broker cannot be reached.
pub async fn run(args: &BenchArgs) -> anyhow::Result<Vec<Value>> {
    let mut client = args.endpoint.client()?;
    if args.http2 {
        client = client.http2();
    }
    let duration = Duration::from_secs(args.duration);
    let c = args.concurrency;
    let mut reports = Vec::new();
    for scenario in &args.scenarios {
        let report = match scenario.as_str() {
            "sync" => {
                // In alternating slices, so that a slow spell of a shared machine hits both
                // sides alike instead of skewing the ratio.
                let slice = duration / SLICES;
                let (mut ours, mut base) = (Samples::default(), Samples::default());
                let mut used = cpu::Cpu::default();
                for _ in 0..SLICES {
                    let before = cpu::Cpu::now();
                    ours.then(progress("sync", slice, scenarios::sync(&client, c, slice)).await?);
                    used.add(&cpu::Cpu::now().since(&before));
                    let reference = baseline::rpc(&args.broker, args.quorum, c, slice, args.prefetch);
                    base.then(progress("sync baseline", slice, reference).await?);
                }
                with_cpu(with_baseline(row("sync", args, &ours), &base), &used, ours.latencies.len())
            }
            "kinds" => {
                // Each kind against the built-in vault.put, in alternating slices.
                anyhow::ensure!(!args.kinds.is_empty(), "the kinds scenario needs --kind NAME");
                let slice = duration / SLICES;
                let clients = bench_clients(args, &client)?;
                for kind in &args.kinds {
                    let (mut theirs, mut builtin) = (Samples::default(), Samples::default());
                    for _ in 0..SLICES {
                        theirs.then(
                            progress(kind, slice, scenarios::sync_of(&clients, c, slice, Some(kind))).await?,
                        );
                        builtin.then(
                            progress("vault.put", slice, scenarios::sync_of(&clients, c, slice, None))
                                .await?,
                        );
                    }
                    let mut r = row(kind, args, &theirs);
                    r["clients"] = json!(clients.len());
                    r["vault_put_per_s"] = json!(round(throughput(&builtin)));
                    r["ratio_to_vault_put"] =
                        json!(round(throughput(&theirs) / throughput(&builtin).max(f64::MIN_POSITIVE)));
                    print_report(&r, args.json);
                    reports.push(r);
                }
                continue;
            }
            "async" => {
                // Like the reference, which publishes to a queue nobody consumes, the accept
                // phase runs with a local worker paused (on a shared machine it would otherwise
                // compete for the same cores); it resumes for the drain. Ours and the reference
                // take turns, as in `sync`.
                let mut reference = baseline::Publishing::open(&args.broker, args.quorum).await?;
                let worker = pause_local_worker(args);
                let accepted = accept_in_turns(args, &client, &mut reference).await;
                let resumed = Instant::now();
                let before = cpu::Cpu::now();
                resume(&worker);
                reference.close().await;
                let (ours, base, ids) = accepted?;
                let drained = progress(
                    "async drain",
                    Duration::from_secs(600),
                    scenarios::drained(&client, &ids, 50, Duration::from_secs(600)),
                )
                .await?;
                // CPU of the drain: what it takes to run the queued jobs.
                let used = cpu::Cpu::now().since(&before);
                let mut r = with_cpu(with_baseline(row("async", args, &ours), &base), &used, ids.len());
                // Without a pause the drain overlapped the accept phase.
                let drain_time = drained.duration_since(resumed)
                    + if worker.is_some() { Duration::ZERO } else { ours.elapsed };
                r["drain_per_s"] = json!(round(ids.len() as f64 / drain_time.as_secs_f64()));
                r["worker_paused_while_accepting"] = json!(worker.is_some());
                r
            }
            "priority" => behind_backlog(args, &client, &client, 9, "priority").await?,
            // The same backlog, loaded by this client; another client (`bench-1`) submits at the
            // same priority while it drains.
            "fair" => behind_backlog(args, &client, &bench_client(args, 1)?, 0, "fair").await?,
            "idle" => {
                let (open, n) = progress("idle", Duration::from_secs(600), async {
                    Ok::<_, anyhow::Error>(scenarios::idle(&client, args.idle_connections).await)
                })
                .await?;
                tokio::time::sleep(Duration::from_millis(500)).await;
                let rss = rss::of("gatekeeper");
                drop(open);
                json!({
                    "scenario": "idle",
                    "idle_connections": n,
                    "gatekeeper_rss_mib": rss.map(|r| round(r.0)),
                    "gatekeeper_peak_rss_mib": rss.map(|r| round(r.1)),
                })
            }
            "batch" => batches(args, &client).await?,
            other => {
                anyhow::bail!("unknown scenario {other:?} (sync, async, priority, fair, idle, kinds, batch)")
            }
        };
        print_report(&report, args.json);
        reports.push(report);
    }
    Ok(reports)
}

/// Jobs accepted per second as single submits on one connection and as batches of
/// `--batch-jobs`, five rounds each in turns, with a local worker paused meanwhile (it would
/// compete for the cores).
async fn batches(args: &BenchArgs, client: &gatehouse_client::Client) -> anyhow::Result<Value> {
    const ROUNDS: usize = 5;
    let jobs = usize::try_from(args.batch_jobs).unwrap_or(1);
    let worker = pause_local_worker(args);
    let measured =
        progress("batch", Duration::from_secs(600), scenarios::singles_and_batches(client, jobs, ROUNDS))
            .await;
    resume(&worker);
    let (singles, batches) = measured?;
    let rate = |d: &[Duration]| (jobs * d.len()) as f64 / d.iter().sum::<Duration>().as_secs_f64();
    let (single, batch) = (rate(&singles), rate(&batches));
    Ok(json!({
        "scenario": "batch",
        "jobs_per_batch": jobs,
        "rounds": ROUNDS,
        "single_submits_per_s": round(single),
        "batch_jobs_per_s": round(batch),
        "ratio": round(batch / single.max(f64::MIN_POSITIVE)),
        "worker_paused_while_accepting": worker.is_some(),
    }))
}

/// A backlog of `--backlog` priority-0 jobs loaded by `client` (a local worker paused meanwhile,
/// SIGSTOP, resumed with SIGCONT before the probes, so that they really meet the whole backlog),
/// then `prober`'s jobs at `priority`, `--probe-rate` a second, while it drains: their latency.
async fn behind_backlog(
    args: &BenchArgs,
    client: &gatehouse_client::Client,
    prober: &gatehouse_client::Client,
    priority: u8,
    scenario: &str,
) -> anyhow::Result<Value> {
    let duration = Duration::from_secs(args.duration);
    let worker = pause_local_worker(args);
    let backlog = preload(client, args.concurrency, args.backlog);
    let queued = progress(&format!("{scenario} backlog"), Duration::from_secs(3600), backlog).await;
    resume(&worker);
    let queued = queued?;
    let probes = scenarios::probes(prober, args.probe_rate, duration, priority);
    let probes = progress(&format!("{scenario} probes"), duration, probes).await?;
    let mut r = row(scenario, args, &probes);
    r["backlog"] = json!(queued);
    r["worker_paused_while_loading"] = json!(worker.is_some());
    r["probe_rate_per_s"] = json!(args.probe_rate);
    Ok(r)
}

/// The async accept phase and its reference in [`SLICES`] turns, each a slice of the duration
/// and of the job count; answers ours, the reference's, and the accepted job ids.
async fn accept_in_turns(
    args: &BenchArgs,
    client: &gatehouse_client::Client,
    reference: &mut baseline::Publishing,
) -> anyhow::Result<(Samples, Samples, Vec<String>)> {
    let (c, slice) = (args.concurrency, Duration::from_secs(args.duration) / SLICES);
    let jobs = args.async_jobs.div_ceil(u64::from(SLICES));
    let (mut ours, mut base, mut ids) = (Samples::default(), Samples::default(), Vec::new());
    for _ in 0..SLICES {
        let (s, accepted) = progress("async", slice, scenarios::accept(client, c, slice, jobs, 5)).await?;
        ours.then(s);
        ids.extend(accepted);
        base.then(progress("async baseline", slice, reference.run(c, slice, jobs)).await?);
    }
    Ok((ours, base, ids))
}

/// Preloads `n` priority-0 jobs as fast as `c` clients can submit them; answers how many.
async fn preload(client: &gatehouse_client::Client, c: usize, n: usize) -> anyhow::Result<usize> {
    let per = n.div_ceil(c.max(1));
    let mut tasks = Vec::new();
    for k in 0..c {
        let client = client.clone();
        tasks.push(tokio::spawn(async move {
            let mut conn = client.connect().await?;
            let mut ok = 0;
            for i in 0..per {
                let job = json!({"kind": "vault.put", "payload": {"record": {"backlog": k * per + i}}, "priority": 0});
                if conn.submit(&job, None).await.is_ok_and(|r| r.status == 202) {
                    ok += 1;
                }
                scenarios::DONE.fetch_add(1, Ordering::Relaxed);
            }
            Ok::<_, anyhow::Error>(ok)
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await??;
    }
    Ok(total)
}

fn round(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn row(scenario: &str, args: &BenchArgs, s: &Samples) -> Value {
    let gk = rss::of("gatekeeper");
    let worker = rss::of("worker");
    json!({
        "scenario": scenario,
        "concurrency": args.concurrency,
        "http": if args.http2 { "2" } else { "1.1" },
        "requests": s.latencies.len(),
        "throughput_per_s": round(throughput(s)),
        "p50_ms": round(s.quantile_ms(0.5)),
        "p90_ms": round(s.quantile_ms(0.9)),
        "p99_ms": round(s.quantile_ms(0.99)),
        "p999_ms": round(s.quantile_ms(0.999)),
        "max_ms": round(s.quantile_ms(1.0)),
        "errors": s.error_count(),
        "errors_by_status": s.errors,
        "gatekeeper_peak_rss_mib": gk.map(|r| round(r.1)),
        "worker_peak_rss_mib": worker.map(|r| round(r.1)),
    })
}

/// Successful requests per second of the measured phase.
fn throughput(s: &Samples) -> f64 {
    let secs = s.elapsed.as_secs_f64();
    if secs > 0.0 { s.latencies.len() as f64 / secs } else { 0.0 }
}

/// `r` with the CPU per job of each process group (`used` over `jobs` jobs).
fn with_cpu(mut r: Value, used: &cpu::Cpu, jobs: usize) -> Value {
    if let (Value::Object(map), Value::Object(cpu)) = (&mut r, used.per_job(jobs)) {
        map.extend(cpu);
    }
    r
}

fn with_baseline(mut r: Value, base: &Samples) -> Value {
    let base_tp = throughput(base);
    r["baseline_throughput_per_s"] = json!(round(base_tp));
    r["baseline_p50_ms"] = json!(round(base.quantile_ms(0.5)));
    r["baseline_p99_ms"] = json!(round(base.quantile_ms(0.99)));
    let ours = r["throughput_per_s"].as_f64().unwrap_or(0.0);
    r["ratio"] = json!(if base_tp > 0.0 { round(ours / base_tp) } else { 0.0 });
    r
}

/// Runs `f`, showing a progress line on a terminal.
async fn progress<T>(
    label: &str,
    expected: Duration,
    f: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    let show = std::io::stderr().is_terminal();
    let start = Instant::now();
    scenarios::DONE.store(0, Ordering::Relaxed);
    let ticker = show.then(|| {
        let label = label.to_owned();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let elapsed = start.elapsed().as_secs_f64();
                let bar = ((elapsed / expected.as_secs_f64()).min(1.0) * 30.0) as usize;
                eprint!(
                    "\r{label:<18} [{}{}] {elapsed:5.1}s {:>8} requests",
                    "#".repeat(bar),
                    " ".repeat(30 - bar),
                    scenarios::DONE.load(Ordering::Relaxed)
                );
                let _ = std::io::stderr().flush();
            }
        })
    });
    let out = f.await;
    if let Some(t) = ticker {
        t.abort();
        eprint!("\r{:80}\r", "");
    }
    out
}

fn print_report(r: &Value, as_json: bool) {
    if as_json {
        println!("{r}");
        return;
    }
    let f = |k: &str| match &r[k] {
        Value::Null => "-".to_owned(),
        v => v.to_string(),
    };
    match r["scenario"].as_str() {
        Some("idle") => println!(
            "idle      {} idle mTLS connections: gatekeeper RSS {} MiB (peak {} MiB)",
            f("idle_connections"),
            f("gatekeeper_rss_mib"),
            f("gatekeeper_peak_rss_mib")
        ),
        Some("batch") => println!(
            "batch     {} jobs per batch: {}/s as batches, {}/s as single submits on one connection: {}x",
            f("jobs_per_batch"),
            f("batch_jobs_per_s"),
            f("single_submits_per_s"),
            f("ratio")
        ),
        _ => {
            println!(
                "{:<9} c={:<3} HTTP/{:<3} {:>7} req {:>9}/s  p50 {:>7} p90 {:>7} p99 {:>7} p99.9 {:>7} max {:>7} ms  errors {}",
                f("scenario").trim_matches('"'),
                f("concurrency"),
                f("http").trim_matches('"'),
                f("requests"),
                f("throughput_per_s"),
                f("p50_ms"),
                f("p90_ms"),
                f("p99_ms"),
                f("p999_ms"),
                f("max_ms"),
                f("errors"),
            );
            if !r["baseline_throughput_per_s"].is_null() {
                println!(
                    "          raw lapin: {:>9}/s  p50 {} p99 {} ms  ->  ratio {}{}",
                    f("baseline_throughput_per_s"),
                    f("baseline_p50_ms"),
                    f("baseline_p99_ms"),
                    f("ratio"),
                    r.get("drain_per_s").map(|d| format!("; drained at {d}/s")).unwrap_or_default()
                );
            }
            if !r["ratio_to_vault_put"].is_null() {
                println!(
                    "          built-in vault.put in turns: {:>9}/s  ->  ratio {}",
                    f("vault_put_per_s"),
                    f("ratio_to_vault_put")
                );
            }
            if !r["backlog"].is_null() {
                println!(
                    "          behind a backlog of {} priority-0 jobs, {} probes/s",
                    f("backlog"),
                    f("probe_rate_per_s")
                );
            }
            println!(
                "          peak RSS: gatekeeper {} MiB, worker {} MiB",
                f("gatekeeper_peak_rss_mib"),
                f("worker_peak_rss_mib")
            );
        }
    }
}
