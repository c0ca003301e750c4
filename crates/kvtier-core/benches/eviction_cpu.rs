//! Eviction CPU per chunk, every policy against LRU in the same run.
//!
//! - `policy_per_chunk`: the policy alone, with the same operation sequence for every policy:
//!   65,536 resident objects; per chunk, one victim is selected and removed (the caller hands
//!   back its metadata, which it keeps per slot as a 4-byte object number), a new object
//!   becomes ready in its slot, and a resident object is read (two accesses: lock and
//!   release). This is the comparison the policy choice changes. `evict_insert_read` does it
//!   one chunk at a time; `batch16` runs the same operations 16 chunks at a time, as the
//!   manager does for a 16-chunk store (one selection, the removals and the admissions each
//!   hinted first with `EvictionPolicy::prefetch`).
//! - `l1_evict_per_chunk`: the whole L1 manager on a full pool, per chunk one store that evicts
//!   exactly one object (`reserve_write` + `finish_write`: index, allocator, tenant accounting,
//!   listener and policy), with no reads (`store_evict`) or with two reads per chunk that hit
//!   under every policy (`store_evict_read`, see [`whole_path`]), or one store of 16 new
//!   chunks per call that evicts 16 (`store_evict_batch16`: a multi-chunk request, whose
//!   admissions and removals the manager hints to the policy before handling the first).
//!   Identical operations and outcomes for every policy, so this is the like-for-like ratio
//!   users pay for.
//!
//! `EVICTION_BENCH_RESIDENT=<objects>` changes the resident object count (default 65,536, whose
//! tables fit this machine's 2 MiB L2; 1,048,576 shows a large L1, whose tables do not).
//! Run: `cargo bench -p kvtier-core --bench eviction_cpu`. On a shared, loaded machine run the
//! built binary under `chrt -f 50 … --bench` instead (docs/performance.md).

use std::hint::black_box;
use std::sync::Arc;

use std::sync::atomic::{AtomicU64, Ordering};

use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvtier_core::hash::ChunkHash;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::eviction::{EntryMeta, Removal, Verdict};
use kvtier_core::l1::{EvictionPolicyKind, L1Config, L1Listener, L1Manager};

const OBJ: u64 = 4096;
const DEFAULT_RESIDENT: u64 = 65_536;
const BATCH: usize = 16;

/// Resident objects: `EVICTION_BENCH_RESIDENT` or [`DEFAULT_RESIDENT`].
fn resident() -> u64 {
    std::env::var("EVICTION_BENCH_RESIDENT")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n: &u64| n >= 1024)
        .unwrap_or(DEFAULT_RESIDENT)
}

/// The whole-path workloads (see [`whole_path`]).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// One chunk per store, no reads.
    Store,
    /// One chunk per store and two reads per chunk.
    StoreRead,
    /// Sixteen chunks per store, no reads.
    Batch,
}

fn key(i: u64, salts: &[Arc<str>], model: &Arc<str>) -> ObjectKey {
    let mut h = [0u8; 32];
    h[..8].copy_from_slice(&i.to_le_bytes());
    h[8..16].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
    ObjectKey {
        chunk_hash: ChunkHash::from_bytes(h),
        model_name: Arc::clone(model),
        kv_rank: 0x0100_0100,
        object_group_id: 0,
        cache_salt: Arc::clone(&salts[(i % salts.len() as u64) as usize]),
    }
}

