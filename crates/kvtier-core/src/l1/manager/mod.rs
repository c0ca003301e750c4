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
//! This file holds the types and the public operations; `evict.rs` the eviction paths under
//! the lock (watermark, tenant quotas, synchronous eviction on allocation failure),
//! `inner.rs` the locked table's own bookkeeping (`Inner`: slots, index, shrink),
//! `invariants.rs` the full recount behind [`L1Manager::check_invariants`], `status.rs` the
//! status node.
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
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::alloc::RangeAllocator;
use super::eviction::{
    EntryId, EntryMeta, EvictionPolicy, EvictionPolicyKind, Removal, TenantId, Verdict,
};
use super::index::KeyIndex;
use super::listener::{EvictedFor, RemovalCause};
use super::namespace::{MAX_NAMESPACES, Namespaces, NsId};
use super::tenants::{Directory, Tenants};
use crate::hash::ChunkHash;
use crate::key::ObjectKey;
use crate::status::{StatusNode, StatusReport};

mod evict;
mod inner;
mod invariants;
mod status;

/// The default quarantine budget is the pool size divided by this.
pub const DEFAULT_QUARANTINE_DIVISOR: u64 = 10;

/// Most read locks a single call may take per object (LMCache's `MAX_READ_LOCK_COUNT`).
pub const MAX_READ_LOCKS_PER_CALL: u32 = 128;

/// Expiry-queue entries [`L1Manager::expire_locks`] handles per hold of the L1 lock.
pub const EXPIRE_BATCH: usize = 1024;

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
    let mut seen: std::collections::HashSet<&ObjectKey, foldhash::fast::RandomState> =
        std::collections::HashSet::with_capacity_and_hasher(items.len(), Default::default());
    items.iter().map(|(key, _)| !seen.insert(key)).collect()
}

/// Outcome of an L1 operation on one key (LMCache's `L1Error`, minus `SUCCESS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum L1Error {
    /// No such object (or the handle refers to an object that is gone).
    #[error("key does not exist")]
    KeyNotExist,
    /// The object exists but is still being written.
    #[error("key is not readable (still being written)")]
    KeyNotReadable,
    /// The object already exists (or is being written by someone else).
    #[error("key is not writable (already present or being written)")]
    KeyNotWritable,
    /// The operation does not apply to the object's current state.
    #[error("key is in the wrong state for this operation")]
    KeyInWrongState,
    /// The object is locked and cannot be deleted.
    #[error("key is locked")]
    KeyIsLocked,
    /// L1 has no room for the batch even after evicting everything evictable.
    #[error("out of L1 memory")]
    OutOfMemory,
    /// The key's tenant (`cache_salt`) has no room within its quota even after evicting its own
    /// unlocked objects.
    #[error("the cache_salt's L1 quota is exhausted")]
    QuotaExceeded,
}

impl L1Error {
    /// Short stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::KeyNotExist => "key_not_exist",
            Self::KeyNotReadable => "key_not_readable",
            Self::KeyNotWritable => "key_not_writable",
            Self::KeyInWrongState => "key_in_wrong_state",
            Self::KeyIsLocked => "key_is_locked",
            Self::OutOfMemory => "out_of_memory",
            Self::QuotaExceeded => "quota_exceeded",
        }
    }
}

/// A byte range of the pool holding one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Allocation {
    /// Byte offset into the pool; a multiple of the alignment.
    pub offset: u64,
    /// Object length in bytes (the reserved range is rounded up to the alignment).
    pub len: u64,
}

/// Proof of a staging reservation: only its holder can publish or abort the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteTicket {
    id: EntryId,
    generation: u32,
    /// Where to write the object's bytes.
    pub alloc: Allocation,
}

/// Proof of read locks taken on one object; release it with [`L1Manager::finish_read`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLease {
    id: EntryId,
    generation: u32,
    epoch: u32,
    /// Whether taking and releasing the lock counts as an access for the eviction policy
    /// (false for kvtier's own copies: write-behind and prefetch pins).
    touch: bool,
    /// Where the object's bytes are.
    pub alloc: Allocation,
}

