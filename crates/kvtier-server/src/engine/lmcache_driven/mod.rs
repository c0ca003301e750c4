//! The lmcache_driven transfer path: engines register their paged KV cache, then `store` and
//! `retrieve` name engine blocks and the server copies between those blocks and L1.
//!
//! This is vLLM's default with LMCache 0.5.6 (`LMCacheMPConnector`). kvtier serves the CPU form
//! of it: each layer's KV tensor arrives as a `cpu_shm` descriptor (msgpack ext type 1: a POSIX
//! shared-memory name, its size, and the tensor's dtype/shape/stride/storage offset), which the
//! server maps read-write (see [`mapping`]). Descriptors of other kinds (`cuda`, `cuda_raw`,
//! `cuda_vmm`, `musa`, `npu`, ...) are refused: the refusal is logged and shown in the status
//! tree under `lmcache_driven.contexts.<instance id>`, and store/retrieve for that instance
//! answer `(b"", false)`; nothing else is affected. `register_kv_cache` always replies `None`.
//!
//! Semantics (matching LMCache 0.5.6 except where noted):
//! - **Block ids.** `block_ids[g]` lists, for KV group `g` (the order of the registration's
//!   `engine_group_infos`, or one group of all layers when that list is empty), the engine
//!   blocks of the tokens `[key.start, key.end)` in order: chunk `i` of the range uses
//!   `block_ids[g][i*bpc .. (i+1)*bpc]` with `bpc = chunk_size / block_size`. Ids past what the
//!   range needs are ignored; too few ids, an id `>= num_blocks` or a group count that differs
//!   from the registration fail the whole call before anything is reserved or copied.
//! - **store** copies every full chunk of `[start, end)` into one L1 object per chunk in the
//!   engine-driven object layout ([`layout`]), so either path can read what the other wrote.
//!   Chunks already cached (or being written) are skipped; chunks whose block ids are all the
//!   null block 0 are not stored (LMCache's `--null-block-id 0`). The reply `(handle, true)` is
//!   sent only after the objects are published in L1 and visible to lookups (LMCache replies
//!   before its asynchronous `finish_write`, so an immediate lookup can miss). Unlike LMCache,
//!   a store that could not place every chunk for lack of memory replies `false`.
//! - **retrieve** needs the chunks to be locked by the session's lookup: it takes one lock per
//!   object from the session's records (the `prepare_retrieve` rule), copies, then releases
//!   them. A chunk that is missing, not locked, or of another size fails the call with
//!   `(handle, false)` and consumes nothing. `skip_first_n_tokens` counts from `key.start`:
//!   chunks wholly inside it are not copied, and in the chunk it ends in only the tokens from
//!   it on are written. (LMCache rounds the skip down to a block boundary; kvtier writes no
//!   token before the skip.) The blocks written must be distinct within a group.
//! - The event handle is echoed (`b"stub_ipc_handle"` when the client sent none), on failure
//!   too: on CPU the copy is finished when the reply is sent. A failed store or retrieve is an
//!   [`EngineError::Failed`](super::EngineError::Failed), so the RPC statistics count it as a
//!   failure.
//! - A second `register_kv_cache` for the same instance replaces the first (LMCache keeps the
//!   first); `unregister_kv_cache`, the worker reaper and shutdown drop the registration, and
//!   its segments are unmapped as soon as no transfer uses them (LMCache keeps dead engines'
//!   mappings: LMCache#4980).
//! - **A segment truncated under the server** (the engine shrinks its own file) no longer kills
//!   the server with `SIGBUS` (LMCache dies): the fault guard ([`fault`]) replaces the lost
//!   pages with zeros, the store or retrieve that hit it fails (`(handle, false)`, counted in
//!   `segment_faults_total`; a store publishes nothing), and so does every later one for that
//!   instance, before copying, until the engine registers again; the instance's status node is
//!   unhealthy with the reason meanwhile. Other instances and L1 are not affected.
//!
//! Performance: a store first faults in, with one `madvise(MADV_POPULATE_WRITE)` per run of
//! fresh 64 KiB granules, the L1 pages this process has never touched
//! (`ShmSegment::populate_once`); the first pass over a new L1 is otherwise bound by one page
//! fault per 4 KiB.
//!
//! Files: [`kv_cache`] (validation, groups, block checks, gather/scatter entry points),
//! [`layout`] (vLLM layouts and the copy kernels), [`mapping`] (engine segments), [`fault`]
//! (the `SIGBUS` guard of the mappings),
//! [`checksums`] (`POST /cache/checksums`); this file holds the registrations' lifecycle, the
//! store/retrieve operations and the status.
//!
//! Concurrency: registrations live in the engine's worker registry (`super::instances`), a
//! leaf `RwLock` held only to clone an `Arc` out or to insert/remove one (segments are unmapped
//! after the lock is released). Copies run with no
//! lock held, on up to `available_parallelism` scoped threads (`layout::run_transfer`); the L1
//! write ticket (store) or read locks (retrieve) keep the objects' memory stable meanwhile.
//! Lock order as in the engine: session mutex → L1.

