//! The cache engine: LMCache 0.5.6's MP-server semantics over kvtier's L1.
//!
//! [`Engine::handle`] takes one decoded request and returns the reply payload. It never panics
//! on client input and never leaves a request unanswered: when something is wrong it returns the
//! operation's defined failure value (see `kvtier_proto::Op::failure_reply`), logs a warning
//! and counts it.
//!
//! Data path (engine-driven, shared memory): the L1 pool *is* the shared-memory segment that
//! engines map. `prepare_store` reserves staging objects and hands out their offsets; the engine
//! copies into them and `commit_store` publishes them. `lookup` read-locks the longest prefix
//! present for every rank and records the locks in the request's session; `prepare_retrieve`
//! moves one lock per object from the session to a pending retrieve and returns the offsets;
//! `commit_retrieve` releases them. Nothing is copied by the server on this path.
//!
//! Ownership of locks (the invariant that keeps kvtier leak-free): every read lock taken for a
//! client is owned by exactly one session record or one pending retrieve, and every staging
//! object by one pending store. `end_session`, `free_lookup_locks`, commits, instance
//! unregistration, worker reaping and the TTL sweeps each release what they own.
//!
//! Lock order: `contexts` → `pending_*` → session mutex → (L2 prefetch results, see [`l2`]) →
//! L1 (inside `L1Manager`). No lock is held across I/O; L1 calls are O(keys in the request).
//!
//! L2 (optional, [`l2`]): committed stores are queued for write-behind, lookups whose L1 prefix
//! ends early continue in L2, and prefetched objects' read leases are owned by the session like
//! L1 hits.

pub mod l2;
pub mod lmcache_driven;
pub mod session;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use kvtier_core::hash::{ChunkHash, TokenHasher};
use kvtier_core::key::{ObjectKey, object_keys};
use kvtier_core::l1::controller::EvictionController;
use kvtier_core::l1::{L1Manager, ReadLease, WriteTicket};
use kvtier_core::shm::ShmSegment;
use kvtier_core::status::{StatusNode, StatusReport};
use kvtier_proto::response::{
    RegisterEngineDrivenContextResponse, Slot, encode_bool, encode_prepare_retrieve,
    encode_prepare_store, encode_str, encode_str_list, encode_uint,
};
use kvtier_proto::{IpcKey, RegisterEngineDrivenContext, Request};
use kvtier_storage::L2Tier;
use parking_lot::{Mutex, RwLock};
use session::{HeldLock, PrefetchState, SessionManager};

use crate::stats::Outcome;

/// A reply payload: `None` is a bare reply (the client decodes `None`).
pub type Reply = Option<Vec<u8>>;

/// Engine settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Tokens per chunk.
    pub chunk_size: usize,
    /// Session idle TTL.
    pub session_ttl: Duration,
    /// An engine instance silent for this long after a ping is unregistered (0 disables).
    pub worker_reap_timeout: Duration,
    /// Grace period before the first ping.
    pub worker_registration_grace: Duration,
}

/// Why a request failed; logged, counted, and turned into the op's failure value.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// The request is invalid.
    #[error("{0}")]
    Malformed(String),
    /// The operation is not implemented by kvtier yet.
    #[error("operation {0} is not implemented by kvtier")]
    Unsupported(&'static str),
    /// The request is valid but cannot be served.
    #[error("{0}")]
    Failed(String),
}

impl EngineError {
    /// The statistics bucket of this error.
    pub fn outcome(&self) -> Outcome {
        match self {
            Self::Malformed(_) => Outcome::Malformed,
            Self::Unsupported(_) => Outcome::Unsupported,
            Self::Failed(_) => Outcome::Failed,
        }
    }
}

fn malformed(msg: impl Into<String>) -> EngineError {
    EngineError::Malformed(msg.into())
}

/// Element size of a torch dtype name as sent in `dtype_str`.
pub fn dtype_itemsize(dtype: &str) -> Option<u64> {
    let d = dtype.strip_prefix("torch.").unwrap_or(dtype);
    Some(match d {
        "float16" | "half" | "bfloat16" | "int16" | "uint16" | "short" => 2,
        "float32" | "float" | "int32" | "uint32" | "int" => 4,
        "float64" | "double" | "int64" | "uint64" | "long" => 8,
        "int8" | "uint8" | "bool" | "float8_e4m3fn" | "float8_e5m2" | "float8_e4m3fnuz"
        | "float8_e5m2fnuz" => 1,
        _ => return None,
    })
}

