//! Change notifications from the L2 adapters: which objects an adapter now holds or no longer
//! holds, for the KV-event publisher (a router learns that a prefix evicted from L1 is still one
//! prefetch away in Redis or on disk).
//!
//! Notifications come from the [`ObjectIndex`](crate::index::ObjectIndex) every index-backed
//! adapter keeps (`fs`, `resp`, `valkey`, `mock`): `stored` when a key is indexed for the first
//! time (a completed store, or the index rebuilt from disk at start), `removed` whenever a key
//! leaves the index (eviction, delete, a corrupt object found on load, an over-capacity
//! rebuild). They are made under the adapter's index mutex, so for one adapter they are in index
//! order; a listener must therefore do O(1), non-blocking work (the same rule as
//! [`L1Listener`](kvtier_core::l1::L1Listener)).
//!
//! What is *not* seen: objects a shared remote store loses on its own (Redis `maxmemory`
//! eviction, a flushed database) or that other kvtier nodes write into the same store. The
//! notifications describe this node's index, which is also what its lookups answer from.

use std::fmt;
use std::sync::Arc;

use kvtier_core::key::ObjectKey;

/// Receives an adapter's index changes. See the module docs for the rules.
pub trait L2Listener: Send + Sync + fmt::Debug + 'static {
    /// `adapter` (its index in `--l2-adapter` order) now holds `key`.
    fn stored(&self, adapter: usize, key: &ObjectKey);
    /// `adapter` no longer holds `key`.
    fn removed(&self, adapter: usize, key: &ObjectKey);
}

/// A listener bound to one adapter: what an [`ObjectIndex`](crate::index::ObjectIndex) keeps.
#[derive(Debug, Clone)]
pub struct BoundListener {
    adapter: usize,
    sink: Arc<dyn L2Listener>,
}

impl BoundListener {
    /// `sink`, told about adapter number `adapter`.
    pub fn new(adapter: usize, sink: Arc<dyn L2Listener>) -> Self {
        Self { adapter, sink }
    }

    pub(crate) fn stored(&self, key: &ObjectKey) {
        self.sink.stored(self.adapter, key);
    }

    pub(crate) fn removed(&self, key: &ObjectKey) {
        self.sink.removed(self.adapter, key);
    }
}
