//! The cache engine: LMCache 0.5.6's MP-server semantics over kvtier's L1, as components that
//! each own their state.
//!
//! [`Engine::handle`] takes one decoded [`Request`] and returns a typed [`Response`] or an
//! [`EngineError`]; it knows nothing of msgpack, ZeroMQ or HTTP (`crate::service` encodes,
//! picks the failure reply and counts the outcome). It never panics on client input.
//!
//! Components (one file each), composed here over a small shared context ([`Shared`]: L1,
//! the segment, sessions, the worker registry, the L2 link, counters):
//! - [`session`]: sessions own token hashing and *every* step of lock bookkeeping;
//! - [`instances`]: the registry of engine workers and its one liveness rule and reaper;
//! - [`engine_driven`]: `register_kv_cache_engine_driven_context`, prepare/commit store and
//!   retrieve, and the pending transfers they own;
//! - [`lookup`]: `lookup`, `query_prefetch_status`/`wait_prefetch_status`,
//!   `free_lookup_locks`, `end_session`;
//! - [`l2`]: the engine's link to the L2 tier (write-behind on publish, prefetch on lookup);
//! - [`lmcache_driven`]: `register_kv_cache`, `store`, `retrieve`, `/cache/checksums`;
//! - [`kv_events`]: the KV-event replay log and `subscribe_kv_events` streams;
//! - [`explain`]: recent lookup records and why each prefix ended (`kvtier explain`);
//! - [`status`]: the engine's subtree of the status tree and its metric sets.
//!
//! Ownership of locks (the invariant that keeps kvtier leak-free): every read lock taken for a
//! client is owned by exactly one session record or one pending retrieve, and every staging
//! object by one pending store. `end_session`, `free_lookup_locks`, commits, unregistration,
//! worker reaping and the housekeeping sweeps each release what they own.
//!
//! Lock order (one table for the engine): instance registry (leaf) · pending-transfer maps →
//! session table → session mutex → L2 prefetch results → L1 (inside `L1Manager`). No lock is
//! held across I/O; L1 calls are O(keys in the request).

mod dispatch;
pub mod engine_driven;
pub mod explain;
pub mod instances;
pub mod kv_events;
pub mod l2;
pub mod lmcache_driven;
pub mod lookup;
pub mod session;
pub mod status;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use kvtier_core::hash::TokenHasher;
use kvtier_core::l1::controller::EvictionController;
use kvtier_core::l1::{ClearOutcome, L1Listener, L1Manager, Listeners};
use kvtier_core::shm::ShmSegment;
use kvtier_proto::{Request, Response};
use kvtier_storage::L2Tier;

use self::engine_driven::EngineDriven;
use self::explain::Explainer;
use self::instances::{Instances, Liveness, Removed};
use self::kv_events::{KvEvents, Subscription};
use self::l2::L2Link;
use self::lmcache_driven::LmcacheDriven;
use self::lmcache_driven::checksums::{ChecksumError, ChecksumRequest};
use self::session::Sessions;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per chunk.
    pub chunk_size: usize,
    /// Session idle TTL.
    pub session_ttl: Duration,
    /// Most live sessions; creating one more evicts the least recently used idle one.
    pub max_sessions: usize,
    /// An engine instance silent for this long after a ping is unregistered (0 disables).
    pub worker_reap_timeout: Duration,
    /// Grace period before the first ping.
    pub worker_registration_grace: Duration,
    /// KV-event records kept for replay (0 disables KV events).
    pub kv_event_log_size: usize,
    /// Lookup records kept for explanations (0 disables them and the chunk history).
    pub lookup_records: usize,
    /// Slots of the chunk history that explains misses (16 bytes each).
    pub miss_history_chunks: usize,
}

/// Why a request failed; the service logs it, counts it, and sends the op's failure value.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is invalid.
    #[error("{0}")]
    Malformed(String),
    /// The operation is not implemented by kvtier.
    #[error("operation {0} is not implemented by kvtier")]
    Unsupported(&'static str),
    /// The request is valid but cannot be served (no memory, unknown instance, a transfer
    /// that did not complete, ...).
    #[error("{0}")]
    Failed(String),
}

fn malformed(msg: impl Into<String>) -> EngineError {
    EngineError::Malformed(msg.into())
}

