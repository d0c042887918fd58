//! `ledger.apply` (sequenced by account) and `ledger.balance`. Accounts belong to the client
//! that names them: each client's `acct-42` is its own (stored under
//! [`gatehouse_protocol::submit::owned_key`]), so no client can read or move another's money
//! or use up its sequence numbers. The `ledger` family owns the `ledger` table: an account's
//! balance and last applied number are sealed together in `state`, bound to the account.

use gatehouse_protocol::submit::owned_key;
use gatehouse_storage::sql::params;
use gatehouse_storage::{Family, Place, SealedColumn, StorageError, Tx};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{JobContext, Outcome};

/// The ledger's table. Step 1 is how databases of earlier releases already have it (their
/// `balance` and `sequence` columns are 0 since those values were sealed into `state`).
pub const FAMILY: Family = Family {
    name: "ledger",
    migrations: &[r"
        CREATE TABLE IF NOT EXISTS ledger (
            account  TEXT PRIMARY KEY,
            balance  INTEGER NOT NULL,
            sequence INTEGER NOT NULL,
            state    TEXT
        );
    "],
    sealed: &[SealedColumn { table: "ledger", key: "account", owner: "''", column: "state" }],
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Apply {
    account: String,
    amount: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balance {
    account: String,
}

/// Adds the amount. Runs only when the worker's decision (`decide`) has decided this is the account's next
/// sequence number.
pub fn apply(tx: &Tx<'_>, job: &JobContext, p: Apply) -> Result<Outcome, StorageError> {
    let Some(seq) = &job.sequence else {
        return Ok(Outcome::Permanent("ledger.apply needs a sequence".into()));
    };
    let account = owned_key(&job.client, &p.account);
    let (balance, _) = balance_of(tx, &account)?;
    let Some(new_balance) = balance.checked_add(p.amount) else {
        return Ok(Outcome::Permanent("the balance would overflow".into()));
    };
    let state = json!({"balance": new_balance, "sequence": seq.number()});
    tx.execute(
        "INSERT INTO ledger (account, balance, sequence, state) VALUES (?1, 0, 0, ?2)
         ON CONFLICT(account) DO UPDATE SET state = excluded.state",
        params![account, tx.seal(&state, &place(&account))?],
    )?;
    Ok(Outcome::Success(json!({ "account": p.account, "balance": new_balance, "sequence": seq.number() })))
}

pub fn balance(tx: &Tx<'_>, job: &JobContext, p: Balance) -> Result<Outcome, StorageError> {
    let (balance, sequence) = balance_of(tx, &owned_key(&job.client, &p.account))?;
    Ok(Outcome::Success(json!({ "account": p.account, "balance": balance, "sequence": sequence })))
}

/// An account's key already names its owner.
fn place(account: &str) -> Place<'_> {
    Place { table: "ledger", column: "state", row: account, owner: "" }
}

/// `(balance, last applied sequence number)` of a stored account key; `(0, 0)` for one never
/// touched.
///
/// # Errors
/// Storage failures; a state that does not open (written behind the worker's back).
pub fn balance_of(tx: &Tx<'_>, account: &str) -> Result<(i64, u64), StorageError> {
    let state: Option<Option<String>> =
        tx.query_row("SELECT state FROM ledger WHERE account = ?1", params![account], |r| r.get(0))?;
    let Some(state) = state else { return Ok((0, 0)) };
    // A row without a sealed state was written behind the worker's back: unseal refuses it.
    let state = tx.unseal(Some(state.unwrap_or_default()), &place(account))?.unwrap_or_default();
    let field = |f: &str| state.get(f).and_then(Value::as_i64);
    match (field("balance"), field("sequence")) {
        (Some(b), Some(s)) => Ok((b, s as u64)),
        _ => Err(StorageError::Corrupt(format!("ledger state of {account:?}"))),
    }
}