pub mod checksums;
pub mod fault;
pub mod format;
pub mod kernels;
pub mod kv_cache;
pub mod layout;
pub mod mapping;
mod status;
mod transfer;

use std::num::NonZeroUsize;
use std::sync::Arc;
use std::time::Instant;

use kvtier_core::key::ObjectKey;
use kvtier_core::l1::L1Error;
use kvtier_proto::{IpcKey, RegisterKvCache};

use self::checksums::{ChecksumError, ChecksumRequest};
use self::kernels::{ChunkTarget, Direction, SendPtr};
pub use self::kv_cache::{
    BlockError, KvCacheMap, NULL_BLOCK_ID, RegisterError, SegmentFault, TransferError,
};
use super::{EngineError, Shared, malformed};

kvtier_core::metric_set! {
    /// Counters of the lmcache_driven path (status `lmcache_driven.counters`, Prometheus
    /// `kvtier_lmcache_driven_*`).
    pub struct LmcacheDrivenCounters {
        /// Registrations accepted.
        registered_total: Counter => "kvtier_lmcache_driven_registered",
        /// Registrations refused.
        refused_total: Counter => "kvtier_lmcache_driven_refused",
        /// Registrations removed by unregister_kv_cache.
        unregistered_total: Counter => "kvtier_lmcache_driven_unregistered",
        /// Registrations removed by the worker reaper.
        reaped_total: Counter => "kvtier_lmcache_driven_reaped",
        /// Store/retrieve calls for an unknown or refused instance.
        unregistered_transfers_total: Counter => "kvtier_lmcache_driven_unregistered_transfers",
        /// store calls.
        stores_total: Counter => "kvtier_lmcache_driven_stores",
        /// store calls that failed (replied false).
        stores_failed_total: Counter => "kvtier_lmcache_driven_stores_failed",
        /// Chunks copied into L1 and published.
        store_chunks_stored_total: Counter => "kvtier_lmcache_driven_store_chunks_stored",
        /// Chunks skipped because they were cached or being written.
        store_chunks_skipped_total: Counter => "kvtier_lmcache_driven_store_chunks_skipped",
        /// Chunks not stored because all their block ids are the null block.
        store_chunks_null_total: Counter => "kvtier_lmcache_driven_store_chunks_null",
        /// Chunks not stored for lack of L1 memory.
        store_chunks_rejected_total: Counter => "kvtier_lmcache_driven_store_chunks_rejected",
        /// retrieve calls.
        retrieves_total: Counter => "kvtier_lmcache_driven_retrieves",
        /// retrieve calls that failed (replied false).
        retrieves_failed_total: Counter => "kvtier_lmcache_driven_retrieves_failed",
        /// Chunks copied into engine blocks.
        retrieve_chunks_total: Counter => "kvtier_lmcache_driven_retrieve_chunks",
        /// Chunks not copied because skip_first_n_tokens covered them.
        retrieve_chunks_skipped_total: Counter => "kvtier_lmcache_driven_retrieve_chunks_skipped",
        /// Bytes copied engine to L1.
        bytes_gathered_total: Counter[Bytes] => "kvtier_lmcache_driven_bytes_gathered",
        /// Bytes copied L1 to engine.
        bytes_scattered_total: Counter[Bytes] => "kvtier_lmcache_driven_bytes_scattered",
        /// store/retrieve calls failed because an engine segment was truncated under the
        /// server (the SIGBUS was contained; the instance stays failed until it registers again).
        segment_faults_total: Counter => "kvtier_lmcache_driven_segment_faults",
    }
}

