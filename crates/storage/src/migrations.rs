//! The job machinery's schema migrations, applied in order; `PRAGMA user_version` records how
//! many ran. Handler families migrate their own tables (see [`crate::family`]).
//!
//! A new database starts from [`BASELINE`], the shape after step 10, and runs the steps after
//! it. The steps are the upgrade path of databases written by earlier releases, and never
//! change once shipped: steps 1 to 8
//! are from before handler families, when the vault's and the ledger's tables were part of this
//! schema, so they create and alter those too (the families adopt the tables as they find
//! them; their own first steps are `CREATE TABLE IF NOT EXISTS`).

use gatehouse_protocol::crypto::Keyring;
use rusqlite::{Connection, params};

use crate::tx::Place;
use crate::{StorageError, Tx};

/// The job machinery's tables as the steps below leave them after step [`BASELINE_AT`], for a
/// new database (which then runs the later steps like any other).
const BASELINE: &str = r"
    CREATE TABLE jobs (
        id            TEXT PRIMARY KEY,
        client        TEXT NOT NULL,
        kind          TEXT NOT NULL,
        state         TEXT NOT NULL,
        result        TEXT,
        error         TEXT,
        seq_key       TEXT,
        seq_number    INTEGER,
        updated_at_ms INTEGER NOT NULL,
        reason        TEXT
    );
    -- A sequence number belongs to one job, ever.
    CREATE UNIQUE INDEX jobs_sequence ON jobs(seq_key, seq_number) WHERE seq_key IS NOT NULL;
    CREATE INDEX jobs_decided ON jobs(kind, updated_at_ms)
        WHERE state IN ('succeeded', 'failed', 'dead_lettered');

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
        deadline_ms    INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (seq_key, seq_number)
    );
    CREATE INDEX parked_deadline ON parked(deadline_ms);
    CREATE INDEX parked_job ON parked(job_id);

    CREATE TABLE attempts (
        job_id        TEXT PRIMARY KEY,
        client        TEXT NOT NULL,
        count         INTEGER NOT NULL,
        last_error    TEXT,
        updated_at_ms INTEGER NOT NULL,
        running       INTEGER NOT NULL DEFAULT 0
    );

    -- How far each handler family's own migrations got, and the sealed columns they declared.
    CREATE TABLE families (
        name    TEXT PRIMARY KEY,
        version INTEGER NOT NULL
    );
    CREATE TABLE sealed_columns (
        tbl        TEXT NOT NULL,
        col        TEXT NOT NULL,
        key_col    TEXT NOT NULL,
        owner_expr TEXT NOT NULL,
        family     TEXT NOT NULL,
        PRIMARY KEY (tbl, col)
    );

";

