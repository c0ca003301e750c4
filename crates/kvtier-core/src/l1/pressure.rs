//! Store pressure: whether L1 is refusing stores it was asked for because nothing can make room
//! (every object read-locked by lookups or retrieves, or staging for other writers), which the
//! `l1_manager` status node reports as unhealthy with the numbers.
//!
//! Rule: L1 is *starved* while a store was refused for lack of room within the last
//! [`STARVED_WINDOW`] and no store has succeeded since the first such refusal. A successful
//! reservation ends it at once; with no traffic at all it ends when the window passes (so a pod
//! taken out of a load balancer by its readiness probe gets back in rather than staying out for
//! lack of stores to prove it healthy). Refusals for other reasons (a tenant's quota, an object
//! larger than L1) are not pressure.
//!
//! Lock-free: two relaxed atomics, updated by the store path under the L1 lock and read by the
//! status without it.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// How long after the last refusal L1 counts as starved (if no store succeeded since).
pub const STARVED_WINDOW: Duration = Duration::from_secs(10);

/// See the module docs. Times are nanoseconds since `base` (0 = never).
#[derive(Debug)]
pub struct StorePressure {
    base: Instant,
    /// First refusal since the last success.
    first_refusal: AtomicU64,
    /// Latest refusal.
    last_refusal: AtomicU64,
    /// Keys refused since the last success.
    refused_keys: AtomicU64,
}

/// A snapshot for the status tree.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Starved {
    /// Seconds since the first refusal without a success.
    pub for_seconds: f64,
    /// Keys refused since then.
    pub refused_keys: u64,
}

impl StorePressure {
    /// No refusals yet; `base` is the clock's origin.
    pub fn new(base: Instant) -> Self {
        Self {
            base,
            first_refusal: AtomicU64::new(0),
            last_refusal: AtomicU64::new(0),
            refused_keys: AtomicU64::new(0),
        }
    }

    fn nanos(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.base).as_nanos())
            .unwrap_or(u64::MAX)
            .max(1)
    }

    /// `keys` were refused for lack of room at `now`.
    pub fn refused(&self, keys: u64, now: Instant) {
        let t = self.nanos(now);
        let _ = self.first_refusal.compare_exchange(0, t, Relaxed, Relaxed);
        self.last_refusal.store(t, Relaxed);
        self.refused_keys.fetch_add(keys, Relaxed);
    }

    /// A store got room: pressure is over.
    pub fn accepted(&self) {
        if self.first_refusal.load(Relaxed) != 0 {
            self.first_refusal.store(0, Relaxed);
            self.refused_keys.store(0, Relaxed);
        }
    }

    /// `Some` while starved (see the module docs).
    pub fn starved(&self, now: Instant) -> Option<Starved> {
        let first = self.first_refusal.load(Relaxed);
        if first == 0 {
            return None;
        }
        let now = self.nanos(now);
        let last = self.last_refusal.load(Relaxed);
        if now.saturating_sub(last) > u64::try_from(STARVED_WINDOW.as_nanos()).unwrap_or(u64::MAX) {
            return None;
        }
        Some(Starved {
            for_seconds: Duration::from_nanos(now.saturating_sub(first)).as_secs_f64(),
            refused_keys: self.refused_keys.load(Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starved_until_a_success_or_a_quiet_window() {
        let t0 = Instant::now();
        let p = StorePressure::new(t0);
        assert_eq!(p.starved(t0), None);
        p.refused(3, t0 + Duration::from_secs(1));
        p.refused(2, t0 + Duration::from_secs(2));
        let s = p.starved(t0 + Duration::from_secs(3)).expect("starved");
        assert_eq!(s.refused_keys, 5);
        assert!((s.for_seconds - 2.0).abs() < 1e-6);
        // Nothing refused for longer than the window: over.
        assert_eq!(
            p.starved(t0 + Duration::from_secs(2) + STARVED_WINDOW + Duration::from_millis(1)),
            None
        );
        // A success ends it at once.
        p.refused(1, t0 + Duration::from_secs(30));
        assert!(p.starved(t0 + Duration::from_secs(30)).is_some());
        p.accepted();
        assert_eq!(p.starved(t0 + Duration::from_secs(30)), None);
    }
}
