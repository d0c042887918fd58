//! One broker connection and what hangs off it: the job and control consumers, the turns of
//! held classes (quorum lanes, fair shards), the delivery tasks, and the sweepers that send on
//! this connection.

use std::collections::HashMap;
use std::sync::Arc;

use anyhow::Context as _;
use futures_util::StreamExt;
use gatehouse_broker::lapin::message::Delivery;
use gatehouse_broker::lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use gatehouse_broker::lapin::types::FieldTable;
use gatehouse_broker::lapin::{Channel, Connection};
use gatehouse_protocol::envelope::Turn;
use tokio::sync::{mpsc, watch};
use tokio::task::{Id, JoinSet};

use crate::admin::dashboard::BrokerView;
use crate::delivery::acks::Acks;
use crate::delivery::settle::JobChannel;
use crate::delivery::turns::{From, Turns};
use crate::delivery::{Ctx, Shared, control, job};
use crate::outbound::Outbound;
use crate::settings::WorkerSettings;
use crate::sweep::{self, gaps::Gaps, held::Held};

/// The control queue's consumer tag.
const CONTROL_TAG: &str = "worker.control";

/// One broker connection and what hangs off it.
pub(super) struct Session {
    connection: Connection,
    /// The channel the job queues are consumed on (acked through `ctx.channel`).
    jobs: Channel,
    /// The consumers' prefetch (`consumer.prefetch`): how many jobs of a class run at once.
    prefetch: u16,
    ctx: Ctx,
}

/// How a session ended.
pub(super) enum Ended {
    Stopped,
    ConnectionLost,
}

/// Where a delivery came from.
#[derive(Clone)]
enum Source {
    /// The job queue of this route (a class, one of its lanes or fair shards).
    Job(String),
    Control,
}

/// The deliveries a session has received and not finished.
struct InFlight {
    tasks: JoinSet<()>,
    /// The tasks that hold a slot of a held class, and its name (freed however they end).
    held_tasks: HashMap<Id, String>,
    turns: Turns<Delivery>,
}

impl Session {
    /// Connects, declares the topology and opens the channels.
    pub(super) async fn open(
        settings: &WorkerSettings,
        shared: &Arc<Shared>,
        broker: &BrokerView,
    ) -> anyhow::Result<Self> {
        let connection = gatehouse_broker::connect_with(&settings.broker, "gatehouse-worker")
            .await
            .context("connecting to the broker")?;
        let topology = settings.broker.topology();
        let setup = connection.create_channel().await?;
        match topology.declare(&setup, shared.catalog.queues()).await {
            Ok(()) => {}
            Err(e) if gatehouse_broker::topology::is_precondition_failed(&e) => anyhow::bail!(
                "declaring topology: a queue exists as another type than the catalog says (a class \
                 moved between classic and quorum): move it with `gatehouse queues migrate --class \
                 <name> --to <type>` ({e})"
            ),
            Err(e) => return Err(anyhow::Error::from(e).context("declaring topology")),
        }
        let _ = setup.close(200, "topology declared".into()).await;
        // Queues a class left behind under another type, other lanes or shards get no new jobs.
        for class in shared.catalog.queues() {
            for (queue, held) in topology.retire_other_queues(&connection, class).await? {
                if held > 0 {
                    tracing::warn!(
                        queue,
                        held,
                        class = class.name,
                        "a queue of this class from before it moved holds jobs no worker takes: move them \
                         with `gatehouse queues migrate --class {} --to {}`",
                        class.name,
                        class.queue_type.name()
                    );
                }
            }
        }
        broker.connected(connection.create_channel().await?).await;
        let jobs = connection.create_channel().await?;
        let (store, catalog, keys, metrics) =
            (shared.store.clone(), shared.catalog.clone(), shared.keys.clone(), shared.metrics.clone());
        let out = Arc::new(Outbound::open(&connection, store, catalog, keys, metrics, topology).await?);
        let channel = Arc::new(JobChannel::new(Acks::start(jobs.clone())));
        Ok(Self {
            connection,
            jobs,
            prefetch: settings.consumer.prefetch,
            ctx: Ctx { shared: shared.clone(), out, channel },
        })
    }

