//! The L1 manager: object table, state machine, TTL locks and eviction over the shared pool.
//!
//! # Object states
//! ```text
//!   reserve_write ──► STAGING ──finish_write──► READY ◄──finish_read (last)── READ-LOCKED
//!     (per writer,      │  │                      │  └──────reserve_read──────────►┘
//!      invisible)       │  ├─abort_write──► discarded (never readable)
//!                       │  └─write TTL expiry──► QUARANTINED ──late finish/abort, budget──► freed
//!                       └─finish_write_and_reserve_read──► READ-LOCKED (L2 prefetch)
//! ```
//! - A *staging* object belongs to the holder of its [`WriteTicket`]; readers see it as not
//!   readable. If its write TTL expires it is discarded: a half-written object never becomes
//!   readable (LMCache makes it readable; we do not).
//! - **Quarantine.** When a write TTL expires the key is released at once (another writer may
//!   store it), but the object's *memory* is not: the writer was handed its offsets and may
//!   still be copying into them, and if they went to the next store a late writer would
//!   overwrite another client's published chunk. The object becomes *quarantined*: out of the
//!   index, holding its bytes, charged to its tenant, with no deadline. It is freed when its
//!   writer's ticket comes back (`finish_write` answers `KeyNotExist`, `abort_write` too; the
//!   engine aborts the tickets of an instance that is unregistered or reaped), or when the
//!   quarantine exceeds [`L1Config::quarantine_budget_bytes`]: then the oldest reservations
//!   are freed first and counted in `quarantine_forced_reuses_total` (each one is a memory
//!   range a late writer could now corrupt). A budget of 0 frees at expiry (LMCache's
//!   behaviour, minus publishing the half-written object). The order is the reservation
//!   order, so the outcome does not depend on when the expiry is noticed. Cost under the lock:
//!   O(log n) per object entering or leaving the quarantine (each leaves once), so trimming is
//!   amortised into the expiries that caused it.
//! - Read locks are counted (1..=128 per call). The read TTL is per object and refreshed by every
//!   lock; when it expires all holders are released at once and the object's *read epoch* moves
//!   on, so a late release through an old [`ReadLease`] is a no-op instead of stealing a lock
//!   that a newer reader took.
//! - *Temporary* objects (L2 prefetch results) are deleted after their last reader.
//! - `clear(force = true)` removes every object from the index at once; objects that are locked
//!   at that moment become *doomed*: invisible to lookups, and freed when their last lock is
//!   released or expires, so an engine that is still copying never sees its memory reused.
//!
//! # Files
//! This file holds the manager, its counters and the public operations; `types.rs` the values
//! they take and return (errors, allocations, tickets, leases, outcomes); `config.rs` the
//! settings and the [`Clock`]; `entry.rs` one object's packed record and phase; `expiry.rs` TTL
//! expiry and the quarantine; `write.rs` the store path (reserve, publish, abort); `read.rs`
//! lookups and read locks; `evict.rs` the eviction paths under the lock (watermark, tenant
//! quotas, synchronous eviction on allocation failure); `inner.rs` the locked table's own
//! bookkeeping (`Inner`: slots, index, shrink); `invariants.rs` the full recount behind
//! [`L1Manager::check_invariants`]; `status.rs` the status node.
//!
//! # Concurrency and lock order
//! All object state sits behind **one** `parking_lot::Mutex` ([`Inner`]). Every public method
//! holds it for work proportional to the keys in the call (plus, for allocation failures, the
//! objects it evicts), never for I/O or data copies, and never for a walk over all objects
//! (`clear` and `expire_locks` work in bounded batches, releasing the lock between them;
//! `reserve_write` finds keys repeated within a call before taking the lock, in O(k)). The eviction policy and
//! the allocator live inside the same lock, so there is no lock order to get wrong.
//! The counters that the status tree reads are atomics updated inside the critical sections:
//! reading status never takes the lock and never iterates objects.
//!
//! # Memory
//! The manager hands out byte ranges of the pool ([`Allocation`]); it never touches the pool's
//! memory. When an allocation fails it first evicts synchronously (in policy order, skipping
//! locked objects) and reports `OutOfMemory` only if that cannot make room, so a burst of stores
//! is never rejected while evictable memory exists.
//!
//! Per object the manager keeps a 64-byte slot (an `Entry` packed to 60 bytes plus its
//! generation), 5 bytes of key index per bucket (`l1::index`, about 10 bytes per object at
//! hashbrown's load), and 8-byte recency links in the eviction policy and in the tenant table:
//! about 91 bytes per object at 1M objects (`benches/l1_memory.rs`). To get there an entry keeps
//! its key as the chunk hash plus a namespace id (`l1::namespace`, one row per distinct
//! `(model_name, kv_rank, object_group_id, cache_salt)`, whose tenant it also records), its
//! offset in alignment units, its length as `u32` (objects of 4 GiB or more are refused with
//! `OutOfMemory`), and its deadline as `u64` nanoseconds of the [`Clock`]; the policy
//! fingerprint is recomputed from the key when needed. `clear` gives back the slot table, the
//! index, the namespace rows and the policy and tenant per-id arrays beyond the last slot still
//! in use (`Inner::shrink`).