/// One lmcache_driven registration (or the reason it was refused).
#[derive(Debug)]
pub struct LmcacheInstance {
    model_name: String,
    world_size: u32,
    engine_type: String,
    kv: Result<Arc<KvCacheMap>, String>,
}

impl LmcacheInstance {
    /// The model the engine serves.
    pub fn model_name(&self) -> &str {
        &self.model_name
    }

    /// Tensor-parallel world size of the engine.
    pub fn world_size(&self) -> u32 {
        self.world_size
    }

    /// The registration's KV layout with LMCache's `cache_context_meta.*.kv_cache_layout`
    /// field names (`None` when the registration was refused).
    pub fn layout_meta(&self) -> Option<serde_json::Value> {
        let kv = self.kv.as_ref().ok()?;
        let g = kv.geometry();
        let per_token = g.num_layers * g.planes() * g.row_bytes();
        let shape: Vec<usize> = if g.kv_format.is_mla() {
            vec![g.num_blocks, g.block_size, g.head_size]
        } else {
            vec![2, g.num_blocks, g.block_size, g.num_heads, g.head_size]
        };
        Some(serde_json::json!({
            "num_layers": g.num_layers,
            "num_blocks": g.num_blocks,
            "cache_size_per_token": per_token,
            "kernel_groups": [{
                "kernel_group_idx": 0,
                "engine_group_idx": 0,
                "object_group_idx": 0,
                "num_layers": g.num_layers,
                "tokens_per_block": g.block_size,
                "slots_per_block": g.block_size,
                "dtype": g.dtype,
                "is_mla": g.kv_format.is_mla(),
                "attention_backend": self.engine_type,
                "engine_kv_shape": g.kv_format.lmcache_name(),
                "engine_kv_concrete_shape": shape,
            }],
        }))
    }
}

/// The lmcache_driven path: copy threads and counters. Registrations live in the engine's
/// worker registry.
#[derive(Debug)]
pub struct LmcacheDriven {
    threads: NonZeroUsize,
    counters: LmcacheDrivenCounters,
}

impl Default for LmcacheDriven {
    fn default() -> Self {
        Self::new()
    }
}

/// Runs one `store`/`retrieve`, counting it and, when it fails, its failure (with a warning
/// naming the request).
fn counted(
    total: &kvtier_core::metrics::Counter,
    failed: &kvtier_core::metrics::Counter,
    op: &str,
    instance_id: i64,
    key: &IpcKey,
    run: impl FnOnce() -> Result<(), EngineError>,
) -> Result<(), EngineError> {
    total.inc();
    let result = run();
    if let Err(e) = &result {
        failed.inc();
        tracing::warn!(op, instance_id, request_id = %key.request_id, reason = %e, "lmcache_driven transfer failed");
    }
    result
}

fn usize_of(v: u64) -> Option<usize> {
    usize::try_from(v).ok()
}

impl LmcacheDriven {
    /// Copies use up to `available_parallelism` threads.
    pub fn new() -> Self {
        Self {
            threads: std::thread::available_parallelism().unwrap_or(NonZeroUsize::MIN),
            counters: LmcacheDrivenCounters::default(),
        }
    }

    /// Counters.
    pub fn counters(&self) -> &LmcacheDrivenCounters {
        &self.counters
    }

    /// The registered KV cache of `iid` (refreshing the worker's liveness), or why there is
    /// none.
    fn instance(
        &self,
        cx: &Shared,
        iid: i64,
        now: Instant,
    ) -> Result<Arc<KvCacheMap>, EngineError> {
        let refused = |why: String| {
            self.counters.unregistered_transfers_total.inc();
            EngineError::Failed(why)
        };
        let Some(inst) = cx.instances.lmcache_driven(iid, now) else {
            return Err(refused(format!(
                "lmcache_driven instance {iid} is not registered"
            )));
        };
        let kv = match &inst.kv {
            Ok(kv) => Arc::clone(kv),
            Err(reason) => {
                return Err(refused(format!(
                    "lmcache_driven instance {iid} was refused at registration: {reason}"
                )));
            }
        };
        // A faulted registration fails before anything is reserved or copied.
        match kv.fault() {
            None => Ok(kv),
            Some(fault) => Err(self.faulted(iid, &fault)),
        }
    }

