//! The PrefetchController: L2 → L1 on lookup.
//!
//! The engine takes the L1 prefix of a lookup itself and submits the remaining suffix here
//! ([`PrefetchController::submit`]); the client then polls (`query_prefetch_status`) or waits
//! (`wait_prefetch_status`) and the engine collects the result exactly once
//! ([`PrefetchController::try_take`]).
//!
//! One request, step by step (LMCache's state machine, with kvtier's fixes):
//! 1. **Lookup phase**: `lookup_and_pin` on every adapter concurrently. An adapter that fails
//!    (e.g. down) counts as holding nothing.
//! 2. **Plan**: each key goes to the lowest-index adapter that has it; the plan is cut at the
//!    first *group* (all kv ranks of one chunk) that some key of is missing everywhere, so only a
//!    contiguous prefix of whole chunks is loaded.
//! 3. **Phase-1 unpin**: keys pinned by an adapter but not planned on it are unpinned at once.
//! 4. **Reserve L1**: `reserve_write(temporary = true)` for the planned keys as one batch. If L1
//!    cannot fit the batch, the plan is halved (whole groups) and retried. A key that is already
//!    in L1 (written meanwhile) is read-locked instead of loaded. The plan is cut again at the
//!    first key that could get neither.
//! 5. **Load phase**: each adapter loads its planned keys into their L1 reservations,
//!    concurrently across adapters.
//! 6. **Phase-2 unpin** of every planned key.
//! 7. **Publish**: loaded keys become read-locked temporary L1 objects
//!    (`finish_write_and_reserve_read`, `readers` locks each, so multi-reader MLA accounting
//!    works for L2 hits too); failed reservations are aborted (never readable). The result is
//!    the prefix of whole groups that succeeded; locks beyond it are released at once (a
//!    temporary object is freed with its last lock).
//!
//! Scheduling: at most `max_in_flight` requests run at once; the rest wait in a FIFO. Queued and
//! pending requests beyond `max_queued` are answered at once with an empty result and counted
//! (`rejected_total`).
//!
//! Result ownership (no leaks): a finished result sits in the results map until it is taken
//! (the engine then owns its leases), cancelled ([`PrefetchController::cancel`]: `end_session`,
//! session expiry, a newer lookup in the same session), expired (`result_ttl`), or released at
//! shutdown. A request cancelled while running releases its result the moment it completes.
//!
//! Lock order: results mutex → L1 (inside `L1Manager`) only for releases after the entry left
//! the map; in practice releases happen after the mutex is dropped. The mutex is never held
//! across an `.await`.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use futures_util::future::join_all;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::{Allocation, L1Error, L1Manager, ReadLease, WriteTicket};
use kvtier_core::metrics::{Gauge, MetricSet, MetricVisitor};
use kvtier_core::shm::ShmSegment;
use kvtier_core::status::StatusNode;
use parking_lot::{Condvar, Mutex};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::backend::L2Backend;
use crate::metrics::{PrefetchCounters, with_fields};
use crate::task::{BackgroundTask, TaskCtx};

mod request;

use request::run_request;

/// PrefetchController settings.
#[derive(Debug, Clone)]
pub struct PrefetchConfig {
    /// Requests running at once (`--l2-prefetch-max-in-flight`, default 8).
    pub max_in_flight: usize,
    /// Requests queued (submission + pending) before new ones are rejected.
    pub max_queued: usize,
    /// A finished result not taken within this long is released.
    pub result_ttl: Duration,
}

impl Default for PrefetchConfig {
    fn default() -> Self {
        Self {
            max_in_flight: 8,
            max_queued: 4096,
            result_ttl: Duration::from_secs(300),
        }
    }
}

/// What to prefetch.
#[derive(Debug, Clone)]
pub struct PrefetchRequest {
    /// Object keys, chunk-major (`group` consecutive keys per chunk).
    pub keys: Vec<ObjectKey>,
    /// Keys per chunk (world size for scheduler lookups, else 1).
    pub group: usize,
    /// Read locks to take on each loaded object (`num_kv_readers`).
    pub readers: u32,
}

/// A finished prefetch: the loaded prefix, read-locked `readers` times per object.
#[derive(Debug)]
pub struct PrefetchResult {
    /// Keys of the prefix (a whole number of groups).
    pub keys: Vec<ObjectKey>,
    /// One lease per key.
    pub leases: Vec<ReadLease>,
    /// Keys per chunk.
    pub group: usize,
    /// Locks per lease.
    pub readers: u32,
    /// How the request went (why the prefix ends where it does).
    pub report: PrefetchReport,
}