/// A registered engine-driven context (one engine worker process).
#[derive(Debug, Clone)]
pub struct Context {
    /// The registration as sent.
    pub info: RegisterEngineDrivenContext,
    /// Slot shape: `[2, layers, slots, hidden]` or `[layers, slots, hidden]` for MLA.
    pub shape: Vec<u64>,
    /// Bytes per chunk object.
    pub object_len: u64,
    registered_at: Instant,
    last_ping: Option<Instant>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TransferKey {
    instance_id: i64,
    request_id: String,
    worker: u32,
    start: u64,
    end: u64,
}

#[derive(Debug)]
struct PendingStore {
    tickets: Vec<WriteTicket>,
    /// The key of each ticket (for L2 write-behind on commit).
    keys: Vec<ObjectKey>,
    created: Instant,
}

/// What a lookup found in L1.
#[derive(Debug)]
struct L1Lookup {
    /// Every key of the lookup, chunk-major.
    keys: Vec<ObjectKey>,
    /// Keys of the L1 prefix (read-locked and recorded in the session).
    locked: usize,
    /// Keys per chunk.
    group: usize,
    /// Chunks in the L1 prefix.
    hits: u64,
}

#[derive(Debug)]
struct PendingRetrieve {
    leases: Vec<ReadLease>,
    created: Instant,
}

/// Removes and returns the pending transfers that match `pred`. Holds the map's lock for one
/// pass over the pending transfers (a handful per engine), never for the L1 release that follows.
fn drain_matching<V>(
    map: &Mutex<HashMap<TransferKey, V>>,
    mut pred: impl FnMut(&TransferKey, &V) -> bool,
) -> Vec<V> {
    let mut map = map.lock();
    let keys: Vec<TransferKey> = map
        .iter()
        .filter(|(k, v)| pred(k, v))
        .map(|(k, _)| k.clone())
        .collect();
    keys.iter().filter_map(|k| map.remove(k)).collect()
}

/// Engine-level counters (the RPC layer counts requests; these count what they did).
#[derive(Debug, Default)]
pub struct EngineCounters {
    /// Chunks reserved by `prepare_store`.
    pub store_chunks_reserved: AtomicU64,
    /// Chunks skipped by `prepare_store` because they were already cached or being written.
    pub store_chunks_skipped: AtomicU64,
    /// Chunks refused by `prepare_store` for lack of memory.
    pub store_chunks_rejected: AtomicU64,
    /// Chunks published by `commit_store`.
    pub store_chunks_committed: AtomicU64,
    /// Lookups served.
    pub lookups: AtomicU64,
    /// Chunks requested by lookups.
    pub lookup_chunks_requested: AtomicU64,
    /// Prefix chunks found by lookups.
    pub lookup_chunks_hit: AtomicU64,
    /// Chunks handed out by `prepare_retrieve`.
    pub retrieve_chunks: AtomicU64,
    /// `prepare_retrieve` refusals (chunks not locked by the session's lookup).
    pub retrieve_refused: AtomicU64,
    /// Query/wait for a request id with no result (answered 0).
    pub unknown_prefetch_queries: AtomicU64,
    /// Block-allocation records received.
    pub block_allocation_records: AtomicU64,
    /// Engine instances reaped for silence.
    pub instances_reaped: AtomicU64,
    /// Read locks released by session end, TTL or free_lookup_locks.
    pub session_locks_released: AtomicU64,
    /// Pending stores/retrieves dropped by the sweep (client never committed).
    pub abandoned_transfers: AtomicU64,
    /// Bytes of the chunks published by `commit_store`.
    pub store_bytes_committed: AtomicU64,
    /// Bytes of the chunks handed out by `prepare_retrieve`.
    pub retrieve_bytes: AtomicU64,
}

/// The engine. Cheap to share (`Arc<Engine>`); every method takes `&self`.
#[derive(Debug)]
pub struct Engine {
    cfg: EngineConfig,
    hasher: TokenHasher,
    l1: Arc<L1Manager>,
    segment: Arc<ShmSegment>,
    evictor: EvictionController,
    sessions: SessionManager,
    contexts: RwLock<HashMap<i64, Context>>,
    pending_stores: Mutex<HashMap<TransferKey, PendingStore>>,
    pending_retrieves: Mutex<HashMap<TransferKey, PendingRetrieve>>,
    counters: EngineCounters,
    l2: Option<L2Tier>,
    l2_counters: l2::L2Counters,
    lmd: lmcache_driven::LmcacheDriven,
}

impl Engine {
    /// Builds the engine over an L1 manager whose pool is `segment`.
    pub fn new(
        cfg: EngineConfig,
        hasher: TokenHasher,
        l1: Arc<L1Manager>,
        segment: Arc<ShmSegment>,
        evictor: EvictionController,
    ) -> Self {
        Self {
            sessions: SessionManager::new(cfg.session_ttl),
            cfg,
            hasher,
            l1,
            segment,
            evictor,
            contexts: RwLock::new(HashMap::new()),
            pending_stores: Mutex::new(HashMap::new()),
            pending_retrieves: Mutex::new(HashMap::new()),
            counters: EngineCounters::default(),
            l2: None,
            l2_counters: l2::L2Counters::default(),
            lmd: lmcache_driven::LmcacheDriven::new(),
        }
    }

