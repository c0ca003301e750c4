//! One prefetch request, steps 1 to 7 of the `prefetch` module docs: lookup and pin on every
//! adapter, plan whole groups, unpin what is not planned, reserve L1 (halving the plan while it
//! does not fit), load, unpin, publish the loaded prefix as read-locked temporary objects. The
//! controller (`mod.rs`) schedules requests and owns their results.

use super::*;

/// A slot in L1 for one planned key.
#[derive(Debug, Clone, Copy)]
enum Slot {
    /// A temporary staging reservation to load into.
    Load(WriteTicket),
    /// The key was already in L1; read-locked instead.
    InL1(ReadLease),
}

async fn unpin_per_adapter(s: &Shared, per_adapter: Vec<Vec<ObjectKey>>) {
    let calls = s
        .adapters
        .iter()
        .zip(&per_adapter)
        .filter(|(_, keys)| !keys.is_empty())
        .map(|(a, keys)| a.unpin(keys));
    join_all(calls).await;
}

fn whole_groups(n: usize, group: usize) -> usize {
    n / group * group
}

pub(super) async fn run_request(s: &Arc<Shared>, id: u64, req: &PrefetchRequest) -> PrefetchResult {
    let mut report = PrefetchReport {
        ran: true,
        adapters: s.adapters.len(),
        ..PrefetchReport::default()
    };
    let started = Instant::now();
    let mut res = load_prefix(s, id, req, &mut report).await;
    report.run_time = started.elapsed();
    res.report = report;
    res
}

async fn load_prefix(
    s: &Arc<Shared>,
    id: u64,
    req: &PrefetchRequest,
    report: &mut PrefetchReport,
) -> PrefetchResult {
    let _in_flight = GaugeUp::up(&s.c.in_flight_request_count);
    let group = req.group.max(1);
    let keys = &req.keys;
    let n = keys.len();
    let readers = req.readers.max(1);

    // 1. Lookup phase.
    let lookups: Vec<Vec<Option<u64>>> = {
        let _phase = GaugeUp::up(&s.c.lookup_phase_count);
        let results = join_all(s.adapters.iter().map(|a| a.lookup_and_pin(keys))).await;
        results
            .into_iter()
            .map(|r| match r {
                Ok(v) if v.len() == n => v,
                Ok(_) | Err(_) => {
                    s.c.lookup_errors_total.add(1);
                    report.failed_adapters += 1;
                    vec![None; n]
                }
            })
            .collect()
    };

    // 2. Plan: lowest-index adapter per key, cut at the first group with a missing key.
    let plan: Vec<Option<(usize, u64)>> = (0..n)
        .map(|j| {
            lookups
                .iter()
                .enumerate()
                .find_map(|(i, l)| l.get(j).copied().flatten().map(|len| (i, len)))
        })
        .collect();
    let mut prefix = plan.iter().take_while(|p| p.is_some()).count();
    prefix = whole_groups(prefix, group);
    s.c.keys_found_total.add(prefix as u64);
    report.found_keys = prefix;

    // 3. Phase-1 unpin: pinned but not planned on that adapter.
    let planned_on = |j: usize, i: usize| j < prefix && plan[j].is_some_and(|(a, _)| a == i);
    let unplanned: Vec<Vec<ObjectKey>> = lookups
        .iter()
        .enumerate()
        .map(|(i, l)| {
            l.iter()
                .enumerate()
                .filter(|(j, hit)| hit.is_some() && !planned_on(*j, i))
                .map(|(j, _)| keys[j].clone())
                .collect()
        })
        .collect();
    unpin_per_adapter(s, unplanned).await;

    let cancelled = s.results.lock().cancelled.contains(&id);
    if prefix == 0 || cancelled || s.stopping.load(Relaxed) {
        unpin_planned(s, keys, &plan, 0, prefix).await;
        return PrefetchResult::empty(req);
    }

    // 4. Reserve L1 (halving on OOM), read-locking keys that are already there.
    let lens: Vec<u64> = plan[..prefix]
        .iter()
        .map(|p| p.map_or(0, |(_, len)| len))
        .collect();
    let (mut slots, reserved) = reserve_prefix(s, &keys[..prefix], &lens, group, readers);
    if reserved < prefix {
        report.l1_short = true;
        unpin_planned(s, keys, &plan, reserved, prefix).await;
        prefix = reserved;
    }
    if prefix == 0 {
        return PrefetchResult::empty(req);
    }

    // 5. Load phase, concurrently across adapters.
    let mut ok = vec![false; prefix];
    {
        let _phase = GaugeUp::up(&s.c.load_phase_count);
        let mut per_adapter: Vec<(Vec<usize>, Vec<ObjectKey>, Vec<Allocation>)> =
            s.adapters.iter().map(|_| Default::default()).collect();
        for (j, slot) in slots.iter().enumerate() {
            match (slot, plan[j]) {
                (Slot::Load(t), Some((i, _))) => {
                    if let Some(entry) = per_adapter.get_mut(i) {
                        entry.0.push(j);
                        entry.1.push(keys[j].clone());
                        entry.2.push(t.alloc);
                    }
                }
                (Slot::InL1(_), _) => ok[j] = true,
                (Slot::Load(_), None) => {}
            }
        }
        let calls = s
            .adapters
            .iter()
            .zip(&per_adapter)
            .filter(|(_, (idx, _, _))| !idx.is_empty())
            .map(
                |(a, (idx, ks, allocs))| async move { (idx, a.load(ks, &s.segment, allocs).await) },
            );
        for (idx, results) in join_all(calls).await {
            for (&j, r) in idx.iter().zip(results) {
                if let Some(flag) = ok.get_mut(j) {
                    *flag = r.is_ok();
                }
            }
        }
    }

    // 6. Phase-2 unpin.
    unpin_planned(s, keys, &plan, 0, prefix).await;

    // 7. Publish loaded objects read-locked; abort failed reservations; keep the prefix.
    let mut publish: Vec<(usize, WriteTicket)> = Vec::new();
    let mut abort: Vec<WriteTicket> = Vec::new();
    for (j, slot) in slots.iter().enumerate() {
        if let Slot::Load(t) = slot {
            if ok[j] {
                publish.push((j, *t));
            } else {
                abort.push(*t);
            }
        }
    }
    if !abort.is_empty() {
        s.c.keys_load_failed_total.add(abort.len() as u64);
        s.l1.abort_write(&abort);
    }
    let tickets: Vec<WriteTicket> = publish.iter().map(|(_, t)| *t).collect();
    let published = s.l1.finish_write_and_reserve_read(&tickets, readers);
    let mut loaded_bytes = 0u64;
    for ((j, t), r) in publish.iter().zip(published) {
        match r {
            Ok(lease) => {
                slots[*j] = Slot::InL1(lease);
                loaded_bytes += t.alloc.len;
            }
            Err(_) => ok[*j] = false,
        }
    }
    s.c.keys_loaded_total.add(publish.len() as u64);
    s.c.bytes_loaded_total.add(loaded_bytes);
    report.load_failed_keys = ok.iter().filter(|&&b| !b).count();
    let good = whole_groups(ok.iter().take_while(|&&b| b).count(), group);
    let mut leases = Vec::with_capacity(good);
    let mut beyond = Vec::new();
    for (j, slot) in slots.into_iter().enumerate() {
        if let Slot::InL1(l) = slot {
            if j < good {
                leases.push(l);
            } else if ok[j] {
                beyond.push(l);
            }
        }
    }
    if !beyond.is_empty() {
        s.l1.finish_read(&beyond, readers);
    }
    PrefetchResult {
        keys: keys[..good].to_vec(),
        leases,
        group,
        readers,
        report: PrefetchReport::default(),
    }
}

