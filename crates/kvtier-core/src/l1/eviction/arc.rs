//! ARC (Megiddo & Modha, FAST '03) over L1 objects: recency (T1) and frequency (T2) lists,
//! ghost lists B1/B2 sharing one table (`l1::ghost::GhostPair`), and the adaptive target `p`.

use super::*;
use crate::l1::ghost::{GhostPair, ghost_key};
use crate::l1::list::Lists;

const T1: u32 = 0;

const T2: u32 = 1;

/// ARC (Megiddo & Modha, FAST '03) over objects: T1 holds objects seen once, T2 objects seen
/// again; B1/B2 remember what was evicted from each. A new object whose key is in B1 grows the
/// recency target `p`, one in B2 shrinks it, and it enters T2; otherwise it enters T1. Victims
/// come from T1 while its (remaining) length exceeds `p`, else from T2, each in LRU order.
/// Ghost lists are each bounded by the resident object count.
#[derive(Debug)]
pub struct ArcPolicy {
    lists: Lists,
    /// One bit per id: it is in T2 (the lists do not record which list an id is in).
    in_t2: Vec<u64>,
    /// B1 (list 0) and B2 (list 1), whose buckets for one key share a cache line.
    ghosts: GhostPair,
    p: usize,
}

impl Default for ArcPolicy {
    fn default() -> Self {
        Self {
            lists: Lists::new(2),
            in_t2: Vec::new(),
            ghosts: GhostPair::default(),
            p: 0,
        }
    }
}

impl ArcPolicy {
    /// The current recency target in objects (tests, status).
    pub fn target(&self) -> usize {
        self.p
    }

    fn resident(&self) -> usize {
        self.lists.len(T1) + self.lists.len(T2)
    }

    /// The list a linked `id` is in.
    fn list_of(&self, id: EntryId) -> u32 {
        let bit = self
            .in_t2
            .get(id as usize / 64)
            .is_some_and(|w| w & (1 << (id % 64)) != 0);
        if bit { T2 } else { T1 }
    }

    fn set_list(&mut self, id: EntryId, list: u32) {
        let word = id as usize / 64;
        if list == T2 {
            if word >= self.in_t2.len() {
                grow(&mut self.in_t2, word);
            }
            if let Some(w) = self.in_t2.get_mut(word) {
                *w |= 1 << (id % 64);
            }
        } else if let Some(w) = self.in_t2.get_mut(word) {
            *w &= !(1 << (id % 64));
        }
    }
}

impl EvictionPolicy for ArcPolicy {
    fn shrink(&mut self, ids: usize) {
        self.lists.shrink(ids);
        self.in_t2.truncate(ids.div_ceil(64));
        self.in_t2.shrink_to_fit();
    }

    fn name(&self) -> &'static str {
        "ARC"
    }

    fn on_ready(&mut self, id: EntryId, meta: EntryMeta) {
        let fp = ghost_key(meta.fingerprint);
        // The ghost lengths in the `p` updates are those before the hit was taken out.
        let list = match self.ghosts.take(fp) {
            Some(0) => {
                let (l1, l2) = (self.ghosts.len(0) + 1, self.ghosts.len(1).max(1));
                self.p = (self.p + (l2 / l1).max(1)).min(self.resident() + 1);
                T2
            }
            Some(_) => {
                let (l1, l2) = (self.ghosts.len(0).max(1), self.ghosts.len(1) + 1);
                self.p = self.p.saturating_sub((l1 / l2).max(1));
                T2
            }
            None => T1,
        };
        self.lists.push_back(list, id);
        // An unlinked id's bit is clear (`on_remove` clears it), so only T2 sets it.
        if list == T2 {
            self.set_list(id, T2);
        }
    }

    fn prefetch(&self, fingerprint: u64) {
        self.ghosts.prefetch(ghost_key(fingerprint));
    }

    fn uses_fingerprints(&self) -> bool {
        true
    }

    fn on_access(&mut self, id: EntryId, _tenant: TenantId) {
        if self.list_of(id) == T2 {
            self.lists.touch(T2, id);
        } else if self.lists.unlink(T1, id) {
            self.lists.push_back(T2, id);
            self.set_list(id, T2);
        }
    }

    fn on_remove(&mut self, id: EntryId, meta: EntryMeta, why: Removal) {
        let list = self.list_of(id);
        if !self.lists.unlink(list, id) {
            return;
        }
        if list == T2 {
            self.set_list(id, T1);
        }
        if why == Removal::Evicted {
            let fp = ghost_key(meta.fingerprint);
            let bound = self.resident();
            self.ghosts.push(usize::from(list != T1), fp, bound);
        }
    }

    fn select(&mut self, _tenants: &[TenantId], visit: &mut dyn FnMut(EntryId) -> Verdict) {
        // T1 while its remaining length exceeds `p` (or T2 is empty); then T2, whose walk does
        // not change T1's length; then the rest of T1.
        let mut t1_left = self.lists.len(T1);
        let mut c1 = self.lists.head(T1);
        let t2_empty = self.lists.head(T2).is_none();
        while let Some(id) = c1 {
            if t1_left <= self.p && !t2_empty {
                break;
            }
            c1 = self.lists.next(id);
            match visit(id) {
                Verdict::Stop => return,
                Verdict::Evict => t1_left -= 1,
                Verdict::Skip => {}
            }
        }
        if walk(&self.lists, T2, visit) {
            while let Some(id) = c1 {
                c1 = self.lists.next(id);
                if visit(id) == Verdict::Stop {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{evict, meta, order};
    use super::*;

    #[test]
    fn arc_protects_reused_objects_from_a_scan() {
        let mut p = ArcPolicy::default();
        for id in 0..4 {
            p.on_ready(id, meta(id));
            p.on_access(id, meta(id).tenant); // hot: moves to T2
        }
        for id in 10..20 {
            p.on_ready(id, meta(id)); // scan: T1
        }
        assert_eq!(evict(&mut p, 10), (10..20).collect::<Vec<_>>());
        // A ghost hit in B1 (bounded by the 4 resident objects: 16..=19 remain) enlarges the
        // recency target and lands in T2.
        p.on_ready(30, meta(19));
        assert_eq!(p.target(), 1);
        assert_eq!(order(&mut p, &[]), vec![0, 1, 2, 3, 30]);
    }
}
