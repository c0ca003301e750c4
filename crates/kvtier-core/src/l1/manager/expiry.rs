//! TTL expiry and the quarantine: the expiry queue drained in bounded batches
//! ([`L1Manager::expire_locks`]), a lapsed read lock releasing all its holders, a lapsed write
//! reservation quarantined (key released, memory held until its writer comes back or the
//! budget forces reuse, oldest reservation first), and the clock ticks deadlines are kept in.
//! The rules are in the module docs of `manager`; everything here but `expire_locks` is called
//! with the L1 lock held.

use super::*;

/// Expiry-queue entries [`L1Manager::expire_locks`] handles per hold of the L1 lock.
pub const EXPIRE_BATCH: usize = 1024;

impl L1Manager {
    /// Applies every TTL that has passed (as of the call): staging objects are quarantined, read
    /// locks released. Returns the number of objects affected. Works in batches of
    /// [`EXPIRE_BATCH`] queue entries, releasing the lock between them, so a mass expiry never
    /// holds the lock for longer than one batch.
    pub fn expire_locks(&self) -> u64 {
        let now = self.ticks(self.clock.now());
        let mut n = 0;
        loop {
            let mut inner = self.inner.lock();
            let mut drained = true;
            for _ in 0..EXPIRE_BATCH {
                drained = true;
                let Some(&(deadline, id, generation)) = inner.expiry.first() else {
                    break;
                };
                if deadline > now {
                    break;
                }
                drained = false;
                inner.expiry.pop_first();
                if inner.live(id, generation).is_none() {
                    continue;
                }
                let phase = inner.entry(id).map(Entry::phase);
                match phase {
                    Some(Phase::Staging) => self.expire_staging(&mut inner, id),
                    Some(Phase::Ready) => self.expire_readers(&mut inner, id),
                    Some(Phase::Quarantined) | None => continue,
                }
                n += 1;
            }
            drop(inner);
            if drained {
                return n;
            }
        }
    }

    /// `at` in nanoseconds of the manager's clock (what entries and the expiry queue store;
    /// below [`NO_DEADLINE`] for the next 584 years).
    pub(super) fn ticks(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.clock.base).as_nanos();
        u64::try_from(nanos)
            .unwrap_or(NO_DEADLINE - 1)
            .min(NO_DEADLINE - 1)
    }

    /// The deadline `ttl` after `now` (in ticks), saturating below [`NO_DEADLINE`].
    pub(super) fn deadline_after(&self, now: u64, ttl: Duration) -> u64 {
        let ttl = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
        now.saturating_add(ttl).min(NO_DEADLINE - 1)
    }

    // ---- TTL expiry and the quarantine (called with the lock held) ----

    pub(super) fn expire_readers(&self, inner: &mut Inner, id: EntryId) {
        let generation = inner.slots[id as usize].generation;
        let (deadline, free_now) = match inner.entry_mut(id) {
            Some(e) if e.readers > 0 => {
                e.readers = 0;
                e.epoch = e.epoch.wrapping_add(1);
                (e.take_deadline(), e.temporary() || e.doomed())
            }
            _ => return,
        };
        if let Some(d) = deadline {
            inner.expiry.remove(&(d, id, generation));
        }
        self.counters.read_locked_objects.sub(1);
        self.counters.expired_read_locks_total.add(1);
        if free_now {
            self.remove_entry(inner, id, RemovalCause::Released);
        }
    }

    /// A staging object's write TTL lapsed: its key goes, its memory is quarantined (module
    /// docs), then the quarantine is trimmed to its budget, oldest reservation first.
    pub(super) fn expire_staging(&self, inner: &mut Inner, id: EntryId) {
        self.counters.expired_write_locks_total.add(1);
        let generation = inner.slots[id as usize].generation;
        let Some(e) = inner.entry(id).copied() else {
            return;
        };
        if e.phase() != Phase::Staging {
            return;
        }
        let was_doomed = e.doomed();
        if !was_doomed {
            inner.index_remove(e.key(), id);
            if let Some(l) = self.listener.get()
                && let Some(k) = inner.ns.key(e.ns(), e.hash)
            {
                l.discarded(&k);
            }
        }
        let reserved = inner.reserved(&e);
        let seq = reservation_seq(inner.next_seq, e.epoch);
        let deadline = e.deadline();
        if let Some(m) = inner.entry_mut(id) {
            m.set_phase(Phase::Quarantined);
            m.set_doomed(false);
            // A quarantined entry has no deadline: `timer` holds its reservation number.
            m.timer = seq;
        }
        if let Some(d) = deadline {
            inner.expiry.remove(&(d, id, generation));
        }
        if was_doomed {
            self.counters.doomed_objects.sub(1);
        }
        self.counters.staging_objects.sub(1);
        self.counters.staging_bytes.sub(reserved);
        self.counters.quarantined_objects.add(1);
        self.counters.quarantined_bytes.add(reserved);
        inner.quarantine.insert((seq, id));
        while self.counters.quarantined_bytes.get() > self.config.quarantine_budget_bytes {
            let Some((_, victim)) = inner.quarantine.pop_first() else {
                break;
            };
            self.counters.quarantine_forced_reuses_total.inc();
            self.remove_entry(inner, victim, RemovalCause::Discarded);
        }
    }

    /// A quarantined object's writer came back (late commit or abort): free it.
    pub(super) fn release_quarantined(&self, inner: &mut Inner, id: EntryId) {
        self.counters.quarantine_released_total.inc();
        self.remove_entry(inner, id, RemovalCause::Discarded);
    }
}

/// The full reservation number whose low 32 bits are `low`, given the next number to be handed
/// out: the newest such number below `next`. Exact unless 2^32 or more reservations were made
/// while the entry was staging, in which case the entry counts as 2^32 reservations younger in
/// the quarantine order (still freed; only its turn moves).
fn reservation_seq(next: u64, low: u32) -> u64 {
    let back = (next as u32).wrapping_sub(low);
    let back = if back == 0 {
        1u64 << 32
    } else {
        u64::from(back)
    };
    next.saturating_sub(back)
}
