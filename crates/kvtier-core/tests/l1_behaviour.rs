//! Named behaviours of the L1 manager, a fragmentation churn test and a multi-threaded stress
//! test that checks every invariant at the end.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::key;
use kvtier_core::l1::{
    Clock, EvictionPolicyKind, L1Config, L1Error, L1Manager, ReadLease, WriteTicket,
};

const PAGE: u64 = 4096;

fn manager(pages: u64) -> (L1Manager, Clock) {
    let clock = Clock::manual();
    let cfg = L1Config::with_capacity(pages * PAGE);
    (L1Manager::with_clock(cfg, clock.clone()), clock)
}

fn store(l1: &L1Manager, n: u32, len: u64) -> Result<(), L1Error> {
    let t = l1.reserve_write(&[(key(n), len)], false).remove(0)?;
    l1.finish_write(&[t]).remove(0)
}

#[test]
fn staging_objects_are_invisible_and_expired_writes_never_become_readable() {
    let (l1, clock) = manager(16);
    let t = l1
        .reserve_write(&[(key(1), PAGE)], false)
        .remove(0)
        .expect("reserved");
    assert_eq!(
        l1.reserve_read(&[key(1)], 1)[0],
        Err(L1Error::KeyNotReadable)
    );
    assert_eq!(l1.contains(&[key(1)]), vec![false]);
    // A second writer cannot take the same key while the first one holds it.
    assert_eq!(
        l1.reserve_write(&[(key(1), PAGE)], false)[0],
        Err(L1Error::KeyNotWritable)
    );
    clock.advance(Duration::from_secs(601));
    // The writer comes back too late: its object was discarded, not published.
    assert_eq!(l1.finish_write(&[t])[0], Err(L1Error::KeyNotExist));
    assert_eq!(l1.reserve_read(&[key(1)], 1)[0], Err(L1Error::KeyNotExist));
    assert_eq!(l1.counters().expired_write_locks_total.get(), 1);
    assert_eq!(l1.usage().0, 0);
    l1.check_invariants().expect("invariants");
}

#[test]
fn background_sweep_quarantines_abandoned_staging_objects() {
    let (l1, clock) = manager(16);
    let t = l1
        .reserve_write(&[(key(1), PAGE)], false)
        .remove(0)
        .expect("reserved");
    assert_eq!(l1.counters().staging_objects.get(), 1);
    clock.advance(Duration::from_secs(600));
    assert_eq!(l1.expire_locks(), 1);
    let c = l1.counters();
    assert_eq!(c.staging_objects.get(), 0);
    assert_eq!(c.quarantined_objects.get(), 1);
    assert_eq!(c.quarantined_bytes.get(), PAGE);
    // The key is writable again, but the memory is still held for the late writer.
    assert_eq!(l1.usage().0, PAGE);
    assert!(l1.holds_any(&[t]));
    let t2 = l1
        .reserve_write(&[(key(1), PAGE)], false)
        .remove(0)
        .expect("writable again");
    assert_ne!(t2.alloc.offset, t.alloc.offset);
    // The writer's abort frees it.
    assert_eq!(l1.abort_write(&[t])[0], Err(L1Error::KeyNotExist));
    assert!(!l1.holds_any(&[t]));
    assert_eq!(c.quarantined_objects.get(), 0);
    assert_eq!(c.quarantine_released_total.get(), 1);
    assert_eq!(l1.usage().0, PAGE);
    l1.check_invariants().expect("invariants");
}

