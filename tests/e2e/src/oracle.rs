//! Reading the worker's SQLite file directly: the ground truth a fault test compares with its
//! model. Read-only, alongside the running worker (WAL allows it).

use std::collections::HashMap;
use std::path::Path;

use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

/// What storage says about one job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub state: String,
    pub result: Option<Value>,
    pub reason: Option<String>,
}

fn open(db: &Path) -> Connection {
    let c = Connection::open_with_flags(db, OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open worker db");
    c.busy_timeout(std::time::Duration::from_secs(5)).expect("busy timeout");
    c
}

/// Every job row, by id; results decrypted with the worker's data keys in `keyring`.
pub fn jobs(db: &Path, keyring: &Path) -> HashMap<String, JobRow> {
    let keyring = gatehouse_protocol::keys::keyring(keyring).expect("keyring");
    let c = open(db);
    let mut stmt = c.prepare("SELECT id, state, result, reason, client FROM jobs").expect("query");
    stmt.query_map([], |r| {
        let id: String = r.get(0)?;
        let result: Option<String> = r.get(2)?;
        let client: String = r.get(4)?;
        let result = result.map(|v| {
            let aad = gatehouse_storage::sealed_aad("jobs", "result", &id, &client);
            let plain = keyring.decrypt(&v, &aad).expect("results are encrypted at rest, bound to their row");
            serde_json::from_slice(&plain).expect("result is JSON")
        });
        Ok((id, JobRow { state: r.get(1)?, result, reason: r.get(3)? }))
    })
    .expect("rows")
    .collect::<Result<_, _>>()
    .expect("rows")
}

/// When each job was last recorded (for a decided job, its decision), unix ms, by id.
pub fn decided_at(db: &Path) -> HashMap<String, u64> {
    let c = open(db);
    let mut stmt = c.prepare("SELECT id, updated_at_ms FROM jobs").expect("query");
    stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?.max(0) as u64)))
        .expect("rows")
        .collect::<Result<_, _>>()
        .expect("rows")
}

/// `account -> (balance, last sequence)`, for accounts of every client (the tests that use it
/// have one client per account name); balances decrypted with the data keys in `keyring`.
pub fn ledger(db: &Path, keyring: &Path) -> HashMap<String, (i64, u64)> {
    ledger_by_owner(db, keyring).into_iter().map(|((_, account), v)| (account, v)).collect()
}

/// `(client, account) -> (balance, last sequence)`.
pub fn ledger_by_owner(db: &Path, keyring: &Path) -> HashMap<(String, String), (i64, u64)> {
    let keyring = gatehouse_protocol::keys::keyring(keyring).expect("keyring");
    let c = open(db);
    let mut stmt = c.prepare("SELECT account, state FROM ledger").expect("query");
    stmt.query_map([], |r| {
        let (key, state): (String, String) = (r.get(0)?, r.get(1)?);
        let aad = gatehouse_storage::sealed_aad("ledger", "state", &key, "");
        let plain = keyring.decrypt(&state, &aad).expect("ledger state is sealed, bound to its account");
        let state: Value = serde_json::from_slice(&plain).expect("ledger state is JSON");
        let (client, account) = key.split_once('\u{1f}').expect("accounts belong to a client");
        let v = (state["balance"].as_i64().expect("balance"), state["sequence"].as_u64().expect("sequence"));
        Ok(((client.to_owned(), account.to_owned()), v))
    })
    .expect("rows")
    .collect::<Result<_, _>>()
    .expect("rows")
}

/// Rows in `table`.
pub fn count(db: &Path, table: &str) -> i64 {
    open(db).query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0)).expect("count")
}

/// Jobs recorded as succeeded.
pub fn succeeded(db: &Path) -> i64 {
    open(db)
        .query_row("SELECT count(*) FROM jobs WHERE state = 'succeeded'", [], |r| r.get(0))
        .expect("count")
}
