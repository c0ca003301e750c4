//! A request's token ids, shared ([`TokenIds`]), and the cache of recently decoded token arrays
//! that lets a request reuse them instead of decoding its token array again ([`TokenArrays`]).
//!
//! Every LMCache engine operation carries the request's *whole* token list in its key (the
//! vLLM connector sends `tracker.get_token_ids()` with each lookup, retrieve and store, and
//! `[start, end)` names the range), so a 32k-token prompt is decoded again by every op of the
//! request (~400 µs each on this project's test VM with random ids, whose mixed uint16/uint32
//! widths defeat branch prediction). The cache keeps, per recent array, the length and a
//! digest of its element bytes next to the decoded ids:
//! - an array whose element bytes match a cached array's (same length, same digest) is
//!   answered with the cached ids (one hash of the bytes instead of the decode);
//! - an array whose element bytes *start with* a cached array's (the same request one store
//!   later, grown by generated tokens) copies the cached ids and decodes only the rest.
//!
//! Invariants:
//! - A reused answer is what decoding would produce: msgpack values are self-delimiting, so
//!   `n` elements that decoded from bytes `B` decode identically wherever `B` appears again,
//!   and only arrays that decoded without error are cached. Errors in the undecoded rest name
//!   the same element index as a full decode would. Bytes are matched by a seeded xxh3-128
//!   digest (random seed per cache, so a client cannot aim at a collision; about 2^-128 per
//!   comparison otherwise) after their length and last 16 bytes agree.
//! - Bounded: at most [`TokenArrays::max_entries`] arrays and `max_bytes` of decoded ids (plus
//!   ~100 bytes of bookkeeping each); the least recently used array goes first. Arrays shorter
//!   than [`MIN_CACHED_LEN`] are decoded without the cache (decoding them is cheaper than
//!   looking). Keep `max_entries` small: a new array is decoded into fresh memory that the
//!   cache then holds, so the more arrays it holds, the colder the memory a miss writes into
//!   (measured in docs/performance.md: 256 entries made the first op of a request 10-25 %
//!   slower, 16 did not).
//! - Lock: one mutex, held only to scan the probe table (bounded by `max_entries`, comparing
//!   lengths and each candidate's last bytes) and to insert; hashing, decoding and copying run
//!   outside it.
//! - [`TokenIds::identity`] is shared by clones and by every reuse of one cached array, and by
//!   nothing else (a process-wide counter, never reused), so equal identities mean equal ids.

use std::fmt;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, PoisonError};

use crate::error::ProtoError;
use crate::reader::{Path, Reader};

/// Arrays shorter than this are decoded without the cache.
pub const MIN_CACHED_LEN: u32 = 64;

/// Bytes compared under the lock to pick candidates (the end of a cached array's element
/// bytes against the same offsets of the incoming array).
const TAIL: usize = 16;

/// Candidates compared in full per lookup (longest cached array first).
const MAX_CANDIDATES: usize = 4;

/// Bookkeeping charged per entry besides its bytes.
const ENTRY_OVERHEAD: usize = 96;

static NEXT_IDENTITY: AtomicU64 = AtomicU64::new(1);

/// A request's token ids, shared by reference: cloning is an atomic increment, and a
/// [`TokenArrays`] cache hands the same ids to every request that sends the same array.
#[derive(Clone)]
pub struct TokenIds {
    /// A `Vec` behind the `Arc` (not `Arc<[u32]>`): a decoded `Vec` moves in without a copy.
    ids: Arc<Vec<u32>>,
    identity: u64,
}

impl TokenIds {
    /// Shares `ids` under a new identity.
    pub fn new(ids: Vec<u32>) -> Self {
        Self {
            ids: Arc::new(ids),
            identity: NEXT_IDENTITY.fetch_add(1, Relaxed),
        }
    }

    /// A number equal for two `TokenIds` only when they share one decoded array (clones, and
    /// reuses of one cached array), so equal identities imply equal ids. Different identities
    /// say nothing: two decodes of the same bytes may or may not share one.
    #[must_use]
    pub fn identity(&self) -> u64 {
        self.identity
    }

    /// The ids.
    #[must_use]
    pub fn as_slice(&self) -> &[u32] {
        &self.ids
    }
}

impl Default for TokenIds {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

impl Deref for TokenIds {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.ids
    }
}

impl<'a> IntoIterator for &'a TokenIds {
    type Item = &'a u32;
    type IntoIter = std::slice::Iter<'a, u32>;
    fn into_iter(self) -> Self::IntoIter {
        self.ids.iter()
    }
}

