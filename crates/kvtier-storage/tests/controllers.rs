//! StoreController and PrefetchController over a real L1 manager and shared-memory segment.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kvtier_core::key::ObjectKey;
use kvtier_core::l1::{Allocation, L1Config, L1Manager};
use kvtier_core::shm::ShmSegment;
use kvtier_storage::L2Backend;
use kvtier_storage::config::{FsConfig, MockConfig, RespConfig};
use kvtier_storage::fs::FsBackend;
use kvtier_storage::instrumented::Instrumented;
use kvtier_storage::mock::MockBackend;
use kvtier_storage::prefetch::{PrefetchConfig, PrefetchController, PrefetchRequest, Take};
use kvtier_storage::resp::RespBackend;
use kvtier_storage::store::{StoreConfig, StoreController};
use kvtier_storage::testsuite::{Arena, key, pattern, test_segment, unique_model};

const OBJ: usize = 64 << 10;

struct Fixture {
    rt: tokio::runtime::Runtime,
    l1: Arc<L1Manager>,
    seg: Arc<ShmSegment>,
}

impl Fixture {
    fn new(l1_bytes: u64) -> Self {
        Self {
            rt: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime"),
            l1: Arc::new(L1Manager::new(L1Config::with_capacity(l1_bytes))),
            seg: test_segment(l1_bytes),
        }
    }

    /// Writes an object into L1 (published, unlocked).
    fn put_l1(&self, k: &ObjectKey, data: &[u8]) {
        let t = self
            .l1
            .reserve_write(&[(k.clone(), data.len() as u64)], false);
        let t = t[0].expect("room in L1");
        self.seg
            .copy_in(t.alloc.offset as usize, data)
            .expect("in bounds");
        assert!(self.l1.finish_write(&[t])[0].is_ok());
    }

    fn read_l1(&self, a: Allocation) -> Vec<u8> {
        let mut v = vec![0u8; a.len as usize];
        self.seg
            .copy_out(a.offset as usize, &mut v)
            .expect("in bounds");
        v
    }

    fn read_locked(&self) -> u64 {
        self.l1.counters().read_locked_objects.get()
    }

    fn check(&self) {
        self.l1.check_invariants().expect("L1 invariants");
    }
}

fn mock(bandwidth_gb: f64) -> Arc<Instrumented<MockBackend>> {
    Arc::new(MockBackend::new(MockConfig {
        max_size_gb: 1.0,
        mock_bandwidth_gb: bandwidth_gb,
        eviction: None,
    }))
}

fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Stores `data` directly into an adapter (through a scratch arena).
fn seed(fx: &Fixture, b: &dyn L2Backend, arena: &Arena, k: &ObjectKey, data: &[u8]) {
    let a = arena.put(data);
    let r = fx
        .rt
        .block_on(b.store(std::slice::from_ref(k), &arena.segment, &[a]));
    assert!(r[0].is_ok(), "{r:?}");
}

fn loaded(
    fx: &Fixture,
    b: &dyn L2Backend,
    arena: &Arena,
    k: &ObjectKey,
    len: usize,
) -> Option<Vec<u8>> {
    fx.rt.block_on(async {
        let found = b.lookup_and_pin(std::slice::from_ref(k)).await.ok()?;
        found[0]?;
        let a = arena.alloc(len as u64);
        let r = b.load(std::slice::from_ref(k), &arena.segment, &[a]).await;
        b.unpin(std::slice::from_ref(k)).await;
        r[0].as_ref().ok()?;
        Some(arena.get(a))
    })
}

