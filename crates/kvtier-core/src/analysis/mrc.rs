//! [`Shards`]: an online estimate of the hit rate an LRU cache of *any* size would have had on
//! the lookups seen so far (a miss-ratio curve), in bounded memory and O(log S) per sampled
//! chunk.
//!
//! Method: fixed-size SHARDS (Waldspurger et al., "Efficient MRC Construction with SHARDS",
//! FAST '15). Each chunk reference carries a 64-bit fingerprint (a mixed hash of the chunk's
//! object identity); its top 24 bits are the *sample value* `v`. A reference is sampled iff
//! `v < T` (the threshold), so every reference of a sampled object is sampled: the sample is
//! spatial, rate `R = T / 2^24`. For each sampled reference the estimator computes the LRU
//! *stack distance* among sampled objects (how much of the sampled working set was touched
//! since this object's previous reference, including itself) and scales it by `1/R`: the
//! estimated distance in the full reference stream. The histogram of scaled distances gives the
//! hit rate at every size `C`: the fraction of references with distance `<= C`.
//!
//! Fixed size: at most [`ShardsConfig::max_samples`] objects are tracked. When one more would
//! be tracked, the object with the largest sample value is dropped and `T` is lowered to that
//! value, so no dropped object is ever sampled again; the histogram's counts are rescaled by
//! `R_new / R_old` so that older samples (taken at a higher rate) do not outweigh newer ones.
//! `T` starts at `2^24` (`R = 1`): small workloads are measured exactly.
//!
//! Prefix semantics: a lookup's hit count is the longest prefix of its chunks that is cached,
//! so chunk `i` counts as a hit at size `C` only when chunks `0..=i` would all be cached. The
//! estimator takes one lookup at a time ([`Shards::observe`]) and credits chunk `i` with the
//! *running maximum* of the scaled distances of the lookup's sampled chunks `0..=i`. Sampling
//! approximation: unsampled earlier chunks do not enter the maximum. With prefix-chained chunk
//! hashes this loses little: whenever chunk `i` is referenced, chunks `0..i` are referenced in
//! the same lookup, so their distances are at most chunk `i`'s and the running maximum is
//! usually chunk `i`'s own distance; it matters only when an earlier chunk is missing for
//! another reason (it was never referenced under this object identity, e.g. another tenant).
//!
//! Units: distances are in *objects* (a lookup over `g` ranks at once references `g` objects
//! per chunk, the chunk's weight); the hit-rate histogram counts *chunks*, like the server's
//! `lookup_chunks_hit_total / lookup_chunks_requested_total`. Callers turn a size in bytes into
//! objects with the mean object size. The model is an LRU cache that holds every chunk looked
//! up (a miss is stored right after its lookup) at exactly `C` objects; see `docs/hit-rate-curve.md`
//! for how that relates to L1 (eviction watermark, other policies).
//!
//! Memory bound: every table is allocated at construction and never grows: the object map and
//! the eviction heap hold at most `max_samples + 1` entries, the time-ordered slot arrays
//! (a Fenwick tree of weights) `2 × max_samples + 2` slots, the histogram [`BUCKETS`] floats.
//! [`Shards::memory_bytes`] reports it (about 100 bytes per sample: 0.8 MiB for the default
//! 8192 samples).
//!
//! Cost: O(1) to reject an unsampled reference; O(log S) per sampled reference (Fenwick tree
//! and heap), plus a compaction of the slot arrays, O(S), at most once per `S` sampled
//! references. No allocation after construction.

use std::collections::{BinaryHeap, HashMap};

/// Sample values are the top 24 bits of a fingerprint: `0..MODULUS`.
pub const MODULUS: u32 = 1 << 24;

/// Sub-buckets per power of two of the distance histogram (about 6 % resolution).
const SUB: usize = 16;
/// Highest power of two of a finite distance (larger ones share the last bucket).
const MAX_EXP: usize = 52;
/// Finite-distance buckets: exact below [`SUB`], then [`SUB`] per power of two.
pub const BUCKETS: usize = SUB + (MAX_EXP - 4) * SUB;

