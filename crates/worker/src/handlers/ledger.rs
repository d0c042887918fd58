//! `ledger.apply` (sequenced by account) and `ledger.balance`. Accounts belong to the client
//! that names them: each client's `acct-42` is its own (stored under
//! [`gatehouse_protocol::submit::owned_key`]), so no client can read or move another's money
//! or use up its sequence numbers.

use gatehouse_protocol::submit::owned_key;
use gatehouse_storage::{StorageError, Tx};
use serde::Deserialize;
use serde_json::json;

use super::{JobContext, Outcome};

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

/// Adds the amount. Runs only when [`crate::apply`] has decided this is the account's next
/// sequence number.
pub fn apply(tx: &Tx<'_>, job: &JobContext, p: Apply) -> Result<Outcome, StorageError> {
    let Some(seq) = &job.sequence else {
        return Ok(Outcome::Permanent("ledger.apply needs a sequence".into()));
    };
    Ok(match tx.ledger_apply(&owned_key(&job.client, &p.account), p.amount, seq.number())? {
        Some(balance) => {
            Outcome::Success(json!({ "account": p.account, "balance": balance, "sequence": seq.number() }))
        }
        None => Outcome::Permanent("the balance would overflow".into()),
    })
}

pub fn balance(tx: &Tx<'_>, job: &JobContext, p: Balance) -> Result<Outcome, StorageError> {
    let (balance, sequence) = tx.ledger_balance(&owned_key(&job.client, &p.account))?;
    Ok(Outcome::Success(json!({ "account": p.account, "balance": balance, "sequence": sequence })))
}
