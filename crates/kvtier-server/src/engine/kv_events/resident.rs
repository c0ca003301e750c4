//! How many objects hold each announced chunk identity, `(medium, model, chunk hash)`, so that
//! `stored` is announced for the first and `removed` for the last (see the parent module).
//!
//! One such count exists per distinct cached chunk, so its size is per-object memory: a map
//! keyed by the identity itself (`(u8, Arc<str>, ChunkHash)` → `u32`) took 64 bytes per bucket,
//! ~130 MiB at 1M chunks. This table keys each count by a 64-bit fingerprint of the identity
//! instead: 12 bytes per bucket plus hashbrown's control byte (~26 MiB at 1M chunks; 2^21
//! buckets).
//!
//! **The trade.** Two identities with the same fingerprint share one count: the second one's
//! `stored` (and the first one's `removed`, until both are gone) is not announced. With `n`
//! identities cached the chance that any two collide is about n²/2^65 (3·10^-8 at 1M); the
//! fingerprint is keyed by a per-process random seed, so a client cannot aim for a collision.
//! The effect of one is a router's view being off for that chunk (a missed hit or a miss it
//! predicted as a hit), never an error on the request path.
//!
//! **Memory after a burst.** The table shrinks to twice its live count when the live count
//! drops below a quarter of its capacity, so a `clear` gives the memory back; a shrink is
//! O(live) and, like growth, happens at most once per halving of the table (amortised O(1) per
//! removal).
//!
//! No locking of its own: the owner holds the KV-event state's mutex.

use std::hash::BuildHasher;

use hashbrown::HashTable;
use kvtier_core::hash::ChunkHash;

/// One count, packed to 12 bytes (the fingerprint need not be 8-aligned).
#[derive(Debug, Clone, Copy)]
#[repr(C, packed(4))]
struct Count {
    fingerprint: u64,
    objects: u32,
}

/// Smallest capacity the table shrinks to.
const MIN_CAPACITY: usize = 1024;

/// See the module docs.
#[derive(Debug, Default)]
pub(super) struct ResidentCounts {
    table: HashTable<Count>,
    seed: foldhash::fast::RandomState,
}

impl ResidentCounts {
    fn fingerprint(&self, medium: u8, model: &str, chunk: &ChunkHash) -> u64 {
        self.seed.hash_one((medium, model, chunk))
    }

    /// One more object holds the identity; whether it is the first (announce `stored`).
    pub(super) fn add(&mut self, medium: u8, model: &str, chunk: &ChunkHash) -> bool {
        let fp = self.fingerprint(medium, model, chunk);
        match self.table.find_mut(fp, |c| c.fingerprint == fp) {
            Some(c) => {
                c.objects = c.objects.saturating_add(1);
                false
            }
            None => {
                let count = Count {
                    fingerprint: fp,
                    objects: 1,
                };
                self.table.insert_unique(fp, count, |c| c.fingerprint);
                true
            }
        }
    }

    /// One object holding the identity left; whether it was the last (announce `removed`).
    /// An identity never added answers `false`.
    pub(super) fn remove(&mut self, medium: u8, model: &str, chunk: &ChunkHash) -> bool {
        let fp = self.fingerprint(medium, model, chunk);
        let Ok(entry) = self.table.find_entry(fp, |c| c.fingerprint == fp) else {
            return false;
        };
        if entry.get().objects > 1 {
            let c = entry.into_mut();
            c.objects -= 1;
            return false;
        }
        entry.remove();
        let (len, cap) = (self.table.len(), self.table.capacity());
        if cap > MIN_CAPACITY && len < cap / 4 {
            self.table
                .shrink_to((len * 2).max(MIN_CAPACITY), |c| c.fingerprint);
        }
        true
    }

    /// Identities held.
    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    /// Buckets allocated (for tests of the shrink rule).
    #[cfg(test)]
    fn capacity(&self) -> usize {
        self.table.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(i: u32) -> ChunkHash {
        let mut b = [0u8; 32];
        b[..4].copy_from_slice(&i.to_le_bytes());
        ChunkHash::from_bytes(b)
    }

    #[test]
    fn first_add_and_last_remove_announce() {
        let mut r = ResidentCounts::default();
        assert!(r.add(0, "m", &chunk(1)));
        assert!(
            !r.add(0, "m", &chunk(1)),
            "a second rank holds the same chunk"
        );
        assert!(
            r.add(1, "m", &chunk(1)),
            "another medium is another identity"
        );
        assert!(
            r.add(0, "other", &chunk(1)),
            "another model is another identity"
        );
        assert_eq!(r.len(), 3);
        assert!(!r.remove(0, "m", &chunk(1)));
        assert!(r.remove(0, "m", &chunk(1)));
        assert!(!r.remove(0, "m", &chunk(1)), "never held: no announcement");
        assert!(!r.remove(0, "m", &chunk(2)));
        assert_eq!(r.len(), 2);
    }

    #[test]
    fn emptying_gives_the_buckets_back() {
        let mut r = ResidentCounts::default();
        for i in 0..100_000 {
            assert!(r.add(0, "m", &chunk(i)));
        }
        let full = r.capacity();
        assert!(full >= 100_000);
        for i in 0..100_000 {
            assert!(r.remove(0, "m", &chunk(i)));
        }
        assert_eq!(r.len(), 0);
        assert!(
            r.capacity() <= 2 * MIN_CAPACITY,
            "{} of {full} kept",
            r.capacity()
        );
    }
}
