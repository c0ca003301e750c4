//! The lookup and read path: resolving keys to readable objects (lapsed TTLs applied first),
//! counted read locks with a per-object read TTL and epoch (`reserve_read`, the prefix lookup
//! `reserve_read_prefix`, `finish_read`), membership tests, and the hit/miss counting per
//! tenant. The state rules are in the `manager` module docs.

use super::*;

impl L1Manager {
    /// Takes `count` read locks (clamped to 1..=128) on each key. Taking and releasing them
    /// counts as an access for the eviction policy.
    pub fn reserve_read(&self, keys: &[ObjectKey], count: u32) -> Vec<Result<ReadLease, L1Error>> {
        self.reserve_read_with(keys, count, true)
    }

    /// [`reserve_read`](Self::reserve_read) for kvtier's own copies (write-behind, prefetch
    /// pins): the locks protect the bytes but are not accesses, so ARC and S3-FIFO do not take
    /// every stored object for a reused one.
    pub fn reserve_read_quiet(
        &self,
        keys: &[ObjectKey],
        count: u32,
    ) -> Vec<Result<ReadLease, L1Error>> {
        self.reserve_read_with(keys, count, false)
    }

    pub(super) fn reserve_read_with(
        &self,
        keys: &[ObjectKey],
        count: u32,
        touch: bool,
    ) -> Vec<Result<ReadLease, L1Error>> {
        let now = self.ticks(self.clock.now());
        let count = count.clamp(1, MAX_READ_LOCKS_PER_CALL);
        let mut inner = self.inner.lock();
        keys.iter()
            .map(|k| {
                let id = self.readable(&mut inner, k, now)?;
                Ok(self.lock_read(&mut inner, id, count, now, touch))
            })
            .collect()
    }

