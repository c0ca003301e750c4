//! The StoreController: write-behind from L1 to every L2 adapter.
//!
//! Policies (numbered so tests and docs can refer to them):
//! 1. **Every new L1 object goes to every adapter** (LMCache's default store policy). The engine
//!    calls [`StoreController::submit`] with the keys it just published (`commit_store`); objects
//!    loaded *from* L2 by the prefetcher are never submitted, so nothing is re-stored.
//! 2. **Bounded queue, drop newest when full.** `submit` never blocks: when the queued keys would
//!    exceed `queue_max_keys` the batch is dropped and counted (`dropped_keys_total`) with a
//!    rate-limited warning. The object stays in L1; only its L2 copy is skipped.
//! 3. **Coalescing.** A key already being stored (or repeated in a batch) is not stored again
//!    (`coalesced_keys_total`).
//! 4. **L1 read lock only while the store runs.** The controller takes one read lock per adapter
//!    on each key (`reserve_read(keys, n_adapters)`) right before dispatch; each adapter's task
//!    releases its lock as soon as its store returns. A key evicted from L1 before its turn is
//!    skipped and counted (`skipped_gone_keys_total`).
//! 5. **Failures are counted, never retried** (no retry storms): per adapter `failed_keys_total`,
//!    of which `fast_failed_keys_total` were refused at once because the adapter was down.
//! 6. **Torn-copy guard.** If a store outlived its read lock (the L1 read TTL expired, so the
//!    memory may have been reused while it was copied), the copy is deleted from that adapter and
//!    counted (`lease_expired_keys_total`) instead of being trusted.
//! 7. **Bounded concurrency**: at most `max_in_flight_tasks` adapter store calls at once; the
//!    loop waits for a slot (the queue absorbs bursts, policy 2 bounds it).
//! 8. **Shutdown flushes with a deadline**: intake stops, queued keys are dispatched and in-flight
//!    stores awaited until the deadline; what is left is abandoned and counted.
//!
//! Lock order: the in-flight map's mutex is held only for map updates (never across an
//! `.await`, never while calling L1 or an adapter).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use kvtier_core::key::ObjectKey;
use kvtier_core::l1::{Allocation, L1Manager};
use kvtier_core::metrics::{MetricSet, MetricVisitor, status_fields};
use kvtier_core::shm::ShmSegment;
use kvtier_core::status::StatusNode;
use parking_lot::Mutex;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::backend::L2Backend;
use crate::error::L2Error;
use crate::metrics::{StoreAdapterCounters, StoreCounters, with_fields};
use crate::task::{BackgroundTask, TaskCtx};

/// Most batches the submission channel holds (each holds at least one key; policy 2 bounds the
/// keys).
const MAX_QUEUED_BATCHES: usize = 1 << 16;

/// StoreController settings.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Most keys queued (policy 2).
    pub queue_max_keys: u64,
    /// Most adapter store calls in flight (policy 7).
    pub max_in_flight_tasks: usize,
    /// Keys per adapter store call.
    pub max_batch_keys: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            queue_max_keys: 1 << 16,
            max_in_flight_tasks: 8,
            max_batch_keys: 64,
        }
    }
}

#[derive(Debug, Default)]
struct AdapterCounters {
    c: StoreAdapterCounters,
    last_warn_ms: AtomicU64,
}

#[derive(Debug)]
struct Shared {
    cfg: StoreConfig,
    l1: Arc<L1Manager>,
    segment: Arc<ShmSegment>,
    adapters: Vec<Arc<dyn L2Backend>>,
    tx: Mutex<Option<mpsc::Sender<Vec<ObjectKey>>>>,
    in_flight_keys: Mutex<HashMap<ObjectKey, usize>>,
    c: StoreCounters,
    last_drop_warn_ms: AtomicU64,
    per_adapter: Vec<AdapterCounters>,
    epoch: Instant,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// True at most once per 5 s per counter (rate-limits warnings).
    fn warn_due(&self, last: &AtomicU64) -> bool {
        let now = self.now_ms().max(1);
        let prev = last.load(Relaxed);
        (prev == 0 || now >= prev.saturating_add(5000))
            && last.compare_exchange(prev, now, Relaxed, Relaxed).is_ok()
    }
}