#[test]
fn write_behind_reaches_every_adapter_and_releases_l1_locks() {
    let fx = Fixture::new(16 << 20);
    let dir = tempfile::tempdir().expect("tmp");
    let m = mock(100.0);
    let f = FsBackend::open(
        FsConfig::new(dir.path().to_str().expect("utf-8")),
        fx.rt.handle(),
    )
    .expect("fs");
    let adapters: Vec<Arc<dyn L2Backend>> = vec![m.clone(), f.clone()];
    let sc = StoreController::spawn(
        fx.rt.handle(),
        StoreConfig::default(),
        fx.l1.clone(),
        fx.seg.clone(),
        adapters,
    );
    let model = unique_model();
    let keys: Vec<ObjectKey> = (0..10).map(|i| key(&model, i)).collect();
    for (i, k) in keys.iter().enumerate() {
        fx.put_l1(k, &pattern(i as u32, OBJ));
    }
    assert!(sc.submit(keys[..6].to_vec()));
    assert!(sc.submit(keys[6..].to_vec()));
    wait_until("write-behind", Duration::from_secs(10), || sc.is_idle());
    assert_eq!(sc.stored_keys(0), 10);
    assert_eq!(sc.stored_keys(1), 10);
    assert_eq!(fx.read_locked(), 0, "every L1 read lock was released");
    let arena = Arena::new(4 << 20);
    for (i, k) in keys.iter().enumerate() {
        for b in [&*m as &dyn L2Backend, &*f] {
            let got = loaded(&fx, b, &arena, k, OBJ).expect("stored");
            assert!(
                got == pattern(i as u32, OBJ),
                "{} copy of {i} differs",
                b.kind()
            );
        }
        arena.reset();
    }
    // A key that left L1 before its turn is skipped and counted.
    assert!(sc.submit(vec![key(&model, 99)]));
    wait_until("idle", Duration::from_secs(5), || sc.is_idle());
    let v = sc.report_status().to_value();
    assert_eq!(v["skipped_gone_keys_total"], 1, "{v}");
    assert_eq!(v["thread_alive"], true);
    assert_eq!(v["num_l2_adapters"], 2);
    fx.rt.block_on(sc.stop(Duration::from_secs(5)));
    assert_eq!(sc.report_status().to_value()["thread_alive"], false);
    fx.check();
}

#[test]
fn duplicate_in_flight_stores_are_coalesced() {
    let fx = Fixture::new(16 << 20);
    // 64 KiB/s: each 64 KiB store takes ~1 s, so the second submit finds the first in flight
    // even when this thread is descheduled between the two calls.
    let m = mock(1.0 / 16384.0);
    let sc = StoreController::spawn(
        fx.rt.handle(),
        StoreConfig::default(),
        fx.l1.clone(),
        fx.seg.clone(),
        vec![m.clone() as Arc<dyn L2Backend>],
    );
    let model = unique_model();
    let k = key(&model, 1);
    fx.put_l1(&k, &pattern(1, OBJ));
    assert!(sc.submit(vec![k.clone()]));
    assert!(sc.submit(vec![k.clone(), k.clone()]));
    wait_until("idle", Duration::from_secs(10), || sc.is_idle());
    let v = sc.report_status().to_value();
    assert_eq!(v["coalesced_keys_total"], 2, "{v}");
    assert_eq!(sc.stored_keys(0), 1);
    let s = m.report_status().to_value();
    assert_eq!(s["ops"]["store"]["objects_total"], 1, "stored once: {s}");
    fx.rt.block_on(sc.stop(Duration::from_secs(5)));
    fx.check();
}

#[test]
fn full_queue_drops_newest_and_counts() {
    let fx = Fixture::new(16 << 20);
    let m = mock(1.0 / 1024.0);
    let sc = StoreController::spawn(
        fx.rt.handle(),
        StoreConfig {
            queue_max_keys: 2,
            max_in_flight_tasks: 1,
            max_batch_keys: 1,
        },
        fx.l1.clone(),
        fx.seg.clone(),
        vec![m.clone() as Arc<dyn L2Backend>],
    );
    let model = unique_model();
    let keys: Vec<ObjectKey> = (0..10).map(|i| key(&model, i)).collect();
    for (i, k) in keys.iter().enumerate() {
        fx.put_l1(k, &pattern(i as u32, OBJ));
    }
    let accepted = keys
        .iter()
        .filter(|k| sc.submit(vec![(*k).clone()]))
        .count() as u64;
    wait_until("idle", Duration::from_secs(20), || sc.is_idle());
    assert!(
        sc.dropped_keys() > 0,
        "a 2-key queue behind a slow adapter must overflow"
    );
    assert_eq!(accepted + sc.dropped_keys(), 10);
    assert_eq!(
        sc.stored_keys(0),
        accepted,
        "everything accepted was stored"
    );
    // Dropped keys are still in L1: nothing acknowledged is lost.
    assert!(fx.l1.contains(&keys).iter().all(|&x| x));
    fx.rt.block_on(sc.stop(Duration::from_secs(5)));
    fx.check();
}