fn policy_only(c: &mut Criterion) {
    let mut g = c.benchmark_group("policy_per_chunk");
    g.throughput(Throughput::Elements(BATCH as u64));
    let tenants = [0u32, 1, 2, 3];
    let resident = resident();
    for policy in [
        EvictionPolicyKind::Lru,
        EvictionPolicyKind::Arc,
        EvictionPolicyKind::S3Fifo,
        EvictionPolicyKind::IsolatedLru,
    ] {
        let mut p = policy.build();
        let meta = |i: u64| EntryMeta {
            tenant: (i % 4) as u32,
            fingerprint: i.wrapping_mul(0x9e37_79b9_7f4a_7c15),
        };
        // Each slot's object number: the caller hands the object's metadata back at removal,
        // as the manager does from its entry.
        let mut objects: Vec<u32> = (0..resident as u32).collect();
        for (id, &n) in objects.iter().enumerate() {
            p.on_ready(id as u32, meta(u64::from(n)));
        }
        let mut next = resident;
        let mut x = 1u64;
        g.bench_function(BenchmarkId::new("evict_insert_read", policy.name()), |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    let mut victim = None;
                    p.select(&tenants, &mut |id| {
                        if victim.is_some() {
                            return Verdict::Stop;
                        }
                        victim = Some(id);
                        Verdict::Evict
                    });
                    let Some(id) = victim else { return };
                    let slot = &mut objects[id as usize];
                    p.on_remove(id, meta(u64::from(*slot)), Removal::Evicted);
                    *slot = next as u32;
                    p.on_ready(id, meta(next));
                    next += 1;
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let read = ((x >> 33) % resident) as u32;
                    let tenant = meta(u64::from(objects[read as usize])).tenant;
                    p.on_access(read, tenant);
                    p.on_access(read, tenant);
                    black_box(id);
                }
            });
        });
        // The same operations grouped as the manager runs a 16-chunk store: one round selects
        // 16 victims, each is hinted and then removed, the 16 new objects are hinted and then
        // made ready; then 16 reads.
        let mut victims = Vec::with_capacity(BATCH);
        g.bench_function(BenchmarkId::new("batch16", policy.name()), |b| {
            b.iter(|| {
                victims.clear();
                p.select(&tenants, &mut |id| {
                    if victims.len() == BATCH {
                        return Verdict::Stop;
                    }
                    victims.push(id);
                    Verdict::Evict
                });
                for &id in &victims {
                    p.prefetch(meta(u64::from(objects[id as usize])).fingerprint);
                }
                for &id in &victims {
                    p.on_remove(id, meta(u64::from(objects[id as usize])), Removal::Evicted);
                }
                for i in 0..victims.len() as u64 {
                    p.prefetch(meta(next + i).fingerprint);
                }
                for &id in &victims {
                    objects[id as usize] = next as u32;
                    p.on_ready(id, meta(next));
                    next += 1;
                }
                for _ in 0..victims.len() {
                    x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    let read = ((x >> 33) % resident) as u32;
                    let tenant = meta(u64::from(objects[read as usize])).tenant;
                    p.on_access(read, tenant);
                    p.on_access(read, tenant);
                }
                black_box(victims.len());
            });
        });
    }
    g.finish();
}

/// Counts listener calls (the KV-event log's place), so the whole path includes the call.
#[derive(Debug, Default)]
struct CountingListener(AtomicU64);

impl L1Listener for CountingListener {
    fn published(&self, _key: &ObjectKey) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    fn removed(&self, _key: &ObjectKey, _cause: kvtier_core::l1::RemovalCause) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}

/// One whole-path step: store key `i` (the pool is full, so `reserve_write` evicts exactly one
/// object), publish it, then read `reads` (each must hit). Returns the number of misses.
fn store_one_then_read(l1: &L1Manager, item: &[(ObjectKey, u64)], reads: &[ObjectKey]) -> usize {
    let t: Vec<_> = l1
        .reserve_write(item, false)
        .into_iter()
        .filter_map(Result::ok)
        .collect();
    let mut misses = item.len() - t.len();
    l1.finish_write(&t);
    if !reads.is_empty() {
        let leases: Vec<_> = l1
            .reserve_read(reads, 1)
            .into_iter()
            .filter_map(Result::ok)
            .collect();
        misses += reads.len() - leases.len();
        l1.finish_read(&leases, 1);
    }
    misses
}

