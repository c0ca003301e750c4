//! The live hit-rate curve (`GET /api/hit-rate-curve`, status node `hit_rate_curve`): the hit
//! rate L1 would have at other sizes, estimated online from the lookups with
//! [`kvtier_core::analysis::mrc::Shards`].
//!
//! Request path ([`HitCurve::observe`], called once per lookup through
//! [`super::LookupObserver`]): one relaxed load of the sampling threshold, one hash of the
//! lookup's tenant (model, cache salt, rank), then per chunk a multiply-xorshift mix of the
//! chunk hash's first 8 bytes and a compare. Sampled chunks (none for most lookups once the
//! rate has dropped) go as one small vector into a bounded queue (`try_send`); a full queue
//! drops the lookup and counts it (`dropped_lookups_total`). A lookup without a sampled chunk
//! only adds its chunk count to an atomic (the expected-sample count of the SHARDS_adj
//! correction). No lock, no wait.
//!
//! Thread `kvtier-hit-curve` (a [`PeriodicThread`], every 50 ms) drains the queue into the
//! estimator in batches of at most 256 lookups per lock, then publishes the new threshold and
//! reads L1's mean object size (used bytes / objects) and used bytes, which turn the
//! estimator's object distances into bytes.
//!
//! Memory bound: the estimator's tables (fixed at start, [`Shards::memory_bytes`]; 0.8 MiB for
//! the default 8192 samples) plus the queue: at most [`QUEUE_CAPACITY`] lookups of sampled
//! chunks (12 bytes each; at most the lookup's chunks, in practice a few).
//!
//! Lock order: the estimator mutex is a leaf, held by the thread for one batch (O(256 lookups
//! × sampled chunks × log S)) and by HTTP/status readers for one pass over the histogram
//! (O(buckets) per point); never taken on a request path thread.

use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use crossbeam_channel::{Receiver, Sender, TrySendError};
use kvtier_core::analysis::mrc::{ChunkRef, MODULUS, Shards, ShardsConfig, mix64, sample_value};
use kvtier_core::hash::ChunkHash;
use kvtier_core::l1::L1Manager;
use kvtier_core::metrics::{MetricDesc, MetricSet, MetricVisitor, status_fields};
use kvtier_core::periodic::PeriodicThread;
use kvtier_core::status::StatusNode;
use parking_lot::Mutex;
use serde::Serialize;

/// Lookups waiting for the thread at most.
pub const QUEUE_CAPACITY: usize = 4096;
/// Lookups folded into the estimator per lock.
const BATCH: usize = 256;
/// Sizes on the curve, as multiples of L1's capacity.
pub const RATIOS: [f64; 6] = [0.25, 0.5, 1.0, 2.0, 4.0, 8.0];

kvtier_core::metric_set! {
    /// Hit-rate curve counters (status `hit_rate_curve`, Prometheus `kvtier_hit_curve_*`).
    pub struct HitCurveCounters {
        /// Lookups seen by the curve (sampled or not).
        lookups_observed_total: Counter => "kvtier_hit_curve_lookups_observed",
        /// Chunks of those lookups.
        chunks_observed_total: Counter => "kvtier_hit_curve_chunks_observed",
        /// Chunks that passed the sampling filter on the request path.
        chunks_sampled_total: Counter => "kvtier_hit_curve_chunks_sampled",
        /// Lookups with sampled chunks dropped because the queue was full.
        dropped_lookups_total: Counter => "kvtier_hit_curve_dropped_lookups",
    }
}

/// Settings of the live curve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HitCurveConfig {
    /// Off: no sampling, no thread (`--hit-rate-curve off`).
    #[serde(rename = "hit_rate_curve")]
    pub enabled: bool,
    /// Objects the estimator tracks at most (`--hit-rate-curve-samples`).
    #[serde(rename = "hit_rate_curve_samples")]
    pub max_samples: usize,
}

impl Default for HitCurveConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            max_samples: ShardsConfig::default().max_samples,
        }
    }
}

