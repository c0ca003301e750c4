//! Ghost lists for ARC (B1, B2) and S3-FIFO (G): bounded FIFOs of key fingerprints, each a
//! small set-associative table of 32-bit slots.
//!
//! **What a ghost list holds** (the contract the reference model in `tests/l1_model.rs` spells
//! out): the keys pushed by the list's last `bound` pushes, minus those taken since. `bound` is
//! given at each push (the policies pass the resident object count) and the window never widens
//! again: a push moves the list's *floor* to `max(floor, pushes − bound)` and everything pushed
//! before the floor is forgotten. A take removes the newest copy of a key. The policies only
//! push a key that is absent (a key is taken whenever its object becomes ready again, before it
//! can be evicted again), so there are no copies in practice. This is the ghost queue of the
//! S3-FIFO paper (fingerprints kept with their insertion time, entries older than the queue
//! size are dead); unlike a count-bounded FIFO, a taken entry does not let an older one live
//! longer.
//!
//! **Layout.** Hand-written rather than a general hash map (hashbrown, std) because what makes
//! it cheap is what those cannot do: expiry costs nothing (an entry whose time is outside the
//! window is dead where it lies), there are no tombstones, no rehashing and no allocation after
//! the first push, and a take or push reads and writes one 16-byte bucket. A key (the low 32
//! bits of the object's fingerprint, see [`ghost_key`]) lives in bucket `key & mask` of
//! `2 × cap` slots, four per bucket; a slot holds a 16-bit tag (the key's top bits, never 0, so
//! 0 means empty) and the low 16 bits of the push time in *quanta* of `2^shift` pushes. A
//! bucket is a tiny FIFO, newest first: a push shifts the new entry in front and the last slot
//! (empty, dead, or the bucket's oldest live entry) falls out; a take closes its gap. With
//! `COUNT`, a per-quantum counter ring keeps the live count exact (ARC needs it).
//!
//! **Approximations** (each makes a policy treat an object as new where the exact list would
//! call it a ghost, or the reverse):
//! - *False positive*: another live key of the same bucket with the same 16-bit tag: at most
//!   `4 / 2^16 ≈ 0.006 %` of lookups of an absent key. Tables of more than 2^16 buckets (`cap`
//!   above 131,072 entries) take bucket bits from the tag, doubling that per doubling.
//! - *Full bucket*: a push into a bucket whose four slots are live forgets its oldest entry
//!   early. The table is at most half full (`bound ≤ cap`); at that worst load about 4 % of the
//!   entries go early, mostly in the oldest tenth of their window (12 % of those); at 3/4 of
//!   `cap` about 1.5 %. See docs/performance.md for the effect on hit rates.
//! - *Quanta*: once `cap` exceeds 1,024 entries a push time is kept in quanta of `cap / 1024`
//!   pushes and the floor moves a whole quantum at a time, so a list can hold up to one quantum
//!   (≤ 0.1 % of `cap`) more than `bound` entries.
//! - *Time wrap-around*: a 16-bit time looks live again after 65,536 quanta (at least 64
//!   windows of `cap` pushes). A dead entry falls out of its bucket after four more pushes into
//!   it; a bucket receives one every `cap / 2` pushes on average, so a dead entry lasting 63
//!   windows is a Poisson(126) < 4 event (below e^-100), and even then only a tag match would
//!   see it.
//! - *Growth*: the table is sized for the largest `bound` seen (`cap`, a power of two, at least
//!   64). A push with a larger `bound` rebuilds it and forgets every ghost, because the slots do
//!   not keep enough key bits to rehash. The resident count only exceeds its previous maximum
//!   while L1 fills, before anything is evicted, so in practice nothing is lost; each growth at
//!   least doubles `cap`, so it is amortised O(1).
//!
//! With `cap ≤ 1024` (every model test) and no bucket holding more than four live keys, a list is
//! exact up to tag collisions, which for a fixed key set are fixed.

/// Slots per bucket.
const WAYS: usize = 4;
/// Quanta per counter ring; a window spans at most `cap >> shift` + 1 ≤ 1,025 quanta.
const RING: usize = 2048;
/// Quanta per window when `cap` is large (`shift` = log2(cap) − log2(QUANTA_PER_CAP)).
const QUANTA_PER_CAP: usize = 1024;
/// The smallest table, in entries.
const MIN_CAP: usize = 64;
const TIME_MASK: u32 = 0xffff;
const TAG_MASK: u32 = !TIME_MASK;

/// The part of a key fingerprint a ghost list keeps: its low 32 bits (the policies store this
/// per object, half the size of the full fingerprint).
pub(crate) fn ghost_key(fingerprint: u64) -> u32 {
    fingerprint as u32
}

