//! The engine-driven transfer path (shared memory; the server copies nothing).
//!
//! The L1 pool *is* the segment engines map. `prepare_store` reserves staging objects and
//! hands out their offsets; the engine copies into them and `commit_store` publishes them (and
//! queues them for L2 write-behind). `prepare_retrieve` takes one lookup lock per object out of
//! the request's session (the one lock-taking rule, [`Sessions::take`]) into a pending
//! retrieve and returns the offsets; `commit_retrieve` releases them.
//!
//! Ownership: this component owns the pending transfers. Every staging object belongs to one
//! pending store and every lock moved out of a session to one pending retrieve until its
//! commit, a newer prepare of the same range, the instance's unregistration or reaping
//! ([`EngineDriven::release_instance`]), or the TTL sweep ([`EngineDriven::sweep`]).
//!
//! Late writers: the engine writes into the offsets `prepare_store` handed out whenever it
//! likes, so a store's reservations are never given back to L1 on the server's own initiative
//! while the engine may still write them. Past the write TTL, L1 quarantines them (their keys
//! are free for other writers, their memory is not; `kvtier_core::l1::manager`); the pending
//! store stays here so that the engine's late `commit_store` (answered `false`: its chunks are
//! void) or the instance's release can free them. The sweep drops a pending store only once L1
//! no longer holds any of its reservations (the quarantine budget forced their reuse).
//!
//! Lock order: a pending-transfer map's mutex is held for O(1) insert/remove, or one pass over
//! the pending transfers (a handful per engine) to drain or copy out matches; never across an
//! L1 call.
//!
//! [`Sessions::take`]: super::session::Sessions::take

use std::collections::HashMap;
use std::time::Instant;

use kvtier_core::key::ObjectKey;
use kvtier_core::l1::{L1Error, ReadLease, WriteTicket};
use kvtier_proto::response::{RegisterEngineDrivenContextResponse, Response, Slot};
use kvtier_proto::{IpcKey, RegisterEngineDrivenContext, dtype_itemsize};
use parking_lot::Mutex;

use super::{EngineError, Shared, malformed};

/// A registered engine-driven context (one engine worker process).
#[derive(Debug, Clone)]
pub struct Context {
    /// The registration as sent.
    pub info: RegisterEngineDrivenContext,
    /// Slot shape: `[2, layers, slots, hidden]` or `[layers, slots, hidden]` for MLA.
    pub shape: Vec<u64>,
    /// Bytes per chunk object.
    pub object_len: u64,
}

