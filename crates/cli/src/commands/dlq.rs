//! `gatehouse dlq list | show ID | replay ID|--all | purge`: the dead-letter queue, for
//! operators. Talks to the broker directly (operator credentials), never to storage.
//!
//! Reading uses `basic.get` without ack: every message read and not replayed goes back to the
//! queue when the channel closes.

use gatehouse_broker::lapin::message::BasicGetMessage;
use gatehouse_broker::lapin::options::{BasicAckOptions, BasicGetOptions, QueuePurgeOptions};
use gatehouse_broker::lapin::types::{AMQPValue, FieldTable, LongString};
use gatehouse_broker::lapin::{BasicProperties, Channel};
use gatehouse_broker::topology::headers;
use gatehouse_broker::{Publisher, Topology};
use serde_json::{Value, json};

/// Where the broker is.
#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// AMQP URL with operator credentials (the dev `operator` user of
    /// config/rabbitmq/definitions.json by default).
    #[arg(
        long,
        default_value = "amqp://operator:operator-dev@127.0.0.1:5672/gatehouse",
        env = "GATEHOUSE_BROKER_URL"
    )]
    pub broker: String,
    /// Name prefix of the topology (empty unless you set one in the components' settings).
    #[arg(long, default_value = "")]
    pub prefix: String,
}

/// Most messages one command reads.
const MAX_READ: usize = 100_000;

/// One dead letter, as shown.
fn describe(m: &BasicGetMessage) -> Value {
    let p = &m.delivery.properties;
    let h = p.headers().clone().unwrap_or_default();
    let get = |k: &str| h.inner().get(k).map(value_json).unwrap_or(Value::Null);
    json!({
        // The id the worker verified; for a message it could not verify, the id it claims.
        "id": verified_id(m).map(str::to_owned).or_else(|| p.message_id().as_ref().map(ToString::to_string)),
        "verified": verified_id(m).is_some(),
        "dead_count": get(headers::DEAD_COUNT),
        "kind": p.kind().as_ref().map(ToString::to_string),
        "reason": get(headers::REASON),
        "attempts": get(headers::ATTEMPTS),
        "last_error": get(headers::LAST_ERROR),
        "original_queue": get(headers::ORIGINAL_QUEUE),
        "dead_at_ms": get(headers::DEAD_AT),
    })
}

fn value_json(v: &AMQPValue) -> Value {
    match v {
        AMQPValue::LongString(s) => json!(String::from_utf8_lossy(s.as_bytes())),
        AMQPValue::ShortString(s) => json!(s.as_str()),
        AMQPValue::LongUInt(n) => json!(n),
        AMQPValue::LongLongInt(n) => json!(n),
        AMQPValue::LongInt(n) => json!(n),
        AMQPValue::Boolean(b) => json!(b),
        other => json!(format!("{other:?}")),
    }
}

async fn open(args: &BrokerArgs) -> anyhow::Result<(gatehouse_broker::lapin::Connection, Channel, Topology)> {
    let conn = gatehouse_broker::connect(&args.broker, "gatehouse-cli-dlq").await?;
    let ch = conn.create_channel().await?;
    Ok((conn, ch, Topology::new(args.prefix.clone())))
}

async fn read_all(ch: &Channel, queue: &str) -> anyhow::Result<Vec<BasicGetMessage>> {
    let mut out = Vec::new();
    while out.len() < MAX_READ {
        match ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await? {
            Some(m) => out.push(m),
            None => break,
        }
    }
    Ok(out)
}

/// The dead letters, oldest first.
///
/// # Errors
/// When the broker cannot be reached.
pub async fn list(args: &BrokerArgs) -> anyhow::Result<Vec<Value>> {
    let (conn, ch, t) = open(args).await?;
    let messages = read_all(&ch, &t.dead_queue()).await?;
    let out = messages.iter().map(describe).collect();
    let _ = conn.close(200, "done".into()).await;
    Ok(out)
}

/// One dead letter with its body, if present.
///
/// # Errors
/// When the broker cannot be reached.
pub async fn show(args: &BrokerArgs, id: &str) -> anyhow::Result<Option<Value>> {
    let (conn, ch, t) = open(args).await?;
    let messages = read_all(&ch, &t.dead_queue()).await?;
    // By the id `describe` shows: the verified one, else the one it claims.
    let found = messages.iter().find(|m| describe(m)["id"] == id).map(|m| {
        let mut v = describe(m);
        v["body"] = serde_json::from_slice(&m.delivery.data)
            .unwrap_or_else(|_| json!(String::from_utf8_lossy(&m.delivery.data)));
        v
    });
    let _ = conn.close(200, "done".into()).await;
    Ok(found)
}

