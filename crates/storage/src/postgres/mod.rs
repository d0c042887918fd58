//! PostgreSQL storage, for deployments: several workers on one database server.
//!
//! [`crate::Store::transact`] closures that arrive together share one PostgreSQL transaction,
//! each in its own savepoint, on one of a few writer connections, each driven by a thread of
//! its own (see [`batch`]); no connection is held while a job waits for the broker.
//! [`crate::Store::read`] runs on a pooled connection (tokio-postgres through
//! deadpool-postgres) from a blocking thread. Closures are synchronous (handlers' SQL is): a
//! [`session`] drives the async client statement by statement.
//!
//! Concurrency: transactions are `READ COMMITTED`; what must happen once across workers is
//! serialized by transaction-scoped advisory locks that the job machinery takes
//! ([`crate::Tx::lock`]: the job's id, its sequence key, a singleton key), and by the
//! constraints (a job id, a sequence number, an attempt row are each one row). A shared
//! transaction only tries its locks, so batches never wait on each other in a cycle.

mod ahead;
mod batch;
mod schema;
mod session;

pub use ahead::JobProbe;
use session::Link;
use session::Pending;
pub(crate) use session::Session;

use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use gatehouse_protocol::crypto::Keyring;
use tokio::runtime::Handle;

use crate::{Family, Observer, StorageError, Tx, panic_message};
use batch::{Batcher, Call, Connector};
use schema::{SCHEMA, SEAL_ERRORS_AFTER};

/// Where and how to reach the database.
#[derive(Clone)]
pub struct PostgresConfig {
    /// `postgres://user@host:port/db`, without a password.
    pub url: String,
    pub password: Option<String>,
    /// Most pooled connections this process opens (for [`crate::Store::read`]).
    pub pool_size: usize,
    /// Connections that run batches of [`crate::Store::transact`] closures, each its own
    /// (see [`batch`]).
    pub writers: usize,
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
            .field("writers", &self.writers)
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
    batches: Batcher,
}

/// How many batches run at once by default, each on a connection of its own. A batch costs about
/// two round trips whatever its size (see [`ahead`]), so fewer, larger batches cost less per
/// job, until one alone waits for the server. Measured on two cores beside a local server
/// (`vault.put`, one worker, runs alternated): 2 writers drain 7,900–8,362 /s, sync 0.46–0.48
/// of raw RPC; 3 writers 6,379–7,218 /s, 0.44–0.47.
pub const DEFAULT_WRITERS: usize = 2;

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
        let connector = Connector { config: pg.clone(), tls: tls.clone() };
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
        let (keyring, observer) = (Arc::new(keyring), Observer::default());
        let batches = Batcher::start(&connector, &keyring, &observer, config.writers)?;
        let store = Self { pool, keyring, observer, batches };
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

    /// Runs `f` in the next batch's transaction (see [`batch`]); answers once it committed.
    /// `probe`: what `f` does first, read ahead with the batch's other closures' (see [`ahead`]).
    pub(crate) async fn transact<R, E, F>(&self, probe: Option<JobProbe>, f: F) -> Result<R, E>
    where
        R: Send + 'static,
        E: From<StorageError> + Send + 'static,
        F: Fn(&mut Tx<'_>) -> Result<R, E> + Send + 'static,
    {
        let (call, answer) = Call::new(probe, f);
        self.batches.send(Box::new(call)).await?;
        answer.await.map_err(|_| StorageError::Closed)?
    }

    /// Runs `f` in a transaction of its own on a pooled connection; commits when it returns
    /// `Ok` (reads, and the migrations at start).
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
                let session = Session::new(Link::Pooled(&client, &rt));
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
                    Ok(_) => Err(e.at_commit().into()),
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
        // A parameter refused before it was sent is told as the server tells the same mistake
        // (not as a lost connection, which would pause the worker).
        let refused = std::iter::successors(std::error::Error::source(&e), |c| c.source())
            .find_map(|c| c.downcast_ref::<session::ParamRefused>());
        let code = e.code().map(|c| c.code().to_owned()).or_else(|| refused.map(|r| r.code.to_owned()));
        // The server's own message when there is one, never a parameter's value: a data
        // exception's message may quote the value (`invalid input syntax for type …: "…"`).
        let message = match e.as_db_error() {
            Some(_) if code.as_deref().is_some_and(|c| c.starts_with("22")) => {
                "a value was refused".to_owned()
            }
            Some(d) => d.message().to_owned(),
            None => with_causes(&e),
        };
        StorageError::Postgres { code, message }
    }
}
