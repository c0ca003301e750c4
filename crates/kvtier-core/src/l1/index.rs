//! The L1 key index: `(chunk hash, namespace)` → entry id, holding nothing but the id.
//!
//! A `HashMap<ObjectKey, EntryId>` would hold every key twice (its entry has one): 72 bytes plus
//! the map's slack per object. This index keeps only the 4-byte id per bucket (5 bytes with
//! hashbrown's control byte) and compares keys through the entry the id names, which the caller
//! reads for it (every method takes a `key_of` function giving the `(chunk hash, namespace)` of
//! an id's entry).
//!
//! The namespace id stands for the rest of the [`ObjectKey`](crate::key::ObjectKey) (see
//! `l1::namespace`): while an entry is indexed its namespace is live and its id is not reused, so
//! `(hash, ns)` identifies the key.
//!
//! **Incremental rebuild.** hashbrown rebuilds a full table in one call (growth, or a rehash in
//! place once removals have left too many tombstones), rehashing every id; without stored
//! hashes that is one random entry read per object (110–320 ms at 917,504 objects on this VM),
//! under the L1 lock, so every client waited for it. Instead, when the table is full the index
//! moves it aside as `old` and starts a fresh table with room for twice its ids; each later
//! [`insert`](KeyIndex::insert) first moves the ids of the next [`MIGRATE_BUCKETS`] buckets of
//! `old` into the new table (reading those entries' keys), so `old` is empty after
//! `old.num_buckets() / MIGRATE_BUCKETS` inserts (65,536 for a 917,504-object table), long
//! before the new table, which had room for as many inserts again as it held ids, can fill.
//! Lookups and removals look in both tables while `old` has ids. Memory: both tables exist only
//! during the move, as they do during hashbrown's own resize. Storing each key's hash instead
//! would have more than doubled the table.
//!
//! Invariants (the first two checked by `L1Manager::check_invariants`): an id is in the index
//! at most once, under the hash of its entry's key, in exactly one of the two tables; no two
//! ids in the index name entries with equal keys; `old` is empty or its buckets below `cursor`
//! are all empty; a move step never fills the new table. Only if the new table fills before
//! `old` is drained (possible only when mass removals left a big old table with few ids) does
//! an insert move the rest at once, letting hashbrown grow the new table its own way if need
//! be. The owner (the L1 mutex) keeps the index and the entries in step: an entry's key never
//! changes while its id is indexed.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use super::eviction::EntryId;
use super::namespace::NsId;
use crate::hash::ChunkHash;

/// Buckets of the old table moved per insert while a rebuild is under way.
pub(super) const MIGRATE_BUCKETS: usize = 16;

/// The smallest table a rebuild starts.
const MIN_CAPACITY: usize = 16;

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct KeyIndex {
    /// Where every insert goes.
    table: HashTable<EntryId>,
    /// The table being moved into `table` (empty when no rebuild is under way).
    old: HashTable<EntryId>,
    /// The next bucket of `old` to move.
    cursor: usize,
    state: foldhash::fast::RandomState,
    /// Rebuilds that had to finish the previous move first (tests).
    #[cfg(test)]
    forced_moves: usize,
}

impl KeyIndex {
    fn hash(state: &foldhash::fast::RandomState, key: (&ChunkHash, NsId)) -> u64 {
        state.hash_one(key)
    }

    /// The hash of an indexed id's key (0 if `key_of` knows no entry for it, which the
    /// invariants rule out).
    fn rehash(
        state: &foldhash::fast::RandomState,
        id: EntryId,
        key_of: &impl Fn(EntryId) -> Option<(ChunkHash, NsId)>,
    ) -> u64 {
        key_of(id).map_or(0, |(hash, ns)| Self::hash(state, (&hash, ns)))
    }

    /// The id indexed under `key`; `key_of` gives the key of an indexed id's entry.
    pub(super) fn get(
        &self,
        key: (&ChunkHash, NsId),
        key_of: impl Fn(EntryId) -> Option<(ChunkHash, NsId)>,
    ) -> Option<EntryId> {
        let h = Self::hash(&self.state, key);
        let eq = |&id: &EntryId| key_of(id).is_some_and(|(hash, ns)| ns == key.1 && hash == *key.0);
        self.table
            .find(h, eq)
            .or_else(|| {
                if self.old.is_empty() {
                    None
                } else {
                    self.old.find(h, eq)
                }
            })
            .copied()
    }