    /// The L1 manager.
    pub fn l1(&self) -> &Arc<L1Manager> {
        &self.l1
    }

    /// The shared-memory segment backing L1.
    pub fn segment(&self) -> &Arc<ShmSegment> {
        &self.segment
    }

    /// The eviction controller.
    pub fn evictor(&self) -> &EvictionController {
        &self.evictor
    }

    /// The session table.
    pub fn sessions(&self) -> &SessionManager {
        &self.sessions
    }

    /// Engine counters.
    pub fn counters(&self) -> &EngineCounters {
        &self.counters
    }

    /// Registered engine instances (a brief read lock on the context table; O(1)).
    pub fn registered_instance_count(&self) -> usize {
        self.contexts.read().len()
    }

    /// `(pending stores, pending retrieves)`: prepared transfers not yet committed (two brief
    /// lock acquisitions, one after the other; O(1)).
    pub fn pending_transfer_counts(&self) -> (usize, usize) {
        let stores = self.pending_stores.lock().len();
        let retrieves = self.pending_retrieves.lock().len();
        (stores, retrieves)
    }

    /// The lmcache_driven registrations.
    pub fn lmcache_driven(&self) -> &lmcache_driven::LmcacheDriven {
        &self.lmd
    }

    /// Chunk size in tokens.
    pub fn chunk_size(&self) -> usize {
        self.cfg.chunk_size
    }

    /// Handles one decoded request. `Err` carries why it failed; the caller sends the op's
    /// failure value.
    pub fn handle(&self, request: Request) -> Result<Reply, EngineError> {
        let now = self.l1.clock().now();
        match request {
            Request::GetChunkSize => Ok(Some(encode_uint(self.cfg.chunk_size as u64))),
            Request::Noop => Ok(Some(encode_str("OK"))),
            Request::GetExperimental => Ok(Some(encode_str_list(&[]))),
            Request::Ping { instance_id } => {
                if let Some(iid) = instance_id {
                    self.lmd.touch(iid, now, true);
                }
                if let Some(iid) = instance_id
                    && let Some(ctx) = self.contexts.write().get_mut(&iid)
                {
                    ctx.last_ping = Some(now);
                }
                Ok(Some(encode_bool(true)))
            }
            Request::RegisterKvCacheEngineDrivenContext(p) => self.register_context(p, now),
            Request::UnregisterKvCacheEngineDrivenContext { instance_id } => {
                if !self.unregister_context(instance_id) {
                    tracing::warn!(
                        instance_id,
                        "unregister of an unknown engine-driven context"
                    );
                }
                Ok(None)
            }
            Request::PrepareStore { key, instance_id } => {
                self.prepare_store(&key, instance_id, now)
            }
            Request::CommitStore {
                key,
                instance_id,
                data,
            } => self.commit_store(&key, instance_id, &data),
            Request::Lookup { key, .. } => self.lookup(&key, now).map(|()| None),
            Request::QueryPrefetchStatus { request_id } => Ok(self.query_prefetch(&request_id)),
            Request::WaitPrefetchStatus {
                request_id,
                timeout,
            } => Ok(self.wait_prefetch(&request_id, timeout)),
            Request::FreeLookupLocks { key, .. } => self.free_lookup_locks(&key).map(|()| None),
            Request::EndSession { request_id } => {
                self.end_session(&request_id);
                Ok(None)
            }
            Request::PrepareRetrieve { key, instance_id } => {
                self.prepare_retrieve(&key, instance_id, now)
            }
            Request::CommitRetrieve { key, instance_id } => self.commit_retrieve(&key, instance_id),
            Request::Clear { force } => {
                let out = self.l1.clear(force);
                tracing::info!(
                    force,
                    removed = out.removed,
                    doomed = out.doomed,
                    kept = out.kept,
                    "l1 cleared"
                );
                Ok(None)
            }
            Request::ReportBlockAllocation { records, .. } => {
                self.counters
                    .block_allocation_records
                    .fetch_add(records.len() as u64, Relaxed);
                Ok(None)
            }
            Request::RegisterKvCache(r) => Ok(self.lmd_register(r, now)),
            Request::UnregisterKvCache { instance_id } => {
                self.lmd_unregister(instance_id);
                Ok(None)
            }
            Request::Store {
                key,
                instance_id,
                block_ids,
                event_ipc_handle,
            } => self.lmd_store(&key, instance_id, &block_ids, &event_ipc_handle, now),
            Request::Retrieve {
                key,
                instance_id,
                block_ids,
                event_ipc_handle,
                skip_first_n_tokens,
            } => self.lmd_retrieve(
                &key,
                instance_id,
                &block_ids,
                &event_ipc_handle,
                skip_first_n_tokens,
                now,
            ),
            Request::Unsupported { op, .. } => Err(EngineError::Unsupported(op.name())),
        }
    }

