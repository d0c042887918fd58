//! Reading the worker's storage directly: the ground truth a fault test compares with its
//! model. Read-only, alongside running workers: the SQLite file (WAL allows it), or the
//! PostgreSQL database (a connection of its own per look, values read as text).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use gatehouse_storage::Location;
use rusqlite::{Connection, OpenFlags};
use serde_json::Value;

/// What storage says about one job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub state: String,
    pub result: Option<Value>,
    pub reason: Option<String>,
}

/// Where the storage to read is: an SQLite file's path, or a [`Location`].
pub trait Storage {
    fn location(&self) -> Location;
}

impl Storage for Path {
    fn location(&self) -> Location {
        Location::Sqlite(self.to_owned())
    }
}

impl Storage for PathBuf {
    fn location(&self) -> Location {
        Location::Sqlite(self.clone())
    }
}

impl Storage for Location {
    fn location(&self) -> Location {
        self.clone()
    }
}

/// The rows `sql` answers, each column as text (`None` for NULL). An SQLite file that does
/// not exist yet has no rows. On PostgreSQL it must run on a multi-threaded test runtime.
pub fn rows(db: &(impl Storage + ?Sized), sql: &str) -> Vec<Vec<Option<String>>> {
    match db.location() {
        Location::Sqlite(path) => {
            if !path.exists() {
                return Vec::new();
            }
            let c =
                Connection::open_with_flags(&path, OpenFlags::SQLITE_OPEN_READ_ONLY).expect("open worker db");
            c.busy_timeout(std::time::Duration::from_secs(5)).expect("busy timeout");
            let mut stmt = c.prepare(sql).expect("query");
            let n = stmt.column_count();
            stmt.query_map([], |r| {
                (0..n)
                    .map(|i| {
                        Ok(match r.get_ref(i)? {
                            rusqlite::types::ValueRef::Null => None,
                            rusqlite::types::ValueRef::Integer(v) => Some(v.to_string()),
                            rusqlite::types::ValueRef::Real(v) => Some(v.to_string()),
                            rusqlite::types::ValueRef::Text(t) => {
                                Some(String::from_utf8_lossy(t).into_owned())
                            }
                            rusqlite::types::ValueRef::Blob(b) => {
                                Some(String::from_utf8_lossy(b).into_owned())
                            }
                        })
                    })
                    .collect()
            })
            .expect("rows")
            .collect::<Result<_, _>>()
            .expect("rows")
        }
        // Tried again for a while when the server does not answer (a test restarts it).
        Location::Postgres(c) => tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async {
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
                loop {
                    let client = connection(&c.url, c.password.as_deref().unwrap_or_default()).await;
                    match client.simple_query(sql).await {
                        Ok(messages) => {
                            return messages
                                .into_iter()
                                .filter_map(|m| match m {
                                    tokio_postgres::SimpleQueryMessage::Row(r) => {
                                        Some((0..r.len()).map(|i| r.get(i).map(str::to_owned)).collect())
                                    }
                                    _ => None,
                                })
                                .collect();
                        }
                        Err(e) if std::time::Instant::now() < deadline && e.as_db_error().is_none() => {
                            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                        }
                        Err(e) => panic!("{sql}: {e}"),
                    }
                }
            })
        }),
    }
}

/// A connection to `url`, kept for the next look (a new one when it was closed; none while
/// the server does not answer).
async fn connection(url: &str, password: &str) -> std::sync::Arc<tokio_postgres::Client> {
    static OPEN: std::sync::Mutex<Option<HashMap<String, std::sync::Arc<tokio_postgres::Client>>>> =
        std::sync::Mutex::new(None);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let kept = OPEN.lock().expect("lock").get_or_insert_default().get(url).cloned();
        if let Some(c) = kept.filter(|c| !c.is_closed()) {
            return c;
        }
        let mut config: tokio_postgres::Config = url.parse().expect("postgres url");
        config.password(password);
        match config.connect(tokio_postgres::NoTls).await {
            Ok((client, connection)) => {
                tokio::spawn(connection);
                let c = std::sync::Arc::new(client);
                OPEN.lock().expect("lock").get_or_insert_default().insert(url.to_owned(), c.clone());
                return c;
            }
            Err(e) if std::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            Err(e) => panic!("PostgreSQL at {url} does not answer: {e}"),
        }
    }
}

fn text(v: &Option<String>) -> String {
    v.clone().expect("a value")
}

fn int(v: &Option<String>) -> i64 {
    text(v).parse().expect("an integer")
}

/// Every job row, by id; results decrypted with the worker's data keys in `keyring`.
pub fn jobs(db: &(impl Storage + ?Sized), keyring: &Path) -> HashMap<String, JobRow> {
    let keyring = gatehouse_protocol::keys::keyring(keyring).expect("keyring");
    rows(db, "SELECT id, state, result, reason, client FROM jobs")
        .into_iter()
        .map(|r| {
            let (id, client) = (text(&r[0]), text(&r[4]));
            let result = r[2].as_ref().map(|v| {
                let aad = gatehouse_storage::sealed_aad("jobs", "result", &id, &client);
                let plain =
                    keyring.decrypt(v, &aad).expect("results are encrypted at rest, bound to their row");
                serde_json::from_slice(&plain).expect("result is JSON")
            });
            (id, JobRow { state: text(&r[1]), result, reason: r[3].clone() })
        })
        .collect()
}

/// When each job was last recorded (for a decided job, its decision), unix ms, by id.
pub fn decided_at(db: &(impl Storage + ?Sized)) -> HashMap<String, u64> {
    rows(db, "SELECT id, updated_at_ms FROM jobs")
        .into_iter()
        .map(|r| (text(&r[0]), int(&r[1]).max(0) as u64))
        .collect()
}

/// `account -> (balance, last sequence)`, for accounts of every client (the tests that use it
/// have one client per account name); balances decrypted with the data keys in `keyring`.
pub fn ledger(db: &(impl Storage + ?Sized), keyring: &Path) -> HashMap<String, (i64, u64)> {
    ledger_by_owner(db, keyring).into_iter().map(|((_, account), v)| (account, v)).collect()
}

/// `(client, account) -> (balance, last sequence)`.
pub fn ledger_by_owner(
    db: &(impl Storage + ?Sized),
    keyring: &Path,
) -> HashMap<(String, String), (i64, u64)> {
    let keyring = gatehouse_protocol::keys::keyring(keyring).expect("keyring");
    rows(db, "SELECT account, state FROM ledger")
        .into_iter()
        .map(|r| {
            let (key, state) = (text(&r[0]), text(&r[1]));
            let aad = gatehouse_storage::sealed_aad("ledger", "state", &key, "");
            let plain = keyring.decrypt(&state, &aad).expect("ledger state is sealed, bound to its account");
            let state: Value = serde_json::from_slice(&plain).expect("ledger state is JSON");
            let (client, account) = key.split_once('\u{1f}').expect("accounts belong to a client");
            let v =
                (state["balance"].as_i64().expect("balance"), state["sequence"].as_u64().expect("sequence"));
            ((client.to_owned(), account.to_owned()), v)
        })
        .collect()
}

/// Rows in `table`.
pub fn count(db: &(impl Storage + ?Sized), table: &str) -> i64 {
    rows(db, &format!("SELECT count(*) FROM {table}")).first().map_or(0, |r| int(&r[0]))
}

/// Jobs recorded as succeeded.
pub fn succeeded(db: &(impl Storage + ?Sized)) -> i64 {
    rows(db, "SELECT count(*) FROM jobs WHERE state = 'succeeded'").first().map_or(0, |r| int(&r[0]))
}
