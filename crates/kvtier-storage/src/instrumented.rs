//! [`Instrumented`]: the one decorator that turns an adapter's bare I/O into an observable,
//! well-behaved [`L2Backend`].
//!
//! Adapters (`mock`, `fs`, `resp`) implement [`L2Backend`] for their own I/O only. Wrapping one
//! in `Instrumented` adds, uniformly for all of them:
//! - **Intake checks**: after [`close`](L2Backend::close) every call except `unpin` fails with
//!   `Closed` without reaching the adapter; loads and stores whose keys and L1 ranges do not
//!   pair up (or lie outside the segment) fail per key with `Invalid` before the adapter runs.
//! - **Accounting** ([`AdapterStats`]): every `lookup_and_pin`, `load`, `store` and `delete` is
//!   timed into the operation's latency histogram and counted (calls, objects, payload bytes,
//!   failed objects; lookups count hits as objects and misses separately). A batch-wide error
//!   counts every key of the batch as failed.
//! - **Status**: the adapter's own node, then `probe_alive` (when a probe loop runs), `errors`
//!   (its [`Health`] counters) and `ops` (the stats above plus the adapter's [`AdapterEvents`]).
//! - **Metrics**: [`L2Backend::visit_metrics`] visits the adapter's gauges and events plus the
//!   stats above.
//! - **Stuck work**: every call is registered in flight ([`InFlight`]) while it runs; the status
//!   shows, per operation, how many are in flight and the age of the oldest, and the node is
//!   unhealthy ("oldest store in flight 41.2 s") while that age exceeds the stuck threshold
//!   ([`L2Backend::set_stuck_after`], default [`DEFAULT_STUCK_AFTER`]): a hung server or a frozen
//!   disk that never answers is reported, not just one that answers with errors.
//! - **Health probe**: [`Instrumented::start_probe`] runs the adapter's probe loop (when it is a
//!   [`Prober`]) and `close` stops it before the adapter closes.
//!
//! Invariants: the decorator holds no lock across an `.await` (it holds none at all: stats are
//! relaxed atomics, the probe handle is set once); it never changes an adapter's per-key results.

use std::ops::Deref;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kvtier_core::inflight::InFlight;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::Allocation;
use kvtier_core::metrics::MetricVisitor;
use kvtier_core::shm::ShmSegment;
use kvtier_core::status::StatusNode;

use crate::backend::{BoxFuture, KeyResults, L2Backend, Usage, all_err, check_batch};
use crate::error::L2Error;
use crate::health::{Health, HealthSnapshot, ProbeLoop, Prober, spawn_probe_loop};
use crate::metrics::{AdapterEvents, AdapterStats, HealthCounters};

/// Age past which an operation in flight makes the adapter unhealthy, unless the tier sets
/// another threshold.
pub const DEFAULT_STUCK_AFTER: Duration = Duration::from_secs(30);

/// The operations tracked in flight, in status order.
const OP_KINDS: [&str; 4] = ["lookup", "load", "store", "delete"];

/// An adapter with intake checks, accounting, status and probe loop. See the module docs.
#[derive(Debug)]
pub struct Instrumented<B> {
    inner: B,
    stats: AdapterStats,
    closed: AtomicBool,
    probe: OnceLock<ProbeLoop>,
    /// In flight, by [`OP_KINDS`] index.
    in_flight: [InFlight; 4],
    stuck_after_ms: AtomicU64,
}

impl<B: L2Backend> Instrumented<B> {
    /// Wraps `inner`.
    pub fn new(inner: B) -> Self {
        Self {
            inner,
            stats: AdapterStats::default(),
            closed: AtomicBool::new(false),
            probe: OnceLock::new(),
            in_flight: Default::default(),
            stuck_after_ms: AtomicU64::new(millis(DEFAULT_STUCK_AFTER)),
        }
    }

