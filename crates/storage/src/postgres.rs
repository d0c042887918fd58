//! PostgreSQL storage, for deployments: several workers on one database server.
//!
//! Each [`crate::Store::transact`] closure is one PostgreSQL transaction on a pooled connection
//! (tokio-postgres through deadpool-postgres), taken only for the closure's run: no connection
//! is held while a job waits for the broker. Closures are synchronous (handlers' SQL is), so
//! they run on a blocking thread that drives the async client statement by statement.
//!
//! Concurrency: transactions are `READ COMMITTED`; what must happen once across workers is
//! serialized by transaction-scoped advisory locks that the job machinery takes
//! ([`crate::Tx::lock`]: the job's id, its sequence key, a singleton key), and by the
//! constraints (a job id, a sequence number, an attempt row are each one row). Group commit is
//! PostgreSQL's own: the commits of concurrent transactions share one WAL flush.

use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use deadpool_postgres::{ClientWrapper, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use gatehouse_protocol::crypto::Keyring;
use tokio::runtime::Handle;
use tokio_postgres::types::{IsNull, Type, to_sql_checked};

use crate::sql::{Params, Row, SqlValue, numbered_dollars};
use crate::{Family, Observer, StorageError, Tx, panic_message};

/// The job machinery's schema on PostgreSQL, by version; `gatehouse_schema` records how many
/// steps ran. Never edit a step that has shipped: add one. (The same tables as SQLite's
/// after its step 18, in PostgreSQL's types.)
const SCHEMA: &[&str] = &[
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
];

/// After this step (1-based) the error texts of earlier releases are sealed.
const SEAL_ERRORS_AFTER: usize = 2;

/// Where and how to reach the database.
#[derive(Clone)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/db`, without a password.
    pub url: String,
    pub password: Option<String>,
    /// Most connections this process opens.
    pub pool_size: usize,
    /// The CA (PEM) that signed the server's certificate: connections then use TLS (rustls),
    /// always, the certificate checked against it and the url's host.
    pub tls_ca: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for PostgresConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresConfig")
            .field("url", &self.url)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("pool_size", &self.pool_size)
            .field("tls_ca", &self.tls_ca)
            .finish()
    }
}

/// How long opening one connection may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The PostgreSQL side of a [`crate::Store`].
#[derive(Clone)]
pub(crate) struct PgStore {
    pool: Pool,
    keyring: Arc<Keyring>,
    pub(crate) observer: Observer,
}

impl PgStore {
    /// Connects, then migrates the schema and `families`' tables, under a lock that lets
    /// workers starting together take turns.
    pub(crate) async fn open(
        config: &PostgresConfig,
        keyring: Keyring,
        families: &[Family],
    ) -> Result<Self, StorageError> {
        let mut pg: tokio_postgres::Config =
            config.url.parse().map_err(|e| StorageError::Config(format!("storage url: {e}")))?;
        let tls = tls(config, &mut pg)?;
        if let Some(p) = &config.password {
            pg.password(p.as_str());
        }
        pg.connect_timeout(CONNECT_TIMEOUT);
        pg.application_name("gatehouse-worker");
        let recycling = || ManagerConfig { recycling_method: RecyclingMethod::Fast };
        let manager = match tls {
            Some(tls) => {
                Manager::from_config(pg, tokio_postgres_rustls::MakeRustlsConnect::new(tls), recycling())
            }
            None => Manager::from_config(pg, tokio_postgres::NoTls, recycling()),
        };
        let pool = Pool::builder(manager)
            .max_size(config.pool_size.max(1))
            .runtime(Runtime::Tokio1)
            .create_timeout(Some(CONNECT_TIMEOUT))
            .wait_timeout(Some(Duration::from_secs(30)))
            .build()
            .map_err(|e| StorageError::Config(format!("storage pool: {e}")))?;
        let store = Self { pool, keyring: Arc::new(keyring), observer: Observer::default() };
        let families = families.to_vec();
        store
            .run(move |tx| {
                tx.lock("gatehouse migrations")?;
                migrate(tx)?;
                crate::family::migrate(tx, &families)
            })
            .await?;
        Ok(store)
    }

