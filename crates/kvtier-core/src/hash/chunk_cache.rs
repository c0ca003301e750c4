//! [`ChunkHashCache`]: a request's chunk hashes, kept between its operations so that each
//! chunk is hashed once (see the parent module for the hash itself).

use super::{ChunkHash, HashError, NONE_HASH, TokenHasher};

/// Incremental per-request chunk hashes (LMCache's `Session` hash cache).
///
/// Holds, for the full-chunk token prefix hashed so far, each chunk's hash and a 128-bit
/// fingerprint of its tokens (two independently seeded `foldhash` values). Each
/// [`hashes`](Self::hashes) call fingerprints the new tokens chunk by chunk (many times faster
/// than blake3), keeps the chunks whose fingerprint matches, and hashes only chunks it has not
/// seen, so a request that grows by `k` chunks costs `k` blake3 calls.
///
/// Memory: 48 bytes per cached chunk (32-byte hash + 16-byte fingerprint) instead of the
/// chunk's tokens (1 KiB for 256 tokens), which matters because a session lives until
/// `end_session` or its TTL. The message buffer blake3 needs is allocated per call, not kept,
/// and when the cached prefix shrinks to a quarter of the vectors' capacity they are shrunk,
/// so an idle cache holds about 48 bytes per chunk of its *current* token list.
///
/// **Known token arrays.** A caller whose token arrays carry an identity (equal identities
/// only for equal, immutable ids: `kvtier_proto::TokenIds::identity`) passes it to
/// [`hashes_of`](Self::hashes_of); the cache remembers the last identity and how many leading
/// chunks it has verified against it, and skips fingerprinting those chunks when the same array
/// comes back (every op of a request sends the whole prompt: ~14 µs per op for a 32k-token
/// prompt).
///
/// Invariants: `fingerprints.len() == hashes.len()`, and `hashes` equals
/// `TokenHasher::hash_chunks` of the tokens the fingerprints were taken from, for the chunk
/// size the cache was built with. If a call uses a hasher with a different chunk size, the
/// cache is cleared first. `verified == Some((id, n))` means chunks `0..n` of the cache were
/// fingerprinted from, or compared equal with, the array `id` (so `n <= hashes.len()`); it
/// always describes the last call's array (a call with another identity replaces it, one
/// without an identity clears it), so no other array has changed the cache since. A fingerprint collision (probability about 2^-128 per chunk for
/// tokens a client did not craft against this process's random seeds) would reuse a stale
/// hash; a client that crafts one gains nothing it could not get by sending those tokens.
#[derive(Debug, Clone, Default)]
pub struct ChunkHashCache {
    chunk_size: usize,
    fingerprints: Vec<u128>,
    hashes: Vec<ChunkHash>,
    hashed_chunks_total: u64,
    seeds: FingerprintSeeds,
    verified: Option<(u64, usize)>,
}

#[derive(Debug, Clone, Default)]
struct FingerprintSeeds(foldhash::fast::RandomState, foldhash::fast::RandomState);

impl FingerprintSeeds {
    fn fingerprint(&self, chunk: &[u32]) -> u128 {
        use std::hash::BuildHasher;
        (u128::from(self.0.hash_one(chunk)) << 64) | u128::from(self.1.hash_one(chunk))
    }
}

impl ChunkHashCache {
    /// An empty cache.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns the hashes of chunks `[start / C, end / C)` of `tokens`, where `C` is the
    /// hasher's chunk size, reusing cached hashes for the unchanged token prefix.
    ///
    /// `start` and `end` are token offsets; both must be multiples of `C`, `start <= end`
    /// and `end <= tokens.len()`. If `tokens` diverge from the cached tokens at chunk `k`
    /// (with `k < end / C`), the cache is truncated to `k` chunks and rehashed from there.
    pub fn hashes(
        &mut self,
        hasher: &TokenHasher,
        tokens: &[u32],
        start: usize,
        end: usize,
    ) -> Result<&[ChunkHash], HashError> {
        self.hashes_of(hasher, tokens, None, start, end)
    }

