//! The periodic maintainers. Each is a small [`Sweep`] — its name, how long to wait before the
//! next pass, and one pass ([`Sweep::run_once`]) — run by the one loop [`run`], which stops
//! when the worker (or, for those that send on a broker connection, the session) stops.
//!
//! | sweeper | what one pass does | lives |
//! |---|---|---|
//! | [`held::Held`] | sends delayed jobs that came due, and long jobs whose lease ran out, back to their queue | per session |
//! | [`gaps::Gaps`] | dead-letters parked jobs past their gap timeout | per session |
//! | [`retention::Pruning`] | deletes decided jobs' records past their retention | worker |
//! | [`schedules::Planning`] | fires the schedules that came due | worker |
//!
//! Several workers sweep one storage: a pass *claims* what it sends for [`CLAIM_MS`], so only
//! the worker that claimed a message sends it, and one that dies before it is done leaves it
//! to be claimed again.

pub mod gaps;
pub mod held;
pub mod retention;
pub mod schedules;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::admin::health::StorageHealth;

/// How long a sweep's claim on a held message lasts.
pub const CLAIM_MS: i64 = 30_000;

/// A periodic maintainer.
pub trait Sweep: Send {
    /// For the log.
    fn name(&self) -> &'static str;

    /// How long to wait before the next pass.
    fn pause(&self) -> Duration;

    /// Waits until the next pass is due: [`Sweep::pause`], unless the sweep can be woken
    /// earlier.
    fn until_next(&self) -> impl Future<Output = ()> + Send {
        tokio::time::sleep(self.pause())
    }

    /// One pass. An error is logged and the next pass tries again.
    fn run_once(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// Runs `sweep` pass after pass until `stop` turns true (a pass under way is dropped then).
/// While storage refuses writes no pass runs (each would fail the same way).
pub async fn run(mut sweep: impl Sweep, health: Arc<StorageHealth>, mut stop: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = sweep.until_next() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if health.refusing().is_some() {
            continue;
        }
        tokio::select! {
            ran = sweep.run_once() => if let Err(e) = ran && !health.saw_any(&e) {
                tracing::warn!(sweep = sweep.name(), error = %format!("{e:#}"), "sweep failed; trying again");
            },
            _ = stop.wait_for(|s| *s) => return,
        }
    }
}
