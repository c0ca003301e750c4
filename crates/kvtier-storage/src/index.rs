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
//! - Order: FIFO (insertion) or LRU (insertion and every hit move the key to the tail).
//!   Choosing victims walks from the head and skips pinned keys, so its cost is the victims plus
//!   the pinned keys in front of them.
//!
//! - Change notifications ([`BoundListener`], optional): `stored` when a key is indexed and was
//!   not before, `removed` whenever an indexed key leaves (every removal goes through
//!   [`ObjectIndex::remove`]). Made under the caller's index mutex, so they are in index order.
//!
//! Not thread-safe by itself: adapters keep it behind a `parking_lot::Mutex` and never hold that
//! across an `.await` or I/O.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;

use kvtier_core::key::ObjectKey;

use kvtier_core::l1::Allocation;
use kvtier_core::metrics::Counter;
use parking_lot::Mutex;

use crate::backend::KeyResults;
use crate::config::{EvictionPolicyName, EvictionSettings};
use crate::error::L2Error;
use crate::listener::BoundListener;

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

#[derive(Debug, Clone, Copy)]
struct Entry {
    len: u64,
    seq: u64,
}

/// See the module docs.
#[derive(Debug)]
pub struct ObjectIndex {
    map: Map<ObjectKey, Entry>,
    order: BTreeMap<u64, ObjectKey>,
    pins: Map<ObjectKey, u32>,
    next_seq: u64,
    used: u64,
    reserved: u64,
    capacity: u64,
    lru: bool,
    watermark: Option<(f64, f64)>,
    listener: Option<BoundListener>,
}

impl ObjectIndex {
    /// An empty index. `capacity` 0 = unlimited. `default_policy` applies unless `eviction`
    /// names one; `eviction` also enables watermark-triggered eviction.
    pub fn new(
        capacity: u64,
        default_policy: EvictionPolicyName,
        eviction: Option<&EvictionSettings>,
    ) -> Self {
        let policy = eviction.map_or(default_policy, |e| e.eviction_policy);
        Self {
            map: Map::default(),
            order: BTreeMap::new(),
            pins: Map::default(),
            next_seq: 0,
            used: 0,
            reserved: 0,
            capacity,
            lru: policy == EvictionPolicyName::Lru,
            watermark: eviction.map(|e| (e.trigger_watermark, e.eviction_ratio)),
            listener: None,
        }
    }

    /// Starts notifying `listener` of changes. The keys already indexed (an index rebuilt from
    /// disk) are announced first, in eviction order: O(n) once, at start-up, before the adapter
    /// serves requests.
    pub fn set_listener(&mut self, listener: BoundListener) {
        for key in self.order.values() {
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

    /// The length of `key` if indexed; a hit refreshes its LRU position.
    pub fn get(&mut self, key: &ObjectKey) -> Option<u64> {
        let e = *self.map.get(key)?;
        if self.lru {
            self.touch(key, e);
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

    fn touch(&mut self, key: &ObjectKey, e: Entry) {
        self.order.remove(&e.seq);
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, key.clone());
        if let Some(m) = self.map.get_mut(key) {
            m.seq = seq;
        }
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

    /// Indexes `key` (replacing an older entry). Does not touch reservations.
    pub fn insert(&mut self, key: ObjectKey, len: u64) {
        if let Some(old) = self.map.remove(&key) {
            self.order.remove(&old.seq);
            self.used -= old.len;
        } else if let Some(l) = &self.listener {
            l.stored(&key);
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.order.insert(seq, key.clone());
        self.map.insert(key, Entry { len, seq });
        self.used += len;
    }

    /// Removes `key` from the index; returns its length.
    pub fn remove(&mut self, key: &ObjectKey) -> Option<u64> {
        let e = self.map.remove(key)?;
        self.order.remove(&e.seq);
        self.used -= e.len;
        if let Some(l) = &self.listener {
            l.removed(key);
        }
        Some(e.len)
    }

    /// Unpinned victims (head first) whose lengths add up to at least `goal` bytes, or `None`
    /// if the unpinned objects cannot cover it. Nothing is removed.
    fn pick_victims(&self, goal: u64) -> Option<Vec<(ObjectKey, u64)>> {
        let mut freed = 0u64;
        let mut out = Vec::new();
        for key in self.order.values() {
            if freed >= goal {
                break;
            }
            if self.pins.contains_key(key) {
                continue;
            }
            if let Some(e) = self.map.get(key) {
                freed += e.len;
                out.push((key.clone(), e.len));
            }
        }
        (freed >= goal).then_some(out)
    }

    fn take(&mut self, victims: &[(ObjectKey, u64)]) {
        for (k, _) in victims {
            self.remove(k);
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
        let mut freed = 0u64;
        let mut victims = Vec::new();
        for key in self.order.values() {
            if freed >= goal.max(1) {
                break;
            }
            if self.pins.contains_key(key) {
                continue;
            }
            if let Some(e) = self.map.get(key) {
                freed += e.len;
                victims.push((key.clone(), e.len));
            }
        }
        self.take(&victims);
        victims
    }

    /// Every indexed key with its length, in eviction order (tests and shutdown only: O(n)).
    pub fn keys_in_order(&self) -> Vec<(ObjectKey, u64)> {
        self.order
            .values()
            .filter_map(|k| self.map.get(k).map(|e| (k.clone(), e.len)))
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
            eviction_policy: EvictionPolicyName::Lru,
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
}
