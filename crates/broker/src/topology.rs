//! Every exchange, queue and binding, declared idempotently by [`Topology::declare`].
//!
//! ```text
//! gatehouse.jobs (direct) --<class>.p0..p9--> gatehouse.jobs.<class>   x-max-priority 9, max length,
//!                 |                                            reject-publish, DLX gatehouse.dead
//!                 +--control--> gatehouse.control               status queries for the worker
//! gatehouse.dead (fanout) --> gatehouse.dead                      poison and undecodable messages
//! gatehouse.retry (direct) --<queue>--> gatehouse.retry.<class>.<delay>ms
//!                                          --TTL, dead-letter--> gatehouse.requeue --<class>--> job queue
//! gatehouse.replies (direct) --<queue>--> gatehouse.reply.<instance>   one per gatekeeper process
//! ```
//!
//! The worker declares all of it ([`Topology::declare`]); the gatekeeper declares only its
//! own reply queue, so its broker user needs no right to create or change anything else.
//! Replies and retries go through their own exchanges rather than the default one, so that
//! no user needs write access to `amq.default` (which reaches every queue).
//!
//! A queue class is a classic queue with priorities 0–9 (`x-max-priority`), or with
//! `type = "quorum"` one replicated quorum queue per priority lane,
//! `gatehouse.jobs.<class>.p<lane>`, routed by the gatekeeper from the job's priority (RabbitMQ
//! 3.10 refuses `x-max-priority` on quorum queues; the worker orders across lanes, see
//! `gatehouse_worker::delivery::turns`). The routing key of a class's queue (or lane) is its *route*:
//! the class name, or `<class>.p<lane>`; retries and replays use the route too. The gatekeeper
//! publishes every job with `<class>.p<priority>` whatever the type: each queue is bound with
//! the publish keys of the priorities it takes (and the lowest with the class name, the route
//! of a classic class), so bindings alone route, and a class moves between types (`gatehouse
//! queues migrate`) under a running gatekeeper. A class with `fair_shards = N` has all of that
//! N times: shard 0 as above, shard k's queues `<route>.s<k>` bound with `<class>.p<priority>.s<k>`;
//! the gatekeeper publishes each client's jobs to its shard, and the worker takes turns between
//! clients over what it holds of them all.
//! A `prefix` (empty in production) lets tests share one broker without sharing queues.

use lapin::Channel;
use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};

use gatehouse_protocol::catalog::{QueueClass, QueueType};

/// Routing key of the control queue on the jobs exchange.
pub const CONTROL_ROUTING_KEY: &str = "control";

/// Headers the worker sets on dead-lettered messages, and the replay marker.
pub mod headers {
    /// Why the message was dead-lettered (`max_attempts`, `undecodable`, `unknown_kind`,
    /// `sequence_gap_timeout`, ...).
    pub const REASON: &str = "x-gatehouse-reason";
    /// How often the worker started the job.
    pub const ATTEMPTS: &str = "x-gatehouse-attempts";
    /// The last failure, if any.
    pub const LAST_ERROR: &str = "x-gatehouse-last-error";
    /// The job queue the message came from.
    pub const ORIGINAL_QUEUE: &str = "x-gatehouse-original-queue";
    /// The route (routing key on `gatehouse.jobs`: the class, or its lane) to replay it to.
    pub const QUEUE_CLASS: &str = "x-gatehouse-queue-class";
    /// Unix ms when it was dead-lettered.
    pub const DEAD_AT: &str = "x-gatehouse-dead-at";
    /// Set by `gatehouse dlq replay`: the worker resets the job's attempts and runs it afresh.
    pub const REPLAY: &str = "x-gatehouse-replay";
    /// The job id the worker verified (absent when the message could not be verified).
    pub const JOB_ID: &str = "x-gatehouse-job-id";
    /// How many times the worker dead-lettered this job (a replay grant names the dead letter
    /// it is for by this number).
    pub const DEAD_COUNT: &str = "x-gatehouse-dead-count";
}

