//! Token hashing throughput: one 256-token chunk, 32 chunks, and a cached re-lookup.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use kvtier_core::hash::{ChunkHashCache, HashAlgorithm, TokenHasher};

fn hashing(c: &mut Criterion) {
    let Ok(hasher) = TokenHasher::new(256, HashAlgorithm::Blake3) else {
        return;
    };
    let tokens: Vec<u32> = (0..256 * 32).map(|i| (i * 7919) % 128_000).collect();

    let mut group = c.benchmark_group("token_hash");
    group.throughput(Throughput::Elements(256));
    group.bench_function("chunk256_x1", |b| {
        b.iter(|| hasher.hash_chunks(black_box(&tokens[..256])));
    });
    group.throughput(Throughput::Elements(256 * 32));
    group.bench_function("chunk256_x32", |b| {
        b.iter(|| hasher.hash_chunks(black_box(&tokens)));
    });
    group.bench_function("chunk256_x32_cached", |b| {
        let mut cache = ChunkHashCache::new();
        b.iter(|| {
            cache
                .hashes(&hasher, black_box(&tokens), 0, tokens.len())
                .map(<[_]>::len)
        });
    });
    group.finish();
}

criterion_group!(benches, hashing);
criterion_main!(benches);
