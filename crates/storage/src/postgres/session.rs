//! A connection inside one transaction, driven statement by statement from a blocking thread.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use bytes::BytesMut;
use deadpool_postgres::ClientWrapper;
use tokio::runtime::{Handle, Runtime};
use tokio_postgres::Statement;
use tokio_postgres::types::{IsNull, Type, to_sql_checked};

use crate::StorageError;
use crate::sql::{Params, Row, SqlValue, numbered_dollars};

/// A connection inside one transaction, driven from a blocking thread.
///
/// Statements whose answer nothing waits for — `BEGIN`, an advisory lock — are not sent on
/// their own: they wait in `pending` and go with the next statement, pipelined on the
/// connection (one round trip for all; the server still runs them in order, so a statement
/// after a lock runs, and takes its snapshot, once the lock is held).
///
/// In a transaction that several closures share (see [`super::batch`]) a lock is only tried
/// (`pg_try_advisory_xact_lock`): a shared transaction never waits for a lock while it holds
/// others, so two workers' batches cannot wait on each other in a cycle. A lock held elsewhere
/// marks the closure [`Session::take_busy`]: it is undone and runs again in a transaction of
/// its own, where it waits.
pub(crate) struct Session<'c> {
    pub(super) link: Link<'c>,
    pending: RefCell<Vec<Pending>>,
    /// Whether any statement was sent.
    sent: Cell<bool>,
    /// Locks are tried, not waited for (a shared transaction).
    shared: Cell<bool>,
    /// A lock this closure needs is held by another transaction (or a lock wait timed out).
    busy: Cell<bool>,
    /// What the batch read ahead for its closures (see [`super::ahead`]).
    pub(super) ahead: RefCell<super::ahead::Ahead>,
    /// The closure running now (its place in the batch), and how many statements it issued.
    pub(super) closure: Cell<(usize, usize)>,
}

/// The connection a session runs on: one of the pool's (reads, migrations), or a batch
/// runner's own, driven on the runner's thread (see [`super::batch`]).
#[derive(Clone, Copy)]
pub(crate) enum Link<'c> {
    /// Its I/O task runs on the shared runtime, which `Handle::block_on` waits for.
    Pooled(&'c ClientWrapper, &'c Handle),
    /// Its I/O task runs on the runner's own runtime, driven while `Runtime::block_on` waits.
    Own(&'c OwnConnection, &'c Runtime),
}

impl Link<'_> {
    pub(super) fn client(&self) -> &tokio_postgres::Client {
        match self {
            Link::Pooled(c, _) => c,
            Link::Own(c, _) => &c.client,
        }
    }

    pub(super) fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        match self {
            Link::Pooled(_, handle) => handle.block_on(f),
            Link::Own(_, rt) => rt.block_on(f),
        }
    }

    /// `sql` prepared, once per connection.
    pub(super) async fn prepare_cached(&self, sql: &str) -> Result<Statement, tokio_postgres::Error> {
        match self {
            Link::Pooled(c, _) => c.prepare_cached(sql).await,
            Link::Own(c, _) => {
                if let Some(s) = c.statements.borrow().get(sql) {
                    return Ok(s.clone());
                }
                let s = c.client.prepare(sql).await?;
                c.statements.borrow_mut().insert(sql.to_owned(), s.clone());
                Ok(s)
            }
        }
    }
}

/// A connection of a batch runner's own, with the statements it prepared.
pub(crate) struct OwnConnection {
    pub(super) client: tokio_postgres::Client,
    statements: RefCell<HashMap<String, Statement>>,
}

impl OwnConnection {
    pub(super) fn new(client: tokio_postgres::Client) -> Self {
        Self { client, statements: RefCell::default() }
    }
}

/// A statement sent with the next one.
pub(crate) enum Pending {
    Begin,
    /// A statement without parameters or answer (`SAVEPOINT`, `SET LOCAL`).
    Plain(&'static str),
    /// `pg_advisory_xact_lock` of this name (tried, in a shared transaction).
    Lock(String),
    /// A write whose answer nothing reads ([`crate::Tx::write`]); its error, if any, is the
    /// next statement's (the transaction fails either way).
    Write(Statement, Vec<SqlValue>),
}

/// Takes a transaction-scoped advisory lock, waiting for it.
const LOCK: &str = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))";

