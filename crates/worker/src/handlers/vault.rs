//! `vault.put` / `vault.get` / `vault.delete`: records stored for their owner only.

use gatehouse_storage::{StorageError, Tx};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::{JobContext, Outcome};

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
    let token = tx.vault_put(&job.client, &Value::Object(p.record))?;
    Ok(Outcome::Success(json!({ "token": token })))
}

pub fn get(tx: &Tx<'_>, job: &JobContext, p: ByToken) -> Result<Outcome, StorageError> {
    Ok(match tx.vault_get(&job.client, &p.token)? {
        Some(record) => Outcome::Success(json!({ "record": record })),
        None => Outcome::Permanent("no record for this token".into()),
    })
}

pub fn delete(tx: &Tx<'_>, job: &JobContext, p: ByToken) -> Result<Outcome, StorageError> {
    let deleted = tx.vault_delete(&job.client, &p.token)?;
    Ok(Outcome::Success(json!({ "deleted": deleted })))
}
