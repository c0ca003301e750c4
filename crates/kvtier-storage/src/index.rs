//! The object index the adapters share: lengths, pins, capacity reservations and eviction order.
//!
//! Invariants:
//! - `used` is the sum of the lengths of the indexed objects; `reserved` the bytes of stores in
//!   flight. With a capacity, `used + reserved <= capacity` after every successful
//!   [`reserve`](ObjectIndex::reserve).
//! - A pinned key (pin count > 0) is never chosen as a victim. Pins may exist for keys that are
//!   not indexed (a remote store holds objects this process did not write), so pins live in
//!   their own map.
//! - Victims are removed from the index when chosen; the caller deletes their bytes afterwards.
//!   A concurrent lookup therefore never pins an object that is about to be deleted.
//! - Order: the adapter's `eviction_policy`, one of L1's policies (`kvtier_core::l1::eviction`:
//!   LRU, ARC, IsolatedLRU, S3-FIFO, noop) over per-index entry ids, told of every insert, hit
//!   and removal; FIFO is LRU without the hits. Choosing victims asks the policy for candidates
//!   and skips pinned keys, so its cost is the victims plus the pinned keys proposed before
//!   them (plus S3-FIFO's bounded reinsertions). IsolatedLRU drains the tenant (`cache_salt`)
//!   holding the most bytes first. An id is reused once its key has left.
//!
//! - Change notifications ([`BoundListener`], optional): `stored` when a key is indexed and was
//!   not before, `removed` whenever an indexed key leaves (every removal goes through
//!   [`ObjectIndex::remove`]). Made under the caller's index mutex, so they are in index order.
//!
//! Not thread-safe by itself: adapters keep it behind a `parking_lot::Mutex` and never hold that
//! across an `.await` or I/O.

use std::collections::HashSet;
use std::future::Future;
use std::hash::BuildHasher;
use std::sync::Arc;

use kvtier_core::key::ObjectKey;

use kvtier_core::l1::eviction::{EntryId, EntryMeta, Removal, TenantId, Verdict};
use kvtier_core::l1::{Allocation, EvictionPolicy, EvictionPolicyKind};
use kvtier_core::metrics::Counter;
use parking_lot::Mutex;

use crate::backend::KeyResults;
use crate::config::{EvictionPolicyName, EvictionSettings};
use crate::error::L2Error;
use crate::listener::BoundListener;

use kvtier_core::collections::FastMap as Map;

#[derive(Debug, Clone, Copy)]
struct Entry {
    len: u64,
    id: EntryId,
}

/// See the module docs.
#[derive(Debug)]
pub struct ObjectIndex {
    map: Map<ObjectKey, Entry>,
    /// The key of each entry id (`None`: free).
    keys: Vec<Option<ObjectKey>>,
    free_ids: Vec<EntryId>,
    policy: Box<dyn EvictionPolicy>,
    /// FIFO: hits are not reported to the (LRU) policy.
    fifo: bool,
    /// Tenant id of each `cache_salt` with indexed objects, and per tenant id its bytes (for
    /// IsolatedLRU's drain order), objects and salt; a tenant whose last object leaves is
    /// retired and its id reused, so client-chosen salts cannot grow these tables.
    tenants: Map<Arc<str>, TenantId>,
    tenant_stats: Vec<TenantStat>,
    free_tenants: Vec<TenantId>,
    pins: Map<ObjectKey, u32>,
    used: u64,
    reserved: u64,
    capacity: u64,
    watermark: Option<(f64, f64)>,
    listener: Option<BoundListener>,
}

#[derive(Debug, Default)]
struct TenantStat {
    bytes: u64,
    objects: u64,
    salt: Option<Arc<str>>,
}

/// A stable 64-bit hash of a key, for the ghost lists of ARC and S3-FIFO.
fn fingerprint(key: &ObjectKey) -> u64 {
    foldhash::fast::FixedState::with_seed(0x6c32_2d67_686f_7374).hash_one(key)
}