/// What the thread last read from L1.
#[derive(Debug, Default)]
struct L1View {
    /// Mean bytes of an L1 object (0: no object seen yet).
    object_bytes: AtomicU64,
    /// Lookup-weighted mean of L1's used bytes (f64 bits).
    mean_used_bytes: AtomicU64,
}

/// The live curve: request-path sampler, queue, estimator and its thread.
#[derive(Debug)]
pub struct HitCurve {
    cfg: HitCurveConfig,
    threshold: Arc<AtomicU32>,
    tx: Sender<(u64, Vec<ChunkRef>)>,
    /// Chunks of lookups none of whose chunks was sampled, not yet counted by the thread.
    unsampled: Arc<AtomicU64>,
    shards: Arc<Mutex<Shards>>,
    view: Arc<L1View>,
    counters: Arc<HitCurveCounters>,
    /// `None` when the curve is off.
    thread: Option<PeriodicThread>,
}

/// One point of the curve.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurvePoint {
    /// Cache size.
    pub size_bytes: u64,
    /// `size_bytes` / L1's capacity.
    pub ratio_to_current: f64,
    /// Estimated hit rate (0..1) of an LRU cache of this size on the lookups seen.
    pub estimated_hit_rate: f64,
    /// Whether this is L1's configured size.
    pub current: bool,
}

/// An L2 adapter's size on the same curve.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct L2Point {
    /// `l2[i]:<type>`.
    pub adapter: String,
    /// The adapter's capacity.
    pub size_bytes: u64,
    /// `size_bytes` / L1's capacity.
    pub ratio_to_current: f64,
    /// Estimated hit rate of one cache of this size.
    pub estimated_hit_rate: f64,
}

/// `GET /api/hit-rate-curve`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurveReport {
    /// Whether the curve runs (`--hit-rate-curve`).
    pub enabled: bool,
    /// The estimation method.
    pub method: &'static str,
    /// L1's capacity (the `current` point).
    pub l1_capacity_bytes: u64,
    /// L1's used bytes, averaged over the lookups seen (the eviction watermark keeps it below
    /// the capacity).
    pub l1_mean_used_bytes: f64,
    /// Mean L1 object size used to turn object counts into bytes (null before L1 held any).
    pub object_bytes: Option<u64>,
    /// The estimate at `l1_mean_used_bytes` (what the measured hit rate is comparable to).
    pub estimated_hit_rate_at_mean_used: Option<f64>,
    /// Current sampling rate R (1 until more than `max_samples` objects were seen).
    pub sample_rate: f64,
    /// Objects tracked / the bound.
    pub tracked_objects: usize,
    /// The bound on tracked objects.
    pub max_samples: usize,
    /// Bytes held by the estimator's tables.
    pub memory_bytes: usize,
    /// Lookups seen.
    pub lookups_observed: u64,
    /// Chunks seen.
    pub chunks_observed: u64,
    /// Sampled chunk references folded into the estimate.
    pub sampled_chunks: u64,
    /// Lookups dropped at a full queue.
    pub dropped_lookups: u64,
    /// The curve: L1 sizes × [`RATIOS`] (empty until a sampled lookup and an L1 object size
    /// are known).
    pub points: Vec<CurvePoint>,
    /// L2 adapters with a known capacity.
    pub l2: Vec<L2Point>,
}

