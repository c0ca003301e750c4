//! The L1 key index: object key → entry id, without a second copy of the key.
//!
//! A `HashMap<ObjectKey, EntryId>` would hold every key twice (its entry owns one): 72 bytes
//! plus the map's slack per object. This index keeps only `(hash, id)`, 16 bytes per slot, and
//! compares keys through the entry the id names, which the caller reads for it
//! ([`KeyIndex::get`] takes a `key_of` function). Growth rehashes from the stored hashes, so it
//! never needs the entries.
//!
//! Invariants (checked by `L1Manager::check_invariants`): an id is in the index at most once,
//! under the hash of its entry's key; no two ids in the index name entries with equal keys.
//! The owner (the L1 mutex) keeps the index and the entries in step: an entry's key never
//! changes while its id is indexed.

use std::hash::BuildHasher;

use hashbrown::HashTable;

use super::eviction::EntryId;
use crate::key::ObjectKey;

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct KeyIndex {
    table: HashTable<(u64, EntryId)>,
    state: foldhash::fast::RandomState,
}

impl KeyIndex {
    fn hash(&self, key: &ObjectKey) -> u64 {
        self.state.hash_one(key)
    }

    /// The id indexed under `key`; `key_of` gives the key of an indexed id's entry.
    pub(super) fn get<'a>(
        &self,
        key: &ObjectKey,
        key_of: impl Fn(EntryId) -> Option<&'a ObjectKey>,
    ) -> Option<EntryId> {
        let h = self.hash(key);
        self.table
            .find(h, |&(eh, id)| eh == h && key_of(id) == Some(key))
            .map(|&(_, id)| id)
    }

    /// Indexes `id` under `key` (the caller checked that `key` is not indexed).
    pub(super) fn insert(&mut self, key: &ObjectKey, id: EntryId) {
        let h = self.hash(key);
        self.table.insert_unique(h, (h, id), |&(eh, _)| eh);
    }

    /// Removes `id`, indexed under `key`; whether it was there.
    pub(super) fn remove(&mut self, key: &ObjectKey, id: EntryId) -> bool {
        let h = self.hash(key);
        match self.table.find_entry(h, |&(eh, eid)| eh == h && eid == id) {
            Ok(e) => {
                e.remove();
                true
            }
            Err(_) => false,
        }
    }

    /// Gives back the table's slack (after many removals).
    pub(super) fn shrink_to_fit(&mut self) {
        self.table.shrink_to_fit(|&(h, _)| h);
    }

    /// Indexed ids.
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }
}