/// Issue #13 finding 8: writer A's reservation lapses, writer B stores the same key and
/// publishes, A comes back. B must not have been handed A's memory, and A's late commit must
/// fail without touching B's object.
#[test]
fn a_late_writer_never_shares_memory_with_the_next_writer_of_its_key() {
    let (l1, clock) = manager(16);
    let a = l1
        .reserve_write(&[(key(1), PAGE)], false)
        .remove(0)
        .expect("A reserved");
    clock.advance(Duration::from_secs(601));
    // No background round ran: B's reservation is what notices A's lapse.
    let b = l1
        .reserve_write(&[(key(1), PAGE)], false)
        .remove(0)
        .expect("B reserved");
    assert_ne!(b.alloc.offset, a.alloc.offset, "B was handed A's memory");
    assert_eq!(l1.finish_write(&[b])[0], Ok(()));
    // More stores while A is away never get A's range either.
    for n in 2..16 {
        let t = l1
            .reserve_write(&[(key(n), PAGE)], false)
            .remove(0)
            .expect("reserved");
        assert_ne!(t.alloc.offset, a.alloc.offset, "store {n} got A's memory");
        l1.finish_write(&[t])[0].expect("published");
    }
    // A's late commit answers KeyNotExist and frees A's range; B's object is untouched.
    assert_eq!(l1.finish_write(&[a])[0], Err(L1Error::KeyNotExist));
    let lease = l1.reserve_read(&[key(1)], 1).remove(0).expect("B readable");
    assert_eq!(lease.alloc, b.alloc);
    let c = l1.counters();
    assert_eq!(c.quarantine_released_total.get(), 1);
    assert_eq!(c.quarantine_forced_reuses_total.get(), 0);
    assert_eq!(c.quarantined_bytes.get(), 0);
    l1.check_invariants().expect("invariants");
}

#[test]
fn the_quarantine_budget_frees_the_oldest_reservations_first() {
    let clock = Clock::manual();
    let mut cfg = L1Config::with_capacity(8 * PAGE);
    cfg.quarantine_budget_bytes = 2 * PAGE;
    let l1 = L1Manager::with_clock(cfg, clock.clone());
    let tickets: Vec<_> = l1
        .reserve_write(&[(key(1), PAGE), (key(2), PAGE), (key(3), PAGE)], false)
        .into_iter()
        .map(|r| r.expect("reserved"))
        .collect();
    clock.advance(Duration::from_secs(601));
    assert_eq!(l1.expire_locks(), 3);
    let c = l1.counters();
    assert_eq!(c.quarantined_objects.get(), 2);
    assert_eq!(c.quarantined_bytes.get(), 2 * PAGE);
    assert_eq!(c.quarantine_forced_reuses_total.get(), 1);
    assert!(!l1.holds_any(&tickets[..1]), "the oldest is released first");
    assert!(l1.holds_any(&tickets[1..2]) && l1.holds_any(&tickets[2..]));
    // The forced reuse is the only range a new store can get among the three.
    for n in 10..15 {
        let t = l1
            .reserve_write(&[(key(n), PAGE)], false)
            .remove(0)
            .expect("reserved");
        assert!(
            tickets[1..]
                .iter()
                .all(|q| q.alloc.offset != t.alloc.offset)
        );
    }
    // A forced clear does not touch the quarantine; a doomed staging object that lapses joins it.
    let d = l1
        .reserve_write(&[(key(20), PAGE)], false)
        .remove(0)
        .expect("reserved");
    assert_eq!(l1.clear(true).doomed, 6);
    assert_eq!(c.quarantined_objects.get(), 2);
    clock.advance(Duration::from_secs(601));
    l1.expire_locks();
    assert_eq!(c.doomed_objects.get(), 0);
    assert_eq!(c.quarantined_objects.get(), 2);
    assert!(
        l1.holds_any(&[d]),
        "the newest reservation stays quarantined"
    );
    l1.check_invariants().expect("invariants");

    // Budget 0: LMCache's timing (freed at expiry), counted as forced reuse.
    let mut cfg = L1Config::with_capacity(8 * PAGE);
    cfg.quarantine_budget_bytes = 0;
    let l1 = L1Manager::with_clock(cfg, clock.clone());
    let a = l1
        .reserve_write(&[(key(1), PAGE)], false)
        .remove(0)
        .expect("reserved");
    clock.advance(Duration::from_secs(601));
    let b = l1
        .reserve_write(&[(key(1), PAGE)], false)
        .remove(0)
        .expect("reserved");
    assert_eq!(b.alloc.offset, a.alloc.offset);
    assert_eq!(l1.counters().quarantine_forced_reuses_total.get(), 1);
    // The late commit still fails.
    assert_eq!(l1.finish_write(&[a])[0], Err(L1Error::KeyNotExist));
    assert_eq!(l1.finish_write(&[b])[0], Ok(()));
    l1.check_invariants().expect("invariants");
}