/// The sample value of a fingerprint (its top 24 bits).
pub fn sample_value(fingerprint: u64) -> u32 {
    (fingerprint >> 40) as u32
}

/// A well-mixed 64-bit value of `x` (the splitmix64 finaliser), for building fingerprints out
/// of hashes that are not uniformly distributed in their top bits.
pub fn mix64(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Settings of a [`Shards`] estimator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ShardsConfig {
    /// Most objects tracked at once (the memory bound). Default 8192.
    pub max_samples: usize,
}

impl Default for ShardsConfig {
    fn default() -> Self {
        Self { max_samples: 8192 }
    }
}

/// One reference of a lookup: the object's fingerprint and its weight (objects per chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    /// Fingerprint of the chunk's object identity (see [`mix64`]).
    pub fingerprint: u64,
    /// Objects the chunk stands for (ranks looked up at once); at least 1.
    pub weight: u32,
}

/// The fixed-size SHARDS estimator (see the module docs). Not thread-safe by itself: the
/// server keeps it behind a mutex fed by one thread.
#[derive(Debug, Clone)]
pub struct Shards {
    max_samples: usize,
    /// A reference is sampled iff its sample value is below this.
    threshold: u32,
    /// Tracked object → its slot (the time of its last reference).
    slot_of: HashMap<u64, u32, foldhash::fast::FixedState>,
    /// Tracked objects by sample value (max first): the next one to drop.
    heap: BinaryHeap<(u32, u64)>,
    /// Per slot: the object whose last reference it is, and its weight (0: empty).
    slot_fp: Vec<u64>,
    slot_w: Vec<u32>,
    /// Fenwick tree over the slots' weights (1-based).
    fenwick: Vec<u64>,
    live_weight: u64,
    next_slot: usize,
    /// Histogram of credited distances, in stored units (actual = stored × `scale`).
    hist: Vec<f64>,
    /// Chunks with an infinite distance (first reference), in stored units.
    cold: f64,
    /// Expected sampled chunks, `Σ R × chunks` over every chunk seen, in stored units (the
    /// SHARDS_adj correction, see [`Shards::hit_rate`]).
    expected: f64,
    scale: f64,
    sampled_chunks: u64,
    lookups: u64,
}

impl Shards {
    /// An empty estimator sampling at rate 1, with every table allocated.
    pub fn new(cfg: ShardsConfig) -> Self {
        let max_samples = cfg.max_samples.max(16);
        let slots = 2 * max_samples + 2;
        Self {
            max_samples,
            threshold: MODULUS,
            slot_of: HashMap::with_capacity_and_hasher(
                max_samples + 1,
                foldhash::fast::FixedState::default(),
            ),
            heap: BinaryHeap::with_capacity(max_samples + 1),
            slot_fp: vec![0; slots],
            slot_w: vec![0; slots],
            fenwick: vec![0; slots + 1],
            live_weight: 0,
            next_slot: 0,
            hist: vec![0.0; BUCKETS],
            cold: 0.0,
            expected: 0.0,
            scale: 1.0,
            sampled_chunks: 0,
            lookups: 0,
        }
    }

    /// The current threshold: a fingerprint is sampled iff `sample_value(fp) < threshold`.
    pub fn threshold(&self) -> u32 {
        self.threshold
    }

    /// The current sampling rate `R` (1.0 until more than `max_samples` objects were seen).
    pub fn rate(&self) -> f64 {
        f64::from(self.threshold) / f64::from(MODULUS)
    }

    /// Whether a reference with this fingerprint is sampled now.
    pub fn is_sampled(&self, fingerprint: u64) -> bool {
        sample_value(fingerprint) < self.threshold
    }

    /// Objects tracked now (at most `max_samples`).
    pub fn tracked(&self) -> usize {
        self.slot_of.len()
    }

