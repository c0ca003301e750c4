//! L1 manager hot path: one chunk's full life (reserve_write → finish_write → reserve_read →
//! finish_read) and the same for a batch of 16 chunks, single-threaded, so the figure is the
//! per-chunk CPU cost of the state machine (the data copy is not part of L1).
//!
//! Run: `cargo bench -p kvtier-core --bench l1`

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use kvtier_core::hash::ChunkHash;
use kvtier_core::key::ObjectKey;
use kvtier_core::l1::{L1Config, L1Manager};

fn keys(n: u32) -> Vec<ObjectKey> {
    let model: Arc<str> = Arc::from("meta-llama/Llama-3.1-8B-Instruct");
    let salt: Arc<str> = Arc::from("");
    (0..n)
        .map(|i| {
            let mut h = [0u8; 32];
            h[..4].copy_from_slice(&i.to_le_bytes());
            h[4..8].copy_from_slice(&i.wrapping_mul(0x9e37_79b9).to_le_bytes());
            ObjectKey {
                chunk_hash: ChunkHash::from_bytes(h),
                model_name: Arc::clone(&model),
                kv_rank: 0x0100_0100,
                object_group_id: 0,
                cache_salt: Arc::clone(&salt),
            }
        })
        .collect()
}

fn lifecycle(c: &mut Criterion) {
    let mut g = c.benchmark_group("l1_chunk_lifecycle");
    for batch in [1usize, 16] {
        // 64 Ki objects of 3 MiB would need 192 GiB: the allocator works on offsets only, so a
        // large virtual capacity costs nothing here.
        let l1 = L1Manager::new(L1Config::with_capacity(1 << 40));
        let all = keys(65_536);
        let len = 3 << 20;
        let mut next = 0usize;
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_function(
            BenchmarkId::new("reserve_finish_read_release", batch),
            |b| {
                b.iter(|| {
                    let start = next % (all.len() - batch);
                    next += batch;
                    let ks = &all[start..start + batch];
                    let items: Vec<_> = ks.iter().map(|k| (k.clone(), len)).collect();
                    let tickets: Vec<_> = l1
                        .reserve_write(&items, false)
                        .into_iter()
                        .filter_map(Result::ok)
                        .collect();
                    l1.finish_write(&tickets);
                    let leases: Vec<_> = l1
                        .reserve_read(ks, 1)
                        .into_iter()
                        .filter_map(Result::ok)
                        .collect();
                    l1.finish_read(&leases, 1);
                    l1.delete(ks);
                    black_box(leases.len())
                });
            },
        );
    }
    g.finish();
}

criterion_group!(benches, lifecycle);
criterion_main!(benches);