impl ObjectIndex {
    /// An empty index. `capacity` 0 = unlimited. `default_policy` applies unless `eviction`
    /// names one; `eviction` also enables watermark-triggered eviction.
    pub fn new(
        capacity: u64,
        default_policy: EvictionPolicyName,
        eviction: Option<&EvictionSettings>,
    ) -> Self {
        let name = eviction.map_or(default_policy, |e| e.eviction_policy);
        let (kind, fifo) = match name {
            EvictionPolicyName::Fifo => (EvictionPolicyKind::Lru, true),
            EvictionPolicyName::Policy(kind) => (kind, false),
        };
        Self {
            map: Map::default(),
            keys: Vec::new(),
            free_ids: Vec::new(),
            policy: kind.build(),
            fifo,
            tenants: Map::default(),
            tenant_stats: Vec::new(),
            free_tenants: Vec::new(),
            pins: Map::default(),
            used: 0,
            reserved: 0,
            capacity,
            watermark: eviction.map(|e| (e.trigger_watermark, e.eviction_ratio)),
            listener: None,
        }
    }

    /// The tenant of `key` (its `cache_salt`), registered on first sight.
    fn tenant(&mut self, key: &ObjectKey) -> TenantId {
        if let Some(&t) = self.tenants.get(&key.cache_salt) {
            return t;
        }
        let stat = TenantStat {
            salt: Some(Arc::clone(&key.cache_salt)),
            ..TenantStat::default()
        };
        let t = match self.free_tenants.pop() {
            Some(t) => {
                if let Some(s) = self.tenant_stats.get_mut(t as usize) {
                    *s = stat;
                }
                t
            }
            None => {
                self.tenant_stats.push(stat);
                (self.tenant_stats.len() - 1) as TenantId
            }
        };
        self.tenants.insert(Arc::clone(&key.cache_salt), t);
        t
    }

    /// Counts an object of `len` bytes in (`add`) or out of tenant `t`; retires the tenant when
    /// its last object leaves.
    fn count(&mut self, t: TenantId, len: u64, add: bool) {
        let Some(s) = self.tenant_stats.get_mut(t as usize) else {
            return;
        };
        if add {
            s.bytes += len;
            s.objects += 1;
            return;
        }
        s.bytes = s.bytes.saturating_sub(len);
        s.objects = s.objects.saturating_sub(1);
        if s.objects == 0
            && let Some(salt) = s.salt.take()
        {
            self.tenants.remove(&salt);
            self.free_tenants.push(t);
        }
    }

    fn meta(&mut self, key: &ObjectKey) -> EntryMeta {
        EntryMeta {
            tenant: self.tenant(key),
            fingerprint: fingerprint(key),
        }
    }

    /// The tenants in IsolatedLRU's drain order (most bytes first); empty for the others.
    fn drain_order(&self) -> Vec<TenantId> {
        if !self.policy.isolated() {
            return Vec::new();
        }
        let mut order: Vec<(u64, TenantId)> = self
            .tenant_stats
            .iter()
            .enumerate()
            .filter(|(_, s)| s.salt.is_some())
            .map(|(t, s)| (s.bytes, t as TenantId))
            .collect();
        order.sort_by_key(|&(bytes, t)| (std::cmp::Reverse(bytes), t));
        order.into_iter().map(|(_, t)| t).collect()
    }

    /// Unpinned candidates in the policy's order, as long as `enough(freed)` is false.
    fn candidates(&mut self, enough: impl Fn(u64) -> bool) -> (Vec<(ObjectKey, u64)>, u64) {
        let order = self.drain_order();
        let (keys, map, pins) = (&self.keys, &self.map, &self.pins);
        let mut freed = 0u64;
        let mut out = Vec::new();
        self.policy.select(&order, &mut |id| {
            if enough(freed) {
                return Verdict::Stop;
            }
            let Some(Some(key)) = keys.get(id as usize) else {
                return Verdict::Skip;
            };
            if pins.contains_key(key) {
                return Verdict::Skip;
            }
            let Some(e) = map.get(key) else {
                return Verdict::Skip;
            };
            freed += e.len;
            out.push((key.clone(), e.len));
            Verdict::Evict
        });
        (out, freed)
    }