    /// The configured bound on tracked objects.
    pub fn max_samples(&self) -> usize {
        self.max_samples
    }

    /// Sampled chunk references credited so far.
    pub fn sampled_chunks(&self) -> u64 {
        self.sampled_chunks
    }

    /// Lookups passed to [`observe`](Self::observe) so far.
    pub fn lookups(&self) -> u64 {
        self.lookups
    }

    /// Bytes held by the estimator's tables (fixed at construction; see the module docs).
    pub fn memory_bytes(&self) -> usize {
        use std::mem::size_of;
        // hashbrown: one control byte plus one (key, value) per bucket.
        let map = self.slot_of.capacity().next_power_of_two() * 8 / 7
            * (1 + size_of::<(u64, u32)>().next_multiple_of(8));
        size_of::<Self>()
            + map
            + self.heap.capacity() * size_of::<(u32, u64)>()
            + self.slot_fp.capacity() * size_of::<u64>()
            + self.slot_w.capacity() * size_of::<u32>()
            + self.fenwick.capacity() * size_of::<u64>()
            + self.hist.capacity() * size_of::<f64>()
    }

    /// Feeds one lookup: its chunks in order (unsampled ones are skipped at O(1) each). Each
    /// sampled chunk is credited with the running maximum of the scaled distances of the
    /// lookup's sampled chunks so far (the prefix rule, see the module docs).
    pub fn observe(&mut self, chunks: impl IntoIterator<Item = ChunkRef>) {
        self.lookups += 1;
        let mut total = 0u64;
        let mut running: f64 = 0.0;
        for c in chunks {
            total += 1;
            if self.is_sampled(c.fingerprint) {
                running = running.max(self.reference(c.fingerprint, c.weight.max(1)));
                self.credit(running);
            }
        }
        self.count_unsampled(total);
    }

    /// Like [`observe`](Self::observe) for a caller that filtered the lookup's chunks itself
    /// (with a threshold at most a little stale): `total` is the lookup's chunk count, sampled
    /// or not. Chunks no longer sampled at the current threshold are skipped.
    pub fn observe_sampled(&mut self, total: u64, sampled: impl IntoIterator<Item = ChunkRef>) {
        self.lookups += 1;
        self.count_unsampled(total);
        let mut running: f64 = 0.0;
        for c in sampled {
            if !self.is_sampled(c.fingerprint) {
                continue;
            }
            let d = self.reference(c.fingerprint, c.weight.max(1));
            running = running.max(d);
            self.credit(running);
        }
    }

    /// Counts `chunks` references of lookups none of whose chunks was sampled (they only move
    /// the expected sample count of the SHARDS_adj correction).
    pub fn count_unsampled(&mut self, chunks: u64) {
        self.expected += self.rate() * chunks as f64 / self.scale;
    }

    /// The estimated hit rate of an LRU cache of `capacity_objects` objects, or `None` before
    /// any sampled reference.
    ///
    /// SHARDS_adj (Waldspurger et al., section 3.3): the difference between the expected
    /// number of sampled references (`Σ R × chunks`) and the number actually sampled is added
    /// to the smallest distance (a hit at every size), and the total becomes the expected
    /// count. Spatial sampling picks whole objects, so a few very hot objects (a system prompt
    /// shared by every request) are either in the sample or not; this correction removes most
    /// of that bias.
    pub fn hit_rate(&self, capacity_objects: f64) -> Option<f64> {
        let finite: f64 = self.hist.iter().sum();
        let sampled = finite + self.cold;
        if sampled <= 0.0 {
            return None;
        }
        let (total, adjust) = if self.expected > 0.0 {
            (self.expected, self.expected - sampled)
        } else {
            (sampled, 0.0)
        };
        let mut hits = 0.0;
        for (i, &h) in self.hist.iter().enumerate() {
            if h == 0.0 {
                continue;
            }
            let (lo, hi) = bucket_bounds(i);
            if i < SUB {
                // Whole-object distances: the bucket is its lower bound.
                if lo <= capacity_objects {
                    hits += h;
                }
            } else if hi <= capacity_objects {
                hits += h;
            } else if lo < capacity_objects {
                hits += h * (capacity_objects - lo) / (hi - lo);
            }
        }
        Some(((hits + adjust) / total).clamp(0.0, 1.0))
    }

