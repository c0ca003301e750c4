//! `store` and `retrieve` of the lmcache_driven path: the keys of the request's span, L1
//! reservations or the session's read locks, the gather or scatter between the engine's
//! registered KV caches and L1 (`kv_cache.rs`), with the segment's fault flags checked around
//! every copy, and the commit or release that follows.

use super::*;

impl LmcacheDriven {
    /// `store`: gathers the full chunks of `[start, end)` from the engine blocks into L1.
    ///
    /// # Errors
    /// [`EngineError::Failed`] (counted in `stores_failed_total`) when anything was not
    /// stored; [`EngineError::Malformed`] for a bad key.
    pub(in crate::engine) fn store(
        &self,
        cx: &Shared,
        key: &IpcKey,
        instance_id: i64,
        block_ids: &[Vec<u64>],
        now: Instant,
    ) -> Result<(), EngineError> {
        counted(
            &self.counters.stores_total,
            &self.counters.stores_failed_total,
            "store",
            instance_id,
            key,
            || self.store_inner(cx, key, instance_id, block_ids, now),
        )
    }

    pub(super) fn store_inner(
        &self,
        cx: &Shared,
        key: &IpcKey,
        instance_id: i64,
        block_ids: &[Vec<u64>],
        now: Instant,
    ) -> Result<(), EngineError> {
        let c = &self.counters;
        let fail = |why: String| EngineError::Failed(why);
        let kv = self.instance(cx, instance_id, now)?;
        let worker = key
            .worker_id
            .ok_or_else(|| malformed("store needs worker_id"))?;
        let session = cx.session(&key.request_id, now);
        let span = cx.sessions.span(&session, key, Some(worker), now)?;
        let range_tokens = span.token_ids(key);
        let keys = span.keys;
        kv.check_blocks(block_ids, keys.len(), None)
            .map_err(|e| fail(e.to_string()))?;
        let object_len = kv.object_len();
        let mut items: Vec<(ObjectKey, u64)> = Vec::with_capacity(keys.len());
        let mut chunk_of: Vec<usize> = Vec::with_capacity(keys.len());
        for (i, k) in keys.into_iter().enumerate() {
            if kv.chunk_is_null(block_ids, i) {
                c.store_chunks_null_total.inc();
            } else {
                items.push((k, object_len as u64));
                chunk_of.push(i);
            }
        }
        let mut tickets = Vec::with_capacity(items.len());
        let mut ticket_keys: Vec<ObjectKey> = Vec::with_capacity(items.len());
        let mut targets = Vec::with_capacity(items.len());
        let (mut skipped, mut rejected) = (0u64, 0u64);
        let mut bad_offset = None;
        let reserved = cx.l1.reserve_write(&items, false);
        for ((r, &index), (k, _)) in reserved.into_iter().zip(&chunk_of).zip(&items) {
            match r {
                Ok(t) => {
                    match usize_of(t.alloc.offset).map(|o| cx.segment.ptr_at(o, object_len)) {
                        Some(Ok(p)) => targets.push(ChunkTarget {
                            index,
                            object: SendPtr(p),
                            skip_tokens: 0,
                        }),
                        _ => bad_offset = Some(t.alloc.offset),
                    }
                    ticket_keys.push(k.clone());
                    tickets.push(t);
                }
                Err(L1Error::OutOfMemory | L1Error::QuotaExceeded) => rejected += 1,
                Err(_) => skipped += 1,
            }
        }
        c.store_chunks_skipped_total.add(skipped);
        cx.events.bind(
            &span.hashes,
            span.parent,
            range_tokens,
            cx.chunk_size,
            targets.iter().map(|t| t.index),
        );
        if let Some(offset) = bad_offset {
            cx.l1.abort_write(&tickets);
            return Err(fail(format!(
                "L1 object at offset {offset} lies outside the segment"
            )));
        }
        for t in &tickets {
            if let Some(off) = usize_of(t.alloc.offset) {
                cx.segment.populate_once(off, object_len);
            }
        }
        // SAFETY: the block ids were checked for `chunk_of`'s chunks; each target is a staging
        // object of `object_len` bytes reserved by this call (its write ticket gives us sole
        // write access until `finish_write`), inside the L1 segment, which outlives the call.
        let copied =
            unsafe { kv.transfer_raw(block_ids, &targets, Direction::Gather, self.threads) };
        if let Err(fault) = copied {
            // The objects hold zeros where the engine's pages were lost: never publish them.
            cx.l1.abort_write(&tickets);
            return Err(self.faulted(instance_id, &fault));
        }
        let results = cx.l1.finish_write(&tickets);
        let published: Vec<ObjectKey> = ticket_keys
            .into_iter()
            .zip(&results)
            .filter(|(_, r)| r.is_ok())
            .map(|(k, _)| k)
            .collect();
        let stored = published.len();
        c.store_chunks_stored_total.add(stored as u64);
        c.bytes_gathered_total
            .add((targets.len() * object_len) as u64);
        cx.counters.store_chunks_committed_total.add(stored as u64);
        cx.counters
            .store_bytes_committed_total
            .add((stored * object_len) as u64);
        // Published objects are written behind to L2 exactly like engine-driven commits.
        cx.l2.stored(published);
        if rejected > 0 {
            c.store_chunks_rejected_total.add(rejected);
            cx.evictor.wake();
            return Err(fail(format!(
                "{rejected} chunk(s) not stored: L1 has no room even after evicting every \
                 unlocked object"
            )));
        }
        if stored != results.len() {
            return Err(fail(format!(
                "{} of {} chunk(s) were discarded (write TTL or forced clear) before publishing",
                results.len() - stored,
                results.len()
            )));
        }
        Ok(())
    }

