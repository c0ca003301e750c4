//! The L1 key index: `(chunk hash, namespace)` → entry id, holding nothing but the id.
//!
//! A `HashMap<ObjectKey, EntryId>` would hold every key twice (its entry has one): 72 bytes plus
//! the map's slack per object. This index keeps only the 4-byte id per bucket (5 bytes with
//! hashbrown's control byte) and compares keys through the entry the id names, which the caller
//! reads for it (every method takes a `key_of` function giving the `(chunk hash, namespace)` of
//! an id's entry). Storing each key's hash would more than double the table, so a rebuild needs
//! every indexed id's hash from somewhere. hashbrown's rebuild (growth, or a rehash in place
//! once removals have left too many tombstones) asks for them in the table's order, and
//! reading each id's entry then is one random access per object (110–130 ms at 917,504
//! objects, under the L1 lock). So the owner rebuilds first, before an insert that would
//! trigger it ([`full`](KeyIndex::full)), handing [`make_room`](KeyIndex::make_room) the hashes
//! of all its entries computed in memory order: a sequential pass into a temporary `u64` per
//! slot. (Building a new table by inserting the entries in slot order was slower: its random
//! inserts overlap less than hashbrown's own rebuild loop.) Shrinking (after a `clear`, few
//! entries left) still rehashes from the entries.

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

    /// Whether the next [`insert`](Self::insert) would rebuild the table (hashbrown then
    /// rehashes every id, into a larger table or, when removals left tombstones, in place).
    pub(super) fn full(&self) -> bool {
        self.table.len() >= self.table.capacity()
    }

    /// The hash `key` is indexed under (what [`make_room`](Self::make_room) wants per id).
    pub(super) fn hash_of(&self, key: (&ChunkHash, NsId)) -> u64 {
        Self::hash(&self.state, key)
    }

    /// Rebuilds the table now, with room for at least one more id, taking each indexed id's
    /// hash from `hashes[id]` instead of from its entry (see the module docs).
    pub(super) fn make_room(&mut self, hashes: &[u64]) {
        self.table
            .reserve(1, |&id| hashes.get(id as usize).copied().unwrap_or(0));
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
