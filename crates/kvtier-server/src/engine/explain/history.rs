//! The chunk history: what last happened in L1 to each recently seen chunk, so that a lookup
//! miss can be explained ("evicted 42 s ago to make room for a store", "never stored", "held
//! under another cache_salt").
//!
//! It is an [`L1Listener`]: told of every publish, removal (with its cause) and discarded
//! write, under the L1 mutex, in L1 order. Each event overwrites the slot of its
//! `(chunk hash, owner)` pair, where the owner is `(model, cache_salt)`; kv ranks share a slot
//! (a chunk is usable only when every rank is present, so the last event of any rank is the
//! one that explains a miss).
//!
//! Layout and bound: a set-associative table of `buckets × 4` slots of 16 bytes (one 64-byte
//! cache line per bucket), allocated once: `--miss-history-chunks` rounded up to a power of two
//! times 16 bytes (the default, 262,144 slots, is 4 MiB). An event touches one bucket: it
//! updates its pair's slot or replaces the bucket's oldest slot. So the table remembers at least
//! the last `slots / 4` distinct pairs and usually close to `slots`; an older chunk is reported
//! as "never stored (or not seen recently)". A slot stores 32 bits of the chunk hash as its tag
//! (the bucket index uses other bits), so two chunks are confused with probability about
//! `4 / 2^32` per query.
//!
//! Hand-written because no crate offers a fixed-memory, allocation-free map with
//! "replace the oldest" eviction that can be updated in O(1) under another component's lock.
//!
//! Locking: one mutex around the table, a leaf: taken under the L1 mutex by the listener calls
//! and alone by [`ChunkHistory::fate`]; held for one bucket's work.

use std::hash::BuildHasher;
use std::time::Instant;

use kvtier_core::hash::ChunkHash;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::{EvictedFor, L1Listener, RemovalCause};
use parking_lot::Mutex;

/// Slots per bucket (one cache line of 16-byte slots).
const WAYS: usize = 4;

/// Default slot count (`--miss-history-chunks`).
pub const DEFAULT_SLOTS: usize = 1 << 18;

/// Bytes per slot (stated in the docs and the status tree).
pub const SLOT_BYTES: usize = std::mem::size_of::<Slot>();

/// What last happened to a chunk in L1.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fate {
    /// Published and not removed since.
    Stored,
    /// Evicted, and what for.
    Evicted(EvictedFor),
    /// Deleted by key.
    Deleted,
    /// Removed by a clear.
    Cleared,
    /// Loaded from L2 for a request and freed after it.
    Released,
    /// A write whose lock lapsed before the writer committed.
    Discarded,
}

impl Fate {
    fn code(self) -> u8 {
        match self {
            Self::Stored => 1,
            Self::Evicted(EvictedFor::Watermark) => 2,
            Self::Evicted(EvictedFor::Allocation) => 3,
            Self::Evicted(EvictedFor::Quota) => 4,
            Self::Deleted => 5,
            Self::Cleared => 6,
            Self::Released => 7,
            Self::Discarded => 8,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Some(match code {
            1 => Self::Stored,
            2 => Self::Evicted(EvictedFor::Watermark),
            3 => Self::Evicted(EvictedFor::Allocation),
            4 => Self::Evicted(EvictedFor::Quota),
            5 => Self::Deleted,
            6 => Self::Cleared,
            7 => Self::Released,
            8 => Self::Discarded,
            _ => return None,
        })
    }

    fn of_removal(cause: RemovalCause) -> Self {
        match cause {
            RemovalCause::Evicted(why) => Self::Evicted(why),
            RemovalCause::Deleted => Self::Deleted,
            RemovalCause::Cleared => Self::Cleared,
            RemovalCause::Released => Self::Released,
            RemovalCause::Discarded => Self::Discarded,
        }
    }
}

/// A chunk's remembered history, as seen by one owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Recall {
    /// This owner's last event for the chunk and how many seconds ago it happened.
    pub own: Option<(Fate, u32)>,
    /// Another `(model, cache_salt)` holds the same tokens (its last event is a publish).
    pub other_owner_stored: bool,
}

/// One remembered `(chunk, owner)` pair. `tag == 0` marks an empty slot.
#[derive(Debug, Clone, Copy, Default)]
struct Slot {
    tag: u32,
    owner: u32,
    /// The table's event number when this slot was written (replacement picks the oldest,
    /// compared by wrapping distance).
    seq: u32,
    /// `seconds since the history was created << 8 | fate code` (seconds saturate at 2^24 - 1,
    /// about 194 days).
    packed: u32,
}

const MAX_SECS: u32 = (1 << 24) - 1;

#[derive(Debug)]
struct Table {
    buckets: Box<[[Slot; WAYS]]>,
    mask: usize,
    seq: u32,
}

/// See the module docs.
#[derive(Debug)]
pub struct ChunkHistory {
    table: Mutex<Table>,
    slots: usize,
    born: Instant,
}

/// `(bucket index bits, tag)` of a chunk hash (its bytes are a cryptographic hash's output).
fn split(hash: &ChunkHash) -> (usize, u32) {
    let b = hash.as_bytes();
    let lo = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let tag = u32::from_le_bytes([b[8], b[9], b[10], b[11]]) | 1;
    (lo as usize, tag)
}