    /// `retrieve`: scatters chunks locked by the session's lookup into the engine blocks.
    ///
    /// # Errors
    /// [`EngineError::Failed`] (counted in `retrieves_failed_total`) when nothing was copied;
    /// [`EngineError::Malformed`] for a bad key.
    pub(in crate::engine) fn retrieve(
        &self,
        cx: &Shared,
        key: &IpcKey,
        instance_id: i64,
        block_ids: &[Vec<u64>],
        skip_first_n_tokens: u64,
        now: Instant,
    ) -> Result<(), EngineError> {
        let result = counted(
            &self.counters.retrieves_total,
            &self.counters.retrieves_failed_total,
            "retrieve",
            instance_id,
            key,
            || self.retrieve_inner(cx, key, instance_id, block_ids, skip_first_n_tokens, now),
        );
        if result.is_err() {
            cx.explain.retrieved(&key.request_id, 0, false);
        }
        result
    }

    pub(super) fn retrieve_inner(
        &self,
        cx: &Shared,
        key: &IpcKey,
        instance_id: i64,
        block_ids: &[Vec<u64>],
        skip_first_n_tokens: u64,
        now: Instant,
    ) -> Result<(), EngineError> {
        let fail = |why: String| EngineError::Failed(why);
        let kv = self.instance(cx, instance_id, now)?;
        let worker = key
            .worker_id
            .ok_or_else(|| malformed("retrieve needs worker_id"))?;
        let cs = cx.chunk_size as u64;
        if key.end / cs <= key.start / cs {
            return Ok(()); // no full chunk in the range: nothing to copy
        }
        let Some(session) = cx.sessions.get(&key.request_id) else {
            return Err(fail(format!(
                "no lookup session for request {}",
                key.request_id
            )));
        };
        let keys = cx.sessions.keys(&session, key, Some(worker), now)?;
        let skip = usize::try_from(skip_first_n_tokens).unwrap_or(usize::MAX);
        kv.check_blocks(block_ids, keys.len(), Some(skip))
            .map_err(|e| fail(e.to_string()))?;
        let object_len = kv.object_len();
        let leases = cx
            .sessions
            .take(&session, &keys, object_len as u64)
            .map_err(|e| fail(e.to_string()))?;
        let cs = cx.chunk_size;
        let mut targets = Vec::with_capacity(leases.len());
        let mut bad_offset = None;
        for (index, lease) in leases.iter().enumerate() {
            if skip >= (index + 1) * cs {
                continue;
            }
            match usize_of(lease.alloc.offset).map(|o| cx.segment.ptr_at(o, object_len)) {
                Some(Ok(p)) => targets.push(ChunkTarget {
                    index,
                    object: SendPtr(p),
                    skip_tokens: skip.saturating_sub(index * cs),
                }),
                _ => bad_offset = Some(lease.alloc.offset),
            }
        }
        if let Some(offset) = bad_offset {
            cx.l1.finish_read(&leases, 1);
            return Err(fail(format!(
                "L1 object at offset {offset} lies outside the segment"
            )));
        }
        // SAFETY: the block ids were checked with this skip (distinct written blocks); each
        // target is a published object read-locked by this call (so not freed or rewritten
        // until `finish_read`), inside the L1 segment, which outlives the call.
        let copied =
            unsafe { kv.transfer_raw(block_ids, &targets, Direction::Scatter, self.threads) };
        cx.l1.finish_read(&leases, 1);
        if let Err(fault) = copied {
            return Err(self.faulted(instance_id, &fault));
        }
        let c = &self.counters;
        let copied = targets.len();
        c.retrieve_chunks_total.add(copied as u64);
        c.retrieve_chunks_skipped_total
            .add((leases.len() - copied) as u64);
        c.bytes_scattered_total.add((copied * object_len) as u64);
        cx.counters.retrieve_chunks_total.add(copied as u64);
        cx.counters
            .retrieve_bytes_total
            .add((copied * object_len) as u64);
        cx.explain.retrieved(&key.request_id, copied, true);
        Ok(())
    }
}
