//! The L2 backend trait.
//!
//! Contract every adapter follows (checked by the conformance suite in `testsuite`):
//! 1. **Batch first.** Every data call takes a batch of keys and answers per key, in order.
//! 2. **Lookup pins.** [`L2Backend::lookup_and_pin`] reports, per key, whether the object is
//!    stored and its length, and pins each hit against the adapter's own eviction until the
//!    caller [`unpin`](L2Backend::unpin)s it (pins are counted: two lookups need two unpins).
//!    Pins are local to this process, even for a shared remote store.
//! 3. **Loads copy into caller-reserved L1 memory.** `dst[i]` is an L1 range the caller owns
//!    (a staging reservation); its `len` must equal the stored length. On success the range
//!    holds exactly the stored bytes; on failure its contents are unspecified and the caller
//!    discards the reservation. Corrupt or truncated objects are a failure (`Corrupt`), removed
//!    from the backend and counted, and never copied as if they were good.
//! 4. **Stores copy out of read-locked L1 memory.** The caller keeps `src[i]` read-locked until
//!    the future completes. A key the adapter already holds is not rewritten (`Ok`). A store
//!    is acknowledged (`Ok`) only once it is durable in the backend's own terms (fs: file and
//!    directory fsynced; resp: the server replied OK).
//! 5. **Never hold a lock across an `.await`**; disk I/O runs on the blocking pool.
//! 6. **Fail fast when unhealthy.** While [`health`](L2Backend::health) says the backend is
//!    down, calls that need it return `Unavailable` at once (counted); a background probe
//!    brings it back.
//!
//! Intake checks (closed, batch pairing), accounting and the `errors`/`ops` status fields are
//! not the adapters' business: [`Instrumented`](crate::instrumented::Instrumented) adds them
//! around any adapter, and the adapters' constructors return it.
//!
//! The trait is dyn-safe: async methods return boxed futures ([`BoxFuture`]), and the tier
//! holds adapters as `Arc<dyn L2Backend>`.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use kvtier_core::key::ObjectKey;
use kvtier_core::l1::Allocation;
use kvtier_core::metrics::{MetricSet, MetricVisitor};
use kvtier_core::shm::ShmSegment;
use kvtier_core::status::StatusNode;
use serde::Serialize;

use crate::error::L2Error;
use crate::health::{Health, HealthSnapshot};
use crate::metrics::{AdapterEvents, UsageGauges};

/// A boxed, sendable future (what the dyn-safe async methods return).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Per-key outcome of a load or store.
pub type KeyResults = Vec<Result<(), L2Error>>;

/// Space accounting of one adapter.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Usage {
    /// Bytes of stored objects (payload bytes; headers are not counted).
    pub used_bytes: u64,
    /// Capacity limit in bytes; 0 means unlimited.
    pub capacity_bytes: u64,
    /// Stored objects.
    pub object_count: u64,
    /// Keys currently pinned by lookups.
    pub pinned_count: u64,
}

/// An L2 store. See the module docs for the contract.
pub trait L2Backend: Send + Sync + fmt::Debug + 'static {
    /// LMCache's adapter class name, reported as the status field `type`
    /// (e.g. `"FSL2Adapter"`).
    fn type_name(&self) -> &'static str;

    /// Short adapter kind as configured (`"mock"`, `"fs"`, `"resp"`).
    fn kind(&self) -> &'static str;

    /// For each key: `Some(len)` if stored (and now pinned), `None` if not. A batch-wide failure
    /// (backend unreachable) is an `Err` and pins nothing.
    fn lookup_and_pin<'a>(
        &'a self,
        keys: &'a [ObjectKey],
    ) -> BoxFuture<'a, Result<Vec<Option<u64>>, L2Error>>;

    /// Releases one pin per key. Unknown or unpinned keys are ignored.
    fn unpin<'a>(&'a self, keys: &'a [ObjectKey]) -> BoxFuture<'a, ()>;

    /// Copies each object into `segment` at `dst[i]`.
    fn load<'a>(
        &'a self,
        keys: &'a [ObjectKey],
        segment: &'a Arc<ShmSegment>,
        dst: &'a [Allocation],
    ) -> BoxFuture<'a, KeyResults>;

    /// Stores each object from `segment` at `src[i]`.
    fn store<'a>(
        &'a self,
        keys: &'a [ObjectKey],
        segment: &'a Arc<ShmSegment>,
        src: &'a [Allocation],
    ) -> BoxFuture<'a, KeyResults>;

    /// Deletes the keys that are stored and not pinned; returns how many were deleted.
    fn delete<'a>(&'a self, keys: &'a [ObjectKey]) -> BoxFuture<'a, Result<u64, L2Error>>;

    /// Space accounting (lock-free or O(1)).
    fn usage(&self) -> Usage;

    /// Starts telling `listener` which objects this adapter holds (see
    /// [`listener`](crate::listener)). Adapters without an index of their own ignore it.
    fn set_listener(&self, listener: crate::listener::BoundListener) {
        let _ = listener;
    }

    /// Sets the age past which an operation in flight makes the adapter unhealthy (the
    /// [`Instrumented`](crate::instrumented::Instrumented) decorator implements it).
    fn set_stuck_after(&self, after: std::time::Duration) {
        let _ = after;
    }

    /// Connectivity and the last error (from [`health_state`](Self::health_state); an adapter
    /// without one is always connected).
    fn health(&self) -> HealthSnapshot {
        match self.health_state() {
            Some(h) => h.snapshot(),
            None => Health::new().snapshot(),
        }
    }

    /// The adapter's status node: LMCache's fields (`type`, `stored_object_count`,
    /// `locked_key_count`, `current_size_bytes`, `max_capacity_bytes`) plus `connected`,
    /// `last_error` and its own details. [`Instrumented`](crate::instrumented::Instrumented)
    /// adds `errors` and per-operation metrics (`ops`).
    fn report_status(&self) -> StatusNode;

    /// Stops background tasks and refuses further calls (`Closed`).
    fn close(&self) -> BoxFuture<'_, ()>;

    /// The adapter's health state (its counters feed status and metrics); `None` if it keeps
    /// none.
    fn health_state(&self) -> Option<&Health> {
        None
    }

    /// Events only the adapter sees (evictions, corrupt and vanished objects, skipped stores);
    /// `None` if it counts none.
    fn events(&self) -> Option<&AdapterEvents> {
        None
    }

    /// Visits the adapter's metrics, unlabelled (the tier adds the `adapter` label): space and
    /// connectivity gauges, then [`events`](Self::events) and the
    /// [`health_state`](Self::health_state) counters. Decorators add their own.
    fn visit_metrics(&self, v: &mut dyn MetricVisitor) {
        visit_adapter_metrics(self, v);
    }
}

