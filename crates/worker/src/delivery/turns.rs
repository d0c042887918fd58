//! Which held delivery starts next: priority first, then clients in turn.
//!
//! A quorum-queue class is several queues, one per priority lane, and a class with fair shards
//! one queue (or set of lanes) per shard of clients (see `gatehouse_protocol::catalog::
//! QueueClass`); the broker orders nothing across them. The worker takes deliveries from each
//! (each with its prefetch), holds them here, and starts at most `slots` jobs of the class at
//! once: always one of the highest priority held, and among clients with one at that
//! priority, the client whose turn it is — stride scheduling: each start moves a client's
//! *pass* on by `STRIDE / share`, the lowest pass goes next, and a client that had nothing
//! held joins at the pass of the last start (it banks no turns while idle). Within a client,
//! first come first. So a priority-9 job behind a backlog of priority-0 ones waits for one
//! slot, not for the backlog; a client with 50 jobs behind another's 50,000 waits for its
//! turns, not for the backlog; a client alone takes every slot; and with shares 3 and 1, two
//! backlogged clients start three jobs to one. Classic classes without shards order by
//! priority in the broker and bypass this.
//!
//! Sequence order still wins over priority and turns: that is decided in storage when the job
//! runs (`decide`), whatever order it starts in.

use std::cmp::Reverse;
use std::collections::HashMap;

use gatehouse_protocol::Catalog;
use priority_queue::PriorityQueue;

/// The pass a start with share 1 moves a client on by.
const STRIDE: u64 = 1 << 20;

/// One client's held deliveries in a class and its place in the turns.
struct Client {
    /// By arrival number: (priority, earlier first).
    order: PriorityQueue<u64, (u8, Reverse<u64>)>,
    pass: u64,
    share: u16,
}

/// One class's held deliveries and how many of its jobs run.
struct Class<T> {
    clients: HashMap<String, Client>,
    held: HashMap<u64, (String, T)>,
    running: usize,
    /// The pass of the last start: where a client that joins the turns begins.
    now: u64,
}

impl<T> Default for Class<T> {
    fn default() -> Self {
        Self { clients: HashMap::new(), held: HashMap::new(), running: 0, now: 0 }
    }
}

impl<T> Class<T> {
    /// The client whose held delivery starts next: highest priority, then lowest pass, then
    /// the earliest arrival.
    fn next_client(&self) -> Option<&str> {
        self.clients
            .iter()
            .filter_map(|(name, c)| {
                let (_, (priority, Reverse(arrival))) = c.order.peek()?;
                Some((name, (*priority, Reverse(c.pass), Reverse(*arrival))))
            })
            .max_by_key(|(_, key)| *key)
            .map(|(name, _)| name.as_str())
    }
}

/// Who a held delivery is from and its priority.
pub struct From {
    pub client: String,
    pub share: u16,
    pub priority: u8,
}

/// Held deliveries of every class that is held (quorum lanes, fair shards).
pub struct Turns<T> {
    /// Route (queue) → its class.
    class_of: HashMap<String, String>,
    classes: HashMap<String, Class<T>>,
    slots: usize,
    arrivals: u64,
}

impl<T> Turns<T> {
    /// The held classes of `catalog` (quorum or with fair shards); at most `slots` jobs of
    /// each class run at once.
    pub fn new(catalog: &Catalog, slots: usize) -> Self {
        let mut class_of = HashMap::new();
        for q in catalog.queues().iter().filter(|q| q.takes_turns()) {
            for route in q.routes() {
                class_of.insert(route, q.name.clone());
            }
        }
        Self { class_of, classes: HashMap::new(), slots: slots.max(1), arrivals: 0 }
    }

    /// The class of `route` if its deliveries are held here.
    pub fn class_of(&self, route: &str) -> Option<String> {
        self.class_of.get(route).cloned()
    }

    /// Holds a delivery of `route` of `class`.
    pub fn hold(&mut self, class: &str, route: String, from: From, item: T) {
        self.arrivals += 1;
        let n = self.arrivals;
        let c = self.classes.entry(class.to_owned()).or_default();
        let now = c.now;
        let client = c.clients.entry(from.client).or_insert_with(|| Client {
            order: PriorityQueue::new(),
            pass: now,
            share: from.share,
        });
        if client.order.is_empty() {
            client.pass = client.pass.max(now);
        }
        client.share = from.share.max(1);
        client.order.push(n, (from.priority, Reverse(n)));
        c.held.insert(n, (route, item));
    }

