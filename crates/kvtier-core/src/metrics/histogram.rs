//! The workspace's one latency histogram: log-linear (4 sub-buckets per power of two of
//! nanoseconds, so a quantile is accurate to within ~19 %), recorded with relaxed atomic
//! increments only, so workers never contend on a lock to account for a request. RPC handlers,
//! L2 adapters and controllers all record into it; `/metrics` exposes it as exact power-of-two
//! buckets, the status tree as p50/p99, the dashboard as interval quantiles.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
#[cfg(test)]
use std::time::Duration;

const SUB_BITS: u32 = 2;
const SUBS: usize = 1 << SUB_BITS;
/// Bucket count: covers 1 ns .. 2^40 ns (~18 min).
const BUCKETS: usize = 41 * SUBS;

/// A fixed-size log-linear latency histogram.
#[derive(Debug)]
pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_ns: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_ns: AtomicU64::new(0),
        }
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUBS as u64 {
        return ns as usize;
    }
    let log = 63 - ns.leading_zeros();
    let sub = ((ns >> (log - SUB_BITS)) & (SUBS as u64 - 1)) as usize;
    ((log - SUB_BITS + 1) as usize * SUBS + sub).min(BUCKETS - 1)
}

/// Upper bound (inclusive) of a bucket in nanoseconds.
fn bucket_upper(b: usize) -> u64 {
    if b < SUBS {
        return b as u64;
    }
    let log = (b / SUBS) as u32 + SUB_BITS - 1;
    let sub = (b % SUBS) as u64;
    let base = 1u64 << log;
    let width = base >> SUB_BITS;
    base + (sub + 1) * width - 1
}

impl LatencyHistogram {
    /// Records one observation.
    pub fn record(&self, d: std::time::Duration) {
        let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(ns)].fetch_add(1, Relaxed);
        self.count.fetch_add(1, Relaxed);
        self.sum_ns.fetch_add(ns, Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.count.load(Relaxed)
    }

    /// Sum of observations in seconds.
    pub fn sum_seconds(&self) -> f64 {
        self.sum_ns.load(Relaxed) as f64 / 1e9
    }

    /// The `q` quantile (0..=1) in seconds, as the upper bound of its bucket; 0 when empty.
    pub fn quantile(&self, q: f64) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (b, c) in self.buckets.iter().enumerate() {
            seen += c.load(Relaxed);
            if seen >= rank {
                return bucket_upper(b) as f64 / 1e9;
            }
        }
        bucket_upper(BUCKETS - 1) as f64 / 1e9
    }

    /// Reads the histogram into the [`EXPOSITION_LOG2_NS`] buckets: one pass of relaxed loads,
    /// no lock, no allocation beyond the result.
    pub fn exposition(&self) -> HistogramSnapshot {
        let mut buckets = Vec::with_capacity(EXPOSITION_LOG2_NS.count() + 1);
        let mut b = 0usize;
        let mut count = 0u64;
        for k in EXPOSITION_LOG2_NS {
            let bound_ns = 1u64 << k;
            let mut interval = 0u64;
            while b < BUCKETS && bucket_upper(b) < bound_ns {
                interval += self.buckets[b].load(Relaxed);
                b += 1;
            }
            count += interval;
            buckets.push((bound_ns as f64 / 1e9, interval));
        }
        let rest: u64 = self.buckets[b..].iter().map(|c| c.load(Relaxed)).sum();
        count += rest;
        buckets.push((f64::INFINITY, rest));
        HistogramSnapshot {
            count,
            sum_seconds: self.sum_seconds(),
            buckets,
        }
    }

    /// Cumulative counts at the given upper bounds (seconds), for Prometheus exposition.
    pub fn cumulative(&self, bounds_seconds: &[f64]) -> Vec<u64> {
        let mut out = Vec::with_capacity(bounds_seconds.len());
        let mut b = 0usize;
        let mut acc = 0u64;
        for &bound in bounds_seconds {
            let bound_ns = (bound * 1e9) as u64;
            while b < BUCKETS && bucket_upper(b) <= bound_ns {
                acc += self.buckets[b].load(Relaxed);
                b += 1;
            }
            out.push(acc);
        }
        out
    }
}

/// Upper bounds of the Prometheus buckets, as powers of two of nanoseconds (2^10 ns ≈ 1 µs to
/// 2^34 ns ≈ 17 s, one per octave). They are exact edges of this histogram's buckets, so the
/// exposed cumulative counts are exact (to 1 ns), not interpolated.
pub const EXPOSITION_LOG2_NS: std::ops::RangeInclusive<u32> = 10..=34;

