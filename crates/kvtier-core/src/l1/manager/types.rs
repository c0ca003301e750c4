//! The values the L1 manager's operations take and return: per-key errors, the byte range of an
//! object, the proof of a write reservation ([`WriteTicket`]) or of read locks
//! ([`ReadLease`]), and what an eviction round or a clear did. A ticket or lease names its slot
//! by id and generation, so one that outlives its object is refused, never misapplied.

use super::EntryId;

/// Outcome of an L1 operation on one key (LMCache's `L1Error`, minus `SUCCESS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum L1Error {
    /// No such object (or the handle refers to an object that is gone).
    #[error("key does not exist")]
    KeyNotExist,
    /// The object exists but is still being written.
    #[error("key is not readable (still being written)")]
    KeyNotReadable,
    /// The object already exists (or is being written by someone else).
    #[error("key is not writable (already present or being written)")]
    KeyNotWritable,
    /// The operation does not apply to the object's current state.
    #[error("key is in the wrong state for this operation")]
    KeyInWrongState,
    /// The object is locked and cannot be deleted.
    #[error("key is locked")]
    KeyIsLocked,
    /// L1 has no room for the batch even after evicting everything evictable.
    #[error("out of L1 memory")]
    OutOfMemory,
    /// The key's tenant (`cache_salt`) has no room within its quota even after evicting its own
    /// unlocked objects.
    #[error("the cache_salt's L1 quota is exhausted")]
    QuotaExceeded,
}

impl L1Error {
    /// Short stable label for metrics.
    pub fn label(self) -> &'static str {
        match self {
            Self::KeyNotExist => "key_not_exist",
            Self::KeyNotReadable => "key_not_readable",
            Self::KeyNotWritable => "key_not_writable",
            Self::KeyInWrongState => "key_in_wrong_state",
            Self::KeyIsLocked => "key_is_locked",
            Self::OutOfMemory => "out_of_memory",
            Self::QuotaExceeded => "quota_exceeded",
        }
    }
}

/// A byte range of the pool holding one object.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Allocation {
    /// Byte offset into the pool; a multiple of the alignment.
    pub offset: u64,
    /// Object length in bytes (the reserved range is rounded up to the alignment).
    pub len: u64,
}

/// Proof of a staging reservation: only its holder can publish or abort the object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteTicket {
    pub(super) id: EntryId,
    pub(super) generation: u32,
    /// The key's fingerprint when the policy takes hints (0 otherwise), so that the hint before
    /// a batch is published costs neither an entry lookup nor a hash.
    pub(super) fingerprint: u64,
    /// Where to write the object's bytes.
    pub alloc: Allocation,
}

/// Proof of read locks taken on one object; release it with [`L1Manager::finish_read`](super::L1Manager::finish_read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadLease {
    pub(super) id: EntryId,
    pub(super) generation: u32,
    pub(super) epoch: u32,
    /// Whether taking and releasing the lock counts as an access for the eviction policy
    /// (false for kvtier's own copies: write-behind and prefetch pins).
    pub(super) touch: bool,
    /// Where the object's bytes are.
    pub alloc: Allocation,
}

/// What an eviction round did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvictionOutcome {
    /// Objects removed.
    pub objects: u64,
    /// Bytes returned to the allocator.
    pub bytes: u64,
}

/// What a clear did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ClearOutcome {
    /// Objects freed immediately.
    pub removed: u64,
    /// Locked objects hidden now and freed when their locks end (force only).
    pub doomed: u64,
    /// Locked objects left in place (no force).
    pub kept: u64,
}