kvtier_core::metric_set! {
    /// What the engine's requests did (the service counts the requests themselves). Status
    /// node `transfers`; Prometheus `kvtier_store_*`, `kvtier_lookup_*`, `kvtier_retrieve_*`,
    /// `kvtier_engine_*`.
    pub struct EngineCounters {
        /// Chunks reserved by prepare_store.
        store_chunks_reserved_total: Counter => "kvtier_store_chunks_reserved",
        /// Chunks prepare_store skipped because they were cached or being written.
        store_chunks_skipped_total: Counter => "kvtier_store_chunks_skipped",
        /// Chunks prepare_store refused for lack of L1 memory.
        store_chunks_rejected_total: Counter => "kvtier_store_chunks_rejected",
        /// Chunks published by commit_store or a lmcache_driven store.
        store_chunks_committed_total: Counter => "kvtier_store_chunks_committed",
        /// Bytes of the chunks published by stores (both transfer modes).
        store_bytes_committed_total: Counter[Bytes] => "kvtier_store_committed",
        /// Chunks handed to engines by retrieves (both transfer modes).
        retrieve_chunks_total: Counter => "kvtier_retrieve_chunks",
        /// Bytes of the chunks handed to engines by retrieves.
        retrieve_bytes_total: Counter[Bytes] => "kvtier_retrieve",
        /// prepare_retrieve refusals (chunks not locked by the request's lookup).
        retrieve_refused_total: Counter => "kvtier_retrieve_refused",
        /// Prepared transfers dropped uncommitted (superseded, TTL, instance gone).
        abandoned_total: Counter => "kvtier_engine_abandoned_transfers",
        /// Lookups served.
        lookups_total: Counter => "kvtier_lookup_requests",
        /// Chunks asked for by lookups.
        lookup_chunks_requested_total: Counter => "kvtier_lookup_chunks_requested",
        /// Prefix chunks found by lookups (L1 and L2).
        lookup_chunks_hit_total: Counter => "kvtier_lookup_chunks_hit",
        /// Prefetch-status queries for a request with no lookup result (answered 0).
        unknown_prefetch_queries_total: Counter => "kvtier_engine_unknown_prefetch_queries",
        /// Block-allocation records received (report_block_allocation).
        block_allocation_records_total: Counter => "kvtier_engine_block_allocation_records",
        /// Engine workers removed by the liveness reaper.
        reaped_instances_total: Counter => "kvtier_engine_instances_reaped",
        /// `wait_prefetch_status` requests waited for without a thread.
        prefetch_waits_total: Counter => "kvtier_engine_prefetch_waits",
    }
}

/// What every component works with. Built once by [`Engine::new`].
#[derive(Debug)]
pub struct Shared {
    /// Tokens per chunk.
    pub chunk_size: usize,
    /// The L1 manager; its pool is `segment`.
    pub l1: Arc<L1Manager>,
    /// The shared-memory segment backing L1.
    pub segment: Arc<ShmSegment>,
    /// The background eviction controller (woken when a store found no room).
    pub evictor: EvictionController,
    /// Sessions and lookup locks.
    pub sessions: Sessions,
    /// Registered engine workers.
    pub instances: Instances,
    /// The L2 tier, when configured.
    pub l2: L2Link,
    /// Engine counters.
    pub counters: EngineCounters,
    /// The KV-event log (L1's listener when enabled).
    pub events: Arc<KvEvents>,
    /// Lookup records and miss reasons (its chunk history is L1's listener when enabled).
    pub explain: Explainer,
    /// The hit-rate curve and lookup log (`crate::analysis`); told about every lookup.
    pub observer: crate::analysis::LookupObserver,
}

impl Shared {
    /// The session of `request_id`, created if missing; when that evicted another session
    /// (the table was full), its pending L2 prefetch is cancelled here.
    pub fn session(&self, request_id: &str, now: std::time::Instant) -> session::SessionRef {
        let (session, evicted) = self.sessions.get_or_create(request_id, now);
        if let Some((evicted_id, prefetch)) = evicted {
            if prefetch.pending_job().is_some() {
                self.explain
                    .abandoned(&evicted_id, "the session was evicted (--max-sessions)");
            }
            self.l2.discard(prefetch);
        }
        session
    }
}