/// Time source, injectable so tests can expire TTLs without sleeping.
#[derive(Debug, Clone)]
pub struct Clock {
    base: Instant,
    manual: Option<Arc<AtomicU64>>,
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl Clock {
    /// The real monotonic clock.
    pub fn system() -> Self {
        Self {
            base: Instant::now(),
            manual: None,
        }
    }

    /// A clock that only moves when [`advance`](Self::advance) is called.
    pub fn manual() -> Self {
        Self {
            base: Instant::now(),
            manual: Some(Arc::new(AtomicU64::new(0))),
        }
    }

    /// Moves a manual clock forward (no-op on the system clock).
    pub fn advance(&self, by: Duration) {
        if let Some(m) = &self.manual {
            m.fetch_add(u64::try_from(by.as_nanos()).unwrap_or(u64::MAX), Relaxed);
        }
    }

    /// Current instant.
    pub fn now(&self) -> Instant {
        match &self.manual {
            Some(m) => self.base + Duration::from_nanos(m.load(Relaxed)),
            None => Instant::now(),
        }
    }
}

/// Eviction settings (LMCache's `EvictionConfig`).
#[derive(Debug, Clone, Copy)]
pub struct EvictionConfig {
    /// The ordering policy.
    pub policy: EvictionPolicyKind,
    /// Background eviction starts when `used / total` reaches this ratio (default 0.8).
    pub trigger_watermark: f64,
    /// Each background round frees this fraction of the used **bytes** (default 0.2).
    pub eviction_ratio: f64,
}

impl Default for EvictionConfig {
    fn default() -> Self {
        Self {
            policy: EvictionPolicyKind::Lru,
            trigger_watermark: 0.8,
            eviction_ratio: 0.2,
        }
    }
}

/// L1 manager settings.
#[derive(Debug, Clone)]
pub struct L1Config {
    /// Most bytes held by quarantined reservations (write TTL lapsed, writer not back yet) before
    /// the oldest are freed for reuse (default: a tenth of the pool; 0 frees at expiry).
    pub quarantine_budget_bytes: u64,
    /// Pool size in bytes (rounded down to `align_bytes`).
    pub capacity_bytes: u64,
    /// Alignment of every object (default 4096).
    pub align_bytes: u64,
    /// Write-lock TTL (default 600 s).
    pub write_ttl: Duration,
    /// Read-lock TTL (default 300 s).
    pub read_ttl: Duration,
    /// Eviction settings.
    pub eviction: EvictionConfig,
}

impl L1Config {
    /// Defaults for a pool of `capacity_bytes`.
    pub fn with_capacity(capacity_bytes: u64) -> Self {
        Self {
            capacity_bytes,
            quarantine_budget_bytes: capacity_bytes / DEFAULT_QUARANTINE_DIVISOR,
            align_bytes: 4096,
            write_ttl: Duration::from_secs(600),
            read_ttl: Duration::from_secs(300),
            eviction: EvictionConfig::default(),
        }
    }
}

/// What an eviction round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvictionOutcome {
    /// Objects removed.
    pub objects: u64,
    /// Bytes returned to the allocator.
    pub bytes: u64,
}

/// What a clear did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClearOutcome {
    /// Objects freed immediately.
    pub removed: u64,
    /// Locked objects hidden now and freed when their locks end (force only).
    pub doomed: u64,
    /// Locked objects left in place (no force).
    pub kept: u64,
}

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Staging,
    Ready,
    /// A staging object whose write TTL lapsed: out of the index, memory held (module docs).
    Quarantined,
}

/// Bits of [`Entry::word`] above the namespace id: the phase (1..=3, so the word is never 0 and
/// `Option<Entry>` needs no tag), `temporary` and `doomed`.
const NS_MASK: u32 = MAX_NAMESPACES - 1;
const PHASE_SHIFT: u32 = 28;
const PHASE_MASK: u32 = 3 << PHASE_SHIFT;
const TEMPORARY: u32 = 1 << 30;
const DOOMED: u32 = 1 << 31;
/// [`Entry::timer`] of an entry that is in no expiry queue.
const NO_DEADLINE: u64 = u64::MAX;

