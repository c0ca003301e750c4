//! The store path: reserving slots for new objects (`reserve_write`: repeats within a call found
//! before the lock, tenants resolved once per run of equal salts, synchronous eviction when the
//! pool or a quota is full), publishing them (`finish_write`, `finish_write_and_reserve_read`)
//! and giving reservations back (`abort_write`, which also frees a quarantined reservation whose
//! writer returned). The state rules are in the `manager` module docs.

use super::*;

/// Batches up to this many keys are checked for repeats by a linear scan; larger ones by a hash
/// set (the scan's O(k^2) would dominate).
const LINEAR_REPEAT_CHECK_MAX: usize = 16;

/// For each item: whether its key already occurred earlier in `items`. O(k) for large batches.
fn repeated_keys(items: &[(ObjectKey, u64)]) -> Vec<bool> {
    if items.len() <= LINEAR_REPEAT_CHECK_MAX {
        return items
            .iter()
            .enumerate()
            .map(|(i, (key, _))| items[..i].iter().any(|(k, _)| k == key))
            .collect();
    }
    let mut seen: crate::collections::FastSet<&ObjectKey> =
        crate::collections::FastSet::with_capacity_and_hasher(items.len(), Default::default());
    items.iter().map(|(key, _)| !seen.insert(key)).collect()
}

/// The tenant of each item in `new_idx` (created when needed). The keys of one request share
/// their salt, so each run of equal salts is resolved once.
fn resolve_tenants(
    tenants: &mut Tenants,
    items: &[(ObjectKey, u64)],
    new_idx: &[usize],
) -> Vec<TenantId> {
    let mut out = Vec::with_capacity(new_idx.len());
    let mut last: Option<(&Arc<str>, TenantId)> = None;
    for &i in new_idx {
        let salt = &items[i].0.cache_salt;
        let t = match last {
            Some((s, t)) if s == salt => t,
            _ => tenants.resolve(salt),
        };
        last = Some((salt, t));
        out.push(t);
    }
    out
}