/// Gives freed heap memory back to the operating system after large releases (sessions
/// expired in bulk, `clear`).
///
/// Allocators keep freed pages for reuse: mimalloc (the binary's global allocator) returns a
/// thread's empty pages only when that thread collects, and glibc's `malloc` (libzmq's message
/// buffers) keeps freed chunks in its arenas until `malloc_trim`. The binary installs the hook
/// ([`Engine::with_memory_release`]) because only it knows its allocator. The thread that freed
/// the memory runs the hook at once and bumps the epoch; the ZeroMQ poll thread, which
/// allocates most request state, runs it once when it next finds itself idle
/// ([`MemoryRelease::epoch`], polled by the transport). Never on a request.
#[derive(Debug, Default)]
pub struct MemoryRelease {
    hook: Option<fn()>,
    epoch: AtomicU64,
}

impl MemoryRelease {
    /// Runs the hook on this thread and asks the request threads to run it when idle.
    pub fn release(&self) {
        if self.hook.is_some() {
            self.run();
            self.epoch.fetch_add(1, Relaxed);
        }
    }

    /// Runs the hook on this thread (nothing without one).
    pub fn run(&self) {
        if let Some(hook) = self.hook {
            hook();
        }
    }

    /// Bumped by every [`release`](Self::release): an idle thread that last ran the hook at
    /// another epoch runs it again.
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Relaxed)
    }
}

/// The engine. Cheap to share (`Arc<Engine>`); every method takes `&self`.
#[derive(Debug)]
pub struct Engine {
    cx: Shared,
    engine_driven: EngineDriven,
    lmcache_driven: LmcacheDriven,
    memory: MemoryRelease,
}

/// A component named by [`Engine::inject_fault`] does not exist or cannot be faulted.
#[derive(Debug, thiserror::Error)]
#[error("unknown component {0:?} (supported: \"l1_eviction_controller\")")]
pub struct UnknownComponent(pub String);

impl Engine {
    /// Builds the engine over an L1 manager whose pool is `segment`.
    pub fn new(
        cfg: EngineConfig,
        hasher: TokenHasher,
        l1: Arc<L1Manager>,
        segment: Arc<ShmSegment>,
        evictor: EvictionController,
    ) -> Self {
        let events = Arc::new(KvEvents::new(cfg.kv_event_log_size));
        let explain = Explainer::new(
            cfg.lookup_records,
            cfg.miss_history_chunks,
            l1.config().eviction.policy.name(),
        );
        let mut listeners: Vec<Arc<dyn L1Listener>> = Vec::new();
        if events.enabled() {
            listeners.push(Arc::clone(&events) as _);
        }
        if let Some(history) = explain.history() {
            listeners.push(Arc::clone(history) as _);
        }
        let listener: Option<Arc<dyn L1Listener>> = match listeners.len() {
            0 => None,
            1 => listeners.pop(),
            _ => Some(Arc::new(Listeners(listeners))),
        };
        if let Some(listener) = listener
            && l1.set_listener(listener).is_err()
        {
            tracing::warn!(
                "the L1 manager already has a listener; KV events and miss explanations will \
                 miss L1 changes"
            );
        }
        Self {
            cx: Shared {
                chunk_size: cfg.chunk_size,
                sessions: Sessions::new(cfg.session_ttl, cfg.max_sessions, hasher, Arc::clone(&l1)),
                instances: Instances::new(Liveness {
                    reap_timeout: cfg.worker_reap_timeout,
                    registration_grace: cfg.worker_registration_grace,
                }),
                l1,
                segment,
                evictor,
                l2: L2Link::default(),
                counters: EngineCounters::default(),
                events,
                explain,
                observer: crate::analysis::LookupObserver::default(),
            },
            engine_driven: EngineDriven::default(),
            lmcache_driven: LmcacheDriven::new(),
            memory: MemoryRelease::default(),
        }
    }

    /// Installs the hook that gives freed heap memory back to the OS (see [`MemoryRelease`]).
    pub fn with_memory_release(mut self, hook: Option<fn()>) -> Self {
        self.memory.hook = hook;
        self
    }

    /// Reports every lookup to the hit-rate curve and the lookup log. Call before serving.
    pub fn with_lookup_observer(mut self, observer: crate::analysis::LookupObserver) -> Self {
        self.cx.observer = observer;
        self
    }

