//! Telemetry: a background sampler (`kvtier-telemetry` thread) that reads the server's counters
//! once per interval into a bounded ring of [`Sample`]s, served as `GET /api/timeseries` to the
//! dashboard (see `dashboard`), so recent history is visible without Prometheus.
//!
//! Each sample holds gauges read at the sampling instant (L1 bytes, objects, read-locked objects,
//! active sessions) and rates over the interval since the previous sample, computed from counter
//! differences: lookup hit rate (`lookup_chunks_hit` / `lookup_chunks_requested`), store and
//! retrieve chunks/s and bytes/s, RPC requests/s and errors/s, and RPC latency p50/p99 of the
//! requests of that interval (the difference of two readings of the per-op latency histograms,
//! summed over every op).
//!
//! Invariants and costs:
//! - A sample is built from relaxed atomic loads only (about 170 per op with a non-empty
//!   histogram): the sampler never takes a lock on the request path.
//! - The ring holds at most `capacity` samples; the oldest is dropped when it is full. Sequence
//!   numbers start at 1 and increase by one per sample, so a reader asks for `since=<last seq
//!   it has>` and gets only what is new; `epoch` (the sampler's start time) changes when the
//!   server restarts, telling the reader to start over.
//! - Lock order: the ring mutex is a leaf, held only to push one sample or to copy samples out
//!   (O(capacity), on the HTTP runtime, never on a request path thread).
//! - The thread is a [`PeriodicThread`] (fixed-rate cadence, missed ticks skipped after a stall)
//!   started by `Server::start`. It reports its liveness in the status tree
//!   (`telemetry.thread_alive`; the node is unhealthy when the thread died rather than being
//!   stopped) and is stopped and joined by `Server::shutdown` (also on drop).

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use kvtier_core::periodic::{MIN_INTERVAL, PeriodicThread};
use kvtier_core::status::{StatusNode, StatusReport};
use parking_lot::Mutex;
use serde::Serialize;

use crate::engine::Engine;
use crate::stats::{LatencyHistogram, RpcStats, quantile_of_counts};

/// Sampling settings.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct TelemetryConfig {
    /// Time between samples.
    #[serde(
        rename = "telemetry_interval_seconds",
        serialize_with = "crate::config::as_seconds"
    )]
    pub interval: Duration,
    /// Samples kept (the ring's capacity).
    #[serde(rename = "telemetry_samples")]
    pub capacity: usize,
}

impl Default for TelemetryConfig {
    /// One sample per second, ten minutes of history.
    fn default() -> Self {
        Self {
            interval: Duration::from_secs(1),
            capacity: 600,
        }
    }
}

/// One point of the time series. Rates are per second over `interval_seconds`, the time since
/// the previous sample; quantities that are undefined for an interval (no lookups, no requests)
/// are `null`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Sample {
    /// Sequence number (1, 2, …).
    pub seq: u64,
    /// Wall-clock time of the sample, milliseconds since the Unix epoch.
    pub unix_ms: u64,
    /// Seconds since the previous sample.
    pub interval_seconds: f64,
    /// L1 bytes in use.
    pub l1_used_bytes: u64,
    /// L1 capacity in bytes.
    pub l1_total_bytes: u64,
    /// Objects in L1.
    pub objects: u64,
    /// Objects holding at least one read lock.
    pub read_locked_objects: u64,
    /// Request sessions alive.
    pub active_sessions: u64,
    /// Chunks asked for by lookups in the interval.
    pub lookup_chunks_requested: u64,
    /// Chunks found by lookups in the interval.
    pub lookup_chunks_hit: u64,
    /// `lookup_chunks_hit / lookup_chunks_requested` over the interval (`null` without lookups).
    pub hit_rate: Option<f64>,
    /// Chunks committed by stores per second.
    pub store_chunks_per_second: f64,
    /// Bytes committed by stores per second.
    pub store_bytes_per_second: f64,
    /// Chunks handed out by retrieves per second.
    pub retrieve_chunks_per_second: f64,
    /// Bytes handed out by retrieves per second.
    pub retrieve_bytes_per_second: f64,
    /// RPC requests handled per second (every op and outcome).
    pub rpc_requests_per_second: f64,
    /// RPC requests per second that were malformed, unsupported or failed.
    pub rpc_errors_per_second: f64,
    /// Median handler latency of the interval's requests (`null` without requests).
    pub rpc_latency_p50_seconds: Option<f64>,
    /// 99th-percentile handler latency of the interval's requests (`null` without requests).
    pub rpc_latency_p99_seconds: Option<f64>,
}

