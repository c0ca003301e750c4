//! Observers of what L1 holds: told when an object becomes readable and when a readable
//! object stops being readable, in L1 order.
//!
//! Contract (the KV-event log relies on it):
//! - `published(key)` is called once per successful publish (`finish_write*`), after the object
//!   is readable; `removed(key)` once when a *published* object leaves the index, whatever the
//!   reason (eviction, delete, clear, a temporary object's last reader leaving, a forced clear
//!   dooming a locked object). Staging objects that are never published produce no call.
//! - For one key, calls alternate `published`, `removed`, `published`, ... — a removal never
//!   precedes its publish.
//! - Both are called **with the L1 mutex held**, so they see L1's own order. A listener must do
//!   bounded O(1) work, never block, never do I/O, and never call back into L1.

use std::fmt::Debug;

use crate::key::ObjectKey;

/// See the module docs.
pub trait L1Listener: Send + Sync + Debug {
    /// `key` became readable.
    fn published(&self, key: &ObjectKey);
    /// The readable object `key` left L1.
    fn removed(&self, key: &ObjectKey);
}