use std::collections::{BTreeSet, HashMap};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::alloc::RangeAllocator;
use super::eviction::{EntryId, EntryMeta, EvictionPolicy, Removal, TenantId, Verdict};
use super::index::KeyIndex;
use super::listener::{EvictedFor, RemovalCause};
use super::namespace::{Namespaces, NsId};
use super::tenants::{Directory, Tenants};
use crate::hash::ChunkHash;
use crate::key::ObjectKey;
use crate::status::{StatusNode, StatusReport};

mod config;
mod entry;
mod evict;
mod expiry;
mod inner;
mod invariants;
mod read;
mod status;
mod types;
mod write;

pub use config::{Clock, DEFAULT_QUARANTINE_DIVISOR, EvictionConfig, L1Config};
pub use expiry::EXPIRE_BATCH;
pub use types::{Allocation, ClearOutcome, EvictionOutcome, L1Error, ReadLease, WriteTicket};

use entry::{Entry, NO_DEADLINE, Phase, Slot, TEMPORARY, reserved_of};

/// Most read locks a single call may take per object (LMCache's `MAX_READ_LOCK_COUNT`).
pub const MAX_READ_LOCKS_PER_CALL: u32 = 128;

crate::metric_set! {
    /// Lock-free counters behind the status tree (LMCache's `l1_manager` field names) and
    /// `/metrics` (`kvtier_l1_*`). Gauges are kept exact inside the L1 critical sections;
    /// counters only grow.
    pub struct L1Counters {
        /// Objects in L1 (every phase).
        objects: Gauge as "total_object_count" => "kvtier_l1_objects",
        /// L1 objects reserved for a store and not yet committed (write-locked).
        staging_objects: Gauge as "write_locked_count" => "kvtier_l1_staging_objects",
        /// L1 bytes reserved for stores not yet committed.
        staging_bytes: Gauge[Bytes] as "staging_bytes" => "kvtier_l1_staging",
        /// L1 objects holding at least one read lock.
        read_locked_objects: Gauge as "read_locked_count" => "kvtier_l1_read_locked_objects",
        /// Temporary L1 objects (freed on their last read unlock).
        temporary_objects: Gauge as "temporary_count" => "kvtier_l1_temporary_objects",
        /// Deleted L1 objects waiting for their readers to finish.
        doomed_objects: Gauge as "doomed_object_count" => "kvtier_l1_doomed_objects",
        /// Store reservations whose write TTL lapsed, held back until their writer returns.
        quarantined_objects: Gauge => "kvtier_l1_quarantined_objects",
        /// L1 bytes held by quarantined store reservations.
        quarantined_bytes: Gauge[Bytes] => "kvtier_l1_quarantined",
        /// L1 bytes allocated to objects (staging included, aligned sizes).
        used_bytes: Gauge[Bytes] as "memory_used_bytes" => "kvtier_l1_used",
        /// L1 writes published.
        writes_committed_total: Counter => "kvtier_l1_writes_committed",
        /// L1 writes aborted before being published.
        writes_aborted_total: Counter => "kvtier_l1_writes_aborted",
        /// Keys whose store was rejected because L1 had no room even after eviction.
        oom_keys_total: Counter as "out_of_memory_key_count_total" => "kvtier_l1_oom_keys",
        /// Keys whose store was rejected because their cache_salt's quota was exhausted.
        quota_rejected_keys_total: Counter => "kvtier_l1_quota_rejected_keys",
        /// Objects evicted from L1 (background and synchronous).
        evicted_objects_total: Counter as "evicted_object_count_total" => "kvtier_l1_evicted_objects",
        /// Bytes evicted from L1.
        evicted_bytes_total: Counter[Bytes] => "kvtier_l1_evicted",
        /// Synchronous evictions run by an allocation that did not fit.
        sync_evictions_total: Counter as "sync_eviction_count_total" => "kvtier_l1_sync_evictions",
        /// Store reservations discarded because their write TTL lapsed.
        expired_write_locks_total: Counter as "expired_write_lock_count_total" => "kvtier_l1_expired_write_locks",
        /// Read locks released because their TTL lapsed.
        expired_read_locks_total: Counter as "expired_read_lock_count_total" => "kvtier_l1_expired_read_locks",
        /// Quarantined reservations freed by their writer's late commit or abort.
        quarantine_released_total: Counter => "kvtier_l1_quarantine_released",
        /// Quarantined reservations freed early because the quarantine budget was exceeded (a
        /// late writer may now overwrite whatever is stored there next).
        quarantine_forced_reuses_total: Counter => "kvtier_l1_quarantine_forced_reuses",
        /// L1 read locks granted (counting each of a multi-reader lock).
        read_locks_total: Counter => "kvtier_l1_read_locks",
    }
}