/// What every adapter's metrics start with (the default [`L2Backend::visit_metrics`]): space
/// and connectivity gauges, then [`events`](L2Backend::events) and the
/// [`health_state`](L2Backend::health_state) counters. Adapters that report more call this
/// first.
pub fn visit_adapter_metrics<B: L2Backend + ?Sized>(b: &B, v: &mut dyn MetricVisitor) {
    let u = b.usage();
    let g = UsageGauges::default();
    g.stored_object_count.set(u.object_count);
    g.locked_key_count.set(u.pinned_count);
    g.current_size_bytes.set(u.used_bytes);
    g.max_capacity_bytes.set(u.capacity_bytes);
    g.connected.set(u64::from(b.health().connected));
    g.visit(v);
    if let Some(e) = b.events() {
        e.visit(v);
    }
    if let Some(h) = b.health_state() {
        h.counters.visit(v);
    }
}

/// The fields every adapter's status node starts with (LMCache's adapter fields plus
/// connectivity): `type`, `stored_object_count`, `locked_key_count`, `current_size_bytes`,
/// `max_capacity_bytes`, `connected`, `last_error`, `last_error_age_seconds`.
pub(crate) fn status_head(b: &dyn L2Backend, h: &HealthSnapshot) -> StatusNode {
    let u = b.usage();
    StatusNode::healthy()
        .field("type", b.type_name())
        .field("stored_object_count", u.object_count)
        .field("locked_key_count", u.pinned_count)
        .field("current_size_bytes", u.used_bytes)
        .field("max_capacity_bytes", u.capacity_bytes)
        .field("connected", h.connected)
        .field("last_error", &h.last_error)
        .field("last_error_age_seconds", h.last_error_age_seconds)
}

/// Checks that `keys` and `allocs` pair up and that every range lies in `segment`.
pub(crate) fn check_batch(
    keys: &[ObjectKey],
    segment: &ShmSegment,
    allocs: &[Allocation],
) -> Result<(), L2Error> {
    if keys.len() != allocs.len() {
        return Err(L2Error::Invalid(format!(
            "{} keys but {} L1 ranges",
            keys.len(),
            allocs.len()
        )));
    }
    for a in allocs {
        let end = a.offset.checked_add(a.len);
        if end.is_none_or(|e| e > segment.len() as u64) {
            return Err(L2Error::Invalid(format!(
                "L1 range {}+{} lies outside the {}-byte segment",
                a.offset,
                a.len,
                segment.len()
            )));
        }
    }
    Ok(())
}

/// `len` as a `usize` (L1 ranges were checked against the segment, so this cannot fail in
/// practice; an error keeps it total).
pub(crate) fn usize_len(len: u64) -> Result<usize, L2Error> {
    usize::try_from(len).map_err(|_| L2Error::Invalid(format!("length {len} overflows usize")))
}

/// Copies an L1 range out of the segment into a new buffer.
pub(crate) fn copy_out(segment: &ShmSegment, a: Allocation) -> Result<Vec<u8>, L2Error> {
    let mut buf = vec![0u8; usize_len(a.len)?];
    segment
        .copy_out(usize_len(a.offset)?, &mut buf)
        .map_err(|e| L2Error::Invalid(e.to_string()))?;
    Ok(buf)
}