#[test]
fn failing_adapter_is_counted_not_retried_and_l1_keeps_the_data() {
    let fx = Fixture::new(16 << 20);
    // Nothing listens on this port (picked below the ephemeral range, so no other test's
    // client can be using it): the adapter starts down and fails fast.
    let port = kvtier_storage::testsuite::free_port();
    let dead = fx
        .rt
        .block_on(RespBackend::open(
            RespConfig::new("127.0.0.1", port),
            fx.rt.handle(),
        ))
        .expect("open");
    let good = mock(100.0);
    let sc = StoreController::spawn(
        fx.rt.handle(),
        StoreConfig::default(),
        fx.l1.clone(),
        fx.seg.clone(),
        vec![dead.clone() as Arc<dyn L2Backend>, good.clone()],
    );
    let model = unique_model();
    let keys: Vec<ObjectKey> = (0..4).map(|i| key(&model, i)).collect();
    for (i, k) in keys.iter().enumerate() {
        fx.put_l1(k, &pattern(i as u32, OBJ));
    }
    assert!(sc.submit(keys.clone()));
    wait_until("idle", Duration::from_secs(10), || sc.is_idle());
    assert_eq!(sc.failed_keys(0), 4);
    assert_eq!(
        sc.stored_keys(1),
        4,
        "the healthy adapter still gets everything"
    );
    let v = sc.report_status().to_value();
    assert_eq!(v["adapters"][0]["fast_failed_keys_total"], 4, "{v}");
    assert_eq!(fx.read_locked(), 0);
    assert!(fx.l1.contains(&keys).iter().all(|&x| x));
    // Not retried: nothing more happens.
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(sc.failed_keys(0), 4);
    fx.rt.block_on(async {
        sc.stop(Duration::from_secs(5)).await;
        dead.close().await;
    });
    fx.check();
}

struct Prefetch {
    fx: Fixture,
    pc: PrefetchController,
    adapters: Vec<Arc<dyn L2Backend>>,
    arena: Arena,
}

impl Prefetch {
    fn new(l1_bytes: u64, adapters: Vec<Arc<dyn L2Backend>>, max_in_flight: usize) -> Self {
        let fx = Fixture::new(l1_bytes);
        let pc = PrefetchController::spawn(
            fx.rt.handle(),
            PrefetchConfig {
                max_in_flight,
                ..PrefetchConfig::default()
            },
            fx.l1.clone(),
            fx.seg.clone(),
            adapters.clone(),
        );
        Self {
            fx,
            pc,
            adapters,
            arena: Arena::new(16 << 20),
        }
    }

    fn seed(&self, adapter: usize, k: &ObjectKey, data: &[u8]) {
        seed(&self.fx, &*self.adapters[adapter], &self.arena, k, data);
    }

    fn run(
        &self,
        keys: &[ObjectKey],
        group: usize,
        readers: u32,
    ) -> kvtier_storage::prefetch::PrefetchResult {
        let id = self.pc.submit(PrefetchRequest {
            keys: keys.to_vec(),
            group,
            readers,
        });
        assert!(
            self.pc.wait(id, Duration::from_secs(10)),
            "prefetch did not finish"
        );
        match self.pc.try_take(id) {
            Take::Ready(r) => {
                assert!(
                    matches!(self.pc.try_take(id), Take::Unknown),
                    "results are taken once"
                );
                r
            }
            other => panic!("expected a result, got {other:?}"),
        }
    }

    fn pins(&self) -> u64 {
        self.adapters.iter().map(|a| a.usage().pinned_count).sum()
    }

    fn stop(&self) {
        self.fx.rt.block_on(self.pc.stop(Duration::from_secs(5)));
        self.fx.check();
    }
}

