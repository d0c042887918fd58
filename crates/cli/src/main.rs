//! `gatehouse` — run the system locally, make dev certificates, submit jobs, query them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gatehouse_cli::commands::dlq::{self, BrokerArgs};
use gatehouse_cli::commands::jobs::{self, Endpoint, SubmitArgs};
use gatehouse_cli::commands::pauses::{self, PauseArgs, Target};
use gatehouse_cli::commands::queues::{self, MigrateArgs};
use gatehouse_cli::commands::rekey::{self, RekeyArgs};
use gatehouse_cli::commands::schedules::{self, SchedulesArgs};
use gatehouse_cli::commands::up::{self, UpArgs};
use gatehouse_devenv::certs;

#[derive(Parser)]
#[command(name = "gatehouse", version, about = "Background jobs on sensitive data, behind a gatekeeper")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start the whole system locally (broker, worker, gatekeeper) until Ctrl-C.
    Up(UpArgs),
    /// Development certificates.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// The worker's public sealing keys, certified by an operator key (operators, offline).
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Submit a job.
    Submit {
        #[command(flatten)]
        job: SubmitArgs,
        #[command(flatten)]
        endpoint: Endpoint,
        /// Print the response body as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Measure throughput, latency and priority against a running gatekeeper, with the raw
    /// broker as the reference.
    Bench(Box<gatehouse_cli::bench::BenchArgs>),
    /// Re-encrypt stored records and results under the active data key (operators).
    Rekey(RekeyArgs),
    /// The worker's cron schedules: next and last firings (operators, where the worker runs).
    Schedules {
        #[command(subcommand)]
        command: SchedulesCmd,
    },
    /// The dead-letter queue (operators).
    Dlq {
        #[command(subcommand)]
        command: DlqCmd,
        #[command(flatten)]
        broker: BrokerArgs,
    },
    /// Hold a kind's or a queue class's jobs, unstarted, on every worker (operators, where the
    /// worker runs); `pause list` shows what is paused.
    Pause {
        #[command(subcommand)]
        command: PauseCmd,
        #[command(flatten)]
        args: PauseArgs,
    },
    /// Let a paused kind's or queue class's jobs go, in the order they arrived.
    Resume {
        #[command(subcommand)]
        target: Target,
        #[command(flatten)]
        args: PauseArgs,
    },
    /// The job queues on the broker (operators).
    #[command(subcommand)]
    Queues(QueuesCmd),
    /// Show the status (and result) of one of your jobs.
    Status {
        id: String,
        #[command(flatten)]
        endpoint: Endpoint,
        /// Print the response body as JSON.
        #[arg(long)]
        json: bool,
        /// Follow its live event stream until it ends (a progress bar while it runs).
        #[arg(long)]
        follow: bool,
    },
    /// Your jobs.
    #[command(subcommand)]
    Jobs(JobsCmd),
    /// Cancel one of your jobs that has not ended.
    Cancel {
        id: String,
        #[command(flatten)]
        endpoint: Endpoint,
        /// Print the response body as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum JobsCmd {
    /// One page of your jobs, newest first (metadata only; results: `gatehouse status ID`).
    List {
        #[command(flatten)]
        args: jobs::ListArgs,
        #[command(flatten)]
        endpoint: Endpoint,
        /// Print the response body as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum SchedulesCmd {
    /// Each schedule: cron, next firing, last firing and its job, fired / skipped / missed.
    List {
        #[command(flatten)]
        args: SchedulesArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PauseCmd {
    /// Pause a job kind.
    Kind { name: String },
    /// Pause a queue class (every kind queued there).
    Queue { name: String },
    /// What is paused, since when, and how many jobs each holds.
    List {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum QueuesCmd {
    /// Move a queue class of a running system to the type its catalog now says (classic or
    /// quorum): new queues beside the old, the old drained into them, then deleted.
    Migrate {
        #[command(flatten)]
        args: MigrateArgs,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum DlqCmd {
    /// List dead letters: id, kind, reason, attempts, last error.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show one dead letter with its body.
    Show {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Send dead letters back to their job queue; the worker resets their attempts.
    Replay {
        /// The job id to replay.
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        /// Replay every dead letter.
        #[arg(long, conflicts_with = "id")]
        all: bool,
        /// The operator's Ed25519 key that signs each replay (the worker honours only replays
        /// signed by a key of its `keys.operator_keys`).
        #[arg(long, default_value = "certs/dev/operator-signing.key", env = "GATEHOUSE_OPERATOR_KEY")]
        operator_key: PathBuf,
        #[arg(long)]
        json: bool,
    },
    /// Delete every dead letter.
    Purge {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Write a dev CA, server and client certificates, and the gatekeeper's id secret.
    Dev {
        #[arg(long, default_value = "certs/dev")]
        out: PathBuf,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Add a client certificate NAME.pem / NAME.key signed by the dev CA.
    Client {
        name: String,
        #[arg(long, default_value = "certs/dev")]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCmd {
    /// Sign a set of worker public sealing keys with an operator key, for the gatekeeper to
    /// serve at GET /v1/keys ([keys] worker_key_set). Rotation: certify the new key with the
    /// old one before the old one expires (the worker opens both meanwhile: its
    /// previous_sealing_keys); revocation: leave a key out of the next set.
    Certify {
        /// The operator's Ed25519 private key (PKCS#8, hex), e.g. certs/dev/operator-signing.key.
        #[arg(long)]
        operator_key: PathBuf,
        /// A worker public sealing key file (hex); repeat for each key of the set.
        #[arg(long = "worker-key", required = true)]
        worker_keys: Vec<PathBuf>,
        /// Days from now until the keys expire (clients seal to none of them after that).
        #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u64).range(1..=3650))]
        days: u64,
        /// Where to write the set.
        #[arg(long)]
        out: PathBuf,
    },
}

/// `gatehouse keys certify`.
fn certify(command: KeysCmd) -> anyhow::Result<bool> {
    let KeysCmd::Certify { operator_key, worker_keys, days, out } = command;
    let now = u64::try_from(gatehouse_protocol::clock::now_ms()).unwrap_or(0);
    let until = now + days * 24 * 3600 * 1000;
    gatehouse_protocol::keys::certify_worker_keys(&operator_key, &worker_keys, now, until, &out)?;
    println!("certified {} key(s) for {days} days in {}", worker_keys.len(), out.display());
    Ok(true)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Up(args) => up::up(&args).await.map(|()| true),
        Cmd::Certs(CertsCmd::Dev { out, force }) => {
            if out.join("ca.pem").exists() && !force {
                println!("{} already has certificates (use --force to replace them)", out.display());
                // Keys added since they were written (a certified worker key set, ...).
                gatehouse_protocol::keys::write_dev(&out).map(|()| true).map_err(Into::into)
            } else {
                certs::write_dev(&out).map(|()| {
                    println!("wrote dev certificates to {}", out.display());
                    true
                })
            }
        }
        Cmd::Certs(CertsCmd::Client { name, out }) => certs::write_client(&out, &name).map(|()| {
            println!("wrote {0}/{name}.pem and {0}/{name}.key", out.display());
            true
        }),
        Cmd::Keys(command) => certify(command),
        Cmd::Submit { job, endpoint, json } => jobs::submit(&endpoint, &job, json).await,
        Cmd::Status { id, endpoint, json, follow: false } => jobs::status(&endpoint, &id, json).await,
        Cmd::Status { id, endpoint, json, follow: true } => jobs::follow(&endpoint, &id, json).await,
        Cmd::Cancel { id, endpoint, json } => jobs::cancel(&endpoint, &id, json).await,
        Cmd::Jobs(JobsCmd::List { args, endpoint, json }) => jobs::list(&endpoint, &args, json).await,
        Cmd::Dlq { command, broker } => run_dlq(command, &broker).await,
        Cmd::Pause { command, args } => run_pause_cmd(command, &args).await,
        Cmd::Resume { target, args } => run_resume(&args, &target).await,
        Cmd::Queues(QueuesCmd::Migrate { args, json }) => run_migrate(&args, json).await,
        Cmd::Schedules { command: SchedulesCmd::List { args, json } } => {
            schedules::list(&args).await.map(|list| {
                if json {
                    list.iter().for_each(|s| println!("{s}"));
                } else {
                    println!("{} schedule(s)", list.len());
                    let text = |v: &serde_json::Value| v.as_str().unwrap_or("-").to_owned();
                    for s in &list {
                        println!(
                            "{}  {:?} {}  {}  next={}  last={} ({} {})  fired={} skipped={} missed={}",
                            text(&s["name"]),
                            text(&s["cron"]),
                            text(&s["timezone"]),
                            text(&s["kind"]),
                            text(&s["next"]),
                            text(&s["last"]),
                            text(&s["last_job"]),
                            text(&s["last_job_state"]),
                            s["fired"],
                            s["skipped"],
                            s["missed"],
                        );
                    }
                }
                true
            })
        }
        Cmd::Bench(args) => gatehouse_cli::bench::run(&args).await.map(|_| true),
        Cmd::Rekey(args) => rekey::rekey(&args).await.map(|n| {
            println!("re-encrypted {n} value(s) under the active data key");
            true
        }),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("gatehouse: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run_pause_cmd(command: PauseCmd, args: &PauseArgs) -> anyhow::Result<bool> {
    match command {
        PauseCmd::List { json } => {
            for p in pauses::list(args).await? {
                let since = gatehouse_protocol::submit::format_rfc3339_ms(p.since_ms.max(0) as u64);
                if json {
                    println!("{}", serde_json::json!({"target": p.target, "since": since, "held": p.held}));
                } else {
                    println!("{}  since {since}  {} jobs held", p.target, p.held);
                }
            }
            Ok(true)
        }
        PauseCmd::Kind { name } => run_pause(args, Target::Kind { name }).await,
        PauseCmd::Queue { name } => run_pause(args, Target::Queue { name }).await,
    }
}

async fn run_resume(args: &PauseArgs, target: &Target) -> anyhow::Result<bool> {
    match pauses::resume(args, target).await? {
        Some(n) => println!("{} resumed: {n} held jobs go back to their queues", target_words(target)),
        None => println!("{} was not paused", target_words(target)),
    }
    Ok(true)
}

async fn run_migrate(args: &MigrateArgs, json: bool) -> anyhow::Result<bool> {
    let moved = queues::migrate(args, |line| eprintln!("{line}")).await?;
    if json {
        println!("{}", serde_json::json!(moved));
    } else {
        let deleted = if moved.deleted.is_empty() { "nothing".to_owned() } else { moved.deleted.join(", ") };
        println!(
            "class {} is {} now: {} jobs and {} dead letters moved; deleted {deleted}",
            args.class,
            args.to.name(),
            moved.jobs,
            moved.dead_letters,
        );
    }
    Ok(true)
}

async fn run_pause(args: &PauseArgs, target: Target) -> anyhow::Result<bool> {
    let new = pauses::pause(args, &target).await?;
    println!("{} {}", target_words(&target), if new { "paused" } else { "was paused already" });
    Ok(true)
}

fn target_words(target: &Target) -> String {
    match target {
        Target::Kind { name } => format!("kind {name}"),
        Target::Queue { name } => format!("queue class {name}"),
    }
}

async fn run_dlq(command: DlqCmd, broker: &BrokerArgs) -> anyhow::Result<bool> {
    match command {
        DlqCmd::List { json } => {
            let letters = dlq::list(broker).await?;
            if json {
                letters.iter().for_each(|l| println!("{l}"));
            } else {
                println!("{} dead letter(s)", letters.len());
                for l in &letters {
                    println!(
                        "{}  {}  reason={}  attempts={}  {}",
                        l["id"].as_str().unwrap_or("-"),
                        l["kind"].as_str().unwrap_or("-"),
                        l["reason"].as_str().unwrap_or("-"),
                        l["attempts"],
                        l["last_error"].as_str().unwrap_or(""),
                    );
                }
            }
            Ok(true)
        }
        DlqCmd::Show { id, json } => match dlq::show(broker, &id).await? {
            Some(l) => {
                if json {
                    println!("{l}");
                } else {
                    println!("{}", serde_json::to_string_pretty(&l)?);
                }
                Ok(true)
            }
            None => {
                eprintln!("no dead letter with id {id}");
                Ok(false)
            }
        },
        DlqCmd::Replay { id, all: _, operator_key, json } => {
            let operator = gatehouse_protocol::keys::signing_key(&operator_key)?;
            let replayed = dlq::replay(broker, id.as_deref(), &operator).await?;
            if json {
                println!("{}", serde_json::json!({ "replayed": replayed }));
            } else {
                println!("replayed {} dead letter(s)", replayed.len());
            }
            Ok(!replayed.is_empty())
        }
        DlqCmd::Purge { json } => {
            let n = dlq::purge(broker).await?;
            if json {
                println!("{}", serde_json::json!({ "purged": n }));
            } else {
                println!("purged {n} dead letter(s)");
            }
            Ok(true)
        }
    }
}