    /// Read-locks the longest prefix of `keys` that is readable, in whole groups of `group` keys
    /// (a chunk's keys for every rank): a group that is only partly readable is not locked at
    /// all, so no lock is left behind on a partial chunk. Returns the leases of the prefix
    /// (`len` is a multiple of `group`).
    pub fn reserve_read_prefix(
        &self,
        keys: &[ObjectKey],
        count: u32,
        group: usize,
    ) -> Vec<ReadLease> {
        let now = self.ticks(self.clock.now());
        let count = count.clamp(1, MAX_READ_LOCKS_PER_CALL);
        let group = group.max(1);
        let mut inner = self.inner.lock();
        let mut ids = Vec::with_capacity(keys.len());
        'groups: for chunk in keys.chunks(group) {
            if chunk.len() < group {
                break;
            }
            let start = ids.len();
            for k in chunk {
                match self.readable(&mut inner, k, now) {
                    Ok(id) => ids.push(id),
                    Err(_) => {
                        ids.truncate(start);
                        break 'groups;
                    }
                }
            }
        }
        self.count_lookup(&inner, keys, &ids);
        ids.into_iter()
            .map(|id| self.lock_read(&mut inner, id, count, now, true))
            .collect()
    }

    /// Releases `count` read locks per lease. A lease whose locks already expired (or whose
    /// object is gone) gets `KeyInWrongState` / `KeyNotExist` and changes nothing.
    pub fn finish_read(&self, leases: &[ReadLease], count: u32) -> Vec<Result<(), L1Error>> {
        let count = count.max(1);
        let mut inner = self.inner.lock();
        leases
            .iter()
            .map(|l| {
                let id = inner.live(l.id, l.generation).ok_or(L1Error::KeyNotExist)?;
                let (epoch, readers) = match inner.entry(id) {
                    Some(e) => (e.epoch, e.readers),
                    None => return Err(L1Error::KeyNotExist),
                };
                if epoch != l.epoch || readers == 0 {
                    return Err(L1Error::KeyInWrongState);
                }
                self.unlock_read(&mut inner, id, count, l.touch);
                Ok(())
            })
            .collect()
    }

    /// Whether each key is readable right now (ready, not doomed). Takes no object lock.
    pub fn contains(&self, keys: &[ObjectKey]) -> Vec<bool> {
        let now = self.ticks(self.clock.now());
        let mut inner = self.inner.lock();
        keys.iter()
            .map(|k| self.readable(&mut inner, k, now).is_ok())
            .collect()
    }

    /// Resolves `key` to a readable entry, applying lapsed TTLs first (a staging object whose
    /// write TTL passed is discarded; lapsed read locks are released, which frees a temporary
    /// or doomed object).
    pub(super) fn readable(
        &self,
        inner: &mut Inner,
        key: &ObjectKey,
        now: u64,
    ) -> Result<EntryId, L1Error> {
        let id = inner.lookup(key).ok_or(L1Error::KeyNotExist)?;
        let (phase, readers, deadline) = match inner.entry(id) {
            Some(e) => (e.phase(), e.readers, e.deadline()),
            None => return Err(L1Error::KeyNotExist),
        };
        let lapsed = deadline.is_some_and(|d| d <= now);
        match phase {
            Phase::Staging if lapsed => {
                self.expire_staging(inner, id);
                Err(L1Error::KeyNotExist)
            }
            Phase::Staging => Err(L1Error::KeyNotReadable),
            Phase::Quarantined => Err(L1Error::KeyNotExist),
            Phase::Ready => {
                if readers > 0 && lapsed {
                    self.expire_readers(inner, id);
                    if inner.entry(id).is_none() {
                        return Err(L1Error::KeyNotExist);
                    }
                }
                Ok(id)
            }
        }
    }

    pub(super) fn lock_read(
        &self,
        inner: &mut Inner,
        id: EntryId,
        count: u32,
        now: u64,
        touch: bool,
    ) -> ReadLease {
        // `readable` (or `publish`) already applied any lapsed TTL to this entry.
        let generation = inner.slots[id as usize].generation;
        let deadline = self.deadline_after(now, self.config.read_ttl);
        let (old_deadline, was_unlocked, epoch) = match inner.entry_mut(id) {
            Some(e) => {
                let old = e.replace_deadline(deadline);
                let was_unlocked = e.readers == 0;
                e.readers = e.readers.saturating_add(count);
                (old, was_unlocked, e.epoch)
            }
            None => unreachable_entry(),
        };
        let alloc = match inner.entry(id) {
            Some(e) => inner.alloc_of(e),
            None => unreachable_entry(),
        };
        if let Some(d) = old_deadline {
            inner.expiry.remove(&(d, id, generation));
        }
        inner.expiry.insert((deadline, id, generation));
        if was_unlocked {
            self.counters.read_locked_objects.add(1);
        }
        self.counters.read_locks_total.add(u64::from(count));
        if touch {
            inner.touch(id);
        }
        ReadLease {
            id,
            generation,
            epoch,
            touch,
            alloc,
        }
    }

    pub(super) fn unlock_read(&self, inner: &mut Inner, id: EntryId, count: u32, touch: bool) {
        let generation = inner.slots[id as usize].generation;
        let (now_unlocked, deadline, free_now) = match inner.entry_mut(id) {
            Some(e) => {
                e.readers = e.readers.saturating_sub(count);
                if e.readers == 0 {
                    (true, e.take_deadline(), e.temporary() || e.doomed())
                } else {
                    (false, None, false)
                }
            }
            None => return,
        };
        if now_unlocked {
            if let Some(d) = deadline {
                inner.expiry.remove(&(d, id, generation));
            }
            self.counters.read_locked_objects.sub(1);
            if free_now {
                self.remove_entry(inner, id, RemovalCause::Released);
                return;
            }
        }
        if touch {
            inner.touch(id);
        }
    }

    /// Counts a lookup's hits and misses against its keys' tenant.
    pub(super) fn count_lookup(&self, inner: &Inner, keys: &[ObjectKey], hits: &[EntryId]) {
        let hit_tenant = hits
            .first()
            .and_then(|&id| inner.entry(id))
            .map(|e| inner.tenant_of(e));
        if let Some(c) = hit_tenant.and_then(|t| inner.tenants.stats(t)) {
            c.hits_total.add(hits.len() as u64);
        }
        let missed = keys.len() - hits.len();
        if missed == 0 {
            return;
        }
        let salt = &keys[hits.len()].cache_salt;
        match inner
            .tenants
            .find(salt)
            .and_then(|t| inner.tenants.stats(t))
        {
            Some(c) => c.misses_total.add(missed as u64),
            None => self.directory.retired.misses_total.add(missed as u64),
        }
    }
}