/// What `GET /api/timeseries` answers.
#[derive(Debug, Clone, Serialize)]
pub struct TimeSeries {
    /// Identifies this sampler's run (its start, ms since the Unix epoch); a reader that sees it
    /// change discards what it has.
    pub epoch: u64,
    /// Configured seconds between samples.
    pub interval_seconds: f64,
    /// Samples the ring keeps.
    pub capacity: usize,
    /// Sequence number of the newest sample (0 before the first).
    pub latest_seq: u64,
    /// Samples newer than the `since` asked for, oldest first.
    pub samples: Vec<Sample>,
}

/// Counter values at one instant; two of them make a [`Sample`].
#[derive(Debug, Clone)]
struct Reading {
    at: Instant,
    unix_ms: u64,
    l1_used_bytes: u64,
    l1_total_bytes: u64,
    objects: u64,
    read_locked_objects: u64,
    active_sessions: u64,
    lookup_requested: u64,
    lookup_hit: u64,
    store_chunks: u64,
    store_bytes: u64,
    retrieve_chunks: u64,
    retrieve_bytes: u64,
    rpc_requests: u64,
    rpc_errors: u64,
    /// Latency histogram buckets summed over every op.
    rpc_buckets: Vec<u64>,
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

impl Reading {
    fn take(engine: &Engine, rpc: &RpcStats) -> Self {
        let l1 = engine.l1();
        let lc = l1.counters();
        let ec = engine.counters();
        let (used, total) = l1.usage();
        let mut rpc_buckets = vec![0u64; LatencyHistogram::BUCKET_COUNT];
        let (mut requests, mut errors) = (0u64, 0u64);
        for (_, s) in rpc.iter() {
            let ok = s.ok.load(Relaxed);
            let bad =
                s.malformed.load(Relaxed) + s.unsupported.load(Relaxed) + s.failed.load(Relaxed);
            if ok + bad == 0 {
                continue;
            }
            requests += ok + bad;
            errors += bad;
            s.latency.add_counts_to(&mut rpc_buckets);
        }
        Self {
            at: Instant::now(),
            unix_ms: unix_ms(),
            l1_used_bytes: used,
            l1_total_bytes: total,
            objects: lc.objects.get(),
            read_locked_objects: lc.read_locked_objects.get(),
            active_sessions: engine.sessions().active_count(),
            lookup_requested: ec.lookup_chunks_requested_total.get(),
            lookup_hit: ec.lookup_chunks_hit_total.get(),
            store_chunks: ec.store_chunks_committed_total.get(),
            store_bytes: ec.store_bytes_committed_total.get(),
            retrieve_chunks: ec.retrieve_chunks_total.get(),
            retrieve_bytes: ec.retrieve_bytes_total.get(),
            rpc_requests: requests,
            rpc_errors: errors,
            rpc_buckets,
        }
    }

