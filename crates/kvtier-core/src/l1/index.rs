//! The L1 key index: `(chunk hash, namespace)` → entry id, holding nothing but the id.
//!
//! A `HashMap<ObjectKey, EntryId>` would hold every key twice (its entry has one): 72 bytes plus
//! the map's slack per object. This index keeps only the 4-byte id per bucket (5 bytes with
//! hashbrown's control byte) and compares keys through the entry the id names, which the caller
//! reads for it (every method takes a `key_of` function giving the `(chunk hash, namespace)` of
//! an id's entry). Growth and shrinking rehash from the entries' keys, the same way: hashing a
//! 36-byte key is cheaper than the cache miss that storing a hash would save, and storing one
//! would more than double the table.
//!
//! The namespace id stands for the rest of the [`ObjectKey`](crate::key::ObjectKey) (see
//! `l1::namespace`): while an entry is indexed its namespace is live and its id is not reused, so
//! `(hash, ns)` identifies the key.
//!
//! Invariants (checked by `L1Manager::check_invariants`): an id is in the index at most once,
//! under the hash of its entry's key; no two ids in the index name entries with equal keys.
//! The owner (the L1 mutex) keeps the index and the entries in step: an entry's key never
//! changes while its id is indexed.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use super::eviction::EntryId;
use super::namespace::NsId;
use crate::hash::ChunkHash;

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct KeyIndex {
    table: HashTable<EntryId>,
    state: foldhash::fast::RandomState,
}

impl KeyIndex {
    fn hash(state: &foldhash::fast::RandomState, key: (&ChunkHash, NsId)) -> u64 {
        state.hash_one(key)
    }

    /// The id indexed under `key`; `key_of` gives the key of an indexed id's entry.
    pub(super) fn get(
        &self,
        key: (&ChunkHash, NsId),
        key_of: impl Fn(EntryId) -> Option<(ChunkHash, NsId)>,
    ) -> Option<EntryId> {
        let h = Self::hash(&self.state, key);
        self.table
            .find(h, |&id| {
                key_of(id).is_some_and(|(hash, ns)| ns == key.1 && hash == *key.0)
            })
            .copied()
    }

    /// Indexes `id` under `key` (the caller checked that `key` is not indexed).
    pub(super) fn insert(
        &mut self,
        key: (&ChunkHash, NsId),
        id: EntryId,
        key_of: impl Fn(EntryId) -> Option<(ChunkHash, NsId)>,
    ) {
        let state = &self.state;
        let h = Self::hash(state, key);
        self.table.insert_unique(h, id, |&other| {
            key_of(other).map_or(0, |(hash, ns)| Self::hash(state, (&hash, ns)))
        });
    }

    /// Removes `id`, indexed under `key`; whether it was there.
    pub(super) fn remove(&mut self, key: (&ChunkHash, NsId), id: EntryId) -> bool {
        let h = Self::hash(&self.state, key);
        match self.table.find_entry(h, |&eid| eid == id) {
            Ok(e) => {
                e.remove();
                true
            }
            Err(_) => false,
        }
    }

    /// Gives back the table's slack (after many removals).
    pub(super) fn shrink_to_fit(&mut self, key_of: impl Fn(EntryId) -> Option<(ChunkHash, NsId)>) {
        let state = &self.state;
        self.table
            .shrink_to_fit(|&id| key_of(id).map_or(0, |(hash, ns)| Self::hash(state, (&hash, ns))));
    }

    /// Indexed ids.
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }
}
