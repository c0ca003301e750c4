//! Eviction under the L1 lock: to the watermark or a byte goal in policy order, a tenant over
//! its quota from its own objects, and synchronously when an allocation fails. Every path skips
//! staging, read-locked and doomed objects (`verdict`) and removes victims through
//! `L1Manager::remove_entry`, so listeners, tenants and counters see one removal path.

use super::*;

impl L1Manager {
    pub(super) fn evict_locked(
        &self,
        inner: &mut Inner,
        goal_bytes: u64,
        why: EvictedFor,
    ) -> EvictionOutcome {
        let mut victims = Vec::new();
        let mut planned = 0u64;
        {
            let Inner {
                policy,
                slots,
                align,
                tenants,
                ..
            } = inner;
            let order: &[TenantId] = if policy.isolated() {
                tenants.isolation_order()
            } else {
                &[]
            };
            policy.select(order, &mut |id| {
                verdict(slots, *align, id, goal_bytes, &mut planned, &mut victims)
            });
        }
        self.remove_victims(inner, victims, why)
    }

    /// Evicts up to `goal_bytes` of `tenant`'s own unlocked objects, oldest first.
    pub(super) fn evict_tenant(
        &self,
        inner: &mut Inner,
        tenant: TenantId,
        goal_bytes: u64,
    ) -> EvictionOutcome {
        let mut victims = Vec::new();
        let mut planned = 0u64;
        {
            let Inner {
                tenants,
                slots,
                align,
                ..
            } = inner;
            tenants.walk(tenant, &mut |id| {
                verdict(slots, *align, id, goal_bytes, &mut planned, &mut victims) != Verdict::Stop
            });
        }
        self.remove_victims(inner, victims, EvictedFor::Quota)
    }

    pub(super) fn remove_victims(
        &self,
        inner: &mut Inner,
        victims: Vec<EntryId>,
        why: EvictedFor,
    ) -> EvictionOutcome {
        let mut out = EvictionOutcome::default();
        // Start every victim's ghost push before the first (see `hint_batch`), keeping each
        // fingerprint for its removal; a single victim has nothing to overlap with.
        let hints: Vec<u64> = if victims.len() > 1 {
            victims.iter().map(|&id| inner.hint_policy(id)).collect()
        } else {
            Vec::new()
        };
        for (i, id) in victims.into_iter().enumerate() {
            if let Some(e) = inner.entry(id) {
                out.bytes += inner.reserved(e);
                out.objects += 1;
                let hinted = hints.get(i).copied().unwrap_or(0);
                self.remove_entry_hinted(inner, id, RemovalCause::Evicted(why), hinted);
            }
        }
        self.counters.evicted_objects_total.add(out.objects);
        self.counters.evicted_bytes_total.add(out.bytes);
        out
    }

    /// Checks each tenant's share of a reservation against its quota (see `l1::tenants`):
    /// evicts the tenant's own objects to make room, and refuses the tenant's keys with
    /// `QuotaExceeded` when that is not enough. Removes refused items from the batch.
    pub(super) fn apply_quotas(
        &self,
        inner: &mut Inner,
        out: &mut [Result<WriteTicket, L1Error>],
        new_idx: &mut Vec<usize>,
        sizes: &mut Vec<u64>,
        tenants: &mut Vec<TenantId>,
    ) {
        let mut refused: Vec<TenantId> = Vec::new();
        let mut checked: Vec<TenantId> = Vec::new();
        for &t in tenants.iter() {
            if checked.contains(&t) {
                continue;
            }
            checked.push(t);
            let Some(limit) = inner.tenants.limit(t) else {
                continue;
            };
            let need: u64 = tenants
                .iter()
                .zip(sizes.iter())
                .filter(|(x, _)| **x == t)
                .map(|(_, &len)| inner.alloc.reserved_size(len).unwrap_or(len))
                .fold(0u64, u64::saturating_add);
            let used = inner.tenants.used(t);
            if used.saturating_add(need) <= limit {
                continue;
            }
            if need <= limit {
                self.evict_tenant(inner, t, used + need - limit);
            }
            if inner.tenants.used(t).saturating_add(need) > limit {
                refused.push(t);
            }
        }
        if refused.is_empty() {
            return;
        }
        let mut keep = 0;
        for j in 0..new_idx.len() {
            let t = tenants[j];
            if refused.contains(&t) {
                out[new_idx[j]] = Err(L1Error::QuotaExceeded);
                self.counters.quota_rejected_keys_total.inc();
                if let Some(c) = inner.tenants.stats(t) {
                    c.quota_rejected_keys_total.inc();
                }
            } else {
                new_idx[keep] = new_idx[j];
                sizes[keep] = sizes[j];
                tenants[keep] = t;
                keep += 1;
            }
        }
        new_idx.truncate(keep);
        sizes.truncate(keep);
        tenants.truncate(keep);
        for t in refused {
            inner.tenants.retire_if_idle(t);
        }
    }

    /// Allocates the whole batch, evicting synchronously while that can help.
    pub(super) fn alloc_batch_evicting(
        &self,
        inner: &mut Inner,
        sizes: &[u64],
    ) -> Option<Vec<u64>> {
        if let Some(offsets) = inner.alloc.alloc_batch(sizes) {
            return Some(offsets);
        }
        self.counters.sync_evictions_total.add(1);
        let need: u64 = sizes
            .iter()
            .filter_map(|&s| inner.alloc.reserved_size(s))
            .fold(0u64, u64::saturating_add);
        if need > inner.alloc.capacity() {
            return None;
        }
        loop {
            let free = inner.alloc.free_bytes();
            // Evict what is missing; if enough bytes are free but fragmented, evict the size of
            // the largest object so neighbouring frees can coalesce.
            let largest = sizes.iter().copied().max().unwrap_or(0);
            let goal = need.saturating_sub(free).max(largest);
            let freed = self.evict_locked(inner, goal, EvictedFor::Allocation);
            if let Some(offsets) = inner.alloc.alloc_batch(sizes) {
                return Some(offsets);
            }
            if freed.objects == 0 {
                return None;
            }
        }
    }
}

/// The manager's answer for one proposed victim: evictable objects are planned until
/// `goal_bytes` is reached; staging, read-locked and doomed ones are skipped.
pub(super) fn verdict(
    slots: &[Slot],
    align: u64,
    id: EntryId,
    goal_bytes: u64,
    planned: &mut u64,
    victims: &mut Vec<EntryId>,
) -> Verdict {
    if *planned >= goal_bytes {
        return Verdict::Stop;
    }
    match slots.get(id as usize).and_then(|s| s.entry.as_ref()) {
        Some(e) if e.phase() == Phase::Ready && e.readers == 0 && !e.doomed() => {
            victims.push(id);
            *planned += reserved_of(e.len, align);
            Verdict::Evict
        }
        _ => Verdict::Skip,
    }
}
