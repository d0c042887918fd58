//! Every exchange, queue and binding, declared idempotently by [`Topology::declare`].
//!
//! ```text
//! gatehouse.jobs (direct) --<class>--> gatehouse.jobs.<class>   x-max-priority 9, max length,
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
//! `gatehouse_worker::dispatch`). The routing key of a class's queue (or lane) is its *route*:
//! the class name, or `<class>.p<lane>`; retries and replays use the route too.
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

        let durable_q = QueueDeclareOptions { durable: true, ..Default::default() };
        // With quorum classes (a cluster), every queue the worker needs is replicated: a
        // classic queue lives on one node, and while that node is down it cannot even be
        // declared.
        let replicated = classes.iter().any(|c| c.queue_type == QueueType::Quorum);
        let base = || {
            let mut args = FieldTable::default();
            if replicated {
                args.insert("x-queue-type".into(), long_string("quorum"));
            }
            args
        };
        ch.queue_declare(self.dead_queue().as_str().into(), durable_q, base()).await?;
        self.bind(ch, &self.dead_queue(), &self.dead_exchange(), "").await?;

        for class in classes {
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
                self.bind(ch, &queue, &self.jobs_exchange(), &route).await?;
                self.bind(ch, &queue, &self.requeue_exchange(), &route).await?;
            }
        }

        // Status queries are cheap to repeat, so the control queue drops what nobody read
        // within a minute instead of piling it up while the worker is down.
        let mut args = base();
        args.insert("x-message-ttl".into(), AMQPValue::LongUInt(60_000));
        ch.queue_declare(self.control_queue().as_str().into(), durable_q, args).await?;
        self.bind(ch, &self.control_queue(), &self.jobs_exchange(), CONTROL_ROUTING_KEY).await?;
        // Last: a gatekeeper can bind its reply queue only once the replies exchange exists,
        // so when its link comes up, every job queue is already there.
        for direct in [self.retry_exchange(), self.replies_exchange()] {
            ch.exchange_declare(direct.as_str().into(), ExchangeKind::Direct, durable, FieldTable::default())
                .await?;
        }
        Ok(())
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