/// The step [`BASELINE`] stands for.
const BASELINE_AT: usize = 10;

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
    // 10: handler families own their tables (see `crate::family`).
    r"
    CREATE TABLE families (
        name    TEXT PRIMARY KEY,
        version INTEGER NOT NULL
    );
    CREATE TABLE sealed_columns (
        tbl        TEXT NOT NULL,
        col        TEXT NOT NULL,
        key_col    TEXT NOT NULL,
        owner_expr TEXT NOT NULL,
        family     TEXT NOT NULL,
        PRIMARY KEY (tbl, col)
    );
    ",
    // 11: delayed jobs.
    r"
    -- Delayed jobs, held here until their time (then sent back to their job queue).
    CREATE TABLE scheduled (
        job_id   TEXT PRIMARY KEY REFERENCES jobs(id),
        due_ms   INTEGER NOT NULL,
        envelope BLOB NOT NULL,
        released INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX scheduled_due ON scheduled(released, due_ms);
    ",
    // 12: cancellation; cancelled jobs are decided ones (pruned after their retention).
    r"
    DROP INDEX jobs_decided;
    CREATE INDEX jobs_decided ON jobs(kind, updated_at_ms)
        WHERE state IN ('succeeded', 'failed', 'dead_lettered', 'cancelled');
    -- Jobs their client cancelled: never run; a sequenced one uses up its number when its
    -- turn comes.
    CREATE TABLE cancelled (
        job_id TEXT PRIMARY KEY,
        client TEXT NOT NULL,
        at_ms  INTEGER NOT NULL
    );
    CREATE INDEX cancelled_at ON cancelled(at_ms);
    ",
    // 13: singleton kinds.
    r"
    -- Singleton kinds: which job holds each key's turn, and the jobs waiting for it in order.
    CREATE TABLE singleton_turns (
        key    TEXT PRIMARY KEY,
        job_id TEXT NOT NULL
    );
    CREATE INDEX singleton_turns_job ON singleton_turns(job_id);
    CREATE TABLE singleton_waiting (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT,
        key      TEXT NOT NULL,
        job_id   TEXT NOT NULL UNIQUE,
        envelope BLOB NOT NULL
    );
    CREATE INDEX singleton_waiting_key ON singleton_waiting(key, seq);
    ",
    // 14: progress of running jobs.
    r"
    -- The latest progress a running job's handler reported (sealed, bound to job and client).
    CREATE TABLE progress (
        job_id        TEXT PRIMARY KEY,
        client        TEXT NOT NULL,
        value         TEXT NOT NULL,
        updated_at_ms INTEGER NOT NULL
    );
    ",
    // 15: checkpoints and leases of long jobs.
    r"
    -- The latest checkpoint a job's handler saved (sealed, bound to job and client): the next
    -- attempt starts from it.
    CREATE TABLE checkpoints (
        job_id        TEXT PRIMARY KEY,
        client        TEXT NOT NULL,
        value         TEXT NOT NULL,
        updated_at_ms INTEGER NOT NULL
    );
    -- Long jobs whose delivery was acked while they run: their message is held here, and sent
    -- back to its queue if the lease is not renewed (the worker running it died).
    CREATE TABLE leases (
        job_id        TEXT PRIMARY KEY,
        envelope      BLOB NOT NULL,
        expires_at_ms INTEGER NOT NULL
    );
    CREATE INDEX leases_expiry ON leases(expires_at_ms);
    ",
    // 16: schedules.
    r"
    -- Each schedule's last firing time, the job of its latest firing while it runs (a firing
    -- is skipped while it does, unless the schedule allows overlap), and its counts.
    CREATE TABLE schedules (
        name            TEXT PRIMARY KEY,
        last_fire_ms    INTEGER NOT NULL,
        last_job        TEXT,
        running_job     TEXT,
        running_fire_ms INTEGER,
        fired           INTEGER NOT NULL DEFAULT 0,
        skipped         INTEGER NOT NULL DEFAULT 0,
        missed          INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX schedules_running ON schedules(running_job);
    ",
    // 17: the state transitions of each job, for its live event stream.
    r"
    -- Each job's state transitions, numbered from 1 (the event ids of its stream); they go
    -- with its record when it is pruned.
    CREATE TABLE job_events (
        job_id TEXT NOT NULL,
        seq    INTEGER NOT NULL,
        client TEXT NOT NULL,
        state  TEXT NOT NULL,
        at_ms  INTEGER NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    CREATE TRIGGER job_events_pruned AFTER DELETE ON jobs
        WHEN OLD.state IN ('succeeded', 'failed', 'dead_lettered', 'cancelled')
    BEGIN
        DELETE FROM job_events WHERE job_id = OLD.id;
    END;
    ",
    // 18: several workers (on PostgreSQL) claim the delayed jobs they send back.
    r"
    -- Until when a worker's sweep has claimed a due job, to send it back to its queue.
    ALTER TABLE scheduled ADD COLUMN claimed_until_ms INTEGER NOT NULL DEFAULT 0;
    ",
    // 19: error texts (jobs.error, attempts.last_error) sealed at rest, in code
    // (`Tx::seal_plaintext_errors`): they can quote the payload.
    r"
    SELECT 1;
    ",
    // 20: how many times each job was dead-lettered (a replay grant names its dead letter).
    r"
    CREATE TABLE dead_letters (
        job_id TEXT PRIMARY KEY,
        count  INTEGER NOT NULL,
        at_ms  INTEGER NOT NULL
    );
    CREATE INDEX dead_letters_at ON dead_letters(at_ms);
    ",
    // 21: which attempt holds a lease (fences a handed-off attempt's outcome).
    r"
    ALTER TABLE leases ADD COLUMN holder TEXT NOT NULL DEFAULT '';
    ",
    // 22: what the worker writes to learn whether storage takes writes again after refusing
    // them (`Tx::probe_write`): one row, rewritten.
    r"
    CREATE TABLE storage_probe (id INTEGER PRIMARY KEY, at_ms INTEGER NOT NULL, pad BLOB NOT NULL);
    ",
    // 23: kinds and queue classes an operator paused (`kind:<name>`, `queue:<class>`), and the
    // jobs held for them, in arrival order.
    r"
    CREATE TABLE pauses (target TEXT PRIMARY KEY, since_ms INTEGER NOT NULL);
    CREATE TABLE paused_jobs (
        seq      INTEGER PRIMARY KEY AUTOINCREMENT,
        target   TEXT NOT NULL,
        job_id   TEXT NOT NULL UNIQUE,
        envelope BLOB NOT NULL
    );
    CREATE INDEX paused_jobs_target ON paused_jobs(target, seq);
    ",
    // 24: running limits of more than one: a key's turns are held by up to its limit of jobs.
    r"
    CREATE TABLE turns (key TEXT NOT NULL, job_id TEXT NOT NULL, PRIMARY KEY (key, job_id));
    CREATE INDEX turns_job ON turns(job_id);
    INSERT INTO turns (key, job_id) SELECT key, job_id FROM singleton_turns;
    DROP TABLE singleton_turns;
    ",
    // 25: start rates: each rated key's theoretical next start (GCRA), in microseconds.
    r"
    CREATE TABLE rates (key TEXT PRIMARY KEY, tat_us INTEGER NOT NULL);
    ",
    // 26: when each job was submitted, for a client's own job list (`Tx::list_jobs`), newest
    // first; jobs from before know only their last change.
    r"
    ALTER TABLE jobs ADD COLUMN submitted_at_ms INTEGER;
    UPDATE jobs SET submitted_at_ms = updated_at_ms;
    CREATE INDEX jobs_by_client ON jobs(client, submitted_at_ms DESC, id DESC);
    ",
    // 27: batches (jobs accepted whole) and their jobs in submission order.
    r"
    CREATE TABLE batches (
        id            TEXT PRIMARY KEY,
        client        TEXT NOT NULL,
        total         INTEGER NOT NULL,
        created_at_ms INTEGER NOT NULL,
        -- The job that runs once every job is decided (its envelope, sealed at rest), and when
        -- it was sent.
        on_complete_id  TEXT,
        on_complete     TEXT,
        completed_at_ms INTEGER
    );
    CREATE TABLE batch_jobs (
        batch_id TEXT NOT NULL,
        position INTEGER NOT NULL,
        job_id   TEXT NOT NULL,
        PRIMARY KEY (batch_id, position)
    );
    -- What the sweep looks for every pass: batches whose on_complete job was not sent yet.
    CREATE INDEX batches_pending ON batches(id) WHERE completed_at_ms IS NULL AND on_complete IS NOT NULL;
    ",
    // 28: workflows (batches of named steps) and jobs that wait for others.
    r"
    ALTER TABLE batches ADD COLUMN workflow INTEGER NOT NULL DEFAULT 0;
    -- A workflow step's name, and the names of the steps it waits for (comma-separated).
    ALTER TABLE batch_jobs ADD COLUMN step TEXT;
    ALTER TABLE batch_jobs ADD COLUMN after_steps TEXT;
    -- The parents of each job held `waiting_for_parents`; they go when it stops waiting.
    CREATE TABLE job_parents (
        job_id    TEXT NOT NULL,
        parent_id TEXT NOT NULL,
        PRIMARY KEY (job_id, parent_id)
    );
    CREATE INDEX jobs_waiting_for_parents ON jobs(id) WHERE state = 'waiting_for_parents';
    CREATE TRIGGER job_parents_released AFTER UPDATE OF state ON jobs
        WHEN OLD.state = 'waiting_for_parents' AND NEW.state <> 'waiting_for_parents'
    BEGIN
        DELETE FROM job_parents WHERE job_id = OLD.id;
    END;
    CREATE TRIGGER job_parents_pruned AFTER DELETE ON jobs
        WHEN OLD.state = 'waiting_for_parents'
    BEGIN
        DELETE FROM job_parents WHERE job_id = OLD.id;
    END;
    ",
];

/// After this migration (1-based) the error texts of earlier releases are sealed.
const SEAL_ERRORS_AFTER: usize = 19;

/// After this migration (1-based) the values of earlier releases are re-sealed.
const RESEAL_AFTER: usize = 8;

/// The sealed columns at step 8, when the vault and the ledger were part of this schema.
const SEALED_AT_STEP_8: [(&str, &str, &str, &str); 3] = [
    ("vault", "token", "owner", "record"),
    ("jobs", "id", "client", "result"),
    ("ledger", "account", "''", "state"),
];

/// Brings the schema up to date. Every step reads the version and moves it on inside one
/// `BEGIN IMMEDIATE` transaction: workers that start together on one database take turns,
/// and each step runs once.
pub(crate) fn run(conn: &mut Connection, keyring: &Keyring) -> Result<(), StorageError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let done: usize = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
    if done == 0 {
        tx.execute_batch(BASELINE)?;
        tx.pragma_update(None, "user_version", BASELINE_AT)?;
    }
    tx.commit()?;
    upgrade(conn, keyring, if done == 0 { BASELINE_AT } else { done }, MIGRATIONS.len())
}

