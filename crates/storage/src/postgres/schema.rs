//! The job machinery's schema on PostgreSQL, by version.

/// The job machinery's schema on PostgreSQL, by version; `gatehouse_schema` records how many
/// steps ran. Never edit a step that has shipped: add one. (The same tables as SQLite's
/// after its step 18, in PostgreSQL's types.)
pub(super) const SCHEMA: &[&str] = &[
    r"
    CREATE TABLE jobs (
        id            TEXT PRIMARY KEY,
        client        TEXT NOT NULL,
        kind          TEXT NOT NULL,
        state         TEXT NOT NULL,
        result        TEXT,
        error         TEXT,
        seq_key       TEXT,
        seq_number    BIGINT,
        updated_at_ms BIGINT NOT NULL,
        reason        TEXT
    );
    CREATE UNIQUE INDEX jobs_sequence ON jobs(seq_key, seq_number) WHERE seq_key IS NOT NULL;
    CREATE INDEX jobs_decided ON jobs(kind, updated_at_ms)
        WHERE state IN ('succeeded', 'failed', 'dead_lettered', 'cancelled');
    CREATE TABLE sequences (key TEXT PRIMARY KEY, next BIGINT NOT NULL);
    CREATE TABLE parked (
        seq_key        TEXT NOT NULL,
        seq_number     BIGINT NOT NULL,
        job_id         TEXT NOT NULL REFERENCES jobs(id),
        envelope       BYTEA NOT NULL,
        reply_to       TEXT,
        correlation_id TEXT,
        parked_at_ms   BIGINT NOT NULL,
        deadline_ms    BIGINT NOT NULL DEFAULT 0,
        PRIMARY KEY (seq_key, seq_number)
    );
    CREATE INDEX parked_deadline ON parked(deadline_ms);
    CREATE INDEX parked_job ON parked(job_id);
    CREATE TABLE attempts (
        job_id        TEXT PRIMARY KEY,
        client        TEXT NOT NULL,
        count         BIGINT NOT NULL,
        last_error    TEXT,
        updated_at_ms BIGINT NOT NULL,
        running       BIGINT NOT NULL DEFAULT 0
    );
    CREATE TABLE families (name TEXT PRIMARY KEY, version BIGINT NOT NULL);
    CREATE TABLE sealed_columns (
        tbl        TEXT NOT NULL,
        col        TEXT NOT NULL,
        key_col    TEXT NOT NULL,
        owner_expr TEXT NOT NULL,
        family     TEXT NOT NULL,
        PRIMARY KEY (tbl, col)
    );
    CREATE TABLE scheduled (
        job_id   TEXT PRIMARY KEY REFERENCES jobs(id),
        due_ms   BIGINT NOT NULL,
        envelope BYTEA NOT NULL,
        released BIGINT NOT NULL DEFAULT 0,
        claimed_until_ms BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX scheduled_due ON scheduled(released, due_ms);
    CREATE TABLE cancelled (job_id TEXT PRIMARY KEY, client TEXT NOT NULL, at_ms BIGINT NOT NULL);
    CREATE INDEX cancelled_at ON cancelled(at_ms);
    CREATE TABLE singleton_turns (key TEXT PRIMARY KEY, job_id TEXT NOT NULL);
    CREATE INDEX singleton_turns_job ON singleton_turns(job_id);
    CREATE TABLE singleton_waiting (
        seq      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        key      TEXT NOT NULL,
        job_id   TEXT NOT NULL UNIQUE,
        envelope BYTEA NOT NULL
    );
    CREATE INDEX singleton_waiting_key ON singleton_waiting(key, seq);
    CREATE TABLE progress (
        job_id        TEXT PRIMARY KEY,
        client        TEXT NOT NULL,
        value         TEXT NOT NULL,
        updated_at_ms BIGINT NOT NULL
    );
    CREATE TABLE checkpoints (
        job_id        TEXT PRIMARY KEY,
        client        TEXT NOT NULL,
        value         TEXT NOT NULL,
        updated_at_ms BIGINT NOT NULL
    );
    CREATE TABLE leases (job_id TEXT PRIMARY KEY, envelope BYTEA NOT NULL, expires_at_ms BIGINT NOT NULL);
    CREATE INDEX leases_expiry ON leases(expires_at_ms);
    CREATE TABLE schedules (
        name            TEXT PRIMARY KEY,
        last_fire_ms    BIGINT NOT NULL,
        last_job        TEXT,
        running_job     TEXT,
        running_fire_ms BIGINT,
        fired           BIGINT NOT NULL DEFAULT 0,
        skipped         BIGINT NOT NULL DEFAULT 0,
        missed          BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX schedules_running ON schedules(running_job);
    CREATE TABLE job_events (
        job_id TEXT NOT NULL,
        seq    BIGINT NOT NULL,
        client TEXT NOT NULL,
        state  TEXT NOT NULL,
        at_ms  BIGINT NOT NULL,
        PRIMARY KEY (job_id, seq)
    );
    CREATE FUNCTION gatehouse_job_events_pruned() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM job_events WHERE job_id = OLD.id;
        RETURN NULL;
    END $$;
    CREATE TRIGGER job_events_pruned AFTER DELETE ON jobs FOR EACH ROW
        WHEN (OLD.state IN ('succeeded', 'failed', 'dead_lettered', 'cancelled'))
        EXECUTE FUNCTION gatehouse_job_events_pruned();
",
    r"
    -- 2: error texts (jobs.error, attempts.last_error) sealed at rest, in code
    -- (`Tx::seal_plaintext_errors`): they can quote the payload.
    SELECT 1;
",
    r"
    -- 3: how many times each job was dead-lettered (a replay grant names its dead letter).
    CREATE TABLE dead_letters (
        job_id TEXT PRIMARY KEY,
        count  BIGINT NOT NULL,
        at_ms  BIGINT NOT NULL
    );
    CREATE INDEX dead_letters_at ON dead_letters(at_ms);
",
    r"
    -- 4: which attempt holds a lease (fences a handed-off attempt's outcome).
    ALTER TABLE leases ADD COLUMN holder TEXT NOT NULL DEFAULT '';
",
    r"
    -- 5: what the worker writes to learn whether storage takes writes again (`Tx::probe_write`).
    CREATE TABLE storage_probe (id BIGINT PRIMARY KEY, at_ms BIGINT NOT NULL, pad BYTEA NOT NULL);
",
    r"
    -- 6: paused kinds and queue classes, and the jobs held for them, in arrival order.
    CREATE TABLE pauses (target TEXT PRIMARY KEY, since_ms BIGINT NOT NULL);
    CREATE TABLE paused_jobs (
        seq      BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
        target   TEXT NOT NULL,
        job_id   TEXT NOT NULL UNIQUE,
        envelope BYTEA NOT NULL
    );
    CREATE INDEX paused_jobs_target ON paused_jobs(target, seq);
",
    r"
    -- 7: running limits of more than one: a key's turns are held by up to its limit of jobs.
    CREATE TABLE turns (key TEXT NOT NULL, job_id TEXT NOT NULL, PRIMARY KEY (key, job_id));
    CREATE INDEX turns_job ON turns(job_id);
    INSERT INTO turns (key, job_id) SELECT key, job_id FROM singleton_turns;
    DROP TABLE singleton_turns;
",
    r"
    -- 8: start rates: each rated key's theoretical next start (GCRA), in microseconds.
    CREATE TABLE rates (key TEXT PRIMARY KEY, tat_us BIGINT NOT NULL);
",
    r"
    -- 9: when each job was submitted, for a client's own job list, newest first.
    ALTER TABLE jobs ADD COLUMN submitted_at_ms BIGINT;
    UPDATE jobs SET submitted_at_ms = updated_at_ms;
    CREATE INDEX jobs_by_client ON jobs(client, submitted_at_ms DESC, id DESC);
",
    r"
    -- 10: batches (jobs accepted whole) and their jobs in submission order.
    CREATE TABLE batches (
        id            TEXT PRIMARY KEY,
        client        TEXT NOT NULL,
        total         BIGINT NOT NULL,
        created_at_ms BIGINT NOT NULL,
        -- The job that runs once every job is decided (its envelope, sealed at rest), and when
        -- it was sent.
        on_complete_id  TEXT,
        on_complete     TEXT,
        completed_at_ms BIGINT
    );
    CREATE TABLE batch_jobs (
        batch_id TEXT NOT NULL,
        position BIGINT NOT NULL,
        job_id   TEXT NOT NULL,
        PRIMARY KEY (batch_id, position)
    );
    -- What the sweep looks for every pass: batches whose on_complete job was not sent yet.
    CREATE INDEX batches_pending ON batches(id) WHERE completed_at_ms IS NULL AND on_complete IS NOT NULL;
",
    r"
    -- 11: workflows (batches of named steps) and jobs that wait for others.
    ALTER TABLE batches ADD COLUMN workflow BIGINT NOT NULL DEFAULT 0;
    ALTER TABLE batch_jobs ADD COLUMN step TEXT;
    ALTER TABLE batch_jobs ADD COLUMN after_steps TEXT;
    CREATE TABLE job_parents (
        job_id    TEXT NOT NULL,
        parent_id TEXT NOT NULL,
        PRIMARY KEY (job_id, parent_id)
    );
    CREATE INDEX jobs_waiting_for_parents ON jobs(id) WHERE state = 'waiting_for_parents';
    CREATE FUNCTION gatehouse_job_parents_gone() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
        DELETE FROM job_parents WHERE job_id = OLD.id;
        RETURN NULL;
    END $$;
    CREATE TRIGGER job_parents_released AFTER UPDATE OF state ON jobs FOR EACH ROW
        WHEN (OLD.state = 'waiting_for_parents' AND NEW.state <> 'waiting_for_parents')
        EXECUTE FUNCTION gatehouse_job_parents_gone();
    CREATE TRIGGER job_parents_pruned AFTER DELETE ON jobs FOR EACH ROW
        WHEN (OLD.state = 'waiting_for_parents')
        EXECUTE FUNCTION gatehouse_job_parents_gone();
",
];

/// After this step (1-based) the error texts of earlier releases are sealed.
pub(super) const SEAL_ERRORS_AFTER: usize = 2;