    /// The in-flight node and whether nothing is stuck: per operation `{in_flight,
    /// oldest_seconds}`, plus the reason naming the oldest stuck operation.
    fn in_flight_status(&self) -> (serde_json::Value, Option<String>) {
        let now = Instant::now();
        let limit = Duration::from_millis(self.stuck_after_ms.load(Relaxed));
        let mut out = serde_json::Map::new();
        let mut worst: Option<(&str, Duration)> = None;
        for (name, f) in OP_KINDS.iter().zip(&self.in_flight) {
            let (n, oldest) = f.snapshot(now);
            out.insert(
                (*name).to_owned(),
                serde_json::json!({
                    "in_flight": n,
                    "oldest_seconds": oldest.map_or(0.0, |d| d.as_secs_f64()),
                }),
            );
            if let Some(age) = oldest
                && age > limit
                && worst.is_none_or(|(_, w)| age > w)
            {
                worst = Some((name, age));
            }
        }
        out.insert("stuck_after_seconds".into(), limit.as_secs_f64().into());
        let reason = worst.map(|(name, age)| {
            format!(
                "oldest {name} in flight {:.1} s (stuck after {:.1} s)",
                age.as_secs_f64(),
                limit.as_secs_f64()
            )
        });
        (out.into(), reason)
    }

    /// The wrapped adapter.
    pub fn inner(&self) -> &B {
        &self.inner
    }

    /// The operation accounting.
    pub fn stats(&self) -> &AdapterStats {
        &self.stats
    }

    /// Whether the probe loop runs (`false` when none was started).
    pub fn probe_alive(&self) -> bool {
        self.probe.get().is_some_and(ProbeLoop::is_alive)
    }

    fn check_open(&self) -> Result<(), L2Error> {
        if self.closed.load(Relaxed) {
            Err(L2Error::Closed)
        } else {
            Ok(())
        }
    }

    /// Runs a load or store through the intake checks and the accounting of `op`.
    async fn transfer<'a>(
        &'a self,
        op: Op,
        keys: &'a [ObjectKey],
        segment: &'a Arc<ShmSegment>,
        allocs: &'a [Allocation],
    ) -> KeyResults {
        let stats = match op {
            Op::Load => &self.stats.load,
            Op::Store => &self.stats.store,
        };
        let _in_flight = self.in_flight[op as usize + 1].start();
        let t = Instant::now();
        let n = keys.len() as u64;
        if let Err(e) = self
            .check_open()
            .and_then(|()| check_batch(keys, segment, allocs))
        {
            stats.record(0, 0, n, t.elapsed());
            return all_err(keys.len(), &e);
        }
        let r = match op {
            Op::Load => self.inner.load(keys, segment, allocs).await,
            Op::Store => self.inner.store(keys, segment, allocs).await,
        };
        let (ok, bytes) = ok_bytes(&r, allocs);
        stats.record(ok, bytes, n.saturating_sub(ok), t.elapsed());
        r
    }
}

impl<B: L2Backend + Prober> Instrumented<B> {
    /// Starts the adapter's probe loop on `handle` (once; later calls do nothing). The loop
    /// holds a weak reference, so it ends by itself when the adapter is dropped.
    /// `heartbeat_interval`: how often [`Prober::heartbeat`] runs while healthy.
    pub fn start_probe(
        self: &Arc<Self>,
        handle: &tokio::runtime::Handle,
        heartbeat_interval: Duration,
    ) {
        if self.probe.get().is_none() {
            let lp = spawn_probe_loop(handle, Arc::downgrade(self), heartbeat_interval);
            let _first = self.probe.set(lp);
        }
    }
}

/// Loads and stores (the discriminant + 1 is the [`OP_KINDS`] index).
#[derive(Debug, Clone, Copy)]
enum Op {
    Load = 0,
    Store = 1,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Successful objects and their bytes.
fn ok_bytes(results: &KeyResults, allocs: &[Allocation]) -> (u64, u64) {
    results
        .iter()
        .zip(allocs)
        .filter(|(r, _)| r.is_ok())
        .fold((0, 0), |(n, b), (_, a)| (n + 1, b + a.len))
}

impl<B> Deref for Instrumented<B> {
    type Target = B;

    fn deref(&self) -> &B {
        &self.inner
    }
}

impl<B: Prober> Prober for Instrumented<B> {
    fn probe_name(&self) -> &str {
        self.inner.probe_name()
    }

    fn probe_health(&self) -> &Health {
        self.inner.probe_health()
    }

    fn probe(&self) -> BoxFuture<'_, Result<(), String>> {
        self.inner.probe()
    }

    fn heartbeat(&self) -> Option<BoxFuture<'_, Result<(), String>>> {
        self.inner.heartbeat()
    }
}