    /// Counts a transfer failed by a segment fault and says why.
    fn faulted(&self, iid: i64, fault: &SegmentFault) -> EngineError {
        self.counters.segment_faults_total.inc();
        EngineError::Failed(format!("lmcache_driven instance {iid}: {fault}"))
    }

    /// `register_kv_cache`: maps the engine's KV cache or records why it cannot.
    pub(super) fn register(&self, cx: &Shared, r: RegisterKvCache, now: Instant) {
        let forbidden = mapping::segment_id(cx.segment.name());
        let kv = KvCacheMap::map(
            &r.kv_cache,
            &r.layout_hints,
            &r.engine_group_infos,
            cx.chunk_size,
            forbidden,
        );
        let kv = match kv {
            Ok(kv) => {
                let g = kv.geometry();
                tracing::info!(
                    instance_id = r.instance_id,
                    model = %r.model_name,
                    world_size = r.world_size,
                    layers = g.num_layers,
                    kv_format = g.kv_format.lmcache_name(),
                    blocks = g.num_blocks,
                    block_size = g.block_size,
                    heads = g.num_heads,
                    head_size = g.head_size,
                    dtype = %g.dtype,
                    object_bytes = g.object_len(),
                    mapped_bytes = kv.mapped_bytes(),
                    "lmcache_driven KV cache registered"
                );
                self.counters.registered_total.inc();
                Ok(Arc::new(kv))
            }
            Err(e) => {
                tracing::warn!(
                    instance_id = r.instance_id,
                    model = %r.model_name,
                    reason = %e,
                    "lmcache_driven KV cache registration refused; stores and retrieves for \
                     this instance will fail"
                );
                self.counters.refused_total.inc();
                Err(e.to_string())
            }
        };
        let inst = LmcacheInstance {
            model_name: r.model_name,
            world_size: r.world_size,
            engine_type: r.engine_type,
            kv,
        };
        let old = cx
            .instances
            .register_lmcache_driven(r.instance_id, inst, now);
        if old.is_some() {
            tracing::info!(
                instance_id = r.instance_id,
                "lmcache_driven instance re-registered; the previous registration is dropped"
            );
        }
        // `old` (and its mappings, once no transfer uses them) is dropped here, unlocked.
        drop(old);
    }

    /// `unregister_kv_cache`: drops the registration. Returns whether there was one.
    pub(super) fn unregister(&self, cx: &Shared, iid: i64) -> bool {
        let old = cx.instances.unregister_lmcache_driven(iid);
        let known = old.is_some();
        if known {
            self.counters.unregistered_total.inc();
            tracing::info!(instance_id = iid, "lmcache_driven KV cache unregistered");
        } else {
            tracing::warn!(
                instance_id = iid,
                "unregister_kv_cache for an unknown instance"
            );
        }
        drop(old);
        known
    }

    /// A registration removed by the worker reaper (`reaped`) or at shutdown; its mappings go
    /// once no transfer uses them.
    pub(super) fn released(&self, inst: Arc<LmcacheInstance>, reaped: bool) {
        if reaped {
            self.counters.reaped_total.inc();
            tracing::warn!(
                model = %inst.model_name,
                "lmcache_driven instance silent too long; unmapping its KV cache"
            );
        }
        drop(inst);
    }

    /// `POST /cache/checksums` for a registered instance.
    pub(super) fn checksums(
        &self,
        cx: &Shared,
        req: &ChecksumRequest,
    ) -> Result<serde_json::Value, ChecksumError> {
        let inst = cx
            .instances
            .peek_lmcache_driven(req.instance_id)
            .ok_or(ChecksumError::NotRegistered(req.instance_id))?;
        let kv = match &inst.kv {
            Ok(kv) => Arc::clone(kv),
            Err(reason) => return Err(ChecksumError::Refused(req.instance_id, reason.clone())),
        };
        drop(inst);
        checksums::checksums(&kv, req)
    }
}
