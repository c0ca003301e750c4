//! Eviction CPU per chunk, every policy against LRU in the same run: a full L1 of 65,536
//! objects where each iteration stores 16 new chunks (each store evicts synchronously) and
//! reads 16 resident ones (policy notifications on lock and release). The figure per element
//! is the L1 + policy cost of one stored-and-evicted chunk plus one read.
//!
//! Run: `cargo bench -p kvtier-core --bench eviction_cpu`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvtier_core::hash::ChunkHash;
use kvtier_core::key::ObjectKey;
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

fn eviction(c: &mut Criterion) {
    let mut g = c.benchmark_group("l1_eviction_per_chunk");
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

criterion_group!(benches, eviction);
criterion_main!(benches);
