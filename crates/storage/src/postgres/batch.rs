//! Group commit on PostgreSQL: closures that arrive together share one transaction — one
//! commit, one WAL flush, for a batch of jobs — on a writer thread that owns its connection.
//!
//! Two workers' batches must never wait on each other in a cycle (batch 1 holds sequence key A
//! and waits for B; batch 2 holds B and waits for A). So a shared transaction never waits for a
//! lock: advisory locks are tried (`pg_try_advisory_xact_lock`), and a row lock is waited for
//! at most `lock_timeout` (100 ms). A closure that meets a lock held elsewhere is undone and
//! runs again after the batch has committed, in a transaction of its own that waits for its
//! locks in the usual order (sequence key, job, singleton key) while holding none of another
//! job's. Closures are therefore `Fn`: one may run twice, and only its last run's writes are kept.
//!
//! Undoing one closure without the others takes a savepoint each, two statements more per job.
//! So a batch first runs without them; the first closure that fails or meets a held lock undoes
//! the whole transaction, runs alone afterwards, and the rest run again at once with a
//! savepoint each — as do the writer's batches for the next second, while contention or
//! failures last ([`Runner::shared`], [`Runner::careful`]).

use std::sync::Arc;
use std::time::Instant;

use gatehouse_protocol::crypto::Keyring;
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, oneshot};

use super::JobProbe;
use super::session::{Link, OwnConnection, Pending, Session};
use crate::{Observer, StorageError, Tx, panic_message};

/// Most closures in one shared transaction. Under 64 on purpose: each closure's savepoint that
/// writes is a subtransaction, and past 64 in one transaction PostgreSQL's per-backend cache of
/// subtransaction ids overflows, which slows every snapshot on the server (`pg_subtrans`
/// lookups).
const MAX_BATCH: usize = 32;

/// How long a writer puts each closure of its batches in a savepoint after a batch was undone.
const CAREFUL_FOR: std::time::Duration = std::time::Duration::from_secs(1);

/// A shared transaction's start, in one message: it waits for a row lock 100 ms at most before
/// the closure that needs it is undone and run alone.
const SHARED_BEGIN: &str = "BEGIN; SET LOCAL lock_timeout = '100ms'";

/// A closure waiting for its batch, and the way back to its caller.
pub(super) trait Shared: Send {
    /// Runs it (again, if it ran before); whether its writes are to be kept.
    fn run(&mut self, tx: &mut Tx<'_>) -> bool;
    /// Answers the caller: its last run's outcome, or `failed` (its transaction did not commit).
    fn answer(self: Box<Self>, failed: Option<&StorageError>);
    /// What it does first, to be read ahead (see [`super::ahead`]).
    fn probe(&self) -> Option<&JobProbe>;
}

/// A [`crate::Store::transact`] call.
pub(super) struct Call<R, E, F> {
    f: F,
    probe: Option<JobProbe>,
    outcome: Option<Result<R, E>>,
    done: oneshot::Sender<Result<R, E>>,
}

impl<R, E, F> Call<R, E, F> {
    pub(super) fn new(probe: Option<JobProbe>, f: F) -> (Self, oneshot::Receiver<Result<R, E>>) {
        let (done, answer) = oneshot::channel();
        (Self { f, probe, outcome: None, done }, answer)
    }
}

impl<R, E, F> Shared for Call<R, E, F>
where
    R: Send + 'static,
    E: From<StorageError> + Send + 'static,
    F: Fn(&mut Tx<'_>) -> Result<R, E> + Send + 'static,
{
    fn run(&mut self, tx: &mut Tx<'_>) -> bool {
        let f = &self.f;
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(tx)))
            .unwrap_or_else(|p| Err(StorageError::Panicked(panic_message(&*p)).into()));
        let ok = outcome.is_ok();
        self.outcome = Some(outcome);
        ok
    }

    fn answer(self: Box<Self>, failed: Option<&StorageError>) {
        let outcome = match (failed, self.outcome) {
            (Some(e), None | Some(Ok(_))) => Err(e.at_commit().into()),
            (_, Some(outcome)) => outcome,
            (None, None) => Err(StorageError::Closed.into()),
        };
        let _ = self.done.send(outcome);
    }