/// The write-behind controller. See the module docs.
#[derive(Debug)]
pub struct StoreController {
    shared: Arc<Shared>,
    task: BackgroundTask,
}

struct TaskGuard(Arc<Shared>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.c.in_flight_task_count.sub(1);
    }
}

impl StoreController {
    /// Starts the controller loop on `handle`.
    pub fn spawn(
        handle: &tokio::runtime::Handle,
        cfg: StoreConfig,
        l1: Arc<L1Manager>,
        segment: Arc<ShmSegment>,
        adapters: Vec<Arc<dyn L2Backend>>,
    ) -> Self {
        // Batches in the channel never exceed the keys in it, which policy 2 bounds.
        let capacity = usize::try_from(cfg.queue_max_keys)
            .unwrap_or(usize::MAX)
            .clamp(1, MAX_QUEUED_BATCHES);
        let (tx, rx) = mpsc::channel(capacity);
        let shared = Arc::new(Shared {
            per_adapter: adapters
                .iter()
                .map(|_| AdapterCounters::default())
                .collect(),
            cfg,
            l1,
            segment,
            adapters,
            tx: Mutex::new(Some(tx)),
            in_flight_keys: Mutex::new(HashMap::new()),
            c: StoreCounters::default(),
            last_drop_warn_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let run_shared = Arc::clone(&shared);
        let task = BackgroundTask::spawn(handle, "l2-store-controller", move |ctx| {
            run(run_shared, rx, ctx)
        });
        Self { shared, task }
    }

    /// Queues newly published L1 objects for every adapter. Never blocks; returns false when
    /// the batch was dropped (queue full or controller stopped).
    pub fn submit(&self, keys: Vec<ObjectKey>) -> bool {
        if keys.is_empty() || self.shared.adapters.is_empty() {
            return true;
        }
        let s = &self.shared;
        let n = keys.len() as u64;
        s.c.submitted_keys_total.add(n);
        // Add first, then check: concurrent submits never over-admit.
        s.c.pending_keys_count.add(n);
        if s.c.pending_keys_count.get() > s.cfg.queue_max_keys {
            s.c.pending_keys_count.sub(n);
            self.drop_batch(n, "queue full");
            return false;
        }
        let sent = match &*s.tx.lock() {
            Some(tx) => tx.try_send(keys).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => "queue full",
                mpsc::error::TrySendError::Closed(_) => "controller stopped",
            }),
            None => Err("controller stopped"),
        };
        if let Err(why) = sent {
            s.c.pending_keys_count.sub(n);
            self.drop_batch(n, why);
            return false;
        }
        true
    }

    fn drop_batch(&self, n: u64, why: &str) {
        let s = &self.shared;
        s.c.dropped_keys_total.add(n);
        let total = s.c.dropped_keys_total.get();
        if s.warn_due(&s.last_drop_warn_ms) {
            tracing::warn!(
                keys = n,
                dropped_total = total,
                why,
                "l2 write-behind dropped keys (they stay in L1 but get no L2 copy)"
            );
        }
    }

    /// Keys queued and not yet dispatched.
    pub fn pending_keys(&self) -> u64 {
        self.shared.c.pending_keys_count.get()
    }

    /// Adapter store calls running.
    pub fn in_flight_tasks(&self) -> u64 {
        self.shared.c.in_flight_task_count.get()
    }

    /// Whether nothing is queued or running.
    pub fn is_idle(&self) -> bool {
        self.pending_keys() == 0 && self.in_flight_tasks() == 0
    }

    /// Keys dropped by the full-queue policy.
    pub fn dropped_keys(&self) -> u64 {
        self.shared.c.dropped_keys_total.get()
    }

    /// Keys stored by adapter `i`.
    pub fn stored_keys(&self, i: usize) -> u64 {
        self.shared
            .per_adapter
            .get(i)
            .map_or(0, |c| c.c.stored_keys_total.get())
    }

