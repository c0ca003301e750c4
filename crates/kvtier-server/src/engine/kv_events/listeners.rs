//! How changes in L1 and L2 become records: the L1 listener (called under the L1 mutex, O(1)
//! work under the log's own mutex), the L2 listener (per adapter medium), both consulting the
//! resident counts (`resident.rs`) so that an identity is announced once per medium, and the
//! record built from a key and its binding.

use super::*;

impl KvEvents {
    /// Every medium's name, by medium index (0 = L1).
    pub(super) fn media(&self) -> impl Iterator<Item = &'static str> + '_ {
        std::iter::once(MEDIUM_CPU).chain(self.l2_media.get().into_iter().flatten().copied())
    }

    /// A copy of `key` now lives in medium `medium`: announces its identity if it is new there.
    /// `bound` says whether to take the tokens and parent from the store path's binding (L1).
    fn stored_in(&self, medium: usize, name: &'static str, key: &ObjectKey, bound: bool) {
        let Ok(m) = u8::try_from(medium) else { return };
        let mut s = self.state.lock();
        if !s.resident.add(m, &key.model_name, &key.chunk_hash) {
            return;
        }
        let (parent, tokens) = match bound.then(|| s.bindings.remove(&key.chunk_hash)) {
            Some(Some(b)) => (b.parent, b.tokens),
            Some(None) => {
                self.counters.unbound_stores_total.inc();
                (None, TokenSpan::default())
            }
            None => (None, TokenSpan::default()),
        };
        let mut record = new_record(&s, KvEventKind::Stored, name, key);
        record.parent_block_hash = parent.map(|p| *p.as_bytes());
        record.token_ids = tokens;
        self.append(&mut s, medium, record);
    }

    /// A copy of `key` left medium `medium`: announces the removal when it was the last one.
    fn removed_from(&self, medium: usize, name: &'static str, key: &ObjectKey) {
        let Ok(m) = u8::try_from(medium) else { return };
        let mut s = self.state.lock();
        if !s.resident.remove(m, &key.model_name, &key.chunk_hash) {
            return;
        }
        let record = new_record(&s, KvEventKind::Removed, name, key);
        self.append(&mut s, medium, record);
    }

    fn l2_medium(&self, adapter: usize) -> Option<&'static str> {
        self.l2_media.get()?.get(adapter).copied()
    }
}

/// The record of one chunk with the log's next sequence number (no parent, no tokens).
fn new_record(
    s: &State,
    kind: KvEventKind,
    medium: &'static str,
    key: &ObjectKey,
) -> KvEventRecord {
    KvEventRecord {
        seq: s.next_seq,
        kind,
        medium,
        model_name: Arc::clone(&key.model_name),
        block_hash: *key.chunk_hash.as_bytes(),
        parent_block_hash: None,
        token_ids: TokenSpan::default(),
    }
}

impl L1Listener for KvEvents {
    fn published(&self, key: &ObjectKey) {
        self.stored_in(0, MEDIUM_CPU, key, true);
    }

    fn removed(&self, key: &ObjectKey, _cause: RemovalCause) {
        self.removed_from(0, MEDIUM_CPU, key);
    }
}

impl L2Listener for KvEvents {
    fn stored(&self, adapter: usize, key: &ObjectKey) {
        if let Some(name) = self.l2_medium(adapter) {
            self.stored_in(adapter + 1, name, key, false);
        }
    }

    fn removed(&self, adapter: usize, key: &ObjectKey) {
        if let Some(name) = self.l2_medium(adapter) {
            self.removed_from(adapter + 1, name, key);
        }
    }
}
