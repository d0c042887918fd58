//! Sealing at rest: every sealed value is bound to its place (table, column, row, owner), so
//! that a writer of the database file cannot move it; values of earlier releases are resealed
//! by migration; `rekey` re-encrypts under the active data key.

use super::*;

/// Where a sealed value lives: bound into its encryption, so that a writer of the database
/// file cannot move it to another row, column or owner and have the worker read it there.
#[derive(Debug, Clone, Copy)]
pub struct Place<'a> {
    pub table: &'a str,
    pub column: &'a str,
    /// The row's key.
    pub row: &'a str,
    /// Whose it is; empty when the row's key names its owner.
    pub owner: &'a str,
}

/// The associated data a sealed value is bound to (for tools that read the file directly).
pub fn sealed_aad(table: &str, column: &str, row: &str, owner: &str) -> Vec<u8> {
    ["gatehouse at rest v2", table, column, row, owner].join("\0").into_bytes()
}

impl<'a> Place<'a> {
    pub(super) fn aad(&self) -> Vec<u8> {
        sealed_aad(self.table, self.column, self.row, self.owner)
    }

    pub(super) fn job_result(id: &'a str, client: &'a str) -> Self {
        Self { table: "jobs", column: "result", row: id, owner: client }
    }

    pub(super) fn job_error(id: &'a str, client: &'a str) -> Self {
        Self { table: "jobs", column: "error", row: id, owner: client }
    }

    pub(super) fn attempt_error(id: &'a str, client: &'a str) -> Self {
        Self { table: "attempts", column: "last_error", row: id, owner: client }
    }
}