    /// Starts notifying `listener` of changes. The keys already indexed (an index rebuilt from
    /// disk) are announced first, in eviction order: O(n) once, at start-up, before the adapter
    /// serves requests.
    pub fn set_listener(&mut self, listener: BoundListener) {
        for key in self.keys.iter().flatten() {
            listener.stored(key);
        }
        self.listener = Some(listener);
    }

    /// Indexed objects.
    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes of indexed objects.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Capacity (0 = unlimited).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Keys with at least one pin.
    pub fn pinned_count(&self) -> u64 {
        self.pins.len() as u64
    }

    /// Space accounting for [`L2Backend::usage`](crate::backend::L2Backend::usage).
    pub fn usage(&self) -> crate::backend::Usage {
        crate::backend::Usage {
            used_bytes: self.used(),
            capacity_bytes: self.capacity(),
            object_count: self.len(),
            pinned_count: self.pinned_count(),
        }
    }

    /// The length of `key` if indexed; a hit is reported to the policy (not under FIFO).
    pub fn get(&mut self, key: &ObjectKey) -> Option<u64> {
        let e = *self.map.get(key)?;
        if !self.fifo {
            let tenant = self.tenant(key);
            self.policy.on_access(e.id, tenant);
        }
        Some(e.len)
    }

    /// Whether `key` is indexed (no LRU refresh).
    pub fn contains(&self, key: &ObjectKey) -> bool {
        self.map.contains_key(key)
    }

    /// The length of `key` if indexed (no LRU refresh).
    pub fn peek(&self, key: &ObjectKey) -> Option<u64> {
        self.map.get(key).map(|e| e.len)
    }

    /// Adds one pin to `key` (indexed or not).
    pub fn pin(&mut self, key: &ObjectKey) {
        *self.pins.entry(key.clone()).or_insert(0) += 1;
    }

    /// For each key: its length if indexed, pinning it (LMCache's lookup-and-lock).
    pub fn get_and_pin(&mut self, keys: &[ObjectKey]) -> Vec<Option<u64>> {
        keys.iter()
            .map(|k| {
                let len = self.get(k)?;
                self.pin(k);
                Some(len)
            })
            .collect()
    }

    /// Removes one pin from each key; unknown keys are ignored.
    pub fn unpin_all(&mut self, keys: &[ObjectKey]) {
        for k in keys {
            self.unpin(k);
        }
    }