/// Takes a transaction-scoped advisory lock if no other transaction holds it.
const TRY_LOCK: &str = "SELECT pg_try_advisory_xact_lock(hashtextextended($1, 0))";

/// SQLSTATEs that mean "another transaction holds what this one needs": `lock_not_available`
/// (a shared transaction's `lock_timeout`), `deadlock_detected`, `serialization_failure`.
const CONTENDED: [&str; 3] = ["55P03", "40P01", "40001"];

/// A deferred statement's request; `false` when it was a lock that another transaction holds.
type Sent<'a> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<bool, tokio_postgres::Error>> + Send + 'a>>;

impl<'c> Session<'c> {
    pub(super) fn new(link: Link<'c>) -> Self {
        Self {
            link,
            pending: RefCell::default(),
            sent: Cell::default(),
            shared: Cell::default(),
            busy: Cell::default(),
            ahead: RefCell::default(),
            closure: Cell::default(),
        }
    }

    /// The next closure of the batch runs from now on.
    pub(super) fn next_closure(&self) {
        let (i, _) = self.closure.get();
        self.closure.set((i + 1, 0));
    }

    /// Counts a statement of the running closure (a read-ahead probe serves only its first).
    fn count_statement(&self) {
        let (i, n) = self.closure.get();
        self.closure.set((i, n + 1));
    }

    /// Takes lock `name` with the next statement, unless the batch's read stage holds it.
    pub(crate) fn lock(&self, name: &str) {
        if !self.locked_ahead(name) {
            self.defer(Pending::Lock(name.to_owned()));
        }
    }

    /// Locks are tried from now on, not waited for (a transaction several closures share).
    pub(super) fn share(&self) {
        self.shared.set(true);
    }

    /// Whether the closure that just ran met a lock held elsewhere (and clears it).
    pub(super) fn take_busy(&self) -> bool {
        self.busy.replace(false)
    }

    /// Sends `p` with the next statement.
    pub(crate) fn defer(&self, p: Pending) {
        self.pending.borrow_mut().push(p);
    }

    /// Whether a lock waits to be taken with the next statement.
    pub(super) fn has_pending_lock(&self) -> bool {
        self.pending.borrow().iter().any(|p| matches!(p, Pending::Lock(_)))
    }

    /// Drops what is deferred (an undone closure's writes).
    pub(super) fn forget_pending(&self) {
        self.pending.borrow_mut().clear();
    }

    /// Sends what is deferred now (nothing else with it).
    pub(super) fn flush(&self) -> Result<(), StorageError> {
        self.with_pending(std::future::ready(Ok::<(), tokio_postgres::Error>(())))
    }