    fn probe(&self) -> Option<&JobProbe> {
        self.probe.as_ref()
    }
}

/// Where closures wait for a batch; runners take them.
#[derive(Clone)]
pub(super) struct Batcher {
    queue: mpsc::Sender<Box<dyn Shared>>,
}

/// Opens a batch runner's own connection.
#[derive(Clone)]
pub(super) struct Connector {
    pub(super) config: tokio_postgres::Config,
    pub(super) tls: Option<rustls::ClientConfig>,
}

impl Connector {
    /// A new connection, its I/O task spawned on the current (the runner's) runtime.
    async fn connect(&self) -> Result<OwnConnection, StorageError> {
        let client = match &self.tls {
            Some(tls) => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(tls.clone());
                let (client, connection) = self.config.connect(tls).await?;
                tokio::spawn(connection);
                client
            }
            None => {
                let (client, connection) = self.config.connect(tokio_postgres::NoTls).await?;
                tokio::spawn(connection);
                client
            }
        };
        Ok(OwnConnection::new(client))
    }
}

impl Batcher {
    /// Starts `runners` runner threads, each taking every closure waiting (up to
    /// [`MAX_BATCH`]) into one transaction on a connection of its own. They stop when the last
    /// `Batcher` is dropped.
    pub(super) fn start(
        connector: &Connector,
        keyring: &Arc<Keyring>,
        observer: &Observer,
        runners: usize,
    ) -> Result<Self, StorageError> {
        let (queue, rx) = mpsc::channel::<Box<dyn Shared>>(1024);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..runners.max(1) {
            let runner = Runner {
                connector: connector.clone(),
                keyring: keyring.clone(),
                observer: observer.clone(),
                connection: None,
                careful_until: std::cell::Cell::new(None),
            };
            let rx = rx.clone();
            std::thread::Builder::new()
                .name(format!("gatehouse-pg-batch-{i}"))
                .spawn(move || runner.serve(&rx))
                .map_err(|e| StorageError::Corrupt(format!("cannot start a storage thread: {e}")))?;
        }
        Ok(Self { queue })
    }

    /// Queues `call` for the next batch.
    pub(super) async fn send(&self, call: Box<dyn Shared>) -> Result<(), StorageError> {
        self.queue.send(call).await.map_err(|_| StorageError::Closed)
    }
}

/// A thread with a runtime and a connection of its own: each statement of a batch is written,
/// and its answer read, on this thread (no hand-off to another thread and back per round
/// trip, as a pooled connection's I/O task on the shared runtime would need).
struct Runner {
    connector: Connector,
    keyring: Arc<Keyring>,
    observer: Observer,
    connection: Option<OwnConnection>,
    /// Until when batches take a savepoint per closure (see [`Runner::shared`]).
    careful_until: std::cell::Cell<Option<Instant>>,
}

type Queue = std::sync::Mutex<mpsc::Receiver<Box<dyn Shared>>>;