    /// Removes one pin from `key`; unknown keys are ignored.
    pub fn unpin(&mut self, key: &ObjectKey) {
        if let Some(n) = self.pins.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.pins.remove(key);
            }
        }
    }

    /// Whether `key` is pinned.
    pub fn is_pinned(&self, key: &ObjectKey) -> bool {
        self.pins.contains_key(key)
    }

    /// Indexes `key` (replacing an older entry, which counts as new to the policy). Does not
    /// touch reservations.
    pub fn insert(&mut self, key: ObjectKey, len: u64) {
        if self.unindex(&key, Removal::Dropped).is_none()
            && let Some(l) = &self.listener
        {
            l.stored(&key);
        }
        let id = match self.free_ids.pop() {
            Some(id) => id,
            None => {
                self.keys.push(None);
                (self.keys.len() - 1) as EntryId
            }
        };
        let meta = self.meta(&key);
        self.count(meta.tenant, len, true);
        if let Some(slot) = self.keys.get_mut(id as usize) {
            *slot = Some(key.clone());
        }
        self.map.insert(key, Entry { len, id });
        self.used += len;
        self.policy.on_ready(id, meta);
    }

    /// Takes `key` out of the map, the policy and the byte counts (not the listener).
    fn unindex(&mut self, key: &ObjectKey, why: Removal) -> Option<u64> {
        let e = self.map.remove(key)?;
        self.used -= e.len;
        let meta = self.meta(key);
        self.policy.on_remove(e.id, meta, why);
        self.count(meta.tenant, e.len, false);
        if let Some(slot) = self.keys.get_mut(e.id as usize) {
            *slot = None;
        }
        self.free_ids.push(e.id);
        Some(e.len)
    }

    /// Removes `key` from the index; returns its length.
    pub fn remove(&mut self, key: &ObjectKey) -> Option<u64> {
        self.remove_for(key, Removal::Dropped)
    }

    fn remove_for(&mut self, key: &ObjectKey, why: Removal) -> Option<u64> {
        let len = self.unindex(key, why)?;
        if let Some(l) = &self.listener {
            l.removed(key);
        }
        Some(len)
    }

    /// Unpinned victims, in the policy's order, whose lengths add up to at least `goal` bytes,
    /// or `None` if the unpinned objects cannot cover it. Nothing is removed.
    fn pick_victims(&mut self, goal: u64) -> Option<Vec<(ObjectKey, u64)>> {
        let (out, freed) = self.candidates(|freed| freed >= goal);
        (freed >= goal).then_some(out)
    }

    fn take(&mut self, victims: &[(ObjectKey, u64)]) {
        for (k, _) in victims {
            self.remove_for(k, Removal::Evicted);
        }
    }

    /// Reserves `len` bytes for a store, choosing (and un-indexing) victims to make room. Returns
    /// the victims, whose bytes the caller must delete. Fails, changing nothing, if unpinned
    /// objects cannot make room (or `len` exceeds the capacity).
    pub fn reserve(&mut self, len: u64) -> Result<Vec<(ObjectKey, u64)>, u64> {
        if self.capacity == 0 {
            self.reserved += len;
            return Ok(Vec::new());
        }
        if len > self.capacity {
            return Err(len);
        }
        let total = self.used + self.reserved + len;
        let victims = if total > self.capacity {
            self.pick_victims(total - self.capacity).ok_or(len)?
        } else {
            Vec::new()
        };
        self.take(&victims);
        self.reserved += len;
        Ok(victims)
    }

    /// Ends a reservation: with `Some(key)` the object is indexed, with `None` it was not stored.
    pub fn finish_reservation(&mut self, len: u64, key: Option<ObjectKey>) {
        self.reserved = self.reserved.saturating_sub(len);
        if let Some(k) = key {
            self.insert(k, len);
        }
    }

    /// Watermark eviction (only with an `eviction` section): when `used >= watermark *
    /// capacity`, un-indexes unpinned victims worth `ratio * used` bytes and returns them.
    pub fn watermark_victims(&mut self) -> Vec<(ObjectKey, u64)> {
        let Some((watermark, ratio)) = self.watermark else {
            return Vec::new();
        };
        if self.capacity == 0 || (self.used as f64) < watermark * self.capacity as f64 {
            return Vec::new();
        }
        let goal = ((self.used as f64) * ratio).ceil() as u64;
        // Take what is evictable even if it falls short of the goal.
        let (victims, _) = self.candidates(|freed| freed >= goal.max(1));
        self.take(&victims);
        victims
    }

    /// Un-indexes unpinned victims until the index fits its capacity again (a capacity that
    /// shrank since the objects were written); returns them, whose bytes the caller deletes.
    pub fn trim_to_capacity(&mut self) -> Vec<(ObjectKey, u64)> {
        if self.capacity == 0 || self.used <= self.capacity {
            return Vec::new();
        }
        let goal = self.used - self.capacity;
        let (victims, _) = self.candidates(|freed| freed >= goal);
        self.take(&victims);
        victims
    }

    /// Every indexed key with its length, in the policy's eviction order, pinned keys
    /// included (tests only: O(n), and S3-FIFO's walk reorders as it goes).
    #[cfg(test)]
    pub fn keys_in_order(&mut self) -> Vec<(ObjectKey, u64)> {
        let order = self.drain_order();
        let mut ids = Vec::new();
        self.policy.select(&order, &mut |id| {
            ids.push(id);
            Verdict::Skip
        });
        ids.into_iter()
            .filter_map(|id| self.keys.get(id as usize).cloned().flatten())
            .filter_map(|k| self.map.get(&k).map(|e| (k.clone(), e.len)))
            .collect()
    }
}

