//! The reference: the same work with lapin alone, in the same process and run, carrying the
//! same job JSON the scenarios submit. RPC: publish persistent with confirms to a priority
//! queue, consume, reply to `reply_to` with the `correlation_id`. Publish: persistent,
//! confirmed, nothing else.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use gatehouse_broker::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions, ConfirmSelectOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use gatehouse_broker::lapin::types::{AMQPValue, FieldTable};
use gatehouse_broker::lapin::{BasicProperties, Channel, Connection};
use tokio::sync::oneshot;

use super::stats::{Budget, Samples};

/// The reference queue: a classic priority queue like a classic class's, or a replicated
/// quorum queue like a lane of a quorum class.
fn queue(quorum: bool) -> &'static str {
    if quorum { "gatehouse.bench.baseline.quorum" } else { "gatehouse.bench.baseline" }
}

async fn setup(url: &str, quorum: bool) -> anyhow::Result<(Connection, Channel)> {
    let conn = gatehouse_broker::connect(url, "gatehouse-bench-baseline").await?;
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    if quorum {
        args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".into()));
    } else {
        args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(9));
        // The job queues' storage (the `gatehouse-queues` policy of config/rabbitmq).
        args.insert("x-queue-version".into(), AMQPValue::ShortShortUInt(2));
    }
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    ch.queue_declare(queue(quorum).into(), durable, args).await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    Ok((conn, ch))
}

async fn publish(ch: &Channel, queue: &str, body: &[u8], props: BasicProperties) -> anyhow::Result<()> {
    let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
    let confirm =
        ch.basic_publish("".into(), queue.into(), opts, body, props.with_delivery_mode(2)).await?.await?;
    anyhow::ensure!(confirm.is_ack(), "not confirmed");
    Ok(())
}