    /// Forgets every sample and returns to rate 1 (keeps the allocations).
    pub fn reset(&mut self) {
        *self = Self::new(ShardsConfig {
            max_samples: self.max_samples,
        });
    }

    /// One sampled reference: returns its scaled distance (infinite for a first reference) and
    /// moves the object to the newest slot.
    fn reference(&mut self, fp: u64, weight: u32) -> f64 {
        self.sampled_chunks += 1;
        if self.next_slot == self.slot_w.len() {
            self.compact();
        }
        let slot = self.next_slot;
        self.next_slot += 1;
        let distance = match self.slot_of.get(&fp).copied() {
            Some(old) => {
                let old = old as usize;
                let newer = self.live_weight - self.prefix(old);
                let w = self.slot_w[old];
                self.fenwick_add(old, w, false);
                self.slot_w[old] = 0;
                self.live_weight -= u64::from(w);
                newer as f64 / self.rate() + f64::from(weight)
            }
            None => {
                self.heap.push((sample_value(fp), fp));
                f64::INFINITY
            }
        };
        self.slot_of.insert(fp, slot as u32);
        self.slot_fp[slot] = fp;
        self.slot_w[slot] = weight;
        self.fenwick_add(slot, weight, true);
        self.live_weight += u64::from(weight);
        if self.slot_of.len() > self.max_samples {
            self.lower_threshold();
        }
        distance
    }

    /// Drops the objects with the largest sample value until at most `max_samples` remain and
    /// none at or above the new threshold is tracked; rescales the histogram.
    fn lower_threshold(&mut self) {
        let old = self.threshold;
        while self.slot_of.len() > self.max_samples
            || self.heap.peek().is_some_and(|&(v, _)| v >= self.threshold)
        {
            let Some((v, fp)) = self.heap.pop() else {
                break;
            };
            self.threshold = self.threshold.min(v);
            if let Some(slot) = self.slot_of.remove(&fp) {
                let slot = slot as usize;
                let w = self.slot_w[slot];
                self.fenwick_add(slot, w, false);
                self.slot_w[slot] = 0;
                self.live_weight -= u64::from(w);
            }
        }
        if self.threshold < old {
            self.scale *= f64::from(self.threshold) / f64::from(old);
            if self.scale < 1e-150 {
                for h in &mut self.hist {
                    *h *= self.scale;
                }
                self.cold *= self.scale;
                self.expected *= self.scale;
                self.scale = 1.0;
            }
        }
    }

    fn credit(&mut self, distance: f64) {
        let w = 1.0 / self.scale;
        if distance.is_finite() {
            self.hist[bucket_of(distance)] += w;
        } else {
            self.cold += w;
        }
    }

    /// Renumbers the live slots `0..n` in time order and rebuilds the Fenwick tree (O(slots)).
    fn compact(&mut self) {
        let mut n = 0;
        for s in 0..self.slot_w.len() {
            let w = self.slot_w[s];
            if w == 0 {
                continue;
            }
            let fp = self.slot_fp[s];
            self.slot_w[n] = w;
            self.slot_fp[n] = fp;
            if let Some(slot) = self.slot_of.get_mut(&fp) {
                *slot = n as u32;
            }
            n += 1;
        }
        self.slot_w[n..].fill(0);
        self.next_slot = n;
        // Linear Fenwick construction.
        self.fenwick.fill(0);
        for i in 1..self.fenwick.len() {
            self.fenwick[i] = self.fenwick[i].wrapping_add(u64::from(self.slot_w[i - 1]));
            let parent = i + (i & i.wrapping_neg());
            if parent < self.fenwick.len() {
                self.fenwick[parent] = self.fenwick[parent].wrapping_add(self.fenwick[i]);
            }
        }
    }