    /// Indexes `id` under `key` (the caller checked that `key` is not indexed). Moves a step of
    /// an ongoing rebuild first, and starts one when the table is full (module docs).
    pub(super) fn insert(
        &mut self,
        key: (&ChunkHash, NsId),
        id: EntryId,
        key_of: impl Fn(EntryId) -> Option<(ChunkHash, NsId)>,
    ) {
        self.migrate(MIGRATE_BUCKETS, &key_of);
        if self.table.len() >= self.table.capacity() {
            // Only reached with ids left in `old` if the new table filled first (its room is
            // twice the ids it started with, so only after mass removals shrank it): finish
            // that move at once (hashbrown may grow the table the slow way for it), then start
            // the next.
            #[cfg(test)]
            {
                self.forced_moves += usize::from(!self.old.is_empty());
            }
            self.migrate(usize::MAX, &key_of);
            let room = (2 * self.table.len()).max(MIN_CAPACITY);
            self.old = std::mem::replace(&mut self.table, HashTable::with_capacity(room));
            self.cursor = 0;
            self.migrate(MIGRATE_BUCKETS, &key_of);
        }
        let state = &self.state;
        let h = Self::hash(state, key);
        // The hasher runs only if the table grows, which the check above rules out.
        self.table
            .insert_unique(h, id, |&other| Self::rehash(state, other, &key_of));
    }

    /// Moves the ids of up to `buckets` buckets of `old` into the table, stopping early when the
    /// table is full (`usize::MAX`: all of them, growing the table if need be); frees `old` when
    /// it has no ids left.
    fn migrate(&mut self, buckets: usize, key_of: &impl Fn(EntryId) -> Option<(ChunkHash, NsId)>) {
        let end = self
            .cursor
            .saturating_add(buckets)
            .min(self.old.num_buckets());
        let bounded = buckets != usize::MAX;
        while self.cursor < end && !self.old.is_empty() {
            // A bounded step never fills the table (hashbrown would rebuild it); `insert` then
            // finishes the move at once.
            if bounded && self.table.len() >= self.table.capacity() {
                break;
            }
            if let Ok(entry) = self.old.get_bucket_entry(self.cursor) {
                let (id, _) = entry.remove();
                let state = &self.state;
                let h = Self::rehash(state, id, key_of);
                self.table
                    .insert_unique(h, id, |&other| Self::rehash(state, other, key_of));
            }
            self.cursor += 1;
        }
        if self.old.is_empty() && self.old.capacity() > 0 {
            self.old = HashTable::new();
            self.cursor = 0;
        }
    }

    /// Removes `id`, indexed under `key`; whether it was there.
    pub(super) fn remove(&mut self, key: (&ChunkHash, NsId), id: EntryId) -> bool {
        let h = Self::hash(&self.state, key);
        for table in [&mut self.table, &mut self.old] {
            if let Ok(e) = table.find_entry(h, |&eid| eid == id) {
                e.remove();
                return true;
            }
        }
        false
    }

    /// Finishes any rebuild and gives back the table's slack (after many removals).
    pub(super) fn shrink_to_fit(&mut self, key_of: impl Fn(EntryId) -> Option<(ChunkHash, NsId)>) {
        self.migrate(usize::MAX, &key_of);
        let state = &self.state;
        self.table
            .shrink_to_fit(|&id| Self::rehash(state, id, &key_of));
    }

    /// Indexed ids.
    pub(super) fn len(&self) -> usize {
        self.table.len() + self.old.len()
    }

