//! In-worker ordering of quorum lanes. A quorum-queue class is several queues, one per
//! priority lane (see `gatehouse_protocol::catalog::QueueClass`); the broker orders nothing
//! across them. The worker takes deliveries from every lane (each with its prefetch), holds
//! them here, and starts at most `slots` jobs of the class at once, always the held delivery
//! of highest priority, first come first within one priority. A priority-9 job behind a
//! backlog of priority-0 ones waits for one slot, not for the backlog. Classic queues order by
//! priority in the broker and bypass this.
//!
//! Sequence order still wins over priority: that is decided in storage when the job runs
//! (`decide`), whatever order it starts in.

use std::cmp::Reverse;
use std::collections::HashMap;

use gatehouse_broker::lapin::message::Delivery;
use gatehouse_protocol::Catalog;
use priority_queue::PriorityQueue;

/// One class's held deliveries and how many of its jobs run.
#[derive(Default)]
struct Class {
    /// By arrival number: (priority, earlier first).
    order: PriorityQueue<u64, (u8, Reverse<u64>)>,
    held: HashMap<u64, (String, Delivery)>,
    running: usize,
}

/// Held deliveries of every quorum class.
pub struct Lanes {
    /// Route (lane) → its class.
    class_of: HashMap<String, String>,
    classes: HashMap<String, Class>,
    slots: usize,
    arrivals: u64,
}

impl Lanes {
    /// The lanes of `catalog`'s quorum classes; at most `slots` jobs of each class run at once.
    pub fn new(catalog: &Catalog, slots: usize) -> Self {
        let mut class_of = HashMap::new();
        for q in catalog.queues().iter().filter(|q| !q.lanes().is_empty()) {
            for route in q.routes() {
                class_of.insert(route, q.name.clone());
            }
        }
        Self { class_of, classes: HashMap::new(), slots: slots.max(1), arrivals: 0 }
    }

    /// The class of `route` if it is a lane (its deliveries are held here).
    pub fn class_of(&self, route: &str) -> Option<String> {
        self.class_of.get(route).cloned()
    }

    /// Holds a delivery of lane `route` of `class`, by the priority it carries.
    pub fn hold(&mut self, class: &str, route: String, delivery: Delivery) {
        self.arrivals += 1;
        let n = self.arrivals;
        let priority = delivery.properties.priority().unwrap_or(0);
        let c = self.classes.entry(class.to_owned()).or_default();
        c.order.push(n, (priority, Reverse(n)));
        c.held.insert(n, (route, delivery));
    }

    /// The next delivery to start, if a class has one held and a free slot: (class, route,
    /// delivery). Counted as running until [`Lanes::finished`].
    pub fn next_to_start(&mut self) -> Option<(String, String, Delivery)> {
        let slots = self.slots;
        let (class, c) = self.classes.iter_mut().find(|(_, c)| c.running < slots && !c.order.is_empty())?;
        let (n, _) = c.order.pop()?;
        let (route, delivery) = c.held.remove(&n)?;
        c.running += 1;
        Some((class.clone(), route, delivery))
    }

    /// A job of `class` that [`Lanes::next_to_start`] started has ended.
    pub fn finished(&mut self, class: &str) {
        if let Some(c) = self.classes.get_mut(class) {
            c.running = c.running.saturating_sub(1);
        }
    }

    /// Every held delivery (to give back on shutdown).
    pub fn drain(&mut self) -> Vec<Delivery> {
        self.classes
            .values_mut()
            .flat_map(|c| c.held.drain().map(|(_, (_, d))| d).collect::<Vec<_>>())
            .collect()
    }
}