impl Tx<'_> {
    /// `value` encrypted under the active data key, bound to its place (`at`): it cannot be
    /// moved to another row, column or owner. Declare the column in the family's
    /// [`crate::Family::sealed`], so that `gatehouse rekey` re-encrypts it.
    ///
    /// # Errors
    /// [`StorageError::Crypto`] when the keyring cannot encrypt.
    pub fn seal(&self, value: &Value, at: &Place<'_>) -> Result<String, StorageError> {
        self.keyring
            .encrypt(value.to_string().as_bytes(), &at.aad())
            .map_err(|e| StorageError::Crypto(e.to_string()))
    }

    /// An error text sealed at `at` (it can quote the payload: an executable's stderr line).
    pub(super) fn seal_text(
        &self,
        text: Option<&str>,
        at: &Place<'_>,
    ) -> Result<Option<String>, StorageError> {
        text.map(|t| self.seal(&Value::String(t.to_owned()), at)).transpose()
    }

    /// An error text stored at `at`, decrypted.
    pub(super) fn unseal_text(
        &self,
        stored: Option<String>,
        at: &Place<'_>,
    ) -> Result<Option<String>, StorageError> {
        Ok(self.unseal(stored, at)?.map(|v| match v {
            Value::String(s) => s,
            other => other.to_string(),
        }))
    }

    /// Seals the error texts earlier releases stored in the clear (schema step 19 on SQLite,
    /// 2 on PostgreSQL); answers how many.
    ///
    /// # Errors
    /// What the database answers.
    pub(crate) fn seal_plaintext_errors(&self) -> Result<u64, StorageError> {
        let mut sealed = 0;
        for (table, key, owner, column) in
            [("jobs", "id", "client", "error"), ("attempts", "job_id", "client", "last_error")]
        {
            let rows: Vec<(String, String, String)> = self
                .rows(
                    &format!("SELECT {key}, {owner}, {column} FROM {table} WHERE {column} IS NOT NULL"),
                    params![],
                )?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .collect::<Result<_, StorageError>>()?;
            for (row, owner, text) in rows {
                if Keyring::version(&text).is_some() {
                    continue;
                }
                let at = Place { table, column, row: &row, owner: &owner };
                self.exec(
                    &format!("UPDATE {table} SET {column} = ?1 WHERE {key} = ?2"),
                    params![self.seal(&Value::String(text), &at)?, row],
                )?;
                sealed += 1;
            }
        }
        Ok(sealed)
    }

    /// The value stored at `at`, decrypted. Anything not sealed as this release seals — a
    /// plaintext value, or an earlier release's format bound to its row only — is refused: it
    /// can only have been written into the file behind the worker's back (earlier releases'
    /// values were re-sealed by migration 8).
    ///
    /// # Errors
    /// [`StorageError::Crypto`] for a value that is not sealed, or not for this place or under
    /// a key of the keyring; [`StorageError::Corrupt`] when it does not hold JSON.
    pub fn unseal(&self, stored: Option<String>, at: &Place<'_>) -> Result<Option<Value>, StorageError> {
        let Some(stored) = stored else { return Ok(None) };
        if Keyring::version(&stored) != Some(2) {
            return Err(StorageError::Crypto(format!(
                "{}.{} of {:?} is not sealed: refused",
                at.table, at.column, at.row
            )));
        }
        let plain =
            self.keyring.decrypt(&stored, &at.aad()).map_err(|e| StorageError::Crypto(e.to_string()))?;
        serde_json::from_slice(&plain).map(Some).map_err(|e| StorageError::Corrupt(e.to_string()))
    }

    /// Re-seals the values of `columns` (table, key, owner expression, column): every one not
    /// under the active data key (`gatehouse rekey`), or with `legacy_only` just those an
    /// earlier release wrote (plaintext, or bound to their row only; migration 8). Answers how
    /// many it changed.
    pub(crate) fn reseal(
        &self,
        columns: &[(String, String, String, String)],
        legacy_only: bool,
    ) -> Result<u64, StorageError> {
        let active = self.keyring.active_id().to_owned();
        let mut changed = 0;
        for (table, key, owner, column) in columns {
            let (table, key, owner, column) =
                (identifier(table)?, identifier(key)?, identifier(owner)?, identifier(column)?);
            let rows: Vec<(String, String, String)> = self
                .rows(
                    &format!("SELECT {key}, {owner}, {column} FROM {table} WHERE {column} IS NOT NULL"),
                    params![],
                )?
                .iter()
                .map(|r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
                .collect::<Result<_, StorageError>>()?;
            for (row, owner, stored) in rows {
                let at = Place { table, column, row: &row, owner: &owner };
                let value = match Keyring::version(&stored) {
                    Some(2) if legacy_only || Keyring::key_of(&stored) == Some(active.as_str()) => continue,
                    Some(2) => self.unseal(Some(stored), &at)?,
                    // Bound to the row id alone by earlier releases.
                    Some(_) => Some(
                        self.keyring
                            .decrypt(&stored, row.as_bytes())
                            .map_err(|e| StorageError::Crypto(e.to_string()))
                            .and_then(|p| {
                                serde_json::from_slice(&p).map_err(|e| StorageError::Corrupt(e.to_string()))
                            })?,
                    ),
                    None => parse_json(Some(stored))?,
                };
                let Some(value) = value else { continue };
                self.exec(
                    &format!("UPDATE {table} SET {column} = ?1 WHERE {key} = ?2"),
                    params![self.seal(&value, &at)?, row],
                )?;
                changed += 1;
            }
        }
        Ok(changed)
    }

    /// Re-encrypts every sealed value that is not under the active data key — job results and
    /// every column a handler family declared — and answers how many it changed.
    ///
    /// # Errors
    /// A value that does not open, or a storage failure (nothing is changed then).
    pub fn rekey(&self) -> Result<u64, StorageError> {
        self.reseal(&crate::family::sealed_columns(self)?, false)
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::*;
    use super::*;
    use crate::Store;

    #[tokio::test]
    async fn sealed_values_are_bound_to_their_owner_and_plaintext_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = open(&path);
        store.transact(|tx| put_note(tx, "n1", "alice", &serde_json::json!({"name": "Ada"}))).await.unwrap();
        store
            .transact(|tx| {
                tx.record_job(&StoredJob {
                    result: Some(serde_json::json!({"n": 1})),
                    ..job(4, JobState::Succeeded, None)
                })
            })
            .await
            .unwrap();
        // Moved to mallory by editing the owner column: it does not open for her.
        tamper(&path, "UPDATE notes SET owner = 'mallory' WHERE id = 'n1'");
        let got = store.transact(|tx| get_note(tx, "n1", "mallory")).await;
        assert!(matches!(got, Err(StorageError::Crypto(_))), "{got:?}");
        // Moved to another row: nor there.
        tamper(&path, "UPDATE notes SET owner = 'alice', id = 'n2' WHERE id = 'n1'");
        let got = store.transact(|tx| get_note(tx, "n2", "alice")).await;
        assert!(matches!(got, Err(StorageError::Crypto(_))), "{got:?}");
        // Downgraded to plaintext: refused, not read.
        tamper(&path, "UPDATE notes SET id = 'n1', body = '{\"name\":\"Eve\"}'");
        let got = store.transact(|tx| get_note(tx, "n1", "alice")).await;
        assert!(matches!(got, Err(StorageError::Crypto(_))), "{got:?}");
        // A job's result given to another client does not open either.
        tamper(&path, "UPDATE jobs SET client = 'mallory'");
        assert!(matches!(store.transact(|tx| tx.job(&id(4))).await, Err(StorageError::Crypto(_))));
    }

    #[tokio::test]
    async fn values_of_earlier_releases_are_resealed_once_by_the_migration() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        // As release 7 left it: a v1 record bound to its token only, a plaintext result, a
        // plaintext ledger row (the vault and the ledger were tables of this schema then).
        {
            let mut conn = rusqlite::Connection::open(&path).unwrap();
            crate::migrations::upgrade(&mut conn, &test_keyring(), 0, 7).unwrap();
        }
        let v1 = test_keyring().encrypt(br#"{"name":"Ada"}"#, b"tok_1").unwrap().replacen("v2.", "v1.", 1);
        tamper(&path, &format!(
            "INSERT INTO vault VALUES ('tok_1', 'alice', '{v1}', 0);
             INSERT INTO jobs (id, client, kind, state, result, updated_at_ms) VALUES ('{}', 'alice', 'k', 'succeeded', '{{\"n\":1}}', 0);
             INSERT INTO ledger VALUES ('alice\u{1f}acct', 42, 3);",
            id(9).as_str()
        ));
        let store = open(&path);
        let read = |table: &'static str,
                    column: &'static str,
                    key: &'static str,
                    row: &'static str,
                    owner: &'static str| {
            let store = store.clone();
            async move {
                store
                    .transact(move |tx| {
                        let stored = tx.query_row(
                            &format!("SELECT {column} FROM {table} WHERE {key} = ?1"),
                            params![row],
                            |r| r.get(0),
                        )?;
                        tx.unseal(stored, &Place { table, column, row, owner })
                    })
                    .await
            }
        };
        assert_eq!(
            read("vault", "record", "token", "tok_1", "alice").await.unwrap(),
            Some(serde_json::json!({"name": "Ada"}))
        );
        let job = store.transact(|tx| tx.job(&id(9))).await.unwrap().unwrap();
        assert_eq!(job.result, Some(serde_json::json!({"n": 1})));
        assert_eq!(
            read("ledger", "state", "account", "alice\u{1f}acct", "").await.unwrap(),
            Some(serde_json::json!({"balance": 42, "sequence": 3}))
        );
        drop(store);
        // Once only: a plaintext value written afterwards stays refused across restarts.
        tamper(&path, "UPDATE vault SET record = '{\"name\":\"Eve\"}'");
        let store = open(&path);
        let store2 = store.clone();
        let got = store2
            .transact(|tx| {
                let stored =
                    tx.query_row("SELECT record FROM vault WHERE token = 'tok_1'", params![], |r| r.get(0))?;
                tx.unseal(stored, &Place { table: "vault", column: "record", row: "tok_1", owner: "alice" })
            })
            .await;
        assert!(got.is_err());
        drop(store);
    }

    #[tokio::test]
    async fn records_and_results_are_encrypted_at_rest_and_rekeyed_with_every_family_column() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("db.sqlite");
        let store = open(&path);
        store
            .transact(|tx| put_note(tx, "n1", "alice", &serde_json::json!({"secret": "MARKER-4711"})))
            .await
            .unwrap();
        let mut done = job(5, JobState::Succeeded, None);
        done.result = Some(serde_json::json!({"echo": "MARKER-4711"}));
        store.transact(move |tx| tx.record_job(&done)).await.unwrap();
        drop(store);
        let raw = |p: &std::path::Path| {
            let mut bytes = std::fs::read(p).unwrap_or_default();
            bytes.extend(std::fs::read(p.with_extension("sqlite-wal")).unwrap_or_default());
            String::from_utf8_lossy(&bytes).contains("MARKER-4711")
        };
        assert!(!raw(&path), "plaintext on disk");

        // Rotate: k2 becomes active; old rows stay readable, and rekey moves them to k2 — the
        // family's column too, though this store (like `gatehouse rekey`) was opened without
        // the family: its sealed columns are recorded in the database.
        let rotated = || Keyring::parse(&format!("k1 {}\nk2 {}", "ab".repeat(32), "cd".repeat(32))).unwrap();
        let store = Store::open_sqlite(&path, rotated(), &[]).unwrap();
        let got = store.transact(|tx| get_note(tx, "n1", "alice")).await.unwrap();
        assert_eq!(got.unwrap()["secret"], "MARKER-4711");
        assert_eq!(store.transact(|tx| tx.rekey()).await.unwrap(), 2);
        assert_eq!(store.transact(|tx| tx.rekey()).await.unwrap(), 0);
        drop(store);
        let only_k2 = Keyring::parse(&format!("k2 {}", "cd".repeat(32))).unwrap();
        let store = Store::open_sqlite(&path, only_k2, &[NOTES]).unwrap();
        let got = store.transact(move |tx| tx.job(&id(5))).await.unwrap().unwrap();
        assert_eq!(got.result.unwrap()["echo"], "MARKER-4711");
        let got = store.transact(|tx| get_note(tx, "n1", "alice")).await.unwrap();
        assert_eq!(got.unwrap()["secret"], "MARKER-4711");
    }
}