#[test]
fn prefetch_loads_the_prefix_from_the_lowest_index_adapter() {
    let p = Prefetch::new(16 << 20, vec![mock(100.0), mock(100.0)], 8);
    let model = unique_model();
    let k: Vec<ObjectKey> = (0..6).map(|i| key(&model, i)).collect();
    // Adapter 0 has k0, k2; adapter 1 has k0 (different bytes), k1, k3, k5. k4 is nowhere.
    p.seed(0, &k[0], &pattern(100, OBJ));
    p.seed(0, &k[2], &pattern(2, OBJ));
    p.seed(1, &k[0], &pattern(200, OBJ));
    p.seed(1, &k[1], &pattern(1, OBJ));
    p.seed(1, &k[3], &pattern(3, OBJ));
    p.seed(1, &k[5], &pattern(5, OBJ));
    let r = p.run(&k, 1, 1);
    assert_eq!(
        r.keys,
        k[..4].to_vec(),
        "cut at the first chunk missing everywhere"
    );
    assert_eq!(r.chunks(), 4);
    let expect = [
        pattern(100, OBJ),
        pattern(1, OBJ),
        pattern(2, OBJ),
        pattern(3, OBJ),
    ];
    for (i, (lease, want)) in r.leases.iter().zip(&expect).enumerate() {
        assert!(
            p.fx.read_l1(lease.alloc) == *want,
            "chunk {i} has the wrong bytes"
        );
    }
    assert_eq!(
        p.pins(),
        0,
        "every L2 pin was released (planned and unplanned)"
    );
    // The loaded objects are temporary and read-locked; k5 (beyond the gap) was never loaded.
    assert_eq!(p.fx.read_locked(), 4);
    assert_eq!(p.fx.l1.counters().temporary_objects.get(), 4);
    assert!(!p.fx.l1.contains(&k[5..6])[0]);
    p.fx.l1.finish_read(&r.leases, 1);
    assert_eq!(
        p.fx.l1.counters().objects.get(),
        0,
        "temporary objects go away with their last reader"
    );
    let v = p.pc.report_status().to_value();
    assert_eq!(v["keys_loaded_total"], 4, "{v}");
    assert_eq!(v["completed_results_count"], 0);
    p.stop();
}

#[test]
fn prefetch_respects_groups_readers_and_existing_l1_objects() {
    let p = Prefetch::new(16 << 20, vec![mock(100.0)], 8);
    let model = unique_model();
    // Two ranks per chunk: chunk 0 complete, chunk 1 missing rank 1.
    let k: Vec<ObjectKey> = (0..4).map(|i| key(&model, i)).collect();
    for (i, kk) in k.iter().enumerate().take(3) {
        p.seed(0, kk, &pattern(i as u32, OBJ));
    }
    // k1 is already in L1 (written meanwhile): it is read-locked, not reloaded.
    p.fx.put_l1(&k[1], &pattern(1, OBJ));
    let r = p.run(&k, 2, 3);
    assert_eq!(r.keys, k[..2].to_vec());
    assert_eq!(r.chunks(), 1);
    assert_eq!(r.readers, 3);
    let v = p.pc.report_status().to_value();
    assert_eq!(v["keys_already_in_l1_total"], 1, "{v}");
    assert_eq!(v["keys_loaded_total"], 1, "{v}");
    // Three locks each: two releases leave them locked, the third frees the temporary one.
    p.fx.l1.finish_read(&r.leases, 2);
    assert_eq!(p.fx.read_locked(), 2);
    p.fx.l1.finish_read(&r.leases, 1);
    assert_eq!(p.fx.read_locked(), 0);
    assert!(!p.fx.l1.contains(&k[..1])[0], "temporary k0 is gone");
    assert!(
        p.fx.l1.contains(&k[1..2])[0],
        "k1 was a normal L1 object and stays"
    );
    assert_eq!(p.pins(), 0);
    p.stop();
}

#[test]
fn prefetch_halves_the_plan_when_l1_is_short() {
    // L1 fits two objects only.
    let p = Prefetch::new(2 * OBJ as u64, vec![mock(100.0)], 8);
    let model = unique_model();
    let k: Vec<ObjectKey> = (0..4).map(|i| key(&model, i)).collect();
    for (i, kk) in k.iter().enumerate() {
        p.seed(0, kk, &pattern(i as u32, OBJ));
    }
    let r = p.run(&k, 1, 1);
    assert_eq!(r.keys, k[..2].to_vec());
    assert!(p.pc.report_status().to_value()["l1_oom_trims_total"].as_u64() >= Some(1));
    assert_eq!(p.pins(), 0);
    p.fx.l1.finish_read(&r.leases, 1);
    p.stop();
}