impl L1Manager {
    /// Reserves staging objects for `items` (`(key, length in bytes)`).
    ///
    /// Keys that already exist (ready, read-locked or staging for another writer) get
    /// `KeyNotWritable`, as does a key repeated within the call. All new keys are allocated as one
    /// batch: if it does not fit even after synchronous eviction, every new key gets
    /// `OutOfMemory` and nothing is reserved.
    pub fn reserve_write(
        &self,
        items: &[(ObjectKey, u64)],
        temporary: bool,
    ) -> Vec<Result<WriteTicket, L1Error>> {
        // Repeats within the call are found before the lock is taken (O(k)).
        let repeated = repeated_keys(items);
        let now_instant = self.clock.now();
        let now = self.ticks(now_instant);
        let mut inner = self.inner.lock();
        let mut out: Vec<Result<WriteTicket, L1Error>> = Vec::with_capacity(items.len());
        let mut new_idx: Vec<usize> = Vec::with_capacity(items.len());
        let mut sizes: Vec<u64> = Vec::with_capacity(items.len());
        for (i, ((key, len), repeat)) in items.iter().zip(repeated).enumerate() {
            if let Some(id) = inner.lookup(key) {
                let expired_staging = inner.entry(id).is_some_and(|e| {
                    e.phase() == Phase::Staging && e.deadline().is_some_and(|d| d <= now)
                });
                if expired_staging {
                    self.expire_staging(&mut inner, id);
                } else {
                    out.push(Err(L1Error::KeyNotWritable));
                    continue;
                }
            }
            if repeat {
                out.push(Err(L1Error::KeyNotWritable));
                continue;
            }
            // An entry stores the length as `u32` (see `Entry`): longer objects never fit.
            if *len == 0 || *len > u64::from(u32::MAX) || inner.alloc.reserved_size(*len).is_none()
            {
                out.push(Err(L1Error::OutOfMemory));
                continue;
            }
            out.push(Err(L1Error::OutOfMemory)); // placeholder, replaced below on success
            new_idx.push(i);
            sizes.push(*len);
        }
        let mut tenants = resolve_tenants(&mut inner.tenants, items, &new_idx);
        self.apply_quotas(&mut inner, &mut out, &mut new_idx, &mut sizes, &mut tenants);
        if new_idx.is_empty() {
            for t in tenants {
                inner.tenants.retire_if_idle(t);
            }
            return out;
        }
        let Some(offsets) = self.alloc_batch_evicting(&mut inner, &sizes) else {
            self.counters.oom_keys_total.add(new_idx.len() as u64);
            self.pressure.refused(new_idx.len() as u64, now_instant);
            for t in tenants {
                inner.tenants.retire_if_idle(t);
            }
            return out;
        };
        self.pressure.accepted();
        // Synchronous eviction may have retired a tenant of this batch (its last object went):
        // resolve again, which is a map lookup unless it has to re-create the tenant.
        let tenants = resolve_tenants(&mut inner.tenants, items, &new_idx);
        let deadline = self.deadline_after(now, self.config.write_ttl);
        for ((&i, offset), tenant) in new_idx.iter().zip(offsets).zip(tenants) {
            let (key, len) = &items[i];
            let alloc = Allocation { offset, len: *len };
            let reserved = inner.alloc.reserved_size(*len).unwrap_or(*len);
            let Some(ns) = inner.ns.acquire(key, tenant) else {
                // The namespace table is full (module docs of `l1::namespace`).
                inner.alloc.free(offset, *len);
                self.counters.oom_keys_total.inc();
                inner.tenants.retire_if_idle(tenant);
                continue;
            };
            let seq = inner.next_seq;
            inner.next_seq += 1;
            let mut word = ns | Phase::Staging.bits();
            if temporary {
                word |= TEMPORARY;
            }
            let Some(word) = NonZeroU32::new(word) else {
                unreachable_entry()
            };
            let entry = Entry {
                hash: key.chunk_hash,
                word,
                offset: u32::try_from(offset >> inner.align_shift).unwrap_or(u32::MAX),
                len: u32::try_from(*len).unwrap_or(u32::MAX),
                timer: deadline,
                readers: 0,
                // Low bits of the reservation number while staging (see `Entry`).
                epoch: seq as u32,
            };
            inner.tenants.charge(tenant, reserved);
            let (id, generation) = inner.insert(entry);
            inner.expiry.insert((deadline, id, generation));
            self.counters.objects.add(1);
            self.counters.staging_objects.add(1);
            self.counters.staging_bytes.add(reserved);
            self.counters.used_bytes.add(reserved);
            if temporary {
                self.counters.temporary_objects.add(1);
            }
            // The admission at `finish_write` will look the key up among the ghosts: start
            // loading that bucket now (see `hint_batch`).
            let fingerprint = inner.hint_policy(id);
            out[i] = Ok(WriteTicket {
                id,
                generation,
                fingerprint,
                alloc,
            });
        }
        out
    }

    /// Publishes staging objects: they become readable. A ticket whose object was discarded
    /// (write TTL expired, aborted, force-cleared) gets `KeyNotExist`; a quarantined one is
    /// freed by it.
    pub fn finish_write(&self, tickets: &[WriteTicket]) -> Vec<Result<(), L1Error>> {
        let mut inner = self.inner.lock();
        hint_batch(&inner, tickets);
        tickets
            .iter()
            .map(|t| self.publish(&mut inner, t).map(|_| ()))
            .collect()
    }

    /// Publishes staging objects and read-locks them `count` times in one step (L2 prefetch).
    pub fn finish_write_and_reserve_read(
        &self,
        tickets: &[WriteTicket],
        count: u32,
    ) -> Vec<Result<ReadLease, L1Error>> {
        let now = self.ticks(self.clock.now());
        let count = count.clamp(1, MAX_READ_LOCKS_PER_CALL);
        let mut inner = self.inner.lock();
        hint_batch(&inner, tickets);
        tickets
            .iter()
            .map(|t| {
                let id = self.publish(&mut inner, t)?;
                Ok(self.lock_read(&mut inner, id, count, now, true))
            })
            .collect()
    }

