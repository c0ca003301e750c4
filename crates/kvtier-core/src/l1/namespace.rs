//! The L1 namespace table: interns the part of an object key that many keys share.
//!
//! An [`ObjectKey`] is `(chunk_hash, model_name, kv_rank, object_group_id, cache_salt)`. Every
//! key of one model rank and tenant has the same last four fields, so an L1 entry stores its
//! 32-byte chunk hash and a 4-byte [`NsId`] naming a row of this table instead of the 72-byte key
//! (two `Arc<str>` fat pointers among it). The full key is rebuilt on demand ([`Namespaces::key`],
//! two `Arc` clones) for listeners and the rare callers that need it.
//!
//! Each row also records the tenant of its `cache_salt` (see `l1::tenants`): every entry of a
//! namespace is charged to that tenant, so the tenant lives at least as long as the row and the
//! entry need not store it.
//!
//! Invariants (checked by `L1Manager::check_invariants`):
//! - a live row's `refs` equals the number of L1 entries (every phase) that name it, and a row is
//!   freed the moment `refs` reaches 0 (its id goes to the free list for reuse);
//! - the lookup table holds every live row exactly once, under the hash of its fields, and no two
//!   live rows have equal fields;
//! - a live row's `tenant` is the live tenant of its salt.
//!
//! **Bound.** Live rows never outnumber L1 entries, and ids stay below [`MAX_NAMESPACES`]
//! (2^28; the entry packs its flags into the id's top 4 bits). At the bound
//! [`Namespaces::acquire`] answers `None` and the manager refuses the key with `OutOfMemory`;
//! reaching it takes 2^28 live objects with pairwise different namespaces. Memory per row is
//! about 60 bytes plus the strings, which a row shares with the keys that created it.
//!
//! Lookups cost one hash of the four fields, except that a lookup of the same namespace as the
//! previous one (the common case: a request's keys share it) is answered by pointer comparison.
//! No locking of its own: the owner holds the L1 lock.

use std::cell::Cell;
use std::hash::BuildHasher;
use std::sync::Arc;

use hashbrown::HashTable;

use super::eviction::TenantId;
use crate::hash::ChunkHash;
use crate::key::ObjectKey;

/// Index of a row of the namespace table.
pub(super) type NsId = u32;

/// Exclusive upper bound of namespace ids (see the module docs).
pub(super) const MAX_NAMESPACES: u32 = 1 << 28;

#[derive(Debug)]
struct Row {
    model_name: Arc<str>,
    cache_salt: Arc<str>,
    kv_rank: u32,
    object_group_id: u32,
    tenant: TenantId,
    /// Entries naming this row.
    refs: u32,
    /// Lookup hash of the fields (rehashing the table reads it instead of the strings).
    hash: u64,
    /// Process-stable hash of the fields, the seed of entry fingerprints.
    seed: u64,
}

impl Row {
    fn matches(&self, key: &ObjectKey) -> bool {
        self.kv_rank == key.kv_rank
            && self.object_group_id == key.object_group_id
            && *self.model_name == *key.model_name
            && *self.cache_salt == *key.cache_salt
    }

    /// Whether `key` carries this row's very strings (no string comparison needed).
    fn same_arcs(&self, key: &ObjectKey) -> bool {
        self.kv_rank == key.kv_rank
            && self.object_group_id == key.object_group_id
            && Arc::ptr_eq(&self.model_name, &key.model_name)
            && Arc::ptr_eq(&self.cache_salt, &key.cache_salt)
    }
}

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct Namespaces {
    rows: Vec<Option<Row>>,
    free: Vec<NsId>,
    lookup: HashTable<NsId>,
    state: foldhash::fast::RandomState,
    /// The row the last lookup found (a hint, validated before use).
    last: Cell<NsId>,
    live: usize,
}

fn seed_of(key: &ObjectKey) -> u64 {
    foldhash::fast::FixedState::with_seed(0x6b76_7469_6572_4e53).hash_one((
        &*key.model_name,
        key.kv_rank,
        key.object_group_id,
        &*key.cache_salt,
    ))
}

impl Namespaces {
    fn hash(&self, key: &ObjectKey) -> u64 {
        self.state.hash_one((
            &*key.model_name,
            key.kv_rank,
            key.object_group_id,
            &*key.cache_salt,
        ))
    }

    fn row(&self, ns: NsId) -> Option<&Row> {
        self.rows.get(ns as usize).and_then(Option::as_ref)
    }

    /// The live row holding `key`'s namespace, if any.
    pub(super) fn find(&self, key: &ObjectKey) -> Option<NsId> {
        let last = self.last.get();
        if self.row(last).is_some_and(|r| r.same_arcs(key)) {
            return Some(last);
        }
        let h = self.hash(key);
        let rows = &self.rows;
        let found = self
            .lookup
            .find(h, |&ns| {
                rows.get(ns as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|r| r.hash == h && r.matches(key))
            })
            .copied()?;
        self.last.set(found);
        Some(found)
    }