    fn register_context(
        &self,
        p: RegisterEngineDrivenContext,
        now: Instant,
    ) -> Result<Reply, EngineError> {
        let itemsize = dtype_itemsize(&p.dtype_str)
            .ok_or_else(|| malformed(format!("unknown dtype_str {:?}", p.dtype_str)))?;
        if p.num_layers == 0 || p.hidden_dim_size == 0 || p.block_size == 0 {
            return Err(malformed(
                "num_layers, hidden_dim_size and block_size must be positive",
            ));
        }
        let slots = u64::from(p.num_physical_slots.unwrap_or(self.cfg.chunk_size as u32));
        if slots == 0 {
            return Err(malformed("num_physical_slots must be positive"));
        }
        let shape: Vec<u64> = if p.use_mla {
            vec![u64::from(p.num_layers), slots, u64::from(p.hidden_dim_size)]
        } else {
            vec![
                2,
                u64::from(p.num_layers),
                slots,
                u64::from(p.hidden_dim_size),
            ]
        };
        let object_len = shape
            .iter()
            .try_fold(itemsize, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= self.l1.capacity_bytes())
            .ok_or_else(|| {
                malformed(format!(
                    "a chunk of shape {shape:?} x {} does not fit in L1 ({} bytes)",
                    p.dtype_str,
                    self.l1.capacity_bytes()
                ))
            })?;
        tracing::info!(
            instance_id = p.instance_id,
            model = %p.model_name,
            world_size = p.world_size,
            ?shape,
            dtype = %p.dtype_str,
            object_len,
            "engine-driven context registered"
        );
        let iid = p.instance_id;
        let ctx = Context {
            info: p,
            shape,
            object_len,
            registered_at: now,
            last_ping: None,
        };
        if self.contexts.write().insert(iid, ctx).is_some() {
            tracing::info!(
                instance_id = iid,
                "context re-registered; previous layout replaced"
            );
        }
        let resp = RegisterEngineDrivenContextResponse {
            shm_name: self.segment.name().to_owned(),
            pool_size: self.l1.capacity_bytes(),
        };
        Ok(Some(resp.encode()))
    }

    /// Unregisters an instance and releases what its pending transfers hold. Returns whether it
    /// was registered.
    pub fn unregister_context(&self, instance_id: i64) -> bool {
        let known = self.contexts.write().remove(&instance_id).is_some();
        let stores = drain_matching(&self.pending_stores, |k, _| k.instance_id == instance_id);
        for s in stores {
            self.l1.abort_write(&s.tickets);
        }
        let retrieves =
            drain_matching(&self.pending_retrieves, |k, _| k.instance_id == instance_id);
        for r in retrieves {
            self.l1.finish_read(&r.leases, 1);
        }
        known
    }

    fn context(&self, instance_id: i64) -> Result<Context, EngineError> {
        self.contexts
            .read()
            .get(&instance_id)
            .cloned()
            .ok_or_else(|| {
                EngineError::Failed(format!(
                    "engine-driven context {instance_id} is not registered"
                ))
            })
    }

    /// Hashes `[start, end)` of `key` through its session and expands it to object keys.
    fn keys_for(
        &self,
        key: &IpcKey,
        worker: Option<u32>,
        now: Instant,
    ) -> Result<Vec<ObjectKey>, EngineError> {
        let cs = self.cfg.chunk_size as u64;
        if !key.start.is_multiple_of(cs) || !key.end.is_multiple_of(cs) {
            return Err(malformed(format!(
                "range [{}, {}) is not aligned to the chunk size {cs}",
                key.start, key.end
            )));
        }
        let session = self.sessions.get_or_create(&key.request_id, now);
        let hashes: Vec<ChunkHash> = {
            let mut s = session.lock();
            s.touch(now);
            s.hashes
                .hashes(
                    &self.hasher,
                    &key.token_ids,
                    key.start as usize,
                    key.end as usize,
                )
                .map_err(|e| malformed(e.to_string()))?
                .to_vec()
        };
        let model: Arc<str> = Arc::from(key.model_name.as_str());
        let salt: Arc<str> = Arc::from(key.cache_salt.as_str());
        object_keys(&hashes, &model, key.world_size, worker, 0, &salt)
            .map_err(|e| malformed(e.to_string()))
    }