/// One object. Packed to 60 bytes, 64 with its slot's generation (issue 18: at most 100 bytes
/// per object for everything the L1 keeps): the key is the chunk hash plus an interned
/// namespace ([`Namespaces`]), the allocation is in alignment units and `u32` bytes, the
/// deadline is nanoseconds of the manager's [`Clock`], and fields that are never needed at the
/// same time share storage:
/// - `timer` is the deadline (or [`NO_DEADLINE`]) while staging or read-locked, and the full
///   reservation number while quarantined (which has no deadline);
/// - `epoch` is the low 32 bits of the reservation number while staging (no reader can hold a
///   lease on a staging object), and the read epoch from the publish on (starting at 0).
///
/// `repr(packed(4))` lets the `u64` sit at a 4-byte offset (no padding); only `timer` is
/// affected, and it is only ever read and written by value.
#[repr(C, packed(4))]
#[derive(Debug, Clone, Copy)]
struct Entry {
    hash: ChunkHash,
    /// Namespace id (low 28 bits) and flags, see [`NS_MASK`].
    word: NonZeroU32,
    /// Offset in units of the allocator's alignment (`L1Manager::with_clock` keeps the pool
    /// below 2^32 units).
    offset: u32,
    /// Object length in bytes (longer objects are refused).
    len: u32,
    timer: u64,
    readers: u32,
    epoch: u32,
}

const _: () = assert!(std::mem::size_of::<Slot>() == 64);

impl Entry {
    fn ns(&self) -> NsId {
        self.word.get() & NS_MASK
    }

    fn key(&self) -> (ChunkHash, NsId) {
        (self.hash, self.ns())
    }

    fn phase(&self) -> Phase {
        match (self.word.get() & PHASE_MASK) >> PHASE_SHIFT {
            1 => Phase::Staging,
            2 => Phase::Ready,
            _ => Phase::Quarantined,
        }
    }

    fn set_word(&mut self, word: u32) {
        // The phase bits are never 0, see `Phase::bits`.
        if let Some(w) = NonZeroU32::new(word) {
            self.word = w;
        }
    }

    fn set_phase(&mut self, phase: Phase) {
        self.set_word((self.word.get() & !PHASE_MASK) | phase.bits());
    }

    fn temporary(&self) -> bool {
        self.word.get() & TEMPORARY != 0
    }

    fn doomed(&self) -> bool {
        self.word.get() & DOOMED != 0
    }

    fn set_doomed(&mut self, doomed: bool) {
        let w = self.word.get() & !DOOMED;
        self.set_word(if doomed { w | DOOMED } else { w });
    }

    /// The entry's current position in the expiry queue (write TTL while staging, read TTL
    /// while read-locked).
    fn deadline(&self) -> Option<u64> {
        let t = self.timer;
        (self.phase() != Phase::Quarantined && t != NO_DEADLINE).then_some(t)
    }

    fn take_deadline(&mut self) -> Option<u64> {
        let d = self.deadline();
        if d.is_some() {
            self.timer = NO_DEADLINE;
        }
        d
    }

    fn replace_deadline(&mut self, deadline: u64) -> Option<u64> {
        let d = self.deadline();
        self.timer = deadline;
        d
    }

    /// Reservation number of a quarantined entry.
    fn quarantine_seq(&self) -> u64 {
        self.timer
    }
}

impl Phase {
    fn bits(self) -> u32 {
        let n = match self {
            Phase::Staging => 1,
            Phase::Ready => 2,
            Phase::Quarantined => 3,
        };
        n << PHASE_SHIFT
    }
}

/// Bytes reserved for an object of `len` bytes at alignment `align` (a power of two).
fn reserved_of(len: u32, align: u64) -> u64 {
    (u64::from(len) + align - 1) & !(align - 1)
}

