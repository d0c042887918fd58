//! `vault.put` / `vault.get` / `vault.delete`: records stored for their owner only, sealed
//! (AES-256-GCM) and bound to their token and owner. The `vault` family owns the `vault` table.

use gatehouse_protocol::clock::now_ms;
use gatehouse_storage::sql::params;
use gatehouse_storage::{Family, Place, SealedColumn, StorageError, Tx};
use ring::rand::{SecureRandom, SystemRandom};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{JobContext, Outcome};

/// The vault's table. Step 1 is how databases of earlier releases already have it.
pub const FAMILY: Family = Family {
    name: "vault",
    migrations: &[r"
        CREATE TABLE IF NOT EXISTS vault (
            token         TEXT PRIMARY KEY,
            owner         TEXT NOT NULL,
            record        TEXT NOT NULL,
            created_at_ms INTEGER NOT NULL
        );
    "],
    sealed: &[SealedColumn { table: "vault", key: "token", owner: "owner", column: "record" }],
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Put {
    record: Map<String, Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ByToken {
    token: String,
}

pub fn put(tx: &Tx<'_>, job: &JobContext, p: Put) -> Result<Outcome, StorageError> {
    let token = store(tx, &job.client, &Value::Object(p.record))?;
    Ok(Outcome::Success(json!({ "token": token })))
}

pub fn get(tx: &Tx<'_>, job: &JobContext, p: ByToken) -> Result<Outcome, StorageError> {
    Ok(match fetch(tx, &job.client, &p.token)? {
        Some(record) => Outcome::Success(json!({ "record": record })),
        None => Outcome::Permanent("no record for this token".into()),
    })
}

pub fn delete(tx: &Tx<'_>, job: &JobContext, p: ByToken) -> Result<Outcome, StorageError> {
    let n = tx.execute("DELETE FROM vault WHERE token = ?1 AND owner = ?2", params![p.token, job.client])?;
    Ok(Outcome::Success(json!({ "deleted": n > 0 })))
}

fn place<'a>(token: &'a str, owner: &'a str) -> Place<'a> {
    Place { table: "vault", column: "record", row: token, owner }
}

/// Stores `record` for `owner`; answers its token.
///
/// # Errors
/// Storage failures, or no system randomness.
pub fn store(tx: &Tx<'_>, owner: &str, record: &Value) -> Result<String, StorageError> {
    // The time in milliseconds, then 80 random bits: unguessable, and new tokens land at the
    // end of the index instead of on a random page of it (see the gatekeeper's job ids).
    let mut raw = [0u8; 16];
    raw[..6].copy_from_slice(&now_ms().to_be_bytes()[2..]);
    SystemRandom::new()
        .fill(&mut raw[6..])
        .map_err(|_| StorageError::Corrupt("no system randomness".into()))?;
    let token = format!("tok_{}", gatehouse_protocol::JobId::from_bytes(raw));
    tx.write(
        "INSERT INTO vault (token, owner, record, created_at_ms) VALUES (?1, ?2, ?3, ?4)",
        params![token, owner, tx.seal(record, &place(&token, owner))?, now_ms()],
    )?;
    Ok(token)
}

/// The record behind `token`, if `owner` stored it.
fn fetch(tx: &Tx<'_>, owner: &str, token: &str) -> Result<Option<Value>, StorageError> {
    let record = tx.query_row(
        "SELECT record FROM vault WHERE token = ?1 AND owner = ?2",
        params![token, owner],
        |r| r.get(0),
    )?;
    tx.unseal(record, &place(token, owner))
}

#[cfg(test)]
mod tests {
    use gatehouse_protocol::crypto::Keyring;
    use gatehouse_storage::Store;

    use super::*;

    fn open(path: &std::path::Path) -> Store {
        Store::open_sqlite(path, Keyring::parse(&format!("k1 {}", "ab".repeat(32))).unwrap(), &[FAMILY])
            .unwrap()
    }

    #[tokio::test]
    async fn records_are_their_owners_only_survive_reopen_and_do_not_move() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let token = {
            let store = open(&path);
            store.transact(|tx| store_record(tx, "alice")).await.unwrap()
        };
        let store = open(&path);
        let t = token.clone();
        assert_eq!(
            store.transact(move |tx| fetch(tx, "alice", &t)).await.unwrap(),
            Some(json!({"name": "Ada"}))
        );
        let t = token.clone();
        assert_eq!(store.transact(move |tx| fetch(tx, "mallory", &t)).await.unwrap(), None);
        // Given to mallory by editing the row (as a writer of the file could): it does not open
        // for her.
        let edit = format!("UPDATE vault SET owner = 'mallory' WHERE token = '{token}'");
        store.transact(move |tx| tx.execute(&edit, gatehouse_storage::sql::params![])).await.unwrap();
        let t = token.clone();
        assert!(matches!(
            store.transact(move |tx| fetch(tx, "mallory", &t)).await,
            Err(StorageError::Crypto(_))
        ));
    }

    fn store_record(tx: &Tx<'_>, owner: &str) -> Result<String, StorageError> {
        store(tx, owner, &json!({"name": "Ada"}))
    }
}