#[test]
fn expired_read_locks_are_released_and_stale_leases_do_not_steal_new_locks() {
    let (l1, clock) = manager(16);
    store(&l1, 1, PAGE).expect("stored");
    let old: ReadLease = l1.reserve_read(&[key(1)], 2).remove(0).expect("locked");
    assert_eq!(l1.delete(&[key(1)])[0], Err(L1Error::KeyIsLocked));
    clock.advance(Duration::from_secs(301));
    let new = l1
        .reserve_read(&[key(1)], 1)
        .remove(0)
        .expect("locked again");
    // The first holder's late release must not remove the new holder's lock.
    assert_eq!(l1.finish_read(&[old], 2)[0], Err(L1Error::KeyInWrongState));
    assert_eq!(l1.delete(&[key(1)])[0], Err(L1Error::KeyIsLocked));
    assert_eq!(l1.finish_read(&[new], 1)[0], Ok(()));
    assert_eq!(l1.delete(&[key(1)])[0], Ok(()));
    l1.check_invariants().expect("invariants");
}

#[test]
fn temporary_objects_go_away_after_their_last_reader() {
    let (l1, _clock) = manager(16);
    let t = l1
        .reserve_write(&[(key(1), PAGE)], true)
        .remove(0)
        .expect("reserved");
    let lease = l1
        .finish_write_and_reserve_read(&[t], 2)
        .remove(0)
        .expect("published");
    assert_eq!(l1.finish_read(&[lease], 1)[0], Ok(()));
    assert_eq!(l1.contains(&[key(1)]), vec![true]);
    assert_eq!(l1.finish_read(&[lease], 1)[0], Ok(()));
    assert_eq!(l1.contains(&[key(1)]), vec![false]);
    assert_eq!(l1.usage().0, 0);
}

#[test]
fn full_pool_evicts_synchronously_instead_of_rejecting_stores() {
    let (l1, _clock) = manager(8);
    for n in 0..8 {
        store(&l1, n, PAGE).expect("fits");
    }
    // Lock the two oldest: eviction must skip them rather than stall on the locked head.
    let leases: Vec<_> = l1
        .reserve_read(&[key(0), key(1)], 1)
        .into_iter()
        .map(|r| r.expect("locked"))
        .collect();
    for n in 8..20 {
        store(&l1, n, PAGE)
            .expect("a burst of stores is never rejected while evictable memory exists");
    }
    assert_eq!(
        l1.contains(&[key(0), key(1)]),
        vec![true, true],
        "locked objects survive"
    );
    assert!(l1.counters().sync_evictions_total.get() > 0);
    l1.finish_read(&leases, 1);
    l1.check_invariants().expect("invariants");
}

#[test]
fn batch_reservations_are_all_or_nothing() {
    let (l1, _clock) = manager(4);
    let leases: Vec<_> = (0..3)
        .map(|n| {
            store(&l1, n, PAGE).expect("fits");
            l1.reserve_read(&[key(n)], 1).remove(0).expect("locked")
        })
        .collect();
    // One page free, two requested, nothing evictable: both keys are refused, nothing leaks.
    let got = l1.reserve_write(&[(key(10), PAGE), (key(11), PAGE)], false);
    assert_eq!(
        got,
        vec![Err(L1Error::OutOfMemory), Err(L1Error::OutOfMemory)]
    );
    assert_eq!(l1.usage().0, 3 * PAGE);
    assert_eq!(l1.counters().oom_keys_total.get(), 2);
    l1.finish_read(&leases, 1);
    l1.check_invariants().expect("invariants");
}