/// A consistent-enough reading of a histogram for Prometheus.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// Observations: the sum of the bucket counts read (so it always equals the `+Inf` bucket).
    pub count: u64,
    /// Sum of observations in seconds (read separately; may lag the buckets by in-flight records).
    pub sum_seconds: f64,
    /// `(upper bound in seconds, observations in this interval)`, *not* cumulative, ending with
    /// `f64::INFINITY`; the form `prometheus_client`'s encoder expects.
    pub buckets: Vec<(f64, u64)>,
}

/// Raw bucket access, for statistics over an interval (the telemetry sampler subtracts two
/// readings and takes the quantile of the difference).
impl LatencyHistogram {
    /// Number of buckets of every histogram (the length [`add_counts_to`](Self::add_counts_to)
    /// expects).
    pub const BUCKET_COUNT: usize = BUCKETS;

    /// Adds each bucket's count to the matching element of `acc` (one pass of relaxed loads).
    /// Extra elements of `acc` are left alone; missing ones are skipped.
    pub fn add_counts_to(&self, acc: &mut [u64]) {
        for (a, c) in acc.iter_mut().zip(self.buckets.iter()) {
            *a += c.load(Relaxed);
        }
    }
}

/// The `q` quantile (0..=1) in seconds of bucket counts read with
/// [`LatencyHistogram::add_counts_to`] (or differences of two such readings), as the upper bound
/// of its bucket; `None` when the counts are all zero.
pub fn quantile_of_counts(counts: &[u64], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
    let mut seen = 0;
    for (b, &c) in counts.iter().enumerate() {
        seen += c;
        if seen >= rank {
            return Some(bucket_upper(b.min(BUCKETS - 1)) as f64 / 1e9);
        }
    }
    Some(bucket_upper(BUCKETS - 1) as f64 / 1e9)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_contain_their_values() {
        let mut prev = 0;
        for ns in [0u64, 1, 3, 4, 5, 7, 8, 100, 1_000, 65_535, 1 << 30] {
            let b = bucket_of(ns);
            assert!(b >= prev);
            prev = b;
            assert!(
                bucket_upper(b) >= ns,
                "{ns} above bucket {b} upper {}",
                bucket_upper(b)
            );
            if b > 0 {
                assert!(bucket_upper(b - 1) < ns || ns < SUBS as u64);
            }
        }
    }

    #[test]
    fn quantiles_are_within_a_bucket() {
        let h = LatencyHistogram::default();
        for us in 1..=100u64 {
            h.record(Duration::from_micros(us));
        }
        let p50 = h.quantile(0.5);
        assert!((50e-6..=63e-6).contains(&p50), "p50 {p50}");
        let p99 = h.quantile(0.99);
        assert!((99e-6..=125e-6).contains(&p99), "p99 {p99}");
        assert_eq!(h.count(), 100);
        let cum = h.cumulative(&[1e-6, 1e-3]);
        assert_eq!(cum[1], 100);
    }

    #[test]
    fn exposition_buckets_are_exact_octaves() {
        let h = LatencyHistogram::default();
        // 1023 ns is below the first bound (1024 ns); 1024 ns is not.
        h.record(Duration::from_nanos(1023));
        h.record(Duration::from_nanos(1024));
        h.record(Duration::from_nanos(2047));
        h.record(Duration::from_micros(3));
        h.record(Duration::from_secs(60));
        let snap = h.exposition();
        assert_eq!(snap.count, 5);
        assert_eq!(snap.buckets.len(), EXPOSITION_LOG2_NS.count() + 1);
        assert_eq!(snap.buckets[0], (1024e-9, 1));
        assert_eq!(snap.buckets[1], (2048e-9, 2));
        assert_eq!(snap.buckets[2], (4096e-9, 1));
        let last = snap.buckets[snap.buckets.len() - 1];
        assert_eq!(last, (f64::INFINITY, 1));
        assert_eq!(snap.buckets.iter().map(|b| b.1).sum::<u64>(), 5);
        assert!((snap.sum_seconds - 60.000_007_094).abs() < 1e-9);
    }

    #[test]
    fn quantile_of_count_differences_sees_only_the_interval() {
        let h = LatencyHistogram::default();
        for _ in 0..1000 {
            h.record(Duration::from_millis(10));
        }
        let mut before = vec![0u64; LatencyHistogram::BUCKET_COUNT];
        h.add_counts_to(&mut before);
        for _ in 0..100 {
            h.record(Duration::from_micros(20));
        }
        let mut after = vec![0u64; LatencyHistogram::BUCKET_COUNT];
        h.add_counts_to(&mut after);
        let delta: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        let p99 = quantile_of_counts(&delta, 0.99).expect("non-empty interval");
        assert!((20e-6..=25e-6).contains(&p99), "interval p99 {p99}");
        // The cumulative p99 is still dominated by the earlier 10 ms observations.
        assert!(h.quantile(0.99) >= 10e-3);
        assert_eq!(
            quantile_of_counts(&vec![0; LatencyHistogram::BUCKET_COUNT], 0.99),
            None
        );
    }
}
