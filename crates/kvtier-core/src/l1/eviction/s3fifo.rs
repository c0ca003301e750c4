//! S3-FIFO (Yang et al., SOSP '23) over L1 objects: a small probationary FIFO (a linked list),
//! a main FIFO with reinsertion (a ring of ids, `l1::ring`) and a ghost FIFO of fingerprints.

use super::*;
use crate::l1::ghost::{GhostList, ghost_key};
use crate::l1::list::Lists;
use crate::l1::ring::MainRing;

const SMALL: u32 = 0;

/// Highest frequency S3-FIFO counts (2 bits).
const MAX_FREQ: u8 = 3;

/// Flag in an object's frequency byte: it is in SMALL or MAIN (so `on_access` need not look at
/// the queues).
const LINKED: u8 = 0x80;

/// Flag in an object's frequency byte: it is in MAIN.
const IN_MAIN: u8 = 0x40;

/// S3-FIFO (Yang et al., SOSP '23): new objects enter a small FIFO (about 10 % of the resident
/// objects); an object read at least twice while there (one engine read = lock + release = two
/// accesses) moves to the main FIFO when it reaches the head, others are evicted and remembered
/// in a ghost FIFO; a new object whose key is a ghost enters main directly. Main is a FIFO with
/// reinsertion: a head with frequency > 0 is reinserted with frequency − 1. One-off scans
/// therefore pass through the small queue without touching main.
///
/// The small queue is a linked list (`l1::list`); main, where `select` walks, is a ring of ids
/// (`l1::ring`, same order, no pointer chasing).
#[derive(Debug)]
pub struct S3FifoPolicy {
    /// The small queue (list [`SMALL`]).
    lists: Lists,
    main: MainRing,
    /// Per id: the frequency (low 2 bits), [`LINKED`] and [`IN_MAIN`].
    freq: Vec<u8>,
    ghost: GhostList<false>,
}

impl Default for S3FifoPolicy {
    fn default() -> Self {
        Self {
            lists: Lists::new(1),
            main: MainRing::default(),
            freq: Vec::new(),
            ghost: GhostList::default(),
        }
    }
}

impl S3FifoPolicy {
    fn resident(&self) -> usize {
        self.lists.len(SMALL) + self.main.len()
    }

    /// Whether `id` is in the main queue (tests).
    #[cfg(test)]
    fn in_main(&self, id: EntryId) -> bool {
        self.freq.get(id as usize).is_some_and(|f| f & IN_MAIN != 0)
    }
}

impl EvictionPolicy for S3FifoPolicy {
    fn shrink(&mut self, ids: usize) {
        self.lists.shrink(ids);
        self.main.shrink(ids);
        self.freq.truncate(ids);
        self.freq.shrink_to_fit();
    }

    fn name(&self) -> &'static str {
        "S3FIFO"
    }

    fn on_ready(&mut self, id: EntryId, meta: EntryMeta) {
        let fp = ghost_key(meta.fingerprint);
        if self.ghost.take(fp) {
            set_grow(&mut self.freq, id, LINKED | IN_MAIN);
            self.main.push(id, &mut 0);
        } else {
            set_grow(&mut self.freq, id, LINKED);
            self.lists.push_back(SMALL, id);
        }
    }

    fn prefetch(&self, fingerprint: u64) {
        self.ghost.prefetch(ghost_key(fingerprint));
    }

    fn uses_fingerprints(&self) -> bool {
        true
    }

    fn on_access(&mut self, id: EntryId, _tenant: TenantId) {
        if let Some(f) = self.freq.get_mut(id as usize)
            && *f & LINKED != 0
        {
            *f += u8::from(*f & MAX_FREQ != MAX_FREQ);
        }
    }

    fn on_remove(&mut self, id: EntryId, meta: EntryMeta, why: Removal) {
        let Some(f) = self.freq.get_mut(id as usize) else {
            return;
        };
        let was = std::mem::take(f);
        if was & IN_MAIN != 0 {
            self.main.remove(id);
        } else if self.lists.unlink(SMALL, id) && why == Removal::Evicted {
            self.ghost
                .push(ghost_key(meta.fingerprint), self.resident());
        }
    }

    fn select(&mut self, _tenants: &[TenantId], visit: &mut dyn FnMut(EntryId) -> Verdict) {
        let resident = self.resident();
        let small_target = resident / 10;
        let mut small_left = self.lists.len(SMALL);
        let mut cs = self.lists.head(SMALL);
        let mut cm = self.main.start();
        let mut budget = 4 * resident + 8;
        while budget > 0 {
            budget -= 1;
            let main_head = self.main.peek(&mut cm);
            let from_small = match (cs, main_head) {
                (None, None) => return,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (Some(_), Some(_)) => small_left > small_target,
            };
            if from_small {
                let Some(id) = cs else { return };
                cs = self.lists.next(id);
                if let Some(f) = self.freq.get_mut(id as usize)
                    && *f & MAX_FREQ > 1
                {
                    *f = LINKED | IN_MAIN;
                    self.lists.unlink(SMALL, id);
                    self.main.push(id, &mut cm);
                    small_left -= 1;
                    continue;
                }
                match visit(id) {
                    Verdict::Stop => return,
                    Verdict::Evict => small_left -= 1,
                    Verdict::Skip => {}
                }
            } else {
                let Some(id) = main_head else { return };
                if let Some(f) = self.freq.get_mut(id as usize)
                    && *f & MAX_FREQ > 0
                {
                    *f -= 1;
                    // To the tail; when `id` was the tail it is the tail again and is looked
                    // at once more.
                    self.main.reinsert(&mut cm);
                    continue;
                }
                cm += 1;
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
    fn s3fifo_promotes_reused_and_remembers_ghosts() {
        let mut p = S3FifoPolicy::default();
        for id in 0..10 {
            p.on_ready(id, meta(id));
        }
        // Objects 0 and 1 are read (lock + release).
        for id in [0, 1, 0, 1] {
            p.on_access(id, meta(id).tenant);
        }
        // The small queue's head is promoted (freq 2), the rest are evicted.
        assert_eq!(evict(&mut p, 3), vec![2, 3, 4]);
        assert_eq!(order(&mut p, &[]), vec![5, 6, 7, 8, 9, 0, 1]);
        // A ghost comes back into main.
        p.on_ready(20, meta(2));
        assert!(p.in_main(20));
        assert!(!p.in_main(9));
        assert!(p.lists.is_linked(9) && !p.in_main(9));
    }
}