    /// Runs `f` in one transaction on a pooled connection; commits when it returns `Ok`.
    pub(crate) async fn run<R, E, F>(&self, f: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StorageError> + Send + 'static,
        F: FnOnce(&mut Tx<'_>) -> Result<R, E> + Send + 'static,
    {
        let client = self.pool.get().await.map_err(|e| StorageError::from(PoolError(e)))?;
        let keyring = self.keyring.clone();
        let observer = self.observer.clone();
        let rt = Handle::current();
        let started = std::time::Instant::now();
        let joined = tokio::task::spawn_blocking(move || {
            let (outcome, ended) = {
                let session = Session::new(&client, &rt);
                // Sent with the first statement (one round trip for both).
                session.defer(Pending::Begin);
                let mut tx = Tx::postgres(&session, &keyring);
                let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut tx)))
                    .unwrap_or_else(|p| Err(StorageError::Panicked(panic_message(&*p)).into()));
                let ended = session.end(outcome.is_ok());
                (outcome, ended)
            };
            if let Err(e) = ended {
                // Not known to be clean: this connection is not used again.
                drop(deadpool_postgres::Object::take(client));
                return match outcome {
                    Ok(_) => {
                        Err(StorageError::Commit { message: e.to_string(), refusal: e.refusal() }.into())
                    }
                    failed => failed,
                };
            }
            if outcome.is_ok()
                && let Some(o) = observer.get()
            {
                o.committed(started.elapsed(), 1);
            }
            outcome
        })
        .await;
        joined.unwrap_or_else(|e| Err(StorageError::Panicked(e.to_string()).into()))
    }
}

/// The TLS settings of the connections: with a CA, TLS always (a url's `sslmode=prefer`, the
/// default, would let a man in the middle refuse TLS); without one, none — and a url that
/// asks for TLS (`sslmode=require`) is refused, as nothing could check the server.
fn tls(
    config: &PostgresConfig,
    pg: &mut tokio_postgres::Config,
) -> Result<Option<rustls::ClientConfig>, StorageError> {
    use tokio_postgres::config::SslMode;
    let Some(ca) = &config.tls_ca else {
        if pg.get_ssl_mode() == SslMode::Require {
            return Err(StorageError::Config(
                "storage url asks for TLS (sslmode=require): set [storage] tls_ca to the CA that signed the server's certificate".into(),
            ));
        }
        pg.ssl_mode(SslMode::Disable);
        return Ok(None);
    };
    let certs = gatehouse_protocol::pem::load_certs(ca)
        .map_err(|e| StorageError::Config(format!("[storage] tls_ca {}: {e}", ca.display())))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots
            .add(cert)
            .map_err(|e| StorageError::Config(format!("[storage] tls_ca {}: {e}", ca.display())))?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StorageError::Config(format!("TLS to PostgreSQL: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    pg.ssl_mode(SslMode::Require);
    Ok(Some(tls))
}

/// Runs the schema steps not yet run (the caller holds the migration lock).
fn migrate(tx: &Tx<'_>) -> Result<(), StorageError> {
    tx.batch("CREATE TABLE IF NOT EXISTS gatehouse_schema (version BIGINT NOT NULL)")?;
    let done = tx.one("SELECT version FROM gatehouse_schema", crate::params![], |r| r.get::<i64>(0))?;
    let done = usize::try_from(done.unwrap_or(0)).unwrap_or(usize::MAX);
    if done > SCHEMA.len() {
        return Err(StorageError::Corrupt(format!(
            "the database is at schema version {done}, newer than this worker knows ({}): a newer release wrote it",
            SCHEMA.len()
        )));
    }
    for step in &SCHEMA[done..] {
        tx.batch(step)?;
    }
    if (1..SEAL_ERRORS_AFTER).contains(&done) {
        tx.seal_plaintext_errors()?;
    }
    tx.exec("DELETE FROM gatehouse_schema", crate::params![])?;
    tx.exec("INSERT INTO gatehouse_schema (version) VALUES (?1)", crate::params![SCHEMA.len() as i64])?;
    Ok(())
}

/// A connection inside one transaction, driven from a blocking thread.
///
/// Statements whose answer nothing waits for — `BEGIN`, an advisory lock — are not sent on
/// their own: they wait in `pending` and go with the next statement, pipelined on the
/// connection (one round trip for all; the server still runs them in order, so a statement
/// after a lock runs, and takes its snapshot, once the lock is held).
pub(crate) struct Session<'c> {
    client: &'c ClientWrapper,
    rt: &'c Handle,
    pending: std::cell::RefCell<Vec<Pending>>,
    /// Whether any statement was sent.
    sent: std::cell::Cell<bool>,
}

/// A statement sent with the next one.
pub(crate) enum Pending {
    Begin,
    /// `pg_advisory_xact_lock` of this name.
    Lock(String),
    /// A write whose answer nothing reads ([`crate::Tx::write`]); its error, if any, is the
    /// next statement's (the transaction fails either way).
    Write(tokio_postgres::Statement, Vec<SqlValue>),
}

/// Takes a transaction-scoped advisory lock, waiting for it.
const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";

type Sent<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), tokio_postgres::Error>> + Send + 'a>>;

