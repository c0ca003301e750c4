//! Helpers shared by the kvtier-core integration tests.

use std::sync::Arc;

use kvtier_core::hash::ChunkHash;
use kvtier_core::key::ObjectKey;

/// A distinct key per `n` (model "m", rank 0).
pub fn key(n: u32) -> ObjectKey {
    let mut h = [0u8; 32];
    h[..4].copy_from_slice(&n.to_be_bytes());
    ObjectKey {
        chunk_hash: ChunkHash::from_bytes(h),
        model_name: Arc::from("m"),
        kv_rank: 0x0100_0100,
        object_group_id: 0,
        cache_salt: Arc::from(""),
    }
}