/// The job id the worker verified and wrote when it dead-lettered the message (not the
/// `message_id` property, which anyone publishing could set).
fn verified_id(m: &BasicGetMessage) -> Option<&str> {
    match m.delivery.properties.headers().as_ref()?.inner().get(headers::JOB_ID)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok(),
        _ => None,
    }
}

/// Which of its job's dead letters the message is.
fn dead_count(m: &BasicGetMessage) -> Option<u32> {
    match m.delivery.properties.headers().as_ref()?.inner().get(headers::DEAD_COUNT)? {
        AMQPValue::LongUInt(n) => Some(*n),
        _ => None,
    }
}

/// Sends dead letters (the one with `id`, or all when `None`) back to their job queue, each
/// with a replay grant signed by `operator` (see `gatehouse_protocol::replay`), so that the
/// worker resets their attempts; a worker that does not trust `operator` refuses them back to
/// the dead-letter queue. Each is acked off the dead-letter queue only after the broker
/// confirmed its replay. Returns the ids replayed.
///
/// # Errors
/// When the broker cannot be reached or refuses a publish.
pub async fn replay(
    args: &BrokerArgs,
    id: Option<&str>,
    operator: &gatehouse_protocol::crypto::SigningKey,
) -> anyhow::Result<Vec<String>> {
    let (conn, ch, t) = open(args).await?;
    let publisher = Publisher::open(&conn).await?;
    let messages = read_all(&ch, &t.dead_queue()).await?;
    let mut replayed = Vec::new();
    for m in messages.iter().filter(|m| id.is_none() || verified_id(m) == id) {
        let (Some(class), Some(job), Some(count)) =
            (header_str(&m.delivery.properties, headers::QUEUE_CLASS), verified_id(m), dead_count(m))
        else {
            eprintln!(
                "skipping {:?}: not a job the worker verified and dead-lettered (no queue class, job id or dead count)",
                m.delivery.properties.message_id().as_ref().map(ToString::to_string)
            );
            continue;
        };
        let now_ms = gatehouse_protocol::clock::now_ms().unsigned_abs();
        // Bound to this body, this job and this dead letter of it.
        let grant = gatehouse_protocol::replay::grant(operator, job, count, &m.delivery.data, now_ms);
        let props = replay_properties(&m.delivery.properties, &grant);
        publisher.publish_persistent(&t.jobs_exchange(), &class, &m.delivery.data, props).await?;
        ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default()).await?;
        replayed.push(job.to_owned());
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(replayed)
}

/// Deletes every dead letter; returns how many there were.
///
/// # Errors
/// When the broker cannot be reached.
pub async fn purge(args: &BrokerArgs) -> anyhow::Result<u32> {
    let (conn, ch, t) = open(args).await?;
    let n = ch.queue_purge(t.dead_queue().as_str().into(), QueuePurgeOptions::default()).await?;
    let _ = conn.close(200, "done".into()).await;
    Ok(n)
}

fn header_str(p: &BasicProperties, name: &str) -> Option<String> {
    match p.headers().as_ref()?.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.to_string()),
        _ => None,
    }
}

/// The original properties, without the dead-letter headers, plus the replay grant.
fn replay_properties(p: &BasicProperties, grant: &str) -> BasicProperties {
    let dead_headers = [
        headers::REASON,
        headers::ATTEMPTS,
        headers::LAST_ERROR,
        headers::ORIGINAL_QUEUE,
        headers::QUEUE_CLASS,
        headers::DEAD_AT,
        headers::JOB_ID,
        headers::DEAD_COUNT,
        "x-death",
    ];
    let mut kept = FieldTable::default();
    if let Some(h) = p.headers() {
        for (k, v) in h.inner() {
            if !dead_headers.contains(&k.as_str()) {
                kept.insert(k.clone(), v.clone());
            }
        }
    }
    kept.insert(headers::REPLAY.into(), AMQPValue::LongString(LongString::from(grant)));
    p.clone().with_headers(kept)
}