impl FromIterator<u32> for TokenIds {
    fn from_iter<I: IntoIterator<Item = u32>>(iter: I) -> Self {
        Self::new(iter.into_iter().collect::<Vec<u32>>())
    }
}

impl From<Vec<u32>> for TokenIds {
    fn from(ids: Vec<u32>) -> Self {
        Self::new(ids)
    }
}

impl PartialEq for TokenIds {
    fn eq(&self, other: &Self) -> bool {
        self.identity == other.identity || self.ids == other.ids
    }
}

impl Eq for TokenIds {}

impl fmt::Debug for TokenIds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.ids, f)
    }
}

/// One cached array: its element count, the length and digest of its element bytes (without
/// the array header), and its ids.
#[derive(Debug)]
struct Entry {
    len: u32,
    raw_len: usize,
    digest: u128,
    ids: TokenIds,
}

impl Entry {
    fn charge(&self) -> usize {
        self.ids.len() * 4 + ENTRY_OVERHEAD
    }
}

/// What a lookup compares before touching an entry: kept apart from the entries, in one
/// contiguous table, so that a scan reads a few cache lines rather than one per entry.
#[derive(Debug, Clone, Copy)]
struct Probe {
    len: u32,
    raw_len: usize,
    /// The last `TAIL` element bytes (fewer for a shorter array, zero-padded).
    tail: [u8; TAIL],
    /// Last use (a clock, larger is more recent).
    used: u64,
}

impl Probe {
    /// The probe of an array of `len` ids whose element bytes are `raw`.
    fn of(len: u32, raw: &[u8], used: u64) -> Self {
        let n = raw.len();
        let mut tail = [0; TAIL];
        let from = n.saturating_sub(TAIL);
        if let (Some(dst), Some(src)) = (tail.get_mut(..n - from), raw.get(from..)) {
            dst.copy_from_slice(src);
        }
        Self {
            len,
            raw_len: n,
            tail,
            used,
        }
    }

    /// Whether `body` may start with this entry's element bytes (its length allows it and its
    /// last bytes are where they would be).
    #[inline]
    fn admits(&self, len: u32, body: &[u8]) -> bool {
        let n = self.raw_len;
        let from = n.saturating_sub(TAIL);
        self.len <= len && n <= body.len() && body.get(from..n) == self.tail.get(..n - from)
    }
}

#[derive(Debug, Default)]
struct Table {
    /// Parallel to `entries`.
    probes: Vec<Probe>,
    entries: Vec<Arc<Entry>>,
    clock: u64,
    bytes: usize,
}

/// Counters and occupancy of a [`TokenArrays`] cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TokenArrayStats {
    /// Arrays answered entirely from the cache.
    pub hits: u64,
    /// Arrays whose start came from the cache and whose rest was decoded.
    pub prefix_hits: u64,
    /// Arrays of at least [`MIN_CACHED_LEN`] ids decoded in full.
    pub misses: u64,
    /// Ids taken from the cache instead of decoded.
    pub reused_ids: u64,
    /// Cached arrays now.
    pub entries: u64,
    /// Bytes they hold (element bytes, ids and bookkeeping).
    pub bytes: u64,
    /// The byte bound.
    pub max_bytes: u64,
}

/// Recently decoded token arrays (see the module docs). Shared by every thread that decodes
/// requests; `max_bytes == 0` disables it.
#[derive(Debug)]
pub struct TokenArrays {
    table: Mutex<Table>,
    /// The digest's seed, random per cache (see the module docs on collisions).
    seed: u64,
    max_bytes: usize,
    max_entries: usize,
    hits: AtomicU64,
    prefix_hits: AtomicU64,
    misses: AtomicU64,
    reused_ids: AtomicU64,
}

impl TokenArrays {
    /// A cache holding at most `max_bytes` (element bytes + 4 bytes per id + ~100 per array)
    /// in at most `max_entries` arrays.
    #[must_use]
    pub fn new(max_bytes: usize, max_entries: usize) -> Self {
        use std::hash::BuildHasher;
        Self {
            table: Mutex::default(),
            seed: std::collections::hash_map::RandomState::new()
                .hash_one(NEXT_IDENTITY.load(Relaxed)),
            max_bytes,
            max_entries,
            hits: AtomicU64::new(0),
            prefix_hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            reused_ids: AtomicU64::new(0),
        }
    }

    /// The entry bound.
    #[must_use]
    pub fn max_entries(&self) -> usize {
        self.max_entries
    }