    fn transfer_key(key: &IpcKey, instance_id: i64, worker: u32) -> TransferKey {
        TransferKey {
            instance_id,
            request_id: key.request_id.clone(),
            worker,
            start: key.start,
            end: key.end,
        }
    }

    fn slot(ctx: &Context, offset: u64) -> Slot {
        Slot {
            offset,
            length: ctx.object_len,
            shape: ctx.shape.clone(),
            dtype: ctx.info.dtype_str.clone(),
        }
    }

    fn prepare_store(
        &self,
        key: &IpcKey,
        instance_id: i64,
        now: Instant,
    ) -> Result<Reply, EngineError> {
        let ctx = self.context(instance_id)?;
        let worker = key
            .worker_id
            .ok_or_else(|| malformed("prepare_store needs worker_id"))?;
        let keys = self.keys_for(key, Some(worker), now)?;
        let items: Vec<(ObjectKey, u64)> = keys.into_iter().map(|k| (k, ctx.object_len)).collect();
        let results = self.l1.reserve_write(&items, false);
        let mut tickets = Vec::new();
        let mut ticket_keys = Vec::new();
        let mut slots = Vec::new();
        let mut indices = Vec::new();
        let mut rejected = 0u64;
        for (i, r) in results.into_iter().enumerate() {
            match r {
                Ok(t) => {
                    slots.push(Self::slot(&ctx, t.alloc.offset));
                    indices.push(i as u64);
                    tickets.push(t);
                    if let Some((k, _)) = items.get(i) {
                        ticket_keys.push(k.clone());
                    }
                }
                Err(kvtier_core::l1::L1Error::OutOfMemory) => rejected += 1,
                Err(_) => {
                    self.counters.store_chunks_skipped.fetch_add(1, Relaxed);
                }
            }
        }
        if rejected > 0 {
            self.counters
                .store_chunks_rejected
                .fetch_add(rejected, Relaxed);
            self.evictor.wake();
            tracing::warn!(
                request_id = %key.request_id,
                chunks = rejected,
                "store rejected: L1 has no room even after evicting every unlocked object"
            );
        }
        self.counters
            .store_chunks_reserved
            .fetch_add(tickets.len() as u64, Relaxed);
        if !tickets.is_empty() {
            let tk = Self::transfer_key(key, instance_id, worker);
            let old = self.pending_stores.lock().insert(
                tk,
                PendingStore {
                    tickets,
                    keys: ticket_keys,
                    created: now,
                },
            );
            if let Some(old) = old {
                // The client prepared the same range again without committing: the first
                // reservation is abandoned.
                self.l1.abort_write(&old.tickets);
                self.counters.abandoned_transfers.fetch_add(1, Relaxed);
            }
        }
        Ok(Some(encode_prepare_store(&slots, &indices)))
    }