    /// The memory-release hook and its epoch.
    pub fn memory(&self) -> &MemoryRelease {
        &self.memory
    }

    /// Attaches the L2 tier (write-behind and prefetch). Call before serving.
    pub fn with_l2(mut self, l2: L2Tier) -> Self {
        self.cx.l2 = L2Link::new(l2);
        self
    }

    /// The shared context (read-only access for status, metrics and tests).
    pub fn shared(&self) -> &Shared {
        &self.cx
    }

    /// The L1 manager.
    pub fn l1(&self) -> &Arc<L1Manager> {
        &self.cx.l1
    }

    /// The shared-memory segment backing L1.
    pub fn segment(&self) -> &Arc<ShmSegment> {
        &self.cx.segment
    }

    /// The eviction controller.
    pub fn evictor(&self) -> &EvictionController {
        &self.cx.evictor
    }

    /// The session table.
    pub fn sessions(&self) -> &Sessions {
        &self.cx.sessions
    }

    /// Engine counters.
    pub fn counters(&self) -> &EngineCounters {
        &self.cx.counters
    }

    /// The L2 tier, when configured.
    pub fn l2(&self) -> Option<&L2Tier> {
        self.cx.l2.tier()
    }

    /// The engine-driven transfer path.
    pub fn engine_driven(&self) -> &EngineDriven {
        &self.engine_driven
    }

    /// The lmcache_driven transfer path.
    pub fn lmcache_driven(&self) -> &LmcacheDriven {
        &self.lmcache_driven
    }

    /// Chunk size in tokens.
    pub fn chunk_size(&self) -> usize {
        self.cx.chunk_size
    }

    /// Starts a `wait_prefetch_status` that holds no thread (see [`lookup::PrefetchWait`]).
    pub fn start_prefetch_wait(&self, request_id: String, timeout: f64) -> lookup::PrefetchWait {
        self.cx.counters.prefetch_waits_total.inc();
        lookup::PrefetchWait::new(&self.cx, request_id, timeout, Instant::now())
    }

    /// Polls a waiting `wait_prefetch_status`: `Some(answer)` once it has one (`force`: now).
    pub fn poll_prefetch_wait(&self, w: &lookup::PrefetchWait, force: bool) -> Option<Option<u64>> {
        w.poll(&self.cx, Instant::now(), force)
    }

    /// Calls `wake` whenever an L2 prefetch completes (the transport polls its waiters then).
    pub fn set_prefetch_waker(&self, wake: Arc<dyn Fn() + Send + Sync>) {
        self.cx.l2.set_waker(wake);
    }

    /// Opens a `subscribe_kv_events` stream (LMCache 0.5.6 semantics, see [`kv_events`]).
    ///
    /// # Errors
    /// [`EngineError::Malformed`] for a negative cursor or `max_events` outside 1..=1024.
    pub fn subscribe_kv_events(
        &self,
        instance_id: i64,
        model_name: String,
        cursor: i64,
        max_events: i64,
    ) -> Result<Subscription, EngineError> {
        let cursor = u64::try_from(cursor)
            .map_err(|_| malformed(format!("subscribe_kv_events: cursor {cursor} is negative")))?;
        if !(1..=kv_events::MAX_EVENTS_PER_BATCH).contains(&max_events) {
            return Err(malformed(format!(
                "subscribe_kv_events: max_events {max_events} is not in 1..=1024"
            )));
        }
        let now = self.cx.l1.clock().now();
        Ok(self.cx.events.subscribe(
            instance_id,
            model_name,
            cursor,
            usize::try_from(max_events).unwrap_or(1),
            now,
        ))
    }

    /// The KV-event log.
    pub fn kv_events(&self) -> &Arc<KvEvents> {
        &self.cx.events
    }

    /// Clears L1 (`clear`, `POST /api/clear-cache`, `POST /cache/clear`). O(objects) under
    /// the L1 lock: call it off latency-sensitive threads.
    pub fn clear(&self, force: bool) -> ClearOutcome {
        let out = self.cx.l1.clear(force);
        if out.removed > 0 {
            self.memory.release();
        }
        tracing::info!(
            force,
            removed = out.removed,
            doomed = out.doomed,
            kept = out.kept,
            "l1 cleared"
        );
        out
    }