#[test]
fn prefetch_stops_at_a_corrupt_object() {
    let dir = tempfile::tempdir().expect("tmp");
    let fsb: Arc<Instrumented<FsBackend>>;
    let p = {
        // The fs adapter needs a runtime handle: build the fixture first, then the adapter.
        let fx = Fixture::new(16 << 20);
        fsb = FsBackend::open(
            FsConfig::new(dir.path().to_str().expect("utf-8")),
            fx.rt.handle(),
        )
        .expect("fs");
        let pc = PrefetchController::spawn(
            fx.rt.handle(),
            PrefetchConfig::default(),
            fx.l1.clone(),
            fx.seg.clone(),
            vec![fsb.clone() as Arc<dyn L2Backend>],
        );
        Prefetch {
            fx,
            pc,
            adapters: vec![fsb.clone()],
            arena: Arena::new(16 << 20),
        }
    };
    let model = unique_model();
    let k: Vec<ObjectKey> = (0..3).map(|i| key(&model, i)).collect();
    for (i, kk) in k.iter().enumerate() {
        p.seed(0, kk, &pattern(i as u32, OBJ));
    }
    let path = fsb.object_path(&k[1]);
    let mut bytes = std::fs::read(&path).expect("read");
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&path, bytes).expect("write");
    let r = p.run(&k, 1, 1);
    assert_eq!(r.keys, k[..1].to_vec(), "the corrupt chunk ends the prefix");
    assert!(p.fx.read_l1(r.leases[0].alloc) == pattern(0, OBJ));
    let v = p.pc.report_status().to_value();
    assert_eq!(v["keys_load_failed_total"], 1, "{v}");
    // k2 was loaded but lies beyond the gap: released, so only k0 stays locked.
    assert_eq!(p.fx.read_locked(), 1);
    assert_eq!(
        p.fx.l1.counters().staging_objects.get(),
        0,
        "the failed reservation was aborted"
    );
    p.fx.l1.finish_read(&r.leases, 1);
    assert_eq!(p.fx.l1.counters().objects.get(), 0);
    assert_eq!(p.pins(), 0);
    p.stop();
    p.fx.rt.block_on(fsb.close());
}

#[test]
fn prefetch_runs_at_most_max_in_flight_and_queues_fifo() {
    // ~64 ms per 64 KiB load.
    let p = Prefetch::new(16 << 20, vec![mock(1.0 / 1024.0)], 1);
    let model = unique_model();
    let k: Vec<ObjectKey> = (0..3).map(|i| key(&model, i)).collect();
    for (i, kk) in k.iter().enumerate() {
        p.seed(0, kk, &pattern(i as u32, OBJ));
    }
    let ids: Vec<u64> = k
        .iter()
        .map(|kk| {
            p.pc.submit(PrefetchRequest {
                keys: vec![kk.clone()],
                group: 1,
                readers: 1,
            })
        })
        .collect();
    let mut max_seen = 0;
    let mut queued_seen = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut done_order = Vec::new();
    while done_order.len() < 3 {
        assert!(Instant::now() < deadline, "prefetches did not finish");
        let v = p.pc.report_status().to_value();
        max_seen = max_seen.max(v["in_flight_request_count"].as_u64().unwrap_or(0));
        queued_seen = queued_seen.max(
            v["pending_queue_size"].as_u64().unwrap_or(0)
                + v["submission_queue_size"].as_u64().unwrap_or(0),
        );
        for &id in &ids {
            if !done_order.contains(&id)
                && let Take::Ready(r) = p.pc.try_take(id)
            {
                p.fx.l1.finish_read(&r.leases, 1);
                done_order.push(id);
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(max_seen, 1, "never more than max_in_flight requests run");
    assert!(queued_seen >= 1, "the others waited in the queue");
    assert_eq!(done_order, ids, "FIFO");
    p.stop();
}

#[test]
fn cancelled_and_uncollected_results_release_their_locks() {
    let p = Prefetch::new(16 << 20, vec![mock(1.0 / 1024.0)], 8);
    let model = unique_model();
    let k: Vec<ObjectKey> = (0..2).map(|i| key(&model, i)).collect();
    for (i, kk) in k.iter().enumerate() {
        p.seed(0, kk, &pattern(i as u32, OBJ));
    }
    // Cancelled while running: released when it completes.
    let id = p.pc.submit(PrefetchRequest {
        keys: k.clone(),
        group: 1,
        readers: 1,
    });
    p.pc.cancel(id);
    assert!(
        p.pc.wait(id, Duration::from_secs(10)),
        "the cancelled request did not finish"
    );
    assert!(matches!(p.pc.try_take(id), Take::Unknown));
    assert_eq!(p.fx.read_locked(), 0);
    assert_eq!(p.fx.l1.counters().objects.get(), 0);
    // Done but never collected: released at shutdown.
    let id = p.pc.submit(PrefetchRequest {
        keys: k.clone(),
        group: 1,
        readers: 1,
    });
    assert!(p.pc.wait(id, Duration::from_secs(10)));
    assert_eq!(p.fx.read_locked(), 2);
    assert_eq!(p.pc.active_jobs(), 1);
    p.stop();
    assert_eq!(p.fx.read_locked(), 0);
    assert_eq!(p.fx.l1.counters().objects.get(), 0);
    assert_eq!(p.pins(), 0);
}
