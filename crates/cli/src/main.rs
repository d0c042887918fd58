//! `gatehouse` — run the system locally, make dev certificates, submit jobs, query them.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gatehouse_cli::certs;
use gatehouse_cli::commands::jobs::{self, Endpoint, SubmitArgs};
use gatehouse_cli::commands::up::{self, UpArgs};

#[derive(Parser)]
#[command(
    name = "gatehouse",
    version,
    about = "Background jobs on sensitive data, behind a gatekeeper"
)]
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
    /// Show the status (and result) of one of your jobs.
    Status {
        id: String,
        #[command(flatten)]
        endpoint: Endpoint,
        /// Print the response body as JSON.
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

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Up(args) => up::up(&args).await.map(|()| true),
        Cmd::Certs(CertsCmd::Dev { out, force }) => {
            if out.join("ca.pem").exists() && !force {
                println!(
                    "{} already has certificates (use --force to replace them)",
                    out.display()
                );
                Ok(true)
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
        Cmd::Submit {
            job,
            endpoint,
            json,
        } => jobs::submit(&endpoint, &job, json).await,
        Cmd::Status { id, endpoint, json } => jobs::status(&endpoint, &id, json).await,
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