    /// The sample of the interval from `prev` to `self`. Counters only grow; a difference that
    /// would be negative (a torn read across ops) counts as zero.
    fn sample_since(&self, prev: &Reading, seq: u64) -> Sample {
        let dt = self.at.saturating_duration_since(prev.at).as_secs_f64();
        let rate = |now: u64, before: u64| {
            if dt > 0.0 {
                now.saturating_sub(before) as f64 / dt
            } else {
                0.0
            }
        };
        let requested = self.lookup_requested.saturating_sub(prev.lookup_requested);
        let hit = self
            .lookup_hit
            .saturating_sub(prev.lookup_hit)
            .min(requested);
        let delta: Vec<u64> = self
            .rpc_buckets
            .iter()
            .zip(&prev.rpc_buckets)
            .map(|(a, b)| a.saturating_sub(*b))
            .collect();
        Sample {
            seq,
            unix_ms: self.unix_ms,
            interval_seconds: dt,
            l1_used_bytes: self.l1_used_bytes,
            l1_total_bytes: self.l1_total_bytes,
            objects: self.objects,
            read_locked_objects: self.read_locked_objects,
            active_sessions: self.active_sessions,
            lookup_chunks_requested: requested,
            lookup_chunks_hit: hit,
            hit_rate: (requested > 0).then(|| hit as f64 / requested as f64),
            store_chunks_per_second: rate(self.store_chunks, prev.store_chunks),
            store_bytes_per_second: rate(self.store_bytes, prev.store_bytes),
            retrieve_chunks_per_second: rate(self.retrieve_chunks, prev.retrieve_chunks),
            retrieve_bytes_per_second: rate(self.retrieve_bytes, prev.retrieve_bytes),
            rpc_requests_per_second: rate(self.rpc_requests, prev.rpc_requests),
            rpc_errors_per_second: rate(self.rpc_errors, prev.rpc_errors),
            rpc_latency_p50_seconds: quantile_of_counts(&delta, 0.5),
            rpc_latency_p99_seconds: quantile_of_counts(&delta, 0.99),
        }
    }
}

/// The bounded ring of samples.
#[derive(Debug)]
struct Ring {
    samples: VecDeque<Sample>,
    capacity: usize,
    latest_seq: u64,
}

impl Ring {
    fn push(&mut self, s: Sample) {
        if self.samples.len() >= self.capacity {
            self.samples.pop_front();
        }
        self.latest_seq = s.seq;
        self.samples.push_back(s);
    }
}

/// The sampler's state shared with its thread.
#[derive(Debug)]
struct Shared {
    cfg: TelemetryConfig,
    epoch: u64,
    ring: Mutex<Ring>,
}

/// Handle to the sampler thread and its ring. Stopping is explicit ([`stop`](Self::stop)) and
/// also happens on drop.
#[derive(Debug)]
pub struct Telemetry {
    shared: Arc<Shared>,
    thread: PeriodicThread,
}

impl Telemetry {
    /// Starts the `kvtier-telemetry` thread. A zero interval or capacity is raised to the
    /// smallest usable value (1 ms, 1 sample).
    pub fn spawn(
        engine: Arc<Engine>,
        rpc: Arc<RpcStats>,
        cfg: TelemetryConfig,
    ) -> std::io::Result<Self> {
        let cfg = TelemetryConfig {
            interval: cfg.interval.max(MIN_INTERVAL),
            capacity: cfg.capacity.max(1),
        };
        let shared = Arc::new(Shared {
            cfg,
            epoch: unix_ms(),
            ring: Mutex::new(Ring {
                samples: VecDeque::with_capacity(cfg.capacity),
                capacity: cfg.capacity,
                latest_seq: 0,
            }),
        });
        let t_shared = Arc::clone(&shared);
        // The first reading is the baseline of the first sample, one interval later.
        let mut prev = Reading::take(&engine, &rpc);
        let mut seq = 0u64;
        let thread = PeriodicThread::builder("kvtier-telemetry")
            .interval(cfg.interval)
            .description("telemetry sampler thread")
            .spawn(move || {
                let cur = Reading::take(&engine, &rpc);
                seq += 1;
                let sample = cur.sample_since(&prev, seq);
                t_shared.ring.lock().push(sample);
                prev = cur;
                Ok(())
            })?;
        Ok(Self { shared, thread })
    }

    /// Samples newer than `since` (all of them for `None`), oldest first.
    pub fn since(&self, since: Option<u64>) -> TimeSeries {
        let since = since.unwrap_or(0);
        let (latest_seq, samples) = {
            let ring = self.shared.ring.lock();
            let samples: Vec<Sample> = ring
                .samples
                .iter()
                .filter(|s| s.seq > since)
                .cloned()
                .collect();
            (ring.latest_seq, samples)
        };
        TimeSeries {
            epoch: self.shared.epoch,
            interval_seconds: self.shared.cfg.interval.as_secs_f64(),
            capacity: self.shared.cfg.capacity,
            latest_seq,
            samples,
        }
    }

    /// Whether the sampler thread is running.
    pub fn is_alive(&self) -> bool {
        self.thread.is_alive()
    }

    /// The runner (round timing, last error, labelled thread metrics).
    pub fn thread(&self) -> &PeriodicThread {
        &self.thread
    }