impl Context {
    fn slot(&self, offset: u64) -> Slot {
        Slot {
            offset,
            length: self.object_len,
            shape: self.shape.clone(),
            dtype: self.info.dtype_str.clone(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct TransferKey {
    instance_id: i64,
    request_id: String,
    worker: u32,
    start: u64,
    end: u64,
}

impl TransferKey {
    fn new(key: &IpcKey, instance_id: i64, worker: u32) -> Self {
        Self {
            instance_id,
            request_id: key.request_id.clone(),
            worker,
            start: key.start,
            end: key.end,
        }
    }
}

#[derive(Debug)]
struct PendingStore {
    tickets: Vec<WriteTicket>,
    /// The key of each ticket (for L2 write-behind on commit).
    keys: Vec<ObjectKey>,
    created: Instant,
}

#[derive(Debug)]
struct PendingRetrieve {
    leases: Vec<ReadLease>,
    created: Instant,
}

/// Removes and returns the entries of `map` that match `pred` (one pass under its lock).
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

/// The engine-driven path and the transfers it has prepared but not yet seen committed.
#[derive(Debug, Default)]
pub struct EngineDriven {
    pending_stores: Mutex<HashMap<TransferKey, PendingStore>>,
    pending_retrieves: Mutex<HashMap<TransferKey, PendingRetrieve>>,
}

fn worker_of(key: &IpcKey, op: &str) -> Result<u32, EngineError> {
    key.worker_id
        .ok_or_else(|| malformed(format!("{op} needs worker_id")))
}

fn context(
    cx: &Shared,
    instance_id: i64,
    now: Instant,
) -> Result<std::sync::Arc<Context>, EngineError> {
    cx.instances.engine_driven(instance_id, now).ok_or_else(|| {
        EngineError::Failed(format!(
            "engine-driven context {instance_id} is not registered"
        ))
    })
}

impl EngineDriven {
    /// `(pending stores, pending retrieves)` (two brief lock acquisitions; O(1)).
    pub fn pending_counts(&self) -> (usize, usize) {
        let stores = self.pending_stores.lock().len();
        let retrieves = self.pending_retrieves.lock().len();
        (stores, retrieves)
    }

    /// `register_kv_cache_engine_driven_context`: validates the slot geometry and records the
    /// context; answers the segment's name and size.
    pub(super) fn register(
        &self,
        cx: &Shared,
        p: RegisterEngineDrivenContext,
        now: Instant,
    ) -> Result<RegisterEngineDrivenContextResponse, EngineError> {
        let itemsize = dtype_itemsize(&p.dtype_str)
            .ok_or_else(|| malformed(format!("unknown dtype_str {:?}", p.dtype_str)))?;
        if p.num_layers == 0 || p.hidden_dim_size == 0 || p.block_size == 0 {
            return Err(malformed(
                "num_layers, hidden_dim_size and block_size must be positive",
            ));
        }
        let slots = u64::from(p.num_physical_slots.unwrap_or(cx.chunk_size as u32));
        if slots == 0 {
            return Err(malformed("num_physical_slots must be positive"));
        }
        let (layers, hidden) = (u64::from(p.num_layers), u64::from(p.hidden_dim_size));
        let shape: Vec<u64> = if p.use_mla {
            vec![layers, slots, hidden]
        } else {
            vec![2, layers, slots, hidden]
        };
        let capacity = cx.l1.capacity_bytes();
        let object_len = shape
            .iter()
            .try_fold(itemsize as u64, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= capacity)
            .ok_or_else(|| {
                malformed(format!(
                    "a chunk of shape {shape:?} x {} does not fit in L1 ({capacity} bytes)",
                    p.dtype_str
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
        };
        if cx.instances.register_engine_driven(iid, ctx, now).is_some() {
            tracing::info!(
                instance_id = iid,
                "context re-registered; previous layout replaced"
            );
        }
        Ok(RegisterEngineDrivenContextResponse {
            shm_name: cx.segment.name().to_owned(),
            pool_size: capacity,
        })
    }

    /// `prepare_store`: reserves staging objects for the chunks not cached yet.
    pub(super) fn prepare_store(
        &self,
        cx: &Shared,
        key: &IpcKey,
        instance_id: i64,
        now: Instant,
    ) -> Result<Response, EngineError> {
        let ctx = context(cx, instance_id, now)?;
        let worker = worker_of(key, "prepare_store")?;
        let session = cx.session(&key.request_id, now);
        let span = cx.sessions.span(&session, key, Some(worker), now)?;
        let range_tokens = span.token_ids(key);
        let items: Vec<(ObjectKey, u64)> =
            span.keys.into_iter().map(|k| (k, ctx.object_len)).collect();
        let mut tickets = Vec::new();
        let mut ticket_keys = Vec::new();
        let mut slots = Vec::new();
        let mut chunk_indices = Vec::new();
        let (mut skipped, mut rejected) = (0u64, 0u64);
        for (i, (r, (k, _))) in cx
            .l1
            .reserve_write(&items, false)
            .into_iter()
            .zip(&items)
            .enumerate()
        {
            match r {
                Ok(t) => {
                    slots.push(ctx.slot(t.alloc.offset));
                    chunk_indices.push(i as u64);
                    tickets.push(t);
                    ticket_keys.push(k.clone());
                }
                Err(L1Error::OutOfMemory | L1Error::QuotaExceeded) => rejected += 1,
                Err(_) => skipped += 1,
            }
        }
        let c = &cx.counters;
        c.store_chunks_skipped_total.add(skipped);
        if rejected > 0 {
            c.store_chunks_rejected_total.add(rejected);
            cx.evictor.wake();
            tracing::warn!(
                request_id = %key.request_id,
                chunks = rejected,
                "store rejected: L1 has no room even after evicting every unlocked object"
            );
        }
        c.store_chunks_reserved_total.add(tickets.len() as u64);
        cx.events.bind(
            &span.hashes,
            span.parent,
            range_tokens,
            cx.chunk_size,
            chunk_indices
                .iter()
                .filter_map(|&i| usize::try_from(i).ok()),
        );
        if !tickets.is_empty() {
            let old = self.pending_stores.lock().insert(
                TransferKey::new(key, instance_id, worker),
                PendingStore {
                    tickets,
                    keys: ticket_keys,
                    created: now,
                },
            );
            if let Some(old) = old {
                // The client prepared the same range again without committing: the first
                // reservation is abandoned.
                cx.l1.abort_write(&old.tickets);
                c.abandoned_total.inc();
            }
        }
        Ok(Response::PrepareStore {
            slots,
            chunk_indices,
        })
    }

    /// `commit_store`: publishes the pending store of the range.
    pub(super) fn commit_store(
        &self,
        cx: &Shared,
        key: &IpcKey,
        instance_id: i64,
        data: &[u8],
    ) -> Result<(), EngineError> {
        let worker = worker_of(key, "commit_store")?;
        let tk = TransferKey::new(key, instance_id, worker);
        let Some(pending) = self.pending_stores.lock().remove(&tk) else {
            return Err(EngineError::Failed(format!(
                "commit_store without a pending prepare_store (request {}, range [{}, {}))",
                key.request_id, key.start, key.end
            )));
        };
        if !data.is_empty() {
            cx.l1.abort_write(&pending.tickets);
            return Err(EngineError::Unsupported(
                "commit_store with inline (pickled) data; kvtier serves shared memory only",
            ));
        }
        let results = cx.l1.finish_write(&pending.tickets);
        let mut published = Vec::with_capacity(results.len());
        let mut bytes = 0u64;
        for ((t, k), r) in pending.tickets.iter().zip(pending.keys).zip(&results) {
            if r.is_ok() {
                bytes += t.alloc.len;
                published.push(k);
            }
        }
        let ok = published.len();
        cx.counters.store_chunks_committed_total.add(ok as u64);
        cx.counters.store_bytes_committed_total.add(bytes);
        cx.l2.stored(published);
        if ok != results.len() {
            return Err(EngineError::Failed(format!(
                "{} of {} chunks expired or were cleared before commit",
                results.len() - ok,
                results.len()
            )));
        }
        Ok(())
    }

    /// `prepare_retrieve`: moves one lookup lock per chunk into a pending retrieve.
    pub(super) fn prepare_retrieve(
        &self,
        cx: &Shared,
        key: &IpcKey,
        instance_id: i64,
        now: Instant,
    ) -> Result<Vec<Slot>, EngineError> {
        let refuse = |why: String| {
            cx.counters.retrieve_refused_total.inc();
            cx.explain.retrieved(&key.request_id, 0, false);
            EngineError::Failed(why)
        };
        let ctx = context(cx, instance_id, now)?;
        let worker = worker_of(key, "prepare_retrieve")?;
        let Some(session) = cx.sessions.get(&key.request_id) else {
            return Err(refuse(format!(
                "prepare_retrieve for request {} without a lookup",
                key.request_id
            )));
        };
        let keys = cx.sessions.keys(&session, key, Some(worker), now)?;
        let leases = cx
            .sessions
            .take(&session, &keys, ctx.object_len)
            .map_err(|e| refuse(format!("request {}: {e}", key.request_id)))?;
        let slots: Vec<Slot> = leases.iter().map(|l| ctx.slot(l.alloc.offset)).collect();
        cx.counters.retrieve_chunks_total.add(slots.len() as u64);
        cx.explain.retrieved(&key.request_id, slots.len(), true);
        cx.counters
            .retrieve_bytes_total
            .add(leases.iter().map(|l| l.alloc.len).sum::<u64>());
        let old = self.pending_retrieves.lock().insert(
            TransferKey::new(key, instance_id, worker),
            PendingRetrieve {
                leases,
                created: now,
            },
        );
        if let Some(old) = old {
            cx.l1.finish_read(&old.leases, 1);
            cx.counters.abandoned_total.inc();
        }
        Ok(slots)
    }

    /// `commit_retrieve`: releases the pending retrieve of the range.
    pub(super) fn commit_retrieve(
        &self,
        cx: &Shared,
        key: &IpcKey,
        instance_id: i64,
    ) -> Result<(), EngineError> {
        let worker = worker_of(key, "commit_retrieve")?;
        let tk = TransferKey::new(key, instance_id, worker);
        let Some(pending) = self.pending_retrieves.lock().remove(&tk) else {
            return Err(EngineError::Failed(format!(
                "commit_retrieve without a pending prepare_retrieve (request {})",
                key.request_id
            )));
        };
        cx.l1.finish_read(&pending.leases, 1);
        Ok(())
    }

    /// Releases the pending transfers of an instance (unregistered or reaped).
    pub(super) fn release_instance(&self, cx: &Shared, instance_id: i64) {
        self.release_matching(
            cx,
            |k, _| k.instance_id == instance_id,
            |k, _| k.instance_id == instance_id,
        );
    }

    /// Drops transfers the client never committed: retrieves prepared longer ago than the read
    /// TTL (their locks are released), and stores older than the write TTL whose reservations
    /// L1 no longer holds (see the module docs: quarantined ones stay until the writer or its
    /// instance comes back).
    pub(super) fn sweep(&self, cx: &Shared, now: Instant) {
        let (write_ttl, read_ttl) = (cx.l1.config().write_ttl, cx.l1.config().read_ttl);
        let retrieves = drain_matching(&self.pending_retrieves, |_, r| {
            now.saturating_duration_since(r.created) > read_ttl
        });
        for r in &retrieves {
            cx.l1.finish_read(&r.leases, 1);
        }
        let lapsed: Vec<(TransferKey, Vec<WriteTicket>)> = self
            .pending_stores
            .lock()
            .iter()
            .filter(|(_, s)| now.saturating_duration_since(s.created) > write_ttl)
            .map(|(k, s)| (k.clone(), s.tickets.clone()))
            .collect();
        // Asked without the map lock; an entry replaced meanwhile (same range prepared again)
        // has other tickets and is kept.
        let gone: Vec<(TransferKey, Vec<WriteTicket>)> = lapsed
            .into_iter()
            .filter(|(_, tickets)| !cx.l1.holds_any(tickets))
            .collect();
        let mut stores = 0usize;
        if !gone.is_empty() {
            let mut map = self.pending_stores.lock();
            for (k, tickets) in gone {
                if map.get(&k).is_some_and(|s| s.tickets == tickets) {
                    map.remove(&k);
                    stores += 1;
                }
            }
        }
        cx.counters
            .abandoned_total
            .add((retrieves.len() + stores) as u64);
    }

    /// Releases every pending transfer (shutdown).
    pub(super) fn release_all(&self, cx: &Shared) {
        self.release_matching(cx, |_, _| true, |_, _| true);
    }

    /// Removes the pending stores and retrieves matching the predicates and gives their L1
    /// reservations and locks back; returns how many there were.
    fn release_matching(
        &self,
        cx: &Shared,
        store: impl FnMut(&TransferKey, &PendingStore) -> bool,
        retrieve: impl FnMut(&TransferKey, &PendingRetrieve) -> bool,
    ) -> usize {
        let stores = drain_matching(&self.pending_stores, store);
        let retrieves = drain_matching(&self.pending_retrieves, retrieve);
        for s in &stores {
            cx.l1.abort_write(&s.tickets);
        }
        for r in &retrieves {
            cx.l1.finish_read(&r.leases, 1);
        }
        stores.len() + retrieves.len()
    }
}