#[test]
fn forced_clear_hides_locked_objects_but_keeps_their_memory_until_release() {
    let (l1, _clock) = manager(8);
    store(&l1, 1, PAGE).expect("stored");
    store(&l1, 2, PAGE).expect("stored");
    let lease = l1.reserve_read(&[key(1)], 1).remove(0).expect("locked");
    let staging = l1
        .reserve_write(&[(key(3), PAGE)], false)
        .remove(0)
        .expect("reserved");
    let out = l1.clear(true);
    assert_eq!((out.removed, out.doomed), (1, 2));
    assert_eq!(l1.contains(&[key(1), key(2)]), vec![false, false]);
    assert_eq!(l1.usage().0, 2 * PAGE, "doomed memory is still in use");
    // The key can be stored again while the doomed copy is still being read.
    store(&l1, 1, PAGE).expect("stored again");
    assert_eq!(l1.finish_read(&[lease], 1)[0], Ok(()));
    assert_eq!(l1.finish_write(&[staging])[0], Err(L1Error::KeyNotExist));
    assert_eq!(l1.usage().0, PAGE);
    l1.check_invariants().expect("invariants");
}

#[test]
fn unforced_clear_keeps_locked_objects() {
    let (l1, _clock) = manager(8);
    store(&l1, 1, PAGE).expect("stored");
    store(&l1, 2, PAGE).expect("stored");
    let _lease = l1.reserve_read(&[key(1)], 1).remove(0).expect("locked");
    let out = l1.clear(false);
    assert_eq!((out.removed, out.kept), (1, 1));
    assert_eq!(l1.contains(&[key(1), key(2)]), vec![true, false]);
}

#[test]
fn background_round_respects_watermark_and_ratio_of_bytes() {
    let (l1, _clock) = manager(100);
    for n in 0..79 {
        store(&l1, n, PAGE).expect("fits");
    }
    assert_eq!(l1.maintenance_round().objects, 0, "below the 0.8 watermark");
    store(&l1, 79, PAGE).expect("fits");
    // Eighty pages used: the round frees 20 % of the used bytes, oldest first.
    let out = l1.maintenance_round();
    assert_eq!(out.objects, 16);
    assert_eq!(out.bytes, 16 * PAGE);
    assert_eq!(l1.contains(&[key(15), key(16)]), vec![false, true]);
}

#[test]
fn noop_policy_never_evicts() {
    let clock = Clock::manual();
    let mut cfg = L1Config::with_capacity(4 * PAGE);
    cfg.eviction.policy = EvictionPolicyKind::Noop;
    let l1 = L1Manager::with_clock(cfg, clock);
    for n in 0..4 {
        store(&l1, n, PAGE).expect("fits");
    }
    assert_eq!(store(&l1, 9, PAGE), Err(L1Error::OutOfMemory));
    assert_eq!(l1.maintenance_round().objects, 0);
}

/// Objects of three sizes (as for models with different chunk sizes) churn through a small
/// pool; with eviction available every reservation must keep succeeding.
#[test]
fn mixed_size_churn_keeps_allocating() {
    let (l1, _clock) = manager(1024);
    let sizes = [PAGE, 3 * PAGE + 100, 32 * PAGE];
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut held: Vec<ReadLease> = Vec::new();
    let mut stored_bytes = 0u64;
    for n in 0..20_000u32 {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let len = sizes[(rng % 3) as usize];
        store(&l1, n, len).unwrap_or_else(|e| panic!("store {n} of {len} bytes failed: {e}"));
        stored_bytes += len.div_ceil(PAGE) * PAGE;
        // Keep a few objects read-locked at any time, scattered through the pool.
        if rng.is_multiple_of(7)
            && let Ok(l) = l1.reserve_read(&[key(n)], 1).remove(0)
        {
            held.push(l);
        }
        if held.len() > 8 {
            let l = held.remove(0);
            l1.finish_read(&[l], 1);
        }
    }
    // Bounded fragmentation: the bytes evicted to make room stay close to the bytes stored
    // (a perfect packer evicts exactly what it stores once the pool is full).
    let evicted = l1.counters().evicted_bytes_total.get();
    let stored = stored_bytes;
    let (free, largest, fragments) = l1.fragmentation();
    eprintln!(
        "stored {stored} evicted {evicted} ratio {:.3}; free {free} largest {largest} fragments {fragments}",
        evicted as f64 / stored as f64
    );
    assert!(
        (evicted as f64) < 1.25 * stored as f64,
        "eviction amplification too high: evicted {evicted} for {stored} stored"
    );
    l1.finish_read(&held, 1);
    l1.check_invariants().expect("invariants");
}