/// How a prefetch went, beyond its loaded prefix: what the adapters held, what failed. Read by
/// lookup explanations (a miss "in L2 but not loaded" differs from "in no L2").
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrefetchReport {
    /// Whether the request ran its lookup phase (false: refused because the queue was full,
    /// cancelled before it started, or the controller was stopping).
    pub ran: bool,
    /// Adapters asked.
    pub adapters: usize,
    /// Adapters whose lookup failed (counted as holding nothing).
    pub failed_adapters: usize,
    /// Keys of the whole-chunk prefix some adapter holds.
    pub found_keys: usize,
    /// L1 could not reserve room for the whole found prefix.
    pub l1_short: bool,
    /// Keys whose load (or publish into L1) failed.
    pub load_failed_keys: usize,
    /// From the start of its lookup phase to its completion (queueing time not included).
    pub run_time: Duration,
}

impl PrefetchResult {
    fn empty(req: &PrefetchRequest) -> Self {
        Self {
            keys: Vec::new(),
            leases: Vec::new(),
            group: req.group.max(1),
            readers: req.readers,
            report: PrefetchReport::default(),
        }
    }

    /// Whole chunks in the prefix.
    pub fn chunks(&self) -> u64 {
        (self.keys.len() / self.group.max(1)) as u64
    }
}

/// What [`PrefetchController::try_take`] found.
#[derive(Debug)]
pub enum Take {
    /// Still running or queued.
    Pending,
    /// Done; the caller now owns the leases.
    Ready(PrefetchResult),
    /// No such request (already taken, cancelled, expired, or never submitted).
    Unknown,
}

/// The completion hook (a closure; shown as its presence only).
#[derive(Clone)]
struct OnDone(Arc<dyn Fn() + Send + Sync>);

impl std::fmt::Debug for OnDone {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnDone")
    }
}

#[derive(Debug, Default)]
struct Results {
    live: HashSet<u64>,
    cancelled: HashSet<u64>,
    done: HashMap<u64, (PrefetchResult, Instant)>,
}

#[derive(Debug)]
struct Shared {
    cfg: PrefetchConfig,
    l1: Arc<L1Manager>,
    segment: Arc<ShmSegment>,
    adapters: Vec<Arc<dyn L2Backend>>,
    tx: Mutex<Option<mpsc::Sender<(u64, PrefetchRequest)>>>,
    results: Mutex<Results>,
    done_cv: Condvar,
    /// Called after every completion (wakes waiters that do not block on `done_cv`).
    on_done: std::sync::OnceLock<OnDone>,
    next_id: AtomicU64,
    stopping: AtomicBool,
    c: PrefetchCounters,
}

/// The prefetch controller. See the module docs.
#[derive(Debug)]
pub struct PrefetchController {
    shared: Arc<Shared>,
    task: BackgroundTask,
    expiry: BackgroundTask,
}

/// Holds a gauge up by one while alive.
struct GaugeUp<'a>(&'a Gauge);

impl<'a> GaugeUp<'a> {
    fn up(g: &'a Gauge) -> Self {
        g.add(1);
        Self(g)
    }
}

impl Drop for GaugeUp<'_> {
    fn drop(&mut self) {
        self.0.sub(1);
    }
}

impl PrefetchController {
    /// Starts the dispatcher on `handle`.
    pub fn spawn(
        handle: &tokio::runtime::Handle,
        cfg: PrefetchConfig,
        l1: Arc<L1Manager>,
        segment: Arc<ShmSegment>,
        adapters: Vec<Arc<dyn L2Backend>>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(cfg.max_queued.max(1));
        let shared = Arc::new(Shared {
            cfg,
            l1,
            segment,
            adapters,
            tx: Mutex::new(Some(tx)),
            results: Mutex::new(Results::default()),
            done_cv: Condvar::new(),
            on_done: std::sync::OnceLock::new(),
            next_id: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            c: PrefetchCounters::default(),
        });
        let s = Arc::clone(&shared);
        let task = BackgroundTask::spawn(handle, "l2-prefetch-dispatcher", move |ctx| {
            dispatcher(s, rx, ctx)
        });
        let weak = Arc::downgrade(&shared);
        let expiry = BackgroundTask::spawn_periodic(
            handle,
            "l2-prefetch-expiry",
            Duration::from_secs(1),
            move || {
                if let Some(s) = weak.upgrade() {
                    expire_results(&s);
                }
                async { Ok(()) }
            },
        );
        Self {
            shared,
            task,
            expiry,
        }
    }