/// Raw RPC round trips by `concurrency` callers for `duration`; the consumer uses `prefetch`;
/// on a quorum queue with `quorum`.
///
/// # Errors
/// When the broker cannot be reached.
pub async fn rpc(
    url: &str,
    quorum: bool,
    concurrency: usize,
    duration: Duration,
    prefetch: u16,
) -> anyhow::Result<Samples> {
    let (conn, ch) = setup(url, quorum).await?;
    // The "worker": consume, ack, reply.
    let consumer_ch = conn.create_channel().await?;
    consumer_ch.basic_qos(prefetch, BasicQosOptions::default()).await?;
    let mut deliveries = consumer_ch
        .basic_consume(
            queue(quorum).into(),
            "baseline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let reply_ch = conn.create_channel().await?;
    let server = tokio::spawn(async move {
        while let Some(Ok(d)) = deliveries.next().await {
            let _ = d.ack(BasicAckOptions::default()).await;
            if let (Some(to), Some(cid)) = (d.properties.reply_to(), d.properties.correlation_id()) {
                let props = BasicProperties::default().with_correlation_id(cid.clone());
                let _ = reply_ch
                    .basic_publish(
                        "".into(),
                        to.as_str().into(),
                        BasicPublishOptions::default(),
                        b"{}",
                        props,
                    )
                    .await;
            }
        }
    });
    // The "client": one reply queue, waiters by correlation id.
    let replies_ch = conn.create_channel().await?;
    let exclusive = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
    let reply_queue =
        replies_ch.queue_declare("".into(), exclusive, FieldTable::default()).await?.name().to_string();
    let waiting: Arc<Mutex<HashMap<String, oneshot::Sender<()>>>> = Arc::default();
    let mut replies = replies_ch
        .basic_consume(
            reply_queue.as_str().into(),
            "baseline-replies".into(),
            BasicConsumeOptions { no_ack: true, ..Default::default() },
            FieldTable::default(),
        )
        .await?;
    let w = waiting.clone();
    let reply_reader = tokio::spawn(async move {
        while let Some(Ok(d)) = replies.next().await {
            let waiter = d.properties.correlation_id().as_ref().and_then(|cid| {
                w.lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(cid.as_str())
            });
            if let Some(tx) = waiter {
                let _ = tx.send(());
            }
        }
    });

    let start = Instant::now();
    let deadline = start + duration;
    let mut callers = Vec::new();
    for c in 0..concurrency {
        let (ch, waiting, reply_queue) = (ch.clone(), waiting.clone(), reply_queue.clone());
        callers.push(tokio::spawn(async move {
            let mut s = Samples::default();
            let mut n = 0u64;
            while Instant::now() < deadline {
                n += 1;
                let cid = format!("{c}-{n}");
                let (tx, rx) = oneshot::channel();
                waiting.lock().unwrap_or_else(std::sync::PoisonError::into_inner).insert(cid.clone(), tx);
                let props = BasicProperties::default()
                    .with_priority(5)
                    .with_correlation_id(cid.as_str().into())
                    .with_reply_to(reply_queue.as_str().into());
                let sent = Instant::now();
                let body = serde_json::to_vec(&super::scenarios::job(n, 5)).unwrap_or_default();
                let ok = publish(&ch, queue(quorum), &body, props).await.is_ok()
                    && tokio::time::timeout(Duration::from_secs(10), rx).await.is_ok_and(|r| r.is_ok());
                if ok { s.latencies.push(sent.elapsed()) } else { s.error(0) }
            }
            s.elapsed = start.elapsed();
            s
        }));
    }
    let mut samples = Samples::default();
    for c in callers {
        samples.merge(c.await?);
    }
    server.abort();
    reply_reader.abort();
    let _ = ch.queue_delete(queue(quorum).into(), QueueDeleteOptions::default()).await;
    let _ = conn.close(200, "done".into()).await;
    Ok(samples)
}

/// The publish reference: confirmed, persistent publishes to a queue nobody consumes. The
/// queue lives until [`Publishing::close`], so that it fills across slices as the job queue
/// does.
pub struct Publishing {
    conn: Connection,
    ch: Channel,
    queue: &'static str,
    sent: u64,
}

impl Publishing {
    /// # Errors
    /// When the broker cannot be reached.
    pub async fn open(url: &str, quorum: bool) -> anyhow::Result<Self> {
        let (conn, ch) = setup(url, quorum).await?;
        Ok(Self { conn, ch, queue: queue(quorum), sent: 0 })
    }

    /// Publishes by `concurrency` publishers for `duration` or `count` messages, whichever
    /// ends first.
    ///
    /// # Errors
    /// When a publisher task fails.
    pub async fn run(
        &mut self,
        concurrency: usize,
        duration: Duration,
        count: u64,
    ) -> anyhow::Result<Samples> {
        let start = Instant::now();
        let deadline = start + duration;
        let budget = Budget::new(count);
        let mut publishers = Vec::new();
        for p in 0..concurrency {
            let (ch, budget, queue) = (self.ch.clone(), budget.clone(), self.queue);
            let mut n = self.sent + ((p as u64) << 32);
            publishers.push(tokio::spawn(async move {
                let mut s = Samples::default();
                while Instant::now() < deadline && budget.take() {
                    n += 1;
                    let body = serde_json::to_vec(&super::scenarios::job(n, 5)).unwrap_or_default();
                    let sent = Instant::now();
                    match publish(&ch, queue, &body, BasicProperties::default().with_priority(5)).await {
                        Ok(()) => s.latencies.push(sent.elapsed()),
                        Err(_) => s.error(0),
                    }
                }
                s.elapsed = start.elapsed();
                s
            }));
        }
        let mut samples = Samples::default();
        for p in publishers {
            samples.merge(p.await?);
        }
        self.sent += samples.latencies.len() as u64;
        Ok(samples)
    }

    /// Deletes the reference queue and closes the connection.
    pub async fn close(self) {
        let _ = self.ch.queue_delete(self.queue.into(), QueueDeleteOptions::default()).await;
        let _ = self.conn.close(200, "done".into()).await;
    }
}
