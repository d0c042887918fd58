//! Schema migrations, applied in order; `PRAGMA user_version` records how many ran.

use gatehouse_protocol::crypto::Keyring;
use rusqlite::Connection;

use crate::{StorageError, Tx};

const MIGRATIONS: &[&str] = &[
    // 1: jobs and their outcomes, sequences, parked jobs, vault, ledger.
    r"
    CREATE TABLE jobs (
        id            TEXT PRIMARY KEY,
        client        TEXT NOT NULL,
        kind          TEXT NOT NULL,
        state         TEXT NOT NULL,
        result        TEXT,
        error         TEXT,
        seq_key       TEXT,
        seq_number    INTEGER,
        updated_at_ms INTEGER NOT NULL
    );
    -- A sequence number belongs to one job, ever.
    CREATE UNIQUE INDEX jobs_sequence ON jobs(seq_key, seq_number) WHERE seq_key IS NOT NULL;

    -- Next number each sequence key applies.
    CREATE TABLE sequences (
        key  TEXT PRIMARY KEY,
        next INTEGER NOT NULL
    );

    -- Jobs that arrived before their predecessor: kept here (not in the broker) until the gap
    -- closes, with what is needed to run and answer them then.
    CREATE TABLE parked (
        seq_key        TEXT NOT NULL,
        seq_number     INTEGER NOT NULL,
        job_id         TEXT NOT NULL REFERENCES jobs(id),
        envelope       BLOB NOT NULL,
        reply_to       TEXT,
        correlation_id TEXT,
        parked_at_ms   INTEGER NOT NULL,
        PRIMARY KEY (seq_key, seq_number)
    );

    CREATE TABLE vault (
        token         TEXT PRIMARY KEY,
        owner         TEXT NOT NULL,
        record        TEXT NOT NULL,
        created_at_ms INTEGER NOT NULL
    );

    CREATE TABLE ledger (
        account  TEXT PRIMARY KEY,
        balance  INTEGER NOT NULL,
        sequence INTEGER NOT NULL
    );
    ",
    // 2: attempts counted per job (a crash mid-handler counts; a delivery that was only
    // prefetched does not), the dead-letter reason, and gap deadlines of parked jobs.
    r"
    CREATE TABLE attempts (
        job_id        TEXT PRIMARY KEY,
        client        TEXT NOT NULL,
        count         INTEGER NOT NULL,
        last_error    TEXT,
        updated_at_ms INTEGER NOT NULL
    );
    ALTER TABLE jobs ADD COLUMN reason TEXT;
    ALTER TABLE parked ADD COLUMN deadline_ms INTEGER NOT NULL DEFAULT 0;
    CREATE INDEX parked_deadline ON parked(deadline_ms);
    ",
    // 3: whether an attempt is under way: one still marked running when a delivery comes
    // again was interrupted by the death of the worker process.
    r"
    ALTER TABLE attempts ADD COLUMN running INTEGER NOT NULL DEFAULT 0;
    ",
    // 4: the gatekeeper's signature of a parked job, kept so that its dead letter (after a gap
    // timeout) can be replayed and verified like any other.
    r"
    ALTER TABLE parked ADD COLUMN key_id TEXT;
    ALTER TABLE parked ADD COLUMN signature TEXT;
    ",
    // 5: a message carries what vouches for it (session and MAC) in its body, which `parked`
    // keeps whole (a parked job from before cannot be verified any more; its dead letter is
    // refused as bad_signature).
    r"
    ALTER TABLE parked DROP COLUMN key_id;
    ALTER TABLE parked DROP COLUMN signature;
    ",
    // 6: attempts are forgotten once their job is decided (before, every job left a row).
    r"
    DELETE FROM attempts WHERE job_id IN (SELECT id FROM jobs);
    ",
    // 7: sequence keys and ledger accounts belong to a client: `<client> U+001F <name>`. Each
    // existing key goes to the client whose jobs used it (the latest one, should several have
    // — the cross-client writes this migration ends).
    r"
    CREATE TEMP TABLE key_owner AS
        SELECT seq_key AS key,
               (SELECT j2.client FROM jobs j2 WHERE j2.seq_key = j.seq_key
                ORDER BY j2.updated_at_ms DESC LIMIT 1) AS client
        FROM jobs j WHERE seq_key IS NOT NULL GROUP BY seq_key;
    UPDATE ledger SET account = (SELECT client FROM key_owner WHERE key = ledger.account) || char(31) || account
        WHERE account IN (SELECT key FROM key_owner);
    UPDATE sequences SET key = (SELECT client FROM key_owner WHERE key = sequences.key) || char(31) || key
        WHERE key IN (SELECT key FROM key_owner);
    UPDATE parked SET seq_key = (SELECT client FROM key_owner WHERE key = parked.seq_key) || char(31) || seq_key
        WHERE seq_key IN (SELECT key FROM key_owner);
    UPDATE jobs SET seq_key = client || char(31) || seq_key WHERE seq_key IS NOT NULL;
    DROP TABLE key_owner;
    ",
    // 8: a ledger account's balance and sequence are sealed (`state`), like vault records and
    // results; every sealed value is bound to its table, column, row and owner. The values
    // earlier releases wrote (plaintext, or bound to their row only) are re-sealed right after
    // this step, in the same transaction ([`RESEAL_AFTER`]): the one moment they are trusted.
    r"
    ALTER TABLE ledger ADD COLUMN state TEXT;
    ",
    // 9: retention. Decided jobs by kind and age, for pruning in small batches; and parked
    // rows by job, so that deleting a job need not scan `parked` for a reference to it.
    r"
    CREATE INDEX jobs_decided ON jobs(kind, updated_at_ms)
        WHERE state IN ('succeeded', 'failed', 'dead_lettered');
    CREATE INDEX parked_job ON parked(job_id);
    ",
];

/// After this migration (1-based) the values of earlier releases are re-sealed.
const RESEAL_AFTER: usize = 8;

pub(crate) fn run(conn: &mut Connection, keyring: &Keyring) -> Result<(), StorageError> {
    let done: usize = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(done) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        if i + 1 == RESEAL_AFTER {
            let n = Tx::new(&tx, keyring).reseal(true)?;
            tracing::info!(values = n, "re-sealed stored values with their binding");
        }
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}