    /// Consumes until `stop` or the connection is lost; then gives back what did not start,
    /// lets what runs finish within the grace time, and flushes the acks.
    pub(super) async fn consume(
        self,
        settings: &WorkerSettings,
        mut stop: watch::Receiver<bool>,
    ) -> anyhow::Result<Ended> {
        let prefetch = self.prefetch;
        let control = self.connection.create_channel().await?;
        control.basic_qos(32, BasicQosOptions::default()).await?;
        let (tx, mut rx) = mpsc::channel::<(Source, Delivery)>(64);
        let tags = self.start_consumers(&control, &tx).await?;
        // For consuming again after storage refused writes; not kept strong, so that the
        // channel closes when the connection's consumers end.
        let resume_with = tx.downgrade();
        drop(tx);
        tracing::info!(prefetch, "worker consuming");
        self.ctx.shared.metrics.set_ready(true);
        let (sweeps_stop, sweeps) = watch::channel(false);
        let out = &self.ctx.out;
        let health = &self.ctx.shared.health;
        tokio::spawn(sweep::run(Gaps(out.clone()), health.clone(), sweeps.clone()));
        tokio::spawn(sweep::run(Held(out.clone()), health.clone(), sweeps));
        let turns = Turns::new(&self.ctx.shared.catalog, usize::from(prefetch));
        let mut flight = InFlight { tasks: JoinSet::new(), held_tasks: HashMap::new(), turns };
        let mut refusals = self.ctx.shared.health.watch();
        refusals.mark_changed();
        let mut paused = false;
        let ended = loop {
            tokio::select! {
                // (Mapped to `()`: the guard it answers must not live across the awaits below.)
                () = async { let _ = stop.wait_for(|s| *s).await; } => break Ended::Stopped,
                Ok(()) = refusals.changed() => {
                    let refusing = refusals.borrow_and_update().is_some();
                    if refusing && !paused {
                        self.pause_jobs(&tags, &mut flight).await;
                    } else if !refusing && paused {
                        let Some(tx) = resume_with.upgrade() else { break Ended::ConnectionLost };
                        self.start_job_consumers(&tx).await?;
                    }
                    paused = refusing;
                }
                next = rx.recv() => match next {
                    Some((Source::Job(_), d)) if paused => self.give_back(&d).await,
                    Some((source, d)) => self.arrived(&mut flight, source, d),
                    None => break Ended::ConnectionLost,
                },
                Some(done) = flight.tasks.join_next_with_id(), if !flight.tasks.is_empty() => flight.finished(done),
            }
            flight.start_held(&self.ctx);
        };
        let _ = sweeps_stop.send(true);
        self.ctx.shared.metrics.set_ready(false);
        self.wind_down(settings, &tags, rx, flight).await;
        if matches!(ended, Ended::Stopped) {
            tracing::info!("worker stopped");
        }
        Ok(ended)
    }

    /// Starts a consumer on every job queue (each lane of a quorum class) and the control
    /// queue; answers their tags.
    async fn start_consumers(
        &self,
        control: &Channel,
        tx: &mpsc::Sender<(Source, Delivery)>,
    ) -> anyhow::Result<Vec<(Channel, String)>> {
        let mut tags = self.start_job_consumers(tx).await?;
        start(control, &self.ctx.out.topology.control_queue(), CONTROL_TAG, Source::Control, tx).await?;
        tags.push((control.clone(), CONTROL_TAG.to_owned()));
        Ok(tags)
    }

    /// Starts a consumer on every job queue (each lane of a quorum class); answers their tags.
    async fn start_job_consumers(
        &self,
        tx: &mpsc::Sender<(Source, Delivery)>,
    ) -> anyhow::Result<Vec<(Channel, String)>> {
        let topology = &self.ctx.out.topology;
        let mut tags = Vec::new();
        for class in self.ctx.shared.catalog.queues() {
            // (The prefetch applies to the consumers started after it.) A class that takes
            // turns runs at most `prefetch` jobs at once, and holds more of each queue than that,
            // so that a client whose turn it is always has one at hand while its last ones are
            // being acknowledged.
            let prefetch = self.prefetch.saturating_mul(if class.takes_turns() { 2 } else { 1 });
            self.jobs.basic_qos(prefetch, BasicQosOptions::default()).await?;
            for route in class.routes() {
                let tag = format!("worker.{route}");
                start(&self.jobs, &topology.job_queue(&route), &tag, Source::Job(route.clone()), tx).await?;
                tags.push((self.jobs.clone(), tag));
            }
        }
        Ok(tags)
    }