/// A ghost key's tag, in slot position: its top 16 bits, never 0. (The low bits choose the
/// bucket; tables of more than 2^16 buckets, i.e. `cap` above 131,072, reuse tag bits for the
/// bucket, so each further doubling halves the tag's discrimination.)
fn tag(key: u32) -> u32 {
    (key >> 16).max(1) << 16
}

/// One ghost list; see the module docs. With `COUNT` it also keeps its exact live count (ARC
/// needs it; S3-FIFO does not and saves the counter ring).
#[derive(Debug)]
pub(crate) struct GhostList<const COUNT: bool> {
    table: Vec<[u32; WAYS]>,
    /// `table.len() − 1` (a power of two minus one).
    mask: usize,
    /// Entries the table is sized for (0 before the first push).
    cap: usize,
    shift: u32,
    /// Push time of the next push.
    next: u64,
    /// Pushes before this time have expired (in whole quanta).
    floor: u64,
    /// Low 16 bits of the newest quantum (`(next − 1) >> shift`).
    newest: u32,
    /// Live quanta: `newest − (floor >> shift) + 1`, 0 when the window is empty.
    width: u32,
    /// Live entries (`COUNT` only).
    live: usize,
    /// Live entries per quantum, a ring indexed by `quantum % RING` (`COUNT` only).
    counts: Option<Box<[u32; RING]>>,
}

impl<const COUNT: bool> Default for GhostList<COUNT> {
    fn default() -> Self {
        Self {
            table: Vec::new(),
            mask: 0,
            cap: 0,
            shift: 0,
            next: 0,
            floor: 0,
            newest: 0,
            width: 0,
            live: 0,
            counts: None,
        }
    }
}

impl GhostList<true> {
    /// Live entries.
    pub(crate) fn len(&self) -> usize {
        self.live
    }
}

impl<const COUNT: bool> GhostList<COUNT> {
    /// Whether a slot (non-empty or not) holds a live entry.
    #[inline(always)]
    fn is_live(&self, slot: u32) -> bool {
        slot & TAG_MASK != 0 && self.newest.wrapping_sub(slot) & TIME_MASK < self.width
    }

    /// Forgets `n` (0 or 1) live entries whose slot is `slot`.
    #[inline(always)]
    fn forget(&mut self, slot: u32, n: u32) {
        if COUNT && let Some(counts) = &mut self.counts {
            let c = &mut counts[slot as usize & (RING - 1)];
            *c = c.saturating_sub(n);
            self.live = self.live.saturating_sub(n as usize);
        }
    }

    /// Removes the newest copy of `fp`; whether there was one.
    #[inline(always)]
    pub(crate) fn take(&mut self, fp: u32) -> bool {
        if self.width == 0 {
            return false;
        }
        let t = tag(fp);
        let i = fp as usize & self.mask;
        let Some(&b) = self.table.get(i) else {
            return false;
        };
        // Newest first, and an expired slot is never followed by a live one, so only the first
        // slot with the tag can be the answer.
        let Some(k) = b.iter().position(|&s| s & TAG_MASK == t) else {
            return false;
        };
        if !self.is_live(b[k]) {
            return false;
        }
        // Close the gap so that the bucket stays in push order with its free slots last.
        let mut rest = [0; WAYS];
        rest[..WAYS - 1].copy_from_slice(&b[1..]);
        let mut nb = b;
        nb[k..].copy_from_slice(&rest[k..]);
        self.table[i] = nb;
        self.forget(b[k], 1);
        true
    }

    /// Remembers `fp` as the newest entry; the window is then at most `bound` pushes (see the
    /// module docs).
    #[inline(always)]
    pub(crate) fn push(&mut self, fp: u32, bound: usize) {
        let bound = bound.max(1);
        if bound > self.cap {
            self.rebuild(bound);
        }
        let q = self.next >> self.shift;
        let i = fp as usize & self.mask;
        let Some(&[s0, s1, s2, out]) = self.table.get(i) else {
            return;
        };
        // A bucket is a tiny FIFO, newest first: the new entry goes in front and the last slot
        // (empty, expired, or the bucket's oldest live entry) falls out.
        self.table[i] = [tag(fp) | (q as u32 & TIME_MASK), s0, s1, s2];
        if COUNT && self.is_live(out) {
            self.forget(out, 1);
        }
        self.next += 1;
        let floor = self.floor.max(self.next.saturating_sub(bound as u64));
        let (from, to) = (self.floor >> self.shift, floor >> self.shift);
        if COUNT && let Some(counts) = &mut self.counts {
            // Expire every quantum that falls wholly before the new floor (at most one ring's
            // worth: a window spans fewer quanta than the ring), then count the new entry.
            for old in from..to.min(from + RING as u64) {
                let c = std::mem::take(&mut counts[old as usize & (RING - 1)]);
                self.live = self.live.saturating_sub(c as usize);
            }
            counts[q as usize & (RING - 1)] += 1;
            self.live += 1;
        }
        self.floor = floor;
        self.newest = q as u32 & TIME_MASK;
        self.width = (q - to) as u32 + 1;
    }