    /// Takes a reference on `key`'s namespace for a new entry charged to `tenant`, creating the
    /// row when needed; `None` at the bound ([`MAX_NAMESPACES`]).
    pub(super) fn acquire(&mut self, key: &ObjectKey, tenant: TenantId) -> Option<NsId> {
        if let Some(ns) = self.find(key) {
            if let Some(r) = self.rows.get_mut(ns as usize).and_then(Option::as_mut) {
                r.refs += 1;
            }
            return Some(ns);
        }
        let ns = match self.free.pop() {
            Some(ns) => ns,
            None if self.rows.len() < MAX_NAMESPACES as usize => {
                self.rows.push(None);
                (self.rows.len() - 1) as NsId
            }
            None => return None,
        };
        let hash = self.hash(key);
        self.rows[ns as usize] = Some(Row {
            model_name: Arc::clone(&key.model_name),
            cache_salt: Arc::clone(&key.cache_salt),
            kv_rank: key.kv_rank,
            object_group_id: key.object_group_id,
            tenant,
            refs: 1,
            hash,
            seed: seed_of(key),
        });
        let rows = &self.rows;
        self.lookup.insert_unique(hash, ns, |&id| {
            rows.get(id as usize)
                .and_then(Option::as_ref)
                .map_or(0, |r| r.hash)
        });
        self.live += 1;
        self.last.set(ns);
        Some(ns)
    }

    /// Drops an entry's reference; the row is freed with its last one.
    pub(super) fn release(&mut self, ns: NsId) {
        let Some(r) = self.rows.get_mut(ns as usize).and_then(Option::as_mut) else {
            return;
        };
        r.refs -= 1;
        if r.refs > 0 {
            return;
        }
        let hash = r.hash;
        self.rows[ns as usize] = None;
        if let Ok(e) = self.lookup.find_entry(hash, |&id| id == ns) {
            e.remove();
        }
        self.free.push(ns);
        self.live -= 1;
    }

    /// The tenant of a live row.
    pub(super) fn tenant(&self, ns: NsId) -> Option<TenantId> {
        self.row(ns).map(|r| r.tenant)
    }

    /// The fingerprint seed of a live row (0 if none).
    pub(super) fn seed(&self, ns: NsId) -> u64 {
        self.row(ns).map_or(0, |r| r.seed)
    }

    /// The full key of `hash` in namespace `ns` (two `Arc` clones).
    pub(super) fn key(&self, ns: NsId, hash: ChunkHash) -> Option<ObjectKey> {
        self.row(ns).map(|r| ObjectKey {
            chunk_hash: hash,
            model_name: Arc::clone(&r.model_name),
            kv_rank: r.kv_rank,
            object_group_id: r.object_group_id,
            cache_salt: Arc::clone(&r.cache_salt),
        })
    }

    /// Entries naming `ns` (0 if the row is free).
    pub(super) fn refs(&self, ns: NsId) -> u32 {
        self.row(ns).map_or(0, |r| r.refs)
    }

    /// Live rows.
    pub(super) fn len(&self) -> usize {
        self.live
    }

    /// Checks the lookup table against the rows: every live row is found under its fields.
    pub(super) fn check(&self) -> Result<(), String> {
        if self.lookup.len() != self.live {
            return Err(format!(
                "namespace lookup holds {} rows, {} live",
                self.lookup.len(),
                self.live
            ));
        }
        for (ns, r) in self.rows.iter().enumerate() {
            let Some(r) = r else { continue };
            let key = ObjectKey {
                chunk_hash: ChunkHash::from_bytes([0; 32]),
                model_name: Arc::clone(&r.model_name),
                kv_rank: r.kv_rank,
                object_group_id: r.object_group_id,
                cache_salt: Arc::clone(&r.cache_salt),
            };
            self.last.set(MAX_NAMESPACES);
            if self.find(&key) != Some(ns as NsId) {
                return Err(format!("namespace {ns} is not found under its fields"));
            }
        }
        Ok(())
    }

    /// Gives back the free tail of the rows and the slack of the tables (end of a `clear`).
    pub(super) fn shrink(&mut self) {
        while self.rows.last().is_some_and(Option::is_none) {
            self.rows.pop();
        }
        let len = self.rows.len();
        self.free.retain(|&ns| (ns as usize) < len);
        self.rows.shrink_to_fit();
        self.free.shrink_to_fit();
        let rows = &self.rows;
        self.lookup.shrink_to_fit(|&id| {
            rows.get(id as usize)
                .and_then(Option::as_ref)
                .map_or(0, |r| r.hash)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(model: &str, rank: u32, salt: &str) -> ObjectKey {
        ObjectKey {
            chunk_hash: ChunkHash::from_bytes([7; 32]),
            model_name: Arc::from(model),
            kv_rank: rank,
            object_group_id: 0,
            cache_salt: Arc::from(salt),
        }
    }

    #[test]
    fn rows_are_shared_counted_and_reused() {
        let mut ns = Namespaces::default();
        let a = ns.acquire(&key("m", 1, ""), 0).expect("row");
        assert_eq!(
            ns.acquire(&key("m", 1, ""), 0),
            Some(a),
            "equal strings share a row"
        );
        let b = ns.acquire(&key("m", 2, ""), 0).expect("row");
        assert_ne!(a, b);
        assert_eq!(ns.refs(a), 2);
        assert_eq!(ns.find(&key("m", 1, "x")), None);
        let k = ns.key(a, ChunkHash::from_bytes([7; 32])).expect("live");
        assert_eq!(k, key("m", 1, ""));
        ns.release(a);
        assert_eq!(ns.find(&key("m", 1, "")), Some(a));
        ns.release(a);
        assert_eq!(
            ns.find(&key("m", 1, "")),
            None,
            "freed with its last reference"
        );
        assert_eq!(ns.len(), 1);
        let c = ns.acquire(&key("n", 1, "s"), 3).expect("row");
        assert_eq!(c, a, "a freed id is reused");
        assert_eq!(ns.tenant(c), Some(3));
        ns.check().expect("consistent");
        ns.release(b);
        ns.release(c);
        ns.shrink();
        assert_eq!(ns.len(), 0);
        assert!(ns.rows.is_empty());
        ns.check().expect("consistent");
    }
}