    /// Submits a request; returns its id. Never blocks. A request that cannot be queued
    /// completes at once with an empty result.
    pub fn submit(&self, req: PrefetchRequest) -> u64 {
        let s = &self.shared;
        let id = s.next_id.fetch_add(1, Relaxed);
        s.c.submitted_total.add(1);
        s.c.keys_requested_total.add(req.keys.len() as u64);
        s.results.lock().live.insert(id);
        let queued = s.c.submission_queue_size.get() + s.c.pending_queue_size.get();
        if queued >= s.cfg.max_queued as u64 {
            s.c.rejected_total.add(1);
            tracing::warn!(
                queued,
                "l2 prefetch queue full; answering the lookup from L1 only"
            );
            finish(s, id, PrefetchResult::empty(&req));
            return id;
        }
        s.c.submission_queue_size.add(1);
        let empty = PrefetchResult::empty(&req);
        let sent = match &*s.tx.lock() {
            Some(tx) => tx.try_send((id, req)).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => true,
                mpsc::error::TrySendError::Closed(_) => false,
            }),
            None => Err(false),
        };
        if let Err(full) = sent {
            s.c.submission_queue_size.sub(1);
            if full {
                s.c.rejected_total.inc();
            }
            finish(s, id, empty);
        }
        id
    }

    /// Takes the result of `id` if it is done (exactly once).
    pub fn try_take(&self, id: u64) -> Take {
        let mut r = self.shared.results.lock();
        if let Some((res, _)) = r.done.remove(&id) {
            self.shared.c.completed_results_count.sub(1);
            return Take::Ready(res);
        }
        if r.live.contains(&id) {
            Take::Pending
        } else {
            Take::Unknown
        }
    }

    /// Blocks the calling (non-async) thread until `id` is done or `timeout` passes. Returns
    /// whether it is done (or unknown). Does not take the result.
    pub fn wait(&self, id: u64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut r = self.shared.results.lock();
        loop {
            if r.done.contains_key(&id) || !r.live.contains(&id) {
                return true;
            }
            if self.shared.done_cv.wait_until(&mut r, deadline).timed_out() {
                return r.done.contains_key(&id) || !r.live.contains(&id);
            }
        }
    }

    /// Whether `id` is done (or unknown), without blocking or taking the result.
    pub fn is_done(&self, id: u64) -> bool {
        let r = self.shared.results.lock();
        r.done.contains_key(&id) || !r.live.contains(&id)
    }

    /// Sets the hook called after every completion (once; later calls are ignored). It runs on
    /// the runtime's threads with no lock held, so it must be cheap and non-blocking (an
    /// eventfd write).
    pub fn set_on_done(&self, f: Arc<dyn Fn() + Send + Sync>) {
        let _already = self.shared.on_done.set(OnDone(f));
    }

    /// Gives up on `id`: its result (now or when it completes) is released.
    pub fn cancel(&self, id: u64) {
        let s = &self.shared;
        let taken = {
            let mut r = s.results.lock();
            match r.done.remove(&id) {
                Some((res, _)) => Some(res),
                None => {
                    if r.live.contains(&id) {
                        r.cancelled.insert(id);
                    }
                    None
                }
            }
        };
        if let Some(res) = taken {
            s.c.completed_results_count.sub(1);
            s.c.cancelled_total.add(1);
            release(s, &res);
        }
    }

    /// Requests submitted and not yet taken or cancelled.
    pub fn active_jobs(&self) -> u64 {
        let r = self.shared.results.lock();
        (r.live.len() + r.done.len()) as u64
    }

    /// Stops the dispatcher: queued requests complete empty, running ones are awaited until
    /// `deadline`, and every result nobody took is released.
    pub async fn stop(&self, deadline: Duration) {
        let s = &self.shared;
        s.stopping.store(true, Relaxed);
        s.tx.lock().take();
        self.expiry.stop().await;
        if !self.task.join_within(deadline).await {
            self.task.abort().await;
            tracing::warn!("l2 prefetch stop deadline passed; abandoning running requests");
        }
        let left: Vec<PrefetchResult> = {
            let mut r = s.results.lock();
            r.live.clear();
            r.cancelled.clear();
            r.done.drain().map(|(_, (res, _))| res).collect()
        };
        s.c.completed_results_count.set(0);
        for res in &left {
            release(s, res);
        }
        notify_done(s);
    }

    /// LMCache's `prefetch_controller` node plus kvtier's counters.
    pub fn report_status(&self) -> StatusNode {
        let s = &self.shared;
        let alive = self.task.is_alive();
        let node = StatusNode::healthy()
            .require(alive, "prefetch controller task is not running")
            .field("thread_alive", alive)
            .field("max_in_flight", s.cfg.max_in_flight)
            .field("num_l2_adapters", s.adapters.len())
            .field("max_queued", s.cfg.max_queued);
        let node = self.task.report(node, "");
        let node = self.expiry.report(node, "expiry_");
        with_fields(node, &s.c)
    }

    /// Visits the controller's counters and gauges (unlabelled).
    pub fn visit_metrics(&self, v: &mut dyn MetricVisitor) {
        self.shared.c.visit(v);
    }
}