    /// Resizes the table for `bound` entries, forgetting every entry.
    #[cold]
    #[inline(never)]
    fn rebuild(&mut self, bound: usize) {
        let cap = bound.max(MIN_CAP).next_power_of_two();
        self.cap = cap;
        self.shift = cap
            .trailing_zeros()
            .saturating_sub(QUANTA_PER_CAP.trailing_zeros());
        let buckets = 2 * cap / WAYS;
        self.table = vec![[0; WAYS]; buckets];
        self.mask = buckets - 1;
        self.floor = self.next;
        self.width = 0;
        self.live = 0;
        if COUNT {
            self.counts = vec![0; RING].into_boxed_slice().try_into().ok();
        }
    }
}

#[cfg(test)]
mod tests {
    // The naive lists keep whole keys.
    use super::*;
    use std::collections::VecDeque;

    /// The contract, written naively.
    #[derive(Default)]
    struct Naive {
        q: VecDeque<(u32, u64)>,
        next: u64,
        floor: u64,
    }

    impl Naive {
        fn push(&mut self, fp: u32, bound: usize) {
            self.q.push_back((fp, self.next));
            self.next += 1;
            self.floor = self
                .floor
                .max(self.next.saturating_sub(bound.max(1) as u64));
            let floor = self.floor;
            self.q.retain(|&(_, t)| t >= floor);
        }
        fn take(&mut self, fp: u32) -> bool {
            let newest = self.q.iter().rposition(|&(f, _)| f == fp);
            newest.and_then(|i| self.q.remove(i)).is_some()
        }
    }

    fn mix(x: u64) -> u32 {
        mix64(x) as u32
    }

    fn mix64(x: u64) -> u64 {
        let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    #[test]
    fn small_lists_match_the_contract_exactly() {
        // 32 keys, one per bucket of the smallest table (so no bucket ever fills), with random
        // tags; bounds up to 24 entries. Like the policies, a key is pushed only when absent
        // (taken first).
        let mut g = [GhostList::<true>::default(), GhostList::default()];
        let mut n = [Naive::default(), Naive::default()];
        let mut x = 7u64;
        for step in 0..200_000u64 {
            x = mix64(x);
            let k = x % 32;
            let key = (mix(k) & !31) | k as u32;
            let list = (x >> 20) as usize % 2;
            let bound = 1 + (step / 1000 % 24) as usize;
            if x >> 40 & 1 == 0 {
                assert_eq!(g[list].take(key), n[list].take(key), "step {step}");
                g[list].push(key, bound);
                n[list].push(key, bound);
            } else {
                assert_eq!(g[list].take(key), n[list].take(key), "step {step}");
            }
            assert_eq!(g[list].len(), n[list].q.len(), "step {step}");
        }
    }

    #[test]
    fn large_lists_stay_close_to_the_contract() {
        // A 10k-entry window (quanta of 16 pushes) over 100k distinct keys, then look each
        // recent key up.
        let mut g = GhostList::<true>::default();
        let bound = 10_000;
        let total = 100_000u64;
        for i in 0..total {
            g.push(mix(i), bound);
        }
        let len = g.len();
        // Full buckets (about 1 % here, at 30 % load) cost a little of the window.
        assert!(len > bound * 98 / 100 && len < bound + 16, "{len}");
        let mut found = 0;
        for i in total - bound as u64..total {
            found += usize::from(g.take(mix(i)));
        }
        assert_eq!(found, len, "every live entry is found");
        // Absent keys: false positives stay rare.
        let mut fp = 0;
        for i in 0..total {
            g.push(mix(total + i), bound);
            fp += usize::from(g.take(mix(u64::MAX - i)));
        }
        assert!(fp < 20, "{fp} false positives");
        // Old keys are gone, also after the 16-bit time field wrapped around (65,536 quanta
        // of 16 pushes).
        for i in 0..1_100_000 {
            g.push(mix(2 * total + i), bound);
        }
        let stale = (0..total).filter(|&i| g.take(mix(i))).count();
        assert!(stale < 20, "{stale} stale hits");
    }
}