#[derive(Debug, Default)]
struct Slot {
    generation: u32,
    entry: Option<Entry>,
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
            out[i] = Ok(WriteTicket {
                id,
                generation,
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

    fn reserve_read_with(
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

    /// Whether any of `tickets` still holds memory (staging, or quarantined after its write TTL
    /// lapsed). O(tickets).
    pub fn holds_any(&self, tickets: &[WriteTicket]) -> bool {
        let inner = self.inner.lock();
        tickets
            .iter()
            .any(|t| inner.live(t.id, t.generation).is_some())
    }

    /// Whether each key is readable right now (ready, not doomed). Takes no object lock.
    pub fn contains(&self, keys: &[ObjectKey]) -> Vec<bool> {
        let now = self.ticks(self.clock.now());
        let mut inner = self.inner.lock();
        keys.iter()
            .map(|k| self.readable(&mut inner, k, now).is_ok())
            .collect()
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

    /// Allocator fragmentation snapshot: `(free_bytes, largest_free_block, free_fragments)`.
    pub fn fragmentation(&self) -> (u64, u64, usize) {
        let inner = self.inner.lock();
        (
            inner.alloc.free_bytes(),
            inner.alloc.largest_free_block(),
            inner.alloc.free_fragments(),
        )
    }

    /// `at` in nanoseconds of the manager's clock (what entries and the expiry queue store;
    /// below [`NO_DEADLINE`] for the next 584 years).
    fn ticks(&self, at: Instant) -> u64 {
        let nanos = at.saturating_duration_since(self.clock.base).as_nanos();
        u64::try_from(nanos)
            .unwrap_or(NO_DEADLINE - 1)
            .min(NO_DEADLINE - 1)
    }

    /// The deadline `ttl` after `now` (in ticks), saturating below [`NO_DEADLINE`].
    fn deadline_after(&self, now: u64, ttl: Duration) -> u64 {
        let ttl = u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX);
        now.saturating_add(ttl).min(NO_DEADLINE - 1)
    }

    // ---- internals (all called with the lock held) ----

    /// Resolves `key` to a readable entry, applying lapsed TTLs first (a staging object whose
    /// write TTL passed is discarded; lapsed read locks are released, which frees a temporary
    /// or doomed object).
    fn readable(&self, inner: &mut Inner, key: &ObjectKey, now: u64) -> Result<EntryId, L1Error> {
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

    fn publish(&self, inner: &mut Inner, t: &WriteTicket) -> Result<EntryId, L1Error> {
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
            let meta = inner.meta_of(id);
            inner.policy.on_ready(id, meta);
            inner.tenants.on_ready(meta.tenant, id);
        }
        Ok(id)
    }

    fn lock_read(
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

    fn unlock_read(&self, inner: &mut Inner, id: EntryId, count: u32, touch: bool) {
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

    fn expire_readers(&self, inner: &mut Inner, id: EntryId) {
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
    fn expire_staging(&self, inner: &mut Inner, id: EntryId) {
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
    fn release_quarantined(&self, inner: &mut Inner, id: EntryId) {
        self.counters.quarantine_released_total.inc();
        self.remove_entry(inner, id, RemovalCause::Discarded);
    }

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
        let why = match cause {
            RemovalCause::Evicted(_) => Removal::Evicted,
            _ => Removal::Dropped,
        };
        // Read before the entry goes: the fingerprint and tenant come from its namespace.
        let meta = inner.meta_of(id);
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

    /// Counts a lookup's hits and misses against its keys' tenant.
    fn count_lookup(&self, inner: &Inner, keys: &[ObjectKey], hits: &[EntryId]) {
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

/// A stable hash of a key (its chunk hash and its namespace's seed), for the ghost lists of ARC
/// and S3-FIFO. Computed when needed: the namespace outlives the entry, so it never changes.
fn fingerprint(hash: &ChunkHash, ns_seed: u64) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0x6b76_7469_6572_4c31).hash_one((hash, ns_seed))
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

#[cold]
fn unreachable_entry() -> ! {
    // Callers only pass ids they just validated under the same lock.
    panic!("L1 invariant violated: validated entry disappeared under the lock")
}
