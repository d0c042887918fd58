//! Acknowledgements of the job channel, in batches.
//!
//! A delivery is acknowledged only once its outcome is committed, or once it is safely
//! elsewhere (a retry queue, the dead-letter queue). One task per channel sends the acks: an
//! ack with `multiple` settles every delivery up to its tag, so the task sends one for the
//! longest run of consecutive tags that are all settled — a group commit of sixteen jobs costs
//! the broker one ack instead of sixteen. A finished delivery behind an unfinished one (a slow
//! job holding an earlier tag) is acked on its own after [`HOLD`], so that it does not keep a
//! prefetch slot for long.
//!
//! Delivery tags count 1, 2, 3… per channel; a channel lives as long as its connection, and
//! so does its `Acks`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use gatehouse_broker::lapin::Channel;
use gatehouse_broker::lapin::options::BasicAckOptions;
use tokio::sync::{mpsc, oneshot};

/// How long a finished delivery waits for the ones before it before it is acked alone.
const HOLD: Duration = Duration::from_millis(10);

enum Message {
    /// The delivery with this tag is done: acknowledge it.
    Ack(u64),
    /// The delivery was settled another way (nacked back to the queue) by its handler.
    SettledElsewhere(u64),
    /// Send every ack now, then answer.
    Flush(oneshot::Sender<()>),
}

/// The sender side; cheap to call from any delivery's task.
pub struct Acks {
    tx: mpsc::UnboundedSender<Message>,
}

impl Acks {
    /// Starts the ack task for `channel`'s deliveries; it ends when this is dropped.
    pub fn start(channel: Channel) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(channel, rx));
        Self { tx }
    }

    /// Acknowledges the delivery `tag` (soon, possibly together with others).
    pub fn ack(&self, tag: u64) {
        let _ = self.tx.send(Message::Ack(tag));
    }

    /// Tells that the delivery `tag` was settled another way, so that later acks may pass it.
    pub fn settled_elsewhere(&self, tag: u64) {
        let _ = self.tx.send(Message::SettledElsewhere(tag));
    }

    /// Sends every pending ack, including those held behind unfinished deliveries.
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Message::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

async fn run(channel: Channel, mut rx: mpsc::UnboundedReceiver<Message>) {
    let mut ledger = Ledger::default();
    loop {
        let next = if ledger.holds_any() {
            // `None`: nothing came within HOLD; look at what is overdue.
            tokio::time::timeout(HOLD, rx.recv()).await.ok()
        } else {
            Some(rx.recv().await)
        };
        let mut flushes = Vec::new();
        let closing = match next {
            Some(Some(m)) => {
                ledger.record(m, &mut flushes);
                false
            }
            Some(None) => true,
            None => false,
        };
        // A group commit finishes many deliveries at once: take what else is ready.
        tokio::task::yield_now().await;
        while let Ok(m) = rx.try_recv() {
            ledger.record(m, &mut flushes);
        }
        if let Some(tag) = ledger.advance() {
            send(&channel, tag, true).await;
        }
        let now = Instant::now();
        let cutoff = if flushes.is_empty() && !closing { now.checked_sub(HOLD) } else { Some(now) };
        for tag in cutoff.map(|c| ledger.overdue(c)).unwrap_or_default() {
            send(&channel, tag, false).await;
        }
        for done in flushes {
            let _ = done.send(());
        }
        if closing {
            break;
        }
    }
}

async fn send(channel: &Channel, tag: u64, multiple: bool) {
    if let Err(e) = channel.basic_ack(tag, BasicAckOptions { multiple }).await {
        tracing::warn!(error = %e, tag, "could not acknowledge; the broker will redeliver");
    }
}

/// Which tags are settled, and what the broker still needs to hear. Pure bookkeeping.
#[derive(Debug, Default)]
struct Ledger {
    /// Every tag up to this one is settled and acknowledged.
    upto: u64,
    /// Tags after `upto` that are finished: `Some(when)` still needs an ack, `None` is
    /// settled already (acked alone, or nacked).
    after: BTreeMap<u64, Option<Instant>>,
}

impl Ledger {
    fn record(&mut self, m: Message, flushes: &mut Vec<oneshot::Sender<()>>) {
        match m {
            Message::Ack(tag) => self.finished(tag, Instant::now()),
            Message::SettledElsewhere(tag) => self.settled(tag),
            Message::Flush(done) => flushes.push(done),
        }
    }

    fn finished(&mut self, tag: u64, at: Instant) {
        if tag > self.upto {
            self.after.insert(tag, Some(at));
        }
    }

    fn settled(&mut self, tag: u64) {
        if tag > self.upto {
            self.after.insert(tag, None);
        }
    }

    fn holds_any(&self) -> bool {
        self.after.values().any(Option::is_some)
    }

    /// Moves `upto` over the run of settled tags after it; answers the last tag of the run
    /// that needs an ack (an ack with `multiple` for it covers the run). That tag is one the
    /// broker has not seen acked, as RabbitMQ requires.
    fn advance(&mut self) -> Option<u64> {
        let mut ack = None;
        while let Some(state) = self.after.remove(&(self.upto + 1)) {
            self.upto += 1;
            if state.is_some() {
                ack = Some(self.upto);
            }
        }
        ack
    }

    /// The tags finished before `cutoff` but still behind an unsettled one: to ack alone now
    /// (they count as settled from here on).
    fn overdue(&mut self, cutoff: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        for (tag, state) in &mut self.after {
            if state.is_some_and(|at| at <= cutoff) {
                *state = None;
                out.push(*tag);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_ack_covers_a_run_of_settled_tags_and_never_passes_an_unsettled_one() {
        let t = Instant::now();
        let mut l = Ledger::default();
        for tag in [2, 3, 1, 5] {
            l.finished(tag, t);
        }
        // 4 is still running: the ack covers 1..=3 and stops.
        assert_eq!(l.advance(), Some(3));
        assert_eq!(l.advance(), None);
        l.settled(4); // nacked back to its queue by its handler
        l.finished(6, t);
        assert_eq!(l.advance(), Some(6), "the run 4..=6 is settled; 5 and 6 need the ack");
        assert!(!l.holds_any());
    }

    #[test]
    fn a_run_of_tags_settled_elsewhere_needs_no_ack() {
        let mut l = Ledger::default();
        l.settled(1);
        l.settled(2);
        assert_eq!(l.advance(), None);
        l.finished(3, Instant::now());
        assert_eq!(l.advance(), Some(3));
    }

    #[test]
    fn finished_tags_behind_a_slow_one_are_acked_alone_once_overdue_and_only_once() {
        let t = Instant::now();
        let mut l = Ledger::default();
        l.finished(2, t);
        l.finished(3, t + Duration::from_millis(20));
        assert_eq!(l.advance(), None, "1 is still running");
        assert_eq!(l.overdue(t + Duration::from_millis(10)), vec![2]);
        assert_eq!(l.overdue(t + Duration::from_millis(30)), vec![3]);
        assert!(l.overdue(t + Duration::from_secs(1)).is_empty());
        // When 1 finishes, the ack for it must not name 2 or 3 again.
        l.finished(1, t);
        assert_eq!(l.advance(), Some(1));
        assert_eq!(l.upto, 3);
    }

    #[test]
    fn late_news_of_an_already_covered_tag_is_ignored() {
        let mut l = Ledger::default();
        l.finished(1, Instant::now());
        assert_eq!(l.advance(), Some(1));
        l.finished(1, Instant::now());
        assert!(!l.holds_any());
        assert_eq!(l.advance(), None);
    }
}
