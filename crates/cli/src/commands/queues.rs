//! `gatehouse queues migrate --class NAME --to quorum|classic`: moves a queue class of a
//! running system to the type its catalog now says, with the worker's broker user (it declares
//! the topology; the operator user may not).
//!
//! A queue cannot change type, so the class gets new queues beside the old ones:
//!
//! 1. its new queues (a classic queue, or quorum lanes) are declared and bound with the
//!    class's publish keys (`<class>.p<priority>`), and every binding is taken from the old
//!    ones: from then on the gatekeepers' jobs, retries and replays land in the new queues,
//!    with no gatekeeper restarted (it publishes by priority, the bindings route);
//! 2. the dead-letter and control queues change type too when the class was the only quorum
//!    one or becomes the first: dead letters move through `gatehouse.dead.moving` into the new
//!    dead-letter queue; the control queue, which holds only status queries nobody read within
//!    a minute, is declared anew (those queries go unanswered; the client asks again);
//! 3. what the old queues hold moves into the new ones, each message published with
//!    confirm at its own priority before it is acked off the old queue, so that a failure
//!    at any point leaves it in one queue or both, never in none (the worker applies a job
//!    once however often it arrives);
//! 4. an old queue is deleted once it is empty and no worker consumes it: workers still on
//!    the old catalog go on taking its jobs until they are restarted on the new one, and the
//!    command waits for that (`--wait-s`), moving what they give back.
//!
//! A retry waiting in a retry queue of the old type comes back through the requeue exchange
//! by the old route: a classic class's name is bound to the lowest lane, a lane's key to the
//! classic queue, so it runs, in the lowest lane (it waits longer, never less).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use gatehouse_broker::Publisher;
use gatehouse_broker::lapin::options::{
    BasicAckOptions, BasicGetOptions, QueueBindOptions, QueueDeleteOptions,
};
use gatehouse_broker::lapin::types::FieldTable;
use gatehouse_broker::lapin::{Channel, Connection};
use gatehouse_broker::topology::{Topology, is_precondition_failed};
use gatehouse_protocol::catalog::{Catalog, QueueClass, QueueType};

/// `gatehouse queues migrate`.
#[derive(Debug, Clone, clap::Args)]
pub struct MigrateArgs {
    /// The queue class to move.
    #[arg(long)]
    pub class: String,
    /// The type it moves to: `quorum` or `classic` (the catalog must say the same).
    #[arg(long, value_parser = parse_type)]
    pub to: QueueType,
    /// The job catalog the workers run (its class says the type and lanes).
    #[arg(long, default_value = "config/jobs.toml")]
    pub catalog: std::path::PathBuf,
    /// AMQP URL with the worker's credentials (the user that declares the topology).
    #[arg(
        long,
        default_value = "amqp://worker:worker-dev@127.0.0.1:5672/gatehouse",
        env = "GATEHOUSE_WORKER_BROKER_URL"
    )]
    pub broker: String,
    /// Name prefix of the topology (empty unless you set one in the components' settings).
    #[arg(long, default_value = "")]
    pub prefix: String,
    /// How long to wait for workers on the old catalog to leave the old queues.
    #[arg(long, default_value_t = 600)]
    pub wait_s: u64,
}

fn parse_type(s: &str) -> Result<QueueType, String> {
    match s {
        "quorum" => Ok(QueueType::Quorum),
        "classic" => Ok(QueueType::Classic),
        _ => Err("quorum or classic".into()),
    }
}

/// What a move did.
#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Moved {
    /// Jobs moved from the old queues into the new ones.
    pub jobs: u64,
    /// Dead letters moved into a dead-letter queue of the new type.
    pub dead_letters: u64,
    /// The queues deleted (the old ones, and a support queue that changed type).
    pub deleted: Vec<String>,
}