/// 8 threads, 1e5 operations in total, mixing every public operation; at the end every lock is
/// released, L1 is cleared and no byte, object or counter may be left over.
#[test]
fn eight_thread_stress_leaves_no_leaks() {
    const THREADS: u32 = 8;
    const OPS_PER_THREAD: u32 = 12_500;
    let l1 = Arc::new(L1Manager::new(L1Config::with_capacity(256 * PAGE)));
    let handles: Vec<_> = (0..THREADS)
        .map(|t| {
            let l1 = Arc::clone(&l1);
            std::thread::spawn(move || {
                let mut rng =
                    0x9e37_79b9_7f4a_7c15u64 ^ u64::from(t).wrapping_mul(0x1234_5678_9abc);
                let mut leases: Vec<ReadLease> = Vec::new();
                for _ in 0..OPS_PER_THREAD {
                    rng ^= rng << 13;
                    rng ^= rng >> 7;
                    rng ^= rng << 17;
                    let k = (rng % 512) as u32;
                    match (rng >> 32) % 10 {
                        0..=2 => {
                            let items: Vec<_> = (0..1 + (rng >> 40) % 4)
                                .map(|i| (key(k + i as u32), PAGE * (1 + (rng >> 50) % 3)))
                                .collect();
                            let tickets: Vec<_> = l1
                                .reserve_write(&items, false)
                                .into_iter()
                                .filter_map(Result::ok)
                                .collect();
                            if (rng >> 20).is_multiple_of(8) {
                                l1.abort_write(&tickets);
                            } else {
                                l1.finish_write(&tickets);
                            }
                        }
                        3..=4 => {
                            let keys: Vec<_> = (0..4).map(|i| key(k + i)).collect();
                            leases.extend(l1.reserve_read_prefix(&keys, 2, 2));
                        }
                        5 => {
                            if let Ok(l) = l1.reserve_read(&[key(k)], 1).remove(0) {
                                leases.push(l);
                            }
                        }
                        6..=7 => {
                            if !leases.is_empty() {
                                let l = leases.swap_remove((rng as usize) % leases.len());
                                l1.finish_read(&[l], 1);
                                l1.finish_read(&[l], 1);
                            }
                        }
                        8 => {
                            l1.delete(&[key(k)]);
                        }
                        _ => match (rng >> 24) % 50 {
                            0 => {
                                l1.clear(rng.is_multiple_of(2));
                            }
                            1..=10 => {
                                l1.maintenance_round();
                            }
                            _ => {
                                l1.evict(PAGE * 4);
                            }
                        },
                    }
                }
                for l in leases {
                    l1.finish_read(&[l], 2);
                }
            })
        })
        .collect();
    // A status reader polls the counters the whole time, without taking the L1 lock.
    let reader = {
        let l1 = Arc::clone(&l1);
        std::thread::spawn(move || {
            let mut max_used = 0;
            for _ in 0..2_000 {
                let (used, total) = l1.usage();
                assert!(used <= total);
                max_used = max_used.max(used);
                std::thread::yield_now();
            }
            max_used
        })
    };
    for h in handles {
        h.join().expect("worker thread");
    }
    reader.join().expect("reader thread");
    l1.check_invariants()
        .expect("invariants hold after the run");
    l1.clear(true);
    l1.check_invariants().expect("invariants hold after clear");
    assert_eq!(l1.usage().0, 0, "no leaked bytes");
    assert_eq!(l1.counters().objects.get(), 0);
    assert_eq!(l1.counters().read_locked_objects.get(), 0);
}