impl Runner {
    fn serve(mut self, rx: &Queue) {
        let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
            return;
        };
        loop {
            let batch = {
                let Ok(mut rx) = rx.lock() else { return };
                let Some(first) = rx.blocking_recv() else { return };
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(call) => batch.push(call),
                        Err(_) => break,
                    }
                }
                batch
            };
            if self.connection.as_ref().is_none_or(|c| c.client.is_closed()) {
                match rt.block_on(self.connector.connect()) {
                    Ok(c) => self.connection = Some(c),
                    Err(e) => {
                        self.connection = None;
                        batch.into_iter().for_each(|call| call.answer(Some(&e)));
                        continue;
                    }
                }
            }
            let Some(connection) = &self.connection else { continue };
            // A panic outside the closures (theirs are caught) drops the batch's calls, whose
            // callers hear `Closed`; the runner goes on.
            let ran =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run(connection, &rt, batch)));
            if !matches!(ran, Ok(true)) {
                // Not known to be clean: not used again.
                self.connection = None;
            }
        }
    }

    /// One batch: the shared transaction, then each closure that met a lock held elsewhere in
    /// a transaction of its own. A batch of one is run alone at once. Whether the connection
    /// is still clean.
    fn run(&self, connection: &OwnConnection, rt: &Runtime, batch: Vec<Box<dyn Shared>>) -> bool {
        let alone = if batch.len() == 1 { Some(batch) } else { self.shared(connection, rt, batch) };
        let Some(alone) = alone else { return false };
        let mut calls = alone.into_iter();
        while let Some(mut call) = calls.next() {
            let started = Instant::now();
            let session = Session::new(Link::Own(connection, rt));
            session.defer(Pending::Begin);
            let ok = call.run(&mut Tx::postgres(&session, &self.keyring));
            match session.end(ok) {
                Ok(()) => {
                    if ok && let Some(o) = self.observer.get() {
                        o.committed(started.elapsed(), 1);
                    }
                    call.answer(None);
                }
                // Its writes sent with COMMIT were refused: its own failure; the connection is
                // idle, the next goes on.
                Err(e) if refused_in_transaction(&e) => call.answer(Some(&e)),
                Err(e) => {
                    call.answer(Some(&e));
                    calls.for_each(|c| c.answer(Some(&e)));
                    return false;
                }
            }
        }
        true
    }

    /// Runs `batch` in one transaction without savepoints — two statements and a round trip
    /// fewer per job — unless a batch of this writer was undone in the last [`CAREFUL_FOR`].
    /// The first closure that fails, or meets a lock held elsewhere, undoes the whole
    /// transaction: it runs alone afterwards, the others again at once with a savepoint each
    /// ([`Runner::careful`]), and so do this writer's batches for a while. Answers those it
    /// kept and hands back those to run alone; `None` when the transaction failed (every call
    /// is then answered with its failure, and the connection is not to be reused).
    fn shared(
        &self,
        connection: &OwnConnection,
        rt: &Runtime,
        batch: Vec<Box<dyn Shared>>,
    ) -> Option<Vec<Box<dyn Shared>>> {
        if self.careful_until.get().is_some_and(|until| Instant::now() < until) {
            return self.careful(connection, rt, batch);
        }
        let started = Instant::now();
        let session = Session::new(Link::Own(connection, rt));
        session.share();
        session.defer(Pending::Plain(SHARED_BEGIN));
        let (mut batch, mut alone) = match read_ahead(&session, batch) {
            Ok(split) => split,
            Err((e, batch)) => return fail(&session, &e, batch),
        };
        let mut failed = None;
        for (i, call) in batch.iter_mut().enumerate() {
            session.next_closure();
            session.take_busy();
            let ok = call.run(&mut Tx::postgres(&session, &self.keyring));
            if !ok || session.take_busy() {
                failed = Some(i);
                break;
            }
        }
        // The last writes go with COMMIT (one round trip fewer), unless a lock is to be tried
        // with them: a lock not had fails no statement, and COMMIT would keep writes made
        // without it. So those go first, and an error in them is the last closure's.
        if failed.is_none() && !batch.is_empty() && session.has_pending_lock() && session.flush().is_err() {
            failed = Some(batch.len() - 1);
        }
        if let Some(i) = failed {
            session.forget_pending();
            if let Err(e) = session.end(false) {
                batch.into_iter().chain(alone).for_each(|call| call.answer(Some(&e)));
                return None;
            }
            self.careful_until.set(Some(Instant::now() + CAREFUL_FOR));
            let suspect = batch.remove(i);
            batch.append(&mut alone);
            let mut alone = if batch.is_empty() { Vec::new() } else { self.careful(connection, rt, batch)? };
            alone.push(suspect);
            return Some(alone);
        }
        match session.end(true) {
            Ok(()) => {
                if let Some(o) = self.observer.get() {
                    o.committed(started.elapsed(), batch.len());
                }
                batch.into_iter().for_each(|call| call.answer(None));
                Some(alone)
            }
            // The server refused a write that went with COMMIT (or the commit): the transaction
            // is rolled back and the connection idle. Whose write it was shows when the batch
            // runs again with a savepoint each (each closure's writes are sent on their own).
            Err(e) if refused_in_transaction(&e) => {
                self.careful_until.set(Some(Instant::now() + CAREFUL_FOR));
                batch.append(&mut alone);
                self.careful(connection, rt, batch)
            }
            Err(e) => fail(&session, &e, batch.into_iter().chain(alone).collect()),
        }
    }

    /// Runs `batch` in one transaction, each closure in a savepoint of its own; answers those it
    /// kept or that failed on their own, and hands back those to run alone. `None` when the
    /// transaction failed (every call is then answered with its failure, and the connection is
    /// not to be reused).
    fn careful(
        &self,
        connection: &OwnConnection,
        rt: &Runtime,
        batch: Vec<Box<dyn Shared>>,
    ) -> Option<Vec<Box<dyn Shared>>> {
        let started = Instant::now();
        let session = Session::new(Link::Own(connection, rt));
        session.share();
        session.defer(Pending::Plain(SHARED_BEGIN));
        let (batch, mut alone) = match read_ahead(&session, batch) {
            Ok(split) => split,
            Err((e, batch)) => return fail(&session, &e, batch),
        };
        let mut done = Vec::with_capacity(batch.len());
        let mut calls = batch.into_iter();
        let mut broken = None;
        for mut call in calls.by_ref() {
            session.next_closure();
            session.take_busy();
            session.defer(Pending::Plain("SAVEPOINT job"));
            let ok = call.run(&mut Tx::postgres(&session, &self.keyring));
            let kept = ok && !session.take_busy() && session.batch("RELEASE SAVEPOINT job").is_ok();
            if !kept {
                // Undone: contended (run it alone), or failed on its own (answer its error).
                let contended = ok || session.take_busy();
                session.forget_pending();
                if let Err(e) = session.batch("ROLLBACK TO SAVEPOINT job; RELEASE SAVEPOINT job") {
                    broken = Some(e);
                    alone.push(call);
                    break;
                }
                if contended {
                    alone.push(call);
                    continue;
                }
            }
            done.push(call);
        }
        let ended = match broken {
            Some(e) => Err(e),
            None => session.end(true),
        };
        match ended {
            Ok(()) => {
                if let Some(o) = self.observer.get() {
                    o.committed(started.elapsed(), done.len());
                }
                done.into_iter().for_each(|call| call.answer(None));
                Some(alone)
            }
            Err(e) => fail(&session, &e, done.into_iter().chain(alone).chain(calls).collect()),
        }
    }
}