/// The names of everything on the broker, under an optional prefix.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }

    pub fn jobs_exchange(&self) -> String {
        format!("{}gatehouse.jobs", self.prefix)
    }

    pub fn job_queue(&self, class: &str) -> String {
        format!("{}gatehouse.jobs.{class}", self.prefix)
    }

    pub fn dead_exchange(&self) -> String {
        format!("{}gatehouse.dead", self.prefix)
    }

    pub fn dead_queue(&self) -> String {
        format!("{}gatehouse.dead", self.prefix)
    }

    pub fn replies_exchange(&self) -> String {
        format!("{}gatehouse.replies", self.prefix)
    }

    /// Where retry queues dead-letter to; bound to the job queues like `gatehouse.jobs`, so
    /// that the worker's user needs no write access to the clients' entrance.
    pub fn requeue_exchange(&self) -> String {
        format!("{}gatehouse.requeue", self.prefix)
    }

    pub fn retry_exchange(&self) -> String {
        format!("{}gatehouse.retry", self.prefix)
    }

    pub fn control_queue(&self) -> String {
        format!("{}gatehouse.control", self.prefix)
    }

    /// The queue where a job of `class` waits `delay_ms` before it returns to its job queue.
    pub fn retry_queue(&self, class: &str, delay_ms: u64) -> String {
        format!("{}gatehouse.retry.{class}.{delay_ms}ms", self.prefix)
    }

    pub fn reply_queue(&self, instance: &str) -> String {
        format!("{}gatehouse.reply.{instance}", self.prefix)
    }

    /// Declares exchanges, the queue of every class, the control and dead-letter queues, and
    /// their bindings. Safe to run from every process at every start.
    ///
    /// # Errors
    /// When the broker refuses a declaration, e.g. a queue exists with other arguments.
    pub async fn declare(&self, ch: &Channel, classes: &[QueueClass]) -> Result<(), lapin::Error> {
        let durable = ExchangeDeclareOptions { durable: true, ..Default::default() };
        ch.exchange_declare(
            self.jobs_exchange().as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;
        ch.exchange_declare(
            self.dead_exchange().as_str().into(),
            ExchangeKind::Fanout,
            durable,
            FieldTable::default(),
        )
        .await?;
        ch.exchange_declare(
            self.requeue_exchange().as_str().into(),
            ExchangeKind::Direct,
            durable,
            FieldTable::default(),
        )
        .await?;

        // With quorum classes (a cluster), every queue the worker needs is replicated: a
        // classic queue lives on one node, and while that node is down it cannot even be
        // declared.
        let replicated = classes.iter().any(|c| c.queue_type == QueueType::Quorum);
        self.declare_dead(ch, replicated).await?;
        for class in classes {
            self.declare_class(ch, class).await?;
        }
        self.declare_control(ch, replicated).await?;
        // Last: a gatekeeper can bind its reply queue only once the replies exchange exists,
        // so when its link comes up, every job queue is already there.
        for direct in [self.retry_exchange(), self.replies_exchange()] {
            ch.exchange_declare(direct.as_str().into(), ExchangeKind::Direct, durable, FieldTable::default())
                .await?;
        }
        Ok(())
    }

    /// Declares the dead-letter queue (quorum when `replicated`) and binds it to the
    /// dead-letter exchange.
    ///
    /// # Errors
    /// When the broker refuses (a dead-letter queue of the other type exists).
    pub async fn declare_dead(&self, ch: &Channel, replicated: bool) -> Result<(), lapin::Error> {
        self.declare_support(ch, &self.dead_queue(), replicated, FieldTable::default()).await?;
        self.bind(ch, &self.dead_queue(), &self.dead_exchange(), "").await
    }

    /// Declares the control queue (quorum when `replicated`) and binds it to the jobs exchange.
    /// Status queries are cheap to repeat, so it drops what nobody read within a minute
    /// instead of piling it up while the worker is down.
    ///
    /// # Errors
    /// When the broker refuses (a control queue of the other type exists).
    pub async fn declare_control(&self, ch: &Channel, replicated: bool) -> Result<(), lapin::Error> {
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongUInt(60_000));
        self.declare_support(ch, &self.control_queue(), replicated, args).await?;
        self.bind(ch, &self.control_queue(), &self.jobs_exchange(), CONTROL_ROUTING_KEY).await
    }

    /// Declares `queue` durable with `args`, quorum when `replicated`.
    ///
    /// # Errors
    /// When the broker refuses (a queue of that name with other arguments).
    pub async fn declare_support(
        &self,
        ch: &Channel,
        queue: &str,
        replicated: bool,
        mut args: FieldTable,
    ) -> Result<(), lapin::Error> {
        if replicated {
            args.insert("x-queue-type".into(), long_string("quorum"));
        }
        let durable_q = QueueDeclareOptions { durable: true, ..Default::default() };
        ch.queue_declare(queue.into(), durable_q, args).await.map(drop)
    }

    /// Declares the queues of `class` (a classic queue, or its quorum lanes) and binds each
    /// with its keys ([`QueueClass::keys`]) on the jobs and requeue exchanges. Idempotent.
    ///
    /// # Errors
    /// When the broker refuses a declaration (a queue of that name with other arguments).
    pub async fn declare_class(&self, ch: &Channel, class: &QueueClass) -> Result<(), lapin::Error> {
        let durable_q = QueueDeclareOptions { durable: true, ..Default::default() };
        // A classic queue orders by message priority; a quorum class has a queue per
        // priority lane (quorum queues refuse x-max-priority), each replicated.
        for route in class.routes() {
            let mut args = FieldTable::default();
            match class.queue_type {
                QueueType::Classic => {
                    args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(9));
                }
                QueueType::Quorum => {
                    args.insert("x-queue-type".into(), long_string("quorum"));
                    args.insert("x-delivery-limit".into(), AMQPValue::LongUInt(class.delivery_limit));
                }
            }
            args.insert("x-max-length".into(), AMQPValue::LongUInt(class.max_length));
            args.insert("x-overflow".into(), long_string("reject-publish"));
            args.insert("x-dead-letter-exchange".into(), long_string(&self.dead_exchange()));
            let queue = self.job_queue(&route);
            ch.queue_declare(queue.as_str().into(), durable_q, args).await?;
            for key in class.keys(&route) {
                self.bind(ch, &queue, &self.jobs_exchange(), &key).await?;
                self.bind(ch, &queue, &self.requeue_exchange(), &key).await?;
            }
        }
        Ok(())
    }

    /// Takes every binding from the queues `class` has left on the broker under another type
    /// or other lanes ([`QueueClass::other_routes`]), so that new jobs, retries and replays go
    /// only to its queues now; answers those queues with the messages they still hold. Each
    /// is looked up on a channel of its own (a missing queue closes it).
    ///
    /// (Also when its fair shards change: the queues of shards it no longer has.)
    ///
    /// # Errors
    /// When the broker cannot be reached or refuses an unbind.
    pub async fn retire_other_queues(
        &self,
        conn: &lapin::Connection,
        class: &QueueClass,
    ) -> Result<Vec<(String, u32)>, lapin::Error> {
        use futures_util::{StreamExt as _, TryStreamExt as _};
        // Looked up many at a time: a class with fair shards has a few hundred routes it may
        // have had, and nearly none of them exist.
        let found: Vec<(String, Option<u32>)> = futures_util::stream::iter(class.other_routes())
            .map(|route| async move {
                let depth = self.depth(conn, &self.job_queue(&route)).await?;
                Ok::<_, lapin::Error>((route, depth))
            })
            .buffer_unordered(32)
            .try_collect()
            .await?;
        let mut found = found;
        found.sort();
        let mut left = Vec::new();
        for (route, messages) in found {
            let Some(messages) = messages else { continue };
            let queue = self.job_queue(&route);
            let ch = conn.create_channel().await?;
            for key in class.retired_keys(&route) {
                for exchange in [self.jobs_exchange(), self.requeue_exchange()] {
                    ch.queue_unbind(
                        queue.as_str().into(),
                        exchange.as_str().into(),
                        key.as_str().into(),
                        FieldTable::default(),
                    )
                    .await?;
                }
            }
            let _ = ch.close(200, "unbound".into()).await;
            left.push((queue, messages));
        }
        Ok(left)
    }

    /// The messages ready in `queue`, or `None` when there is no such queue.
    ///
    /// # Errors
    /// When the broker cannot be reached.
    pub async fn depth(&self, conn: &lapin::Connection, queue: &str) -> Result<Option<u32>, lapin::Error> {
        Ok(self.look_up(conn, queue).await?.map(|(messages, _)| messages))
    }

    /// The messages ready in `queue` and its consumers, or `None` when there is no such queue
    /// (looked up on a channel of its own: a missing queue closes it).
    ///
    /// # Errors
    /// When the broker cannot be reached.
    pub async fn look_up(
        &self,
        conn: &lapin::Connection,
        queue: &str,
    ) -> Result<Option<(u32, u32)>, lapin::Error> {
        let ch = conn.create_channel().await?;
        let passive = QueueDeclareOptions { passive: true, ..Default::default() };
        match ch.queue_declare(queue.into(), passive, FieldTable::default()).await {
            Ok(q) => {
                let _ = ch.close(200, "looked up".into()).await;
                Ok(Some((q.message_count(), q.consumer_count())))
            }
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Declares the retry queue of route `class` for `delay_ms`: messages expire there after
    /// the delay and dead-letter back to their job queue through `gatehouse.requeue`. The
    /// backoff is held by the broker, not in worker memory. A quorum queue when `replicated`
    /// (the route is a quorum lane). Idempotent.
    ///
    /// # Errors
    /// When the broker refuses the declaration.
    pub async fn declare_retry_queue(
        &self,
        ch: &Channel,
        class: &str,
        delay_ms: u64,
        replicated: bool,
    ) -> Result<String, lapin::Error> {
        let name = self.retry_queue(class, delay_ms);
        let mut args = FieldTable::default();
        if replicated {
            args.insert("x-queue-type".into(), long_string("quorum"));
        }
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(delay_ms as i64));
        args.insert("x-dead-letter-exchange".into(), long_string(&self.requeue_exchange()));
        args.insert("x-dead-letter-routing-key".into(), long_string(class));
        let opts = QueueDeclareOptions { durable: true, ..Default::default() };
        ch.queue_declare(name.as_str().into(), opts, args).await?;
        self.bind(ch, &name, &self.retry_exchange(), &name).await?;
        Ok(name)
    }

    /// Declares the exclusive, auto-deleted reply queue of one gatekeeper instance, bound to
    /// the replies exchange under its own name.
    ///
    /// # Errors
    /// When the broker refuses the declaration.
    pub async fn declare_reply_queue(&self, ch: &Channel, instance: &str) -> Result<String, lapin::Error> {
        let name = self.reply_queue(instance);
        let opts = QueueDeclareOptions { exclusive: true, auto_delete: true, ..Default::default() };
        ch.queue_declare(name.as_str().into(), opts, FieldTable::default()).await?;
        self.bind(ch, &name, &self.replies_exchange(), &name).await?;
        Ok(name)
    }

    async fn bind(&self, ch: &Channel, queue: &str, exchange: &str, key: &str) -> Result<(), lapin::Error> {
        ch.queue_bind(
            queue.into(),
            exchange.into(),
            key.into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
    }
}

/// The broker answered 404 (no such queue or exchange).
pub fn is_not_found(e: &lapin::Error) -> bool {
    is_soft(e, &lapin::protocol::AMQPSoftError::NOTFOUND)
}

/// The broker answered 406: a queue of that name exists with other arguments (another type).
pub fn is_precondition_failed(e: &lapin::Error) -> bool {
    is_soft(e, &lapin::protocol::AMQPSoftError::PRECONDITIONFAILED)
}

fn is_soft(e: &lapin::Error, which: &lapin::protocol::AMQPSoftError) -> bool {
    use lapin::protocol::AMQPErrorKind;
    matches!(e.kind(), lapin::ErrorKind::ProtocolError(a) if matches!(a.kind(), AMQPErrorKind::Soft(s) if s == which))
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_carry_the_prefix() {
        let t = Topology::new("t1.");
        assert_eq!(t.jobs_exchange(), "t1.gatehouse.jobs");
        assert_eq!(t.job_queue("batch"), "t1.gatehouse.jobs.batch");
        assert_eq!(Topology::default().dead_queue(), "gatehouse.dead");
    }
}
