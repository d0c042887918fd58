//! Handler families: job kinds that keep data of their own (the vault's records, the ledger's
//! accounts, a custom worker's tables). A family owns its tables: it brings the migrations that
//! create and change them, and names the columns that hold sealed values, so that
//! `gatehouse rekey` re-encrypts them too. The job machinery here knows none of them.
//!
//! Each family's migrations run once each, in order, when the store opens (on either backend:
//! write them in the SQL SQLite and PostgreSQL share: `TEXT`, `INTEGER` (64 bits on both: it is
//! `BIGINT` on PostgreSQL), no `BLOB`); `families` records how far each family got. Its sealed
//! columns are recorded in `sealed_columns`, where any tool that opens the database finds them.

use crate::sql::params;
use crate::{StorageError, Tx};

/// A family of job kinds with tables of its own.
#[derive(Debug, Clone, Copy)]
pub struct Family {
    /// Unique among the families of a worker (`vault`, `ledger`, `acme.scores`).
    pub name: &'static str,
    /// SQL steps, in order. Never edit or reorder a step that has shipped: add one.
    pub migrations: &'static [&'static str],
    /// The columns that hold sealed values (see [`crate::Tx::seal`]).
    pub sealed: &'static [SealedColumn],
}

/// A column of sealed values: its table, the row's key column, the owner (an SQL expression
/// over the row, `''` when the key names its owner) and the column itself. Each value is bound
/// to exactly these (see [`crate::Place`]).
#[derive(Debug, Clone, Copy)]
pub struct SealedColumn {
    pub table: &'static str,
    pub key: &'static str,
    pub owner: &'static str,
    pub column: &'static str,
}

/// The job machinery's own sealed columns: job results, the progress running jobs reported,
/// and the checkpoints they saved.
pub(crate) const JOB_RESULTS: SealedColumn =
    SealedColumn { table: "jobs", key: "id", owner: "client", column: "result" };
pub(crate) const PROGRESS: SealedColumn =
    SealedColumn { table: "progress", key: "job_id", owner: "client", column: "value" };
pub(crate) const CHECKPOINTS: SealedColumn =
    SealedColumn { table: "checkpoints", key: "job_id", owner: "client", column: "value" };
pub(crate) const ON_COMPLETE: SealedColumn =
    SealedColumn { table: "batches", key: "id", owner: "client", column: "on_complete" };

/// Brings every family's tables up to date and records its sealed columns, in `tx` (the
/// caller's transaction holds the write lock: workers that start together take turns, and each
/// step runs once).
pub(crate) fn migrate(tx: &Tx<'_>, families: &[Family]) -> Result<(), StorageError> {
    for (i, f) in families.iter().enumerate() {
        if families[..i].iter().any(|g| g.name == f.name) {
            return Err(StorageError::Corrupt(format!("two handler families are named {}", f.name)));
        }
        let done =
            tx.one("SELECT version FROM families WHERE name = ?1", params![f.name], |r| r.get::<i64>(0))?;
        let done = usize::try_from(done.unwrap_or(0)).unwrap_or(usize::MAX);
        if done > f.migrations.len() {
            return Err(StorageError::Corrupt(format!(
                "family {} is at version {done}, newer than this worker knows ({}): a newer release wrote it",
                f.name,
                f.migrations.len()
            )));
        }
        for (step, sql) in f.migrations.iter().enumerate().skip(done) {
            let sql = if tx.is_postgres() { crate::sql::postgres_ddl(sql) } else { (*sql).to_owned() };
            tx.batch(&sql).map_err(|e| {
                StorageError::Corrupt(format!("migration {} of family {}: {e}", step + 1, f.name))
            })?;
            tx.exec(
                "INSERT INTO families (name, version) VALUES (?1, ?2)
                 ON CONFLICT(name) DO UPDATE SET version = excluded.version",
                params![f.name, step as i64 + 1],
            )?;
        }
        for c in f.sealed {
            tx.exec(
                "INSERT INTO sealed_columns (tbl, col, key_col, owner_expr, family) VALUES (?1, ?2, ?3, ?4, ?5)
                 ON CONFLICT(tbl, col) DO UPDATE SET key_col = excluded.key_col,
                     owner_expr = excluded.owner_expr, family = excluded.family",
                params![c.table, c.column, c.key, c.owner, f.name],
            )?;
        }
    }
    Ok(())
}

/// Every sealed column the database holds: the job machinery's (results, progress,
/// checkpoints) and every family's that was ever migrated into it.
pub(crate) fn sealed_columns(tx: &Tx<'_>) -> Result<Vec<(String, String, String, String)>, StorageError> {
    let own =
        |c: SealedColumn| (c.table.to_owned(), c.key.to_owned(), c.owner.to_owned(), c.column.to_owned());
    let mut out = vec![own(JOB_RESULTS), own(PROGRESS), own(CHECKPOINTS), own(ON_COMPLETE)];
    for r in
        tx.rows("SELECT tbl, key_col, owner_expr, col FROM sealed_columns ORDER BY tbl, col", params![])?
    {
        out.push((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?));
    }
    Ok(out)
}