    fn fenwick_add(&mut self, slot: usize, w: u32, add: bool) {
        let mut i = slot + 1;
        while i < self.fenwick.len() {
            self.fenwick[i] = if add {
                self.fenwick[i].wrapping_add(u64::from(w))
            } else {
                self.fenwick[i].wrapping_sub(u64::from(w))
            };
            i += i & i.wrapping_neg();
        }
    }

    /// Sum of the weights of slots `0..=slot`.
    fn prefix(&self, slot: usize) -> u64 {
        let mut i = slot + 1;
        let mut sum = 0u64;
        while i > 0 {
            sum = sum.wrapping_add(self.fenwick[i]);
            i -= i & i.wrapping_neg();
        }
        sum
    }
}

/// The histogram bucket of a finite distance (>= 0).
fn bucket_of(d: f64) -> usize {
    if d < SUB as f64 {
        return d.max(0.0) as usize;
    }
    let e = (d.log2().floor() as usize).min(MAX_EXP - 1);
    let base = (1u64 << e) as f64;
    let m = (((d / base) - 1.0) * SUB as f64)
        .floor()
        .clamp(0.0, SUB as f64 - 1.0) as usize;
    (SUB + (e - 4) * SUB + m).min(BUCKETS - 1)
}

/// `[lo, hi)` of a bucket.
fn bucket_bounds(i: usize) -> (f64, f64) {
    if i < SUB {
        return (i as f64, i as f64 + 1.0);
    }
    let e = (i - SUB) / SUB + 4;
    let m = (i - SUB) % SUB;
    let base = (1u64 << e) as f64;
    let step = base / SUB as f64;
    (base + m as f64 * step, base + (m + 1) as f64 * step)
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use super::*;

    /// Zipf prompts sharing system prompts: chunk ids, prefix-chained by construction.
    fn trace(seed: u64, prompts: usize, requests: usize) -> Vec<Vec<u64>> {
        let mut s = seed;
        let mut next = move || {
            s = mix64(s.wrapping_add(0x9e37_79b9_7f4a_7c15));
            s
        };
        let table: Vec<Vec<u64>> = (0..prompts)
            .map(|p| {
                let sys = next() % 8;
                let own = 3 + next() % 10;
                let mut c = vec![sys * 2 + 1, sys * 2 + 2];
                c.extend((0..own).map(|i| 1000 + p as u64 * 64 + i));
                c
            })
            .collect();
        let mut cdf = Vec::with_capacity(prompts);
        let mut acc = 0.0;
        for i in 0..prompts {
            acc += 1.0 / (i + 1) as f64;
            cdf.push(acc);
        }
        (0..requests)
            .map(|_| {
                let u = (next() >> 11) as f64 / (1u64 << 53) as f64 * acc;
                let i = cdf.partition_point(|&c| c < u).min(prompts - 1);
                table[i].clone()
            })
            .collect()
    }

    /// Exact prefix-aware LRU: hits are the longest cached prefix; then every chunk of the
    /// request becomes most recent; then the least recent are evicted down to `cap`.
    fn exact_lru(reqs: &[Vec<u64>], cap: usize) -> f64 {
        let mut last: HashMap<u64, u64> = HashMap::new();
        let mut order: BTreeMap<u64, u64> = BTreeMap::new();
        let (mut t, mut hits, mut total) = (0u64, 0u64, 0u64);
        for r in reqs {
            hits += r.iter().take_while(|c| last.contains_key(c)).count() as u64;
            total += r.len() as u64;
            for &c in r {
                if let Some(old) = last.insert(c, t) {
                    order.remove(&old);
                }
                order.insert(t, c);
                t += 1;
            }
            while last.len() > cap {
                let Some((_, c)) = order.pop_first() else {
                    break;
                };
                last.remove(&c);
            }
        }
        hits as f64 / total as f64
    }

    fn feed(s: &mut Shards, reqs: &[Vec<u64>]) {
        for r in reqs {
            s.observe(r.iter().map(|&c| ChunkRef {
                fingerprint: mix64(c),
                weight: 1,
            }));
        }
    }

    #[test]
    fn unsampled_matches_exact_lru() {
        let reqs = trace(1, 400, 20_000);
        let mut s = Shards::new(ShardsConfig {
            max_samples: 1 << 16,
        });
        feed(&mut s, &reqs);
        assert_eq!(s.rate(), 1.0);
        for cap in [50, 200, 800, 1600, 3200] {
            let exact = exact_lru(&reqs, cap);
            let est = s.hit_rate(cap as f64).expect("samples");
            assert!(
                (exact - est).abs() < 0.01,
                "cap {cap}: exact {exact:.4} estimate {est:.4}"
            );
        }
    }

    #[test]
    fn sampled_estimate_is_close_and_memory_is_bounded() {
        // 22k distinct chunks, 16 of them (system prompts) in every lookup.
        let reqs = trace(2, 3000, 60_000);
        let mut s = Shards::new(ShardsConfig { max_samples: 4096 });
        let mem = s.memory_bytes();
        feed(&mut s, &reqs);
        assert!(s.rate() < 0.25, "rate {}", s.rate());
        assert!(s.tracked() <= 4096);
        assert_eq!(s.memory_bytes(), mem, "no table grew");
        for cap in [1000, 3000, 8000, 16000] {
            let exact = exact_lru(&reqs, cap);
            let est = s.hit_rate(cap as f64).expect("samples");
            assert!(
                (exact - est).abs() < 0.02,
                "cap {cap}: exact {exact:.4} estimate {est:.4}"
            );
        }
    }

    #[test]
    fn prefix_rule_uses_running_maximum() {
        let mut s = Shards::new(ShardsConfig::default());
        let r = |c: &[u64]| -> Vec<ChunkRef> {
            c.iter()
                .map(|&x| ChunkRef {
                    fingerprint: mix64(x),
                    weight: 1,
                })
                .collect()
        };
        s.observe(r(&[1, 2]));
        // Then 100 other chunks, then chunk 2 alone (not prefix-chained on purpose).
        for x in 10..110 {
            s.observe(r(&[x]));
        }
        s.observe(r(&[2]));
        s.observe(r(&[1, 2]));
        // 105 references. `[2]`: distance 101. The last lookup: chunk 1 has distance 102,
        // chunk 2 distance 2 but is credited the running maximum, 102: nothing hits at size 10.
        assert_eq!(s.hit_rate(10.0), Some(0.0));
        let large = s.hit_rate(200.0).expect("samples");
        assert!((large - 3.0 / 105.0).abs() < 1e-9, "{large}");
    }

    #[test]
    fn weights_count_objects_and_buckets_round_trip() {
        for d in [0.0, 1.0, 15.5, 16.0, 17.3, 1000.0, 1e9] {
            let (lo, hi) = bucket_bounds(bucket_of(d));
            assert!(lo <= d && d < hi, "{d}: [{lo}, {hi})");
        }
        let mut s = Shards::new(ShardsConfig::default());
        let refs = |c: &[u64]| -> Vec<ChunkRef> {
            c.iter()
                .map(|&x| ChunkRef {
                    fingerprint: mix64(x),
                    weight: 4,
                })
                .collect()
        };
        s.observe(refs(&[1]));
        s.observe(refs(&[2]));
        s.observe(refs(&[1]));
        // chunk 1's second reference: 4 (chunk 2) + 4 (itself) = 8 objects.
        assert_eq!(s.hit_rate(7.9), Some(0.0));
        assert!((s.hit_rate(8.0).expect("samples") - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(Shards::new(ShardsConfig::default()).hit_rate(1.0), None);
    }
}