    /// [`hashes`](Self::hashes) for a token array with an `identity` (see the type docs):
    /// chunks already verified against the same identity are not fingerprinted again.
    ///
    /// # Errors
    /// As [`hashes`](Self::hashes).
    pub fn hashes_of(
        &mut self,
        hasher: &TokenHasher,
        tokens: &[u32],
        identity: Option<u64>,
        start: usize,
        end: usize,
    ) -> Result<&[ChunkHash], HashError> {
        let cs = hasher.chunk_size();
        if !start.is_multiple_of(cs) || !end.is_multiple_of(cs) {
            return Err(HashError::Unaligned {
                start,
                end,
                chunk_size: cs,
            });
        }
        if start > end {
            return Err(HashError::ReversedRange { start, end });
        }
        if end > tokens.len() {
            return Err(HashError::RangeOutOfBounds {
                end,
                len: tokens.len(),
            });
        }
        if self.chunk_size != cs {
            self.clear();
            self.chunk_size = cs;
        }

        let needed = end / cs;
        // Keep the longest cached chunk prefix that matches (only the chunks we need are
        // compared; cached chunks past `needed` are checked again by a later call). Chunks
        // verified against this very array are known to match.
        let comparable = self.hashes.len().min(needed);
        let known = match (identity, self.verified) {
            (Some(id), Some((vid, n))) if id == vid => n.min(comparable),
            _ => 0,
        };
        let seeds = &self.seeds;
        let keep = known
            + self.fingerprints[known..comparable]
                .iter()
                .zip(tokens.chunks_exact(cs).skip(known))
                .position(|(&cached, new)| cached != seeds.fingerprint(new))
                .unwrap_or(comparable - known);
        if keep < comparable {
            self.hashes.truncate(keep);
            self.fingerprints.truncate(keep);
            if self.hashes.capacity() > 64 && keep < self.hashes.capacity() / 4 {
                self.hashes.shrink_to(needed);
                self.fingerprints.shrink_to(needed);
            }
        }

        let have = self.hashes.len();
        if have < needed {
            let prefix = self.hashes.last().copied().unwrap_or(NONE_HASH);
            let new_tokens = &tokens[have * cs..needed * cs];
            let mut scratch = Vec::new();
            let hashed = hasher.extend_chain(prefix, new_tokens, &mut self.hashes, &mut scratch);
            let seeds = &self.seeds;
            self.fingerprints
                .extend(new_tokens.chunks_exact(cs).map(|c| seeds.fingerprint(c)));
            self.hashed_chunks_total += hashed as u64;
        }
        // Chunks `0..needed` now match `tokens` (compared, or fingerprinted from them).
        self.verified = identity.map(|id| match self.verified {
            Some((vid, n)) if vid == id => (id, n.max(needed)),
            _ => (id, needed),
        });
        Ok(&self.hashes[start / cs..needed])
    }

    /// The cached hash of chunk `index` (valid for chunks below the `end` of the last
    /// [`hashes`](Self::hashes) call); `None` past the cache.
    pub fn chunk_hash(&self, index: usize) -> Option<ChunkHash> {
        self.hashes.get(index).copied()
    }

    /// Number of chunks whose hashes are cached.
    pub fn cached_chunks(&self) -> usize {
        self.hashes.len()
    }

    /// Total blake3 invocations made by this cache since it was created.
    pub fn hashed_chunks_total(&self) -> u64 {
        self.hashed_chunks_total
    }

    /// Drops every cached fingerprint and hash and their memory (the invocation counter is
    /// kept).
    pub fn clear(&mut self) {
        self.fingerprints = Vec::new();
        self.hashes = Vec::new();
        self.verified = None;
    }