/// Runs the steps after `done` up to `upto` on a database an earlier release wrote.
pub(crate) fn upgrade(
    conn: &mut Connection,
    keyring: &Keyring,
    done: usize,
    upto: usize,
) -> Result<(), StorageError> {
    if done > MIGRATIONS.len() {
        return Err(StorageError::Corrupt(format!(
            "the database is at schema version {done}, newer than this worker knows ({}): a newer release wrote it",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().take(upto).skip(done) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let now_done: usize = tx.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if now_done > i {
            continue; // another worker ran it meanwhile
        }
        tx.execute_batch(sql)?;
        if i + 1 == RESEAL_AFTER {
            let columns: Vec<_> = SEALED_AT_STEP_8
                .iter()
                .map(|(t, k, o, c)| ((*t).to_owned(), (*k).to_owned(), (*o).to_owned(), (*c).to_owned()))
                .collect();
            let n = Tx::new(&tx, keyring).reseal(&columns, true)? + seal_ledger_of_step_8(&tx, keyring)?;
            tracing::info!(values = n, "re-sealed stored values with their binding");
        }
        if i + 1 == SEAL_ERRORS_AFTER {
            let n = Tx::new(&tx, keyring).seal_plaintext_errors()?;
            tracing::info!(values = n, "sealed stored error texts");
        }
        tx.pragma_update(None, "user_version", i + 1)?;
        tx.commit()?;
    }
    Ok(())
}

/// Ledger rows of releases before step 8 kept balance and sequence in plain columns: sealed
/// into `state`, bound to the account (whose key names its owner).
fn seal_ledger_of_step_8(conn: &Connection, keyring: &Keyring) -> Result<u64, StorageError> {
    let rows: Vec<(String, i64, i64)> = {
        let mut stmt = conn.prepare("SELECT account, balance, sequence FROM ledger WHERE state IS NULL")?;
        let rows = stmt.query_map([], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
        rows.collect::<Result<_, _>>()?
    };
    let tx = Tx::new(conn, keyring);
    for (account, balance, sequence) in &rows {
        let state = serde_json::json!({"balance": balance, "sequence": sequence});
        let at = Place { table: "ledger", column: "state", row: account, owner: "" };
        conn.execute(
            "UPDATE ledger SET state = ?1, balance = 0, sequence = 0 WHERE account = ?2",
            params![tx.seal(&state, &at)?, account],
        )?;
    }
    Ok(rows.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Columns (name, type, not null, default, primary key) and indexes of every table.
    fn shape(conn: &Connection) -> Vec<String> {
        let mut out = Vec::new();
        let tables: Vec<String> = conn
            .prepare("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")
            .unwrap()
            .query_map([], |r| r.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap();
        for t in tables {
            let mut stmt = conn.prepare(&format!("PRAGMA table_info({t})")).unwrap();
            let cols = stmt
                .query_map([], |r| {
                    Ok(format!(
                        "{t}.{}: {} notnull={} default={:?} pk={}",
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                        r.get::<_, Option<String>>(4)?,
                        r.get::<_, i64>(5)?
                    ))
                })
                .unwrap();
            out.extend(cols.map(Result::unwrap));
            let mut stmt = conn.prepare(&format!("PRAGMA index_list({t})")).unwrap();
            let idx = stmt
                .query_map([], |r| {
                    Ok(format!(
                        "{t} index {} unique={} partial={}",
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                        r.get::<_, i64>(4)?
                    ))
                })
                .unwrap();
            out.extend(idx.map(Result::unwrap));
        }
        out.sort();
        out
    }

    #[test]
    fn a_new_database_has_the_shape_the_upgrade_steps_leave_minus_the_families_tables() {
        let keyring = Keyring::parse(&format!("k1 {}", "ab".repeat(32))).unwrap();
        let mut fresh = Connection::open_in_memory().unwrap();
        run(&mut fresh, &keyring).unwrap();
        let mut upgraded = Connection::open_in_memory().unwrap();
        upgrade(&mut upgraded, &keyring, 0, MIGRATIONS.len()).unwrap();
        // Steps 1 to 8 made the vault's and the ledger's tables, which are families' now.
        upgraded.execute_batch("DROP TABLE vault; DROP TABLE ledger;").unwrap();
        assert_eq!(shape(&fresh), shape(&upgraded));
        let version =
            |c: &Connection| c.pragma_query_value(None, "user_version", |r| r.get::<_, usize>(0)).unwrap();
        assert_eq!((version(&fresh), version(&upgraded)), (MIGRATIONS.len(), MIGRATIONS.len()));
    }

    #[test]
    fn error_texts_stored_in_the_clear_by_earlier_releases_are_sealed_by_step_19() {
        let keyring = Keyring::parse(&format!("k1 {}", "ab".repeat(32))).unwrap();
        let mut conn = Connection::open_in_memory().unwrap();
        upgrade(&mut conn, &keyring, 0, SEAL_ERRORS_AFTER - 1).unwrap();
        conn.execute_batch(
            "INSERT INTO jobs (id, client, kind, state, error, updated_at_ms)
                 VALUES ('0123456789abcdef0123456789abcdef', 'alice', 'k', 'failed', 'exit 1: MARKER', 0);
             INSERT INTO attempts (job_id, client, count, last_error, updated_at_ms)
                 VALUES ('0123456789abcdef0123456789abcdef', 'alice', 1, 'exit 75: MARKER', 0);",
        )
        .unwrap();
        upgrade(&mut conn, &keyring, SEAL_ERRORS_AFTER - 1, MIGRATIONS.len()).unwrap();
        let raw: String =
            conn.query_row("SELECT error || last_error FROM jobs, attempts", [], |r| r.get(0)).unwrap();
        assert!(!raw.contains("MARKER"), "still in the clear: {raw}");
        let id = gatehouse_protocol::JobId::parse("0123456789abcdef0123456789abcdef").unwrap();
        let tx = Tx::new(&conn, &keyring);
        assert_eq!(tx.job(&id).unwrap().unwrap().error.as_deref(), Some("exit 1: MARKER"));
        assert_eq!(tx.attempts(&id).unwrap().unwrap().last_error.as_deref(), Some("exit 75: MARKER"));
    }
}