impl HitCurve {
    /// Starts the thread (when enabled).
    ///
    /// # Errors
    /// The OS error when the thread cannot be spawned.
    pub fn start(cfg: HitCurveConfig, l1: Arc<L1Manager>) -> std::io::Result<Self> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE_CAPACITY);
        let shards = Arc::new(Mutex::new(Shards::new(ShardsConfig {
            max_samples: cfg.max_samples,
        })));
        let threshold = Arc::new(AtomicU32::new(if cfg.enabled { MODULUS } else { 0 }));
        let view = Arc::new(L1View::default());
        let unsampled = Arc::new(AtomicU64::new(0));
        let mut round = Round {
            rx,
            unsampled: Arc::clone(&unsampled),
            shards: Arc::clone(&shards),
            threshold: Arc::clone(&threshold),
            view: Arc::clone(&view),
            l1,
            used_sum: 0.0,
            used_weight: 0.0,
        };
        let thread = if cfg.enabled {
            Some(
                PeriodicThread::builder("kvtier-hit-curve")
                    .interval(Duration::from_millis(50))
                    .description("hit-rate curve thread")
                    .spawn(move || {
                        round.run();
                        Ok(())
                    })?,
            )
        } else {
            None
        };
        Ok(Self {
            cfg,
            threshold,
            tx,
            unsampled,
            shards,
            view,
            counters: Arc::new(HitCurveCounters::default()),
            thread,
        })
    }

    /// Whether the curve runs.
    pub fn enabled(&self) -> bool {
        self.cfg.enabled
    }

    /// Request path: samples one lookup's chunks (see the module docs). `tenant` identifies
    /// the objects' namespace (model, cache salt, rank); `weight` is objects per chunk.
    pub fn observe(&self, tenant: u64, hashes: &[ChunkHash], weight: u32) {
        if !self.cfg.enabled {
            return;
        }
        self.counters.lookups_observed_total.inc();
        self.counters.chunks_observed_total.add(hashes.len() as u64);
        let threshold = self.threshold.load(Relaxed);
        let mut sampled = Vec::new();
        for h in hashes {
            let fingerprint = fingerprint(tenant, h);
            if sample_value(fingerprint) < threshold {
                sampled.push(ChunkRef {
                    fingerprint,
                    weight,
                });
            }
        }
        if sampled.is_empty() {
            self.unsampled.fetch_add(hashes.len() as u64, Relaxed);
            return;
        }
        self.counters.chunks_sampled_total.add(sampled.len() as u64);
        match self.tx.try_send((hashes.len() as u64, sampled)) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                self.counters.dropped_lookups_total.inc();
            }
        }
    }

    /// Stops the thread (shutdown; idempotent).
    pub fn stop(&self) {
        if let Some(t) = &self.thread {
            t.stop();
        }
    }

    /// The thread (`None` when the curve is off).
    pub fn thread(&self) -> Option<&PeriodicThread> {
        self.thread.as_ref()
    }

    /// The curve at L1's sizes × [`RATIOS`] and at each L2 capacity given (`(name, bytes)`).
    pub fn report(&self, l1_capacity: u64, l2: &[(String, u64)]) -> CurveReport {
        let object_bytes = self.view.object_bytes.load(Relaxed);
        let mean_used = f64::from_bits(self.view.mean_used_bytes.load(Relaxed));
        let shards = self.shards.lock();
        let at = |bytes: f64| -> Option<f64> {
            if object_bytes == 0 {
                return None;
            }
            shards.hit_rate(bytes / object_bytes as f64)
        };
        let points = RATIOS
            .iter()
            .filter_map(|&r| {
                let size = (l1_capacity as f64 * r) as u64;
                at(size as f64).map(|h| CurvePoint {
                    size_bytes: size,
                    ratio_to_current: r,
                    estimated_hit_rate: h,
                    current: r == 1.0,
                })
            })
            .collect();
        let l2 = l2
            .iter()
            .filter_map(|(name, bytes)| {
                at(*bytes as f64).map(|h| L2Point {
                    adapter: name.clone(),
                    size_bytes: *bytes,
                    ratio_to_current: *bytes as f64 / l1_capacity.max(1) as f64,
                    estimated_hit_rate: h,
                })
            })
            .collect();
        CurveReport {
            enabled: self.cfg.enabled,
            method: "SHARDS (fixed-size, spatial sampling), prefix-aware LRU stack distances",
            l1_capacity_bytes: l1_capacity,
            l1_mean_used_bytes: mean_used,
            object_bytes: (object_bytes > 0).then_some(object_bytes),
            estimated_hit_rate_at_mean_used: at(mean_used),
            sample_rate: shards.rate(),
            tracked_objects: shards.tracked(),
            max_samples: shards.max_samples(),
            memory_bytes: shards.memory_bytes(),
            lookups_observed: self.counters.lookups_observed_total.get(),
            chunks_observed: self.counters.chunks_observed_total.get(),
            sampled_chunks: shards.sampled_chunks(),
            dropped_lookups: self.counters.dropped_lookups_total.get(),
            points,
            l2,
        }
    }

    /// The status node `hit_rate_curve`: the thread, the sampling state and the counters.
    pub fn status_node(&self, l1_capacity: u64) -> StatusNode {
        let object_bytes = self.view.object_bytes.load(Relaxed);
        let (rate, tracked, memory, current) = {
            let s = self.shards.lock();
            let current = (object_bytes > 0)
                .then(|| s.hit_rate(l1_capacity as f64 / object_bytes as f64))
                .flatten();
            (s.rate(), s.tracked(), s.memory_bytes(), current)
        };
        let node = match &self.thread {
            Some(t) => t.status_node(),
            None => StatusNode::healthy(),
        };
        node.field("enabled", self.cfg.enabled)
            .field("sample_rate", rate)
            .field("tracked_objects", tracked)
            .field("max_samples", self.cfg.max_samples)
            .field("memory_bytes", memory)
            .field("queue_capacity", QUEUE_CAPACITY)
            .field("estimated_hit_rate_at_capacity", current)
            .fields(status_fields(self.counters.as_ref()))
    }
}