/// Moves class `args.class` to `args.to`; `say` is told what it waits for.
///
/// # Errors
/// A catalog that does not say the same type, a broker that cannot be reached or refuses,
/// or workers that did not leave the old queues within `wait_s` (run it again: it picks up
/// where it stopped).
pub async fn migrate(args: &MigrateArgs, say: impl Fn(&str)) -> anyhow::Result<Moved> {
    let catalog =
        Catalog::load(&args.catalog).with_context(|| format!("reading {}", args.catalog.display()))?;
    let class = catalog
        .queue(&args.class)
        .with_context(|| format!("{} has no queue class {:?}", args.catalog.display(), args.class))?
        .clone();
    anyhow::ensure!(
        class.queue_type == args.to,
        "class {} is {} in {}: set type = \"{}\" there first (the workers declare what it says)",
        class.name,
        class.queue_type.name(),
        args.catalog.display(),
        args.to.name()
    );
    let conn = gatehouse_broker::connect(&args.broker, "gatehouse-cli-queues").await?;
    let t = Topology::new(args.prefix.clone());
    let replicated = catalog.queues().iter().any(|c| c.queue_type == QueueType::Quorum);
    let moving = Moving { conn: &conn, t: &t, publisher: Publisher::open(&conn).await?, class: &class };
    let ch = conn.create_channel().await?;
    t.declare_class(&ch, &class).await.context("declaring the new queues")?;
    let old = t.retire_other_queues(&conn, &class).await.context("unbinding the old queues")?;
    let mut moved = Moved::default();
    moving.support_queues(replicated, &mut moved).await?;
    let deadline = Instant::now() + Duration::from_secs(args.wait_s);
    for (queue, _) in old {
        moving.drain(&queue, deadline, &say, &mut moved).await?;
    }
    let _ = conn.close(200, "moved".into()).await;
    Ok(moved)
}

/// One move's broker handles.
struct Moving<'a> {
    conn: &'a Connection,
    t: &'a Topology,
    publisher: Publisher,
    class: &'a QueueClass,
}