    /// Discards staging objects (failed or abandoned writes). They never become readable. A
    /// quarantined object (write TTL lapsed) is freed and answered `KeyNotExist`.
    pub fn abort_write(&self, tickets: &[WriteTicket]) -> Vec<Result<(), L1Error>> {
        let mut inner = self.inner.lock();
        tickets
            .iter()
            .map(|t| {
                let id = inner.live(t.id, t.generation).ok_or(L1Error::KeyNotExist)?;
                match inner.entry(id).map(Entry::phase) {
                    Some(Phase::Staging) => {}
                    Some(Phase::Quarantined) => {
                        self.release_quarantined(&mut inner, id);
                        return Err(L1Error::KeyNotExist);
                    }
                    _ => return Err(L1Error::KeyInWrongState),
                }
                self.remove_entry(&mut inner, id, RemovalCause::Discarded);
                self.counters.writes_aborted_total.add(1);
                Ok(())
            })
            .collect()
    }

    /// Whether any of `tickets` still holds memory (staging, or quarantined after its write TTL
    /// lapsed). O(tickets).
    pub fn holds_any(&self, tickets: &[WriteTicket]) -> bool {
        let inner = self.inner.lock();
        tickets
            .iter()
            .any(|t| inner.live(t.id, t.generation).is_some())
    }

    pub(super) fn publish(&self, inner: &mut Inner, t: &WriteTicket) -> Result<EntryId, L1Error> {
        let id = inner.live(t.id, t.generation).ok_or(L1Error::KeyNotExist)?;
        let (phase, doomed, deadline, reserved) = match inner.entry(id) {
            Some(e) => (e.phase(), e.doomed(), e.deadline(), inner.reserved(e)),
            None => return Err(L1Error::KeyNotExist),
        };
        if phase == Phase::Quarantined {
            // The writer is back after its TTL: its bytes are void, its memory free again.
            self.release_quarantined(inner, id);
            return Err(L1Error::KeyNotExist);
        }
        if phase != Phase::Staging {
            return Err(L1Error::KeyInWrongState);
        }
        if doomed {
            // Force-cleared while being written: the write is void.
            self.remove_entry(inner, id, RemovalCause::Discarded);
            return Err(L1Error::KeyNotExist);
        }
        let now = self.ticks(self.clock.now());
        if deadline.is_some_and(|d| d <= now) {
            // Lapsed but not yet quarantined, and the writer is here: nothing to hold back.
            self.counters.expired_write_locks_total.add(1);
            self.remove_entry(inner, id, RemovalCause::Discarded);
            return Err(L1Error::KeyNotExist);
        }
        if let Some(d) = deadline {
            inner.expiry.remove(&(d, id, t.generation));
        }
        let mut key = None;
        if let Some(e) = inner.entry_mut(id) {
            e.set_phase(Phase::Ready);
            e.timer = NO_DEADLINE;
            // The reservation number's bits give way to the read epoch (see `Entry`).
            e.epoch = 0;
            key = Some(e.key());
        }
        self.counters.staging_objects.sub(1);
        self.counters.staging_bytes.sub(reserved);
        self.counters.writes_committed_total.add(1);
        if let Some((hash, ns)) = key {
            if let Some(l) = self.listener.get()
                && let Some(k) = inner.ns.key(ns, hash)
            {
                l.published(&k);
            }
            // The ticket carries the fingerprint hinted at `reserve_write`: no second hash.
            let meta = inner.meta_with(id, t.fingerprint);
            inner.policy.on_ready(id, meta);
            inner.tenants.on_ready(meta.tenant, id);
        }
        Ok(id)
    }
}

/// Before a batch is published: hints the policy about every object of a multi-object batch,
/// so that the cache misses of their admissions (ghost lookups) overlap instead of queueing
/// one after another (`EvictionPolicy::prefetch`).
fn hint_batch(inner: &Inner, tickets: &[WriteTicket]) {
    if tickets.len() > 1 {
        // A stale ticket's hint is harmless: a prefetch changes nothing.
        for t in tickets.iter().filter(|t| t.fingerprint != 0) {
            inner.policy.prefetch(t.fingerprint);
        }
    }
}