impl<'c> Session<'c> {
    fn new(client: &'c ClientWrapper, rt: &'c Handle) -> Self {
        Self { client, rt, pending: Default::default(), sent: Default::default() }
    }

    /// Sends `p` with the next statement.
    pub(crate) fn defer(&self, p: Pending) {
        self.pending.borrow_mut().push(p);
    }

    /// Commits (with the writes still deferred) or rolls back (dropping them); when not one
    /// statement was sent and none is to be written, there is no transaction to end.
    fn end(&self, commit: bool) -> Result<(), StorageError> {
        let mut pending = self.pending.borrow_mut();
        if !commit {
            pending.clear();
        }
        let writes = pending.iter().any(|p| matches!(p, Pending::Write(..)));
        drop(pending);
        if !self.sent.get() && !writes {
            return Ok(());
        }
        self.batch(if commit { "COMMIT" } else { "ROLLBACK" })
    }

    /// Runs `main` after the deferred statements, pipelined: their requests go first, in order.
    fn with_pending<T>(
        &self,
        main: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StorageError> {
        self.sent.set(true);
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        if pending.is_empty() {
            return Ok(self.rt.block_on(main)?);
        }
        // Prepared first (cached per connection), so that each request goes out whole when
        // first polled, in order.
        let lock = if pending.iter().any(|p| matches!(p, Pending::Lock(_))) {
            Some(self.rt.block_on(self.client.prepare_cached(LOCK))?)
        } else {
            None
        };
        let client = self.client;
        let sent: Vec<Sent<'_>> = pending
            .into_iter()
            .map(|p| -> Sent<'_> {
                match p {
                    Pending::Begin => Box::pin(client.batch_execute("BEGIN")),
                    Pending::Lock(name) => {
                        let lock = lock.clone();
                        Box::pin(async move {
                            let lock = lock.expect("prepared above");
                            client.execute(&lock, &[&name]).await.map(drop)
                        })
                    }
                    Pending::Write(statement, values) => Box::pin(async move {
                        let args: Vec<PgValue<'_>> = values.iter().map(PgValue).collect();
                        client.execute(&statement, &pg_refs(&args)).await.map(drop)
                    }),
                }
            })
            .collect();
        let (_, out) = self
            .rt
            .block_on(futures_util::future::try_join(futures_util::future::try_join_all(sent), main))?;
        Ok(out)
    }

    fn statement(&self, sql: &str) -> Result<tokio_postgres::Statement, StorageError> {
        Ok(self.rt.block_on(self.client.prepare_cached(&numbered_dollars(sql)))?)
    }

    pub(crate) fn exec(&self, sql: &str, params: Params<'_>) -> Result<usize, StorageError> {
        let statement = self.statement(sql)?;
        let values: Vec<SqlValue> = params.iter().map(|p| p.to_sql()).collect();
        let args: Vec<PgValue<'_>> = values.iter().map(PgValue).collect();
        let n = self.with_pending(self.client.execute(&statement, &pg_refs(&args)))?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Sends a write with the next statement (at the latest, `COMMIT`).
    pub(crate) fn write(&self, sql: &str, params: Params<'_>) -> Result<(), StorageError> {
        let statement = self.statement(sql)?;
        self.defer(Pending::Write(statement, params.iter().map(|p| p.to_sql()).collect()));
        Ok(())
    }

    pub(crate) fn rows(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, StorageError> {
        let statement = self.statement(sql)?;
        let values: Vec<SqlValue> = params.iter().map(|p| p.to_sql()).collect();
        let args: Vec<PgValue<'_>> = values.iter().map(PgValue).collect();
        let rows = self.with_pending(self.client.query(&statement, &pg_refs(&args)))?;
        rows.iter().map(pg_row).collect()
    }

    pub(crate) fn batch(&self, sql: &str) -> Result<(), StorageError> {
        self.with_pending(self.client.batch_execute(sql))
    }
}

fn pg_refs<'a>(args: &'a [PgValue<'_>]) -> Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)> {
    args.iter().map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync)).collect()
}