    /// Storage refuses writes: no more jobs (status queries go on). The job consumers are
    /// cancelled and what the turns hold goes back to its queue; jobs that run now finish or
    /// fail and go back themselves.
    async fn pause_jobs(&self, tags: &[(Channel, String)], flight: &mut InFlight) {
        for (channel, tag) in tags.iter().filter(|(_, tag)| tag != CONTROL_TAG) {
            let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
        }
        for d in flight.turns.drain() {
            self.give_back(&d).await;
        }
    }

    /// Sends a job delivery back to its queue, unstarted.
    async fn give_back(&self, d: &Delivery) {
        let _ = d.acker.nack(BasicNackOptions { requeue: true, ..Default::default() }).await;
        self.ctx.channel.given_back(d.delivery_tag);
    }

    /// A delivery arrived: one of a held class (quorum lanes, fair shards) waits for its turn
    /// at the class's next free slot; others start.
    fn arrived(&self, flight: &mut InFlight, source: Source, d: Delivery) {
        match source {
            Source::Job(route) => match flight.turns.class_of(&route) {
                Some(class) => {
                    let turn = Turn::of(&d.data);
                    let (client, share) = turn.map_or((String::new(), 1), |t| (t.client, t.share));
                    let from = From { client, share, priority: d.properties.priority().unwrap_or(0) };
                    flight.turns.hold(&class, route, from, d);
                }
                None => {
                    flight.tasks.spawn(job::handle_job(self.ctx.clone(), route, d));
                }
            },
            Source::Control => {
                flight.tasks.spawn(control::handle_control(self.ctx.clone(), d));
            }
        }
    }

    /// No new deliveries; the ones received but not started go back; what runs may finish
    /// within the grace time; what finished is acked before the connection goes.
    async fn wind_down(
        &self,
        settings: &WorkerSettings,
        tags: &[(Channel, String)],
        mut rx: mpsc::Receiver<(Source, Delivery)>,
        mut flight: InFlight,
    ) {
        for (channel, tag) in tags {
            let _ = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
        }
        rx.close();
        let requeue = BasicNackOptions { requeue: true, ..Default::default() };
        for d in flight.turns.drain() {
            let _ = d.acker.nack(requeue).await;
            self.ctx.channel.given_back(d.delivery_tag);
        }
        while let Ok((source, d)) = rx.try_recv() {
            let _ = d.acker.nack(requeue).await;
            if matches!(source, Source::Job(_)) {
                self.ctx.channel.given_back(d.delivery_tag);
            }
        }
        let grace = settings.consumer.stopping_wait_time();
        let drained =
            tokio::time::timeout(grace, async { while flight.tasks.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!(
                ?grace,
                left = flight.tasks.len(),
                "in-flight jobs did not finish in time; the broker will redeliver them"
            );
            flight.tasks.abort_all();
        }
        self.ctx.channel.flush().await;
        let _ = self.connection.close(200, "worker stopping".into()).await;
    }
}

impl InFlight {
    fn finished(&mut self, done: Result<(Id, ()), tokio::task::JoinError>) {
        let id = match &done {
            Ok((id, ())) => *id,
            Err(e) => {
                tracing::error!(error = %e, "delivery task failed");
                e.id()
            }
        };
        if let Some(class) = self.held_tasks.remove(&id) {
            self.turns.finished(&class);
        }
    }

    /// Starts what the turns hold, highest priority first, clients in turn, as slots free up.
    fn start_held(&mut self, ctx: &Ctx) {
        while let Some((class, route, d)) = self.turns.next_to_start() {
            let task = self.tasks.spawn(job::handle_job(ctx.clone(), route, d));
            self.held_tasks.insert(task.id(), class);
        }
    }
}

/// Starts a consumer on `queue` that forwards its deliveries to `tx`.
async fn start(
    channel: &Channel,
    queue: &str,
    tag: &str,
    source: Source,
    tx: &mpsc::Sender<(Source, Delivery)>,
) -> anyhow::Result<()> {
    let mut consumer = channel
        .basic_consume(queue.into(), tag.into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .with_context(|| format!("consuming {queue}"))?;
    let tx = tx.clone();
    let queue = queue.to_owned();
    tokio::spawn(async move {
        while let Some(next) = consumer.next().await {
            match next {
                Ok(d) => {
                    if tx.send((source.clone(), d)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, queue, "consumer stopped");
                    return;
                }
            }
        }
    });
    Ok(())
}