impl<B: L2Backend> L2Backend for Instrumented<B> {
    fn type_name(&self) -> &'static str {
        self.inner.type_name()
    }

    fn kind(&self) -> &'static str {
        self.inner.kind()
    }

    fn lookup_and_pin<'a>(
        &'a self,
        keys: &'a [ObjectKey],
    ) -> BoxFuture<'a, Result<Vec<Option<u64>>, L2Error>> {
        Box::pin(async move {
            let _in_flight = self.in_flight[0].start();
            let t = Instant::now();
            let r = match self.check_open() {
                Ok(()) => self.inner.lookup_and_pin(keys).await,
                Err(e) => Err(e),
            };
            match &r {
                Ok(found) => self.stats.record_lookup(keys.len(), found, t.elapsed()),
                Err(_) => self
                    .stats
                    .lookup
                    .record(0, 0, keys.len() as u64, t.elapsed()),
            }
            r
        })
    }

    fn unpin<'a>(&'a self, keys: &'a [ObjectKey]) -> BoxFuture<'a, ()> {
        self.inner.unpin(keys)
    }

    fn load<'a>(
        &'a self,
        keys: &'a [ObjectKey],
        segment: &'a Arc<ShmSegment>,
        dst: &'a [Allocation],
    ) -> BoxFuture<'a, KeyResults> {
        Box::pin(self.transfer(Op::Load, keys, segment, dst))
    }

    fn store<'a>(
        &'a self,
        keys: &'a [ObjectKey],
        segment: &'a Arc<ShmSegment>,
        src: &'a [Allocation],
    ) -> BoxFuture<'a, KeyResults> {
        Box::pin(self.transfer(Op::Store, keys, segment, src))
    }

    fn delete<'a>(&'a self, keys: &'a [ObjectKey]) -> BoxFuture<'a, Result<u64, L2Error>> {
        Box::pin(async move {
            let _in_flight = self.in_flight[3].start();
            let t = Instant::now();
            let r = match self.check_open() {
                Ok(()) => self.inner.delete(keys).await,
                Err(e) => Err(e),
            };
            match &r {
                Ok(n) => self.stats.delete.record(*n, 0, 0, t.elapsed()),
                Err(_) => self
                    .stats
                    .delete
                    .record(0, 0, keys.len() as u64, t.elapsed()),
            }
            r
        })
    }

    fn set_listener(&self, listener: crate::listener::BoundListener) {
        self.inner.set_listener(listener);
    }

    fn set_stuck_after(&self, after: Duration) {
        self.stuck_after_ms.store(millis(after), Relaxed);
    }

    fn usage(&self) -> Usage {
        self.inner.usage()
    }

    fn health(&self) -> HealthSnapshot {
        self.inner.health()
    }

    fn health_state(&self) -> Option<&Health> {
        self.inner.health_state()
    }

    fn events(&self) -> Option<&AdapterEvents> {
        self.inner.events()
    }

    fn visit_metrics(&self, v: &mut dyn MetricVisitor) {
        self.inner.visit_metrics(v);
        self.stats.visit(v);
        let now = Instant::now();
        for (op, f) in OP_KINDS.iter().zip(&self.in_flight) {
            let age = f.oldest(now).map_or(0.0, |d| d.as_secs_f64());
            v.gauge(&crate::metrics::OLDEST_IN_FLIGHT, &[("op", op)], age);
        }
    }

    fn report_status(&self) -> StatusNode {
        let mut node = self.inner.report_status();
        if let Some(p) = self.probe.get() {
            let alive = p.is_alive();
            node = node
                .require(
                    self.closed.load(Relaxed) || alive,
                    "health probe task is not running",
                )
                .field("probe_alive", alive)
                .field("probe_rounds", p.task().rounds())
                .field("probe_last_error", p.task().last_error());
        }
        let errors = match self.inner.health_state() {
            Some(h) => h.counters_json(),
            None => kvtier_core::metrics::status_fields(&HealthCounters::default()).into(),
        };
        let (in_flight, stuck) = self.in_flight_status();
        let node = match stuck {
            Some(reason) => node.require(false, reason),
            None => node,
        };
        node.field("errors", errors)
            .field("ops", self.stats.to_json(self.inner.events()))
            .field("in_flight", in_flight)
    }

    fn close(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.closed.store(true, Relaxed);
            if let Some(p) = self.probe.get() {
                p.stop().await;
            }
            self.inner.close().await;
        })
    }
}
