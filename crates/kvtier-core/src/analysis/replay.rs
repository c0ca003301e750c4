//! [`Replay`]: plays prefix lookups against the real [`L1Manager`] with any eviction policy,
//! the way an engine drives kvtier. Shared by the policy benchmark
//! (`benches/policy_hit_rate.rs`) and `kvtier simulate`, so both measure the same thing.
//!
//! One request does what an engine does: `reserve_read_prefix` (the hit count is the prefix
//! found in L1), release the locks, then store the chunks that missed (`reserve_write` +
//! `finish_write`, evicting synchronously when L1 is full). No background eviction runs: the
//! replayed cache fills to its capacity (the server's background eviction keeps L1 below its
//! watermark, see `docs/hit-rate-curve.md`). The allocator works on offsets only, so no memory
//! is touched and a replay costs O(chunks) of L1 work per request.
//!
//! Chunk identities are 64-bit ids (the lookup log keeps the first 8 bytes of each chunk hash);
//! a key is `(id, model, rank, cache_salt)`, so tenants never share objects.

use std::sync::Arc;

use crate::hash::ChunkHash;
use crate::key::ObjectKey;
use crate::l1::{EvictionPolicyKind, L1Config, L1Manager};

/// One replayed cache.
#[derive(Debug)]
pub struct Replay {
    l1: L1Manager,
}

impl Replay {
    /// An empty L1 of `capacity_bytes` evicting with `policy` (4 KiB alignment, default
    /// watermarks; eviction happens synchronously when a store finds no room).
    pub fn new(capacity_bytes: u64, policy: EvictionPolicyKind) -> Self {
        let mut cfg = L1Config::with_capacity(capacity_bytes);
        cfg.eviction.policy = policy;
        Self {
            l1: L1Manager::new(cfg),
        }
    }

    /// The replayed L1 manager (for quotas and counters).
    pub fn l1(&self) -> &L1Manager {
        &self.l1
    }

    /// The object key of chunk `id` (its first 8 hash bytes) of a tenant and model.
    pub fn key(id: u64, model: &Arc<str>, kv_rank: u32, salt: &Arc<str>) -> ObjectKey {
        let mut h = [0u8; 32];
        h[..8].copy_from_slice(&id.to_le_bytes());
        ObjectKey {
            chunk_hash: ChunkHash::from_bytes(h),
            model_name: Arc::clone(model),
            kv_rank,
            object_group_id: 0,
            cache_salt: Arc::clone(salt),
        }
    }

    /// Replays one lookup of `keys` (a prompt's chunks in order, each `chunk_bytes` long):
    /// returns the prefix hit count, then stores the chunks that missed.
    pub fn request(&self, keys: &[ObjectKey], chunk_bytes: u64) -> usize {
        let leases = self.l1.reserve_read_prefix(keys, 1, 1);
        let hits = leases.len();
        self.l1.finish_read(&leases, 1);
        let items: Vec<(ObjectKey, u64)> = keys[hits..]
            .iter()
            .map(|k| (k.clone(), chunk_bytes.max(1)))
            .collect();
        let tickets: Vec<_> = self
            .l1
            .reserve_write(&items, false)
            .into_iter()
            .filter_map(Result::ok)
            .collect();
        self.l1.finish_write(&tickets);
        hits
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_hits_and_eviction() {
        let r = Replay::new(4 * 4096, EvictionPolicyKind::Lru);
        let (m, s): (Arc<str>, Arc<str>) = (Arc::from("m"), Arc::from(""));
        let keys = |ids: &[u64]| -> Vec<ObjectKey> {
            ids.iter().map(|&i| Replay::key(i, &m, 0, &s)).collect()
        };
        assert_eq!(r.request(&keys(&[1, 2, 3]), 4096), 0);
        assert_eq!(r.request(&keys(&[1, 2, 3]), 4096), 3);
        assert_eq!(r.request(&keys(&[1, 9, 3]), 4096), 1);
        // 4 objects fit: 1, 2, 3, 9 are cached; one more evicts the least recent (2).
        assert_eq!(r.request(&keys(&[5]), 4096), 0);
        assert_eq!(r.request(&keys(&[1, 2]), 4096), 1);
    }
}