async fn unpin_planned(
    s: &Shared,
    keys: &[ObjectKey],
    plan: &[Option<(usize, u64)>],
    from: usize,
    to: usize,
) {
    let mut per_adapter: Vec<Vec<ObjectKey>> = s.adapters.iter().map(|_| Vec::new()).collect();
    for (key, p) in keys.iter().zip(plan).take(to).skip(from) {
        if let Some((i, _)) = p
            && let Some(v) = per_adapter.get_mut(*i)
        {
            v.push(key.clone());
        }
    }
    unpin_per_adapter(s, per_adapter).await;
}

/// Reserves L1 room for `keys` (temporary staging objects), halving the prefix (whole groups)
/// while the batch does not fit. Keys already in L1 are read-locked instead. Returns one slot per
/// key of the reserved prefix and its length.
fn reserve_prefix(
    s: &Shared,
    keys: &[ObjectKey],
    lens: &[u64],
    group: usize,
    readers: u32,
) -> (Vec<Slot>, usize) {
    let mut p = keys.len();
    while p > 0 {
        let items: Vec<(ObjectKey, u64)> = keys[..p]
            .iter()
            .cloned()
            .zip(lens[..p].iter().copied())
            .collect();
        let results = s.l1.reserve_write(&items, true);
        if results
            .iter()
            .any(|r| matches!(r, Err(L1Error::OutOfMemory | L1Error::QuotaExceeded)))
        {
            let tickets: Vec<WriteTicket> = results.into_iter().filter_map(Result::ok).collect();
            s.l1.abort_write(&tickets);
            s.c.l1_oom_trims_total.add(1);
            let groups = p / group;
            p = whole_groups((groups / 2) * group, group);
            continue;
        }
        // Keys that exist already: read-lock them instead of loading.
        let existing: Vec<usize> = results
            .iter()
            .enumerate()
            .filter(|(_, r)| r.is_err())
            .map(|(j, _)| j)
            .collect();
        let existing_keys: Vec<ObjectKey> = existing.iter().map(|&j| keys[j].clone()).collect();
        let locked = if existing_keys.is_empty() {
            Vec::new()
        } else {
            s.l1.reserve_read(&existing_keys, readers)
        };
        let mut slots: Vec<Option<Slot>> = results
            .into_iter()
            .map(|r| r.ok().map(Slot::Load))
            .collect();
        for (&j, r) in existing.iter().zip(locked) {
            if let Ok(lease) = r {
                s.c.keys_already_in_l1_total.add(1);
                slots[j] = Some(Slot::InL1(lease));
            }
        }
        let cut = whole_groups(slots.iter().take_while(|x| x.is_some()).count(), group);
        let mut kept = Vec::with_capacity(cut);
        let mut abort = Vec::new();
        let mut unlock = Vec::new();
        for (j, slot) in slots.into_iter().enumerate() {
            match slot {
                Some(x) if j < cut => kept.push(x),
                Some(Slot::Load(t)) => abort.push(t),
                Some(Slot::InL1(l)) => unlock.push(l),
                None => {}
            }
        }
        if !abort.is_empty() {
            s.l1.abort_write(&abort);
        }
        if !unlock.is_empty() {
            s.l1.finish_read(&unlock, readers);
        }
        return (kept, cut);
    }
    (Vec::new(), 0)
}