/// One index-backed store batch, the part every adapter with an [`ObjectIndex`] shares: which
/// keys to write (keys already held, or repeated earlier in the batch, succeed at once and are
/// counted in `skipped`), the capacity reserved for them, and the victims to delete first.
/// Finish it with [`StorePlan::finish`] once the writes are done.
#[derive(Debug)]
pub(crate) struct StorePlan {
    /// Results decided already (skipped keys, capacity refusals); `None` for the jobs.
    out: Vec<Option<Result<(), L2Error>>>,
    /// Indices of the keys to write.
    pub(crate) jobs: Vec<usize>,
    /// Objects evicted to make room (already out of the index): delete their bytes.
    pub(crate) victims: Vec<(ObjectKey, u64)>,
}

impl StorePlan {
    /// Plans a batch under the index mutex (O(keys), no I/O).
    pub(crate) fn new(
        index: &Mutex<ObjectIndex>,
        keys: &[ObjectKey],
        src: &[Allocation],
        skipped: &Counter,
    ) -> Self {
        let mut plan = Self {
            out: (0..keys.len()).map(|_| None).collect(),
            jobs: Vec::new(),
            victims: Vec::new(),
        };
        let mut seen: HashSet<&ObjectKey> = HashSet::with_capacity(keys.len());
        let mut ix = index.lock();
        for (i, (k, a)) in keys.iter().zip(src).enumerate() {
            if ix.contains(k) || !seen.insert(k) {
                skipped.inc();
                plan.out[i] = Some(Ok(()));
                continue;
            }
            match ix.reserve(a.len) {
                Ok(v) => {
                    plan.victims.extend(v);
                    plan.jobs.push(i);
                }
                Err(needed) => plan.out[i] = Some(Err(L2Error::CapacityFull { needed })),
            }
        }
        plan
    }

    /// Records the outcome of key `i` (one of the jobs).
    pub(crate) fn set(&mut self, i: usize, result: Result<(), L2Error>) {
        if let Some(slot) = self.out.get_mut(i) {
            *slot = Some(result);
        }
    }

    /// Records the jobs' outcomes, in job order.
    pub(crate) fn record(&mut self, written: impl IntoIterator<Item = Result<(), L2Error>>) {
        for (&i, r) in self.jobs.iter().zip(written) {
            if let Some(slot) = self.out.get_mut(i) {
                *slot = Some(r);
            }
        }
    }

    /// The whole store of a batch whose keys are written independently and concurrently
    /// (`resp`, `valkey`): plan under the index mutex, delete the victims (`evict`), write
    /// every job (`write(i)` for key `i`), index what was written and evict down to the
    /// watermark. `fs` runs the same plan in two phases of its own.
    pub(crate) async fn run<E, W>(
        index: &Mutex<ObjectIndex>,
        keys: &[ObjectKey],
        src: &[Allocation],
        skipped: &Counter,
        evict: impl Fn(Vec<(ObjectKey, u64)>) -> E,
        write: impl Fn(usize) -> W,
    ) -> KeyResults
    where
        E: Future<Output = ()>,
        W: Future<Output = Result<(), L2Error>>,
    {
        let mut plan = Self::new(index, keys, src, skipped);
        evict(std::mem::take(&mut plan.victims)).await;
        let written = futures_util::future::join_all(plan.jobs.iter().map(|&i| write(i))).await;
        plan.record(written);
        let (results, more) = plan.finish(index, keys, src);
        evict(more).await;
        results
    }

