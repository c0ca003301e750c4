//! Ghost lists for ARC (B1, B2) and S3-FIFO (G): bounded FIFOs of key fingerprints, each a
//! small set-associative table of 32-bit slots (a 16-bit tag and a 16-bit time).
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
//! (empty, dead, or the bucket's oldest live entry) falls out; a take closes its gap. A
//! bucket's four tags are one 64-bit word of 16-bit lanes and its four times another
//! ([`Slots`]), so a push is two shifts, and a lookup compares all four tags at once (a
//! word-wide zero-lane test, no per-slot branches; a key that is not a ghost, the common
//! case, costs one compare per list). With `COUNT`, a per-quantum counter ring keeps the live
//! count exact (ARC needs it).
//! ARC's two lists share one table ([`GhostPair`]): bucket `i` of both lists sits in one
//! 32-byte block, so asking both lists about a key reads one cache line.
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
/// A 1 in every 16-bit lane of a bucket word.
const LANES: u64 = 0x0001_0001_0001_0001;
/// The top bit of every 16-bit lane.
const LANE_TOPS: u64 = 0x8000_8000_8000_8000;

/// Asks the CPU to start loading the cache line at `p` (a hint: it never faults and changes
/// nothing the program can observe). See [`GhostList::prefetch`].
#[inline(always)]
fn prefetch<T>(p: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `prefetcht0` only hints the cache; it never faults and reads nothing into the
    // program. SSE, which it belongs to, is part of the x86-64 baseline.
    unsafe {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        _mm_prefetch::<_MM_HINT_T0>(std::ptr::from_ref(p).cast::<i8>());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

/// The part of a key fingerprint a ghost list keeps: its low 32 bits (the policies store this
/// per object, half the size of the full fingerprint).
pub(crate) fn ghost_key(fingerprint: u64) -> u32 {
    fingerprint as u32
}

/// A ghost key's tag: its top 16 bits, never 0 (0 marks an empty slot). (The low bits choose
/// the bucket; tables of more than 2^16 buckets, i.e. `cap` above 131,072, reuse tag bits for
/// the bucket, so each further doubling halves the tag's discrimination.)
#[inline(always)]
fn tag(key: u32) -> u64 {
    u64::from((key >> 16).max(1))
}

/// One list's four slots in one bucket, as two words of four 16-bit lanes: lane `i` of `tags`
/// and of `times` is slot `i`, newest first (lane 0 is the low 16 bits). A push is a shift of
/// each word, and finding a tag is a word-wide compare of all four lanes, with no per-slot
/// branches.
#[derive(Debug, Clone, Copy, Default)]
struct Slots {
    tags: u64,
    times: u64,
}

impl Slots {
    /// A word with a lane's top bit set for each lane of `tags` equal to `t` (exact for the
    /// lowest such lane; lanes above a match may be flagged too), 0 when none is.
    #[inline(always)]
    fn matches(&self, t: u64) -> u64 {
        let x = self.tags ^ t.wrapping_mul(LANES);
        x.wrapping_sub(LANES) & !x & LANE_TOPS
    }
}

/// `x` without its lane `k`: the lanes above move down one, the top lane becomes 0.
#[inline(always)]
fn remove_lane(x: u64, k: u32) -> u64 {
    let below = (1u64 << (16 * k)) - 1;
    (x & below) | ((x >> 16) & !below)
}

/// One list's time window and live count: everything of a ghost list but its table. A list
/// keeps its buckets in a [`GhostList`] of its own or shares bucket indices with a second list
/// in a [`GhostPair`].
#[derive(Debug)]
struct Window<const COUNT: bool> {
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

impl<const COUNT: bool> Default for Window<COUNT> {
    fn default() -> Self {
        Self {
            next: 0,
            floor: 0,
            newest: 0,
            width: 0,
            live: 0,
            counts: None,
        }
    }
}

impl<const COUNT: bool> Window<COUNT> {
    /// Whether a slot (its tag, 0 when empty, and its push time) holds a live entry.
    #[inline(always)]
    fn is_live(&self, tag: u64, time: u32) -> bool {
        tag != 0 && self.newest.wrapping_sub(time) & TIME_MASK < self.width
    }

    /// Forgets `n` (0 or 1) live entries pushed at `time`.
    #[inline(always)]
    fn forget(&mut self, time: u32, n: u32) {
        if COUNT && let Some(counts) = &mut self.counts {
            let c = &mut counts[time as usize & (RING - 1)];
            *c = c.saturating_sub(n);
            self.live = self.live.saturating_sub(n as usize);
        }
    }

    /// Removes the newest copy of `fp` from bucket `b`; whether there was one.
    #[inline(always)]
    fn take(&mut self, b: &mut Slots, fp: u32) -> bool {
        let m = b.matches(tag(fp));
        if m == 0 {
            return false;
        }
        // Newest first, and an expired slot is never followed by a live one, so only the first
        // slot with the tag (the lowest flagged lane, which is exact) can be the answer.
        let k = m.trailing_zeros() / 16;
        let time = (b.times >> (16 * k)) as u32 & TIME_MASK;
        if !self.is_live(1, time) {
            return false;
        }
        // Close the gap so that the bucket stays in push order with its free slots last.
        b.tags = remove_lane(b.tags, k);
        b.times = remove_lane(b.times, k);
        self.forget(time, 1);
        true
    }

    /// Pushes `fp` into bucket `b` as the newest entry (times in quanta of `2^shift` pushes).
    #[inline(always)]
    fn push(&mut self, b: &mut Slots, fp: u32, bound: usize, shift: u32) {
        let q = self.next >> shift;
        let (out_tag, out_time) = (b.tags >> 48, (b.times >> 48) as u32);
        // A bucket is a tiny FIFO, newest first: the new entry goes in front (lane 0) and the
        // last slot (empty, expired, or the bucket's oldest live entry) falls out.
        b.tags = b.tags << 16 | tag(fp);
        b.times = b.times << 16 | (q & u64::from(TIME_MASK));
        if COUNT && self.is_live(out_tag, out_time) {
            self.forget(out_time, 1);
        }
        self.next += 1;
        let floor = self.floor.max(self.next.saturating_sub(bound as u64));
        let (from, to) = (self.floor >> shift, floor >> shift);
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

    /// Forgets every entry (the table is being rebuilt).
    fn reset(&mut self) {
        self.floor = self.next;
        self.width = 0;
        self.live = 0;
        if COUNT {
            self.counts = vec![0; RING].into_boxed_slice().try_into().ok();
        }
    }
}

/// Table geometry for `bound` entries per list: (`cap`, `shift`, bucket count).
fn geometry(bound: usize) -> (usize, u32, usize) {
    let cap = bound.max(MIN_CAP).next_power_of_two();
    let shift = cap
        .trailing_zeros()
        .saturating_sub(QUANTA_PER_CAP.trailing_zeros());
    (cap, shift, 2 * cap / WAYS)
}

/// One ghost list; see the module docs. With `COUNT` it also keeps its exact live count (S3-FIFO
/// does not need it and saves the counter ring).
#[derive(Debug)]
pub(crate) struct GhostList<const COUNT: bool> {
    table: Vec<Slots>,
    /// `table.len() − 1` (a power of two minus one).
    mask: usize,
    /// Entries the table is sized for (0 before the first push).
    cap: usize,
    shift: u32,
    w: Window<COUNT>,
}

impl<const COUNT: bool> Default for GhostList<COUNT> {
    fn default() -> Self {
        Self {
            table: Vec::new(),
            mask: 0,
            cap: 0,
            shift: 0,
            w: Window::default(),
        }
    }
}

impl GhostList<true> {
    /// Live entries.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.w.live
    }
}

impl<const COUNT: bool> GhostList<COUNT> {
    /// Starts loading the bucket a `take` or `push` of `fp` will read, so that a caller with
    /// several keys at hand overlaps their cache misses (a hint only).
    #[inline(always)]
    pub(crate) fn prefetch(&self, fp: u32) {
        if let Some(b) = self.table.get(fp as usize & self.mask) {
            prefetch(b);
        }
    }

    /// Removes the newest copy of `fp`; whether there was one.
    #[inline(always)]
    pub(crate) fn take(&mut self, fp: u32) -> bool {
        let i = fp as usize & self.mask;
        match self.table.get_mut(i) {
            Some(b) => self.w.take(b, fp),
            None => false,
        }
    }

    /// Remembers `fp` as the newest entry; the window is then at most `bound` pushes (see the
    /// module docs).
    #[inline(always)]
    pub(crate) fn push(&mut self, fp: u32, bound: usize) {
        let bound = bound.max(1);
        if bound > self.cap {
            self.rebuild(bound);
        }
        let i = fp as usize & self.mask;
        if let Some(b) = self.table.get_mut(i) {
            self.w.push(b, fp, bound, self.shift);
        }
    }

    /// Resizes the table for `bound` entries, forgetting every entry.
    #[cold]
    #[inline(never)]
    fn rebuild(&mut self, bound: usize) {
        let (cap, shift, buckets) = geometry(bound);
        (self.cap, self.shift, self.mask) = (cap, shift, buckets - 1);
        self.table = vec![Slots::default(); buckets];
        self.w.reset();
    }
}

/// Bucket `i` of both lists of a [`GhostPair`], in one 32-byte-aligned block (half a cache
/// line), so that looking a key up in both lists reads one line.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C, align(32))]
struct PairBucket([Slots; 2]);

/// Two counted ghost lists (ARC's B1 and B2) with the same geometry whose buckets for one key
/// share a cache line: [`take`](Self::take) asks both lists for a new key with one memory read
/// instead of two. Each list is exactly a [`GhostList<true>`] (its own window, its own four
/// slots per bucket; the lists never share slots), except that the table is sized for the
/// larger `bound` of the two, so a growth rebuild forgets both lists' entries (growth only
/// happens while L1 fills, see the module docs).
#[derive(Debug, Default)]
pub(crate) struct GhostPair {
    table: Vec<PairBucket>,
    mask: usize,
    cap: usize,
    shift: u32,
    w: [Window<true>; 2],
}

impl GhostPair {
    /// Live entries of list `l` (0 or 1).
    pub(crate) fn len(&self, l: usize) -> usize {
        self.w.get(l).map_or(0, |w| w.live)
    }

    /// Starts loading the bucket (both lists') a `take` or `push` of `fp` will read (a hint
    /// only, see [`GhostList::prefetch`]).
    #[inline(always)]
    pub(crate) fn prefetch(&self, fp: u32) {
        if let Some(b) = self.table.get(fp as usize & self.mask) {
            prefetch(b);
        }
    }

    /// Takes the newest copy of `fp` from list 0, else from list 1; which list held it.
    #[inline(always)]
    pub(crate) fn take(&mut self, fp: u32) -> Option<usize> {
        let i = fp as usize & self.mask;
        let b = self.table.get_mut(i)?;
        let [b0, b1] = &mut b.0;
        let [w0, w1] = &mut self.w;
        if w0.take(b0, fp) {
            Some(0)
        } else if w1.take(b1, fp) {
            Some(1)
        } else {
            None
        }
    }

    /// Remembers `fp` as the newest entry of list `l` (0 or 1), whose window is then at most
    /// `bound` pushes.
    #[inline(always)]
    pub(crate) fn push(&mut self, l: usize, fp: u32, bound: usize) {
        let bound = bound.max(1);
        if bound > self.cap {
            self.rebuild(bound);
        }
        let i = fp as usize & self.mask;
        if let (Some(b), Some(w)) = (self.table.get_mut(i), self.w.get_mut(l))
            && let Some(b) = b.0.get_mut(l)
        {
            w.push(b, fp, bound, self.shift);
        }
    }

    #[cold]
    #[inline(never)]
    fn rebuild(&mut self, bound: usize) {
        let (cap, shift, buckets) = geometry(bound);
        (self.cap, self.shift, self.mask) = (cap, shift, buckets - 1);
        self.table = vec![PairBucket::default(); buckets];
        for w in &mut self.w {
            w.reset();
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
    fn lane_compare_and_removal_match_a_per_slot_loop() {
        let lanes = |x: u64| [0, 1, 2, 3].map(|i| (x >> (16 * i)) as u16);
        let mut x = 3u64;
        for _ in 0..100_000 {
            x = mix64(x);
            // Few distinct tag values (some 0, some with the top bit set), so that lanes
            // repeat and match often.
            let tags = lanes(x).map(|l| [0, 1, 0x7fff, 0x8000, 0xffff, l][l as usize % 6]);
            let word = tags.iter().rev().fold(0u64, |w, &l| w << 16 | u64::from(l));
            let t = u64::from(tags[(x >> 62) as usize]).max(1);
            let slots = Slots {
                tags: word,
                times: 0,
            };
            let m = slots.matches(t);
            let first = tags.iter().position(|&l| u64::from(l) == t);
            assert_eq!(m != 0, first.is_some(), "{word:#x} {t:#x}");
            if let Some(k) = first {
                assert_eq!((m.trailing_zeros() / 16) as usize, k, "{word:#x} {t:#x}");
                let mut rest = tags.to_vec();
                rest.remove(k);
                rest.push(0);
                assert_eq!(lanes(remove_lane(word, k as u32)).to_vec(), rest);
            }
        }
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
    fn a_pair_is_two_exact_lists() {
        // As ARC uses it: a new key is taken from list 0, else from list 1; an evicted key is
        // pushed to one of them. Same key set as above (no bucket ever fills).
        let mut g = GhostPair::default();
        let mut n = [Naive::default(), Naive::default()];
        let mut x = 11u64;
        for step in 0..200_000u64 {
            x = mix64(x);
            let k = x % 32;
            let key = (mix(k) & !31) | k as u32;
            let list = (x >> 20) as usize % 2;
            let bound = 1 + (step / 1000 % 24) as usize;
            let naive = if n[0].take(key) {
                Some(0)
            } else if n[1].take(key) {
                Some(1)
            } else {
                None
            };
            assert_eq!(g.take(key), naive, "step {step}");
            if x >> 40 & 1 == 0 {
                g.push(list, key, bound);
                n[list].push(key, bound);
            }
            assert_eq!(
                (g.len(0), g.len(1)),
                (n[0].q.len(), n[1].q.len()),
                "step {step}"
            );
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