    /// Test-only fault injection: makes `component` fail the way a crash would (`stall`:
    /// `None`), or makes its next round hang for `stall`, so health reporting can be checked
    /// end to end.
    ///
    /// # Errors
    /// [`UnknownComponent`] for a component that cannot be faulted.
    pub fn inject_fault(
        &self,
        component: &str,
        stall: Option<Duration>,
    ) -> Result<(), UnknownComponent> {
        match component {
            "l1_eviction_controller" => {
                tracing::warn!(component, ?stall, "fault injected on request (test-only)");
                match stall {
                    Some(d) => self.cx.evictor.thread().inject_stall(d),
                    None => self.cx.evictor.inject_crash(),
                }
                Ok(())
            }
            other => Err(UnknownComponent(other.to_owned())),
        }
    }

    /// Unregisters an engine-driven context and releases what its pending transfers hold.
    /// Returns whether it was registered.
    pub fn unregister_context(&self, instance_id: i64) -> bool {
        let known = self
            .cx
            .instances
            .unregister_engine_driven(instance_id)
            .is_some();
        self.engine_driven.release_instance(&self.cx, instance_id);
        self.cx.events.close_instance(instance_id);
        known
    }

    /// Ends a session: releases every lock it holds and cancels its L2 prefetch.
    pub fn end_session(&self, request_id: &str) {
        lookup::end_session(&self.cx, request_id);
    }

    /// `POST /cache/checksums`: digests of a registered lmcache_driven instance's blocks.
    /// CPU-heavy: call it off the async runtime.
    ///
    /// # Errors
    /// [`ChecksumError`] for invalid requests and unknown or refused instances.
    pub fn lmcache_driven_checksums(
        &self,
        req: &ChecksumRequest,
    ) -> Result<serde_json::Value, ChecksumError> {
        self.lmcache_driven.checksums(&self.cx, req)
    }

    /// Periodic housekeeping (the `kvtier-housekeep` thread, every second): expires idle
    /// sessions, reaps silent engine workers and drops transfers that were never committed.
    /// Each step holds its locks for bounded work.
    pub fn housekeeping(&self) {
        let cx = &self.cx;
        let now = cx.l1.clock().now();
        let mut shrunk = false;
        loop {
            let (expired, table_shrunk) = cx.sessions.expire(now);
            shrunk |= table_shrunk;
            let n = expired.len();
            for (request_id, locks, prefetch) in expired {
                if prefetch.pending_job().is_some() {
                    cx.explain.abandoned(&request_id, "the session expired");
                }
                cx.l2.discard(prefetch);
                if locks > 0 {
                    tracing::info!(%request_id, locks, "session expired; releasing its locks");
                }
            }
            if n < session::EXPIRY_BATCH {
                break;
            }
        }
        if shrunk {
            self.memory.release();
        }
        for (iid, removed) in cx.instances.reap(now) {
            tracing::warn!(
                instance_id = iid,
                "engine instance silent too long; unregistering it"
            );
            self.release_worker(iid, removed, true);
            // Counted once its reservations are released, so a reader who sees the count also
            // sees what the instance held given back.
            cx.counters.reaped_instances_total.inc();
        }
        self.engine_driven.sweep(cx, now);
        cx.events.reap(now, cx.instances.liveness().reap_timeout);
    }

    /// Releases everything held on behalf of clients (shutdown).
    pub fn release_all(&self) {
        let cx = &self.cx;
        for prefetch in cx.sessions.end_all() {
            cx.l2.discard(prefetch);
        }
        for (iid, removed) in cx.instances.drain() {
            self.release_worker(iid, removed, false);
        }
        cx.events.close_all();
        self.engine_driven.release_all(cx);
    }

    /// Releases what a removed worker's registrations own.
    fn release_worker(&self, iid: i64, removed: Removed, reaped: bool) {
        self.cx.events.close_instance(iid);
        if removed.engine_driven.is_some() {
            self.engine_driven.release_instance(&self.cx, iid);
        }
        if let Some(inst) = removed.lmcache_driven {
            self.lmcache_driven.released(inst, reaped);
        }
    }

    /// Stops the L2 tier in order (prefetch, then write-behind flush, then adapters). Call
    /// during shutdown after request intake stopped and before L1 goes away. Idempotent.
    pub fn shutdown_l2(&self) {
        self.cx.l2.shutdown();
    }
}