/// The batch's read stage (see [`super::ahead`]): the calls to run in the shared transaction,
/// and those whose job another transaction has locked, to run alone after it. On a failure,
/// the calls back with it.
#[allow(clippy::type_complexity)]
fn read_ahead(
    session: &Session<'_>,
    batch: Vec<Box<dyn Shared>>,
) -> Result<(Vec<Box<dyn Shared>>, Vec<Box<dyn Shared>>), (StorageError, Vec<Box<dyn Shared>>)> {
    let probes: Vec<(usize, &JobProbe)> =
        batch.iter().enumerate().filter_map(|(i, call)| call.probe().map(|p| (i, p))).collect();
    let busy = match session.read_ahead(&probes.iter().map(|(_, p)| *p).collect::<Vec<_>>()) {
        Ok(busy) => busy.into_iter().map(|j| probes[j].0).collect::<std::collections::HashSet<_>>(),
        Err(e) => return Err((e, batch)),
    };
    let (mut shared, mut alone) = (Vec::with_capacity(batch.len()), Vec::new());
    for (i, call) in batch.into_iter().enumerate() {
        if busy.contains(&i) { alone.push(call) } else { shared.push(call) }
    }
    Ok((shared, alone))
}

/// Whether the server answered `e` about this transaction's statements (a constraint, bad
/// data), rather than about storage as a whole (full, read-only, unreachable: see
/// [`StorageError::refusal`]).
fn refused_in_transaction(e: &StorageError) -> bool {
    matches!(e, StorageError::Postgres { code: Some(_), .. }) && e.refusal().is_none()
}

/// Rolls the shared transaction back and answers every call with `e`; `None`: the connection
/// is not to be reused.
fn fail(
    session: &Session<'_>,
    e: &StorageError,
    calls: Vec<Box<dyn Shared>>,
) -> Option<Vec<Box<dyn Shared>>> {
    let _ = session.end(false);
    calls.into_iter().for_each(|call| call.answer(Some(e)));
    None
}
