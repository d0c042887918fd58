//! Long jobs and the broker's delivery timeout. RabbitMQ closes the channel of a consumer that
//! holds a delivery longer than its `consumer_timeout` (30 minutes by default) and redelivers
//! everything that channel held: a job running longer would run twice, and its neighbours'
//! deliveries would come back too. So a job still running after `hand_off_after_ms` is handed
//! off: its message is kept in storage under a lease (table `leases`), then its delivery is
//! acked. While the job runs, the worker renews the lease; when the attempt ends, its lease
//! ends too, once what replaces the delivery (the outcome, a retry, a dead letter) is durable.
//! A worker that dies stops renewing: when the lease runs out, the `leases` sweeper sends the
//! held message back to its queue (as for delayed jobs), and the next attempt starts from the
//! job's last checkpoint (`JobContext::checkpoint`).
//!
//! A worker that is alive but cannot reach storage cannot renew: a quarter of `lease_ms` before
//! its lease would run out it stops the job's handler (an executable's whole process tree goes),
//! so that no other worker runs the job while it still does; and the outcome of a handed-off
//! attempt is recorded only while its own lease holds (a token per attempt), never after the
//! job was sent back for another attempt.
//!
//! Short jobs never touch this: no extra write unless a job outlives `hand_off_after_ms`.

use gatehouse_protocol::JobId;
use gatehouse_protocol::clock::now_ms;

use super::Ctx;
use super::settle::{self, Settle};

/// Why [`hold`] returned: the attempt's lease could not be renewed before it would run out, so
/// another attempt may soon run the job. The caller stops the handler at once.
#[derive(Debug)]
pub struct LeaseLost;

/// One attempt's hold on a handed-off job: a token of its own in the lease (so that another
/// attempt's lease is never taken for it), and whether the hand-off happened.
pub struct Holder {
    pub token: String,
    handed_off: std::sync::atomic::AtomicBool,
}

impl Holder {
    pub fn new() -> Self {
        let mut raw = [0u8; 12];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut raw);
        Self { token: gatehouse_protocol::hex::encode(&raw), handed_off: false.into() }
    }

    /// The token to fence the attempt's outcome with: only once it was handed off.
    pub fn fence(&self) -> Option<&str> {
        self.handed_off.load(std::sync::atomic::Ordering::SeqCst).then_some(self.token.as_str())
    }
}

impl Default for Holder {
    fn default() -> Self {
        Self::new()
    }
}

/// Waits `hand_off_after`, hands the job's delivery (`tag`) off, then renews its lease every
/// quarter of `lease`. Returns only when the lease is lost: a renewal that did not succeed by a
/// quarter of `lease` before the lease would run out (storage unreachable: each renewal is
/// bounded by that time), or the lease is another attempt's. Dropped when the attempt ends.
///
/// With `leased`, the attempt already holds its lease (a singleton job's, taken with its turn):
/// the delivery is handed off at once.
pub async fn hold(
    ctx: &Ctx,
    tag: u64,
    id: &JobId,
    message: &[u8],
    holder: &Holder,
    leased: bool,
) -> LeaseLost {
    use tokio::time::{Instant, timeout};
    let (store, settings) = (&ctx.shared.store, ctx.shared.leases);
    let (lease, quarter) = (settings.lease, settings.lease / 4);
    if !leased {
        tokio::time::sleep(settings.hand_off_after).await;
        // The hand-off. Before it the delivery holds the job: trying again is safe.
        loop {
            let expires = now_ms().saturating_add(lease.as_millis() as i64);
            let (job, held, token) = (id.clone(), message.to_vec(), holder.token.clone());
            match timeout(quarter, store.transact(move |tx| tx.lease(&job, &held, expires, &token))).await {
                Ok(Ok(true)) => break,
                Ok(Ok(false)) => tracing::warn!("a long job's lease is another attempt's; trying again"),
                Ok(Err(e)) => tracing::warn!(error = %e, "could not hand a long job off; trying again"),
                Err(_) => tracing::warn!("could not hand a long job off in time; trying again"),
            }
            tokio::time::sleep(quarter).await;
        }
    }
    let mut runs_out = Instant::now() + lease;
    holder.handed_off.store(true, std::sync::atomic::Ordering::SeqCst);
    settle::hand_off(ctx, tag, id, &holder.token);
    tracing::info!("long job: its delivery is acked, its message held in storage while it runs");
    loop {
        tokio::time::sleep(quarter).await;
        let give_up = runs_out.checked_sub(quarter).unwrap_or_else(Instant::now);
        let asked = Instant::now();
        if asked >= give_up {
            return LeaseLost;
        }
        let expires = now_ms().saturating_add(lease.as_millis() as i64);
        let (job, token) = (id.clone(), holder.token.clone());
        match timeout(give_up - asked, store.transact(move |tx| tx.renew_lease(&job, expires, &token))).await
        {
            Ok(Ok(true)) => runs_out = asked + lease,
            Ok(Ok(false)) => return LeaseLost,
            Ok(Err(e)) => tracing::warn!(error = %e, "could not renew a long job's lease; trying again"),
            Err(_) => return LeaseLost,
        }
    }
}

/// The attempt of a handed-off job ended: with an ack (its outcome, retry or dead letter is
/// durable), its lease ends; with a requeue, the lease is left to run out, and the sweeper
/// sends the message back.
pub async fn ended(ctx: &Ctx, id: JobId, holder: String, how: Settle) {
    if let Settle::Ack = how
        && let Err(e) = ctx.shared.store.transact(move |tx| tx.end_lease(&id, &holder)).await
    {
        // Harmless: when the lease runs out its message comes back, and the job id dedupes it.
        tracing::warn!(error = %e, "could not end a long job's lease");
    }
}
