//! Dead letters: the original message to `gatehouse.dead` (confirmed) with reason headers,
//! counted, then the job recorded `dead_lettered` and its caller answered. The one way a
//! message is dead-lettered, whether a delivery ends there or a sweeper sends a parked job.

use gatehouse_broker::Topology;
use gatehouse_broker::lapin::BasicProperties;
use gatehouse_broker::lapin::types::{AMQPValue, LongString};
use gatehouse_broker::topology::headers;
use gatehouse_protocol::clock::now_ms;
use gatehouse_protocol::{JobEnvelope, JobId, Vouched};
use gatehouse_storage::StorageError;

use super::{Outbound, without_replay};
use crate::admin::activity::{Event, EventKind};
use crate::decide::{self, Dead};
use crate::handlers::error_class;
use crate::security::ReplyTarget;

/// A message to dead-letter.
pub struct Letter<'a> {
    /// The body as it arrived (sealed and vouched for, or whatever could not be opened).
    pub data: &'a [u8],
    /// Its properties as it arrived (a held message has none of its own).
    pub props: BasicProperties,
    /// The route (queue class or lane) it came from.
    pub route: &'a str,
    /// The verified job and where its answer goes: its dead letter is counted and named, and
    /// it is recorded `dead_lettered` and answered. None for a message only sent on (one that
    /// could not be opened, a refused replay: [`Dead::record`] false).
    pub job: Option<(&'a JobEnvelope, &'a ReplyTarget)>,
    /// A parked job's key and number: it is recorded only if still parked when its dead letter
    /// is confirmed (its predecessor may have arrived meanwhile and applied it).
    pub parked: Option<(&'a str, u64)>,
}

/// Why a dead letter did not go out: the message stays where it was (the caller requeues
/// the delivery, or the sweeper claims the parked job again later).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct NotSent(String);

impl Outbound {
    /// Publishes `letter` to `gatehouse.dead` with `dead`'s headers (confirmed), then records
    /// and answers its job, if it names one. The delivery it replaces may be acked once this returns
    /// `Ok`.
    ///
    /// # Errors
    /// When the dead letter could not be counted or confirmed.
    pub async fn dead_letter(&self, letter: Letter<'_>, dead: Dead) -> Result<(), NotSent> {
        let id = letter.job.map(|(e, _)| e.id.to_string()).or_else(|| claimed_id(letter.data));
        let mut props = without_replay(&letter.props);
        if let Some(id) = id.as_deref().filter(|_| props.message_id().is_none()) {
            props = props.with_message_id(id.into());
        }
        let mut props = dead_properties(props, &self.topology, letter.route, &dead);
        if let Some((env, _)) = letter.job {
            props = self
                .with_dead_count(props, &env.id)
                .await
                .map_err(|e| NotSent(format!("could not count the dead letter: {e}")))?;
        }
        self.publisher
            .publish_persistent(&self.topology.dead_exchange(), "", letter.data, props)
            .await
            .map_err(|e| NotSent(format!("could not dead-letter: {e}")))?;
        self.metrics.dead_lettered(Event {
            at_ms: now_ms().unsigned_abs(),
            event: EventKind::DeadLettered,
            job_id: id,
            kind: letter.job.map(|(e, _)| e.kind.clone()),
            queue: Some(letter.route.to_owned()),
            reason: Some(dead.reason),
            attempts: Some(dead.attempts),
        });
        tracing::warn!(
            reason = %dead.reason,
            attempts = dead.attempts,
            error = dead.error.as_deref().map(error_class),
            "dead-lettered"
        );
        if let Some((env, target)) = letter.job {
            self.record_dead(env, target, letter.parked, dead).await;
        }
        Ok(())
    }