    fn commit_store(
        &self,
        key: &IpcKey,
        instance_id: i64,
        data: &[u8],
    ) -> Result<Reply, EngineError> {
        let worker = key
            .worker_id
            .ok_or_else(|| malformed("commit_store needs worker_id"))?;
        let tk = Self::transfer_key(key, instance_id, worker);
        let Some(pending) = self.pending_stores.lock().remove(&tk) else {
            return Err(EngineError::Failed(format!(
                "commit_store without a pending prepare_store (request {}, range [{}, {}))",
                key.request_id, key.start, key.end
            )));
        };
        if !data.is_empty() {
            self.l1.abort_write(&pending.tickets);
            return Err(EngineError::Unsupported(
                "commit_store with inline (pickled) data; kvtier serves shared memory only",
            ));
        }
        let results = self.l1.finish_write(&pending.tickets);
        let ok = results.iter().filter(|r| r.is_ok()).count();
        self.counters
            .store_chunks_committed
            .fetch_add(ok as u64, Relaxed);
        let ok_bytes: u64 = pending
            .tickets
            .iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|(t, _)| t.alloc.len)
            .sum();
        self.counters
            .store_bytes_committed
            .fetch_add(ok_bytes, Relaxed);
        let published: Vec<ObjectKey> = pending
            .keys
            .into_iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|(k, _)| k)
            .collect();
        self.notify_l2_stored(published);
        if ok != results.len() {
            return Err(EngineError::Failed(format!(
                "{} of {} chunks expired or were cleared before commit",
                results.len() - ok,
                results.len()
            )));
        }
        Ok(Some(encode_bool(true)))
    }

    fn lookup(&self, key: &IpcKey, now: Instant) -> Result<(), EngineError> {
        self.counters.lookups.fetch_add(1, Relaxed);
        let session = self.sessions.get_or_create(&key.request_id, now);
        let result = self.lookup_locked(key, now, &session);
        let (next, result) = match result {
            Ok(l) => (
                self.prefetch_suffix(&l.keys, l.locked, l.group, key.num_kv_readers, l.hits),
                Ok(()),
            ),
            // The client will poll for a result: give it a definite 0.
            Err(e) => (PrefetchState::Done(0), Err(e)),
        };
        let previous = std::mem::replace(&mut session.lock().prefetch, next);
        self.discard_prefetch(previous);
        result
    }

    fn lookup_locked(
        &self,
        key: &IpcKey,
        now: Instant,
        session: &Arc<Mutex<session::Session>>,
    ) -> Result<L1Lookup, EngineError> {
        if key.num_kv_readers == 0 {
            return Err(malformed(
                "lookup with num_kv_readers = 0 (clients older than LMCache 0.5 are not supported)",
            ));
        }
        let keys = self.keys_for(key, key.worker_id, now)?;
        let group = if key.worker_id.is_some() {
            1
        } else {
            key.world_size as usize
        };
        self.counters
            .lookup_chunks_requested
            .fetch_add((keys.len() / group.max(1)) as u64, Relaxed);
        let leases = self
            .l1
            .reserve_read_prefix(&keys, key.num_kv_readers, group);
        let hits = (leases.len() / group.max(1)) as u64;
        self.counters.lookup_chunks_hit.fetch_add(hits, Relaxed);
        let locked = leases.len();
        let stale = {
            let mut s = session.lock();
            // A previous lease on the same key that expired or whose object was replaced is
            // returned as stale and released below.
            l2::record_locks(&mut s, keys.iter().cloned(), leases, key.num_kv_readers)
        };
        for h in stale {
            self.l1.finish_read(&[h.lease], h.remaining);
        }
        Ok(L1Lookup {
            keys,
            locked,
            group,
            hits,
        })
    }

    fn free_lookup_locks(&self, key: &IpcKey) -> Result<(), EngineError> {
        let Some(session) = self.sessions.get(&key.request_id) else {
            return Ok(());
        };
        let now = self.l1.clock().now();
        let keys = self.keys_for(key, key.worker_id, now)?;
        let held: Vec<HeldLock> = {
            let mut s = session.lock();
            keys.iter().filter_map(|k| s.locks.remove(k)).collect()
        };
        self.release_held(&held);
        Ok(())
    }

    fn release_held(&self, held: &[HeldLock]) {
        for h in held {
            if h.remaining > 0 {
                self.l1.finish_read(&[h.lease], h.remaining);
            }
        }
        self.counters
            .session_locks_released
            .fetch_add(held.len() as u64, Relaxed);
    }

    /// Releases everything a removed session owns (its locks and any pending L2 prefetch).
    /// Returns the number of lock records released.
    fn retire_session(&self, session: &Mutex<session::Session>) -> usize {
        let (held, prefetch) = {
            let mut s = session.lock();
            (s.drain_locks(), std::mem::take(&mut s.prefetch))
        };
        self.release_held(&held);
        self.discard_prefetch(prefetch);
        held.len()
    }

    /// Ends a session and releases every lock it still holds.
    pub fn end_session(&self, request_id: &str) {
        if let Some(session) = self.sessions.remove(request_id) {
            self.retire_session(&session);
        }
    }

    fn prepare_retrieve(
        &self,
        key: &IpcKey,
        instance_id: i64,
        now: Instant,
    ) -> Result<Reply, EngineError> {
        let refuse = |why: String| {
            self.counters.retrieve_refused.fetch_add(1, Relaxed);
            EngineError::Failed(why)
        };
        let ctx = self.context(instance_id)?;
        let worker = key
            .worker_id
            .ok_or_else(|| malformed("prepare_retrieve needs worker_id"))?;
        let Some(session) = self.sessions.get(&key.request_id) else {
            return Err(refuse(format!(
                "prepare_retrieve for request {} without a lookup",
                key.request_id
            )));
        };
        let keys = self.keys_for(key, Some(worker), now)?;
        let leases: Vec<ReadLease> = {
            let mut s = session.lock();
            for k in &keys {
                match s.locks.get(k) {
                    Some(h) if h.remaining > 0 && h.lease.alloc.len == ctx.object_len => {}
                    Some(h) if h.remaining > 0 => {
                        return Err(refuse(format!(
                            "cached object is {} bytes but instance {instance_id} expects {}",
                            h.lease.alloc.len, ctx.object_len
                        )));
                    }
                    _ => {
                        return Err(refuse(format!(
                            "chunk not locked by the lookup of request {}",
                            key.request_id
                        )));
                    }
                }
            }
            keys.iter()
                .filter_map(|k| {
                    let h = s.locks.get_mut(k)?;
                    h.remaining -= 1;
                    let lease = h.lease;
                    if h.remaining == 0 {
                        s.locks.remove(k);
                    }
                    Some(lease)
                })
                .collect()
        };
        let slots: Vec<Slot> = leases
            .iter()
            .map(|l| Self::slot(&ctx, l.alloc.offset))
            .collect();
        self.counters
            .retrieve_chunks
            .fetch_add(slots.len() as u64, Relaxed);
        self.counters
            .retrieve_bytes
            .fetch_add(leases.iter().map(|l| l.alloc.len).sum::<u64>(), Relaxed);
        let tk = Self::transfer_key(key, instance_id, worker);
        let old = self.pending_retrieves.lock().insert(
            tk,
            PendingRetrieve {
                leases,
                created: now,
            },
        );
        if let Some(old) = old {
            self.l1.finish_read(&old.leases, 1);
            self.counters.abandoned_transfers.fetch_add(1, Relaxed);
        }
        Ok(Some(encode_prepare_retrieve(true, &slots)))
    }

    fn commit_retrieve(&self, key: &IpcKey, instance_id: i64) -> Result<Reply, EngineError> {
        let worker = key
            .worker_id
            .ok_or_else(|| malformed("commit_retrieve needs worker_id"))?;
        let tk = Self::transfer_key(key, instance_id, worker);
        let Some(pending) = self.pending_retrieves.lock().remove(&tk) else {
            return Err(EngineError::Failed(format!(
                "commit_retrieve without a pending prepare_retrieve (request {})",
                key.request_id
            )));
        };
        self.l1.finish_read(&pending.leases, 1);
        Ok(Some(encode_bool(true)))
    }

    /// Periodic housekeeping (run by the reaper thread every second or so): expires idle
    /// sessions, reaps silent engine instances and drops transfers that were never committed.
    pub fn housekeeping(&self) {
        let now = self.l1.clock().now();
        for (request_id, session) in self.sessions.take_expired(now) {
            let locks = self.retire_session(&session);
            if locks > 0 {
                tracing::info!(%request_id, locks, "session expired; releasing its locks");
            }
        }
        if !self.cfg.worker_reap_timeout.is_zero() {
            let dead: Vec<i64> = self
                .contexts
                .read()
                .iter()
                .filter(|(_, c)| match c.last_ping {
                    Some(t) => now.saturating_duration_since(t) > self.cfg.worker_reap_timeout,
                    None => {
                        now.saturating_duration_since(c.registered_at)
                            > self.cfg.worker_registration_grace
                    }
                })
                .map(|(&iid, _)| iid)
                .collect();
            for iid in dead {
                tracing::warn!(
                    instance_id = iid,
                    "engine instance silent too long; unregistering it"
                );
                self.unregister_context(iid);
                self.counters.instances_reaped.fetch_add(1, Relaxed);
            }
        }
        self.lmd_reap(now);
        let write_ttl = self.l1.config().write_ttl;
        let read_ttl = self.l1.config().read_ttl;
        let stale_stores = drain_matching(&self.pending_stores, |_, s| {
            now.saturating_duration_since(s.created) > write_ttl
        });
        let stale_retrieves = drain_matching(&self.pending_retrieves, |_, r| {
            now.saturating_duration_since(r.created) > read_ttl
        });
        let n = (stale_stores.len() + stale_retrieves.len()) as u64;
        for s in stale_stores {
            self.l1.abort_write(&s.tickets);
        }
        for r in stale_retrieves {
            self.l1.finish_read(&r.leases, 1);
        }
        self.counters.abandoned_transfers.fetch_add(n, Relaxed);
    }

    /// Releases everything held on behalf of clients (shutdown).
    pub fn release_all(&self) {
        for s in self.sessions.take_all() {
            self.retire_session(&s);
        }
        let iids: Vec<i64> = self.contexts.read().keys().copied().collect();
        for iid in iids {
            self.unregister_context(iid);
        }
        self.lmd_release_all();
    }

    fn contexts_status(&self) -> (Vec<i64>, serde_json::Map<String, serde_json::Value>) {
        let contexts = self.contexts.read();
        let mut ids: Vec<i64> = contexts.keys().copied().collect();
        ids.sort_unstable();
        let mut meta = serde_json::Map::new();
        for id in &ids {
            if let Some(c) = contexts.get(id) {
                meta.insert(
                    id.to_string(),
                    serde_json::json!({
                        "model_name": c.info.model_name,
                        "world_size": c.info.world_size,
                        "block_size": c.info.block_size,
                        "use_mla": c.info.use_mla,
                        "num_layers": c.info.num_layers,
                        "hidden_dim_size": c.info.hidden_dim_size,
                        "dtype": c.info.dtype_str,
                        "slot_shape": c.shape,
                        "object_bytes": c.object_len,
                        "pinged": c.last_ping.is_some(),
                    }),
                );
            }
        }
        (ids, meta)
    }
}

