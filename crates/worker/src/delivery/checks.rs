//! What the broker says about a delivery, checked against what the gatekeeper vouched for.

use gatehouse_broker::lapin::message::Delivery;
use gatehouse_broker::lapin::types::AMQPValue;
use gatehouse_broker::topology::headers;
use gatehouse_protocol::JobEnvelope;
use gatehouse_protocol::replay::Grant;

use super::Shared;
use crate::reasons::DeadReason;

/// It came from its kind's queue (its lane or a lower one), at its vouched priority (a copy re-published at priority 9
/// or into another class's queue would otherwise run early); and a replay marker carries an
/// operator's grant for exactly this body and job. Answers the grant (the dead letter it is
/// for).
///
/// # Errors
/// The reason to dead-letter it with (`misrouted`, `replay_refused`).
pub fn check_delivery(
    shared: &Shared,
    route: &str,
    delivery: &Delivery,
    data: &[u8],
    env: &JobEnvelope,
) -> Result<Option<Grant>, DeadReason> {
    // Its class's queue, or for quorum lanes the lane of its priority or a lower one.
    let catalog = &shared.catalog;
    let queue_ok = catalog.kind(&env.kind).is_none_or(|k| catalog.admits(k, env.priority.get(), route));
    let priority = delivery.properties.priority().unwrap_or(0);
    if !queue_ok || priority != env.priority.get() {
        tracing::warn!(job_id = %env.id, queue = route, priority, vouched = env.priority.get(), "delivery metadata differs from the vouched job");
        return Err(DeadReason::Misrouted);
    }
    let grant = delivery.properties.headers().as_ref().and_then(|h| h.inner().get(headers::REPLAY).cloned());
    let Some(grant) = grant else { return Ok(None) };
    let grant = match grant {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        _ => String::new(),
    };
    match shared.keys.check_replay(&grant, env.id.as_str(), data) {
        Ok(grant) => Ok(Some(grant)),
        Err(e) => {
            tracing::warn!(job_id = %env.id, error = %e, "replay without a valid operator grant");
            Err(DeadReason::ReplayRefused)
        }
    }
}