    /// Records a dead-lettered job and answers its caller.
    async fn record_dead(
        &self,
        env: &JobEnvelope,
        target: &ReplyTarget,
        parked: Option<(&str, u64)>,
        dead: Dead,
    ) {
        let (job, parked) = (env.clone(), parked.map(|(k, n)| (k.to_owned(), n)));
        let recorded = self
            .store
            .transact(move |tx| {
                if let Some((key, number)) = &parked {
                    tx.lock_sequence(key)?;
                    if tx.take_parked(key, *number)?.is_none() {
                        return Ok(None);
                    }
                }
                decide::record_dead(tx, &job, dead.reason, dead.error.clone()).map(Some)
            })
            .await;
        match recorded {
            Ok(Some(status)) => self.reply(target, &status).await,
            // Applied meanwhile: the dead letter just sent is stale, and a replay of it is
            // answered from the stored outcome.
            Ok(None) => {
                tracing::warn!(job_id = %env.id, "applied while being dead-lettered; its dead letter is stale")
            }
            Err(e) => tracing::warn!(error = %e, "could not record the dead letter"),
        }
    }

    /// A verified job's dead letter: its id and which of its dead letters this is, for a
    /// replay grant to name. Counted before the dead letter is published: one that is then not
    /// published only moves the count on.
    async fn with_dead_count(
        &self,
        props: BasicProperties,
        id: &JobId,
    ) -> Result<BasicProperties, StorageError> {
        let jid = id.clone();
        let count = self.store.transact(move |tx| tx.count_dead_letter(&jid)).await?;
        let mut h = props.headers().clone().unwrap_or_default();
        h.insert(headers::JOB_ID.into(), AMQPValue::LongString(LongString::from(id.as_str())));
        h.insert(headers::DEAD_COUNT.into(), AMQPValue::LongUInt(count));
        Ok(props.with_headers(h))
    }
}

/// The job id a message that could not be opened claims in its body, unverified: a label that
/// lets an operator find its dead letter (a replay is verified like any delivery). Only a
/// well-formed id: anything else could not even travel as a property.
fn claimed_id(data: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Claimed {
        id: JobId,
    }
    let vouched = Vouched::parse(data).ok()?;
    serde_json::from_slice::<Claimed>(vouched.message()).ok().map(|c| c.id.to_string())
}

/// Properties of a dead letter: the original ones plus the reason headers.
pub fn dead_properties(
    props: BasicProperties,
    topology: &Topology,
    route: &str,
    dead: &Dead,
) -> BasicProperties {
    let mut h = props.headers().clone().unwrap_or_default();
    let s = |v: &str| AMQPValue::LongString(LongString::from(v));
    h.insert(headers::REASON.into(), s(dead.reason.as_str()));
    h.insert(headers::ATTEMPTS.into(), AMQPValue::LongUInt(dead.attempts));
    // Its class only: the text can quote the payload, and the broker is not trusted with it.
    h.insert(headers::LAST_ERROR.into(), s(dead.error.as_deref().map_or("", error_class)));
    h.insert(headers::ORIGINAL_QUEUE.into(), s(&topology.job_queue(route)));
    h.insert(headers::QUEUE_CLASS.into(), s(route));
    h.insert(headers::DEAD_AT.into(), AMQPValue::LongLongInt(now_ms()));
    props.with_headers(h)
}

#[cfg(test)]
mod tests {
    use super::claimed_id;

    fn vouched(message: &str) -> Vec<u8> {
        format!(r#"{{"v":1,"key_id":"k","session":"s","mac":"m","message":{message}}}"#).into_bytes()
    }

    #[test]
    fn a_dead_letter_is_labelled_only_with_a_well_formed_claimed_id() {
        let id = "0192f3a4b5c6d7e8f9a0b1c2d3e4f5a6";
        assert_eq!(
            claimed_id(&vouched(&format!(r#"{{"id":"{id}","kind":"vault.put"}}"#))).as_deref(),
            Some(id)
        );
        // Longer than an AMQP short string (255 bytes) may be: the dead letter could not be
        // published, and the message would come back forever.
        let long = "a".repeat(300);
        assert_eq!(claimed_id(&vouched(&format!(r#"{{"id":"{long}"}}"#))), None);
        assert_eq!(claimed_id(&vouched(r#"{"id":5}"#)), None);
        assert_eq!(claimed_id(br#"{"id":"0192f3a4b5c6d7e8f9a0b1c2d3e4f5a6"}"#), None, "not vouched for");
    }
}