#[test]
fn large_batch_with_a_repeated_key_refuses_only_the_repeat() {
    let (l1, _clock) = manager(4096);
    let mut items: Vec<_> = (0..2000u32).map(|n| (key(n), PAGE)).collect();
    items[1500] = (key(3), PAGE);
    let out = l1.reserve_write(&items, false);
    assert_eq!(out.len(), 2000);
    for (i, r) in out.iter().enumerate() {
        if i == 1500 {
            assert_eq!(*r, Err(L1Error::KeyNotWritable), "the repeat of key 3");
        } else {
            assert!(r.is_ok(), "item {i}: {r:?}");
        }
    }
    assert_eq!(l1.counters().staging_objects.get(), 1999);
    // Small batches take the linear path and agree.
    let small = l1.reserve_write(&[(key(9000), PAGE), (key(9000), PAGE)], false);
    assert!(small[0].is_ok());
    assert_eq!(small[1], Err(L1Error::KeyNotWritable));
    l1.check_invariants().expect("invariants");
}

#[test]
fn mass_expiry_is_applied_across_several_lock_batches() {
    let (l1, clock) = manager(8192);
    let n = kvtier_core::l1::manager::EXPIRE_BATCH * 2 + 7;
    let items: Vec<_> = (0..n as u32).map(|i| (key(i), PAGE)).collect();
    assert!(l1.reserve_write(&items, false).iter().all(Result::is_ok));
    clock.advance(Duration::from_secs(601));
    assert_eq!(l1.expire_locks(), n as u64);
    let c = l1.counters();
    assert_eq!(c.staging_objects.get(), 0);
    // The quarantine keeps its budget (a tenth of the pool) and lets the oldest go.
    let budget = l1.config().quarantine_budget_bytes / PAGE;
    assert_eq!(c.quarantined_objects.get(), budget);
    assert_eq!(c.quarantine_forced_reuses_total.get(), n as u64 - budget);
    assert_eq!(l1.usage().0, budget * PAGE);
    assert_eq!(l1.expire_locks(), 0);
    l1.check_invariants().expect("invariants");
}

/// The listener contract: one `published` per publish, one `removed` when a published object
/// leaves (delete, eviction, forced clear of a locked object, a temporary object's last
/// reader), nothing for staging objects that never publish, and never a removal first.
#[test]
fn the_listener_sees_every_publish_and_removal_in_order() {
    use kvtier_core::key::ObjectKey;
    use kvtier_core::l1::L1Listener;

    #[derive(Debug, Default)]
    struct Log(parking_lot::Mutex<Vec<(bool, ObjectKey)>>);
    impl L1Listener for Log {
        fn published(&self, key: &ObjectKey) {
            self.0.lock().push((true, key.clone()));
        }
        fn removed(&self, key: &ObjectKey, _cause: kvtier_core::l1::RemovalCause) {
            self.0.lock().push((false, key.clone()));
        }
    }

    let (l1, _clock) = manager(4);
    let log = Arc::new(Log::default());
    l1.set_listener(log.clone()).expect("first listener");
    store(&l1, 1, PAGE).expect("stored");
    store(&l1, 2, PAGE).expect("stored");
    // A staging object that is aborted is never announced.
    let t = l1
        .reserve_write(&[(key(3), PAGE)], false)
        .remove(0)
        .expect("reserved");
    l1.abort_write(&[t]);
    l1.delete(&[key(1)]);
    // Locked, then force-cleared: announced as removed at once (it left the index).
    let lease = l1.reserve_read(&[key(2)], 1).remove(0).expect("read");
    l1.clear(true);
    l1.finish_read(&[lease], 1);
    // A temporary object leaves with its last reader.
    let t = l1
        .reserve_write(&[(key(4), PAGE)], true)
        .remove(0)
        .expect("reserved");
    let lease = l1
        .finish_write_and_reserve_read(&[t], 1)
        .remove(0)
        .expect("published");
    l1.finish_read(&[lease], 1);
    // Eviction under pressure.
    for n in 10..16 {
        store(&l1, n, PAGE).expect("stored");
    }
    let events = log.0.lock().clone();
    let expect_start: Vec<(bool, ObjectKey)> = vec![
        (true, key(1)),
        (true, key(2)),
        (false, key(1)),
        (false, key(2)),
        (true, key(4)),
        (false, key(4)),
    ];
    assert_eq!(events[..expect_start.len()], expect_start[..]);
    // Every key alternates published/removed, starting with published.
    let mut live = std::collections::HashSet::new();
    for (published, k) in &events {
        if *published {
            assert!(live.insert(k.clone()), "published twice: {k:?}");
        } else {
            assert!(live.remove(k), "removed before published: {k:?}");
        }
    }
    assert_eq!(
        live.len() as u64,
        l1.counters().objects.get(),
        "live set = L1 objects"
    );
}