    /// Counters and occupancy now.
    #[must_use]
    pub fn stats(&self) -> TokenArrayStats {
        let (entries, bytes) = {
            let t = self.lock();
            (t.entries.len() as u64, t.bytes as u64)
        };
        TokenArrayStats {
            hits: self.hits.load(Relaxed),
            prefix_hits: self.prefix_hits.load(Relaxed),
            misses: self.misses.load(Relaxed),
            reused_ids: self.reused_ids.load(Relaxed),
            entries,
            bytes,
            max_bytes: self.max_bytes as u64,
        }
    }

    /// Forgets every cached array (counters are kept).
    pub fn clear(&self) {
        let dropped = {
            let mut t = self.lock();
            t.bytes = 0;
            t.probes.clear();
            std::mem::take(&mut t.entries)
        };
        drop(dropped);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Table> {
        // Nothing that can panic runs between two updates of the table that belong together
        // (only slice pushes and swaps, and arithmetic on bounded sizes), so a poisoned lock
        // still guards a consistent table: keep using it rather than fail every decode.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads an array of ints that each fit in `u32` from `r`, reusing a cached array whose
    /// element bytes match the input's (in full or as its start). Same result and errors as
    /// [`Reader::read_u32_array`].
    ///
    /// # Errors
    /// A decode error naming the first offending index and value.
    pub fn read(&self, r: &mut Reader<'_>, path: &Path<'_>) -> Result<TokenIds, ProtoError> {
        let len = r.read_array_len(path)?;
        if len < MIN_CACHED_LEN || self.max_bytes == 0 || self.max_entries == 0 {
            let mut ids = Vec::with_capacity(r.capacity_hint(len));
            r.read_u32_elements(0..len, &mut ids, path)?;
            return Ok(TokenIds::new(ids));
        }
        let body = r.remaining();
        let found = self.find(len, body);
        let mut ids = Vec::new();
        match found {
            Some(e) if e.len == len => {
                r.advance(e.raw_len);
                self.hits.fetch_add(1, Relaxed);
                self.reused_ids.fetch_add(u64::from(len), Relaxed);
                return Ok(e.ids.clone());
            }
            Some(e) => {
                ids.reserve(r.capacity_hint(len));
                ids.extend_from_slice(&e.ids);
                r.advance(e.raw_len);
                r.read_u32_elements(e.len..len, &mut ids, path)?;
                self.prefix_hits.fetch_add(1, Relaxed);
                self.reused_ids.fetch_add(u64::from(e.len), Relaxed);
            }
            None => {
                ids.reserve(r.capacity_hint(len));
                r.read_u32_elements(0..len, &mut ids, path)?;
                self.misses.fetch_add(1, Relaxed);
            }
        }
        let raw = body
            .get(..body.len() - r.remaining().len())
            .unwrap_or_default();
        let ids = TokenIds::new(ids);
        self.insert(
            Entry {
                len,
                raw_len: raw.len(),
                digest: self.digest(raw),
                ids: ids.clone(),
            },
            raw,
        );
        Ok(ids)
    }

    /// The digest of element bytes: xxh3-128 with this cache's random seed.
    fn digest(&self, raw: &[u8]) -> u128 {
        xxhash_rust::xxh3::xxh3_128_with_seed(raw, self.seed)
    }

    /// The longest cached array of at most `len` ids whose element bytes `body` starts with.
    fn find(&self, len: u32, body: &[u8]) -> Option<Arc<Entry>> {
        // Under the lock: pick up to MAX_CANDIDATES by length and last bytes (a scan of the
        // probe table, bounded by `max_entries`).
        let mut candidates: Vec<(u32, usize, Arc<Entry>)> = Vec::new();
        {
            let t = self.lock();
            for (i, p) in t.probes.iter().enumerate() {
                if p.admits(len, body)
                    && let Some(e) = t.entries.get(i)
                {
                    candidates.push((p.len, i, Arc::clone(e)));
                }
            }
        }
        if candidates.is_empty() {
            return None;
        }
        candidates.sort_unstable_by_key(|c| std::cmp::Reverse(c.0));
        candidates.truncate(MAX_CANDIDATES);
        // Outside it: the digest of the input's bytes at each candidate's length.
        let (_, index, hit) = candidates.into_iter().find(|(_, _, e)| {
            body.get(..e.raw_len)
                .is_some_and(|b| self.digest(b) == e.digest)
        })?;
        let mut t = self.lock();
        t.clock += 1;
        let clock = t.clock;
        // The entry may have moved or gone meanwhile; refresh it only if it is still there.
        if t.entries.get(index).is_some_and(|e| Arc::ptr_eq(e, &hit))
            && let Some(p) = t.probes.get_mut(index)
        {
            p.used = clock;
        }
        Some(hit)
    }

    fn insert(&self, entry: Entry, raw: &[u8]) {
        let charge = entry.charge();
        if charge > self.max_bytes {
            return;
        }
        let mut evicted = Vec::new();
        {
            let mut t = self.lock();
            while !t.entries.is_empty()
                && (t.entries.len() >= self.max_entries || t.bytes + charge > self.max_bytes)
            {
                // Least recently used first (a scan of at most `max_entries` probes).
                let Some((oldest, _)) = t.probes.iter().enumerate().min_by_key(|(_, p)| p.used)
                else {
                    break;
                };
                t.probes.swap_remove(oldest);
                let e = t.entries.swap_remove(oldest);
                t.bytes -= e.charge();
                evicted.push(e);
            }
            t.clock += 1;
            let probe = Probe::of(entry.len, raw, t.clock);
            t.bytes += charge;
            t.probes.push(probe);
            t.entries.push(Arc::new(entry));
        }
        drop(evicted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(ids: &[u32]) -> Vec<u8> {
        let mut out = Vec::new();
        rmp::encode::write_array_len(&mut out, ids.len() as u32).expect("vec write");
        for &v in ids {
            rmp::encode::write_uint(&mut out, u64::from(v)).expect("vec write");
        }
        out
    }

    fn read(cache: &TokenArrays, bytes: &[u8]) -> Result<(TokenIds, usize), ProtoError> {
        let mut r = Reader::new(bytes);
        let ids = cache.read(&mut r, &Path::Root("t"))?;
        Ok((ids, bytes.len() - r.remaining().len()))
    }

    fn tokens(n: u32, seed: u32) -> Vec<u32> {
        (0..n)
            .map(|i| i.wrapping_mul(2_654_435_761).wrapping_add(seed) % 200_000)
            .collect()
    }

    #[test]
    fn same_array_is_reused_and_equal_to_a_decode() {
        let cache = TokenArrays::new(1 << 20, 8);
        let ids = tokens(1000, 7);
        let mut bytes = encode(&ids);
        let n = bytes.len();
        bytes.push(0xc0); // something after the array, left unread
        let (a, used_a) = read(&cache, &bytes).expect("decodes");
        let (b, used_b) = read(&cache, &bytes).expect("decodes");
        assert_eq!((used_a, used_b), (n, n));
        assert_eq!(&*a, &ids[..]);
        assert_eq!(a.identity(), b.identity());
        let s = cache.stats();
        assert_eq!((s.hits, s.prefix_hits, s.misses), (1, 0, 1));
        assert_eq!(s.reused_ids, 1000);
    }

    #[test]
    fn grown_array_reuses_its_start_and_decodes_the_rest() {
        let cache = TokenArrays::new(1 << 20, 8);
        let long = tokens(1300, 3);
        read(&cache, &encode(&long[..1000])).expect("decodes");
        let (b, used) = read(&cache, &encode(&long)).expect("decodes");
        assert_eq!(&*b, &long[..]);
        assert_eq!(used, encode(&long).len());
        let s = cache.stats();
        assert_eq!((s.hits, s.prefix_hits, s.misses), (0, 1, 1));
        // The grown array is cached in its turn.
        let (c, _) = read(&cache, &encode(&long)).expect("decodes");
        assert_eq!(c.identity(), b.identity());
    }

    #[test]
    fn errors_after_a_reused_start_name_the_same_index() {
        let cache = TokenArrays::new(1 << 20, 8);
        let ids = tokens(100, 1);
        read(&cache, &encode(&ids)).expect("decodes");
        let mut bad = ids.clone();
        bad.push(5);
        let mut bytes = encode(&bad);
        let last = bytes.len() - 1;
        bytes[last] = 0xc2; // `false` in place of the last id
        let cached = read(&cache, &bytes).expect_err("a bool is not an id");
        let plain = Reader::new(&bytes)
            .read_u32_array(&Path::Root("t"))
            .expect_err("a bool is not an id");
        assert_eq!(cached.to_string(), plain.to_string());
        assert!(cached.to_string().contains("t[100]"), "{cached}");
    }

    #[test]
    fn different_arrays_of_one_length_do_not_mix() {
        let cache = TokenArrays::new(1 << 20, 8);
        let a = tokens(500, 1);
        let mut b = a.clone();
        b[250] += 1; // same length, same last bytes, one id apart
        read(&cache, &encode(&a)).expect("decodes");
        let (got, _) = read(&cache, &encode(&b)).expect("decodes");
        assert_eq!(&*got, &b[..]);
        assert_eq!(cache.stats().hits, 0);
    }

    #[test]
    fn bounds_hold_and_the_least_recently_used_goes_first() {
        // Ids of one width (uint32), so that every array has the same charge.
        let arrays: Vec<Vec<u32>> = (0..4)
            .map(|s| {
                tokens(200, s * 1000 + 11)
                    .iter()
                    .map(|t| t + 70_000)
                    .collect()
            })
            .collect();
        let one = Entry {
            len: 200,
            raw_len: 0,
            digest: 0,
            ids: arrays[0].clone().into(),
        }
        .charge();
        // Room for three arrays by bytes, eight by count.
        let cache = TokenArrays::new(3 * one + 10, 8);
        for a in &arrays[..3] {
            read(&cache, &encode(a)).expect("decodes");
        }
        read(&cache, &encode(&arrays[0])).expect("decodes"); // 0 is now the most recent
        read(&cache, &encode(&arrays[3])).expect("decodes"); // evicts 1
        let s = cache.stats();
        assert_eq!(s.entries, 3);
        assert!(s.bytes <= s.max_bytes);
        read(&cache, &encode(&arrays[0])).expect("decodes");
        read(&cache, &encode(&arrays[1])).expect("decodes");
        let s = cache.stats();
        assert_eq!((s.hits, s.misses), (2, 5), "0 hit twice, 1 decoded again");
        // The count bound.
        let small = TokenArrays::new(1 << 20, 2);
        for a in &arrays {
            read(&small, &encode(a)).expect("decodes");
        }
        assert_eq!(small.stats().entries, 2);
    }

    #[test]
    fn short_arrays_and_a_disabled_cache_decode_plainly() {
        let cache = TokenArrays::new(1 << 20, 8);
        let short = tokens(MIN_CACHED_LEN - 1, 2);
        read(&cache, &encode(&short)).expect("decodes");
        read(&cache, &encode(&short)).expect("decodes");
        let off = TokenArrays::new(0, 8);
        let long = tokens(300, 2);
        let (got, _) = read(&off, &encode(&long)).expect("decodes");
        read(&off, &encode(&long)).expect("decodes");
        assert_eq!(&*got, &long[..]);
        assert_eq!(
            cache.stats(),
            TokenArrayStats {
                max_bytes: 1 << 20,
                ..TokenArrayStats::default()
            }
        );
        assert_eq!(off.stats().entries, 0);
    }

    proptest::proptest! {
        /// Any sequence of arrays (each a fresh one, a repeat or an extension of an earlier one,
        /// or a corrupted copy) reads through a small cache exactly as a plain decode reads it.
        #[test]
        fn cached_reads_equal_plain_decodes(
            steps in proptest::collection::vec(
                (0u8..4, 0usize..8, 64u32..300, 0u32..70_000, proptest::num::u8::ANY),
                1..40,
            )
        ) {
            let cache = TokenArrays::new(64 << 10, 4);
            let mut seen: Vec<Vec<u32>> = Vec::new();
            for (kind, pick, n, seed, byte) in steps {
                let base = seen.get(pick % seen.len().max(1)).cloned();
                let ids = match (kind, base) {
                    (1, Some(b)) => b,
                    (2, Some(mut b)) => {
                        b.extend(tokens(n % 50 + 1, seed));
                        b
                    }
                    _ => tokens(n, seed).iter().map(|t| t % (seed + 1)).collect(),
                };
                let mut bytes = encode(&ids);
                if kind == 3 {
                    // Corrupt one byte past the header.
                    let at = 3 + usize::from(byte) % (bytes.len() - 3);
                    bytes[at] = byte;
                }
                let plain = Reader::new(&bytes).read_u32_array(&Path::Root("t"));
                let cached = read(&cache, &bytes);
                match (plain, cached) {
                    (Ok(p), Ok((c, _))) => proptest::prop_assert_eq!(&p[..], &c[..]),
                    (Err(p), Err(c)) => proptest::prop_assert_eq!(p.to_string(), c.to_string()),
                    (p, c) => proptest::prop_assert!(false, "plain {:?} vs cached {:?}", p, c),
                }
                seen.push(ids);
            }
        }
    }

    #[test]
    fn truncated_input_is_an_error_not_a_hit() {
        let cache = TokenArrays::new(1 << 20, 8);
        let ids = tokens(300, 9);
        let bytes = encode(&ids);
        read(&cache, &bytes).expect("decodes");
        assert!(read(&cache, &bytes[..bytes.len() - 1]).is_err());
    }
}