/// The status node when no adapter is configured.
pub fn disabled_status(max_in_flight: usize) -> StatusNode {
    StatusNode::healthy()
        .field("thread_alive", false)
        .field("max_in_flight", max_in_flight)
        .field("submission_queue_size", 0)
        .field("pending_queue_size", 0)
        .field("in_flight_request_count", 0)
        .field("lookup_phase_count", 0)
        .field("load_phase_count", 0)
        .field("completed_results_count", 0)
        .field("num_l2_adapters", 0)
}

fn release(s: &Shared, res: &PrefetchResult) {
    if !res.leases.is_empty() {
        s.l1.finish_read(&res.leases, res.readers);
    }
}

/// Records a finished request (or releases it if it was cancelled) and wakes waiters.
fn finish(s: &Shared, id: u64, res: PrefetchResult) {
    s.c.completed_total.add(1);
    s.c.chunks_hit_total.add(res.chunks());
    let orphan = {
        let mut r = s.results.lock();
        let was_live = r.live.remove(&id);
        if r.cancelled.remove(&id) || !was_live || s.stopping.load(Relaxed) {
            Some(res)
        } else {
            r.done.insert(id, (res, Instant::now()));
            s.c.completed_results_count.add(1);
            None
        }
    };
    if let Some(res) = orphan {
        s.c.cancelled_total.add(1);
        release(s, &res);
    }
    notify_done(s);
}

/// Wakes blocked waiters and the completion hook.
fn notify_done(s: &Shared) {
    s.done_cv.notify_all();
    if let Some(f) = s.on_done.get() {
        (f.0)();
    }
}

fn expire_results(s: &Shared) {
    let now = Instant::now();
    let expired: Vec<PrefetchResult> = {
        let mut r = s.results.lock();
        let ids: Vec<u64> = r
            .done
            .iter()
            .filter(|(_, (_, at))| now.saturating_duration_since(*at) > s.cfg.result_ttl)
            .map(|(id, _)| *id)
            .collect();
        ids.iter()
            .filter_map(|id| r.done.remove(id).map(|(res, _)| res))
            .collect()
    };
    if !expired.is_empty() {
        s.c.completed_results_count.sub(expired.len() as u64);
        s.c.expired_results_total.add(expired.len() as u64);
        tracing::info!(
            results = expired.len(),
            "releasing l2 prefetch results nobody collected"
        );
        for res in &expired {
            release(s, res);
        }
    }
}

async fn dispatcher(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<(u64, PrefetchRequest)>,
    ctx: TaskCtx,
) {
    let mut pending: VecDeque<(u64, PrefetchRequest)> = VecDeque::new();
    let mut running: JoinSet<()> = JoinSet::new();
    let mut open = true;
    loop {
        tokio::select! {
            biased;
            Some(_) = running.join_next(), if !running.is_empty() => {}
            msg = rx.recv(), if open => match msg {
                Some(job) => {
                    ctx.round();
                    shared.c.submission_queue_size.sub(1);
                    shared.c.pending_queue_size.add(1);
                    pending.push_back(job);
                }
                None => open = false,
            },
        }
        if !open {
            // Stopping: queued requests complete empty; running ones are awaited.
            for (id, req) in pending.drain(..) {
                shared.c.pending_queue_size.sub(1);
                finish(&shared, id, PrefetchResult::empty(&req));
            }
            while running.join_next().await.is_some() {}
            return;
        }
        while running.len() < shared.cfg.max_in_flight.max(1) {
            let Some((id, req)) = pending.pop_front() else {
                break;
            };
            shared.c.pending_queue_size.sub(1);
            let cancelled = shared.results.lock().cancelled.contains(&id);
            if cancelled {
                finish(&shared, id, PrefetchResult::empty(&req));
                continue;
            }
            let s = Arc::clone(&shared);
            running.spawn(async move {
                let res = run_request(&s, id, &req).await;
                finish(&s, id, res);
            });
        }
    }
}