    /// Keys whose store to adapter `i` failed.
    pub fn failed_keys(&self, i: usize) -> u64 {
        self.shared
            .per_adapter
            .get(i)
            .map_or(0, |c| c.c.failed_keys_total.get())
    }

    /// Stops intake, dispatches what is queued and waits for in-flight stores until `deadline`
    /// has passed; then abandons the rest (counted).
    pub async fn stop(&self, deadline: Duration) {
        self.shared.tx.lock().take();
        if !self.task.join_within(deadline).await {
            let left = self.pending_keys() + self.in_flight_tasks();
            self.task.abort().await;
            self.shared.c.abandoned_at_shutdown_total.add(left);
            tracing::warn!(
                pending_keys = self.pending_keys(),
                in_flight_tasks = self.in_flight_tasks(),
                "l2 write-behind flush deadline passed; abandoning what is left"
            );
        }
    }

    /// Visits the controller's counters (unlabelled) and its per-adapter counters, each with
    /// `adapter` = `labels[i]`.
    pub fn visit_metrics(&self, labels: &[String], v: &mut dyn MetricVisitor) {
        let s = &self.shared;
        s.c.visit(v);
        for (c, name) in s.per_adapter.iter().zip(labels) {
            c.c.visit(&mut crate::metrics::Labelled::new(v, &[("adapter", name)]));
        }
    }

    /// LMCache's `store_controller` node plus kvtier's counters.
    pub fn report_status(&self) -> StatusNode {
        let s = &self.shared;
        let alive = self.task.is_alive();
        let per_adapter: Vec<serde_json::Value> = s
            .adapters
            .iter()
            .zip(&s.per_adapter)
            .enumerate()
            .map(|(i, (a, c))| {
                let mut m = serde_json::Map::new();
                m.insert("index".into(), i.into());
                m.insert("type".into(), a.kind().into());
                m.extend(status_fields(&c.c));
                serde_json::Value::Object(m)
            })
            .collect();
        let node = StatusNode::healthy()
            .require(alive, "store controller task is not running")
            .field("thread_alive", alive)
            .field("num_l2_adapters", s.adapters.len())
            .field("queue_max_keys", s.cfg.queue_max_keys)
            .field("max_in_flight_tasks", s.cfg.max_in_flight_tasks);
        let node = self.task.report(node, "");
        with_fields(node, &s.c).field("adapters", per_adapter)
    }
}

/// The status node when no adapter is configured (LMCache reports the controller anyway).
pub fn disabled_status() -> StatusNode {
    StatusNode::healthy()
        .field("thread_alive", false)
        .field("pending_keys_count", 0)
        .field("in_flight_task_count", 0)
        .field("num_l2_adapters", 0)
}

async fn run(shared: Arc<Shared>, mut rx: mpsc::Receiver<Vec<ObjectKey>>, ctx: TaskCtx) {
    let mut tasks: JoinSet<()> = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            msg = rx.recv() => {
                let Some(mut keys) = msg else { break };
                while keys.len() < shared.cfg.max_batch_keys {
                    match rx.try_recv() {
                        Ok(more) => keys.extend(more),
                        Err(_) => break,
                    }
                }
                ctx.round();
                let n = keys.len() as u64;
                for batch in keys.chunks(shared.cfg.max_batch_keys.max(1)) {
                    dispatch(&shared, batch, &mut tasks).await;
                }
                shared.c.pending_keys_count.sub(n);
            }
        }
    }
    while tasks.join_next().await.is_some() {}
}