    /// Commits (with the writes still deferred) or rolls back (dropping them); when not one
    /// statement was sent and none is to be written, there is no transaction to end.
    pub(super) fn end(&self, commit: bool) -> Result<(), StorageError> {
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
    pub(super) fn with_pending<T>(
        &self,
        main: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<T, StorageError> {
        self.sent.set(true);
        let pending = std::mem::take(&mut *self.pending.borrow_mut());
        let ran = if pending.is_empty() {
            self.link.block_on(main).map(|out| (true, out))
        } else {
            self.pipelined(pending, main)
        };
        match ran {
            Ok((true, out)) => Ok(out),
            Ok((false, _)) => {
                self.busy.set(true);
                Err(StorageError::Postgres {
                    code: Some("55P03".into()),
                    message: "a lock this job needs is held by another transaction".into(),
                })
            }
            Err(e) => {
                if e.code().is_some_and(|c| CONTENDED.contains(&c.code())) {
                    self.busy.set(true);
                }
                Err(e.into())
            }
        }
    }

    /// `main` after `pending`, all sent before the first answer is read; with whether every
    /// lock among them was had.
    fn pipelined<T>(
        &self,
        pending: Vec<Pending>,
        main: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
    ) -> Result<(bool, T), tokio_postgres::Error> {
        // Prepared first (cached per connection), so that each request goes out whole when
        // first polled, in order.
        let lock = if pending.iter().any(|p| matches!(p, Pending::Lock(_))) {
            let sql = if self.shared.get() { TRY_LOCK } else { LOCK };
            Some(self.link.block_on(self.link.prepare_cached(sql))?)
        } else {
            None
        };
        let (client, tried) = (self.link.client(), self.shared.get());
        let sent: Vec<Sent<'_>> = pending
            .into_iter()
            .map(|p| -> Sent<'_> {
                match p {
                    Pending::Begin => {
                        Box::pin(async move { client.batch_execute("BEGIN").await.map(|()| true) })
                    }
                    Pending::Plain(sql) => {
                        Box::pin(async move { client.batch_execute(sql).await.map(|()| true) })
                    }
                    Pending::Lock(name) => {
                        let lock = lock.clone();
                        Box::pin(async move {
                            let lock = lock.expect("prepared above");
                            let row = client.query_one(&lock, &[&name]).await?;
                            Ok(!tried || row.try_get::<_, bool>(0)?)
                        })
                    }
                    Pending::Write(statement, values) => Box::pin(async move {
                        let args: Vec<PgValue<'_>> = values.iter().map(PgValue).collect();
                        client.execute(&statement, &pg_refs(&args)).await.map(|_| true)
                    }),
                }
            })
            .collect();
        let (had, out) = self
            .link
            .block_on(futures_util::future::try_join(futures_util::future::try_join_all(sent), main))?;
        Ok((had.into_iter().all(|h| h), out))
    }

    fn statement(&self, sql: &str) -> Result<Statement, StorageError> {
        Ok(self.link.block_on(self.link.prepare_cached(&numbered_dollars(sql)))?)
    }

    pub(crate) fn exec(&self, sql: &str, params: Params<'_>) -> Result<usize, StorageError> {
        self.count_statement();
        let statement = self.statement(sql)?;
        let values: Vec<SqlValue> = params.iter().map(|p| p.to_sql()).collect();
        let args: Vec<PgValue<'_>> = values.iter().map(PgValue).collect();
        let n = self.with_pending(self.link.client().execute(&statement, &pg_refs(&args)))?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    /// Sends a write with the next statement (at the latest, `COMMIT`).
    pub(crate) fn write(&self, sql: &str, params: Params<'_>) -> Result<(), StorageError> {
        self.count_statement();
        let statement = self.statement(sql)?;
        self.defer(Pending::Write(statement, params.iter().map(|p| p.to_sql()).collect()));
        Ok(())
    }

    pub(crate) fn rows(&self, sql: &str, params: Params<'_>) -> Result<Vec<Row>, StorageError> {
        self.count_statement();
        let statement = self.statement(sql)?;
        let values: Vec<SqlValue> = params.iter().map(|p| p.to_sql()).collect();
        let args: Vec<PgValue<'_>> = values.iter().map(PgValue).collect();
        let rows = self.with_pending(self.link.client().query(&statement, &pg_refs(&args)))?;
        rows.iter().map(pg_row).collect()
    }

    pub(crate) fn batch(&self, sql: &str) -> Result<(), StorageError> {
        self.count_statement();
        self.with_pending(self.link.client().batch_execute(sql))
    }
}

fn pg_refs<'a>(args: &'a [PgValue<'_>]) -> Vec<&'a (dyn tokio_postgres::types::ToSql + Sync)> {
    args.iter().map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync)).collect()
}

/// Why a parameter could not be sent as the type PostgreSQL inferred for its place, with the
/// SQLSTATE the server gives the same mistake: `42804` (datatype mismatch: a value of the
/// wrong kind) or `22003` (a number out of the column's range). Never the value.
#[derive(Debug)]
pub(super) struct ParamRefused {
    pub(super) code: &'static str,
    text: String,
}

impl std::fmt::Display for ParamRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

impl std::error::Error for ParamRefused {}

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
            Box::new(ParamRefused {
                code: "42804",
                text: format!("{what} given for a parameter of type {ty}"),
            })
        };
        let out_of_range =
            |_| ParamRefused { code: "22003", text: format!("an integer out of range for {ty}") };
        match self.0 {
            SqlValue::Null => Ok(IsNull::Yes),
            SqlValue::Int(i) => match *ty {
                Type::INT8 => i.to_sql(ty, out),
                Type::INT4 => i32::try_from(*i).map_err(out_of_range)?.to_sql(ty, out),
                Type::INT2 => i16::try_from(*i).map_err(out_of_range)?.to_sql(ty, out),
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

pub(super) fn pg_row(row: &tokio_postgres::Row) -> Result<Row, StorageError> {
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
