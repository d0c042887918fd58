//! Messages held in storage (delayed jobs come due, long jobs whose lease ran out) sent back
//! to their job queue through `gatehouse.requeue`, where they run like any job.

use gatehouse_broker::lapin::BasicProperties;
use gatehouse_protocol::{JobId, SealedJob, Vouched};

use super::Outbound;

impl Outbound {
    /// Sends a message held in storage back to its job queue, at its vouched priority (both
    /// checked again when it arrives). Answers `false` for one that cannot be sent (unreadable,
    /// or of a kind no longer in the catalog): it stays held, and an error is logged.
    ///
    /// # Errors
    /// When the broker does not confirm it.
    pub async fn send_back(&self, id: &JobId, envelope: &[u8]) -> anyhow::Result<bool> {
        let metadata = Vouched::parse(envelope)
            .map_err(anyhow::Error::from)
            .and_then(|v| Ok(serde_json::from_slice::<SealedJob>(v.message())?.metadata()));
        let env = match metadata {
            Ok(env) => env,
            Err(e) => {
                tracing::error!(job_id = %id, error = %e, "held job message unreadable; left held");
                return Ok(false);
            }
        };
        let Some(route) =
            self.catalog.kind(&env.kind).map(|k| self.catalog.route_in(k, env.priority.get(), env.shard))
        else {
            tracing::error!(job_id = %id, kind = %env.kind, "held job of a kind no longer in the catalog; left held");
            return Ok(false);
        };
        let props = BasicProperties::default().with_priority(env.priority.get());
        self.publisher.publish_persistent(&self.topology.requeue_exchange(), &route, envelope, props).await?;
        Ok(true)
    }
}
