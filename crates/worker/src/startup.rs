//! Build (connect, declare, open storage), then run until told to stop.

use std::future::Future;
use std::sync::Arc;

use anyhow::Context as _;
use futures_util::StreamExt;
use gatehouse_broker::lapin::message::Delivery;
use gatehouse_broker::lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
};
use gatehouse_broker::lapin::types::FieldTable;
use gatehouse_broker::lapin::{Channel, Connection};
use gatehouse_protocol::Catalog;
use gatehouse_storage::Store;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::consumer::{self, Context};
use crate::settings::WorkerSettings;

/// A worker that is connected and has declared the topology, not yet consuming.
pub struct Worker {
    settings: WorkerSettings,
    connection: Connection,
    ctx: Arc<Context>,
}

/// Where a delivery came from.
#[derive(Clone, Copy)]
enum Source {
    Job,
    Control,
}

impl Worker {
    /// Loads the catalog, opens storage, connects to the broker and declares the topology.
    ///
    /// # Errors
    /// When any of those fails.
    pub async fn build(settings: WorkerSettings) -> anyhow::Result<Self> {
        let catalog = Catalog::load(&settings.catalog.path)?;
        let store = Store::open_sqlite(&settings.storage.path)
            .with_context(|| format!("opening {}", settings.storage.path.display()))?;
        let connection =
            gatehouse_broker::connect(settings.broker.url.expose(), "gatehouse-worker")
                .await
                .context("connecting to the broker")?;
        let setup = connection.create_channel().await?;
        settings
            .broker
            .topology()
            .declare(&setup, catalog.queues())
            .await
            .context("declaring topology")?;
        let _ = setup.close(200, "topology declared".into()).await;
        let replies = connection.create_channel().await?;
        let ctx = Arc::new(Context {
            store,
            catalog: Arc::new(catalog),
            replies,
        });
        Ok(Self {
            settings,
            connection,
            ctx,
        })
    }

    /// Consumes every job queue and the control queue until `shutdown` resolves, then stops
    /// consuming, returns unstarted deliveries to the broker, and lets in-flight jobs finish
    /// within `stopping_wait_time`.
    ///
    /// # Errors
    /// When consuming cannot start, or the broker connection is lost (the process should
    /// then be restarted; every unacked delivery comes again).
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()>) -> anyhow::Result<()> {
        let topology = self.settings.broker.topology();
        let jobs = self.connection.create_channel().await?;
        jobs.basic_qos(self.settings.consumer.prefetch, BasicQosOptions::default())
            .await?;
        let control = self.connection.create_channel().await?;
        control.basic_qos(32, BasicQosOptions::default()).await?;

        let (tx, mut rx) = mpsc::channel::<(Source, Delivery)>(64);
        let mut tags = Vec::new();
        for class in self.ctx.catalog.queues() {
            let tag = format!("worker.{}", class.name);
            start(
                &jobs,
                &topology.job_queue(&class.name),
                &tag,
                Source::Job,
                &tx,
            )
            .await?;
            tags.push((jobs.clone(), tag));
        }
        start(
            &control,
            &topology.control_queue(),
            "worker.control",
            Source::Control,
            &tx,
        )
        .await?;
        tags.push((control.clone(), "worker.control".to_owned()));
        drop(tx);
        tracing::info!(
            prefetch = self.settings.consumer.prefetch,
            "worker consuming"
        );

        let mut in_flight = JoinSet::new();
        tokio::pin!(shutdown);
        let lost = loop {
            tokio::select! {
                () = &mut shutdown => break false,
                next = rx.recv() => match next {
                    Some((Source::Job, d)) => { in_flight.spawn(consumer::handle_job(self.ctx.clone(), d)); }
                    Some((Source::Control, d)) => { in_flight.spawn(consumer::handle_control(self.ctx.clone(), d)); }
                    None => break true,
                },
                Some(done) = in_flight.join_next(), if !in_flight.is_empty() => {
                    if let Err(e) = done { tracing::error!(error = %e, "delivery task failed"); }
                }
            }
        };

        // Stop: no new deliveries; give back the ones received but not started.
        for (channel, tag) in &tags {
            let _ = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
        rx.close();
        while let Ok((_, d)) = rx.try_recv() {
            let _ = d
                .acker
                .nack(BasicNackOptions {
                    requeue: true,
                    ..Default::default()
                })
                .await;
        }
        let grace = self.settings.consumer.stopping_wait_time();
        let drained = tokio::time::timeout(grace, async {
            while in_flight.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                ?grace,
                left = in_flight.len(),
                "in-flight jobs did not finish in time; the broker will redeliver them"
            );
            in_flight.abort_all();
        }
        let _ = self.connection.close(200, "worker stopping".into()).await;
        if lost {
            anyhow::bail!("the broker connection was lost");
        }
        tracing::info!("worker stopped");
        Ok(())
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
        .basic_consume(
            queue.into(),
            tag.into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .with_context(|| format!("consuming {queue}"))?;
    let tx = tx.clone();
    let queue = queue.to_owned();
    tokio::spawn(async move {
        while let Some(next) = consumer.next().await {
            match next {
                Ok(d) => {
                    if tx.send((source, d)).await.is_err() {
                        return;
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, queue, "consumer failed");
                    return;
                }
            }
        }
    });
    Ok(())
}