/// The 32-bit fingerprint of an owner `(model, cache_salt)`.
pub fn owner_of(model: &str, cache_salt: &str) -> u32 {
    let h =
        foldhash::fast::FixedState::with_seed(0x6f77_6e65_7273_6869).hash_one((model, cache_salt));
    (h >> 32) as u32
}

impl ChunkHistory {
    /// A history of about `slots` slots (rounded up to a power of two, at least one bucket).
    pub fn new(slots: usize) -> Self {
        let buckets = slots.div_ceil(WAYS).max(1).next_power_of_two();
        Self {
            table: Mutex::new(Table {
                buckets: vec![[Slot::default(); WAYS]; buckets].into_boxed_slice(),
                mask: buckets - 1,
                seq: 0,
            }),
            slots: buckets * WAYS,
            born: Instant::now(),
        }
    }

    /// Slots in the table.
    pub fn slots(&self) -> usize {
        self.slots
    }

    /// Bytes the table holds (fixed at creation).
    pub fn bytes(&self) -> usize {
        self.slots * SLOT_BYTES
    }

    fn now(&self) -> u32 {
        u32::try_from(self.born.elapsed().as_secs())
            .unwrap_or(MAX_SECS)
            .min(MAX_SECS)
    }

    fn note(&self, key: &ObjectKey, fate: Fate) {
        let (idx, tag) = split(&key.chunk_hash);
        let owner = owner_of(&key.model_name, &key.cache_salt);
        let at = self.now();
        let mut t = self.table.lock();
        t.seq = t.seq.wrapping_add(1);
        let seq = t.seq;
        let mask = t.mask;
        let bucket = &mut t.buckets[idx & mask];
        let pos = bucket
            .iter()
            .position(|s| s.tag == tag && s.owner == owner)
            .or_else(|| bucket.iter().position(|s| s.tag == 0))
            .unwrap_or_else(|| {
                // Full: replace the slot written longest ago.
                let mut oldest = 0;
                for (i, s) in bucket.iter().enumerate() {
                    if seq.wrapping_sub(s.seq) > seq.wrapping_sub(bucket[oldest].seq) {
                        oldest = i;
                    }
                }
                oldest
            });
        bucket[pos] = Slot {
            tag,
            owner,
            seq,
            packed: at << 8 | u32::from(fate.code()),
        };
    }

    /// What the history remembers of `hash` for `owner`.
    pub fn fate(&self, hash: &ChunkHash, owner: u32) -> Recall {
        let (idx, tag) = split(hash);
        let now = self.now();
        let t = self.table.lock();
        let mut recall = Recall::default();
        for s in &t.buckets[idx & t.mask] {
            if s.tag != tag {
                continue;
            }
            let fate = Fate::from_code((s.packed & 0xff) as u8);
            if s.owner == owner {
                recall.own = fate.map(|f| (f, now.saturating_sub(s.packed >> 8)));
            } else if fate == Some(Fate::Stored) {
                recall.other_owner_stored = true;
            }
        }
        recall
    }
}

impl L1Listener for ChunkHistory {
    fn published(&self, key: &ObjectKey) {
        self.note(key, Fate::Stored);
    }

    fn removed(&self, key: &ObjectKey, cause: RemovalCause) {
        self.note(key, Fate::of_removal(cause));
    }

    fn discarded(&self, key: &ObjectKey) {
        self.note(key, Fate::Discarded);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: u8, salt: &str) -> ObjectKey {
        let mut h = [0u8; 32];
        h[0] = n;
        h[8] = n.wrapping_mul(7);
        ObjectKey::new(
            ChunkHash::from_slice(&h).expect("32 bytes"),
            "m".into(),
            0x0101_0001,
            0,
            salt.into(),
        )
        .expect("valid key")
    }

    #[test]
    fn remembers_each_owners_last_event() {
        let h = ChunkHistory::new(64);
        let (a, b) = (key(1, ""), key(1, "tenant-b"));
        let own = owner_of("m", "");
        assert_eq!(h.fate(&a.chunk_hash, own), Recall::default());
        h.published(&b);
        let r = h.fate(&a.chunk_hash, own);
        assert_eq!(r.own, None);
        assert!(r.other_owner_stored);
        h.published(&a);
        h.removed(&a, RemovalCause::Evicted(EvictedFor::Allocation));
        let r = h.fate(&a.chunk_hash, own);
        assert_eq!(
            r.own.map(|x| x.0),
            Some(Fate::Evicted(EvictedFor::Allocation))
        );
        assert!(r.other_owner_stored);
        h.discarded(&a);
        assert_eq!(
            h.fate(&a.chunk_hash, own).own.map(|x| x.0),
            Some(Fate::Discarded)
        );
    }

    #[test]
    fn memory_is_fixed_and_the_oldest_slot_goes() {
        let h = ChunkHistory::new(4);
        assert_eq!(h.slots(), 4);
        assert_eq!(h.bytes(), 64);
        for n in 0..10u8 {
            h.published(&key(n, ""));
        }
        let own = owner_of("m", "");
        let remembered: Vec<u8> = (0..10u8)
            .filter(|&n| h.fate(&key(n, "").chunk_hash, own).own.is_some())
            .collect();
        assert_eq!(remembered, vec![6, 7, 8, 9]);
    }
}
