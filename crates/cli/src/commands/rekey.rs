//! `gatehouse rekey`: re-encrypts the worker's stored vault records and job results under the
//! active data key (after adding a key to the keyring), including any plaintext from before
//! encryption at rest. An operator command: it opens the worker's storage directly, so run it
//! where the worker runs, with the worker's keyring. SQLite serialises it with a running
//! worker; on PostgreSQL it is one transaction beside the workers'.

use std::path::PathBuf;

use gatehouse_storage::{Location, StorageError, Store};

#[derive(Debug, Clone, clap::Args)]
pub struct RekeyArgs {
    /// The worker's SQLite database, or its PostgreSQL url (`postgres://user@host:port/db`;
    /// the password from WORKER__STORAGE__PASSWORD).
    #[arg(long, default_value = ".gatehouse/worker.sqlite")]
    pub db: PathBuf,
    /// The worker's data keyring (the last key is the active one).
    #[arg(long, default_value = "certs/dev/worker-data.keys")]
    pub keyring: PathBuf,
}

/// Answers how many values were re-encrypted.
///
/// # Errors
/// When the keyring or database cannot be opened, or a value cannot be decrypted with any key.
pub async fn rekey(args: &RekeyArgs) -> anyhow::Result<u64> {
    let db = args.db.to_string_lossy();
    let location = if db.starts_with("postgres://") || db.starts_with("postgresql://") {
        Location::parse(&db, std::env::var("WORKER__STORAGE__PASSWORD").ok(), 1)?
    } else {
        anyhow::ensure!(args.db.exists(), "no database at {}", args.db.display());
        Location::Sqlite(args.db.clone())
    };
    let keyring = gatehouse_protocol::keys::keyring(&args.keyring)?;
    // Opened without handler families: the sealed columns of every family that ever migrated
    // into the database are recorded in it, and rekeyed with the job results.
    let store = Store::open(&location, keyring, &[]).await?;
    store.transact(|tx| tx.rekey()).await.map_err(|e: StorageError| anyhow::anyhow!(e))
}