impl Moving<'_> {
    /// Gives the dead-letter and control queues the type the catalog needs now.
    async fn support_queues(&self, replicated: bool, moved: &mut Moved) -> anyhow::Result<()> {
        let t = self.t;
        // A declaration that finds the other type closes its channel: one channel each.
        if other_type(t.declare_dead(&self.conn.create_channel().await?, replicated).await)? {
            moved.dead_letters = self.retype_dead(replicated).await?;
            moved.deleted.push(t.dead_queue());
        }
        if other_type(t.declare_control(&self.conn.create_channel().await?, replicated).await)? {
            let ch = self.conn.create_channel().await?;
            ch.queue_delete(t.control_queue().as_str().into(), QueueDeleteOptions::default()).await?;
            t.declare_control(&ch, replicated).await?;
            moved.deleted.push(t.control_queue());
        }
        Ok(())
    }

    /// The dead-letter queue of the other type becomes one of this type: new dead letters go
    /// to `<dead>.moving` while the old queue's move there, then the queue is declared anew and
    /// they move back.
    async fn retype_dead(&self, replicated: bool) -> anyhow::Result<u64> {
        let (t, ch) = (self.t, self.conn.create_channel().await?);
        let (dead, exchange) = (t.dead_queue(), t.dead_exchange());
        let aside = format!("{dead}.moving");
        t.declare_support(&ch, &aside, replicated, FieldTable::default()).await?;
        bind(&ch, &aside, &exchange).await?;
        unbind(&ch, &dead, &exchange).await?;
        let to_dead = |_| (exchange.clone(), String::new());
        let mut n = 0;
        // (Quorum when the catalog no longer needs replicated queues.)
        loop {
            n += self.move_all(&dead, to_dead).await?;
            if self.delete_empty(&dead, !replicated).await? {
                break;
            }
        }
        t.declare_dead(&ch, replicated).await?;
        unbind(&ch, &aside, &exchange).await?;
        loop {
            self.move_all(&aside, to_dead).await?;
            if self.delete_empty(&aside, replicated).await? {
                break;
            }
        }
        Ok(n)
    }

    /// Moves what `queue` holds into the class's new queues until it is empty and no worker
    /// consumes it, then deletes it.
    async fn drain(
        &self,
        queue: &str,
        deadline: Instant,
        say: &impl Fn(&str),
        moved: &mut Moved,
    ) -> anyhow::Result<()> {
        // Through the requeue exchange (bound like the jobs exchange, and the worker's user
        // may publish to it).
        let jobs = self.t.requeue_exchange();
        // Its jobs stay in their clients' fair shard (wrapped when the class has fewer now).
        let route = queue.strip_prefix(&self.t.job_queue("")).unwrap_or(queue);
        let shard = self.class.former_shard(route);
        let mut told = false;
        loop {
            moved.jobs += self
                .move_all(queue, |priority| (jobs.clone(), self.class.publish_key_in(priority, shard)))
                .await?;
            let Some((messages, consumers)) = self.t.look_up(self.conn, queue).await? else { return Ok(()) };
            let quorum = self.class.queue_type == QueueType::Classic;
            if messages == 0 && consumers == 0 && self.delete_empty(queue, quorum).await? {
                moved.deleted.push(queue.to_owned());
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{queue} still has {consumers} consumers (workers on the old catalog): restart them on the \
                 new one and run this again; {} jobs moved so far",
                moved.jobs
            );
            if !told && consumers > 0 {
                say(&format!(
                    "waiting for {consumers} consumers of {queue} to leave: restart those workers on the new catalog"
                ));
                told = true;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Deletes `queue` if it is empty and unused; answers whether it did. A classic queue's
    /// broker checks that as it deletes; a quorum queue's cannot (RabbitMQ refuses `if-empty`
    /// there), so it is looked at first: nothing routes to it any more, and a consumer that
    /// left has given back what it held by the time it no longer counts.
    async fn delete_empty(&self, queue: &str, quorum: bool) -> anyhow::Result<bool> {
        let ch = self.conn.create_channel().await?;
        let opts = if quorum {
            if self.t.look_up(self.conn, queue).await? != Some((0, 0)) {
                return Ok(false);
            }
            QueueDeleteOptions::default()
        } else {
            QueueDeleteOptions { if_empty: true, if_unused: true, ..Default::default() }
        };
        match ch.queue_delete(queue.into(), opts).await {
            Ok(_) => Ok(true),
            // A consumer came or a message was given back in between.
            Err(e) if is_precondition_failed(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Moves every message ready in `queue` to where `to(priority)` (exchange, routing key)
    /// says, each confirmed there before it is acked here; answers how many.
    async fn move_all(&self, queue: &str, to: impl Fn(u8) -> (String, String)) -> anyhow::Result<u64> {
        let ch = self.conn.create_channel().await?;
        let mut n = 0;
        while let Some(m) = ch.basic_get(queue.into(), BasicGetOptions { no_ack: false }).await? {
            let props = m.delivery.properties.clone();
            let (exchange, key) = to(props.priority().unwrap_or(0));
            self.publisher
                .publish_persistent(&exchange, &key, &m.delivery.data, props)
                .await
                .with_context(|| format!("moving a message of {queue} to {exchange} {key:?}"))?;
            ch.basic_ack(m.delivery.delivery_tag, BasicAckOptions::default()).await?;
            n += 1;
        }
        let _ = ch.close(200, "moved".into()).await;
        Ok(n)
    }
}

/// Whether a declaration found the queue there with the other type.
fn other_type(declared: Result<(), gatehouse_broker::lapin::Error>) -> anyhow::Result<bool> {
    match declared {
        Ok(()) => Ok(false),
        Err(e) if is_precondition_failed(&e) => Ok(true),
        Err(e) => Err(e.into()),
    }
}

async fn bind(ch: &Channel, queue: &str, exchange: &str) -> Result<(), gatehouse_broker::lapin::Error> {
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await
}

async fn unbind(ch: &Channel, queue: &str, exchange: &str) -> Result<(), gatehouse_broker::lapin::Error> {
    ch.queue_unbind(queue.into(), exchange.into(), "".into(), FieldTable::default()).await
}