impl MetricSet for HitCurve {
    fn descriptors(&self) -> &'static [MetricDesc] {
        self.counters.descriptors()
    }

    fn visit(&self, v: &mut dyn MetricVisitor) {
        self.counters.visit(v);
        if let Some(t) = &self.thread {
            t.visit(v);
        }
    }
}

/// The namespace of a lookup's objects: one hash of model, cache salt and rank per lookup.
pub fn tenant_hash(model: &str, salt: &str, kv_rank: u32) -> u64 {
    let mut h = foldhash::fast::FixedState::with_seed(0x6b76_7469_6572).build_hasher();
    h.write(model.as_bytes());
    h.write_u8(0xff);
    h.write(salt.as_bytes());
    h.write_u32(kv_rank);
    h.finish()
}

fn fingerprint(tenant: u64, h: &ChunkHash) -> u64 {
    let b = h.as_ref();
    let mut first = [0u8; 8];
    first.copy_from_slice(&b[..8.min(b.len())]);
    mix64(u64::from_le_bytes(first) ^ tenant)
}

/// The thread's state.
struct Round {
    rx: Receiver<(u64, Vec<ChunkRef>)>,
    unsampled: Arc<AtomicU64>,
    shards: Arc<Mutex<Shards>>,
    threshold: Arc<AtomicU32>,
    view: Arc<L1View>,
    l1: Arc<L1Manager>,
    used_sum: f64,
    used_weight: f64,
}

impl Round {
    fn run(&mut self) {
        let mut batch = Vec::with_capacity(BATCH);
        let mut lookups = 0usize;
        loop {
            batch.extend(self.rx.try_iter().take(BATCH));
            if batch.is_empty() {
                break;
            }
            lookups += batch.len();
            let mut s = self.shards.lock();
            for (total, chunks) in batch.drain(..) {
                s.observe_sampled(total, chunks);
            }
            self.threshold.store(s.threshold(), Relaxed);
        }
        let unsampled = self.unsampled.swap(0, Relaxed);
        if unsampled > 0 {
            self.shards.lock().count_unsampled(unsampled);
        }
        let (used, _) = self.l1.usage();
        let objects = self.l1.counters().objects.get();
        if let Some(mean) = used.checked_div(objects) {
            self.view.object_bytes.store(mean, Relaxed);
        }
        if lookups > 0 {
            self.used_sum += used as f64 * lookups as f64;
            self.used_weight += lookups as f64;
            self.view
                .mean_used_bytes
                .store((self.used_sum / self.used_weight).to_bits(), Relaxed);
        }
    }
}

impl std::fmt::Debug for Round {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Round").finish_non_exhaustive()
    }
}