/// Everything behind the L1 lock.
#[derive(Debug)]
struct Inner {
    index: KeyIndex,
    /// The namespaces the entries' keys name (see `l1::namespace`).
    ns: Namespaces,
    slots: Vec<Slot>,
    free_slots: Vec<EntryId>,
    alloc: RangeAllocator,
    policy: Box<dyn EvictionPolicy>,
    /// `(deadline in clock nanoseconds, id, generation)` of staging and read-locked entries.
    expiry: BTreeSet<(u64, EntryId, u32)>,
    /// Quarantined objects by reservation order.
    quarantine: BTreeSet<(u64, EntryId)>,
    next_seq: u64,
    /// Generation of every slot created from now on: above the generation of every slot the
    /// vector has dropped ([`Inner::shrink`]), so no stale ticket or lease can name a new slot.
    generation_floor: u32,
    tenants: Tenants,
    /// The allocator's alignment and its log2 (entries keep offsets in alignment units).
    align: u64,
    align_shift: u32,
}

/// The L1 tier: see the module docs.
#[derive(Debug)]
pub struct L1Manager {
    inner: Mutex<Inner>,
    /// Told about publishes and removals, under the lock (see [`L1Listener`]).
    listener: std::sync::OnceLock<std::sync::Arc<dyn super::L1Listener>>,
    counters: L1Counters,
    directory: Arc<Directory>,
    config: L1Config,
    capacity: u64,
    clock: Clock,
    /// Stores refused for lack of room (status health).
    pressure: super::pressure::StorePressure,
}

impl L1Manager {
    /// Creates a manager with the system clock.
    pub fn new(config: L1Config) -> Self {
        Self::with_clock(config, Clock::system())
    }

    /// Creates a manager with an explicit clock (tests).
    pub fn with_clock(config: L1Config, clock: Clock) -> Self {
        // Entries keep offsets as `u32` units of the alignment: a pool of 2^32 units or more
        // (16 TiB at the default 4 KiB) gets a coarser alignment, which still satisfies the
        // configured one.
        let units_floor = (config.capacity_bytes >> 32).saturating_add(1);
        let align = config
            .align_bytes
            .max(1)
            .max(units_floor)
            .checked_next_power_of_two()
            .unwrap_or(1 << 63);
        let alloc = RangeAllocator::new(config.capacity_bytes, align);
        let align = alloc.align();
        let capacity = alloc.capacity();
        let tenants = Tenants::default();
        Self {
            directory: Arc::clone(tenants.directory()),
            inner: Mutex::new(Inner {
                index: KeyIndex::default(),
                ns: Namespaces::default(),
                slots: Vec::new(),
                free_slots: Vec::new(),
                alloc,
                policy: config.eviction.policy.build(),
                expiry: BTreeSet::new(),
                quarantine: BTreeSet::new(),
                next_seq: 0,
                generation_floor: 0,
                tenants,
                align,
                align_shift: align.trailing_zeros(),
            }),
            counters: L1Counters::default(),
            listener: std::sync::OnceLock::new(),
            config,
            capacity,
            pressure: super::pressure::StorePressure::new(clock.now()),
            clock,
        }
    }

