//! The full recount behind [`L1Manager::check_invariants`]: every table the manager keeps
//! (slots, index, namespaces, allocator, policy, tenants, quarantine, expiry queue, counters)
//! checked against the others under the lock. `O(n)`: tests and the debug endpoint only.

use super::*;

impl L1Manager {
    /// Recounts everything under the lock and compares with the counters and the allocator.
    /// `O(n)`: for tests and the debug endpoint only.
    pub fn check_invariants(&self) -> Result<(), String> {
        let inner = self.inner.lock();
        inner.alloc.check()?;
        let (
            mut objects,
            mut staging,
            mut staging_bytes,
            mut readers,
            mut temp,
            mut doomed,
            mut used,
        ) = (0u64, 0u64, 0u64, 0u64, 0u64, 0u64, 0u64);
        let (mut quarantined, mut quarantined_bytes) = (0u64, 0u64);
        let mut ranges = Vec::new();
        let mut ns_refs: HashMap<NsId, u32> = HashMap::new();
        for (id, slot) in inner.slots.iter().enumerate() {
            let Some(e) = &slot.entry else { continue };
            let reserved = inner.reserved(e);
            *ns_refs.entry(e.ns()).or_default() += 1;
            objects += 1;
            used += reserved;
            ranges.push((inner.alloc_of(e).offset, reserved));
            if e.phase() == Phase::Staging {
                staging += 1;
                staging_bytes += reserved;
                if e.readers > 0 {
                    return Err(format!("staging object {id} has readers"));
                }
            }
            if e.readers > 0 {
                readers += 1;
            }
            if e.temporary() {
                temp += 1;
            }
            if e.phase() == Phase::Quarantined {
                quarantined += 1;
                quarantined_bytes += reserved;
                if e.doomed() || e.readers > 0 || e.deadline().is_some() {
                    return Err(format!(
                        "quarantined object {id} is doomed, locked or timed"
                    ));
                }
                if inner.index_get(e.key()) == Some(id as EntryId) {
                    return Err(format!("quarantined object {id} is still in the index"));
                }
                if !inner
                    .quarantine
                    .contains(&(e.quarantine_seq(), id as EntryId))
                {
                    return Err(format!(
                        "quarantined object {id} missing from the quarantine"
                    ));
                }
            } else if e.doomed() {
                doomed += 1;
                if e.phase() == Phase::Ready && e.readers == 0 {
                    return Err(format!("doomed object {id} has no lock left"));
                }
            } else if inner.index_get(e.key()) != Some(id as EntryId) {
                return Err(format!("object {id} missing from the index"));
            }
            let in_queue = e
                .deadline()
                .is_some_and(|d| inner.expiry.contains(&(d, id as EntryId, slot.generation)));
            let needs_deadline = e.phase() == Phase::Staging || e.readers > 0;
            if needs_deadline != in_queue {
                return Err(format!("object {id} expiry queue entry mismatch"));
            }
        }
        inner.ns.check()?;
        if inner.ns.len() != ns_refs.len() {
            return Err(format!(
                "{} live namespaces, {} named by entries",
                inner.ns.len(),
                ns_refs.len()
            ));
        }
        for (&ns, &refs) in &ns_refs {
            if inner.ns.refs(ns) != refs {
                return Err(format!(
                    "namespace {ns}: {} references, {refs} entries",
                    inner.ns.refs(ns)
                ));
            }
            let key = inner.ns.key(ns, ChunkHash::from_bytes([0; 32]));
            let tenant = key.and_then(|k| inner.tenants.find(&k.cache_salt));
            if tenant != inner.ns.tenant(ns) {
                return Err(format!("namespace {ns}: tenant is not its salt's"));
            }
        }
        let mut by_tenant: HashMap<TenantId, u64> = HashMap::new();
        for e in inner.slots.iter().filter_map(|s| s.entry.as_ref()) {
            *by_tenant.entry(inner.tenant_of(e)).or_default() += inner.reserved(e);
        }
        for (&t, &bytes) in &by_tenant {
            if inner.tenants.used(t) != bytes {
                return Err(format!(
                    "tenant {t}: charged {} bytes, recount {bytes}",
                    inner.tenants.used(t)
                ));
            }
        }
        if inner.index.len() as u64 != objects - doomed - quarantined {
            return Err("index size differs from live objects".into());
        }
        if inner.quarantine.len() as u64 != quarantined {
            return Err("stale entries in the quarantine".into());
        }
        if quarantined_bytes > self.config.quarantine_budget_bytes {
            return Err(format!(
                "quarantine holds {quarantined_bytes} bytes over its budget of {}",
                self.config.quarantine_budget_bytes
            ));
        }
        if inner.expiry.len() as u64 != staging + readers {
            return Err("stale entries in the expiry queue".into());
        }
        ranges.sort_unstable();
        for w in ranges.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                return Err(format!("objects overlap at offset {}", w[1].0));
            }
        }
        if used + inner.alloc.free_bytes() != inner.alloc.capacity() {
            return Err(format!(
                "leaked bytes: used {used} + free {} != capacity {}",
                inner.alloc.free_bytes(),
                inner.alloc.capacity()
            ));
        }
        let c = &self.counters;
        let pairs = [
            ("objects", c.objects.get(), objects),
            ("staging_objects", c.staging_objects.get(), staging),
            ("staging_bytes", c.staging_bytes.get(), staging_bytes),
            ("read_locked_objects", c.read_locked_objects.get(), readers),
            ("temporary_objects", c.temporary_objects.get(), temp),
            ("doomed_objects", c.doomed_objects.get(), doomed),
            (
                "quarantined_objects",
                c.quarantined_objects.get(),
                quarantined,
            ),
            (
                "quarantined_bytes",
                c.quarantined_bytes.get(),
                quarantined_bytes,
            ),
            ("used_bytes", c.used_bytes.get(), used),
        ];
        for (name, counter, recount) in pairs {
            if counter != recount {
                return Err(format!("counter {name} = {counter}, recount = {recount}"));
            }
        }
        Ok(())
    }
}
