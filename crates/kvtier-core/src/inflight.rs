//! In-flight operation tracking: when did the oldest operation of a kind start, so that work
//! stuck on the outside world (a hung Redis, a frozen disk) shows up in the status tree as an
//! age and turns its node unhealthy past a threshold, instead of being reported healthy because
//! no error ever came back.
//!
//! [`InFlight::start`] returns a guard that ends the operation when dropped (also when a future
//! holding it is cancelled). Slots are reused, so memory is bounded by the peak number of
//! operations in flight at once. The mutex is a leaf held for O(1) work by start/end;
//! [`InFlight::oldest`] (status only) scans the slots, O(peak concurrency).

use std::time::{Duration, Instant};

use parking_lot::Mutex;

#[derive(Debug, Default)]
struct Slots {
    starts: Vec<Option<Instant>>,
    free: Vec<usize>,
}

/// Start times of the operations of one kind now in flight. See the module docs.
#[derive(Debug, Default)]
pub struct InFlight {
    slots: Mutex<Slots>,
}

/// Ends its operation when dropped.
#[derive(Debug)]
#[must_use = "the operation ends when the guard is dropped"]
pub struct InFlightGuard<'a> {
    owner: &'a InFlight,
    slot: usize,
}

impl InFlight {
    /// Records an operation starting now.
    pub fn start(&self) -> InFlightGuard<'_> {
        let now = Instant::now();
        let mut s = self.slots.lock();
        let slot = match s.free.pop() {
            Some(i) => {
                s.starts[i] = Some(now);
                i
            }
            None => {
                s.starts.push(Some(now));
                s.starts.len() - 1
            }
        };
        InFlightGuard { owner: self, slot }
    }

    /// Operations in flight, and the age of the oldest at `now`.
    pub fn snapshot(&self, now: Instant) -> (usize, Option<Duration>) {
        let s = self.slots.lock();
        let mut count = 0;
        let mut oldest: Option<Instant> = None;
        for t in s.starts.iter().flatten() {
            count += 1;
            oldest = Some(oldest.map_or(*t, |o| o.min(*t)));
        }
        (count, oldest.map(|t| now.saturating_duration_since(t)))
    }

    /// The age of the oldest operation in flight at `now`.
    pub fn oldest(&self, now: Instant) -> Option<Duration> {
        self.snapshot(now).1
    }
}

impl Drop for InFlightGuard<'_> {
    fn drop(&mut self) {
        let mut s = self.owner.slots.lock();
        if let Some(t) = s.starts.get_mut(self.slot) {
            *t = None;
            s.free.push(self.slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oldest_follows_the_operations_in_flight() {
        let f = InFlight::default();
        assert_eq!(f.snapshot(Instant::now()), (0, None));
        let a = f.start();
        std::thread::sleep(Duration::from_millis(20));
        let before_b = Instant::now();
        let b = f.start();
        let (n, oldest) = f.snapshot(Instant::now());
        assert_eq!(n, 2);
        assert!(oldest.expect("two in flight") >= Duration::from_millis(20));
        drop(a);
        // Only b is left, and b is no older than the time since just before it started.
        let now = Instant::now();
        assert!(f.oldest(now).expect("one left") <= now - before_b);
        drop(b);
        assert_eq!(f.snapshot(Instant::now()), (0, None));
        // Slots are reused.
        let _c = f.start();
        assert_eq!(f.slots.lock().starts.len(), 2);
    }
}