/// The whole L1 manager's eviction cost per chunk, with the same operation sequence *and the
/// same outcomes* for every policy (every store evicts exactly one object, every read hits), so
/// the per-policy figures are a like-for-like ratio:
/// - `store_evict`: per chunk one store of a new key into a full pool (index insert and removal,
///   allocator, tenant accounting, listener, policy), no reads.
/// - `store_evict_read`: the same, and per chunk two reads (lock + release each): the chunk just
///   stored, and one of a hot set of `resident / 4` keys taken round-robin (each is read every
///   `resident / 4` chunks, so every policy keeps it: LRU by recency, ARC in T2, S3-FIFO in
///   main with reinsertion, IsolatedLRU in its tenant's list). Every new chunk is read once,
///   so ARC's T1 empties into T2 and S3-FIFO promotes to main: their main-queue paths run.
///   The bench panics if any read misses (the sequences would then differ).
/// - `store_evict_batch16`: per iteration one store of 16 new keys (one `reserve_write` that
///   evicts 16 objects, one `finish_write`), no reads.
fn whole_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("l1_evict_per_chunk");
    g.throughput(Throughput::Elements(BATCH as u64));
    let model: Arc<str> = Arc::from("bench/model");
    let salts: Vec<Arc<str>> = (0..4).map(|t| Arc::from(format!("t{t}"))).collect();
    let resident = resident();
    let hot = resident / 4;
    for mode in [Mode::Store, Mode::StoreRead, Mode::Batch] {
        let reading = mode == Mode::StoreRead;
        // Chunks per store, and stores per iteration.
        let (per_store, stores) = if mode == Mode::Batch {
            (BATCH, 1)
        } else {
            (1, BATCH)
        };
        for policy in [
            EvictionPolicyKind::Lru,
            EvictionPolicyKind::Arc,
            EvictionPolicyKind::S3Fifo,
            EvictionPolicyKind::IsolatedLru,
        ] {
            let mut cfg = L1Config::with_capacity(resident * OBJ);
            cfg.eviction.policy = policy;
            let l1 = L1Manager::new(cfg);
            let listener = Arc::new(CountingListener::default());
            if l1.set_listener(listener.clone()).is_err() {
                panic!("listener already set");
            }
            let fill: Vec<(ObjectKey, u64)> = (0..resident)
                .map(|i| (key(i, &salts, &model), OBJ))
                .collect();
            for part in fill.chunks(1024) {
                let t: Vec<_> = l1
                    .reserve_write(part, false)
                    .into_iter()
                    .filter_map(Result::ok)
                    .collect();
                assert_eq!(t.len(), part.len(), "the fill fits");
                l1.finish_write(&t);
            }
            let hot_keys: Vec<ObjectKey> = (0..hot).map(|i| key(i, &salts, &model)).collect();
            if reading {
                // The hot set is read once before the steps start (it is the fill's oldest part,
                // which LRU would otherwise evict first).
                for part in hot_keys.chunks(1024) {
                    assert_eq!(store_one_then_read(&l1, &[], part), 0, "{policy}");
                }
            }
            let mut next = resident;
            let mut h = 0usize;
            // One step: the new keys (one store) and (when reading) the read set.
            let step = |next: &mut u64, h: &mut usize| {
                let items: Vec<(ObjectKey, u64)> = (0..per_store as u64)
                    .map(|i| (key(*next + i, &salts, &model), OBJ))
                    .collect();
                let reads = if reading {
                    vec![items[0].0.clone(), hot_keys[*h].clone()]
                } else {
                    Vec::new()
                };
                *next += per_store as u64;
                *h = (*h + 1) % hot_keys.len();
                (items, reads)
            };
            // Reach the steady state first (the fill's cold objects gone twice over).
            for _ in 0..2 * resident / per_store as u64 {
                let (item, reads) = step(&mut next, &mut h);
                assert_eq!(store_one_then_read(&l1, &item, &reads), 0, "{policy}");
            }
            let name = match mode {
                Mode::Store => "store_evict",
                Mode::StoreRead => "store_evict_read",
                Mode::Batch => "store_evict_batch16",
            };
            let mut misses = 0;
            g.bench_function(BenchmarkId::new(name, policy.name()), |b| {
                b.iter_batched(
                    || {
                        (0..stores)
                            .map(|_| step(&mut next, &mut h))
                            .collect::<Vec<_>>()
                    },
                    |steps| {
                        for (item, reads) in &steps {
                            misses += store_one_then_read(&l1, item, reads);
                        }
                        steps
                    },
                    BatchSize::SmallInput,
                );
            });
            assert_eq!(misses, 0, "{policy}: a store failed or a read missed");
            assert_eq!(
                l1.usage().0,
                resident * OBJ,
                "{policy}: the pool stays full"
            );
            black_box(listener.0.load(Ordering::Relaxed));
        }
    }
    g.finish();
}

criterion_group!(benches, policy_only, whole_path);
criterion_main!(benches);