    /// The next delivery to start, if a class has one held and a free slot: (class, route,
    /// delivery). Counted as running until [`Turns::finished`].
    pub fn next_to_start(&mut self) -> Option<(String, String, T)> {
        let slots = self.slots;
        let (class, c) = self.classes.iter_mut().find(|(_, c)| c.running < slots && !c.held.is_empty())?;
        let name = c.next_client()?.to_owned();
        let client = c.clients.get_mut(&name)?;
        let (n, _) = client.order.pop()?;
        c.now = client.pass;
        client.pass += STRIDE / u64::from(client.share);
        if client.order.is_empty() {
            // Idle clients are forgotten; they join again at the pass of the moment.
            c.clients.remove(&name);
        }
        let (route, item) = c.held.remove(&n)?;
        c.running += 1;
        Some((class.clone(), route, item))
    }

    /// A job of `class` that [`Turns::next_to_start`] started has ended.
    pub fn finished(&mut self, class: &str) {
        if let Some(c) = self.classes.get_mut(class) {
            c.running = c.running.saturating_sub(1);
        }
    }

    /// Every held delivery (to give back on shutdown).
    pub fn drain(&mut self) -> Vec<T> {
        self.classes
            .values_mut()
            .flat_map(|c| {
                c.clients.clear();
                c.held.drain().map(|(_, (_, d))| d).collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn turns(slots: usize) -> Turns<(&'static str, u32)> {
        let catalog =
            Catalog::load(&std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/jobs.toml"))
                .expect("catalog");
        let mut t = Turns::new(&catalog, slots);
        t.class_of.insert("q".into(), "q".into());
        t
    }

    fn hold(t: &mut Turns<(&'static str, u32)>, client: &'static str, share: u16, priority: u8, n: u32) {
        let from = From { client: client.into(), share, priority };
        t.hold("q", "q".into(), from, (client, n));
    }

    /// Starts every held delivery one at a time; answers them in start order.
    fn run_all(t: &mut Turns<(&'static str, u32)>) -> Vec<(&'static str, u32)> {
        std::iter::from_fn(|| {
            let (class, _, item) = t.next_to_start()?;
            t.finished(&class);
            Some(item)
        })
        .collect()
    }

    #[test]
    fn a_client_behind_anothers_backlog_waits_for_its_turn_not_the_backlog() {
        let mut t = turns(1);
        for n in 0..1000 {
            hold(&mut t, "a", 1, 0, n);
        }
        for n in 0..5 {
            hold(&mut t, "b", 1, 0, n);
        }
        let order = run_all(&mut t);
        let b_last = order.iter().rposition(|(c, _)| *c == "b").unwrap();
        assert_eq!(b_last, 9, "b's five jobs alternate with a's: {:?}", &order[..12]);
        // Each client's own jobs keep their order.
        let a: Vec<u32> = order.iter().filter(|(c, _)| *c == "a").map(|(_, n)| *n).collect();
        assert!(a.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn shares_weigh_the_turns() {
        let mut t = turns(1);
        for n in 0..400 {
            hold(&mut t, "a", 3, 0, n);
            hold(&mut t, "b", 1, 0, n);
        }
        let first = &run_all(&mut t)[..400];
        let a = first.iter().filter(|(c, _)| *c == "a").count();
        assert_eq!(a, 300, "three to one while both have work");
    }

    #[test]
    fn priority_wins_over_turns_and_an_idle_client_banks_nothing() {
        let mut t = turns(1);
        for n in 0..10 {
            hold(&mut t, "a", 1, 0, n);
        }
        // a runs alone for a while: b, arriving later, gets turns from then on, not a burst.
        for _ in 0..6 {
            assert_eq!(t.next_to_start().map(|(_, _, (c, _))| c), Some("a"));
            t.finished("q");
        }
        hold(&mut t, "b", 1, 0, 0);
        hold(&mut t, "b", 1, 0, 1);
        hold(&mut t, "b", 1, 0, 2);
        hold(&mut t, "c", 1, 9, 0);
        let rest = run_all(&mut t);
        assert_eq!(rest[0], ("c", 0), "the priority-9 job first");
        let who: String = rest[1..7].iter().map(|(c, _)| c.chars().next().unwrap()).collect();
        assert!(who == "ababab" || who == "bababa", "{who}");
    }

    #[test]
    fn slots_bound_what_runs_and_a_lone_client_takes_them_all() {
        let mut t = turns(4);
        for n in 0..10 {
            hold(&mut t, "a", 1, 0, n);
        }
        let started: Vec<_> = std::iter::from_fn(|| t.next_to_start()).collect();
        assert_eq!(started.len(), 4);
        t.finished("q");
        assert!(t.next_to_start().is_some());
        assert!(t.next_to_start().is_none());
    }
}