    /// Whether a rebuild is under way (tests).
    #[cfg(test)]
    fn rebuilding(&self) -> bool {
        !self.old.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    /// Keys by id: id `i` has chunk hash `i` (little-endian in the first bytes) and namespace
    /// `i % 3`.
    fn key(i: u32) -> (ChunkHash, NsId) {
        let mut h = [0u8; 32];
        h[..4].copy_from_slice(&i.to_le_bytes());
        (ChunkHash::from_bytes(h), i % 3)
    }

    #[test]
    fn matches_a_hash_map_through_many_rebuilds() {
        // Ids 0..4096 come and go at random; every operation is compared with a HashMap, and
        // the table goes through growths and tombstone rebuilds, each moved step by step.
        let mut index = KeyIndex::default();
        let mut model: HashMap<(ChunkHash, NsId), EntryId> = HashMap::new();
        let key_of = |id: EntryId| Some(key(id));
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rebuilds_seen = 0;
        for step in 0..200_000u32 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let id = (x % 4096) as u32;
            let k = key(id);
            let indexed = model.contains_key(&k);
            // Grow for the first half, then churn around a steady size.
            let insert = if step < 100_000 {
                x >> 40 & 3 != 0
            } else {
                x >> 40 & 1 == 0
            };
            if insert && !indexed {
                index.insert((&k.0, k.1), id, key_of);
                model.insert(k, id);
            } else if !insert && indexed {
                assert!(index.remove((&k.0, k.1), id), "step {step}");
                model.remove(&k);
            }
            rebuilds_seen += usize::from(index.rebuilding());
            assert_eq!(
                index.get((&k.0, k.1), key_of),
                model.get(&k).copied(),
                "step {step}"
            );
            assert_eq!(index.len(), model.len(), "step {step}");
            if step % 10_000 == 0 {
                for i in 0..4096 {
                    let k = key(i);
                    assert_eq!(index.get((&k.0, k.1), key_of), model.get(&k).copied());
                }
            }
        }
        assert!(
            rebuilds_seen > 1000,
            "{rebuilds_seen} steps with a rebuild under way"
        );
        index.shrink_to_fit(key_of);
        assert!(!index.rebuilding());
        for i in 0..4096 {
            let k = key(i);
            assert_eq!(index.get((&k.0, k.1), key_of), model.get(&k).copied());
        }
        assert!(!index.remove((&key(5000).0, 5000 % 3), 5000));
    }

    #[test]
    fn a_new_table_that_fills_before_the_old_one_is_drained_finishes_the_move_first() {
        // Hard to reach through the public calls (the new table has room for as many inserts
        // as it started with ids, the old one drains 16 buckets per insert), so the state is
        // built by hand: a big old table with 1,000 ids, a new table that is already full.
        let key_of = |id: EntryId| Some(key(id));
        let mut index = KeyIndex::default();
        for id in 0..1000u32 {
            let k = key(id);
            index.insert((&k.0, k.1), id, key_of);
        }
        index.migrate(usize::MAX, &key_of);
        index.old = std::mem::take(&mut index.table);
        index.cursor = 0;
        index.table = HashTable::with_capacity(4);
        let mut id = 1000u32;
        while index.table.len() < index.table.capacity() {
            let k = key(id);
            let h = KeyIndex::hash(&index.state, (&k.0, k.1));
            index.table.insert_unique(h, id, |_| 0);
            id += 1;
        }
        let k = key(id);
        index.insert((&k.0, k.1), id, key_of);
        assert_eq!(index.forced_moves, 1);
        assert_eq!(index.len(), id as usize + 1);
        for i in 0..=id {
            let k = key(i);
            assert_eq!(index.get((&k.0, k.1), key_of), Some(i), "{i}");
        }
    }

    #[test]
    fn a_rebuild_finishes_long_before_the_new_table_fills() {
        let mut index = KeyIndex::default();
        let key_of = |id: EntryId| Some(key(id));
        let mut id = 0u32;
        // Fill until a rebuild starts.
        while !index.rebuilding() {
            let k = key(id);
            index.insert((&k.0, k.1), id, key_of);
            id += 1;
        }
        let moved_from = index.old.len() + index.table.len();
        let buckets = index.old.num_buckets();
        let mut inserts = 0;
        while index.rebuilding() {
            let k = key(id);
            index.insert((&k.0, k.1), id, key_of);
            id += 1;
            inserts += 1;
        }
        assert!(
            inserts <= buckets / MIGRATE_BUCKETS + 1,
            "{inserts} inserts"
        );
        assert!(index.table.capacity() >= 2 * (moved_from - 1));
        assert_eq!(index.old.capacity(), 0, "the old table is freed");
    }
}