    /// Indexes what was written, releases the other reservations, and returns every key's
    /// result with the objects to evict down to the watermark (delete their bytes).
    pub(crate) fn finish(
        self,
        index: &Mutex<ObjectIndex>,
        keys: &[ObjectKey],
        src: &[Allocation],
    ) -> (KeyResults, Vec<(ObjectKey, u64)>) {
        let results: KeyResults = self
            .out
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(L2Error::Io("store task lost".to_owned()))))
            .collect();
        let mut ix = index.lock();
        for &i in &self.jobs {
            let key = results[i].is_ok().then(|| keys[i].clone());
            ix.finish_reservation(src[i].len, key);
        }
        let more = ix.watermark_victims();
        (results, more)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use kvtier_core::hash::ChunkHash;

    use super::*;

    fn key(i: u8) -> ObjectKey {
        ObjectKey {
            chunk_hash: ChunkHash::from([i; 32]),
            model_name: Arc::from("m"),
            kv_rank: 0,
            object_group_id: 0,
            cache_salt: Arc::from(""),
        }
    }

    #[derive(Debug, Default)]
    struct Log(Mutex<Vec<(char, usize, u8)>>);

    impl crate::listener::L2Listener for Log {
        fn stored(&self, adapter: usize, key: &ObjectKey) {
            self.0
                .lock()
                .push(('+', adapter, key.chunk_hash.as_bytes()[0]));
        }
        fn removed(&self, adapter: usize, key: &ObjectKey) {
            self.0
                .lock()
                .push(('-', adapter, key.chunk_hash.as_bytes()[0]));
        }
    }

    #[test]
    fn the_listener_hears_existing_keys_new_keys_and_every_removal_once() {
        let log = Arc::new(Log::default());
        let mut ix = ObjectIndex::new(30, EvictionPolicyName::Fifo, None);
        ix.insert(key(0), 10); // e.g. rebuilt from disk before the listener is set
        ix.set_listener(BoundListener::new(2, Arc::clone(&log) as _));
        ix.insert(key(1), 10);
        ix.insert(key(1), 10); // re-indexing a held key is not a new store
        ix.reserve(10).expect("room");
        ix.finish_reservation(10, Some(key(2)));
        let victims = ix.reserve(10).expect("room after eviction");
        assert_eq!(victims, vec![(key(0), 10)]);
        ix.remove(&key(1));
        ix.remove(&key(1)); // not indexed any more: silent
        assert_eq!(
            *log.0.lock(),
            vec![
                ('+', 2, 0),
                ('+', 2, 1),
                ('+', 2, 2),
                ('-', 2, 0),
                ('-', 2, 1)
            ]
        );
    }

    #[test]
    fn reserve_evicts_fifo_and_skips_pinned() {
        let mut ix = ObjectIndex::new(30, EvictionPolicyName::Fifo, None);
        for i in 0..3 {
            assert!(ix.reserve(10).expect("room").is_empty());
            ix.finish_reservation(10, Some(key(i)));
        }
        assert_eq!(ix.used(), 30);
        ix.pin(&key(0));
        let victims = ix.reserve(10).expect("room after eviction");
        assert_eq!(victims, vec![(key(1), 10)]);
        ix.finish_reservation(10, Some(key(3)));
        // Everything pinned: nothing evictable.
        for i in [0, 2, 3] {
            ix.pin(&key(i));
        }
        assert_eq!(ix.reserve(10), Err(10));
        assert_eq!(ix.used(), 30);
        ix.unpin(&key(2));
        assert_eq!(ix.reserve(10).expect("room"), vec![(key(2), 10)]);
        assert_eq!(ix.reserve(31), Err(31));
    }

    #[test]
    fn lru_hit_moves_to_tail_and_watermark() {
        let eviction = EvictionSettings {
            eviction_policy: EvictionPolicyName::LRU,
            trigger_watermark: 0.5,
            eviction_ratio: 0.5,
        };
        let mut ix = ObjectIndex::new(100, EvictionPolicyName::Fifo, Some(&eviction));
        for i in 0..4 {
            ix.insert(key(i), 10);
        }
        assert!(ix.watermark_victims().is_empty());
        ix.get(&key(0));
        ix.insert(key(4), 10);
        let v: Vec<_> = ix.watermark_victims().into_iter().map(|(k, _)| k).collect();
        assert_eq!(v, vec![key(1), key(2), key(3)]);
        assert_eq!(ix.used(), 20);
    }

    fn salted(i: u8, salt: &str) -> ObjectKey {
        ObjectKey {
            cache_salt: Arc::from(salt),
            ..key(i)
        }
    }

    fn with_policy(capacity: u64, policy: EvictionPolicyName) -> ObjectIndex {
        let eviction = EvictionSettings {
            eviction_policy: policy,
            trigger_watermark: 1.0,
            eviction_ratio: 0.2,
        };
        ObjectIndex::new(capacity, EvictionPolicyName::LRU, Some(&eviction))
    }

    /// Stores `k` (10 bytes), evicting as needed; returns the victims.
    fn store(ix: &mut ObjectIndex, k: ObjectKey) -> Vec<ObjectKey> {
        let victims = ix.reserve(10).expect("room");
        ix.finish_reservation(10, Some(k));
        victims.into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn arc_and_s3fifo_keep_a_reread_object_through_a_scan_that_lru_loses_it_to() {
        for (policy, kept) in [
            (EvictionPolicyKind::Lru, false),
            (EvictionPolicyKind::Arc, true),
            (EvictionPolicyKind::S3Fifo, true),
        ] {
            let mut ix = with_policy(40, EvictionPolicyName::Policy(policy));
            for i in 0..4 {
                store(&mut ix, key(i));
            }
            // Object 0 is read twice (S3-FIFO counts a read as two accesses: lock and release).
            for _ in 0..4 {
                assert_eq!(ix.get(&key(0)), Some(10));
            }
            // A scan of one-off objects, twice the capacity.
            for i in 10..18 {
                store(&mut ix, key(i));
            }
            assert_eq!(ix.contains(&key(0)), kept, "{policy:?}");
            assert_eq!(ix.used(), 40, "{policy:?}");
        }
    }

    #[test]
    fn noop_never_evicts_and_refuses_what_does_not_fit() {
        let mut ix = with_policy(30, EvictionPolicyName::Policy(EvictionPolicyKind::Noop));
        for i in 0..3 {
            assert!(store(&mut ix, key(i)).is_empty());
        }
        assert_eq!(ix.reserve(10), Err(10));
        assert_eq!(ix.len(), 3);
        assert!(ix.watermark_victims().is_empty(), "noop has no victims");
        assert_eq!(ix.remove(&key(1)), Some(10));
        assert!(store(&mut ix, key(3)).is_empty());
    }

    #[test]
    fn isolated_lru_drains_the_largest_tenant_first_and_retires_empty_tenants() {
        let mut ix = with_policy(
            60,
            EvictionPolicyName::Policy(EvictionPolicyKind::IsolatedLru),
        );
        store(&mut ix, salted(0, "small"));
        for i in 1..5 {
            store(&mut ix, salted(i, "big"));
        }
        store(&mut ix, salted(5, "small"));
        // Full: the next store evicts from "big" (40 bytes) although "small"'s 0 is older.
        assert_eq!(store(&mut ix, salted(6, "new")), vec![salted(1, "big")]);
        assert!(ix.contains(&salted(0, "small")));
        // Salts come and go without growing the tenant table.
        let mut ix = with_policy(
            0,
            EvictionPolicyName::Policy(EvictionPolicyKind::IsolatedLru),
        );
        for round in 0..50u8 {
            let k = salted(round, &format!("salt-{round}"));
            ix.insert(k.clone(), 10);
            assert_eq!(ix.remove(&k), Some(10));
        }
        assert_eq!(ix.tenant_stats.len(), 1);
        assert!(ix.tenants.is_empty());
    }
}
