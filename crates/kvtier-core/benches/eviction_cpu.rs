//! Eviction CPU per chunk, every policy against LRU in the same run.
//!
//! - `policy_per_chunk`: the policy alone, with the same operation sequence for every policy:
//!   65,536 resident objects; per chunk, one victim is selected and removed (the caller hands
//!   back its metadata, which it keeps per slot as a 4-byte object number), a new object
//!   becomes ready in its slot, and a resident object is read (two accesses: lock and
//!   release). This is the comparison the policy choice changes.
//! - `l1_store_evict_read`: the whole L1 manager on a full pool (16 stores that each evict, 16
//!   reads of recent chunks). Policies evict different objects, so the reads hit different
//!   sets; read it as "no policy makes L1 slow", not as a like-for-like ratio.
//!
//! Run: `cargo bench -p kvtier-core --bench eviction_cpu`. On a shared, loaded machine run the
//! built binary under `chrt -f 50 … --bench` instead (docs/performance.md).

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvtier_core::hash::ChunkHash;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::eviction::{EntryMeta, Removal, Verdict};
use kvtier_core::l1::{EvictionPolicyKind, L1Config, L1Manager};

const OBJ: u64 = 4096;
const RESIDENT: u64 = 65_536;
const BATCH: usize = 16;

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
        let mut objects: Vec<u32> = (0..RESIDENT as u32).collect();
        for (id, &n) in objects.iter().enumerate() {
            p.on_ready(id as u32, meta(u64::from(n)));
        }
        let mut next = RESIDENT;
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
                    let read = ((x >> 33) % RESIDENT) as u32;
                    p.on_access(read);
                    p.on_access(read);
                    black_box(id);
                }
            });
        });
    }
    g.finish();
}

fn eviction(c: &mut Criterion) {
    let mut g = c.benchmark_group("l1_store_evict_read");
    g.throughput(Throughput::Elements(BATCH as u64));
    let model: Arc<str> = Arc::from("bench/model");
    let salts: Vec<Arc<str>> = (0..4).map(|t| Arc::from(format!("t{t}"))).collect();
    for policy in [
        EvictionPolicyKind::Lru,
        EvictionPolicyKind::Arc,
        EvictionPolicyKind::S3Fifo,
        EvictionPolicyKind::IsolatedLru,
    ] {
        let mut cfg = L1Config::with_capacity(RESIDENT * OBJ);
        cfg.eviction.policy = policy;
        let l1 = L1Manager::new(cfg);
        let mut next = 0u64;
        let fill: Vec<(ObjectKey, u64)> = (0..RESIDENT)
            .map(|i| (key(i, &salts, &model), OBJ))
            .collect();
        for part in fill.chunks(1024) {
            let t: Vec<_> = l1
                .reserve_write(part, false)
                .into_iter()
                .filter_map(Result::ok)
                .collect();
            l1.finish_write(&t);
        }
        next += RESIDENT;
        let mut x = 1u64;
        g.bench_function(BenchmarkId::new("store_evict_read", policy.name()), |b| {
            b.iter(|| {
                let items: Vec<(ObjectKey, u64)> = (next..next + BATCH as u64)
                    .map(|i| (key(i, &salts, &model), OBJ))
                    .collect();
                next += BATCH as u64;
                let t: Vec<_> = l1
                    .reserve_write(&items, false)
                    .into_iter()
                    .filter_map(Result::ok)
                    .collect();
                l1.finish_write(&t);
                // Read recent chunks (a hot set the size of a quarter of L1).
                let reads: Vec<ObjectKey> = (0..BATCH)
                    .map(|_| {
                        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        key(next - 1 - (x >> 33) % (RESIDENT / 4), &salts, &model)
                    })
                    .collect();
                let leases: Vec<_> = l1
                    .reserve_read(&reads, 1)
                    .into_iter()
                    .filter_map(Result::ok)
                    .collect();
                l1.finish_read(&leases, 1);
                black_box(leases.len())
            });
        });
    }
    g.finish();
}

criterion_group!(benches, policy_only, eviction);
criterion_main!(benches);