/// Copies `bytes` into the segment at `offset`.
pub(crate) fn copy_in(segment: &ShmSegment, offset: u64, bytes: &[u8]) -> Result<(), L2Error> {
    segment
        .copy_in(usize_len(offset)?, bytes)
        .map_err(|e| L2Error::Invalid(e.to_string()))
}

/// A bounded pool of reusable byte buffers for the copies between L1 and a backend.
///
/// Large fresh allocations cost page faults and zeroing on every object; reusing at most
/// `max_buffers` buffers (each at most [`BufPool::MAX_POOLED`] bytes) avoids that while bounding
/// the memory kept. Buffers keep their length when returned, so a reused buffer of the right
/// size is handed out without zeroing.
#[derive(Debug)]
pub(crate) struct BufPool {
    bufs: parking_lot::Mutex<Vec<Vec<u8>>>,
    max_buffers: usize,
}

impl BufPool {
    /// Largest buffer kept for reuse.
    pub const MAX_POOLED: usize = 256 << 20;

    pub fn new(max_buffers: usize) -> Self {
        Self {
            bufs: parking_lot::Mutex::new(Vec::new()),
            max_buffers,
        }
    }

    /// A buffer (empty or reused, contents unspecified).
    pub fn take(&self) -> Vec<u8> {
        self.bufs.lock().pop().unwrap_or_default()
    }

    /// A buffer of exactly `len` bytes (contents unspecified).
    pub fn take_len(&self, len: usize) -> Vec<u8> {
        let mut v = self.take();
        if v.len() < len {
            v.resize(len, 0);
        } else {
            v.truncate(len);
        }
        v
    }

    /// Returns a buffer for reuse (dropped if the pool is full or it is too large).
    pub fn give(&self, v: Vec<u8>) {
        if v.capacity() > Self::MAX_POOLED {
            return;
        }
        let mut bufs = self.bufs.lock();
        if bufs.len() < self.max_buffers {
            bufs.push(v);
        }
    }
}

/// The load flow of every key-value adapter (`resp`, `valkey`): refuse the batch while the
/// adapter is unhealthy, load every key concurrently (`load_one(i)` loads `keys[i]`), then sort
/// the failures. A corrupt object is counted, logged, recorded as the adapter's last error,
/// deleted from the store (`delete_corrupt`, which each adapter does its own way) and
/// un-indexed; a vanished one (indexed here, gone from the server) is counted and un-indexed,
/// so usage heals.
pub(crate) async fn load_batch<L, LF, D, DF>(
    adapter: &'static str,
    keys: &[ObjectKey],
    health: &Health,
    events: &AdapterEvents,
    index: &parking_lot::Mutex<crate::index::ObjectIndex>,
    load_one: L,
    delete_corrupt: D,
) -> KeyResults
where
    L: Fn(usize) -> LF,
    LF: Future<Output = Result<(), L2Error>>,
    D: FnOnce(Vec<ObjectKey>) -> DF,
    DF: Future<Output = ()>,
{
    if let Err(e) = health.gate() {
        return all_err(keys.len(), &e);
    }
    let results: KeyResults = futures_util::future::join_all((0..keys.len()).map(load_one)).await;
    let mut corrupt = Vec::new();
    for (k, r) in keys.iter().zip(&results) {
        match r {
            Err(L2Error::Corrupt(why)) => {
                events.corrupt_objects_total.inc();
                tracing::warn!(adapter, key = %k, %why, "corrupt l2 object: treating it as a miss and deleting it");
                health.record_error(format!("corrupt object {k}: {why}"));
                corrupt.push(k.clone());
            }
            Err(L2Error::NotFound) => {
                events.vanished_objects_total.inc();
                index.lock().remove(k);
            }
            _ => {}
        }
    }
    if !corrupt.is_empty() {
        delete_corrupt(corrupt.clone()).await;
        let mut ix = index.lock();
        for k in &corrupt {
            ix.remove(k);
        }
    }
    results
}

/// The store flow of every key-value adapter (`resp`, `valkey`): refuse the batch while the
/// adapter is unhealthy, else [`StorePlan::run`](crate::index::StorePlan::run) with the
/// adapter's eviction (`evict`) and single-object write (`write(i)` stores `keys[i]`).
pub(crate) async fn store_batch<E, W>(
    keys: &[ObjectKey],
    src: &[Allocation],
    health: &Health,
    events: &AdapterEvents,
    index: &parking_lot::Mutex<crate::index::ObjectIndex>,
    evict: impl Fn(Vec<(ObjectKey, u64)>) -> E,
    write: impl Fn(usize) -> W,
) -> KeyResults
where
    E: Future<Output = ()>,
    W: Future<Output = Result<(), L2Error>>,
{
    if let Err(e) = health.gate() {
        return all_err(keys.len(), &e);
    }
    crate::index::StorePlan::run(
        index,
        keys,
        src,
        &events.store_skipped_existing_total,
        evict,
        write,
    )
    .await
}

/// The same error for every key of a batch.
pub(crate) fn all_err(n: usize, e: &L2Error) -> KeyResults {
    (0..n).map(|_| Err(e.clone())).collect()
}
