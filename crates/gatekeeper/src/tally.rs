//! Counts of what each client holds open (connections, event streams), each place given back
//! when its [`Place`] is dropped: one client can never take what the others need.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Open things per client identity.
#[derive(Debug, Default)]
pub struct Tally {
    open: Mutex<HashMap<String, usize>>,
}

/// One open thing of one client; its count goes down when this is dropped.
#[derive(Debug)]
pub struct Place {
    tally: Arc<Tally>,
    client: String,
}

impl Tally {
    /// A place for `client` when it holds fewer than `max`; `None` otherwise.
    pub fn enter(self: &Arc<Self>, client: &str, max: usize) -> Option<Place> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        let n = open.entry(client.to_owned()).or_default();
        if *n >= max {
            if *n == 0 {
                open.remove(client);
            }
            return None;
        }
        *n += 1;
        Some(Place { tally: self.clone(), client: client.to_owned() })
    }

    /// How many `client` holds.
    pub fn count(&self, client: &str) -> usize {
        self.open.lock().unwrap_or_else(PoisonError::into_inner).get(client).copied().unwrap_or(0)
    }
}

impl Drop for Place {
    fn drop(&mut self) {
        let mut open = self.tally.open.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(n) = open.get_mut(&self.client) {
            *n -= 1;
            if *n == 0 {
                open.remove(&self.client);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_are_bounded_per_client_and_given_back_when_dropped() {
        let t = Arc::new(Tally::default());
        let a: Vec<Place> = (0..3).filter_map(|_| t.enter("a", 2)).collect();
        assert_eq!(a.len(), 2, "a third place past the bound of 2");
        assert!(t.enter("b", 2).is_some(), "another client is not bounded by a's places");
        drop(a);
        assert_eq!(t.count("a"), 0);
        assert!(t.enter("a", 2).is_some());
    }
}