/// One `reserve_write` call per key `n` in `range` (so each gets its own slot in order).
fn reserve_each(l1: &L1Manager, range: std::ops::Range<u32>) -> Vec<WriteTicket> {
    range
        .map(|n| {
            l1.reserve_write(&[(key(n), PAGE)], false)
                .remove(0)
                .expect("reserved")
        })
        .collect()
}

#[test]
fn a_clear_gives_back_the_slot_table_and_stale_tickets_stay_stale() {
    let (l1, _clock) = manager(64);
    // Tickets of objects that a clear then frees, and read leases on them.
    let old = reserve_each(&l1, 0..8);
    for r in l1.finish_write(&old) {
        r.expect("published");
    }
    let leases = l1.reserve_read_prefix(&[key(7)], 1, 1);
    assert_eq!(leases.len(), 1);
    l1.finish_read(&leases, 1);
    let out = l1.clear(false);
    assert_eq!(out.removed, 8);
    // New objects take the same slot positions again.
    let new = reserve_each(&l1, 100..108);
    // A stale ticket naming a recreated slot must not publish (or abort) the new object.
    for r in l1.finish_write(&old) {
        assert_eq!(r, Err(L1Error::KeyNotExist));
    }
    l1.abort_write(&old);
    for r in l1.finish_write(&new) {
        r.expect("the new objects are untouched by the stale tickets");
    }
    // A stale read lease releases nothing of the new object in that slot.
    l1.finish_read(&leases, 1);
    assert_eq!(l1.counters().read_locked_objects.get(), 0);
    assert_eq!(l1.counters().objects.get(), 8);
    l1.check_invariants().expect("consistent");
}

#[test]
fn keys_differing_only_outside_the_chunk_hash_are_distinct_objects() {
    // The entry keeps the chunk hash plus an interned namespace (`l1::namespace`): every other
    // key field must still tell objects apart, and the namespace rows must come and go with them.
    let (l1, _clock) = manager(64);
    let base = key(1);
    let variants = [
        base.clone(),
        kvtier_core::key::ObjectKey {
            model_name: Arc::from("other-model"),
            ..base.clone()
        },
        kvtier_core::key::ObjectKey {
            kv_rank: base.kv_rank + 1,
            ..base.clone()
        },
        kvtier_core::key::ObjectKey {
            object_group_id: 1,
            ..base.clone()
        },
        kvtier_core::key::ObjectKey {
            cache_salt: Arc::from("tenant-a"),
            ..base.clone()
        },
    ];
    for k in &variants {
        let t = l1.reserve_write(&[(k.clone(), PAGE)], false).remove(0);
        l1.finish_write(&[t.expect("each variant is a new key")])
            .remove(0)
            .expect("published");
    }
    assert_eq!(l1.counters().objects.get(), variants.len() as u64);
    l1.check_invariants().expect("consistent");
    // Equal strings in fresh `Arc`s name the same object.
    let same = kvtier_core::key::ObjectKey {
        model_name: Arc::from("m"),
        cache_salt: Arc::from(""),
        ..base.clone()
    };
    assert_eq!(l1.contains(&[same]), vec![true]);
    assert_eq!(l1.delete(&variants[1..2]), vec![Ok(())]);
    assert_eq!(
        l1.contains(&variants),
        vec![true, false, true, true, true],
        "deleting one variant leaves the others"
    );
    l1.check_invariants()
        .expect("consistent after a namespace row went");
    // An object of 4 GiB or more does not fit an entry's `u32` length.
    let (big, _clock) = manager(2 << 20);
    let r = big.reserve_write(&[(key(9), 1 << 32)], false).remove(0);
    assert_eq!(r, Err(L1Error::OutOfMemory));
    big.check_invariants().expect("consistent");
}