    /// Stops and joins the thread. Idempotent.
    pub fn stop(&self) {
        self.thread.stop();
    }
}

static TELEMETRY_METRICS: [kvtier_core::metrics::MetricDesc; 1] =
    [kvtier_core::metrics::MetricDesc {
        name: "kvtier_telemetry_samples",
        status_key: "samples_total",
        help: "Samples taken by the telemetry sampler.",
        unit: kvtier_core::metrics::MetricUnit::None,
        kind: kvtier_core::metrics::MetricKind::Counter,
    }];

impl kvtier_core::metrics::MetricSet for Telemetry {
    fn descriptors(&self) -> &'static [kvtier_core::metrics::MetricDesc] {
        &TELEMETRY_METRICS
    }

    fn visit(&self, v: &mut dyn kvtier_core::metrics::MetricVisitor) {
        let latest = self.shared.ring.lock().latest_seq;
        v.counter(&TELEMETRY_METRICS[0], &[], latest);
    }
}

impl StatusReport for Telemetry {
    fn report_status(&self) -> StatusNode {
        let s = &self.shared;
        let (kept, latest) = {
            let ring = s.ring.lock();
            (ring.samples.len(), ring.latest_seq)
        };
        // Every sample gets the next sequence number, so the newest one counts them all.
        self.thread
            .status_node()
            .field("interval_seconds", s.cfg.interval.as_secs_f64())
            .field("capacity", s.cfg.capacity)
            .field("samples_kept", kept)
            .field("latest_seq", latest)
            .field("samples_total", latest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(at: Instant) -> Reading {
        Reading {
            at,
            unix_ms: 1,
            l1_used_bytes: 0,
            l1_total_bytes: 100,
            objects: 0,
            read_locked_objects: 0,
            active_sessions: 0,
            lookup_requested: 0,
            lookup_hit: 0,
            store_chunks: 0,
            store_bytes: 0,
            retrieve_chunks: 0,
            retrieve_bytes: 0,
            rpc_requests: 0,
            rpc_errors: 0,
            rpc_buckets: vec![0; LatencyHistogram::BUCKET_COUNT],
        }
    }

    #[test]
    fn rates_and_hit_rate_come_from_counter_differences() {
        let t0 = Instant::now();
        let mut a = reading(t0);
        a.lookup_requested = 100;
        a.lookup_hit = 90;
        a.store_chunks = 10;
        a.store_bytes = 10 << 20;
        a.rpc_requests = 1000;
        let mut b = reading(t0 + Duration::from_secs(2));
        b.lookup_requested = 140;
        b.lookup_hit = 100;
        b.store_chunks = 30;
        b.store_bytes = 30 << 20;
        b.retrieve_chunks = 8;
        b.retrieve_bytes = 8 << 20;
        b.rpc_requests = 1100;
        b.rpc_errors = 4;
        b.objects = 7;
        let s = b.sample_since(&a, 5);
        assert_eq!(s.seq, 5);
        assert!((s.interval_seconds - 2.0).abs() < 1e-9);
        assert_eq!((s.lookup_chunks_requested, s.lookup_chunks_hit), (40, 10));
        assert_eq!(s.hit_rate, Some(0.25));
        assert!((s.store_chunks_per_second - 10.0).abs() < 1e-9);
        assert!((s.store_bytes_per_second - f64::from(10u32 << 20)).abs() < 1e-3);
        assert!((s.retrieve_chunks_per_second - 4.0).abs() < 1e-9);
        assert!((s.rpc_requests_per_second - 50.0).abs() < 1e-9);
        assert!((s.rpc_errors_per_second - 2.0).abs() < 1e-9);
        assert_eq!(s.objects, 7);
        // No requests in the interval: no latency figures.
        assert_eq!(s.rpc_latency_p99_seconds, None);
    }

    #[test]
    fn an_interval_without_lookups_has_no_hit_rate() {
        let t0 = Instant::now();
        let s = reading(t0 + Duration::from_secs(1)).sample_since(&reading(t0), 1);
        assert_eq!(s.hit_rate, None);
        assert_eq!(s.store_chunks_per_second, 0.0);
    }

    #[test]
    fn the_ring_keeps_the_newest_capacity_samples() {
        let t0 = Instant::now();
        let mut ring = Ring {
            samples: VecDeque::new(),
            capacity: 3,
            latest_seq: 0,
        };
        for seq in 1..=5 {
            ring.push(reading(t0).sample_since(&reading(t0), seq));
        }
        let seqs: Vec<u64> = ring.samples.iter().map(|s| s.seq).collect();
        assert_eq!(seqs, [3, 4, 5]);
        assert_eq!(ring.latest_seq, 5);
    }
}
