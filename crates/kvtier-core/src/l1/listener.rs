//! Observers of what L1 holds: told when an object becomes readable and when a readable
//! object stops being readable, in L1 order, and why.
//!
//! Contract (the KV-event log and the miss history rely on it):
//! - `published(key)` is called once per successful publish (`finish_write*`), after the object
//!   is readable; `removed(key, cause)` once when a *published* object leaves the index,
//!   whatever the reason (eviction, delete, clear, a temporary object's last reader leaving, a
//!   forced clear dooming a locked object). Staging objects that are never published produce no
//!   `published`/`removed` call; one whose write lock lapses produces one `discarded(key)`.
//! - For one key, `published` and `removed` alternate — a removal never precedes its publish.
//! - All are called **with the L1 mutex held**, so they see L1's own order. A listener must do
//!   bounded O(1) work, never block, never do I/O, and never call back into L1.

use std::fmt::Debug;
use std::sync::Arc;

use crate::key::ObjectKey;

/// Why an object left L1 (what a listener is told; the eviction policy only distinguishes
/// evictions from the rest, [`super::eviction::Removal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovalCause {
    /// Chosen as an eviction victim.
    Evicted(EvictedFor),
    /// Deleted by key.
    Deleted,
    /// Removed by a clear (or doomed by a forced clear while locked).
    Cleared,
    /// A temporary object (loaded from L2 for one request) freed after its last reader.
    Released,
    /// A staging object thrown away (aborted, void write, or a quarantine freed); never readable.
    Discarded,
}

/// What an eviction made room for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EvictedFor {
    /// The background eviction controller, above its watermark.
    Watermark,
    /// A store that did not fit (synchronous eviction on allocation failure).
    Allocation,
    /// The object's tenant was over its quota.
    Quota,
}

impl EvictedFor {
    /// A short human-readable phrase ("to make room for a store", ...).
    pub fn describe(self) -> &'static str {
        match self {
            Self::Watermark => "by the background eviction above the watermark",
            Self::Allocation => "to make room for a store",
            Self::Quota => "because its tenant was over its quota",
        }
    }
}

/// See the module docs.
pub trait L1Listener: Send + Sync + Debug {
    /// `key` became readable.
    fn published(&self, key: &ObjectKey);
    /// The readable object `key` left L1.
    fn removed(&self, key: &ObjectKey, cause: RemovalCause);
    /// A staging object's write lock lapsed before its writer committed: its bytes never became
    /// readable and its key is free again.
    fn discarded(&self, _key: &ObjectKey) {}
}

/// Several listeners behind one (L1 takes one); each is told in the order given.
#[derive(Debug)]
pub struct Listeners(pub Vec<Arc<dyn L1Listener>>);

impl L1Listener for Listeners {
    fn published(&self, key: &ObjectKey) {
        for l in &self.0 {
            l.published(key);
        }
    }

    fn removed(&self, key: &ObjectKey, cause: RemovalCause) {
        for l in &self.0 {
            l.removed(key, cause);
        }
    }

    fn discarded(&self, key: &ObjectKey) {
        for l in &self.0 {
            l.discarded(key);
        }
    }
}
