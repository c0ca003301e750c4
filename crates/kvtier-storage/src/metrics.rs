//! Per-adapter operation metrics: counters and latency histograms, all relaxed atomics.
//!
//! Recording never takes a lock. The histogram has one bucket per power of two of
//! microseconds (1 µs .. ~18 h), so quantiles are upper bounds accurate to a factor of two:
//! enough to tell a 1 ms store from a 100 ms one in the status tree. Throughput figures come
//! from the `l2_throughput` bench, not from here.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

const BUCKETS: usize = 37;

/// A log2 latency histogram in microseconds.
#[derive(Debug)]
pub struct Histogram {
    buckets: [AtomicU64; BUCKETS],
    count: AtomicU64,
    sum_us: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Self {
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
            count: AtomicU64::new(0),
            sum_us: AtomicU64::new(0),
        }
    }
}

impl Histogram {
    /// Records one observation.
    pub fn record(&self, d: Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        let b = (64 - us.leading_zeros() as usize).min(BUCKETS - 1);
        if let Some(bucket) = self.buckets.get(b) {
            bucket.fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_us.fetch_add(us, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Upper bound of the `q` quantile in seconds (`None` when empty).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let target = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, bucket) in self.buckets.iter().enumerate() {
            seen += bucket.load(Relaxed);
            if seen >= target {
                let upper_us = if b == 0 { 1u64 } else { 1u64 << b };
                return Some(upper_us as f64 / 1e6);
            }
        }
        None
    }

    /// Mean in seconds (`None` when empty).
    pub fn mean(&self) -> Option<f64> {
        let n = self.count();
        (n > 0).then(|| self.sum_us.load(Relaxed) as f64 / n as f64 / 1e6)
    }
}

/// Counters of one operation kind.
#[derive(Debug, Default)]
pub struct OpStats {
    /// Batches (calls).
    pub calls: AtomicU64,
    /// Objects that succeeded.
    pub objects: AtomicU64,
    /// Payload bytes that succeeded.
    pub bytes: AtomicU64,
    /// Objects that failed.
    pub failed: AtomicU64,
    /// Per-call latency.
    pub latency: Histogram,
}

impl OpStats {
    /// Records one call.
    pub fn record(&self, ok_objects: u64, ok_bytes: u64, failed: u64, took: Duration) {
        self.calls.fetch_add(1, Relaxed);
        self.objects.fetch_add(ok_objects, Relaxed);
        self.bytes.fetch_add(ok_bytes, Relaxed);
        self.failed.fetch_add(failed, Relaxed);
        self.latency.record(took);
    }

    /// JSON for the status tree.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "calls_total": self.calls.load(Relaxed),
            "objects_total": self.objects.load(Relaxed),
            "bytes_total": self.bytes.load(Relaxed),
            "failed_objects_total": self.failed.load(Relaxed),
            "latency_mean_seconds": self.latency.mean(),
            "latency_p50_seconds": self.latency.quantile(0.5),
            "latency_p99_seconds": self.latency.quantile(0.99),
        })
    }
}

/// Everything an adapter counts.
#[derive(Debug, Default)]
pub struct AdapterStats {
    /// Stores (objects written; keys already held count as `skipped_existing`).
    pub store: OpStats,
    /// Loads.
    pub load: OpStats,
    /// Lookups (`objects` = hits, `failed` = misses are *not* failures: see `lookup_misses`).
    pub lookup: OpStats,
    /// Keys a lookup did not find.
    pub lookup_misses: AtomicU64,
    /// Deletes (`objects` = deleted).
    pub delete: OpStats,
    /// Stores skipped because the object was already held.
    pub skipped_existing: AtomicU64,
    /// Objects removed by the adapter's own eviction.
    pub evicted_objects: AtomicU64,
    /// Bytes removed by the adapter's own eviction.
    pub evicted_bytes: AtomicU64,
    /// Objects found corrupt (removed, never served).
    pub corrupt_objects: AtomicU64,
    /// Objects that vanished between lookup and load.
    pub vanished_objects: AtomicU64,
}

impl AdapterStats {
    /// Accounts for one `lookup_and_pin` of `requested` keys whose per-key result is `found`.
    pub fn record_lookup(&self, requested: usize, found: &[Option<u64>], elapsed: Duration) {
        let hits = found.iter().flatten().count() as u64;
        self.lookup_misses
            .fetch_add(requested as u64 - hits, Relaxed);
        self.lookup.record(hits, 0, 0, elapsed);
    }
}

impl AdapterStats {
    /// JSON for the status tree.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "store": self.store.to_json(),
            "load": self.load.to_json(),
            "lookup": self.lookup.to_json(),
            "lookup_misses_total": self.lookup_misses.load(Relaxed),
            "delete": self.delete.to_json(),
            "store_skipped_existing_total": self.skipped_existing.load(Relaxed),
            "evicted_objects_total": self.evicted_objects.load(Relaxed),
            "evicted_bytes_total": self.evicted_bytes.load(Relaxed),
            "corrupt_objects_total": self.corrupt_objects.load(Relaxed),
            "vanished_objects_total": self.vanished_objects.load(Relaxed),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_quantiles_are_upper_bounds() {
        let h = Histogram::default();
        assert_eq!(h.quantile(0.5), None);
        for _ in 0..99 {
            h.record(Duration::from_micros(100));
        }
        h.record(Duration::from_millis(100));
        let p50 = h.quantile(0.5).expect("non-empty");
        assert!((100e-6..=256e-6).contains(&p50), "{p50}");
        let p100 = h.quantile(1.0).expect("non-empty");
        assert!(p100 >= 0.1, "{p100}");
    }
}