/// A parameter, sent as the type PostgreSQL inferred for its place.
#[derive(Debug)]
struct PgValue<'a>(&'a SqlValue);

impl tokio_postgres::types::ToSql for PgValue<'_> {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        let mismatch = |what: &str| -> Box<dyn std::error::Error + Sync + Send> {
            format!("{what} given for a parameter of type {ty}").into()
        };
        match self.0 {
            SqlValue::Null => Ok(IsNull::Yes),
            SqlValue::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i)?.to_sql(ty, out),
                Type::BOOL => (*i != 0).to_sql(ty, out),
                Type::FLOAT8 => (*i as f64).to_sql(ty, out),
                _ => Err(mismatch("an integer")),
            },
            SqlValue::Real(f) => match *ty {
                Type::FLOAT8 => f.to_sql(ty, out),
                Type::FLOAT4 => (*f as f32).to_sql(ty, out),
                _ => Err(mismatch("a real")),
            },
            SqlValue::Text(s) if <&str as tokio_postgres::types::ToSql>::accepts(ty) => {
                s.as_str().to_sql(ty, out)
            }
            SqlValue::Text(_) => Err(mismatch("text")),
            SqlValue::Blob(b) if *ty == Type::BYTEA => b.as_slice().to_sql(ty, out),
            SqlValue::Blob(_) => Err(mismatch("bytes")),
        }
    }

    fn accepts(_: &Type) -> bool {
        true
    }

    to_sql_checked!();
}

fn pg_row(row: &tokio_postgres::Row) -> Result<Row, StorageError> {
    let mut values = Vec::with_capacity(row.len());
    for (i, column) in row.columns().iter().enumerate() {
        let value = match *column.type_() {
            Type::INT8 => row.try_get::<_, Option<i64>>(i)?.map(SqlValue::Int),
            Type::INT4 => row.try_get::<_, Option<i32>>(i)?.map(|v| SqlValue::Int(v.into())),
            Type::INT2 => row.try_get::<_, Option<i16>>(i)?.map(|v| SqlValue::Int(v.into())),
            Type::BOOL => row.try_get::<_, Option<bool>>(i)?.map(|v| SqlValue::Int(v.into())),
            Type::FLOAT8 => row.try_get::<_, Option<f64>>(i)?.map(SqlValue::Real),
            Type::FLOAT4 => row.try_get::<_, Option<f32>>(i)?.map(|v| SqlValue::Real(v.into())),
            Type::BYTEA => row.try_get::<_, Option<Vec<u8>>>(i)?.map(SqlValue::Blob),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME => {
                row.try_get::<_, Option<String>>(i)?.map(SqlValue::Text)
            }
            ref other => {
                return Err(StorageError::Corrupt(format!(
                    "column {} is of type {other}, which storage does not read",
                    column.name()
                )));
            }
        };
        values.push(value.unwrap_or(SqlValue::Null));
    }
    Ok(Row(values))
}

/// `e` and what caused it (a TLS handshake that failed: because of which certificate).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        text.push_str(&format!(": {c}"));
        cause = c.source();
    }
    text
}

/// A connection could not be had from the pool (the server is down or restarting, or every
/// connection is busy past the wait timeout).
struct PoolError(deadpool_postgres::PoolError);

impl From<PoolError> for StorageError {
    fn from(e: PoolError) -> Self {
        match e.0 {
            // The server answered, and said no (a wrong password, no such database): its words.
            deadpool_postgres::PoolError::Backend(e) if e.as_db_error().is_some() => e.into(),
            e => {
                StorageError::Postgres { code: None, message: format!("no connection: {}", with_causes(&e)) }
            }
        }
    }
}

impl From<tokio_postgres::Error> for StorageError {
    fn from(e: tokio_postgres::Error) -> Self {
        let code = e.code().map(|c| c.code().to_owned());
        // The server's own message when there is one (never a parameter's value).
        let message = e.as_db_error().map_or_else(|| with_causes(&e), |d| d.message().to_owned());
        StorageError::Postgres { code, message }
    }
}