    /// Bytes this cache holds on the heap (its vectors' capacity).
    pub fn heap_bytes(&self) -> usize {
        self.hashes.capacity() * std::mem::size_of::<ChunkHash>()
            + self.fingerprints.capacity() * std::mem::size_of::<u128>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hash::HashAlgorithm;
    use proptest::prelude::*;

    fn hasher(cs: usize) -> TokenHasher {
        TokenHasher::new(cs, HashAlgorithm::Blake3).expect("valid chunk size")
    }

    #[test]
    fn a_cache_gives_memory_back_when_its_token_list_shrinks() {
        let h = hasher(4);
        let long: Vec<u32> = (0..4000).collect();
        let mut cache = ChunkHashCache::new();
        cache.hashes(&h, &long, 0, 4000).expect("aligned");
        assert!(cache.heap_bytes() >= 1000 * 48);
        // Another token list from chunk 0: the cache keeps what it needs, not the old capacity.
        let short: Vec<u32> = (7..15).collect();
        let got = cache.hashes(&h, &short, 0, 8).expect("aligned").to_vec();
        assert_eq!(got, h.hash_chunks(&short));
        assert!(cache.heap_bytes() < 1000 * 48 / 4, "{}", cache.heap_bytes());
        cache.clear();
        assert_eq!(cache.heap_bytes(), 0);
    }

    #[test]
    fn cache_growing_tokens_hashes_each_chunk_once() {
        let h = hasher(4);
        let tokens: Vec<u32> = (0..40).collect();
        let expected = h.hash_chunks(&tokens);
        let mut cache = ChunkHashCache::new();
        for n in 1..=10 {
            let end = n * 4;
            let got = cache.hashes(&h, &tokens[..end], 0, end).expect("aligned");
            assert_eq!(got, &expected[..n]);
            assert_eq!(cache.hashed_chunks_total(), n as u64);
        }
        // Re-asking for any sub-range costs nothing.
        let got = cache.hashes(&h, &tokens, 8, 20).expect("aligned");
        assert_eq!(got, &expected[2..5]);
        assert_eq!(cache.hashed_chunks_total(), 10);
        // A partial trailing chunk in the supplied tokens is never hashed.
        let mut longer = tokens.clone();
        longer.extend([1, 2]);
        cache.hashes(&h, &longer, 0, 40).expect("aligned");
        assert_eq!(cache.hashed_chunks_total(), 10);
    }

    #[test]
    fn cache_divergence_rehashes_from_the_divergent_chunk() {
        let h = hasher(4);
        let a: Vec<u32> = (0..32).collect();
        let mut cache = ChunkHashCache::new();
        cache.hashes(&h, &a, 0, 32).expect("aligned");
        assert_eq!(cache.hashed_chunks_total(), 8);

        let mut b = a.clone();
        b[21] = 999; // chunk 5
        let got = cache.hashes(&h, &b, 0, 32).expect("aligned").to_vec();
        assert_eq!(got, h.hash_chunks(&b));
        assert_eq!(
            cache.hashed_chunks_total(),
            8 + 3,
            "chunks 5, 6, 7 rehashed"
        );
        assert_eq!(got[..5], h.hash_chunks(&a)[..5]);
    }

    #[test]
    fn cache_divergence_past_the_range_is_harmless() {
        let h = hasher(4);
        let a: Vec<u32> = (0..32).collect();
        let mut b = a.clone();
        b[30] = 7;
        let mut cache = ChunkHashCache::new();
        cache.hashes(&h, &a, 0, 32).expect("aligned");
        let got = cache.hashes(&h, &b, 0, 16).expect("aligned").to_vec();
        assert_eq!(got, h.hash_chunks(&b[..16]));
        assert_eq!(cache.hashed_chunks_total(), 8);
        let got = cache.hashes(&h, &b, 16, 32).expect("aligned").to_vec();
        assert_eq!(got, h.hash_chunks(&b)[4..]);
        assert_eq!(cache.hashed_chunks_total(), 9, "only chunk 7 rehashed");
    }

    #[test]
    fn cache_range_errors() {
        let h = hasher(4);
        let tokens: Vec<u32> = (0..16).collect();
        let mut cache = ChunkHashCache::new();
        assert_eq!(
            cache.hashes(&h, &tokens, 1, 8),
            Err(HashError::Unaligned {
                start: 1,
                end: 8,
                chunk_size: 4
            })
        );
        assert!(matches!(
            cache.hashes(&h, &tokens, 0, 6),
            Err(HashError::Unaligned { .. })
        ));
        assert_eq!(
            cache.hashes(&h, &tokens, 8, 4),
            Err(HashError::ReversedRange { start: 8, end: 4 })
        );
        assert_eq!(
            cache.hashes(&h, &tokens, 0, 20),
            Err(HashError::RangeOutOfBounds { end: 20, len: 16 })
        );
        assert_eq!(cache.hashes(&h, &tokens, 8, 8), Ok(&[][..]));
        assert_eq!(cache.hashed_chunks_total(), 2);
    }

    #[test]
    fn cache_skips_fingerprints_only_for_the_array_it_verified() {
        let h = hasher(4);
        let a: Vec<u32> = (0..32).collect();
        let mut b = a.clone();
        b[9] = 999; // chunk 2
        let mut cache = ChunkHashCache::new();
        cache.hashes_of(&h, &a, Some(1), 0, 32).expect("aligned");
        assert_eq!(cache.verified, Some((1, 8)));
        // The same array again: nothing compared, nothing hashed.
        let got = cache.hashes_of(&h, &a, Some(1), 0, 32).expect("aligned");
        assert_eq!(got, &h.hash_chunks(&a)[..]);
        assert_eq!(cache.hashed_chunks_total(), 8);
        // Another array diverging at chunk 2 truncates what array 1 is known to match ...
        let got = cache.hashes_of(&h, &b, Some(2), 0, 16).expect("aligned");
        assert_eq!(got, &h.hash_chunks(&b)[..4]);
        assert_eq!(cache.verified, Some((2, 4)));
        // ... so array 1 coming back is compared past chunk 0 and rehashed from chunk 2.
        let got = cache.hashes_of(&h, &a, Some(1), 0, 32).expect("aligned");
        assert_eq!(got, &h.hash_chunks(&a)[..]);
        assert_eq!(cache.hashed_chunks_total(), 8 + 2 + 6);
        // A call without an identity forgets the verification.
        cache.hashes(&h, &a, 0, 8).expect("aligned");
        assert_eq!(cache.verified, None);
    }

    #[test]
    fn cache_keeps_verification_past_a_shorter_call_of_the_same_array() {
        let h = hasher(4);
        let a: Vec<u32> = (0..32).collect();
        let mut cache = ChunkHashCache::new();
        cache.hashes_of(&h, &a, Some(7), 0, 32).expect("aligned");
        cache.hashes_of(&h, &a, Some(7), 8, 12).expect("aligned");
        assert_eq!(cache.verified, Some((7, 8)));
        cache.clear();
        assert_eq!(cache.verified, None);
    }

    #[test]
    fn cache_resets_on_chunk_size_change() {
        let tokens: Vec<u32> = (0..16).collect();
        let mut cache = ChunkHashCache::new();
        cache.hashes(&hasher(4), &tokens, 0, 16).expect("aligned");
        let got = cache
            .hashes(&hasher(8), &tokens, 0, 16)
            .expect("aligned")
            .to_vec();
        assert_eq!(got, hasher(8).hash_chunks(&tokens));
        assert_eq!(cache.cached_chunks(), 2);
    }

    proptest! {
        #[test]
        fn cache_matches_one_shot(
            cs in 1usize..6,
            base in proptest::collection::vec(0u32..3, 0..60),
            calls in proptest::collection::vec(
                (0usize..60, 0usize..60, 0usize..60, proptest::option::of((0usize..60, 0u32..3))),
                1..12,
            ),
        ) {
            let h = hasher(cs);
            let mut cache = ChunkHashCache::new();
            let mut shadow: Vec<u32> = Vec::new();
            let mut tokens = base;
            for (len, a, b, edit) in calls {
                // Each call sees a prefix-or-extension of the evolving token list,
                // sometimes with one token changed (a divergence).
                if let Some((pos, value)) = edit
                    && let Some(t) = tokens.get_mut(pos)
                {
                    *t = value;
                }
                tokens.resize(len, 1);
                let n_chunks = tokens.len() / cs;
                let (lo, hi) = ((a % (n_chunks + 1)).min(b % (n_chunks + 1)),
                                (a % (n_chunks + 1)).max(b % (n_chunks + 1)));
                // Chunks the cache can reuse: its leading chunks that still match (a chunk
                // size change clears it), capped at what this call needs.
                // `shadow` mirrors the tokens the cache has fingerprinted.
                let reusable = shadow
                    .chunks_exact(cs)
                    .zip(tokens.chunks_exact(cs))
                    .take_while(|(old, new)| old == new)
                    .count()
                    .min(hi);
                if reusable < (shadow.len() / cs).min(hi) {
                    shadow.truncate(reusable * cs);
                }
                if shadow.len() / cs < hi {
                    let have = shadow.len();
                    shadow.extend_from_slice(&tokens[have..hi * cs]);
                }
                let before = cache.hashed_chunks_total();
                let got = cache.hashes(&h, &tokens, lo * cs, hi * cs).expect("aligned").to_vec();
                let expected = h.hash_chunks(&tokens);
                prop_assert_eq!(&got[..], &expected[lo..hi]);
                // Exactly the chunks that were not reusable are hashed, once each.
                prop_assert_eq!(cache.hashed_chunks_total() - before, (hi - reusable) as u64);
            }
        }

        /// With identities (equal only for equal arrays; arrays come back after others),
        /// every answer is the one-shot hash of the array asked about.
        #[test]
        fn cache_with_identities_matches_one_shot(
            cs in 1usize..5,
            arrays in proptest::collection::vec(proptest::collection::vec(0u32..3, 0..40), 1..5),
            calls in proptest::collection::vec((0usize..5, 0usize..40, 0usize..40, any::<bool>()), 1..16),
        ) {
            let h = hasher(cs);
            let mut cache = ChunkHashCache::new();
            for (which, a, b, with_identity) in calls {
                let which = which % arrays.len();
                let tokens = &arrays[which];
                let n_chunks = tokens.len() / cs;
                let (lo, hi) = ((a % (n_chunks + 1)).min(b % (n_chunks + 1)),
                                (a % (n_chunks + 1)).max(b % (n_chunks + 1)));
                let id = with_identity.then_some(which as u64);
                let got = cache
                    .hashes_of(&h, tokens, id, lo * cs, hi * cs)
                    .expect("aligned")
                    .to_vec();
                prop_assert_eq!(&got[..], &h.hash_chunks(tokens)[lo..hi]);
                if let Some((_, n)) = cache.verified {
                    prop_assert!(n <= cache.cached_chunks());
                }
            }
        }
    }
}
