//! The locked table's own bookkeeping ([`Inner`]): slot insertion and generations, the key
//! index and its rehash through the slots, shrinking after a `clear`, and the per-entry
//! derived values (allocation, reservation, tenant, policy metadata). Called with the L1 lock
//! held; nothing here takes another lock.

use super::*;

impl Inner {
    /// A read of `id` counts as an access: its recency moves in the policy and in its tenant's
    /// list.
    pub(super) fn touch(&mut self, id: EntryId) {
        let tenant = self.entry(id).map_or(TenantId::MAX, |e| self.tenant_of(e));
        self.policy.on_access(id, tenant);
        self.tenants.on_access(tenant, id);
    }

    /// Gives back the empty tail of the slot vector and the slack of the free list and the
    /// index (end of a `clear`; O(slots dropped + free list)). A stale ticket or lease naming a
    /// dropped slot keeps failing: `live` finds no slot, and a slot created again at that
    /// position starts at `generation_floor`, at least the dropped slot's generation (which its
    /// removal already moved past every ticket's).
    pub(super) fn shrink(&mut self) {
        let mut keep = self.slots.len();
        while keep > 0 && self.slots[keep - 1].entry.is_none() {
            keep -= 1;
            self.generation_floor = self.generation_floor.max(self.slots[keep].generation);
        }
        if keep < self.slots.len() {
            self.slots.truncate(keep);
            self.slots.shrink_to_fit();
            self.free_slots.retain(|&id| (id as usize) < keep);
        }
        self.free_slots.shrink_to_fit();
        let slots = &self.slots;
        self.index.shrink_to_fit(|id| key_in(slots, id));
        self.policy.shrink(keep);
        self.tenants.shrink(keep);
        self.ns.shrink();
    }

    /// The entry id of `key`, if indexed (a key whose namespace is unknown is not).
    pub(super) fn lookup(&self, key: &ObjectKey) -> Option<EntryId> {
        let ns = self.ns.find(key)?;
        self.index_get((key.chunk_hash, ns))
    }

    pub(super) fn index_get(&self, key: (ChunkHash, NsId)) -> Option<EntryId> {
        self.index
            .get((&key.0, key.1), |id| key_in(&self.slots, id))
    }

    pub(super) fn index_remove(&mut self, key: (ChunkHash, NsId), id: EntryId) {
        self.index.remove((&key.0, key.1), id);
    }

    /// The pool range of an entry.
    pub(super) fn alloc_of(&self, e: &Entry) -> Allocation {
        Allocation {
            offset: u64::from(e.offset) << self.align_shift,
            len: u64::from(e.len),
        }
    }

    /// Bytes reserved for an entry (its length rounded up to the alignment).
    pub(super) fn reserved(&self, e: &Entry) -> u64 {
        reserved_of(e.len, self.align)
    }

    pub(super) fn tenant_of(&self, e: &Entry) -> TenantId {
        // A live entry's namespace is live (module docs of `l1::namespace`).
        self.ns.tenant(e.ns()).unwrap_or(TenantId::MAX)
    }

    /// Tells the policy that entry `id` is about to be published or removed, so that it can
    /// start loading what that will touch ([`EvictionPolicy::prefetch`]); returns the
    /// fingerprint it hinted (0 when the policy takes no hints).
    pub(super) fn hint_policy(&self, id: EntryId) -> u64 {
        if !self.policy.uses_fingerprints() {
            return 0;
        }
        let Some(e) = self.entry(id) else { return 0 };
        let fp = fingerprint(&e.hash, self.ns.seed(e.ns()));
        self.policy.prefetch(fp);
        fp
    }

    /// What the eviction policy is told about entry `id`: its tenant, and its fingerprint once
    /// it became readable (0 for one that never did, and for policies that read none).
    pub(super) fn meta_of(&self, id: EntryId) -> EntryMeta {
        self.meta_with(id, 0)
    }

    /// [`meta_of`](Self::meta_of), given the fingerprint [`hint_policy`](Self::hint_policy)
    /// already computed for this entry (its key and namespace never change, so neither does
    /// the fingerprint); 0, what `hint_policy` returns and a ticket holds when nothing was
    /// hinted, means none.
    pub(super) fn meta_with(&self, id: EntryId, hinted: u64) -> EntryMeta {
        match self.entry(id) {
            Some(e) => EntryMeta {
                tenant: self.tenant_of(e),
                fingerprint: if e.phase() == Phase::Ready && self.policy.uses_fingerprints() {
                    match hinted {
                        0 => fingerprint(&e.hash, self.ns.seed(e.ns())),
                        f => f,
                    }
                } else {
                    0
                },
            },
            None => EntryMeta {
                tenant: TenantId::MAX,
                fingerprint: 0,
            },
        }
    }

    pub(super) fn entry(&self, id: EntryId) -> Option<&Entry> {
        self.slots.get(id as usize).and_then(|s| s.entry.as_ref())
    }

    pub(super) fn entry_mut(&mut self, id: EntryId) -> Option<&mut Entry> {
        self.slots
            .get_mut(id as usize)
            .and_then(|s| s.entry.as_mut())
    }

    /// `Some(id)` if the slot still holds the object of that generation.
    pub(super) fn live(&self, id: EntryId, generation: u32) -> Option<EntryId> {
        let s = self.slots.get(id as usize)?;
        (s.generation == generation && s.entry.is_some()).then_some(id)
    }

    pub(super) fn insert(&mut self, entry: Entry) -> (EntryId, u32) {
        let id = match self.free_slots.pop() {
            Some(id) => id,
            None => {
                self.slots.push(Slot {
                    generation: self.generation_floor,
                    entry: None,
                });
                (self.slots.len() - 1) as EntryId
            }
        };
        let slot = &mut self.slots[id as usize];
        slot.entry = Some(entry);
        let generation = slot.generation;
        let slots = &self.slots;
        self.index
            .insert((&entry.hash, entry.ns()), id, |i| key_in(slots, i));
        (id, generation)
    }
}

/// The `(chunk hash, namespace)` key of entry `id` (what the key index compares with).
pub(super) fn key_in(slots: &[Slot], id: EntryId) -> Option<(ChunkHash, NsId)> {
    slots
        .get(id as usize)
        .and_then(|s| s.entry.as_ref())
        .map(Entry::key)
}
