//! Every exchange, queue and binding, declared idempotently by [`Topology::declare`].
//!
//! ```text
//! gatehouse.jobs (direct) --<class>--> gatehouse.jobs.<class>   x-max-priority 9, max length,
//!                 |                                            reject-publish, DLX gatehouse.dead
//!                 +--control--> gatehouse.control               status queries for the worker
//! gatehouse.dead (fanout) --> gatehouse.dead                      poison and undecodable messages
//! gatehouse.reply.<instance>                                      one per gatekeeper process
//! ```
//!
//! Job queues are classic queues: RabbitMQ 3.10 refuses `x-max-priority` on quorum queues.
//! A `prefix` (empty in production) lets tests share one broker without sharing queues.

use lapin::Channel;
use lapin::ExchangeKind;
use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};

use gatehouse_protocol::catalog::QueueClass;

/// Routing key of the control queue on the jobs exchange.
pub const CONTROL_ROUTING_KEY: &str = "control";

/// The names of everything on the broker, under an optional prefix.
#[derive(Debug, Clone, Default)]
pub struct Topology {
    prefix: String,
}

impl Topology {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
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

    pub fn control_queue(&self) -> String {
        format!("{}gatehouse.control", self.prefix)
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
        let durable = ExchangeDeclareOptions {
            durable: true,
            ..Default::default()
        };
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

        let durable_q = QueueDeclareOptions {
            durable: true,
            ..Default::default()
        };
        ch.queue_declare(
            self.dead_queue().as_str().into(),
            durable_q,
            FieldTable::default(),
        )
        .await?;
        self.bind(ch, &self.dead_queue(), &self.dead_exchange(), "")
            .await?;

        for class in classes {
            let mut args = FieldTable::default();
            args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(9));
            args.insert("x-max-length".into(), AMQPValue::LongUInt(class.max_length));
            args.insert("x-overflow".into(), long_string("reject-publish"));
            args.insert(
                "x-dead-letter-exchange".into(),
                long_string(&self.dead_exchange()),
            );
            let queue = self.job_queue(&class.name);
            ch.queue_declare(queue.as_str().into(), durable_q, args)
                .await?;
            self.bind(ch, &queue, &self.jobs_exchange(), &class.name)
                .await?;
        }

        // Status queries are cheap to repeat, so the control queue drops what nobody read
        // within a minute instead of piling it up while the worker is down.
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongUInt(60_000));
        ch.queue_declare(self.control_queue().as_str().into(), durable_q, args)
            .await?;
        self.bind(
            ch,
            &self.control_queue(),
            &self.jobs_exchange(),
            CONTROL_ROUTING_KEY,
        )
        .await?;
        Ok(())
    }

    /// Declares the exclusive, auto-deleted reply queue of one gatekeeper instance.
    ///
    /// # Errors
    /// When the broker refuses the declaration.
    pub async fn declare_reply_queue(
        &self,
        ch: &Channel,
        instance: &str,
    ) -> Result<String, lapin::Error> {
        let name = self.reply_queue(instance);
        let opts = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..Default::default()
        };
        ch.queue_declare(name.as_str().into(), opts, FieldTable::default())
            .await?;
        Ok(name)
    }

    async fn bind(
        &self,
        ch: &Channel,
        queue: &str,
        exchange: &str,
        key: &str,
    ) -> Result<(), lapin::Error> {
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