impl StatusReport for Engine {
    fn report_status(&self) -> StatusNode {
        let (used, total) = self.l1.usage();
        let l1 = self.l1.report_status();
        let evict = self.evictor.report_status();
        let (store, prefetch, adapters, active_prefetch_jobs) = self.l2_status();
        let num_adapters = adapters.len();
        let storage = StatusNode::healthy()
            .child("l1_manager", l1)
            .child("l1_eviction_controller", evict)
            .child("store_controller", store)
            .child("prefetch_controller", prefetch)
            .child_list("l2_adapters", adapters)
            .field("num_l2_adapters", num_adapters)
            .field("l1_usage", [used, total])
            .field("l2", self.l2_counters_json());
        let (ids, meta) = self.contexts_status();
        let lmcache_driven = self.lmd_status(self.l1.clock().now());
        let c = &self.counters;
        StatusNode::healthy()
            .field("engine_type", "kvtier")
            .field("chunk_size", self.cfg.chunk_size)
            .field("hash_algorithm", self.hasher.hash_algorithm_name())
            .field("active_sessions", self.sessions.active_count())
            .child("storage_manager", storage)
            .field("active_prefetch_jobs", active_prefetch_jobs)
            .child("lmcache_driven", lmcache_driven)
            .field("shm_name", self.segment.name())
            .field(
                "worker_liveness",
                serde_json::json!({
                    "enabled": !self.cfg.worker_reap_timeout.is_zero(),
                    "reap_timeout_seconds": self.cfg.worker_reap_timeout.as_secs_f64(),
                    "registration_grace_seconds": self.cfg.worker_registration_grace.as_secs_f64(),
                    "tracked_instances": ids.len(),
                    "reaped_instances_total": c.instances_reaped.load(Relaxed),
                }),
            )
            .field("registered_non_cuda_instance_ids", ids)
            .field("non_cuda_context_meta", meta)
            .field(
                "sessions",
                serde_json::json!({
                    "active": self.sessions.active_count(),
                    "ttl_seconds": self.sessions.ttl().as_secs_f64(),
                    "created_total": self.sessions.created_total.load(Relaxed),
                    "ended_total": self.sessions.ended_total.load(Relaxed),
                    "expired_total": self.sessions.expired_total.load(Relaxed),
                    "locks_released_total": c.session_locks_released.load(Relaxed),
                }),
            )
            .field(
                "transfers",
                serde_json::json!({
                    "pending_stores": self.pending_stores.lock().len(),
                    "pending_retrieves": self.pending_retrieves.lock().len(),
                    "store_chunks_reserved_total": c.store_chunks_reserved.load(Relaxed),
                    "store_chunks_committed_total": c.store_chunks_committed.load(Relaxed),
                    "store_chunks_skipped_total": c.store_chunks_skipped.load(Relaxed),
                    "store_chunks_rejected_total": c.store_chunks_rejected.load(Relaxed),
                    "store_bytes_committed_total": c.store_bytes_committed.load(Relaxed),
                    "retrieve_chunks_total": c.retrieve_chunks.load(Relaxed),
                    "retrieve_bytes_total": c.retrieve_bytes.load(Relaxed),
                    "retrieve_refused_total": c.retrieve_refused.load(Relaxed),
                    "abandoned_total": c.abandoned_transfers.load(Relaxed),
                    "lookups_total": c.lookups.load(Relaxed),
                    "lookup_chunks_requested_total": c.lookup_chunks_requested.load(Relaxed),
                    "lookup_chunks_hit_total": c.lookup_chunks_hit.load(Relaxed),
                    "unknown_prefetch_queries_total": c.unknown_prefetch_queries.load(Relaxed),
                    "block_allocation_records_total": c.block_allocation_records.load(Relaxed),
                }),
            )
    }
}