/// Coalesces, read-locks and hands one batch to every adapter.
async fn dispatch(shared: &Arc<Shared>, keys: &[ObjectKey], tasks: &mut JoinSet<()>) {
    let n_adapters = shared.adapters.len();
    let fresh: Vec<ObjectKey> = {
        let mut in_flight = shared.in_flight_keys.lock();
        keys.iter()
            .filter(|k| {
                if in_flight.contains_key(*k) {
                    false
                } else {
                    in_flight.insert((*k).clone(), n_adapters);
                    true
                }
            })
            .cloned()
            .collect()
    };
    shared
        .c
        .coalesced_keys_total
        .add((keys.len() - fresh.len()) as u64);
    if fresh.is_empty() {
        return;
    }
    let readers = u32::try_from(n_adapters).unwrap_or(u32::MAX);
    // A copy for write-behind is not a read: it must not count as an access.
    let locked = shared.l1.reserve_read_quiet(&fresh, readers);
    let mut ok_keys = Vec::with_capacity(fresh.len());
    let mut leases = Vec::with_capacity(fresh.len());
    let mut gone = Vec::new();
    for (k, r) in fresh.into_iter().zip(locked) {
        match r {
            Ok(l) => {
                ok_keys.push(k);
                leases.push(l);
            }
            Err(_) => gone.push(k),
        }
    }
    if !gone.is_empty() {
        shared.c.skipped_gone_keys_total.add(gone.len() as u64);
        let mut in_flight = shared.in_flight_keys.lock();
        for k in &gone {
            in_flight.remove(k);
        }
    }
    if ok_keys.is_empty() {
        return;
    }
    let ok_keys = Arc::new(ok_keys);
    let leases = Arc::new(leases);
    for idx in 0..n_adapters {
        while tasks.len() >= shared.cfg.max_in_flight_tasks.max(1) {
            if tasks.join_next().await.is_none() {
                break;
            }
        }
        shared.c.in_flight_task_count.add(1);
        let guard = TaskGuard(Arc::clone(shared));
        let shared = Arc::clone(shared);
        let keys = Arc::clone(&ok_keys);
        let leases = Arc::clone(&leases);
        tasks.spawn(async move {
            let _guard = guard;
            store_to_adapter(&shared, idx, &keys, &leases).await;
        });
    }
}

async fn store_to_adapter(
    shared: &Arc<Shared>,
    idx: usize,
    keys: &[ObjectKey],
    leases: &[kvtier_core::l1::ReadLease],
) {
    let (Some(adapter), Some(counters)) = (shared.adapters.get(idx), shared.per_adapter.get(idx))
    else {
        return;
    };
    let allocs: Vec<Allocation> = leases.iter().map(|l| l.alloc).collect();
    let results = adapter.store(keys, &shared.segment, &allocs).await;
    let released = shared.l1.finish_read(leases, 1);
    let mut torn = Vec::new();
    let mut first_err: Option<L2Error> = None;
    let (mut stored, mut failed, mut fast) = (0u64, 0u64, 0u64);
    for ((k, r), rel) in keys.iter().zip(&results).zip(&released) {
        match (r, rel) {
            (Ok(()), Ok(())) => stored += 1,
            (Ok(()), Err(_)) => torn.push(k.clone()),
            (Err(e), _) => {
                failed += 1;
                if matches!(e, L2Error::Unavailable(_)) {
                    fast += 1;
                }
                if first_err.is_none() {
                    first_err = Some(e.clone());
                }
            }
        }
    }
    counters.c.stored_keys_total.add(stored);
    counters.c.failed_keys_total.add(failed);
    counters.c.fast_failed_keys_total.add(fast);
    if let Some(e) = first_err
        && shared.warn_due(&counters.last_warn_ms)
    {
        tracing::warn!(
            adapter = idx,
            kind = adapter.kind(),
            failed,
            failed_total = counters.c.failed_keys_total.get(),
            error = %e,
            "l2 write-behind store failed (not retried; the objects stay in L1)"
        );
    }
    if !torn.is_empty() {
        counters.c.lease_expired_keys_total.add(torn.len() as u64);
        tracing::warn!(
            adapter = idx,
            keys = torn.len(),
            "l2 store outlived its L1 read lock; deleting the possibly torn copies"
        );
        if let Err(e) = adapter.delete(&torn).await {
            tracing::warn!(adapter = idx, error = %e, "could not delete possibly torn l2 copies");
        }
    }
    let mut in_flight = shared.in_flight_keys.lock();
    for k in keys {
        if let Some(n) = in_flight.get_mut(k) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                in_flight.remove(k);
            }
        }
    }
}