    /// Installs the listener told about every publish and removal from now on (one per
    /// manager; install it before serving).
    ///
    /// # Errors
    /// Gives the listener back when one is installed already.
    pub fn set_listener(
        &self,
        listener: std::sync::Arc<dyn super::L1Listener>,
    ) -> Result<(), std::sync::Arc<dyn super::L1Listener>> {
        self.listener.set(listener)
    }

    /// The configuration this manager was built with.
    pub fn config(&self) -> &L1Config {
        &self.config
    }

    /// Usable pool bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.capacity
    }

    /// The live counters (lock-free).
    pub fn counters(&self) -> &L1Counters {
        &self.counters
    }

    /// The clock used for TTLs.
    pub fn clock(&self) -> &Clock {
        &self.clock
    }

    /// The tenants (one per `cache_salt`) as readers see them, without the L1 lock.
    pub fn tenants(&self) -> &Arc<Directory> {
        &self.directory
    }

    /// Sets (`Some(bytes)`) or removes (`None`) the L1 quota of `salt` (`""` = un-salted
    /// traffic); returns whether a quota existed. A quota below the tenant's usage evicts its
    /// unlocked objects down to the quota at once (work proportional to the objects evicted).
    pub fn set_quota(&self, salt: &Arc<str>, limit: Option<u64>) -> bool {
        let mut inner = self.inner.lock();
        let (tenant, existed) = inner.tenants.set_limit(salt, limit);
        if let (Some(t), Some(limit)) = (tenant, limit) {
            let used = inner.tenants.used(t);
            if used > limit {
                self.evict_tenant(&mut inner, t, used - limit);
            }
        }
        existed
    }

    /// Whether L1 refuses every store for lack of room (see [`super::pressure`]); lock-free.
    pub fn store_starved(&self) -> Option<super::pressure::Starved> {
        self.pressure.starved(self.clock.now())
    }

    /// `(used_bytes, total_bytes)` without taking the lock.
    pub fn usage(&self) -> (u64, u64) {
        (self.counters.used_bytes.get(), self.capacity)
    }

    /// Deletes unlocked ready objects.
    pub fn delete(&self, keys: &[ObjectKey]) -> Vec<Result<(), L1Error>> {
        let mut inner = self.inner.lock();
        keys.iter()
            .map(|k| {
                let id = inner.lookup(k).ok_or(L1Error::KeyNotExist)?;
                let e = inner.entry(id).ok_or(L1Error::KeyNotExist)?;
                if e.phase() == Phase::Staging || e.readers > 0 {
                    return Err(L1Error::KeyIsLocked);
                }
                self.remove_entry(&mut inner, id, RemovalCause::Deleted);
                Ok(())
            })
            .collect()
    }

    /// Empties L1. Unlocked objects are freed. Locked and staging objects are kept when `force`
    /// is false; with `force` they are removed from the index now and freed when their locks end.
    /// Works in batches so the lock is never held for a walk over every object.
    pub fn clear(&self, force: bool) -> ClearOutcome {
        const BATCH: usize = 4096;
        let mut out = ClearOutcome::default();
        let mut start = 0usize;
        loop {
            let mut inner = self.inner.lock();
            let end = (start + BATCH).min(inner.slots.len());
            for id in start..end {
                let id = id as EntryId;
                let Some(e) = inner.entry(id) else { continue };
                if e.doomed() || e.phase() == Phase::Quarantined {
                    continue;
                }
                let locked = e.phase() == Phase::Staging || e.readers > 0;
                if !locked {
                    self.remove_entry(&mut inner, id, RemovalCause::Cleared);
                    out.removed += 1;
                } else if force {
                    self.doom(&mut inner, id);
                    out.doomed += 1;
                } else {
                    out.kept += 1;
                }
            }
            let done = end >= inner.slots.len();
            if done {
                inner.shrink();
                return out;
            }
            drop(inner);
            start = end;
        }
    }

    /// Frees at least `goal_bytes` (if possible) by evicting unlocked ready objects in policy
    /// order. Never touches staging, read-locked or doomed objects.
    pub fn evict(&self, goal_bytes: u64) -> EvictionOutcome {
        let mut inner = self.inner.lock();
        self.evict_locked(&mut inner, goal_bytes, EvictedFor::Watermark)
    }

    /// One background round: expire TTLs, then evict `eviction_ratio` of the used bytes if usage
    /// is at or above the watermark.
    pub fn maintenance_round(&self) -> EvictionOutcome {
        self.expire_locks();
        let (used, total) = self.usage();
        if total == 0 {
            return EvictionOutcome::default();
        }
        let ratio = used as f64 / total as f64;
        if ratio < self.config.eviction.trigger_watermark {
            return EvictionOutcome::default();
        }
        let goal = ((used as f64) * self.config.eviction.eviction_ratio).ceil() as u64;
        self.evict(goal.max(1))
    }

    /// Allocator fragmentation snapshot: `(free_bytes, largest_free_block, free_fragments)`.
    pub fn fragmentation(&self) -> (u64, u64, usize) {
        let inner = self.inner.lock();
        (
            inner.alloc.free_bytes(),
            inner.alloc.largest_free_block(),
            inner.alloc.free_fragments(),
        )
    }

    // ---- internals (all called with the lock held) ----

    fn doom(&self, inner: &mut Inner, id: EntryId) {
        let Some(e) = inner.entry(id).copied() else {
            return;
        };
        if e.phase() == Phase::Ready
            && let Some(l) = self.listener.get()
            && let Some(k) = inner.ns.key(e.ns(), e.hash)
        {
            l.removed(&k, RemovalCause::Cleared);
        }
        let meta = inner.meta_of(id);
        if let Some(m) = inner.entry_mut(id) {
            m.set_doomed(true);
        }
        inner.index_remove(e.key(), id);
        inner.policy.on_remove(id, meta, Removal::Dropped);
        inner.tenants.unlink(meta.tenant, id);
        self.counters.doomed_objects.add(1);
    }

    /// Removes an entry whatever its state and returns its memory.
    fn remove_entry(&self, inner: &mut Inner, id: EntryId, cause: RemovalCause) {
        self.remove_entry_hinted(inner, id, cause, 0);
    }

    /// [`remove_entry`](Self::remove_entry), given the fingerprint
    /// [`Inner::hint_policy`] already computed for `id` (see [`Inner::meta_with`]).
    fn remove_entry_hinted(
        &self,
        inner: &mut Inner,
        id: EntryId,
        cause: RemovalCause,
        hinted: u64,
    ) {
        let why = match cause {
            RemovalCause::Evicted(_) => Removal::Evicted,
            _ => Removal::Dropped,
        };
        // Read before the entry goes: the fingerprint and tenant come from its namespace.
        let meta = inner.meta_with(id, hinted);
        let slot = &mut inner.slots[id as usize];
        let generation = slot.generation;
        let Some(e) = slot.entry.take() else { return };
        slot.generation = slot.generation.wrapping_add(1);
        inner.free_slots.push(id);
        let reserved = inner.reserved(&e);
        if let Some(d) = e.deadline() {
            inner.expiry.remove(&(d, id, generation));
        }
        if e.phase() == Phase::Quarantined {
            inner.quarantine.remove(&(e.quarantine_seq(), id));
            self.counters.quarantined_objects.sub(1);
            self.counters.quarantined_bytes.sub(reserved);
        } else if e.doomed() {
            self.counters.doomed_objects.sub(1);
        } else {
            inner.index_remove(e.key(), id);
            if e.phase() == Phase::Ready
                && let Some(l) = self.listener.get()
                && let Some(k) = inner.ns.key(e.ns(), e.hash)
            {
                l.removed(&k, cause);
            }
        }
        inner.policy.on_remove(id, meta, why);
        inner
            .tenants
            .release(meta.tenant, id, reserved, why == Removal::Evicted);
        inner.ns.release(e.ns());
        let alloc = inner.alloc_of(&e);
        inner.alloc.free(alloc.offset, alloc.len);
        self.counters.objects.sub(1);
        self.counters.used_bytes.sub(reserved);
        if e.phase() == Phase::Staging {
            self.counters.staging_objects.sub(1);
            self.counters.staging_bytes.sub(reserved);
        }
        if e.readers > 0 {
            self.counters.read_locked_objects.sub(1);
        }
        if e.temporary() {
            self.counters.temporary_objects.sub(1);
        }
    }
}

/// A stable hash of a key (its chunk hash and its namespace's seed), for the ghost lists of ARC
/// and S3-FIFO. Computed when needed: the namespace outlives the entry, so it never changes.
fn fingerprint(hash: &ChunkHash, ns_seed: u64) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0x6b76_7469_6572_4c31).hash_one((hash, ns_seed))
}

#[cold]
fn unreachable_entry() -> ! {
    // Callers only pass ids they just validated under the same lock.
    panic!("L1 invariant violated: validated entry disappeared under the lock")
}
